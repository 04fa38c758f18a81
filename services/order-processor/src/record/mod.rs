//! A record's fate. [`decision`] is the pure rule (what is known about a record in, a verdict
//! out); this module is the shell around it: it takes one record to its [`Outcome`] (decode,
//! validate, attempts with their backoff waits), with spans and logs, and prepares a dead
//! letter's headers and span. [`failures`] simulates temporary failures. Nothing here is
//! durable yet: the chosen guarantee makes the outcome so.

pub mod decision;
pub mod failures;

use std::sync::Arc;
use std::time::Duration;

use kafka_batch::RawMessage;
use order_runtime::backoff::Backoff;
use order_runtime::dead_letter::{self, Category};
use order_runtime::trace;
use order_schema::{Catalogue, Cents, CodecError, Order, OrderCodec};
use prometheus_client::metrics::counter::Counter;
use rdkafka::Timestamp;
use rdkafka::message::{Message, OwnedHeaders};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, field, info, info_span, warn};

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
    /// Decode, validate, attempts with retries: the record's outcome, or `None` when `cancel`
    /// fired first (the record will be seen again). No side effects but metrics and logs.
    pub async fn evaluate(
        &self,
        msg: &RawMessage<'_>,
        cancel: &CancellationToken,
    ) -> Option<Outcome> {
        let (verdict, message) = match self.decode(msg, cancel).await? {
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
                    Ok(price) => {
                        let verdict = attempts(
                            &order,
                            msg.partition(),
                            &self.policy,
                            self.failures.as_ref(),
                            &self.retries,
                            cancel,
                        )
                        .await?;
                        let message = match verdict {
                            Verdict::Processed { retries } => {
                                return Some(Outcome::Processed {
                                    order,
                                    price,
                                    retries,
                                });
                            }
                            Verdict::DeadLetter { attempts, .. } => {
                                format!("temporary failure persisted through {attempts} attempts")
                            }
                            Verdict::Retry { .. } => String::new(),
                        };
                        (verdict, message)
                    }
                }
            }
        };
        match verdict {
            Verdict::DeadLetter {
                category,
                kind,
                attempts,
            } => Some(self.dead_letter(msg, category, kind, attempts, &message)),
            // `decide` processes or retries only a valid order, and `attempts` returns only
            // final verdicts: not reached
            Verdict::Processed { .. } | Verdict::Retry { .. } => {
                tracing::error!(
                    ?verdict,
                    "no final verdict for the record; it is not settled"
                );
                None
            }
        }
    }

    /// The Order in the record, or why it is not one. A registry that cannot be asked is
    /// waited out, never a reason to dead-letter: `None` when `cancel` fired meanwhile.
    async fn decode(
        &self,
        msg: &RawMessage<'_>,
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
    fn dead_letter(
        &self,
        msg: &RawMessage<'_>,
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

/// Runs processing attempts of a valid `order` until the policy gives a final verdict
/// (processed or dead letter), sleeping the waits it names. `None` when `cancel` fired during
/// a wait. Each attempt and each wait is a span of its own.
pub async fn attempts(
    order: &Order,
    partition: i32,
    policy: &RetryPolicy,
    failures: &dyn FailureInjector,
    retries: &Counter,
    cancel: &CancellationToken,
) -> Option<Verdict> {
    let mut attempt = 1;
    loop {
        let traced = trace::recording();
        let failed = failures.fails(order, partition, attempt);
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
        match decide(Known::Attempted { attempt, failed }, policy) {
            Verdict::Retry {
                attempt: next,
                after,
            } => {
                let wait_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                retries.inc();
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
                let waited = async {
                    tokio::select! {
                        () = cancel.cancelled() => false,
                        () = tokio::time::sleep(after) => true,
                    }
                }
                .instrument(backoff)
                .await;
                if !waited {
                    return None;
                }
                attempt = next;
            }
            verdict => return Some(verdict),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

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

    fn seed_policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            backoff: Backoff::with_factor(Duration::from_secs(1), 2.0, Duration::from_secs(30)),
        }
    }

    async fn run(
        failures: u32,
        cancel: &CancellationToken,
    ) -> (Option<Verdict>, Vec<Duration>, u64) {
        let injector = FailFirst {
            failures,
            started: Instant::now(),
            at: Mutex::default(),
        };
        let retries = Counter::default();
        let verdict = attempts(&order(), 0, &seed_policy(), &injector, &retries, cancel).await;
        (verdict, injector.at.into_inner().unwrap(), retries.get())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_run_after_one_two_and_four_seconds() {
        let (verdict, at, retries) = run(2, &CancellationToken::new()).await;
        assert_eq!(verdict, Some(Verdict::Processed { retries: 2 }));
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
        let (verdict, at, retries) = run(u32::MAX, &CancellationToken::new()).await;
        assert_eq!(
            verdict,
            Some(Verdict::DeadLetter {
                category: Category::RetriesExhausted,
                kind: "transient_failure",
                attempts: 4
            })
        );
        let secs: Vec<u64> = at.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [0, 1, 3, 7]);
        assert_eq!(retries, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_a_wait_leaves_the_record_undecided() {
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            stopper.cancel();
        });
        let (verdict, at, _) = run(u32::MAX, &cancel).await;
        assert_eq!(verdict, None);
        assert_eq!(at.len(), 2, "attempts at 0 s and 1 s, none after the stop");
    }
}
