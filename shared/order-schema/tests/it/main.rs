//! order-schema against a real schema registry, in one binary.

mod registry;
