//! The consuming side: one task per assigned partition, at-least-once offset handling.
//!
//! The model is Vector's Kafka source. Auto-commit is on but automatic offset *store* is off:
//! a record's offset is stored only once its outcome is final (counted, or its dead letter
//! acknowledged by the broker), and the background commit only ever commits stored offsets.
//! Each partition is split into its own queue and handled by its own task, so a record in
//! retry backoff holds back only its own partition, while the main loop keeps polling the
//! consumer (rebalances, `max.poll.interval.ms`). On revocation the partition's task is
//! stopped and stored offsets are committed synchronously before the partition goes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use order_runtime::dead_letter::{self, Category};
use order_runtime::kafka::is_retriable_produce_error;
use order_runtime::trace;
use order_schema::{Cents, CodecError, Order, OrderCodec};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, field, info, info_span, warn};

use crate::aggregate::{PartitionState, StatsReport};
use crate::config::Config;
use crate::metrics::{CategoryLabel, Metrics, OutcomeLabel};

/// Decides whether one processing attempt fails temporarily (the seed's simulated outage).
/// Tests plug in their own to fail exactly the records they choose.
pub trait FailureInjector: Send + Sync + std::fmt::Debug {
    fn fails(&self, order: &Order, partition: i32, attempt: u32) -> bool;
}

/// Fails each attempt with probability `rate` (`TRANSIENT_FAILURE_RATE`).
#[derive(Debug, Clone, Copy)]
pub struct RandomFailures(pub f64);

impl FailureInjector for RandomFailures {
    fn fails(&self, _: &Order, _: i32, _: u32) -> bool {
        self.0 > 0.0 && rand::random::<f64>() < self.0
    }
}

/// What the processing tasks share.
pub struct Shared {
    pub config: Config,
    pub codec: OrderCodec,
    pub dlq: FutureProducer,
    pub metrics: Metrics,
    pub failures: Arc<dyn FailureInjector>,
    /// This replica's aggregates, per partition it has processed.
    state: Mutex<BTreeMap<i32, PartitionState>>,
    dead_lettered: Mutex<BTreeMap<Category, u64>>,
    retries: AtomicU64,
    assigned: Mutex<BTreeSet<i32>>,
    last_progress_log: Mutex<(Instant, u64)>,
}

/// How handling a record ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Counted or dead-lettered: the offset may be stored.
    Final,
    /// Stopped by shutdown or revocation before an outcome: the record will be seen again.
    Interrupted,
}

impl Shared {
    pub fn new(
        config: Config,
        codec: OrderCodec,
        dlq: FutureProducer,
        metrics: Metrics,
        failures: Arc<dyn FailureInjector>,
    ) -> Self {
        Shared {
            config,
            codec,
            dlq,
            metrics,
            failures,
            state: Mutex::default(),
            dead_lettered: Mutex::default(),
            retries: AtomicU64::new(0),
            assigned: Mutex::default(),
            last_progress_log: Mutex::new((Instant::now(), 0)),
        }
    }

    /// This replica's share, as `/stats` serves it.
    pub fn report(&self) -> StatsReport {
        let mut merged = PartitionState::default();
        if let Ok(state) = self.state.lock() {
            for s in state.values() {
                merged.merge(s);
            }
        }
        let dead = self
            .dead_lettered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let partitions = self
            .assigned
            .lock()
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default();
        StatsReport::new(
            &merged,
            dead,
            self.retries.load(Ordering::Relaxed),
            partitions,
        )
    }

    fn record_success(&self, partition: i32, order: &Order, price: Cents) {
        let processed = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            state
                .entry(partition)
                .or_default()
                .add(&order.product, price);
            state.values().map(|s| s.total.count).sum::<u64>()
        };
        self.metrics
            .consumed
            .get_or_create(&OutcomeLabel {
                outcome: "processed",
            })
            .inc();
        #[allow(clippy::cast_sign_loss)]
        self.metrics.revenue_cents.inc_by(price.0.max(0) as u64);
        self.maybe_log_progress(processed);
    }

    /// Logs the running average as it moves, at most once per `STATS_LOG_INTERVAL_MS`.
    fn maybe_log_progress(&self, processed: u64) {
        let interval = Duration::from_millis(self.config.processor.stats_log_interval_ms);
        let due = match self.last_progress_log.lock() {
            Ok(mut last) if last.0.elapsed() >= interval && last.1 != processed => {
                *last = (Instant::now(), processed);
                true
            }
            _ => false,
        };
        if due {
            let r = self.report();
            info!(
                processed = r.processed,
                revenue = %r.revenue,
                average = r.average.unwrap_or(0.0),
                min = r.min.map_or(0.0, Cents::dollars),
                max = r.max.map_or(0.0, Cents::dollars),
                dead_lettered = r.dead_lettered,
                retries = r.retries,
                "running average"
            );
        }
    }

    /// Takes one record to its final outcome.
    async fn handle(&self, msg: &BorrowedMessage<'_>, cancel: &CancellationToken) -> Outcome {
        let started = Instant::now();
        let topic = msg.topic();
        let key = msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("");
        let span = info_span!(
            "process",
            otel.name = format!("process {topic}"),
            otel.kind = "consumer",
            otel.status_code = field::Empty,
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = topic,
            messaging.destination.partition.id = msg.partition().to_string(),
            messaging.kafka.offset = msg.offset(),
            messaging.kafka.message.key = key,
            messaging.consumer.group.name = %self.config.processor.consumer_group,
            messaging.message.body.size = msg.payload_len(),
            order.id = field::Empty,
            error.type = field::Empty,
            trace_id = field::Empty,
            span_id = field::Empty,
        );
        trace::adopt(&span, &trace::extract(msg.headers()));
        let outcome = self.handle_in_span(msg, cancel).instrument(span).await;
        self.metrics
            .process_duration
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    async fn handle_in_span(
        &self,
        msg: &BorrowedMessage<'_>,
        cancel: &CancellationToken,
    ) -> Outcome {
        let order = match self.decode(msg, cancel).await {
            Ok(order) => order,
            Err(None) => return Outcome::Interrupted,
            Err(Some(e)) => {
                let kind = malformed_kind(msg.payload(), &e);
                return self
                    .dead_letter(
                        msg,
                        Category::Deserialization,
                        kind,
                        &e.to_string(),
                        1,
                        cancel,
                    )
                    .await;
            }
        };
        Span::current().record("order.id", order.order_id.as_str());
        let price = match order.validate() {
            Ok(p) => p,
            Err(e) => {
                return self
                    .dead_letter(
                        msg,
                        Category::Validation,
                        e.kind(),
                        &e.to_string(),
                        1,
                        cancel,
                    )
                    .await;
            }
        };
        let max_retries = self.config.processor.max_retries;
        let mut attempt = 1;
        loop {
            let failed = {
                let span = info_span!(
                    "attempt",
                    otel.name = format!("process attempt {attempt}"),
                    otel.kind = "internal",
                    messaging.kafka.attempt = attempt,
                    error.type = field::Empty,
                    otel.status_code = field::Empty,
                );
                let _entered = span.enter();
                let failed = self.failures.fails(&order, msg.partition(), attempt);
                if failed {
                    span.record("error.type", "transient_failure");
                    span.record("otel.status_code", "ERROR");
                }
                failed
            };
            if !failed {
                break;
            }
            if attempt > max_retries {
                let message = format!("temporary failure persisted through {attempt} attempts");
                return self
                    .dead_letter(
                        msg,
                        Category::RetriesExhausted,
                        "transient_failure",
                        &message,
                        attempt,
                        cancel,
                    )
                    .await;
            }
            let wait = self.config.backoff(attempt);
            self.retries.fetch_add(1, Ordering::Relaxed);
            self.metrics.retries.inc();
            info!(
                order_id = %order.order_id,
                attempt,
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "temporary failure, will retry"
            );
            let backoff = info_span!(
                "backoff",
                otel.kind = "internal",
                backoff.ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
            );
            let interrupted = async {
                tokio::select! {
                    () = cancel.cancelled() => true,
                    () = tokio::time::sleep(wait) => false,
                }
            }
            .instrument(backoff)
            .await;
            if interrupted {
                return Outcome::Interrupted;
            }
            attempt += 1;
        }
        self.record_success(msg.partition(), &order, price);
        Outcome::Final
    }

    /// `Err(None)` when cancelled while the registry was unreachable.
    async fn decode(
        &self,
        msg: &BorrowedMessage<'_>,
        cancel: &CancellationToken,
    ) -> Result<Order, Option<CodecError>> {
        let mut wait = Duration::from_millis(250);
        loop {
            match self.codec.decode(msg.payload()).await {
                Ok(order) => return Ok(order),
                Err(e) if e.is_temporary() => {
                    // the data may be fine: never dead-letter it because the registry is down
                    warn!(error = %e, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(0), "schema registry unavailable; waiting");
                    tokio::select! {
                        () = cancel.cancelled() => return Err(None),
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(Some(e)),
            }
        }
    }

    /// Writes the record to the dead-letter topic and waits for the broker's acknowledgement;
    /// only then is its outcome final. Failures to write are retried until they succeed or the
    /// task is stopped: a record is never dropped.
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        category: Category,
        kind: &str,
        message: &str,
        attempts: u32,
        cancel: &CancellationToken,
    ) -> Outcome {
        let current = Span::current();
        current.record("error.type", category.as_str());
        current.record("otel.status_code", "ERROR");
        let dlq_topic = &self.config.common.dlq_topic;
        let span = info_span!(
            "send",
            otel.name = format!("send {dlq_topic}"),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = %dlq_topic,
            messaging.kafka.message.key = msg.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or(""),
            error.type = category.as_str(),
            messaging.destination.partition.id = field::Empty,
            messaging.kafka.offset = field::Empty,
        );
        let meta = dead_letter::Metadata {
            category,
            kind: kind.to_owned(),
            message: message.to_owned(),
            original_topic: msg.topic().to_owned(),
            original_partition: msg.partition(),
            original_offset: msg.offset(),
            original_timestamp: match msg.timestamp() {
                Timestamp::NotAvailable => None,
                Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
            },
            attempts,
            failed_service: crate::SERVICE_NAME.to_owned(),
            failed_at: dead_letter::now_rfc3339(),
        };
        warn!(
            category = %category, kind, error = message, attempts,
            partition = msg.partition(), offset = msg.offset(),
            "dead-lettering record"
        );
        let mut wait = Duration::from_millis(200);
        loop {
            let headers = trace::inject(&span, dead_letter::headers(msg.headers(), &meta));
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(dlq_topic).headers(headers);
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            if let Some(payload) = msg.payload() {
                record = record.payload(payload);
            }
            let sent = self
                .dlq
                .send(record, Duration::from_secs(5))
                .instrument(span.clone())
                .await;
            match sent {
                Ok(delivery) => {
                    span.record(
                        "messaging.destination.partition.id",
                        delivery.partition.to_string(),
                    );
                    span.record("messaging.kafka.offset", delivery.offset);
                    if let Ok(mut d) = self.dead_lettered.lock() {
                        *d.entry(category).or_default() += 1;
                    }
                    self.metrics
                        .dead_letters
                        .get_or_create(&CategoryLabel {
                            category: category.as_str(),
                        })
                        .inc();
                    self.metrics
                        .consumed
                        .get_or_create(&OutcomeLabel {
                            outcome: "dead_lettered",
                        })
                        .inc();
                    return Outcome::Final;
                }
                Err((e, _)) => {
                    log_dlq_error(&e, wait);
                    tokio::select! {
                        () = cancel.cancelled() => return Outcome::Interrupted,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

fn log_dlq_error(e: &KafkaError, wait: Duration) {
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(0);
    if is_retriable_produce_error(e) {
        warn!(error = %e, retry_in_ms = wait_ms, "dead letter not yet written; retrying");
    } else {
        tracing::error!(error = %e, retry_in_ms = wait_ms, "dead letter refused by the broker; the partition waits until it can be written");
    }
}

/// A stable name for why bytes are not an Order.
fn malformed_kind(payload: Option<&[u8]>, e: &CodecError) -> &'static str {
    match payload {
        None => "null_value",
        Some(b) if b.len() < 5 => "too_short",
        Some(b) if b[0] != 0 => "bad_magic_byte",
        Some(_) => {
            let text = e.to_string();
            if text.contains("status 404") || text.contains("raw schema") || text.contains("40403")
            {
                "unknown_schema_id"
            } else {
                "invalid_avro"
            }
        }
    }
}

/// Partition tasks: how to stop one and know that it stopped.
#[derive(Debug)]
struct PartitionTask {
    cancel: CancellationToken,
    done: std::sync::mpsc::Receiver<()>,
}

/// The consumer's context: starts a task for each partition it is assigned and stops it, then
/// commits, when the partition is revoked.
pub struct ProcessorContext {
    consumer: OnceLock<Weak<ProcessorConsumer>>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    tasks: Mutex<HashMap<(String, i32), PartitionTask>>,
    /// Set once the consumer has joined the group (its first assignment, even an empty one).
    pub joined: Arc<AtomicBool>,
}

pub type ProcessorConsumer = StreamConsumer<ProcessorContext>;

impl ProcessorContext {
    pub fn new(shared: Arc<Shared>, shutdown: CancellationToken, joined: Arc<AtomicBool>) -> Self {
        ProcessorContext {
            consumer: OnceLock::new(),
            shared,
            runtime: tokio::runtime::Handle::current(),
            shutdown,
            tasks: Mutex::default(),
            joined,
        }
    }

    /// Gives the context the consumer it belongs to (needed to split partition queues).
    pub fn attach(&self, consumer: &Arc<ProcessorConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn start_partition(&self, consumer: &Arc<ProcessorConsumer>, topic: &str, partition: i32) {
        let Some(queue) = consumer.split_partition_queue(topic, partition) else {
            warn!(topic, partition, "could not split the partition's queue");
            return;
        };
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let consumer = consumer.clone();
        let token = cancel.clone();
        self.runtime.spawn(async move {
            loop {
                let msg = tokio::select! {
                    biased;
                    () = token.cancelled() => break,
                    m = queue.recv() => m,
                };
                match msg {
                    Ok(m) => match shared.handle(&m, &token).await {
                        Outcome::Final => {
                            if let Err(e) = consumer.store_offset_from_message(&m) {
                                // the partition was revoked meanwhile: its new owner redoes it
                                warn!(error = %e, partition = m.partition(), offset = m.offset(), "could not store offset");
                            }
                        }
                        Outcome::Interrupted => break,
                    },
                    Err(e) => warn!(error = %e, partition, "consumer error"),
                }
            }
            drop(queue);
            let _ = done_tx.send(());
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.insert(
                (topic.to_owned(), partition),
                PartitionTask { cancel, done },
            );
        }
        if let Ok(mut a) = self.shared.assigned.lock() {
            a.insert(partition);
        }
    }

    /// Stops the tasks of `partitions` (all when `None`) and waits for them to finish the record
    /// in hand, so that their offsets are stored before the commit that follows.
    pub fn stop_partitions(&self, partitions: Option<&[(String, i32)]>) {
        let stopping: Vec<((String, i32), PartitionTask)> = match self.tasks.lock() {
            Ok(mut tasks) => match partitions {
                Some(list) => list.iter().filter_map(|k| tasks.remove_entry(k)).collect(),
                None => tasks.drain().collect(),
            },
            Err(_) => Vec::new(),
        };
        for (_, task) in &stopping {
            task.cancel.cancel();
        }
        let wait = || {
            for ((_, partition), task) in &stopping {
                if task.done.recv_timeout(Duration::from_secs(15)).is_err() {
                    warn!(partition, "partition task did not stop within 15 s");
                }
            }
        };
        // blocking here is deliberate (the commit must follow the stores); block_in_place lets
        // the runtime move other tasks off this thread meanwhile
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait);
            }
            _ => wait(),
        }
        if let Ok(mut a) = self.shared.assigned.lock() {
            for ((_, p), _) in &stopping {
                a.remove(p);
            }
        }
    }
}

impl ClientContext for ProcessorContext {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    /// librdkafka's statistics (`statistics.interval.ms`): we keep the consumer lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's "unknown" and the internal partition -1 is not a partition
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.shared
                        .metrics
                        .consumer_lag
                        .get_or_create(&crate::metrics::PartitionLabel {
                            topic: topic.clone(),
                            partition: *partition,
                        })
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            info!(partitions = ?revoked.iter().map(|p| p.1).collect::<Vec<_>>(), "partitions revoked");
            self.stop_partitions(Some(&revoked));
            commit_stored(base);
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.joined.store(true, Ordering::Release);
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                info!(partitions = ?partitions.iter().map(|p| p.1).collect::<Vec<_>>(), "partitions assigned");
                for (topic, partition) in partitions {
                    self.start_partition(&consumer, &topic, partition);
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _: &rdkafka::TopicPartitionList,
    ) {
        match result {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => warn!(error = %e, "offset commit failed"),
        }
    }
}

/// Commits the stored offsets now (revocation, shutdown).
pub fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "synchronous offset commit failed"),
    }
}
