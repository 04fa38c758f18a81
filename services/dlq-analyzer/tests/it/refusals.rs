//! Redrives that should not happen are refused before anything starts, with what is wrong: by
//! HTTP (without the credential, from another site, a bad request, one that would send every
//! dead letter back by accident) and on the command line. No run is made, nothing reaches the
//! orders topic, the service stays healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use order_testkit::{OPERATIONS_TOKEN, Service, Stack, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};

const BIN: &str = env!("CARGO_BIN_EXE_dlq-analyzer");

/// Records in `topic` (its partitions' end offsets, summed).
fn records_in(stack: &Stack, topic: &str) -> i64 {
    let c: BaseConsumer = stack.client().create().unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

/// A request's headers, content type and body, and the status and the words of its refusal.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Vec<u8>, u16, &'a str);

async fn redrive_request(
    s: &Service,
    headers: &[(&str, &str)],
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let mut r = reqwest::Client::new()
        .post(s.url("/redrive"))
        .header("content-type", content_type)
        .body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_or_unauthorised_redrive_requests_are_refused_and_start_nothing() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 3).await;
    stack.create_topic(&dlq, 3).await;
    let producer = stack.producer();
    for i in 0..20 {
        let key = format!("dead-{i}");
        stack
            .produce_raw(
                &producer,
                &dlq,
                None,
                Some(key.as_bytes()),
                Some(b"v"),
                &[
                    ("dlq.error.category", "validation"),
                    ("dlq.error.kind", "unknown_product"),
                ],
            )
            .await;
    }
    let mut analyzer = Service::start(BIN, &stack.vars(&orders, &dlq));
    analyzer.wait_for("/readyz", Duration::from_secs(30)).await;
    let right = format!("Bearer {OPERATIONS_TOKEN}");
    let auth = [("authorization", right.as_str())];
    let cross_site = [
        ("authorization", right.as_str()),
        ("sec-fetch-site", "cross-site"),
    ];
    let json = "application/json";
    let big = {
        let mut b = br#"{"kind": ""#.to_vec();
        b.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
        b.extend(br#""}"#);
        b
    };
    let table: Vec<Case<'_>> = vec![
        // who may
        (
            &[],
            json,
            br#"{"kind": "unknown_product"}"#.to_vec(),
            401,
            "credential",
        ),
        (
            &[("authorization", "Bearer a-wrong-token-of-length")],
            json,
            br#"{"kind": "unknown_product"}"#.to_vec(),
            403,
            "not this service's",
        ),
        (
            &cross_site,
            json,
            br#"{"kind": "unknown_product"}"#.to_vec(),
            403,
            "cross-site",
        ),
        // no mass redrive by accident
        (&auth, json, b"{}".to_vec(), 400, "\"all\": true"),
        (
            &auth,
            json,
            br#"{"limit": 5}"#.to_vec(),
            400,
            "\"all\": true",
        ),
        (
            &auth,
            json,
            br#"{"all": true, "kind": "unknown_product"}"#.to_vec(),
            400,
            "without a filter",
        ),
        // bad values: the field and the reason
        (
            &auth,
            json,
            br#"{"since": "yesterday"}"#.to_vec(),
            400,
            "since",
        ),
        (
            &auth,
            json,
            br#"{"since": "2026-12-07T10:00:00Z", "until": "2026-12-01T10:00:00Z"}"#.to_vec(),
            400,
            "since is not before until",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "rate": -5}"#.to_vec(),
            400,
            "rate",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "rate": 1e300}"#.to_vec(),
            400,
            "rate",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "limit": -1}"#.to_vec(),
            400,
            "limit",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "limit": 0}"#.to_vec(),
            400,
            "limit",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "limit": 99999999999999999999999}"#.to_vec(),
            400,
            "limit",
        ),
        (
            &auth,
            json,
            br#"{"kind": "x", "limit": "ten"}"#.to_vec(),
            400,
            "limit",
        ),
        (
            &auth,
            json,
            br#"{"partition": -1}"#.to_vec(),
            400,
            "partition",
        ),
        (
            &auth,
            json,
            br#"{"partition": "one"}"#.to_vec(),
            400,
            "partition",
        ),
        (
            &auth,
            json,
            br#"{"from_offset": 10, "to_offset": 5}"#.to_vec(),
            400,
            "from_offset",
        ),
        (
            &auth,
            json,
            br#"{"category": "nope"}"#.to_vec(),
            400,
            "category",
        ),
        (&auth, json, br#"{"kind": ""}"#.to_vec(), 400, "kind"),
        (
            &auth,
            json,
            br#"{"kind": "x", "id": "a b"}"#.to_vec(),
            400,
            "id",
        ),
        (&auth, json, br#"{"colour": "red"}"#.to_vec(), 400, "colour"),
        (
            &auth,
            json,
            br#"{"kind": "x", "dry_run": "yes"}"#.to_vec(),
            400,
            "dry_run",
        ),
        (&auth, json, Vec::new(), 400, "EOF"),
        (&auth, json, b"{\"kind\": ".to_vec(), 400, "EOF"),
        (
            &auth,
            "text/plain",
            br#"{"kind": "x"}"#.to_vec(),
            415,
            "Content-Type",
        ),
        (&auth, json, big, 413, ""),
    ];
    let before = records_in(&stack, &orders);
    for (headers, content_type, body, status, says) in table {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (got, answer) = redrive_request(&analyzer, headers, content_type, body).await;
        assert_eq!(got, status, "{shown}: {answer}");
        assert!(answer.contains(says), "{shown}: {answer}");
        assert!(!answer.contains(OPERATIONS_TOKEN), "{answer}");
        let runs = analyzer.get_json("/redrive").await.unwrap();
        assert_eq!(runs, serde_json::json!([]), "{shown} made a run");
        assert_eq!(analyzer.get("/healthz").await.unwrap().0, 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        records_in(&stack, &orders),
        before,
        "the orders topic was touched"
    );
    // a filtered one goes ahead
    let (got, answer) = redrive_request(
        &analyzer,
        &auth,
        json,
        br#"{"kind": "unknown_product", "dry_run": true}"#.to_vec(),
    )
    .await;
    assert_eq!(got, 200, "{answer}");
    assert!(answer.contains("\"matched\":20"), "{answer}");
    let (status, output) = analyzer.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        !output.contains(OPERATIONS_TOKEN),
        "the token is in the log"
    );
}

/// `<bin> <args>` with `vars`: (exit code, stdout and stderr).
fn run(bin: &str, args: &[&str], vars: &[(String, String)]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_redrive_flags_are_refused_before_anything_starts() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 1).await;
    stack.create_topic(&dlq, 1).await;
    let vars = stack.vars(&orders, &dlq);
    let table: [(&[&str], &str); 14] = [
        (&[], "--all"),
        (&["--limit", "5"], "--all"),
        (&["--all", "--kind", "x"], "without a filter"),
        (&["--since", "yesterday"], "since"),
        (&["--kind", "x", "--rate", "-5"], "rate"),
        (&["--kind", "x", "--rate", "fast"], "--rate"),
        (&["--kind", "x", "--limit", "-5"], "--limit"),
        (&["--kind", "x", "--limit", "0"], "limit"),
        (&["--partition", "-1"], "partition"),
        (&["--partition", "one"], "--partition"),
        (&["--from-offset", "9", "--to-offset", "3"], "from_offset"),
        (&["--category", "nope"], "category"),
        (&["--kind", "x", "--id", "a b"], "id"),
        (&["--colour", "red"], "--colour"),
    ];
    for (args, says) in table {
        let mut full = vec!["redrive"];
        full.extend_from_slice(args);
        let (code, text) = run(BIN, &full, &vars);
        assert_eq!(code, Some(2), "redrive {args:?}: {text}");
        assert!(text.contains(says), "redrive {args:?}: {text}");
    }
    let (code, text) = run(BIN, &["trace"], &vars);
    assert_eq!(code, Some(2), "{text}");
    let (code, text) = run(BIN, &["trace", "not-a-trace-id"], &vars);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not-a-trace-id"), "{text}");
    let (code, text) = run(BIN, &["--help"], &vars);
    assert_eq!(code, Some(0), "{text}");
    for sub in ["healthcheck", "redrive", "trace"] {
        assert!(text.contains(sub), "--help lists {sub}: {text}");
    }
    assert_eq!(records_in(&stack, &orders), 0, "something was sent");
}
