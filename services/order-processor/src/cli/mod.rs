//! The command line, parsed in one place: with no subcommand the binary is the service; the
//! subcommands are what operators and the chart's Jobs run beside it.

pub mod create_topics;
pub mod reset;

use std::process::ExitCode;

use order_runtime::service::{self, Common};

use crate::app::Application;

/// Consumes orders, keeps exact running aggregates, retries temporary failures and
/// dead-letters what cannot be processed. Configured by environment variables
/// (docs/configuration.md); with no subcommand, runs the service.
#[derive(Debug, clap::Parser)]
#[command(name = "order-processor", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[command(flatten)]
    Common(Common),
    /// Create the orders and dead-letter topics when missing (the Helm chart's topics Job)
    CreateTopics(create_topics::Args),
    /// Move the consumer group and its changelog to a target, for a replay (exactly-once;
    /// refused while the group has live members)
    Reset(reset::Args),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        Ok(match self.command {
            None => return service::run::<Application>(),
            Some(Command::Common(c)) => c.run::<Application>(),
            Some(Command::CreateTopics(args)) => create_topics::run(&args),
            Some(Command::Reset(args)) => reset::run(&args),
        })
    }
}
