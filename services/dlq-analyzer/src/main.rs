// jemalloc for every allocation in the process, librdkafka's included: its threads free what
// ours allocate (and the other way round), which glibc's per-thread arenas serialise on a lock
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    if std::env::args().nth(1).as_deref() == Some("trace") {
        return trace(std::env::args().nth(2));
    }
    order_runtime::service::main::<dlq_analyzer::Application>()
}

/// `dlq-analyzer trace <id>`: one order's journey as a waterfall, from Jaeger's query API.
#[tokio::main(flavor = "current_thread")]
async fn trace(id: Option<String>) -> anyhow::Result<std::process::ExitCode> {
    Ok(dlq_analyzer::waterfall::command(id.as_deref()).await)
}
