//! The `Order` record and its Avro codec, shared by every service.
//!
//! Layout:
//! - [`order`]: [`Order`], the Rust type of `schemas/order.avsc` (embedded as
//!   [`ORDER_SCHEMA`]).
//! - [`rules`]: the business rules ([`Order::validate`]) and the product [`Catalogue`].
//! - [`money`]: dollars on the wire, integer cents everywhere we add them up.
//! - [`codec`]: [`OrderCodec`], the Confluent wire format (magic byte 0, 4-byte schema id,
//!   Avro body) through `schema_registry_converter`, subject `<topic>-value`, schemas cached per
//!   id; [`OrderWriter`], the producer's hot path once the schema is registered (the same
//!   bytes as [`OrderCodec::encode`], written by apache-avro's schema-aware serializer straight
//!   into a reused buffer); [`OrderReader`], the consumer's hot path for records whose writer
//!   schema *is* order.avsc. Errors say whether they are temporary or permanent.
//! - [`access`]: where the registry is and how to authenticate to it.

pub mod access;
pub mod codec;
pub mod money;
pub mod order;
pub mod rules;

pub use access::{AccessError, REDACTED, RegistryAccess};
pub use codec::{
    CodecError, MAX_AVRO_ALLOCATION_BYTES, MalformedKind, NeedsRegistry, OrderCodec, OrderReader,
    OrderWriter,
};
pub use money::Cents;
pub use order::{ORDER_RECORD_NAME, ORDER_SCHEMA, Order};
pub use rules::{Catalogue, MAX_PRICE_CENTS, PRODUCTS, ValidationError};
