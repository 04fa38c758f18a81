//! Pausing and resuming consumption: the replica's switch, which the workers watch (the HTTP
//! side, `POST /pause` and `/resume`, is [`crate::web::pause`]).
//!
//! A paused partition's worker settles the record in hand, makes what it did durable, and
//! takes nothing more from its queue until resumed; librdkafka stops fetching once the queue
//! holds its prefetch bound, so the lag grows and nothing is lost. The paused set belongs to
//! the replica, not to an assignment: a partition that is revoked and assigned back, or
//! assigned for the first time while everything is paused, starts paused.

use std::collections::BTreeSet;
use std::sync::Arc;

use order_runtime::http::Probe;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
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

    /// What is paused now.
    pub fn state(&self) -> Paused {
        self.state.borrow().clone()
    }

    /// Applies `f` to the state. Answers the new state, or why `f` refused.
    fn change(
        &self,
        f: impl FnOnce(&mut Paused) -> Result<(), &'static str>,
    ) -> Result<Paused, &'static str> {
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
            return Err(why);
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
        Ok(now)
    }

    /// Pauses `partition`, or every partition (present and future) when `None`.
    pub fn pause(&self, partition: Option<i32>) -> Result<Paused, &'static str> {
        self.change(|state| {
            match partition {
                None => state.all = true,
                Some(p) => {
                    state.partitions.insert(p);
                }
            }
            Ok(())
        })
    }

    /// Resumes `partition`, or everything when `None`. One partition cannot be resumed out
    /// of an `all` pause.
    pub fn resume(&self, partition: Option<i32>) -> Result<Paused, &'static str> {
        self.change(|state| match partition {
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
}

fn label(partition: &str) -> PausedLabel {
    PausedLabel {
        partition: partition.to_owned(),
    }
}
