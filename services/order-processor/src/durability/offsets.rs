//! What a guarantee may do with the consumer's offsets, as a narrow handle: commit positions,
//! seek, read the group's committed offsets, and the group's metadata for a transaction. The
//! guarantees never hold the consumer itself, whose context holds them.

use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// The consumer's offsets, as a guarantee sees them.
pub trait Offsets: Send + Sync {
    /// Commits these offsets (with their metadata) for the group; `Sync` waits for the
    /// broker's answer.
    fn commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()>;

    /// Moves the partition's position: its next record will be `offset`.
    fn seek_to(
        &self,
        topic: &str,
        partition: i32,
        offset: Offset,
        timeout: Duration,
    ) -> KafkaResult<()>;

    /// The group's committed offsets of `partitions`, in one request.
    fn group_committed(
        &self,
        partitions: TopicPartitionList,
        timeout: Duration,
    ) -> KafkaResult<TopicPartitionList>;

    /// The group's generation and member, sent with a transaction's offsets so that the broker
    /// fences a replica that is no longer in the group (KIP-447). `None` before it joined.
    fn generation(&self) -> Option<ConsumerGroupMetadata>;
}

/// One implementation for both consumer kinds, which share the [`Consumer`] trait.
macro_rules! offsets_of {
    ($consumer:ident) => {
        impl<C: ConsumerContext + 'static> Offsets for $consumer<C> {
            fn commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
                Consumer::commit(self, offsets, mode)
            }

            fn seek_to(
                &self,
                topic: &str,
                partition: i32,
                offset: Offset,
                timeout: Duration,
            ) -> KafkaResult<()> {
                Consumer::seek(self, topic, partition, offset, timeout)
            }

            fn group_committed(
                &self,
                partitions: TopicPartitionList,
                timeout: Duration,
            ) -> KafkaResult<TopicPartitionList> {
                self.committed_offsets(partitions, timeout)
            }

            fn generation(&self) -> Option<ConsumerGroupMetadata> {
                Consumer::group_metadata(self)
            }
        }
    };
}

offsets_of!(StreamConsumer);
offsets_of!(BaseConsumer);
