//! dlq-analyzer: reads the dead-letter topic and reports what failed and why.
//!
//! Layout:
//! - [`Config`]: the environment (SPEC).
//! - [`report`]: the running report: totals by category and error kind, the value of the
//!   orders that failed (decoded where the bytes allow), by product, the latest failures.
//! - [`Application`]: consumes the topic and serves `/report`.
//! - [`redrive`]: dead letters sent back to the orders topic, filtered, rate-limited, at most
//!   once per request even across crashes (`dlq-analyzer redrive ...`, `POST /redrive`).
//! - [`waterfall`]: `dlq-analyzer trace <id>` (`make trace`), one trace from Jaeger's query API
//!   drawn in the terminal: the journey of a dead letter across the three services.
//!
//! The analyzer reads the whole dead-letter topic from its beginning each time it starts and
//! commits no offsets: its report always covers every dead letter still retained, not just
//! the ones since its last restart. The consumer group (`CONSUMER_GROUP`) shares the
//! partitions out when several analyzers run.

pub mod redrive;
pub mod report;
pub mod waterfall;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use order_runtime::config::{ConfigError, load};
use order_runtime::dead_letter::Metadata;
use order_runtime::http::{self, Probe};
use order_runtime::{CommonConfig, kafka, trace};
use order_schema::OrderCodec;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use report::Report;

pub const SERVICE_NAME: &str = "dlq-analyzer";

#[derive(Debug, Clone, Deserialize)]
pub struct AnalyzerSettings {
    /// `HTTP_PORT`. Default 8103; 0 picks a free port.
    #[serde(default = "default_port")]
    pub http_port: u16,
    /// `CONSUMER_GROUP`. Default `dlq-analyzer`.
    #[serde(default = "default_group")]
    pub consumer_group: String,
    /// `SUMMARY_INTERVAL_MS`: how often the summary is logged. Default 10000.
    #[serde(default = "default_interval")]
    pub summary_interval_ms: u64,
    /// `REDRIVE_MAX_COUNT`: a dead letter already redriven this often goes to the parking
    /// topic instead. Default 3.
    #[serde(default = "default_redrive_max")]
    pub redrive_max_count: u32,
    /// `DLQ_PARKING_TOPIC`: where redrives park records over `REDRIVE_MAX_COUNT`. Default
    /// `<DLQ_TOPIC>-parking`.
    #[serde(default)]
    pub dlq_parking_topic: Option<String>,
    /// `REDRIVE_RATE`: records per second of a redrive that names no rate; 0 for no limit.
    /// Default 1000.
    #[serde(default = "default_redrive_rate")]
    pub redrive_rate: f64,
}

fn default_redrive_max() -> u32 {
    3
}
fn default_redrive_rate() -> f64 {
    1000.0
}

fn default_port() -> u16 {
    8103
}
fn default_group() -> String {
    "dlq-analyzer".to_owned()
}
fn default_interval() -> u64 {
    10_000
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub analyzer: AnalyzerSettings,
}

impl Config {
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(vars)?;
        let analyzer: AnalyzerSettings = load(vars.iter().cloned())?;
        order_runtime::config::check_range(
            "SUMMARY_INTERVAL_MS",
            analyzer.summary_interval_ms,
            100,
            3_600_000,
        )?;
        order_runtime::config::check_range(
            "REDRIVE_MAX_COUNT",
            analyzer.redrive_max_count,
            0,
            1000,
        )?;
        order_runtime::config::check_range("REDRIVE_RATE", analyzer.redrive_rate, 0.0, 1e7)?;
        if analyzer.consumer_group.trim().is_empty() {
            return Err(ConfigError("CONSUMER_GROUP must not be empty".into()));
        }
        Ok(Config { common, analyzer })
    }

    /// What redrives need of the settings.
    pub fn redrive(&self) -> redrive::RedriveSettings {
        redrive::RedriveSettings {
            max_count: self.analyzer.redrive_max_count,
            parking_topic: self
                .analyzer
                .dlq_parking_topic
                .clone()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or_else(|| format!("{}-parking", self.common.dlq_topic)),
            rate: self.analyzer.redrive_rate,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not bind HTTP port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not set up the Kafka consumer")]
    Kafka(#[source] rdkafka::error::KafkaError),
    #[error(transparent)]
    Codec(#[from] order_schema::CodecError),
    #[error(transparent)]
    Access(#[from] order_runtime::config::AccessRefused),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabel {
    category: &'static str,
}

/// Marks the readiness condition when the group gives us our (possibly empty) assignment.
pub struct AnalyzerContext {
    /// `/readyz`'s consumer condition (see [`subscription_ready`]).
    ready: Arc<AtomicBool>,
    /// Set at the first assignment, for good.
    joined: Arc<AtomicBool>,
}

impl ClientContext for AnalyzerContext {}

impl ConsumerContext for AnalyzerContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.joined.store(true, Ordering::SeqCst);
            self.ready.store(true, Ordering::SeqCst);
            info!(partitions = tpl.count(), "dead-letter partitions assigned");
        }
    }
}

pub struct Application {
    config: Config,
    listener: TcpListener,
    port: u16,
    consumer: Arc<StreamConsumer<AnalyzerContext>>,
    codec: Arc<OrderCodec>,
    report: Arc<Mutex<Report>>,
    probe: Arc<Probe>,
    registry: Registry,
    consumed: Family<CategoryLabel, Counter>,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        config.common.check_access(&config.common.dlq_topic).await?;
        let port = config.analyzer.http_port;
        let listener = http::bind(port, config.common.http_port_file.as_deref())
            .await
            .map_err(|source| StartError::Bind { port, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        let common = &config.common;
        let codec = Arc::new(OrderCodec::with_access(
            &common.registry,
            &common.orders_topic,
        )?);
        let probe = Arc::new(Probe::default());
        let ready = probe.condition("joined consumer group");
        let joined = Arc::new(AtomicBool::new(false));
        let mut client = kafka::consumer_config(
            common,
            &format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id()),
            &config.analyzer.consumer_group,
        );
        // the report covers the whole topic: start at the beginning and commit nothing
        client
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: Arc<StreamConsumer<AnalyzerContext>> = Arc::new(
            client
                .create_with_context(AnalyzerContext {
                    ready: ready.clone(),
                    joined: joined.clone(),
                })
                .map_err(StartError::Kafka)?,
        );
        consumer
            .subscribe(&[common.dlq_topic.as_str()])
            .map_err(StartError::Kafka)?;
        http::watch_dependencies(
            &probe,
            common,
            kafka::readiness_check_observing(
                &consumer,
                &common.dlq_topic,
                |c| c.client(),
                subscription_ready(&common.dlq_topic, ready, joined),
            ),
            Duration::from_secs(5),
            shutdown.clone(),
        );
        let mut registry = Registry::default();
        let consumed = Family::<CategoryLabel, Counter>::default();
        registry.register(
            "messaging_client_consumed_messages",
            "Dead letters read, by error category",
            consumed.clone(),
        );
        Ok(Application {
            config,
            listener,
            port,
            consumer,
            codec,
            report: Arc::new(Mutex::new(Report::default())),
            probe,
            registry,
            consumed,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<Report> {
        let Application {
            config,
            listener,
            consumer,
            codec,
            report,
            probe,
            registry,
            consumed,
            shutdown,
            ..
        } = self;
        let redrives = Arc::new(Redrives {
            config: config.clone(),
            codec: codec.clone(),
            runs: Mutex::default(),
            shutdown: shutdown.clone(),
        });
        let r = report.clone();
        let runs = redrives.clone();
        let routes = Router::new()
            .route(
                "/report",
                get(move || {
                    let (r, runs) = (r.clone(), runs.clone());
                    async move {
                        let mut report = r.lock().map(|r| r.clone()).unwrap_or_default();
                        report.redrives = runs.list();
                        Json(report)
                    }
                }),
            )
            .merge(redrives.clone().router());
        let server = tokio::spawn(http::serve(
            listener,
            http::router(probe, registry).merge(routes),
            shutdown.clone(),
        ));
        let topic = config.common.dlq_topic.clone();
        let spans = trace::ConsumerSpans::new(&config.analyzer.consumer_group, &topic);
        let interval = Duration::from_millis(config.analyzer.summary_interval_ms);
        let mut last_summary = Instant::now();
        let mut last_total = 0;
        // one timer for the summary, set again after each (a new one per record cost a timer
        // registration each)
        let summary_due = tokio::time::sleep(interval);
        tokio::pin!(summary_due);
        info!(topic = %topic, "analysing dead letters");
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut summary_due => None,
                m = consumer.recv() => Some(m),
            };
            match msg {
                Some(Ok(m)) => {
                    let key = m
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .unwrap_or("");
                    let cx =
                        trace::consumer_context(&m, &spans, |m| trace::traceparent(m.headers()));
                    trace::in_context(cx, async {
                        let meta = Metadata::from_headers(m.headers());
                        trace::set_attribute("error.type", meta.category.as_str());
                        let order = match m.payload() {
                            Some(_) => codec.decode(m.payload()).await.ok(),
                            None => None,
                        };
                        consumed
                            .get_or_create(&CategoryLabel {
                                category: meta.category.as_str(),
                            })
                            .inc();
                        if let Ok(mut r) = report.lock() {
                            let trace_id = trace::headers_trace_id(m.headers());
                            r.add(
                                &meta,
                                key,
                                order.as_ref(),
                                trace_id,
                                (m.partition(), m.offset()),
                            );
                        }
                    })
                    .await;
                    // a backlog never makes recv() wait: let /healthz and /report in
                    tokio::task::coop::consume_budget().await;
                }
                // the topic not created yet: said once by `subscription_ready`
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                ))) => {}
                Some(Err(e)) => warn!(error = %e, "consumer error"),
                None => {}
            }
            if last_summary.elapsed() >= interval || summary_due.is_elapsed() {
                last_summary = Instant::now();
                summary_due
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(last_summary + interval));
                if let Ok(r) = report.lock()
                    && r.total != last_total
                {
                    last_total = r.total;
                    info!(total = r.total, failed_value = r.failed_value.dollars(), by_category = ?r.by_category, "dead-letter summary");
                }
            }
        }
        let _ = server.await;
        let mut final_report = report.lock().map(|r| r.clone()).unwrap_or_default();
        final_report.redrives = redrives.list();
        Ok(final_report)
    }
}

/// The redrives this analyzer ran or runs (`POST /redrive`, `GET /redrive`).
struct Redrives {
    config: Config,
    codec: Arc<OrderCodec>,
    runs: Mutex<Vec<Arc<Mutex<redrive::RedriveRun>>>>,
    shutdown: CancellationToken,
}

impl Redrives {
    fn list(&self) -> Vec<redrive::RedriveRun> {
        self.runs
            .lock()
            .map(|runs| {
                runs.iter()
                    .filter_map(|r| r.lock().ok().map(|r| r.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `POST /redrive` with [`redrive::Options`] as JSON: a dry run answers with what it
    /// found; a real run starts and answers 202 with its record, which `GET /redrive` and
    /// `/report` keep up to date.
    async fn start(self: Arc<Self>, options: redrive::Options) -> axum::response::Response {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let run = Arc::new(Mutex::new(redrive::new_run(&options)));
        if let Ok(mut runs) = self.runs.lock() {
            runs.push(run.clone());
        }
        let this = self.clone();
        let job = {
            let run = run.clone();
            async move {
                let result = redrive::run(
                    &this.config.common,
                    &this.config.redrive(),
                    &this.codec,
                    &options,
                    &run,
                    &this.shutdown,
                )
                .await;
                if let Err(e) = &result
                    && let Ok(mut r) = run.lock()
                {
                    warn!(error = %e, id = %r.id, "redrive failed");
                    r.status = format!("failed: {e}");
                    r.finished_at = Some(order_runtime::dead_letter::now_rfc3339());
                }
                result
            }
        };
        let snapshot = |run: &Mutex<redrive::RedriveRun>| run.lock().map(|r| r.clone()).ok();
        if run.lock().is_ok_and(|r| r.dry_run) {
            return match job.await {
                Ok(()) => Json(snapshot(&run)).into_response(),
                Err(e @ redrive::RedriveError::BadRequest(_)) => {
                    (StatusCode::BAD_REQUEST, e.to_string()).into_response()
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
            };
        }
        tokio::spawn(job);
        (StatusCode::ACCEPTED, Json(snapshot(&run))).into_response()
    }

    fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                "/redrive",
                axum::routing::post(
                    |State(r): State<Arc<Self>>, Json(options): Json<redrive::Options>| async move {
                        r.start(options).await
                    },
                )
                .get(|State(r): State<Arc<Self>>| async move { Json(r.list()) }),
            )
            .with_state(self)
    }
}

/// The consumer's readiness condition, fed by each broker check of `/readyz`: the group
/// joined, or the dead-letter topic not created yet. A healthy system may never dead-letter
/// anything, so the topic may never exist; the analyzer is subscribed, reports the (empty)
/// truth, and reads the topic once it appears. The consumer never joins its group before
/// that, so waiting for the join would keep it unready for good.
fn subscription_ready(
    topic: &str,
    ready: Arc<AtomicBool>,
    joined: Arc<AtomicBool>,
) -> impl Fn(usize) + Send + Sync + 'static {
    let topic = topic.to_owned();
    let said = AtomicBool::new(false);
    move |partitions| {
        if joined.load(Ordering::SeqCst) {
            return;
        }
        let missing = partitions == 0;
        if missing && !said.swap(true, Ordering::Relaxed) {
            info!(%topic, "the dead-letter topic does not exist yet (nothing dead-lettered so far); it is read once created");
        }
        ready.store(missing, Ordering::SeqCst);
        // a join between the first look and the store decides
        if joined.load(Ordering::SeqCst) {
            ready.store(true, Ordering::SeqCst);
        }
    }
}

order_runtime::impl_service!(
    Application,
    Config,
    Report,
    report::summary_text,
    SERVICE_NAME,
    8103
);
