//! Prometheus metrics, named after the OpenTelemetry messaging conventions where one exists.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use order_runtime::dead_letter::Category;
use order_runtime::histogram::{AtomicHistogram, LocalHistogram};
use order_runtime::sync::Locked;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::position::Window;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// 1 µs to 1 hour, within 1% (2 significant digits: 3 would take over ten times the memory);
/// longer values are clamped to the top.
fn exact() -> hdrhistogram::Histogram<u64> {
    #[allow(clippy::expect_used)]
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
        .expect("constant bounds are valid")
}

/// End-to-end latencies to 1% at microsecond resolution: of the orders whose first attempt
/// succeeded (the healthy ones, which a retry elsewhere must not delay) and of those that
/// needed a retry. Every order's are the two merged, when asked: kept apart, a record is
/// recorded once, where every order in two histograms put a second record on the hot path.
#[derive(Debug)]
pub struct Exact {
    first_attempt: hdrhistogram::Histogram<u64>,
    retried: hdrhistogram::Histogram<u64>,
}

/// The processor's metrics; clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Records taken from the orders topic, by outcome (`processed`, `dead_lettered`).
    pub consumed: Family<OutcomeLabel, Counter>,
    /// `consumed{outcome="processed"}`, resolved once: the hot path does no label lookup.
    pub processed: Counter,
    /// `consumed{outcome="dead_lettered"}`.
    pub dead_lettered: Counter,
    /// Time from receiving a record to its final outcome, retries included.
    pub process_duration: AtomicHistogram,
    /// Time from an order's record timestamp (when the generator meant to send it) to its
    /// aggregation here.
    pub end_to_end: AtomicHistogram,
    /// The same, to 1% at microsecond resolution, for `/stats` percentiles. A worker's values
    /// wait in its [`Tally`] and are recorded here under one lock at each flush, not a lock
    /// per record.
    pub end_to_end_exact: Arc<Mutex<Exact>>,
    /// Retries of temporary failures.
    pub retries: Counter,
    /// Dead letters written, by category.
    pub dead_letters: Family<CategoryLabel, Counter>,
    /// Revenue of processed orders, in cents.
    pub revenue_cents: Counter,
    /// Records that reached the consumer's own queue instead of their partition's (rewound).
    /// The rebalance protocol rules it out; the counter is there in case it ever happens.
    pub unsplit_records: Counter,
    /// Records behind the partition's end, from librdkafka's statistics (every 5 s).
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Records taken and not final (waiting for a retry, or behind one of their key).
    pub in_flight: Family<PartitionLabel, Gauge>,
    /// Seconds since the oldest record not final was taken (0 with none).
    pub oldest_in_flight: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
}

/// One partition's in-flight gauges, set by its worker at each flush, removed when it stops.
pub struct PartitionGauges {
    label: PartitionLabel,
    in_flight: Family<PartitionLabel, Gauge>,
    oldest: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
}

impl PartitionGauges {
    pub fn show(&self, window: &Window, now: Instant) {
        self.in_flight
            .get_or_create(&self.label)
            .set(i64::try_from(window.in_flight()).unwrap_or(i64::MAX));
        let age = window
            .oldest()
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.oldest.get_or_create(&self.label).set(age);
    }

    /// The partition is not this replica's any more: its series go.
    pub fn remove(&self) {
        self.in_flight.remove(&self.label);
        self.oldest.remove(&self.label);
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let consumed = Family::<OutcomeLabel, Counter>::default();
        let outcome = |outcome| consumed.get_or_create(&OutcomeLabel { outcome }).clone();
        let (processed, dead_lettered) = (outcome("processed"), outcome("dead_lettered"));
        let m = Metrics {
            consumed,
            processed,
            dead_lettered,
            process_duration: AtomicHistogram::new(exponential_buckets(0.000_05, 4.0, 12)),
            end_to_end: AtomicHistogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            end_to_end_exact: Arc::new(Mutex::new(Exact {
                first_attempt: exact(),
                retried: exact(),
            })),
            retries: Counter::default(),
            unsplit_records: Counter::default(),
            dead_letters: Family::default(),
            revenue_cents: Counter::default(),
            consumer_lag: Family::default(),
            in_flight: Family::default(),
            oldest_in_flight: Family::default(),
        };
        registry.register(
            "messaging_client_consumed_messages",
            "Records consumed from the orders topic, by outcome",
            m.consumed.clone(),
        );
        registry.register(
            "messaging_process_duration_seconds",
            "Time from receiving an order to its final outcome, retries included",
            m.process_duration.clone(),
        );
        registry.register(
            "orders_end_to_end_latency_seconds",
            "Time from an order's record timestamp to its aggregation",
            m.end_to_end.clone(),
        );
        registry.register(
            "orders_retries",
            "Retries of temporary processing failures",
            m.retries.clone(),
        );
        registry.register(
            "orders_dead_letters",
            "Records sent to the dead-letter topic, by error category",
            m.dead_letters.clone(),
        );
        registry.register(
            "orders_revenue_cents",
            "Revenue of processed orders in cents",
            m.revenue_cents.clone(),
        );
        registry.register(
            "processor_records_outside_partition_queues",
            "Records that reached the consumer's queue instead of their partition's (rewound; expected 0)",
            m.unsplit_records.clone(),
        );
        registry.register(
            "messaging_kafka_consumer_lag",
            "Records between this consumer's position and the end (last stable offset) of each partition it has, from librdkafka's statistics",
            m.consumer_lag.clone(),
        );
        registry.register(
            "processor_records_in_flight",
            "Records of a partition taken and not final: waiting for a retry, or behind one of their key",
            m.in_flight.clone(),
        );
        registry.register(
            "processor_oldest_in_flight_seconds",
            "Seconds since the oldest record of a partition that is not final was taken (0 with none)",
            m.oldest_in_flight.clone(),
        );
        for c in Category::ALL {
            let _ = m.dead_letters.get_or_create(&CategoryLabel {
                category: c.as_str(),
            });
        }
        m
    }

    /// A partition's in-flight gauges.
    pub fn partition_gauges(&self, topic: &str, partition: i32) -> PartitionGauges {
        PartitionGauges {
            label: PartitionLabel {
                topic: topic.to_owned(),
                partition,
            },
            in_flight: self.in_flight.clone(),
            oldest: self.oldest_in_flight.clone(),
        }
    }

    /// A partition task's private tally of per-record metrics.
    pub fn tally(&self) -> Tally {
        Tally {
            processed: 0,
            revenue_cents: 0,
            process_duration: self.process_duration.local(),
            end_to_end: self.end_to_end.local(),
            end_to_end_us: Vec::with_capacity(Tally::EXACT_BATCH),
            wall: WallClock::now(),
        }
    }

    /// Adds `tally` to the shared series and empties it.
    pub fn flush(&self, tally: &mut Tally) {
        self.processed.inc_by(std::mem::take(&mut tally.processed));
        self.revenue_cents
            .inc_by(std::mem::take(&mut tally.revenue_cents));
        self.process_duration.absorb(&mut tally.process_duration);
        self.end_to_end.absorb(&mut tally.end_to_end);
        self.record_exact(&mut tally.end_to_end_us);
        tally.wall = WallClock::now();
    }

    /// Records the end-to-end latencies (µs) a tally holds in the exact histogram, under one
    /// lock, and empties the list.
    fn record_exact(&self, us: &mut Vec<(u64, bool)>) {
        if us.is_empty() {
            return;
        }
        let mut h = self.end_to_end_exact.locked();
        for (v, first_attempt) in us.drain(..) {
            if first_attempt {
                h.first_attempt.saturating_record(v);
            } else {
                h.retried.saturating_record(v);
            }
        }
    }

    /// Records one order's end-to-end latency: from `timestamp_ms` (the record's timestamp,
    /// milliseconds since the epoch) to `now`, the instant its outcome became durable (the
    /// worker reads the clock once per record, for this and its process duration).
    /// `first_attempt`: the order needed no retry. Clock skew that makes it negative counts
    /// as 0.
    pub fn observe_end_to_end(
        &self,
        tally: &mut Tally,
        timestamp_ms: i64,
        now: Instant,
        first_attempt: bool,
    ) {
        let now_us = tally.wall.unix_us_at(now);
        let us =
            u64::try_from(now_us.saturating_sub(timestamp_ms.saturating_mul(1000))).unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        tally.end_to_end.observe(us as f64 / 1e6);
        // the exact histogram's lowest value is 1 µs
        tally.end_to_end_us.push((us.max(1), first_attempt));
        // a tally's owner flushes every FLUSH_EVERY records; this bounds the list all the same
        if tally.end_to_end_us.len() >= Tally::EXACT_BATCH {
            self.record_exact(&mut tally.end_to_end_us);
        }
    }

    /// Percentiles of the end-to-end latency since start-up, for `/stats`: of every order, and
    /// of the orders whose first attempt succeeded.
    pub fn end_to_end_summary(&self) -> (LatencySummary, LatencySummary) {
        let h = self.end_to_end_exact.locked();
        let mut all = h.first_attempt.clone();
        // both have the same bounds and precision (`exact()`), so the sum always fits
        let _ = all.add(&h.retried);
        (
            LatencySummary::of(&all),
            LatencySummary::of(&h.first_attempt),
        )
    }
}

/// Per-record metrics one partition task has counted but not yet added to the shared series.
///
/// The series are shared by every partition task; updating them per record made the worker
/// threads fight over their cache lines. A task adds its tally when its queue runs dry, every
/// [`Tally::FLUSH_EVERY`] records and when it stops, so `/metrics` lags by at most that.
#[derive(Debug)]
pub struct Tally {
    processed: u64,
    revenue_cents: u64,
    process_duration: LocalHistogram,
    end_to_end: LocalHistogram,
    /// End-to-end latencies (µs) for the exact histograms, recorded there at the next flush,
    /// each with whether the order's first attempt succeeded.
    end_to_end_us: Vec<(u64, bool)>,
    /// The wall clock as of the last flush, so that a record's end-to-end latency needs no
    /// reading of it: the monotonic instant the worker reads anyway is added to it.
    wall: WallClock,
}

/// A reading of the wall clock and the monotonic clock together. The wall time at a later
/// instant is this reading plus the monotonic time since; a step of the wall clock (set by
/// hand, or by NTP) shows from the next flush, at most [`Tally::FLUSH_EVERY`] records later.
#[derive(Clone, Copy, Debug)]
struct WallClock {
    at: Instant,
    unix_us: i64,
}

impl WallClock {
    fn now() -> Self {
        let unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        WallClock {
            at: Instant::now(),
            unix_us,
        }
    }

    /// Microseconds since the Unix epoch at `t`.
    fn unix_us_at(&self, t: Instant) -> i64 {
        let since =
            i64::try_from(t.saturating_duration_since(self.at).as_micros()).unwrap_or(i64::MAX);
        self.unix_us.saturating_add(since)
    }
}

impl LatencySummary {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

impl Tally {
    pub const FLUSH_EVERY: u64 = 256;
    /// The most end-to-end latencies a tally holds before it records them itself: a flush's
    /// worth, so a worker's list never grows past what one flush hands over.
    const EXACT_BATCH: usize = Self::FLUSH_EVERY as usize;

    /// One more order processed.
    pub fn processed(&mut self, revenue_cents: u64) {
        self.processed += 1;
        self.revenue_cents += revenue_cents;
    }

    pub fn process_duration(&mut self, seconds: f64) {
        self.process_duration.observe(seconds);
    }

    /// Records since the last flush.
    pub fn pending(&self) -> u64 {
        self.process_duration.pending()
    }
}

/// End-to-end latency percentiles in milliseconds (measured in microseconds, kept to 1%; the
/// record timestamp itself has millisecond resolution).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn unix_ms() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    }

    #[test]
    fn end_to_end_latency_is_measured_from_the_record_timestamp() {
        let m = Metrics::register(&mut Registry::default());
        let now_ms = unix_ms();
        let mut tally = m.tally();
        for _ in 0..99 {
            m.observe_end_to_end(&mut tally, now_ms - 20, Instant::now(), true);
        }
        m.observe_end_to_end(&mut tally, now_ms - 2_000, Instant::now(), false);
        // a clock ahead of ours: 0, not a panic
        m.observe_end_to_end(&mut tally, now_ms + 60_000, Instant::now(), true);
        m.flush(&mut tally);
        let (s, first) = m.end_to_end_summary();
        assert_eq!(s.count, 101);
        assert!((20.0..22.0).contains(&s.p50), "{s:?}");
        assert!((2_000.0..2_010.0).contains(&s.max), "{s:?}");
        // the retried order counts in all, not among the first attempts
        assert_eq!(first.count, 100);
        assert!(first.max < 22.0, "{first:?}");
    }

    #[test]
    fn a_tally_never_flushed_still_hands_its_latencies_over_in_batches() {
        let m = Metrics::register(&mut Registry::default());
        let now_ms = unix_ms();
        let mut tally = m.tally();
        for _ in 0..Tally::EXACT_BATCH + 10 {
            m.observe_end_to_end(&mut tally, now_ms, Instant::now(), true);
        }
        let batch = u64::try_from(Tally::EXACT_BATCH).unwrap();
        // the first batch went over when it filled; the rest wait for the flush
        assert_eq!(m.end_to_end_summary().0.count, batch);
        assert_eq!(tally.end_to_end_us.len(), 10);
        m.flush(&mut tally);
        assert_eq!(m.end_to_end_summary().0.count, batch + 10);
    }

    #[test]
    fn end_to_end_latency_counts_the_time_since_the_last_flush() {
        let m = Metrics::register(&mut Registry::default());
        let mut tally = m.tally();
        m.flush(&mut tally);
        let now_ms = unix_ms();
        // the wall clock is read at the flush; a record seen 50 ms later is 50 ms old, not 0
        std::thread::sleep(std::time::Duration::from_millis(50));
        m.observe_end_to_end(&mut tally, now_ms, Instant::now(), true);
        m.flush(&mut tally);
        let (s, _) = m.end_to_end_summary();
        assert_eq!(s.count, 1);
        assert!(s.max >= 49.0, "{s:?}");
    }
}
