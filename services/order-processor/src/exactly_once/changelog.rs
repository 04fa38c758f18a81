//! The changelog of per-partition state: reading a partition's last committed state (restore),
//! every partition's (the group's totals), and making sure the topic exists.

use std::time::{Duration, Instant};

use order_runtime::CommonConfig;
use order_runtime::kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::info;

use super::EosError;
use crate::aggregate::PartitionState;
use crate::durability::CommittedPartition;

pub fn changelog_reader(
    common: &CommonConfig,
    isolation: &str,
) -> Result<BaseConsumer, KafkaError> {
    let mut c = kafka::base(common, &format!("order-processor-changelog-{isolation}"));
    c.set("group.id", "order-processor-changelog-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        // a reader moves from partition to partition (restores take turns on it) and its next
        // fetch waits for the previous one, which the broker holds this long at a partition's
        // end (librdkafka's default 500 ms made each restore take 1.5 s)
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", isolation);
    kafka::with_user_properties(c, common).create()
}

/// A changelog reader at each isolation level: their end offsets differ while a transaction
/// is open on a partition.
pub struct ChangelogReaders {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
    /// The changelog topic's metadata, asked for once by the first read.
    warmed: std::sync::Once,
}

impl ChangelogReaders {
    pub fn new(common: &CommonConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            committed: changelog_reader(common, "read_committed")?,
            uncommitted: changelog_reader(common, "read_uncommitted")?,
            warmed: std::sync::Once::new(),
        })
    }

    /// Asks both readers for the changelog topic's metadata, once. A new reader's first
    /// watermark query otherwise looks for the partition's leader in a metadata cache it has
    /// not filled yet, and librdkafka retries that look-up at growing intervals (100, 200,
    /// 300 ms...; `rd_kafka_topic_partition_list_query_leaders`). The first restore of a
    /// restarted replica took ~700 ms in 4 of 16 probe starts, and the first records waited
    /// for it (`make bench`: exactly-once p99 at 1,000/s of 680 ms); none did in 8 starts with
    /// this. A metadata request waits for the connection instead. Blocking; failures are left
    /// to the queries that follow.
    fn warm_up(&self, state_topic: &str) {
        self.warmed.call_once(|| {
            for reader in [&self.committed, &self.uncommitted] {
                let _ = reader.fetch_metadata(Some(state_topic), Duration::from_secs(10));
            }
        });
    }
}

/// The latest committed state of one partition (`None`: never committed). Waits until no
/// transaction is pending on its changelog partition, so that a commit in flight elsewhere
/// (a replica that lost the partition) is either in or out, never half seen.
pub fn read_changelog_partition(
    readers: &ChangelogReaders,
    state_topic: &str,
    partition: i32,
    stable_wait: Duration,
) -> Result<Option<PartitionState>, EosError> {
    readers.warm_up(state_topic);
    let ChangelogReaders {
        committed,
        uncommitted,
        ..
    } = readers;
    let started = Instant::now();
    let stable_end = loop {
        // read_committed watermarks end at the last stable offset; read_uncommitted at the
        // high watermark: equal when no transaction is open on the partition
        let (_, lso) =
            committed.fetch_watermarks(state_topic, partition, Duration::from_secs(10))?;
        let (_, hw) =
            uncommitted.fetch_watermarks(state_topic, partition, Duration::from_secs(10))?;
        if lso == hw {
            break lso;
        }
        if started.elapsed() > stable_wait {
            return Err(EosError::ChangelogBusy {
                partition,
                waited_s: stable_wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    last_state(committed, state_topic, partition, stable_end)
}

/// Reads the last state record below `end`: the tail first (each commit writes one record and
/// one transaction marker per partition), the whole partition if the tail has none.
fn last_state(
    consumer: &BaseConsumer,
    state_topic: &str,
    partition: i32,
    end: i64,
) -> Result<Option<PartitionState>, EosError> {
    if end <= 0 {
        return Ok(None);
    }
    for start in [Offset::Offset((end - 64).max(0)), Offset::Beginning] {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(state_topic, partition, start)?;
        consumer.assign(&tpl)?;
        let mut last = None;
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                // the reader serves one partition after another: anything still in flight for
                // an earlier one is not this partition's state
                Some(Ok(m)) if m.partition() != partition || m.topic() != state_topic => {}
                Some(Err(KafkaError::PartitionEOF(p))) if p != partition => {}
                Some(Ok(m)) => {
                    if let Some(v) = m.payload() {
                        last = Some(v.to_vec());
                    }
                    if m.offset() + 1 >= end {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => return Err(e.into()),
            }
        }
        if let Some(bytes) = last {
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| EosError::BadChangelog { partition, source });
        }
    }
    Ok(None)
}

/// Every partition's latest committed state (from the changelog, which commits in the same
/// transactions as the group's offsets) and the orders partition's end offset, read with
/// `reader` (a `read_committed` [`changelog_reader`]).
pub fn committed_partitions(
    reader: &BaseConsumer,
    state_topic: &str,
    orders_topic: &str,
) -> Result<Vec<CommittedPartition>, EosError> {
    let metadata = reader.fetch_metadata(Some(state_topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut committed = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (_, lso) = reader.fetch_watermarks(state_topic, partition, Duration::from_secs(10))?;
        let state = last_state(reader, state_topic, partition, lso)?;
        let (_, end_offset) =
            reader.fetch_watermarks(orders_topic, partition, Duration::from_secs(10))?;
        committed.push(CommittedPartition {
            partition,
            state,
            end_offset,
        });
    }
    Ok(committed)
}

/// Creates the changelog topic (compacted, with the orders topic's `orders` partitions) or
/// checks the existing one has enough partitions.
pub async fn ensure_changelog(
    common: &CommonConfig,
    state_topic: &str,
    orders: usize,
) -> Result<(), KafkaError> {
    let admin = kafka::admin_client(common, "order-processor-admin")?;
    let configs = [
        ("cleanup.policy", "compact"),
        ("min.compaction.lag.ms", "0"),
        ("segment.ms", "600000"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let state = kafka::create_topic_if_missing(&admin, state_topic, orders, -1, &configs).await;
    kafka::drop_in_background(admin);
    match state? {
        kafka::TopicState::Exists(existing) if existing >= orders => return Ok(()),
        kafka::TopicState::Exists(existing) => {
            return Err(KafkaError::AdminOpCreation(format!(
                "changelog topic {state_topic} has {existing} partitions but {} has {orders}",
                common.orders_topic
            )));
        }
        kafka::TopicState::Created => {}
    }
    info!(
        topic = state_topic,
        partitions = orders,
        "changelog topic created"
    );
    Ok(())
}
