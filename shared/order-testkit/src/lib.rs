//! Helpers for integration tests against the real native stack (`make stack-up`).
//!
//! - [`Stack`]: the endpoints, from `KAFKA_BOOTSTRAP_SERVERS` / `SCHEMA_REGISTRY_URL` or the
//!   native stack's defaults, and the variables a service needs to reach them.
//! - [`unique`], [`Stack::create_topic`]: each test gets its own topics and groups.
//! - [`Stack::produce_raw`], [`Stack::read_all`]: bytes in and out of Kafka, bypassing our
//!   services, to set up inputs and check outputs independently of the code under test.
//! - [`Service`]: a service binary as a child process, stopped with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use order_runtime::CommonConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The operations credential the services of [`Stack::vars`] take.
pub const OPERATIONS_TOKEN: &str = "operations-token-of-the-tests";

/// `POST url` with the operations credential.
pub fn operation(url: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(OPERATIONS_TOKEN)
}

/// Logs from the code under test, only when `TEST_LOG` is set.
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_test_writer()
            .try_init();
    }
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Where the native stack listens.
#[derive(Debug, Clone)]
pub struct Stack {
    pub bootstrap: String,
    pub registry: String,
}

impl Stack {
    pub fn from_env() -> Self {
        Stack {
            bootstrap: std::env::var("KAFKA_BOOTSTRAP_SERVERS")
                .unwrap_or_else(|_| "127.0.0.1:9092".into()),
            registry: std::env::var("SCHEMA_REGISTRY_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".into()),
        }
    }

    /// Variables that point a service at this stack, with its own topics.
    /// A service's variables for these topics on the stack, with operations allowed by
    /// [`OPERATIONS_TOKEN`].
    pub fn vars(&self, orders: &str, dlq: &str) -> Vec<(String, String)> {
        vec![
            ("KAFKA_BOOTSTRAP_SERVERS".into(), self.bootstrap.clone()),
            ("SCHEMA_REGISTRY_URL".into(), self.registry.clone()),
            ("ORDERS_TOPIC".into(), orders.into()),
            ("DLQ_TOPIC".into(), dlq.into()),
            ("HTTP_PORT".into(), "0".into()),
            ("OPERATIONS_TOKEN".into(), OPERATIONS_TOKEN.into()),
        ]
    }

    pub fn common(&self, orders: &str, dlq: &str) -> CommonConfig {
        CommonConfig::from_vars(&self.vars(orders, dlq)).unwrap()
    }

    /// A client config for the stack's broker, to add settings to.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let res = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
            )
            .await
            .expect("create_topics");
        for r in res {
            r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))
                .unwrap();
        }
    }

    pub fn producer(&self) -> FutureProducer {
        self.client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Writes one record and waits for its acknowledgement.
    pub async fn produce_raw(
        &self,
        producer: &FutureProducer,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
        if let Some(p) = partition {
            r = r.partition(p);
        }
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = payload {
            r = r.payload(p);
        }
        let d = producer
            .send(r, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
        (d.partition, d.offset)
    }

    /// Every committed record of `topic` (read_committed, from the beginning), once the topic
    /// holds `expected` of them or `timeout` passes; never more than are there.
    pub fn read_all(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    out.push(m.detach());
                    quiet_since = Instant::now();
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {
                    // past the expected count, wait a little for any surplus (duplicates)
                    if out.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
        }
        out
    }
}

/// Header values of a record as strings.
pub fn headers_of(m: &OwnedMessage) -> BTreeMap<String, String> {
    use rdkafka::message::Headers as _;
    let mut out = BTreeMap::new();
    if let Some(h) = m.headers() {
        for x in h.iter() {
            out.insert(
                x.key.to_owned(),
                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    out
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A service binary running as a child process.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Service {
    /// Starts `bin` with `vars` (plus a free `HTTP_PORT`), logging to a temp file.
    pub fn start(bin: &str, vars: &[(String, String)]) -> Self {
        let name = Path::new(bin)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}.log", unique(&name)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into()),
            )
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HTTP_PORT", port.to_string())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        Service {
            name,
            child,
            port,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path`: status and body (`None` while the port is closed).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(self.url(path)).await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.unwrap_or_default()))
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path).await.context("service not answering")?;
        if status != 200 {
            bail!("{path} answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until `path` answers 200.
    pub async fn wait_for(&mut self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get(path).await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before {path} answered; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer {path} in {timeout:?}; output:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process's resident memory now, in bytes (`VmRSS`); `None` once it exited.
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(self, timeout: Duration) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.wait(timeout)
    }

    /// Sends SIGKILL and waits for the exit.
    pub fn kill(mut self) -> (ExitStatus, String) {
        let _ = self.child.kill();
        self.wait(Duration::from_secs(10))
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, self.output());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The JSON after `SUMMARY ` in the output (printed at exit).
    pub fn summary(output: &str) -> serde_json::Value {
        let line = output
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("SUMMARY "))
            .expect("no SUMMARY line");
        serde_json::from_str(line).unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The path of a workspace service binary, built (once per test process) with the same cargo
/// and profile that runs the tests, so a test can start services of other packages.
pub fn service_bin(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "order-generator",
                "-p",
                "order-processor",
                "-p",
                "dlq-analyzer",
            ])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build of the services failed");
    });
    // tests run from target/<profile>/deps/<test>; the binaries sit in target/<profile>/
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// The settings table under `## <section>` of `docs/configuration.md` against the code:
/// `defaults` is a settings block's `Default`, serialized (field name -> value). Every field
/// must have a row (its name upper-cased) whose default cell holds the value in backticks, or,
/// for a field unset by default, no backticked value; every row must name a field or one of
/// `read_elsewhere` (variables read by other means than the block). `Err` lists each
/// disagreement.
pub fn configuration_documented(
    section: &str,
    defaults: &serde_json::Value,
    read_elsewhere: &[&str],
) -> Result<(), String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let heading = format!("## {section}");
    let body = text
        .split("\n## ")
        .find(|part| format!("## {part}").starts_with(&heading) || part.starts_with(&heading))
        .ok_or_else(|| format!("no `{heading}` in {}", path.display()))?;
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 3 || cells[0] == "variable" || cells[0].starts_with("---") {
            continue;
        }
        for name in backticked(cells[0]) {
            rows.insert(name, cells[1].to_owned());
        }
    }
    let fields = defaults
        .as_object()
        .ok_or("the defaults are not a JSON object")?;
    let mut wrong = Vec::new();
    for (field, value) in fields {
        let name = field.to_uppercase();
        let shown = match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        match (rows.get(&name), shown) {
            (None, _) => wrong.push(format!("{name} is not documented under `{heading}`")),
            (Some(cell), Some(value)) if backticked(cell).first() != Some(&value) => wrong.push(
                format!("{name}: the code's default is `{value}`, the page says {cell:?}"),
            ),
            (Some(cell), None) if !backticked(cell).is_empty() => wrong.push(format!(
                "{name} is unset by default, the page says {cell:?}"
            )),
            _ => {}
        }
    }
    for name in rows.keys() {
        if !fields.contains_key(&name.to_lowercase()) && !read_elsewhere.contains(&name.as_str()) {
            wrong.push(format!(
                "{name} is documented under `{heading}` but the code has no such setting"
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("\n"))
    }
}

/// Each `(variable, value)` of `cases`, set alone, must be refused by `load` (a service's
/// `Config::from_vars`) with a message that names the variable.
pub fn assert_each_refused_naming_its_variable<T, E: std::fmt::Display>(
    load: impl Fn(&[(String, String)]) -> Result<T, E>,
    cases: &[(&str, &str)],
) {
    for (var, value) in cases {
        let vars = order_runtime::config::pairs(&[(var, value)]);
        match load(&vars) {
            Ok(_) => panic!("{var}={value} was accepted"),
            Err(e) => assert!(e.to_string().contains(var), "{var}={value}: {e}"),
        }
    }
}
