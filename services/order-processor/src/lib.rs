//! order-processor: consumes orders, keeps exact running aggregates, retries temporary
//! failures with exponential backoff and dead-letters what cannot be processed.
//!
//! Layout:
//! - [`config`]: the environment (SPEC) and the backoff schedule.
//! - [`pipeline`]: the consumer, one task per partition: decoding, validation, retries and
//!   dead letters, then the outcome made durable (exactly-once or at-least-once).
//! - [`eos`]: the exactly-once core: one Kafka transaction for dead letters, the changelog of
//!   per-partition state and the consumer offsets; restore on assignment; `/stats/global`.
//! - [`aggregate`]: per-partition count, revenue, min, max in integer cents, mergeable.
//! - [`metrics`]: Prometheus series.
//! - [`status`]: the status page on `/` (group totals, throughput, lag and retries per
//!   partition, the analyzer's dead letters), one self-contained page in the binary.
//! - [`Application`]: builds all of it (binding the HTTP port first, port 0 in tests) and runs
//!   it until a shutdown token is cancelled, exactly as `main` does.

pub mod aggregate;
pub mod config;
pub mod eos;
pub mod metrics;
pub mod pipeline;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use order_runtime::http::{self, Probe};
use order_runtime::kafka;
use order_schema::OrderCodec;
use prometheus_client::registry::Registry;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, Guarantee};
use pipeline::{
    Durability, FailureInjector, ProcessorConsumer, ProcessorContext, RandomFailures, Shared,
};

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
    #[error("could not set up the Kafka {what}")]
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
        let listener = http::bind(port, config.common.http_port_file.as_deref())
            .await
            .map_err(|source| StartError::Bind { port, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);

        let common = &config.common;
        let codec = OrderCodec::new(&common.schema_registry_url, &common.orders_topic)?;
        let client_id = format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id());
        let durability = match config.processor.processing_guarantee {
            Guarantee::ExactlyOnce => Durability::ExactlyOnce(Box::new(
                eos::Core::new(&config, &client_id)
                    .await
                    .map_err(|source| StartError::Kafka {
                        what: "transactional producer and changelog topic",
                        source,
                    })?,
            )),
            Guarantee::AtLeastOnce => Durability::AtLeastOnce {
                state: std::sync::Mutex::default(),
                dlq: kafka::producer_config(common, &format!("{client_id}-dlq"), "none")
                    .create()
                    .map_err(|source| StartError::Kafka {
                        what: "dead-letter producer",
                        source,
                    })?,
            },
        };
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        let shared = Arc::new(Shared::new(
            config.clone(),
            codec,
            durability,
            metrics,
            failures,
        ));

        let probe = Arc::new(Probe::default());
        let joined = probe.condition("joined consumer group");
        let context = ProcessorContext::new(shared.clone(), shutdown.child_token(), joined);
        let mut client =
            kafka::consumer_config(common, &client_id, &config.processor.consumer_group);
        if config.processor.processing_guarantee == Guarantee::ExactlyOnce {
            // offsets are committed by the transactions only
            client.set("enable.auto.commit", "false");
        }
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
        http::watch_dependencies(
            &probe,
            common,
            kafka::readiness_check(&consumer, &common.orders_topic, |c| c.client()),
            Duration::from_secs(5),
            shutdown.clone(),
        );

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

    /// The routes: shared health and metrics, `/stats`, `/stats/global` and the status page.
    pub fn router(shared: Arc<Shared>, probe: Arc<Probe>, registry: Registry) -> Router {
        let stats = Router::new()
            .route(
                "/stats",
                get(|State(s): State<Arc<Shared>>| async move {
                    // this replica's share, plus its end-to-end latency since start-up
                    let mut doc = serde_json::to_value(s.report()).unwrap_or_default();
                    if let (Some(map), Ok(latency)) = (
                        doc.as_object_mut(),
                        serde_json::to_value(s.metrics.end_to_end_summary()),
                    ) {
                        map.insert("end_to_end_latency_ms".to_owned(), latency);
                    }
                    Json(doc)
                }),
            )
            .route("/stats/global", get(global_stats))
            .with_state(shared.clone());
        let page = Router::new()
            .route("/", get(status::page))
            .route("/status.json", get(status::status))
            .with_state(Arc::new(status::StatusPage::new(shared.config.clone())));
        http::router(probe, Arc::new(registry))
            .merge(stats)
            .merge(page)
    }

    /// Runs until the shutdown token is cancelled, then stops the partition tasks, commits what
    /// is done, and returns the final stats.
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
        info!(
            topic = %shared.config.common.orders_topic,
            group = %shared.config.processor.consumer_group,
            guarantee = ?shared.config.processor.processing_guarantee,
            "processing orders"
        );
        let progress = {
            let shared = shared.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { shared.log_progress(stop).await })
        };
        let committer = match &shared.durability {
            Durability::ExactlyOnce(_) => Some(spawn_committer(
                consumer.clone(),
                Duration::from_millis(shared.config.processor.commit_interval_ms),
                &shutdown,
            )?),
            Durability::AtLeastOnce { .. } => None,
        };
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
        let _ = progress.await;
        if let Some(c) = committer {
            // a commit in flight finishes first
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
        consumer.context().stop_partitions(None);
        let c = consumer.clone();
        let _ = tokio::task::spawn_blocking(move || c.context().commit(c.as_ref())).await;
        if let Durability::ExactlyOnce(core) = &shared.durability {
            // a failed final commit leaves its replay open: abort it rather than let it block
            // the changelog and dead-letter partitions until the broker times it out
            let core_ref: &eos::Core = core;
            tokio::task::block_in_place(|| core_ref.abort());
        }
        let report = shared.report();
        consumer.unsubscribe();
        if let Durability::AtLeastOnce { dlq, .. } = &shared.durability
            && let Err(e) = dlq.flush(Duration::from_secs(10))
        {
            warn!(error = %e, "dead-letter producer did not flush");
        }
        let _ = server.await;
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
}

/// Commits the open transaction every `interval` until shutdown (exactly-once), on a thread of
/// its own. A commit blocks for a broker round trip or more (~100 ms); given to tokio's
/// blocking pool every second, it kept a rotating set of 5-6 pool threads from ever idling
/// out, each holding its allocator cache.
fn spawn_committer(
    consumer: Arc<ProcessorConsumer>,
    interval: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::mpsc::{RecvTimeoutError, channel};
    let (stop, stopped) = channel::<()>();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drop(stop);
    });
    std::thread::Builder::new()
        .name("eos-committer".into())
        .spawn(move || {
            let mut due = std::time::Instant::now() + interval;
            loop {
                let wait = due.saturating_duration_since(std::time::Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
                consumer.context().commit(consumer.as_ref());
                // a commit that overran the interval pushes the next one back a whole interval
                let now = std::time::Instant::now();
                due += interval;
                if due < now {
                    due = now + interval;
                }
            }
        })
}

/// `GET /stats/global`: the whole group's committed totals (exactly-once only).
async fn global_stats(State(s): State<Arc<Shared>>) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if s.config.processor.processing_guarantee != Guarantee::ExactlyOnce {
        return (
            StatusCode::CONFLICT,
            "global totals come from the exactly-once changelog; this replica runs PROCESSING_GUARANTEE=at_least_once",
        )
            .into_response();
    }
    let config = s.config.clone();
    match tokio::task::spawn_blocking(move || eos::global_report(&config)).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
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
