//! The dead-letter report served on `/report` and printed at exit.

use std::collections::{BTreeMap, VecDeque};

use order_runtime::dead_letter::{Category, Metadata};
use order_schema::{Cents, Order};
use serde::Serialize;

/// How many recent failures the report keeps.
pub const RECENT: usize = 20;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProductLoss {
    pub count: u64,
    pub value: Cents,
}

/// One failure as the report lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    pub key: String,
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub order: Option<Order>,
    /// The trace the dead letter belongs to (from its `traceparent` header), for Jaeger.
    pub trace_id: Option<String>,
    #[serde(flatten)]
    pub meta: Metadata,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// Dead letters read.
    pub total: u64,
    /// Sum of the prices of the failed orders that decode and carry a positive whole-cent
    /// price (garbage has no value to count).
    pub failed_value: Cents,
    /// Dead letters whose value could be decoded as an Order.
    pub decoded: u64,
    pub by_category: BTreeMap<Category, u64>,
    /// By `category/kind`, e.g. `validation/unknown_product`.
    pub by_kind: BTreeMap<String, u64>,
    pub by_product: BTreeMap<String, ProductLoss>,
    pub by_attempts: BTreeMap<u32, u64>,
    /// The latest failures, newest last.
    pub recent: VecDeque<Failure>,
    /// The redrives this analyzer ran: what, when, how many.
    pub redrives: Vec<crate::redrive::RedriveRun>,
    /// Per dead-letter partition, the offset after the last one counted. The analyzer commits
    /// no offsets, so a partition assigned to it again (after a rebalance, or the broker's
    /// restart) is read again from its beginning; what was counted is skipped, not counted twice.
    #[serde(skip)]
    counted: BTreeMap<i32, i64>,
}

impl Report {
    /// Counts the dead letter at `(partition, offset)`, unless it was counted already (read
    /// again after its partition came back to this analyzer): then nothing changes and the
    /// answer is false.
    pub fn add(
        &mut self,
        meta: &Metadata,
        key: &str,
        order: Option<&Order>,
        trace_id: Option<String>,
        (partition, offset): (i32, i64),
    ) -> bool {
        let next = self.counted.entry(partition).or_default();
        if offset < *next {
            return false;
        }
        *next = offset + 1;
        self.total += 1;
        *self.by_category.entry(meta.category).or_default() += 1;
        *self
            .by_kind
            .entry(format!("{}/{}", meta.category, meta.kind))
            .or_default() += 1;
        *self.by_attempts.entry(meta.attempts).or_default() += 1;
        if let Some(o) = order {
            self.decoded += 1;
            let value = order_schema::Cents::from_dollars(o.price).filter(|c| c.0 > 0);
            let loss = self.by_product.entry(o.product.clone()).or_default();
            loss.count += 1;
            if let Some(v) = value {
                loss.value += v;
                self.failed_value += v;
            }
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(Failure {
            key: key.to_owned(),
            dlq_partition: partition,
            dlq_offset: offset,
            order: order.cloned(),
            trace_id,
            meta: meta.clone(),
        });
        true
    }
}

/// The summary printed at exit.
pub fn summary_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "dlq-analyzer summary");
    let _ = writeln!(s, "  dead letters   {}", r.total);
    let _ = writeln!(
        s,
        "  failed value   {} ({} decodable orders)",
        r.failed_value, r.decoded
    );
    let _ = write!(s, "  by category");
    for (c, n) in &r.by_category {
        let _ = write!(s, "\n    {c:<18} {n}");
    }
    let _ = write!(s, "\n  by error kind");
    for (k, n) in &r.by_kind {
        let _ = write!(s, "\n    {k:<40} {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn meta(category: Category, kind: &str) -> Metadata {
        let mut m = Metadata::from_headers::<rdkafka::message::OwnedHeaders>(None);
        m.category = category;
        m.kind = kind.into();
        m
    }

    #[test]
    fn totals_by_category_and_value() {
        let mut r = Report::default();
        let bad = Order {
            order_id: "a".into(),
            product: "unicorn".into(),
            price: 12.5,
        };
        let neg = Order {
            order_id: "b".into(),
            product: "phone".into(),
            price: -3.0,
        };
        r.add(
            &meta(Category::Validation, "unknown_product"),
            "a",
            Some(&bad),
            None,
            (0, 0),
        );
        r.add(
            &meta(Category::Validation, "non_positive_price"),
            "b",
            Some(&neg),
            None,
            (0, 1),
        );
        r.add(
            &meta(Category::Deserialization, "bad_magic_byte"),
            "c",
            None,
            None,
            (0, 2),
        );
        r.add(&meta(Category::Unknown, "unknown"), "", None, None, (1, 0));
        assert_eq!(r.total, 4);
        assert_eq!(r.failed_value, Cents(1250));
        assert_eq!(r.by_category[&Category::Validation], 2);
        assert_eq!(r.by_kind["deserialization/bad_magic_byte"], 1);
        assert_eq!(r.by_product["phone"].count, 1);
        assert_eq!(r.recent.len(), 4);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["failed_value"], 12.5);
        assert_eq!(json["by_category"]["unknown"], 1);
    }

    #[test]
    fn a_partition_read_again_from_its_beginning_is_not_counted_twice() {
        let mut r = Report::default();
        let letter = meta(Category::Validation, "unknown_product");
        for offset in 0..3 {
            assert!(r.add(&letter, "a", None, None, (0, offset)));
        }
        assert!(r.add(&letter, "b", None, None, (1, 0)));
        // partition 0 comes back to this analyzer and is read from offset 0 again
        for offset in 0..3 {
            assert!(!r.add(&letter, "a", None, None, (0, offset)));
        }
        assert!(r.add(&letter, "c", None, None, (0, 3)));
        // a gap (offsets of aborted transactions, compacted records) is no reason to skip
        assert!(r.add(&letter, "d", None, None, (0, 7)));
        assert_eq!(r.total, 6);
        assert_eq!(r.by_kind["validation/unknown_product"], 6);
        assert_eq!(r.recent.len(), 6);
    }
}
