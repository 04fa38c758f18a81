//! Where a partition stands, when records of different keys finish out of offset order: the
//! [`Position`] that is made durable (the lowest offset not final, and which offsets above it
//! are not final either), and the [`Window`] a partition's worker keeps to know it. Pure: no
//! I/O, no Kafka.
//!
//! A record is *taken* when the worker reads it from the partition's queue and *final* once
//! its outcome (counted, or dead-lettered) is durable. Records of one key are final in offset
//! order; records of different keys need not be. The position is then not one offset but
//! three facts: `next`, the lowest offset not final, where a restart begins; `end`, one past
//! the newest offset taken; and `incomplete`, the offsets in `[next, end)` that are not final.
//! Every other offset below `end` is final (or was never a record: a transaction marker, a
//! compacted gap), and a replica that starts from the position skips it.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A partition's durable position (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The lowest offset not final: where a restart begins.
    pub next: i64,
    /// One past the newest offset taken; `next` when nothing above it was taken.
    pub end: i64,
    /// The offsets in `[next, end)` that are not final, ascending; the first is `next`.
    pub incomplete: Vec<i64>,
}

impl Position {
    /// All final below `next`, nothing taken above it.
    pub fn at(next: i64) -> Self {
        Position {
            next,
            end: next,
            incomplete: Vec::new(),
        }
    }
}

/// What the worker does with a record it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Not seen before: take it to its outcome.
    New,
    /// A record that was not final when the position was made: take it to its outcome again.
    Again,
    /// Already final (or behind where the partition is): leave it.
    Skip,
}

/// The worker's view of its partition: what is taken and not final, since when.
#[derive(Debug, Clone, Default)]
pub struct Window {
    next: i64,
    end: i64,
    /// Taken and not final, each with when it was taken; also the restored `incomplete`
    /// offsets until they are read again.
    unfinished: BTreeMap<i64, Instant>,
    /// Restored `incomplete` offsets not read again yet.
    awaited: std::collections::BTreeSet<i64>,
}

impl Window {
    /// The window of a partition restored at `position`, at `now`.
    pub fn restored(position: &Position, now: Instant) -> Self {
        let next = position.next.max(0);
        let end = position.end.max(next);
        let incomplete = position
            .incomplete
            .iter()
            .copied()
            .filter(|o| (next..end).contains(o));
        let mut w = Window {
            next,
            end,
            unfinished: incomplete.clone().map(|o| (o, now)).collect(),
            awaited: incomplete.collect(),
        };
        w.advance();
        w
    }

    /// Decides about the record at `offset`, read in offset order. After [`Take::New`] or
    /// [`Take::Again`] the caller says [`Window::finished`] or [`Window::waiting`] for it.
    pub fn take(&mut self, offset: i64) -> Take {
        // records are read in order: an awaited offset below this one is gone (retention)
        while let Some(&first) = self.awaited.first()
            && first < offset
        {
            self.awaited.pop_first();
            self.unfinished.remove(&first);
        }
        if offset >= self.end {
            self.end = offset + 1;
            if self.unfinished.is_empty() {
                self.next = offset;
            }
            return Take::New;
        }
        if self.awaited.remove(&offset) {
            return Take::Again;
        }
        self.advance();
        Take::Skip
    }

    /// The record at `offset` is final.
    pub fn finished(&mut self, offset: i64) {
        self.unfinished.remove(&offset);
        self.advance();
    }

    /// The record at `offset`, taken at `now`, is not final yet (it waits for a retry, or
    /// behind an earlier record of its key).
    pub fn waiting(&mut self, offset: i64, now: Instant) {
        self.unfinished.entry(offset).or_insert(now);
        self.advance();
    }

    fn advance(&mut self) {
        self.next = self.unfinished.keys().next().copied().unwrap_or(self.end);
    }

    /// Records taken (or to be read again) and not final.
    pub fn in_flight(&self) -> usize {
        self.unfinished.len()
    }

    /// Of those, the ones taken since the window was restored (not the ones a restart has
    /// still to read again).
    pub fn taken_in_flight(&self) -> usize {
        self.unfinished.len() - self.awaited.len()
    }

    /// Offsets from the lowest not final to the newest taken.
    pub fn span(&self) -> i64 {
        self.end - self.next
    }

    /// When the oldest record not final was taken.
    pub fn oldest(&self) -> Option<Instant> {
        self.unfinished.values().next().copied()
    }

    /// The position to make durable now.
    pub fn position(&self) -> Position {
        Position {
            next: self.next,
            end: self.end,
            incomplete: self.unfinished.keys().copied().collect(),
        }
    }

    /// The lowest offset not final.
    pub fn next(&self) -> i64 {
        self.next
    }

    /// One past the newest offset taken.
    pub fn end(&self) -> i64 {
        self.end
    }
}

/// The most bytes of offset-commit metadata a position takes (the broker refuses more than
/// `offset.metadata.max.bytes`, 4,096 by default).
pub const MAX_METADATA: usize = 4_000;

impl Position {
    /// The position as offset-commit metadata (at-least-once; the committed offset is
    /// `next`): `p1:<end - next>:<gaps>`, the gaps being the distances between consecutive
    /// incomplete offsets after `next` (itself the first), in base 36, comma-separated. Empty
    /// when nothing above `next` was taken; `None` when it would not fit [`MAX_METADATA`]
    /// (the offset alone is committed then, and a restart redoes what was final above it).
    pub fn to_metadata(&self) -> Option<String> {
        if self.end <= self.next {
            return Some(String::new());
        }
        let mut text = format!("p1:{}:", base36(self.end - self.next));
        let mut last = self.next;
        for (i, o) in self.incomplete.iter().copied().enumerate() {
            if i == 0 && o == self.next {
                continue;
            }
            if text.len() > MAX_METADATA {
                return None;
            }
            if !text.ends_with(':') {
                text.push(',');
            }
            text.push_str(&base36(o - last));
            last = o;
        }
        (text.len() <= MAX_METADATA).then_some(text)
    }

    /// The position committed at offset `next` with `metadata`; just `next` when the metadata
    /// is not ours or does not read (another client's, or none).
    pub fn from_metadata(next: i64, metadata: &str) -> Self {
        let read = || -> Option<Position> {
            let rest = metadata.strip_prefix("p1:")?;
            let (span, gaps) = rest.split_once(':')?;
            let end = next.checked_add(i64::from_str_radix(span, 36).ok()?)?;
            let mut incomplete = vec![next];
            let mut at = next;
            for gap in gaps.split(',').filter(|g| !g.is_empty()) {
                let gap = i64::from_str_radix(gap, 36).ok().filter(|g| *g > 0)?;
                at = at.checked_add(gap)?;
                if at >= end {
                    return None;
                }
                incomplete.push(at);
            }
            Some(Position {
                next,
                end,
                incomplete,
            })
        };
        read().unwrap_or_else(|| Position::at(next))
    }
}

fn base36(mut n: i64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n <= 0 {
        return "0".to_owned();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[usize::try_from(n % 36).unwrap_or(0)]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn records_final_in_order_move_the_position_with_them() {
        let mut w = Window::restored(&Position::at(10), t0());
        for o in 10..15 {
            assert_eq!(w.take(o), Take::New);
            w.finished(o);
        }
        assert_eq!(w.position(), Position::at(15));
        assert_eq!((w.in_flight(), w.span()), (0, 0));
    }

    #[test]
    fn a_waiting_record_holds_the_position_and_the_final_ones_above_it_are_listed_as_not() {
        let now = t0();
        let mut w = Window::restored(&Position::at(100), now);
        assert_eq!(w.take(100), Take::New);
        w.waiting(100, now);
        for o in 101..105 {
            assert_eq!(w.take(o), Take::New);
            if o == 103 {
                w.waiting(o, now);
            } else {
                w.finished(o);
            }
        }
        let p = w.position();
        assert_eq!(
            p,
            Position {
                next: 100,
                end: 105,
                incomplete: vec![100, 103]
            }
        );
        assert_eq!((w.in_flight(), w.span(), w.oldest()), (2, 5, Some(now)));
        w.finished(100);
        assert_eq!(w.position().next, 103);
        w.finished(103);
        assert_eq!(w.position(), Position::at(105));
    }

    #[test]
    fn a_restored_window_skips_what_was_final_and_takes_again_what_was_not() {
        let restored = Position {
            next: 100,
            end: 105,
            incomplete: vec![100, 103],
        };
        let mut w = Window::restored(&restored, t0());
        let takes: Vec<Take> = (100..107).map(|o| w.take(o)).collect();
        assert_eq!(
            takes,
            [
                Take::Again,
                Take::Skip,
                Take::Skip,
                Take::Again,
                Take::Skip,
                Take::New,
                Take::New
            ]
        );
    }

    #[test]
    fn a_restored_offset_that_is_gone_is_not_waited_for() {
        // retention removed 100..=103: the first record read is 104
        let restored = Position {
            next: 100,
            end: 105,
            incomplete: vec![100, 103],
        };
        let mut w = Window::restored(&restored, t0());
        assert_eq!(w.take(104), Take::Skip);
        assert_eq!(w.position(), Position::at(105));
        assert_eq!(w.take(105), Take::New);
    }

    #[test]
    fn records_behind_the_window_are_skipped() {
        let mut w = Window::restored(&Position::at(50), t0());
        assert_eq!(w.take(49), Take::Skip);
        assert_eq!(w.take(50), Take::New);
        w.finished(50);
        assert_eq!(w.take(50), Take::Skip);
    }

    #[test]
    fn gaps_in_the_offsets_count_as_final() {
        let now = t0();
        let mut w = Window::restored(&Position::at(0), now);
        assert_eq!(w.take(0), Take::New);
        w.waiting(0, now);
        // 1 and 2 are transaction markers: never read
        assert_eq!(w.take(3), Take::New);
        w.finished(3);
        w.finished(0);
        assert_eq!(w.position(), Position::at(4));
    }

    #[test]
    fn the_metadata_round_trips_and_stays_small() {
        for p in [
            Position::at(7),
            Position {
                next: 100,
                end: 105,
                incomplete: vec![100, 103],
            },
            Position {
                next: 1_000_000,
                end: 1_050_000,
                incomplete: (0..500).map(|i| 1_000_000 + i * 97).collect(),
            },
        ] {
            let text = p.to_metadata().unwrap();
            assert!(text.len() <= MAX_METADATA, "{}", text.len());
            assert_eq!(Position::from_metadata(p.next, &text), p, "{text}");
        }
        // another client's metadata, or ours damaged: the offset alone
        for text in ["", "x", "p1:", "p1:5:0", "p1:5:9", "p1:zz:-1", "AQIDBA=="] {
            assert_eq!(
                Position::from_metadata(9, text),
                Position::at(9),
                "{text:?}"
            );
        }
        let huge = Position {
            next: 0,
            end: 100_000_000,
            incomplete: (0..5_000).map(|i| i * 20_000).collect(),
        };
        assert_eq!(huge.to_metadata(), None);
    }
}
