//! What every order service needs, written once.
//!
//! Layout:
//! - [`service`]: what every service's start and command line share: the first steps of a
//!   start and their error, running the service as the process (config, telemetry, run,
//!   summary), the `healthcheck` subcommand, the frame of a one-off subcommand.
//! - [`access`]: the start-up check of the registry's and the cluster's refusal.
//! - [`backoff`]: the exponential schedule of every wait-and-try-again.
//! - [`config`]: the environment variables all services share (SPEC "Environment"), read with
//!   envy from any iterator of pairs, and the `RDKAFKA_*` pass-through to librdkafka.
//! - [`kafka`]: producer and consumer configurations with safe defaults, the
//!   broker check behind `/readyz`, and which producer errors are worth retrying.
//! - [`dead_letter`]: the dead-letter header contract (names, categories) and how to build
//!   and read those headers.
//! - [`trace`]: W3C trace context in Kafka headers.
//! - [`telemetry`]: logging and OTLP trace export from the standard `OTEL_*` variables.
//! - [`export_queue`]: the count of spans waiting for export, so that none is made without
//!   room.
//! - [`histogram`]: a lock-free Prometheus histogram for per-record observations.
//! - [`operations`]: the credential and cross-site guard in front of every state-changing
//!   endpoint, and how those endpoints read a request.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, the server loop, and an HTTP client builder
//!   for the services' own calls.
//! - [`shutdown`]: SIGTERM and Ctrl-C as a cancellation token.
//! - [`sync`]: a mutex lock that rides through poisoning.

pub mod access;
pub mod backoff;
pub mod config;
pub mod dead_letter;
pub mod export_queue;
pub mod histogram;
pub mod http;
pub mod kafka;
pub mod operations;
pub mod service;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
pub mod trace;

pub use config::{CommonConfig, ConfigError, LogFormat};
