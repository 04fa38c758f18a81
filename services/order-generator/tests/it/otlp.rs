//! Trace export the way collectors are deployed: OTLP over gRPC (4317) as well as HTTP (4318),
//! against the native stack's Jaeger; and a misconfigured endpoint reported once, with its
//! likely cause, instead of one line per failed batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use order_testkit::{Service, Stack, eventually, unique};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_order-generator");
const JAEGER: &str = "http://127.0.0.1:16686";

async fn traces_of(service: &str, at_least: usize) -> usize {
    eventually(
        &format!("{at_least} traces of {service} in Jaeger"),
        Duration::from_secs(30),
        || async {
            let body: Value =
                reqwest::get(format!("{JAEGER}/api/traces?service={service}&limit=1000"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
            let n = body["data"].as_array()?.len();
            (n >= at_least).then_some(n)
        },
    )
    .await
}

async fn generator(count: &str, otel: &[(&str, &str)]) -> Vec<(String, String)> {
    let stack = Stack::from_env();
    let orders = unique("orders");
    stack.create_topic(&orders, 1).await;
    let mut vars = stack.vars(&orders, &unique("dlq"));
    vars.extend([
        ("ORDER_COUNT".to_owned(), count.to_owned()),
        ("ORDER_RATE".to_owned(), "0".to_owned()),
    ]);
    vars.extend(otel.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    vars
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_over_grpc_when_the_protocol_says_so() {
    let name = unique("gen-grpc");
    let vars = generator(
        "25",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", &name),
        ],
    )
    .await;
    let (status, output) = Service::start(BIN, &vars).wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("trace export failed"), "{output}");
    // one trace per order, each the generator's send span; all flushed before the exit
    assert_eq!(traces_of(&name, 25).await, 25);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_signal_specific_protocol_wins_over_the_general_one() {
    let name = unique("gen-http");
    let vars = generator(
        "5",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", &name),
        ],
    )
    .await;
    let (status, output) = Service::start(BIN, &vars).wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{output}");
    assert_eq!(traces_of(&name, 5).await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_of_the_other_protocol_is_named_at_start_and_failures_are_reported_once() {
    // OTLP/HTTP sent to the gRPC port: every batch fails
    let mut vars = generator(
        "0",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SERVICE_NAME", &unique("gen-wrong-port")),
            // a batch every 200 ms: dozens of failed exports in the run below
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    vars.retain(|(k, _)| k != "ORDER_RATE");
    vars.push(("ORDER_RATE".to_owned(), "200".to_owned()));
    let mut g = Service::start(BIN, &vars);
    g.wait_for("/readyz", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, output) = g.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{output}");
    let start = output
        .lines()
        .filter(|l| l.contains("trace export will likely fail"))
        .collect::<Vec<_>>();
    assert_eq!(start.len(), 1, "{output}");
    assert!(
        start[0].contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        "{}",
        start[0]
    );
    let failures = output
        .lines()
        .filter(|l| l.contains("trace export failed"))
        .collect::<Vec<_>>();
    assert_eq!(
        failures.len(),
        1,
        "one line for the first minute of failures:\n{output}"
    );
    assert!(
        failures[0].contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        "{}",
        failures[0]
    );
    assert!(
        !output.contains("BatchSpanProcessor.ExportError"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_protocol_stops_the_service_naming_the_variable() {
    let vars = generator("1", &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).await;
    let (status, output) = Service::start(BIN, &vars).wait(Duration::from_secs(30));
    assert_ne!(status.code(), Some(0), "{output}");
    assert!(
        output.contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/json is not supported"),
        "{output}"
    );
}
