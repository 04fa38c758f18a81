//! Where the Schema Registry is and how to authenticate to it, the way Confluent's clients take
//! it: `basic.auth.user.info` (`user:password`), a bearer token, and a CA bundle for TLS
//! (`SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`, `SCHEMA_REGISTRY_BEARER_AUTH_TOKEN`,
//! `SCHEMA_REGISTRY_SSL_CA_LOCATION` in the services). Credentials written into the URL
//! (`https://user:password@host`) are taken out of it and used as basic auth, so that the URL
//! the services print, log and put in errors never carries them. `Debug` shows no secret.

use std::time::Duration;

/// The registry's base URL (credentials removed) and how to reach it.
#[derive(Clone, Default)]
pub struct RegistryAccess {
    url: String,
    basic: Option<(String, String)>,
    bearer: Option<String>,
    /// The trust roots for `https://`, replacing the platform's (Confluent's `ssl.ca.location`).
    ca: Option<Vec<reqwest::Certificate>>,
    /// The variable the credentials came from, for messages.
    credentials_from: Option<&'static str>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field("url", &self.url)
            .field("basic_user", &self.basic.as_ref().map(|(user, _)| user))
            .field("basic_password", &self.basic.as_ref().map(|_| REDACTED))
            .field("bearer", &self.bearer.as_ref().map(|_| REDACTED))
            .field("ca_certificates", &self.ca.as_ref().map(Vec::len))
            .finish()
    }
}

/// What stands in for a secret wherever one would be shown.
pub const REDACTED: &str = "[redacted]";

/// The registry refused us at start-up, or TLS failed: what to fix, by variable.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Refused(String),
    /// No answer (yet): the services wait for it, as for an unreachable broker.
    #[error("the schema registry at {url} did not answer: {reason}")]
    Unreachable { url: String, reason: String },
}

impl RegistryAccess {
    /// `url`, with any credentials in it moved to basic auth.
    pub fn new(url: &str) -> Self {
        let url = url.trim();
        let mut access = RegistryAccess {
            url: url.trim_end_matches('/').to_owned(),
            ..RegistryAccess::default()
        };
        if let Ok(mut parsed) = url::Url::parse(url)
            && (!parsed.username().is_empty() || parsed.password().is_some())
        {
            // user info is percent-encoded (a '+' in it is a '+', not a space)
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let user = decode(parsed.username());
            let password = parsed.password().map(decode).unwrap_or_default();
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            access.url = parsed.as_str().trim_end_matches('/').to_owned();
            access.basic = Some((user, password));
            access.credentials_from = Some("SCHEMA_REGISTRY_URL");
        }
        access
    }

    /// Basic auth from Confluent's `user:password` form (`basic.auth.user.info`), over any
    /// credentials the URL had.
    pub fn with_basic_user_info(
        mut self,
        user_info: &str,
        variable: &'static str,
    ) -> Result<Self, String> {
        let Some((user, password)) = user_info.split_once(':') else {
            return Err(format!("{variable} must be user:password (no ':' found)"));
        };
        if user.is_empty() {
            return Err(format!(
                "{variable} must be user:password (the user is empty)"
            ));
        }
        self.basic = Some((user.to_owned(), password.to_owned()));
        self.credentials_from = Some(variable);
        Ok(self)
    }

    /// A bearer token (`bearer.auth.token`), sent instead of basic auth.
    pub fn with_bearer_token(
        mut self,
        token: &str,
        variable: &'static str,
    ) -> Result<Self, String> {
        if token.trim().is_empty() {
            return Err(format!("{variable} is empty"));
        }
        self.bearer = Some(token.trim().to_owned());
        self.basic = None;
        self.credentials_from = Some(variable);
        Ok(self)
    }

    /// The CA certificates (PEM) that `https://` must chain to, instead of the platform's.
    pub fn with_ca_bundle(mut self, pem: &[u8], variable: &'static str) -> Result<Self, String> {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("{variable}: not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{variable}: no certificate in the file"));
        }
        self.ca = Some(certs);
        Ok(self)
    }

    /// The base URL, without credentials: safe to print.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An HTTP client builder for the registry. A plain `http://` URL gets no root certificates
    /// (loading the system's bundle costs memory in every client and fails where an image has
    /// none);
    /// `https://` gets the CA bundle given, or else the platform's verifier.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder();
        let plain = self
            .url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
        match (&self.ca, plain) {
            (_, true) => builder.tls_certs_only(std::iter::empty()),
            (Some(ca), false) => builder.tls_certs_only(ca.iter().cloned()),
            (None, false) => builder,
        }
    }

    /// `request` with the credentials, if any.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (&self.bearer, &self.basic) {
            (Some(token), _) => request.bearer_auth(token),
            (None, Some((user, password))) => request.basic_auth(user, Some(password)),
            (None, None) => request,
        }
    }

    /// schema_registry_converter's settings: the same URL, credentials and trust roots; why
    /// they cannot be made, otherwise.
    pub fn settings(
        &self,
    ) -> Result<schema_registry_converter::async_impl::schema_registry::SrSettings, String> {
        use schema_registry_converter::async_impl::schema_registry::SrSettings;
        let mut builder = SrSettings::new_builder(self.url.clone());
        builder.set_timeout(Duration::from_secs(5));
        match (&self.bearer, &self.basic) {
            (Some(token), _) => {
                builder.set_token_authorization(token);
            }
            (None, Some((user, password))) => {
                builder.set_basic_authorization(user, Some(password));
            }
            (None, None) => {}
        }
        builder
            .build_with(self.client_builder())
            .map_err(|e| format!("bad registry settings for {}: {e}", self.url))
    }

    /// Asks the registry once (`GET /schemas/types`) whether it lets us in. A refusal (401,
    /// 403) or a TLS failure is an error that names the variable to fix; no answer is
    /// [`AccessError::Unreachable`], which the services wait out.
    pub async fn check(&self) -> Result<(), AccessError> {
        let client = self
            .client_builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| {
                AccessError::Refused(format!(
                    "no HTTP client for the schema registry at {}: {e}",
                    self.url
                ))
            })?;
        let answer = self
            .authorize(client.get(format!("{}/schemas/types", self.url)))
            .send()
            .await;
        let status = match answer {
            Ok(r) => r.status(),
            Err(e) => {
                let chain = error_chain(&e);
                return Err(if is_tls_failure(&chain) {
                    AccessError::Refused(format!(
                        "TLS with the schema registry at {} failed: {chain}. Set SCHEMA_REGISTRY_SSL_CA_LOCATION to the PEM file of the CA that signed its certificate",
                        self.url
                    ))
                } else {
                    AccessError::Unreachable {
                        url: self.url.clone(),
                        reason: chain,
                    }
                });
            }
        };
        let vars = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (user:password) or SCHEMA_REGISTRY_BEARER_AUTH_TOKEN";
        match status.as_u16() {
            401 => Err(AccessError::Refused(match self.credentials_from {
                None => format!(
                    "the schema registry at {} wants credentials (401 Unauthorized): set {vars}",
                    self.url
                ),
                Some(var) => format!(
                    "the schema registry at {} refused the credentials from {var} (401 Unauthorized): fix {var}",
                    self.url
                ),
            })),
            403 => Err(AccessError::Refused(format!(
                "the schema registry at {} denies {} (403 Forbidden): give that principal read and write access to the subjects, or set other credentials in {}",
                self.url,
                match self.credentials_from {
                    Some(var) => format!("the credentials from {var}"),
                    None => "anonymous access".to_owned(),
                },
                self.credentials_from.unwrap_or(vars)
            ))),
            _ => Ok(()),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn is_tls_failure(chain: &str) -> bool {
    let chain = chain.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "tls handshake",
        "invalid peer",
    ]
    .iter()
    .any(|s| chain.contains(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_for_basic_auth() {
        let a =
            RegistryAccess::new("https://alice:s%40cret@registry.example:8443/apis/ccompat/v7/");
        assert_eq!(a.url(), "https://registry.example:8443/apis/ccompat/v7");
        assert_eq!(a.basic, Some(("alice".to_owned(), "s@cret".to_owned())));
        let plus = RegistryAccess::new("https://bob:a+b%2Bc@registry.example");
        assert_eq!(plus.basic, Some(("bob".to_owned(), "a+b+c".to_owned())));
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("s@cret") && !shown.contains("s%40cret"),
            "{shown}"
        );
        assert!(
            shown.contains("alice") && shown.contains(REDACTED),
            "{shown}"
        );
    }

    #[test]
    fn user_info_and_token_are_checked_and_never_shown() {
        let base = RegistryAccess::new("http://127.0.0.1:8081");
        assert_eq!(base.url(), "http://127.0.0.1:8081");
        assert!(base.basic.is_none());
        let err = base.clone().with_basic_user_info("alice", "V").unwrap_err();
        assert!(err.contains("V must be user:password"), "{err}");
        let basic = base
            .clone()
            .with_basic_user_info("alice:pa:ss", "V")
            .unwrap();
        assert_eq!(basic.basic, Some(("alice".to_owned(), "pa:ss".to_owned())));
        let bearer = basic.with_bearer_token("tok-123", "T").unwrap();
        assert!(bearer.basic.is_none());
        assert!(!format!("{bearer:?}").contains("tok-123"));
        assert!(base.with_bearer_token(" ", "T").is_err());
    }

    #[test]
    fn a_ca_bundle_must_hold_certificates() {
        let err = RegistryAccess::new("https://r")
            .with_ca_bundle(b"not pem", "CA")
            .unwrap_err();
        assert!(err.starts_with("CA: "), "{err}");
    }
}
