//! `dlq-analyzer trace <trace-id>`: one trace from Jaeger's query API, printed as a waterfall
//! for a terminal of 80 columns.
//!
//! One line a span, children under their parent in start order, with the start offset from the
//! trace's first span, the duration, a bar on a shared time line, the service, and the span
//! name with what matters for a dead letter: the retry attempts and their backoffs, the
//! `send <dlq>` hop, and `error.type` (on a line of its own under the name when the line would
//! be wider than 80 columns). Fetching ([`fetch`]) and drawing ([`render`]) are apart,
//! so the drawing is tested on a stored answer.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

/// The drawing fits this many columns.
pub const WIDTH: usize = 80;
const BAR: usize = 10;
const SERVICE: usize = 15;
/// Where the span tree starts: start, duration, the bar and the service before it.
const TREE: usize = 6 + 1 + 6 + 1 + (BAR + 2) + 1 + SERVICE + 1;

/// Jaeger's `GET /api/traces/{id}` answer.
#[derive(Debug, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub data: Vec<Trace>,
}

#[derive(Debug, Deserialize)]
pub struct Trace {
    #[serde(rename = "traceID")]
    pub trace_id: String,
    pub spans: Vec<Span>,
    pub processes: HashMap<String, Process>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    #[serde(rename = "spanID")]
    pub span_id: String,
    pub operation_name: String,
    #[serde(default)]
    pub references: Vec<Reference>,
    /// Microseconds since the epoch.
    pub start_time: u64,
    /// Microseconds.
    pub duration: u64,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(rename = "processID")]
    pub process_id: String,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    #[serde(rename = "refType")]
    pub ref_type: String,
    #[serde(rename = "spanID")]
    pub span_id: String,
}

#[derive(Debug, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    pub service_name: String,
}

/// Why a trace could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0:?} is not a trace id (16 or 32 hex digits)")]
    BadId(String),
    #[error("Jaeger's query API at {url} did not answer: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "Jaeger at {url} has no trace {id} (yet): spans are exported in batches, and the native stack's Jaeger keeps them in memory only while it runs"
    )]
    NotFound { url: String, id: String },
}

/// Reads trace `id` from the query API at `base_url`, asking again for up to `patience` while
/// Jaeger does not have it yet (the last spans of a trace may still be on their way).
pub async fn fetch(base_url: &str, id: &str, patience: Duration) -> Result<Trace, TraceError> {
    let id = id.trim().to_ascii_lowercase();
    if !matches!(id.len(), 16 | 32) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TraceError::BadId(id));
    }
    let url = format!("{}/api/traces/{id}", base_url.trim_end_matches('/'));
    let unreachable = |source| TraceError::Unreachable {
        url: url.clone(),
        source,
    };
    let client = order_runtime::http::client_builder(&url)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(unreachable)?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let answer = client.get(&url).send().await.map_err(unreachable)?;
        // 404 (and an empty `data`) mean Jaeger has no span of it yet
        if answer.status().is_success() {
            let answer: Answer = answer.json().await.map_err(unreachable)?;
            if let Some(trace) = answer.data.into_iter().next() {
                return Ok(trace);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TraceError::NotFound { url, id });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `dlq-analyzer trace <trace-id>`: the waterfall's lines, from the query API at `url`
/// (`JAEGER_QUERY_URL`).
pub async fn command(url: &str, id: &str) -> Result<Vec<String>, TraceError> {
    let trace = fetch(url, id, Duration::from_secs(10)).await?;
    Ok(render(&trace).lines().map(str::to_owned).collect())
}

impl Span {
    fn tag(&self, key: &str) -> Option<String> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| match &t.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    }

    /// What the line says after the span's name.
    fn notes(&self) -> String {
        let mut notes = Vec::new();
        if let Some(ms) = self.tag("backoff.ms") {
            notes.push(format!("wait {ms} ms"));
        }
        if let Some(error) = self.tag("error.type") {
            notes.push(format!("error.type={error}"));
        }
        notes.join(" ")
    }
}

/// The trace as lines of at most [`WIDTH`] columns: a heading, then one line a span.
pub fn render(trace: &Trace) -> String {
    let spans = &trace.spans;
    let ids: HashMap<&str, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id.as_str(), i))
        .collect();
    // a span's parent is the span it is a child of; failing that, the one it follows from (a
    // consumer's link to the producer when no parent was propagated)
    let parent = |s: &Span| -> Option<usize> {
        let by = |kind: &str| {
            s.references
                .iter()
                .filter(|r| r.ref_type == kind)
                .find_map(|r| ids.get(r.span_id.as_str()).copied())
        };
        by("CHILD_OF").or_else(|| by("FOLLOWS_FROM"))
    };
    let mut children: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
    for (i, s) in spans.iter().enumerate() {
        children.entry(parent(s)).or_default().push(i);
    }
    for list in children.values_mut() {
        list.sort_by_key(|&i| (spans[i].start_time, spans[i].span_id.clone()));
    }
    let start = spans.iter().map(|s| s.start_time).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.start_time + s.duration)
        .max()
        .unwrap_or(start);
    let total = (end - start).max(1);
    let services: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter_map(|s| trace.processes.get(&s.process_id))
        .map(|p| p.service_name.as_str())
        .collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "trace {}: {} spans, {} services, {}",
        trace.trace_id,
        spans.len(),
        services.len(),
        human(total)
    );
    let _ = writeln!(
        out,
        "{:>6} {:>6} |{:<BAR$}| {:<SERVICE$} span",
        "start", "took", "timeline", "service",
    );
    // depth-first, children in start order; iterative so a deep trace cannot overflow the stack
    let mut stack: Vec<(usize, usize)> = children
        .get(&None)
        .map(|roots| roots.iter().rev().map(|&i| (i, 0)).collect())
        .unwrap_or_default();
    let mut seen = vec![false; spans.len()];
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        let s = &spans[i];
        let service = trace
            .processes
            .get(&s.process_id)
            .map_or("?", |p| p.service_name.as_str());
        let head = format!(
            "{:>6} {:>6} |{}| {:<SERVICE$} {}{}",
            format!("+{}", human(s.start_time - start)),
            human(s.duration),
            bar(s.start_time - start, s.duration, total),
            clip(service, SERVICE),
            "  ".repeat(depth),
            s.operation_name,
        );
        let notes = s.notes();
        let one_line = format!("{head} {notes}");
        if notes.is_empty() || one_line.chars().count() <= WIDTH {
            let _ = writeln!(out, "{}", clip(one_line.trim_end(), WIDTH));
        } else {
            // what does not fit goes on a line of its own, under the span tree
            let _ = writeln!(out, "{}", clip(&head, WIDTH));
            let indent = " ".repeat(TREE);
            let _ = writeln!(out, "{}", clip(&format!("{indent}{notes}"), WIDTH));
        }
        if let Some(kids) = children.get(&Some(i)) {
            stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
        }
    }
    out
}

/// A span's place on the time line: `BAR` cells for the whole trace, at least one for the span.
fn bar(offset: u64, duration: u64, total: u64) -> String {
    let cell = |t: u64| usize::try_from(t.saturating_mul(BAR as u64) / total).unwrap_or(BAR);
    let from = cell(offset).min(BAR - 1);
    let to = cell(offset + duration).clamp(from + 1, BAR);
    format!(
        "{}{}{}",
        " ".repeat(from),
        "█".repeat(to - from),
        " ".repeat(BAR - to)
    )
}

/// Microseconds as a person reads them: `850us`, `12ms`, `2.0s`.
fn human(us: u64) -> String {
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{}ms", us / 1_000)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

/// At most `max` characters, the last one `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A dead letter's trace as Jaeger answers for it: generator send, processor with two
    /// failed attempts and a backoff, the dead-letter send, the analyzer.
    fn answer() -> Trace {
        let span = |id: &str,
                    name: &str,
                    parent: Option<(&str, &str)>,
                    start: u64,
                    took: u64,
                    process: &str,
                    tags: &[(&str, serde_json::Value)]| {
            serde_json::json!({
                "spanID": id, "operationName": name, "startTime": 1_000_000 + start, "duration": took,
                "processID": process,
                "references": parent.map(|(kind, p)| vec![serde_json::json!({"refType": kind, "spanID": p})]).unwrap_or_default(),
                "tags": tags.iter().map(|(k, v)| serde_json::json!({"key": k, "type": "string", "value": v})).collect::<Vec<_>>(),
            })
        };
        let json = serde_json::json!({"data": [{
            "traceID": "4bf92f3577b34da6a3ce929d0e0e4736",
            "processes": {"p1": {"serviceName": "order-generator"}, "p2": {"serviceName": "order-processor"}, "p3": {"serviceName": "dlq-analyzer"}},
            "spans": [
                span("a5", "process orders-dlq", Some(("CHILD_OF", "a4")), 1_310_000, 2_000, "p3", &[("error.type", "retries_exhausted".into())]),
                span("a1", "send orders", None, 0, 1_500, "p1", &[]),
                span("a2", "process orders", Some(("CHILD_OF", "a1")), 3_000, 1_305_000, "p2", &[("error.type", "retries_exhausted".into())]),
                span("b1", "process attempt 1", Some(("CHILD_OF", "a2")), 3_100, 200, "p2", &[("error.type", "transient_failure".into())]),
                span("b2", "backoff", Some(("CHILD_OF", "a2")), 3_400, 100_000, "p2", &[("backoff.ms", 100.into())]),
                span("b3", "process attempt 2", Some(("CHILD_OF", "a2")), 103_500, 200, "p2", &[("error.type", "transient_failure".into())]),
                span("a4", "send orders-dlq", Some(("CHILD_OF", "a2")), 1_300_000, 5_000, "p2", &[("error.type", "retries_exhausted".into())]),
            ],
        }]});
        serde_json::from_value::<Answer>(json)
            .unwrap()
            .data
            .remove(0)
    }

    /// Each span's tree column (indent, name, notes), a continuation line joined to its span.
    fn entries(text: &str) -> Vec<String> {
        let mut entries: Vec<String> = Vec::new();
        for line in text.lines().skip(2) {
            match line.split('|').nth(2) {
                Some(tree) => entries.push(tree[SERVICE + 2..].trim_end().to_owned()),
                None => {
                    let last = entries.last_mut().unwrap();
                    last.push(' ');
                    last.push_str(line.trim());
                }
            }
        }
        entries
    }

    #[test]
    fn spans_nest_under_their_parents_in_start_order() {
        let text = render(&answer());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0]
                .starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736: 7 spans, 3 services, 1.3s"),
            "{text}"
        );
        let tree = entries(&text);
        let names: Vec<&str> = tree.iter().map(|t| t.trim()).collect();
        assert_eq!(
            names,
            [
                "send orders",
                "process orders error.type=retries_exhausted",
                "process attempt 1 error.type=transient_failure",
                "backoff wait 100 ms",
                "process attempt 2 error.type=transient_failure",
                "send orders-dlq error.type=retries_exhausted",
                "process orders-dlq error.type=retries_exhausted",
            ],
            "{text}"
        );
        let depths: Vec<usize> = tree
            .iter()
            .map(|t| (t.len() - t.trim_start().len()) / 2)
            .collect();
        assert_eq!(depths, [0, 1, 2, 2, 2, 2, 3], "{text}");
        let services: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split('|').nth(2))
            .skip(1)
            .map(|t| t[..=SERVICE].trim())
            .collect();
        let mut expected = vec!["order-processor"; 7];
        expected[0] = "order-generator";
        expected[6] = "dlq-analyzer";
        assert_eq!(services, expected, "{text}");
    }

    #[test]
    fn every_line_fits_80_columns_and_bars_follow_time() {
        let text = render(&answer());
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "{line:?}");
        }
        let bar_of = |name: &str| -> String {
            let line = text
                .lines()
                .find(|l| {
                    l.split('|')
                        .nth(2)
                        .is_some_and(|t| t.trim_end().ends_with(name))
                })
                .unwrap();
            line.split('|').nth(1).unwrap().to_owned()
        };
        // the first span starts at the left edge, the last one at the right
        assert!(bar_of("send orders").starts_with('█'));
        assert!(bar_of("process orders-dlq").ends_with('█'));
        assert_eq!(bar_of("process orders").chars().count(), BAR);
        assert_eq!(bar_of("process attempt 2").trim(), "█");
        assert!(text.contains("  +0us"));
        assert!(text.contains("+1.3s"), "{text}");
    }

    #[test]
    fn durations_read_as_a_person_reads_them() {
        assert_eq!(human(850), "850us");
        assert_eq!(human(12_345), "12ms");
        assert_eq!(human(2_000_000), "2.0s");
        assert_eq!(clip("order-processor-long", 15), "order-processo…");
        assert_eq!(clip("order-processor", 15), "order-processor");
    }

    #[tokio::test]
    async fn a_malformed_id_is_refused_before_any_request() {
        let err = fetch("http://127.0.0.1:9", "not-a-trace", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, TraceError::BadId(_)), "{err}");
    }
}
