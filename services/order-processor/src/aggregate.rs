//! Running aggregates, kept per partition so that they merge (across partitions, and across
//! replicas through the changelog), in integer cents so that sums never drift.

use std::collections::BTreeMap;

use order_runtime::dead_letter::Category;
use order_schema::Cents;
use serde::{Deserialize, Serialize};

use crate::position::Position;

/// Count, revenue, min and max of a set of orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    pub count: u64,
    pub revenue_cents: i64,
    pub min_cents: Option<i64>,
    pub max_cents: Option<i64>,
}

impl Aggregate {
    pub fn add(&mut self, price: Cents) {
        self.count += 1;
        self.revenue_cents += price.0;
        self.min_cents = Some(self.min_cents.map_or(price.0, |m| m.min(price.0)));
        self.max_cents = Some(self.max_cents.map_or(price.0, |m| m.max(price.0)));
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.revenue_cents += other.revenue_cents;
        self.min_cents = match (self.min_cents, other.min_cents) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max_cents = match (self.max_cents, other.max_cents) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// revenue / count in dollars, rounded to the cent (`None` before the first order).
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| {
            #[allow(clippy::cast_precision_loss)]
            let avg_cents = (self.revenue_cents as f64 / self.count as f64).round();
            avg_cents / 100.0
        })
    }
}

/// Everything known about one partition of the orders topic: what its orders add up to, what
/// was dead-lettered and retried, and where the partition stands (its [`Position`]: the lowest
/// offset not final, and the offsets not final above it, every other one being in the figures).
/// In exactly-once mode this is what the changelog topic stores, keyed by partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub total: Aggregate,
    pub by_product: BTreeMap<String, Aggregate>,
    pub dead_lettered: BTreeMap<Category, u64>,
    pub retries: u64,
    /// Offset of the next record of the partition (the offset committed with this state): the
    /// lowest one not final.
    pub next_offset: i64,
    /// One past the newest offset taken when records above `next_offset` were final already;
    /// 0 when none were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub taken_to: i64,
    /// The offsets in `[next_offset, taken_to)` that were not final; every other one below
    /// `taken_to` is counted above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl PartitionState {
    /// Where the partition stands with this state.
    pub fn position(&self) -> Position {
        Position {
            next: self.next_offset,
            end: self.taken_to.max(self.next_offset),
            incomplete: self.incomplete.clone(),
        }
    }

    /// This state is where `p` says.
    pub fn set_position(&mut self, p: &Position) {
        self.next_offset = p.next;
        self.taken_to = if p.end > p.next { p.end } else { 0 };
        self.incomplete.clone_from(&p.incomplete);
    }

    pub fn add(&mut self, product: &str, price: Cents) {
        self.total.add(price);
        match self.by_product.get_mut(product) {
            Some(a) => a.add(price),
            None => {
                let mut a = Aggregate::default();
                a.add(price);
                self.by_product.insert(product.to_owned(), a);
            }
        }
    }

    pub fn dead_letter(&mut self, category: Category) {
        *self.dead_lettered.entry(category).or_default() += 1;
    }

    /// Adds `other`'s figures (not its offset). A product `other` counts no order of adds
    /// nothing, and a product already here is not allocated again.
    pub fn merge(&mut self, other: &PartitionState) {
        self.total.merge(&other.total);
        for (product, agg) in other.by_product.iter().filter(|(_, a)| a.count > 0) {
            match self.by_product.get_mut(product) {
                Some(a) => a.merge(agg),
                None => {
                    self.by_product.insert(product.clone(), agg.clone());
                }
            }
        }
        for (c, n) in &other.dead_lettered {
            *self.dead_lettered.entry(*c).or_default() += n;
        }
        self.retries += other.retries;
    }
}

/// The `/stats` document (SPEC: `processed`, `revenue`, `average`, `min`, `max`,
/// `dead_lettered`, `retries`; money in dollars).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsReport {
    pub processed: u64,
    pub revenue: Cents,
    pub average: Option<f64>,
    pub min: Option<Cents>,
    pub max: Option<Cents>,
    pub dead_lettered: u64,
    pub dead_lettered_by_category: BTreeMap<Category, u64>,
    pub retries: u64,
    pub by_product: BTreeMap<String, ProductReport>,
    /// The partitions the figures cover.
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProductReport {
    pub processed: u64,
    pub revenue: Cents,
    pub average: Option<f64>,
}

impl StatsReport {
    /// The report over `states`, one per partition.
    pub fn new<'a>(states: impl IntoIterator<Item = (i32, &'a PartitionState)>) -> Self {
        let mut merged = PartitionState::default();
        let mut partitions = Vec::new();
        for (p, s) in states {
            merged.merge(s);
            partitions.push(p);
        }
        StatsReport {
            processed: merged.total.count,
            revenue: Cents(merged.total.revenue_cents),
            average: merged.total.average(),
            min: merged.total.min_cents.map(Cents),
            max: merged.total.max_cents.map(Cents),
            dead_lettered: merged.dead_lettered.values().sum(),
            dead_lettered_by_category: merged.dead_lettered,
            retries: merged.retries,
            by_product: merged
                .by_product
                .iter()
                .map(|(p, a)| {
                    (
                        p.clone(),
                        ProductReport {
                            processed: a.count,
                            revenue: Cents(a.revenue_cents),
                            average: a.average(),
                        },
                    )
                })
                .collect(),
            partitions,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn merged_partitions_equal_one_stream() {
        let prices = [1999, 5, 100_000, 4250, 77];
        let mut whole = PartitionState::default();
        let mut parts = [PartitionState::default(), PartitionState::default()];
        for (i, p) in prices.iter().enumerate() {
            whole.add("phone", Cents(*p));
            parts[i % 2].add("phone", Cents(*p));
        }
        whole.dead_letter(Category::Validation);
        parts[1].dead_letter(Category::Validation);
        let mut merged = PartitionState::default();
        merged.merge(&parts[0]);
        merged.merge(&parts[1]);
        assert_eq!(merged, whole);
        assert_eq!(whole.total.count, 5);
        assert_eq!(whole.total.revenue_cents, 106_331);
        assert_eq!(whole.total.min_cents, Some(5));
        assert_eq!(whole.total.max_cents, Some(100_000));
        assert_eq!(whole.total.average(), Some(212.66));
    }

    #[test]
    fn state_survives_the_changelog_encoding() {
        let mut s = PartitionState::default();
        s.add("laptop", Cents(123_456));
        s.dead_letter(Category::RetriesExhausted);
        s.retries = 7;
        s.next_offset = 42;
        let bytes = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<PartitionState>(&bytes).unwrap(), s);
    }

    #[test]
    fn report_serializes_money_as_dollars() {
        let mut s = PartitionState::default();
        s.add("laptop", Cents(123_456));
        s.dead_letter(Category::Validation);
        s.dead_letter(Category::Validation);
        s.retries = 3;
        let r = StatsReport::new([(0, &s)]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["revenue"], 1234.56);
        assert_eq!(json["average"], 1234.56);
        assert_eq!(json["dead_lettered"], 2);
        assert_eq!(json["dead_lettered_by_category"]["validation"], 2);
        assert_eq!(json["retries"], 3);
        assert_eq!(json["by_product"]["laptop"]["processed"], 1);
    }
}
