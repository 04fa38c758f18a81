//! The generator as a whole: [`Application::build`] checks access, binds the HTTP port,
//! registers the schema and makes the producer; [`Application::run_until_stopped`] sends until
//! `ORDER_COUNT` or shutdown, then flushes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Json, Router};
use order_runtime::backoff::Backoff;
use order_runtime::http::{self, Probe};
use order_runtime::service::{self, StartError, kafka_error};
use order_runtime::{kafka, trace};
use order_schema::{OrderCodec, OrderWriter};
use prometheus_client::registry::Registry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_HTTP_PORT, SERVICE_NAME};
use crate::delivery::{Counters, DeliveryCounter, Stats};
use crate::orders;

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
        let (listener, port) = service::open(
            &config.common,
            &config.common.orders_topic,
            config.generator.http_port,
        )
        .await?;
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
        let counters = Arc::new(Counters::default());
        let context = DeliveryCounter::new(counters.clone(), &mut registry);
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
                .map_err(kafka_error("producer"))?,
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

    /// Sends until `ORDER_COUNT` is reached or shutdown, then flushes and returns the summary.
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
                async move { Json(c.stats(started)) }
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
            // a stop is looked for every 64 orders (tokio-util's `is_cancelled` takes a lock),
            // and in every wait
            if n.is_multiple_of(64) && shutdown.is_cancelled() {
                break;
            }
            // one reading of the clock an order unless the pacer asks to wait (at full rate the
            // clock is one of the main thread's largest costs): the pace, the progress log and
            // the send time of the delivery latency, which so includes making and encoding the
            // order (under a microsecond)
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
                let s = counters.stats(started);
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
        let summary = counters.stats(started);
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

order_runtime::impl_service!(
    Application,
    Config,
    Stats,
    summary_text,
    SERVICE_NAME,
    DEFAULT_HTTP_PORT
);
