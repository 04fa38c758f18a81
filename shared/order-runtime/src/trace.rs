//! W3C trace context (`traceparent`, `tracestate`, `baggage`) in Kafka record headers.
//!
//! Producers inject the current span's context with [`inject`]; consumers read it back with
//! [`extract`] and make it the parent of their processing span, so one order is one trace
//! across the three services.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Header names the propagators own; copies of a record's headers leave these out so that the
/// context written is the current one, not a stale one.
pub const PROPAGATION_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];

struct Collect(Vec<(String, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Adds the context of `span` to `headers`.
pub fn inject(span: &tracing::Span, mut headers: OwnedHeaders) -> OwnedHeaders {
    let cx = span.context();
    let mut collected = Collect(Vec::with_capacity(3));
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut collected));
    for (key, value) in &collected.0 {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

struct HeaderView<'a, H: Headers>(&'a H);

impl<H: Headers> Extractor for HeaderView<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The context carried by a record's headers (empty when there is none).
pub fn extract<H: Headers>(headers: Option<&H>) -> Context {
    match headers {
        Some(h) => opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderView(h))),
        None => Context::new(),
    }
}

/// Makes `parent` the parent of `span`, links to it too (a consumer span is both a child of the
/// send and, per the messaging conventions, linked to it) and records the trace and span ids
/// on the span so that every log line inside it leads to the trace.
pub fn adopt(span: &tracing::Span, parent: &Context) {
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        let _ = span.set_parent(parent.clone());
        span.add_link(remote);
    }
    record_ids(span);
}

/// Writes the span's OpenTelemetry ids into its `trace_id` and `span_id` fields (declared
/// `Empty` where the span is made), so JSON logs carry them.
pub fn record_ids(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// The trace id of `span` in hex, when it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id a context carries (for example one extracted from headers), in hex.
pub fn context_trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
