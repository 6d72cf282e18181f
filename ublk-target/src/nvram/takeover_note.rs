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
use super::range_note::{self, BYTES};
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

impl TakeoverNote {
    fn encode(&self) -> io::Result<[u8; BYTES]> {
        range_note::encode(
            MAGIC,
            &self.from.to_le_bytes(),
            &self.ranges,
            "takeover note",
        )
    }

    /// None for an empty slot; a damaged note also reads as none (it was being written or
    /// cleared when the node died: a torn write of the note comes before the claim, a torn
    /// clear after the replay).
    fn decode(b: &[u8; BYTES]) -> Option<TakeoverNote> {
        let (fields, ranges) = range_note::decode(MAGIC, 4, b)?;
        let from = u32::from_le_bytes(fields.try_into().ok()?);
        Some(TakeoverNote { from, ranges })
    }
}

/// Writes (or with `None` clears) the note, durably.
pub fn write(region: &NvramRegion, layout: &Layout, note: Option<&TakeoverNote>) -> io::Result<()> {
    let bytes = match note {
        Some(n) => n.encode()?,
        None => [0u8; BYTES],
    };
    range_note::write(region, layout.checkpoint_offset(0, SLOT), &bytes)
}

/// The note, if a takeover was under way when this node stopped.
pub fn read(region: &NvramRegion, layout: &Layout) -> Option<TakeoverNote> {
    TakeoverNote::decode(&range_note::read(region, layout.checkpoint_offset(0, SLOT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips_and_damage_reads_as_none() {
        let n = TakeoverNote {
            from: 1,
            ranges: vec![0, 3, 9, MAX_RANGES as u32 - 1],
        };
        let mut b = n.encode().expect("fits");
        assert_eq!(TakeoverNote::decode(&b), Some(n));
        b[12] ^= 0x40;
        assert_eq!(TakeoverNote::decode(&b), None, "a torn note is no note");
        assert_eq!(TakeoverNote::decode(&[0u8; BYTES]), None);
        let too_far = TakeoverNote {
            from: 0,
            ranges: vec![MAX_RANGES as u32],
        };
        assert!(too_far.encode().is_err());
    }
}
