//! Redrive against the real stack: a fixed cause brought back to exact totals, a redrive
//! killed mid-way and run again, a run dead between its offsets and its commit fenced, a poison
//! record parked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use order_schema::{Order, OrderCodec, PRODUCTS};
use order_testkit::{Service, Stack, eventually, headers_of, unique};
use rdkafka::message::Message;

const BIN: &str = env!("CARGO_BIN_EXE_dlq-analyzer");

/// `dlq-analyzer redrive <args>` with `vars`, run to its end: (success, its JSON, stderr).
fn redrive(vars: &[(String, String)], args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(BIN)
        .arg("redrive")
        .args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REDRIVE "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn once_the_cause_is_fixed_a_filtered_redrive_brings_the_totals_to_the_truth() {
    let stack = Stack::from_env();
    let (orders, dlq, group) = (unique("orders"), unique("dlq"), unique("g"));
    stack.create_topic(&orders, 2).await;
    stack.create_topic(&dlq, 1).await;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let producer = stack.producer();
    let (mut valid_cents, mut drones) = (0i64, BTreeSet::new());
    for i in 0..240i64 {
        let (product, garbage) = match i % 8 {
            0 => ("drone", false),
            1 if i % 24 == 1 => ("", true),
            _ => (
                PRODUCTS[usize::try_from(i).unwrap() % PRODUCTS.len()],
                false,
            ),
        };
        let id = format!("order-{i}");
        let cents = 1_000 + i;
        let value = if garbage {
            b"junk".to_vec()
        } else {
            #[allow(clippy::cast_precision_loss)]
            let o = Order {
                order_id: id.clone(),
                product: product.into(),
                price: cents as f64 / 100.0,
            };
            valid_cents += cents;
            if product == "drone" {
                drones.insert(id.clone());
            }
            codec.encode(&o).await.unwrap()
        };
        stack
            .produce_raw(
                &producer,
                &orders,
                None,
                Some(id.as_bytes()),
                Some(&value),
                &[],
            )
            .await;
    }
    let garbage = 10u64;
    let processor_bin = order_testkit::service_bin("order-processor");
    let mut vars = stack.vars(&orders, &dlq);
    vars.push(("CONSUMER_GROUP".into(), group.clone()));
    let global = |s: &Service| {
        let url = s.url("/stats/global");
        async move {
            reqwest::get(url)
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };

    // exported to Jaeger, so that dead letters and redriven orders carry trace context
    let traced = |vars: &[(String, String)], service: &str| {
        let mut v = vars.to_vec();
        v.extend(
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_SERVICE_NAME", service),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
                // spans are built at info
                ("RUST_LOG", "info"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        v
    };
    // drones are not sold yet: dead-lettered as unknown_product, with the garbage
    let mut p = Service::start(
        processor_bin.to_str().unwrap(),
        &traced(&vars, "order-processor"),
    );
    p.wait_for("/healthz", Duration::from_secs(30)).await;
    eventually(
        "the first run's outcomes",
        Duration::from_secs(60),
        || async {
            let g = global(&p).await?;
            (g["dead_lettered"] == drones.len() as u64 + garbage).then_some(())
        },
    )
    .await;
    p.terminate(Duration::from_secs(30));

    // a dry run says what would go, and sends nothing
    let (ok, dry, err) = redrive(&vars, &["--kind", "unknown_product", "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(dry["matched"], drones.len(), "{dry}");
    assert_eq!(dry["redriven"], 0, "{dry}");
    assert_eq!(dry["records"].as_array().unwrap().len(), drones.len());

    // drones are sold now; exactly their dead letters go back (the sends exported to Jaeger)
    let (ok, done, err) = redrive(
        &traced(&vars, "dlq-analyzer"),
        &["--kind", "unknown_product"],
    );
    assert!(ok, "{err}");
    assert_eq!(done["redriven"], drones.len(), "{done}");
    assert_eq!(done["parked"], 0, "{done}");
    let catalogue = format!("{},drone", PRODUCTS.join(","));
    vars.push(("PRODUCT_CATALOGUE".into(), catalogue));
    let mut p = Service::start(processor_bin.to_str().unwrap(), &vars);
    p.wait_for("/healthz", Duration::from_secs(30)).await;
    let truth = 240 - garbage;
    let g = eventually(
        "the group's totals to reach the truth",
        Duration::from_secs(60),
        || async {
            let g = global(&p).await?;
            (g["processed"] == truth).then_some(g)
        },
    )
    .await;
    #[allow(clippy::cast_precision_loss)]
    let revenue = valid_cents as f64 / 100.0;
    assert_eq!(g["revenue"].as_f64(), Some(revenue), "{g}");
    assert_eq!(g["by_product"]["drone"]["processed"], drones.len(), "{g}");

    // the redriven records: the drones, once each, counted, with their trace context renewed
    let sent = stack.read_all(&orders, 240 + drones.len(), Duration::from_secs(20));
    let redriven: Vec<_> = sent
        .iter()
        .filter(|m| headers_of(m).contains_key("redrive.count"))
        .collect();
    let keys: BTreeSet<String> = redriven
        .iter()
        .map(|m| String::from_utf8(m.key().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(keys, drones);
    assert_eq!(redriven.len(), drones.len(), "each once");
    for m in &redriven {
        let h = headers_of(m);
        assert_eq!(h["redrive.count"], "1");
        assert!(h.keys().all(|k| !k.starts_with("dlq.")), "{h:?}");
    }
    // a redriven order's send is a new trace, linked to its dead letter's trace
    let letters = stack.read_all(&dlq, drones.len() + 10, Duration::from_secs(10));
    let trace_of = |traceparent: &str| traceparent.split('-').nth(1).unwrap().to_owned();
    let first = redriven[0];
    let original = letters
        .iter()
        .find(|l| l.key() == first.key())
        .map(|l| trace_of(&headers_of(l)["traceparent"]))
        .unwrap();
    let new_trace = trace_of(&headers_of(first)["traceparent"]);
    assert_ne!(new_trace, original);
    let url = format!("http://127.0.0.1:16686/api/traces/{new_trace}");
    eventually(
        "the redrive's span in Jaeger, linked to the dead letter's trace",
        Duration::from_secs(30),
        || async {
            let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            let spans = body["data"][0]["spans"].as_array()?.clone();
            spans
                .iter()
                .any(|s| {
                    s["operationName"] == format!("send {orders}")
                        && s["references"]
                            .as_array()
                            .is_some_and(|r| r.iter().any(|x| x["traceID"] == original.as_str()))
                })
                .then_some(())
        },
    )
    .await;

    // the garbage stays where it was, and nothing new was dead-lettered
    assert_eq!(letters.len(), drones.len() + 10);
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");

    // run again, the same request has nothing left to do
    let (ok, again, err) = redrive(&vars, &["--kind", "unknown_product"]);
    assert!(ok, "{err}");
    assert_eq!(again["redriven"], 0, "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_killed_mid_way_and_run_again_resends_nothing_twice() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 3).await;
    stack.create_topic(&dlq, 2).await;
    let producer = stack.producer();
    const N: usize = 5_000;
    let meta = [
        ("dlq.error.category", "validation"),
        ("dlq.error.kind", "unknown_product"),
    ];
    let sends = (0..N).map(|i| {
        let (stack, producer, dlq) = (&stack, &producer, &dlq);
        async move {
            let key = format!("k{i}");
            stack
                .produce_raw(producer, dlq, None, Some(key.as_bytes()), Some(b"v"), &meta)
                .await;
        }
    });
    futures::future::join_all(sends).await;
    let vars = stack.vars(&orders, &dlq);

    let mut first = Command::new(BIN)
        .args(["redrive", "--kind", "unknown_product", "--rate", "1000"])
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // some committed transactions, and one open, when it dies
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let partial = stack.read_all(&orders, 1, Duration::from_secs(5)).len();
    assert!(partial > 0 && partial < N, "killed mid-way: {partial} sent");

    let (ok, done, err) = redrive(&vars, &["--kind", "unknown_product", "--rate", "0"]);
    assert!(ok, "{err}");
    assert_eq!(
        done["redriven"].as_u64().unwrap() as usize,
        N - partial,
        "{done}"
    );
    let sent = stack.read_all(&orders, N, Duration::from_secs(30));
    let keys: BTreeSet<Vec<u8>> = sent.iter().map(|m| m.key().unwrap().to_vec()).collect();
    assert_eq!(sent.len(), N, "every dead letter once, none twice");
    assert_eq!(keys.len(), N);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_redriven_too_often_is_parked() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    let parking = format!("{dlq}-parking");
    for t in [&orders, &dlq, &parking] {
        stack.create_topic(t, 1).await;
    }
    let producer = stack.producer();
    for (key, count) in [("poison", "3"), ("fresh", "1")] {
        stack
            .produce_raw(
                &producer,
                &dlq,
                None,
                Some(key.as_bytes()),
                Some(b"v"),
                &[
                    ("dlq.error.category", "retries_exhausted"),
                    ("dlq.error.kind", "transient_failure"),
                    ("redrive.count", count),
                ],
            )
            .await;
    }
    let vars = stack.vars(&orders, &dlq);
    // the same request by HTTP, as a dry run: listed in /report's redrives
    let mut analyzer = Service::start(BIN, &vars);
    analyzer.wait_for("/readyz", Duration::from_secs(30)).await;
    let dry: serde_json::Value = order_testkit::operation(&analyzer.url("/redrive"))
        .json(&serde_json::json!({"category": "retries_exhausted", "dry_run": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dry["matched"], 2, "{dry}");
    assert_eq!(dry["records"][0]["parked"], true, "{dry}");
    let bad = order_testkit::operation(&analyzer.url("/redrive"))
        .json(&serde_json::json!({"category": "nonsense", "dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let report = analyzer.get_json("/report").await.unwrap();
    assert_eq!(report["redrives"][0]["status"], "done", "{report}");
    analyzer.terminate(Duration::from_secs(20));

    let (ok, done, err) = redrive(&vars, &["--category", "retries_exhausted"]);
    assert!(ok, "{err}");
    assert_eq!(
        (done["redriven"].as_u64(), done["parked"].as_u64()),
        (Some(1), Some(1)),
        "{done}"
    );
    let parked = stack.read_all(&parking, 1, Duration::from_secs(10));
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].key(), Some(&b"poison"[..]));
    let sent = stack.read_all(&orders, 1, Duration::from_secs(10));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].key(), Some(&b"fresh"[..]));
    assert_eq!(headers_of(&sent[0])["redrive.count"], "2");
}

/// A run that dies after handing its position to the transaction but before the commit leaves
/// the group's offsets pending on the broker. The next run fences it and goes on from the last
/// committed position: neither stuck behind the pending offsets nor back at the beginning.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_between_its_offsets_and_its_commit_is_fenced_by_the_next() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    use rdkafka::{Offset, TopicPartitionList};

    let stack = Stack::from_env();
    let (orders, dlq, id) = (unique("orders"), unique("dlq"), unique("zombie"));
    stack.create_topic(&orders, 1).await;
    stack.create_topic(&dlq, 1).await;
    let producer = stack.producer();
    const N: usize = 10;
    for i in 0..N {
        stack
            .produce_raw(
                &producer,
                &dlq,
                Some(0),
                Some(format!("k{i}").as_bytes()),
                Some(b"v"),
                &[
                    ("dlq.error.category", "validation"),
                    ("dlq.error.kind", "unknown_product"),
                ],
            )
            .await;
    }
    // what a run of request `id` does: its transactional id and its group are both this
    let group = dlq_analyzer::redrive::group_id(&id);
    let consumer: BaseConsumer = stack.client().set("group.id", &group).create().unwrap();
    let metadata = consumer.group_metadata().unwrap();
    let zombie: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = stack
        .client()
        .set("transactional.id", &group)
        .set("transaction.timeout.ms", "60000")
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    zombie.init_transactions(t).unwrap();
    let offsets = |o: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&dlq, 0, Offset::Offset(o))
            .unwrap();
        tpl
    };
    let send = |i: usize| {
        let key = format!("k{i}");
        zombie
            .send(BaseRecord::<str, str>::to(&orders).key(&key).payload("v"))
            .unwrap();
    };
    // a committed transaction: the first 3 dead letters redriven
    zombie.begin_transaction().unwrap();
    (0..3).for_each(send);
    zombie
        .send_offsets_to_transaction(&offsets(3), &metadata, t)
        .unwrap();
    zombie.commit_transaction(t).unwrap();
    // then 3 more sent and the position handed over, and the process gone before the commit
    zombie.begin_transaction().unwrap();
    (3..6).for_each(send);
    zombie.flush(t).unwrap();
    zombie
        .send_offsets_to_transaction(&offsets(6), &metadata, t)
        .unwrap();

    let vars = stack.vars(&orders, &dlq);
    let (ok, done, err) = redrive(&vars, &["--id", &id, "--kind", "unknown_product"]);
    assert!(ok, "{err}");
    assert_eq!(done["redriven"], (N - 3) as u64, "{done}");
    let sent = stack.read_all(&orders, N, Duration::from_secs(30));
    let keys: BTreeSet<Vec<u8>> = sent.iter().map(|m| m.key().unwrap().to_vec()).collect();
    assert_eq!(sent.len(), N, "every dead letter once, none twice");
    assert_eq!(keys.len(), N);
    // the fenced producer cannot commit what it had open
    assert!(zombie.commit_transaction(t).is_err());
}
