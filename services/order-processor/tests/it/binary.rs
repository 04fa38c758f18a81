//! The order-processor binary as operators run it: health, SIGTERM, restarts, bad settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use order_schema::{Order, OrderCodec, PRODUCTS};
use order_testkit::{Service, Stack, eventually, unique};
use rand::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_order-processor");

#[tokio::test(flavor = "multi_thread")]
async fn starts_answers_healthz_and_exits_cleanly_on_sigterm() {
    let stack = Stack::from_env();
    let orders = unique("orders");
    stack.create_topic(&orders, 1).await;
    let mut vars = stack.vars(&orders, &unique("dlq"));
    vars.push(("CONSUMER_GROUP".into(), unique("g")));
    let mut p = Service::start(BIN, &vars);
    p.wait_for("/healthz", Duration::from_secs(20)).await;
    p.wait_for("/readyz", Duration::from_secs(30)).await;
    let metrics = p.get("/metrics").await.unwrap().1;
    assert!(metrics.contains("orders_dead_letters_total"), "{metrics}");
    // the container health check: the binary asks its own /readyz
    let probe = |port: u16| {
        std::process::Command::new(BIN)
            .arg("healthcheck")
            .env("HTTP_PORT", port.to_string())
            .output()
            .unwrap()
    };
    assert!(probe(p.port).status.success());
    let closed = probe(order_testkit::free_port());
    assert!(!closed.status.success());
    assert!(String::from_utf8_lossy(&closed.stderr).contains("no answer"));
    let (status, output) = p.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("order-processor summary"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_exits_non_zero_and_names_the_variable() {
    for (var, value) in [
        ("MAX_RETRIES", "three"),
        ("TRANSIENT_FAILURE_RATE", "2"),
        ("LOG_FORMAT", "xml"),
    ] {
        let p = Service::start(BIN, &[(var.to_owned(), value.to_owned())]);
        let (status, output) = p.wait(Duration::from_secs(10));
        assert!(!status.success(), "{var}={value} was accepted");
        assert!(output.contains(var), "{var}={value}: {output}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_stopped_with_sigterm_mid_stream_and_restarted_it_loses_nothing() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    stack.create_topic(&orders, 3).await;
    stack.create_topic(&dlq, 1).await;
    let mut vars = stack.vars(&orders, &dlq);
    vars.push(("CONSUMER_GROUP".into(), unique("g")));
    // some retries slow it down, so that SIGTERM lands mid-stream and sometimes mid-backoff
    vars.push(("TRANSIENT_FAILURE_RATE".into(), "0.05".into()));
    vars.push(("RETRY_INITIAL_BACKOFF_MS".into(), "20".into()));
    vars.push(("MAX_RETRIES".into(), "10".into()));
    vars.push(("PROCESSING_GUARANTEE".into(), "at_least_once".into()));

    const N: usize = 3000;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let mut rng = rand::rng();
    let mut payloads = Vec::with_capacity(N);
    let mut revenue_cents = 0i64;
    for _ in 0..N {
        let cents = rng.random_range(1_000..=100_000i64);
        revenue_cents += cents;
        #[allow(clippy::cast_precision_loss)]
        let o = Order {
            order_id: uuid::Uuid::new_v4().to_string(),
            product: PRODUCTS[rng.random_range(0..10)].into(),
            price: cents as f64 / 100.0,
        };
        payloads.push((o.order_id.clone(), codec.encode(&o).await.unwrap()));
    }
    // orders keep arriving while the processor is stopped and restarted
    let feeder = {
        let stack = stack.clone();
        let orders = orders.clone();
        tokio::spawn(async move {
            let producer = stack.producer();
            for (i, (key, bytes)) in payloads.iter().enumerate() {
                stack
                    .produce_raw(
                        &producer,
                        &orders,
                        None,
                        Some(key.as_bytes()),
                        Some(bytes),
                        &[],
                    )
                    .await;
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };

    let mut first = Service::start(BIN, &vars);
    first.wait_for("/healthz", Duration::from_secs(20)).await;
    eventually(
        "the first run to process some orders",
        Duration::from_secs(60),
        || async {
            let s = first.get_json("/stats").await.ok()?;
            (s["processed"].as_u64()? > 300).then_some(())
        },
    )
    .await;
    let (status, output) = first.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    let run1 = Service::summary(&output);
    let done1 = run1["processed"].as_u64().unwrap();
    assert!(
        done1 < N as u64,
        "the first run finished everything; nothing was mid-stream"
    );

    let mut second = Service::start(BIN, &vars);
    second.wait_for("/healthz", Duration::from_secs(20)).await;
    feeder.await.unwrap();
    eventually(
        "the second run to process the rest",
        Duration::from_secs(120),
        || async {
            let s = second.get_json("/stats").await.ok()?;
            (s["processed"].as_u64()? + done1 >= N as u64).then_some(())
        },
    )
    .await;
    // give a duplicate, if there were one, the chance to show up
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, output) = second.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    let run2 = Service::summary(&output);

    assert_eq!(
        done1 + run2["processed"].as_u64().unwrap(),
        N as u64,
        "every order counted exactly once across the restart"
    );
    let revenue = run1["revenue"].as_f64().unwrap() + run2["revenue"].as_f64().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let expected = revenue_cents as f64 / 100.0;
    assert!(
        (revenue - expected).abs() < 0.005,
        "revenue {revenue} != {expected}"
    );
    assert_eq!(
        run1["dead_lettered"].as_u64().unwrap() + run2["dead_lettered"].as_u64().unwrap(),
        0
    );
}

/// Pods are often started before the job that creates their topics has run. Each guarantee
/// waits, not ready and saying what for, then processes once the topic is there; the analyzer
/// is ready without its topic (a healthy system may never dead-letter anything) and reads it
/// once it appears.
#[tokio::test(flavor = "multi_thread")]
async fn started_before_their_topics_exist_they_wait_then_work() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    let mut processors = Vec::new();
    for guarantee in ["exactly_once", "at_least_once"] {
        let mut vars = stack.vars(&orders, &dlq);
        vars.push(("CONSUMER_GROUP".into(), unique(guarantee)));
        vars.push(("PROCESSING_GUARANTEE".into(), guarantee.into()));
        let mut p = Service::start(BIN, &vars);
        p.wait_for("/healthz", Duration::from_secs(20)).await;
        processors.push((guarantee, p));
    }
    let mut analyzer = Service::start(
        order_testkit::service_bin("dlq-analyzer").to_str().unwrap(),
        &stack.vars(&orders, &dlq),
    );
    analyzer.wait_for("/readyz", Duration::from_secs(30)).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    for (guarantee, p) in &processors {
        let (status, body) = p.get("/readyz").await.unwrap();
        assert_eq!(status, 503, "{guarantee}: {body}");
        assert!(body.contains("orders topic exists"), "{guarantee}: {body}");
        assert!(
            p.output().contains("waiting for the orders topic"),
            "{guarantee}"
        );
    }

    stack.create_topic(&orders, 2).await;
    stack.create_topic(&dlq, 1).await;
    let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
    let producer = stack.producer();
    let order = Order {
        order_id: "late-topic-1".into(),
        product: "laptop".into(),
        price: 12.5,
    };
    let good = codec.encode(&order).await.unwrap();
    for value in [&good[..], b"not an order"] {
        stack
            .produce_raw(&producer, &orders, None, Some(b"k"), Some(value), &[])
            .await;
    }
    for (guarantee, p) in &mut processors {
        p.wait_for("/readyz", Duration::from_secs(60)).await;
        eventually(
            &format!("{guarantee} to process what was sent"),
            Duration::from_secs(60),
            || async {
                let s = p.get_json("/stats").await.ok()?;
                (s["processed"] == 1 && s["dead_lettered"] == 1).then_some(())
            },
        )
        .await;
    }
    eventually(
        "the analyzer to read both replicas' dead letters",
        Duration::from_secs(60),
        || async {
            let r = analyzer.get_json("/report").await.ok()?;
            (r["total"] == 2).then_some(())
        },
    )
    .await;
    for (_, p) in processors {
        let (status, output) = p.terminate(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{output}");
    }
    analyzer.terminate(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_command_lines_are_refused_before_anything_starts_naming_the_flag() {
    let stack = Stack::from_env();
    let (orders, dlq) = (unique("orders"), unique("dlq"));
    let vars = stack.vars(&orders, &dlq);
    let table: [(&[&str], &str); 12] = [
        (&["reset"], "--to"),
        (&["reset", "--to", "yesterday"], "RFC 3339"),
        (&["reset", "--to", "-5"], "negative"),
        (&["reset", "--to", "earliest", "--force"], "--force"),
        (
            &["create-topics", "--orders-partitions", "0"],
            "--orders-partitions",
        ),
        (
            &["create-topics", "--orders-partitions", "-3"],
            "--orders-partitions",
        ),
        (
            &["create-topics", "--dlq-partitions", "many"],
            "--dlq-partitions",
        ),
        (
            &["create-topics", "--replication-factor", "0"],
            "-1 for the broker's default",
        ),
        (
            &["create-topics", "--orders-config", "retention.ms"],
            "KEY=VALUE",
        ),
        (&["create-topics", "--wait-s", "0"], "--wait-s"),
        (&["create-topics", "--partitions", "3"], "--partitions"),
        (&["explode"], "explode"),
    ];
    for (args, says) in table {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    }
    // nothing was created by the refused commands
    let c: rdkafka::consumer::BaseConsumer = stack.client().create().unwrap();
    let md =
        rdkafka::consumer::Consumer::fetch_metadata(&c, None, Duration::from_secs(10)).unwrap();
    assert!(
        md.topics()
            .iter()
            .all(|t| t.name() != orders && t.name() != dlq)
    );
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for sub in ["healthcheck", "create-topics", "reset"] {
        assert!(help.contains(sub), "--help lists {sub}: {help}");
    }
}
