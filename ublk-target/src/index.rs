//! The staged-extent index: for each LUN, which byte ranges have newer data in the NVRAM
//! log than on the medium, and where that data is.
//!
//! Extents never overlap. Inserting a write trims or splits the extents it covers, unless
//! an extent is NEWER (higher seq: writes can reach the index out of order), in which case
//! the newer bytes stay and the new extent fills only around them. An extent leaves the
//! index only when the flusher has made its record durable on the medium, so a byte range
//! with no extent reads correctly from the medium.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The data is in the NVRAM at this absolute offset (of the extent's first byte).
    Log { nvram_off: u64 },
    /// The range reads as zeroes.
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
    pub partition: u32,
    pub seq: u64,
    pub src: Source,
}

impl Extent {
    /// The part of this extent within `[start, end)` (which must overlap it).
    fn clip(&self, start: u64, end: u64) -> Extent {
        let s = self.start.max(start);
        let e = self.end.min(end);
        let src = match self.src {
            Source::Log { nvram_off } => Source::Log {
                nvram_off: nvram_off + (s - self.start),
            },
            Source::Zero => Source::Zero,
        };
        Extent {
            start: s,
            end: e,
            src,
            ..*self
        }
    }

    fn is_newer_than(&self, other: &Extent) -> bool {
        // Overlapping extents always come from one partition (a LUN range maps to one),
        // where seq orders writes.
        assert_eq!(self.partition, other.partition);
        self.seq > other.seq
    }
}

/// A piece of a read: either staged data or a gap to be read from the medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Staged(Extent),
    Medium { start: u64, end: u64 },
}

#[derive(Default, Debug)]
pub struct StagedIndex {
    map: BTreeMap<u64, Extent>,
    bytes: u64,
}

impl StagedIndex {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn extents(&self) -> usize {
        self.map.len()
    }

    /// Bytes of the LUN currently served from the log.
    pub fn staged_bytes(&self) -> u64 {
        self.bytes
    }

    fn overlapping(&self, start: u64, end: u64) -> Vec<Extent> {
        let mut found: Vec<Extent> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, x)| x.end > start)
            .map(|(_, x)| *x)
            .collect();
        found.reverse();
        found
    }

    fn put(&mut self, x: Extent) {
        assert!(x.start < x.end);
        self.bytes += x.end - x.start;
        self.map.insert(x.start, x);
    }

    fn take(&mut self, start: u64) -> Option<Extent> {
        let x = self.map.remove(&start)?;
        self.bytes -= x.end - x.start;
        Some(x)
    }

    pub fn insert(&mut self, new: Extent) {
        assert!(new.start < new.end, "empty extent");
        let mut cursor = new.start;
        for old in self.overlapping(new.start, new.end) {
            if old.is_newer_than(&new) {
                // Keep the newer bytes; the new extent fills the gap before them.
                if cursor < old.start {
                    self.put(new.clip(cursor, old.start));
                }
                cursor = cursor.max(old.end);
                continue;
            }
            self.take(old.start);
            if old.start < new.start {
                self.put(old.clip(old.start, new.start));
            }
            if old.end > new.end {
                self.put(old.clip(new.end, old.end));
            }
        }
        if cursor < new.end {
            self.put(new.clip(cursor, new.end));
        }
    }

    /// Drops what is left of record (`partition`, `seq`) within `[start, end)`: it is on the
    /// medium now.
    pub fn remove_flushed(&mut self, partition: u32, seq: u64, start: u64, end: u64) {
        for x in self.overlapping(start, end) {
            if x.partition == partition && x.seq == seq {
                self.take(x.start);
            }
        }
    }

    /// Drops every record of `partition` below `below_seq` within `[start, end)`: the node
    /// lost that range after staging them (a void record, see `nvram::void`), so reads must
    /// not see them.
    pub fn remove_dead(&mut self, partition: u32, below_seq: u64, start: u64, end: u64) {
        for x in self.overlapping(start, end) {
            if x.partition != partition || x.seq >= below_seq {
                continue;
            }
            self.take(x.start);
            if x.start < start {
                self.put(x.clip(x.start, start));
            }
            if x.end > end {
                self.put(x.clip(end, x.end));
            }
        }
    }

    /// Copies the staged pieces of `[offset, offset + out.len())` into `out` (`read_log`
    /// fetches the bytes of a piece in the log, by its source offset; a zero piece is
    /// zeroed); returns the gaps, `[start, end)`, whose bytes are on the medium.
    pub fn copy_staged(
        &self,
        offset: u64,
        out: &mut [u8],
        mut read_log: impl FnMut(u64, &mut [u8]),
    ) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        for piece in self.lookup(offset, offset + out.len() as u64) {
            match piece {
                Piece::Staged(x) => {
                    let dst = &mut out[(x.start - offset) as usize..(x.end - offset) as usize];
                    match x.src {
                        Source::Log { nvram_off } => read_log(nvram_off, dst),
                        Source::Zero => dst.fill(0),
                    }
                }
                Piece::Medium { start, end } => gaps.push((start, end)),
            }
        }
        gaps
    }

    /// Splits `[start, end)` into staged pieces and medium gaps, in LUN order.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut cursor = start;
        for x in self.overlapping(start, end) {
            if cursor < x.start {
                pieces.push(Piece::Medium {
                    start: cursor,
                    end: x.start,
                });
            }
            let c = x.clip(start, end);
            cursor = c.end;
            pieces.push(Piece::Staged(c));
        }
        if cursor < end {
            pieces.push(Piece::Medium { start: cursor, end });
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(start: u64, end: u64, seq: u64) -> Extent {
        Extent {
            start,
            end,
            partition: 0,
            seq,
            src: Source::Log {
                nvram_off: seq * 1_000_000 + start,
            },
        }
    }

    #[test]
    fn partial_overlap_trims_and_splits() {
        let mut ix = StagedIndex::new();
        ix.insert(ext(0, 100, 1));
        ix.insert(ext(40, 60, 2));
        let p = ix.lookup(0, 120);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], Piece::Staged(ext(0, 40, 1)));
        match p[1] {
            Piece::Staged(x) => assert_eq!((x.start, x.end, x.seq), (40, 60, 2)),
            _ => panic!(),
        }
        match p[2] {
            Piece::Staged(x) => {
                assert_eq!((x.start, x.end, x.seq), (60, 100, 1));
                // The right part still points at the right bytes of record 1.
                assert_eq!(
                    x.src,
                    Source::Log {
                        nvram_off: 1_000_000 + 60
                    }
                );
            }
            _ => panic!(),
        }
        assert_eq!(
            p[3],
            Piece::Medium {
                start: 100,
                end: 120
            }
        );
        assert_eq!(ix.staged_bytes(), 100);
    }

    #[test]
    fn older_write_arriving_late_does_not_hide_newer_bytes() {
        let mut ix = StagedIndex::new();
        ix.insert(ext(40, 60, 5));
        ix.insert(ext(0, 100, 3));
        let seqs: Vec<(u64, u64, u64)> = ix
            .lookup(0, 100)
            .into_iter()
            .map(|p| match p {
                Piece::Staged(x) => (x.start, x.end, x.seq),
                Piece::Medium { .. } => panic!("no gap expected"),
            })
            .collect();
        assert_eq!(seqs, vec![(0, 40, 3), (40, 60, 5), (60, 100, 3)]);
    }

    #[test]
    fn flushed_record_leaves_only_its_own_pieces() {
        let mut ix = StagedIndex::new();
        ix.insert(ext(0, 100, 1));
        ix.insert(ext(40, 60, 2));
        ix.remove_flushed(0, 1, 0, 100);
        assert_eq!(
            ix.lookup(0, 100),
            vec![
                Piece::Medium { start: 0, end: 40 },
                Piece::Staged(ext(40, 60, 2)),
                Piece::Medium {
                    start: 60,
                    end: 100
                }
            ]
            .into_iter()
            .map(|p| match p {
                Piece::Staged(x) => Piece::Staged(Extent {
                    src: Source::Log {
                        nvram_off: 2_000_000 + 40
                    },
                    ..x
                }),
                other => other,
            })
            .collect::<Vec<_>>()
        );
        assert_eq!(ix.staged_bytes(), 20);
    }

    // Model check: the index must agree with a byte-array model that applies writes by seq.
    proptest! {
        #[test]
        fn index_matches_a_byte_model(
            writes in proptest::collection::vec((0u64..64, 1u64..16), 1..40),
            flush_upto in 0usize..40,
            order_seed in any::<u64>(),
        ) {
            let n = writes.len();
            // Insert in a scrambled order to model out-of-order arrival.
            let mut order: Vec<usize> = (0..n).collect();
            let mut s = order_seed | 1;
            for i in (1..n).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut ix = StagedIndex::new();
            for &i in &order {
                let (start, len) = writes[i];
                ix.insert(ext(start, start + len, i as u64 + 1));
            }
            // Flush the oldest `flush_upto` records (in seq order).
            let flushed = flush_upto.min(n);
            for (i, &(start, len)) in writes.iter().enumerate().take(flushed) {
                ix.remove_flushed(0, i as u64 + 1, start, start + len);
            }
            // Model: the newest write per byte; bytes whose newest write was flushed read
            // from the medium.
            let mut model = [0u64; 80];
            for (i, &(start, len)) in writes.iter().enumerate() {
                for b in start..start + len { model[b as usize] = i as u64 + 1; }
            }
            let mut got = [0u64; 80];
            for p in ix.lookup(0, 80) {
                if let Piece::Staged(x) = p {
                    for b in x.start..x.end { got[b as usize] = x.seq; }
                }
            }
            for b in 0..80 {
                let want = if model[b] as usize > flushed { model[b] } else { 0 };
                prop_assert_eq!(got[b], want, "byte {}", b);
            }
        }
    }
}
