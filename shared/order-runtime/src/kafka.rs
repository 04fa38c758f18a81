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
        // eight latency histograms per broker connection of every client, for brokers that have a telemetry plugin; our metrics are on /metrics
        // (RDKAFKA_ENABLE_METRICS_PUSH=true turns it back on)
        .set("enable.metrics.push", "false")
        // connect to the bootstrap brokers when the client is made, not at its first request:
        // with librdkafka's default (sparse connections) a new client's first request often
        // waited for the connection it asked for, and a start-up makes a few clients
        // one after another (RDKAFKA_ENABLE_SPARSE_CONNECTIONS=true restores the default)
        .set("enable.sparse.connections", "false");
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
        // a key goes to the partition Java clients (Kafka Streams included) put it in, and the
        // hash is cheaper than librdkafka's default (CRC32 of the key, `consistent_random`)
        .set("partitioner", "murmur2_random")
        // delivery is retried inside librdkafka for this long before a report says it failed
        .set("message.timeout.ms", "120000")
        // bound the memory the send queue may take (librdkafka's defaults are 1 GiB and
        // 100,000 messages): the lowest bound that kept the generator's full rate
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
        .set("auto.offset.reset", DEFAULT_OFFSET_RESET)
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        // Prefetch bounds. With one queue per partition these apply per partition, and
        // librdkafka's defaults (100,000 messages, 64 MiB, 1 MiB a fetch) let a backlog of small
        // orders fill hundreds of MB. Each prefetched message costs librdkafka bookkeeping
        // besides its bytes, so the message count is the bound that
        // matters, with the fetch size on top of it. A partition whose queue is full is left out
        // of the next fetch, and only one fetch is in flight per broker: when that one asks only
        // for caught-up partitions, the broker holds it for fetch.wait.max.ms while the full
        // ones drain and cannot refill. So a shallow queue needs a short wait, which drains as
        // fast as a deep one with a long wait, at a fraction of the memory; the price is twice
        // the fetches of an idle consumer. A short back-off keeps the fetcher from idling a
        // second once a queue is full. A fetch is added to a queue whole, so a queue can hold a
        // fetch's worth past the limit: smaller fetches under a higher message limit keep the
        // rate and lower the peak (docs/benchmarks.md has the runs).
        .set("queued.min.messages", "4000")
        .set("queued.max.messages.kbytes", "2048")
        .set("max.partition.fetch.bytes", "65536")
        .set("fetch.queue.backoff.ms", "5")
        .set("fetch.wait.max.ms", "50")
        .set("isolation.level", "read_committed");
    if let Some(id) = &common.group_instance_id {
        c.set("group.instance.id", id);
    }
    with_user_properties(c, common)
}

/// Where a consumer of ours starts in a partition its group has no offset for.
const DEFAULT_OFFSET_RESET: &str = "earliest";

/// The start of a partition the group has no offset for, as the consumer's `auto.offset.reset`
/// says (ours, `earliest`, unless `RDKAFKA_AUTO_OFFSET_RESET` is set): the log's start or its
/// end. `None` for `error` or a value librdkafka does not know: the consumer reports those.
pub fn offset_reset(common: &CommonConfig) -> Option<rdkafka::Offset> {
    let reset = common
        .kafka_properties
        .get("auto.offset.reset")
        .map_or(DEFAULT_OFFSET_RESET, String::as_str);
    match reset {
        "earliest" | "smallest" | "beginning" => Some(rdkafka::Offset::Beginning),
        "latest" | "largest" | "end" => Some(rdkafka::Offset::End),
        _ => None,
    }
}

/// The cluster refused this client at start-up: wrong credentials, TLS it cannot verify, or a
/// security protocol the listener does not speak. Waiting would not help, so the service stops
/// with what to fix.
#[derive(Debug, thiserror::Error)]
#[error("the Kafka cluster at {bootstrap} refused this client: {reason}; {fix}")]
pub struct ClusterRefused {
    pub bootstrap: String,
    pub reason: String,
    /// The variables to look at.
    pub fix: &'static str,
}

/// Records the first error that says the cluster refuses us (librdkafka reports them through the
/// client context, not as the failed request's error).
#[derive(Default)]
struct RefusalWatch {
    seen: std::sync::Mutex<Option<(String, &'static str)>>,
    /// Connections the broker closed during the first request (ApiVersion).
    hung_up: std::sync::atomic::AtomicU32,
}

/// That many hang-ups during the first request or the TLS handshake mean a client and a
/// listener that disagree on TLS (librdkafka reports them only as log lines, with growing
/// pauses between the attempts).
const HANG_UPS_MEANING_PROTOCOL: u32 = 2;
const PROTOCOL_FIX: &str = "check RDKAFKA_SECURITY_PROTOCOL against the listener's protocol \
                            (PLAINTEXT, SSL, SASL_SSL or SASL_PLAINTEXT)";

impl RefusalWatch {
    fn record(&self, reason: String, fix: &'static str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get_or_insert((reason, fix));
    }
}

impl ClientContext for RefusalWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(fix) = refusal_fix(&error, reason) {
            self.record(reason.to_owned(), fix);
        }
    }
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        // a plaintext client at a TLS listener, or a TLS client at a plaintext one
        let mismatch = message.contains("Disconnected")
            && (message.contains("APIVERSION_QUERY")
                || message.contains("connecting to a PLAINTEXT broker listener"));
        if fac == "FAIL" && mismatch {
            let n = 1 + self
                .hung_up
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == HANG_UPS_MEANING_PROTOCOL {
                self.record(
                    format!(
                        "the broker closed the connection before the first request was \
                         answered, {n} times ({message})"
                    ),
                    PROTOCOL_FIX,
                );
            }
        }
    }
}

impl rdkafka::producer::ProducerContext for RefusalWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// What to fix when `error` means the cluster refuses this client; `None` for errors that
/// waiting can cure (a broker down, a timeout).
fn refusal_fix(error: &KafkaError, reason: &str) -> Option<&'static str> {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::Authentication | C::SaslAuthenticationFailed | C::UnsupportedSASLMechanism) => {
            Some("check RDKAFKA_SASL_MECHANISM, RDKAFKA_SASL_USERNAME and RDKAFKA_SASL_PASSWORD")
        }
        Some(C::SSL) => Some(
            "check RDKAFKA_SECURITY_PROTOCOL and RDKAFKA_SSL_CA_LOCATION (the CA that signed the \
             broker's certificate)",
        ),
        // a plaintext client at a TLS or SASL listener: the broker hangs up during the first
        // request, which librdkafka words so
        _ if reason.contains("security.protocol") => Some(PROTOCOL_FIX),
        _ => None,
    }
}

/// At start-up: asks the cluster for `topic`'s metadata with the service's settings, and fails
/// when it refuses them (see [`ClusterRefused`]) or may not even see `topic` (its ACLs). A
/// cluster that does not answer within `wait` is left to the service, which waits for it as
/// before and stays unready meanwhile; so is a topic that does not exist yet.
pub fn check_cluster_access(
    common: &CommonConfig,
    topic: &str,
    wait: Duration,
) -> Result<(), ClusterRefused> {
    use rdkafka::producer::Producer as _;
    let mut config = with_user_properties(base(common, "access-check"), common);
    // the hang-ups that tell a protocol mismatch: logged at info level, and only with this
    config
        .set("log.connection.close", "true")
        // asking for a missing topic must not create it
        .set("allow.auto.create.topics", "false")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Info);
    let refused = |reason: String, fix| ClusterRefused {
        bootstrap: common.kafka_bootstrap_servers.clone(),
        reason,
        fix,
    };
    let client: rdkafka::producer::BaseProducer<RefusalWatch> =
        match config.create_with_context(RefusalWatch::default()) {
            Ok(c) => c,
            // librdkafka refuses the settings themselves (a mechanism without credentials...)
            Err(e) => {
                return Err(refused(
                    e.to_string(),
                    "check the RDKAFKA_* security settings",
                ));
            }
        };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Ok(md) = client
            .client()
            .fetch_metadata(Some(topic), left.min(Duration::from_millis(500)))
            && !md.brokers().is_empty()
        {
            let error = md.topics().first().and_then(|t| t.error());
            return match error.map(RDKafkaErrorCode::from) {
                Some(code @ RDKafkaErrorCode::TopicAuthorizationFailed) => Err(refused(
                    format!("topic {topic}: {code}"),
                    "this service's Kafka user needs ACLs on it (docs/security.md, \"Kafka ACLs\")",
                )),
                _ => Ok(()),
            };
        }
        // the refusal arrives as an error event, served by polling
        client.poll(Duration::from_millis(100));
        let seen = client
            .context()
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((reason, fix)) = seen {
            return Err(refused(reason, fix));
        }
        if std::time::Instant::now() >= deadline {
            tracing::info!(
                bootstrap = %common.kafka_bootstrap_servers,
                "the Kafka cluster does not answer yet; waiting for it"
            );
            return Ok(());
        }
    }
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

/// An admin client with the service's settings; asking it for a missing topic's metadata does
/// not create the topic with the broker's defaults.
pub fn admin_client(
    common: &CommonConfig,
    client_id: &str,
) -> Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, KafkaError> {
    let mut c = base(common, client_id);
    c.set("allow.auto.create.topics", "false");
    with_user_properties(c, common).create()
}

/// Drops `client` on a blocking thread, for code that should not wait for it: an
/// `AdminClient`'s drop joins its polling thread, which wakes every 100 ms, so a start-up that
/// dropped one before going on waited for it for nothing.
pub fn drop_in_background<T: Send + 'static>(client: T) {
    tokio::task::spawn_blocking(move || drop(client));
}

/// A client that is dropped with [`drop_in_background`] when this is, for clients whose last
/// owner can be an async task. A consumer's drop (`rd_kafka_destroy`) waits for its threads,
/// and on one of the runtime's few threads every task queued there waits too. Outside a runtime the drop happens in place.
pub struct DroppedInBackground<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DroppedInBackground<T> {
    pub fn new(client: T) -> Self {
        DroppedInBackground(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for DroppedInBackground<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // `None` only inside `drop`
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl<T: Send + 'static> Drop for DroppedInBackground<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            drop_in_background(client);
        } else {
            drop(client);
        }
    }
}

/// What [`create_topic_if_missing`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicState {
    Created,
    /// It was there already, with this many partitions (left as it is).
    Exists(usize),
}

/// Creates `name` with `partitions`, `replication` (-1: the broker's default) and `configs`
/// unless it exists; another creator winning the race counts as existing.
pub async fn create_topic_if_missing<C: ClientContext + 'static>(
    admin: &rdkafka::admin::AdminClient<C>,
    name: &str,
    partitions: usize,
    replication: i32,
    configs: &[(String, String)],
) -> Result<TopicState, KafkaError> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let existing = partition_count(admin.inner(), name, Duration::from_secs(10))?;
    if existing > 0 {
        return Ok(TopicState::Exists(existing));
    }
    let mut topic = NewTopic::new(
        name,
        i32::try_from(partitions).unwrap_or(i32::MAX),
        TopicReplication::Fixed(replication),
    );
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&[topic], &opts).await? {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                // the winner's topic may take a moment to show in the metadata
                for _ in 0..25 {
                    let now = partition_count(admin.inner(), name, Duration::from_secs(10))?;
                    if now > 0 {
                        return Ok(TopicState::Exists(now));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                return Err(KafkaError::AdminOpCreation(format!(
                    "{name} exists, but its metadata shows no partitions"
                )));
            }
            Err((t, code)) => {
                return Err(KafkaError::AdminOpCreation(format!("creating {t}: {code}")));
            }
        }
    }
    // The creation is answered once the controller has the topic; the brokers learn of it a
    // moment later, and until then a request for its partitions gets NOT_LEADER_OR_FOLLOWER
    // (the first exactly-once restore of a new group hit it in most starts, and waited).
    // Bounded: the topic exists, so users retry whatever still fails.
    for _ in 0..500 {
        if all_led(admin.inner(), name, partitions)? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(TopicState::Created)
}

/// Whether the metadata shows `topic` with `partitions` partitions, each with a leader.
fn all_led<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    partitions: usize,
) -> Result<bool, KafkaError> {
    let md = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md.topics().first().is_some_and(|t| {
        t.error().is_none()
            && t.partitions().len() == partitions
            && t.partitions()
                .iter()
                .all(|p| p.error().is_none() && p.leader() >= 0)
    }))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn global(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::Global(code)
    }

    #[test]
    fn a_refusal_names_the_settings_to_fix_and_a_waitable_error_is_no_refusal() {
        let sasl = refusal_fix(&global(RDKafkaErrorCode::Authentication), "SASL failed");
        assert!(sasl.is_some_and(|f| f.contains("RDKAFKA_SASL_PASSWORD")));
        let tls = refusal_fix(&global(RDKafkaErrorCode::SSL), "certificate verify failed");
        assert!(tls.is_some_and(|f| f.contains("RDKAFKA_SSL_CA_LOCATION")));
        let protocol = refusal_fix(
            &global(RDKafkaErrorCode::BrokerTransportFailure),
            "might be caused by incorrect security.protocol configuration",
        );
        assert_eq!(protocol, Some(PROTOCOL_FIX));
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::OperationTimedOut,
        ] {
            assert_eq!(refusal_fix(&global(code), "Connection refused"), None);
        }
    }

    #[test]
    fn a_partition_without_an_offset_starts_where_auto_offset_reset_says() {
        let common = |vars: &[(&str, &str)]| {
            let mut vars = crate::config::pairs(vars);
            vars.extend(crate::config::pairs(&[
                ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                ("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"),
            ]));
            CommonConfig::from_vars(&vars).unwrap()
        };
        let ours = common(&[]);
        assert_eq!(offset_reset(&ours), Some(rdkafka::Offset::Beginning));
        let config = consumer_config(&ours, "client", "group");
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        let latest = common(&[("RDKAFKA_AUTO_OFFSET_RESET", "latest")]);
        assert_eq!(offset_reset(&latest), Some(rdkafka::Offset::End));
        let error = common(&[("RDKAFKA_AUTO_OFFSET_RESET", "error")]);
        assert_eq!(offset_reset(&error), None);
    }

    #[test]
    fn two_hang_ups_in_the_first_request_mean_a_protocol_mismatch() {
        let watch = RefusalWatch::default();
        let hang_up = "127.0.0.1:9094/bootstrap: Disconnected: connection closed by peer: receive \
                       0 after POLLIN (after 1ms in state APIVERSION_QUERY)";
        use rdkafka::config::RDKafkaLogLevel::Info;
        watch.log(
            Info,
            "FAIL",
            "Connect to ipv4#127.0.0.1:9094 failed: Connection refused",
        );
        watch.log(Info, "FAIL", hang_up);
        assert!(watch.seen.lock().unwrap().is_none());
        watch.log(Info, "FAIL", hang_up);
        let seen = watch.seen.lock().unwrap().clone();
        assert_eq!(seen.map(|(_, fix)| fix), Some(PROTOCOL_FIX));
    }
}
