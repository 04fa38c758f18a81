//! Pausing and resuming consumption by HTTP (`POST /pause`, `POST /resume`, either with
//! `?partition=N`; `GET /pause` says what is paused).
//!
//! A paused partition's worker settles the record in hand, makes what it did durable, and
//! takes nothing more from its queue until resumed; librdkafka stops fetching once the queue
//! holds its prefetch bound, so the lag grows and nothing is lost. The paused set belongs to
//! the replica, not to an assignment: a partition that is revoked and assigned back, or
//! assigned for the first time while everything is paused, starts paused.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use order_runtime::http::Probe;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

/// What is paused.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Paused {
    /// Every partition, present and future.
    pub all: bool,
    /// These partitions (when not `all`).
    pub partitions: BTreeSet<i32>,
}

impl Paused {
    pub fn holds(&self, partition: i32) -> bool {
        self.all || self.partitions.contains(&partition)
    }

    fn describe(&self) -> Option<String> {
        if self.all {
            Some("consumption paused: all partitions".to_owned())
        } else if self.partitions.is_empty() {
            None
        } else {
            let list: Vec<String> = self.partitions.iter().map(i32::to_string).collect();
            Some(format!("consumption paused: partitions {}", list.join(",")))
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PausedLabel {
    /// A partition number, or `all`.
    partition: String,
}

/// The replica's pause switch: the HTTP side writes it, the workers watch it.
pub struct PauseControl {
    state: watch::Sender<Paused>,
    probe: Arc<Probe>,
    /// `processor_paused{partition}`: 1 while paused ("all", or a partition once named).
    gauge: Family<PausedLabel, Gauge>,
}

#[derive(Debug, Deserialize)]
struct Target {
    partition: Option<i32>,
}

impl PauseControl {
    pub fn new(probe: Arc<Probe>, registry: &mut Registry) -> Self {
        let gauge = Family::<PausedLabel, Gauge>::default();
        registry.register(
            "processor_paused",
            "1 while consumption is paused, for all partitions (partition=\"all\") or one",
            gauge.clone(),
        );
        let _ = gauge.get_or_create(&label("all"));
        PauseControl {
            state: watch::Sender::new(Paused::default()),
            probe,
            gauge,
        }
    }

    /// What a worker watches.
    pub fn watch(&self) -> watch::Receiver<Paused> {
        self.state.subscribe()
    }

    /// Applies `f` to the state; a refusal is a 409 with its reason. Answers the new state.
    fn change(&self, f: impl FnOnce(&mut Paused) -> Result<(), &'static str>) -> Response {
        let mut refused = None;
        let mut named = None;
        self.state.send_if_modified(|p| {
            let before = p.clone();
            match f(p) {
                Ok(()) => {
                    named = Some(
                        before
                            .partitions
                            .union(&p.partitions)
                            .copied()
                            .collect::<Vec<_>>(),
                    );
                    *p != before
                }
                Err(why) => {
                    refused = Some(why);
                    false
                }
            }
        });
        if let Some(why) = refused {
            return (StatusCode::CONFLICT, why).into_response();
        }
        let now = self.state.borrow().clone();
        self.probe.set_note(now.describe());
        self.gauge
            .get_or_create(&label("all"))
            .set(i64::from(now.all));
        for p in named.unwrap_or_default() {
            self.gauge
                .get_or_create(&label(&p.to_string()))
                .set(i64::from(now.partitions.contains(&p)));
        }
        info!(all = now.all, partitions = ?now.partitions, "pause state");
        Json(now).into_response()
    }

    fn pause(&self, target: &Target) -> Response {
        self.change(|state| {
            match target.partition {
                None => state.all = true,
                Some(p) => {
                    state.partitions.insert(p);
                }
            }
            Ok(())
        })
    }

    fn resume(&self, target: &Target) -> Response {
        self.change(|state| match target.partition {
            None => {
                *state = Paused::default();
                Ok(())
            }
            Some(_) if state.all => Err(
                "all partitions are paused: resume them all (POST /resume), then pause the ones to hold",
            ),
            Some(p) => {
                state.partitions.remove(&p);
                Ok(())
            }
        })
    }

    /// `POST /pause`, `POST /resume` (each with an optional `?partition=N`), `GET /pause`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                "/pause",
                post(|State(c): State<Arc<Self>>, Query(t): Query<Target>| async move {
                    c.pause(&t)
                })
                .get(|State(c): State<Arc<Self>>| async move {
                    Json(c.state.borrow().clone())
                }),
            )
            .route(
                "/resume",
                post(|State(c): State<Arc<Self>>, Query(t): Query<Target>| async move {
                    c.resume(&t)
                }),
            )
            .with_state(self)
    }
}

fn label(partition: &str) -> PausedLabel {
    PausedLabel {
        partition: partition.to_owned(),
    }
}
