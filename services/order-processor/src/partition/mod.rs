//! A partition's life on this replica: the rebalance protocol that starts and stops its
//! worker ([`rebalance`]), the worker that takes its records to their outcomes ([`worker`]),
//! the pause switch the workers watch ([`pause`]), and the metrics they keep ([`metrics`]).

pub mod metrics;
pub mod pause;
pub mod rebalance;
pub mod worker;
