//! order-generator settings (SPEC "Environment"), each with its default.

use order_runtime::CommonConfig;
use order_runtime::config::{ConfigError, check_range, load};
use serde::{Deserialize, Serialize};

/// The service's name in logs and traces.
pub const SERVICE_NAME: &str = "order-generator";

/// `HTTP_PORT`'s default, which `order-generator healthcheck` asks too.
pub const DEFAULT_HTTP_PORT: u16 = 8101;

/// The generator's own settings. Every field has its default in the [`Default`] impl below,
/// and only there; `docs/configuration.md` lists them, and a test holds the two together.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GeneratorSettings {
    /// `HTTP_PORT`; 0 picks a free port.
    pub http_port: u16,
    /// `ORDER_COUNT`: orders to send, then flush, print a summary and exit. 0 = no limit.
    pub order_count: u64,
    /// `ORDER_RATE`: orders per second, 0 = as fast as the producer takes them.
    pub order_rate: f64,
    /// `INVALID_ORDER_RATIO`: share of orders that break a business rule on purpose, 0 to 1.
    pub invalid_order_ratio: f64,
    /// `COMPRESSION_TYPE`: librdkafka `compression.type`.
    pub compression_type: String,
    /// `REGISTRY_WAIT_MS`: how long start-up waits for an unreachable registry.
    pub registry_wait_ms: u64,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        GeneratorSettings {
            http_port: DEFAULT_HTTP_PORT,
            order_count: 0,
            order_rate: 10.0,
            invalid_order_ratio: 0.0,
            compression_type: "snappy".to_owned(),
            registry_wait_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub generator: GeneratorSettings,
}

impl Config {
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(vars)?;
        let generator: GeneratorSettings = load(vars.iter().cloned())?;
        check_range("ORDER_RATE", generator.order_rate, 0.0, 10_000_000.0)?;
        check_range(
            "INVALID_ORDER_RATIO",
            generator.invalid_order_ratio,
            0.0,
            1.0,
        )?;
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&generator.compression_type.as_str())
        {
            return Err(ConfigError(format!(
                "COMPRESSION_TYPE={} is not one of none, gzip, snappy, lz4, zstd",
                generator.compression_type
            )));
        }
        Ok(Config { common, generator })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.generator.http_port, 8101);
        assert_eq!(c.generator.order_count, 0);
        assert_eq!(c.generator.compression_type, "snappy");
    }

    #[test]
    fn bad_values_name_their_variable() {
        order_testkit::assert_each_refused_naming_its_variable(
            Config::from_vars,
            &[
                ("ORDER_COUNT", "-5"),
                ("ORDER_RATE", "fast"),
                ("ORDER_RATE", "-1"),
                ("INVALID_ORDER_RATIO", "2"),
                ("COMPRESSION_TYPE", "brotli"),
            ],
        );
    }
}
