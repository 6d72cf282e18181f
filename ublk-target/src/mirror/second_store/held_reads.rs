//! Reads of the partner's held records: the newest bytes of a range the partner owns that
//! its flushes have not yet put on our medium (`storage = "own"`, local reads under a read
//! lease, `engine::local_reads`).
//!
//! A held record may be overwritten in place while we read it: the partner reuses log space
//! once it has released a record, and its next record can land here before its release
//! does. Each record used is therefore copied whole and checked (header and payload
//! checksum) after the copy. A record that fails the check was released, and so was every
//! older record of its partition (releases go in seq order): those are on our medium, and
//! are dropped from the read (an older copy that still looks intact must not show through).

use super::{Held, SecondStoreArea};
use crate::index::{Extent, Source, StagedIndex};
use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES};
use crate::nvram::void::VoidMarks;

/// What [`SecondStoreArea::read_held`] could not serve from the held records.
#[derive(Debug, PartialEq, Eq)]
pub enum HeldRead {
    /// The medium holds the newest bytes of these `[start, end)` gaps.
    Gaps(Vec<(u64, u64)>),
    /// A void record of the LUN is held (the partner lost a range after staging records of
    /// it: those are dead and must not be read): the read goes to the owner until the void
    /// is released.
    Unsure,
}

/// A held record overlapping the read, copied and checked.
struct Copied {
    seq: u64,
    header: RecordHeader,
    payload: Vec<u8>,
}

impl SecondStoreArea {
    /// Copies into `out` the bytes of `lun` at `offset..offset + out.len()` that records of
    /// partner partition `partition` hold, newest seq first; returns the gaps.
    pub fn read_held(&self, partition: u32, lun: u32, offset: u64, out: &mut [u8]) -> HeldRead {
        self.read_held_with(partition, lun, offset, out, false)
    }

    /// As [`Self::read_held`], but a held void record is read (its span and seq) and the
    /// records it kills are left out, instead of giving up: for the rare read that must
    /// not wait for the void to go (the partner's medium read, `engine::partner_reads`).
    pub fn read_held_past_voids(
        &self,
        partition: u32,
        lun: u32,
        offset: u64,
        out: &mut [u8],
    ) -> Vec<(u64, u64)> {
        match self.read_held_with(partition, lun, offset, out, true) {
            HeldRead::Gaps(gaps) => gaps,
            HeldRead::Unsure => vec![(offset, offset + out.len() as u64)],
        }
    }

    fn read_held_with(
        &self,
        partition: u32,
        lun: u32,
        offset: u64,
        out: &mut [u8],
        past_voids: bool,
    ) -> HeldRead {
        let end = offset + out.len() as u64;
        let mut copied = Vec::new();
        // The highest seq found overwritten: it, and every record below it, was released.
        // (Only records overlapping the read matter: any that could supersede one of them
        // overlaps it too.)
        let mut gone = 0u64;
        let mut dead = VoidMarks::default();
        {
            let held = self.held();
            let Some(pp) = held.get(partition as usize) else {
                return HeldRead::Gaps(vec![(offset, end)]);
            };
            let log = self.partition_log(partition);
            // A void's span is in its payload (`nvram::void`); any void of the LUN will do,
            // unless the caller pays for reading them.
            if pp.records.holds_void(lun) {
                if !past_voids {
                    return HeldRead::Unsure;
                }
                let voids = pp
                    .records
                    .iter()
                    .filter(|(_, h)| h.kind == RecordKind::Void && h.lun == lun);
                let mut intact = Vec::new();
                for (&seq, h) in voids {
                    match self.held_header(log, partition, seq, h).and_then(|header| {
                        let data = self.record_data(log, h, &header)?;
                        Some((header, data.to_vec()))
                    }) {
                        Some(void) => intact.push(void),
                        // Overwritten: released, and so was every older record.
                        None => gone = gone.max(seq),
                    }
                }
                dead = VoidMarks::of_records(intact.iter().map(|(h, d)| (h, d.as_slice())));
            }
            for (seq, h) in pp.records.overlapping(lun, offset, end) {
                let h = &h;
                let Some(header) = self.held_header(log, partition, seq, h) else {
                    gone = gone.max(seq);
                    continue;
                };
                match self.copy_checked(log, partition, seq, h, &header) {
                    Some(payload) => copied.push(Copied {
                        seq,
                        header,
                        payload,
                    }),
                    None => gone = gone.max(seq),
                }
            }
        }
        let mut index = StagedIndex::new();
        let kept: Vec<&Copied> = copied
            .iter()
            .filter(|c| c.seq > gone)
            .filter(|c| {
                let h = &c.header;
                !dead.covers(h.lun, h.offset, u64::from(h.len), c.seq)
            })
            .collect();
        for (i, c) in kept.iter().enumerate() {
            let start = c.header.offset.max(offset);
            let stop = (c.header.offset + u64::from(c.header.len)).min(end);
            index.insert(Extent {
                start,
                end: stop,
                partition,
                seq: c.seq,
                // Here `nvram_off` names the copy: its number in `kept`, and where in its
                // payload the extent starts.
                src: match c.header.kind {
                    RecordKind::Data => Source::Log {
                        nvram_off: ((i as u64) << 32) | (start - c.header.offset),
                    },
                    _ => Source::Zero,
                },
            });
        }
        let gaps = index.copy_staged(offset, out, |source, dst| {
            let c = kept[(source >> 32) as usize];
            let at = (source & u64::from(u32::MAX)) as usize;
            dst.copy_from_slice(&c.payload[at..at + dst.len()]);
        });
        HeldRead::Gaps(gaps)
    }

    /// A copy of held record `seq`'s payload (empty for a zero record), if the record is
    /// still intact after the copy (its slot was not reused meanwhile).
    fn copy_checked(
        &self,
        log: &[u8],
        partition: u32,
        seq: u64,
        h: &Held,
        header: &RecordHeader,
    ) -> Option<Vec<u8>> {
        if header.kind != RecordKind::Data {
            return Some(Vec::new());
        }
        let start = usize::try_from(h.pos).ok()? + HEADER_BYTES as usize;
        let payload = log.get(start..start + header.data_len as usize)?.to_vec();
        let intact = payload.len() as u64 == u64::from(header.len)
            && rdma_link::checksum::crc32c(&payload) == header.data_crc
            && self
                .held_header(log, partition, seq, h)
                .is_some_and(|again| again == *header);
        intact.then_some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;
    use crate::nvram::record::RecordHeader;
    use crate::nvram::void::VoidMark;
    use crate::nvram::NvramRegion;
    use rdma_link::SecondStore;
    use std::sync::Arc;

    const PART: u64 = 1 << 20;
    const B: usize = 4096;

    struct Store {
        area: Arc<SecondStoreArea>,
        region: Arc<NvramRegion>,
        base: u64,
        next: u64,
    }

    impl Store {
        fn new() -> Store {
            let region = Arc::new(NvramRegion::in_memory(Arc::new(MemoryNvram::new(
                "held-reads",
                (crate::nvram::Layout::metadata_bytes(1) + PART) as usize,
            ))));
            let area = SecondStoreArea::of_source(region.clone(), 1, PART);
            Store {
                area,
                region,
                base: crate::nvram::Layout::metadata_bytes(1),
                next: 0,
            }
        }

        /// Lands a record of the partner as its mirror post would: bytes, then the hold.
        fn land(&mut self, h: RecordHeader, data: &[u8]) -> u64 {
            let at = self.next;
            self.region.write_at(self.base + at, &h.encode());
            self.region.write_at(self.base + at + HEADER_BYTES, data);
            self.area
                .hold_record(0, h.seq, at, h.slot() as u32)
                .expect("held");
            self.next += h.slot();
            at
        }

        fn data(&mut self, seq: u64, block: u64, fill: &[u8]) -> u64 {
            self.land(
                RecordHeader::test_data(7, 0, seq, block * B as u64, fill),
                fill,
            )
        }

        fn read(&self, block: u64, blocks: usize) -> (Vec<u8>, HeldRead) {
            let mut out = vec![0xeeu8; blocks * B];
            let r = self.area.read_held(0, 0, block * B as u64, &mut out);
            (out, r)
        }
    }

    #[test]
    fn the_newest_held_record_wins_and_the_rest_are_gaps() {
        let mut s = Store::new();
        s.data(1, 0, &[b'a'; 2 * B]);
        s.data(2, 1, &[b'b'; B]);
        let (out, r) = s.read(0, 3);
        assert_eq!(r, HeldRead::Gaps(vec![(2 * B as u64, 3 * B as u64)]));
        assert!(out[..B].iter().all(|&x| x == b'a'));
        assert!(out[B..2 * B].iter().all(|&x| x == b'b'));
        assert!(
            out[2 * B..].iter().all(|&x| x == 0xee),
            "a gap is left alone"
        );
        // A zero record over the first block.
        let zero = RecordHeader {
            kind: RecordKind::Zero,
            len: B as u32,
            data_len: 0,
            data_crc: rdma_link::checksum::crc32c(&[]),
            ..RecordHeader::test_data(7, 0, 3, 0, &[])
        };
        s.land(zero, &[]);
        let (out, _) = s.read(0, 1);
        assert!(out.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_reused_slot_drops_its_record_and_every_older_one() {
        let mut s = Store::new();
        s.data(1, 0, &[b'a'; B]);
        let second = s.data(2, 1, &[b'b'; B]);
        s.data(3, 2, &[b'c'; B]);
        // The partner released through seq 2 and reused seq 2's slot before its release
        // reached us: seq 1 still looks intact but is on our medium, as seq 2 is.
        s.region
            .write_at(s.base + second + HEADER_BYTES, &[b'x'; 100]);
        let (out, r) = s.read(0, 3);
        assert_eq!(r, HeldRead::Gaps(vec![(0, 2 * B as u64)]));
        assert!(out[2 * B..].iter().all(|&x| x == b'c'));
    }

    #[test]
    fn a_held_void_record_of_the_lun_sends_the_read_to_the_owner() {
        let mut s = Store::new();
        s.data(1, 0, &[b'a'; B]);
        let payload = VoidMark::payload(0, PART, 3);
        let void = RecordHeader {
            kind: RecordKind::Void,
            len: 0,
            data_len: payload.len() as u32,
            data_crc: rdma_link::checksum::crc32c(&payload),
            ..RecordHeader::test_data(7, 0, 2, 0, &[])
        };
        s.land(void, &payload);
        assert_eq!(s.read(8, 1).1, HeldRead::Unsure);
    }

    /// The partner's medium read reads the void instead: the records it kills (older, in
    /// its span) leave gaps, the rest are read.
    #[test]
    fn reading_past_voids_leaves_out_only_the_records_a_void_kills() {
        let mut s = Store::new();
        s.data(1, 0, &[b'a'; B]);
        s.data(2, 4, &[b'b'; B]);
        let payload = VoidMark::payload(0, 2 * B as u64, 3);
        let void = RecordHeader {
            kind: RecordKind::Void,
            len: 0,
            data_len: payload.len() as u32,
            data_crc: rdma_link::checksum::crc32c(&payload),
            ..RecordHeader::test_data(7, 0, 3, 0, &[])
        };
        s.land(void, &payload);
        s.data(4, 1, &[b'c'; B]);
        let mut out = vec![0xeeu8; 5 * B];
        let gaps = s.area.read_held_past_voids(0, 0, 0, &mut out);
        assert_eq!(gaps, vec![(0, B as u64), (2 * B as u64, 4 * B as u64)]);
        assert!(out[..B].iter().all(|&x| x == 0xee), "killed by the void");
        assert!(
            out[B..2 * B].iter().all(|&x| x == b'c'),
            "newer than the void"
        );
        assert!(out[4 * B..].iter().all(|&x| x == b'b'), "outside its span");
    }
}
