//! Prometheus metrics, named after the OpenTelemetry messaging conventions where one exists.

use order_runtime::dead_letter::Category;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// The processor's metrics; clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Records taken from the orders topic, by outcome (`processed`, `dead_lettered`).
    pub consumed: Family<OutcomeLabel, Counter>,
    /// Time from receiving a record to its final outcome, retries included.
    pub process_duration: Histogram,
    /// Retries of temporary failures.
    pub retries: Counter,
    /// Dead letters written, by category.
    pub dead_letters: Family<CategoryLabel, Counter>,
    /// Revenue of processed orders, in cents.
    pub revenue_cents: Counter,
    /// Records behind the partition's end, from librdkafka's statistics (every 5 s).
    pub consumer_lag: Family<PartitionLabel, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            consumed: Family::default(),
            process_duration: Histogram::new(exponential_buckets(0.000_05, 4.0, 12)),
            retries: Counter::default(),
            dead_letters: Family::default(),
            revenue_cents: Counter::default(),
            consumer_lag: Family::default(),
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
            "messaging_kafka_consumer_lag",
            "Records between the committed position and the end of each assigned partition",
            m.consumer_lag.clone(),
        );
        for c in Category::ALL {
            let _ = m.dead_letters.get_or_create(&CategoryLabel {
                category: c.as_str(),
            });
        }
        m
    }
}
