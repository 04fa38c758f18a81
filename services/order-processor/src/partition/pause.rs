//! Pausing and resuming consumption: the replica's switch, which the workers watch (the HTTP
//! side, `POST /pause` and `/resume`, is [`crate::web::pause`]).
//!
//! A paused partition's worker settles the record in hand, makes what it did durable, and
//! takes nothing more from its queue until resumed; librdkafka stops fetching once the queue
//! holds its prefetch bound, so the lag grows and nothing is lost. The paused set belongs to
//! the replica, not to an assignment: a partition that is revoked and assigned back, or
//! assigned for the first time while everything is paused, starts paused.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use order_runtime::http::Probe;
use order_runtime::sync::Locked;
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
            Some(format!(
                "consumption paused: partitions {}",
                list(&self.partitions)
            ))
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
    /// The orders topic's partitions, once known; -1 before.
    topic_partitions: AtomicI64,
    /// The partitions assigned to this replica now.
    assigned: Mutex<BTreeSet<i32>>,
}

/// Why a change was refused: the partition is not one of the topic's, or it is not this
/// replica's to change (or not paused, for a resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoSuchPartition(String),
    NotHere(String),
}

/// The answer to a change: what is paused now, and what this replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PauseState {
    #[serde(flatten)]
    pub paused: Paused,
    /// The partitions assigned to this replica now.
    pub assigned: BTreeSet<i32>,
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
            topic_partitions: AtomicI64::new(-1),
            assigned: Mutex::default(),
        }
    }

    /// What a worker watches.
    pub fn watch(&self) -> watch::Receiver<Paused> {
        self.state.subscribe()
    }

    /// What is paused now, and what this replica holds.
    pub fn state(&self) -> PauseState {
        PauseState {
            paused: self.state.borrow().clone(),
            assigned: self.assigned.locked().clone(),
        }
    }

    /// The orders topic has `n` partitions.
    pub fn topic_has(&self, n: usize) {
        self.topic_partitions
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Partitions the group gave this replica (a partition added to the topic since start-up
    /// makes the topic's count grow here).
    pub fn assigned(&self, partitions: &[i32]) {
        if let Some(top) = partitions.iter().max() {
            self.topic_partitions
                .fetch_max(i64::from(*top) + 1, Ordering::Relaxed);
        }
        self.assigned.locked().extend(partitions);
    }

    /// Partitions the group took back.
    pub fn revoked(&self, partitions: &[i32]) {
        let mut held = self.assigned.locked();
        for p in partitions {
            held.remove(p);
        }
    }

    /// Whether `partition` is one this replica may pause: one of the topic's, and assigned
    /// here (a pause of one partition is for the replica that processes it).
    fn check(&self, partition: i32) -> Result<(), Refusal> {
        let count = self.topic_partitions.load(Ordering::Relaxed);
        let held = self.assigned.locked();
        if count < 0 {
            return Err(Refusal::NotHere(
                "the orders topic is not known here yet: pause all partitions (POST /pause \
                 without ?partition), or ask again once this replica is ready"
                    .to_owned(),
            ));
        }
        if partition < 0 || i64::from(partition) >= count {
            return Err(Refusal::NoSuchPartition(format!(
                "partition {partition} is not a partition of the orders topic: it has \
                 partitions 0 to {}",
                count - 1
            )));
        }
        if !held.contains(&partition) {
            return Err(Refusal::NotHere(format!(
                "partition {partition} is not assigned to this replica (it has {}): send the \
                 request to the replica that holds it, or pause all partitions",
                list(&held)
            )));
        }
        Ok(())
    }

    /// Applies `f` to the state. Answers the new state, or why `f` refused.
    fn change(
        &self,
        f: impl FnOnce(&mut Paused) -> Result<(), Refusal>,
    ) -> Result<PauseState, Refusal> {
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
        let now = self.state();
        self.probe.set_note(now.paused.describe());
        self.gauge
            .get_or_create(&label("all"))
            .set(i64::from(now.paused.all));
        for p in named.unwrap_or_default() {
            self.gauge
                .get_or_create(&label(&p.to_string()))
                .set(i64::from(now.paused.partitions.contains(&p)));
        }
        info!(all = now.paused.all, partitions = ?now.paused.partitions, "pause state");
        Ok(now)
    }

    /// Pauses `partition` (one of the topic's, assigned here), or every partition (present
    /// and future) when `None`.
    pub fn pause(&self, partition: Option<i32>) -> Result<PauseState, Refusal> {
        if let Some(p) = partition {
            self.check(p)?;
        }
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

    /// Resumes `partition`, or everything when `None`. A partition paused here is resumed
    /// even if it has moved to another replica since; any other must be one this replica may
    /// pause. One partition cannot be resumed out of an `all` pause.
    pub fn resume(&self, partition: Option<i32>) -> Result<PauseState, Refusal> {
        if let Some(p) = partition
            && !self.state.borrow().partitions.contains(&p)
        {
            self.check(p)?;
        }
        self.change(|state| match partition {
            None => {
                *state = Paused::default();
                Ok(())
            }
            Some(_) if state.all => Err(Refusal::NotHere(
                "all partitions are paused: resume them all (POST /resume), then pause the \
                 ones to hold"
                    .to_owned(),
            )),
            Some(p) => {
                state.partitions.remove(&p);
                Ok(())
            }
        })
    }
}

fn list(partitions: &BTreeSet<i32>) -> String {
    if partitions.is_empty() {
        return "none".to_owned();
    }
    let names: Vec<String> = partitions.iter().map(i32::to_string).collect();
    names.join(", ")
}

fn label(partition: &str) -> PausedLabel {
    PausedLabel {
        partition: partition.to_owned(),
    }
}
