//! The order-generator binary against the native stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use order_schema::OrderCodec;
use order_testkit::{Service, Stack, eventually, unique};
use rdkafka::message::Message;

const BIN: &str = env!("CARGO_BIN_EXE_order-generator");

#[tokio::test(flavor = "multi_thread")]
async fn sends_order_count_orders_then_exits_with_a_summary() {
    let stack = Stack::from_env();
    let orders = unique("orders");
    stack.create_topic(&orders, 3).await;
    let mut vars = stack.vars(&orders, &unique("dlq"));
    vars.extend([
        ("ORDER_COUNT".to_owned(), "200".to_owned()),
        ("ORDER_RATE".to_owned(), "0".to_owned()),
        ("INVALID_ORDER_RATIO".to_owned(), "0.25".to_owned()),
    ]);
    let g = Service::start(BIN, &vars);
    let (status, output) = g.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{output}");
    let summary = Service::summary(&output);
    assert_eq!(summary["produced"], 200, "{output}");
    assert_eq!(summary["failed"], 0);
    let invalid = summary["invalid"].as_u64().unwrap();

    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let records = stack.read_all(&orders, 200, Duration::from_secs(30));
    assert_eq!(records.len(), 200);
    let mut broken = 0;
    for r in &records {
        let order = codec.decode(r.payload()).await.unwrap();
        assert_eq!(
            r.key(),
            Some(order.order_id.as_bytes()),
            "the key is the orderId"
        );
        match order.validate() {
            Ok(cents) => assert!((1_000..=100_000).contains(&cents.0), "{order:?}"),
            Err(_) => broken += 1,
        }
    }
    assert_eq!(
        broken, invalid,
        "the summary counts exactly the invalid orders sent"
    );
    assert!(
        invalid > 20 && invalid < 90,
        "about a quarter invalid, got {invalid}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_until_sigterm_then_flushes_and_exits_zero() {
    let stack = Stack::from_env();
    let orders = unique("orders");
    stack.create_topic(&orders, 1).await;
    let mut vars = stack.vars(&orders, &unique("dlq"));
    vars.push(("ORDER_RATE".to_owned(), "50".to_owned()));
    let mut g = Service::start(BIN, &vars);
    g.wait_for("/healthz", Duration::from_secs(20)).await;
    g.wait_for("/readyz", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = g.get_json("/stats").await.unwrap();
    assert!(
        stats["produced"].as_u64() > Some(0) && stats["failed"] == 0,
        "{stats}"
    );
    let (status, output) = g.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    let produced = Service::summary(&output)["produced"].as_u64().unwrap();
    assert!(produced > 0);
    let stored = stack.read_all(
        &orders,
        usize::try_from(produced).unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(
        stored.len() as u64,
        produced,
        "every acknowledged order is in the topic"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_the_send_queue_stays_full_ends_the_run_and_flushes_what_was_queued() {
    let stack = Stack::from_env();
    let orders = unique("orders");
    stack.create_topic(&orders, 1).await;
    let mut vars = stack.vars(&orders, &unique("dlq"));
    // room for one order in librdkafka's queue, where it lingers (the longest linger there
    // is): every order after it finds the queue full until the run ends
    vars.extend(
        [
            ("ORDER_RATE", "0"),
            ("RDKAFKA_QUEUE_BUFFERING_MAX_MESSAGES", "1"),
            ("RDKAFKA_LINGER_MS", "900000"),
            ("RDKAFKA_MESSAGE_TIMEOUT_MS", "1000000"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut g = Service::start(BIN, &vars);
    g.wait_for("/readyz", Duration::from_secs(30)).await;
    let stats = eventually(
        "the first order handed over",
        Duration::from_secs(10),
        || async {
            let stats = g.get_json("/stats").await.ok()?;
            (stats["sent"] == 1).then_some(stats)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats_later = g.get_json("/stats").await.unwrap();
    assert_eq!(
        (
            &stats["sent"],
            &stats_later["sent"],
            &stats_later["produced"]
        ),
        (&1.into(), &1.into(), &0.into()),
        "one order queued and lingering, the next waiting for room: {stats} {stats_later}"
    );
    let (status, output) = g.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
    let summary = Service::summary(&output);
    assert_eq!(
        (&summary["sent"], &summary["produced"], &summary["failed"]),
        (&1.into(), &1.into(), &0.into()),
        "the order waiting for room was never handed over; the queued one was flushed: {output}"
    );
    assert_eq!(stack.read_all(&orders, 1, Duration::from_secs(20)).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_refuses_the_schema_stops_it_with_a_clear_error() {
    let stack = Stack::from_env();
    let orders = unique("orders");
    // someone registered an unrelated schema for the subject; BACKWARD refuses ours
    let other = r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#;
    let res = reqwest::Client::new()
        .post(format!(
            "{}/subjects/{orders}-value/versions",
            stack.registry
        ))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({ "schema": other }))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let g = Service::start(BIN, &stack.vars(&orders, &unique("dlq")));
    let (status, output) = g.wait(Duration::from_secs(30));
    assert!(!status.success(), "{output}");
    assert!(output.contains("refused the Order schema"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_exits_non_zero_and_names_the_variable() {
    for (var, value) in [
        ("ORDER_RATE", "fast"),
        ("INVALID_ORDER_RATIO", "1.5"),
        ("KAFKA_BOOTSTRAP_SERVERS", " "),
    ] {
        let g = Service::start(BIN, &[(var.to_owned(), value.to_owned())]);
        let (status, output) = g.wait(Duration::from_secs(10));
        assert!(!status.success(), "{var}={value} was accepted");
        assert!(output.contains(var), "{var}={value}: {output}");
    }
}
