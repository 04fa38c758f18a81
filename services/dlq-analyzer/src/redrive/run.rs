//! One redrive run, in its steps: [`Clients::open`] makes the request's consumer and, for a
//! real run, its transactional producer (which fences an earlier run of the same request);
//! [`Clients::resume`] assigns the dead-letter partitions from where the request stopped and
//! notes their ends, which bound the run; then the [`Scan`] reads, matches
//! ([`Scan::take`]) and sends ([`Scan::send`]) in transactions that carry the request's
//! position, and [`Scan::finish`] commits what is left, or aborts after an error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_runtime::dead_letter::{self, Metadata};
use order_runtime::{CommonConfig, kafka, trace};
use order_schema::{Cents, OrderCodec};
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::filter::{Compiled, check};
use super::headers::{parked_headers, redrive_count, redriven_headers};
use super::request::{Matched, Options, RedriveError, RedriveRun, group_id, request_id};
use crate::config::RedriveSettings;

const TIMEOUT: Duration = Duration::from_secs(30);
/// A transaction commits after this many records or this long, whichever comes first.
const COMMIT_EVERY: u64 = 500;
const COMMIT_AFTER: Duration = Duration::from_secs(1);

type Transactional = ThreadedProducer<DefaultProducerContext>;

/// Runs one request to its end (or until `cancel`), updating `record` as it goes.
pub async fn run(
    common: &CommonConfig,
    settings: &RedriveSettings,
    codec: &OrderCodec,
    options: &Options,
    record: &Mutex<RedriveRun>,
    cancel: &CancellationToken,
) -> Result<(), RedriveError> {
    let filter = check(options)?;
    let group = group_id(&request_id(options));
    let clients = Clients::open(common, &group, options.dry_run).await?;
    let ends = clients.resume(&common.dlq_topic, &group).await?;
    let metadata = Arc::new(
        clients
            .consumer
            .group_metadata()
            .ok_or(KafkaError::Canceled)?,
    );
    let rate = options.rate.unwrap_or(settings.rate);
    let mut scan = Scan {
        common,
        settings,
        codec,
        options,
        filter,
        record,
        ends,
        done: BTreeSet::new(),
        next: BTreeMap::new(),
        txn: Txn::default(),
        taken: 0,
        pace: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
        due: Instant::now(),
    };
    let outcome = scan.read(&clients, &metadata, cancel).await;
    let status = scan.finish(&clients, &metadata, outcome).await?;
    update(record, |r| {
        r.status = status.to_owned();
        r.finished_at = Some(dead_letter::now_rfc3339());
    });
    if let Ok(r) = record.lock() {
        info!(id = %r.id, dry_run = r.dry_run, scanned = r.scanned, matched = r.matched, redriven = r.redriven, parked = r.parked, status = %r.status, "redrive finished");
    }
    Ok(())
}

fn update(record: &Mutex<RedriveRun>, f: impl FnOnce(&mut RedriveRun)) {
    if let Ok(mut r) = record.lock() {
        f(&mut r);
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, RedriveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RedriveError::Interrupted(e.to_string()))?
        .map_err(RedriveError::from)
}

/// The request's Kafka clients.
struct Clients {
    /// Reads the dead letters `read_committed`, as the request's own group.
    consumer: Arc<StreamConsumer>,
    /// Sends inside transactions with the request's position; none for a dry run.
    producer: Option<Arc<Transactional>>,
}

impl Clients {
    async fn open(common: &CommonConfig, group: &str, dry_run: bool) -> Result<Self, RedriveError> {
        let mut c = kafka::base(common, group);
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("allow.auto.create.topics", "false");
        let consumer = Arc::new(kafka::with_user_properties(c, common).create()?);
        if dry_run {
            return Ok(Clients {
                consumer,
                producer: None,
            });
        }
        let mut pc = kafka::producer_config(common, group, "none");
        // librdkafka wants deliveries to give up before the transaction would time out; a
        // crashed run's open transaction is fenced by the next run's producer sooner
        pc.set("transactional.id", group)
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "60000");
        let producer: Arc<Transactional> = Arc::new(pc.create()?);
        let fencing = producer.clone();
        // fences a crashed earlier run of the same request, first: its open transaction is
        // aborted, with any position it had handed over, which the broker otherwise holds back
        // from the offsets read below until the transaction times out
        blocking(move || fencing.init_transactions(TIMEOUT))
            .await
            .map_err(RedriveError::at(format!(
                "fencing an earlier run of this request (transactional id {group})"
            )))?;
        Ok(Clients {
            consumer,
            producer: Some(producer),
        })
    }

    /// Assigns `dlq`'s partitions from where the request's group last committed (the
    /// beginning the first time) and answers each partition's end now: what the topic holds
    /// when the run starts is what it takes. Dead letters that arrive meanwhile (a redriven
    /// record failing again, say) are the next run's, so no record goes round twice in one.
    async fn resume(&self, dlq: &str, group: &str) -> Result<BTreeMap<i32, i64>, RedriveError> {
        let count = {
            let (c, t) = (self.consumer.clone(), dlq.to_owned());
            blocking(move || kafka::partition_count(c.client(), &t, TIMEOUT))
                .await
                .map_err(RedriveError::at(format!("reading the partitions of {dlq}")))?
        };
        let partitions: Vec<i32> = (0..i32::try_from(count).unwrap_or(0)).collect();
        let mut start = TopicPartitionList::new();
        for p in &partitions {
            start.add_partition(dlq, *p);
        }
        let committed = {
            let c = self.consumer.clone();
            blocking(move || c.committed_offsets(start, TIMEOUT))
                .await
                .map_err(RedriveError::at(format!(
                    "reading where this request stopped in {dlq} (group {group})"
                )))?
        };
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            let entry = committed.find_partition(dlq, *p);
            // a partition's own error (its position still pending in an open transaction,
            // say) is no licence to start again from the beginning
            if let Some(Err(source)) = entry
                .as_ref()
                .map(rdkafka::topic_partition_list::TopicPartitionListElem::error)
            {
                return Err(RedriveError::Start {
                    step: format!(
                        "reading where this request stopped in {dlq} [{p}] (group {group})"
                    ),
                    source,
                });
            }
            let offset = match entry.map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            assignment.add_partition_offset(dlq, *p, offset)?;
        }
        self.consumer.assign(&assignment)?;
        let (c, t) = (self.consumer.clone(), dlq.to_owned());
        blocking(move || {
            partitions
                .iter()
                .map(|p| {
                    c.fetch_watermarks(&t, *p, TIMEOUT)
                        .map(|(_, high)| (*p, high))
                })
                .collect::<Result<BTreeMap<i32, i64>, KafkaError>>()
        })
        .await
        .map_err(RedriveError::at(format!(
            "reading the end offsets of {dlq}"
        )))
    }
}

/// The open transaction's share of the run.
#[derive(Default)]
struct Txn {
    open: bool,
    records: u64,
    started: Option<Instant>,
    /// (redriven, parked) in it, counted in the run's record once it commits.
    pending: (u64, u64),
}

/// A dead letter the run takes.
struct Taken {
    key: String,
    count: u32,
    parked: bool,
}

/// The run's progress through the topic.
struct Scan<'a> {
    common: &'a CommonConfig,
    settings: &'a RedriveSettings,
    codec: &'a OrderCodec,
    options: &'a Options,
    filter: Compiled,
    record: &'a Mutex<RedriveRun>,
    /// Each partition's end when the run started.
    ends: BTreeMap<i32, i64>,
    /// Partitions read up to that end.
    done: BTreeSet<i32>,
    /// Per partition, the offset after the last record read: the request's position.
    next: BTreeMap<i32, i64>,
    txn: Txn,
    taken: u64,
    pace: Option<Duration>,
    due: Instant,
}

impl Scan<'_> {
    /// Reads until every partition is read to its end, the limit is reached or `cancel`
    /// fires: `done` or `stopped`.
    async fn read(
        &mut self,
        clients: &Clients,
        metadata: &Arc<ConsumerGroupMetadata>,
        cancel: &CancellationToken,
    ) -> Result<&'static str, RedriveError> {
        let limit = self.options.limit.unwrap_or(u64::MAX);
        loop {
            if self.ends.keys().all(|p| self.done.contains(p)) || self.taken >= limit {
                return Ok("done");
            }
            let msg = tokio::select! {
                () = cancel.cancelled() => return Ok("stopped"),
                m = clients.consumer.recv() => m,
            };
            let m = match msg {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    self.done.insert(p);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(taken) = self.take(&m).await else {
                continue;
            };
            let Some(producer) = &clients.producer else {
                continue;
            };
            if let Some(pace) = self.pace {
                let now = Instant::now();
                if self.due > now {
                    tokio::select! {
                        () = cancel.cancelled() => return Ok("stopped"),
                        () = tokio::time::sleep(self.due - now) => {}
                    }
                }
                self.due = self.due.max(now) + pace;
            }
            self.send(producer, &m, taken).await?;
            if self.txn.records >= COMMIT_EVERY
                || self
                    .txn
                    .started
                    .is_some_and(|s| s.elapsed() >= COMMIT_AFTER)
            {
                self.commit(producer, metadata).await?;
            }
        }
    }

    /// Notes the record as read and whether the run takes it: within the run's range,
    /// matching the filter. A taken record is counted (and listed, in a dry run).
    async fn take(&mut self, m: &BorrowedMessage<'_>) -> Option<Taken> {
        let partition = m.partition();
        if self.done.contains(&partition) {
            return None;
        }
        if self
            .ends
            .get(&partition)
            .is_none_or(|end| m.offset() >= *end)
        {
            self.done.insert(partition);
            return None;
        }
        self.next.insert(partition, m.offset() + 1);
        update(self.record, |r| r.scanned += 1);
        let meta = Metadata::from_headers(m.headers());
        if !self
            .filter
            .matches_headers(&meta, m.timestamp().to_millis())
        {
            return None;
        }
        let order = match m.payload() {
            Some(_) => self.codec.decode(m.payload()).await.ok(),
            None => None,
        };
        if !self
            .filter
            .matches_product(order.as_ref().map(|o| o.product.as_str()))
        {
            return None;
        }
        self.taken += 1;
        let count = redrive_count(m.headers()) + 1;
        let parked = count > self.settings.max_count;
        let price = order
            .as_ref()
            .and_then(|o| Cents::from_dollars(o.price))
            .filter(|c| c.0 > 0);
        let key = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("")
            .to_owned();
        let dry_run = self.options.dry_run;
        update(self.record, |r| {
            r.matched += 1;
            if let Some(p) = price {
                r.value += p;
            }
            *r.by_kind
                .entry(format!("{}/{}", meta.category, meta.kind))
                .or_default() += 1;
            if dry_run && r.records.len() < 1_000 {
                r.records.push(Matched {
                    dlq_partition: partition,
                    dlq_offset: m.offset(),
                    key: key.clone(),
                    category: meta.category,
                    kind: meta.kind.clone(),
                    product: order.as_ref().map(|o| o.product.clone()),
                    price,
                    redrive_count: count,
                    parked,
                });
            }
        });
        Some(Taken { key, count, parked })
    }

    /// Sends a taken record inside the open transaction (beginning one if needed): to the
    /// orders topic, or to the parking topic once its count is past `REDRIVE_MAX_COUNT`.
    async fn send(
        &mut self,
        producer: &Transactional,
        m: &BorrowedMessage<'_>,
        taken: Taken,
    ) -> Result<(), RedriveError> {
        if !self.txn.open {
            producer.begin_transaction()?;
            self.txn.open = true;
            self.txn.started = Some(Instant::now());
        }
        let topic = if taken.parked {
            self.settings.parking_topic.as_str()
        } else {
            self.common.orders_topic.as_str()
        };
        // the send, linked to the dead letter's trace (its context is the dead letter's send)
        let span = trace::producer_span(topic, &taken.key);
        trace::link(&span, &trace::extract(m.headers()));
        let headers = if taken.parked {
            parked_headers(m.headers(), taken.count, &span)
        } else {
            trace::inject_or_carry(
                &span,
                redriven_headers(m.headers(), taken.count),
                m.headers(),
            )
        };
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if taken.parked {
            self.txn.pending.1 += 1;
        } else {
            self.txn.pending.0 += 1;
        }
        self.txn.records += 1;
        Ok(())
    }

    /// Commits the open transaction with the request's position, then counts its records.
    async fn commit(
        &mut self,
        producer: &Arc<Transactional>,
        metadata: &Arc<ConsumerGroupMetadata>,
    ) -> Result<(), RedriveError> {
        let mut offsets = TopicPartitionList::new();
        for (p, o) in &self.next {
            offsets.add_partition_offset(&self.common.dlq_topic, *p, Offset::Offset(*o))?;
        }
        let (p, md) = (producer.clone(), metadata.clone());
        blocking(move || {
            p.send_offsets_to_transaction(&offsets, &md, TIMEOUT)?;
            p.commit_transaction(TIMEOUT)
        })
        .await?;
        let Txn {
            pending: (redriven, parked),
            ..
        } = std::mem::take(&mut self.txn);
        update(self.record, |r| {
            r.redriven += redriven;
            r.parked += parked;
        });
        Ok(())
    }

    /// After the scan: what was read past the last commit is committed now (with its
    /// records), or, after an error, the open transaction is aborted. The run's status.
    async fn finish(
        &mut self,
        clients: &Clients,
        metadata: &Arc<ConsumerGroupMetadata>,
        outcome: Result<&'static str, RedriveError>,
    ) -> Result<&'static str, RedriveError> {
        let Some(producer) = &clients.producer else {
            return outcome;
        };
        match outcome {
            Ok(status) => {
                if !self.txn.open && !self.next.is_empty() {
                    producer.begin_transaction()?;
                    self.txn.open = true;
                }
                if self.txn.open {
                    self.commit(producer, metadata).await?;
                }
                Ok(status)
            }
            Err(e) => {
                if self.txn.open {
                    let p = producer.clone();
                    let _ = tokio::task::spawn_blocking(move || p.abort_transaction(TIMEOUT)).await;
                }
                Err(e)
            }
        }
    }
}
