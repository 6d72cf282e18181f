//! Puts one source partition's records back in sequence order on the destination (claim
//! set C, claim 8). Records may arrive out of order (several connections, a resend after a
//! reconnect) and more than once; the log file must hold each exactly once, in order.
//!
//! A record ahead of a gap is held until the gap fills; a record at or below what was
//! already passed on is a duplicate and dropped (counted); a gap that stays open longer than
//! the caller's timeout is reported with the missing sequence number, so the source can be
//! asked to resend from it or, failing that, the error names what is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What became of an offered record.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered<T> {
    /// In order: these records (the offered one and any it released) go to the log file now,
    /// in this order.
    Ready(Vec<T>),
    /// Ahead of a gap: kept until the gap fills.
    Held,
    /// Already passed on, or already held: dropped.
    Duplicate,
    /// Ahead of a gap with `held_limit` records already held: refused, nothing kept (the
    /// source resends it later; back-pressure, not loss).
    Full,
}

/// A gap that has stayed open too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverdueGap {
    /// The first missing sequence number.
    pub missing: u64,
    /// The lowest sequence number held behind it.
    pub held_from: u64,
    /// How long records have waited behind it.
    pub open_for: Duration,
}

#[derive(Debug)]
pub struct Sequencer<T> {
    /// The sequence number the log file needs next.
    next: u64,
    held: BTreeMap<u64, T>,
    held_limit: usize,
    /// Since when a record has waited behind the gap at `next`.
    gap_since: Option<Instant>,
    duplicates: u64,
}

impl<T> Sequencer<T> {
    /// `next`: the first sequence number not yet in the log file (its last one plus one).
    pub fn new(next: u64, held_limit: usize) -> Sequencer<T> {
        Sequencer {
            next,
            held: BTreeMap::new(),
            held_limit: held_limit.max(1),
            gap_since: None,
            duplicates: 0,
        }
    }

    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn offer(&mut self, seq: u64, record: T, now: Instant) -> Offered<T> {
        if seq < self.next || self.held.contains_key(&seq) {
            self.duplicates += 1;
            return Offered::Duplicate;
        }
        if seq > self.next {
            if self.held.len() >= self.held_limit {
                return Offered::Full;
            }
            self.held.insert(seq, record);
            self.gap_since.get_or_insert(now);
            return Offered::Held;
        }
        let mut ready = vec![record];
        self.next += 1;
        while let Some(r) = self.held.remove(&self.next) {
            ready.push(r);
            self.next += 1;
        }
        // A gap further on starts its clock now: its records waited on the earlier gap.
        self.gap_since = (!self.held.is_empty()).then_some(now);
        Offered::Ready(ready)
    }

    /// The gap at `next`, if records have waited behind it for `timeout` or longer.
    pub fn overdue_gap(&self, now: Instant, timeout: Duration) -> Option<OverdueGap> {
        let since = self.gap_since?;
        let open_for = now.saturating_duration_since(since);
        let (&held_from, _) = self.held.first_key_value()?;
        (open_for >= timeout).then_some(OverdueGap {
            missing: self.next,
            held_from,
            open_for,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_gap_holds_records_until_it_fills_then_releases_them_in_order() {
        let t0 = Instant::now();
        let mut s = Sequencer::new(1, 16);
        assert_eq!(s.offer(1, "a", t0), Offered::Ready(vec!["a"]));
        assert_eq!(s.offer(3, "c", t0), Offered::Held);
        assert_eq!(s.offer(4, "d", t0), Offered::Held);
        assert_eq!(s.overdue_gap(t0, Duration::from_secs(1)), None);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            s.overdue_gap(later, Duration::from_secs(1)),
            Some(OverdueGap {
                missing: 2,
                held_from: 3,
                open_for: Duration::from_secs(2)
            })
        );
        assert_eq!(s.offer(2, "b", later), Offered::Ready(vec!["b", "c", "d"]));
        assert_eq!(s.next(), 5);
        assert_eq!(s.overdue_gap(later, Duration::ZERO), None);
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut s = Sequencer::new(10, 16);
        assert_eq!(s.offer(9, (), t0), Offered::Duplicate);
        assert_eq!(s.offer(12, (), t0), Offered::Held);
        assert_eq!(s.offer(12, (), t0), Offered::Duplicate);
        assert_eq!(s.duplicates(), 2);
    }

    #[test]
    fn a_full_hold_refuses_rather_than_drops_what_it_holds() {
        let t0 = Instant::now();
        let mut s = Sequencer::new(2, 2);
        assert_eq!(s.offer(3, 3, t0), Offered::Held);
        assert_eq!(s.offer(4, 4, t0), Offered::Held);
        assert_eq!(s.offer(5, 5, t0), Offered::Full);
        // The gap's own record is always taken.
        assert_eq!(s.offer(2, 2, t0), Offered::Ready(vec![2, 3, 4]));
        assert_eq!(s.offer(5, 5, t0), Offered::Ready(vec![5]));
    }

    #[test]
    fn a_later_gap_is_timed_from_when_the_earlier_one_filled() {
        let t0 = Instant::now();
        let mut s = Sequencer::new(2, 16);
        s.offer(3, (), t0);
        s.offer(5, (), t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.offer(2, (), t1), Offered::Ready(vec![(), ()]));
        assert_eq!(s.overdue_gap(t1, Duration::from_secs(1)), None);
        let gap = s.overdue_gap(t1 + Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(gap.map(|g| g.missing), Some(4));
    }

    proptest! {
        /// Any delivery order with any duplicates, retried when refused: every record comes
        /// out exactly once, in sequence order.
        #[test]
        fn any_order_with_duplicates_comes_out_once_in_order(
            n in 1u64..200,
            keys in proptest::collection::vec(any::<u32>(), 200),
            dups in proptest::collection::vec(0u64..200, 0..50),
            limit in 1usize..32,
        ) {
            let t0 = Instant::now();
            let mut arrivals: Vec<(u32, u64)> = (1..=n).map(|s| (keys[(s - 1) as usize], s)).collect();
            arrivals.extend(dups.iter().filter(|&&d| d >= 1 && d <= n).map(|&d| (keys[d as usize % 200] ^ 0x5555, d)));
            arrivals.sort();
            let mut s = Sequencer::new(1, limit);
            let mut out = Vec::new();
            let mut queue: std::collections::VecDeque<u64> = arrivals.into_iter().map(|(_, seq)| seq).collect();
            let mut refused_in_a_row = 0usize;
            while let Some(seq) = queue.pop_front() {
                match s.offer(seq, seq, t0) {
                    Offered::Ready(r) => { out.extend(r); refused_in_a_row = 0; }
                    Offered::Held | Offered::Duplicate => refused_in_a_row = 0,
                    Offered::Full => {
                        // The source resends it later.
                        queue.push_back(seq);
                        refused_in_a_row += 1;
                        prop_assert!(refused_in_a_row <= queue.len() + 1, "no progress");
                    }
                }
            }
            prop_assert_eq!(out, (1..=n).collect::<Vec<_>>());
            prop_assert_eq!(s.held(), 0);
        }
    }
}
