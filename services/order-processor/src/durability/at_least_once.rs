//! At-least-once: a record's outcome is made durable first (counted here, or its dead letter
//! acknowledged by the broker), and only then can the group's committed offset pass it. As
//! records of different keys finish out of offset order, what is committed is the partition's
//! [`Position`]: the offset is the lowest record not final, and the offsets not final above it
//! go in the commit's metadata (as Confluent's Parallel Consumer does), so that the partition's
//! next owner skips the records that were final and a crash redoes only the ones that were not.
//! Commits are explicit (auto-commit is off: librdkafka's only commits a stored offset that
//! moved, never metadata that changed), every `COMMIT_INTERVAL_MS` from a thread of their own,
//! synchronously when partitions are revoked and at shutdown. Totals are this replica's own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_runtime::backoff::Backoff;
use order_runtime::kafka::is_retriable_produce_error;
use order_runtime::sync::Locked;
use order_schema::{Cents, Order};
use rdkafka::consumer::CommitMode;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::{CommittedPartition, Durability, GroupTotals, Offsets, TotalsError};
use crate::aggregate::{PartitionState, StatsReport};
use crate::position::{Position, Window};
use crate::record::DeadLetter;

/// The at-least-once guarantee of one replica.
pub struct AtLeastOnce {
    /// This replica's totals per partition, kept across revocations (they are what this
    /// replica processed). A lock per partition, taken by its worker and by `/stats` only: the
    /// workers never wait for one another.
    totals: Mutex<BTreeMap<i32, Arc<Mutex<PartitionState>>>>,
    /// Each held partition's position as its worker last made it visible, and whether it
    /// changed since it was last committed.
    positions: Mutex<BTreeMap<i32, (Position, bool)>>,
    /// Writes dead letters; each send is awaited until the broker acknowledges it.
    dlq: FutureProducer,
    dlq_topic: String,
    orders_topic: String,
    /// `COMMIT_INTERVAL_MS`.
    commit_interval: Duration,
    /// The committer thread, joined at shutdown.
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A worker's share: its partition and that partition's totals.
pub struct Partition {
    number: i32,
    totals: Arc<Mutex<PartitionState>>,
}

impl AtLeastOnce {
    pub fn new(
        dlq: FutureProducer,
        dlq_topic: &str,
        orders_topic: &str,
        commit_interval: Duration,
    ) -> Self {
        AtLeastOnce {
            totals: Mutex::default(),
            positions: Mutex::default(),
            dlq,
            dlq_topic: dlq_topic.to_owned(),
            orders_topic: orders_topic.to_owned(),
            commit_interval,
            committer: Mutex::new(None),
        }
    }

    /// Writes the dead letter and waits for the broker's acknowledgement; failures are retried
    /// until they succeed or `cancel` fires (never dropped). `false`: stopped first.
    async fn send<M: Message>(
        &self,
        msg: &M,
        dead: &DeadLetter,
        cancel: &CancellationToken,
    ) -> bool {
        let mut wait = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.dlq_topic).headers(dead.headers.clone());
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            if let Some(payload) = msg.payload() {
                record = record.payload(payload);
            }
            match self
                .dlq
                .send(record, Duration::from_secs(5))
                .instrument(dead.span.clone())
                .await
            {
                Ok(delivery) => {
                    dead.span.record(
                        "messaging.destination.partition.id",
                        delivery.partition.to_string(),
                    );
                    dead.span.record("messaging.kafka.offset", delivery.offset);
                    return true;
                }
                Err((e, _)) => {
                    let retry_in_ms = wait.upcoming_ms();
                    if is_retriable_produce_error(&e) {
                        warn!(error = %e, retry_in_ms, "dead letter not yet written; retrying");
                    } else {
                        tracing::error!(error = %e, retry_in_ms, "dead letter refused by the broker; the partition waits until it can be written");
                    }
                    if !wait.wait(cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Commits the positions of `partitions` (all held, when `None`) that changed since their
    /// last commit: each partition's lowest offset not final, with the offsets not final
    /// above it as the commit's metadata.
    fn commit(&self, offsets: &dyn Offsets, partitions: Option<&[i32]>, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        let mut committing = Vec::new();
        {
            let mut positions = self.positions.locked();
            for (p, (position, changed)) in positions.iter_mut() {
                if !*changed || partitions.is_some_and(|list| !list.contains(p)) {
                    continue;
                }
                if tpl
                    .add_partition_offset(&self.orders_topic, *p, Offset::Offset(position.next))
                    .is_err()
                {
                    continue;
                }
                let metadata = position.to_metadata().unwrap_or_else(|| {
                    warn!(partition = *p, not_final = position.incomplete.len(),
                        "the records not final do not fit the commit's metadata; committing the offset alone (a restart redoes what was final above it)");
                    String::new()
                });
                if !metadata.is_empty()
                    && let Some(mut elem) = tpl.find_partition(&self.orders_topic, *p)
                {
                    elem.set_metadata(metadata);
                }
                *changed = false;
                committing.push(*p);
            }
        }
        if committing.is_empty() {
            return;
        }
        match offsets.commit(&tpl, mode) {
            Ok(()) => {
                if matches!(mode, CommitMode::Sync) {
                    info!(partitions = ?committing, "offsets committed");
                }
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                warn!(error = %e, partitions = ?committing, "offset commit failed; the next one tries again");
                let mut positions = self.positions.locked();
                for p in committing {
                    if let Some((_, changed)) = positions.get_mut(&p) {
                        *changed = true;
                    }
                }
            }
        }
    }
}

/// The position the group committed for `partition` of `topic`: its offset, and the records
/// not final above it from its metadata. `None` when it could not be read (the worker then
/// starts from the committed offset as librdkafka positions it, redoing what the metadata
/// would have skipped).
fn committed_position(offsets: &dyn Offsets, topic: &str, partition: i32) -> Option<Position> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = offsets
        .group_committed(tpl, Duration::from_secs(30))
        .map_err(|e| warn!(partition, error = %e, "could not read the committed position"))
        .ok()?;
    let elem = committed.find_partition(topic, partition)?;
    match elem.offset() {
        Offset::Offset(next) => Some(Position::from_metadata(next, elem.metadata())),
        // no commit yet: the group starts where `auto.offset.reset` says, and nothing above it
        // is final
        _ => Some(Position::at(0)),
    }
}

impl Durability for AtLeastOnce {
    type Partition = Partition;

    fn configure_consumer(&self, client: &mut ClientConfig) {
        // positions are committed by this guarantee, offset and metadata together
        client.set("enable.auto.commit", "false");
    }

    async fn prepare(&self, _: usize) -> Result<(), KafkaError> {
        Ok(())
    }

    async fn on_assigned(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        topic: &str,
        partition: i32,
        _: &CancellationToken,
    ) -> Option<(Partition, Position)> {
        let totals = self.totals.locked().entry(partition).or_default().clone();
        let (o, t) = (offsets.clone(), topic.to_owned());
        let position =
            tokio::task::spawn_blocking(move || committed_position(o.as_ref(), &t, partition))
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| Position::at(0));
        self.positions
            .locked()
            .insert(partition, (position.clone(), false));
        let part = Partition {
            number: partition,
            totals,
        };
        Some((part, position))
    }

    fn holds(&self, _: &Partition) -> bool {
        // a revoked partition's worker is stopped before the revocation completes
        true
    }

    fn processed(&self, part: &mut Partition, order: &Order, price: Cents, retries: u32) -> bool {
        let mut st = part.totals.locked();
        st.add(&order.product, price);
        st.retries += u64::from(retries);
        true
    }

    async fn dead_letter<M: Message + Sync>(
        &self,
        part: &mut Partition,
        msg: &M,
        dead: &DeadLetter,
        _: &Window,
        cancel: &CancellationToken,
    ) -> bool {
        if !self.send(msg, dead, cancel).await {
            return false;
        }
        let mut st = part.totals.locked();
        st.dead_letter(dead.category);
        st.retries += u64::from(dead.retries);
        true
    }

    /// Keeps where the partition stands for the next commit (a position is kept, not
    /// committed, per checkpoint: a commit per few records would be a broker request each).
    async fn checkpoint(&self, part: &mut Partition, window: &Window) {
        let mut positions = self.positions.locked();
        let Some((kept, changed)) = positions.get_mut(&part.number) else {
            return;
        };
        let moved = if window.in_flight() == 0 {
            // the common case, without building the list of records not final
            kept.next != window.next() || kept.end != window.end() || !kept.incomplete.is_empty()
        } else {
            *kept != window.position()
        };
        if moved {
            *kept = window.position();
            *changed = true;
        }
    }

    fn on_revoked(&self, offsets: &dyn Offsets, partitions: &[i32]) {
        self.commit(offsets, Some(partitions), CommitMode::Sync);
        let mut positions = self.positions.locked();
        for p in partitions {
            positions.remove(p);
        }
    }

    /// Commits the changed positions every `COMMIT_INTERVAL_MS` until shutdown, on a thread of
    /// its own (a commit is asynchronous, but asking for one takes librdkafka's locks).
    fn start(
        self: &Arc<Self>,
        offsets: &Arc<dyn Offsets>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        let (this, offsets) = (self.clone(), offsets.clone());
        let handle = super::every(self.commit_interval, shutdown, "alo-committer", move || {
            this.commit(offsets.as_ref(), None, CommitMode::Async);
        })?;
        *self.committer.locked() = Some(handle);
        Ok(())
    }

    fn shutdown(&self, offsets: &dyn Offsets) {
        if let Some(c) = self.committer.locked().take()
            && c.join().is_err()
        {
            warn!("the committer thread panicked");
        }
        self.commit(offsets, None, CommitMode::Sync);
        // every dead letter was acknowledged before its record was final; this only waits
        // for anything librdkafka still holds
        if let Err(e) = self.dlq.flush(Duration::from_secs(10)) {
            warn!(error = %e, "dead-letter producer did not flush");
        }
    }

    fn report(&self) -> StatsReport {
        let slots: Vec<(i32, Arc<Mutex<PartitionState>>)> = self
            .totals
            .locked()
            .iter()
            .map(|(p, st)| (*p, st.clone()))
            .collect();
        let states: Vec<(i32, PartitionState)> = slots
            .into_iter()
            .map(|(p, st)| {
                let st = st.locked();
                (p, st.clone())
            })
            .collect();
        StatsReport::new(states.iter().map(|(p, st)| (*p, st)))
    }

    fn group_totals(&self) -> Arc<dyn GroupTotals> {
        Arc::new(NotKept)
    }
}

/// At-least-once keeps no group-wide totals: each replica knows only its own.
struct NotKept;

impl GroupTotals for NotKept {
    fn committed(&self) -> Result<Vec<CommittedPartition>, TotalsError> {
        Err(TotalsError::NotKept(
            "the group's totals come from the exactly-once changelog; this processor runs PROCESSING_GUARANTEE=at_least_once (its own share is on /stats)",
        ))
    }
}
