//! The records we hold of one partner partition ([`Held`]), by seq, with an index of the
//! LUN spans they cover: a local read (`held_reads`) finds the few records overlapping it without
//! looking at every record held. Under a steady write load the partner's second store holds
//! every record of the last flush interval or two (thousands), and each read took a scan of
//! all of them under the lock the mirror link takes for every arriving record.

use crate::nvram::record::{RecordHeader, RecordKind};
use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::ops::RangeBounds;

/// A record we hold: where it is in the partition, and what its header said.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub(super) pos: u64,
    pub(super) len: u32,
    /// What its header said when the record was held: its LUN, its span of it and its kind
    /// (local reads look for overlapping records without decoding every header).
    pub(super) lun: u32,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) kind: RecordKind,
}

impl Held {
    /// Where a header may be (not yet read).
    pub(super) fn probe(pos: u64) -> Held {
        Held {
            pos,
            len: 0,
            lun: 0,
            start: 0,
            end: 0,
            kind: RecordKind::Wrap,
        }
    }

    /// The record whose header `h` is at `pos`.
    pub(super) fn of(pos: u64, h: &RecordHeader) -> Held {
        Held {
            pos,
            len: h.slot() as u32,
            lun: h.lun,
            start: h.offset,
            end: h.offset.saturating_add(u64::from(h.len)),
            kind: h.kind,
        }
    }
}

/// Spans up to this long are indexed by their start: a record overlapping `[a, b)` then
/// starts in `[a - widest, b)`, `widest` the longest such span held. Data records are at
/// most the largest I/O (512 KiB); longer spans (write-zeroes and discards of large
/// extents) are few and kept apart.
const SHORT_SPAN: u64 = 1 << 20;

#[derive(Clone, Debug, Default)]
pub(super) struct HeldRecords {
    by_seq: BTreeMap<u64, Held>,
    /// The span index below is kept (local reads are on): without local reads nothing
    /// reads the held records by span, and the mirror link's thread is spared keeping it.
    indexed: bool,
    /// (LUN, start, seq) of the data and zero records no longer than [`SHORT_SPAN`].
    short: BTreeSet<(u32, u64, u64)>,
    /// Seqs of the longer data and zero records.
    long: BTreeSet<u64>,
    /// How many void records of each LUN are held.
    voids: BTreeMap<u32, usize>,
    /// The longest span in `short` since it was last empty: how far before a read's start
    /// an overlapping record can start (4 KiB under small random writes, not 1 MiB).
    widest_short: u64,
}

fn is_span(h: &Held) -> bool {
    matches!(h.kind, RecordKind::Data | RecordKind::Zero)
}

fn is_short(h: &Held) -> bool {
    h.end >= h.start && h.end - h.start <= SHORT_SPAN
}

impl HeldRecords {
    /// Keeps the span index from now on (built from what is held), or drops it.
    pub(super) fn set_indexed(&mut self, on: bool) {
        if on == self.indexed {
            return;
        }
        let by_seq = std::mem::take(&mut self.by_seq);
        *self = HeldRecords {
            indexed: on,
            ..HeldRecords::default()
        };
        for (seq, h) in by_seq {
            self.insert(seq, h);
        }
    }

    fn index(&mut self, seq: u64, h: &Held) {
        if !self.indexed {
            return;
        }
        if is_span(h) {
            if is_short(h) {
                self.short.insert((h.lun, h.start, seq));
                self.widest_short = self.widest_short.max(h.end - h.start);
            } else {
                self.long.insert(seq);
            }
        } else if h.kind == RecordKind::Void {
            *self.voids.entry(h.lun).or_default() += 1;
        }
    }

    fn unindex(&mut self, seq: u64, h: &Held) {
        if !self.indexed {
            return;
        }
        if is_span(h) {
            if is_short(h) {
                self.short.remove(&(h.lun, h.start, seq));
                if self.short.is_empty() {
                    self.widest_short = 0;
                }
            } else {
                self.long.remove(&seq);
            }
        } else if h.kind == RecordKind::Void {
            if let Some(n) = self.voids.get_mut(&h.lun) {
                *n -= 1;
                if *n == 0 {
                    self.voids.remove(&h.lun);
                }
            }
        }
    }

    pub(super) fn insert(&mut self, seq: u64, h: Held) -> Option<Held> {
        let old = self.by_seq.insert(seq, h);
        if let Some(old) = &old {
            self.unindex(seq, old);
        }
        self.index(seq, &h);
        old
    }

    pub(super) fn remove(&mut self, seq: &u64) -> Option<Held> {
        let old = self.by_seq.remove(seq)?;
        self.unindex(*seq, &old);
        Some(old)
    }

    pub(super) fn clear(&mut self) {
        *self = HeldRecords {
            indexed: self.indexed,
            ..HeldRecords::default()
        };
    }

    /// Keeps the records `keep` says yes to.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&u64, &Held) -> bool) {
        let gone: Vec<u64> = self
            .by_seq
            .iter()
            .filter(|(seq, h)| !keep(seq, h))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            self.remove(&seq);
        }
    }

    /// Removes and returns the records through `seq`, oldest first.
    pub(super) fn take_through(&mut self, seq: u64) -> Vec<(u64, Held)> {
        let rest = self.by_seq.split_off(&seq.saturating_add(1));
        let taken = std::mem::replace(&mut self.by_seq, rest);
        for (s, h) in &taken {
            self.unindex(*s, h);
        }
        taken.into_iter().collect()
    }

    pub(super) fn iter(&self) -> btree_map::Iter<'_, u64, Held> {
        self.by_seq.iter()
    }

    pub(super) fn range(&self, seqs: impl RangeBounds<u64>) -> btree_map::Range<'_, u64, Held> {
        self.by_seq.range(seqs)
    }

    pub(super) fn keys(&self) -> btree_map::Keys<'_, u64, Held> {
        self.by_seq.keys()
    }

    pub(super) fn values(&self) -> btree_map::Values<'_, u64, Held> {
        self.by_seq.values()
    }

    pub(super) fn get(&self, seq: &u64) -> Option<&Held> {
        self.by_seq.get(seq)
    }

    pub(super) fn contains_key(&self, seq: &u64) -> bool {
        self.by_seq.contains_key(seq)
    }

    pub(super) fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// Whether a void record of `lun` is held.
    pub(super) fn holds_void(&self, lun: u32) -> bool {
        if !self.indexed {
            return self
                .by_seq
                .values()
                .any(|h| h.kind == RecordKind::Void && h.lun == lun);
        }
        self.voids.contains_key(&lun)
    }

    /// The data and zero records of `lun` that overlap `[start, end)`, oldest first.
    pub(super) fn overlapping(&self, lun: u32, start: u64, end: u64) -> Vec<(u64, Held)> {
        let overlaps = |h: &Held| is_span(h) && h.lun == lun && h.start < end && start < h.end;
        if !self.indexed {
            return self
                .by_seq
                .iter()
                .filter(|(_, h)| overlaps(h))
                .map(|(seq, h)| (*seq, *h))
                .collect();
        }
        let mut seqs: Vec<u64> = self
            .short
            .range((lun, start.saturating_sub(self.widest_short), 0)..(lun, end, 0))
            .map(|&(_, _, seq)| seq)
            .chain(self.long.iter().copied())
            .collect();
        seqs.sort_unstable();
        seqs.into_iter()
            .filter_map(|seq| self.by_seq.get(&seq).map(|h| (seq, *h)))
            .filter(|(_, h)| overlaps(h))
            .collect()
    }
}

impl FromIterator<(u64, Held)> for HeldRecords {
    fn from_iter<I: IntoIterator<Item = (u64, Held)>>(records: I) -> HeldRecords {
        let mut held = HeldRecords::default();
        for (seq, h) in records {
            held.insert(seq, h);
        }
        held
    }
}

impl<'a> IntoIterator for &'a HeldRecords {
    type Item = (&'a u64, &'a Held);
    type IntoIter = btree_map::Iter<'a, u64, Held>;
    fn into_iter(self) -> Self::IntoIter {
        self.by_seq.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn held(lun: u32, start: u64, len: u64, kind: RecordKind) -> Held {
        Held {
            pos: 0,
            len: 64,
            lun,
            start,
            end: start + len,
            kind,
        }
    }

    /// What `held_reads` did before the index: every held record looked at.
    fn scan(model: &BTreeMap<u64, Held>, lun: u32, start: u64, end: u64) -> Vec<(u64, Held)> {
        model
            .iter()
            .filter(|(_, h)| is_span(h) && h.lun == lun && h.start < end && start < h.end)
            .map(|(s, h)| (*s, *h))
            .collect()
    }

    fn same(a: &[(u64, Held)], b: &[(u64, Held)]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|((sa, ha), (sb, hb))| {
                sa == sb
                    && (ha.lun, ha.start, ha.end, ha.kind) == (hb.lun, hb.start, hb.end, hb.kind)
            })
    }

    /// Random inserts (short and long spans, voids, wraps, replaced seqs), removals,
    /// retains, releases, clears and the index switched on and off, checked against a plain
    /// map scanned whole after every step.
    #[test]
    fn overlapping_records_are_those_a_full_scan_finds() {
        for seed in 0..40 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut idx = HeldRecords::default();
            idx.set_indexed(seed % 4 != 3);
            let mut model: BTreeMap<u64, Held> = BTreeMap::new();
            for _ in 0..600 {
                match rng.gen_range(0..100) {
                    0..=59 => {
                        let seq = rng.gen_range(1..400);
                        let kind = match rng.gen_range(0..20) {
                            0 => RecordKind::Void,
                            1 => RecordKind::Wrap,
                            2..=4 => RecordKind::Zero,
                            _ => RecordKind::Data,
                        };
                        let len = if rng.gen_bool(0.05) {
                            rng.gen_range(SHORT_SPAN..SHORT_SPAN * 8)
                        } else {
                            rng.gen_range(1..=128) * 4096
                        };
                        let h = held(
                            rng.gen_range(0..3),
                            rng.gen_range(0..4096) * 4096,
                            len,
                            kind,
                        );
                        idx.insert(seq, h);
                        model.insert(seq, h);
                    }
                    60..=74 => {
                        let seq = rng.gen_range(1..400);
                        idx.remove(&seq);
                        model.remove(&seq);
                    }
                    75..=84 => {
                        let through = rng.gen_range(0..400);
                        let taken = idx.take_through(through);
                        let rest = model.split_off(&(through + 1));
                        let expected: Vec<(u64, Held)> =
                            std::mem::replace(&mut model, rest).into_iter().collect();
                        assert!(same(&taken, &expected));
                    }
                    85..=94 => {
                        let m = rng.gen_range(2..5);
                        idx.retain(|s, _| s % m != 0);
                        model.retain(|s, _| s % m != 0);
                    }
                    95 => {
                        idx.clear();
                        model.clear();
                    }
                    96 => idx.set_indexed(rng.gen_bool(0.7)),
                    _ => {}
                }
                for lun in 0..3 {
                    let start = rng.gen_range(0..4200) * 4096;
                    let end = start + rng.gen_range(1..=256) * 4096;
                    assert!(
                        same(
                            &idx.overlapping(lun, start, end),
                            &scan(&model, lun, start, end)
                        ),
                        "seed {seed}: LUN {lun} [{start}, {end})"
                    );
                    let void = model
                        .values()
                        .any(|h| h.kind == RecordKind::Void && h.lun == lun);
                    assert_eq!(idx.holds_void(lun), void, "seed {seed}");
                }
                assert_eq!(idx.len(), model.len());
                assert!(idx.keys().eq(model.keys()));
            }
        }
    }
}
