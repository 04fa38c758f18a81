//! Operating the processor: pause and resume, safe replay in exactly-once mode, the product
//! catalogue as a setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::workload::{BIN, Workload};
use order_schema::{Order, OrderCodec};
use order_testkit::{Service, Stack, eventually, unique};

async fn post(s: &Service, path: &str) -> (u16, String) {
    let r = order_testkit::operation(&s.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `processor_paused{partition="<p>"}`'s value, or `None` when the series is absent.
fn gauge(metrics: &str, partition: &str) -> Option<i64> {
    let prefix = format!("processor_paused{{partition=\"{partition}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_holds_consumption_and_a_resume_drains_it_exactly() {
    let stack = Stack::from_env();
    let w = Workload::new(&stack, 1_200).await;
    let mut p = w.replica(&stack).await;
    p.wait_for("/readyz", Duration::from_secs(60)).await;

    // everything paused: nothing is processed while the first half of the orders arrives
    let (status, body) = post(&p, "/pause").await;
    assert_eq!(status, 200, "{body}");
    let half = 600;
    w.feed_part(&stack, 0..half, 2_000).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = p.get_json("/stats").await.unwrap();
    assert_eq!(stats["processed"], 0, "{stats}");
    assert_eq!(stats["dead_lettered"], 0, "{stats}");
    let (status, ready) = p.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "paused is not unready: {ready}");
    assert!(ready.contains("paused: all partitions"), "{ready}");
    let metrics = p.get("/metrics").await.unwrap().1;
    assert_eq!(gauge(&metrics, "all"), Some(1), "{metrics}");
    // the lag (end offsets against what the group committed) is every record sent
    let status = p.get_json("/status.json").await.unwrap();
    let lag: i64 = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["lag"].as_i64().unwrap())
        .sum();
    assert_eq!(lag, i64::try_from(half).unwrap(), "{status}");

    // one partition held, the others resumed. Between the resume and the pause partition 0
    // may drain what it has, so the second half arrives once it is held.
    assert_eq!(
        post(&p, "/resume?partition=0").await.0,
        409,
        "all are paused"
    );
    assert_eq!(post(&p, "/resume").await.0, 200);
    let (status, body) = post(&p, "/pause?partition=0").await;
    assert_eq!(status, 200, "{body}");
    w.feed_part(&stack, half..usize::try_from(w.total()).unwrap(), 2_000)
        .await;
    eventually(
        "the other partitions to be done while partition 0 waits",
        Duration::from_secs(60),
        || async {
            let s = p.get_json("/status.json").await.ok()?;
            let rows = s["partitions"].as_array()?.clone();
            let done = rows.iter().all(|r| {
                let lag = r["lag"].as_i64().unwrap_or(-1);
                if r["partition"] == 0 {
                    lag > 0
                } else {
                    lag == 0
                }
            });
            (rows.len() == 6 && done).then_some(())
        },
    )
    .await;
    let metrics = p.get("/metrics").await.unwrap().1;
    assert_eq!(gauge(&metrics, "0"), Some(1), "{metrics}");
    assert_eq!(gauge(&metrics, "all"), Some(0), "{metrics}");
    assert!(p.get("/readyz").await.unwrap().1.contains("partitions 0"));

    assert_eq!(post(&p, "/resume?partition=0").await.0, 200);
    w.assert_totals_exact(&stack, &p, Duration::from_secs(120))
        .await;
    let metrics = p.get("/metrics").await.unwrap().1;
    assert_eq!(gauge(&metrics, "0"), Some(0), "{metrics}");
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
}

/// Records the group has not committed, over all partitions (`/status.json`).
async fn lag(p: &Service) -> i64 {
    let status = p.get_json("/status.json").await.unwrap();
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["lag"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_assigned_to_a_paused_replica_in_a_rebalance_start_paused() {
    let stack = Stack::from_env();
    let w = Workload::new(&stack, 600).await;
    let total = i64::try_from(w.total()).unwrap();
    let mut a = w.replica(&stack).await;
    a.wait_for("/readyz", Duration::from_secs(60)).await;
    assert_eq!(post(&a, "/pause").await.0, 200);
    let mut b = w.replica(&stack).await;
    b.wait_for("/readyz", Duration::from_secs(60)).await;
    assert_eq!(post(&b, "/pause").await.0, 200);
    eventually(
        "both replicas to hold partitions",
        Duration::from_secs(60),
        || async {
            let held = |s: serde_json::Value| s["partitions"].as_array().map_or(0, Vec::len);
            let (x, y) = (
                held(a.get_json("/stats").await.ok()?),
                held(b.get_json("/stats").await.ok()?),
            );
            (x > 0 && y > 0 && x + y == 6).then_some(())
        },
    )
    .await;
    w.feed(&stack, 2_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lag(&a).await, total, "both replicas hold");

    // b leaves: its partitions move to a, which is paused, so they wait too
    let (status, output) = b.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    eventually(
        "a to hold all six partitions",
        Duration::from_secs(60),
        || async {
            let s = a.get_json("/stats").await.ok()?;
            (s["partitions"].as_array()?.len() == 6).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lag(&a).await,
        total,
        "nothing processed after the rebalance"
    );
    assert_eq!(a.get_json("/stats").await.unwrap()["processed"], 0);

    assert_eq!(post(&a, "/resume").await.0, 200);
    w.assert_totals_exact(&stack, &a, Duration::from_secs(120))
        .await;
    let (status, output) = a.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
}

fn reset(w: &Workload, stack: &Stack, to: &str) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(["reset", "--to", to])
        .env_clear()
        .envs(w.replica_vars(stack))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exactly_once_replay_from_earliest_counts_everything_once_again() {
    let stack = Stack::from_env();
    let w = Workload::new(&stack, 1_500).await;
    w.feed(&stack, 3_000).await;
    let p = w.replica(&stack).await;
    w.assert_totals_exact(&stack, &p, Duration::from_secs(120))
        .await;

    let (ok, said) = reset(&w, &stack, "earliest");
    assert!(!ok, "the reset went ahead while a processor ran: {said}");
    assert!(said.contains("live member"), "{said}");
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");

    let (ok, said) = reset(&w, &stack, "earliest");
    assert!(ok, "{said}");
    assert!(said.contains("partition 0: offset"), "{said}");

    // a fresh run over the whole topic: the ground truth once, neither doubled nor zero
    let p = w.replica(&stack).await;
    w.assert_totals_exact(&stack, &p, Duration::from_secs(120))
        .await;
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_product_catalogue_is_a_setting() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 1).await;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let producer = stack.producer();
    for product in ["Widget", "gadget", "laptop"] {
        let o = Order {
            order_id: unique("o"),
            product: product.into(),
            price: 2.5,
        };
        let bytes = codec.encode(&o).await.unwrap();
        stack
            .produce_raw(&producer, &orders, None, Some(b"k"), Some(&bytes), &[])
            .await;
    }
    for (catalogue, processed, dead, product) in
        [("widget, gadget", 2, 1, "widget"), ("*", 3, 0, "Widget")]
    {
        let mut vars = stack.vars(&orders, &dlq);
        vars.push(("CONSUMER_GROUP".into(), unique("g")));
        vars.push(("PRODUCT_CATALOGUE".into(), catalogue.into()));
        let mut p = Service::start(BIN, &vars);
        p.wait_for("/healthz", Duration::from_secs(30)).await;
        let stats = eventually("the three orders", Duration::from_secs(60), || async {
            let s = p.get_json("/stats").await.ok()?;
            (s["processed"].as_u64()? + s["dead_lettered"].as_u64()? == 3).then_some(s)
        })
        .await;
        assert_eq!(stats["processed"], processed, "{catalogue}: {stats}");
        assert_eq!(stats["dead_lettered"], dead, "{catalogue}: {stats}");
        assert!(
            stats["by_product"].get(product).is_some(),
            "{catalogue}: counted under {product}: {stats}"
        );
        p.terminate(Duration::from_secs(30));
    }
}

/// A state change as a client sends it: `headers`, and a body when there is one.
async fn send(
    s: &Service,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = reqwest::Client::new().request(method, s.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some((content_type, bytes)) = body {
        r = r.header("content-type", content_type).body(bytes);
    }
    let r = r.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// A request's path, query and body, and the status and the words of its refusal.
type Case<'a> = (&'a str, &'a str, Option<(&'a str, Vec<u8>)>, u16, &'a str);

/// A request's headers, and the status and the words of its refusal.
type Refusal<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);

/// What is paused, as `GET /pause` says (no credential needed).
async fn paused(p: &Service) -> serde_json::Value {
    let mut state = p.get_json("/pause").await.unwrap();
    state.as_object_mut().unwrap().remove("assigned");
    state
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_needs_the_credential_from_the_same_site_and_the_token_is_never_shown() {
    let stack = Stack::from_env();
    let w = Workload::new(&stack, 900).await;
    let mut p = w.replica(&stack).await;
    p.wait_for("/readyz", Duration::from_secs(60)).await;
    let nothing = serde_json::json!({"all": false, "partitions": []});
    let right = format!("Bearer {}", order_testkit::OPERATIONS_TOKEN);
    let refusals: [Refusal<'_>; 5] = [
        (&[], 401, "needs the credential"),
        (
            &[("authorization", "Bearer a-wrong-token-of-length")],
            403,
            "not this service's operations token",
        ),
        (&[("authorization", "Basic dXNlcjpwYXNz")], 401, "Bearer"),
        (
            &[("authorization", &right), ("origin", "http://evil.example")],
            403,
            "cross-site",
        ),
        (
            &[("authorization", &right), ("sec-fetch-site", "cross-site")],
            403,
            "cross-site",
        ),
    ];
    // refused while orders flow: nothing is paused, and the lag keeps falling to nothing
    w.feed(&stack, 600).await;
    for (headers, status, says) in refusals {
        let (got, answer_headers, body) =
            send(&p, reqwest::Method::POST, "/pause", headers, None).await;
        assert_eq!(got, status, "{headers:?}: {body}");
        assert!(body.contains(says), "{headers:?}: {body}");
        assert!(!body.contains(order_testkit::OPERATIONS_TOKEN), "{body}");
        assert!(
            answer_headers.get("access-control-allow-origin").is_none(),
            "{answer_headers:?}"
        );
        assert_eq!(paused(&p).await, nothing);
    }
    // a preflight gets no CORS permission
    let (got, answer_headers, _) = send(
        &p,
        reqwest::Method::OPTIONS,
        "/pause",
        &[
            ("origin", "http://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    assert_eq!(got, 405);
    assert!(answer_headers.get("access-control-allow-origin").is_none());
    w.assert_totals_exact(&stack, &p, Duration::from_secs(120))
        .await;
    assert_eq!(lag(&p).await, 0, "the refused pauses held nothing");

    // with the credential, from the same origin, it works
    let (got, _, body) = send(
        &p,
        reqwest::Method::POST,
        "/pause",
        &[
            ("authorization", &right),
            ("origin", &p.url("")),
            ("sec-fetch-site", "same-origin"),
        ],
        None,
    )
    .await;
    assert_eq!(got, 200, "{body}");
    assert_eq!(paused(&p).await["all"], true);
    assert_eq!(post(&p, "/resume").await.0, 200);
    let metrics = p.get("/metrics").await.unwrap().1;
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    for (what, text) in [("log", &output), ("/metrics", &metrics)] {
        assert!(
            !text.contains(order_testkit::OPERATIONS_TOKEN),
            "the token is in the {what}"
        );
    }
    assert!(
        output.contains("operation refused"),
        "refusals are logged: {output}"
    );

    // a replica with no credential configured refuses every change, naming the setting
    let vars: Vec<(String, String)> = w
        .replica_vars(&stack)
        .into_iter()
        .filter(|(k, _)| k != "OPERATIONS_TOKEN")
        .collect();
    let mut closed = Service::start(BIN, &vars);
    closed.wait_for("/healthz", Duration::from_secs(30)).await;
    let (got, _, body) = send(
        &closed,
        reqwest::Method::POST,
        "/pause",
        &[("authorization", &right)],
        None,
    )
    .await;
    assert_eq!(got, 403, "{body}");
    assert!(body.contains("OPERATIONS_TOKEN"), "{body}");
    assert_eq!(paused(&closed).await, nothing);
    closed.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_pause_requests_are_refused_at_once_with_what_is_wrong() {
    let stack = Stack::from_env();
    let w = Workload::new(&stack, 300).await;
    let mut a = w.replica(&stack).await;
    a.wait_for("/readyz", Duration::from_secs(60)).await;
    let right = format!("Bearer {}", order_testkit::OPERATIONS_TOKEN);
    let auth = [("authorization", right.as_str())];
    let big = vec![b'x'; 5 * 1024 * 1024];
    let table: Vec<Case<'_>> = vec![
        ("/pause", "?partition=-1", None, 400, "partitions 0 to 5"),
        ("/pause", "?partition=6", None, 400, "partitions 0 to 5"),
        ("/pause", "?partition=99999999999", None, 400, "partition"),
        ("/pause", "?partition=three", None, 400, "partition"),
        ("/pause", "?partition=", None, 400, "partition"),
        ("/pause", "?partitoin=1", None, 400, "partitoin"),
        (
            "/pause",
            "",
            Some(("application/json", br#"{"partition": 1}"#.to_vec())),
            400,
            "takes no body",
        ),
        (
            "/pause",
            "",
            Some(("text/plain", b"1".to_vec())),
            400,
            "takes no body",
        ),
        (
            "/pause",
            "",
            Some(("application/json", big.clone())),
            413,
            "",
        ),
        ("/resume", "?partition=-7", None, 400, "partitions 0 to 5"),
        ("/resume", "?partition=x", None, 400, "partition"),
        (
            "/resume",
            "",
            Some(("application/json", b"{}".to_vec())),
            400,
            "takes no body",
        ),
    ];
    for (path, query, body, status, says) in table {
        let target = format!("{path}{query}");
        let (got, _, answer) = send(&a, reqwest::Method::POST, &target, &auth, body).await;
        assert_eq!(got, status, "{target}: {answer}");
        assert!(answer.contains(says), "{target}: {answer}");
        assert_eq!(
            paused(&a).await,
            serde_json::json!({"all": false, "partitions": []}),
            "{target} changed something"
        );
        assert_eq!(a.get("/healthz").await.unwrap().0, 200);
    }
    // a partition of the topic that another replica holds: 409, with the ones this one has
    let b = w.replica(&stack).await;
    let held = |s: serde_json::Value| -> Option<Vec<i64>> {
        s["assigned"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
    };
    let (mine, theirs) = eventually(
        "both replicas to hold partitions",
        Duration::from_secs(60),
        || async {
            let (x, y) = (
                held(a.get_json("/pause").await.ok()?)?,
                held(b.get_json("/pause").await.ok()?)?,
            );
            (!x.is_empty() && !y.is_empty() && x.len() + y.len() == 6).then_some((x, y))
        },
    )
    .await;
    let (got, _, answer) = send(
        &a,
        reqwest::Method::POST,
        &format!("/pause?partition={}", theirs[0]),
        &auth,
        None,
    )
    .await;
    assert_eq!(got, 409, "{answer}");
    assert!(answer.contains("not assigned to this replica"), "{answer}");
    assert!(answer.contains(&mine[0].to_string()), "{answer}");
    // one of its own works, and the answer is the state after it
    let (got, _, answer) = send(
        &a,
        reqwest::Method::POST,
        &format!("/pause?partition={}", mine[0]),
        &auth,
        None,
    )
    .await;
    assert_eq!(got, 200, "{answer}");
    let state: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(state["partitions"], serde_json::json!([mine[0]]), "{state}");
    assert_eq!(state["assigned"], serde_json::json!(mine), "{state}");
    for s in [a, b] {
        let (status, output) = s.terminate(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{output}");
    }
}
