//! The bookkeeping of the partitions a replica holds, with no I/O: what each has applied
//! (`working`), what the last commit holds (`committed`), and the writes to redo if the open
//! transaction aborts. [`super::transaction`] keeps one under its lock.

use std::collections::BTreeMap;

use order_runtime::dead_letter::Category;
use rdkafka::message::OwnedHeaders;

use super::error::EosError;
use crate::aggregate::{PartitionState, StatsReport};
use crate::position::Position;

/// A dead letter produced since the last commit, kept to produce it again if the
/// transaction aborts.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

#[derive(Debug)]
struct Part {
    working: PartitionState,
    committed: PartitionState,
    /// Outcomes in `working` but not yet in `committed`.
    uncommitted: u64,
    /// The dead letters among them, in offset order.
    dead_letters: Vec<DeadLetter>,
}

impl Part {
    fn new(state: PartitionState) -> Self {
        Part {
            working: state.clone(),
            committed: state,
            uncommitted: 0,
            dead_letters: Vec::new(),
        }
    }
}

/// A partition's processed records not yet in the [`Ledger`], gathered by its worker without
/// the core's lock and handed over in one go ([`Ledger::absorb`]): every few hundred records,
/// before the worker waits, before a dead letter, and when it stops. Taking the lock for each
/// record was a quarter of the workers' CPU in a 1M-record drain (the lock's cache line
/// moving between the CPUs, and the wake-ups of the workers that found it taken).
#[derive(Debug, Default)]
pub struct Pending {
    /// What the records add up to (its position unused: the worker's window gives it).
    state: PartitionState,
    outcomes: u64,
}

impl Pending {
    /// Gathers a processed record.
    pub fn add(&mut self, product: &str, price: order_schema::Cents, retries: u32) {
        self.state.add(product, price);
        self.state.retries += u64::from(retries);
        self.outcomes += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes == 0
    }

    /// Empties it, keeping its products (zeroed) so that the next records allocate nothing.
    fn clear(&mut self) {
        let PartitionState {
            total,
            by_product,
            dead_lettered,
            retries,
            next_offset: _,
            taken_to: _,
            incomplete: _,
        } = &mut self.state;
        *total = crate::aggregate::Aggregate::default();
        by_product
            .values_mut()
            .for_each(|a| *a = crate::aggregate::Aggregate::default());
        dead_lettered.clear();
        *retries = 0;
        self.outcomes = 0;
    }
}

/// The bookkeeping of the held partitions, with no I/O: what each has applied (`working`),
/// what the last commit holds (`committed`), and the writes to redo if the open transaction
/// aborts.
#[derive(Debug, Default)]
pub struct Ledger {
    parts: BTreeMap<i32, Part>,
}

impl Ledger {
    /// A partition restored with `state` (its position included) is held from now on.
    pub fn restored(&mut self, partition: i32, state: PartitionState) {
        self.parts.insert(partition, Part::new(state));
    }

    pub fn holds(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// Where `partition` stands as applied (offset 0 when not held).
    pub fn position(&self, partition: i32) -> Position {
        self.parts
            .get(&partition)
            .map_or_else(|| Position::at(0), |p| p.working.position())
    }

    /// Whether the record at `offset` of `partition` may still be applied here: the
    /// partition is held and the record is not behind its lowest offset not final (which
    /// worker's window keeps records final already from coming back).
    pub fn accepts(&self, partition: i32, offset: i64) -> bool {
        self.parts
            .get(&partition)
            .is_some_and(|p| offset >= p.working.next_offset)
    }

    /// Applies an accepted record's dead letter to `working` and keeps it for a replay; the
    /// partition is now at `position` (which counts the record final).
    pub fn dead_lettered(
        &mut self,
        partition: i32,
        position: &Position,
        category: Category,
        retries: u32,
        dead: DeadLetter,
    ) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.working.dead_letter(category);
            part.working.retries += u64::from(retries);
            part.working.set_position(position);
            part.uncommitted += 1;
            part.dead_letters.push(dead);
        }
    }

    /// Moves `pending`'s records into `working`, which is then at `position` (the worker's,
    /// counting them final), and empties it. Nothing moves if the partition is not held any
    /// more (its records go to the next owner), or for a position behind the one applied.
    pub fn absorb(&mut self, partition: i32, pending: &mut Pending, position: &Position) {
        if pending.is_empty() {
            return;
        }
        if let Some(part) = self.parts.get_mut(&partition)
            && position.next >= part.working.next_offset
        {
            part.working.merge(&pending.state);
            part.working.set_position(position);
            part.uncommitted += pending.outcomes;
        }
        pending.clear();
    }

    /// Whether any outcome waits for a commit.
    pub fn pending(&self) -> bool {
        self.parts.values().any(|p| p.uncommitted > 0)
    }

    /// What a commit writes, taken when it starts: each changed partition's state (the
    /// changelog record) and the next offset to commit with it. Outcomes applied while the
    /// commit is in flight stay uncommitted, for the next one.
    pub fn changes(&self) -> Result<Vec<Change>, EosError> {
        self.parts
            .iter()
            .filter(|(_, p)| p.uncommitted > 0)
            .map(|(n, p)| {
                serde_json::to_vec(&p.working)
                    .map(|value| Change {
                        partition: *n,
                        value,
                        state: p.working.clone(),
                        outcomes: p.uncommitted,
                        dead_letters: p.dead_letters.len(),
                    })
                    .map_err(|source| EosError::EncodeState {
                        partition: *n,
                        source,
                    })
            })
            .collect()
    }

    /// The commit of `changes` went through: `committed` catches up with what they hold.
    pub fn committed(&mut self, changes: &[Change]) {
        for c in changes {
            if let Some(part) = self.parts.get_mut(&c.partition) {
                part.committed = c.state.clone();
                part.uncommitted = part.uncommitted.saturating_sub(c.outcomes);
                part.dead_letters
                    .drain(..c.dead_letters.min(part.dead_letters.len()));
            }
        }
    }

    /// Forgets `partitions`; `true` when one had outcomes not yet committed.
    pub fn release(&mut self, partitions: &[i32]) -> bool {
        let mut uncommitted = false;
        for p in partitions {
            if let Some(part) = self.parts.remove(p) {
                uncommitted |= part.uncommitted > 0;
            }
        }
        uncommitted
    }

    /// The writes a new transaction redoes after an abort, partition by partition: `None`
    /// begins the partition's share (the transaction opens even with nothing to send), then
    /// its dead letters in order. `working` already holds every uncommitted outcome, and goes
    /// to the changelog at the next commit.
    pub fn replay(&self) -> Vec<Option<DeadLetter>> {
        self.parts
            .values()
            .filter(|p| p.uncommitted > 0)
            .flat_map(|p| std::iter::once(None).chain(p.dead_letters.iter().cloned().map(Some)))
            .collect()
    }

    /// Outcomes not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.parts.values().map(|p| p.uncommitted).sum()
    }

    /// The held partitions' working totals.
    pub fn report(&self) -> StatsReport {
        StatsReport::new(self.parts.iter().map(|(p, s)| (*p, &s.working)))
    }
}

/// One partition's share of a commit, as it was when the commit started.
#[derive(Debug)]
pub struct Change {
    pub partition: i32,
    /// The changelog record: `state`, encoded.
    pub value: Vec<u8>,
    pub state: PartitionState,
    /// Outcomes and dead letters the commit covers.
    outcomes: u64,
    dead_letters: usize,
}

impl Change {
    pub fn next_offset(&self) -> i64 {
        self.state.next_offset
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use order_schema::Cents;

    fn restored(partition: i32, next_offset: i64) -> Ledger {
        let mut l = Ledger::default();
        l.restored(
            partition,
            PartitionState {
                next_offset,
                ..PartitionState::default()
            },
        );
        l
    }

    /// One processed record, gathered and handed over on its own.
    fn sold(l: &mut Ledger, partition: i32, offset: i64, cents: i64) {
        assert!(l.accepts(partition, offset));
        let mut pending = Pending::default();
        pending.add("laptop", Cents(cents), 0);
        l.absorb(partition, &mut pending, &Position::at(offset + 1));
        assert!(pending.is_empty());
    }

    fn letter(n: u8) -> DeadLetter {
        DeadLetter {
            key: Some(vec![n]),
            value: None,
            headers: OwnedHeaders::new(),
        }
    }

    fn dead_lettered(l: &mut Ledger, partition: i32, offset: i64, n: u8) {
        l.dead_lettered(
            partition,
            &Position::at(offset + 1),
            Category::Validation,
            2,
            letter(n),
        );
    }

    /// Records gathered without the lock land in `working` as if applied one by one, and the
    /// emptied `Pending` serves again.
    #[test]
    fn gathered_records_are_absorbed_in_one_go_and_the_pending_is_reused() {
        let mut l = restored(3, 100);
        let mut pending = Pending::default();
        pending.add("laptop", Cents(1_000), 1);
        pending.add("phone", Cents(250), 0);
        pending.add("laptop", Cents(3_000), 0);
        l.absorb(3, &mut pending, &Position::at(103));
        assert!(pending.is_empty());
        let change = &l.changes().unwrap()[0];
        assert_eq!(change.next_offset(), 103);
        assert_eq!(change.outcomes, 3);
        let state = &change.state;
        assert_eq!(state.total.count, 3);
        assert_eq!(state.total.revenue_cents, 4_250);
        assert_eq!(state.total.min_cents, Some(250));
        assert_eq!(state.total.max_cents, Some(3_000));
        assert_eq!(state.by_product["laptop"].count, 2);
        assert_eq!(state.retries, 1);
        // reused: the product zeroed in it adds nothing, the new record its own figures
        pending.add("phone", Cents(500), 0);
        l.absorb(3, &mut pending, &Position::at(104));
        let state = &l.changes().unwrap()[0].state;
        assert_eq!(state.by_product["laptop"].count, 2);
        assert_eq!(state.by_product["laptop"].min_cents, Some(1_000));
        assert_eq!(state.by_product["phone"].count, 2);
        assert_eq!((state.total.count, state.next_offset), (4, 104));
        // a dead letter after gathered records: Core::dead_letter absorbs them first
        pending.add("phone", Cents(1), 0);
        l.absorb(3, &mut pending, &Position::at(105));
        dead_lettered(&mut l, 3, 105, 9);
        assert_eq!(l.changes().unwrap()[0].next_offset(), 106);
        assert_eq!(l.uncommitted(), 6);
    }

    #[test]
    fn applied_outcomes_move_working_and_the_commit_catches_up() {
        let mut l = restored(0, 10);
        sold(&mut l, 0, 10, 150);
        sold(&mut l, 0, 11, 250);
        dead_lettered(&mut l, 0, 12, 1);
        assert!(l.pending());
        assert_eq!(l.uncommitted(), 3);
        let changes = l.changes().unwrap();
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!((change.partition, change.next_offset()), (0, 13));
        let state: PartitionState = serde_json::from_slice(&change.value).unwrap();
        assert_eq!(state.total.count, 2);
        assert_eq!(state.total.revenue_cents, 400);
        assert_eq!(state.retries, 2);
        l.committed(&changes);
        assert!(!l.pending());
        assert!(l.changes().unwrap().is_empty());
        assert!(l.replay().is_empty(), "nothing to redo once committed");
    }

    /// Outcomes applied while a commit is in flight are not in it: they stay for the next.
    #[test]
    fn outcomes_applied_during_a_commit_wait_for_the_next_one() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        sold(&mut l, 0, 0, 100);
        dead_lettered(&mut l, 0, 1, 1);
        let changes = l.changes().unwrap();
        // in flight: more of partition 0, and partition 1's first
        sold(&mut l, 0, 2, 300);
        sold(&mut l, 1, 0, 50);
        l.committed(&changes);
        assert_eq!(l.uncommitted(), 2);
        let next = l.changes().unwrap();
        let offsets: Vec<(i32, i64)> = next
            .iter()
            .map(|c| (c.partition, c.next_offset()))
            .collect();
        assert_eq!(offsets, [(0, 3), (1, 1)]);
        assert_eq!(next[0].state.total.revenue_cents, 400);
        // the committed dead letter is not redone after an abort of the next transaction
        assert_eq!(
            l.replay().iter().filter(|d| d.is_some()).count(),
            0,
            "{:?}",
            l.replay()
        );
        l.committed(&next);
        assert!(!l.pending());
    }

    #[test]
    fn records_behind_what_was_applied_and_partitions_not_held_are_stale() {
        let mut l = restored(0, 10);
        assert!(!l.accepts(0, 9), "before the restored offset");
        sold(&mut l, 0, 10, 100);
        assert!(!l.accepts(0, 10), "behind the lowest offset not final");
        assert!(l.accepts(0, 11));
        assert!(!l.accepts(1, 0), "never assigned here");
        // records of a partition not held, or behind what was applied, change nothing
        let mut pending = Pending::default();
        pending.add("laptop", Cents(1), 0);
        l.absorb(1, &mut pending, &Position::at(1));
        assert!(pending.is_empty(), "dropped, for the partition's owner");
        pending.add("laptop", Cents(1), 0);
        l.absorb(0, &mut pending, &Position::at(10));
        assert_eq!(l.report().processed, 1);
        assert_eq!(l.uncommitted(), 1);
    }

    /// Records final out of offset order: the state written to the changelog says which
    /// offsets above its next offset were not final, and reads back the same.
    #[test]
    fn a_position_with_records_not_final_goes_into_the_state_and_back() {
        let mut l = restored(2, 100);
        let mut pending = Pending::default();
        pending.add("laptop", Cents(1_000), 0);
        pending.add("phone", Cents(500), 0);
        pending.add("phone", Cents(700), 2);
        let position = Position {
            next: 100,
            end: 105,
            incomplete: vec![100, 103],
        };
        l.absorb(2, &mut pending, &position);
        let change = &l.changes().unwrap()[0];
        assert_eq!(
            change.next_offset(),
            100,
            "the offset committed is the lowest not final"
        );
        let state: PartitionState = serde_json::from_slice(&change.value).unwrap();
        assert_eq!(state.position(), position);
        assert_eq!(state.total.count, 3);
        // a state written before positions had more than one offset reads as one
        let old: PartitionState = serde_json::from_str(
            r#"{"total":{"count":0,"revenue_cents":0,"min_cents":null,"max_cents":null},"by_product":{},"dead_lettered":{},"retries":0,"next_offset":42}"#,
        )
        .unwrap();
        assert_eq!(old.position(), Position::at(42));
        assert!(
            !String::from_utf8(serde_json::to_vec(&old).unwrap())
                .unwrap()
                .contains("incomplete"),
            "a contiguous position is written as before"
        );
    }

    #[test]
    fn an_abort_replays_the_uncommitted_dead_letters_in_order_per_partition() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        l.restored(2, PartitionState::default());
        dead_lettered(&mut l, 0, 0, 1);
        sold(&mut l, 0, 1, 100);
        dead_lettered(&mut l, 0, 2, 2);
        sold(&mut l, 1, 0, 100);
        // partition 2 has nothing uncommitted: nothing of it is replayed
        let keys: Vec<Option<Vec<u8>>> = l
            .replay()
            .into_iter()
            .map(|d| d.and_then(|d| d.key))
            .collect();
        assert_eq!(
            keys,
            [None, Some(vec![1]), Some(vec![2]), None],
            "partition 0 opens the transaction and redoes its two letters; partition 1 has none"
        );
        // the replay does not change working: the effects stay applied once
        assert_eq!(l.report().processed, 2);
        assert_eq!(l.report().dead_lettered, 2);
    }

    #[test]
    fn releasing_says_whether_uncommitted_outcomes_went_with_the_partitions() {
        let mut l = restored(0, 0);
        l.restored(1, PartitionState::default());
        sold(&mut l, 1, 0, 100);
        assert!(!l.release(&[0]), "partition 0 had nothing uncommitted");
        assert!(!l.holds(0));
        assert!(l.release(&[1, 7]), "partition 1 did; 7 was never held");
        assert!(!l.pending());
        assert!(l.replay().is_empty());
    }
}
