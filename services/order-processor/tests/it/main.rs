//! order-processor's integration tests against the real native stack, in one binary (one link of
//! the crate): the binary as operators run it, exactly-once under crashes, scaling and a broker
//! restart, and the operations (pause, resume, reset, the catalogue).

mod binary;
mod broker_restart;
mod exactly_once;
mod operations;
mod ordering;
mod workload;
