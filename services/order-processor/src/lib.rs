//! order-processor: consumes orders, keeps exact running aggregates, retries temporary
//! failures with exponential backoff and dead-letters what cannot be processed.
//!
//! Layout, and where to look:
//! - Where is a record's fate decided? [`decision`]: a pure function from what is known about
//!   a record (decode result, broken rule, attempt number) to a verdict: processed, retry
//!   after a delay, or dead letter with its category and kind.
//! - [`record`]: the shell around it: decoding (waiting out the registry), validation, the
//!   attempts and their backoff waits, a dead letter's headers and span.
//! - [`durability`]: how an outcome becomes durable, the one interface both guarantees
//!   implement; `lib.rs` picks one, once ([`Application::build`]).
//! - [`at_least_once`]: offsets stored after each outcome, committed on revocation and
//!   shutdown.
//! - Where does exactly-once commit? [`exactly_once`]: restore, settle, the committer thread
//!   and the commit on revocation and shutdown; [`exactly_once::core`] is the transaction and
//!   its ledger, [`exactly_once::changelog`] the state topic.
//! - [`consumer`]: the rebalance protocol (queues split before an assignment takes effect,
//!   workers stopped and committed before a revocation completes).
//! - [`worker`]: one partition's worker: batches, outcome, settle, metrics.
//! - [`aggregate`]: per-partition count, revenue, min, max in integer cents, mergeable.
//! - [`config`]: the environment (SPEC) and the retry policy.
//! - [`metrics`]: Prometheus series.
//! - [`pause`]: `POST /pause` and `/resume` of all partitions or one.
//! - [`status`]: the status page on `/` (group totals, throughput, lag and retries per
//!   partition, the analyzer's dead letters), one self-contained page in the binary.
//! - [`Application`]: builds all of it (binding the HTTP port first, port 0 in tests) and runs
//!   it until a shutdown token is cancelled, exactly as `main` does.

pub mod aggregate;
pub mod at_least_once;
pub mod config;
pub mod consumer;
pub mod decision;
pub mod durability;
pub mod exactly_once;
pub mod metrics;
pub mod pause;
pub mod record;
pub mod status;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use order_runtime::backoff::Backoff;
use order_runtime::http::{self, Probe};
use order_runtime::kafka;
use order_schema::OrderCodec;
use prometheus_client::registry::Registry;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, Guarantee};
use consumer::{ProcessorConsumer, ProcessorContext};
use durability::{Durability, GroupTotals, TotalsError};
use record::{FailureInjector, RandomFailures, Records};
use worker::Processing;

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

fn kafka_error(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> StartError {
    move |source| StartError::Kafka { what, source }
}

type Running = Pin<Box<dyn Future<Output = anyhow::Result<aggregate::StatsReport>> + Send>>;

/// A built processor, ready to run.
pub struct Application {
    port: u16,
    running: Running,
}

impl Application {
    /// Builds the processor with the configured simulated failure rate.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let failures = Arc::new(RandomFailures(config.processor.transient_failure_rate));
        Self::build_with_failures(config, failures, shutdown).await
    }

    /// Builds the processor with a chosen failure injector (tests). The processing guarantee
    /// is picked here, and only here.
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
        let client_id = format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id());
        let running = match config.processor.processing_guarantee {
            Guarantee::ExactlyOnce => {
                let durability = exactly_once::ExactlyOnce::new(&config, &client_id)
                    .await
                    .map_err(kafka_error("transactional producer"))?;
                Pipeline::build(durability, config, failures, listener, &client_id, shutdown)?.run()
            }
            Guarantee::AtLeastOnce => {
                let dlq =
                    kafka::producer_config(&config.common, &format!("{client_id}-dlq"), "none")
                        .create()
                        .map_err(kafka_error("dead-letter producer"))?;
                let durability = at_least_once::AtLeastOnce::new(dlq, &config.common.dlq_topic);
                Pipeline::build(durability, config, failures, listener, &client_id, shutdown)?.run()
            }
        };
        Ok(Application { port, running })
    }

    /// The HTTP port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until the shutdown token is cancelled, then stops the partition workers, commits
    /// what is done, and returns the final stats.
    pub async fn run_until_stopped(self) -> anyhow::Result<aggregate::StatsReport> {
        self.running.await
    }
}

/// The processor with its guarantee: the consumer, its workers, the HTTP routes.
struct Pipeline<D: Durability> {
    config: Config,
    listener: TcpListener,
    processing: Arc<Processing<D>>,
    probe: Arc<Probe>,
    registry: Registry,
    consumer: Arc<ProcessorConsumer<D>>,
    shutdown: CancellationToken,
}

impl<D: Durability> Pipeline<D> {
    fn build(
        durability: D,
        config: Config,
        failures: Arc<dyn FailureInjector>,
        listener: TcpListener,
        client_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let common = &config.common;
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        let probe = Arc::new(Probe::default());
        let pause = Arc::new(pause::PauseControl::new(probe.clone(), &mut registry));
        let processing = Arc::new(Processing {
            records: Records {
                codec: OrderCodec::new(&common.schema_registry_url, &common.orders_topic)?,
                failures,
                policy: config.retry_policy(),
                catalogue: config.catalogue.clone(),
                dlq_topic: common.dlq_topic.clone(),
                retries: metrics.retries.clone(),
            },
            durability: Arc::new(durability),
            metrics,
            group: config.processor.consumer_group.clone(),
            pause,
        });
        let joined = probe.condition("joined consumer group");
        let context = ProcessorContext::new(processing.clone(), shutdown.child_token(), joined);
        let mut client =
            kafka::consumer_config(common, client_id, &config.processor.consumer_group);
        processing.durability.configure_consumer(&mut client);
        if !common
            .kafka_properties
            .contains_key("statistics.interval.ms")
        {
            // feeds the consumer-lag gauge
            client.set("statistics.interval.ms", "5000");
        }
        let consumer: ProcessorConsumer<D> = client
            .create_with_context(context)
            .map_err(kafka_error("consumer"))?;
        let consumer = Arc::new(consumer);
        consumer.context().attach(&consumer);
        http::watch_dependencies(
            &probe,
            common,
            kafka::readiness_check(&consumer, &common.orders_topic, |c| c.client()),
            Duration::from_secs(5),
            shutdown.clone(),
        );
        Ok(Pipeline {
            config,
            listener,
            processing,
            probe,
            registry,
            consumer,
            shutdown,
        })
    }

    fn run(self) -> Running {
        Box::pin(self.run_until_stopped())
    }

    async fn run_until_stopped(self) -> anyhow::Result<aggregate::StatsReport> {
        let Pipeline {
            config,
            listener,
            processing,
            probe,
            registry,
            consumer,
            shutdown,
        } = self;
        let durability = processing.durability.clone();
        let topic_exists = probe.condition("orders topic exists");
        let server = tokio::spawn(http::serve(
            listener,
            router(
                processing.clone(),
                durability.group_totals(),
                &config,
                probe,
                registry,
            ),
            shutdown.clone(),
        ));
        let progress = tokio::spawn(log_progress(
            durability.clone(),
            Duration::from_millis(config.processor.stats_log_interval_ms),
            shutdown.clone(),
        ));
        let topic = &config.common.orders_topic;
        if wait_until_ready(&consumer, topic, durability.as_ref(), &shutdown).await {
            topic_exists.store(true, std::sync::atomic::Ordering::Release);
            consumer.subscribe(&[topic.as_str()])?;
            info!(
                %topic,
                group = %config.processor.consumer_group,
                guarantee = ?config.processor.processing_guarantee,
                "processing orders"
            );
            durability.start(&consumer, &shutdown)?;
            poll_until_stopped(&consumer, &processing, &shutdown).await;
        }
        info!("stopping: finishing records in hand");
        let _ = progress.await;
        let (stopping, d) = (consumer.clone(), durability.clone());
        let _ = tokio::task::spawn_blocking(move || {
            stopping.context().stop_workers(None);
            d.shutdown(stopping.as_ref());
        })
        .await;
        let report = durability.report();
        consumer.unsubscribe();
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

/// Waits, not ready, until the orders topic exists and the guarantee has what it needs in the
/// cluster, saying what it waits for. `false` when shut down first.
async fn wait_until_ready<D: Durability>(
    consumer: &Arc<ProcessorConsumer<D>>,
    topic: &str,
    durability: &D,
    shutdown: &CancellationToken,
) -> bool {
    let mut wait = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        let (c, t) = (consumer.clone(), topic.to_owned());
        let partitions = tokio::task::spawn_blocking(move || {
            kafka::partition_count(c.client(), &t, Duration::from_secs(5))
        })
        .await;
        match partitions {
            Ok(Ok(0)) => {
                warn!(%topic, retry_in_ms = wait.upcoming_ms(), "waiting for the orders topic to be created");
            }
            Ok(Ok(_)) => match durability.prepare().await {
                Ok(()) => return true,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = wait.upcoming_ms(), "waiting for the processing guarantee's topics");
                }
            },
            Ok(Err(e)) => {
                warn!(error = %e, retry_in_ms = wait.upcoming_ms(), "waiting for the cluster to answer");
            }
            Err(e) => warn!(error = %e, "topic check failed"),
        }
        if !wait.wait(shutdown).await {
            return false;
        }
    }
}

/// Keeps the consumer polled (rebalances, liveness) while the workers do the work. A record
/// can only come here if its partition's queue was not split, which the rebalance protocol
/// rules out: it is counted, logged and rewound, to be seen again.
async fn poll_until_stopped<D: Durability>(
    consumer: &ProcessorConsumer<D>,
    processing: &Processing<D>,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            m = consumer.recv() => match m {
                Ok(m) => {
                    processing.metrics.unsplit_records.inc();
                    warn!(partition = m.partition(), offset = m.offset(), "record arrived outside its partition queue; rewinding");
                    if let Err(e) = consumer.seek(m.topic(), m.partition(), rdkafka::Offset::Offset(m.offset()), Duration::from_secs(5)) {
                        warn!(error = %e, "seek failed");
                    }
                }
                Err(e) => warn!(error = %e, "consumer error"),
            },
        }
    }
}

/// Logs the running average every `STATS_LOG_INTERVAL_MS` while it moves, until `stop`. A
/// timer rather than a check per record: the hot path takes no shared lock for it.
async fn log_progress<D: Durability>(durability: Arc<D>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = durability.report();
        if r.processed == logged {
            continue;
        }
        logged = r.processed;
        info!(
            processed = r.processed,
            revenue = %r.revenue,
            average = r.average.unwrap_or(0.0),
            min = r.min.map_or(0.0, order_schema::Cents::dollars),
            max = r.max.map_or(0.0, order_schema::Cents::dollars),
            dead_lettered = r.dead_lettered,
            retries = r.retries,
            "running average"
        );
    }
}

/// The routes: shared health and metrics, `/stats`, `/stats/global` and the status page.
fn router<D: Durability>(
    processing: Arc<Processing<D>>,
    totals: Arc<dyn GroupTotals>,
    config: &Config,
    probe: Arc<Probe>,
    registry: Registry,
) -> Router {
    let stats = Router::new()
        .route(
            "/stats",
            get(|State(p): State<Arc<Processing<D>>>| async move {
                // this replica's share, plus its end-to-end latency since start-up
                let mut doc = serde_json::to_value(p.durability.report()).unwrap_or_default();
                if let (Some(map), Ok(latency)) = (
                    doc.as_object_mut(),
                    serde_json::to_value(p.metrics.end_to_end_summary()),
                ) {
                    map.insert("end_to_end_latency_ms".to_owned(), latency);
                }
                Json(doc)
            }),
        )
        .with_state(processing.clone());
    let global = Router::new()
        .route("/stats/global", get(global_stats))
        .with_state(totals.clone());
    let page = Router::new()
        .route("/", get(status::page))
        .route("/status.json", get(status::status))
        .with_state(Arc::new(status::StatusPage::new(config.clone(), totals)));
    let pause = processing.pause.clone().router();
    http::router(probe, Arc::new(registry))
        .merge(pause)
        .merge(stats)
        .merge(global)
        .merge(page)
}

/// `GET /stats/global`: the whole group's committed totals (exactly-once only).
async fn global_stats(State(totals): State<Arc<dyn GroupTotals>>) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match tokio::task::spawn_blocking(move || totals.report()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e @ TotalsError::NotKept(_))) => {
            (StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Ok(Err(e @ TotalsError::Unavailable(_))) => {
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
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

order_runtime::impl_service!(
    Application,
    Config,
    aggregate::StatsReport,
    summary_text,
    SERVICE_NAME,
    8102
);
