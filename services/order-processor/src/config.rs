//! order-processor settings (SPEC "Environment"), each with its default.

use std::time::Duration;

use order_runtime::CommonConfig;
use order_runtime::backoff::Backoff;
use order_runtime::config::{ConfigError, check_range, load};
use order_schema::Catalogue;
use serde::Deserialize;

use crate::decision::RetryPolicy;

/// How outcomes and offsets are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: dead letters, the changelog of per-partition state and the
    /// consumer offsets commit together, so totals are exact under crashes and rebalances.
    #[default]
    ExactlyOnce,
    /// Offsets stored after each outcome is durable; a crash can redo records.
    AtLeastOnce,
}

/// The processor's own block; see [`Config`] for the whole.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorSettings {
    /// `HTTP_PORT` for `/healthz`, `/readyz`, `/metrics`, `/stats`. Default 8102; 0 picks a free
    /// port (tests).
    #[serde(default = "default_port")]
    pub http_port: u16,
    /// `CONSUMER_GROUP`. Default `order-processor`.
    #[serde(default = "default_group")]
    pub consumer_group: String,
    /// `MAX_RETRIES`: retries after the first attempt of a temporary failure. Default 3.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `RETRY_INITIAL_BACKOFF_MS`: wait before the first retry. Default 1000.
    #[serde(default = "default_initial_backoff")]
    pub retry_initial_backoff_ms: u64,
    /// `RETRY_BACKOFF_MULTIPLIER`: each wait is the previous one times this. Default 2.0.
    #[serde(default = "default_multiplier")]
    pub retry_backoff_multiplier: f64,
    /// `RETRY_MAX_BACKOFF_MS`: no single wait is longer. Default 30000.
    #[serde(default = "default_max_backoff")]
    pub retry_max_backoff_ms: u64,
    /// `TRANSIENT_FAILURE_RATE`: the simulated chance that one processing attempt fails
    /// temporarily, 0 to 1. Default 0.
    #[serde(default)]
    pub transient_failure_rate: f64,
    /// `STATS_LOG_INTERVAL_MS`: how often the running average is logged while it moves.
    /// Default 5000.
    #[serde(default = "default_log_interval")]
    pub stats_log_interval_ms: u64,
    /// `PROCESSING_GUARANTEE`: `exactly_once` (default) or `at_least_once`.
    #[serde(default)]
    pub processing_guarantee: Guarantee,
    /// `STATE_TOPIC`: the compacted changelog of per-partition state (exactly-once).
    /// Default `<CONSUMER_GROUP>-aggregates-changelog`.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// `COMMIT_INTERVAL_MS`: how often a transaction commits (exactly-once). Default 1000.
    /// A commit takes about one broker transaction-marker round (~100 ms on the native
    /// stack); processed records go on meanwhile, into the next transaction, but a dead letter
    /// waits for it.
    #[serde(default = "default_commit_interval")]
    pub commit_interval_ms: u64,
    /// `TRANSACTION_TIMEOUT_MS`: the broker aborts a transaction left open this long (a
    /// crashed replica's). Default 10000.
    #[serde(default = "default_transaction_timeout")]
    pub transaction_timeout_ms: u64,
    /// `PRODUCT_CATALOGUE`: the products accepted, comma-separated, matched ignoring case
    /// (an order is counted under the catalogue's spelling); `*` accepts any non-empty
    /// product. Default: the ten products the generator sells.
    #[serde(default)]
    pub product_catalogue: Option<String>,
    /// `ANALYZER_URL`: the dlq-analyzer whose `/report` the status page (`/`) shows beside the
    /// group's totals. Default `http://127.0.0.1:8103`.
    #[serde(default = "default_analyzer_url")]
    pub analyzer_url: String,
}

fn default_port() -> u16 {
    8102
}
fn default_group() -> String {
    "order-processor".to_owned()
}
fn default_max_retries() -> u32 {
    3
}
fn default_initial_backoff() -> u64 {
    1000
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_backoff() -> u64 {
    30_000
}
fn default_log_interval() -> u64 {
    5000
}
fn default_commit_interval() -> u64 {
    1000
}
fn default_transaction_timeout() -> u64 {
    10_000
}
fn default_analyzer_url() -> String {
    "http://127.0.0.1:8103".to_owned()
}

/// Everything the processor reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub processor: ProcessorSettings,
    /// `PRODUCT_CATALOGUE`, parsed.
    pub catalogue: Catalogue,
}

impl Config {
    /// Reads and checks the configuration from `vars` (the process env in `main`).
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(vars)?;
        let processor: ProcessorSettings = load(vars.iter().cloned())?;
        let p = &processor;
        check_range("MAX_RETRIES", p.max_retries, 0, 100)?;
        check_range(
            "RETRY_INITIAL_BACKOFF_MS",
            p.retry_initial_backoff_ms,
            0,
            600_000,
        )?;
        check_range(
            "RETRY_BACKOFF_MULTIPLIER",
            p.retry_backoff_multiplier,
            1.0,
            100.0,
        )?;
        check_range(
            "RETRY_MAX_BACKOFF_MS",
            p.retry_max_backoff_ms,
            p.retry_initial_backoff_ms,
            600_000,
        )?;
        check_range("TRANSIENT_FAILURE_RATE", p.transient_failure_rate, 0.0, 1.0)?;
        check_range(
            "STATS_LOG_INTERVAL_MS",
            p.stats_log_interval_ms,
            100,
            3_600_000,
        )?;
        check_range("COMMIT_INTERVAL_MS", p.commit_interval_ms, 10, 60_000)?;
        check_range(
            "TRANSACTION_TIMEOUT_MS",
            p.transaction_timeout_ms,
            1_000,
            900_000,
        )?;
        if p.commit_interval_ms * 2 > p.transaction_timeout_ms {
            return Err(ConfigError(format!(
                "COMMIT_INTERVAL_MS={} must be well below TRANSACTION_TIMEOUT_MS={}",
                p.commit_interval_ms, p.transaction_timeout_ms
            )));
        }
        if p.consumer_group.trim().is_empty() {
            return Err(ConfigError("CONSUMER_GROUP must not be empty".into()));
        }
        if !(p.analyzer_url.starts_with("http://") || p.analyzer_url.starts_with("https://")) {
            return Err(ConfigError(format!(
                "ANALYZER_URL {:?} is not an http(s) URL",
                p.analyzer_url
            )));
        }
        if p.state_topic
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError("STATE_TOPIC must not be empty".into()));
        }
        let catalogue = match &p.product_catalogue {
            None => Catalogue::default(),
            Some(text) => Catalogue::parse(text)
                .map_err(|e| ConfigError(format!("PRODUCT_CATALOGUE: {e}")))?,
        };
        Ok(Config {
            common,
            processor,
            catalogue,
        })
    }

    /// The changelog topic of per-partition state.
    pub fn state_topic(&self) -> String {
        self.processor
            .state_topic
            .clone()
            .unwrap_or_else(|| format!("{}-aggregates-changelog", self.processor.consumer_group))
    }

    /// How temporary failures are retried (the seed's 1 s, 2 s, 4 s by default).
    pub fn retry_policy(&self) -> RetryPolicy {
        let p = &self.processor;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use order_runtime::config::pairs as vars;

    #[test]
    fn defaults_give_the_seed_backoff() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.processor.http_port, 8102);
        assert_eq!(c.processor.consumer_group, "order-processor");
        assert_eq!(c.processor.max_retries, 3);
        assert_eq!(c.processor.processing_guarantee, Guarantee::ExactlyOnce);
        assert_eq!(c.state_topic(), "order-processor-aggregates-changelog");
        let waits: Vec<u64> = (1..=3)
            .map(|r| c.retry_policy().backoff.nth(r).as_millis() as u64)
            .collect();
        assert_eq!(waits, [1000, 2000, 4000]);
    }

    #[test]
    fn backoff_is_capped() {
        let c = Config::from_vars(&vars(&[("RETRY_MAX_BACKOFF_MS", "3000")])).unwrap();
        assert_eq!(c.retry_policy().backoff.nth(3), Duration::from_millis(3000));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("MAX_RETRIES", "-1"),
            ("MAX_RETRIES", "lots"),
            ("TRANSIENT_FAILURE_RATE", "1.5"),
            ("RETRY_BACKOFF_MULTIPLIER", "0.5"),
            ("HTTP_PORT", "70000"),
            ("RETRY_MAX_BACKOFF_MS", "10"),
            ("PROCESSING_GUARANTEE", "exactly_twice"),
            ("COMMIT_INTERVAL_MS", "5"),
            ("ANALYZER_URL", "localhost:8103"),
            ("PRODUCT_CATALOGUE", ","),
        ] {
            let e = Config::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert!(e.to_string().contains(var), "{var}={value}: {e}");
        }
    }
}
