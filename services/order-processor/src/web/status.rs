//! The status page: `GET /` is one self-contained page (HTML, CSS and script compiled into the
//! binary, nothing loaded from elsewhere) that polls `GET /status.json` every 2 s while it is
//! open, and draws the throughput of the last five minutes from the history the processor
//! keeps, so that a page opened now shows it at once.
//!
//! The processor serves it because the group's totals, the per-partition lag and retries are
//! its own: they come from the exactly-once changelog, which any replica reads (so the page
//! behind a Service that balances over replicas shows the same figures). The dead letters
//! come from the analyzer's `/report` (`ANALYZER_URL`), which has read every one of them.
//!
//! The figures are read when asked, and an answer is kept for a second so that several open
//! pages share one read of the changelog. Only the throughput's history is kept while nobody
//! watches: one processed count every [`SAMPLE_EVERY`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use order_runtime::sync::Locked;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{PartitionState, StatsReport};
use crate::config::{Config, Guarantee};
use crate::durability::{CommittedPartition, GroupTotals, TotalsError};

/// The page, compiled in.
pub const PAGE: &str = include_str!("status.html");
/// How long one answer of `/status.json` serves.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// How often the processed count is noted for the throughput chart.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How much of that history is kept: the chart's five minutes, and one sample before them.
const HISTORY: usize = 61;

/// The processed count at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub processed: u64,
}

/// Whose processed count the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counted {
    /// The group's committed total (exactly-once).
    Group,
    /// This replica's own (at-least-once keeps no group totals).
    Replica,
}

/// The throughput's history, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub counted: Option<Counted>,
    pub sample_every_ms: u64,
    pub samples: VecDeque<Sample>,
}

impl Throughput {
    fn new() -> Self {
        Throughput {
            counted: None,
            sample_every_ms: u64::try_from(SAMPLE_EVERY.as_millis()).unwrap_or(u64::MAX),
            samples: VecDeque::with_capacity(HISTORY),
        }
    }

    /// Notes `processed` at `at_ms`; a change of whose count it is starts the history again.
    fn note(&mut self, counted: Counted, at_ms: u64, processed: u64) {
        if self.counted != Some(counted) {
            self.samples.clear();
            self.counted = Some(counted);
        }
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at_ms, processed });
    }
}

/// One orders partition as the group has committed it.
#[derive(Debug, Serialize)]
pub struct PartitionRow {
    pub partition: i32,
    /// The next offset the group will process (committed with the state).
    pub committed_offset: Option<i64>,
    pub end_offset: i64,
    /// Records on the partition that the group has not committed yet (those above the
    /// committed offset that were final at the commit do not count).
    pub lag: i64,
    /// Records taken and not final at the last commit (waiting for a retry, or behind one of
    /// their key).
    pub in_flight: usize,
    pub processed: u64,
    pub retries: u64,
    pub dead_lettered: u64,
}

/// What `/status.json` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    pub guarantee: Guarantee,
    /// The whole group's committed totals (exactly-once), the same as `/stats/global`.
    pub global: Option<StatsReport>,
    pub partitions: Vec<PartitionRow>,
    /// Why `global` and `partitions` are missing, when they are.
    pub global_error: Option<String>,
    /// The analyzer's `/report`, as it answered.
    pub dead_letters: Option<serde_json::Value>,
    /// Why `dead_letters` is missing, when it is.
    pub dead_letters_error: Option<String>,
    pub analyzer_url: String,
    /// Where the page links a trace id: `<jaeger_ui_url>/trace/<id>` (none: plain text).
    pub jaeger_ui_url: Option<String>,
    pub throughput: Throughput,
}

/// This replica's own processed count, for the history under at-least-once.
pub type OwnCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// The page's state: the settings, the throughput's history and the last answer.
pub struct StatusPage {
    config: Config,
    totals: Arc<dyn GroupTotals>,
    own: OwnCount,
    /// For the analyzer's `/report`; the reason when none could be built.
    client: Result<reqwest::Client, String>,
    history: Mutex<Throughput>,
    last: Mutex<Option<(Instant, Arc<String>)>>,
}

impl StatusPage {
    pub fn new(config: Config, totals: Arc<dyn GroupTotals>, own: OwnCount) -> Self {
        let client = order_runtime::http::client_builder(&config.processor.analyzer_url)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string());
        StatusPage {
            config,
            totals,
            own,
            client,
            history: Mutex::new(Throughput::new()),
            last: Mutex::new(None),
        }
    }

    /// Notes the processed count every [`SAMPLE_EVERY`] until `shutdown`: the group's, or
    /// this replica's where the group keeps no totals. A read that fails is skipped, and the
    /// page averages the rate over the longer interval.
    pub async fn keep_history(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let totals = self.totals.clone();
            let noted = match tokio::task::spawn_blocking(move || totals.report()).await {
                Ok(Ok(report)) => Some((Counted::Group, report.processed)),
                Ok(Err(TotalsError::NotKept(_))) => Some((Counted::Replica, (self.own)())),
                Ok(Err(TotalsError::Unavailable(_))) | Err(_) => None,
            };
            if let Some((counted, processed)) = noted {
                self.history.locked().note(counted, now_ms(), processed);
            }
        }
    }

    async fn read(&self) -> Status {
        let totals = self.totals.clone();
        let (global, partitions, global_error) =
            match tokio::task::spawn_blocking(move || totals.committed()).await {
                Ok(Ok(committed)) => {
                    let report = StatsReport::new(
                        committed
                            .iter()
                            .filter_map(|c| c.state.as_ref().map(|s| (c.partition, s))),
                    );
                    (Some(report), rows(&committed), None)
                }
                Ok(Err(e)) => (None, Vec::new(), Some(e.to_string())),
                Err(e) => (None, Vec::new(), Some(e.to_string())),
            };
        let url = format!(
            "{}/report",
            self.config.processor.analyzer_url.trim_end_matches('/')
        );
        let (dead_letters, dead_letters_error) = match &self.client {
            Err(e) => (None, Some(format!("no HTTP client for {url}: {e}"))),
            Ok(client) => match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                    Ok(v) => (Some(v), None),
                    Err(e) => (None, Some(format!("{url}: {e}"))),
                },
                Ok(r) => (None, Some(format!("{url} answered {}", r.status()))),
                Err(e) => (None, Some(format!("{url} did not answer: {e}"))),
            },
        };
        Status {
            guarantee: self.config.processor.processing_guarantee,
            global,
            partitions,
            global_error,
            dead_letters,
            dead_letters_error,
            analyzer_url: self.config.processor.analyzer_url.clone(),
            jaeger_ui_url: self
                .config
                .processor
                .jaeger_ui_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            throughput: self.history.locked().clone(),
        }
    }

    /// The current status as JSON, read again at most once a second.
    async fn json(&self) -> Arc<String> {
        if let Ok(last) = self.last.lock()
            && let Some((at, body)) = last.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return body.clone();
        }
        let body = Arc::new(serde_json::to_string(&self.read().await).unwrap_or_default());
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), body.clone()));
        }
        body
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rows(committed: &[CommittedPartition]) -> Vec<PartitionRow> {
    committed
        .iter()
        .map(|c| {
            let committed_offset = c.state.as_ref().map(|s| s.next_offset).filter(|o| *o >= 0);
            let position = c.state.as_ref().map(PartitionState::position);
            let (taken_to, in_flight) = position
                .as_ref()
                .map_or((0, 0), |p| (p.end.max(0), p.incomplete.len()));
            PartitionRow {
                partition: c.partition,
                committed_offset,
                end_offset: c.end_offset,
                lag: (c.end_offset - taken_to.max(committed_offset.unwrap_or(0))).max(0)
                    + i64::try_from(in_flight).unwrap_or(0),
                in_flight,
                processed: c.state.as_ref().map_or(0, |s| s.total.count),
                retries: c.state.as_ref().map_or(0, |s| s.retries),
                dead_lettered: c
                    .state
                    .as_ref()
                    .map_or(0, |s| s.dead_lettered.values().sum()),
            }
        })
        .collect()
}

/// `GET /`: the page.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /status.json`: what the page shows.
pub async fn status(State(page): State<Arc<StatusPage>>) -> Response {
    let body = page.json().await;
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.as_str().to_owned(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_page_needs_nothing_from_elsewhere() {
        for external in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "url(",
            "@import",
            "fetch(\"http",
        ] {
            assert!(!PAGE.contains(external), "the page loads {external}…");
        }
        assert!(PAGE.contains("fetch(\"status.json\""));
    }

    #[test]
    fn the_history_keeps_five_minutes_of_one_count() {
        let mut t = Throughput::new();
        for i in 0..100 {
            t.note(Counted::Group, i * 5000, i * 10);
        }
        assert_eq!(t.samples.len(), HISTORY);
        assert_eq!(t.samples.front().map(|s| s.at_ms), Some(39 * 5000));
        assert_eq!(t.samples.back().map(|s| s.processed), Some(990));
        // another count's figures are not comparable with these: the history starts again
        t.note(Counted::Replica, 500_000, 3);
        assert_eq!(t.counted, Some(Counted::Replica));
        assert_eq!(
            t.samples.iter().copied().collect::<Vec<_>>(),
            [Sample {
                at_ms: 500_000,
                processed: 3
            }]
        );
    }

    #[test]
    fn lag_is_what_the_group_has_not_committed() {
        let mut state = crate::aggregate::PartitionState {
            next_offset: 40,
            retries: 3,
            ..Default::default()
        };
        state.total.count = 38;
        let committed = [
            CommittedPartition {
                partition: 0,
                state: Some(state),
                end_offset: 50,
            },
            CommittedPartition {
                partition: 1,
                state: None,
                end_offset: 7,
            },
        ];
        let rows = rows(&committed);
        assert_eq!(
            (rows[0].lag, rows[0].processed, rows[0].retries),
            (10, 38, 3)
        );
        assert_eq!((rows[1].lag, rows[1].committed_offset), (7, None));
    }
}
