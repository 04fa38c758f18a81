//! What the generator counts: orders handed over, acknowledged and failed, counted in
//! librdkafka's delivery callback (never awaited one by one), and the `/stats` document made
//! of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use order_runtime::histogram::AtomicHistogram;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use rdkafka::ClientContext;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use serde::Serialize;
use tracing::warn;

/// Counters the delivery callback and `/stats` share.
#[derive(Debug, Default)]
pub struct Counters {
    /// Handed to the producer.
    pub sent: AtomicU64,
    /// Acknowledged by the broker.
    pub produced: AtomicU64,
    /// Failed for good (after librdkafka's own retries), or could not be encoded or queued.
    pub failed: AtomicU64,
    /// Sent on purpose with a broken business rule.
    pub invalid: AtomicU64,
}

/// The `/stats` document and the exit summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub sent: u64,
    pub produced: u64,
    pub failed: u64,
    pub invalid: u64,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
}

impl Counters {
    /// The `/stats` document, `started` being when sending began.
    pub fn stats(&self, started: Instant) -> Stats {
        let elapsed = started.elapsed().as_secs_f64();
        let produced = self.produced.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        Stats {
            sent: self.sent.load(Ordering::Relaxed),
            produced,
            failed: self.failed.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
            elapsed_s: (elapsed * 1000.0).round() / 1000.0,
            rate_per_s: if elapsed > 0.0 {
                (produced as f64 / elapsed).round()
            } else {
                0.0
            },
        }
    }
}

/// Delivery reports, counted in librdkafka's callback thread.
pub struct DeliveryCounter {
    counters: Arc<Counters>,
    started: Instant,
    latency: AtomicHistogram,
    delivered: Counter,
    errors: Counter,
}

impl DeliveryCounter {
    /// The producer's context, its series registered in `registry`.
    pub fn new(counters: Arc<Counters>, registry: &mut Registry) -> Self {
        let latency = AtomicHistogram::new(exponential_buckets(0.0005, 2.0, 16));
        let delivered = Counter::default();
        let errors = Counter::default();
        registry.register(
            "messaging_client_sent_messages",
            "Orders acknowledged by the broker",
            delivered.clone(),
        );
        registry.register(
            "messaging_client_send_errors",
            "Orders the broker never acknowledged",
            errors.clone(),
        );
        registry.register(
            "messaging_client_operation_duration_seconds",
            "Time from send to delivery report",
            latency.clone(),
        );
        DeliveryCounter {
            counters,
            started: Instant::now(),
            latency,
            delivered,
            errors,
        }
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    /// Microseconds since start-up when the record was handed over.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at_us: usize) {
        let now_us = self.started.elapsed().as_micros();
        #[allow(clippy::cast_precision_loss)]
        let latency_s = now_us.saturating_sub(sent_at_us as u128) as f64 / 1e6;
        self.latency.observe(latency_s);
        match result {
            Ok(_) => {
                self.counters.produced.fetch_add(1, Ordering::Relaxed);
                self.delivered.inc();
            }
            Err((e, _)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.errors.inc();
                warn!(error = %e, "order not delivered");
            }
        }
    }
}
