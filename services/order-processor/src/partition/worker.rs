//! One assigned partition's worker: takes its records in batches from the partition's own
//! queue, takes each to its outcome a step at a time ([`crate::record`]), has the guarantee
//! make it durable ([`Durability::settle`]), and keeps the metrics.
//!
//! Records of different ordering keys are decided concurrently, the records of one key in
//! offset order (`PROCESSING_ORDER`). A record whose attempt failed temporarily waits for its
//! retry here, beside the worker's path, and only the later records of its key queue up behind
//! it; every other record goes on at once. Under `partition` every record has the same key, so
//! a retry holds back the whole partition. The [`Window`] knows which offsets are final, so
//! that what is made durable is a position (the lowest offset not final, and the offsets not
//! final above it) and nothing final is done twice after a restart. Intake stops while the
//! records not final reach `MAX_IN_FLIGHT_RECORDS`, or their span `MAX_IN_FLIGHT_SPAN`
//! offsets, until the oldest of them finish: memory stays bounded, nothing is dropped.
//!
//! Nearly every record is read, decided, made durable and counted without a wait: its schema
//! is known and its first attempt succeeds. That way is plain functions; only what has to wait
//! (the registry, a dead letter's send) is a future, since a future built and moved at every
//! step of every record cost more CPU than the rest of the worker's own work.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use kafka_batch::{PartitionBatches, RawMessage};
use order_runtime::trace::{self, Context};
use order_schema::{Cents, Order};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::metrics::{CategoryLabel, Metrics, PartitionGauges, Tally};
use super::pause::PauseControl;
use crate::durability::{Durability, Offsets};
use crate::position::{Take, Window};
use crate::record::{DeadLetter, Outcome, Records, Retry, Step};

/// What the workers of one processor share.
pub struct Processing<D> {
    pub records: Records,
    pub durability: Arc<D>,
    pub metrics: Metrics,
    /// What the processing spans share (`CONSUMER_GROUP`, `ORDERS_TOPIC`).
    pub spans: trace::ConsumerSpans,
    /// `POST /pause` and `/resume`.
    pub pause: Arc<PauseControl>,
    /// `PROCESSING_ORDER`, picked once: which key a record waits behind.
    pub key_rule: fn(Option<&[u8]>) -> Option<&[u8]>,
    /// `MAX_IN_FLIGHT_RECORDS`: records taken and not final, per partition, at most.
    pub max_in_flight: usize,
    /// `MAX_IN_FLIGHT_SPAN`: offsets from the lowest not final to the newest taken, at most.
    pub max_span: i64,
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

/// A record taken and not final, kept as a copy (a parked librdkafka message would hold its
/// whole fetch buffer).
struct Held {
    msg: OwnedMessage,
    /// Its processing span's context: the span stays open while it waits.
    cx: Option<Context>,
    /// When the worker took it, for its process duration.
    taken: Instant,
}

/// A record whose next attempt is due later.
struct Parked {
    held: Held,
    retry: Retry,
    /// Its ordering key, when later records of the key queue behind it.
    key: Option<Vec<u8>>,
}

/// Records not final, beside the worker's path.
#[derive(Default)]
struct Waits {
    /// Per busy key: the later records of the key, in offset order, behind the one waiting
    /// (an empty queue: the key is busy, nothing behind it yet).
    queued: HashMap<Vec<u8>, VecDeque<Held>>,
    /// Records waiting for a retry, by when it is due (then offset).
    due: BTreeMap<(tokio::time::Instant, i64), Parked>,
}

impl Waits {
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    fn park(&mut self, held: Held, retry: Retry, key: Option<Vec<u8>>) {
        if let Some(k) = &key {
            self.queued.entry(k.clone()).or_default();
        }
        let at = (retry.at, held.msg.offset());
        self.due.insert(at, Parked { held, retry, key });
    }
}

/// The rest of a record that [`Run::take`] could not take to its end without waiting.
enum Waiting {
    /// Its first step needs the schema registry.
    Start { cx: Option<Context>, taken: Instant },
    /// Its outcome is a dead letter, to be made durable.
    DeadLetter {
        dead: DeadLetter,
        cx: Option<Context>,
        taken: Instant,
    },
}

/// How a record's handling ended, for the loop.
enum Handled {
    /// Go on.
    Next,
    /// The partition is not ours any more, or the worker is stopping.
    Stop,
}

/// A worker's state while it runs.
struct Run<'w, D: Durability> {
    w: &'w PartitionWorker<D>,
    part: D::Partition,
    window: Window,
    waits: Waits,
    tally: Tally,
    gauges: PartitionGauges,
    /// When the next record's handling starts: when the one before it ended, unless the
    /// worker did something else in between (a flush, a yield, a wait). One reading of the
    /// clock a record: the clock is one of the few costs a record pays whatever it holds.
    since: Instant,
}

impl<D: Durability> PartitionWorker<D> {
    /// Runs until cancelled. Records taken and not final when it stops (waiting for a retry,
    /// or behind one) are left: the partition is going, and its next owner takes them again
    /// from the position made durable, with a fresh attempt count.
    pub async fn run(self) {
        let p = &self.processing;
        let Some((part, position)) = p
            .durability
            .on_assigned(&self.offsets, &self.topic, self.partition, &self.cancel)
            .await
        else {
            return;
        };
        let mut run = Run {
            w: &self,
            part,
            window: Window::restored(&position, Instant::now()),
            waits: Waits::default(),
            tally: p.metrics.tally(),
            gauges: p.metrics.partition_gauges(&self.topic, self.partition),
            since: Instant::now(),
        };
        run.work().await;
        // before the worker is done: the commit that follows a revocation or shutdown
        // includes it
        run.settle().await;
        run.gauges.remove();
    }
}

impl<D: Durability> Run<'_, D> {
    async fn work(&mut self) {
        let w = self.w;
        let p = &w.processing;
        let mut batch = Vec::with_capacity(kafka_batch::MAX_BATCH);
        let mut paused = p.pause.watch();
        loop {
            if w.cancel.is_cancelled() {
                return;
            }
            // checked between batches: a batch in hand is finished first, never dropped;
            // retries wait out the pause too
            if paused.borrow_and_update().holds(w.partition) {
                self.settle().await;
                tokio::select! {
                    biased;
                    () = w.cancel.cancelled() => return,
                    changed = paused.changed() => if changed.is_err() { return } else { continue },
                }
            }
            if let Some(at) = self.waits.next_due()
                && at <= tokio::time::Instant::now()
            {
                self.since = Instant::now();
                if let Handled::Stop = self.retry_due().await {
                    return;
                }
                continue;
            }
            let room = self.room();
            if room > 0 {
                w.queue.pop_at_most(&mut batch, room);
            }
            if batch.is_empty() {
                // about to wait: what was done shows in /metrics and goes to the next commit
                self.settle().await;
                let due = self.waits.next_due();
                tokio::select! {
                    biased;
                    () = w.cancel.cancelled() => return,
                    () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => continue,
                    () = w.queue.wait(), if room > 0 => continue,
                }
            }
            // A stop is looked for once a batch (tokio-util's `is_cancelled` takes a lock); a
            // record that waits (a dead letter's send, the registry) stops at once, and
            // whatever is settled before the worker is done goes into the commit that follows.
            self.since = Instant::now();
            for m in batch.drain(..) {
                let handled = match self.take(&m) {
                    Ok(handled) => handled,
                    Err(waiting) => self.take_waiting(&m, waiting).await,
                };
                if let Handled::Stop = handled {
                    return;
                }
                if self.tally.pending() >= Tally::FLUSH_EVERY {
                    self.settle().await;
                    self.since = Instant::now();
                }
                // a full queue never makes the worker wait, so without this a busy partition
                // would keep its runtime thread from /healthz and other partitions
                let yields = !tokio::task::coop::has_budget_remaining();
                tokio::task::coop::consume_budget().await;
                if yields {
                    self.since = Instant::now();
                }
            }
        }
    }

    /// How many records intake may take now: what the bounds leave. Only records taken here
    /// count against `MAX_IN_FLIGHT_RECORDS` (those a restart has still to read again can only
    /// be reached by reading on), and the span bound holds only while a record waits for a
    /// retry (else the lowest record not final is one of those, and reading on reaches it).
    fn room(&self) -> usize {
        let p = &self.w.processing;
        let records = p
            .max_in_flight
            .saturating_sub(self.window.taken_in_flight());
        let span = if self.waits.due.is_empty() {
            kafka_batch::MAX_BATCH
        } else {
            usize::try_from(p.max_span - self.window.span()).unwrap_or(0)
        };
        records.min(span).min(kafka_batch::MAX_BATCH)
    }

    /// A record just read: skipped when final already, queued behind its key when the key is
    /// busy, else taken a first step, and to its end when that needs no wait. `Err`: what is
    /// left of it to do, which waits ([`Run::take_waiting`]).
    fn take(&mut self, m: &RawMessage<'_>) -> Result<Handled, Waiting> {
        let w = self.w;
        let p = &w.processing;
        if !p.durability.holds(&self.part) {
            return Ok(Handled::Stop);
        }
        if let Some(e) = m.error() {
            warn!(error = %e, partition = w.partition, "consumer error");
            return Ok(Handled::Next);
        }
        if let Take::Skip = self.window.take(m.offset()) {
            return Ok(Handled::Next);
        }
        let taken = self.since;
        let cx = trace::consumer_context(m, &p.spans, |m| m.last_header(c"traceparent"));
        let key = (p.key_rule)(m.key());
        if let Some(k) = key
            && !self.waits.queued.is_empty()
            && let Some(behind) = self.waits.queued.get_mut(k)
        {
            behind.push_back(Held {
                msg: kafka_batch::detach(m),
                cx,
                taken,
            });
            self.window.waiting(m.offset(), taken);
            return Ok(Handled::Next);
        }
        let Some(step) = trace::in_context_now(cx.as_ref(), || p.records.start_now(m)) else {
            return Err(Waiting::Start { cx, taken });
        };
        match step {
            Step::Final(Outcome::Processed {
                order,
                price,
                retries,
            }) => Ok(self.processed(m, &order, price, retries, taken)),
            Step::Final(Outcome::DeadLetter(dead)) => Err(Waiting::DeadLetter { dead, cx, taken }),
            Step::Retry(retry) => {
                self.wait_for_retry(m, retry, key, cx, taken);
                Ok(Handled::Next)
            }
        }
    }

    /// The rest of a record that [`Run::take`] could not take to its end without waiting.
    async fn take_waiting(&mut self, m: &RawMessage<'_>, waiting: Waiting) -> Handled {
        let w = self.w;
        let p = &w.processing;
        match waiting {
            Waiting::DeadLetter { dead, cx, taken } => self.dead_letter(m, dead, cx, taken).await,
            Waiting::Start { cx, taken } => {
                let step = trace::in_context(cx.clone(), p.records.start(m, &w.cancel)).await;
                match step {
                    None => Handled::Stop,
                    Some(Step::Final(outcome)) => self.finish(m, outcome, cx, taken).await,
                    Some(Step::Retry(retry)) => {
                        self.wait_for_retry(m, retry, (p.key_rule)(m.key()), cx, taken);
                        Handled::Next
                    }
                }
            }
        }
    }

    /// A record just taken failed its first attempt: it waits beside the path for its retry,
    /// and its key is busy until it is final.
    fn wait_for_retry(
        &mut self,
        m: &RawMessage<'_>,
        retry: Retry,
        key: Option<&[u8]>,
        cx: Option<Context>,
        taken: Instant,
    ) {
        let held = Held {
            msg: kafka_batch::detach(m),
            cx,
            taken,
        };
        self.window.waiting(m.offset(), taken);
        self.waits.park(held, retry, key.map(<[u8]>::to_vec));
    }

    /// The earliest retry that is due: its attempt, and when it is final the records of its
    /// key that queued behind it, in order, until one of them has to wait in turn.
    async fn retry_due(&mut self) -> Handled {
        let p = &self.w.processing;
        let Some((_, Parked { held, retry, key })) = self.waits.due.pop_first() else {
            return Handled::Next;
        };
        let step = trace::in_context(held.cx.clone(), async {
            p.records.resume(&held.msg, retry)
        })
        .await;
        match step {
            Step::Retry(retry) => {
                self.waits.park(held, retry, key);
                return Handled::Next;
            }
            Step::Final(outcome) => {
                if let Handled::Stop = self.finish(&held.msg, outcome, held.cx, held.taken).await {
                    return Handled::Stop;
                }
            }
        }
        let Some(key) = key else {
            return Handled::Next;
        };
        while let Some(next) = self
            .waits
            .queued
            .get_mut(&key)
            .and_then(VecDeque::pop_front)
        {
            let step =
                trace::in_context(next.cx.clone(), p.records.start(&next.msg, &self.w.cancel))
                    .await;
            match step {
                None => return Handled::Stop,
                Some(Step::Final(outcome)) => {
                    if let Handled::Stop =
                        self.finish(&next.msg, outcome, next.cx, next.taken).await
                    {
                        return Handled::Stop;
                    }
                }
                Some(Step::Retry(retry)) => {
                    // the key stays busy: the rest stay queued behind this one
                    self.waits.park(next, retry, Some(key));
                    return Handled::Next;
                }
            }
        }
        self.waits.queued.remove(&key);
        Handled::Next
    }

    /// A record's outcome is final: made durable (with the position that counts it final),
    /// then counted. `Stop` when it could not be made durable (stopped, or the partition is no
    /// longer ours): the record will be seen again.
    async fn finish<M: Message + Sync>(
        &mut self,
        msg: &M,
        outcome: Outcome,
        cx: Option<Context>,
        taken: Instant,
    ) -> Handled {
        match outcome {
            Outcome::Processed {
                order,
                price,
                retries,
            } => self.processed(msg, &order, price, retries, taken),
            Outcome::DeadLetter(dead) => self.dead_letter(msg, dead, cx, taken).await,
        }
    }

    /// [`Run::finish`] of a processed record, which waits for nothing.
    fn processed<M: Message>(
        &mut self,
        msg: &M,
        order: &Order,
        price: Cents,
        retries: u32,
        taken: Instant,
    ) -> Handled {
        let p = &self.w.processing;
        self.window.finished(msg.offset());
        if !p
            .durability
            .processed(&mut self.part, order, price, retries)
        {
            return Handled::Stop;
        }
        // the record's one reading of the clock: its end-to-end latency, its duration, and the
        // start of the next record's
        let now = Instant::now();
        self.tally.processed(u64::try_from(price.0).unwrap_or(0));
        if let Some(ts) = msg.timestamp().to_millis() {
            p.metrics
                .observe_end_to_end(&mut self.tally, ts, now, retries == 0);
        }
        self.ended(taken, now)
    }

    /// [`Run::finish`] of a dead letter.
    async fn dead_letter<M: Message + Sync>(
        &mut self,
        msg: &M,
        dead: DeadLetter,
        cx: Option<Context>,
        taken: Instant,
    ) -> Handled {
        let p = &self.w.processing;
        self.window.finished(msg.offset());
        let durable = trace::in_context(cx, async {
            p.durability
                .dead_letter(&mut self.part, msg, &dead, &self.window, &self.w.cancel)
                .await
        })
        .await;
        if !durable {
            return Handled::Stop;
        }
        p.metrics.dead_lettered.inc();
        p.metrics
            .dead_letters
            .get_or_create(&CategoryLabel {
                category: dead.category.as_str(),
            })
            .inc();
        self.ended(taken, Instant::now())
    }

    /// A record that was taken at `taken` is done, `now`.
    fn ended(&mut self, taken: Instant, now: Instant) -> Handled {
        self.tally
            .process_duration(now.saturating_duration_since(taken).as_secs_f64());
        self.since = now;
        Handled::Next
    }

    /// Makes what the worker did visible: to the next commit and to `/metrics`.
    async fn settle(&mut self) {
        let p = &self.w.processing;
        p.durability.checkpoint(&mut self.part, &self.window).await;
        p.metrics.flush(&mut self.tally);
        self.gauges.show(&self.window, Instant::now());
    }
}
