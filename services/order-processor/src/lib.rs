//! order-processor: consumes orders, keeps exact running aggregates, retries temporary
//! failures with exponential backoff and dead-letters what cannot be processed.
//!
//! Layout:
//! - [`config`]: the environment (SPEC) and the backoff schedule.
//! - [`pipeline`]: the consumer, one task per partition, at-least-once offset handling,
//!   decoding, validation, retries and dead letters.
//! - [`aggregate`]: per-partition count, revenue, min, max in integer cents, mergeable.
//! - [`metrics`]: Prometheus series.
//! - [`Application`]: builds all of it (binding the HTTP port first, port 0 in tests) and runs
//!   it until a shutdown token is cancelled, exactly as `main` does.

pub mod aggregate;
pub mod config;
pub mod metrics;
pub mod pipeline;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use order_runtime::http::{self, Probe};
use order_runtime::kafka;
use order_schema::OrderCodec;
use prometheus_client::registry::Registry;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use pipeline::{FailureInjector, ProcessorConsumer, ProcessorContext, RandomFailures, Shared};

pub const SERVICE_NAME: &str = "order-processor";

/// Why the processor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not bind HTTP port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not create the Kafka {what}")]
    Kafka {
        what: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Codec(#[from] order_schema::CodecError),
}

/// A built processor, ready to run.
pub struct Application {
    listener: TcpListener,
    port: u16,
    shared: Arc<Shared>,
    probe: Arc<Probe>,
    registry: Registry,
    consumer: Arc<ProcessorConsumer>,
    shutdown: CancellationToken,
}

impl Application {
    /// Builds the processor with the configured simulated failure rate.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let failures = Arc::new(RandomFailures(config.processor.transient_failure_rate));
        Self::build_with_failures(config, failures, shutdown).await
    }

    /// Builds the processor with a chosen failure injector (tests).
    pub async fn build_with_failures(
        config: Config,
        failures: Arc<dyn FailureInjector>,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let port = config.processor.http_port;
        let listener = http::bind(port)
            .await
            .map_err(|source| StartError::Bind { port, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);

        let common = &config.common;
        let codec = OrderCodec::new(&common.schema_registry_url, &common.orders_topic)?;
        let dlq: FutureProducer =
            kafka::producer_config(common, &format!("{SERVICE_NAME}-dlq"), "none")
                .create()
                .map_err(|source| StartError::Kafka {
                    what: "dead-letter producer",
                    source,
                })?;
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        let shared = Arc::new(Shared::new(config.clone(), codec, dlq, metrics, failures));

        let probe = Arc::new(Probe::default());
        let joined = probe.condition("joined consumer group");
        let context = ProcessorContext::new(shared.clone(), shutdown.child_token(), joined);
        let mut client = kafka::consumer_config(
            common,
            &format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id()),
            &config.processor.consumer_group,
        );
        if !common
            .kafka_properties
            .contains_key("statistics.interval.ms")
        {
            // feeds the consumer-lag gauge
            client.set("statistics.interval.ms", "5000");
        }
        let consumer: ProcessorConsumer =
            client
                .create_with_context(context)
                .map_err(|source| StartError::Kafka {
                    what: "consumer",
                    source,
                })?;
        let consumer = Arc::new(consumer);
        consumer.context().attach(&consumer);
        consumer
            .subscribe(&[common.orders_topic.as_str()])
            .map_err(|source| StartError::Kafka {
                what: "subscription",
                source,
            })?;
        http::watch_dependencies(&probe, common, Duration::from_secs(5), shutdown.clone());

        Ok(Application {
            listener,
            port,
            shared,
            probe,
            registry,
            consumer,
            shutdown,
        })
    }

    /// The HTTP port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The routes: shared health and metrics plus `/stats`.
    pub fn router(shared: Arc<Shared>, probe: Arc<Probe>, registry: Registry) -> Router {
        let stats = Router::new()
            .route(
                "/stats",
                get(
                    |axum::extract::State(s): axum::extract::State<Arc<Shared>>| async move {
                        Json(s.report())
                    },
                ),
            )
            .with_state(shared);
        http::router(probe, Arc::new(registry)).merge(stats)
    }

    /// Runs until the shutdown token is cancelled, then stops the partition tasks, commits the
    /// stored offsets, flushes the dead-letter producer and returns the final stats.
    pub async fn run_until_stopped(self) -> anyhow::Result<aggregate::StatsReport> {
        let Application {
            listener,
            shared,
            probe,
            registry,
            consumer,
            shutdown,
            ..
        } = self;
        let server = tokio::spawn(http::serve(
            listener,
            Self::router(shared.clone(), probe, registry),
            shutdown.clone(),
        ));
        info!(topic = %shared.config.common.orders_topic, group = %shared.config.processor.consumer_group, "processing orders");
        loop {
            // this loop keeps the consumer polled (rebalances, liveness) while the partition
            // tasks do the work; records only come here for a partition not yet split
            tokio::select! {
                () = shutdown.cancelled() => break,
                m = consumer.recv() => match m {
                    Ok(m) => {
                        warn!(partition = m.partition(), offset = m.offset(), "record arrived before its partition queue was split; rewinding");
                        if let Err(e) = consumer.seek(m.topic(), m.partition(), rdkafka::Offset::Offset(m.offset()), Duration::from_secs(5)) {
                            warn!(error = %e, "seek failed");
                        }
                    }
                    Err(e) => warn!(error = %e, "consumer error"),
                },
            }
        }
        info!("stopping: finishing records in hand");
        consumer.context().stop_partitions(None);
        pipeline::commit_stored(consumer.as_ref());
        consumer.unsubscribe();
        if let Err(e) = shared.dlq.flush(Duration::from_secs(10)) {
            warn!(error = %e, "dead-letter producer did not flush");
        }
        let _ = server.await;
        let report = shared.report();
        info!(
            processed = report.processed,
            revenue = %report.revenue,
            average = report.average.unwrap_or(0.0),
            dead_lettered = report.dead_lettered,
            retries = report.retries,
            "order-processor stopped"
        );
        Ok(report)
    }

    /// True once the consumer has joined its group.
    pub fn joined(&self) -> bool {
        self.consumer.context().joined.load(Ordering::Acquire)
    }
}

/// The summary printed at exit.
pub fn summary_text(r: &aggregate::StatsReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "order-processor summary");
    let _ = writeln!(s, "  processed      {}", r.processed);
    let _ = writeln!(s, "  revenue        {}", r.revenue);
    let _ = writeln!(s, "  average        ${:.2}", r.average.unwrap_or(0.0));
    let _ = writeln!(
        s,
        "  min / max      {} / {}",
        r.min.unwrap_or_default(),
        r.max.unwrap_or_default()
    );
    let _ = writeln!(s, "  retries        {}", r.retries);
    let _ = write!(s, "  dead-lettered  {}", r.dead_lettered);
    for (c, n) in &r.dead_lettered_by_category {
        let _ = write!(s, "\n    {c:<18} {n}");
    }
    s
}
