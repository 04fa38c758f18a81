//! kafka-batch against a real broker, in one binary.

mod queue;
