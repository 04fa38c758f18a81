//! The processor as a whole: [`Application::build`] checks access, binds the HTTP port and
//! picks the processing guarantee, once; the [`Pipeline`] for that guarantee is the consumer
//! and its partition workers, the wait for the topics, the poll loop, the HTTP routes and the
//! shutdown sequence.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use order_runtime::backoff::Backoff;
use order_runtime::http::{self, Probe};
use order_runtime::kafka;
use order_runtime::service::{self, StartError, kafka_error};
use order_schema::OrderCodec;
use prometheus_client::registry::Registry;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::aggregate::StatsReport;
use crate::config::{Config, DEFAULT_HTTP_PORT, Guarantee, SERVICE_NAME};
use crate::durability::at_least_once::AtLeastOnce;
use crate::durability::exactly_once::ExactlyOnce;
use crate::durability::{Durability, Offsets};
use crate::partition::metrics::Metrics;
use crate::partition::pause::PauseControl;
use crate::partition::rebalance::{ProcessorConsumer, ProcessorContext};
use crate::partition::worker::Processing;
use crate::record::Records;
use crate::record::decision::RetryPolicy;
use crate::record::failures::{FailureInjector, RandomFailures, SeededFailures};

/// A built processor, ready to run.
pub struct Application {
    port: u16,
    running: Running,
}

impl Application {
    /// Builds the processor with the configured simulated failures: seeded when
    /// `TRANSIENT_FAILURE_SEED` is set, random otherwise.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let rate = config.processor.transient_failure_rate;
        let failures: Arc<dyn FailureInjector> = match &config.processor.transient_failure_seed {
            Some(seed) => Arc::new(SeededFailures {
                seed: seed.clone(),
                rate,
            }),
            None => Arc::new(RandomFailures(rate)),
        };
        Self::build_with_failures(config, failures, shutdown).await
    }

    /// Builds the processor with a chosen failure injector (tests). The processing guarantee
    /// is picked here, and only here.
    pub async fn build_with_failures(
        config: Config,
        failures: Arc<dyn FailureInjector>,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let (listener, port) = service::open(
            &config.common,
            &config.common.orders_topic,
            config.processor.http_port,
        )
        .await?;
        let client_id = format!("{SERVICE_NAME}-{}", order_runtime::telemetry::instance_id());
        let running = match config.processor.processing_guarantee {
            Guarantee::ExactlyOnce => {
                let durability = ExactlyOnce::new(&config, &client_id);
                Pipeline::build(durability, config, failures, listener, &client_id, shutdown)?.run()
            }
            Guarantee::AtLeastOnce => {
                let dlq =
                    kafka::producer_config(&config.common, &format!("{client_id}-dlq"), "none")
                        .create()
                        .map_err(kafka_error("dead-letter producer"))?;
                let durability = AtLeastOnce::new(
                    dlq,
                    &config.common.dlq_topic,
                    &config.common.orders_topic,
                    Duration::from_millis(config.processor.commit_interval_ms),
                );
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
    pub async fn run_until_stopped(self) -> anyhow::Result<StatsReport> {
        self.running.await
    }
}

/// The summary printed at exit.
pub fn summary_text(r: &StatsReport) -> String {
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

/// A running processor, until it stops: its final totals.
type Running = Pin<Box<dyn Future<Output = anyhow::Result<StatsReport>> + Send>>;

/// The processor with its guarantee: the consumer, its workers, the HTTP routes.
pub(crate) struct Pipeline<D: Durability> {
    config: Config,
    listener: TcpListener,
    processing: Arc<Processing<D>>,
    probe: Arc<Probe>,
    registry: Registry,
    consumer: Arc<ProcessorConsumer<D>>,
    shutdown: CancellationToken,
}

impl<D: Durability> Pipeline<D> {
    pub(crate) fn build(
        durability: D,
        config: Config,
        failures: Arc<dyn FailureInjector>,
        listener: TcpListener,
        client_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let common = &config.common;
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        durability.register_metrics(&mut registry);
        let probe = Arc::new(Probe::default());
        let pause = Arc::new(PauseControl::new(probe.clone(), &mut registry));
        let processing = Arc::new(Processing {
            records: Records {
                codec: OrderCodec::with_access(&common.registry, &common.orders_topic)?,
                failures,
                policy: RetryPolicy::from_settings(&config.processor),
                catalogue: config.catalogue.clone(),
                dlq_topic: common.dlq_topic.clone(),
                retries: metrics.retries.clone(),
            },
            durability: Arc::new(durability),
            metrics,
            spans: order_runtime::trace::ConsumerSpans::new(
                &config.processor.consumer_group,
                &common.orders_topic,
            ),
            pause,
            key_rule: config.processor.processing_order.key_rule(),
            max_in_flight: config.processor.max_in_flight_records,
            max_span: config.processor.max_in_flight_span,
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

    pub(crate) fn run(self) -> Running {
        Box::pin(self.run_until_stopped())
    }

    async fn run_until_stopped(self) -> anyhow::Result<StatsReport> {
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
            crate::web::router(
                processing.clone(),
                durability.group_totals(),
                &config,
                probe,
                registry,
                &shutdown,
            ),
            shutdown.clone(),
        ));
        let progress = tokio::spawn(log_progress(
            durability.clone(),
            Duration::from_millis(config.processor.stats_log_interval_ms),
            shutdown.clone(),
        ));
        let topic = &config.common.orders_topic;
        if let Some(partitions) =
            wait_until_ready(&consumer, topic, durability.as_ref(), &shutdown).await
        {
            processing.pause.topic_has(partitions);
            topic_exists.store(true, std::sync::atomic::Ordering::Release);
            consumer.subscribe(&[topic.as_str()])?;
            info!(
                %topic,
                group = %config.processor.consumer_group,
                guarantee = ?config.processor.processing_guarantee,
                "processing orders"
            );
            let offsets: Arc<dyn Offsets> = consumer.clone();
            durability.start(&offsets, &shutdown)?;
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
/// cluster, saying what it waits for: the topic's partitions, or `None` when shut down first.
async fn wait_until_ready<D: Durability>(
    consumer: &Arc<ProcessorConsumer<D>>,
    topic: &str,
    durability: &D,
    shutdown: &CancellationToken,
) -> Option<usize> {
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
            Ok(Ok(partitions)) => match durability.prepare(partitions).await {
                Ok(()) => return Some(partitions),
                Err(e) => {
                    warn!(error = %e, retry_in_ms = wait.upcoming_ms(), "waiting for what the processing guarantee needs in the cluster (exactly-once: the changelog topic and the transactional producer)");
                }
            },
            Ok(Err(e)) => {
                warn!(error = %e, retry_in_ms = wait.upcoming_ms(), "waiting for the cluster to answer");
            }
            Err(e) => warn!(error = %e, "topic check failed"),
        }
        if !wait.wait(shutdown).await {
            return None;
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

order_runtime::impl_service!(
    Application,
    Config,
    StatsReport,
    summary_text,
    SERVICE_NAME,
    DEFAULT_HTTP_PORT
);
