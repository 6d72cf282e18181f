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
use super::range_note;
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
/// Entries the note holds (its body: a count, then the entries; `range_note` keeps two
/// copies of it, so that a torn update leaves the note as it was).
pub const MAX_ENTRIES: usize = (range_note::BODY - 4) / ENTRY;

/// A global range (`Lun::first_range` + range) and the epoch the table gave it when noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RangeEpoch {
    pub range: u32,
    pub epoch: u64,
}

fn encode(entries: &[RangeEpoch]) -> io::Result<Vec<u8>> {
    if entries.len() > MAX_ENTRIES {
        return Err(io::Error::other(format!(
            "{} ranges lost with staged records at once do not fit the NVRAM's note of them (at most {MAX_ENTRIES}); start the node that took them first, so that it finishes replaying them",
            entries.len()
        )));
    }
    let mut b = Vec::with_capacity(4 + entries.len() * ENTRY);
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.range.to_le_bytes());
        b.extend_from_slice(&e.epoch.to_le_bytes());
    }
    Ok(b)
}

fn decode(b: &[u8]) -> Vec<RangeEpoch> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let n = (u32_at(0) as usize).min(MAX_ENTRIES);
    (0..n)
        .map(|i| {
            let at = 4 + i * ENTRY;
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
    range_note::write_body(
        region,
        layout.checkpoint_offset(0, note.slot()),
        note.magic(),
        &encode(entries)?,
    )
}

/// The noted ranges (none if there is no note).
pub fn read(region: &NvramRegion, layout: &Layout, note: Note) -> Vec<RangeEpoch> {
    range_note::read_body(
        region,
        layout.checkpoint_offset(0, note.slot()),
        note.magic(),
    )
    .map(|b| decode(&b))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;
    use crate::nvram::range_note::tests::torn_updates_read_as_before_or_after;
    use std::sync::Arc;

    #[test]
    fn a_note_round_trips_and_the_other_note_is_apart() {
        let layout = Layout::compute(64 << 20, 4, true).expect("layout");
        let region = NvramRegion::in_memory(Arc::new(MemoryNvram::new("nvram", 64 << 20)));
        let entries = vec![
            RangeEpoch { range: 0, epoch: 3 },
            RangeEpoch {
                range: 7,
                epoch: u64::MAX,
            },
        ];
        write(&region, &layout, Note::Dropped, &entries).expect("write");
        assert_eq!(read(&region, &layout, Note::Dropped), entries);
        assert!(read(&region, &layout, Note::Kept).is_empty());
        let full = vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES];
        write(&region, &layout, Note::Kept, &full).expect("fits");
        assert_eq!(read(&region, &layout, Note::Kept), full);
        assert_eq!(read(&region, &layout, Note::Dropped), entries);
        assert!(write(
            &region,
            &layout,
            Note::Kept,
            &vec![RangeEpoch { range: 1, epoch: 1 }; MAX_ENTRIES + 1]
        )
        .is_err());
        write(&region, &layout, Note::Dropped, &[]).expect("clear");
        assert!(read(&region, &layout, Note::Dropped).is_empty());
    }

    /// A torn update reads as the note before it or after it, never as no note or a mix;
    /// a clear outranks the older copy's entries.
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
        let note = Note::Dropped;
        let off = layout.checkpoint_offset(0, note.slot());
        assert!(off < 1 << 20, "the test's NVRAM holds the slot");
        torn_updates_read_as_before_or_after(
            note.magic(),
            off,
            &steps,
            |region, entries| write(region, &layout, note, entries).expect("write"),
            |region| read(region, &layout, note),
            |entries| encode(entries).expect("fits"),
        );
    }
}
