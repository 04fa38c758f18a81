//! Operating the processor: pause and resume, safe replay in exactly-once mode, the product
//! catalogue as a setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::workload::{BIN, Workload};
use order_schema::{Order, OrderCodec};
use order_testkit::{Service, Stack, eventually, unique};

async fn post(s: &Service, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(s.url(path))
        .send()
        .await
        .unwrap();
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
