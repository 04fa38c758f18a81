//! The consumer's context: the rebalance protocol around the partition workers.
//!
//! - Assignment: each partition's queue is split from the consumer's in `pre_rebalance`,
//!   before the assignment takes effect (as Vector's Kafka source does), so no record of an
//!   assigned partition can reach the consumer's own queue; `post_rebalance` starts a
//!   [`PartitionWorker`] on each.
//! - Revocation: the partitions' workers are stopped and waited for (the record in hand is
//!   settled or dropped), then the guarantee commits and forgets them, all before the
//!   partitions go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use kafka_batch::PartitionBatches;
use order_runtime::kafka;
use order_runtime::sync::Locked;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::PartitionLabel;
use super::worker::{PartitionWorker, Processing};
use crate::durability::{Durability, Offsets};

pub type ProcessorConsumer<D> = StreamConsumer<ProcessorContext<D>>;

type TopicPartition = (String, i32);

/// A running worker: how to stop it and know that it stopped.
#[derive(Debug)]
struct Worker {
    cancel: CancellationToken,
    done: std::sync::mpsc::Receiver<()>,
}

/// The consumer's context (see the module docs).
pub struct ProcessorContext<D: Durability> {
    consumer: OnceLock<Weak<ProcessorConsumer<D>>>,
    processing: Arc<Processing<D>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    /// Queues split in `pre_rebalance`, for `post_rebalance` to start their workers on.
    split: Mutex<HashMap<TopicPartition, PartitionBatches>>,
    workers: Mutex<HashMap<TopicPartition, Worker>>,
    /// Set once the consumer has joined the group (its first assignment, even an empty one).
    joined: Arc<AtomicBool>,
}

impl<D: Durability> ProcessorContext<D> {
    pub fn new(
        processing: Arc<Processing<D>>,
        shutdown: CancellationToken,
        joined: Arc<AtomicBool>,
    ) -> Self {
        ProcessorContext {
            consumer: OnceLock::new(),
            processing,
            runtime: tokio::runtime::Handle::current(),
            shutdown,
            split: Mutex::default(),
            workers: Mutex::default(),
            joined,
        }
    }

    /// Gives the context the consumer it belongs to (needed to split partition queues).
    pub fn attach(&self, consumer: &Arc<ProcessorConsumer<D>>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn start_worker(&self, consumer: &Arc<ProcessorConsumer<D>>, key: TopicPartition) {
        let queue = self.split.locked().remove(&key);
        let Some(queue) = queue else {
            warn!(topic = %key.0, partition = key.1, "no split queue for the assigned partition");
            return;
        };
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = std::sync::mpsc::channel();
        let offsets: Arc<dyn Offsets> = consumer.clone();
        let worker = PartitionWorker {
            processing: self.processing.clone(),
            offsets,
            topic: key.0.clone(),
            partition: key.1,
            queue,
            cancel: cancel.clone(),
        };
        self.runtime.spawn(async move {
            worker.run().await;
            // the worker and its queue are gone by now
            let _ = done_tx.send(());
        });
        self.workers.locked().insert(key, Worker { cancel, done });
    }

    /// Stops the workers of `partitions` (all when `None`) and waits for them to finish the
    /// record in hand, so that its outcome is settled or dropped before the commit that
    /// follows. Blocking.
    pub fn stop_workers(&self, partitions: Option<&[TopicPartition]>) {
        let stopping: Vec<(TopicPartition, Worker)> = {
            let mut workers = self.workers.locked();
            match partitions {
                Some(list) => list
                    .iter()
                    .filter_map(|k| workers.remove_entry(k))
                    .collect(),
                None => {
                    // at shutdown, queues split for an assignment that never completed go too
                    // (each holds the consumer)
                    self.split.locked().clear();
                    workers.drain().collect()
                }
            }
        };
        for (_, worker) in &stopping {
            worker.cancel.cancel();
        }
        kafka::blocking(|| {
            for ((_, partition), worker) in &stopping {
                if worker.done.recv_timeout(Duration::from_secs(15)).is_err() {
                    warn!(partition, "partition worker did not stop within 15 s");
                }
            }
        });
    }
}

/// A partition's lag in records, as the Java client's `records-lag`: from the position this
/// consumer has reached (`app_offset`, the next offset handed to the application) to the last
/// stable offset (read_committed; the high watermark when that is unknown). librdkafka's own
/// `consumer_lag` counts from the offset the consumer committed itself, which an exactly-once
/// processor never does (its offsets go with its transactions), so it stays unknown (-1) there;
/// it is the answer only until the first record is handed over. `None`: not known yet.
fn lag_of(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    if end >= 0 && p.app_offset >= 0 {
        Some((end - p.app_offset).max(0))
    } else {
        (p.consumer_lag >= 0).then_some(p.consumer_lag)
    }
}

fn partitions(tpl: &rdkafka::TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl<D: Durability> ClientContext for ProcessorContext<D> {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    /// librdkafka's statistics (`statistics.interval.ms`): we keep the consumer lag of the
    /// partitions this consumer has ([`lag_of`]), and drop the series of those it no longer
    /// has (librdkafka goes on reporting a revoked partition with its last, stale figures,
    /// which would count twice in a sum over the group's replicas).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = &self.processing.metrics.consumer_lag;
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // the internal partition -1 is not a partition
                if *partition < 0 {
                    continue;
                }
                let label = PartitionLabel {
                    topic: topic.clone(),
                    partition: *partition,
                };
                if !p.desired {
                    lag.remove(&label);
                } else if let Some(records) = lag_of(p) {
                    lag.get_or_create(&label).set(records);
                }
            }
        }
    }
}

impl<D: Durability> ConsumerContext for ProcessorContext<D> {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let mut split = self.split.locked();
                for (topic, partition) in partitions(tpl) {
                    match PartitionBatches::split(&consumer, &topic, partition) {
                        Some(queue) => {
                            split.insert((topic, partition), queue);
                        }
                        None => warn!(topic, partition, "could not split the partition's queue"),
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                let numbers: Vec<i32> = revoked.iter().map(|p| p.1).collect();
                info!(partitions = ?numbers, "partitions revoked");
                self.processing.pause.revoked(&numbers);
                self.stop_workers(Some(&revoked));
                kafka::blocking(|| {
                    self.processing.durability.on_revoked(base, &numbers);
                });
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.joined.store(true, Ordering::Release);
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let assigned = partitions(tpl);
                let numbers: Vec<i32> = assigned.iter().map(|p| p.1).collect();
                info!(partitions = ?numbers, "partitions assigned");
                self.processing.pause.assigned(&numbers);
                for key in assigned {
                    self.start_worker(&consumer, key);
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _: &rdkafka::TopicPartitionList,
    ) {
        match result {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => warn!(error = %e, "offset commit failed"),
        }
    }
}
