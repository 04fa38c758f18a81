//! Tests across services, in one binary: against the real native stack, the processor with the
//! analyzer behind it (every record counted or dead-lettered, and reported) and one order's
//! trace across the three services in Jaeger.

mod pipeline;
mod tracing;
