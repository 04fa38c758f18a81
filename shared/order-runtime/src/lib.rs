//! What every order service needs, written once.
//!
//! Layout:
//! - [`service`]: `main` of every service (healthcheck subcommand, config, telemetry, run,
//!   summary), written once.
//! - [`backoff`]: the exponential schedule of every wait-and-try-again.
//! - [`config`]: the environment variables all services share (SPEC "Environment"), read with
//!   envy from any iterator of pairs, and the `RDKAFKA_*` pass-through to librdkafka.
//! - [`kafka`]: producer and consumer configurations with safe defaults, the
//!   broker check behind `/readyz`, and which producer errors are worth retrying.
//! - [`dead_letter`]: the dead-letter header contract (names, categories) and how to build
//!   and read those headers.
//! - [`trace`]: W3C trace context in Kafka headers.
//! - [`telemetry`]: logging and OTLP trace export from the standard `OTEL_*` variables.
//! - [`histogram`]: a lock-free Prometheus histogram for per-record observations.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` and the server loop.
//! - [`shutdown`]: SIGTERM and Ctrl-C as a cancellation token.

pub mod backoff;
pub mod config;
pub mod dead_letter;
pub mod histogram;
pub mod http;
pub mod kafka;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace;

pub use config::{CommonConfig, ConfigError, LogFormat};
