//! One assigned partition's worker: takes its records in batches from the partition's own
//! queue, takes each to its outcome ([`crate::record`]), has the guarantee make it durable
//! ([`Durability::settle`]), and keeps the metrics. A record in retry backoff holds back only
//! its own partition.

use std::sync::Arc;
use std::time::Instant;

use kafka_batch::{PartitionBatches, RawMessage};
use order_runtime::trace;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::metrics::{CategoryLabel, Metrics, Tally};
use super::pause::PauseControl;
use crate::durability::{Durability, Offsets};
use crate::record::{Outcome, Records};

/// What the workers of one processor share.
pub struct Processing<D> {
    pub records: Records,
    pub durability: Arc<D>,
    pub metrics: Metrics,
    /// What the processing spans share (`CONSUMER_GROUP`, `ORDERS_TOPIC`).
    pub spans: trace::ConsumerSpans,
    /// `POST /pause` and `/resume`.
    pub pause: Arc<PauseControl>,
}

/// The worker of one partition, from its assignment until it is stopped (revoked, or
/// shutting down).
pub struct PartitionWorker<D: Durability> {
    pub processing: Arc<Processing<D>>,
    /// The consumer's offsets, for the guarantee.
    pub offsets: Arc<dyn Offsets>,
    pub topic: String,
    pub partition: i32,
    /// The partition's queue, split from the consumer's before the assignment took effect.
    pub queue: PartitionBatches,
    pub cancel: CancellationToken,
}

impl<D: Durability> PartitionWorker<D> {
    /// Runs until cancelled. Records of a batch left when it stops are dropped unprocessed:
    /// the partition is going, and its next owner starts from what was committed.
    pub async fn run(self) {
        let durability = self.processing.durability.clone();
        let Some(mut part) = durability
            .on_assigned(&self.offsets, &self.topic, self.partition, &self.cancel)
            .await
        else {
            return;
        };
        let mut batch = Vec::with_capacity(kafka_batch::MAX_BATCH);
        let mut tally = self.processing.metrics.tally();
        let mut paused = self.processing.pause.watch();
        'work: loop {
            if self.cancel.is_cancelled() {
                break;
            }
            // checked between batches: a batch in hand is finished first, never dropped
            if paused.borrow_and_update().holds(self.partition) {
                self.settle(&mut part, &mut tally).await;
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    changed = paused.changed() => if changed.is_err() { break } else { continue },
                }
            }
            // what is queued is taken at once, up to a batch; only an empty queue arms the
            // cancellation alongside the wait
            self.queue.pop(&mut batch);
            if batch.is_empty() {
                // about to wait: what was done shows in /metrics and goes to the next commit
                self.settle(&mut part, &mut tally).await;
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    () = self.queue.wait() => continue,
                }
            }
            // One reading of the clock a record: a record's handling starts when the one before
            // it ended, unless the worker did something else in between (a flush, a yield):
            // the clock is one of the few costs a record pays whatever it holds.
            let mut since = Instant::now();
            // A stop is looked for once a batch (tokio-util's `is_cancelled` takes a lock); a
            // record that waits (a retry's backoff, a dead
            // letter's send) stops at once, and whatever is settled before the worker is done
            // goes into the commit that follows.
            for m in batch.drain(..) {
                if !durability.holds(&part) {
                    break 'work;
                }
                if let Some(e) = m.error() {
                    warn!(error = %e, partition = self.partition, "consumer error");
                    since = Instant::now();
                    continue;
                }
                match self.handle(&mut part, &m, &mut tally, since).await {
                    Some(durable_at) => since = durable_at,
                    None if self.cancel.is_cancelled() => break 'work,
                    None => since = Instant::now(),
                }
                if tally.pending() >= Tally::FLUSH_EVERY {
                    self.settle(&mut part, &mut tally).await;
                    since = Instant::now();
                }
                // a full queue never makes the worker wait, so without this a busy partition
                // would keep its runtime thread from /healthz and other partitions
                let yields = !tokio::task::coop::has_budget_remaining();
                tokio::task::coop::consume_budget().await;
                if yields {
                    since = Instant::now();
                }
            }
        }
        // before the worker is done: the commit that follows a revocation or shutdown
        // includes it
        self.settle(&mut part, &mut tally).await;
    }

    /// Makes what the worker did visible: to the next commit and to `/metrics`.
    async fn settle(&self, part: &mut D::Partition, tally: &mut Tally) {
        self.processing.durability.checkpoint(part).await;
        self.processing.metrics.flush(tally);
    }

    /// Takes one record, handed over at `started`, to its durable outcome: the instant it
    /// became durable, or `None` when that did not happen (stopped, or the partition is no
    /// longer ours): the record will be seen again.
    async fn handle(
        &self,
        part: &mut D::Partition,
        msg: &RawMessage<'_>,
        tally: &mut Tally,
        started: Instant,
    ) -> Option<Instant> {
        let p = &self.processing;
        let cx = trace::consumer_context(msg, &p.spans, |m| m.last_header(c"traceparent"));
        // when the outcome became durable; `None` when it did not
        let durable_at = trace::in_context(cx, async {
            let outcome = p.records.evaluate(msg, &self.cancel).await?;
            if !p.durability.settle(part, msg, &outcome, &self.cancel).await {
                return None;
            }
            // the record's one reading of the clock: its end-to-end latency, its duration, and
            // the start of the next record's
            let now = Instant::now();
            count(&p.metrics, tally, msg, &outcome, now);
            Some(now)
        })
        .await;
        let ended = durable_at.unwrap_or_else(Instant::now);
        tally.process_duration(ended.saturating_duration_since(started).as_secs_f64());
        durable_at
    }
}

/// Counts a durable outcome.
fn count(
    metrics: &Metrics,
    tally: &mut Tally,
    msg: &RawMessage<'_>,
    outcome: &Outcome,
    now: Instant,
) {
    match outcome {
        Outcome::Processed { price, .. } => {
            tally.processed(u64::try_from(price.0).unwrap_or(0));
            if let Some(ts) = msg.timestamp().to_millis() {
                metrics.observe_end_to_end(tally, ts, now);
            }
        }
        Outcome::DeadLetter(dead) => {
            metrics.dead_lettered.inc();
            metrics
                .dead_letters
                .get_or_create(&CategoryLabel {
                    category: dead.category.as_str(),
                })
                .inc();
        }
    }
}
