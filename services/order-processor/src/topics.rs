//! `order-processor create-topics`: creates the orders and dead-letter topics (`ORDERS_TOPIC`,
//! `DLQ_TOPIC`) with the partitions, replication factor and configs given as flags, through the
//! same Kafka settings as the service (`KAFKA_BOOTSTRAP_SERVERS`, `RDKAFKA_*`), so it works
//! against any cluster the processor can reach, secured ones included. The Helm chart's topics
//! Job runs it. A topic that exists is left as it is, and said so.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use order_runtime::CommonConfig;
use order_runtime::kafka::{self, TopicState};

/// The command-line flags of `order-processor create-topics`.
pub const USAGE: &str = "usage: order-processor create-topics [--orders-partitions N] \
[--dlq-partitions N] [--replication-factor N|-1] [--orders-config KEY=VALUE]... \
[--dlq-config KEY=VALUE]... [--wait-s N]";

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: usize,
    pub configs: Vec<(String, String)>,
}

/// What the flags ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub orders_partitions: usize,
    pub dlq_partitions: usize,
    /// -1: the broker's `default.replication.factor`.
    pub replication: i32,
    pub orders_configs: Vec<(String, String)>,
    pub dlq_configs: Vec<(String, String)>,
    /// How long to wait for the cluster to answer.
    pub wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            orders_partitions: 6,
            dlq_partitions: 3,
            replication: -1,
            orders_configs: Vec::new(),
            dlq_configs: Vec::new(),
            wait: Duration::from_secs(300),
        }
    }
}

/// Parses the flags of `order-processor create-topics`.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let count = |what: &str| -> Result<usize, String> {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} {value:?}: a whole number above 0"))
        };
        let config = || -> Result<(String, String), String> {
            match value.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(format!(
                    "{flag} {value:?}: KEY=VALUE, e.g. retention.ms=604800000"
                )),
            }
        };
        match flag.as_str() {
            "--orders-partitions" => o.orders_partitions = count(flag)?,
            "--dlq-partitions" => o.dlq_partitions = count(flag)?,
            "--replication-factor" => {
                o.replication = match value.parse::<i32>() {
                    Ok(n) if n == -1 || n > 0 => n,
                    _ => {
                        return Err(format!(
                            "{flag} {value:?}: above 0, or -1 for the broker's default"
                        ));
                    }
                }
            }
            "--orders-config" => o.orders_configs.push(config()?),
            "--dlq-config" => o.dlq_configs.push(config()?),
            "--wait-s" => o.wait = Duration::from_secs(count(flag)? as u64),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(o)
}

impl Options {
    /// The two topics, named by `common`.
    pub fn topics(&self, common: &CommonConfig) -> [TopicSpec; 2] {
        [
            TopicSpec {
                name: common.orders_topic.clone(),
                partitions: self.orders_partitions,
                configs: self.orders_configs.clone(),
            },
            TopicSpec {
                name: common.dlq_topic.clone(),
                partitions: self.dlq_partitions,
                configs: self.dlq_configs.clone(),
            },
        ]
    }
}

/// Waits (at most `o.wait`) for the cluster, then creates what is missing. One line per topic.
pub async fn create(common: &CommonConfig, o: &Options) -> Result<Vec<String>, String> {
    let admin = kafka::admin_client(common, "order-processor-create-topics")
        .map_err(|e| format!("could not create a Kafka admin client: {e}"))?;
    let started = Instant::now();
    // a refusal (credentials, TLS, ACLs) is final; a cluster still starting is waited for
    let first = o.topics(common)[0].name.clone();
    let (c, w) = (common.clone(), o.wait.min(Duration::from_secs(10)));
    tokio::task::spawn_blocking(move || kafka::check_cluster_access(&c, &first, w))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    loop {
        let (client, bootstrap) = (admin.inner(), &common.kafka_bootstrap_servers);
        match tokio::task::block_in_place(|| client.fetch_metadata(None, Duration::from_secs(5))) {
            Ok(md) if !md.brokers().is_empty() => break,
            other => {
                if started.elapsed() >= o.wait {
                    let why = other.err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(format!(
                        "the Kafka cluster at {bootstrap} did not answer in {} s: {why}",
                        o.wait.as_secs()
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
            o.replication,
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
                if o.replication == -1 {
                    "the broker's default".to_owned()
                } else {
                    o.replication.to_string()
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
pub fn command(args: &[String]) -> ExitCode {
    let options = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let common = match CommonConfig::from_vars(&order_runtime::config::process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(create(&common, &options)) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("create-topics failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flags_parse_and_bad_ones_say_why() {
        let o = parse_args(&args(&[
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
        ]))
        .unwrap();
        assert_eq!(o.orders_partitions, 12);
        assert_eq!(o.dlq_partitions, 3);
        assert_eq!(o.replication, 3);
        assert_eq!(
            o.orders_configs,
            vec![("retention.ms".into(), "604800000".into())]
        );
        assert_eq!(o.dlq_configs.len(), 2);
        assert_eq!(parse_args(&[]).unwrap(), Options::default());
        for (bad, says) in [
            (vec!["--orders-partitions", "0"], "above 0"),
            (
                vec!["--replication-factor", "0"],
                "-1 for the broker's default",
            ),
            (vec!["--orders-config", "retention.ms"], "KEY=VALUE"),
            (vec!["--dlq-partitions"], "needs a value"),
            (vec!["--partitions", "3"], "unknown flag --partitions"),
        ] {
            let e = parse_args(&args(&bad)).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
