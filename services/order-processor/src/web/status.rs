//! The status page: `GET /` is one self-contained page (HTML, CSS and script compiled into the
//! binary, nothing loaded from elsewhere) that polls `GET /status.json` every 2 s while it is
//! open, and draws the throughput of the last five minutes from what it polled.
//!
//! The processor serves it because the group's totals, the per-partition lag and retries are
//! its own: they come from the exactly-once changelog, which any replica reads (so the page
//! behind a Service that balances over replicas shows the same figures). The dead letters
//! come from the analyzer's `/report` (`ANALYZER_URL`), which has read every one of them.
//!
//! Nothing runs while nobody watches: the figures are read when asked, and an answer is kept
//! for a second so that several open pages share one read of the changelog.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

use crate::aggregate::{PartitionState, StatsReport};
use crate::config::{Config, Guarantee};
use crate::durability::{CommittedPartition, GroupTotals};

/// The page, compiled in.
pub const PAGE: &str = include_str!("status.html");
/// How long one answer of `/status.json` serves.
const FRESH_FOR: Duration = Duration::from_secs(1);

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
}

/// The page's state: the settings and the last answer.
pub struct StatusPage {
    config: Config,
    totals: Arc<dyn GroupTotals>,
    /// For the analyzer's `/report`; the reason when none could be built.
    client: Result<reqwest::Client, String>,
    last: Mutex<Option<(Instant, Arc<String>)>>,
}

impl StatusPage {
    pub fn new(config: Config, totals: Arc<dyn GroupTotals>) -> Self {
        let client = order_runtime::http::client_builder(&config.processor.analyzer_url)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string());
        StatusPage {
            config,
            totals,
            client,
            last: Mutex::new(None),
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
