//! Redrive: dead letters sent back to the orders topic once their cause is fixed
//! (`dlq-analyzer redrive ...` and `POST /redrive`).
//!
//! A request is a [`Filter`] plus [`Options`]. Its id (given, or derived from the filter) names
//! a consumer group of its own, `dlq-analyzer-redrive-<id>`, and a transactional producer with
//! the same id. The dead letters are read `read_committed` from where that group last committed;
//! each one that matches is produced to the orders topic, or to the parking topic once its
//! `redrive.count` has reached `REDRIVE_MAX_COUNT`, inside a transaction that also commits the
//! group's position. So a request that is stopped (or killed) and run again continues where its
//! last transaction ended, and no dead letter is resent twice by one request; a crashed run's
//! open transaction is fenced by the next run's producer and never seen by `read_committed`
//! consumers such as the processor.
//!
//! A redriven record keeps the dead letter's key and value, and its headers less the `dlq.*`
//! error metadata and the old trace context, plus `redrive.count` (one more than the dead
//! letter's). Its send is a span of its own, linked to the dead letter's trace.
//!
//! A run takes the dead letters the topic holds when it starts: one that arrives meanwhile (a
//! redriven record failing again) is left to the next run, so nothing goes round twice in one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use order_runtime::dead_letter::{self, Category, Metadata};
use order_runtime::{CommonConfig, kafka, trace};
use order_schema::{Cents, OrderCodec};
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The header that counts how often a record was redriven.
pub const REDRIVE_COUNT: &str = "redrive.count";

const TIMEOUT: Duration = Duration::from_secs(30);
/// A transaction commits after this many records or this long, whichever comes first.
const COMMIT_EVERY: u64 = 500;
const COMMIT_AFTER: Duration = Duration::from_secs(1);

/// Which dead letters a request takes. Every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// `dlq.error.category`: `deserialization`, `validation`, `retries_exhausted`, `unknown`.
    pub category: Option<String>,
    /// `dlq.error.kind`, for example `unknown_product`.
    pub kind: Option<String>,
    /// The order's product, ignoring case (dead letters that do not decode never match).
    pub product: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339; the dead letter's record timestamp).
    pub since: Option<String>,
    /// Dead-lettered before this time.
    pub until: Option<String>,
    /// `dlq.original.partition`.
    pub partition: Option<i32>,
    /// `dlq.original.offset` at least this.
    pub from_offset: Option<i64>,
    /// `dlq.original.offset` at most this.
    pub to_offset: Option<i64>,
}

/// How a request runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    #[serde(flatten)]
    pub filter: Filter,
    /// At most this many records redriven (or parked) by this run.
    pub limit: Option<u64>,
    /// Records per second at most (default `REDRIVE_RATE`).
    pub rate: Option<f64>,
    /// List what would be resent, send nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// The request's id; runs with the same id continue one another. Default: derived from
    /// the filter.
    pub id: Option<String>,
}

/// Settings of the analyzer that redrives use (SPEC "Environment").
#[derive(Debug, Clone)]
pub struct RedriveSettings {
    /// `REDRIVE_MAX_COUNT`: a dead letter already redriven this often is parked instead.
    pub max_count: u32,
    /// `DLQ_PARKING_TOPIC`.
    pub parking_topic: String,
    /// `REDRIVE_RATE`: records per second when a request names none (0: no limit).
    pub rate: f64,
}

/// A record a run matched (dry runs list them).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Matched {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub key: String,
    pub category: Category,
    pub kind: String,
    pub product: Option<String>,
    pub price: Option<Cents>,
    /// `redrive.count` the record would carry.
    pub redrive_count: u32,
    /// Sent to the parking topic instead (the count reached `REDRIVE_MAX_COUNT`).
    pub parked: bool,
}

/// What a run did, for the report and the command's output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RedriveRun {
    pub id: String,
    pub dry_run: bool,
    pub filter: Filter,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// `running`, `done`, `stopped` or `failed: <why>`.
    pub status: String,
    /// Dead letters read.
    pub scanned: u64,
    /// Of those, matching the filter (and within the limit).
    pub matched: u64,
    /// Sent to the orders topic (committed).
    pub redriven: u64,
    /// Sent to the parking topic (committed).
    pub parked: u64,
    /// Sum of the matched orders' prices, where they decode.
    pub value: Cents,
    pub by_kind: BTreeMap<String, u64>,
    /// Dry runs: the records, up to the first 1,000.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Matched>,
}

/// Why a request could not run.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("a blocking Kafka call did not finish: {0}")]
    Interrupted(String),
    /// A step of the run's start, named, with Kafka's error.
    #[error("{step}: {source}")]
    Start {
        step: String,
        #[source]
        source: KafkaError,
    },
}

impl RedriveError {
    fn at(step: impl Into<String>) -> impl FnOnce(RedriveError) -> RedriveError {
        let step = step.into();
        move |e| match e {
            RedriveError::Kafka(source) => RedriveError::Start { step, source },
            other => other,
        }
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

/// The consumer group, and the transactional id, of request `id`'s runs.
pub fn group_id(id: &str) -> String {
    format!("dlq-analyzer-redrive-{id}")
}

/// The request's id: the one given, or a stable name for the filter (FNV-1a of its JSON).
pub fn request_id(options: &Options) -> String {
    if let Some(id) = options.id.as_ref().filter(|i| !i.trim().is_empty()) {
        return id.trim().to_owned();
    }
    let text = serde_json::to_string(&options.filter).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn millis(text: &str, what: &str) -> Result<i64, RedriveError> {
    dead_letter::rfc3339_millis(text).map_err(|e| RedriveError::BadRequest(format!("{what}: {e}")))
}

/// A [`Filter`] checked and ready to apply.
struct Compiled {
    filter: Filter,
    category: Option<Category>,
    since: Option<i64>,
    until: Option<i64>,
}

impl Compiled {
    fn new(filter: &Filter) -> Result<Self, RedriveError> {
        let category = match filter.category.as_deref() {
            None => None,
            Some(c) => match Category::ALL.into_iter().find(|k| k.as_str() == c) {
                Some(k) => Some(k),
                None => {
                    return Err(RedriveError::BadRequest(format!(
                        "category {c:?} is none of deserialization, validation, retries_exhausted, unknown"
                    )));
                }
            },
        };
        Ok(Compiled {
            filter: filter.clone(),
            category,
            since: filter
                .since
                .as_deref()
                .map(|t| millis(t, "since"))
                .transpose()?,
            until: filter
                .until
                .as_deref()
                .map(|t| millis(t, "until"))
                .transpose()?,
        })
    }

    /// Whether the dead letter matches everything but the product.
    fn matches_headers(&self, meta: &Metadata, timestamp: Option<i64>) -> bool {
        let f = &self.filter;
        self.category.is_none_or(|c| c == meta.category)
            && f.kind.as_deref().is_none_or(|k| k == meta.kind)
            && f.partition.is_none_or(|p| p == meta.original_partition)
            && f.from_offset.is_none_or(|o| meta.original_offset >= o)
            && f.to_offset.is_none_or(|o| meta.original_offset <= o)
            && self.since.is_none_or(|s| timestamp.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| timestamp.is_some_and(|t| t < u))
    }

    fn matches_product(&self, product: Option<&str>) -> bool {
        self.filter
            .product
            .as_deref()
            .is_none_or(|want| product.is_some_and(|p| p.eq_ignore_ascii_case(want)))
    }
}

/// The redriven record's headers: the dead letter's less `dlq.*`, trace context and the old
/// count, plus the new count.
fn redriven_headers(dead: Option<&impl Headers>, count: u32) -> OwnedHeaders {
    let count = count.to_string();
    dead_letter::carried_headers(dead, &[REDRIVE_COUNT], 4).insert(Header {
        key: REDRIVE_COUNT,
        value: Some(count.as_bytes()),
    })
}

/// The dead letter's `redrive.count` (0 when it has none).
fn redrive_count(headers: Option<&impl Headers>) -> u32 {
    headers
        .and_then(|h| h.iter().find(|x| x.key == REDRIVE_COUNT))
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs one request to its end (or until `cancel`), updating `run` as it goes.
pub async fn run(
    common: &CommonConfig,
    settings: &RedriveSettings,
    codec: &OrderCodec,
    options: &Options,
    run: &std::sync::Mutex<RedriveRun>,
    cancel: &CancellationToken,
) -> Result<(), RedriveError> {
    let filter = Compiled::new(&options.filter)?;
    if let Some(r) = options.rate
        && !(r.is_finite() && r >= 0.0)
    {
        return Err(RedriveError::BadRequest(format!(
            "rate {r} is not a number of records per second"
        )));
    }
    let id = request_id(options);
    let group = group_id(&id);
    let update = |f: &mut dyn FnMut(&mut RedriveRun)| {
        if let Ok(mut r) = run.lock() {
            f(&mut r);
        }
    };

    let mut c = kafka::base(common, &group);
    c.set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("allow.auto.create.topics", "false");
    let consumer: Arc<StreamConsumer> = Arc::new(kafka::with_user_properties(c, common).create()?);
    let dlq = &common.dlq_topic;
    let producer: Option<Arc<ThreadedProducer<DefaultProducerContext>>> = if options.dry_run {
        None
    } else {
        let mut pc = kafka::producer_config(common, &group, "none");
        // librdkafka wants deliveries to give up before the transaction would time out; a
        // crashed run's open transaction is fenced by the next run's producer sooner
        pc.set("transactional.id", &group)
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "60000");
        let p: ThreadedProducer<DefaultProducerContext> = pc.create()?;
        let p = Arc::new(p);
        let q = p.clone();
        // fences a crashed earlier run of the same request, first: its open transaction is
        // aborted, with any position it had handed over, which the broker otherwise holds back
        // from the offsets read below until the transaction times out
        blocking(move || q.init_transactions(TIMEOUT))
            .await
            .map_err(RedriveError::at(format!(
                "fencing an earlier run of this request (transactional id {group})"
            )))?;
        Some(p)
    };
    let partitions = {
        let c = consumer.clone();
        let t = dlq.clone();
        blocking(move || kafka::partition_count(c.client(), &t, TIMEOUT))
            .await
            .map_err(RedriveError::at(format!("reading the partitions of {dlq}")))?
    };
    let partitions: Vec<i32> = (0..i32::try_from(partitions).unwrap_or(0)).collect();
    // where this request stopped last time (the beginning the first time)
    let mut start = TopicPartitionList::new();
    for p in &partitions {
        start.add_partition(dlq, *p);
    }
    let committed = {
        let (c, s) = (consumer.clone(), start.clone());
        blocking(move || c.committed_offsets(s, TIMEOUT))
            .await
            .map_err(RedriveError::at(format!(
                "reading where this request stopped in {dlq} (group {group})"
            )))?
    };
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let entry = committed.find_partition(dlq, *p);
        // a partition's own error (its position still pending in an open transaction, say)
        // is no licence to start again from the beginning
        if let Some(Err(source)) = entry
            .as_ref()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::error)
        {
            return Err(RedriveError::Start {
                step: format!("reading where this request stopped in {dlq} [{p}] (group {group})"),
                source,
            });
        }
        let offset = match entry.map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        assignment.add_partition_offset(dlq, *p, offset)?;
    }
    consumer.assign(&assignment)?;
    // what the topic holds now is what this run takes: dead letters that arrive meanwhile
    // (a redriven record failing again, say) are the next run's, so no record goes round twice
    // in one run
    let ends = {
        let (c, t, ps) = (consumer.clone(), dlq.clone(), partitions.clone());
        blocking(move || {
            ps.iter()
                .map(|p| {
                    c.fetch_watermarks(&t, *p, TIMEOUT)
                        .map(|(_, high)| (*p, high))
                })
                .collect::<Result<BTreeMap<i32, i64>, KafkaError>>()
        })
        .await
        .map_err(RedriveError::at(format!(
            "reading the end offsets of {dlq}"
        )))?
    };

    let metadata = consumer.group_metadata();

    let rate = options.rate.unwrap_or(settings.rate);
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let mut due = Instant::now();
    // partitions read up to their end at the start (or to their end, if sooner)
    let mut done: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
    // per DLQ partition: the offset after the last record read, for the transaction's commit
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut in_txn = false;
    let mut since_commit = 0u64;
    let mut txn_started = Instant::now();
    let mut pending = (0u64, 0u64); // (redriven, parked) in the open transaction
    let limit = options.limit.unwrap_or(u64::MAX);
    let mut taken = 0u64;

    let metadata = Arc::new(metadata.ok_or(KafkaError::Canceled)?);
    let commit = |next: &BTreeMap<i32, i64>| -> Result<TopicPartitionList, KafkaError> {
        let mut offsets = TopicPartitionList::new();
        for (p, o) in next {
            offsets.add_partition_offset(dlq, *p, Offset::Offset(*o))?;
        }
        Ok(offsets)
    };

    let outcome: Result<&'static str, RedriveError> = loop {
        if partitions.iter().all(|p| done.contains(p)) || taken >= limit {
            break Ok("done");
        }
        let msg = tokio::select! {
            () = cancel.cancelled() => break Ok("stopped"),
            m = consumer.recv() => m,
        };
        let m: BorrowedMessage<'_> = match msg {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(p)) => {
                done.insert(p);
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        if done.contains(&m.partition()) {
            continue;
        }
        if ends
            .get(&m.partition())
            .is_none_or(|end| m.offset() >= *end)
        {
            done.insert(m.partition());
            continue;
        }
        next.insert(m.partition(), m.offset() + 1);
        update(&mut |r| r.scanned += 1);
        let meta = Metadata::from_headers(m.headers());
        if !filter.matches_headers(&meta, m.timestamp().to_millis()) {
            continue;
        }
        let order = match m.payload() {
            Some(_) => codec.decode(m.payload()).await.ok(),
            None => None,
        };
        if !filter.matches_product(order.as_ref().map(|o| o.product.as_str())) {
            continue;
        }
        taken += 1;
        let count = redrive_count(m.headers()) + 1;
        let parked = count > settings.max_count;
        let price = order
            .as_ref()
            .and_then(|o| Cents::from_dollars(o.price))
            .filter(|c| c.0 > 0);
        let key = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("")
            .to_owned();
        update(&mut |r| {
            r.matched += 1;
            if let Some(p) = price {
                r.value += p;
            }
            *r.by_kind
                .entry(format!("{}/{}", meta.category, meta.kind))
                .or_default() += 1;
            if options.dry_run && r.records.len() < 1_000 {
                r.records.push(Matched {
                    dlq_partition: m.partition(),
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
        let Some(producer) = &producer else {
            continue;
        };
        if let Some(pace) = pace {
            let now = Instant::now();
            if due > now {
                tokio::select! {
                    () = cancel.cancelled() => break Ok("stopped"),
                    () = tokio::time::sleep(due - now) => {}
                }
            }
            due = due.max(now) + pace;
        }
        if !in_txn {
            producer.begin_transaction()?;
            in_txn = true;
            txn_started = Instant::now();
        }
        let topic = if parked {
            settings.parking_topic.as_str()
        } else {
            common.orders_topic.as_str()
        };
        // the send, linked to the dead letter's trace (its context is the dead letter's send)
        let span = trace::producer_span(topic, &key);
        trace::link(&span, &trace::extract(m.headers()));
        let headers = if parked {
            // parked as it was, so that what failed stays readable (the trace context becomes
            // the park's send when there is one)
            let mut h = OwnedHeaders::new_with_capacity(m.headers().map_or(0, Headers::count) + 4);
            for header in m.headers().into_iter().flat_map(Headers::iter) {
                if span.is_none() || !trace::PROPAGATION_HEADERS.contains(&header.key) {
                    h = h.insert(header);
                }
            }
            let c = count.to_string();
            h = h.insert(Header {
                key: "redrive.parked.count",
                value: Some(c.as_bytes()),
            });
            trace::inject_or_carry(&span, h, None::<&OwnedHeaders>)
        } else {
            trace::inject_or_carry(&span, redriven_headers(m.headers(), count), m.headers())
        };
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        let sent = loop {
            match producer.send(record) {
                Ok(()) => break Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => break Err(e),
            }
        };
        drop(span);
        if let Err(e) = sent {
            break Err(e.into());
        }
        if parked {
            pending.1 += 1;
        } else {
            pending.0 += 1;
        }
        since_commit += 1;
        if since_commit >= COMMIT_EVERY || txn_started.elapsed() >= COMMIT_AFTER {
            commit_txn(producer, commit(&next)?, &metadata).await?;
            in_txn = false;
            since_commit = 0;
            let (redriven, parked) = std::mem::take(&mut pending);
            update(&mut |r| {
                r.redriven += redriven;
                r.parked += parked;
            });
        }
    };
    // what was read past the last commit: committed now, with its records
    if let Some(producer) = &producer {
        let finish = match &outcome {
            Ok(_) => {
                if !in_txn && !next.is_empty() {
                    producer.begin_transaction()?;
                    in_txn = true;
                }
                if in_txn {
                    commit_txn(producer, commit(&next)?, &metadata).await
                } else {
                    Ok(())
                }
            }
            Err(_) => {
                if in_txn {
                    let p = producer.clone();
                    let _ = tokio::task::spawn_blocking(move || p.abort_transaction(TIMEOUT)).await;
                }
                Ok(())
            }
        };
        finish?;
        if outcome.is_ok() {
            let (redriven, parked) = pending;
            update(&mut |r| {
                r.redriven += redriven;
                r.parked += parked;
            });
        }
    }
    let status = outcome?;
    update(&mut |r| {
        r.status = status.to_owned();
        r.finished_at = Some(dead_letter::now_rfc3339());
    });
    if let Ok(r) = run.lock() {
        info!(id = %r.id, dry_run = r.dry_run, scanned = r.scanned, matched = r.matched, redriven = r.redriven, parked = r.parked, status = %r.status, "redrive finished");
    }
    Ok(())
}

/// Commits the open transaction with the request's position. Blocking calls, off the async
/// threads.
async fn commit_txn(
    producer: &Arc<ThreadedProducer<DefaultProducerContext>>,
    offsets: TopicPartitionList,
    metadata: &Arc<ConsumerGroupMetadata>,
) -> Result<(), RedriveError> {
    let (p, md) = (producer.clone(), metadata.clone());
    blocking(move || {
        p.send_offsets_to_transaction(&offsets, &md, TIMEOUT)?;
        p.commit_transaction(TIMEOUT)
    })
    .await
}

/// A new run's record.
pub fn new_run(options: &Options) -> RedriveRun {
    RedriveRun {
        id: request_id(options),
        dry_run: options.dry_run,
        filter: options.filter.clone(),
        started_at: dead_letter::now_rfc3339(),
        finished_at: None,
        status: "running".to_owned(),
        scanned: 0,
        matched: 0,
        redriven: 0,
        parked: 0,
        value: Cents(0),
        by_kind: BTreeMap::new(),
        records: Vec::new(),
    }
}

/// What a run did, for a person (the command prints it before `REDRIVE <json>`).
pub fn summary_text(r: &RedriveRun) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let what = if r.dry_run {
        "redrive dry run"
    } else {
        "redrive"
    };
    let _ = writeln!(s, "{what} {} ({})", r.id, r.status);
    let _ = writeln!(s, "  scanned    {}", r.scanned);
    let _ = writeln!(s, "  matched    {} (value {})", r.matched, r.value);
    if !r.dry_run {
        let _ = writeln!(s, "  redriven   {}", r.redriven);
        let _ = writeln!(s, "  parked     {}", r.parked);
    }
    for (kind, n) in &r.by_kind {
        let _ = writeln!(s, "    {kind:<40} {n}");
    }
    for m in &r.records {
        let _ = writeln!(
            s,
            "  {}:{} key {} {}/{} {} {}{}",
            m.dlq_partition,
            m.dlq_offset,
            m.key,
            m.category,
            m.kind,
            m.product.as_deref().unwrap_or("-"),
            m.price.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            if m.parked { " (would be parked)" } else { "" }
        );
    }
    s.trim_end().to_owned()
}

/// The command-line flags of `dlq-analyzer redrive`.
pub const USAGE: &str = "usage: dlq-analyzer redrive [--dry-run] [--category C] [--kind K] [--product P] \
[--since TIME] [--until TIME] [--partition N] [--from-offset N] [--to-offset N] [--limit N] \
[--rate PER_SECOND] [--id ID]";

/// Parses the flags of `dlq-analyzer redrive`.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--dry-run" {
            o.dry_run = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?
            .clone();
        let number = |v: &str| -> Result<i64, String> {
            v.parse()
                .map_err(|_| format!("{flag} {v:?} is not a number"))
        };
        let f = &mut o.filter;
        match flag.as_str() {
            "--category" => f.category = Some(value),
            "--kind" => f.kind = Some(value),
            "--product" => f.product = Some(value),
            "--since" => f.since = Some(value),
            "--until" => f.until = Some(value),
            "--partition" => {
                f.partition = Some(i32::try_from(number(&value)?).map_err(|e| e.to_string())?)
            }
            "--from-offset" => f.from_offset = Some(number(&value)?),
            "--to-offset" => f.to_offset = Some(number(&value)?),
            "--limit" => o.limit = Some(u64::try_from(number(&value)?).map_err(|e| e.to_string())?),
            "--rate" => {
                o.rate = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--rate {value:?} is not a number"))?,
                );
            }
            "--id" => o.id = Some(value),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// `dlq-analyzer redrive ...`: runs one request with the analyzer's environment, prints what
/// it did (JSON), exits 0 when it ran to the end.
pub async fn command(args: &[String]) -> std::process::ExitCode {
    use std::process::ExitCode;
    let options = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let vars = order_runtime::config::process_env();
    let config = match crate::Config::from_vars(&vars) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let codec = match OrderCodec::with_access(&config.common.registry, &config.common.orders_topic)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let record = std::sync::Mutex::new(new_run(&options));
    let cancel = order_runtime::shutdown::on_signal();
    let result = run(
        &config.common,
        &config.redrive(),
        &codec,
        &options,
        &record,
        &cancel,
    )
    .await;
    let done = record
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    println!("{}", summary_text(&done));
    println!(
        "REDRIVE {}",
        serde_json::to_string(&done).unwrap_or_default()
    );
    match result {
        Ok(()) if done.status == "done" => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("redrive failed: {e}");
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
    fn flags_become_a_request_and_its_id_follows_the_filter() {
        let o = parse_args(&args(&[
            "--kind",
            "unknown_product",
            "--limit",
            "10",
            "--dry-run",
        ]))
        .unwrap();
        assert_eq!(o.filter.kind.as_deref(), Some("unknown_product"));
        assert_eq!(o.limit, Some(10));
        assert!(o.dry_run);
        let same = parse_args(&args(&["--kind", "unknown_product"])).unwrap();
        assert_eq!(
            request_id(&o),
            request_id(&same),
            "limit and dry run do not change the request"
        );
        let other = parse_args(&args(&["--kind", "too_short"])).unwrap();
        assert_ne!(request_id(&o), request_id(&other));
        assert!(parse_args(&args(&["--limit"])).is_err());
        assert!(parse_args(&args(&["--colour", "red"])).is_err());
    }

    #[test]
    fn filters_check_headers_and_product() {
        let f = Compiled::new(&Filter {
            category: Some("validation".into()),
            partition: Some(2),
            from_offset: Some(10),
            to_offset: Some(20),
            product: Some("Drone".into()),
            ..Filter::default()
        })
        .unwrap();
        let mut meta = Metadata::from_headers::<OwnedHeaders>(None);
        meta.category = Category::Validation;
        meta.original_partition = 2;
        meta.original_offset = 15;
        assert!(f.matches_headers(&meta, None));
        assert!(f.matches_product(Some("drone")));
        assert!(
            !f.matches_product(None),
            "a dead letter that does not decode has no product"
        );
        meta.original_offset = 21;
        assert!(!f.matches_headers(&meta, None));
        assert!(
            Compiled::new(&Filter {
                category: Some("nope".into()),
                ..Filter::default()
            })
            .is_err()
        );
    }

    #[test]
    fn a_redriven_record_loses_the_error_headers_and_counts_one_more() {
        let dead = OwnedHeaders::new()
            .insert(Header {
                key: "tenant",
                value: Some("acme".as_bytes()),
            })
            .insert(Header {
                key: "dlq.error.kind",
                value: Some("unknown_product".as_bytes()),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-aa-bb-01".as_bytes()),
            })
            .insert(Header {
                key: REDRIVE_COUNT,
                value: Some("2".as_bytes()),
            });
        assert_eq!(redrive_count(Some(&dead)), 2);
        let out = redriven_headers(Some(&dead), 3);
        let keys: Vec<(&str, Option<&[u8]>)> = out.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            keys,
            [
                ("tenant", Some("acme".as_bytes())),
                (REDRIVE_COUNT, Some("3".as_bytes()))
            ]
        );
    }
}
