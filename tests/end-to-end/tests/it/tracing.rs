//! One trace per order across the three services, as Jaeger (the native stack's) stores it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use order_testkit::{Service, Stack, eventually, service_bin, unique};
use rdkafka::Message as _;
use serde_json::Value;

const JAEGER: &str = "http://127.0.0.1:16686";

/// A span as Jaeger's query API returns it, reduced to what the tests look at.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    service: String,
    name: String,
    tags: HashMap<String, String>,
    /// span ids this span references (parent or link)
    refs: Vec<String>,
}

fn spans_of(trace: &Value) -> Vec<Span> {
    let processes: HashMap<String, String> = trace["processes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["serviceName"].as_str().unwrap().to_owned()))
        .collect();
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Span {
            id: s["spanID"].as_str().unwrap().to_owned(),
            service: processes[s["processID"].as_str().unwrap()].clone(),
            name: s["operationName"].as_str().unwrap().to_owned(),
            tags: s["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let v = match &t["value"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (t["key"].as_str().unwrap().to_owned(), v)
                })
                .collect(),
            refs: s["references"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|x| x["spanID"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// The processor with `pv`, the analyzer with `av` (and a group of its own), both ready.
async fn start_ready(
    pv: Vec<(String, String)>,
    mut av: Vec<(String, String)>,
) -> (Service, Service) {
    let mut processor = Service::start(service_bin("order-processor").to_str().unwrap(), &pv);
    av.push(("CONSUMER_GROUP".to_owned(), unique("analyzer")));
    let mut analyzer = Service::start(service_bin("dlq-analyzer").to_str().unwrap(), &av);
    processor.wait_for("/readyz", Duration::from_secs(30)).await;
    analyzer.wait_for("/readyz", Duration::from_secs(30)).await;
    (processor, analyzer)
}

async fn trace_from_jaeger(trace_id: &str, wanted: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    eventually(
        &format!("trace {trace_id} in Jaeger"),
        Duration::from_secs(30),
        || async {
            let body: Value = reqwest::get(format!("{JAEGER}/api/traces/{trace_id}"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let spans = spans_of(body["data"].get(0)?);
            wanted(&spans).then_some(spans)
        },
    )
    .await
}

fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {service} span {name:?} in {spans:#?}"
    );
    found[0]
}

fn assert_messaging(span: &Span, kind: &str, operation: &str, destination: &str) {
    let t = &span.tags;
    assert_eq!(
        t.get("span.kind").map(String::as_str),
        Some(kind),
        "{span:#?}"
    );
    assert_eq!(t["messaging.system"], "kafka", "{span:#?}");
    assert_eq!(t["messaging.operation.type"], operation, "{span:#?}");
    assert_eq!(t["messaging.destination.name"], destination, "{span:#?}");
}

/// Runs the three services with export to Jaeger: two invalid orders, then two valid ones that
/// always fail temporarily; returns the analyzer's report once it has all four dead letters,
/// and the processor's (JSON) log.
async fn run_pipeline(orders: &str, dlq: &str, group: &str) -> (Value, String) {
    let stack = Stack::from_env();
    stack.create_topic(orders, 2).await;
    stack.create_topic(dlq, 1).await;
    let telemetry = |service: &str| -> Vec<(String, String)> {
        let mut v = stack.vars(orders, dlq);
        v.extend([
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                "http://127.0.0.1:4318".to_owned(),
            ),
            ("OTEL_SERVICE_NAME".to_owned(), service.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
            ("LOG_FORMAT".to_owned(), "json".to_owned()),
        ]);
        v
    };
    let mut pv = telemetry("order-processor");
    pv.extend([
        ("CONSUMER_GROUP".to_owned(), group.to_owned()),
        ("TRANSIENT_FAILURE_RATE".to_owned(), "1".to_owned()),
        ("MAX_RETRIES".to_owned(), "2".to_owned()),
        ("RETRY_INITIAL_BACKOFF_MS".to_owned(), "100".to_owned()),
    ]);
    let (processor, analyzer) = start_ready(pv, telemetry("dlq-analyzer")).await;

    for ratio in ["1", "0"] {
        let mut gv = telemetry("order-generator");
        gv.extend([
            ("ORDER_COUNT".to_owned(), "2".to_owned()),
            ("ORDER_RATE".to_owned(), "0".to_owned()),
            ("INVALID_ORDER_RATIO".to_owned(), ratio.to_owned()),
        ]);
        let (status, out) = Service::start(service_bin("order-generator").to_str().unwrap(), &gv)
            .wait(Duration::from_secs(30));
        assert!(status.success(), "{out}");
    }
    let report = eventually(
        "four dead letters analysed",
        Duration::from_secs(60),
        || async {
            let r = analyzer.get_json("/report").await.ok()?;
            (r["total"] == 4).then_some(r)
        },
    )
    .await;
    // stopping flushes the exporters
    let (status, processor_log) = processor.terminate(Duration::from_secs(20));
    assert!(status.success(), "{processor_log}");
    assert!(analyzer.terminate(Duration::from_secs(20)).0.success());
    (report, processor_log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_order_is_one_trace_across_the_three_services() {
    let (orders, dlq, group) = (unique("orders"), unique("orders-dlq"), unique("processor"));
    let (report, processor_log) = run_pipeline(&orders, &dlq, &group).await;
    let recent = report["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 4);
    for failure in recent {
        let trace_id = failure["trace_id"]
            .as_str()
            .expect("every dead letter carries its trace id");
        let order_id = failure["key"].as_str().unwrap();
        let category = failure["category"].as_str().unwrap();
        // the processor's log line about this dead letter leads to the trace
        let logged = processor_log.lines().any(|l| {
            l.contains("dead-lettering record")
                && l.contains(&format!("\"trace_id\":\"{trace_id}\""))
        });
        assert!(
            logged,
            "no JSON log line with trace_id {trace_id}:\n{processor_log}"
        );
        let spans = trace_from_jaeger(trace_id, |s| {
            ["order-generator", "order-processor", "dlq-analyzer"]
                .iter()
                .all(|svc| s.iter().any(|x| x.service == *svc))
        })
        .await;

        let send = one(&spans, "order-generator", &format!("send {orders}"));
        assert_messaging(send, "producer", "send", &orders);
        assert_eq!(send.tags["messaging.kafka.message.key"], order_id);

        let process = one(&spans, "order-processor", &format!("process {orders}"));
        assert_messaging(process, "consumer", "process", &orders);
        assert!(
            process.refs.contains(&send.id),
            "the consumer span continues the producer's"
        );
        assert_eq!(process.tags["messaging.consumer.group.name"], group);
        assert_eq!(process.tags["messaging.kafka.message.key"], order_id);
        assert!(
            process
                .tags
                .contains_key("messaging.destination.partition.id")
        );
        assert!(process.tags.contains_key("messaging.kafka.offset"));
        assert_eq!(process.tags["error.type"], category);
        assert_eq!(
            process.tags.get("otel.status_code").map(String::as_str),
            Some("ERROR"),
            "a dead-lettered record's processing failed: {process:#?}"
        );

        let dead_letter = one(&spans, "order-processor", &format!("send {dlq}"));
        assert_messaging(dead_letter, "producer", "send", &dlq);
        assert!(dead_letter.refs.contains(&process.id));
        assert_eq!(dead_letter.tags["error.type"], category);

        let analysed = one(&spans, "dlq-analyzer", &format!("process {dlq}"));
        assert_messaging(analysed, "consumer", "process", &dlq);
        assert!(
            analysed.refs.contains(&dead_letter.id),
            "the analyzer continues the dead letter's send"
        );
        assert_eq!(analysed.tags["error.type"], category);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_are_attempt_spans_under_one_processing_span() {
    let (orders, dlq, group) = (unique("orders"), unique("orders-dlq"), unique("processor"));
    let (report, _) = run_pipeline(&orders, &dlq, &group).await;
    let exhausted: Vec<&Value> = report["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["category"] == "retries_exhausted")
        .collect();
    assert_eq!(exhausted.len(), 2);
    for failure in exhausted {
        let trace_id = failure["trace_id"].as_str().unwrap();
        let spans =
            trace_from_jaeger(trace_id, |s| s.iter().any(|x| x.service == "dlq-analyzer")).await;
        let process = one(&spans, "order-processor", &format!("process {orders}"));
        let children: Vec<&Span> = spans
            .iter()
            .filter(|s| s.refs.contains(&process.id))
            .collect();
        for n in 1..=3 {
            let attempt = one(&spans, "order-processor", &format!("process attempt {n}"));
            assert!(
                attempt.refs.contains(&process.id),
                "attempt {n} is a child of the processing span"
            );
            assert_eq!(attempt.tags["error.type"], "transient_failure");
        }
        let mut backoffs: Vec<&str> = children
            .iter()
            .filter(|s| s.name == "backoff")
            .map(|s| s.tags["backoff.ms"].as_str())
            .collect();
        backoffs.sort_unstable();
        assert_eq!(
            backoffs,
            ["100", "200"],
            "a backoff span between attempts: {children:#?}"
        );
    }
}

/// `make trace` (`dlq-analyzer trace <id>`) draws a dead letter's trace from the native stack's
/// Jaeger: spans of all three services, the attempts and backoffs in order, the dead-letter hop.
#[tokio::test(flavor = "multi_thread")]
async fn the_trace_command_draws_a_dead_letters_journey() {
    let (orders, dlq, group) = (unique("orders"), unique("orders-dlq"), unique("processor"));
    let (report, _) = run_pipeline(&orders, &dlq, &group).await;
    let failure = report["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["category"] == "retries_exhausted")
        .unwrap();
    let trace_id = failure["trace_id"].as_str().unwrap();
    // the command waits for late spans itself, but not for a whole export round of each service
    trace_from_jaeger(trace_id, |s| s.iter().any(|x| x.service == "dlq-analyzer")).await;
    let out = std::process::Command::new(service_bin("dlq-analyzer"))
        .args(["trace", trace_id])
        .env("JAEGER_QUERY_URL", JAEGER)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with(&format!("trace {trace_id}: ")), "{text}");
    assert!(text.contains(" 3 services, "), "{text}");
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80 columns: {line:?}"
        );
    }
    // in the order a person reads the journey, top to bottom
    let expected = [
        ("order-generator", format!("send {orders}")),
        (
            "order-processor",
            format!("process {orders} error.type=retries_exhausted"),
        ),
        (
            "order-processor",
            "process attempt 1 error.type=transient_failure".to_owned(),
        ),
        ("order-processor", "backoff wait 100 ms".to_owned()),
        (
            "order-processor",
            "process attempt 2 error.type=transient_failure".to_owned(),
        ),
        ("order-processor", "backoff wait 200 ms".to_owned()),
        (
            "order-processor",
            "process attempt 3 error.type=transient_failure".to_owned(),
        ),
        (
            "order-processor",
            format!("send {dlq} error.type=retries_exhausted"),
        ),
        (
            "dlq-analyzer",
            format!("process {dlq} error.type=retries_exhausted"),
        ),
    ];
    // each span's line, with the line of notes that may follow it joined on
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in text.lines().skip(2) {
        match line.split('|').nth(2) {
            Some(tree) => {
                entries.push((tree[..=15].trim().to_owned(), tree[17..].trim().to_owned()))
            }
            None => {
                let last = &mut entries.last_mut().unwrap().1;
                last.push(' ');
                last.push_str(line.trim());
            }
        }
    }
    let mut entries = entries.iter();
    for (service, span) in &expected {
        let found = entries
            .by_ref()
            .any(|(s, name)| s == service && name == span);
        assert!(
            found,
            "no {service} line {span:?} after the previous one in:\n{text}"
        );
    }
}

/// The trace ids Jaeger holds for `service` (its search, newest first, up to `limit`).
async fn traces_of(service: &str, limit: usize) -> Option<BTreeSet<String>> {
    let body: Value = reqwest::get(format!(
        "{JAEGER}/api/traces?service={service}&limit={limit}&lookback=1h"
    ))
    .await
    .ok()?
    .json()
    .await
    .ok()?;
    Some(
        body["data"]
            .as_array()?
            .iter()
            .filter_map(|t| t["traceID"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// `OTEL_TRACES_SAMPLER=parentbased_traceidratio` at 0.5 in all three services: the generator
/// decides each order's fate, the processor and the analyzer follow it. An order sampled out
/// there has no span in any service (no orphan trace of its own either); one sampled in is one
/// trace across the three.
#[tokio::test(flavor = "multi_thread")]
async fn a_sampled_out_order_has_no_span_anywhere_and_a_sampled_in_one_is_one_trace() {
    let stack = Stack::from_env();
    let (orders, dlq, group) = (unique("orders"), unique("orders-dlq"), unique("processor"));
    stack.create_topic(&orders, 2).await;
    stack.create_topic(&dlq, 1).await;
    // service names of this run only, so that Jaeger's search sees nothing else
    let run = unique("sampling");
    let name = |service: &str| format!("{service}-{run}");
    let telemetry = |service: &str| -> Vec<(String, String)> {
        let mut v = stack.vars(&orders, &dlq);
        v.extend(
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_SERVICE_NAME", name(service).as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        v
    };
    let mut pv = telemetry("order-processor");
    pv.push(("CONSUMER_GROUP".to_owned(), group));
    let (processor, analyzer) = start_ready(pv, telemetry("dlq-analyzer")).await;

    // every order invalid, so that every one passes through all three services
    let n = 40;
    let mut gv = telemetry("order-generator");
    gv.extend([
        ("ORDER_COUNT".to_owned(), n.to_string()),
        ("ORDER_RATE".to_owned(), "0".to_owned()),
        ("INVALID_ORDER_RATIO".to_owned(), "1".to_owned()),
    ]);
    let (status, out) = Service::start(service_bin("order-generator").to_str().unwrap(), &gv)
        .wait(Duration::from_secs(30));
    assert!(status.success(), "{out}");
    eventually(
        "every dead letter analysed",
        Duration::from_secs(60),
        || async {
            let r = analyzer.get_json("/report").await.ok()?;
            (r["total"] == n).then_some(())
        },
    )
    .await;
    // stopping flushes the exporters
    assert!(processor.terminate(Duration::from_secs(20)).0.success());
    assert!(analyzer.terminate(Duration::from_secs(20)).0.success());

    // the generator's decision, as its traceparent's flags say, per order
    let traceparent = |m: &rdkafka::message::OwnedMessage| {
        let tp = order_testkit::headers_of(m)
            .remove("traceparent")
            .expect("every record carries trace context");
        let parts: Vec<&str> = tp.split('-').collect();
        (parts[1].to_owned(), parts[3] == "01")
    };
    let decided: HashMap<Vec<u8>, (String, bool)> = stack
        .read_all(&orders, n, Duration::from_secs(30))
        .iter()
        .map(|m| (m.key().unwrap().to_vec(), traceparent(m)))
        .collect();
    assert_eq!(decided.len(), n);
    let (mut kept, mut dropped) = (BTreeSet::new(), BTreeSet::new());
    for m in stack.read_all(&dlq, n, Duration::from_secs(30)) {
        let (trace_id, sampled) = &decided[m.key().unwrap()];
        assert_eq!(
            &traceparent(&m),
            &(trace_id.clone(), *sampled),
            "the dead letter stays in its order's trace, sampled as it was"
        );
        if *sampled {
            kept.insert(trace_id.clone());
        } else {
            dropped.insert(trace_id.clone());
        }
    }
    assert_eq!(kept.len() + dropped.len(), n);
    assert!(
        !kept.is_empty() && !dropped.is_empty(),
        "at 0.5 both kinds: {} kept, {} dropped",
        kept.len(),
        dropped.len()
    );
    for trace_id in &kept {
        trace_from_jaeger(trace_id, |s| {
            ["order-generator", "order-processor", "dlq-analyzer"]
                .iter()
                .all(|svc| s.iter().any(|x| x.service == name(svc)))
        })
        .await;
    }
    // every kept trace is in: each service's traces are exactly the kept ones
    for service in ["order-generator", "order-processor", "dlq-analyzer"] {
        let held = traces_of(&name(service), 10 * n).await.unwrap();
        assert_eq!(held, kept, "{service}'s traces in Jaeger");
    }
}

/// More spans made than the collector takes (every order sampled, an export queue of one span,
/// a burst of orders): the spans that find no room are shed and counted, not made and lost, so
/// the spans Jaeger holds and the count the processor gives at exit add up to the orders, and
/// every order is still processed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn spans_with_no_room_in_the_export_queue_are_shed_and_counted() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("orders-dlq"));
    stack.create_topic(&orders, 2).await;
    stack.create_topic(&dlq, 1).await;
    let n = 3000;
    let mut gv = stack.vars(&orders, &dlq);
    gv.extend([
        ("ORDER_COUNT".to_owned(), n.to_string()),
        ("ORDER_RATE".to_owned(), "0".to_owned()),
    ]);
    let (status, out) = Service::start(service_bin("order-generator").to_str().unwrap(), &gv)
        .wait(Duration::from_secs(30));
    assert!(status.success(), "{out}");

    let service = unique("shedding");
    let mut pv = stack.vars(&orders, &dlq);
    pv.extend(
        [
            ("CONSUMER_GROUP", unique("processor").as_str()),
            ("LOG_FORMAT", "json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SERVICE_NAME", service.as_str()),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut processor = Service::start(service_bin("order-processor").to_str().unwrap(), &pv);
    processor.wait_for("/readyz", Duration::from_secs(30)).await;
    eventually("every order processed", Duration::from_secs(60), || async {
        let s = processor.get_json("/stats").await.ok()?;
        (s["processed"] == n).then_some(())
    })
    .await;
    // every span has been made by now: what /metrics says was shed is the total
    let metrics = processor.get("/metrics").await.expect("/metrics").1;
    let scraped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("trace_spans_shed_total "))
        .unwrap_or_else(|| panic!("no trace_spans_shed_total in:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(
        metrics.contains("\ntrace_export_queue_spans "),
        "the queue's gauge too:\n{metrics}"
    );
    let (status, out) = processor.terminate(Duration::from_secs(20));
    assert!(status.success(), "{out}");

    // the total at exit, from the JSON log line that gives it
    let shed: u64 = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|l| {
            let f = &l["fields"];
            (f["message"]
                .as_str()?
                .starts_with("spans not exported in this run"))
            .then(|| f["spans_shed_total"].as_u64())?
        })
        .unwrap_or_else(|| panic!("no count of shed spans at exit in:\n{out}"));
    assert!(
        shed > 0 && shed < n,
        "{shed} of {n} spans shed: some, and not all"
    );
    assert_eq!(scraped, shed, "/metrics and the count at exit");
    // exit flushed what was queued; each order's span is a trace of its own (the generator
    // made none), so Jaeger's traces of this service are its spans
    let held = traces_of(&service, 2 * n as usize).await.unwrap();
    assert_eq!(
        shed + held.len() as u64,
        n,
        "spans shed ({shed}) and spans in Jaeger ({}) add up to the orders",
        held.len()
    );
}
