//! order-generator: publishes random orders (Avro, Confluent wire format) at a chosen rate.
//!
//! Layout:
//! - [`config`]: the environment (SPEC), each default written once.
//! - [`orders`]: random valid orders, invalid ones on purpose for the dead-letter path, and the
//!   open-loop pacer.
//! - [`delivery`]: delivery reports counted in the producer's callback, never awaited one by
//!   one, and the `/stats` document.
//! - [`app`]: [`Application`] registers the schema, binds HTTP, then sends until `ORDER_COUNT`
//!   or shutdown, and flushes the producer before the summary.
//! - [`cli`]: the command line: the service, `healthcheck`.

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod orders;

pub use app::{Application, summary_text};
pub use cli::Cli;
pub use config::{Config, SERVICE_NAME};
pub use delivery::Stats;
