//! Running aggregates, kept per partition so that they can be merged (across partitions now,
//! across replicas with the exactly-once work), in integer cents so that sums never drift.

use std::collections::BTreeMap;

use order_runtime::dead_letter::Category;
use order_schema::Cents;
use serde::Serialize;

/// Count, revenue, min and max of the orders one partition has processed, overall and per
/// product.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Aggregate {
    pub count: u64,
    pub revenue: Cents,
    pub min: Option<Cents>,
    pub max: Option<Cents>,
}

impl Aggregate {
    pub fn add(&mut self, price: Cents) {
        self.count += 1;
        self.revenue += price;
        self.min = Some(self.min.map_or(price, |m| m.min(price)));
        self.max = Some(self.max.map_or(price, |m| m.max(price)));
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.revenue += other.revenue;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// revenue / count in dollars, rounded to the cent (`None` before the first order).
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| {
            #[allow(clippy::cast_precision_loss)]
            let avg_cents = (self.revenue.0 as f64 / self.count as f64).round();
            avg_cents / 100.0
        })
    }
}

/// One partition's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionState {
    pub total: Aggregate,
    pub by_product: BTreeMap<String, Aggregate>,
}

impl PartitionState {
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

    pub fn merge(&mut self, other: &PartitionState) {
        self.total.merge(&other.total);
        for (product, agg) in &other.by_product {
            self.by_product
                .entry(product.clone())
                .or_default()
                .merge(agg);
        }
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
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProductReport {
    pub processed: u64,
    pub revenue: Cents,
    pub average: Option<f64>,
}

impl StatsReport {
    pub fn new(
        state: &PartitionState,
        dead_lettered_by_category: BTreeMap<Category, u64>,
        retries: u64,
        partitions: Vec<i32>,
    ) -> Self {
        StatsReport {
            processed: state.total.count,
            revenue: state.total.revenue,
            average: state.total.average(),
            min: state.total.min,
            max: state.total.max,
            dead_lettered: dead_lettered_by_category.values().sum(),
            dead_lettered_by_category,
            retries,
            by_product: state
                .by_product
                .iter()
                .map(|(p, a)| {
                    (
                        p.clone(),
                        ProductReport {
                            processed: a.count,
                            revenue: a.revenue,
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
        let mut merged = PartitionState::default();
        merged.merge(&parts[0]);
        merged.merge(&parts[1]);
        assert_eq!(merged, whole);
        assert_eq!(whole.total.count, 5);
        assert_eq!(whole.total.revenue, Cents(106_331));
        assert_eq!(whole.total.min, Some(Cents(5)));
        assert_eq!(whole.total.max, Some(Cents(100_000)));
        assert_eq!(whole.total.average(), Some(212.66));
    }

    #[test]
    fn report_serializes_money_as_dollars() {
        let mut s = PartitionState::default();
        s.add("laptop", Cents(123_456));
        let r = StatsReport::new(&s, BTreeMap::from([(Category::Validation, 2)]), 3, vec![0]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["revenue"], 1234.56);
        assert_eq!(json["average"], 1234.56);
        assert_eq!(json["dead_lettered"], 2);
        assert_eq!(json["dead_lettered_by_category"]["validation"], 2);
        assert_eq!(json["by_product"]["laptop"]["processed"], 1);
    }
}
