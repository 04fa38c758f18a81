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
//! - `pipeline`: the running processor for the picked guarantee: waiting for the topics, the
//!   poll loop, the HTTP routes, the shutdown sequence.
//! - [`topics`]: `order-processor create-topics`, which the chart's topics Job runs.
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
mod pipeline;
pub mod record;
pub mod status;
pub mod topics;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use order_runtime::http;
use order_runtime::kafka;
use tokio_util::sync::CancellationToken;

pub use config::{Config, Guarantee};
use pipeline::Pipeline;
use record::{FailureInjector, RandomFailures};

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
    #[error(transparent)]
    Access(#[from] order_runtime::config::AccessRefused),
}

pub(crate) fn kafka_error(
    what: &'static str,
) -> impl FnOnce(rdkafka::error::KafkaError) -> StartError {
    move |source| StartError::Kafka { what, source }
}

pub(crate) type Running =
    Pin<Box<dyn Future<Output = anyhow::Result<aggregate::StatsReport>> + Send>>;

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
        config
            .common
            .check_access(&config.common.orders_topic)
            .await?;
        let port = config.processor.http_port;
        let listener = http::bind(port, config.common.http_port_file.as_deref())
            .await
            .map_err(|source| StartError::Bind { port, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        let client_id = format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id());
        let running = match config.processor.processing_guarantee {
            Guarantee::ExactlyOnce => {
                let durability = exactly_once::ExactlyOnce::new(&config, &client_id);
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
