//! Redrive: dead letters sent back to the orders topic once their cause is fixed
//! (`dlq-analyzer redrive ...` and `POST /redrive`).
//!
//! A request is a [`Filter`] plus [`Options`]. Its id (given, or derived from the filter) names
//! a consumer group of its own, `dlq-analyzer-redrive-<id>`, and a transactional producer with
//! the same id. The dead letters are read `read_committed` from where that group last committed;
//! each one that matches is produced to the orders topic, or to the parking topic once its
//! `redrive.count` has reached `REDRIVE_MAX_COUNT`, inside a transaction that also commits the
//! group's position. So a request that is stopped (or killed) and run again continues where its
//! last transaction ended, and no dead letter is resent twice by one request; a crashed run's
//! open transaction is fenced by the next run's producer and never seen by `read_committed`
//! consumers such as the processor.
//!
//! A redriven record keeps the dead letter's key and value, and its headers less the `dlq.*`
//! error metadata and the old trace context, plus `redrive.count` (one more than the dead
//! letter's). Its send is a span of its own, linked to the dead letter's trace.
//!
//! A run takes the dead letters the topic holds when it starts: one that arrives meanwhile (a
//! redriven record failing again) is left to the next run, so nothing goes round twice in one.
//!
//! Layout: [`request`] is the request and a run's record; [`filter`] checks a request before
//! anything starts and matches dead letters; [`headers`] is what a resent or parked record
//! carries; [`run`] is a run, step by step.

pub mod filter;
pub mod headers;
pub mod request;
pub mod run;

pub use self::filter::check;
pub use self::headers::REDRIVE_COUNT;
pub use self::request::{
    Filter, Matched, Options, RedriveError, RedriveRun, group_id, new_run, request_id, summary_text,
};
pub use self::run::run;
