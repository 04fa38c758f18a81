//! What can go wrong in the exactly-once machinery, for the logs and the retry decisions.

use rdkafka::error::KafkaError;

/// An exactly-once failure.
#[derive(Debug, thiserror::Error)]
pub enum EosError {
    #[error("Kafka transaction failed: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the consumer has no group metadata yet")]
    NoGroupMetadata,
    #[error("a record could not join the transaction")]
    Poisoned,
    #[error("changelog partition {partition} still has a pending transaction after {waited_s} s")]
    ChangelogBusy { partition: i32, waited_s: u64 },
    #[error("no end offset for changelog partition {partition}")]
    NoEndOffset { partition: i32 },
    #[error("changelog partitions {partitions:?} gave nothing for 10 s before their end")]
    ChangelogStalled { partitions: Vec<i32> },
    #[error("changelog partition {partition} could not be read: {error}")]
    ChangelogRead { partition: i32, error: String },
    #[error("changelog record of partition {partition} is unreadable: {source}")]
    BadChangelog {
        partition: i32,
        #[source]
        source: serde_json::Error,
    },
    #[error("the transactional producer is not made yet")]
    NotPrepared,
    #[error("the state of partition {partition} could not be encoded for the changelog: {source}")]
    EncodeState {
        partition: i32,
        #[source]
        source: serde_json::Error,
    },
}
