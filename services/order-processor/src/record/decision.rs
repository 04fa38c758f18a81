//! Where a record's fate is decided: a pure function from what is known about the record to a
//! verdict. No I/O, no clock, no Kafka: the shell around it ([`crate::record`]) decodes, runs
//! the attempts, sleeps the waits it is told to and makes the verdict durable.

use std::time::Duration;

use order_runtime::backoff::Backoff;
use order_runtime::dead_letter::Category;
use order_schema::{MalformedKind, ValidationError};

use crate::config::ProcessorSettings;

/// What is known about a record when its fate is decided.
#[derive(Debug, Clone, Copy)]
pub enum Known<'a> {
    /// The bytes are not an Order.
    Malformed(MalformedKind),
    /// A decoded Order that breaks a business rule.
    Invalid(&'a ValidationError),
    /// Processing attempt `attempt` (1-based) of a valid Order ran; `failed`: temporarily.
    Attempted { attempt: u32, failed: bool },
}

/// What happens to the record next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted in the aggregates, after `retries` retries.
    Processed { retries: u32 },
    /// Try attempt `attempt` after waiting `after`.
    Retry { attempt: u32, after: Duration },
    /// Sent to the dead-letter topic with this category and kind (`dlq.error.kind`).
    DeadLetter {
        category: Category,
        kind: &'static str,
        attempts: u32,
    },
}

/// How temporary failures are retried: `MAX_RETRIES` retries after the first attempt, waiting
/// `RETRY_INITIAL_BACKOFF_MS` × `RETRY_BACKOFF_MULTIPLIER`^(n-1), capped at
/// `RETRY_MAX_BACKOFF_MS`, before retry n.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// The policy the settings give (the seed's 1 s, 2 s, 4 s by default).
    pub fn from_settings(p: &ProcessorSettings) -> Self {
        RetryPolicy {
            max_retries: p.max_retries,
            backoff: Backoff::with_factor(
                Duration::from_millis(p.retry_initial_backoff_ms),
                p.retry_backoff_multiplier,
                Duration::from_millis(p.retry_max_backoff_ms),
            ),
        }
    }
}

/// The rule itself.
pub fn decide(known: Known<'_>, policy: &RetryPolicy) -> Verdict {
    match known {
        Known::Malformed(kind) => Verdict::DeadLetter {
            category: Category::Deserialization,
            kind: kind.as_str(),
            attempts: 1,
        },
        Known::Invalid(e) => Verdict::DeadLetter {
            category: Category::Validation,
            kind: e.kind(),
            attempts: 1,
        },
        Known::Attempted {
            attempt,
            failed: false,
        } => Verdict::Processed {
            retries: attempt.saturating_sub(1),
        },
        Known::Attempted {
            attempt,
            failed: true,
        } if attempt > policy.max_retries => Verdict::DeadLetter {
            category: Category::RetriesExhausted,
            kind: "transient_failure",
            attempts: attempt,
        },
        Known::Attempted {
            attempt,
            failed: true,
        } => Verdict::Retry {
            attempt: attempt + 1,
            after: policy.backoff.nth(attempt),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            backoff: Backoff::with_factor(Duration::from_secs(1), 2.0, Duration::from_secs(30)),
        }
    }

    fn failed(attempt: u32) -> Known<'static> {
        Known::Attempted {
            attempt,
            failed: true,
        }
    }

    #[test]
    fn temporary_failures_retry_after_one_two_four_seconds_then_dead_letter() {
        let p = seed_policy();
        let waits: Vec<Verdict> = (1..=4).map(|a| decide(failed(a), &p)).collect();
        assert_eq!(
            waits,
            [
                Verdict::Retry {
                    attempt: 2,
                    after: Duration::from_secs(1)
                },
                Verdict::Retry {
                    attempt: 3,
                    after: Duration::from_secs(2)
                },
                Verdict::Retry {
                    attempt: 4,
                    after: Duration::from_secs(4)
                },
                Verdict::DeadLetter {
                    category: Category::RetriesExhausted,
                    kind: "transient_failure",
                    attempts: 4
                },
            ]
        );
    }

    #[test]
    fn a_success_counts_the_retries_before_it() {
        let p = seed_policy();
        for attempt in 1..=4 {
            let known = Known::Attempted {
                attempt,
                failed: false,
            };
            assert_eq!(
                decide(known, &p),
                Verdict::Processed {
                    retries: attempt - 1
                }
            );
        }
    }

    #[test]
    fn no_retries_means_the_first_failure_is_final() {
        let p = RetryPolicy {
            max_retries: 0,
            ..seed_policy()
        };
        assert!(matches!(
            decide(failed(1), &p),
            Verdict::DeadLetter { attempts: 1, .. }
        ));
    }

    #[test]
    fn bad_bytes_and_broken_rules_are_dead_lettered_at_once_with_their_kind() {
        let p = seed_policy();
        for (kind, name) in [
            (MalformedKind::NullValue, "null_value"),
            (MalformedKind::TooShort, "too_short"),
            (MalformedKind::BadMagicByte, "bad_magic_byte"),
            (MalformedKind::UnknownSchemaId, "unknown_schema_id"),
            (MalformedKind::InvalidAvro, "invalid_avro"),
        ] {
            assert_eq!(
                decide(Known::Malformed(kind), &p),
                Verdict::DeadLetter {
                    category: Category::Deserialization,
                    kind: name,
                    attempts: 1
                }
            );
        }
        let e = ValidationError::UnknownProduct("Laptop".into());
        assert_eq!(
            decide(Known::Invalid(&e), &p),
            Verdict::DeadLetter {
                category: Category::Validation,
                kind: "unknown_product",
                attempts: 1
            }
        );
    }

    #[test]
    fn the_default_settings_give_the_seed_backoff() {
        let p = RetryPolicy::from_settings(&ProcessorSettings::default());
        let waits: Vec<Duration> = (1..=3).map(|r| p.backoff.nth(r)).collect();
        assert_eq!(waits, [1000, 2000, 4000].map(Duration::from_millis));
        assert_eq!(p.max_retries, 3);
        let capped = RetryPolicy::from_settings(&ProcessorSettings {
            retry_max_backoff_ms: 3000,
            ..ProcessorSettings::default()
        });
        assert_eq!(capped.backoff.nth(3), Duration::from_millis(3000));
    }

    #[test]
    fn waits_are_capped() {
        let p = RetryPolicy {
            max_retries: 10,
            backoff: Backoff::with_factor(Duration::from_secs(1), 2.0, Duration::from_secs(3)),
        };
        assert_eq!(
            decide(failed(5), &p),
            Verdict::Retry {
                attempt: 6,
                after: Duration::from_secs(3)
            }
        );
    }
}
