//! The dlq-analyzer binary against the native stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use order_testkit::{Service, Stack, eventually, unique};

const BIN: &str = env!("CARGO_BIN_EXE_dlq-analyzer");

#[tokio::test(flavor = "multi_thread")]
async fn reports_foreign_records_as_unknown_and_exits_cleanly_on_sigterm() {
    let stack = Stack::from_env();
    let dlq = unique("dlq");
    stack.create_topic(&dlq, 2).await;
    let producer = stack.producer();
    // records someone else wrote: no headers of ours, one without even a value
    stack
        .produce_raw(
            &producer,
            &dlq,
            Some(0),
            Some(b"k1"),
            Some(b"not an order"),
            &[],
        )
        .await;
    stack
        .produce_raw(&producer, &dlq, Some(1), None, None, &[("x", "y")])
        .await;
    let ours = [
        ("dlq.error.category", "validation"),
        ("dlq.error.kind", "unknown_product"),
    ];
    stack
        .produce_raw(
            &producer,
            &dlq,
            Some(1),
            Some(b"k3"),
            Some(&[0, 0, 0, 0, 1]),
            &ours,
        )
        .await;

    let mut vars = stack.vars(&unique("orders"), &dlq);
    vars.push(("CONSUMER_GROUP".into(), unique("a")));
    let mut a = Service::start(BIN, &vars);
    a.wait_for("/healthz", Duration::from_secs(20)).await;
    a.wait_for("/readyz", Duration::from_secs(30)).await;
    let report = eventually(
        "three dead letters in the report",
        Duration::from_secs(30),
        || async {
            let r = a.get_json("/report").await.ok()?;
            (r["total"] == 3).then_some(r)
        },
    )
    .await;
    assert_eq!(report["by_category"]["unknown"], 2, "{report}");
    assert_eq!(report["by_category"]["validation"], 1, "{report}");
    assert_eq!(
        report["by_kind"]["validation/unknown_product"], 1,
        "{report}"
    );
    assert_eq!(report["failed_value"], 0.0);
    assert_eq!(report["recent"].as_array().unwrap().len(), 3);
    let (status, output) = a.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("dlq-analyzer summary"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_exits_non_zero_and_names_the_variable() {
    let a = Service::start(
        BIN,
        &[("SCHEMA_REGISTRY_URL".to_owned(), "registry:8081".to_owned())],
    );
    let (status, output) = a.wait(Duration::from_secs(10));
    assert!(!status.success());
    assert!(output.contains("SCHEMA_REGISTRY_URL"), "{output}");
}
