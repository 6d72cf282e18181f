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
use crate::index::{Extent, Piece, Source, StagedIndex};
use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES};

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
        let end = offset + out.len() as u64;
        let overlaps = |h: &RecordHeader| {
            h.lun == lun && h.offset < end && offset < h.offset.saturating_add(u64::from(h.len))
        };
        let mut copied = Vec::new();
        // The highest seq found overwritten: it, and every record below it, was released.
        let mut gone = 0u64;
        {
            let held = self.held();
            let Some(pp) = held.get(partition as usize) else {
                return HeldRead::Gaps(vec![(offset, end)]);
            };
            let log = self.partition_log(partition);
            for (&seq, h) in &pp.records {
                let Some(header) = self.held_header(log, partition, seq, h) else {
                    gone = gone.max(seq);
                    continue;
                };
                match header.kind {
                    // Its span is in its payload (`nvram::void`); any void of the LUN will do.
                    RecordKind::Void if header.lun == lun => return HeldRead::Unsure,
                    RecordKind::Data | RecordKind::Zero if overlaps(&header) => {}
                    _ => continue,
                }
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
        let kept: Vec<&Copied> = copied.iter().filter(|c| c.seq > gone).collect();
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
        let mut gaps = Vec::new();
        for piece in index.lookup(offset, end) {
            match piece {
                Piece::Staged(x) => {
                    let dst = &mut out[(x.start - offset) as usize..(x.end - offset) as usize];
                    match x.src {
                        Source::Log { nvram_off } => {
                            let c = kept[(nvram_off >> 32) as usize];
                            let at = (nvram_off & u64::from(u32::MAX)) as usize;
                            dst.copy_from_slice(&c.payload[at..at + dst.len()]);
                        }
                        Source::Zero => dst.fill(0),
                    }
                }
                Piece::Medium { start, end } => gaps.push((start, end)),
            }
        }
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
            && crc32c::crc32c(&payload) == header.data_crc
            && self
                .held_header(log, partition, seq, h)
                .is_some_and(|again| again == *header);
        intact.then_some(payload)
    }
}
