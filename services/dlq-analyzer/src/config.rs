//! dlq-analyzer settings (SPEC "Environment"), each with its default.

use order_runtime::CommonConfig;
use order_runtime::config::{ConfigError, check_range, load};
use serde::{Deserialize, Serialize};

/// The service's name in logs and traces.
pub const SERVICE_NAME: &str = "dlq-analyzer";

/// `HTTP_PORT`'s default, which `dlq-analyzer healthcheck` asks too.
pub const DEFAULT_HTTP_PORT: u16 = 8103;

/// The analyzer's own settings. Every field has its default in the [`Default`] impl below, and
/// only there; `docs/configuration.md` lists them, and a test holds the two together.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AnalyzerSettings {
    /// `HTTP_PORT`; 0 picks a free port.
    pub http_port: u16,
    /// `CONSUMER_GROUP`.
    pub consumer_group: String,
    /// `SUMMARY_INTERVAL_MS`: how often the summary is logged.
    pub summary_interval_ms: u64,
    /// `REDRIVE_MAX_COUNT`: a dead letter already redriven this often goes to the parking
    /// topic instead.
    pub redrive_max_count: u32,
    /// `DLQ_PARKING_TOPIC`: where redrives park records over `REDRIVE_MAX_COUNT`; unset:
    /// `<DLQ_TOPIC>-parking`.
    pub dlq_parking_topic: Option<String>,
    /// `REDRIVE_RATE`: records per second of a redrive that names no rate; 0 for no limit.
    pub redrive_rate: f64,
    /// `JAEGER_QUERY_URL`: Jaeger's query API, for `dlq-analyzer trace` (`make trace`).
    pub jaeger_query_url: String,
}

impl Default for AnalyzerSettings {
    fn default() -> Self {
        AnalyzerSettings {
            http_port: DEFAULT_HTTP_PORT,
            consumer_group: SERVICE_NAME.to_owned(),
            summary_interval_ms: 10_000,
            redrive_max_count: 3,
            dlq_parking_topic: None,
            redrive_rate: 1000.0,
            jaeger_query_url: "http://127.0.0.1:16686".to_owned(),
        }
    }
}

/// Settings of the analyzer that redrives use (SPEC "Environment").
#[derive(Debug, Clone)]
pub struct RedriveSettings {
    /// `REDRIVE_MAX_COUNT`: a dead letter already redriven this often is parked instead.
    pub max_count: u32,
    /// `DLQ_PARKING_TOPIC`.
    pub parking_topic: String,
    /// `REDRIVE_RATE`: records per second when a request names none (0: no limit).
    pub rate: f64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub analyzer: AnalyzerSettings,
}

impl Config {
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(vars)?;
        let analyzer: AnalyzerSettings = load(vars.iter().cloned())?;
        check_range(
            "SUMMARY_INTERVAL_MS",
            analyzer.summary_interval_ms,
            100,
            3_600_000,
        )?;
        check_range("REDRIVE_MAX_COUNT", analyzer.redrive_max_count, 0, 1000)?;
        check_range("REDRIVE_RATE", analyzer.redrive_rate, 0.0, 1e7)?;
        if !(analyzer.jaeger_query_url.starts_with("http://")
            || analyzer.jaeger_query_url.starts_with("https://"))
        {
            return Err(ConfigError(format!(
                "JAEGER_QUERY_URL {:?} is not an http(s) URL",
                analyzer.jaeger_query_url
            )));
        }
        if analyzer.consumer_group.trim().is_empty() {
            return Err(ConfigError("CONSUMER_GROUP must not be empty".into()));
        }
        Ok(Config { common, analyzer })
    }

    /// What redrives need of the settings.
    pub fn redrive(&self) -> RedriveSettings {
        RedriveSettings {
            max_count: self.analyzer.redrive_max_count,
            parking_topic: self
                .analyzer
                .dlq_parking_topic
                .clone()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or_else(|| format!("{}-parking", self.common.dlq_topic)),
            rate: self.analyzer.redrive_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.analyzer.http_port, 8103);
        assert_eq!(c.analyzer.consumer_group, "dlq-analyzer");
        assert_eq!(c.redrive().parking_topic, "orders-dlq-parking");
    }

    #[test]
    fn bad_values_name_their_variable() {
        order_testkit::assert_each_refused_naming_its_variable(
            Config::from_vars,
            &[
                ("SUMMARY_INTERVAL_MS", "5"),
                ("REDRIVE_MAX_COUNT", "-1"),
                ("REDRIVE_RATE", "fast"),
                ("JAEGER_QUERY_URL", "localhost:16686"),
                ("CONSUMER_GROUP", " "),
            ],
        );
    }
}
