//! Exactly-once across a broker restart, with seeded temporary failures (records waiting for
//! retries while the broker goes). Ignored in a plain `cargo test`: it stops the broker every
//! other test of the binary uses, so `make test-rust` runs it on its own afterwards
//! (`cargo test -p order-processor --test it -- --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::exactly_once::failures;
use crate::workload::{Workload, committed};
use order_testkit::{Stack, eventually, init_test_logging};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "stops the shared broker: run alone, with --ignored (make test-rust does)"]
async fn the_broker_stopped_and_restarted_mid_stream_changes_no_total() {
    init_test_logging();
    let stack = Stack::from_env();
    let w = std::sync::Arc::new(Workload::with_failures(&stack, 20_000, failures()).await);
    let a = w.replica(&stack).await;
    let b = w.replica(&stack).await;
    let feeder = {
        let (stack, w) = (stack.clone(), w.clone());
        tokio::spawn(async move { w.feed(&stack, 2_000).await })
    };
    eventually(
        "progress before the broker goes down",
        Duration::from_secs(120),
        || async { (committed(&a).await > 5_000).then_some(()) },
    )
    .await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../stack/stack.sh");
    let restart = Command::new("bash")
        .args([script, "restart-kafka"])
        .status()
        .unwrap();
    assert!(restart.success(), "the broker did not come back");

    let failing = feeder.await.unwrap();
    w.assert_exact(&stack, &a, &failing, Duration::from_secs(150))
        .await;

    // no replica is left stuck: both are ready and between them hold every partition
    let mut held = BTreeSet::new();
    for r in [&a, &b] {
        assert_eq!(r.get("/readyz").await.map(|x| x.0), Some(200));
        let s = crate::workload::stats(r).await.unwrap();
        for p in s["partitions"].as_array().unwrap() {
            held.insert(p.as_i64().unwrap());
        }
    }
    assert_eq!(
        held,
        (0..6).collect(),
        "every partition is held by a live replica"
    );
    for r in [a, b] {
        let (status, out) = r.terminate(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{out}");
    }
}
