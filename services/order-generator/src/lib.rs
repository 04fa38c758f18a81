//! order-generator: publishes random orders (Avro, Confluent wire format) at a chosen rate.
//!
//! Layout:
//! - [`Config`]: the environment (SPEC), with defaults.
//! - [`orders`]: random valid orders, and invalid ones on purpose for the dead-letter path.
//! - [`Application`]: registers the schema, binds HTTP, then sends until `ORDER_COUNT` or
//!   shutdown; delivery reports are counted in the producer's callback, never awaited one by
//!   one, and the producer is flushed before the summary.

pub mod orders;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Json, Router};
use order_runtime::backoff::Backoff;
use order_runtime::config::{ConfigError, check_range, load};
use order_runtime::histogram::AtomicHistogram;
use order_runtime::http::{self, Probe};
use order_runtime::{CommonConfig, kafka, trace};
use order_schema::{CodecError, OrderCodec, OrderWriter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const SERVICE_NAME: &str = "order-generator";

/// The generator's own settings.
#[derive(Debug, Clone, Deserialize)]
pub struct GeneratorSettings {
    /// `HTTP_PORT`. Default 8101; 0 picks a free port.
    #[serde(default = "default_port")]
    pub http_port: u16,
    /// `ORDER_COUNT`: orders to send, then flush, print a summary and exit. 0 = no limit.
    /// Default 0.
    #[serde(default)]
    pub order_count: u64,
    /// `ORDER_RATE`: orders per second, 0 = as fast as the producer takes them. Default 10.
    #[serde(default = "default_rate")]
    pub order_rate: f64,
    /// `INVALID_ORDER_RATIO`: share of orders that break a business rule on purpose, 0 to 1.
    /// Default 0.
    #[serde(default)]
    pub invalid_order_ratio: f64,
    /// `COMPRESSION_TYPE`: librdkafka `compression.type`. Default `snappy`.
    #[serde(default = "default_compression")]
    pub compression_type: String,
    /// `REGISTRY_WAIT_MS`: how long start-up waits for an unreachable registry. Default 60000.
    #[serde(default = "default_registry_wait")]
    pub registry_wait_ms: u64,
}

fn default_port() -> u16 {
    8101
}
fn default_rate() -> f64 {
    10.0
}
fn default_compression() -> String {
    "snappy".to_owned()
}
fn default_registry_wait() -> u64 {
    60_000
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub generator: GeneratorSettings,
}

impl Config {
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(vars)?;
        let generator: GeneratorSettings = load(vars.iter().cloned())?;
        check_range("ORDER_RATE", generator.order_rate, 0.0, 10_000_000.0)?;
        check_range(
            "INVALID_ORDER_RATIO",
            generator.invalid_order_ratio,
            0.0,
            1.0,
        )?;
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&generator.compression_type.as_str())
        {
            return Err(ConfigError(format!(
                "COMPRESSION_TYPE={} is not one of none, gzip, snappy, lz4, zstd",
                generator.compression_type
            )));
        }
        Ok(Config { common, generator })
    }
}

/// Why the generator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not bind HTTP port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not create the Kafka producer")]
    Producer(#[source] KafkaError),
    #[error("the schema registry refused the Order schema for subject {subject}")]
    SchemaRejected {
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error("the schema registry stayed unreachable for {waited_ms} ms")]
    RegistryUnreachable {
        waited_ms: u64,
        #[source]
        source: CodecError,
    },
    #[error(transparent)]
    Codec(CodecError),
    #[error(transparent)]
    Access(#[from] order_runtime::config::AccessRefused),
}

/// Counters the delivery callback and `/stats` share.
#[derive(Debug, Default)]
pub struct Counters {
    /// Handed to the producer.
    pub sent: AtomicU64,
    /// Acknowledged by the broker.
    pub produced: AtomicU64,
    /// Failed for good (after librdkafka's own retries), or could not be encoded or queued.
    pub failed: AtomicU64,
    /// Sent on purpose with a broken business rule.
    pub invalid: AtomicU64,
}

/// The `/stats` document and the exit summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub sent: u64,
    pub produced: u64,
    pub failed: u64,
    pub invalid: u64,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
}

/// Delivery reports, counted in librdkafka's callback thread.
pub struct DeliveryCounter {
    counters: Arc<Counters>,
    started: Instant,
    latency: AtomicHistogram,
    delivered: Counter,
    errors: Counter,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    /// Microseconds since start-up when the record was handed over.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at_us: usize) {
        let now_us = self.started.elapsed().as_micros();
        #[allow(clippy::cast_precision_loss)]
        let latency_s = now_us.saturating_sub(sent_at_us as u128) as f64 / 1e6;
        self.latency.observe(latency_s);
        match result {
            Ok(_) => {
                self.counters.produced.fetch_add(1, Ordering::Relaxed);
                self.delivered.inc();
            }
            Err((e, _)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.errors.inc();
                warn!(error = %e, "order not delivered");
            }
        }
    }
}

/// A built generator, ready to run.
pub struct Application {
    config: Config,
    listener: TcpListener,
    port: u16,
    producer: Arc<ThreadedProducer<DeliveryCounter>>,
    writer: OrderWriter,
    counters: Arc<Counters>,
    probe: Arc<Probe>,
    registry: Registry,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        config
            .common
            .check_access(&config.common.orders_topic)
            .await?;
        let port = config.generator.http_port;
        let listener = http::bind(port, config.common.http_port_file.as_deref())
            .await
            .map_err(|source| StartError::Bind { port, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        let common = &config.common;

        let codec = OrderCodec::with_access(&common.registry, &common.orders_topic)
            .map_err(StartError::Codec)?;
        let schema_id = register_schema(
            &codec,
            Duration::from_millis(config.generator.registry_wait_ms),
            &shutdown,
        )
        .await?;
        let writer = OrderWriter::new(schema_id).map_err(StartError::Codec)?;

        let mut registry = Registry::default();
        let latency = AtomicHistogram::new(exponential_buckets(0.0005, 2.0, 16));
        let delivered = Counter::default();
        let errors = Counter::default();
        registry.register(
            "messaging_client_sent_messages",
            "Orders acknowledged by the broker",
            delivered.clone(),
        );
        registry.register(
            "messaging_client_send_errors",
            "Orders the broker never acknowledged",
            errors.clone(),
        );
        registry.register(
            "messaging_client_operation_duration_seconds",
            "Time from send to delivery report",
            latency.clone(),
        );
        let counters = Arc::new(Counters::default());
        let context = DeliveryCounter {
            counters: counters.clone(),
            started: Instant::now(),
            latency,
            delivered,
            errors,
        };
        let mut producer_config =
            kafka::producer_config(common, SERVICE_NAME, &config.generator.compression_type);
        // the generator waits for the orders topic rather than having a broker that allows it
        // create the topic with its defaults (librdkafka's producers ask for that by default)
        if !common
            .kafka_properties
            .contains_key("allow.auto.create.topics")
        {
            producer_config.set("allow.auto.create.topics", "false");
        }
        let producer: Arc<ThreadedProducer<DeliveryCounter>> = Arc::new(
            producer_config
                .create_with_context(context)
                .map_err(StartError::Producer)?,
        );
        // learn the topic's leaders before the first order is due, so start-up does not show
        // up as the first orders' latency; a broker that is not there yet is not fatal here
        let warming = (producer.clone(), common.orders_topic.clone());
        let warmed = tokio::task::spawn_blocking(move || {
            let (producer, topic) = warming;
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(drop)
        })
        .await;
        if let Ok(Err(e)) = warmed {
            warn!(error = %e, topic = %common.orders_topic, "no topic metadata yet; sending anyway");
        }
        let probe = Arc::new(Probe::default());
        http::watch_dependencies(
            &probe,
            common,
            kafka::readiness_check(&producer, &common.orders_topic, |p| p.client()),
            Duration::from_secs(5),
            shutdown.clone(),
        );
        Ok(Application {
            config,
            listener,
            port,
            producer,
            writer,
            counters,
            probe,
            registry,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn stats(counters: &Counters, started: Instant) -> Stats {
        let elapsed = started.elapsed().as_secs_f64();
        let produced = counters.produced.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        Stats {
            sent: counters.sent.load(Ordering::Relaxed),
            produced,
            failed: counters.failed.load(Ordering::Relaxed),
            invalid: counters.invalid.load(Ordering::Relaxed),
            elapsed_s: (elapsed * 1000.0).round() / 1000.0,
            rate_per_s: if elapsed > 0.0 {
                (produced as f64 / elapsed).round()
            } else {
                0.0
            },
        }
    }

    /// Sends until `ORDER_COUNT` is reached or shutdown, then flushes and returns the summary.
    /// Waits (at most 10 s, or until shutdown) for the first delivery report.
    async fn first_acknowledged(counters: &Counters, shutdown: &CancellationToken) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.produced.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed)
            == 0
        {
            if Instant::now() >= deadline || shutdown.is_cancelled() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<Stats> {
        let Application {
            config,
            listener,
            producer,
            writer,
            counters,
            probe,
            registry,
            shutdown,
            ..
        } = self;
        let started = Instant::now();
        let stats_counters = counters.clone();
        let stats = Router::new().route(
            "/stats",
            get(move || {
                let c = stats_counters.clone();
                async move { Json(Self::stats(&c, started)) }
            }),
        );
        let server_stop = CancellationToken::new();
        let server = tokio::spawn(http::serve(
            listener,
            http::router(probe, registry).merge(stats),
            server_stop.clone(),
        ));

        let g = &config.generator;
        let topic = config.common.orders_topic.as_str();
        info!(
            topic,
            rate = g.order_rate,
            count = g.order_count,
            invalid_ratio = g.invalid_order_ratio,
            "generating orders"
        );
        // on shutdown meanwhile, the loop below ends before sending
        wait_for_topic(&producer, topic, &shutdown).await;
        let mut pacer = orders::Pacer::new(g.order_rate);
        let mut rng = rand::rng();
        let mut last_log = Instant::now();
        let mut n: u64 = 0;
        let mut payload = Vec::with_capacity(128);
        'orders: while g.order_count == 0 || n < g.order_count {
            // a stop is looked for every 64 orders (tokio-util's `is_cancelled` takes a lock,
            // 3 % of the main thread once an order), and in every wait
            if n.is_multiple_of(64) && shutdown.is_cancelled() {
                break;
            }
            // one reading of the clock an order unless the pacer asks to wait (three were 15 %
            // of the main thread at full rate, perf): the pace, the progress log and the send
            // time of the delivery latency, which so includes making and encoding the order
            // (under a microsecond)
            let mut now = Instant::now();
            if let Some(wait) = pacer.wait_before_next(now) {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                now = Instant::now();
            }
            let (order, invalid) = orders::random_order(&mut rng, g.invalid_order_ratio);
            let span = trace::producer_span(topic, &order.order_id);
            span.record("order.id", order.order_id.as_str());
            span.record("order.invalid", invalid);
            if let Err(e) = writer.write(&order, &mut payload) {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "could not encode order");
                n += 1;
                continue;
            }
            let sent_at = usize::try_from(now.saturating_duration_since(started).as_micros())
                .unwrap_or(usize::MAX);
            let mut record = BaseRecord::with_opaque_to(topic, sent_at)
                .timestamp(pacer.due_timestamp_ms())
                .key(order.order_id.as_bytes())
                .payload(&payload);
            // with spans off there is no context to send: no header list for librdkafka to
            // allocate, copy and free per order
            if !span.is_none() {
                record = record.headers(trace::inject(&span, OwnedHeaders::new_with_capacity(3)));
            }
            // a full local queue is back-pressure, not failure: wait for deliveries to drain it
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        // a stop while the queue stays full (no broker takes it) ends the run
                        // with this order not handed over, and so not counted as sent
                        tokio::select! {
                            () = shutdown.cancelled() => break 'orders,
                            () = tokio::time::sleep(Duration::from_millis(5)) => {}
                        }
                    }
                    Err((e, _)) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "could not queue order");
                        break;
                    }
                }
            }
            drop(span);
            counters.sent.fetch_add(1, Ordering::Relaxed);
            if invalid {
                counters.invalid.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
            if n == 1 && g.order_rate > 0.0 {
                // The idempotent producer sends nothing before it has its producer id, and
                // librdkafka asks for that id on a 500 ms timer when no broker connection is up
                // at creation (the metadata warm-up does not always beat it). Pacing from here
                // would queue up to half a second of orders behind the first one, all late; so
                // the pace starts once the first order is acknowledged.
                if !Self::first_acknowledged(&counters, &shutdown).await {
                    warn!("first order not acknowledged within 10 s; pacing anyway");
                }
                pacer = orders::Pacer::new(g.order_rate);
            }
            if now.saturating_duration_since(last_log) >= Duration::from_secs(5) {
                last_log = now;
                let s = Self::stats(&counters, started);
                info!(
                    sent = s.sent,
                    produced = s.produced,
                    failed = s.failed,
                    rate_per_s = s.rate_per_s,
                    "progress"
                );
            }
        }
        info!("flushing the producer");
        let flushed = tokio::task::spawn_blocking(move || {
            let r = producer.flush(Duration::from_secs(30));
            (r, producer)
        })
        .await?;
        if let Err(e) = flushed.0 {
            warn!(error = %e, "some orders were still unacknowledged after 30 s");
        }
        drop(flushed.1);
        let summary = Self::stats(&counters, started);
        server_stop.cancel();
        let _ = server.await;
        Ok(summary)
    }
}

/// Waits until the orders topic exists, saying so: a broker that does not create topics on
/// first use (the chart's) fails every order sent to a missing topic once librdkafka's metadata
/// wait runs out. Returns early on shutdown.
async fn wait_for_topic(
    producer: &Arc<ThreadedProducer<DeliveryCounter>>,
    topic: &str,
    shutdown: &CancellationToken,
) {
    let mut pause = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        let (p, t) = (producer.clone(), topic.to_owned());
        match tokio::task::spawn_blocking(move || {
            kafka::partition_count(p.client(), &t, Duration::from_secs(5))
        })
        .await
        {
            Ok(Ok(n)) if n > 0 => return,
            Ok(Ok(_)) => {
                warn!(
                    topic,
                    retry_in_ms = pause.upcoming_ms(),
                    "waiting for the orders topic to be created"
                );
            }
            Ok(Err(e)) => {
                warn!(error = %e, retry_in_ms = pause.upcoming_ms(), "waiting for the cluster to answer");
            }
            Err(e) => warn!(error = %e, "topic check failed"),
        }
        if !pause.wait(shutdown).await {
            return;
        }
    }
}

/// Registers the schema, waiting out a registry that is not up yet; a refusal is final.
async fn register_schema(
    codec: &OrderCodec,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<u32, StartError> {
    let started = Instant::now();
    let mut pause = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match codec.register().await {
            Ok(id) => {
                info!(subject = %codec.subject(), schema_id = id, "Order schema registered");
                return Ok(id);
            }
            Err(e) if e.is_temporary() && started.elapsed() < wait && !shutdown.is_cancelled() => {
                warn!(error = %e, retry_in_ms = pause.upcoming_ms(), "schema registry not reachable yet; retrying");
                pause.wait(shutdown).await;
            }
            Err(e) if e.is_temporary() => {
                return Err(StartError::RegistryUnreachable {
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    source: e,
                });
            }
            Err(e) => {
                return Err(StartError::SchemaRejected {
                    subject: codec.subject(),
                    source: e,
                });
            }
        }
    }
}

/// The summary printed at exit.
pub fn summary_text(s: &Stats) -> String {
    format!(
        "order-generator summary\n  sent           {}\n  produced       {}\n  failed         {}\n  invalid (sent on purpose) {}\n  elapsed        {:.1} s ({} orders/s)",
        s.sent, s.produced, s.failed, s.invalid, s.elapsed_s, s.rate_per_s
    )
}

order_runtime::impl_service!(Application, Config, Stats, summary_text, SERVICE_NAME, 8101);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use order_runtime::config::pairs as vars;

    #[test]
    fn defaults() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.generator.http_port, 8101);
        assert_eq!(c.generator.order_count, 0);
        assert_eq!(c.generator.compression_type, "snappy");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORDER_COUNT", "-5"),
            ("ORDER_RATE", "fast"),
            ("ORDER_RATE", "-1"),
            ("INVALID_ORDER_RATIO", "2"),
            ("COMPRESSION_TYPE", "brotli"),
        ] {
            let e = Config::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert!(e.to_string().contains(var), "{var}={value}: {e}");
        }
    }
}
