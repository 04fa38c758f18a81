//! The guard in front of every endpoint that changes what the pipeline does (`POST /pause`,
//! `/resume`, `/redrive`), and the way those endpoints read a request.
//!
//! Reads (`GET`, `HEAD`: probes, `/metrics`, `/stats`, `/report`, the status page) pass. A
//! state change needs the operations credential, `Authorization: Bearer <token>`, with the
//! token from `OPERATIONS_TOKEN` or the file `OPERATIONS_TOKEN_FILE` names (a Kubernetes
//! Secret). With none configured, state changes are refused (403, naming the setting): the
//! default is closed. A request that says it came from another site (`Sec-Fetch-Site` other
//! than `same-origin` or `none`, or an `Origin` that is not this service's host) is refused
//! even with the credential, so a web page an operator happens to open cannot drive the
//! pipeline through a port-forward; and no CORS header is ever sent, so a browser never lets
//! another site read an answer or send the header in the first place.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// The settings the credential comes from.
pub const TOKEN_VARIABLE: &str = "OPERATIONS_TOKEN";
pub const TOKEN_FILE_VARIABLE: &str = "OPERATIONS_TOKEN_FILE";
/// Shorter tokens are refused at start-up: a guessable credential is none.
pub const MIN_TOKEN_LENGTH: usize = 16;

/// The operations credential of a service; `Debug` never shows it.
#[derive(Clone, Default)]
pub struct Credential {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("configured", &self.token.is_some())
            .finish()
    }
}

impl Credential {
    /// From `OPERATIONS_TOKEN`, or the file `OPERATIONS_TOKEN_FILE` names (its content, less
    /// the trailing newline); none when neither is set. Both set, an unreadable file or a
    /// token shorter than [`MIN_TOKEN_LENGTH`] stop the service, naming the setting.
    pub fn load(token: Option<&str>, file: Option<&std::path::Path>) -> Result<Self, String> {
        let token = match (token.filter(|t| !t.is_empty()), file) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{TOKEN_VARIABLE} and {TOKEN_FILE_VARIABLE} are both set: give one"
                ));
            }
            (Some(t), None) => Some((t.to_owned(), TOKEN_VARIABLE)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{TOKEN_FILE_VARIABLE} {}: {e}", path.display()))?;
                Some((
                    text.trim_end_matches(['\n', '\r']).to_owned(),
                    TOKEN_FILE_VARIABLE,
                ))
            }
            (None, None) => None,
        };
        match token {
            Some((t, from)) if t.chars().count() < MIN_TOKEN_LENGTH => Err(format!(
                "{from}: the operations token must be at least {MIN_TOKEN_LENGTH} characters"
            )),
            Some((t, _)) => Ok(Credential {
                token: Some(t.into()),
            }),
            None => Ok(Credential::default()),
        }
    }

    /// A credential with this token, for tests.
    pub fn with_token(token: &str) -> Self {
        Credential {
            token: Some(token.into()),
        }
    }

    /// Whether state changes are possible at all.
    pub fn configured(&self) -> bool {
        self.token.is_some()
    }

    /// Why a state-changing request is refused, or `None` when it may go ahead.
    fn refusal(&self, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        if let Some(why) = cross_site(headers) {
            return Some((StatusCode::FORBIDDEN, why));
        }
        let Some(token) = &self.token else {
            return Some((
                StatusCode::FORBIDDEN,
                format!(
                    "operations are disabled on this service: set {TOKEN_VARIABLE} (or \
                     {TOKEN_FILE_VARIABLE}) to allow them, then send Authorization: Bearer <token>"
                ),
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match given {
            None => Some((
                StatusCode::UNAUTHORIZED,
                format!(
                    "this operation needs the credential: send Authorization: Bearer <{TOKEN_VARIABLE}>"
                ),
            )),
            Some(g) if !same(g.trim().as_bytes(), token.as_bytes()) => Some((
                StatusCode::FORBIDDEN,
                "the credential is not this service's operations token".to_owned(),
            )),
            Some(_) => None,
        }
    }
}

/// Compares in time that depends on the length only, not on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why the request looks like it came from another site: a browser says so in
/// `Sec-Fetch-Site`, and in an `Origin` that names another host than the one asked.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!(
            "cross-site request refused (Sec-Fetch-Site: {site}): operations are sent by an \
             operator's client, not from a web page"
        ));
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or("");
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    (authority != host).then(|| {
        format!("cross-site request refused: Origin {origin} is not this service ({host})")
    })
}

/// The middleware: reads pass, and so does `OPTIONS` (the router answers it 405, with no CORS
/// header); state changes need the credential and a same-site request.
pub async fn guard(State(credential): State<Credential>, request: Request, next: Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    match credential.refusal(request.headers()) {
        Some((status, why)) => {
            tracing::warn!(method = %request.method(), path = %request.uri().path(), %status, "operation refused: {why}");
            refused(status, why)
        }
        None => next.run(request).await,
    }
}

/// A refusal's answer: the status and the reason, as text; with `WWW-Authenticate` on a 401.
pub fn refused(status: StatusCode, why: impl Into<String>) -> Response {
    let mut response = (status, why.into()).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Puts [`guard`] in front of every route of `router`.
pub fn guarded(router: axum::Router, credential: Credential) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(credential, guard))
}

/// A JSON request body, refused with 400 and the reason (which names the field) when it is
/// not the type's, 415 when it is not JSON, 413 when it is too large: axum's own extractor
/// answers a well-formed body of the wrong shape with 422, which scripts read as "try again
/// later" no more than as "you sent it wrong".
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(request: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_refusal(&rejection)),
        }
    }
}

fn json_refusal(rejection: &JsonRejection) -> Response {
    let status = match rejection {
        JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
            StatusCode::BAD_REQUEST
        }
        other => other.status(),
    };
    refused(status, rejection.body_text())
}

/// A request that must carry no body (the query names what it acts on): any body is refused,
/// so that `{"partition": 1}` sent to `POST /pause` cannot pause everything instead.
pub fn refuse_body(body: &[u8], what: &str) -> Option<Response> {
    (!body.is_empty()).then(|| {
        refused(
            StatusCode::BAD_REQUEST,
            format!("{what} takes no body: name what it acts on in the query string"),
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TOKEN: &str = "a-token-of-enough-length";

    #[test]
    fn a_state_change_needs_the_credential_from_the_same_site() {
        let c = Credential::with_token(TOKEN);
        let bearer = format!("Bearer {TOKEN}");
        assert!(c.refusal(&headers(&[("authorization", &bearer)])).is_none());
        assert!(
            c.refusal(&headers(&[
                ("authorization", &bearer),
                ("host", "127.0.0.1:8102"),
                ("origin", "http://127.0.0.1:8102"),
                ("sec-fetch-site", "same-origin"),
            ]))
            .is_none()
        );
        let cases = [
            (vec![], StatusCode::UNAUTHORIZED, "needs the credential"),
            (
                vec![("authorization", "Bearer wrong-token-of-length")],
                StatusCode::FORBIDDEN,
                "not this service's",
            ),
            (
                vec![
                    ("authorization", bearer.as_str()),
                    ("sec-fetch-site", "cross-site"),
                ],
                StatusCode::FORBIDDEN,
                "cross-site",
            ),
            (
                vec![
                    ("authorization", bearer.as_str()),
                    ("host", "127.0.0.1:8102"),
                    ("origin", "http://evil.example"),
                ],
                StatusCode::FORBIDDEN,
                "Origin http://evil.example",
            ),
        ];
        for (given, status, says) in cases {
            let (s, why) = c.refusal(&headers(&given)).unwrap();
            assert_eq!(s, status, "{given:?}: {why}");
            assert!(why.contains(says), "{given:?}: {why}");
            assert!(!why.contains(TOKEN), "{why}");
        }
    }

    #[test]
    fn with_no_credential_configured_every_state_change_is_refused_naming_the_setting() {
        let c = Credential::default();
        let (s, why) = c
            .refusal(&headers(&[(
                "authorization",
                "Bearer anything-at-all-here",
            )]))
            .unwrap();
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(why.contains(TOKEN_VARIABLE), "{why}");
    }

    #[test]
    fn the_token_comes_from_one_setting_and_is_never_shown() {
        assert!(!Credential::load(None, None).unwrap().configured());
        let c = Credential::load(Some(TOKEN), None).unwrap();
        assert!(c.configured() && !format!("{c:?}").contains(TOKEN));
        let short = Credential::load(Some("short"), None)
            .unwrap_err()
            .to_string();
        assert!(
            short.contains(TOKEN_VARIABLE) && !short.contains("short\""),
            "{short}"
        );
        let path = std::env::temp_dir().join(format!("operations-token-{}", std::process::id()));
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        let from_file = Credential::load(None, Some(&path)).unwrap();
        assert!(
            from_file
                .refusal(&headers(&[("authorization", &format!("Bearer {TOKEN}"))]))
                .is_none()
        );
        let both = Credential::load(Some(TOKEN), Some(&path))
            .unwrap_err()
            .to_string();
        assert!(both.contains("both set"), "{both}");
        std::fs::remove_file(&path).unwrap();
        let missing = Credential::load(None, Some(&path)).unwrap_err().to_string();
        assert!(missing.contains(TOKEN_FILE_VARIABLE), "{missing}");
    }
}
