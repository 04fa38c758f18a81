//! dlq-analyzer: reads the dead-letter topic and reports what failed and why.
//!
//! Layout:
//! - [`config`]: the environment (SPEC), each default written once.
//! - [`report`]: the running report: totals by category and error kind, the value of the
//!   orders that failed (decoded where the bytes allow), by product, the latest failures.
//! - [`app`]: [`Application`] consumes the topic into the report.
//! - [`web`]: `/report`, and `POST /redrive` / `GET /redrive`.
//! - [`redrive`]: dead letters sent back to the orders topic, filtered, rate-limited, at most
//!   once per request even across crashes (`dlq-analyzer redrive ...`, `POST /redrive`).
//! - [`waterfall`]: `dlq-analyzer trace <id>` (`make trace`), one trace from Jaeger's query API
//!   drawn in the terminal: the journey of a dead letter across the three services.
//! - [`cli`]: the command line: the service, `healthcheck`, `redrive`, `trace`.

pub mod app;
pub mod cli;
pub mod config;
pub mod redrive;
pub mod report;
pub mod waterfall;
pub mod web;

pub use app::Application;
pub use cli::Cli;
pub use config::{Config, SERVICE_NAME};
pub use report::Report;
