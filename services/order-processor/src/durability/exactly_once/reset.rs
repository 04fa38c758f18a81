//! Safe replay in exactly-once mode, which `order-processor reset --to
//! earliest|<RFC 3339 time>|<offset>` runs ([`crate::cli::reset`]).
//!
//! In exactly-once mode a partition's position is the `next_offset` of its changelog state, not
//! the group's committed offset alone (they are committed together, and on disagreement the
//! changelog wins), so `kafka-consumer-groups --reset-offsets` is overridden at the next
//! restore. This command moves both, in one transaction: for every orders partition a fresh
//! state (zero totals) at the target offset goes to the changelog, and the group's offsets go
//! to the same target. The processors then restore that state and count the replayed range as
//! a fresh run would. It refuses while the group has live members: a running replica would
//! overwrite the reset with its next commit.

use std::time::Duration;

use order_runtime::kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::aggregate::PartitionState;
use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the group goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The first offset still in each partition.
    Earliest,
    /// The first record at or after this time (milliseconds since the epoch) in each
    /// partition; the end of a partition with none.
    Time(i64),
    /// This offset in every partition, kept within what the partition holds.
    Offset(i64),
}

impl Target {
    /// `earliest`, an RFC 3339 time (`2026-12-01T10:00:00Z`) or an offset.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "earliest" {
            return Ok(Target::Earliest);
        }
        if let Ok(offset) = text.parse::<i64>() {
            return if offset >= 0 {
                Ok(Target::Offset(offset))
            } else {
                Err(format!("offset {offset} is negative"))
            };
        }
        order_runtime::dead_letter::rfc3339_millis(text)
            .map(Target::Time)
            .map_err(|e| format!("{text:?} is not `earliest` or an offset, and {e}"))
    }
}

/// Why a reset did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error(
        "consumer group {group} has {count} live member(s) ({members}): stop every processor of the group first"
    )]
    GroupAlive {
        group: String,
        count: usize,
        members: String,
    },
    #[error("the orders topic {0} does not exist")]
    NoTopic(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("could not encode a partition state: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One partition's move.
#[derive(Debug)]
pub struct Moved {
    pub partition: i32,
    /// The group's committed offset before (none: never committed).
    pub from: Option<i64>,
    pub to: i64,
}

/// Resets the group and its changelog to `target`. Blocking.
pub fn reset(config: &Config, target: &Target) -> Result<Vec<Moved>, ResetError> {
    let common = &config.common;
    let group = &config.processor.consumer_group;
    let orders = &common.orders_topic;
    let mut c = kafka::base(common, "order-processor-reset");
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = kafka::with_user_properties(c, common).create()?;

    let groups = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    if let Some(g) = groups.groups().iter().find(|g| g.name() == group.as_str())
        && !g.members().is_empty()
    {
        let members: Vec<String> = g
            .members()
            .iter()
            .map(|m| format!("{} on {}", m.client_id(), m.client_host()))
            .collect();
        return Err(ResetError::GroupAlive {
            group: group.clone(),
            count: members.len(),
            members: members.join(", "),
        });
    }

    let count = kafka::partition_count(consumer.client(), orders, TIMEOUT)?;
    if count == 0 {
        return Err(ResetError::NoTopic(orders.clone()));
    }
    let partitions: Vec<i32> = (0..i32::try_from(count).unwrap_or(i32::MAX)).collect();
    let mut current = TopicPartitionList::new();
    for p in &partitions {
        current.add_partition(orders, *p);
    }
    let committed = consumer.committed_offsets(current, TIMEOUT)?;
    let by_time = match target {
        Target::Time(ms) => {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(orders, *p, Offset::Offset(*ms))?;
            }
            Some(consumer.offsets_for_times(tpl, TIMEOUT)?)
        }
        _ => None,
    };
    let mut moves = Vec::with_capacity(partitions.len());
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(orders, *p, TIMEOUT)?;
        let to = match target {
            Target::Earliest => low,
            Target::Offset(o) => (*o).clamp(low, high),
            Target::Time(_) => match by_time
                .as_ref()
                .and_then(|t| t.find_partition(orders, *p))
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o.clamp(low, high),
                _ => high,
            },
        };
        let from = match committed.find_partition(orders, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        moves.push(Moved {
            partition: *p,
            from,
            to,
        });
    }

    // the changelog states and the group's offsets in one transaction, as the processors
    // commit them
    let mut pc = kafka::producer_config(common, "order-processor-reset", "none");
    let txn_timeout = config.processor.transaction_timeout_ms.to_string();
    pc.set("transactional.id", format!("{group}-reset"))
        .set("transaction.timeout.ms", &txn_timeout)
        .set("message.timeout.ms", &txn_timeout);
    let producer: ThreadedProducer<DefaultProducerContext> = pc.create()?;
    producer.init_transactions(TIMEOUT)?;
    producer.begin_transaction()?;
    let state_topic = config.state_topic();
    let mut offsets = TopicPartitionList::new();
    for m in &moves {
        let state = PartitionState {
            next_offset: m.to,
            ..PartitionState::default()
        };
        let value = serde_json::to_vec(&state)?;
        let key = m.partition.to_string();
        producer
            .send(
                BaseRecord::to(&state_topic)
                    .partition(m.partition)
                    .key(key.as_str())
                    .payload(value.as_slice()),
            )
            .map_err(|(e, _)| e)?;
        offsets.add_partition_offset(orders, m.partition, Offset::Offset(m.to))?;
    }
    let metadata = consumer.group_metadata().ok_or(KafkaError::Canceled)?;
    producer.send_offsets_to_transaction(&offsets, &metadata, TIMEOUT)?;
    producer.commit_transaction(TIMEOUT)?;
    Ok(moves)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        assert_eq!(Target::parse("earliest"), Ok(Target::Earliest));
        assert_eq!(Target::parse("42"), Ok(Target::Offset(42)));
        assert_eq!(
            Target::parse("2026-12-01T10:00:00Z"),
            Ok(Target::Time(1_796_119_200_000))
        );
        assert!(Target::parse("-1").unwrap_err().contains("negative"));
        assert!(Target::parse("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
