//! A workload with a known ground truth for the exactly-once tests, and replicas to run it.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use order_schema::{Order, OrderCodec, PRODUCTS};
use order_testkit::{Service, Stack, headers_of, unique};
use rand::Rng;
use rdkafka::producer::FutureRecord;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_order-processor");

/// Records to send and what they must add up to.
pub struct Workload {
    pub orders: String,
    pub dlq: String,
    pub group: String,
    records: Vec<(Vec<u8>, Option<Vec<u8>>, bool)>,
    /// The valid orders that are processed (not those whose failures outlive their retries).
    pub valid_cents: Vec<i64>,
    pub validation: u64,
    pub deserialization: u64,
    /// Valid orders whose seeded failures outlive their retries: dead-lettered as
    /// `retries_exhausted`.
    pub exhausted: u64,
    /// Seeded temporary failures, when the workload has them.
    pub failures: Option<Seeded>,
}

/// Temporary failures by `TRANSIENT_FAILURE_SEED`, and the retries they get.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub seed: String,
    pub rate: f64,
    pub max_retries: u32,
    pub initial_backoff_ms: u64,
}

/// FNV-1a, 64 bits, then MurmurHash3's `fmix64`: the test's own, for the rule
/// docs/processing.md gives.
fn draw(text: &str) -> u64 {
    let mut h = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    for (shift, factor) in [(33, 0xff51_afd7_ed55_8ccd_u64), (33, 0xc4ce_b9fe_1a85_ec53)] {
        h = (h ^ (h >> shift)).wrapping_mul(factor);
    }
    h ^ (h >> 33)
}

impl Seeded {
    /// Whether attempt `n` of order `id` fails, by the documented rule.
    pub fn fails(&self, id: &str, n: u32) -> bool {
        #[allow(clippy::cast_precision_loss)]
        let drawn = draw(&format!("{}:{id}:{n}", self.seed)) as f64;
        drawn < self.rate * 2f64.powi(64)
    }

    /// Whether every attempt of order `id` fails: its retries run out.
    pub fn exhausts(&self, id: &str) -> bool {
        (1..=self.max_retries + 1).all(|n| self.fails(id, n))
    }
}

impl Workload {
    /// `n` records on a 6-partition topic: about 95 % valid orders, 3 % invalid ones, 2 %
    /// garbage.
    pub async fn new(stack: &Stack, n: usize) -> Self {
        Self::build(stack, n, None).await
    }

    /// The same mix with seeded temporary failures: the orders whose failures outlive their
    /// retries are known from the seed alone.
    pub async fn with_failures(stack: &Stack, n: usize, failures: Seeded) -> Self {
        Self::build(stack, n, Some(failures)).await
    }

    async fn build(stack: &Stack, n: usize, failures: Option<Seeded>) -> Self {
        let (orders, dlq, group) = (
            unique("eos-orders"),
            unique("eos-dlq"),
            unique("eos-processor"),
        );
        stack.create_topic(&orders, 6).await;
        stack.create_topic(&dlq, 3).await;
        let codec = OrderCodec::new(&stack.registry, &orders).unwrap();
        let mut rng = rand::rng();
        let mut w = Workload {
            orders,
            dlq,
            group,
            records: Vec::with_capacity(n),
            valid_cents: Vec::new(),
            validation: 0,
            deserialization: 0,
            exhausted: 0,
            failures,
        };
        for i in 0..n {
            let mut id = uuid::Uuid::new_v4().to_string();
            // at 10 % a valid order outlives its 3 retries once in 10,000: about two in 20,000,
            // and none at all in one workload of seven. One valid order in a thousand gets an id
            // drawn until the seed makes it exhaust, so that retries_exhausted is always tried.
            if i % 1_000 == 999
                && let Some(f) = &w.failures
            {
                let mut draws = 0;
                while !f.exhausts(&id) {
                    draws += 1;
                    assert!(
                        draws < 10_000_000,
                        "no id exhausts its retries at rate {}",
                        f.rate
                    );
                    id = uuid::Uuid::new_v4().to_string();
                }
            }
            let key = id.clone().into_bytes();
            match i % 100 {
                0 => {
                    w.records
                        .push((key, Some(b"not avro at all".to_vec()), true));
                    w.deserialization += 1;
                }
                50 => {
                    w.records.push((key, Some(vec![0, 0, 0]), true));
                    w.deserialization += 1;
                }
                1 | 34 | 67 => {
                    let o = Order {
                        order_id: id,
                        product: "unicorn".into(),
                        price: 12.5,
                    };
                    w.records
                        .push((key, Some(codec.encode(&o).await.unwrap()), true));
                    w.validation += 1;
                }
                _ => {
                    let cents = rng.random_range(1_000..=100_000i64);
                    let exhausts = w.failures.as_ref().is_some_and(|f| f.exhausts(&id));
                    #[allow(clippy::cast_precision_loss)]
                    let o = Order {
                        order_id: id,
                        product: PRODUCTS[rng.random_range(0..PRODUCTS.len())].into(),
                        price: cents as f64 / 100.0,
                    };
                    w.records
                        .push((key, Some(codec.encode(&o).await.unwrap()), exhausts));
                    if exhausts {
                        w.exhausted += 1;
                    } else {
                        w.valid_cents.push(cents);
                    }
                }
            }
        }
        w
    }

    pub fn total(&self) -> u64 {
        self.records.len() as u64
    }

    pub fn dead(&self) -> u64 {
        self.validation + self.deserialization + self.exhausted
    }

    /// Sends every record, `per_second` at most, and returns where each failing one landed.
    pub async fn feed(&self, stack: &Stack, per_second: usize) -> BTreeSet<(i32, i64)> {
        self.feed_part(stack, 0..self.records.len(), per_second)
            .await
    }

    /// Sends the records in `range` (in the order they were made), `per_second` at most, and
    /// returns where each failing one landed.
    pub async fn feed_part(
        &self,
        stack: &Stack,
        range: std::ops::Range<usize>,
        per_second: usize,
    ) -> BTreeSet<(i32, i64)> {
        let producer = stack.producer();
        let mut failing = BTreeSet::new();
        for chunk in self.records[range].chunks(per_second / 10) {
            let started = std::time::Instant::now();
            let mut pending = Vec::with_capacity(chunk.len());
            for (key, value, fails) in chunk {
                let mut r: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.orders).key(key.as_slice());
                if let Some(v) = value {
                    r = r.payload(v.as_slice());
                }
                pending.push((producer.send(r, Duration::from_secs(300)), *fails));
            }
            for (delivery, fails) in pending {
                let d = delivery.await.map_err(|(e, _)| e).expect("order delivered");
                if fails {
                    failing.insert((d.partition, d.offset));
                }
            }
            if let Some(rest) = Duration::from_millis(100).checked_sub(started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        failing
    }

    /// The environment of one replica.
    pub fn replica_vars(&self, stack: &Stack) -> Vec<(String, String)> {
        let mut v = stack.vars(&self.orders, &self.dlq);
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        v.extend(pairs(&[
            ("CONSUMER_GROUP", self.group.as_str()),
            ("PROCESSING_GUARANTEE", "exactly_once"),
            ("TRANSACTION_TIMEOUT_MS", "5000"),
            ("RUST_LOG", "warn,order_processor=info"),
        ]));
        match &self.failures {
            None => v.extend(pairs(&[
                ("TRANSIENT_FAILURE_RATE", "0.02"),
                ("MAX_RETRIES", "10"),
                ("RETRY_INITIAL_BACKOFF_MS", "1"),
                ("RETRY_BACKOFF_MULTIPLIER", "1.5"),
            ])),
            Some(f) => v.extend(pairs(&[
                ("TRANSIENT_FAILURE_SEED", &f.seed),
                ("TRANSIENT_FAILURE_RATE", &f.rate.to_string()),
                ("MAX_RETRIES", &f.max_retries.to_string()),
                (
                    "RETRY_INITIAL_BACKOFF_MS",
                    &f.initial_backoff_ms.to_string(),
                ),
                ("RETRY_BACKOFF_MULTIPLIER", "2"),
            ])),
        }
        v
    }

    pub async fn replica(&self, stack: &Stack) -> Service {
        let mut s = Service::start(BIN, &self.replica_vars(stack));
        s.wait_for("/healthz", Duration::from_secs(30)).await;
        s
    }

    /// Waits until the group's committed totals cover every record, then checks them against
    /// the ground truth and the dead-letter topic against the failing records.
    pub async fn assert_exact(
        &self,
        stack: &Stack,
        any_replica: &Service,
        failing: &BTreeSet<(i32, i64)>,
        timeout: Duration,
    ) {
        self.assert_totals_exact(stack, any_replica, timeout).await;
        let letters = stack.read_all(&self.dlq, failing.len(), Duration::from_secs(60));
        let mut seen = BTreeSet::new();
        for m in &letters {
            let h = headers_of(m);
            let at = (
                h["dlq.original.partition"].parse().unwrap(),
                h["dlq.original.offset"].parse().unwrap(),
            );
            assert!(seen.insert(at), "dead letter for {at:?} twice");
        }
        assert_eq!(
            &seen, failing,
            "the dead-letter topic holds exactly the failing records"
        );
    }

    /// Waits until the group's committed totals cover every record, then checks them against
    /// the ground truth.
    pub async fn assert_totals_exact(
        &self,
        stack: &Stack,
        any_replica: &Service,
        timeout: Duration,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        let global = loop {
            let g = any_replica.get_json("/stats/global").await;
            if let Ok(g) = &g {
                let done =
                    g["processed"].as_u64().unwrap_or(0) + g["dead_lettered"].as_u64().unwrap_or(0);
                if done >= self.total() {
                    break g.clone();
                }
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "the group's committed totals did not cover all {} records in {timeout:?}; last /stats/global: {g:?}\n{}",
                    self.total(),
                    self.diagnose(stack)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let sum: i64 = self.valid_cents.iter().sum();
        assert_eq!(
            global["processed"].as_u64(),
            Some(self.valid_cents.len() as u64),
            "{global}"
        );
        #[allow(clippy::cast_precision_loss)]
        {
            assert_eq!(
                global["revenue"].as_f64(),
                Some(sum as f64 / 100.0),
                "revenue to the cent"
            );
            assert_eq!(
                global["min"].as_f64(),
                Some(*self.valid_cents.iter().min().unwrap() as f64 / 100.0)
            );
            assert_eq!(
                global["max"].as_f64(),
                Some(*self.valid_cents.iter().max().unwrap() as f64 / 100.0)
            );
        }
        assert_eq!(
            global["dead_lettered"].as_u64(),
            Some(self.dead()),
            "{global}"
        );
        assert_eq!(
            global["dead_lettered_by_category"]["validation"].as_u64(),
            Some(self.validation)
        );
        assert_eq!(
            global["dead_lettered_by_category"]["deserialization"].as_u64(),
            Some(self.deserialization)
        );
        assert_eq!(
            global["dead_lettered_by_category"]["retries_exhausted"]
                .as_u64()
                .unwrap_or(0),
            self.exhausted,
            "the orders the seed says outlive their retries, and only those: {global}"
        );
        assert_eq!(
            global["partitions"].as_array().map(Vec::len),
            Some(6),
            "{global}"
        );
    }
}

impl Workload {
    /// Per partition: the end of the orders topic and the latest committed changelog state.
    pub fn diagnose(&self, stack: &Stack) -> String {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &stack.bootstrap)
            .set("group.id", unique("diagnose"))
            .create()
            .unwrap();
        let changelog = format!("{}-aggregates-changelog", self.group);
        let records = stack.read_all(&changelog, 1, Duration::from_secs(10));
        let mut last: std::collections::BTreeMap<i32, Value> = std::collections::BTreeMap::new();
        for m in &records {
            if let Some(v) = m.payload() {
                last.insert(
                    m.partition(),
                    serde_json::from_slice(v).unwrap_or(Value::Null),
                );
            }
        }
        let mut out =
            String::from("partition: orders end offset | committed next_offset, processed, dead\n");
        for p in 0..6 {
            let (_, hw) = consumer
                .fetch_watermarks(&self.orders, p, Duration::from_secs(5))
                .unwrap_or((-1, -1));
            let s = last.get(&p).cloned().unwrap_or(Value::Null);
            out += &format!(
                "  {p}: {hw} | {} {} {}\n",
                s["next_offset"], s["total"]["count"], s["dead_lettered"]
            );
        }
        out
    }
}

/// The processor's own per-replica view.
pub async fn stats(s: &Service) -> Option<Value> {
    s.get_json("/stats").await.ok()
}

/// The processed count of the group's committed totals.
pub async fn committed(s: &Service) -> u64 {
    s.get_json("/stats/global")
        .await
        .ok()
        .and_then(|g| g["processed"].as_u64())
        .unwrap_or(0)
}

/// The partitions this replica holds (`/stats`).
pub async fn owned_partitions(s: &Service) -> Option<BTreeSet<i64>> {
    let stats = s.get_json("/stats").await.ok()?;
    stats["partitions"]
        .as_array()?
        .iter()
        .map(serde_json::Value::as_i64)
        .collect()
}

/// The partitions with a `messaging_kafka_consumer_lag` series in this replica's `/metrics`.
pub async fn lag_series(s: &Service) -> Option<BTreeSet<i64>> {
    let (_, metrics) = s.get("/metrics").await?;
    metrics
        .lines()
        .filter(|l| l.starts_with("messaging_kafka_consumer_lag{"))
        .map(|l| {
            let (_, rest) = l.split_once("partition=\"")?;
            rest.split('"').next()?.parse().ok()
        })
        .collect()
}
