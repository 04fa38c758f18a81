//! `main` of every service, written once: the `healthcheck` subcommand, then configuration,
//! telemetry, build, run until SIGTERM or Ctrl-C, and the summary printed at exit (a human one,
//! then `SUMMARY <json>` for scripts).

use std::future::Future;
use std::process::ExitCode;

use crate::config::{ConfigError, LogFormat, process_env};

/// What [`main`] needs from a service crate.
pub trait Service: Sized + Send {
    type Config: Send;
    type Report: serde::Serialize + Send;
    /// The service's name in logs and traces.
    const NAME: &'static str;
    /// `HTTP_PORT`'s default, for `healthcheck`.
    const DEFAULT_PORT: u16;

    fn config(vars: &[(String, String)]) -> Result<Self::Config, ConfigError>;
    fn log_format(config: &Self::Config) -> LogFormat;
    fn build(
        config: Self::Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = anyhow::Result<Self>>;
    /// The HTTP port actually bound.
    fn port(&self) -> u16;
    fn run_until_stopped(self) -> impl Future<Output = anyhow::Result<Self::Report>>;
    fn summary_text(report: &Self::Report) -> String;
}

/// Runs `S` as the process: `<binary> healthcheck` asks the running service's `/readyz`,
/// anything else runs the service.
pub fn main<S: Service>() -> anyhow::Result<ExitCode> {
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return Ok(crate::http::healthcheck_command(S::DEFAULT_PORT));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run::<S>())
}

async fn run<S: Service>() -> anyhow::Result<ExitCode> {
    let vars = process_env();
    let config = S::config(&vars)?;
    let _telemetry = crate::telemetry::init(S::NAME, S::log_format(&config), &vars)?;
    let app = S::build(config, crate::shutdown::on_signal()).await?;
    tracing::info!(port = app.port(), "HTTP listening");
    let report = app.run_until_stopped().await?;
    println!("{}", S::summary_text(&report));
    println!("SUMMARY {}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Implements [`Service`] for a service crate's `Application`, whose inherent `build`, `port`
/// and `run_until_stopped` have the shapes every service gives them:
/// `impl_service!(Application, Config, Report, summary_text, NAME, 8103)`.
#[macro_export]
macro_rules! impl_service {
    ($app:ty, $config:ty, $report:ty, $summary:path, $name:expr, $port:expr) => {
        impl $crate::service::Service for $app {
            type Config = $config;
            type Report = $report;
            const NAME: &'static str = $name;
            const DEFAULT_PORT: u16 = $port;

            fn config(vars: &[(String, String)]) -> Result<$config, $crate::ConfigError> {
                <$config>::from_vars(vars)
            }
            fn log_format(config: &$config) -> $crate::LogFormat {
                config.common.log_format
            }
            async fn build(
                config: $config,
                shutdown: ::tokio_util::sync::CancellationToken,
            ) -> ::anyhow::Result<Self> {
                Ok(<$app>::build(config, shutdown).await?)
            }
            fn port(&self) -> u16 {
                <$app>::port(self)
            }
            async fn run_until_stopped(self) -> ::anyhow::Result<$report> {
                <$app>::run_until_stopped(self).await
            }
            fn summary_text(report: &$report) -> String {
                $summary(report)
            }
        }
    };
}
