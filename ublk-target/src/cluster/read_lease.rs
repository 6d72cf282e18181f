//! Read leases (`cluster.local_reads`): the owner of a range lets the partner read it from
//! the partner's medium (its own with `storage = "own"`, else the shared one) and second
//! store instead of forwarding each read.
//!
//! What makes such a read return every write acknowledged before it began: each of those
//! writes is in the reader's second store or on its medium, unless the owner acknowledged it
//! without the reader (the link down), which the owner does only after marking the reader's
//! medium outdated on the arbiter (own media), where the reader does not look on every read,
//! or (a shared medium) after waiting out the leases below, nothing being marked. So:
//!
//! * The reader asks for a lease at `asked` (its clock) and holds it until
//!   `asked + period` for the ranges the answer names.
//! * The owner grants only ranges it serves and has not marked (or begun to mark) the
//!   reader's medium outdated for, and notes when it last granted.
//! * Before deciding whether to mark the reader's medium outdated (with a shared medium:
//!   before acknowledging a write the reader has no copy of), the owner withholds those
//!   ranges from every later grant and waits until `last grant + period * (1 + DRIFT) /
//!   (1 - DRIFT)` on its clock: any lease granted then has run out on the reader's clock,
//!   which runs at most `DRIFT` slow (the disk lease's assumption, `lease::DRIFT`). A grant is
//!   answered after the question was asked, so the reader's lease never starts later than
//!   the grant.
//!
//! A range decided without a mark (the write found its way to the reader after all) is
//! granted again at once; a marked one once the resync withdraws the marks.

use crate::lease::DRIFT;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// (LUN, range of the LUN), as `cluster::LunRange`.
type LunRange = (u32, u32);

#[derive(Default)]
struct Owner {
    /// When each range was last granted.
    last_grant: BTreeMap<LunRange, Instant>,
    /// Ranges an owner is deciding whether to mark (a wait under way), with how many
    /// decisions: not granted meanwhile.
    deciding: BTreeMap<LunRange, u32>,
    /// Ranges whose reader medium we marked outdated: not granted until the marks go.
    marked: BTreeSet<LunRange>,
}

#[derive(Default)]
struct Reader {
    until: Option<Instant>,
    ranges: BTreeSet<LunRange>,
}

/// Both sides of the read leases of one node.
pub struct ReadLeases {
    period: Duration,
    /// This node reads the partner's ranges locally (`cluster.local_reads`).
    reading: AtomicBool,
    /// The task that asks for leases runs.
    asking: AtomicBool,
    owner: Mutex<Owner>,
    reader: Mutex<Reader>,
}

impl ReadLeases {
    pub fn new(period: Duration) -> ReadLeases {
        ReadLeases {
            period,
            reading: AtomicBool::new(false),
            asking: AtomicBool::new(false),
            owner: Mutex::new(Owner::default()),
            reader: Mutex::new(Reader::default()),
        }
    }

    /// Reader: local reads on or off; true when the task asking for leases must start now.
    pub fn set_reading(&self, on: bool) -> bool {
        self.reading.store(on, Ordering::SeqCst);
        if !on {
            self.drop_held();
        }
        on && !self.asking.swap(true, Ordering::SeqCst)
    }

    /// Reader: whether local reads are on.
    pub fn reading(&self) -> bool {
        self.reading.load(Ordering::Relaxed)
    }

    /// How long a lease lasts on the reader's clock, from when it asked.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// How long after its last grant the owner waits before marking the reader outdated.
    pub fn owner_wait(&self) -> Duration {
        self.period.mul_f64((1.0 + DRIFT) / (1.0 - DRIFT))
    }

    fn owner(&self) -> std::sync::MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Owner: grants `eligible` (ranges we serve whose reader's medium the arbiter does not
    /// mark outdated, read before this call) but those withheld; notes the grant at `now`.
    pub fn grant(&self, eligible: Vec<LunRange>, now: Instant) -> Vec<LunRange> {
        let mut o = self.owner();
        let granted: Vec<LunRange> = eligible
            .into_iter()
            .filter(|r| !o.marked.contains(r) && !o.deciding.contains_key(r))
            .collect();
        for r in &granted {
            let last = o.last_grant.entry(*r).or_insert(now);
            *last = (*last).max(now);
        }
        granted
    }

    /// Owner, about to decide whether to mark the reader's medium outdated for `ranges`:
    /// withholds them from later grants until [`ReadLeases::decided`]; returns when the leases
    /// granted so far have run out.
    pub fn withhold(&self, ranges: &[LunRange]) -> Option<Instant> {
        let mut o = self.owner();
        for r in ranges {
            *o.deciding.entry(*r).or_default() += 1;
        }
        ranges
            .iter()
            .filter_map(|r| o.last_grant.get(r))
            .max()
            .map(|&g| g + self.owner_wait())
    }

    /// Owner: the decision [`ReadLeases::withhold`] began is made (a mark made meanwhile was
    /// noted by [`ReadLeases::marked`]).
    pub fn decided(&self, ranges: &[LunRange]) {
        let mut o = self.owner();
        for r in ranges {
            if let Some(n) = o.deciding.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    o.deciding.remove(r);
                }
            }
        }
    }

    /// Owner: the reader's medium is marked outdated for `ranges`.
    pub fn marked(&self, ranges: &[LunRange]) {
        self.owner().marked.extend(ranges.iter().copied());
    }

    /// Owner: the reader's medium holds `ranges` again (the marks are withdrawn).
    pub fn grant_again(&self, ranges: &[LunRange]) {
        let mut o = self.owner();
        for r in ranges {
            o.marked.remove(r);
        }
    }

    /// Reader: the owner granted `ranges` in answer to a question asked at `asked`.
    pub fn took(&self, asked: Instant, ranges: Vec<LunRange>) {
        let mut r = self.reader();
        r.until = Some(asked + self.period);
        r.ranges = ranges.into_iter().collect();
    }

    /// Reader: whether a lease on `range` holds at `now`.
    pub fn holds(&self, range: LunRange, now: Instant) -> bool {
        let r = self.reader();
        r.until.is_some_and(|u| now < u) && r.ranges.contains(&range)
    }

    /// Reader: the lease ends at once (local reads were switched off).
    pub fn drop_held(&self) {
        let mut r = self.reader();
        r.until = None;
        r.ranges.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_being_decided_or_marked_is_not_granted_and_the_wait_covers_its_last_grant() {
        let l = ReadLeases::new(Duration::from_millis(1000));
        let t0 = Instant::now();
        assert_eq!(l.withhold(&[(0, 1)]), None, "nothing granted yet");
        assert_eq!(l.grant(vec![(0, 0), (0, 1)], t0), vec![(0, 0)]);
        let until = l.withhold(&[(0, 0)]).expect("a grant stands");
        assert!(
            until >= t0 + Duration::from_millis(1222),
            "{:?}",
            until - t0
        );
        assert!(l.grant(vec![(0, 0), (0, 1)], t0).is_empty());
        // (0, 1) decided without a mark: granted again; (0, 0) marked: not until cleared.
        l.decided(&[(0, 1)]);
        l.marked(&[(0, 0)]);
        l.decided(&[(0, 0)]);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.grant(vec![(0, 0), (0, 1)], later), vec![(0, 1)]);
        // Another range's grants do not hold back a decision on this one.
        assert_eq!(l.withhold(&[(0, 0)]), Some(until));
        l.decided(&[(0, 0)]);
        l.grant_again(&[(0, 0)]);
        assert_eq!(l.grant(vec![(0, 0)], later), vec![(0, 0)]);
    }

    #[test]
    fn two_decisions_on_one_range_both_hold_it_back() {
        let l = ReadLeases::new(Duration::from_millis(1000));
        let t0 = Instant::now();
        l.withhold(&[(0, 0)]);
        l.withhold(&[(0, 0)]);
        l.decided(&[(0, 0)]);
        assert!(l.grant(vec![(0, 0)], t0).is_empty());
        l.decided(&[(0, 0)]);
        assert_eq!(l.grant(vec![(0, 0)], t0), vec![(0, 0)]);
    }

    #[test]
    fn a_lease_holds_for_its_period_from_the_question_and_only_for_its_ranges() {
        let l = ReadLeases::new(Duration::from_millis(500));
        let asked = Instant::now();
        l.took(asked, vec![(0, 2)]);
        assert!(l.holds((0, 2), asked + Duration::from_millis(499)));
        assert!(!l.holds((0, 2), asked + Duration::from_millis(500)));
        assert!(!l.holds((0, 1), asked));
        l.drop_held();
        assert!(!l.holds((0, 2), asked));
    }
}
