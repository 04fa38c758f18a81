//! How outcomes become durable: the one interface both guarantees implement.
//!
//! - [`at_least_once`]: dead letters sent and acknowledged one by one, totals per
//!   replica, offsets *stored* once an outcome is durable and committed by librdkafka's
//!   auto-commit, synchronously on revocation and at shutdown (Vector's Kafka source).
//! - [`exactly_once`]: outcomes, per-partition state and offsets in one Kafka
//!   transaction (Kafka Streams' `exactly_once_v2`).
//!
//! `lib.rs` picks one, once; everything else calls this trait. A guarantee reaches the
//! consumer only through the narrow [`Offsets`] handle.

pub mod at_least_once;
pub mod exactly_once;
pub mod offsets;

use std::future::Future;
use std::sync::Arc;

use order_schema::{Cents, Order};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

pub use self::offsets::Offsets;
use crate::aggregate::{PartitionState, StatsReport};
use crate::position::{Position, Window};
use crate::record::DeadLetter;

/// A processing guarantee.
pub trait Durability: Send + Sync + Sized + 'static {
    /// What a partition's worker holds while the partition is assigned to it.
    type Partition: Send + 'static;

    /// Consumer settings the guarantee needs.
    fn configure_consumer(&self, client: &mut ClientConfig);

    /// Registers the guarantee's own metrics: `processor_transactions_total`, which only
    /// exactly-once moves (at-least-once has no transactions, so both counts stay 0 there and
    /// the alerts and dashboards that read it work for either).
    fn register_metrics(&self, registry: &mut Registry) {
        Transactions::default().register(registry);
    }

    /// Once the orders topic exists (with `orders_partitions` partitions), before subscribing:
    /// what the guarantee needs in the cluster (exactly-once: its changelog topic, as many
    /// partitions, and its transactional producer).
    fn prepare(
        &self,
        orders_partitions: usize,
    ) -> impl Future<Output = Result<(), KafkaError>> + Send;

    /// A partition was assigned and its queue split: makes it ready to process, and says
    /// where it stands (exactly-once restores its state and position; at-least-once reads the
    /// group's committed offset and the position kept with it). `None` when `cancel` fired
    /// before it was.
    fn on_assigned(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        topic: &str,
        partition: i32,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Option<(Self::Partition, Position)>> + Send;

    /// Whether the partition's records may still be processed here.
    fn holds(&self, part: &Self::Partition) -> bool;

    /// Makes a processed record's outcome durable, or as durable as the guarantee makes it
    /// between checkpoints, without waiting: nearly every record takes this way, so it is
    /// not a future. `false` when the partition is no longer this replica's: the record will be
    /// processed again by the partition's next owner.
    fn processed(
        &self,
        part: &mut Self::Partition,
        order: &Order,
        price: Cents,
        retries: u32,
    ) -> bool;

    /// Makes a dead letter durable (the send can wait for the broker); `window` already counts
    /// its record final. `false` when it did not become so (stopped, or the partition is no
    /// longer this replica's): the record will be processed again, here or by the partition's
    /// next owner.
    fn dead_letter<M: Message + Sync>(
        &self,
        part: &mut Self::Partition,
        msg: &M,
        dead: &DeadLetter,
        window: &Window,
        cancel: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;

    /// Makes what was settled, and where the partition stands (`window`), visible to the next
    /// commit (at-least-once keeps the position for its committer; exactly-once hands the
    /// processed records gathered since to the core). The worker calls it every few records,
    /// before it waits, and when it stops.
    fn checkpoint(
        &self,
        part: &mut Self::Partition,
        window: &Window,
    ) -> impl Future<Output = ()> + Send;

    /// Partitions are being revoked and their workers have stopped: commit what they did and
    /// forget them. Blocking (a rebalance callback).
    fn on_revoked(&self, offsets: &dyn Offsets, partitions: &[i32]);

    /// Background work while the processor runs (exactly-once: the committer). It ends when
    /// `shutdown` is cancelled; [`Durability::shutdown`] waits for it.
    fn start(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()>;

    /// The workers have stopped: the final commit, then what is left open is closed.
    /// Blocking.
    fn shutdown(&self, offsets: &dyn Offsets);

    /// This replica's share, as `/stats` serves it.
    fn report(&self) -> StatsReport;

    /// The whole group's committed totals, for `/stats/global` and the status page.
    fn group_totals(&self) -> Arc<dyn GroupTotals>;
}

/// Runs `f` every `interval` on a thread of its own, named `name`, until `shutdown` (a run
/// in progress finishes first; joining the handle waits for it). A run that overran the
/// interval pushes the next one back a whole interval. The committers use it: a commit blocks
/// for a broker round trip or more, and given to tokio's blocking pool every second it kept a
/// rotating set of pool threads from ever idling out, each holding its allocator cache.
pub fn every(
    interval: std::time::Duration,
    shutdown: &CancellationToken,
    name: &str,
    f: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::mpsc::{RecvTimeoutError, channel};
    use std::time::Instant;
    let (stop, stopped) = channel::<()>();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drop(stop);
    });
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut due = Instant::now() + interval;
            loop {
                let wait = due.saturating_duration_since(Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
                f();
                let now = Instant::now();
                due += interval;
                if due < now {
                    due = now + interval;
                }
            }
        })
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

/// Why the group's totals cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum TotalsError {
    /// This guarantee keeps no group-wide record of them.
    #[error("{0}")]
    NotKept(&'static str),
    /// They are kept, but could not be read now.
    #[error("could not read the group's committed totals: {0}")]
    Unavailable(String),
}

/// The group's committed totals, read when asked.
pub trait GroupTotals: Send + Sync {
    /// Every orders partition as the group has committed it. Blocking: call it off the async
    /// threads.
    fn committed(&self) -> Result<Vec<CommittedPartition>, TotalsError>;

    /// The same, merged into one report.
    fn report(&self) -> Result<StatsReport, TotalsError> {
        let committed = self.committed()?;
        Ok(StatsReport::new(committed.iter().filter_map(|c| {
            c.state.as_ref().map(|s| (c.partition, s))
        })))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransactionOutcome {
    outcome: &'static str,
}

/// `processor_transactions_total{outcome}`: exactly-once transactions committed and aborted
/// (an abort replays the transaction's outcomes in a new one). At-least-once has none.
#[derive(Clone, Debug)]
pub struct Transactions {
    family: Family<TransactionOutcome, Counter>,
    pub committed: Counter,
    pub aborted: Counter,
}

impl Default for Transactions {
    fn default() -> Self {
        let family = Family::<TransactionOutcome, Counter>::default();
        let outcome = |outcome| {
            family
                .get_or_create(&TransactionOutcome { outcome })
                .clone()
        };
        let (committed, aborted) = (outcome("committed"), outcome("aborted"));
        Transactions {
            family,
            committed,
            aborted,
        }
    }
}

impl Transactions {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "processor_transactions",
            "Exactly-once transactions, by outcome (committed, aborted)",
            self.family.clone(),
        );
    }
}
