// jemalloc for every allocation in the process, librdkafka's included: its threads free what
// ours allocate (and the other way round), which glibc's per-thread arenas serialise on a lock
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("reset") {
        // safe replay in exactly-once mode (see exactly_once::reset)
        return Ok(order_processor::exactly_once::reset::command(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("create-topics") {
        // the topics Job of the Helm chart
        return Ok(order_processor::topics::command(&args[1..]));
    }
    order_runtime::service::main::<order_processor::Application>()
}
