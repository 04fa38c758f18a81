//! Exactly-once under crashes and scaling: 20,000 records on 6 partitions (valid, invalid,
//! garbage, and 10 % of attempts failing temporarily, by a seed, with a long first backoff, so
//! that at any moment records wait for retries while many above them are final), replicas
//! killed with SIGKILL or scaled mid-stream; the group's committed totals equal the ground
//! truth computed from the seed, to the cent, and every dead letter is there once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::workload::{Seeded, Workload, committed};
use order_testkit::{Service, Stack, eventually, init_test_logging, unique};

const N: usize = 20_000;

/// 10 % of attempts fail; retries after 0.8, 1.6 and 3.2 s, then a dead letter.
pub fn failures() -> Seeded {
    Seeded {
        seed: unique("seed"),
        rate: 0.1,
        max_retries: 3,
        initial_backoff_ms: 800,
    }
}

/// Records waiting for a retry, or behind one, at the last commit, over the partitions
/// (`/status.json`): they are the records above the committed offsets that are not final.
pub async fn not_final_at_last_commit(s: &Service) -> Option<u64> {
    let status = s.get_json("/status.json").await.ok()?;
    status["partitions"]
        .as_array()?
        .iter()
        .map(|r| r["in_flight"].as_u64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_killed_with_sigkill_and_replaced_lose_and_double_nothing() {
    init_test_logging();
    let stack = Stack::from_env();
    let w = Workload::with_failures(&stack, N, failures()).await;
    assert!(w.exhausted > 0, "some orders outlive their retries");
    let a = w.replica(&stack).await;
    let b = w.replica(&stack).await;
    let feeder = {
        let (stack, w) = (stack.clone(), std::sync::Arc::new(w));
        let w2 = w.clone();
        (tokio::spawn(async move { w2.feed(&stack, 2_000).await }), w)
    };
    let (feeder, w) = feeder;

    eventually(
        "some progress before the first kill, with records not final above a committed offset",
        Duration::from_secs(120),
        || async {
            (committed(&b).await > 3_000 && not_final_at_last_commit(&b).await? > 0).then_some(())
        },
    )
    .await;
    a.kill();
    let a2 = w.replica(&stack).await;

    eventually(
        "more progress before the second kill",
        Duration::from_secs(120),
        || async { (committed(&a2).await > 9_000).then_some(()) },
    )
    .await;
    b.kill();
    let b2 = w.replica(&stack).await;

    let failing = feeder.await.unwrap();
    w.assert_exact(&stack, &a2, &failing, Duration::from_secs(240))
        .await;
    for r in [a2, b2] {
        let (status, out) = r.terminate(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_from_one_to_three_to_one_replica_keeps_totals_exact() {
    init_test_logging();
    let stack = Stack::from_env();
    let w = std::sync::Arc::new(Workload::with_failures(&stack, N, failures()).await);
    let first = w.replica(&stack).await;
    let feeder = {
        let (stack, w) = (stack.clone(), w.clone());
        tokio::spawn(async move { w.feed(&stack, 2_000).await })
    };
    eventually(
        "progress with one replica",
        Duration::from_secs(120),
        || async { (committed(&first).await > 3_000).then_some(()) },
    )
    .await;
    let second = w.replica(&stack).await;
    let third = w.replica(&stack).await;
    eventually(
        "progress with three replicas",
        Duration::from_secs(120),
        || async { (committed(&first).await > 10_000).then_some(()) },
    )
    .await;
    // every replica held some partitions meanwhile
    for r in [&second, &third] {
        let s = crate::workload::stats(r).await.unwrap();
        assert!(!s["partitions"].as_array().unwrap().is_empty(), "{s}");
    }
    // and reports the lag of those partitions only: the first replica's revoked partitions
    // leave its /metrics (a stale series would count twice in a sum over the replicas)
    for r in [&first, &second, &third] {
        eventually(
            "each replica's lag series to be its own partitions'",
            Duration::from_secs(30),
            || async {
                let owned = crate::workload::owned_partitions(r).await?;
                let lagged = crate::workload::lag_series(r).await?;
                (!owned.is_empty() && lagged == owned).then_some(())
            },
        )
        .await;
    }
    for r in [second, third] {
        let (status, out) = r.terminate(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{out}");
    }
    let failing = feeder.await.unwrap();
    w.assert_exact(&stack, &first, &failing, Duration::from_secs(240))
        .await;
    let s = crate::workload::stats(&first).await.unwrap();
    assert_eq!(
        s["partitions"].as_array().unwrap().len(),
        6,
        "the last replica holds every partition: {s}"
    );
    let (status, out) = first.terminate(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{out}");
}
