//! Exactly-once: outcomes, state and offsets in one Kafka transaction.
//!
//! The model is Kafka Streams with `exactly_once_v2`. One transactional producer per replica;
//! each partition's aggregate state lives in memory twice, as `working` (what this replica has
//! applied) and `committed` (what the last committed transaction contains). A record's outcome
//! is applied under the core's lock: its dead letter (if any) is produced inside the open
//! transaction and `working` moves on. Every `COMMIT_INTERVAL_MS` the committer writes each
//! changed partition's state to the compacted changelog topic (key = partition number, to the
//! changelog partition of the same number), adds the consumer offsets with the group's
//! metadata (KIP-447, which fences zombie replicas through the group generation) and commits.
//! If the transaction fails it is aborted and its outcomes are redone in a fresh one: `working`
//! already holds the effect of every outcome since the last commit, so what has to be redone
//! is the writes, that is the dead letters (kept per partition until their commit) and, at
//! the next commit, the state. The consumer's position never moves back, so no record can be
//! skipped or counted twice. Processed records leave nothing behind but their effect on
//! `working`: memory between commits grows with dead letters, not with throughput.
//!
//! On assignment, a partition's state is restored from the changelog before any of its records
//! is processed, once no transaction is pending on its changelog partition (a crashed
//! replica's open transaction blocks until the broker aborts it after
//! `TRANSACTION_TIMEOUT_MS`). Readers of the dead-letter and changelog topics use
//! `read_committed`, so aborted attempts are invisible to them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use order_runtime::CommonConfig;
use order_runtime::dead_letter::Category;
use order_runtime::kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::aggregate::{PartitionState, StatsReport};
use crate::config::Config;

/// librdkafka's "beginning of the partition" offset, for a partition with no committed offset.
const OFFSET_BEGINNING: i64 = -2;
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EosError {
    #[error("Kafka transaction failed: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the consumer has no group metadata yet")]
    NoGroupMetadata,
    #[error("a record could not join the transaction")]
    Poisoned,
    #[error("changelog partition {partition} still has a pending transaction after {waited_s} s")]
    ChangelogBusy { partition: i32, waited_s: u64 },
    #[error("changelog record of partition {partition} is unreadable: {source}")]
    BadChangelog {
        partition: i32,
        #[source]
        source: serde_json::Error,
    },
}

/// A dead letter produced since the last commit, kept to produce it again if the
/// transaction aborts.
#[derive(Debug)]
struct DeadLetter {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

#[derive(Debug)]
struct Part {
    working: PartitionState,
    committed: PartitionState,
    /// Outcomes in `working` but not yet in `committed`.
    uncommitted: u64,
    /// The dead letters among them, in offset order.
    dead_letters: Vec<DeadLetter>,
}

impl Part {
    fn new(state: PartitionState) -> Self {
        Part {
            working: state.clone(),
            committed: state,
            uncommitted: 0,
            dead_letters: Vec::new(),
        }
    }
}

struct Inner {
    producer: FutureProducer,
    in_txn: bool,
    /// A send inside the transaction failed: the next commit aborts instead.
    poisoned: bool,
    parts: BTreeMap<i32, Part>,
}

/// What an outcome needs to become part of the transaction.
#[derive(Debug)]
pub enum Effect<'a> {
    Processed {
        product: &'a str,
        price: order_schema::Cents,
    },
    DeadLettered {
        category: Category,
        headers: OwnedHeaders,
    },
}

/// Result of [`Core::apply`].
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// This replica no longer holds the partition, or already applied the record: drop it.
    Stale,
    /// A commit holds the core, or the producer's queue is full: wait a moment and apply again.
    Busy,
}

/// The transactional core of one replica.
pub struct Core {
    inner: Mutex<Inner>,
    producer_config: ClientConfig,
    common: CommonConfig,
    orders_topic: String,
    dlq_topic: String,
    state_topic: String,
    stable_wait: Duration,
    /// The changelog readers of the restores in progress, shared (see [`Core::readers`]).
    readers: Mutex<Weak<tokio::sync::Mutex<ChangelogReaders>>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("state_topic", &self.state_topic)
            .finish_non_exhaustive()
    }
}

fn transactional_producer(config: &ClientConfig) -> Result<FutureProducer, KafkaError> {
    let producer: FutureProducer = config.create()?;
    // A connection first: librdkafka asks for the producer id at once only when a broker
    // connection is up, and otherwise retries on a 500 ms timer (`rdkafka_idempotence.c`),
    // which held up most exactly-once start-ups by ~500 ms. Metadata for no topic in
    // particular (so none is auto-created) brings the bootstrap connection up; if that fails,
    // `init_transactions` says why.
    let _ = producer.client().fetch_metadata(None, TXN_TIMEOUT);
    producer.init_transactions(TXN_TIMEOUT)?;
    Ok(producer)
}

impl Core {
    /// Creates the transactional producer (fencing any earlier producer with the same
    /// `transactional.id`) and makes sure the changelog topic exists, compacted, with as many
    /// partitions as the orders topic.
    pub async fn new(config: &Config, client_id: &str) -> Result<Self, KafkaError> {
        let common = &config.common;
        let state_topic = config.state_topic();
        let mut producer_config = order_runtime::kafka::producer_config(common, client_id, "none");
        producer_config
            .set(
                "transactional.id",
                format!("{}-{client_id}", config.processor.consumer_group),
            )
            .set(
                "transaction.timeout.ms",
                config.processor.transaction_timeout_ms.to_string(),
            )
            // librdkafka requires deliveries to give up before the transaction would time out
            .set(
                "message.timeout.ms",
                config.processor.transaction_timeout_ms.to_string(),
            );
        let pc = producer_config.clone();
        // both are round trips to the broker, neither needs the other
        let (changelog, producer) = tokio::join!(
            ensure_changelog(common, &state_topic),
            tokio::task::spawn_blocking(move || transactional_producer(&pc)),
        );
        changelog?;
        let producer = producer.map_err(|_| KafkaError::Canceled)??;
        Ok(Core {
            inner: Mutex::new(Inner {
                producer,
                in_txn: false,
                poisoned: false,
                parts: BTreeMap::new(),
            }),
            producer_config,
            common: common.clone(),
            orders_topic: common.orders_topic.clone(),
            dlq_topic: common.dlq_topic.clone(),
            state_topic,
            stable_wait: Duration::from_millis(
                config.processor.transaction_timeout_ms * 3 + 30_000,
            ),
            readers: Mutex::new(Weak::new()),
        })
    }

    /// Changelog readers for [`Core::restore`]: the pair the restores in progress use, or a
    /// new one. An assignment restores all its partitions at once, and a pair per partition
    /// meant two clients each (threads, connections, buffers) for a read of a few records.
    /// Restores take turns on the pair (a read assigns the reader to its partition), waiting
    /// on the async lock rather than on a blocking thread each; the pair closes when the last
    /// restore of the wave lets go of it.
    pub fn readers(&self) -> Result<Arc<tokio::sync::Mutex<ChangelogReaders>>, KafkaError> {
        let mut slot = self
            .readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(readers) = slot.upgrade() {
            return Ok(readers);
        }
        let readers = Arc::new(tokio::sync::Mutex::new(ChangelogReaders::new(
            &self.common,
        )?));
        *slot = Arc::downgrade(&readers);
        Ok(readers)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock leaves data we can still read; state is rewound on
        // the next failed commit anyway
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The core's lock if nobody holds it: a commit holds it for a broker round trip
    /// (~100 ms), and processing tasks must not block a runtime thread that long.
    fn try_lock(&self) -> Option<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Whether this replica holds `partition` (restored and not released). While a commit is
    /// in flight the answer is yes: [`Core::apply`] checks again and answers `Stale` for a
    /// partition that is gone.
    pub fn holds(&self, partition: i32) -> bool {
        self.try_lock()
            .is_none_or(|inner| inner.parts.contains_key(&partition))
    }

    /// This replica's partitions: their working totals, as `/stats` serves them.
    pub fn owned_report(&self) -> StatsReport {
        let inner = self.lock();
        StatsReport::new(inner.parts.iter().map(|(p, s)| (*p, &s.working)))
    }

    /// Restores `partition`'s committed state from the changelog (read with `readers`, from
    /// [`Core::readers`]) and positions the consumer at the offset committed with it.
    /// Blocking: run it off the async threads.
    pub fn restore<C: rdkafka::consumer::ConsumerContext>(
        &self,
        readers: &ChangelogReaders,
        consumer: &impl Consumer<C>,
        partition: i32,
    ) -> Result<(), EosError> {
        let started = Instant::now();
        let restored =
            read_changelog_partition(readers, &self.state_topic, partition, self.stable_wait)?;
        let group_offset = committed_offset(consumer, &self.orders_topic, partition);
        let state = match restored {
            Some(state) => {
                // both are written by the same transactions, so they agree unless offsets were
                // committed outside them (an at-least-once run); the state decides then
                if state.next_offset >= 0 && group_offset != Some(state.next_offset) {
                    warn!(partition, changelog = state.next_offset, group = ?group_offset,
                        "group offset differs from the changelog's; following the changelog");
                    if let Err(e) = consumer.seek(
                        &self.orders_topic,
                        partition,
                        Offset::Offset(state.next_offset),
                        Duration::from_secs(10),
                    ) {
                        warn!(partition, error = %e, "could not seek to the restored offset");
                    }
                }
                state
            }
            None => PartitionState {
                next_offset: group_offset.unwrap_or(OFFSET_BEGINNING),
                ..PartitionState::default()
            },
        };
        info!(
            partition,
            processed = state.total.count,
            next_offset = state.next_offset,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0),
            "partition state restored"
        );
        self.lock().parts.insert(partition, Part::new(state));
        Ok(())
    }

    /// Forgets partitions given up in a rebalance (after their last commit attempt). If that
    /// commit failed, their outcomes are still in the open transaction: it is aborted and only
    /// the partitions this replica keeps are replayed, so the next owner alone decides them.
    pub fn release(&self, partitions: &[i32]) {
        let mut inner = self.lock();
        let mut uncommitted = false;
        for p in partitions {
            if let Some(part) = inner.parts.remove(p) {
                uncommitted |= part.uncommitted > 0;
            }
        }
        if uncommitted && inner.in_txn {
            warn!(
                ?partitions,
                "released partitions had uncommitted outcomes; aborting them"
            );
            self.abort_and_replay(&mut inner);
        }
    }

    /// Makes one record's outcome part of the open transaction. Never waits: `Busy` when a
    /// commit (or another task's apply) holds the core.
    pub fn apply(&self, msg: &impl Message, effect: Effect<'_>, retries: u32) -> Applied {
        let Some(mut inner) = self.try_lock() else {
            return Applied::Busy;
        };
        let partition = msg.partition();
        match inner.parts.get(&partition) {
            Some(p) if msg.offset() >= p.working.next_offset => {}
            _ => return Applied::Stale,
        }
        let dead = match &effect {
            Effect::Processed { .. } => None,
            Effect::DeadLettered { headers, .. } => Some(DeadLetter {
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                headers: headers.clone(),
            }),
        };
        match self.send_effect(&mut inner, dead.as_ref()) {
            Sent::Busy => return Applied::Busy,
            // a failed send poisons the transaction; the commit aborts it and redoes this
            Sent::Failed | Sent::Ok => {}
        }
        if let Some(part) = inner.parts.get_mut(&partition) {
            match effect {
                Effect::Processed { product, price } => part.working.add(product, price),
                Effect::DeadLettered { category, .. } => part.working.dead_letter(category),
            }
            part.working.retries += u64::from(retries);
            part.working.next_offset = msg.offset() + 1;
            part.uncommitted += 1;
            part.dead_letters.extend(dead);
        }
        Applied::Yes
    }

    /// Begins the transaction if needed and produces `dead` (if any) inside it.
    fn send_effect(&self, inner: &mut Inner, dead: Option<&DeadLetter>) -> Sent {
        if !inner.in_txn {
            if let Err(e) = inner.producer.begin_transaction() {
                warn!(error = %e, "could not begin a transaction");
                inner.poisoned = true;
                return Sent::Failed;
            }
            inner.in_txn = true;
        }
        let Some(DeadLetter {
            key,
            value,
            headers,
        }) = dead
        else {
            return Sent::Ok;
        };
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dlq_topic).headers(headers.clone());
        if let Some(k) = key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        // the delivery is awaited by commit_transaction, not here
        match inner.producer.send_result(record) {
            Ok(_delivery) => Sent::Ok,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Sent::Busy,
            Err((e, _)) => {
                warn!(error = %e, "dead letter could not join the transaction");
                inner.poisoned = true;
                Sent::Failed
            }
        }
    }

    /// Commits the open transaction: changed partitions' state to the changelog, offsets with
    /// the group metadata, then commit. On failure aborts and rewinds (see the module docs).
    /// Blocking. Returns whether anything was committed.
    pub fn commit<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
    ) -> Result<bool, EosError> {
        let mut inner = self.lock();
        let pending = inner.parts.values().any(|p| p.uncommitted > 0);
        if !inner.in_txn && !inner.poisoned && !pending {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let result = if inner.poisoned || !inner.in_txn {
            Err(EosError::Poisoned)
        } else {
            self.try_commit(&mut inner, consumer)
        };
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            ok = result.is_ok(),
            "transaction commit"
        );
        match result {
            Ok(()) => {
                for part in inner.parts.values_mut().filter(|p| p.uncommitted > 0) {
                    part.committed = part.working.clone();
                    part.uncommitted = 0;
                    part.dead_letters.clear();
                }
                inner.in_txn = false;
                Ok(true)
            }
            Err(e) => {
                warn!(error = %e, "transaction failed; aborting it and replaying its outcomes in a new one");
                self.abort_and_replay(&mut inner);
                Err(e)
            }
        }
    }

    fn try_commit<C: rdkafka::consumer::ConsumerContext>(
        &self,
        inner: &mut Inner,
        consumer: &impl Consumer<C>,
    ) -> Result<(), EosError> {
        let mut offsets = TopicPartitionList::new();
        let dirty: Vec<(i32, Vec<u8>)> = inner
            .parts
            .iter()
            .filter(|(_, p)| p.uncommitted > 0)
            .map(|(n, p)| (*n, serde_json::to_vec(&p.working).unwrap_or_default()))
            .collect();
        for (partition, value) in &dirty {
            let key = partition.to_string();
            loop {
                let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.state_topic)
                    .partition(*partition)
                    .key(key.as_str())
                    .payload(value.as_slice());
                match inner.producer.send_result(record) {
                    Ok(_) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        inner.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            if let Some(p) = inner.parts.get(partition) {
                offsets.add_partition_offset(
                    &self.orders_topic,
                    *partition,
                    Offset::Offset(p.working.next_offset),
                )?;
            }
        }
        let metadata = consumer.group_metadata().ok_or(EosError::NoGroupMetadata)?;
        retry_retriable(|| {
            inner
                .producer
                .send_offsets_to_transaction(&offsets, &metadata, TXN_TIMEOUT)
        })?;
        retry_retriable(|| inner.producer.commit_transaction(TXN_TIMEOUT))?;
        Ok(())
    }

    /// Aborts the open transaction (replacing the producer if it cannot) and redoes its writes
    /// in a new one: the dead letters since the last commit, in order (`working` already holds
    /// every uncommitted outcome, and goes to the changelog at the next commit). A replay that
    /// fails leaves the transaction poisoned for the next commit.
    fn abort_and_replay(&self, inner: &mut Inner) {
        if inner.in_txn
            && let Err(e) = inner.producer.abort_transaction(TXN_TIMEOUT)
        {
            warn!(error = %e, "abort failed; replacing the transactional producer");
            match transactional_producer(&self.producer_config) {
                Ok(p) => inner.producer = p,
                Err(e) => {
                    warn!(error = %e, "could not replace the producer; will retry at the next commit")
                }
            }
        }
        inner.in_txn = false;
        inner.poisoned = false;
        let parts = std::mem::take(&mut inner.parts);
        let mut replayed = 0u64;
        for part in parts.values().filter(|p| p.uncommitted > 0) {
            // begins the new transaction even when there is no dead letter to send
            let writes = std::iter::once(None).chain(part.dead_letters.iter().map(Some));
            for dead in writes {
                if let Sent::Busy = self.send_effect(inner, dead) {
                    // the queue drains while we wait; nothing else can use the producer now
                    inner.producer.poll(Duration::from_millis(50));
                    if !matches!(self.send_effect(inner, dead), Sent::Ok) {
                        inner.poisoned = true;
                    }
                }
            }
            replayed += part.uncommitted;
        }
        inner.parts = parts;
        info!(
            replayed,
            poisoned = inner.poisoned,
            "outcomes replayed into a new transaction"
        );
    }

    /// Aborts whatever is open (shutdown after a failed final commit): pending outcomes are
    /// dropped, their records are processed again by the next owner.
    pub fn abort(&self) {
        let mut inner = self.lock();
        if inner.in_txn {
            if let Err(e) = inner.producer.abort_transaction(TXN_TIMEOUT) {
                warn!(error = %e, "abort failed");
            }
            inner.in_txn = false;
        }
    }
}

/// How producing an outcome's records went.
enum Sent {
    Ok,
    Busy,
    Failed,
}

/// Retries a transactional call while librdkafka says the error is retriable.
fn retry_retriable(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut tries = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 10 => {
                tries += 1;
                warn!(error = %e, tries, "retriable transaction error; retrying");
                std::thread::sleep(Duration::from_millis(200 * tries));
            }
            other => return other,
        }
    }
}

fn committed_offset<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .ok()?;
    match committed.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn changelog_reader(common: &CommonConfig, isolation: &str) -> Result<BaseConsumer, KafkaError> {
    let mut c = kafka::base(common, &format!("order-processor-changelog-{isolation}"));
    c.set("group.id", "order-processor-changelog-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        // a reader moves from partition to partition (restores take turns on it) and its next
        // fetch waits for the previous one, which the broker holds this long at a partition's
        // end (librdkafka's default 500 ms made each restore take 1.5 s)
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", isolation);
    kafka::with_user_properties(c, common).create()
}

/// A changelog reader at each isolation level: their end offsets differ while a transaction
/// is open on a partition.
pub struct ChangelogReaders {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
}

impl ChangelogReaders {
    fn new(common: &CommonConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            committed: changelog_reader(common, "read_committed")?,
            uncommitted: changelog_reader(common, "read_uncommitted")?,
        })
    }
}

/// The latest committed state of one partition (`None`: never committed). Waits until no
/// transaction is pending on its changelog partition, so that a commit in flight elsewhere
/// (a replica that lost the partition) is either in or out, never half seen.
pub fn read_changelog_partition(
    readers: &ChangelogReaders,
    state_topic: &str,
    partition: i32,
    stable_wait: Duration,
) -> Result<Option<PartitionState>, EosError> {
    let ChangelogReaders {
        committed,
        uncommitted,
    } = readers;
    let started = Instant::now();
    let stable_end = loop {
        // read_committed watermarks end at the last stable offset; read_uncommitted at the
        // high watermark: equal when no transaction is open on the partition
        let (_, lso) =
            committed.fetch_watermarks(state_topic, partition, Duration::from_secs(10))?;
        let (_, hw) =
            uncommitted.fetch_watermarks(state_topic, partition, Duration::from_secs(10))?;
        if lso == hw {
            break lso;
        }
        if started.elapsed() > stable_wait {
            return Err(EosError::ChangelogBusy {
                partition,
                waited_s: stable_wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    last_state(committed, state_topic, partition, stable_end)
}

/// Reads the last state record below `end`: the tail first (each commit writes one record and
/// one transaction marker per partition), the whole partition if the tail has none.
fn last_state(
    consumer: &BaseConsumer,
    state_topic: &str,
    partition: i32,
    end: i64,
) -> Result<Option<PartitionState>, EosError> {
    if end <= 0 {
        return Ok(None);
    }
    for start in [Offset::Offset((end - 64).max(0)), Offset::Beginning] {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(state_topic, partition, start)?;
        consumer.assign(&tpl)?;
        let mut last = None;
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                // the reader serves one partition after another: anything still in flight for
                // an earlier one is not this partition's state
                Some(Ok(m)) if m.partition() != partition || m.topic() != state_topic => {}
                Some(Err(KafkaError::PartitionEOF(p))) if p != partition => {}
                Some(Ok(m)) => {
                    if let Some(v) = m.payload() {
                        last = Some(v.to_vec());
                    }
                    if m.offset() + 1 >= end {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => return Err(e.into()),
            }
        }
        if let Some(bytes) = last {
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| EosError::BadChangelog { partition, source });
        }
    }
    Ok(None)
}

/// One partition of the orders topic as the whole group has committed it.
#[derive(Debug, Clone)]
pub struct CommittedPartition {
    pub partition: i32,
    /// The latest committed state; `None` before the partition's first commit.
    pub state: Option<PartitionState>,
    /// The orders partition's end offset (high watermark) when it was read.
    pub end_offset: i64,
}

/// Every partition's latest committed state (from the changelog, which commits in the same
/// transactions as the group's offsets) and the orders partition's end offset.
pub fn committed_partitions(config: &Config) -> Result<Vec<CommittedPartition>, EosError> {
    let common = &config.common;
    let state_topic = config.state_topic();
    let reader = changelog_reader(common, "read_committed")?;
    let metadata = reader.fetch_metadata(Some(&state_topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut committed = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (_, lso) = reader.fetch_watermarks(&state_topic, partition, Duration::from_secs(10))?;
        let state = last_state(&reader, &state_topic, partition, lso)?;
        let (_, end_offset) =
            reader.fetch_watermarks(&common.orders_topic, partition, Duration::from_secs(10))?;
        committed.push(CommittedPartition {
            partition,
            state,
            end_offset,
        });
    }
    Ok(committed)
}

/// The whole group's totals: every partition's latest committed state, merged.
pub fn global_report(config: &Config) -> Result<StatsReport, EosError> {
    let committed = committed_partitions(config)?;
    Ok(StatsReport::new(committed.iter().filter_map(|c| {
        c.state.as_ref().map(|s| (c.partition, s))
    })))
}

/// Creates the changelog topic (compacted, as many partitions as the orders topic) or checks
/// the existing one has enough partitions.
async fn ensure_changelog(common: &CommonConfig, state_topic: &str) -> Result<(), KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let mut c = kafka::base(common, "order-processor-admin");
    // asking for a missing topic's metadata must not create it with the broker's defaults
    c.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> =
        kafka::with_user_properties(c, common).create()?;
    let count = |topic: &str| -> Result<usize, KafkaError> {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(md.topics().first().map_or(0, |t| {
            if t.error().is_some() {
                0
            } else {
                t.partitions().len()
            }
        }))
    };
    let orders = count(&common.orders_topic)?;
    if orders == 0 {
        return Err(KafkaError::AdminOpCreation(format!(
            "the orders topic {} does not exist; create it first",
            common.orders_topic
        )));
    }
    let existing = count(state_topic)?;
    if existing >= orders {
        return Ok(());
    }
    if existing > 0 {
        return Err(KafkaError::AdminOpCreation(format!(
            "changelog topic {state_topic} has {existing} partitions but {} has {orders}",
            common.orders_topic
        )));
    }
    let partitions = i32::try_from(orders).unwrap_or(i32::MAX);
    let topic = NewTopic::new(state_topic, partitions, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "0")
        .set("segment.ms", "600000");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&[topic], &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(KafkaError::AdminOpCreation(format!("creating {t}: {code}")));
            }
        }
    }
    info!(topic = state_topic, partitions, "changelog topic created");
    Ok(())
}
