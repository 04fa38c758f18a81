//! Kafka client configurations with safe defaults, and the broker checks behind `/readyz`.
//!
//! Every builder starts from the service's [`CommonConfig`], applies our defaults, then the
//! user's `RDKAFKA_*` properties, so an operator can override anything (security settings,
//! tuning) without a code change.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::CommonConfig;

/// What every client of ours starts from; finish with [`with_user_properties`].
pub fn base(common: &CommonConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &common.kafka_bootstrap_servers)
        .set("client.id", client_id)
        // librdkafka logs through its own callback; errors surface as events we log
        .set("log.connection.close", "false")
        // KIP-714 metrics push to the broker (librdkafka's default is on): it keeps six to
        // eight latency histograms per broker connection of every client, ~0.6 MB of an idle
        // processor, for brokers that have a telemetry plugin; our metrics are on /metrics
        // (RDKAFKA_ENABLE_METRICS_PUSH=true turns it back on)
        .set("enable.metrics.push", "false");
    c
}

/// The user's `RDKAFKA_*` properties over `c`: the last step of every client configuration.
pub fn with_user_properties(mut c: ClientConfig, common: &CommonConfig) -> ClientConfig {
    for (k, v) in &common.kafka_properties {
        c.set(k, v);
    }
    c
}

/// A producer that never duplicates or reorders within a partition (idempotence, acks=all),
/// batching for throughput. `compression` is librdkafka's `compression.type`.
pub fn producer_config(common: &CommonConfig, client_id: &str, compression: &str) -> ClientConfig {
    let mut c = base(common, client_id);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", compression)
        .set("linger.ms", "5")
        .set("batch.size", "262144")
        // delivery is retried inside librdkafka for this long before a report says it failed
        .set("message.timeout.ms", "120000")
        // bound the memory the send queue may take (librdkafka's defaults are 1 GiB and
        // 100,000 messages; 20,000 cut the generator's peak RSS by ~10 MB at full rate, with
        // no loss of throughput measured, while 10,000 lost a fifth of it)
        .set("queue.buffering.max.kbytes", "65536")
        .set("queue.buffering.max.messages", "20000");
    with_user_properties(c, common)
}

/// A consumer for at-least-once processing in the style of Vector's Kafka source: offsets are
/// committed automatically, but only offsets the application *stored* after the message's
/// outcome became durable.
pub fn consumer_config(common: &CommonConfig, client_id: &str, group_id: &str) -> ClientConfig {
    let mut c = base(common, client_id);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        // Prefetch bounds. With one queue per partition these apply per partition, and
        // librdkafka's defaults (100,000 messages, 64 MiB, 1 MiB a fetch) let a backlog of small
        // orders fill ~220 MB (make bench, 1M records). Each prefetched message costs ~300 bytes
        // of librdkafka bookkeeping besides its bytes, so the message count is the bound that
        // matters: 7,500 keeps the processor's peak under 50 MB on six partitions (10,000 gave
        // 52-54 MB for no throughput we could tell apart from run-to-run noise). A short back-off
        // keeps the fetcher from idling a second once a queue is full.
        .set("queued.min.messages", "7500")
        .set("queued.max.messages.kbytes", "2048")
        .set("max.partition.fetch.bytes", "262144")
        .set("fetch.queue.backoff.ms", "5")
        .set("fetch.wait.max.ms", "100")
        .set("isolation.level", "read_committed");
    with_user_properties(c, common)
}

/// Whether the cluster answers `client`: a metadata request for `topic` over the connections
/// the client already keeps, true when it names at least one broker. `/readyz` asks this every
/// few seconds on the service's own client: a client made per check costs its threads, a TCP
/// connection and a handshake each time, and the broker sees the churn.
pub fn cluster_answers<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> bool {
    topic_seen(client, topic, timeout).is_some()
}

/// The same request as [`cluster_answers`]: `topic`'s partition count (0 when it does not
/// exist yet), or `None` when no broker answers.
fn topic_seen<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Option<usize> {
    let md = client.fetch_metadata(Some(topic), timeout).ok()?;
    if md.brokers().is_empty() {
        return None;
    }
    Some(
        md.topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len()),
    )
}

/// The broker check `/readyz` runs (see [`crate::http::watch_dependencies`]): whether the
/// cluster answers for `topic` over the client that `client` finds in `owner`. The check holds
/// `owner` weakly, so it never keeps a client alive past its service's shutdown.
pub fn readiness_check<T, C>(
    owner: &std::sync::Arc<T>,
    topic: &str,
    client: fn(&T) -> &Client<C>,
) -> impl Fn() -> bool + Send + Sync + 'static
where
    T: Send + Sync + 'static,
    C: ClientContext + 'static,
{
    readiness_check_observing(owner, topic, client, |_| {})
}

/// [`readiness_check`] that also hands `on_topic` what the same request says of the topic:
/// its partition count, 0 while it does not exist.
pub fn readiness_check_observing<T, C>(
    owner: &std::sync::Arc<T>,
    topic: &str,
    client: fn(&T) -> &Client<C>,
    on_topic: impl Fn(usize) + Send + Sync + 'static,
) -> impl Fn() -> bool + Send + Sync + 'static
where
    T: Send + Sync + 'static,
    C: ClientContext + 'static,
{
    let owner = std::sync::Arc::downgrade(owner);
    let topic = topic.to_owned();
    move || {
        let seen = owner
            .upgrade()
            .and_then(|o| topic_seen(client(&o), &topic, Duration::from_secs(3)));
        if let Some(partitions) = seen {
            on_topic(partitions);
        }
        seen.is_some()
    }
}

/// How many partitions `topic` has; 0 when it does not exist (yet). An error when the
/// cluster does not answer.
pub fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len()))
}

/// Runs `f`, which blocks, from code that librdkafka calls on a runtime thread and that must
/// not return before `f` is done (a rebalance callback commits before the partitions go). The
/// rule for the services: blocking librdkafka calls made from async code go to
/// `spawn_blocking`; only such callbacks block where they are, through this function, which
/// lets a multi-threaded runtime move its other tasks off the thread meanwhile.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Classifies a producer error: `true` when waiting and sending again can succeed (queue full,
/// timeouts, a broker moving leadership), `false` for errors that will not go away (message
/// too large, authorization, a fenced or fatal producer).
pub fn is_retriable_produce_error(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::QueueFull
            | C::MessageTimedOut
            | C::RequestTimedOut
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::NetworkException,
        ) => true,
        Some(_) => false,
        None => false,
    }
}
