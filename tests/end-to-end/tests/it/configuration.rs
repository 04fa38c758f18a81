//! docs/configuration.md against the code: every setting's name and default, per service.
#![allow(clippy::unwrap_used)]

use order_testkit::configuration_documented;

fn defaults(block: impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(block).unwrap()
}

#[test]
fn the_shared_settings_are_documented_with_their_defaults() {
    let read_elsewhere = [
        // secrets: read like the others, never serialized
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
        "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN",
        "OPERATIONS_TOKEN",
        // read by the logging and tracing set-up and by the librdkafka pass-through
        "RUST_LOG",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "RDKAFKA_<PROPERTY>",
    ];
    configuration_documented(
        "All services",
        &defaults(order_runtime::CommonConfig::default()),
        &read_elsewhere,
    )
    .unwrap();
}

#[test]
fn each_services_settings_are_documented_with_their_defaults() {
    for (section, block) in [
        (
            "order-generator",
            defaults(order_generator::config::GeneratorSettings::default()),
        ),
        (
            "order-processor",
            defaults(order_processor::config::ProcessorSettings::default()),
        ),
        (
            "dlq-analyzer",
            defaults(dlq_analyzer::config::AnalyzerSettings::default()),
        ),
    ] {
        if let Err(e) = configuration_documented(section, &block, &[]) {
            panic!("docs/configuration.md, {section}:\n{e}");
        }
    }
}
