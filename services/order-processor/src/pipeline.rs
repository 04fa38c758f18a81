//! The consuming side: one task per assigned partition.
//!
//! Each partition is split into its own queue and handled by its own task, so a record in
//! retry backoff holds back only its own partition, while the main loop keeps polling the
//! consumer (rebalances, `max.poll.interval.ms`). A record is first *evaluated* (decode,
//! validate, attempts with backoff: no side effects), then its outcome is made durable by the
//! chosen guarantee:
//!
//! - exactly-once ([`crate::eos`]): the outcome joins the open Kafka transaction; offsets
//!   commit with it.
//! - at-least-once, the way Vector's Kafka source does it: auto-commit on, automatic offset
//!   *store* off; the offset is stored once the outcome is durable (counted, or its dead
//!   letter acknowledged by the broker), and stored offsets are committed synchronously when
//!   partitions are revoked and at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use kafka_batch::{PartitionBatches, RawMessage};
use order_runtime::dead_letter::{self, Category};
use order_runtime::kafka::is_retriable_produce_error;
use order_runtime::trace;
use order_schema::{Cents, CodecError, Order, OrderCodec};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, field, info, info_span, warn};

use crate::aggregate::{PartitionState, StatsReport};
use crate::config::Config;
use crate::eos::{Applied, Core, Effect};
use crate::metrics::{CategoryLabel, Metrics, Tally};

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

/// What evaluating a record concluded.
#[derive(Debug)]
enum Verdict {
    Processed {
        order: Order,
        price: Cents,
        retries: u32,
    },
    DeadLetter {
        category: Category,
        kind: &'static str,
        message: String,
        attempts: u32,
        retries: u32,
    },
}

/// How outcomes become durable.
pub enum Durability {
    /// This replica's per-partition totals, and the producer that writes dead letters.
    AtLeastOnce {
        /// A lock per partition, taken only by that partition's task and by `/stats`: the
        /// partitions' tasks never wait for one another.
        state: Mutex<BTreeMap<i32, Arc<Mutex<PartitionState>>>>,
        dlq: FutureProducer,
    },
    ExactlyOnce(Box<Core>),
}

/// What the processing tasks share.
pub struct Shared {
    pub config: Config,
    pub codec: OrderCodec,
    pub durability: Durability,
    pub metrics: Metrics,
    pub failures: Arc<dyn FailureInjector>,
}

impl Shared {
    pub fn new(
        config: Config,
        codec: OrderCodec,
        durability: Durability,
        metrics: Metrics,
        failures: Arc<dyn FailureInjector>,
    ) -> Self {
        Shared {
            config,
            codec,
            durability,
            metrics,
            failures,
        }
    }

    /// This replica's share, as `/stats` serves it: in exactly-once mode the partitions it
    /// holds (restored totals plus its progress), in at-least-once mode what it has processed.
    pub fn report(&self) -> StatsReport {
        match &self.durability {
            Durability::ExactlyOnce(core) => core.owned_report(),
            Durability::AtLeastOnce { state, .. } => {
                let slots: Vec<(i32, Arc<Mutex<PartitionState>>)> = match state.lock() {
                    Ok(s) => s.iter().map(|(p, st)| (*p, st.clone())).collect(),
                    Err(_) => Vec::new(),
                };
                let states: Vec<(i32, PartitionState)> = slots
                    .into_iter()
                    .filter_map(|(p, st)| st.lock().ok().map(|st| (p, st.clone())))
                    .collect();
                StatsReport::new(states.iter().map(|(p, st)| (*p, st)))
            }
        }
    }

    /// At-least-once: the totals of `partition` that its task adds to (created on first use,
    /// kept across revocations: they are what this replica processed). `None` in exactly-once
    /// mode, where the core keeps the state.
    fn partition_state(&self, partition: i32) -> Option<Arc<Mutex<PartitionState>>> {
        match &self.durability {
            Durability::AtLeastOnce { state, .. } => state
                .lock()
                .ok()
                .map(|mut s| s.entry(partition).or_default().clone()),
            Durability::ExactlyOnce(_) => None,
        }
    }

    /// Logs the running average every `STATS_LOG_INTERVAL_MS` while it moves, until
    /// `stop`. A timer rather than a check per record: the hot path takes no shared lock for it.
    pub async fn log_progress(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.config.processor.stats_log_interval_ms,
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let r = self.report();
            if r.processed == logged {
                continue;
            }
            logged = r.processed;
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

    /// Takes one record to its final outcome; `false` when interrupted (shutdown, revocation,
    /// rewind) before the outcome became durable: the record will be seen again.
    async fn handle(
        &self,
        msg: &RawMessage<'_>,
        totals: Option<&Mutex<PartitionState>>,
        tally: &mut Tally,
        cancel: &CancellationToken,
    ) -> bool {
        let started = Instant::now();
        let span = trace::consumer_span(msg, &self.config.processor.consumer_group);
        let done = async {
            let Some(verdict) = self.evaluate(msg, cancel).await else {
                return false;
            };
            self.make_durable(msg, verdict, totals, &mut *tally, cancel)
                .await
        }
        .instrument(span)
        .await;
        tally.process_duration(started.elapsed().as_secs_f64());
        done
    }

    /// Decode, validate, process with retries. No side effects but metrics and logs.
    async fn evaluate(&self, msg: &RawMessage<'_>, cancel: &CancellationToken) -> Option<Verdict> {
        let order = match self.decode(msg, cancel).await {
            Ok(order) => order,
            Err(None) => return None,
            Err(Some(e)) => {
                return Some(Verdict::DeadLetter {
                    category: Category::Deserialization,
                    kind: malformed_kind(msg.payload(), &e),
                    message: e.to_string(),
                    attempts: 1,
                    retries: 0,
                });
            }
        };
        Span::current().record("order.id", order.order_id.as_str());
        let price = match order.validate() {
            Ok(p) => p,
            Err(e) => {
                return Some(Verdict::DeadLetter {
                    category: Category::Validation,
                    kind: e.kind(),
                    message: e.to_string(),
                    attempts: 1,
                    retries: 0,
                });
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
                return Some(Verdict::Processed {
                    order,
                    price,
                    retries: attempt - 1,
                });
            }
            if attempt > max_retries {
                return Some(Verdict::DeadLetter {
                    category: Category::RetriesExhausted,
                    kind: "transient_failure",
                    message: format!("temporary failure persisted through {attempt} attempts"),
                    attempts: attempt,
                    retries: attempt - 1,
                });
            }
            let wait = self.config.backoff(attempt);
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            self.metrics.retries.inc();
            info!(
                order_id = %order.order_id, attempt, retry_in_ms = wait_ms,
                trace_id = trace::trace_id(&Span::current()).unwrap_or_default(),
                "temporary failure, will retry"
            );
            let backoff = info_span!("backoff", otel.kind = "internal", backoff.ms = wait_ms);
            let interrupted = async {
                tokio::select! {
                    () = cancel.cancelled() => true,
                    () = tokio::time::sleep(wait) => false,
                }
            }
            .instrument(backoff)
            .await;
            if interrupted {
                return None;
            }
            attempt += 1;
        }
    }

    /// `Err(None)` when cancelled while the registry was unreachable.
    async fn decode(
        &self,
        msg: &RawMessage<'_>,
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

    async fn make_durable(
        &self,
        msg: &RawMessage<'_>,
        verdict: Verdict,
        totals: Option<&Mutex<PartitionState>>,
        tally: &mut Tally,
        cancel: &CancellationToken,
    ) -> bool {
        let partition = msg.partition();
        let mut busy = 0u32;
        // the dead letter's headers and span, the same in both modes
        let dead = match &verdict {
            Verdict::DeadLetter {
                category,
                kind,
                message,
                attempts,
                ..
            } => {
                let current = Span::current();
                current.record("error.type", category.as_str());
                current.record("otel.status_code", "ERROR");
                warn!(
                    category = %category, kind, error = message.as_str(), attempts,
                    partition, offset = msg.offset(),
                    trace_id = trace::trace_id(&current).unwrap_or_default(),
                    "dead-lettering record"
                );
                let span = self.dead_letter_span(msg, *category);
                let headers = trace::inject(
                    &span,
                    dead_letter::headers(
                        msg.headers(),
                        &self.metadata(msg, *category, kind, message, *attempts),
                    ),
                );
                Some((span, headers))
            }
            Verdict::Processed { .. } => None,
        };
        let durable = match &self.durability {
            Durability::ExactlyOnce(core) => loop {
                busy += 1;
                let (effect, retries) = match (&verdict, &dead) {
                    (
                        Verdict::Processed {
                            order,
                            price,
                            retries,
                        },
                        _,
                    ) => (
                        Effect::Processed {
                            product: &order.product,
                            price: *price,
                        },
                        *retries,
                    ),
                    (
                        Verdict::DeadLetter {
                            category, retries, ..
                        },
                        Some((_, headers)),
                    ) => (
                        Effect::DeadLettered {
                            category: *category,
                            headers: headers.clone(),
                        },
                        *retries,
                    ),
                    (Verdict::DeadLetter { .. }, None) => return false,
                };
                let applied = match &dead {
                    Some((span, _)) => span.in_scope(|| core.apply(msg, effect, retries)),
                    None => core.apply(msg, effect, retries),
                };
                match applied {
                    Applied::Yes => break true,
                    Applied::Stale => break false,
                    // another task's apply takes microseconds; a commit ~100 ms. Blocking on
                    // the lock instead (block_in_place) made tokio start a thread per waiting
                    // record: ~280 threads and twice the memory under load.
                    Applied::Busy if busy <= 8 => tokio::task::yield_now().await,
                    Applied::Busy => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            },
            Durability::AtLeastOnce { dlq, .. } => {
                if let Some((span, headers)) = &dead
                    && !self.send_dead_letter(dlq, msg, span, headers, cancel).await
                {
                    return false;
                }
                if let Some(Ok(mut st)) = totals.map(Mutex::lock) {
                    match &verdict {
                        Verdict::Processed {
                            order,
                            price,
                            retries,
                        } => {
                            st.add(&order.product, *price);
                            st.retries += u64::from(*retries);
                        }
                        Verdict::DeadLetter {
                            category, retries, ..
                        } => {
                            st.dead_letter(*category);
                            st.retries += u64::from(*retries);
                        }
                    }
                    st.next_offset = msg.offset() + 1;
                }
                // the partition task stores the offset for the auto-commit
                true
            }
        };
        if durable {
            match &verdict {
                Verdict::Processed { price, .. } => {
                    #[allow(clippy::cast_sign_loss)]
                    tally.processed(price.0.max(0) as u64);
                    if let Some(ts) = msg.timestamp().to_millis() {
                        self.metrics.observe_end_to_end(tally, partition, ts);
                    }
                }
                Verdict::DeadLetter { category, .. } => {
                    self.metrics.dead_lettered.inc();
                    self.metrics
                        .dead_letters
                        .get_or_create(&CategoryLabel {
                            category: category.as_str(),
                        })
                        .inc();
                }
            }
        }
        durable
    }

    fn dead_letter_span(&self, msg: &RawMessage<'_>, category: Category) -> Span {
        let dlq_topic = &self.config.common.dlq_topic;
        info_span!(
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
        )
    }

    fn metadata(
        &self,
        msg: &RawMessage<'_>,
        category: Category,
        kind: &str,
        message: &str,
        attempts: u32,
    ) -> dead_letter::Metadata {
        dead_letter::Metadata {
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
        }
    }

    /// At-least-once: writes the dead letter and waits for the broker's acknowledgement;
    /// failures are retried until they succeed or the task is stopped (never dropped).
    async fn send_dead_letter(
        &self,
        dlq: &FutureProducer,
        msg: &RawMessage<'_>,
        span: &Span,
        headers: &OwnedHeaders,
        cancel: &CancellationToken,
    ) -> bool {
        let dlq_topic = &self.config.common.dlq_topic;
        let mut wait = Duration::from_millis(200);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(dlq_topic).headers(headers.clone());
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            if let Some(payload) = msg.payload() {
                record = record.payload(payload);
            }
            match dlq
                .send(record, Duration::from_secs(5))
                .instrument(span.clone())
                .await
            {
                Ok(delivery) => {
                    span.record(
                        "messaging.destination.partition.id",
                        delivery.partition.to_string(),
                    );
                    span.record("messaging.kafka.offset", delivery.offset);
                    return true;
                }
                Err((e, _)) => {
                    log_dlq_error(&e, wait);
                    tokio::select! {
                        () = cancel.cancelled() => return false,
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

/// The consumer's context: starts a task for each partition it is assigned; on revocation
/// stops them and commits (exactly-once: the open transaction; at-least-once: stored offsets)
/// before the partitions go.
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
        let Some(queue) = PartitionBatches::split(consumer, topic, partition) else {
            warn!(topic, partition, "could not split the partition's queue");
            return;
        };
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let consumer = consumer.clone();
        let token = cancel.clone();
        let task_topic = topic.to_owned();
        self.runtime.spawn(async move {
            if let Durability::ExactlyOnce(core) = &shared.durability {
                // Without its state the partition must not be processed. A restore fails on
                // temporary broker errors too (a changelog partition with no leader yet, just
                // after the topic was created): try again until it works or the partition is
                // taken away, since the rebalance that would otherwise restart it may never
                // come (a cooperative rebalance leaves a kept partition where it is).
                let mut wait = Duration::from_millis(100);
                loop {
                    let restored = match core.readers() {
                        Ok(readers) => {
                            // the partitions of an assignment take turns on one pair of readers
                            let readers = readers.lock_owned().await;
                            let (s, c) = (shared.clone(), consumer.clone());
                            tokio::task::spawn_blocking(move || match &s.durability {
                                Durability::ExactlyOnce(core) => {
                                    core.restore(&readers, c.as_ref(), partition)
                                }
                                Durability::AtLeastOnce { .. } => Ok(()),
                            })
                            .await
                        }
                        Err(e) => Ok(Err(e.into())),
                    };
                    match restored {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => {
                            warn!(partition, error = %e, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(0),
                                "could not restore the partition's state yet; it waits");
                        }
                        Err(e) => {
                            tracing::error!(partition, error = %e, "restore task failed");
                            let _ = done_tx.send(());
                            return;
                        }
                    }
                    tokio::select! {
                        () = token.cancelled() => {
                            let _ = done_tx.send(());
                            return;
                        }
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
            let totals = shared.partition_state(partition);
            let mut batch = Vec::with_capacity(kafka_batch::MAX_BATCH);
            let mut tally = shared.metrics.tally();
            // At-least-once: the offset of the last record whose outcome is durable, not yet
            // stored for the auto-commit. Stored with the metrics (every FLUSH_EVERY records,
            // before waiting, on stopping): a store per record was ~6% of the CPU.
            let at_least_once = matches!(shared.durability, Durability::AtLeastOnce { .. });
            let mut unstored: Option<i64> = None;
            // what the task has done, made visible: the offset to the auto-commit, the counts
            // to /metrics
            let settle = |unstored: &mut Option<i64>, tally: &mut Tally| {
                if let Some(offset) = unstored.take()
                    && let Err(e) = consumer.store_offset(&task_topic, partition, offset)
                {
                    // the partition was revoked meanwhile: its new owner redoes the records
                    warn!(error = %e, partition, offset, "could not store offset");
                }
                shared.metrics.flush(tally);
            };
            'task: loop {
                if token.is_cancelled() {
                    break;
                }
                // what is queued is taken at once, up to a batch; only an empty queue arms
                // the cancellation alongside the wait
                queue.pop(&mut batch);
                if batch.is_empty() {
                    // about to wait: what this task counted shows in /metrics now
                    settle(&mut unstored, &mut tally);
                    tokio::select! {
                        biased;
                        () = token.cancelled() => break,
                        () = queue.wait() => continue,
                    }
                }
                // records of the batch left when the task stops are dropped unprocessed: the
                // partition is going (revoked, shutting down, or no longer held), and its
                // next owner starts from what was committed
                for m in batch.drain(..) {
                    if token.is_cancelled() {
                        break 'task;
                    }
                    if let Some(e) = m.error() {
                        warn!(error = %e, partition, "consumer error");
                        continue;
                    }
                    if let Durability::ExactlyOnce(core) = &shared.durability
                        && !core.holds(partition)
                    {
                        break 'task;
                    }
                    let done = shared
                        .handle(&m, totals.as_deref(), &mut tally, &token)
                        .await;
                    if done && at_least_once {
                        unstored = Some(m.offset());
                    }
                    if tally.pending() >= Tally::FLUSH_EVERY {
                        settle(&mut unstored, &mut tally);
                    }
                    if !done && token.is_cancelled() {
                        break 'task;
                    }
                    // a full queue never makes the task wait, so without this a busy
                    // partition would keep its worker from /healthz and other partitions
                    tokio::task::coop::consume_budget().await;
                }
            }
            // before `done`: the commit that follows a revocation or shutdown includes it
            settle(&mut unstored, &mut tally);
            drop(batch);
            drop(queue);
            let _ = done_tx.send(());
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.insert(
                (topic.to_owned(), partition),
                PartitionTask { cancel, done },
            );
        }
    }

    /// Stops the tasks of `partitions` (all when `None`) and waits for them to finish the record
    /// in hand, so that its outcome is applied or dropped before the commit that follows.
    pub fn stop_partitions(&self, partitions: Option<&[(String, i32)]>) -> Vec<i32> {
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
        // blocking here is deliberate (the commit must follow); block_in_place lets the runtime
        // move other tasks off this thread meanwhile
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait);
            }
            _ => wait(),
        }
        stopping.into_iter().map(|((_, p), _)| p).collect()
    }

    /// Commits what is done: the open transaction (exactly-once) or the stored offsets.
    pub fn commit(&self, consumer: &impl Consumer<Self>) {
        match &self.shared.durability {
            Durability::ExactlyOnce(core) => {
                if let Err(e) = core.commit(consumer) {
                    warn!(error = %e, "commit failed; the partitions were rewound to the last commit");
                }
            }
            Durability::AtLeastOnce { .. } => commit_stored(consumer),
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
            let stopped = self.stop_partitions(Some(&revoked));
            let commit = || self.commit(base);
            match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(commit)
                }
                _ => commit(),
            }
            if let Durability::ExactlyOnce(core) = &self.shared.durability {
                let mut all: Vec<i32> = revoked.iter().map(|p| p.1).collect();
                all.extend(stopped);
                core.release(&all);
            }
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

/// Commits the stored offsets now (at-least-once: revocation, shutdown).
pub fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "synchronous offset commit failed"),
    }
}
