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

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{SdkTracerProvider, ShouldSample};
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

/// The tracer provider, with `sampler`; it exports over OTLP/HTTP only when `export` is true.
pub fn tracer_provider(
    service_name: &'static str,
    export: bool,
    sampler: Box<dyn ShouldSample>,
) -> anyhow::Result<SdkTracerProvider> {
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
    if export {
        // http/protobuf is the OTLP default; the exporter reads endpoint, headers and timeout
        // from the OTEL_EXPORTER_OTLP_* variables itself
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
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
    // span is made, which for a span per record cost more than the record's processing (make
    // bench: 158k records/s with it, 218k without); log lines about a record name its
    // `trace_id` as a field instead.
    .with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_event()));
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
    let provider = if export_configured(vars) {
        let sampler = sampler_from_env();
        let provider = tracer_provider(service_name, true, sampler.clone())?;
        opentelemetry::global::set_tracer_provider(provider.clone());
        crate::trace::enable_spans(sampler, parent_based(vars));
        Some(provider)
    } else {
        None
    };
    tracing::subscriber::set_global_default(build_subscriber(
        service_name,
        format,
        env_filter(),
        provider.as_ref(),
    ))?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tracing::level_filters::LevelFilter;

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
        let provider = tracer_provider("test", false, sampler_from_env()).unwrap();
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
