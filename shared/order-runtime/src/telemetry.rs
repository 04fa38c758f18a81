//! Logs and traces, set up once per process.
//!
//! [`build_subscriber`] makes the subscriber (log format, `RUST_LOG` filter, optional OTLP
//! layer); [`init`] installs it and the W3C propagators and returns a guard that flushes
//! spans when dropped. Export follows the standard `OTEL_*` variables: no
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) means no export and no spans at all
//! (a span nobody receives is pure cost; records keep the trace context they came with).
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` pick the sampler, read once by the SDK's
//! own parser; [`crate::trace`] asks the same sampler before it builds a span that continues a
//! record's trace, so a sampled-out record costs no span at all.
//!
//! Spans wait for export in the SDK's batch processor, `OTEL_BSP_MAX_QUEUE_SIZE` of them at most
//! ([`ExportQueue`] counts them). When more are made than the collector takes, the queue is
//! full and spans are shed: a record's span is then not made at all (its trace context travels
//! on unchanged, as a sampled-out one's does), and others are dropped when they end, as the
//! SDK would drop them. What was shed is reported once a minute.
//!
//! The OTLP transport follows `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
//! `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (the default; collectors listen on 4318) or
//! `grpc` (4317). The gRPC exporter runs on a one-thread Tokio runtime of its own, which the
//! SDK's batch thread needs for its connection. Export failures are ours to report
//! ([`Reported`]): the first at once with its likely cause, then at most one line a minute.

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, ShouldSample, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;
use crate::export_queue::ExportQueue;
use crate::sync::Locked;

/// Flushes and shuts down the trace exporter when dropped (keep it alive in `main`).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's runtime, stopped after the last export.
    runtime: Option<tokio::runtime::Runtime>,
    /// The export queue, for the count of spans shed over the process's life.
    queue: Option<Arc<ExportQueue>>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter did not shut down cleanly: {e}");
        }
        if let Some(shed) = self.queue.as_ref().map(|q| q.shed_total())
            && shed > 0
        {
            tracing::warn!(
                spans_shed_total = shed,
                "spans not exported in this run for want of room in the export queue"
            );
        }
        // the guard may be dropped inside another runtime, where a blocking drop would panic
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The OTLP transport, from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
/// `OTEL_EXPORTER_OTLP_PROTOCOL`; `http/protobuf` when neither is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

impl OtlpProtocol {
    /// The protocol the variables ask for; an error naming the variable for a value we do not
    /// speak (`http/json` included: no collector needs it).
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, String> {
        match set_var(vars, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| set_var(vars, "OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            None | Some((_, "http/protobuf")) => Ok(Self::HttpProtobuf),
            Some((_, "grpc")) => Ok(Self::Grpc),
            Some((name, other)) => Err(format!(
                "{name}={other} is not supported: use grpc (collectors listen for it on 4317) or http/protobuf (4318)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        }
    }

    /// The port collectors serve this protocol on, and the other protocol's.
    fn ports(self) -> (u16, u16) {
        match self {
            Self::HttpProtobuf => (4318, 4317),
            Self::Grpc => (4317, 4318),
        }
    }
}

/// `name` and its value, trimmed, when the variable is set and not blank.
fn set_var<'a>(vars: &'a [(String, String)], name: &str) -> Option<(&'a str, &'a str)> {
    vars.iter()
        .find(|(k, v)| k == name && !v.trim().is_empty())
        .map(|(k, v)| (k.as_str(), v.trim()))
}

/// The endpoint the exporter sends to, as the variables give it; empty when none is set.
fn endpoint(vars: &[(String, String)]) -> String {
    set_var(vars, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| set_var(vars, "OTEL_EXPORTER_OTLP_ENDPOINT"))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

/// A warning when the endpoint's port is the other protocol's usual one (4317 is OTLP/gRPC,
/// 4318 OTLP/HTTP): the commonest misconfiguration, which otherwise shows only as failures.
fn port_mismatch(endpoint: &str, protocol: OtlpProtocol) -> Option<String> {
    let (_, other) = protocol.ports();
    let authority = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let port = authority.split(['/', '?']).next()?.rsplit(':').next()?;
    (port == other.to_string()).then(|| {
        format!(
            "port {other} is where collectors serve OTLP/{}, but the protocol is {}: set OTEL_EXPORTER_OTLP_PROTOCOL={}",
            if other == 4317 { "gRPC" } else { "HTTP" },
            protocol.as_str(),
            if other == 4317 { "grpc" } else { "http/protobuf" },
        )
    })
}

/// What an export error most likely means, for the log line.
fn likely_cause(error: &str, endpoint: &str, protocol: OtlpProtocol) -> String {
    if let Some(mismatch) = port_mismatch(endpoint, protocol) {
        return mismatch;
    }
    let e = error.to_ascii_lowercase();
    if e.contains("401")
        || e.contains("403")
        || e.contains("unauthenticated")
        || e.contains("permission")
    {
        "the collector refused the request's credentials (OTEL_EXPORTER_OTLP_HEADERS)".to_owned()
    } else if e.contains("404") || e.contains("unimplemented") {
        format!(
            "{endpoint} answers but not as an OTLP/{} traces endpoint (OTEL_EXPORTER_OTLP_ENDPOINT is the base URL; OTEL_EXPORTER_OTLP_PROTOCOL picks grpc or http/protobuf)",
            if protocol == OtlpProtocol::Grpc {
                "gRPC"
            } else {
                "HTTP"
            }
        )
    } else if e.contains("network")
        || e.contains("connect")
        || e.contains("transport")
        || e.contains("dns")
    {
        format!("no collector answers at {endpoint} (is it running, and is this its address?)")
    } else if e.contains("timed out") || e.contains("timeout") || e.contains("deadline") {
        format!("the collector at {endpoint} is too slow to answer (OTEL_EXPORTER_OTLP_TIMEOUT)")
    } else {
        format!("the collector at {endpoint} did not take the spans")
    }
}

/// The batch processor, with every span it is given counted in the [`ExportQueue`] first, and
/// dropped here when the queue is full (where the SDK would drop it on its own).
#[derive(Debug)]
struct Admitted<P> {
    inner: P,
    queue: Arc<ExportQueue>,
}

impl<P: SpanProcessor> SpanProcessor for Admitted<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queue.admit() {
            self.inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, with failures reported by us: the first at once, with its likely cause,
/// then at most one line a minute counting what failed meanwhile, and one line when export
/// works again. (The SDK's own error line for each failed batch is filtered out of the log.)
/// Spans shed for want of room in the queue are reported likewise, at most once a minute.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    endpoint: String,
    protocol: OtlpProtocol,
    queue: Arc<ExportQueue>,
    state: Mutex<ReportState>,
}

#[derive(Debug, Default)]
struct ReportState {
    /// When the last failure line was written; `None` while export works.
    last_line: Option<Instant>,
    failures_since: u64,
    spans_since: u64,
    /// When the last line about shed spans was written, and the total it gave.
    shed_line: Option<Instant>,
    shed_reported: u64,
}

/// The SDK's event for every failed batch, which [`Reported`] replaces.
const SDK_EXPORT_ERROR: &str = "BatchSpanProcessor.ExportError";
const REPORT_EVERY: Duration = Duration::from_secs(60);

impl<E> Reported<E> {
    fn note(&self, result: &OTelSdkResult, spans: usize) {
        let mut state = self.state.locked();
        let shed = self.queue.shed_total();
        if shed > state.shed_reported && state.shed_line.is_none_or(|t| t.elapsed() >= REPORT_EVERY)
        {
            tracing::warn!(
                spans_shed = shed - state.shed_reported,
                spans_shed_total = shed,
                queue = self.queue.capacity(),
                "spans were not exported: more are made than the collector at {} takes, and its \
                 queue (OTEL_BSP_MAX_QUEUE_SIZE) was full; sample fewer (OTEL_TRACES_SAMPLER, \
                 OTEL_TRACES_SAMPLER_ARG); the next are summed up once a minute",
                self.endpoint
            );
            state.shed_line = Some(Instant::now());
            state.shed_reported = shed;
        }
        match result {
            Ok(()) => {
                if state.last_line.take().is_some() {
                    tracing::info!(endpoint = %self.endpoint, "trace export works again");
                }
                state.failures_since = 0;
                state.spans_since = 0;
            }
            Err(e) => {
                state.failures_since += 1;
                state.spans_since += u64::try_from(spans).unwrap_or(u64::MAX);
                if state.last_line.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                    let error = e.to_string();
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        protocol = self.protocol.as_str(),
                        error = %error,
                        failed_exports = state.failures_since,
                        spans_lost = state.spans_since,
                        "trace export failed: {}; the next failures are summed up once a minute",
                        likely_cause(&error, &self.endpoint, self.protocol)
                    );
                    state.last_line = Some(Instant::now());
                    state.failures_since = 0;
                    state.spans_since = 0;
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reported<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len();
        self.queue.release(spans);
        async move {
            let result = self.inner.export(batch).await;
            self.note(&result, spans);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// True when the standard variables ask for trace export.
pub fn export_configured(vars: &[(String, String)]) -> bool {
    !endpoint(vars).is_empty()
        && set_var(vars, "OTEL_TRACES_EXPORTER").map(|(_, v)| v) != Some("none")
}

/// The sampler of `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, parsed by the SDK (which
/// warns about a bad value and falls back to `parentbased_always_on`, its default).
pub fn sampler_from_env() -> Box<dyn ShouldSample> {
    opentelemetry_sdk::trace::Config::default().sampler
}

/// Whether the sampler `OTEL_TRACES_SAMPLER` names follows a remote parent's decision: the
/// `parentbased_*` ones, and the SDK's default and fallback (`parentbased_always_on`).
pub fn parent_based(vars: &[(String, String)]) -> bool {
    !vars.iter().any(|(k, v)| {
        k == "OTEL_TRACES_SAMPLER"
            && matches!(v.trim(), "always_on" | "always_off" | "traceidratio")
    })
}

/// A tracer provider and what goes with it.
#[derive(Debug)]
pub struct Tracing {
    pub provider: SdkTracerProvider,
    /// For gRPC, the exporter's runtime, which must outlive the provider.
    pub runtime: Option<tokio::runtime::Runtime>,
    /// The export queue's count, when spans are exported.
    pub queue: Option<Arc<ExportQueue>>,
}

/// The tracer provider, with `sampler`; it exports over OTLP (`protocol`, the endpoint and the
/// rest from the `OTEL_EXPORTER_OTLP_*` variables) only when `export` is given.
pub fn tracer_provider(
    service_name: &'static str,
    export: Option<(OtlpProtocol, String)>,
    sampler: Box<dyn ShouldSample>,
) -> anyhow::Result<Tracing> {
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", instance_id()),
    ]);
    // OTEL_SERVICE_NAME wins over the built-in name (the env detector has already read it)
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_sampler(sampler);
    let (mut runtime, mut queue) = (None, None);
    if let Some((protocol, endpoint)) = export {
        // the exporter reads endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_*
        // variables itself
        let exporter = match protocol {
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()?,
            OtlpProtocol::Grpc => {
                // the SDK's batch thread drives exports with a plain executor; tonic's
                // connection needs a Tokio reactor, which this runtime keeps
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-grpc")
                    .enable_all()
                    .build()?;
                let exporter = {
                    let _in_runtime = rt.enter();
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .build()?
                };
                runtime = Some(rt);
                exporter
            }
        };
        let counted = Arc::new(ExportQueue::from_env());
        // the queue's size is the one counted; the other OTEL_BSP_* the SDK reads itself
        let batch = BatchSpanProcessor::builder(Reported {
            inner: exporter,
            endpoint,
            protocol,
            queue: counted.clone(),
            state: Mutex::default(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(counted.capacity())
                .build(),
        )
        .build();
        builder = builder.with_span_processor(Admitted {
            inner: batch,
            queue: counted.clone(),
        });
        queue = Some(counted);
    }
    Ok(Tracing {
        provider: builder.build(),
        runtime,
        queue,
    })
}

/// Host name, pid and a random part, the same for the whole process: readable in Jaeger, and
/// unique per replica even where replicas share both host name and pid (containers on the
/// host network all have the host's name and pid 1), since the exactly-once processor's
/// `transactional.id` is built from it and two producers with one id fence each other.
pub fn instance_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".to_owned());
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}-{}", std::process::id(), &random[..8])
    })
    .clone()
}

/// `RUST_LOG`, `info` when unset or unreadable.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The subscriber for `format`, filtered by `filter`, with the OpenTelemetry layer of
/// `provider` when there is one. Without it spans go nowhere; [`crate::trace`] makes none per
/// record then.
pub fn build_subscriber(
    service_name: &'static str,
    format: LogFormat,
    filter: EnvFilter,
    provider: Option<&SdkTracerProvider>,
) -> impl Subscriber + Send + Sync + for<'a> LookupSpan<'a> {
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    }
    // Spans go to OpenTelemetry only. The log layer would format every span's fields when the
    // span is made, which for a span per record cost more than the record's processing; log
    // lines about a record name its
    // `trace_id` as a field instead.
    .with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.is_event() && m.name() != SDK_EXPORT_ERROR
    }));
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name))
            .with_error_records_to_exceptions(true)
    });
    // The filter goes on the outside. Below the OpenTelemetry layer (which gives no level
    // hint) it would leave the subscriber without one next to the log layer's per-layer filter,
    // so tracing's global maximum would be TRACE whatever `RUST_LOG` says, and
    // `level_enabled!` would be true for levels that are filtered out.
    Registry::default().with(fmt).with(otel).with(filter)
}

/// W3C trace context and baggage, the propagators every service uses for Kafka headers.
pub fn install_propagators() {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
}

/// Installs logging and tracing for the process. Call once, first thing in `main`.
pub fn init(
    service_name: &'static str,
    format: LogFormat,
    vars: &[(String, String)],
) -> anyhow::Result<TelemetryGuard> {
    install_propagators();
    let protocol = OtlpProtocol::from_vars(vars).map_err(anyhow::Error::msg)?;
    let endpoint = endpoint(vars);
    let (provider, runtime, queue) = if export_configured(vars) {
        let sampler = sampler_from_env();
        let Tracing {
            provider,
            runtime,
            queue,
        } = tracer_provider(
            service_name,
            Some((protocol, endpoint.clone())),
            sampler.clone(),
        )?;
        opentelemetry::global::set_tracer_provider(provider.clone());
        crate::trace::enable_spans(
            sampler,
            parent_based(vars),
            provider.tracer(service_name),
            queue.clone(),
        );
        (Some(provider), runtime, queue)
    } else {
        (None, None, None)
    };
    tracing::subscriber::set_global_default(build_subscriber(
        service_name,
        format,
        env_filter(),
        provider.as_ref(),
    ))?;
    if provider.is_some()
        && let Some(mismatch) = port_mismatch(&endpoint, protocol)
    {
        tracing::warn!(endpoint = %endpoint, "trace export will likely fail: {mismatch}");
    }
    Ok(TelemetryGuard {
        provider,
        runtime,
        queue,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn the_export_queue_admits_up_to_its_size_and_counts_what_it_sheds() {
        let q = ExportQueue::new(2);
        assert!(q.has_room());
        assert!(q.admit() && q.admit());
        assert!(!q.has_room());
        assert!(!q.admit(), "full");
        q.shed();
        assert_eq!(q.shed_total(), 2, "a span refused and one not made");
        q.release(1);
        assert!(q.has_room() && q.admit());
        // a count never wraps below zero, which would shed every span after
        q.release(5);
        assert!(q.has_room() && q.admit() && q.admit() && !q.admit());
        assert_eq!(q.shed_total(), 3);
    }

    #[test]
    fn the_instance_id_is_one_per_process_and_not_just_host_and_pid() {
        let id = instance_id();
        assert_eq!(id, instance_id());
        let pid = format!("-{}-", std::process::id());
        let (_, random) = id.rsplit_once(&pid).unwrap();
        assert_eq!(random.len(), 8, "{id}");
        assert!(random.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }

    /// The subscriber's level hint becomes tracing's global maximum, which `level_enabled!`
    /// reads: it must follow `RUST_LOG`, so that filtered-out spans cost nothing to skip.
    #[test]
    fn level_hint_follows_the_filter() {
        let provider = tracer_provider("test", None, sampler_from_env())
            .unwrap()
            .provider;
        for (directives, level) in [
            ("warn", LevelFilter::WARN),
            ("info", LevelFilter::INFO),
            ("error,order_processor=debug", LevelFilter::DEBUG),
        ] {
            for format in [LogFormat::Pretty, LogFormat::Json] {
                for provider in [Some(&provider), None] {
                    let subscriber =
                        build_subscriber("test", format, EnvFilter::new(directives), provider);
                    assert_eq!(subscriber.max_level_hint(), Some(level), "{directives}");
                }
            }
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_protocol_comes_from_the_traces_variable_then_the_general_one() {
        assert_eq!(OtlpProtocol::from_vars(&[]), Ok(OtlpProtocol::HttpProtobuf));
        let grpc = vars(&[("OTEL_EXPORTER_OTLP_PROTOCOL", " grpc ")]);
        assert_eq!(OtlpProtocol::from_vars(&grpc), Ok(OtlpProtocol::Grpc));
        let both = vars(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(
            OtlpProtocol::from_vars(&both),
            Ok(OtlpProtocol::HttpProtobuf)
        );
        let empty = vars(&[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", ""),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(OtlpProtocol::from_vars(&empty), Ok(OtlpProtocol::Grpc));
        let json = vars(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]);
        let e = OtlpProtocol::from_vars(&json).unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json is not supported"),
            "{e}"
        );
    }

    #[test]
    fn export_needs_an_endpoint_and_no_exporter_none() {
        assert!(!export_configured(&[]));
        assert!(!export_configured(&vars(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        let http = vars(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )]);
        assert!(export_configured(&http));
        assert_eq!(endpoint(&http), "http://c:4318/v1/traces");
        let off = vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none "),
        ]);
        assert!(!export_configured(&off));
        let both = vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318"),
        ]);
        assert_eq!(endpoint(&both), "http://traces:4318");
    }

    #[test]
    fn a_port_of_the_other_protocol_is_named() {
        let http = OtlpProtocol::HttpProtobuf;
        let grpc = OtlpProtocol::Grpc;
        let m = port_mismatch("http://collector:4317", http).unwrap();
        assert!(m.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{m}");
        let m = port_mismatch("http://10.0.0.1:4318/", grpc).unwrap();
        assert!(
            m.contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"),
            "{m}"
        );
        for (endpoint, protocol) in [
            ("http://collector:4318", http),
            ("http://collector:4317", grpc),
            ("https://otlp.example.com", http),
            ("http://collector:14317/v1", http),
            ("", grpc),
        ] {
            assert_eq!(port_mismatch(endpoint, protocol), None, "{endpoint}");
        }
    }

    #[test]
    fn export_errors_are_explained() {
        let http = OtlpProtocol::HttpProtobuf;
        let at = "http://collector:4318";
        for (error, expected) in [
            (
                "HTTP export failed: network error",
                "no collector answers at http://collector:4318",
            ),
            (
                "HTTP export failed with status code: 404",
                "not as an OTLP/HTTP traces endpoint",
            ),
            ("HTTP export failed with status code: 401", "credentials"),
            ("request timed out", "too slow"),
            ("something else", "did not take the spans"),
        ] {
            let cause = likely_cause(error, at, http);
            assert!(cause.contains(expected), "{error}: {cause}");
        }
        let cause = likely_cause("transport error", "http://collector:4317", http);
        assert!(
            cause.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
            "{cause}"
        );
    }

    /// Without an exporter the per-record spans are not made, whatever the level (no test in
    /// this binary turns spans on).
    #[test]
    fn without_export_no_record_span_is_made() {
        let subscriber = build_subscriber("test", LogFormat::Json, EnvFilter::new("info"), None);
        tracing::subscriber::with_default(subscriber, || {
            assert!(crate::trace::producer_span("orders", "key").is_none());
            assert!(!crate::trace::recording());
            assert!(
                tracing::level_enabled!(tracing::Level::INFO),
                "events still log"
            );
        });
    }
}
