//! The command line, parsed in one place: with no subcommand the binary is the service; the
//! subcommands are what operators run beside it.

use std::process::ExitCode;

use order_runtime::service::{self, CommandError, Common};
use order_schema::OrderCodec;

use crate::app::Application;
use crate::config::Config;
use crate::redrive;
use crate::waterfall::TraceError;

/// Reads the dead-letter topic and reports what failed, why, and what it was worth; redrives
/// dead letters once their cause is fixed. Configured by environment variables
/// (docs/configuration.md); with no subcommand, runs the service.
#[derive(Debug, clap::Parser)]
#[command(name = "dlq-analyzer", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[command(flatten)]
    Common(Common),
    /// Send dead letters back to the orders topic (or park them), filtered, rate-limited, at
    /// most once per request even across crashes; prints what it did, then `REDRIVE <json>`
    Redrive(redrive::Options),
    /// Draw one trace from Jaeger's query API (JAEGER_QUERY_URL) in the terminal: an order's
    /// journey across the three services
    Trace {
        /// The trace id (32 hex digits)
        id: String,
    },
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        Ok(match self.command {
            None => return service::run::<Application>(),
            Some(Command::Common(c)) => c.run::<Application>(),
            Some(Command::Redrive(options)) => redrive_command(options)?,
            Some(Command::Trace { id }) => {
                service::command("dlq-analyzer trace", |vars| async move {
                    let config = Config::from_vars(&vars)?;
                    crate::waterfall::command(&config.analyzer.jaeger_query_url, &id)
                        .await
                        .map_err(|e| match e {
                            TraceError::BadId(_) => CommandError::Usage(e.to_string()),
                            other => CommandError::Failed(other.to_string()),
                        })
                })
            }
        })
    }
}

/// `dlq-analyzer redrive ...`: one request with the analyzer's environment and telemetry (its
/// sends are spans); prints what it did, exits 0 when it ran to the end.
fn redrive_command(options: redrive::Options) -> anyhow::Result<ExitCode> {
    if let Err(e) = redrive::check(&options) {
        eprintln!("dlq-analyzer redrive: {e}");
        return Ok(ExitCode::from(2));
    }
    let vars = order_runtime::config::process_env();
    let config = Config::from_vars(&vars)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let _telemetry = order_runtime::telemetry::init(
            crate::config::SERVICE_NAME,
            config.common.log_format,
            &vars,
        )?;
        let codec = OrderCodec::with_access(&config.common.registry, &config.common.orders_topic)?;
        let record = std::sync::Mutex::new(redrive::new_run(&options));
        let cancel = order_runtime::shutdown::on_signal();
        let result = redrive::run(
            &config.common,
            &config.redrive(),
            &codec,
            &options,
            &record,
            &cancel,
        )
        .await;
        let done = record
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        println!("{}", redrive::summary_text(&done));
        println!("REDRIVE {}", serde_json::to_string(&done)?);
        Ok(match result {
            Ok(()) if done.status == "done" => ExitCode::SUCCESS,
            Ok(()) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("redrive failed: {e}");
                ExitCode::FAILURE
            }
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;
    use crate::redrive::request_id;

    fn parse(flags: &[&str]) -> Result<redrive::Options, String> {
        let args = ["dlq-analyzer", "redrive"]
            .into_iter()
            .chain(flags.iter().copied());
        match Cli::try_parse_from(args)
            .map_err(|e| e.to_string())?
            .command
        {
            Some(Command::Redrive(o)) => Ok(o),
            other => Err(format!("not a redrive: {other:?}")),
        }
    }

    #[test]
    fn flags_become_a_request_and_its_id_follows_the_filter() {
        let o = parse(&["--kind", "unknown_product", "--limit", "10", "--dry-run"]).unwrap();
        assert_eq!(o.filter.kind.as_deref(), Some("unknown_product"));
        assert_eq!(o.limit, Some(10));
        assert!(o.dry_run);
        let same = parse(&["--kind", "unknown_product"]).unwrap();
        assert_eq!(
            request_id(&o),
            request_id(&same),
            "limit and dry run do not change the request"
        );
        let other = parse(&["--kind", "too_short"]).unwrap();
        assert_ne!(request_id(&o), request_id(&other));
        assert!(parse(&["--limit"]).unwrap_err().contains("--limit"));
        assert!(
            parse(&["--colour", "red"])
                .unwrap_err()
                .contains("--colour")
        );
    }

    #[test]
    fn help_lists_the_subcommands() {
        let help = Cli::try_parse_from(["dlq-analyzer", "--help"])
            .unwrap_err()
            .to_string();
        for sub in ["healthcheck", "redrive", "trace"] {
            assert!(help.contains(sub), "{sub} missing from:\n{help}");
        }
    }
}
