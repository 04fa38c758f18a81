//! dlq-analyzer's integration tests against the real native stack, in one binary: the binary as
//! operators run it, redrives, and the requests refused before they start.

mod binary;
mod redrive;
mod refusals;
