//! The transactional core of one replica: the open transaction, its producer, and the
//! [`Ledger`] of what each held partition has applied and committed, under one lock. See the
//! module above for the protocol.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use order_runtime::backoff::Backoff;
use order_runtime::dead_letter::Category;
use order_runtime::sync::Locked;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::changelog::{ChangelogReaders, read_changelog_partitions};
use super::error::EosError;
use super::ledger::{Change, DeadLetter, Ledger, Pending};
use crate::aggregate::{PartitionState, StatsReport};
use crate::config::Config;
use crate::durability::Offsets;
use crate::position::Position;

/// librdkafka's "beginning of the partition" offset, for a partition with no committed offset.
const OFFSET_BEGINNING: i64 = -2;
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

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
    transactions: crate::durability::Transactions,
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
    // (`rdkafka_idempotence.c`), which held up most exactly-once start-ups by a whole period.
    // The orders topic's metadata (only that topic's: every topic's grows with the cluster)
    // makes the client connect to the brokers it names, which are not the bootstrap
    // connection; a request to a partition leader waits for one of those to be up, where
    // without it most starts still met the timer. Asked only once the topic exists:
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
        transactions: crate::durability::Transactions,
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
            let mut inner = self.inner.locked();
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

    /// Where `partition` stands as applied here (offset 0 when not held).
    pub fn position(&self, partition: i32) -> Position {
        self.with_lock(|inner| inner.ledger.position(partition))
    }

    /// This replica's partitions: their working totals, as `/stats` serves them.
    pub fn owned_report(&self) -> StatsReport {
        self.with_lock(|inner| inner.ledger.report())
    }

    /// Restores the committed state of `partitions` from the changelog (read with `readers`,
    /// from [`super::ExactlyOnce`]'s shared pair) and positions the consumer at the offset
    /// committed with each, telling `report` how each went as soon as it is known. Blocking:
    /// run it off the async threads.
    pub fn restore(
        &self,
        readers: &ChangelogReaders,
        offsets: &dyn Offsets,
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
                let group_offsets = committed_offsets(offsets, &self.orders_topic, &ok);
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
                            self.seek_to_start(offsets, partition);
                        }
                        self.place(offsets, partition, state, group_offset)
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
    /// a round later, so a partition could start well after the others and then have its
    /// backlog to itself. A seek asks at once.
    fn seek_to_start(&self, offsets: &dyn Offsets, partition: i32) {
        let Some(start) = self.start else {
            return;
        };
        if let Err(e) = offsets.seek_to(
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
    fn place(
        &self,
        offsets: &dyn Offsets,
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
            if let Err(e) = offsets.seek_to(
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
        let _turn = self.commit_turn.locked();
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

    /// Makes `pending`'s processed records part of the next commit, with the partition at
    /// `position`; `false` without waiting when someone holds the core (try again after
    /// [`Core::until_released`]). They write nothing until the commit, so they go in even
    /// while one is in flight.
    pub fn absorb(&self, partition: i32, pending: &mut Pending, position: &Position) -> bool {
        self.try_with_lock(|inner| inner.ledger.absorb(partition, pending, position))
            .is_some()
    }

    /// Makes one record's dead letter part of the next commit, after the partition's
    /// `pending` records (final before it), with the partition at `position` (which counts it
    /// final). Never waits: `Locked` when someone holds the
    /// core, `Committing` while a commit is in flight (a dead letter is produced inside the
    /// transaction), `QueueFull` when the producer cannot take it yet.
    pub fn dead_letter(
        &self,
        msg: &impl Message,
        category: Category,
        headers: &OwnedHeaders,
        retries: u32,
        pending: &mut Pending,
        position: &Position,
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
            inner.ledger.absorb(partition, pending, position);
            inner
                .ledger
                .dead_lettered(partition, position, category, retries, dead);
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
    pub fn commit(&self, offsets: &dyn Offsets) -> Result<bool, EosError> {
        let _turn = self.commit_turn.locked();
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
        let result = self.send_commit(&producer, &changes, offsets);
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
    fn send_commit(
        &self,
        producer: &FutureProducer,
        changes: &[Change],
        consumer: &dyn Offsets,
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
        let metadata = consumer.generation().ok_or(EosError::NoGroupMetadata)?;
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
fn committed_offsets(
    offsets: &dyn Offsets,
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
    let committed = offsets.group_committed(tpl, Duration::from_secs(30)).ok()?;
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
