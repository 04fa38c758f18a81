//! order-generator's integration tests against the real native stack, in one binary: the binary as
//! operators run it, and its spans through a real OTLP receiver.

mod binary;
mod otlp;
