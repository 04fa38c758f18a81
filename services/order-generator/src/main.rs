// jemalloc for every allocation in the process, librdkafka's included: its threads free what
// ours allocate (and the other way round), which glibc's per-thread arenas serialise on a lock
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    <order_generator::Cli as clap::Parser>::parse().run()
}
