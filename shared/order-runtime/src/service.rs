//! What every service's start and command line share, written once: the [`Service`] a crate
//! gives, the first steps of its start ([`open`]: access checked, HTTP port bound) and their
//! [`StartError`], running it as the process ([`run`]: configuration, telemetry, build, run
//! until SIGTERM or Ctrl-C, the summary printed at exit), the subcommands all three have
//! ([`Common`]) and the frame of a one-off subcommand ([`command`]).

use std::future::Future;
use std::process::ExitCode;

use order_schema::CodecError;
use rdkafka::error::KafkaError;
use tokio::net::TcpListener;

use crate::access::{AccessRefused, check_access};
use crate::config::{CommonConfig, ConfigError, LogFormat, process_env};

/// What [`run`] needs from a service crate.
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

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not bind HTTP port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not set up the Kafka {what}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the schema registry refused the Order schema for subject {subject}")]
    SchemaRejected {
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error("the schema registry stayed unreachable for {waited_ms} ms")]
    RegistryUnreachable {
        waited_ms: u64,
        #[source]
        source: CodecError,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Access(#[from] AccessRefused),
}

/// Names the Kafka client that could not be made: `.map_err(kafka_error("consumer"))`.
pub fn kafka_error(what: &'static str) -> impl FnOnce(KafkaError) -> StartError {
    move |source| StartError::Kafka { what, source }
}

/// The first steps of every service's start: the registry's and the cluster's refusal of its
/// settings stop it ([`check_access`], `topic` being the one it uses first),
/// then its HTTP port is bound (port 0 in tests picks a free one). Answers the listener and
/// the port actually bound.
pub async fn open(
    common: &CommonConfig,
    topic: &str,
    port: u16,
) -> Result<(TcpListener, u16), StartError> {
    check_access(common, topic).await?;
    let listener = crate::http::bind(port, common.http_port_file.as_deref())
        .await
        .map_err(|source| StartError::Bind { port, source })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    Ok((listener, port))
}

/// Runs `S` as the process until SIGTERM or Ctrl-C, then prints its summary (a human one,
/// then `SUMMARY <json>` for scripts).
pub fn run<S: Service>() -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_until_signal::<S>())
}

async fn run_until_signal<S: Service>() -> anyhow::Result<ExitCode> {
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

/// The subcommands every service has.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Common {
    /// Ask the service running on this host for /readyz and exit 0 when it is ready (the
    /// container's health check: the images carry no curl). The port is HTTP_PORT_FILE's, else
    /// HTTP_PORT's, else the default.
    Healthcheck,
}

impl Common {
    pub fn run<S: Service>(self) -> ExitCode {
        match self {
            Common::Healthcheck => crate::http::healthcheck_command(S::DEFAULT_PORT),
        }
    }
}

/// Why a one-off subcommand failed: `Usage` (exit 2, like a bad flag) or `Failed` (exit 1).
#[derive(Debug)]
pub enum CommandError {
    Usage(String),
    Failed(String),
}

impl From<ConfigError> for CommandError {
    fn from(e: ConfigError) -> Self {
        CommandError::Usage(e.to_string())
    }
}

/// Runs a one-off subcommand (`create-topics`, `reset`, `redrive`, `trace`) on a small runtime
/// with the process environment: its lines go to stdout, an error to stderr with `name`, and
/// the exit code says which.
pub fn command<F, Fut>(name: &str, work: F) -> ExitCode
where
    F: FnOnce(Vec<(String, String)>) -> Fut,
    Fut: Future<Output = Result<Vec<String>, CommandError>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work(process_env())) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(CommandError::Usage(e)) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
        Err(CommandError::Failed(e)) => {
            eprintln!("{name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Implements [`Service`] for a service crate's `Application`, whose inherent `build`, `port`
/// and `run_until_stopped` have the shapes every service gives them:
/// `impl_service!(Application, Config, Report, summary_text, NAME, DEFAULT_HTTP_PORT)`.
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
