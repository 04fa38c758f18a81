//! The transactional core of one replica: the open transaction, its producer, and the
//! [`Ledger`] of what each held partition has applied and committed. See the module above for
//! the protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use order_runtime::backoff::Backoff;
use order_runtime::dead_letter::Category;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::EosError;
use super::changelog::{ChangelogReaders, read_changelog_partitions};
use crate::aggregate::{PartitionState, StatsReport};
use crate::config::Config;

/// librdkafka's "beginning of the partition" offset, for a partition with no committed offset.
const OFFSET_BEGINNING: i64 = -2;
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// A dead letter produced since the last commit, kept to produce it again if the
/// transaction aborts.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
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

/// A partition's processed records not yet in the [`Ledger`], gathered by its worker without
/// the core's lock and handed over in one go ([`Ledger::absorb`]): every few hundred records,
/// before the worker waits, before a dead letter, and when it stops. Taking the lock for each
/// record was a quarter of the workers' CPU in a 1M-record drain (the lock's cache line
/// moving between the CPUs, and the wake-ups of the workers that found it taken).
#[derive(Debug, Default)]
pub struct Pending {
    /// What the records add up to (`next_offset` unused: see `next_offset` below).
    state: PartitionState,
    outcomes: u64,
    /// One past the last record gathered; 0 with none.
    next_offset: i64,
}

impl Pending {
    /// Gathers a processed record.
    pub fn add(&mut self, offset: i64, product: &str, price: order_schema::Cents, retries: u32) {
        self.state.add(product, price);
        self.state.retries += u64::from(retries);
        self.outcomes += 1;
        self.next_offset = offset + 1;
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes == 0
    }

    /// Empties it, keeping its products (zeroed) so that the next records allocate nothing.
    fn clear(&mut self) {
        let PartitionState {
            total,
            by_product,
            dead_lettered,
            retries,
            next_offset: _,
        } = &mut self.state;
        *total = crate::aggregate::Aggregate::default();
        by_product
            .values_mut()
            .for_each(|a| *a = crate::aggregate::Aggregate::default());
        dead_lettered.clear();
        *retries = 0;
        self.outcomes = 0;
        self.next_offset = 0;
    }
}

/// The bookkeeping of the held partitions, with no I/O: what each has applied (`working`),
/// what the last commit holds (`committed`), and the writes to redo if the open transaction
/// aborts.
#[derive(Debug, Default)]
pub struct Ledger {
    parts: BTreeMap<i32, Part>,
}

impl Ledger {
    /// A partition restored with `state` (its next offset included) is held from now on.
    pub fn restored(&mut self, partition: i32, state: PartitionState) {
        self.parts.insert(partition, Part::new(state));
    }

    pub fn holds(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// The offset of `partition`'s next record as applied (0 when not held).
    pub fn next_offset(&self, partition: i32) -> i64 {
        self.parts
            .get(&partition)
            .map_or(0, |p| p.working.next_offset)
    }

    /// Whether the record at `offset` of `partition` is still to be applied here: the
    /// partition is held and the record is not behind what was applied (a record seen again
    /// after a rewind is stale).
    pub fn accepts(&self, partition: i32, offset: i64) -> bool {
        self.parts
            .get(&partition)
            .is_some_and(|p| offset >= p.working.next_offset)
    }

    /// Applies an accepted record's dead letter to `working` and keeps it for a replay.
    pub fn dead_lettered(
        &mut self,
        partition: i32,
        offset: i64,
        category: Category,
        retries: u32,
        dead: DeadLetter,
    ) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.working.dead_letter(category);
            part.working.retries += u64::from(retries);
            part.working.next_offset = offset + 1;
            part.uncommitted += 1;
            part.dead_letters.push(dead);
        }
    }

    /// Moves `pending`'s records into `working` and empties it. Nothing moves if the
    /// partition is not held any more (its records go to the next owner).
    pub fn absorb(&mut self, partition: i32, pending: &mut Pending) {
        if pending.is_empty() {
            return;
        }
        if let Some(part) = self.parts.get_mut(&partition)
            && pending.next_offset > part.working.next_offset
        {
            part.working.merge(&pending.state);
            part.working.next_offset = pending.next_offset;
            part.uncommitted += pending.outcomes;
        }
        pending.clear();
    }

    /// Whether any outcome waits for a commit.
    pub fn pending(&self) -> bool {
        self.parts.values().any(|p| p.uncommitted > 0)
    }

    /// What a commit writes, taken when it starts: each changed partition's state (the
    /// changelog record) and the next offset to commit with it. Outcomes applied while the
    /// commit is in flight stay uncommitted, for the next one.
    pub fn changes(&self) -> Result<Vec<Change>, EosError> {
        self.parts
            .iter()
            .filter(|(_, p)| p.uncommitted > 0)
            .map(|(n, p)| {
                serde_json::to_vec(&p.working)
                    .map(|value| Change {
                        partition: *n,
                        value,
                        state: p.working.clone(),
                        outcomes: p.uncommitted,
                        dead_letters: p.dead_letters.len(),
                    })
                    .map_err(|source| EosError::EncodeState {
                        partition: *n,
                        source,
                    })
            })
            .collect()
    }

    /// The commit of `changes` went through: `committed` catches up with what they hold.
    pub fn committed(&mut self, changes: &[Change]) {
        for c in changes {
            if let Some(part) = self.parts.get_mut(&c.partition) {
                part.committed = c.state.clone();
                part.uncommitted = part.uncommitted.saturating_sub(c.outcomes);
                part.dead_letters
                    .drain(..c.dead_letters.min(part.dead_letters.len()));
            }
        }
    }

    /// Forgets `partitions`; `true` when one had outcomes not yet committed.
    pub fn release(&mut self, partitions: &[i32]) -> bool {
        let mut uncommitted = false;
        for p in partitions {
            if let Some(part) = self.parts.remove(p) {
                uncommitted |= part.uncommitted > 0;
            }
        }
        uncommitted
    }

    /// The writes a new transaction redoes after an abort, partition by partition: `None`
    /// begins the partition's share (the transaction opens even with nothing to send), then
    /// its dead letters in order. `working` already holds every uncommitted outcome, and goes
    /// to the changelog at the next commit.
    pub fn replay(&self) -> Vec<Option<DeadLetter>> {
        self.parts
            .values()
            .filter(|p| p.uncommitted > 0)
            .flat_map(|p| std::iter::once(None).chain(p.dead_letters.iter().cloned().map(Some)))
            .collect()
    }

    /// Outcomes not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.parts.values().map(|p| p.uncommitted).sum()
    }

    /// The held partitions' working totals.
    pub fn report(&self) -> StatsReport {
        StatsReport::new(self.parts.iter().map(|(p, s)| (*p, &s.working)))
    }
}

/// One partition's share of a commit, as it was when the commit started.
#[derive(Debug)]
pub struct Change {
    pub partition: i32,
    /// The changelog record: `state`, encoded.
    pub value: Vec<u8>,
    pub state: PartitionState,
    /// Outcomes and dead letters the commit covers.
    outcomes: u64,
    dead_letters: usize,
}

impl Change {
    pub fn next_offset(&self) -> i64 {
        self.state.next_offset
    }
}

struct Inner {
    producer: FutureProducer,
    in_txn: bool,
    /// A commit is on its way to the broker: processed records still apply (to `working`
    /// only), dead letters wait for the next transaction.
    committing: bool,
    /// A send inside the transaction failed: the next commit aborts instead.
    poisoned: bool,
    ledger: Ledger,
}

/// Result of [`Core::apply`].
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// This replica no longer holds the partition, or already applied the record: drop it.
    Stale,
    /// Someone holds the core for a moment: wait for [`Core::until_released`], then apply
    /// again.
    Locked,
    /// A dead letter while a commit is in flight: wait for [`Core::until_committed`], then
    /// apply again in the next transaction.
    Committing,
    /// The producer's queue is full: give it a moment to drain, then apply again.
    QueueFull,
}

/// The transactional core of one replica.
pub struct Core {
    inner: Mutex<Inner>,
    producer_config: ClientConfig,
    orders_topic: String,
    dlq_topic: String,
    state_topic: String,
    stable_wait: Duration,
    /// Where a partition with no state and no committed offset starts (`auto.offset.reset`).
    start: Option<Offset>,
    /// Partitions given up so far ([`Core::release`]): a worker asks the ledger whether it
    /// still holds its partition only after this moved ([`Core::holds`]).
    releases: AtomicU64,
    /// Workers waiting in [`Core::until_released`]: a release notifies only when there are.
    waiters: AtomicUsize,
    released: Notify,
    /// Mirrors `Inner::committing`, for [`Core::until_committed`].
    committing: watch::Sender<bool>,
    /// One commit at a time (the committer thread, a revocation, shutdown), and no release
    /// while one is in flight.
    commit_turn: Mutex<()>,
    /// Transactions committed and aborted, for `/metrics`.
    transactions: crate::metrics::Transactions,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("state_topic", &self.state_topic)
            .finish_non_exhaustive()
    }
}

fn transactional_producer(
    config: &ClientConfig,
    orders_topic: &str,
) -> Result<FutureProducer, KafkaError> {
    let producer: FutureProducer = config.create()?;
    // Connections first: librdkafka asks for the producer id at once only when the
    // coordinator's connection is up, and otherwise retries on a 500 ms timer
    // (`rdkafka_idempotence.c`), which held up most exactly-once start-ups by ~500 ms. The
    // orders topic's metadata (it exists by now; all topics' took 25-30 ms on a broker with a
    // thousand topics) makes the client connect to the brokers it names, which are not the
    // bootstrap connection; a request to a partition leader waits for one of those to be up
    // (two of three starts still met the timer without it). Asked only once the topic exists:
    // a producer's request for a missing topic can have the broker create it. If these fail,
    // `init_transactions` says why.
    let client = producer.client();
    if client
        .fetch_metadata(Some(orders_topic), TXN_TIMEOUT)
        .is_ok()
    {
        let _ = client.fetch_watermarks(orders_topic, 0, TXN_TIMEOUT);
    }
    producer.init_transactions(TXN_TIMEOUT)?;
    Ok(producer)
}

impl Core {
    /// Creates the transactional producer, fencing any earlier producer with the same
    /// `transactional.id`. Blocking: a broker round trip or more.
    pub fn new(
        config: &Config,
        client_id: &str,
        transactions: crate::metrics::Transactions,
    ) -> Result<Self, KafkaError> {
        let common = &config.common;
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
        let producer = transactional_producer(&producer_config, &common.orders_topic)?;
        Ok(Core {
            inner: Mutex::new(Inner {
                producer,
                in_txn: false,
                committing: false,
                poisoned: false,
                ledger: Ledger::default(),
            }),
            producer_config,
            orders_topic: common.orders_topic.clone(),
            dlq_topic: common.dlq_topic.clone(),
            state_topic: config.state_topic(),
            stable_wait: Duration::from_millis(
                config.processor.transaction_timeout_ms * 3 + 30_000,
            ),
            start: order_runtime::kafka::offset_reset(common),
            releases: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            released: Notify::new(),
            committing: watch::Sender::new(false),
            commit_turn: Mutex::new(()),
            transactions,
        })
    }

    /// Runs `f` under the core's lock, then wakes whoever waits for it. Every use of the lock
    /// goes through here or [`Core::try_with_lock`], so no release goes unannounced.
    fn with_lock<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let r = {
            // a panic while holding the lock leaves data we can still read; state is rewound
            // on the next failed commit anyway
            let mut inner = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut inner)
        };
        self.wake();
        r
    }

    /// [`Core::with_lock`] if nobody holds the lock; `None` without waiting otherwise. Workers
    /// must not block a runtime thread on it (an abort holds it for broker round trips).
    fn try_with_lock<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        let r = {
            let mut inner: MutexGuard<'_, Inner> = match self.inner.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return None,
            };
            f(&mut inner)
        };
        self.wake();
        Some(r)
    }

    /// After a release: wakes the waiters, if any. The fence pairs with the one in
    /// [`Core::until_released`]: either this load sees the waiter's count, or the waiter's
    /// `try_lock` sees the lock free (the store-buffer case that plain atomics would allow).
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.released.notify_waiters();
        }
    }

    /// Returns once the core's lock has been released, at once if it is free now. Replaces
    /// polling through a commit: the waiter registers before it looks, so the release that
    /// follows wakes it.
    pub async fn until_released(&self) {
        let notified = self.released.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.try_with_lock(|_| ()).is_none() {
            notified.await;
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Returns once no commit is in flight (at once if none is).
    pub async fn until_committed(&self) {
        let mut committing = self.committing.subscribe();
        // the sender lives as long as `self`
        let _ = committing.wait_for(|c| !*c).await;
    }

    /// Whether this replica holds `partition` (restored and not released). `checked` is the
    /// caller's: the release count when the ledger last said yes, so that it is asked again
    /// only after a release. While the core is locked the answer is yes: [`Core::apply`] and
    /// [`Core::absorb`] leave a partition that is gone alone.
    pub fn holds(&self, partition: i32, checked: &AtomicU64) -> bool {
        let releases = self.releases.load(Ordering::Acquire);
        if checked.load(Ordering::Relaxed) == releases {
            return true;
        }
        match self.try_with_lock(|inner| inner.ledger.holds(partition)) {
            Some(true) => {
                checked.store(releases, Ordering::Relaxed);
                true
            }
            Some(false) => false,
            None => true,
        }
    }

    /// The offset of `partition`'s next record as applied here (0 when not held).
    pub fn next_offset(&self, partition: i32) -> i64 {
        self.with_lock(|inner| inner.ledger.next_offset(partition))
    }

    /// This replica's partitions: their working totals, as `/stats` serves them.
    pub fn owned_report(&self) -> StatsReport {
        self.with_lock(|inner| inner.ledger.report())
    }

    /// Restores the committed state of `partitions` from the changelog (read with `readers`,
    /// from [`super::ExactlyOnce`]'s shared pair) and positions the consumer at the offset
    /// committed with each, telling `report` how each went as soon as it is known. Blocking:
    /// run it off the async threads.
    pub fn restore<C: rdkafka::consumer::ConsumerContext>(
        &self,
        readers: &ChangelogReaders,
        consumer: &impl Consumer<C>,
        partitions: &[i32],
        mut report: impl FnMut(i32, Result<(), EosError>),
    ) {
        let started = Instant::now();
        read_changelog_partitions(
            readers,
            &self.state_topic,
            partitions,
            self.stable_wait,
            |read| {
                let ok: Vec<i32> = read
                    .iter()
                    .filter(|(_, r)| r.is_ok())
                    .map(|&(p, _)| p)
                    .collect();
                let group_offsets = committed_offsets(consumer, &self.orders_topic, &ok);
                for (partition, restored) in read {
                    let restored = restored.map(|state| {
                        let group_offset = group_offsets
                            .as_ref()
                            .and_then(|g| g.get(&partition).copied());
                        // nothing to start from: a new group (not a group offset that could
                        // not be read)
                        if state.is_none()
                            && group_offsets
                                .as_ref()
                                .is_some_and(|g| g.get(&partition).is_none())
                        {
                            self.seek_to_start(consumer, partition);
                        }
                        self.position(consumer, partition, state, group_offset)
                    });
                    let state = match restored {
                        Ok(state) => state,
                        Err(e) => {
                            report(partition, Err(e));
                            continue;
                        }
                    };
                    info!(
                        partition,
                        processed = state.total.count,
                        next_offset = state.next_offset,
                        took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0),
                        "partition state restored"
                    );
                    self.with_lock(|inner| inner.ledger.restored(partition, state));
                    report(partition, Ok(()));
                }
            },
        );
    }

    /// Starts a partition that has neither state nor a committed offset where
    /// `auto.offset.reset` says. librdkafka would look that offset up itself, but only after a
    /// fixed 100 ms back-off (it counts a missing offset as an error), and for some partitions
    /// a round later: one of six started 100-300 ms after the others, which then had its
    /// backlog to itself. A seek asks at once.
    fn seek_to_start<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        partition: i32,
    ) {
        let Some(start) = self.start else {
            return;
        };
        if let Err(e) = consumer.seek(
            &self.orders_topic,
            partition,
            start,
            Duration::from_secs(10),
        ) {
            warn!(partition, error = %e, "could not seek to the partition's start; librdkafka will");
        }
    }

    /// A restored partition's state, with the consumer positioned at its next offset: the
    /// changelog's (`restored`) decides over the group's committed offset (`group_offset`).
    fn position<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        partition: i32,
        restored: Option<PartitionState>,
        group_offset: Option<i64>,
    ) -> PartitionState {
        let Some(state) = restored else {
            return PartitionState {
                next_offset: group_offset.unwrap_or(OFFSET_BEGINNING),
                ..PartitionState::default()
            };
        };
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

    /// Forgets partitions given up in a rebalance (after their last commit attempt). If that
    /// commit failed, their outcomes are still in the open transaction: it is aborted and only
    /// the partitions this replica keeps are replayed, so the next owner alone decides them.
    pub fn release(&self, partitions: &[i32]) {
        let _turn = self
            .commit_turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.with_lock(|inner| {
            self.releases.fetch_add(1, Ordering::Release);
            if inner.ledger.release(partitions) && inner.in_txn {
                warn!(
                    ?partitions,
                    "released partitions had uncommitted outcomes; aborting them"
                );
                self.abort_and_replay(inner);
            }
        });
    }

    /// Makes `pending`'s processed records part of the next commit; `false` without waiting
    /// when someone holds the core (try again after [`Core::until_released`]). They write
    /// nothing until the commit, so they go in even while one is in flight.
    pub fn absorb(&self, partition: i32, pending: &mut Pending) -> bool {
        self.try_with_lock(|inner| inner.ledger.absorb(partition, pending))
            .is_some()
    }

    /// Makes one record's dead letter part of the next commit, after the partition's
    /// `pending` records (which come before it). Never waits: `Locked` when someone holds the
    /// core, `Committing` while a commit is in flight (a dead letter is produced inside the
    /// transaction), `QueueFull` when the producer cannot take it yet.
    pub fn dead_letter(
        &self,
        msg: &impl Message,
        category: Category,
        headers: &OwnedHeaders,
        retries: u32,
        pending: &mut Pending,
    ) -> Applied {
        let partition = msg.partition();
        self.try_with_lock(|inner| {
            if !inner.ledger.accepts(partition, msg.offset()) {
                return Applied::Stale;
            }
            if inner.committing {
                return Applied::Committing;
            }
            let dead = DeadLetter {
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                headers: headers.clone(),
            };
            match self.send_effect(inner, Some(&dead)) {
                Sent::Busy => return Applied::QueueFull,
                // a failed send poisons the transaction; the commit aborts it and redoes this
                Sent::Failed | Sent::Ok => {}
            }
            inner.ledger.absorb(partition, pending);
            inner
                .ledger
                .dead_lettered(partition, msg.offset(), category, retries, dead);
            Applied::Yes
        })
        .unwrap_or(Applied::Locked)
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

    /// Commits what was applied so far: changed partitions' state to the changelog, offsets
    /// with the group metadata, then commit. The core's lock is held only to take the
    /// [`Change`]s and to settle the result, not for the broker round trips in between, so
    /// workers keep applying processed records meanwhile (they go to the next commit). On
    /// failure aborts and replays (see the module docs). Blocking. Returns whether anything
    /// was committed.
    pub fn commit<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
    ) -> Result<bool, EosError> {
        let _turn = self
            .commit_turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = Instant::now();
        let taken = self.with_lock(|inner| {
            if !inner.in_txn && !inner.poisoned && !inner.ledger.pending() {
                return Ok(None);
            }
            if !inner.poisoned && !inner.in_txn {
                // only processed records since the last commit: nothing has begun it yet
                let _ = self.send_effect(inner, None);
            }
            let taken = if inner.poisoned {
                Err(EosError::Poisoned)
            } else {
                inner.ledger.changes()
            };
            match taken {
                Ok(changes) => {
                    inner.committing = true;
                    self.committing.send_replace(true);
                    Ok(Some((changes, inner.producer.clone())))
                }
                Err(e) => Err(self.abandon(inner, e)),
            }
        })?;
        let Some((changes, producer)) = taken else {
            return Ok(false);
        };
        let result = self.send_commit(&producer, &changes, consumer);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            ok = result.is_ok(),
            "transaction commit"
        );
        self.with_lock(|inner| {
            inner.committing = false;
            let result = match result {
                Ok(()) => {
                    inner.ledger.committed(&changes);
                    inner.in_txn = false;
                    self.transactions.committed.inc();
                    Ok(true)
                }
                Err(e) => Err(self.abandon(inner, e)),
            };
            self.committing.send_replace(false);
            result
        })
    }

    /// The commit's broker round trips, with `producer` (the core's, which nothing else uses
    /// while `committing`).
    fn send_commit<C: rdkafka::consumer::ConsumerContext>(
        &self,
        producer: &FutureProducer,
        changes: &[Change],
        consumer: &impl Consumer<C>,
    ) -> Result<(), EosError> {
        let mut offsets = TopicPartitionList::new();
        for change in changes {
            let key = change.partition.to_string();
            loop {
                let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.state_topic)
                    .partition(change.partition)
                    .key(key.as_str())
                    .payload(change.value.as_slice());
                match producer.send_result(record) {
                    Ok(_) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            offsets.add_partition_offset(
                &self.orders_topic,
                change.partition,
                Offset::Offset(change.next_offset()),
            )?;
        }
        let metadata = consumer.group_metadata().ok_or(EosError::NoGroupMetadata)?;
        retry_retriable(|| producer.send_offsets_to_transaction(&offsets, &metadata, TXN_TIMEOUT))?;
        retry_retriable(|| producer.commit_transaction(TXN_TIMEOUT))?;
        Ok(())
    }

    /// A commit failed with `e`: aborts the transaction and replays its outcomes in a new
    /// one; answers `e`.
    fn abandon(&self, inner: &mut Inner, e: EosError) -> EosError {
        warn!(error = %e, "transaction failed; aborting it and replaying its outcomes in a new one");
        self.abort_and_replay(inner);
        e
    }

    /// Aborts the open transaction (replacing the producer if it cannot) and redoes its writes
    /// in a new one ([`Ledger::replay`]). A replay that fails leaves the transaction poisoned
    /// for the next commit.
    fn abort_and_replay(&self, inner: &mut Inner) {
        if inner.in_txn {
            self.transactions.aborted.inc();
        }
        if inner.in_txn
            && let Err(e) = inner.producer.abort_transaction(TXN_TIMEOUT)
        {
            warn!(error = %e, "abort failed; replacing the transactional producer");
            match transactional_producer(&self.producer_config, &self.orders_topic) {
                Ok(p) => inner.producer = p,
                Err(e) => {
                    warn!(error = %e, "could not replace the producer; will retry at the next commit")
                }
            }
        }
        inner.in_txn = false;
        inner.poisoned = false;
        for dead in inner.ledger.replay() {
            if let Sent::Busy = self.send_effect(inner, dead.as_ref()) {
                // the queue drains while we wait; nothing else can use the producer now
                inner.producer.poll(Duration::from_millis(50));
                if !matches!(self.send_effect(inner, dead.as_ref()), Sent::Ok) {
                    inner.poisoned = true;
                }
            }
        }
        info!(
            replayed = inner.ledger.uncommitted(),
            poisoned = inner.poisoned,
            "outcomes replayed into a new transaction"
        );
    }

    /// Aborts whatever is open (shutdown after a failed final commit): pending outcomes are
    /// dropped, their records are processed again by the next owner.
    pub fn abort(&self) {
        self.with_lock(|inner| {
            if inner.in_txn {
                self.transactions.aborted.inc();
                if let Err(e) = inner.producer.abort_transaction(TXN_TIMEOUT) {
                    warn!(error = %e, "abort failed");
                }
                inner.in_txn = false;
            }
        });
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
    // 200 ms doubling to 2 s, ten tries at most
    let mut wait = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut tries = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 10 => {
                tries += 1;
                warn!(error = %e, tries, retry_in_ms = wait.upcoming_ms(), "retriable transaction error; retrying");
                // the commit's own thread (or a rebalance callback, which must block)
                std::thread::sleep(wait.next_wait());
            }
            other => return other,
        }
    }
}

/// The group's committed offsets of `partitions`, in one request: a partition without one is
/// not in the map. `None` when the request failed (the changelog's offsets decide then).
fn committed_offsets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partitions: &[i32],
) -> Option<HashMap<i32, i64>> {
    if partitions.is_empty() {
        return Some(HashMap::new());
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .ok()?;
    Some(
        committed
            .elements_for_topic(topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use order_schema::Cents;

    fn restored(partition: i32, next_offset: i64) -> Ledger {
        let mut l = Ledger::default();
        l.restored(
            partition,
            PartitionState {
                next_offset,
                ..PartitionState::default()
            },
        );
        l
    }

    /// One processed record, gathered and handed over on its own.
    fn sold(l: &mut Ledger, partition: i32, offset: i64, cents: i64) {
        assert!(l.accepts(partition, offset));
        let mut pending = Pending::default();
        pending.add(offset, "laptop", Cents(cents), 0);
        l.absorb(partition, &mut pending);
        assert!(pending.is_empty());
    }

    fn letter(n: u8) -> DeadLetter {
        DeadLetter {
            key: Some(vec![n]),
            value: None,
            headers: OwnedHeaders::new(),
        }
    }

    fn dead_lettered(l: &mut Ledger, partition: i32, offset: i64, n: u8) {
        l.dead_lettered(partition, offset, Category::Validation, 2, letter(n));
    }

    /// Records gathered without the lock land in `working` as if applied one by one, and the
    /// emptied `Pending` serves again.
    #[test]
    fn gathered_records_are_absorbed_in_one_go_and_the_pending_is_reused() {
        let mut l = restored(3, 100);
        let mut pending = Pending::default();
        pending.add(100, "laptop", Cents(1_000), 1);
        pending.add(101, "phone", Cents(250), 0);
        pending.add(102, "laptop", Cents(3_000), 0);
        l.absorb(3, &mut pending);
        assert!(pending.is_empty());
        let change = &l.changes().unwrap()[0];
        assert_eq!(change.next_offset(), 103);
        assert_eq!(change.outcomes, 3);
        let state = &change.state;
        assert_eq!(state.total.count, 3);
        assert_eq!(state.total.revenue_cents, 4_250);
        assert_eq!(state.total.min_cents, Some(250));
        assert_eq!(state.total.max_cents, Some(3_000));
        assert_eq!(state.by_product["laptop"].count, 2);
        assert_eq!(state.retries, 1);
        // reused: the product zeroed in it adds nothing, the new record its own figures
        pending.add(103, "phone", Cents(500), 0);
        l.absorb(3, &mut pending);
        let state = &l.changes().unwrap()[0].state;
        assert_eq!(state.by_product["laptop"].count, 2);
        assert_eq!(state.by_product["laptop"].min_cents, Some(1_000));
        assert_eq!(state.by_product["phone"].count, 2);
        assert_eq!((state.total.count, state.next_offset), (4, 104));
        // a dead letter after gathered records: Core::dead_letter absorbs them first
        pending.add(104, "phone", Cents(1), 0);
        l.absorb(3, &mut pending);
        dead_lettered(&mut l, 3, 105, 9);
        assert_eq!(l.changes().unwrap()[0].next_offset(), 106);
        assert_eq!(l.uncommitted(), 6);
    }

    #[test]
    fn applied_outcomes_move_working_and_the_commit_catches_up() {
        let mut l = restored(0, 10);
        sold(&mut l, 0, 10, 150);
        sold(&mut l, 0, 11, 250);
        dead_lettered(&mut l, 0, 12, 1);
        assert!(l.pending());
        assert_eq!(l.uncommitted(), 3);
        let changes = l.changes().unwrap();
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!((change.partition, change.next_offset()), (0, 13));
        let state: PartitionState = serde_json::from_slice(&change.value).unwrap();
        assert_eq!(state.total.count, 2);
        assert_eq!(state.total.revenue_cents, 400);
        assert_eq!(state.retries, 2);
        l.committed(&changes);
        assert!(!l.pending());
        assert!(l.changes().unwrap().is_empty());
        assert!(l.replay().is_empty(), "nothing to redo once committed");
    }

    /// Outcomes applied while a commit is in flight are not in it: they stay for the next.
    #[test]
    fn outcomes_applied_during_a_commit_wait_for_the_next_one() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        sold(&mut l, 0, 0, 100);
        dead_lettered(&mut l, 0, 1, 1);
        let changes = l.changes().unwrap();
        // in flight: more of partition 0, and partition 1's first
        sold(&mut l, 0, 2, 300);
        sold(&mut l, 1, 0, 50);
        l.committed(&changes);
        assert_eq!(l.uncommitted(), 2);
        let next = l.changes().unwrap();
        let offsets: Vec<(i32, i64)> = next
            .iter()
            .map(|c| (c.partition, c.next_offset()))
            .collect();
        assert_eq!(offsets, [(0, 3), (1, 1)]);
        assert_eq!(next[0].state.total.revenue_cents, 400);
        // the committed dead letter is not redone after an abort of the next transaction
        assert_eq!(
            l.replay().iter().filter(|d| d.is_some()).count(),
            0,
            "{:?}",
            l.replay()
        );
        l.committed(&next);
        assert!(!l.pending());
    }

    #[test]
    fn records_behind_what_was_applied_and_partitions_not_held_are_stale() {
        let mut l = restored(0, 10);
        assert!(!l.accepts(0, 9), "before the restored offset");
        sold(&mut l, 0, 10, 100);
        assert!(!l.accepts(0, 10), "seen again after a rewind");
        assert!(l.accepts(0, 11));
        assert!(!l.accepts(1, 0), "never assigned here");
        // records of a partition not held, or behind what was applied, change nothing
        let mut pending = Pending::default();
        pending.add(0, "laptop", Cents(1), 0);
        l.absorb(1, &mut pending);
        assert!(pending.is_empty(), "dropped, for the partition's owner");
        pending.add(9, "laptop", Cents(1), 0);
        l.absorb(0, &mut pending);
        assert_eq!(l.report().processed, 1);
        assert_eq!(l.uncommitted(), 1);
    }

    #[test]
    fn an_abort_replays_the_uncommitted_dead_letters_in_order_per_partition() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        l.restored(2, PartitionState::default());
        dead_lettered(&mut l, 0, 0, 1);
        sold(&mut l, 0, 1, 100);
        dead_lettered(&mut l, 0, 2, 2);
        sold(&mut l, 1, 0, 100);
        // partition 2 has nothing uncommitted: nothing of it is replayed
        let keys: Vec<Option<Vec<u8>>> = l
            .replay()
            .into_iter()
            .map(|d| d.and_then(|d| d.key))
            .collect();
        assert_eq!(
            keys,
            [None, Some(vec![1]), Some(vec![2]), None],
            "partition 0 opens the transaction and redoes its two letters; partition 1 has none"
        );
        // the replay does not change working: the effects stay applied once
        assert_eq!(l.report().processed, 2);
        assert_eq!(l.report().dead_lettered, 2);
    }

    #[test]
    fn releasing_says_whether_uncommitted_outcomes_went_with_the_partitions() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        sold(&mut l, 1, 0, 100);
        assert!(!l.release(&[0]), "partition 0 had nothing uncommitted");
        assert!(!l.holds(0));
        assert!(l.release(&[1, 7]), "partition 1 did; 7 was never held");
        assert!(!l.pending());
        assert!(l.replay().is_empty());
    }
}
