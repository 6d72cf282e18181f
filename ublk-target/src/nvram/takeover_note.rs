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

use super::layout::{Layout, PartitionCheckpoint};
use super::region::NvramRegion;
use std::io;

/// "TKON".
const MAGIC: u32 = 0x4e4f_4b54;
/// In partition 0's metadata block: slots 0-1 hold its log checkpoints, 2-3 the second
/// store's watermark of the partner's partition 0.
const SLOT: u64 = 4;
const BYTES: usize = PartitionCheckpoint::SLOT_BYTES as usize;
/// magic, from, bitmap length in bits; the crc32c at the end.
const HEAD: usize = 12;
const CRC_AT: usize = BYTES - 4;
/// Range numbers (global, over every LUN) the bitmap can hold; the ownership table holds
/// fewer (`ownership::MAX_ENTRIES`).
pub const MAX_RANGES: usize = (CRC_AT - HEAD) * 8;

/// The partner `from` whose ranges (global range numbers, `Lun::first_range` + range)
/// this node claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverNote {
    pub from: u32,
    pub ranges: Vec<u32>,
}

impl TakeoverNote {
    fn encode(&self) -> io::Result<[u8; BYTES]> {
        let mut b = [0u8; BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.from.to_le_bytes());
        b[8..12].copy_from_slice(&(MAX_RANGES as u32).to_le_bytes());
        for &r in &self.ranges {
            let r = r as usize;
            if r >= MAX_RANGES {
                return Err(io::Error::other(format!(
                    "range {r} does not fit the takeover note (at most {MAX_RANGES} ranges)"
                )));
            }
            b[HEAD + r / 8] |= 1 << (r % 8);
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// None for an empty slot; a damaged note also reads as none (it was being written or
    /// cleared when the node died: a torn write of the note comes before the claim, a torn
    /// clear after the replay).
    fn decode(b: &[u8; BYTES]) -> Option<TakeoverNote> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC || u32_at(CRC_AT) != crc32c::crc32c(&b[..CRC_AT]) {
            return None;
        }
        let bits = (u32_at(8) as usize).min(MAX_RANGES);
        let ranges = (0..bits)
            .filter(|&r| b[HEAD + r / 8] & (1 << (r % 8)) != 0)
            .map(|r| r as u32)
            .collect();
        Some(TakeoverNote {
            from: u32_at(4),
            ranges,
        })
    }
}

/// Writes (or with `None` clears) the note, durably.
pub fn write(region: &NvramRegion, layout: &Layout, note: Option<&TakeoverNote>) -> io::Result<()> {
    let bytes = match note {
        Some(n) => n.encode()?,
        None => [0u8; BYTES],
    };
    let off = layout.checkpoint_offset(0, SLOT);
    region.write_at(off, &bytes);
    region.persist(off, BYTES as u64)
}

/// The note, if a takeover was under way when this node stopped.
pub fn read(region: &NvramRegion, layout: &Layout) -> Option<TakeoverNote> {
    let mut b = [0u8; BYTES];
    region.read_at(layout.checkpoint_offset(0, SLOT), &mut b);
    TakeoverNote::decode(&b)
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
        b[HEAD] ^= 0x40;
        assert_eq!(TakeoverNote::decode(&b), None, "a torn note is no note");
        assert_eq!(TakeoverNote::decode(&[0u8; BYTES]), None);
        let too_far = TakeoverNote {
            from: 0,
            ranges: vec![MAX_RANGES as u32],
        };
        assert!(too_far.encode().is_err());
    }
}
