//! `order-processor create-topics`: creates the orders and dead-letter topics (`ORDERS_TOPIC`,
//! `DLQ_TOPIC`) with the partitions, replication factor and configs given as flags, through the
//! same Kafka settings as the service (`KAFKA_BOOTSTRAP_SERVERS`, `RDKAFKA_*`), so it works
//! against any cluster the processor can reach, secured ones included. The Helm chart's topics
//! Job runs it. A topic that exists is left as it is, and said so.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use order_runtime::CommonConfig;
use order_runtime::kafka::{self, TopicState};
use order_runtime::service::{self, CommandError};

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: usize,
    pub configs: Vec<(String, String)>,
}

/// The flags of `order-processor create-topics`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Args {
    /// Partitions of the orders topic
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true)]
    pub orders_partitions: u32,
    /// Partitions of the dead-letter topic
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true)]
    pub dlq_partitions: u32,
    /// Replicas of each partition; -1: the broker's default.replication.factor
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = replication)]
    pub replication_factor: i32,
    /// A setting of the orders topic, KEY=VALUE (repeatable), e.g. retention.ms=604800000
    #[arg(long = "orders-config", value_name = "KEY=VALUE", value_parser = key_value)]
    pub orders_configs: Vec<(String, String)>,
    /// A setting of the dead-letter topic, KEY=VALUE (repeatable)
    #[arg(long = "dlq-config", value_name = "KEY=VALUE", value_parser = key_value)]
    pub dlq_configs: Vec<(String, String)>,
    /// Seconds to wait for the cluster to answer
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    pub wait_s: u64,
}

fn replication(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(n) if n == -1 || n > 0 => Ok(n),
        _ => Err("above 0, or -1 for the broker's default".to_owned()),
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("KEY=VALUE, e.g. retention.ms=604800000".to_owned()),
    }
}

impl Args {
    /// The two topics, named by `common`.
    pub fn topics(&self, common: &CommonConfig) -> [TopicSpec; 2] {
        [
            TopicSpec {
                name: common.orders_topic.clone(),
                partitions: self.orders_partitions as usize,
                configs: self.orders_configs.clone(),
            },
            TopicSpec {
                name: common.dlq_topic.clone(),
                partitions: self.dlq_partitions as usize,
                configs: self.dlq_configs.clone(),
            },
        ]
    }

    fn wait(&self) -> Duration {
        Duration::from_secs(self.wait_s)
    }
}

/// Waits (at most `--wait-s`) for the cluster, then creates what is missing. One line per topic.
pub async fn create(common: &CommonConfig, o: &Args) -> Result<Vec<String>, String> {
    let admin = kafka::admin_client(common, "order-processor-create-topics")
        .map_err(|e| format!("could not create a Kafka admin client: {e}"))?;
    let started = Instant::now();
    // a refusal (credentials, TLS, ACLs) is final; a cluster still starting is waited for
    let first = o.topics(common)[0].name.clone();
    let (c, w) = (common.clone(), o.wait().min(Duration::from_secs(10)));
    tokio::task::spawn_blocking(move || kafka::check_cluster_access(&c, &first, w))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    loop {
        let (client, bootstrap) = (admin.inner(), &common.kafka_bootstrap_servers);
        match tokio::task::block_in_place(|| client.fetch_metadata(None, Duration::from_secs(5))) {
            Ok(md) if !md.brokers().is_empty() => break,
            other => {
                if started.elapsed() >= o.wait() {
                    let why = other.err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(format!(
                        "the Kafka cluster at {bootstrap} did not answer in {} s: {why}",
                        o.wait_s
                    ));
                }
                eprintln!("waiting for the Kafka cluster at {bootstrap}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    let mut lines = Vec::new();
    for t in o.topics(common) {
        let state = kafka::create_topic_if_missing(
            &admin,
            &t.name,
            t.partitions,
            o.replication_factor,
            &t.configs,
        )
        .await
        .map_err(|e| format!("topic {}: {e}", t.name))?;
        let configs: Vec<String> = t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(match state {
            TopicState::Created => format!(
                "topic {}: created, {} partitions, replication factor {}{}",
                t.name,
                t.partitions,
                if o.replication_factor == -1 {
                    "the broker's default".to_owned()
                } else {
                    o.replication_factor.to_string()
                },
                if configs.is_empty() {
                    String::new()
                } else {
                    format!(", {}", configs.join(", "))
                }
            ),
            TopicState::Exists(n) if n == t.partitions => {
                format!("topic {}: exists, {n} partitions (left as it is)", t.name)
            }
            TopicState::Exists(n) => format!(
                "topic {}: exists with {n} partitions, not the {} asked for (left as it is: \
                 changing an orders topic's partition count moves keys between partitions, so \
                 it is for an operator to do)",
                t.name, t.partitions
            ),
        });
    }
    Ok(lines)
}

/// `order-processor create-topics ...` with the processor's environment.
pub fn run(args: &Args) -> ExitCode {
    service::command("create-topics", |vars| async move {
        let common = CommonConfig::from_vars(&vars)?;
        create(&common, args).await.map_err(CommandError::Failed)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn parse(flags: &[&str]) -> Result<Args, String> {
        Command::try_parse_from(std::iter::once("create-topics").chain(flags.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_parse_and_bad_ones_say_why() {
        let o = parse(&[
            "--orders-partitions",
            "12",
            "--replication-factor",
            "3",
            "--orders-config",
            "retention.ms=604800000",
            "--dlq-config",
            "cleanup.policy=delete",
            "--dlq-config",
            "min.insync.replicas=2",
        ])
        .unwrap();
        assert_eq!(o.orders_partitions, 12);
        assert_eq!(o.dlq_partitions, 3);
        assert_eq!(o.replication_factor, 3);
        assert_eq!(
            o.orders_configs,
            vec![("retention.ms".into(), "604800000".into())]
        );
        assert_eq!(o.dlq_configs.len(), 2);
        let defaults = parse(&[]).unwrap();
        assert_eq!(
            (defaults.orders_partitions, defaults.dlq_partitions),
            (6, 3)
        );
        assert_eq!((defaults.replication_factor, defaults.wait_s), (-1, 300));
        assert_eq!(parse(&["--replication-factor", "-1"]).unwrap(), defaults);
        for (bad, says) in [
            (vec!["--orders-partitions", "0"], "--orders-partitions"),
            (
                vec!["--replication-factor", "0"],
                "-1 for the broker's default",
            ),
            (vec!["--orders-config", "retention.ms"], "KEY=VALUE"),
            (vec!["--dlq-partitions"], "--dlq-partitions"),
            (vec!["--partitions", "3"], "--partitions"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
