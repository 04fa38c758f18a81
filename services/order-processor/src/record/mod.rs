//! A record's fate. [`decision`] is the pure rule (what is known about a record in, a verdict
//! out); this module is the shell around it: it takes one record a [`Step`] at a time to its
//! [`Outcome`] (decode and validate, then one attempt; a temporary failure comes back as a
//! [`Retry`] due later, which the partition's worker holds while its other keys go on), with
//! spans and logs, and prepares a dead letter's headers and span. [`failures`] simulates
//! temporary failures. Nothing here waits out a backoff and nothing is durable yet: the worker
//! keeps the time, and the chosen guarantee makes the outcome so.

pub mod decision;
pub mod failures;

use std::sync::Arc;
use std::time::Duration;

use order_runtime::backoff::Backoff;
use order_runtime::dead_letter::{self, Category};
use order_runtime::trace;
use order_schema::{Catalogue, Cents, CodecError, Order, OrderCodec};
use prometheus_client::metrics::counter::Counter;
use rdkafka::Timestamp;
use rdkafka::message::{Message, OwnedHeaders};
use tokio_util::sync::CancellationToken;
use tracing::{Span, field, info, info_span, warn};

use self::decision::{Known, RetryPolicy, Verdict, decide};
use self::failures::FailureInjector;
use crate::config::SERVICE_NAME;

/// A record's final outcome, to be made durable.
#[derive(Debug)]
pub enum Outcome {
    Processed {
        order: Order,
        price: Cents,
        retries: u32,
    },
    DeadLetter(DeadLetter),
}

impl Outcome {
    /// Retries spent on the record.
    pub fn retries(&self) -> u32 {
        match self {
            Outcome::Processed { retries, .. } => *retries,
            Outcome::DeadLetter(d) => d.retries,
        }
    }
}

/// A dead letter ready to send: the original key and value go with these headers, under
/// this span.
#[derive(Debug)]
pub struct DeadLetter {
    pub category: Category,
    pub retries: u32,
    /// The original headers, the `dlq.*` error metadata and the send span's trace context.
    pub headers: OwnedHeaders,
    /// The PRODUCER span of the dead letter's send.
    pub span: Span,
}

/// Where a record stands after a step.
#[derive(Debug)]
pub enum Step {
    /// Its final outcome, to be made durable.
    Final(Outcome),
    /// A temporary failure: the next attempt is due at [`Retry::at`].
    Retry(Retry),
}

/// A valid order between two attempts. Its backoff span is open until the next attempt.
#[derive(Debug)]
pub struct Retry {
    order: Order,
    price: Cents,
    /// The attempt to make at `at` (1-based).
    attempt: u32,
    /// When it is due.
    pub at: tokio::time::Instant,
    /// The wait, a span of its own (ended when the attempt runs).
    backoff: Span,
}

impl Retry {
    /// The attempt to make when due.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// What evaluating records needs; shared by the partition workers.
#[derive(Debug)]
pub struct Records {
    pub codec: OrderCodec,
    pub failures: Arc<dyn FailureInjector>,
    pub policy: RetryPolicy,
    /// `PRODUCT_CATALOGUE`.
    pub catalogue: Catalogue,
    pub dlq_topic: String,
    /// `processor_retries_total`.
    pub retries: Counter,
}

impl Records {
    /// A record's first step: decode, validate, the first attempt. `None` when `cancel` fired
    /// while the registry could not be asked (the record will be seen again). No side effects
    /// but metrics and logs.
    pub async fn start<M: Message>(&self, msg: &M, cancel: &CancellationToken) -> Option<Step> {
        let decoded = self.decode(msg, cancel).await?;
        Some(self.judge(msg, decoded))
    }

    /// The same first step when it needs nothing from the registry (nearly every record: see
    /// [`OrderCodec::decode_now`]), without waiting; `None` when it does, and then
    /// [`Records::start`] is the way.
    pub fn start_now<M: Message>(&self, msg: &M) -> Option<Step> {
        let decoded = self.codec.decode_now(msg.payload()).ok()?;
        Some(self.judge(msg, decoded))
    }

    /// What follows from a record's decoding: validation, then the first attempt.
    fn judge<M: Message>(&self, msg: &M, decoded: Result<Order, CodecError>) -> Step {
        let (verdict, message) = match decoded {
            Err(e) => {
                let kind = match &e {
                    CodecError::Malformed { kind, .. } => *kind,
                    // `decode` waits out a registry that cannot be asked; a refusal of a
                    // read is the registry saying the bytes are not readable
                    CodecError::RegistryUnavailable(_) | CodecError::RegistryRejected(_) => {
                        order_schema::MalformedKind::InvalidAvro
                    }
                };
                (decide(Known::Malformed(kind), &self.policy), e.to_string())
            }
            Ok(mut order) => {
                trace::set_attribute("order.id", &order.order_id);
                match order.validate_in(&self.catalogue) {
                    Err(e) => (decide(Known::Invalid(&e), &self.policy), e.to_string()),
                    Ok(price) => return self.attempt(msg, order, price, 1),
                }
            }
        };
        self.conclude(msg, verdict, &message)
    }

    /// A waiting record's next attempt, now that it is due.
    pub fn resume<M: Message>(&self, msg: &M, retry: Retry) -> Step {
        let Retry {
            order,
            price,
            attempt,
            backoff,
            ..
        } = retry;
        drop(backoff);
        self.attempt(msg, order, price, attempt)
    }

    /// Processing attempt `attempt` of a valid order, and what follows from it.
    fn attempt<M: Message>(&self, msg: &M, order: Order, price: Cents, attempt: u32) -> Step {
        let failed = self.failures.fails(&order, msg.partition(), attempt);
        let traced = trace::recording();
        // an attempt is instant (the failure is simulated), so its span is made after it; only
        // a record that needed more than one gets attempt spans: for the others the processing
        // span says it all, and a second span a record nearly halved the traced rate
        if traced && (failed || attempt > 1) {
            let span = info_span!(
                "attempt",
                otel.name = format!("process attempt {attempt}"),
                otel.kind = "internal",
                messaging.kafka.attempt = attempt,
                error.type = field::Empty,
                otel.status_code = field::Empty,
            );
            if failed {
                span.record("error.type", "transient_failure");
                span.record("otel.status_code", "ERROR");
            }
        }
        match decide(Known::Attempted { attempt, failed }, &self.policy) {
            Verdict::Processed { retries } => Step::Final(Outcome::Processed {
                order,
                price,
                retries,
            }),
            Verdict::Retry {
                attempt: next,
                after,
            } => {
                let wait_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                self.retries.inc();
                info!(
                    order_id = %order.order_id, attempt, retry_in_ms = wait_ms,
                    trace_id = trace::current_trace_id().unwrap_or_default(),
                    "temporary failure, will retry"
                );
                let backoff = if traced {
                    info_span!("backoff", otel.kind = "internal", backoff.ms = wait_ms)
                } else {
                    Span::none()
                };
                Step::Retry(Retry {
                    order,
                    price,
                    attempt: next,
                    at: tokio::time::Instant::now() + after,
                    backoff,
                })
            }
            verdict @ Verdict::DeadLetter { attempts, .. } => {
                let message = format!("temporary failure persisted through {attempts} attempts");
                self.conclude(msg, verdict, &message)
            }
        }
    }

    /// A final verdict that is not "processed": the dead letter.
    fn conclude<M: Message>(&self, msg: &M, verdict: Verdict, message: &str) -> Step {
        match verdict {
            Verdict::DeadLetter {
                category,
                kind,
                attempts,
            } => Step::Final(self.dead_letter(msg, category, kind, attempts, message)),
            // `decide` processes or retries only a valid order, which `attempt` handles: a
            // malformed or invalid record always gets a dead letter. Should that ever change,
            // the record is dead-lettered rather than lost.
            other => {
                tracing::error!(
                    ?other,
                    "an unexpected verdict for an invalid record; dead-lettering it"
                );
                Step::Final(self.dead_letter(
                    msg,
                    Category::Unknown,
                    "unexpected_verdict",
                    1,
                    message,
                ))
            }
        }
    }

    /// The Order in the record, or why it is not one. A registry that cannot be asked is
    /// waited out, never a reason to dead-letter: `None` when `cancel` fired meanwhile.
    async fn decode<M: Message>(
        &self,
        msg: &M,
        cancel: &CancellationToken,
    ) -> Option<Result<Order, CodecError>> {
        let mut wait = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        loop {
            match self.codec.decode(msg.payload()).await {
                Err(e) if e.is_temporary() => {
                    warn!(error = %e, retry_in_ms = wait.upcoming_ms(), "schema registry unavailable; waiting");
                    if !wait.wait(cancel).await {
                        return None;
                    }
                }
                decoded => return Some(decoded),
            }
        }
    }

    /// Prepares a dead letter: logs it, marks the processing span as failed, opens the send
    /// span and writes the headers.
    fn dead_letter<M: Message>(
        &self,
        msg: &M,
        category: Category,
        kind: &str,
        attempts: u32,
        message: &str,
    ) -> Outcome {
        trace::set_error(category.as_str());
        warn!(
            category = %category, kind, error = message, attempts,
            partition = msg.partition(), offset = msg.offset(),
            trace_id = trace::current_trace_id()
                .or_else(|| trace::headers_trace_id(msg.headers()))
                .unwrap_or_default(),
            "dead-lettering record"
        );
        let key = msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("");
        let span = if trace::recording() {
            trace::producer_span(&self.dlq_topic, key)
        } else {
            Span::none()
        };
        span.record("error.type", category.as_str());
        let metadata = dead_letter::Metadata {
            category,
            kind: kind.to_owned(),
            message: message.to_owned(),
            original_topic: msg.topic().to_owned(),
            original_partition: msg.partition(),
            original_offset: msg.offset(),
            original_timestamp: match msg.timestamp() {
                Timestamp::NotAvailable => None,
                Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
            },
            attempts,
            failed_service: SERVICE_NAME.to_owned(),
            failed_at: dead_letter::now_rfc3339(),
        };
        let headers = trace::inject_or_carry(
            &span,
            dead_letter::headers(msg.headers(), &metadata),
            msg.headers(),
        );
        Outcome::DeadLetter(DeadLetter {
            category,
            retries: attempts.saturating_sub(1),
            headers,
            span,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use rdkafka::message::OwnedMessage;
    use tokio::time::Instant;

    use super::*;

    /// Fails the first `failures` attempts and notes when each attempt ran.
    #[derive(Debug)]
    struct FailFirst {
        failures: u32,
        started: Instant,
        at: Mutex<Vec<Duration>>,
    }

    impl FailureInjector for FailFirst {
        fn fails(&self, _: &Order, _: i32, attempt: u32) -> bool {
            self.at.lock().unwrap().push(self.started.elapsed());
            attempt <= self.failures
        }
    }

    fn order() -> Order {
        Order {
            order_id: "o-1".into(),
            product: "laptop".into(),
            price: 10.0,
        }
    }

    fn records(failures: u32) -> (Records, Arc<FailFirst>) {
        let injector = Arc::new(FailFirst {
            failures,
            started: Instant::now(),
            at: Mutex::default(),
        });
        let records = Records {
            // never asked: the attempts below start from a decoded order
            codec: OrderCodec::new("http://127.0.0.1:1", "orders").unwrap(),
            failures: injector.clone(),
            policy: RetryPolicy {
                max_retries: 3,
                backoff: Backoff::with_factor(Duration::from_secs(1), 2.0, Duration::from_secs(30)),
            },
            catalogue: Catalogue::default(),
            dlq_topic: "orders-dlq".into(),
            retries: Counter::default(),
        };
        (records, injector)
    }

    fn message() -> OwnedMessage {
        OwnedMessage::new(
            Some(b"bytes".to_vec()),
            Some(b"o-1".to_vec()),
            "orders".into(),
            Timestamp::CreateTime(1),
            0,
            7,
            None,
        )
    }

    /// Takes a valid order's attempts to their end as a worker does, sleeping until each
    /// retry is due: its outcome, when each attempt ran, the retries counted.
    async fn run(failures: u32) -> (Outcome, Vec<Duration>, u64) {
        let (records, injector) = records(failures);
        let msg = message();
        let mut step = records.attempt(&msg, order(), Cents(1_000), 1);
        let outcome = loop {
            match step {
                Step::Final(outcome) => break outcome,
                Step::Retry(retry) => {
                    tokio::time::sleep_until(retry.at).await;
                    step = records.resume(&msg, retry);
                }
            }
        };
        let at = injector.at.lock().unwrap().clone();
        (outcome, at, records.retries.get())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_due_after_one_two_and_four_seconds() {
        let (outcome, at, retries) = run(2).await;
        assert!(
            matches!(outcome, Outcome::Processed { retries: 2, .. }),
            "{outcome:?}"
        );
        assert_eq!(
            at,
            [
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(3)
            ]
        );
        assert_eq!(retries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_that_outlives_three_retries_is_dead_lettered_after_seven_seconds() {
        let (outcome, at, retries) = run(u32::MAX).await;
        let Outcome::DeadLetter(dead) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            (dead.category, dead.retries),
            (Category::RetriesExhausted, 3)
        );
        let secs: Vec<u64> = at.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [0, 1, 3, 7]);
        assert_eq!(retries, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_waits_for_nothing_and_says_when_the_next_attempt_is_due() {
        let (records, _) = records(u32::MAX);
        let msg = message();
        let before = Instant::now();
        let Step::Retry(retry) = records.attempt(&msg, order(), Cents(1_000), 1) else {
            panic!("the first attempt fails");
        };
        assert_eq!(Instant::now(), before, "no time passed in the step");
        assert_eq!(retry.at - before, Duration::from_secs(1));
        assert_eq!(retry.attempt(), 2);
    }
}
