//! W3C trace context (`traceparent`, `tracestate`, `baggage`) in Kafka record headers.
//!
//! Producers inject the current span's context with [`inject`]; consumers read it back with
//! [`extract`] and make it the parent of their processing span, so one order is one trace
//! across the three services.
//!
//! Spans are made only when traces are exported ([`enable_spans`], called by
//! [`crate::telemetry::init`]), and a span that continues a record's trace only when the
//! sampler keeps it: a record whose trace was sampled out upstream costs no span here, and the
//! context it came with travels on unchanged ([`inject_or_carry`]), so the services after
//! this one sample it out too. So does a record whose span would find the export queue full
//! ([`crate::telemetry::ExportQueue`]), counted as shed.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A record's trace context, as [`consumer_context`] gives it and [`in_context`] takes it.
pub use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{KeyValue, StringValue};
use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::export_queue::ExportQueue;
use crate::sync::Locked;

/// The exporting tracer provider's sampler; unset when nothing is exported (no spans then).
static SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();
/// Whether that sampler follows a remote parent's sampled flag (`parentbased_*`).
static PARENT_BASED: AtomicBool = AtomicBool::new(false);
/// The exporting provider's tracer, for the spans made without `tracing` ([`consumer_context`]).
static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();
/// The spans waiting for export, where a record's span is not made when there is no room.
static QUEUE: OnceLock<Arc<ExportQueue>> = OnceLock::new();

/// Turns spans on, with the sampler the tracer provider uses; `parent_based` when it follows
/// the parent's decision; `queue` the provider's export queue. Once per process.
pub fn enable_spans(
    sampler: Box<dyn ShouldSample>,
    parent_based: bool,
    tracer: opentelemetry_sdk::trace::SdkTracer,
    queue: Option<Arc<ExportQueue>>,
) {
    let _ = TRACER.set(tracer);
    if let Some(queue) = queue {
        let _ = QUEUE.set(queue);
    }
    if SAMPLER.set(sampler).is_ok() {
        PARENT_BASED.store(parent_based, Ordering::Relaxed);
    }
}

/// The export queue of the spans this process exports; `None` when it exports none.
pub fn export_queue() -> Option<&'static ExportQueue> {
    QUEUE.get().map(Arc::as_ref)
}

/// The `traceparent` header's value, for [`consumer_context`] (a consumer that can look a header
/// up by name more cheaply gives its own).
pub fn traceparent<H: Headers>(headers: Option<&H>) -> Option<&[u8]> {
    headers.and_then(|h| value_of(h, "traceparent"))
}

/// The value of the first header called `key`, the case of its name ignored (as the
/// propagators read them).
fn value_of<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key))
        .and_then(|h| h.value)
}

/// A plainly valid W3C version-00 `traceparent`: its trace id (32 lowercase or uppercase hex
/// digits, not all zero) and its flags' last hex digit. `None` for anything else.
fn parse_traceparent(v: &[u8]) -> Option<(&[u8], u8)> {
    // 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>. Folds without an early exit, so
    // that each loop compiles to vector code: it runs on every record when a share is sampled
    // upstream
    let hex = |b: &[u8]| b.iter().fold(true, |ok, c| ok & c.is_ascii_hexdigit());
    let nonzero = |b: &[u8]| b.iter().fold(false, |any, c| any | (*c != b'0'));
    (v.len() == 55
        && v.starts_with(b"00-")
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && nonzero(&v[3..35])
        && hex(&v[36..52])
        && nonzero(&v[36..52])
        && hex(&v[53..55]))
    .then(|| (&v[3..35], v[54]))
}

/// A traceparent as [`parse_traceparent`] takes it, and in lowercase: one whose ids read the same
/// directly as through the propagator (which refuses upper case).
fn lowercase_traceparent(v: &[u8]) -> Option<(&[u8], u8)> {
    parse_traceparent(v).filter(|_| !v.iter().any(u8::is_ascii_uppercase))
}

/// Whether a record's `traceparent` (W3C version 00) says its trace was sampled out: the
/// cheap test before the full extraction, for the common case of a parent-based sampler at a
/// low ratio. `false` whenever the header is missing or not plainly valid.
fn sampled_out_upstream(traceparent: Option<&[u8]>) -> bool {
    traceparent
        .and_then(parse_traceparent)
        .is_some_and(|(_, flags)| {
            matches!(
                flags,
                b'0' | b'2' | b'4' | b'6' | b'8' | b'a' | b'c' | b'e' | b'A' | b'C' | b'E'
            )
        })
}

/// The trace id (hex) of the context in a record's headers, as [`extract`] would find it: a
/// plain lowercase version-00 `traceparent` is read directly, without building a context,
/// anything else goes through the propagator.
pub fn headers_trace_id<H: Headers>(headers: Option<&H>) -> Option<String> {
    let tp = traceparent(headers)?;
    match lowercase_traceparent(tp) {
        Some((id, _)) => std::str::from_utf8(id).ok().map(str::to_owned),
        None => context_trace_id(&extract(headers)),
    }
}

/// Whether the sampler keeps a span named `name` that continues `parent`. A root (no valid
/// parent) is left to the SDK, which picks its trace id.
fn keeps(sampler: &dyn ShouldSample, parent: &Context, name: &str, kind: &SpanKind) -> bool {
    let span = parent.span();
    let sc = span.span_context();
    !sc.is_valid()
        || sampler
            .should_sample(Some(parent), sc.trace_id(), name, kind, &[], &[])
            .decision
            != SamplingDecision::Drop
}

/// True when spans are made and the current span is one: the test before a child span (an
/// attempt, a backoff, a dead letter's send), so that a record whose processing span was
/// sampled out gets no orphan spans either.
pub fn recording() -> bool {
    SAMPLER.get().is_some()
        && (!tracing::Span::current().is_none() || Context::map_current(Context::has_active_span))
}

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
pub fn inject(span: &tracing::Span, headers: OwnedHeaders) -> OwnedHeaders {
    inject_context(&span.context(), headers)
}

/// Adds the context of `span` to `headers`, or, when there is no span (none made, or sampled
/// out), the trace context headers of `original` as they were.
pub fn inject_or_carry<H: Headers>(
    span: &tracing::Span,
    mut headers: OwnedHeaders,
    original: Option<&H>,
) -> OwnedHeaders {
    if !span.is_none() {
        return inject(span, headers);
    }
    for h in original.into_iter().flat_map(Headers::iter) {
        if PROPAGATION_HEADERS.contains(&h.key) {
            headers = headers.insert(h);
        }
    }
    headers
}

fn inject_context(cx: &Context, mut headers: OwnedHeaders) -> OwnedHeaders {
    let mut collected = Collect(Vec::with_capacity(3));
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut collected));
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
        value_of(self.0, key).and_then(|v| std::str::from_utf8(v).ok())
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

/// The CONSUMER span for processing one record, named and attributed by the messaging
/// semantic conventions (`process <topic>`), continuing the trace of the record's producer, in
/// the context to process the record in ([`in_context`]). `None` when spans are off, when
/// the sampler drops the record's trace, or when the export queue has no room for the span. `traceparent` gives the record's header of that name
/// ([`traceparent`] finds it); it is asked only when spans are on, as reading a record's
/// headers makes librdkafka parse them all.
///
/// The span is made with the OpenTelemetry SDK, not through `tracing`: with every record
/// traced, a `tracing` span per record (registry, filter, the bridge's attribute visitor, its
/// enter and exit clocks) held the processor to about half the rate of this. `tracing` spans
/// made inside, such as
/// an attempt's or a dead letter's send, are its children all the same (the bridge takes the
/// current OpenTelemetry context as their parent), and [`set_attribute`], [`set_error`] and
/// [`current_trace_id`] reach it.
pub fn consumer_context<'m, M: rdkafka::Message>(
    msg: &'m M,
    spans: &ConsumerSpans,
    traceparent: impl FnOnce(&'m M) -> Option<&'m [u8]>,
) -> Option<Context> {
    let (Some(sampler), Some(tracer)) = (SAMPLER.get(), TRACER.get()) else {
        return None;
    };
    if !tracing::level_enabled!(tracing::Level::INFO) {
        return None;
    }
    let tp = traceparent(msg);
    if PARENT_BASED.load(Ordering::Relaxed) && sampled_out_upstream(tp) {
        return None;
    }
    let parent = parent_context(msg.headers(), tp);
    if !keeps(sampler.as_ref(), &parent, "process", &SpanKind::Consumer) {
        return None;
    }
    // a span that would find the export queue full is not made: the SDK would drop it when it
    // ends, after all the work of making it
    if let Some(queue) = QUEUE.get()
        && !queue.has_room()
    {
        queue.shed();
        return None;
    }
    // what the spans of this consumer share is made once ([`ConsumerSpans`]) and shared here;
    // per record, only the key (and a partition past those made ahead) is a new string
    let topic = msg.topic();
    let own_topic = spans.topic.as_str() == topic;
    let key = msg
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .unwrap_or("");
    let size = msg.payload().map_or(0, <[u8]>::len);
    let partition = usize::try_from(msg.partition())
        .ok()
        .and_then(|p| spans.partitions.get(p))
        .map_or_else(
            || StringValue::from(msg.partition().to_string()),
            StringValue::clone,
        );
    let destination = if own_topic {
        spans.topic.clone()
    } else {
        StringValue::from(topic.to_owned())
    };
    // room for the `order.id` or `error.type` set later, which would otherwise reallocate
    let mut attributes = Vec::with_capacity(11);
    attributes.extend([
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.destination.name", destination),
        KeyValue::new("messaging.destination.partition.id", partition),
        KeyValue::new("messaging.kafka.offset", msg.offset()),
        KeyValue::new("messaging.kafka.message.key", key.to_owned()),
        KeyValue::new("messaging.consumer.group.name", spans.group.clone()),
        KeyValue::new(
            "messaging.message.body.size",
            i64::try_from(size).unwrap_or(i64::MAX),
        ),
    ]);
    let remote = parent.span().span_context().clone();
    let name: Cow<'static, str> = if own_topic {
        Cow::Borrowed(spans.name)
    } else {
        Cow::Owned(format!("process {topic}"))
    };
    let mut builder = tracer
        .span_builder(name)
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes);
    // a child of the producer's span, and linked to it as the conventions ask of a consumer
    if remote.is_valid() {
        builder = builder.with_links(vec![Link::with_context(remote)]);
    }
    let span = builder.start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// The context a record's headers carry, as [`extract`] finds it. A plain lowercase
/// `traceparent`, the record's only one, with no `baggage` and no `tracestate` but an empty one
/// beside it (what our producers write) is read directly, without the global propagator's lock
/// and parsing; anything else goes through the propagator.
fn parent_context<H: Headers>(headers: Option<&H>, traceparent: Option<&[u8]>) -> Context {
    let direct = match (headers, traceparent) {
        (Some(h), Some(tp)) if plain_context(h) => remote_span_context(tp),
        _ => None,
    };
    match direct {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => extract(headers),
    }
}

/// Whether `headers` carry one `traceparent` and nothing else the propagators read: the
/// propagator reads the first `traceparent` (any case), and the caller of [`parent_context`]
/// may have given another one (the processor looks up the last); only with one are they the
/// same.
fn plain_context<H: Headers>(headers: &H) -> bool {
    let mut parents = 0;
    for h in headers.iter() {
        if h.key.eq_ignore_ascii_case("traceparent") {
            parents += 1;
        } else if h.key.eq_ignore_ascii_case("tracestate") {
            // the SDK's propagator writes one, empty, beside every traceparent, and reads an
            // empty (or null) one as no state, which is what the direct reading gives; going
            // through the propagator for it was most of a sampled-in span's making (perf)
            if h.value.is_some_and(|v| !v.is_empty()) {
                return false;
            }
        } else if h.key.eq_ignore_ascii_case("baggage") {
            return false;
        }
    }
    parents == 1
}

/// The remote span context of a plainly valid lowercase version-00 `traceparent` (see
/// [`lowercase_traceparent`]), its flags kept to the sampled bit as the propagator does.
fn remote_span_context(traceparent: &[u8]) -> Option<SpanContext> {
    let (trace_id, _) = lowercase_traceparent(traceparent)?;
    // all ASCII hex digits by now
    fn text(b: &[u8]) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }
    let trace_id = TraceId::from_hex(text(trace_id)?).ok()?;
    let span_id = SpanId::from_hex(text(&traceparent[36..52])?).ok()?;
    let flags = u8::from_str_radix(text(&traceparent[53..55])?, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

/// What the processing spans of one consumer share, made once: its group, the topic it reads
/// (and so the spans' name), and the ids of its first [`Self::PARTITIONS`] partitions as strings.
#[derive(Clone, Debug)]
pub struct ConsumerSpans {
    group: StringValue,
    topic: StringValue,
    /// `process <topic>` ([`span_name`]).
    name: &'static str,
    partitions: Vec<StringValue>,
}

impl ConsumerSpans {
    /// Partitions whose ids are made ahead; a record of a higher one makes its own string.
    pub const PARTITIONS: usize = 64;

    /// For a consumer in `group` that reads `topic`.
    pub fn new(group: &str, topic: &str) -> Self {
        Self {
            group: StringValue::from(Arc::<str>::from(group)),
            topic: StringValue::from(Arc::<str>::from(topic)),
            name: span_name(topic),
            partitions: (0..Self::PARTITIONS)
                .map(|p| StringValue::from(Arc::<str>::from(p.to_string())))
                .collect(),
        }
    }
}

/// `process <topic>` as a `'static` string (a span's name is that or a new `String` per span),
/// made once per distinct topic and kept for the life of the process: a service reads one topic
/// (the processor its orders, the analyzer its dead letters), so this keeps one or two.
fn span_name(topic: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.locked();
    if let Some(name) = names
        .iter()
        .find(|n| n.strip_prefix("process ") == Some(topic))
    {
        return name;
    }
    let name: &'static str = Box::leak(format!("process {topic}").into_boxed_str());
    names.push(name);
    name
}

/// Runs `fut` with `cx` as the current OpenTelemetry context (the record's span from
/// [`consumer_context`]), or as it is when there is none. The span ends when the last clone
/// of its context is dropped, so after `fut`.
pub async fn in_context<F: Future>(cx: Option<Context>, fut: F) -> F::Output {
    match cx {
        Some(cx) => fut.with_context(cx).await,
        None => fut.await,
    }
}

/// [`in_context`] for work that does not wait: `f` runs with `cx` (when there is one) as the
/// current OpenTelemetry context.
pub fn in_context_now<T>(cx: Option<&Context>, f: impl FnOnce() -> T) -> T {
    match cx {
        Some(cx) => {
            let _current = cx.clone().attach();
            f()
        }
        None => f(),
    }
}

/// Sets an attribute of the current span: a `tracing` span's field (when one is entered,
/// which must have declared it) or else the span of the current OpenTelemetry context.
pub fn set_attribute(key: &'static str, value: &str) {
    let span = tracing::Span::current();
    if !span.is_none() {
        span.record(key, value);
    } else if SAMPLER.get().is_some() {
        Context::map_current(|cx| {
            if cx.has_active_span() {
                cx.span()
                    .set_attribute(KeyValue::new(key, value.to_owned()));
            }
        });
    }
}

/// Marks the current span as failed, with `error_type` as its `error.type`.
pub fn set_error(error_type: &str) {
    let span = tracing::Span::current();
    if !span.is_none() {
        span.record("error.type", error_type);
        span.record("otel.status_code", "ERROR");
    } else if SAMPLER.get().is_some() {
        Context::map_current(|cx| {
            if cx.has_active_span() {
                let span = cx.span();
                span.set_attribute(KeyValue::new("error.type", error_type.to_owned()));
                span.set_status(Status::error(error_type.to_owned()));
            }
        });
    }
}

/// The trace id (hex) of the current span, `tracing`'s or else the current OpenTelemetry
/// context's; `None` when there is none.
pub fn current_trace_id() -> Option<String> {
    let span = tracing::Span::current();
    if !span.is_none() {
        return trace_id(&span);
    }
    Context::map_current(context_trace_id)
}

/// The PRODUCER span for sending one record to `topic` (`send <topic>`), a child of the current
/// span. `messaging.destination.partition.id`, `messaging.kafka.offset` (once the broker has
/// acknowledged), `order.id`, `order.invalid` and `error.type` are left for the caller to
/// record. Inject it into the record's headers with [`inject`]. No span when spans are off.
pub fn producer_span(topic: &str, key: &str) -> tracing::Span {
    if SAMPLER.get().is_none() || !tracing::level_enabled!(tracing::Level::INFO) {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "send",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
        messaging.kafka.message.key = key,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        order.id = tracing::field::Empty,
        order.invalid = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Links `span` to the span `cx` carries (for example a dead letter's), without making it the
/// parent: a new trace that points back at the old one.
pub fn link(span: &tracing::Span, cx: &Context) {
    let remote = cx.span().span_context().clone();
    if remote.is_valid() {
        span.add_link(remote);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::LogFormat;
    use crate::telemetry;
    use opentelemetry_sdk::trace::Sampler;

    /// Makes `parent` the parent of `span`, links to it too (a consumer span is both a child of the
    /// send and, per the messaging conventions, linked to it).
    fn adopt(span: &tracing::Span, parent: &Context) {
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent.clone());
            link(span, parent);
        }
    }

    fn header(h: &OwnedHeaders, key: &str) -> Option<String> {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn context_and_baggage_flow_from_consumed_headers_to_produced_ones() {
        telemetry::install_propagators();
        let provider = telemetry::tracer_provider("test", None, telemetry::sampler_from_env())
            .unwrap()
            .provider;
        let subscriber = telemetry::build_subscriber(
            "test",
            LogFormat::Pretty,
            tracing_subscriber::EnvFilter::new("info"),
            Some(&provider),
        );
        tracing::subscriber::with_default(subscriber, || {
            let incoming = OwnedHeaders::new()
                .insert(Header {
                    key: "traceparent",
                    value: Some(
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".as_bytes(),
                    ),
                })
                .insert(Header {
                    key: "baggage",
                    value: Some("tenant=acme".as_bytes()),
                });
            let parent = extract(Some(&incoming));
            assert_eq!(
                context_trace_id(&parent).as_deref(),
                Some("0af7651916cd43dd8448eb211c80319c")
            );

            let span = tracing::info_span!("process");
            adopt(&span, &parent);
            assert_eq!(
                trace_id(&span).as_deref(),
                Some("0af7651916cd43dd8448eb211c80319c")
            );
            let send = span.in_scope(|| tracing::info_span!("send"));
            let out = inject(&send, OwnedHeaders::new());

            let traceparent = header(&out, "traceparent").unwrap();
            assert!(
                traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{traceparent}"
            );
            assert!(
                !traceparent.contains("b7ad6b7169203331"),
                "the send span is a new span"
            );
            assert_eq!(header(&out, "baggage").as_deref(), Some("tenant=acme"));
        });
    }

    #[test]
    fn a_sampled_out_trace_is_not_continued_and_travels_on_unchanged() {
        telemetry::install_propagators();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01)));
        let with = |flags: &str| {
            OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(
                    format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}")
                        .as_bytes(),
                ),
            })
        };
        let (out, kept) = (with("00"), with("01"));
        let kind = SpanKind::Consumer;
        assert!(!keeps(&sampler, &extract(Some(&out)), "process", &kind));
        assert!(keeps(&sampler, &extract(Some(&kept)), "process", &kind));
        assert!(
            keeps(&sampler, &Context::new(), "process", &kind),
            "a root is the SDK's to decide"
        );
        // no span: the record's own context goes on, sampled-out flag included
        let carried = inject_or_carry(
            &tracing::Span::none(),
            OwnedHeaders::new(),
            Some(&out.clone().insert(Header {
                key: "dlq.error.category",
                value: Some(b"x".as_slice()),
            })),
        );
        assert_eq!(carried.count(), 1);
        assert_eq!(header(&carried, "traceparent"), header(&out, "traceparent"));
        // the cheap test agrees with the sampler on these, and leaves anything odd to it
        assert!(sampled_out_upstream(traceparent(Some(&out))));
        assert!(!sampled_out_upstream(traceparent(Some(&kept))));
        assert!(!sampled_out_upstream(traceparent(None::<&OwnedHeaders>)));
        let odd = |v: &str| {
            OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(v.as_bytes()),
            })
        };
        for v in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-00",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-00",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        ] {
            assert!(!sampled_out_upstream(traceparent(Some(&odd(v)))), "{v}");
        }
        assert!(sampled_out_upstream(traceparent(Some(&odd(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02"
        )))));
    }

    #[test]
    fn a_trace_id_is_read_from_the_headers_as_the_propagator_reads_it() {
        telemetry::install_propagators();
        let with = |tp: &str| {
            OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(tp),
            })
        };
        for tp in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            // the propagator's cases: other versions, upper case (refused), padding, nonsense
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "not a traceparent",
        ] {
            let h = with(tp);
            assert_eq!(
                headers_trace_id(Some(&h)),
                context_trace_id(&extract(Some(&h))),
                "{tp}"
            );
        }
        assert_eq!(
            headers_trace_id(Some(&with(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            )))
            .as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(headers_trace_id(None::<&OwnedHeaders>), None);
    }

    #[test]
    fn a_parent_read_directly_is_the_one_the_propagators_find() {
        use opentelemetry::baggage::BaggageExt as _;
        telemetry::install_propagators();
        let tps = [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            // flag bits beyond sampled, which the propagator drops
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "not a traceparent",
        ];
        for tp in tps {
            for extra in [
                None,
                Some(("tracestate", Some("k=v"))),
                // what the SDK's propagator writes beside a traceparent, and a null one
                Some(("tracestate", Some(""))),
                Some(("TraceState", None)),
                Some(("Baggage", Some("user=1"))),
            ] {
                let mut h = OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(tp),
                });
                if let Some((key, value)) = extra {
                    h = h.insert(Header { key, value });
                }
                let direct = parent_context(Some(&h), traceparent(Some(&h)));
                let propagated = extract(Some(&h));
                assert_eq!(
                    direct.span().span_context(),
                    propagated.span().span_context(),
                    "{tp} {extra:?}"
                );
                assert_eq!(
                    direct.baggage().len(),
                    propagated.baggage().len(),
                    "{tp} {extra:?}"
                );
            }
        }
        assert!(!parent_context::<OwnedHeaders>(None, None).has_active_span());
        // two of them: the processor gives the last, the propagator reads the first
        let (first, last) = (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-11111111111111111111111111111111-2222222222222222-01",
        );
        let h = [first, last]
            .into_iter()
            .fold(OwnedHeaders::new(), |h, tp| {
                h.insert(Header {
                    key: "traceparent",
                    value: Some(tp),
                })
            });
        assert_eq!(
            parent_context(Some(&h), Some(last.as_bytes()))
                .span()
                .span_context(),
            extract(Some(&h)).span().span_context()
        );
    }

    #[test]
    fn what_our_producers_write_is_read_without_the_propagator() {
        telemetry::install_propagators();
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        );
        let h = inject_context(
            &Context::new().with_remote_span_context(sc.clone()),
            OwnedHeaders::new(),
        );
        assert!(plain_context(&h), "{h:?}");
        assert_eq!(
            parent_context(Some(&h), traceparent(Some(&h)))
                .span()
                .span_context(),
            &sc
        );
    }

    #[test]
    fn no_headers_no_parent() {
        telemetry::install_propagators();
        assert_eq!(context_trace_id(&extract::<OwnedHeaders>(None)), None);
        assert_eq!(context_trace_id(&extract(Some(&OwnedHeaders::new()))), None);
    }
}
