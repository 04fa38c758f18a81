//! Logs and traces, set up once per process.
//!
//! [`build_subscriber`] makes the subscriber (log format, `RUST_LOG` filter, optional OTLP
//! layer); [`init`] installs it and the W3C propagators and returns a guard that flushes
//! spans when dropped. Export follows the standard `OTEL_*` variables: no
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) means no export at all.

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Flushes and shuts down the trace exporter when dropped (keep it alive in `main`).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter did not shut down cleanly: {e}");
        }
    }
}

/// True when the standard variables ask for trace export.
pub fn export_configured(vars: &[(String, String)]) -> bool {
    vars.iter().any(|(k, v)| {
        (k == "OTEL_EXPORTER_OTLP_ENDPOINT" || k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            && !v.trim().is_empty()
    }) && !vars
        .iter()
        .any(|(k, v)| k == "OTEL_TRACES_EXPORTER" && v.trim() == "none")
}

fn tracer_provider(service_name: &'static str) -> anyhow::Result<SdkTracerProvider> {
    // http/protobuf is the OTLP default; the exporter reads endpoint, headers and timeout from
    // the OTEL_EXPORTER_OTLP_* variables itself
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", instance_id()),
    ]);
    // OTEL_SERVICE_NAME wins over the built-in name (the env detector has already read it)
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Host name and pid: unique per replica, readable in Jaeger.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}-{}", std::process::id())
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The subscriber for `format`, with an OpenTelemetry layer when `provider` is given.
pub fn build_subscriber(
    service_name: &'static str,
    format: LogFormat,
    provider: Option<&SdkTracerProvider>,
) -> impl Subscriber + Send + Sync + for<'a> LookupSpan<'a> {
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    };
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name))
            .with_error_records_to_exceptions(true)
    });
    Registry::default().with(filter()).with(fmt).with(otel)
}

/// Installs logging and tracing for the process. Call once, first thing in `main`.
pub fn init(
    service_name: &'static str,
    format: LogFormat,
    vars: &[(String, String)],
) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let provider = if export_configured(vars) {
        Some(tracer_provider(service_name)?)
    } else {
        None
    };
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    tracing::subscriber::set_global_default(build_subscriber(
        service_name,
        format,
        provider.as_ref(),
    ))?;
    Ok(TelemetryGuard { provider })
}
