//! A takeover under way, noted in this node's NVRAM.
//!
//! A takeover claims the partner's ranges on the medium (new epochs), then replays the
//! partner's mirrored writes from our second store into the medium. If this node dies in
//! between, nobody else writes them: the partner, restarting, skips its own records of
//! ranges the table no longer gives it (it trusts our replay). So the takeover notes the
//! ranges here before the claim and clears the note only after the replay; a start that
//! finds the note finishes the replay of those of its ranges the table gives us before
//! anything is served. The ranges' gates stay closed from the claim to the end of the
//! replay, so nothing newer than the mirrored records can have been written to them.

use super::layout::Layout;
use super::range_note;
use super::region::NvramRegion;
use std::io;

/// "TKON".
const MAGIC: u32 = 0x4e4f_4b54;
/// In partition 0's metadata block: slots 0-1 hold its log checkpoints, 2-3 the second
/// store's watermark of the partner's partition 0.
const SLOT: u64 = 4;
/// Range numbers (global, over every LUN) the note can hold.
pub const MAX_RANGES: usize = range_note::max_ranges(4);

/// The partner `from` whose ranges (global range numbers, `Lun::first_range` + range)
/// this node claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverNote {
    pub from: u32,
    pub ranges: Vec<u32>,
}

/// Writes (or with `None` clears) the note, durably. A torn write leaves the note as it
/// was (`range_note`): none before the claim, this one before the replay ended.
pub fn write(region: &NvramRegion, layout: &Layout, note: Option<&TakeoverNote>) -> io::Result<()> {
    let from = note.map(|n| n.from.to_le_bytes());
    range_note::write_ranges(
        region,
        layout.checkpoint_offset(0, SLOT),
        MAGIC,
        note.zip(from.as_ref())
            .map(|(n, from)| (from.as_slice(), n.ranges.as_slice())),
        "takeover note",
    )
}

/// The note, if a takeover was under way when this node stopped.
pub fn read(region: &NvramRegion, layout: &Layout) -> Option<TakeoverNote> {
    let (fields, ranges) =
        range_note::read_ranges(region, layout.checkpoint_offset(0, SLOT), MAGIC, 4)?;
    let from = u32::from_le_bytes(fields.try_into().ok()?);
    Some(TakeoverNote { from, ranges })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;
    use std::sync::Arc;

    #[test]
    fn a_note_round_trips_and_clears() {
        let layout = Layout::compute(64 << 20, 4, true).expect("layout");
        let region = NvramRegion::in_memory(Arc::new(MemoryNvram::new("nvram", 64 << 20)));
        assert_eq!(read(&region, &layout), None);
        let n = TakeoverNote {
            from: 1,
            ranges: vec![0, 3, 9, MAX_RANGES as u32 - 1],
        };
        write(&region, &layout, Some(&n)).expect("write");
        assert_eq!(read(&region, &layout), Some(n));
        write(&region, &layout, None).expect("clear");
        assert_eq!(read(&region, &layout), None);
        let too_far = TakeoverNote {
            from: 0,
            ranges: vec![MAX_RANGES as u32],
        };
        assert!(write(&region, &layout, Some(&too_far)).is_err());
    }
}
