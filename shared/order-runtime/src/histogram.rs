//! A Prometheus histogram for per-record hot paths.
//!
//! `prometheus_client`'s `Histogram` takes a mutex on every observation; with several
//! partition tasks observing each record on every worker thread, that lock was the processor's
//! largest single cost. This one keeps a counter per bucket
//! and the sum as atomics, so an observation is two atomic additions and no lock. It encodes
//! exactly as `prometheus_client`'s does (same buckets, same exposition).
//!
//! The total count is the sum of the bucket counts, so `_count` and the `+Inf` bucket always
//! agree; `_sum` may be one observation ahead or behind while a scrape races an observation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A classic (bucketed) histogram; clones share the same series.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending; the last is `f64::INFINITY`, the `+Inf` bucket.
    bounds: Box<[f64]>,
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with these upper bounds (ascending), plus the `+Inf` bucket. Non-finite
    /// bounds are dropped, as `prometheus_client` does (`+Inf` is always there, once).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds
            .into_iter()
            .filter(|b| b.is_finite())
            .chain([f64::INFINITY])
            .collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram {
            inner: Arc::new(Inner {
                bounds,
                counts,
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        if let Some(c) = inner.counts.get(inner.bucket(v)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let _ = inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// An empty private tally with this histogram's buckets, for a task that observes many
    /// values and adds them here in one go ([`AtomicHistogram::absorb`]).
    pub fn local(&self) -> LocalHistogram {
        LocalHistogram {
            bounds: self.inner.clone(),
            counts: vec![0; self.inner.bounds.len()],
            sum: 0.0,
            observed: 0,
            last: 0,
        }
    }

    /// Adds what `local` observed and empties it.
    pub fn absorb(&self, local: &mut LocalHistogram) {
        if local.observed == 0 {
            return;
        }
        let inner = &*self.inner;
        for (c, n) in inner.counts.iter().zip(local.counts.iter_mut()) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        let sum = std::mem::take(&mut local.sum);
        let _ = inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + sum).to_bits())
            });
        local.observed = 0;
    }

    /// `(upper bound, count in that bucket alone)` pairs, the `+Inf` bucket last.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let inner = &*self.inner;
        inner
            .bounds
            .iter()
            .zip(inner.counts.iter())
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Inner {
    /// The first bucket whose bound is >= v; NaN goes to +Inf as in prometheus_client.
    fn bucket(&self, v: f64) -> usize {
        if v.is_nan() {
            self.bounds.len() - 1
        } else {
            self.bounds.partition_point(|b| *b < v)
        }
    }
}

/// Observations not yet added to their [`AtomicHistogram`]: plain integers, touched by one
/// task only.
#[derive(Debug)]
pub struct LocalHistogram {
    bounds: Arc<Inner>,
    counts: Vec<u64>,
    sum: f64,
    observed: u64,
    /// The bucket of the last observation, tried first by the next.
    last: usize,
}

impl LocalHistogram {
    pub fn observe(&mut self, v: f64) {
        let i = self.bucket(v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.observed += 1;
    }

    /// The bucket [`Inner::bucket`] gives, looked for first where the last observation went:
    /// a worker's successive records mostly land in the same bucket, and the search's chain
    /// of dependent loads was most of the processor's per-record cost of its two histograms
    /// (perf).
    fn bucket(&mut self, v: f64) -> usize {
        let bounds = &self.bounds.bounds;
        let i = self.last;
        // false for NaN, which the search puts in +Inf
        let fits = bounds.get(i).is_some_and(|hi| v <= *hi)
            && i.checked_sub(1).is_none_or(|below| bounds[below] < v);
        if !fits {
            self.last = self.bounds.bucket(v);
        }
        self.last
    }

    /// Observations since the last [`AtomicHistogram::absorb`].
    pub fn pending(&self) -> u64 {
        self.observed
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = f64::from_bits(self.inner.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn encodes_exactly_as_prometheus_client_does() {
        let values = [
            0.0,
            0.0004,
            0.0005,
            0.0006,
            0.003,
            0.25,
            7.0,
            1e9,
            f64::NAN,
            -1.0,
        ];
        let ours = AtomicHistogram::new(exponential_buckets(0.0005, 2.0, 16));
        let theirs = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        for v in values.into_iter().filter(|v| !v.is_nan()) {
            ours.observe(v);
            theirs.observe(v);
        }
        let a = exposition(|r| r.register("latency_seconds", "help", ours.clone()));
        let b = exposition(|r| r.register("latency_seconds", "help", theirs.clone()));
        assert_eq!(a, b);
        assert!(a.contains("latency_seconds_count 9\n"), "{a}");
        assert!(
            a.contains("latency_seconds_bucket{le=\"0.0005\"} 4\n"),
            "{a}"
        );

        // NaN counts in +Inf only, as theirs does
        ours.observe(f64::NAN);
        theirs.observe(f64::NAN);
        let buckets = ours.buckets();
        assert_eq!(buckets.last().unwrap().1, 2);
    }

    #[test]
    fn a_local_tally_adds_up_to_the_same_series() {
        let direct = AtomicHistogram::new([0.001, 0.01, 0.1]);
        let batched = AtomicHistogram::new([0.001, 0.01, 0.1]);
        let mut local = batched.local();
        for v in [0.0005, 0.002, 0.002, 0.05, 3.0] {
            direct.observe(v);
            local.observe(v);
        }
        assert_eq!(local.pending(), 5);
        assert_eq!(batched.buckets().iter().map(|b| b.1).sum::<u64>(), 0);
        batched.absorb(&mut local);
        assert_eq!(local.pending(), 0);
        batched.absorb(&mut local); // nothing twice
        let a = exposition(|r| r.register("d", "help", direct.clone()));
        let b = exposition(|r| r.register("d", "help", batched.clone()));
        assert_eq!(a, b);
    }

    #[test]
    fn a_local_tally_puts_each_value_where_the_search_does() {
        let h = AtomicHistogram::new([0.001, 0.01, 0.1]);
        let mut local = h.local();
        let values = [
            0.05,
            0.05,
            0.1,
            0.1000001,
            0.01,
            0.0099,
            0.001,
            0.0,
            -1.0,
            0.0005,
            7.0,
            7.0,
            f64::NAN,
            0.1,
            f64::INFINITY,
            f64::NAN,
            0.002,
            f64::NEG_INFINITY,
            0.002,
        ];
        for v in values {
            assert_eq!(local.bucket(v), h.inner.bucket(v), "{v}");
        }
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = AtomicHistogram::new([1.0, 2.0]);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        h.observe(1.5);
                    }
                });
            }
        });
        assert_eq!(
            h.buckets(),
            vec![(1.0, 0), (2.0, 40_000), (f64::INFINITY, 0)]
        );
        assert_eq!(
            f64::from_bits(h.inner.sum.load(Ordering::Relaxed)),
            60_000.0
        );
    }
}
