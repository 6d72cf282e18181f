//! Two notes in this node's NVRAM of ranges whose staged records a start must treat by the
//! epoch the table gave a range when they were noted: each entry is a global range number
//! (`Lun::first_range` + range) and that epoch.
//!
//! - [`Note::Dropped`]: ranges a start dropped records of because the table gave them to
//!   another node. Until that node's replay of its mirror copies ends
//!   (`cluster::claim_note`), those copies are the only ones left; a takeover leaves such a
//!   range to its claimer meanwhile (`engine::dropped_ranges`, simulator seed 6420).
//! - [`Note::Kept`]: ranges lost while running to a takeover that may be unfinished, whose
//!   records this node kept for a restart instead of voiding them (`engine::lost_ranges`).
//!   If the table gives such a range back to this node by the start, the claim finished
//!   (a giveback) and the kept records are older than what was written since: the start
//!   does not replay them (simulator seed 6665).

use super::layout::Layout;
use super::range_note::BYTES;
use super::region::NvramRegion;
use std::io;

/// Which note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    Dropped,
    Kept,
}

impl Note {
    fn magic(self) -> u32 {
        match self {
            Note::Dropped => 0x5244_564e, // "NVDR"
            Note::Kept => 0x504b_564e,    // "NVKP"
        }
    }

    /// In partition 0's metadata block: slot 4 is the takeover note's, 5 the restart sync
    /// note's.
    fn slot(self) -> u64 {
        match self {
            Note::Dropped => 6,
            Note::Kept => 7,
        }
    }
}

/// The slot holds two copies of the note, each with a generation; an update overwrites the
/// older copy, so a torn write of it (a power cut in the middle) leaves the newer one, the
/// note as it was before the update began. Each note is written before what it describes
/// happens (the log moving past the records; the partition stopping with them), so the note
/// as it was is the right one then. One copy per slot would read as no note at all after a
/// torn write and forget the earlier entries with the new one.
const COPY: usize = BYTES / 2;
const ENTRY: usize = 12;
/// magic, generation, entry count.
const HEAD: usize = 12;
const CRC_AT: usize = COPY - 4;
/// Entries the note holds.
pub const MAX_ENTRIES: usize = (CRC_AT - HEAD) / ENTRY;

/// A global range (`Lun::first_range` + range) and the epoch the table gave it when noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RangeEpoch {
    pub range: u32,
    pub epoch: u64,
}

/// One copy of the note, generation `generation`. An empty note is a valid copy too, so
/// that clearing the note outranks the older copy's entries.
fn encode(note: Note, generation: u32, entries: &[RangeEpoch]) -> io::Result<[u8; COPY]> {
    if entries.len() > MAX_ENTRIES {
        return Err(io::Error::other(format!(
            "{} ranges lost with staged records at once do not fit the NVRAM's note of them (at most {MAX_ENTRIES}); start the node that took them first, so that it finishes replaying them",
            entries.len()
        )));
    }
    let mut b = [0u8; COPY];
    b[0..4].copy_from_slice(&note.magic().to_le_bytes());
    b[4..8].copy_from_slice(&generation.to_le_bytes());
    b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = HEAD + i * ENTRY;
        b[at..at + 4].copy_from_slice(&e.range.to_le_bytes());
        b[at + 4..at + 12].copy_from_slice(&e.epoch.to_le_bytes());
    }
    let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// A copy's generation and entries; None for an empty or damaged copy, or another note's.
fn decode(note: Note, b: &[u8]) -> Option<(u32, Vec<RangeEpoch>)> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != note.magic() || u32_at(CRC_AT) != rdma_link::checksum::crc32c(&b[..CRC_AT]) {
        return None;
    }
    let n = (u32_at(8) as usize).min(MAX_ENTRIES);
    let entries = (0..n)
        .map(|i| {
            let at = HEAD + i * ENTRY;
            let mut epoch = [0u8; 8];
            epoch.copy_from_slice(&b[at + 4..at + 12]);
            RangeEpoch {
                range: u32_at(at),
                epoch: u64::from_le_bytes(epoch),
            }
        })
        .collect();
    Some((u32_at(4), entries))
}

/// The newer valid copy in a slot's bytes: which copy it is, its generation and entries.
fn newest(note: Note, slot: &[u8; BYTES]) -> Option<(usize, u32, Vec<RangeEpoch>)> {
    let copies = [0, 1].map(|i| decode(note, &slot[i * COPY..(i + 1) * COPY]));
    match copies {
        [Some((g0, e0)), Some((g1, e1))] => Some(if (g1.wrapping_sub(g0) as i32) > 0 {
            (1, g1, e1)
        } else {
            (0, g0, e0)
        }),
        [Some((g, e)), None] => Some((0, g, e)),
        [None, Some((g, e))] => Some((1, g, e)),
        [None, None] => None,
    }
}

/// Replaces the note with `entries` (none clears it), durably: overwrites the older copy.
pub fn write(
    region: &NvramRegion,
    layout: &Layout,
    note: Note,
    entries: &[RangeEpoch],
) -> io::Result<()> {
    let (at, generation) = next_copy(region, layout, note);
    region.write_at(at, &encode(note, generation, entries)?);
    region.persist(at, COPY as u64)
}

/// Where the next update of `note` goes (the older copy's NVRAM offset) and its generation.
fn next_copy(region: &NvramRegion, layout: &Layout, note: Note) -> (u64, u32) {
    let off = layout.checkpoint_offset(0, note.slot());
    let (copy, generation) = match newest(note, &super::range_note::read(region, off)) {
        Some((copy, generation, _)) => (1 - copy, generation.wrapping_add(1)),
        None => (0, 1),
    };
    (off + (copy * COPY) as u64, generation)
}

/// The noted ranges (none if there is no note).
pub fn read(region: &NvramRegion, layout: &Layout, note: Note) -> Vec<RangeEpoch> {
    let off = layout.checkpoint_offset(0, note.slot());
    newest(note, &super::range_note::read(region, off))
        .map(|(_, _, entries)| entries)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::{MemoryNvram, CACHE_LINE};
    use std::sync::Arc;

    #[test]
    fn a_copy_round_trips_and_damage_reads_as_none() {
        let entries = vec![
            RangeEpoch { range: 0, epoch: 3 },
            RangeEpoch {
                range: 7,
                epoch: u64::MAX,
            },
        ];
        let mut b = encode(Note::Dropped, 5, &entries).expect("fits");
        assert_eq!(decode(Note::Dropped, &b), Some((5, entries)));
        assert_eq!(decode(Note::Kept, &b), None, "one note is not the other");
        b[HEAD + 2] ^= 0x10;
        assert_eq!(decode(Note::Dropped, &b), None, "a torn copy is no copy");
        assert_eq!(decode(Note::Kept, &[0u8; COPY]), None);
        let full = vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES];
        let b = encode(Note::Kept, 1, &full).expect("fits");
        assert_eq!(decode(Note::Kept, &b), Some((1, full)));
        assert!(encode(
            Note::Kept,
            1,
            &vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES + 1]
        )
        .is_err());
    }

    /// Every way a power cut can tear an update (each cache line of the copy being written
    /// kept new or left old) reads back as the note before the update or after it, never as
    /// no note or a mix; a clear outranks the older copy's entries.
    #[test]
    fn a_torn_update_reads_as_the_note_before_it() {
        let layout = Layout::compute(64 << 20, 4, true).expect("layout");
        let e = |range, epoch| RangeEpoch { range, epoch };
        let steps: Vec<Vec<RangeEpoch>> = vec![
            vec![e(1, 2)],
            vec![e(1, 2), e(3, 4)],
            vec![],
            vec![e(5, 6)],
            vec![e(5, 6), e(6, 7), e(7, 8)],
        ];
        let lines = COPY / CACHE_LINE;
        for (i, next) in steps.iter().enumerate() {
            for torn in 0..(1u32 << lines) {
                let memory = Arc::new(MemoryNvram::new("nvram", 64 << 20));
                let region = NvramRegion::in_memory(memory.clone());
                for done in &steps[..i] {
                    write(&region, &layout, Note::Dropped, done).expect("write");
                }
                let before = read(&region, &layout, Note::Dropped);
                assert_eq!(&before, steps[..i].last().unwrap_or(&vec![]));
                // The update's stores, not yet persisted, then the cut.
                let (at, generation) = next_copy(&region, &layout, Note::Dropped);
                region.write_at(at, &encode(Note::Dropped, generation, next).expect("fits"));
                let first_line = at as usize / CACHE_LINE;
                memory.power_cut(|line| {
                    line.checked_sub(first_line)
                        .is_some_and(|l| l < lines && torn & (1 << l) != 0)
                });
                let after = read(&region, &layout, Note::Dropped);
                match torn {
                    0 => assert_eq!(after, before, "step {i}: no line kept"),
                    t if t == (1 << lines) - 1 => {
                        assert_eq!(&after, next, "step {i}: every line kept")
                    }
                    _ => assert!(
                        after == before || &after == next,
                        "step {i}, lines kept {torn:#b}: {after:?}, neither {before:?} nor {next:?}"
                    ),
                }
                assert!(read(&region, &layout, Note::Kept).is_empty());
            }
        }
    }
}
