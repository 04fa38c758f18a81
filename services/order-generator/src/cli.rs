//! The command line, parsed in one place: with no subcommand the binary is the service.

use std::process::ExitCode;

use order_runtime::service::{self, Common};

use crate::app::Application;

/// Publishes random orders (Avro, Confluent wire format) at a chosen rate, some invalid on
/// purpose. Configured by environment variables (docs/configuration.md); with no subcommand,
/// runs the service.
#[derive(Debug, clap::Parser)]
#[command(name = "order-generator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Common>,
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            None => service::run::<Application>(),
            Some(c) => Ok(c.run::<Application>()),
        }
    }
}
