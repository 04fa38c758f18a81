//! dlq-analyzer's integration tests against the real native stack, in one binary: the binary as
//! operators run it, and redrives.

mod binary;
mod redrive;
