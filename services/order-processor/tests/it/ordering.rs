//! Key-ordered concurrency against the real stack: a record waiting for its retries holds back
//! only the later records of its key (and, with `PROCESSING_ORDER=partition`, its whole
//! partition); a crash redoes none of the records that were final above the committed offset,
//! under either guarantee; at the in-flight bound intake waits and nothing is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::workload::{BIN, Seeded};
use order_processor::record::failures::FailureInjector;
use order_processor::{Application, Config};
use order_schema::{Order, OrderCodec};
use order_testkit::{Service, Stack, eventually, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

/// Fails the first three attempts of one order and notes when every attempt of every order ran.
#[derive(Debug)]
struct Recorder {
    failing: String,
    attempts: Mutex<HashMap<String, Vec<(u32, Instant)>>>,
}

impl FailureInjector for Recorder {
    fn fails(&self, order: &Order, _: i32, attempt: u32) -> bool {
        self.attempts
            .lock()
            .unwrap()
            .entry(order.order_id.clone())
            .or_default()
            .push((attempt, Instant::now()));
        order.order_id == self.failing && attempt <= 3
    }
}

fn order(id: &str, product: &str) -> Order {
    Order {
        order_id: id.to_owned(),
        product: product.to_owned(),
        price: 12.5,
    }
}

/// Sends `records` (key, order) to partition 0 of `topic`, in order (the idempotent producer
/// keeps it), all at once, and waits for them.
async fn send_in_order(stack: &Stack, topic: &str, records: &[(String, Order)]) {
    let codec = OrderCodec::new(&stack.registry, topic).unwrap();
    let producer = stack.producer();
    let mut values = Vec::with_capacity(records.len());
    for (_, o) in records {
        values.push(codec.encode(o).await.unwrap());
    }
    let sends: Vec<_> = records
        .iter()
        .zip(&values)
        .map(|((key, _), value)| {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .partition(0)
                .key(key.as_bytes())
                .payload(value);
            // enqueued here, not when awaited: the records go out together
            producer.send_result(record).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    for sent in sends {
        sent.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Runs the processor in-process on a one-partition topic holding, in this order: order `f`
/// (key `k`, failing three times), orders `g` and `h` (key `k`), and 200 orders of keys of
/// their own. Answers when each order's attempts ran, and when `f`'s first did.
async fn run_with_one_failing_key(
    processing_order: &str,
    backoff_ms: &str,
) -> (HashMap<String, Vec<(u32, Instant)>>, Instant) {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 1).await;
    stack.create_topic(&dlq, 1).await;
    let mut vars = stack.vars(&orders, &dlq);
    vars.extend(
        [
            ("CONSUMER_GROUP", unique("processor").as_str()),
            ("PROCESSING_ORDER", processing_order),
            ("RETRY_INITIAL_BACKOFF_MS", backoff_ms),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let recorder = Arc::new(Recorder {
        failing: "f".into(),
        attempts: Mutex::default(),
    });
    let shutdown = CancellationToken::new();
    let app = Application::build_with_failures(
        Config::from_vars(&vars).unwrap(),
        recorder.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let port = app.port();
    let running = tokio::spawn(app.run_until_stopped());
    let mut records = vec![
        ("k".to_owned(), order("f", "laptop")),
        ("k".to_owned(), order("g", "phone")),
        ("k".to_owned(), order("h", "tablet")),
    ];
    records.extend((0..200).map(|i| (format!("o-{i}"), order(&format!("o-{i}"), "mouse"))));
    send_in_order(&stack, &orders, &records).await;
    eventually(
        "all 203 orders processed",
        Duration::from_secs(60),
        || async {
            let s: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/stats"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (s["processed"].as_u64() == Some(203)).then_some(())
        },
    )
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let attempts = recorder.attempts.lock().unwrap().clone();
    let first = attempts["f"][0].1;
    (attempts, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_waiting_for_retries_holds_back_only_its_own_later_records() {
    let (attempts, t0) = run_with_one_failing_key("key", "1000").await;
    let after = |id: &str, n: usize| attempts[id][n].1.saturating_duration_since(t0);
    // f waits out 1, 2 and 4 s, as before
    let f: Vec<u32> = attempts["f"].iter().map(|(n, _)| *n).collect();
    assert_eq!(f, [1, 2, 3, 4]);
    for (n, secs) in [(1, 1.0), (2, 3.0), (3, 7.0)] {
        let at = after("f", n).as_secs_f64();
        assert!(
            (secs..secs + 0.5).contains(&at),
            "f's attempt {} at {at:.2} s",
            n + 1
        );
    }
    // the other keys of its partition did not wait for it: all of them within milliseconds
    let others = (0..200).map(|i| after(&format!("o-{i}"), 0)).max().unwrap();
    assert!(
        others < Duration::from_millis(500),
        "the last other key's order was attempted {others:?} after f's first attempt"
    );
    // and the later records of its key waited for it, in offset order
    assert!(
        attempts["g"][0].1 >= attempts["f"][3].1,
        "g ran before f was final"
    );
    assert!(attempts["h"][0].1 >= attempts["g"][0].1, "h ran before g");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_partition_order_a_waiting_record_holds_back_its_whole_partition() {
    let (attempts, _) = run_with_one_failing_key("partition", "300").await;
    let f_final = attempts["f"][3].1;
    for i in 0..200 {
        let first = attempts[&format!("o-{i}")][0].1;
        assert!(first >= f_final, "o-{i} ran before f was final");
    }
    assert!(attempts["g"][0].1 >= f_final);
}

/// The group's committed offset and metadata for partition 0 of `topic`.
fn committed(stack: &Stack, group: &str, topic: &str) -> (i64, String) {
    let c: BaseConsumer = stack.client().set("group.id", group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let e = got.find_partition(topic, 0).unwrap();
    let offset = match e.offset() {
        rdkafka::Offset::Offset(o) => o,
        _ => -1,
    };
    (offset, e.metadata().to_owned())
}

/// A replica is killed with SIGKILL while the first record of its partition waits for a retry
/// and the 500 after it are final; its successor takes the waiting one again and none of the
/// others (its committed position lists what was not final), under `guarantee`.
async fn nothing_final_is_done_again_after_a_crash(guarantee: &str) {
    let stack = Stack::from_env();
    let (orders, dlq, group) = (unique("orders"), unique("dlq"), unique("processor"));
    stack.create_topic(&orders, 1).await;
    stack.create_topic(&dlq, 1).await;
    let seeded = Seeded {
        seed: unique("seed"),
        rate: 0.5,
        max_retries: 3,
        initial_backoff_ms: 6_000,
    };
    // the first order fails its first attempt and no other; the others pass at once
    let ids = (0..).map(|i| format!("order-{i}"));
    let first = ids
        .clone()
        .find(|id| seeded.fails(id, 1) && !seeded.fails(id, 2))
        .unwrap();
    let mut records: Vec<(String, Order)> = vec![(first.clone(), order(&first, "laptop"))];
    records.extend(
        ids.filter(|id| !seeded.fails(id, 1))
            .take(500)
            .enumerate()
            .map(|(i, id)| {
                // five of them break a rule: dead letters, each to be there once
                let product = if i % 100 == 7 { "unicorn" } else { "mouse" };
                (id.clone(), order(&id, product))
            }),
    );
    let mut vars = stack.vars(&orders, &dlq);
    vars.extend(
        [
            ("CONSUMER_GROUP", group.as_str()),
            ("PROCESSING_GUARANTEE", guarantee),
            ("COMMIT_INTERVAL_MS", "200"),
            ("TRANSACTION_TIMEOUT_MS", "5000"),
            ("TRANSIENT_FAILURE_SEED", seeded.seed.as_str()),
            ("TRANSIENT_FAILURE_RATE", "0.5"),
            ("RETRY_INITIAL_BACKOFF_MS", "6000"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut a = Service::start(BIN, &vars);
    a.wait_for("/readyz", Duration::from_secs(60)).await;
    send_in_order(&stack, &orders, &records).await;
    eventually(
        "the 495 valid orders after the waiting one processed",
        Duration::from_secs(30),
        || async {
            let s = a.get_json("/stats").await.ok()?;
            (s["processed"].as_u64() == Some(495)).then_some(())
        },
    )
    .await;
    // a few commits later, the position held by the waiting record is committed
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    if guarantee == "at_least_once" {
        let (offset, metadata) = committed(&stack, &group, &orders);
        assert_eq!(offset, 0, "the committed offset is the waiting record's");
        assert!(
            metadata.starts_with("p1:"),
            "the records final above it are in the commit: {metadata:?}"
        );
    }
    a.kill();
    let mut b = Service::start(BIN, &vars);
    b.wait_for("/readyz", Duration::from_secs(60)).await;
    eventually(
        "the waiting order processed by the next replica",
        Duration::from_secs(30),
        || async {
            let s = b.get_json("/stats").await.ok()?;
            let done = s["processed"].as_u64()? + s["dead_lettered"].as_u64()?;
            (done > 0 && s["retries"].as_u64()? >= 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = b.get_json("/stats").await.unwrap();
    if guarantee == "at_least_once" {
        // this replica's own share: the one order that was not final, and nothing else
        assert_eq!(s["processed"], 1, "{s}");
        assert_eq!(s["dead_lettered"], 0, "{s}");
    } else {
        let g = b.get_json("/stats/global").await.unwrap();
        assert_eq!(g["processed"], 496, "{g}");
        assert_eq!(g["dead_lettered"], 5, "{g}");
    }
    let letters = stack.read_all(&dlq, 5, Duration::from_secs(10));
    assert_eq!(letters.len(), 5, "every dead letter once");
    let (status, output) = b.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_redoes_none_of_the_records_final_above_the_committed_offset() {
    nothing_final_is_done_again_after_a_crash("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_redoes_none_of_the_records_final_above_the_committed_offset() {
    nothing_final_is_done_again_after_a_crash("exactly_once").await;
}

/// `processor_records_in_flight`'s value for partition 0, from `/metrics`.
async fn in_flight(s: &Service) -> Option<i64> {
    let (_, metrics) = s.get("/metrics").await?;
    metrics
        .lines()
        .find(|l| l.starts_with("processor_records_in_flight{") && l.contains("partition=\"0\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_in_flight_bound_intake_waits_nothing_is_lost_and_memory_stays_flat() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 1).await;
    stack.create_topic(&dlq, 1).await;
    let seeded = Seeded {
        seed: unique("seed"),
        rate: 0.3,
        max_retries: 3,
        initial_backoff_ms: 200,
    };
    let records: Vec<(String, Order)> = (0..3_000)
        .map(|i| {
            let id = format!("bound-{i}");
            (id.clone(), order(&id, "phone"))
        })
        .collect();
    let exhausted = records.iter().filter(|(id, _)| seeded.exhausts(id)).count();
    let mut vars = stack.vars(&orders, &dlq);
    vars.extend(
        [
            ("CONSUMER_GROUP", unique("processor").as_str()),
            ("PROCESSING_GUARANTEE", "at_least_once"),
            ("MAX_IN_FLIGHT_RECORDS", "20"),
            ("TRANSIENT_FAILURE_SEED", seeded.seed.as_str()),
            ("TRANSIENT_FAILURE_RATE", "0.3"),
            ("RETRY_INITIAL_BACKOFF_MS", "200"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut p = Service::start(BIN, &vars);
    p.wait_for("/readyz", Duration::from_secs(60)).await;
    let idle = p.rss().unwrap();
    send_in_order(&stack, &orders, &records).await;
    // sampled while it drains: never more than 20 records in flight, memory flat
    let (mut most, mut rss, mut samples) = (0, Vec::new(), 0);
    let started = Instant::now();
    loop {
        let s = p.get_json("/stats").await.unwrap();
        let done = s["processed"].as_u64().unwrap() + s["dead_lettered"].as_u64().unwrap();
        if let Some(n) = in_flight(&p).await {
            most = most.max(n);
            samples += 1;
        }
        rss.push(p.rss().unwrap());
        if done >= 3_000 {
            assert_eq!(
                s["processed"].as_u64(),
                Some(3_000 - exhausted as u64),
                "{s}"
            );
            assert_eq!(s["dead_lettered"].as_u64(), Some(exhausted as u64), "{s}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not drained in 120 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(samples > 10, "the gauge was sampled {samples} times");
    assert!(
        most <= 20,
        "{most} records in flight, above the bound of 20"
    );
    assert!(
        most >= 10,
        "the bound was reached ({most}): intake had to wait"
    );
    let peak = *rss.iter().max().unwrap();
    assert!(
        peak < idle + 24 * 1024 * 1024,
        "resident memory grew from {idle} to {peak} bytes while the bound held"
    );
    let letters = stack.read_all(&dlq, exhausted, Duration::from_secs(10));
    assert_eq!(
        letters.len(),
        exhausted,
        "each exhausted order dead-lettered once"
    );
    let (status, output) = p.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
}
