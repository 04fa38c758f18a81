//! The `Order` record: the Rust type of `schemas/order.avsc`, which is compiled in.

use serde::{Deserialize, Serialize};

/// `schemas/order.avsc`, compiled in so that a binary always registers the schema it was
/// built against.
pub const ORDER_SCHEMA: &str = include_str!("../../../schemas/order.avsc");

/// Full name of the Avro record, as registered.
pub const ORDER_RECORD_NAME: &str = "io.github.orderpipeline.orders.v1.Order";

/// An order as it travels on the orders topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// UUID in text form; also the record key.
    pub order_id: String,
    /// One of [`PRODUCTS`] for a valid order.
    pub product: String,
    /// US dollars; a valid order has a positive whole number of cents.
    pub price: f64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_field_is_documented() {
        let json: serde_json::Value = serde_json::from_str(ORDER_SCHEMA).unwrap();
        for field in json["fields"].as_array().unwrap() {
            assert!(
                field["doc"].as_str().is_some_and(|d| !d.is_empty()),
                "field {} has no doc",
                field["name"]
            );
        }
    }
}
