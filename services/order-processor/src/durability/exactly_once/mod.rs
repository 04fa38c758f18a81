//! Exactly-once: outcomes, state and offsets in one Kafka transaction.
//!
//! The model is Kafka Streams with `exactly_once_v2`. One transactional producer per replica;
//! each partition's aggregate state lives in memory twice, as `working` (what this replica has
//! applied) and `committed` (what the last committed transaction contains). A processed
//! record's worker gathers it without a lock ([`ledger::Pending`]) and hands what it gathered to
//! `working` under the core's lock every few hundred records, before it waits for more, and
//! when it stops; a dead letter is applied under the lock at once, after the records gathered
//! before it, and produced inside the open transaction. Every `COMMIT_INTERVAL_MS` the committer writes each
//! changed partition's state to the compacted changelog topic (key = partition number, to the
//! changelog partition of the same number), adds the consumer offsets with the group's
//! metadata (KIP-447, which fences zombie replicas through the group generation) and commits.
//! The commit takes what to write under the core's lock and then leaves it for the broker
//! round trips: processed records go on applying to `working` meanwhile and are in the next
//! commit; only a dead letter waits, since it must be produced inside a transaction.
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
//!
//! Layout: [`ledger`] is the pure bookkeeping of the held partitions (what each applied and
//! committed, what to redo after an abort), with no I/O; [`transaction`] holds the open
//! transaction, its producer and the ledger under one lock; [`changelog`] reads and creates the
//! changelog topic; [`reset`] moves a group and its changelog for a replay; this module is the
//! guarantee as the rest of the processor sees it ([`ExactlyOnce`]): restore on assignment, settling a
//! record's outcome, the committer, the commit on revocation and at shutdown, and the group's
//! totals.

pub mod changelog;
mod error;
pub mod ledger;
pub mod reset;
pub mod transaction;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use order_runtime::backoff::Backoff;
use order_runtime::sync::Locked;
use order_schema::{Cents, Order};
use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use self::changelog::ChangelogReaders;
pub use self::error::EosError;
use self::ledger::Pending;
use self::transaction::{Applied, Core};
use super::{CommittedPartition, Durability, GroupTotals, Offsets, TotalsError, Transactions};
use crate::aggregate::StatsReport;
use crate::config::Config;
use crate::position::{Position, Window};
use crate::record::DeadLetter;

/// The exactly-once guarantee of one replica.
pub struct ExactlyOnce {
    /// Made by [`Durability::prepare`], beside the changelog check: both are broker round
    /// trips and neither needs the other. Nothing uses it before: the consumer subscribes after.
    core: OnceLock<Core>,
    config: Config,
    client_id: String,
    /// The changelog readers of the restores in progress, shared (see [`ExactlyOnce::readers`]).
    readers: Mutex<Weak<tokio::sync::Mutex<ChangelogReaders>>>,
    /// Restores asked for and not taken yet, each with its answer (see [`ExactlyOnce::restore`]).
    waiting: Mutex<HashMap<i32, Answer>>,
    /// The committer thread, joined at shutdown.
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    totals: Arc<GroupView>,
    /// Counted by the core, registered by [`Durability::register_metrics`].
    transactions: Transactions,
}

/// How a restore went, for the worker waiting for it.
type Answer = tokio::sync::oneshot::Sender<Result<(), String>>;

/// A worker's share: the partition it processes, the processed records it has not handed to
/// the core yet, and when it last found the partition held ([`Core::holds`]). Which records
/// are stale (final already, or behind a rewind) is the worker's window's to say.
pub struct Partition {
    number: i32,
    pending: Pending,
    checked: AtomicU64,
}

impl ExactlyOnce {
    /// The guarantee, before [`Durability::prepare`] has made its transactional producer.
    pub fn new(config: &Config, client_id: &str) -> Self {
        ExactlyOnce {
            core: OnceLock::new(),
            config: config.clone(),
            client_id: client_id.to_owned(),
            readers: Mutex::new(Weak::new()),
            waiting: Mutex::new(HashMap::new()),
            committer: Mutex::new(None),
            totals: Arc::new(GroupView {
                config: config.clone(),
                reader: Mutex::new(None),
            }),
            transactions: Transactions::default(),
        }
    }

    fn core(&self) -> Option<&Core> {
        self.core.get()
    }

    /// Changelog readers for a restore: the pair the restores in progress use, or a new one.
    /// An assignment restores all its partitions at once, and a pair per partition meant two
    /// clients each (threads, connections, buffers) for a read of a few records. Restores wait
    /// for the pair on the async lock rather than on a blocking thread each, and its holder
    /// reads for all of them ([`ExactlyOnce::restore`]); the pair closes when the last restore
    /// of the wave lets go of it.
    fn readers(&self) -> Result<Arc<tokio::sync::Mutex<ChangelogReaders>>, KafkaError> {
        let mut slot = self.readers.locked();
        if let Some(readers) = slot.upgrade() {
            return Ok(readers);
        }
        let readers = Arc::new(tokio::sync::Mutex::new(ChangelogReaders::new(
            &self.config.common,
        )?));
        *slot = Arc::downgrade(&readers);
        Ok(readers)
    }

    /// One restore of `partition`'s state and position. The restores of an assignment come
    /// together: whichever gets the changelog readers takes every restore waiting by then and
    /// reads those partitions at once (one request per step for all of them, where taking
    /// turns cost a round trip a partition and kept the last partition's records waiting for
    /// all the others), then answers each before letting the readers go.
    async fn restore(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        partition: i32,
    ) -> Result<(), String> {
        let abandoned = |_| Err("the restore was abandoned".to_owned());
        let readers = self.readers().map_err(|e| e.to_string())?;
        let (answer, mut answered) = tokio::sync::oneshot::channel();
        self.waiting.locked().insert(partition, answer);
        let readers = tokio::select! {
            biased;
            answer = &mut answered => return answer.unwrap_or_else(abandoned),
            readers = readers.lock_owned() => readers,
        };
        // the holder before answered before it let go
        if let Ok(answer) = answered.try_recv() {
            return answer;
        }
        let (this, offsets) = (self.clone(), offsets.clone());
        let restored = tokio::task::spawn_blocking(move || {
            // a new pair's first request waits for its connection and metadata: the restores
            // asked for meanwhile (the rest of the assignment) join this one
            readers.warm_up(&this.config.state_topic());
            let mut batch: HashMap<i32, Answer> = this
                .waiting
                .locked()
                .drain()
                .filter(|(_, answer)| !answer.is_closed())
                .collect();
            let mut partitions: Vec<i32> = batch.keys().copied().collect();
            partitions.sort_unstable();
            let mut answer = |p: i32, result: Result<(), EosError>| {
                if let Some(a) = batch.remove(&p) {
                    let _ = a.send(result.map_err(|e| e.to_string()));
                }
            };
            match this.core() {
                Some(core) => core.restore(&readers, offsets.as_ref(), &partitions, &mut answer),
                None => partitions
                    .iter()
                    .for_each(|&p| answer(p, Err(EosError::NotPrepared))),
            }
            drop(readers);
        })
        .await;
        if let Err(e) = restored {
            return Err(format!("restore task failed: {e}"));
        }
        answered.await.unwrap_or_else(abandoned)
    }

    fn commit(&self, offsets: &dyn Offsets) {
        if let Some(Err(e)) = self.core().map(|c| c.commit(offsets)) {
            warn!(error = %e, "commit failed; the outcomes were replayed into a new transaction");
        }
    }
}

impl Durability for ExactlyOnce {
    type Partition = Partition;

    fn configure_consumer(&self, client: &mut ClientConfig) {
        // offsets are committed by the transactions only
        client.set("enable.auto.commit", "false");
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.transactions.register(registry);
    }

    /// The changelog topic, and the transactional producer (fencing any earlier producer with
    /// the same `transactional.id`), side by side.
    async fn prepare(&self, orders_partitions: usize) -> Result<(), KafkaError> {
        let state_topic = self.config.state_topic();
        let changelog =
            changelog::ensure_changelog(&self.config.common, &state_topic, orders_partitions);
        if self.core().is_some() {
            return changelog.await;
        }
        let (c, id, t) = (
            self.config.clone(),
            self.client_id.clone(),
            self.transactions.clone(),
        );
        let (changelog, core) = tokio::join!(
            changelog,
            tokio::task::spawn_blocking(move || Core::new(&c, &id, t))
        );
        let core = core.map_err(|_| KafkaError::Canceled)??;
        let _ = self.core.set(core);
        changelog
    }

    /// Without its state the partition must not be processed. A restore fails on temporary
    /// broker errors too (a changelog partition with no leader yet, just after the topic was
    /// created): it is tried again until it works or the partition is taken away, since the
    /// rebalance that would otherwise restart it may never come (a cooperative rebalance
    /// leaves a kept partition where it is).
    async fn on_assigned(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        _: &str,
        partition: i32,
        cancel: &CancellationToken,
    ) -> Option<(Partition, Position)> {
        // a failure at a start is mostly a broker a moment behind (a leader not known yet):
        // try again soon, then less and less often
        let mut wait = Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
        loop {
            match self.restore(offsets, partition).await {
                Ok(()) => {
                    let position = self
                        .core()
                        .map_or_else(|| Position::at(0), |c| c.position(partition));
                    let part = Partition {
                        number: partition,
                        pending: Pending::default(),
                        checked: AtomicU64::new(u64::MAX),
                    };
                    return Some((part, position));
                }
                Err(e) => {
                    warn!(partition, error = %e, retry_in_ms = wait.upcoming_ms(),
                        "could not restore the partition's state yet; it waits");
                }
            }
            if !wait.wait(cancel).await {
                return None;
            }
        }
    }

    fn holds(&self, part: &Partition) -> bool {
        self.core()
            .is_some_and(|c| c.holds(part.number, &part.checked))
    }

    fn processed(&self, part: &mut Partition, order: &Order, price: Cents, retries: u32) -> bool {
        if self.core().is_none() {
            return false;
        }
        // gathered here, handed to the core at the next checkpoint
        part.pending.add(&order.product, price, retries);
        true
    }

    async fn dead_letter<M: Message + Sync>(
        &self,
        part: &mut Partition,
        msg: &M,
        dead: &DeadLetter,
        window: &Window,
        _: &CancellationToken,
    ) -> bool {
        let Some(core) = self.core() else {
            return false;
        };
        let position = window.position();
        loop {
            let applied = dead.span.in_scope(|| {
                core.dead_letter(
                    msg,
                    dead.category,
                    &dead.headers,
                    dead.retries,
                    &mut part.pending,
                    &position,
                )
            });
            match applied {
                Applied::Yes => return true,
                Applied::Stale => return false,
                // someone holds the core for a moment (an abort: broker round trips): wait for
                // its release rather than block a runtime thread (blocking on the lock made
                // tokio start a thread per waiting record: ~280 threads and twice the memory)
                Applied::Locked => core.until_released().await,
                // a dead letter joins the next transaction once the commit in flight is done
                Applied::Committing => core.until_committed().await,
                // deliveries drain the queue; nothing announces it, and it is rare (a flood
                // of dead letters between two commits)
                Applied::QueueFull => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Hands the records gathered since the last checkpoint to the core, with where the
    /// partition stands, for the next commit; waits (without blocking a runtime thread) while
    /// someone holds the core.
    async fn checkpoint(&self, part: &mut Partition, window: &Window) {
        let Some(core) = self.core() else {
            return;
        };
        if part.pending.is_empty() {
            return;
        }
        let position = window.position();
        while !part.pending.is_empty() && !core.absorb(part.number, &mut part.pending, &position) {
            core.until_released().await;
        }
    }

    fn on_revoked(&self, offsets: &dyn Offsets, partitions: &[i32]) {
        self.commit(offsets);
        if let Some(core) = self.core() {
            core.release(partitions);
        }
    }

    /// Commits the open transaction every `COMMIT_INTERVAL_MS` until shutdown, on a thread of
    /// its own. A commit blocks for a broker round trip or more; given to tokio's
    /// blocking pool every second, it kept a rotating set of 5-6 pool threads from ever idling
    /// out, each holding its allocator cache.
    fn start(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        let interval = Duration::from_millis(self.config.processor.commit_interval_ms);
        let (this, offsets) = (self.clone(), offsets.clone());
        let handle = super::every(interval, shutdown, "eos-committer", move || {
            this.commit(offsets.as_ref());
        })?;
        *self.committer.locked() = Some(handle);
        Ok(())
    }

    fn shutdown(&self, offsets: &dyn Offsets) {
        let committer = self.committer.locked().take();
        // a commit in flight finishes first
        if let Some(c) = committer
            && c.join().is_err()
        {
            error!("the committer thread panicked");
        }
        self.commit(offsets);
        // a failed final commit leaves its replay open: abort it rather than let it block the
        // changelog and dead-letter partitions until the broker times it out
        if let Some(core) = self.core() {
            core.abort();
        }
    }

    fn report(&self) -> StatsReport {
        self.core()
            .map_or_else(|| StatsReport::new(std::iter::empty()), Core::owned_report)
    }

    fn group_totals(&self) -> Arc<dyn GroupTotals> {
        self.totals.clone()
    }
}

/// The group's committed totals, read from the changelog with one reader kept for the
/// purpose (made on first use), instead of a Kafka client per request.
struct GroupView {
    config: Config,
    reader: Mutex<Option<BaseConsumer>>,
}

impl GroupTotals for GroupView {
    fn committed(&self) -> Result<Vec<CommittedPartition>, TotalsError> {
        let unavailable = |e: &dyn std::fmt::Display| TotalsError::Unavailable(e.to_string());
        let mut slot = self.reader.locked();
        let reader = match slot.take() {
            Some(reader) => reader,
            None => changelog::changelog_reader(&self.config.common, "read_committed")
                .map_err(|e| unavailable(&e))?,
        };
        let read = changelog::committed_partitions(
            &reader,
            &self.config.state_topic(),
            &self.config.common.orders_topic,
        );
        *slot = Some(reader);
        read.map_err(|e| unavailable(&e))
    }
}
