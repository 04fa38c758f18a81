//! A redrive request (its [`Filter`] and [`Options`]), its id, and the record of a run.

use std::collections::BTreeMap;

use order_runtime::dead_letter::{self, Category};
use order_schema::Cents;
use rdkafka::error::KafkaError;
use serde::{Deserialize, Serialize};

/// Which dead letters a request takes. Every field that is set must match. The same fields
/// are the JSON of `POST /redrive` and the flags of `dlq-analyzer redrive`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// dlq.error.category: deserialization, validation, retries_exhausted or unknown
    #[arg(long)]
    pub category: Option<String>,
    /// dlq.error.kind, for example unknown_product
    #[arg(long)]
    pub kind: Option<String>,
    /// The order's product, ignoring case (dead letters that do not decode never match)
    #[arg(long)]
    pub product: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339; the dead letter's record timestamp)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Dead-lettered before this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// dlq.original.partition
    #[arg(long, allow_negative_numbers = true)]
    pub partition: Option<i32>,
    /// dlq.original.offset at least this
    #[arg(long, allow_negative_numbers = true)]
    pub from_offset: Option<i64>,
    /// dlq.original.offset at most this
    #[arg(long, allow_negative_numbers = true)]
    pub to_offset: Option<i64>,
}

/// How a request runs. Read from JSON through [`Body`], one flat object, so that an error
/// names its field (a flattened struct's errors lose the path).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(from = "Body")]
pub struct Options {
    #[serde(flatten)]
    #[command(flatten)]
    pub filter: Filter,
    /// At most this many records redriven (or parked) by this run
    #[arg(long, allow_negative_numbers = true)]
    pub limit: Option<u64>,
    /// Records per second at most (default REDRIVE_RATE)
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// List what would be resent; send nothing
    #[serde(default)]
    #[arg(long)]
    pub dry_run: bool,
    /// Send every dead letter back: a request with no filter is refused without this
    #[serde(default)]
    #[arg(long)]
    pub all: bool,
    /// The request's id; runs with the same id continue one another (default: derived from
    /// the filter)
    #[arg(long)]
    pub id: Option<String>,
}

/// The JSON of a request (`POST /redrive`): [`Options`] with its filter's fields beside the
/// others; unknown fields are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    category: Option<String>,
    kind: Option<String>,
    product: Option<String>,
    since: Option<String>,
    until: Option<String>,
    partition: Option<i32>,
    from_offset: Option<i64>,
    to_offset: Option<i64>,
    limit: Option<u64>,
    rate: Option<f64>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    all: bool,
    id: Option<String>,
}

impl From<Body> for Options {
    fn from(b: Body) -> Self {
        Options {
            filter: Filter {
                category: b.category,
                kind: b.kind,
                product: b.product,
                since: b.since,
                until: b.until,
                partition: b.partition,
                from_offset: b.from_offset,
                to_offset: b.to_offset,
            },
            limit: b.limit,
            rate: b.rate,
            dry_run: b.dry_run,
            all: b.all,
            id: b.id,
        }
    }
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
    pub(crate) fn at(step: impl Into<String>) -> impl FnOnce(RedriveError) -> RedriveError {
        let step = step.into();
        move |e| match e {
            RedriveError::Kafka(source) => RedriveError::Start { step, source },
            other => other,
        }
    }
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
