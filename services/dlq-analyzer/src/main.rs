// jemalloc for every allocation in the process, librdkafka's included: its threads free what
// ours allocate (and the other way round), which glibc's per-thread arenas serialise on a lock
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use dlq_analyzer::{Application, Config, SERVICE_NAME, report::summary_text};
use order_runtime::{config::process_env, shutdown, telemetry};

fn main() -> anyhow::Result<std::process::ExitCode> {
    match std::env::args().nth(1).as_deref() {
        Some("healthcheck") => Ok(order_runtime::http::healthcheck_command(8103)),
        Some("trace") => trace(std::env::args().nth(2)),
        _ => run(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn trace(id: Option<String>) -> anyhow::Result<std::process::ExitCode> {
    Ok(dlq_analyzer::waterfall::command(id.as_deref()).await)
}

#[tokio::main]
async fn run() -> anyhow::Result<std::process::ExitCode> {
    let vars = process_env();
    let config = Config::from_vars(&vars)?;
    let _telemetry = telemetry::init(SERVICE_NAME, config.common.log_format, &vars)?;
    let app = Application::build(config, shutdown::on_signal()).await?;
    tracing::info!(port = app.port(), "HTTP listening");
    let report = app.run_until_stopped().await?;
    println!("{}", summary_text(&report));
    println!("SUMMARY {}", serde_json::to_string(&report)?);
    Ok(std::process::ExitCode::SUCCESS)
}
