//! order-processor: consumes orders, keeps exact running aggregates, retries temporary
//! failures with exponential backoff and dead-letters what cannot be processed.
//!
//! The crate is in wings that point one way: a record's fate knows nothing of partitions or
//! Kafka transactions; durability knows nothing of workers; the partition wing drives both;
//! the web face and the commands sit on top; [`app`] wires them. Where to look:
//! - [`record`]: a record's fate. [`record::decision`] is the pure rule (what is known about a
//!   record in, a verdict out: processed, retry after a delay, or dead letter with its
//!   category); `record` itself is the shell that decodes (waiting out the registry),
//!   validates, runs the attempts and their backoff waits, and prepares a dead letter.
//! - [`durability`]: how an outcome becomes durable, the one interface both guarantees
//!   implement, reached through a narrow handle on the consumer's offsets
//!   ([`durability::offsets`]). [`durability::at_least_once`]: offsets stored after each
//!   outcome, committed on revocation and shutdown. [`durability::exactly_once`]: restore,
//!   settle, the committer and the commit on revocation and shutdown, with its pure
//!   [`durability::exactly_once::ledger`] apart from the
//!   [`durability::exactly_once::transaction`].
//! - [`partition`]: a partition's life on this replica: the rebalance protocol (queues split
//!   before an assignment takes effect, workers stopped and committed before a revocation
//!   completes), the worker (batches, outcome, settle, metrics), the pause switch.
//! - [`aggregate`]: per-partition count, revenue, min, max in integer cents, mergeable.
//! - [`position`]: where a partition stands when records finish out of offset order: the
//!   position made durable (the lowest offset not final, and those not final above it) and
//!   the window a worker keeps to know it.
//! - [`config`]: the environment (SPEC), each default written once.
//! - [`web`]: `/stats`, `/stats/global`, the status page on `/`, `POST /pause` and `/resume`.
//! - [`cli`]: the command line: the service, `create-topics` (the chart's topics Job),
//!   `reset` (a safe replay), `healthcheck`.
//! - [`app`]: [`Application`] builds all of it (binding the HTTP port first, port 0 in tests),
//!   picks the guarantee, once, and runs it until a shutdown token is cancelled, exactly as
//!   `main` does.

pub mod aggregate;
pub mod app;
pub mod cli;
pub mod config;
pub mod durability;
pub mod partition;
pub mod position;
pub mod record;
pub mod web;

pub use app::{Application, summary_text};
pub use cli::Cli;
pub use config::{Config, Guarantee, SERVICE_NAME};
