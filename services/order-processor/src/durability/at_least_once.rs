//! At-least-once, the way Vector's Kafka source does it: auto-commit on, automatic offset
//! *store* off (the shared consumer defaults). A record's offset is stored once its outcome is
//! durable (counted here, or its dead letter acknowledged by the broker), and stored offsets are
//! committed synchronously when partitions are revoked and at shutdown. A crash can make the
//! group process records again, never skip one. Totals are this replica's own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_batch::RawMessage;
use order_runtime::backoff::Backoff;
use order_runtime::kafka::is_retriable_produce_error;
use order_runtime::sync::Locked;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::{CommittedPartition, Durability, GroupTotals, Offsets, TotalsError};
use crate::aggregate::{PartitionState, StatsReport};
use crate::record::{DeadLetter, Outcome};

/// The at-least-once guarantee of one replica.
pub struct AtLeastOnce {
    /// This replica's totals per partition, kept across revocations (they are what this
    /// replica processed). A lock per partition, taken by its worker and by `/stats` only: the
    /// workers never wait for one another.
    totals: Mutex<BTreeMap<i32, Arc<Mutex<PartitionState>>>>,
    /// Writes dead letters; each send is awaited until the broker acknowledges it.
    dlq: FutureProducer,
    dlq_topic: String,
}

/// A worker's share: its partition's totals and the last durable offset not yet stored.
pub struct Partition {
    offsets: Arc<dyn Offsets>,
    topic: String,
    partition: i32,
    totals: Arc<Mutex<PartitionState>>,
    /// Stored with the metrics (every few records, before waiting, on stopping): a store
    /// takes librdkafka's locks, too dear once a record.
    unstored: Option<i64>,
}

impl AtLeastOnce {
    pub fn new(dlq: FutureProducer, dlq_topic: &str) -> Self {
        AtLeastOnce {
            totals: Mutex::default(),
            dlq,
            dlq_topic: dlq_topic.to_owned(),
        }
    }

    /// Writes the dead letter and waits for the broker's acknowledgement; failures are retried
    /// until they succeed or `cancel` fires (never dropped). `false`: stopped first.
    async fn send(
        &self,
        msg: &RawMessage<'_>,
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
}

impl Durability for AtLeastOnce {
    type Partition = Partition;

    fn configure_consumer(&self, _: &mut ClientConfig) {
        // the shared consumer defaults are this guarantee's: auto-commit, manual store
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
    ) -> Option<Partition> {
        let totals = self.totals.locked().entry(partition).or_default().clone();
        Some(Partition {
            offsets: offsets.clone(),
            topic: topic.to_owned(),
            partition,
            totals,
            unstored: None,
        })
    }

    fn holds(&self, _: &Partition) -> bool {
        // a revoked partition's worker is stopped before the revocation completes
        true
    }

    async fn settle(
        &self,
        part: &mut Partition,
        msg: &RawMessage<'_>,
        outcome: &Outcome,
        cancel: &CancellationToken,
    ) -> bool {
        if let Outcome::DeadLetter(dead) = outcome
            && !self.send(msg, dead, cancel).await
        {
            return false;
        }
        let mut st = part.totals.locked();
        match outcome {
            Outcome::Processed { order, price, .. } => st.add(&order.product, *price),
            Outcome::DeadLetter(dead) => st.dead_letter(dead.category),
        }
        st.retries += u64::from(outcome.retries());
        part.unstored = Some(msg.offset());
        true
    }

    async fn checkpoint(&self, part: &mut Partition) {
        if let Some(offset) = part.unstored.take()
            && let Err(e) = part.offsets.store_next(&part.topic, part.partition, offset)
        {
            // the partition was revoked meanwhile: its new owner redoes the records
            warn!(error = %e, partition = part.partition, offset, "could not store offset");
        }
    }

    fn on_revoked(&self, offsets: &dyn Offsets, _: &[i32]) {
        commit_stored(offsets);
    }

    fn start(self: &Arc<Self>, _: &Arc<dyn Offsets>, _: &CancellationToken) -> std::io::Result<()> {
        Ok(())
    }

    fn shutdown(&self, offsets: &dyn Offsets) {
        commit_stored(offsets);
        // every dead letter was acknowledged before its offset was stored; this only waits
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

/// Commits the stored offsets now.
fn commit_stored(offsets: &dyn Offsets) {
    match offsets.commit_stored() {
        Ok(()) => info!("offsets committed"),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "synchronous offset commit failed"),
    }
}
