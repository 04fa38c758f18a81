//! The changelog of per-partition state: reading a partition's last committed state (restore),
//! every partition's (the group's totals), and making sure the topic exists.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use order_runtime::CommonConfig;
use order_runtime::kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::info;

use super::error::EosError;
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
        // a reader is assigned one set of partitions after another (a tail, then whole
        // partitions; one restore after another) and its next fetch waits for the previous
        // one, which the broker holds this long at a partition's end: with librdkafka's
        // default a restore waited out each of its steps for nothing
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", isolation);
    kafka::with_user_properties(c, common).create()
}

/// A changelog reader at each isolation level: their end offsets differ while a transaction
/// is open on a partition.
pub struct ChangelogReaders {
    /// The last restore to let go of the pair can be a worker's task. Dropped there, the pair
    /// (a client's drop waits for its threads) held back that partition's first records and
    /// the other partitions' tasks on its runtime thread, so one partition started late and
    /// then drained alone.
    committed: kafka::DroppedInBackground<BaseConsumer>,
    uncommitted: kafka::DroppedInBackground<BaseConsumer>,
    /// The changelog topic's metadata, asked for once by the first read.
    warmed: std::sync::Once,
}

impl ChangelogReaders {
    pub fn new(common: &CommonConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            committed: kafka::DroppedInBackground::new(changelog_reader(common, "read_committed")?),
            uncommitted: kafka::DroppedInBackground::new(changelog_reader(
                common,
                "read_uncommitted",
            )?),
            warmed: std::sync::Once::new(),
        })
    }

    /// Asks both readers for the changelog topic's metadata, once. A new reader's first
    /// watermark query otherwise looks for the partition's leader in a metadata cache it has
    /// not filled yet, and librdkafka retries that look-up at growing intervals (100, 200,
    /// 300 ms...; `rd_kafka_topic_partition_list_query_leaders`), so a restarted replica's
    /// first restore, and its first records, could wait several of those rounds. A metadata
    /// request waits for the connection instead. Blocking; failures are left to the queries
    /// that follow.
    pub fn warm_up(&self, state_topic: &str) {
        self.warmed.call_once(|| {
            for reader in [&self.committed, &self.uncommitted] {
                let _ = reader.fetch_metadata(Some(state_topic), Duration::from_secs(10));
            }
        });
    }
}

/// A changelog partition's latest committed state as a restore reads it: `None` when it was
/// never committed.
pub type Restored = Result<Option<PartitionState>, EosError>;

/// The latest committed state of each of `partitions`, handed to `done` in groups as they are
/// read: first every partition with no transaction pending on it, together, then the others
/// as theirs end (or fail as [`EosError::ChangelogBusy`] after `stable_wait`). Waiting for no
/// pending transaction means a commit in flight elsewhere (a replica that lost the partition)
/// is either in or out, never half seen. Each step asks about all the partitions at once, so
/// an assignment's restores take about as long as one.
pub fn read_changelog_partitions(
    readers: &ChangelogReaders,
    state_topic: &str,
    partitions: &[i32],
    stable_wait: Duration,
    mut done: impl FnMut(Vec<(i32, Restored)>),
) {
    readers.warm_up(state_topic);
    let ChangelogReaders {
        committed,
        uncommitted,
        ..
    } = readers;
    let started = Instant::now();
    let mut left = partitions.to_vec();
    while !left.is_empty() {
        // read_committed end offsets are last stable offsets, read_uncommitted ones high
        // watermarks: equal when no transaction is open on the partition
        let ends = end_offsets(committed, state_topic, &left)
            .and_then(|lso| Ok((lso, end_offsets(uncommitted, state_topic, &left)?)));
        let (lso, hw) = match ends {
            Ok(ends) => ends,
            Err(e) => return done(left.iter().map(|&p| (p, Err(e.clone().into()))).collect()),
        };
        let mut stable = Vec::new();
        let mut ready = Vec::new();
        let mut busy = Vec::new();
        for &p in &left {
            match (end_of(&lso, p), end_of(&hw, p)) {
                (Ok(l), Ok(h)) if l == h => stable.push((p, l)),
                (Ok(_), Ok(_)) => busy.push(p),
                (Err(e), _) | (_, Err(e)) => ready.push((p, Err(e))),
            }
        }
        match last_states(committed, state_topic, &stable) {
            Ok(states) => ready.extend(states),
            Err(e) => {
                let error = e.to_string();
                ready.extend(stable.iter().map(|&(partition, _)| {
                    let error = error.clone();
                    (partition, Err(EosError::ChangelogRead { partition, error }))
                }));
            }
        }
        if !ready.is_empty() {
            done(ready);
        }
        if !busy.is_empty() && started.elapsed() > stable_wait {
            let waited_s = stable_wait.as_secs();
            return done(
                busy.iter()
                    .map(|&partition| {
                        (
                            partition,
                            Err(EosError::ChangelogBusy {
                                partition,
                                waited_s,
                            }),
                        )
                    })
                    .collect(),
            );
        }
        if !busy.is_empty() {
            std::thread::sleep(Duration::from_millis(250));
        }
        left = busy;
    }
}

/// Each partition's end offset as `reader` sees it (the last stable offset under
/// read_committed), in one request per leader.
fn end_offsets(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Result<i64, KafkaError>>, KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for &p in partitions {
        // as a timestamp, -1 asks for the latest offset
        tpl.add_partition_offset(topic, p, Offset::End)?;
    }
    let ends = reader.offsets_for_times(tpl, Duration::from_secs(10))?;
    Ok(ends
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| {
            let end = match (e.error(), e.offset()) {
                (Err(err), _) => Err(err),
                (Ok(()), Offset::Offset(o)) => Ok(o),
                (Ok(()), _) => return None,
            };
            Some((e.partition(), end))
        })
        .collect())
}

/// `partition`'s offset in what [`end_offsets`] found.
fn end_of(ends: &HashMap<i32, Result<i64, KafkaError>>, partition: i32) -> Result<i64, EosError> {
    match ends.get(&partition) {
        Some(Ok(end)) => Ok(*end),
        Some(Err(e)) => Err(e.clone().into()),
        None => Err(EosError::NoEndOffset { partition }),
    }
}

/// The last state record below each partition's end offset: the tails first (each commit
/// writes one record and one transaction marker per partition), the whole partition for those
/// whose tail has none. `Err` when the read itself failed, for all of them.
fn last_states(
    consumer: &BaseConsumer,
    state_topic: &str,
    ends: &[(i32, i64)],
) -> Result<Vec<(i32, Restored)>, EosError> {
    let end: HashMap<i32, i64> = ends.iter().copied().collect();
    let mut last: HashMap<i32, Vec<u8>> = HashMap::new();
    let tails: Vec<(i32, Offset)> = ends
        .iter()
        .filter(|&&(_, end)| end > 0)
        .map(|&(p, end)| (p, Offset::Offset((end - 64).max(0))))
        .collect();
    read_to_ends(consumer, state_topic, &tails, &end, &mut last)?;
    let whole: Vec<(i32, Offset)> = tails
        .iter()
        .filter(|(p, _)| !last.contains_key(p))
        .map(|&(p, _)| (p, Offset::Beginning))
        .collect();
    read_to_ends(consumer, state_topic, &whole, &end, &mut last)?;
    Ok(ends
        .iter()
        .map(|&(partition, _)| {
            let state = last.get(&partition).map(|bytes| {
                serde_json::from_slice(bytes)
                    .map_err(|source| EosError::BadChangelog { partition, source })
            });
            (partition, state.transpose())
        })
        .collect())
}

/// Reads each partition from its start offset up to its end (or its end-of-partition event),
/// keeping the last payload of each in `last`.
fn read_to_ends(
    consumer: &BaseConsumer,
    state_topic: &str,
    starts: &[(i32, Offset)],
    end: &HashMap<i32, i64>,
    last: &mut HashMap<i32, Vec<u8>>,
) -> Result<(), EosError> {
    if starts.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(starts.len());
    for &(p, start) in starts {
        tpl.add_partition_offset(state_topic, p, start)?;
    }
    consumer.assign(&tpl)?;
    let mut reading: HashSet<i32> = starts.iter().map(|&(p, _)| p).collect();
    while !reading.is_empty() {
        match consumer.poll(Duration::from_secs(10)) {
            // anything still in flight from an earlier read is not asked for here
            Some(Ok(m)) if m.topic() != state_topic || !reading.contains(&m.partition()) => {}
            Some(Ok(m)) => {
                if let Some(v) = m.payload() {
                    last.insert(m.partition(), v.to_vec());
                }
                if m.offset() + 1 >= end.get(&m.partition()).copied().unwrap_or(0) {
                    reading.remove(&m.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            // the broker holds an empty fetch for 10 ms: nothing for 10 s is not an end
            None => {
                let mut left: Vec<i32> = reading.into_iter().collect();
                left.sort_unstable();
                return Err(EosError::ChangelogStalled { partitions: left });
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Every partition's latest committed state (from the changelog, which commits in the same
/// transactions as the group's offsets) and the orders partition's end offset, read with
/// `reader` (a `read_committed` [`changelog_reader`]), all partitions at once as a restore
/// reads them.
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
    let stable = end_offsets(reader, state_topic, &partitions)?;
    let orders_ends = end_offsets(reader, orders_topic, &partitions)?;
    let ends = partitions
        .iter()
        .map(|&p| Ok((p, end_of(&stable, p)?)))
        .collect::<Result<Vec<_>, EosError>>()?;
    last_states(reader, state_topic, &ends)?
        .into_iter()
        .map(|(partition, state)| {
            Ok(CommittedPartition {
                partition,
                state: state?,
                end_offset: end_of(&orders_ends, partition)?,
            })
        })
        .collect()
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
