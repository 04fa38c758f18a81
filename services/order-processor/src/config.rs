//! order-processor settings (SPEC "Environment"), each with its default.

use order_runtime::CommonConfig;
use order_runtime::config::{ConfigError, check_range, load};
use order_schema::Catalogue;
use serde::{Deserialize, Serialize};

/// How outcomes and offsets are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: dead letters, the changelog of per-partition state and the
    /// consumer offsets commit together, so totals are exact under crashes and rebalances.
    ExactlyOnce,
    /// Offsets stored after each outcome is durable; a crash can redo records.
    AtLeastOnce,
}

/// The service's name in logs, traces and dead letters' `dlq.failed.service`.
pub const SERVICE_NAME: &str = "order-processor";

/// `PROCESSING_ORDER`: which records of a partition are decided one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingOrder {
    /// The records of one key in offset order, the partition's other keys concurrently: a
    /// record waiting for a retry holds back only the later records of its key.
    Key,
    /// One record at a time per partition: a record waiting for a retry holds back its whole
    /// partition.
    Partition,
}

impl ProcessingOrder {
    /// The rule picked once, for the workers: which key a record waits behind (its own, or the
    /// partition's one key; `None`, a record without a key, waits behind nothing).
    pub fn key_rule(self) -> fn(Option<&[u8]>) -> Option<&[u8]> {
        match self {
            ProcessingOrder::Key => |key| key,
            ProcessingOrder::Partition => |_| Some(&[]),
        }
    }
}

/// The processor's own block; see [`Config`] for the whole. Every field has its default in
/// the [`Default`] impl below, and only there; `docs/configuration.md` lists them, and a test
/// holds the two together.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ProcessorSettings {
    /// `HTTP_PORT` for `/healthz`, `/readyz`, `/metrics`, `/stats`; 0 picks a free port
    /// (tests).
    pub http_port: u16,
    /// `CONSUMER_GROUP`.
    pub consumer_group: String,
    /// `MAX_RETRIES`: retries after the first attempt of a temporary failure.
    pub max_retries: u32,
    /// `RETRY_INITIAL_BACKOFF_MS`: wait before the first retry.
    pub retry_initial_backoff_ms: u64,
    /// `RETRY_BACKOFF_MULTIPLIER`: each wait is the previous one times this.
    pub retry_backoff_multiplier: f64,
    /// `RETRY_MAX_BACKOFF_MS`: no single wait is longer.
    pub retry_max_backoff_ms: u64,
    /// `TRANSIENT_FAILURE_RATE`: the simulated chance that one processing attempt fails
    /// temporarily, 0 to 1.
    pub transient_failure_rate: f64,
    /// `TRANSIENT_FAILURE_SEED`: when set, whether attempt N of an order fails is a function
    /// of (seed, orderId, N) and the rate (see [`crate::record::failures::SeededFailures`]);
    /// unset, a random draw.
    pub transient_failure_seed: Option<String>,
    /// `PROCESSING_ORDER`: `key` or `partition`.
    pub processing_order: ProcessingOrder,
    /// `MAX_IN_FLIGHT_RECORDS`: per partition, the records taken and not final (waiting for a
    /// retry, or behind one of their key) at most; at the bound the partition takes no more
    /// until the oldest finish.
    pub max_in_flight_records: usize,
    /// `MAX_IN_FLIGHT_SPAN`: per partition, the offsets from the lowest record not final to
    /// the newest taken, at most.
    pub max_in_flight_span: i64,
    /// `STATS_LOG_INTERVAL_MS`: how often the running average is logged while it moves.
    pub stats_log_interval_ms: u64,
    /// `PROCESSING_GUARANTEE`: `exactly_once` or `at_least_once`.
    pub processing_guarantee: Guarantee,
    /// `STATE_TOPIC`: the compacted changelog of per-partition state (exactly-once); unset:
    /// `<CONSUMER_GROUP>-aggregates-changelog`.
    pub state_topic: Option<String>,
    /// `COMMIT_INTERVAL_MS`: how often the positions commit (at-least-once), or a transaction
    /// (exactly-once). A transaction's commit takes about one broker transaction-marker round;
    /// processed records go on meanwhile, into the next transaction, but a dead letter waits
    /// for it.
    pub commit_interval_ms: u64,
    /// `TRANSACTION_TIMEOUT_MS`: the broker aborts a transaction left open this long (a
    /// crashed replica's).
    pub transaction_timeout_ms: u64,
    /// `PRODUCT_CATALOGUE`: the products accepted, comma-separated, matched ignoring case
    /// (an order is counted under the catalogue's spelling); `*` accepts any non-empty
    /// product; unset: the products the generator sells.
    pub product_catalogue: Option<String>,
    /// `ANALYZER_URL`: the dlq-analyzer whose `/report` the status page (`/`) shows beside the
    /// group's totals.
    pub analyzer_url: String,
    /// `JAEGER_UI_URL`: a Jaeger UI as the browser reaches it; the status page links each
    /// trace id to `<JAEGER_UI_URL>/trace/<id>`. Unset: trace ids are plain text.
    pub jaeger_ui_url: Option<String>,
}

/// `HTTP_PORT`'s default, which `order-processor healthcheck` asks too.
pub const DEFAULT_HTTP_PORT: u16 = 8102;

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            http_port: DEFAULT_HTTP_PORT,
            consumer_group: SERVICE_NAME.to_owned(),
            max_retries: 3,
            retry_initial_backoff_ms: 1000,
            retry_backoff_multiplier: 2.0,
            retry_max_backoff_ms: 30_000,
            transient_failure_rate: 0.0,
            transient_failure_seed: None,
            processing_order: ProcessingOrder::Key,
            max_in_flight_records: 1000,
            max_in_flight_span: 100_000,
            stats_log_interval_ms: 5000,
            processing_guarantee: Guarantee::ExactlyOnce,
            state_topic: None,
            commit_interval_ms: 1000,
            transaction_timeout_ms: 10_000,
            product_catalogue: None,
            analyzer_url: "http://127.0.0.1:8103".to_owned(),
            jaeger_ui_url: None,
        }
    }
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
        let mut processor: ProcessorSettings = load(vars.iter().cloned())?;
        // an empty value (Compose's `${TRANSIENT_FAILURE_SEED:-}`) is no value
        for optional in [
            &mut processor.transient_failure_seed,
            &mut processor.jaeger_ui_url,
        ] {
            if optional.as_deref().is_some_and(|s| s.trim().is_empty()) {
                *optional = None;
            }
        }
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
        check_range("MAX_IN_FLIGHT_RECORDS", p.max_in_flight_records, 1, 100_000)?;
        check_range(
            "MAX_IN_FLIGHT_SPAN",
            p.max_in_flight_span,
            i64::try_from(p.max_in_flight_records).unwrap_or(i64::MAX),
            10_000_000,
        )?;
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
        let http = |url: &str| url.starts_with("http://") || url.starts_with("https://");
        if !http(&p.analyzer_url) {
            return Err(ConfigError(format!(
                "ANALYZER_URL {:?} is not an http(s) URL",
                p.analyzer_url
            )));
        }
        if let Some(url) = p.jaeger_ui_url.as_deref().filter(|u| !http(u)) {
            return Err(ConfigError(format!(
                "JAEGER_UI_URL {url:?} is not an http(s) URL"
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.processor.http_port, 8102);
        assert_eq!(c.processor.consumer_group, "order-processor");
        assert_eq!(c.processor.max_retries, 3);
        assert_eq!(c.processor.processing_guarantee, Guarantee::ExactlyOnce);
        assert_eq!(c.state_topic(), "order-processor-aggregates-changelog");
    }

    /// Compose passes `${TRANSIENT_FAILURE_SEED:-}`: unset in the shell, the processor gets
    /// an empty value, which must start it as if unset.
    #[test]
    fn an_empty_optional_value_is_no_value() {
        let vars = [
            ("TRANSIENT_FAILURE_SEED".to_owned(), String::new()),
            ("JAEGER_UI_URL".to_owned(), " ".to_owned()),
        ];
        let c = Config::from_vars(&vars).unwrap();
        assert_eq!(c.processor.transient_failure_seed, None);
        assert_eq!(c.processor.jaeger_ui_url, None);
    }

    #[test]
    fn bad_values_name_their_variable() {
        order_testkit::assert_each_refused_naming_its_variable(
            Config::from_vars,
            &[
                ("MAX_RETRIES", "-1"),
                ("MAX_RETRIES", "lots"),
                ("TRANSIENT_FAILURE_RATE", "1.5"),
                ("RETRY_BACKOFF_MULTIPLIER", "0.5"),
                ("HTTP_PORT", "70000"),
                ("RETRY_MAX_BACKOFF_MS", "10"),
                ("PROCESSING_GUARANTEE", "exactly_twice"),
                ("COMMIT_INTERVAL_MS", "5"),
                ("ANALYZER_URL", "localhost:8103"),
                ("JAEGER_UI_URL", "javascript:alert(1)"),
                ("PRODUCT_CATALOGUE", ","),
                ("PROCESSING_ORDER", "random"),
                ("MAX_IN_FLIGHT_RECORDS", "0"),
                ("MAX_IN_FLIGHT_SPAN", "10"),
            ],
        );
    }
}
