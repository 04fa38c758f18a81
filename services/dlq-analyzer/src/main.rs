// jemalloc for every allocation in the process, librdkafka's included: its threads free what
// ours allocate (and the other way round), which glibc's per-thread arenas serialise on a lock
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("trace") => return trace(args.get(1).cloned()),
        Some("redrive") => return redrive(&args[1..]),
        _ => {}
    }
    order_runtime::service::main::<dlq_analyzer::Application>()
}

/// `dlq-analyzer trace <id>`: one order's journey as a waterfall, from Jaeger's query API.
#[tokio::main(flavor = "current_thread")]
async fn trace(id: Option<String>) -> anyhow::Result<std::process::ExitCode> {
    Ok(dlq_analyzer::waterfall::command(id.as_deref()).await)
}

/// `dlq-analyzer redrive ...`: dead letters back to the orders topic (see `redrive`).
#[tokio::main]
async fn redrive(args: &[String]) -> anyhow::Result<std::process::ExitCode> {
    let vars = order_runtime::config::process_env();
    let config = dlq_analyzer::Config::from_vars(&vars)?;
    let _telemetry = order_runtime::telemetry::init(
        dlq_analyzer::SERVICE_NAME,
        config.common.log_format,
        &vars,
    )?;
    Ok(dlq_analyzer::redrive::command(args).await)
}
