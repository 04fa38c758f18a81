//! The analyzer as a whole: [`Application::build`] checks access, binds the HTTP port and
//! subscribes; [`Application::run_until_stopped`] reads the dead-letter topic into the
//! [`Report`] and serves it, with the redrives ([`crate::web`]), until shutdown.
//!
//! The analyzer reads the whole dead-letter topic from its beginning each time it starts and
//! commits no offsets: its report always covers every dead letter still retained, not just
//! the ones since its last restart. The consumer group (`CONSUMER_GROUP`) shares the
//! partitions out when several analyzers run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_runtime::dead_letter::Metadata;
use order_runtime::http::{self, Probe};
use order_runtime::service::{self, StartError, kafka_error};
use order_runtime::{kafka, trace};
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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_HTTP_PORT, SERVICE_NAME};
use crate::report::{self, Report};
use crate::web::{self, Redrives};

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
        let (listener, port) = service::open(
            &config.common,
            &config.common.dlq_topic,
            config.analyzer.http_port,
        )
        .await?;
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
                .map_err(kafka_error("consumer"))?,
        );
        consumer
            .subscribe(&[common.dlq_topic.as_str()])
            .map_err(kafka_error("subscription"))?;
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
        let redrives = Arc::new(Redrives::new(
            config.clone(),
            codec.clone(),
            shutdown.clone(),
        ));
        let routes = web::router(report.clone(), redrives.clone());
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
                        // every message read (messaging_client_consumed_messages); the
                        // report counts each dead letter once, however often it is read
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
    DEFAULT_HTTP_PORT
);
