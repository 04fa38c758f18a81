//! The processor (and the analyzer behind it) against the real native stack: every record is
//! counted or dead-lettered, aggregates are exact, dead letters are right, retries keep their
//! schedule without holding back other partitions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_processor::record::failures::FailureInjector;
use order_processor::{Application, Config};
use order_schema::{Order, OrderCodec, PRODUCTS};
use order_testkit::{Stack, eventually, headers_of, init_test_logging, unique};
use rand::Rng;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

/// A dead letter the test expects: category, key and value bytes.
type ExpectedLetter = (&'static str, Option<Vec<u8>>, Option<Vec<u8>>);

fn vars(stack: &Stack, orders: &str, dlq: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = stack.vars(orders, dlq);
    v.push(("CONSUMER_GROUP".into(), unique("processor")));
    v.extend(
        extra
            .iter()
            .map(|(k, val)| ((*k).to_owned(), (*val).to_owned())),
    );
    v
}

/// Fails chosen attempts and remembers when each attempt of each order happened.
#[derive(Debug, Default)]
struct Scripted {
    /// order id -> attempts that fail (u32::MAX: every attempt)
    fail: HashMap<String, u32>,
    fail_partition: Option<i32>,
    attempts: Mutex<HashMap<String, Vec<(i32, Instant)>>>,
}

impl FailureInjector for Scripted {
    fn fails(&self, order: &Order, partition: i32, attempt: u32) -> bool {
        self.attempts
            .lock()
            .unwrap()
            .entry(order.order_id.clone())
            .or_default()
            .push((partition, Instant::now()));
        if self.fail_partition == Some(partition) {
            return true;
        }
        self.fail
            .get(&order.order_id)
            .is_some_and(|n| attempt <= *n)
    }
}

async fn get_json(port: u16, path: &str) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn random_valid(rng: &mut impl Rng) -> (Order, i64) {
    let cents = rng.random_range(1_000..=100_000_i64);
    #[allow(clippy::cast_precision_loss)]
    let o = Order {
        order_id: uuid::Uuid::new_v4().to_string(),
        product: PRODUCTS[rng.random_range(0..PRODUCTS.len())].to_owned(),
        price: cents as f64 / 100.0,
    };
    (o, cents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_every_record_is_counted_or_dead_lettered_and_the_aggregates_are_exact() {
    every_record_is_counted_or_dead_lettered("exactly_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_every_record_is_counted_or_dead_lettered_and_the_aggregates_are_exact() {
    every_record_is_counted_or_dead_lettered("at_least_once").await;
}

async fn every_record_is_counted_or_dead_lettered(guarantee: &str) {
    init_test_logging();
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("orders-dlq"));
    stack.create_topic(&orders, 3).await;
    stack.create_topic(&dlq, 3).await;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    codec.register().await.unwrap();
    let producer = stack.producer();
    let mut rng = rand::rng();

    // ground truth
    let mut valid_cents = Vec::new();
    let mut expected_dlq: HashMap<(i32, i64), ExpectedLetter> = HashMap::new();
    let mut scripted = Scripted::default();
    let mut expected_retries = 0;
    let mut exhausted_value = 0;
    let mut pending = Vec::new();
    for i in 0..300 {
        let (o, cents) = random_valid(&mut rng);
        if i % 10 == 0 {
            scripted.fail.insert(o.order_id.clone(), 1); // one temporary failure, then success
            expected_retries += 1;
        }
        if i == 7 {
            scripted.fail.insert(o.order_id.clone(), u32::MAX); // never succeeds
            exhausted_value = cents;
            pending.push((o, Some("retries_exhausted")));
            continue;
        }
        valid_cents.push(cents);
        pending.push((o, None));
    }
    // MAX_RETRIES=2 below: the exhausted order is retried twice
    expected_retries += 2;
    let invalid = [
        (
            "non_positive_price",
            Order {
                order_id: uuid::Uuid::new_v4().to_string(),
                product: "phone".into(),
                price: -12.0,
            },
        ),
        (
            "non_positive_price",
            Order {
                order_id: uuid::Uuid::new_v4().to_string(),
                product: "phone".into(),
                price: 0.0,
            },
        ),
        (
            "unknown_product",
            Order {
                order_id: uuid::Uuid::new_v4().to_string(),
                product: "unicorn".into(),
                price: 99.5,
            },
        ),
        (
            "empty_order_id",
            Order {
                order_id: String::new(),
                product: "mouse".into(),
                price: 15.0,
            },
        ),
        (
            "price_not_whole_cents",
            Order {
                order_id: uuid::Uuid::new_v4().to_string(),
                product: "mouse".into(),
                price: 15.001,
            },
        ),
    ];
    for (_, o) in &invalid {
        pending.push((o.clone(), Some("validation")));
    }
    for (o, category) in &pending {
        let bytes = codec.encode(o).await.unwrap();
        let at = stack
            .produce_raw(
                &producer,
                &orders,
                None,
                Some(o.order_id.as_bytes()),
                Some(&bytes),
                &[("source", "test")],
            )
            .await;
        if let Some(c) = category {
            expected_dlq.insert(at, (c, Some(o.order_id.as_bytes().to_vec()), Some(bytes)));
        }
    }
    let good = codec.encode(&pending[0].0).await.unwrap();
    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&[0x7f, 0, 0, 9]);
    let garbage: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "bad_magic_byte",
            Some(b"{\"orderId\": \"json is not avro\"}".to_vec()),
        ),
        ("too_short", Some(vec![0, 0, 0])),
        ("unknown_schema_id", Some(unknown_id)),
        ("invalid_avro", Some(good[..good.len() - 5].to_vec())),
        ("null_value", None),
    ];
    for (i, (_, bytes)) in garbage.iter().enumerate() {
        let key = format!("garbage-{i}");
        let at = stack
            .produce_raw(
                &producer,
                &orders,
                Some(i32::try_from(i % 3).unwrap()),
                Some(key.as_bytes()),
                bytes.as_deref(),
                &[("source", "test")],
            )
            .await;
        expected_dlq.insert(
            at,
            ("deserialization", Some(key.into_bytes()), bytes.clone()),
        );
    }
    let total = pending.len() + garbage.len();

    let shutdown = CancellationToken::new();
    let config = Config::from_vars(&vars(
        &stack,
        &orders,
        &dlq,
        &[
            ("MAX_RETRIES", "2"),
            ("RETRY_INITIAL_BACKOFF_MS", "50"),
            ("RETRY_BACKOFF_MULTIPLIER", "2"),
            ("PROCESSING_GUARANTEE", guarantee),
        ],
    ))
    .unwrap();
    let app = Application::build_with_failures(config, Arc::new(scripted), shutdown.clone())
        .await
        .unwrap();
    let port = app.port();
    let processor = tokio::spawn(app.run_until_stopped());

    let analyzer_config = dlq_analyzer::Config::from_vars(&{
        let mut v = stack.vars(&orders, &dlq);
        v.push(("CONSUMER_GROUP".into(), unique("analyzer")));
        v
    })
    .unwrap();
    let analyzer = dlq_analyzer::Application::build(analyzer_config, shutdown.clone())
        .await
        .unwrap();
    let analyzer_port = analyzer.port();
    let analyzer = tokio::spawn(analyzer.run_until_stopped());

    let stats = eventually(
        "every record to reach an outcome",
        Duration::from_secs(90),
        || async {
            let s = get_json(port, "/stats").await;
            let done = s["processed"].as_u64().unwrap() + s["dead_lettered"].as_u64().unwrap();
            (done >= total as u64).then_some(s)
        },
    )
    .await;

    // exact aggregates against the ground truth
    let sum: i64 = valid_cents.iter().sum();
    let count = valid_cents.len() as u64;
    assert_eq!(stats["processed"].as_u64(), Some(count));
    #[allow(clippy::cast_precision_loss)]
    {
        assert_eq!(stats["revenue"].as_f64(), Some(sum as f64 / 100.0));
        assert_eq!(
            stats["min"].as_f64(),
            Some(*valid_cents.iter().min().unwrap() as f64 / 100.0)
        );
        assert_eq!(
            stats["max"].as_f64(),
            Some(*valid_cents.iter().max().unwrap() as f64 / 100.0)
        );
        assert_eq!(
            stats["average"].as_f64(),
            Some((sum as f64 / count as f64).round() / 100.0)
        );
    }
    assert_eq!(stats["retries"].as_u64(), Some(expected_retries));
    assert_eq!(
        stats["dead_lettered"].as_u64(),
        Some(expected_dlq.len() as u64)
    );
    assert_eq!(
        stats["dead_lettered_by_category"]["validation"].as_u64(),
        Some(invalid.len() as u64)
    );
    assert_eq!(
        stats["dead_lettered_by_category"]["deserialization"].as_u64(),
        Some(garbage.len() as u64)
    );
    assert_eq!(
        stats["dead_lettered_by_category"]["retries_exhausted"].as_u64(),
        Some(1)
    );

    // the dead-letter topic holds each failed record once, bytes unchanged, with its metadata
    let letters = stack.read_all(&dlq, expected_dlq.len(), Duration::from_secs(30));
    assert_eq!(letters.len(), expected_dlq.len());
    let mut kinds = BTreeMap::new();
    for m in &letters {
        let h = headers_of(m);
        let at: (i32, i64) = (
            h["dlq.original.partition"].parse().unwrap(),
            h["dlq.original.offset"].parse().unwrap(),
        );
        let (category, key, value) = expected_dlq
            .remove(&at)
            .unwrap_or_else(|| panic!("unexpected or duplicate dead letter {at:?}: {h:?}"));
        assert_eq!(h["dlq.error.category"], category, "{h:?}");
        assert_eq!(m.key().map(<[u8]>::to_vec), key);
        assert_eq!(m.payload().map(<[u8]>::to_vec), value);
        assert_eq!(h["source"], "test", "original headers are kept");
        assert_eq!(h["dlq.original.topic"], orders);
        assert_eq!(h["dlq.failed.service"], "order-processor");
        assert!(!h["dlq.error.message"].is_empty());
        assert!(h["dlq.original.timestamp"].parse::<i64>().unwrap() > 0);
        assert!(h["dlq.failed.at"].ends_with('Z'));
        let attempts: u32 = h["dlq.attempts"].parse().unwrap();
        assert_eq!(
            attempts,
            if category == "retries_exhausted" {
                3
            } else {
                1
            }
        );
        *kinds.entry(h["dlq.error.kind"].clone()).or_insert(0) += 1;
    }
    assert!(
        expected_dlq.is_empty(),
        "missing dead letters: {expected_dlq:?}"
    );
    let expected_kinds = garbage
        .iter()
        .map(|(k, _)| *k)
        .chain(invalid.iter().map(|(k, _)| *k))
        .chain(["transient_failure"]);
    for kind in expected_kinds {
        assert!(
            kinds.contains_key(kind),
            "no dead letter of kind {kind}: {kinds:?}"
        );
    }

    // the analyzer's report matches the topic
    let report = eventually(
        "the analyzer to read every dead letter",
        Duration::from_secs(30),
        || async {
            let r = get_json(analyzer_port, "/report").await;
            (r["total"].as_u64() == Some(letters.len() as u64)).then_some(r)
        },
    )
    .await;
    assert_eq!(
        report["by_category"]["validation"].as_u64(),
        Some(invalid.len() as u64)
    );
    assert_eq!(
        report["by_category"]["deserialization"].as_u64(),
        Some(garbage.len() as u64)
    );
    assert_eq!(report["by_category"]["retries_exhausted"].as_u64(), Some(1));
    assert_eq!(
        report["by_kind"]["deserialization/bad_magic_byte"].as_u64(),
        Some(1)
    );
    // decodable failed orders with a positive whole-cent price: the exhausted one, the unicorn
    // ($99.50) and the empty-id mouse ($15.00)
    #[allow(clippy::cast_precision_loss)]
    let failed_value = (exhausted_value + 9_950 + 1_500) as f64 / 100.0;
    assert_eq!(report["failed_value"].as_f64(), Some(failed_value));
    assert_eq!(report["decoded"].as_u64(), Some(1 + invalid.len() as u64));

    shutdown.cancel();
    let final_stats = processor.await.unwrap().unwrap();
    assert_eq!(final_stats.processed, count);
    analyzer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_keep_their_backoff_and_do_not_hold_back_other_partitions() {
    init_test_logging();
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("orders-dlq"));
    stack.create_topic(&orders, 2).await;
    stack.create_topic(&dlq, 1).await;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let producer = stack.producer();
    let mut rng = rand::rng();

    let (stuck, _) = random_valid(&mut rng);
    let bytes = codec.encode(&stuck).await.unwrap();
    stack
        .produce_raw(
            &producer,
            &orders,
            Some(0),
            Some(stuck.order_id.as_bytes()),
            Some(&bytes),
            &[],
        )
        .await;
    let mut others = Vec::new();
    for _ in 0..20 {
        let (o, _) = random_valid(&mut rng);
        let bytes = codec.encode(&o).await.unwrap();
        stack
            .produce_raw(
                &producer,
                &orders,
                Some(1),
                Some(o.order_id.as_bytes()),
                Some(&bytes),
                &[],
            )
            .await;
        others.push(o.order_id);
    }

    let scripted = Arc::new(Scripted {
        fail_partition: Some(0),
        ..Scripted::default()
    });
    let shutdown = CancellationToken::new();
    let config = Config::from_vars(&vars(
        &stack,
        &orders,
        &dlq,
        &[
            ("MAX_RETRIES", "3"),
            ("RETRY_INITIAL_BACKOFF_MS", "300"),
            ("RETRY_BACKOFF_MULTIPLIER", "2"),
        ],
    ))
    .unwrap();
    let app = Application::build_with_failures(config, scripted.clone(), shutdown.clone())
        .await
        .unwrap();
    let port = app.port();
    let processor = tokio::spawn(app.run_until_stopped());
    eventually(
        "the stuck order to be dead-lettered",
        Duration::from_secs(60),
        || async {
            let s = get_json(port, "/stats").await;
            (s["dead_lettered"].as_u64() == Some(1) && s["processed"].as_u64() == Some(20))
                .then_some(())
        },
    )
    .await;
    shutdown.cancel();
    processor.await.unwrap().unwrap();

    let attempts = scripted.attempts.lock().unwrap();
    let times: Vec<Instant> = attempts[&stuck.order_id].iter().map(|(_, t)| *t).collect();
    assert_eq!(times.len(), 4, "one attempt and three retries");
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // the schedule itself is unit-tested with paused time (record.rs); end to end, a retry
    // never comes early, and a loaded machine may make it late
    for (gap, expected) in gaps.iter().zip([300u128, 600, 1200]) {
        assert!(
            *gap >= expected && *gap < expected + 2_000,
            "gaps {gaps:?}, expected 300, 600, 1200 ms or a little more"
        );
    }
    // every order of the other partition was done while the stuck one was still retrying
    let last_retry = times[3];
    for id in &others {
        let (partition, t) = attempts[id][0];
        assert_eq!(partition, 1);
        assert!(
            t < last_retry,
            "partition 1 waited for partition 0's backoff"
        );
    }
    let letters = stack.read_all(&dlq, 1, Duration::from_secs(20));
    assert_eq!(letters.len(), 1);
    let h = headers_of(&letters[0]);
    assert_eq!(h["dlq.error.category"], "retries_exhausted");
    assert_eq!(h["dlq.attempts"], "4");
}
