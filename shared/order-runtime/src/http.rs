//! The HTTP surface every service shares: `/healthz`, `/readyz`, `/metrics`.
//!
//! A service builds [`router`] with its [`Probe`] and metrics registry, merges its own routes
//! (`/stats`, `/report`) and serves it with [`serve`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports: each named condition must hold for the service to be ready.
#[derive(Debug, Default)]
pub struct Probe {
    conditions: std::sync::Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
    /// A state worth knowing that does not make the service unready (for example paused
    /// consumption); `/readyz` adds it to its answer.
    note: std::sync::Mutex<Option<String>>,
    /// Dependencies that can refuse the service's credentials, each with whether it does now
    /// (`service_dependency_refused` in `/metrics`).
    refusals: std::sync::Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
}

impl Probe {
    /// Adds a condition (false until set) and returns its flag.
    pub fn condition(&self, name: &'static str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut c) = self.conditions.lock() {
            c.push((name, flag.clone()));
        }
        flag
    }

    /// Adds a dependency whose refusal of our credentials is reported (false until set).
    pub fn refusal(&self, dependency: &'static str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut r) = self.refusals.lock() {
            r.push((dependency, flag.clone()));
        }
        flag
    }

    /// Sets (or clears) what `/readyz` adds to its answer.
    pub fn set_note(&self, note: Option<String>) {
        if let Ok(mut n) = self.note.lock() {
            *n = note;
        }
    }

    /// Names of the conditions that do not hold; empty means ready.
    pub fn unmet(&self) -> Vec<&'static str> {
        self.conditions
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(_, f)| !f.load(Ordering::Acquire))
                    .map(|(n, _)| *n)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct Shared {
    probe: Arc<Probe>,
    registry: Arc<Registry>,
}

/// `service_ready` in `/metrics`: what `/readyz` answers, as 1 or 0, read at each scrape, so
/// that an alert sees a replica that is up but not ready (Kubernetes only takes it out of its
/// Service). Beside it `service_dependency_refused{dependency}`: why, when a dependency refuses
/// the service's credentials.
#[derive(Debug)]
struct Readiness(Arc<Probe>);

impl prometheus_client::collector::Collector for Readiness {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let ready = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(
            self.0.unmet().is_empty(),
        ));
        let metric = encoder.encode_descriptor(
            "service_ready",
            "1 when /readyz answers 200 (every readiness condition holds), else 0",
            None,
            ready.metric_type(),
        )?;
        ready.encode(metric)?;
        let refusals: Vec<(&'static str, bool)> = self
            .0
            .refusals
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(d, f)| (*d, f.load(Ordering::Acquire)))
                    .collect()
            })
            .unwrap_or_default();
        if refusals.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "service_dependency_refused",
            "1 while a dependency refuses this service's credentials (the schema registry's 401 or 403), else 0",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (dependency, refused) in refusals {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(refused));
            gauge.encode(family.encode_family(&[("dependency", dependency)])?)?;
        }
        Ok(())
    }
}

/// `trace_spans_shed_total` and `trace_export_queue_spans`: the spans not exported for want
/// of room in the export queue, and the spans waiting in it, read at each scrape
/// ([`crate::telemetry::ExportQueue`]); absent when no spans are exported.
#[derive(Debug)]
struct SpanExport;

impl prometheus_client::collector::Collector for SpanExport {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Some(queue) = crate::trace::export_queue() else {
            return Ok(());
        };
        let shed = prometheus_client::metrics::counter::ConstCounter::new(queue.shed_total());
        shed.encode(encoder.encode_descriptor(
            "trace_spans_shed",
            "spans not exported because the export queue (OTEL_BSP_MAX_QUEUE_SIZE) was full: not made, or dropped when they ended",
            None,
            shed.metric_type(),
        )?)?;
        let waiting = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(queue.queued()).unwrap_or(i64::MAX),
        );
        waiting.encode(encoder.encode_descriptor(
            "trace_export_queue_spans",
            "spans waiting in the export queue, not yet handed to the exporter",
            None,
            waiting.metric_type(),
        )?)
    }
}

/// `/healthz`, `/readyz` and `/metrics` over the given probe and metrics (to which
/// `service_ready` is added, and the span export queue's metrics when spans are exported).
pub fn router(probe: Arc<Probe>, mut registry: Registry) -> Router {
    registry.register_collector(Box::new(Readiness(probe.clone())));
    registry.register_collector(Box::new(SpanExport));
    let registry = Arc::new(registry);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Shared { probe, registry })
}

async fn readyz(State(s): State<Shared>) -> Response {
    let unmet = s.probe.unmet();
    let note = s
        .probe
        .note
        .lock()
        .ok()
        .and_then(|n| n.clone())
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    if unmet.is_empty() {
        (StatusCode::OK, format!("ready{note}")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}{note}", unmet.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut body = String::with_capacity(8 * 1024);
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// An HTTP client builder for a service at `url` (the status page's analyzer, Jaeger's query
/// API): a plain `http://` URL gets no root certificates (loading the system's bundle costs
/// memory in every client and fails where an image has none), `https://` the platform's
/// verifier.
pub fn client_builder(url: &str) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    let plain = url
        .trim()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
    if plain {
        builder.tls_certs_only(std::iter::empty())
    } else {
        builder
    }
}

/// Binds `127.0.0.1:0`-style addresses too: the caller reads the real port from the listener.
/// With a `port_file` (`HTTP_PORT_FILE`), the bound port is written there for `healthcheck`.
pub async fn bind(port: u16, port_file: Option<&Path>) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    if let Some(path) = port_file {
        let bound = listener.local_addr()?.port();
        std::fs::write(path, format!("{bound}\n")).map_err(|e| {
            std::io::Error::new(e.kind(), format!("HTTP_PORT_FILE {}: {e}", path.display()))
        })?;
    }
    Ok(listener)
}

/// Serves `app` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Keeps the `broker reachable` and `schema registry reachable` conditions of `probe` current:
/// checked now and then every `every` until `shutdown`. `broker_answers` runs on a blocking
/// thread and asks the cluster over the service's own client ([`crate::kafka::cluster_answers`]);
/// the registry is asked for its schema types, an answer that does not grow with the registry.
pub fn watch_dependencies(
    probe: &Probe,
    common: &crate::config::CommonConfig,
    broker_answers: impl Fn() -> bool + Send + Sync + 'static,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let broker = probe.condition("broker reachable");
    let registry = probe.condition("schema registry reachable");
    let registry_refused = probe.refusal("schema_registry");
    let access = common.registry.clone();
    let client = access
        .client_builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no HTTP client for the registry check: /readyz will report the registry unreachable");
        })
        .ok();
    let types = format!("{}/schemas/types", access.url());
    let broker_answers = Arc::new(broker_answers);
    tokio::spawn(async move {
        let mut refused_said: Option<std::time::Instant> = None;
        loop {
            let answers = broker_answers.clone();
            let broker_ok = tokio::task::spawn_blocking(move || answers())
                .await
                .unwrap_or(false);
            broker.store(broker_ok, Ordering::Release);
            let status = match &client {
                Some(client) => access
                    .authorize(client.get(&types))
                    .send()
                    .await
                    .map(|r| r.status())
                    .ok(),
                None => None,
            };
            let registry_ok = status.is_some_and(|s| s.is_success());
            // a refusal is worth saying (a rotated password, a revoked token): the first, then
            // once a minute while it lasts; records wait meanwhile, as for an unreachable registry
            let refused = status.filter(|s| s.as_u16() == 401 || s.as_u16() == 403);
            registry_refused.store(refused.is_some(), Ordering::Release);
            if let Some(s) = refused {
                if refused_said.is_none_or(|t: std::time::Instant| {
                    t.elapsed() >= std::time::Duration::from_secs(60)
                }) {
                    tracing::warn!(
                        status = s.as_u16(),
                        url = access.url(),
                        "the schema registry refuses our credentials: records that need it wait; check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO or SCHEMA_REGISTRY_BEARER_AUTH_TOKEN"
                    );
                    refused_said = Some(std::time::Instant::now());
                }
            } else {
                refused_said = None;
            }
            registry.store(registry_ok, Ordering::Release);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// `<service> healthcheck`: asks the service on this host (the port in `HTTP_PORT_FILE` when
/// that is set, else `HTTP_PORT`, else `default_port`) for `/readyz` and exits 0 when it answers
/// 200. Container images have no curl or wget, so Docker and Compose health checks run the
/// binary itself.
pub fn healthcheck_command(default_port: u16) -> std::process::ExitCode {
    use std::io::{Read as _, Write as _};
    let from_file = std::env::var_os("HTTP_PORT_FILE")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|p| p.trim().parse::<u16>().ok());
    let port = from_file
        .or_else(|| std::env::var("HTTP_PORT").ok()?.parse::<u16>().ok())
        .unwrap_or(default_port);
    let timeout = std::time::Duration::from_secs(2);
    let answer = (|| -> std::io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })();
    match answer {
        Ok(r) if r.starts_with("HTTP/1.1 200") => std::process::ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("{}", r.lines().last().unwrap_or("not ready"));
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("no answer on port {port}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        let res = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn bind_writes_the_bound_port_where_healthcheck_reads_it() {
        let dir = std::env::temp_dir().join(format!("order-runtime-port-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("http-port");
        let listener = bind(0, Some(&path)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{port}\n"));
        // a file that cannot be written stops the start, naming the variable
        let err = bind(0, Some(&dir.join("no-such-dir/http-port")))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("HTTP_PORT_FILE "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn readiness_follows_every_condition() {
        let probe = Arc::new(Probe::default());
        let broker = probe.condition("broker");
        let assigned = probe.condition("partitions assigned");
        let app = router(probe, Registry::default());

        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready: broker, partitions assigned");
        assert!(
            get(&app, "/metrics")
                .await
                .1
                .contains("\nservice_ready 0\n")
        );

        broker.store(true, Ordering::Release);
        assert_eq!(
            get(&app, "/readyz").await.1,
            "not ready: partitions assigned"
        );
        assigned.store(true, Ordering::Release);
        assert_eq!(
            get(&app, "/readyz").await,
            (StatusCode::OK, "ready".to_owned())
        );
        let metrics = get(&app, "/metrics").await.1;
        assert!(
            metrics.contains("# TYPE service_ready gauge\nservice_ready 1\n"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_refusing_dependency_shows_in_the_metrics_while_it_lasts() {
        let probe = Arc::new(Probe::default());
        let refused = probe.refusal("schema_registry");
        let app = router(probe, Registry::default());
        let series = "service_dependency_refused{dependency=\"schema_registry\"}";
        let metrics = get(&app, "/metrics").await.1;
        assert!(metrics.contains(&format!("\n{series} 0\n")), "{metrics}");
        refused.store(true, Ordering::Release);
        let metrics = get(&app, "/metrics").await.1;
        assert!(metrics.contains(&format!("\n{series} 1\n")), "{metrics}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("orders_test", "a test counter", counter.clone());
        counter.inc_by(3);
        let app = router(Arc::new(Probe::default()), registry);
        let (status, body) = get(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("orders_test_total 3"), "{body}");
    }
}
