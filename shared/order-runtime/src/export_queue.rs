//! The count of spans waiting for export, which lets a record's span not be made at all when
//! there is no room for it (see [`ExportQueue`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use opentelemetry_sdk::trace::{OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT};

/// The spans in the batch processor's queue, counted by us: [`Admitted`] counts each span it
/// hands on, [`Reported`] takes away each batch the processor starts exporting. The SDK's
/// processor drops a span that ends while its queue is full, after the span was built and
/// ended; with the count, a record's span is not built at all then
/// (a record's span asks [`Self::has_room`] first), and the processor's queue never
/// overflows (it holds at most what was counted and not yet exported).
#[derive(Debug)]
pub struct ExportQueue {
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (2048), read once here and given to the batch processor.
    capacity: usize,
    /// Spans handed to the batch processor that it has not yet started exporting.
    queued: AtomicUsize,
    /// Spans not exported for want of room: not made, or ended while the queue was full.
    shed: AtomicU64,
}

impl ExportQueue {
    /// A queue of `OTEL_BSP_MAX_QUEUE_SIZE` spans, parsed as the SDK parses it (a value that is
    /// not a whole number is ignored).
    pub fn from_env() -> Self {
        let capacity = std::env::var(OTEL_BSP_MAX_QUEUE_SIZE)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);
        Self::new(capacity)
    }

    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            queued: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
        }
    }

    /// `OTEL_BSP_MAX_QUEUE_SIZE`, for the batch processor.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a span made now would find room (it may not by the time it ends).
    pub fn has_room(&self) -> bool {
        self.queued.load(Ordering::Relaxed) < self.capacity
    }

    /// Counts a span that is not made for want of room.
    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a place for an ended span; `false` (and the span counted as shed) when full.
    pub(crate) fn admit(&self) -> bool {
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.shed();
        }
        admitted
    }

    /// Gives back the places of `spans` the batch processor is exporting.
    pub(crate) fn release(&self, spans: usize) {
        // never below zero: only counted spans reach the exporter, but a wrapped count would
        // shed every span from then on
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(spans))
            });
    }

    /// Spans waiting in the queue, not yet handed to the exporter.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Spans shed since the process started.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}
