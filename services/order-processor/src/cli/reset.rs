//! `order-processor reset --to earliest|<RFC 3339 time>|<offset>`: moves the consumer group
//! and its changelog to a target for a replay (exactly-once; see
//! [`crate::durability::exactly_once::reset`]), and says what moved.

use std::process::ExitCode;

use order_runtime::service::{self, CommandError};

use crate::config::Config;
use crate::durability::exactly_once::reset::{Target, reset};

/// The flags of `order-processor reset`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where the group goes: `earliest`, an RFC 3339 time (the first record at or after it) or
    /// an offset (in every partition)
    #[arg(long, value_name = "TARGET", value_parser = Target::parse, allow_hyphen_values = true)]
    pub to: Target,
}

/// Runs the reset with the processor's environment; prints what moved, or why not.
pub fn run(args: &Args) -> ExitCode {
    service::command("reset", |vars| async move {
        let config = Config::from_vars(&vars)?;
        let (c, target) = (config.clone(), args.to.clone());
        let moves = tokio::task::spawn_blocking(move || reset(&c, &target))
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        let mut lines = vec![format!(
            "reset consumer group {} on {} and its changelog {} to {:?}:",
            config.processor.consumer_group,
            config.common.orders_topic,
            config.state_topic(),
            args.to
        )];
        for m in moves {
            let from = m.from.map_or_else(|| "none".to_owned(), |o| o.to_string());
            lines.push(format!(
                "  partition {}: offset {from} -> {} (totals from zero)",
                m.partition, m.to
            ));
        }
        lines.push("start the processors: they restore this state and process from there".into());
        Ok(lines)
    })
}
