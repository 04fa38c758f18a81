//! Settings every service reads from the environment (SPEC "Environment").
//!
//! Services load this block and their own block from the same variables with [`load`], which
//! takes any iterator of pairs, so tests build configs without touching the process env.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of the variables passed through to librdkafka: `RDKAFKA_SECURITY_PROTOCOL=sasl_ssl`
/// sets `security.protocol=sasl_ssl` on every client of the service.
pub const RDKAFKA_PREFIX: &str = "RDKAFKA_";

/// A bad or unreadable setting, always naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Reads `T` from `vars` with envy; every field must have a default, so only bad values fail.
pub fn load<T: DeserializeOwned>(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    envy::from_iter::<_, T>(vars.iter().cloned()).map_err(|e| {
        // some envy errors (an unknown enum value) do not say which variable was wrong: find it
        // by reading each variable alone, since every field has a default
        let culprit = vars
            .iter()
            .find(|pair| envy::from_iter::<_, T>(std::iter::once((*pair).clone())).is_err());
        match culprit {
            Some((k, _)) if is_sensitive(k) => ConfigError(format!("{k}: {}", redacted_message(e))),
            Some((k, v)) if !envy_message_names(&e, k) => {
                ConfigError(format!("{k}={v:?}: {}", envy_message(e)))
            }
            _ => ConfigError(envy_message(e)),
        }
    })
}

/// envy's message without the value it quotes.
fn redacted_message(e: envy::Error) -> String {
    let text = envy_message(e);
    match text.split_once(" while parsing value") {
        Some((reason, _)) => format!("{reason} (value not shown)"),
        None => "bad value (not shown)".to_owned(),
    }
}

fn envy_message_names(e: &envy::Error, var: &str) -> bool {
    e.to_string().contains(var)
}

fn envy_message(e: envy::Error) -> String {
    match e {
        envy::Error::MissingValue(field) => {
            format!("{} is required", field.to_uppercase())
        }
        // envy words these as "<parse error> while parsing value '<v>' provided by <VAR>"
        envy::Error::Custom(msg) => msg,
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line, for log shippers.
    Json,
    /// Human-readable, coloured when a terminal is attached.
    Pretty,
}

/// The settings shared by all three services. Every field has its default in the [`Default`]
/// impl below, and only there; `docs/configuration.md` lists them, and a test holds the two
/// together. Neither `Debug` nor `Serialize` shows a secret (see [`is_sensitive`]): the
/// registry's URL is shown without credentials, and the secret fields not at all.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CommonConfig {
    /// `KAFKA_BOOTSTRAP_SERVERS`, comma-separated `host:port` list.
    pub kafka_bootstrap_servers: String,
    /// `SCHEMA_REGISTRY_URL`, the base URL a Confluent client uses (it may carry a path). As
    /// given, credentials included: read only into `registry`, whose `url()` is the one to use.
    #[serde(serialize_with = "url_without_credentials")]
    schema_registry_url: String,
    /// `ORDERS_TOPIC`, where orders are published.
    pub orders_topic: String,
    /// `DLQ_TOPIC`, where failed orders go.
    pub dlq_topic: String,
    /// `LOG_FORMAT`, `json` or `pretty`.
    pub log_format: LogFormat,
    /// `HTTP_PORT_FILE`: where the service writes the HTTP port it bound, once it listens, and
    /// where `<service> healthcheck` reads it. For replicas that share a network namespace with
    /// `HTTP_PORT=0` (Compose's `--scale` with host networking). Unset: no file.
    pub http_port_file: Option<std::path::PathBuf>,
    /// `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`: `user:password` for the registry's basic auth
    /// (Confluent's `basic.auth.user.info`). Unset: none, or the URL's credentials.
    #[serde(skip_serializing)]
    schema_registry_basic_auth_user_info: Option<String>,
    /// `SCHEMA_REGISTRY_BEARER_AUTH_TOKEN`: a bearer token for the registry, instead of basic
    /// auth (Confluent's `bearer.auth.token`).
    #[serde(skip_serializing)]
    schema_registry_bearer_auth_token: Option<String>,
    /// `SCHEMA_REGISTRY_SSL_CA_LOCATION`: a PEM file of the CA certificates the registry's
    /// `https://` certificate must chain to, instead of the system's.
    pub schema_registry_ssl_ca_location: Option<std::path::PathBuf>,
    /// The registry's URL (credentials removed) and how to authenticate, from the variables
    /// above (see [`CommonConfig::from_vars`]).
    #[serde(skip)]
    pub registry: order_schema::RegistryAccess,
    /// `GROUP_INSTANCE_ID`: static membership of the service's consumer group (KIP-345,
    /// `group.instance.id` on its group consumer only), so a restarted consumer with the same
    /// id gets its partitions back without a rebalance, if it returns within the session
    /// timeout. Unique per replica; the chart's `staticMembership` sets the pod name. Unset:
    /// dynamic membership.
    pub group_instance_id: Option<String>,
    /// librdkafka properties from `RDKAFKA_*` variables (not read by envy; see
    /// [`CommonConfig::from_vars`]).
    #[serde(skip)]
    pub kafka_properties: BTreeMap<String, String>,
    /// `OPERATIONS_TOKEN`: the bearer token that state-changing endpoints (pause, resume,
    /// redrive) ask for. Unset (and no file): those endpoints refuse every request.
    #[serde(skip_serializing)]
    operations_token: Option<String>,
    /// `OPERATIONS_TOKEN_FILE`: a file holding that token instead (a mounted Secret).
    pub operations_token_file: Option<std::path::PathBuf>,
    /// The operations credential, from the two settings above.
    #[serde(skip)]
    pub operations: crate::operations::Credential,
}

impl Default for CommonConfig {
    fn default() -> Self {
        CommonConfig {
            kafka_bootstrap_servers: "127.0.0.1:9092".to_owned(),
            schema_registry_url: "http://127.0.0.1:8081".to_owned(),
            orders_topic: "orders".to_owned(),
            dlq_topic: "orders-dlq".to_owned(),
            log_format: LogFormat::Pretty,
            http_port_file: None,
            schema_registry_basic_auth_user_info: None,
            schema_registry_bearer_auth_token: None,
            schema_registry_ssl_ca_location: None,
            registry: order_schema::RegistryAccess::default(),
            group_instance_id: None,
            kafka_properties: BTreeMap::new(),
            operations_token: None,
            operations_token_file: None,
            operations: crate::operations::Credential::default(),
        }
    }
}

fn url_without_credentials<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(order_schema::RegistryAccess::new(url).url())
}

/// Whether a setting's name says it holds a secret (a password, a token, a private key, a
/// JAAS line, user info): such values are never printed.
pub fn is_sensitive(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('_', ".");
    [
        "password",
        "secret",
        "token",
        "user.info",
        "jaas",
        "key.pem",
        "keystore",
        "private",
    ]
    .iter()
    .any(|s| name.contains(s))
        || name.ends_with(".key")
}

impl std::fmt::Debug for CommonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kafka: BTreeMap<&str, &str> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_sensitive(k) {
                    order_schema::REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("CommonConfig")
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("registry", &self.registry)
            .field(
                "schema_registry_ssl_ca_location",
                &self.schema_registry_ssl_ca_location,
            )
            .field("orders_topic", &self.orders_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("log_format", &self.log_format)
            .field("http_port_file", &self.http_port_file)
            .field("group_instance_id", &self.group_instance_id)
            .field("kafka_properties", &kafka)
            .field("operations", &self.operations)
            .finish()
    }
}

impl CommonConfig {
    /// Reads the common block and the `RDKAFKA_*` pass-through properties.
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut config: CommonConfig = load(vars.iter().cloned())?;
        for (key, value) in vars {
            if let Some(name) = key.strip_prefix(RDKAFKA_PREFIX) {
                if name.is_empty() {
                    return Err(ConfigError(format!("{key} names no librdkafka property")));
                }
                config
                    .kafka_properties
                    .insert(name.to_lowercase().replace('_', "."), value.clone());
            }
        }
        config.validate()?;
        config.registry = config.registry_access()?;
        config.operations = crate::operations::Credential::load(
            config.operations_token.as_deref(),
            config.operations_token_file.as_deref(),
        )
        .map_err(ConfigError)?;
        Ok(config)
    }

    /// The registry's access from `SCHEMA_REGISTRY_URL` and the `SCHEMA_REGISTRY_*` auth and CA
    /// variables.
    fn registry_access(&self) -> Result<order_schema::RegistryAccess, ConfigError> {
        let mut access = order_schema::RegistryAccess::new(&self.schema_registry_url);
        if let Some(info) = self
            .schema_registry_basic_auth_user_info
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            access = access
                .with_basic_user_info(info, "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
                .map_err(ConfigError)?;
        }
        if let Some(token) = self
            .schema_registry_bearer_auth_token
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            if self
                .schema_registry_basic_auth_user_info
                .as_deref()
                .is_some_and(|v| !v.is_empty())
            {
                return Err(ConfigError(
                    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO and SCHEMA_REGISTRY_BEARER_AUTH_TOKEN are both set: give one".to_owned(),
                ));
            }
            access = access
                .with_bearer_token(token, "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN")
                .map_err(ConfigError)?;
        }
        if let Some(path) = &self.schema_registry_ssl_ca_location {
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError(format!(
                    "SCHEMA_REGISTRY_SSL_CA_LOCATION {}: {e}",
                    path.display()
                ))
            })?;
            access = access
                .with_ca_bundle(&pem, "SCHEMA_REGISTRY_SSL_CA_LOCATION")
                .map_err(ConfigError)?;
        }
        Ok(access)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let nonempty = [
            ("KAFKA_BOOTSTRAP_SERVERS", &self.kafka_bootstrap_servers),
            ("ORDERS_TOPIC", &self.orders_topic),
            ("DLQ_TOPIC", &self.dlq_topic),
        ];
        for (name, value) in nonempty {
            if value.trim().is_empty() {
                return Err(ConfigError(format!("{name} must not be empty")));
            }
        }
        if self.orders_topic == self.dlq_topic {
            return Err(ConfigError(format!(
                "ORDERS_TOPIC and DLQ_TOPIC are both {:?}; dead letters would be consumed as orders",
                self.orders_topic
            )));
        }
        if let Some(id) = &self.group_instance_id {
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if id.is_empty() || id.len() > 249 || !id.chars().all(legal) {
                return Err(ConfigError(format!(
                    "GROUP_INSTANCE_ID={id:?}: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' \
                     and '-' (Kafka's rule for ids)"
                )));
            }
        }
        if !(self.schema_registry_url.starts_with("http://")
            || self.schema_registry_url.starts_with("https://"))
        {
            return Err(ConfigError(format!(
                "SCHEMA_REGISTRY_URL {:?} is not an http(s) URL",
                order_schema::RegistryAccess::new(&self.schema_registry_url).url()
            )));
        }
        Ok(())
    }
}

/// Variables as owned pairs, for building configs in tests without touching the process env.
pub fn pairs(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The process environment as pairs, for `main`.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Checks a value is in range, naming the variable when it is not.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError(format!(
            "{name}={value} is out of range: expected {min} to {max}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use super::pairs as vars;

    #[test]
    fn no_secret_in_debug_or_in_errors() {
        let c = CommonConfig::from_vars(&vars(&[
            (
                "SCHEMA_REGISTRY_URL",
                "https://alice:url-secret@registry.example/ccompat",
            ),
            ("RDKAFKA_SASL_PASSWORD", "sasl-secret"),
            ("RDKAFKA_SSL_KEY_PASSWORD", "key-secret"),
            ("RDKAFKA_SASL_JAAS_CONFIG", "jaas-secret"),
            ("RDKAFKA_SASL_USERNAME", "bob"),
            ("OPERATIONS_TOKEN", "ops-secret-of-some-length"),
        ]))
        .unwrap();
        assert_eq!(c.registry.url(), "https://registry.example/ccompat");
        assert!(c.operations.configured());
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        for secret in [
            "url-secret",
            "sasl-secret",
            "key-secret",
            "jaas-secret",
            "ops-secret",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("bob") && shown.contains("alice"), "{shown}");
        let token = CommonConfig::from_vars(&vars(&[
            ("SCHEMA_REGISTRY_BEARER_AUTH_TOKEN", "tok-secret"),
            ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "u:basic-secret"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            token.contains("both set") && !token.contains("secret"),
            "{token}"
        );
        let bad_url = CommonConfig::from_vars(&vars(&[(
            "SCHEMA_REGISTRY_URL",
            "ftp://alice:url-secret@registry.example",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            bad_url.contains("not an http(s) URL") && !bad_url.contains("url-secret"),
            "{bad_url}"
        );
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = CommonConfig::from_vars(&[]).unwrap();
        assert_eq!(c.kafka_bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(c.registry.url(), "http://127.0.0.1:8081");
        assert_eq!(c.orders_topic, "orders");
        assert_eq!(c.dlq_topic, "orders-dlq");
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert_eq!(c.group_instance_id, None);
        assert!(c.kafka_properties.is_empty());
    }

    #[test]
    fn rdkafka_variables_pass_through() {
        let c = CommonConfig::from_vars(&vars(&[
            ("RDKAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("RDKAFKA_SASL_MECHANISM", "PLAIN"),
        ]))
        .unwrap();
        assert_eq!(c.kafka_properties["security.protocol"], "sasl_ssl");
        assert_eq!(c.kafka_properties["sasl.mechanism"], "PLAIN");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = CommonConfig::from_vars(&vars(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(e.to_string().contains("LOG_FORMAT"), "{e}");
        let e =
            CommonConfig::from_vars(&vars(&[("SCHEMA_REGISTRY_URL", "localhost")])).unwrap_err();
        assert!(e.to_string().contains("SCHEMA_REGISTRY_URL"), "{e}");
        let e = CommonConfig::from_vars(&vars(&[("DLQ_TOPIC", "orders")])).unwrap_err();
        assert!(e.to_string().contains("DLQ_TOPIC"), "{e}");
        let e = CommonConfig::from_vars(&vars(&[("GROUP_INSTANCE_ID", "pod/1")])).unwrap_err();
        assert!(e.to_string().contains("GROUP_INSTANCE_ID=\"pod/1\""), "{e}");
        let pod = "order-processor-7d9c6b5f4-x2x9k";
        let c = CommonConfig::from_vars(&vars(&[("GROUP_INSTANCE_ID", pod)])).unwrap();
        let consumer = crate::kafka::consumer_config(&c, "client", "group");
        assert_eq!(consumer.get("group.instance.id"), Some(pod));
        let e = check_range("ORDER_RATE", 2.0, 0.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("ORDER_RATE=2"), "{e}");
    }
}
