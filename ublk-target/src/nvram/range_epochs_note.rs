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

const ENTRY: usize = 12;
const HEAD: usize = 8;
const CRC_AT: usize = BYTES - 4;
/// Entries the note holds.
pub const MAX_ENTRIES: usize = (CRC_AT - HEAD) / ENTRY;

/// A global range (`Lun::first_range` + range) and the epoch the table gave it when noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RangeEpoch {
    pub range: u32,
    pub epoch: u64,
}

fn encode(note: Note, entries: &[RangeEpoch]) -> io::Result<[u8; BYTES]> {
    if entries.len() > MAX_ENTRIES {
        return Err(io::Error::other(format!(
            "{} ranges lost with staged records at once do not fit the NVRAM's note of them (at most {MAX_ENTRIES}); start the node that took them first, so that it finishes replaying them",
            entries.len()
        )));
    }
    let mut b = [0u8; BYTES];
    if entries.is_empty() {
        return Ok(b);
    }
    b[0..4].copy_from_slice(&note.magic().to_le_bytes());
    b[4..8].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = HEAD + i * ENTRY;
        b[at..at + 4].copy_from_slice(&e.range.to_le_bytes());
        b[at + 4..at + 12].copy_from_slice(&e.epoch.to_le_bytes());
    }
    let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// Empty for an empty slot. A damaged note reads as empty too: each is written before what
/// it describes happens (the log moving past the records; the partition stopping with
/// them), so a torn write of it leaves the records in a log that a start reads as before.
fn decode(note: Note, b: &[u8; BYTES]) -> Vec<RangeEpoch> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != note.magic() || u32_at(CRC_AT) != rdma_link::checksum::crc32c(&b[..CRC_AT]) {
        return Vec::new();
    }
    let n = (u32_at(4) as usize).min(MAX_ENTRIES);
    (0..n)
        .map(|i| {
            let at = HEAD + i * ENTRY;
            let mut epoch = [0u8; 8];
            epoch.copy_from_slice(&b[at + 4..at + 12]);
            RangeEpoch {
                range: u32_at(at),
                epoch: u64::from_le_bytes(epoch),
            }
        })
        .collect()
}

/// Replaces the note with `entries` (none clears it), durably.
pub fn write(
    region: &NvramRegion,
    layout: &Layout,
    note: Note,
    entries: &[RangeEpoch],
) -> io::Result<()> {
    let off = layout.checkpoint_offset(0, note.slot());
    region.write_at(off, &encode(note, entries)?);
    region.persist(off, BYTES as u64)
}

/// The noted ranges (none if there is no note).
pub fn read(region: &NvramRegion, layout: &Layout, note: Note) -> Vec<RangeEpoch> {
    decode(
        note,
        &super::range_note::read(region, layout.checkpoint_offset(0, note.slot())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips_and_damage_reads_as_empty() {
        let entries = vec![
            RangeEpoch { range: 0, epoch: 3 },
            RangeEpoch {
                range: 7,
                epoch: u64::MAX,
            },
        ];
        let mut b = encode(Note::Dropped, &entries).expect("fits");
        assert_eq!(decode(Note::Dropped, &b), entries);
        assert!(
            decode(Note::Kept, &b).is_empty(),
            "one note is not the other"
        );
        b[HEAD + 2] ^= 0x10;
        assert!(
            decode(Note::Dropped, &b).is_empty(),
            "a torn note is no note"
        );
        assert!(decode(Note::Kept, &[0u8; BYTES]).is_empty());
        assert_eq!(encode(Note::Kept, &[]).expect("empty"), [0u8; BYTES]);
        let full = vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES];
        assert_eq!(
            decode(Note::Kept, &encode(Note::Kept, &full).expect("fits")),
            full
        );
        assert!(encode(
            Note::Kept,
            &vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES + 1]
        )
        .is_err());
    }
}
