//! Tests across services, in one binary: against the real native stack, the processor with the
//! analyzer behind it (every record counted or dead-lettered, and reported) and one order's
//! trace across the three services in Jaeger; and docs/configuration.md against every
//! service's settings.

mod configuration;
mod pipeline;
mod tracing;
