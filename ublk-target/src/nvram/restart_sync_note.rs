//! A restart sync under way (`storage = "own"`), noted in this node's NVRAM.
//!
//! A start replays our log into our medium even for ranges our medium is outdated for, and
//! then advances the log past the replayed records. Those ranges stay closed until the
//! partner has written its copies of the records to its medium (`engine::restart_sync`).
//! If this node stops again before that, the next start finds no records to replay and
//! would open the ranges with the partner's medium missing them, and the repair would copy
//! the partner's older bytes over ours (simulator seed 31444 with --storage own --takeover
//! manual --write-priority). So before the log advances, each partition's note keeps the
//! last seq replayed and the ranges it touched; a start reads the notes back, and they are
//! cleared once the partner has written its copies.

use super::layout::{Layout, PartitionCheckpoint, META_BLOCK};
use super::range_note;
use super::region::NvramRegion;
use std::io;

/// "RSYN".
const MAGIC: u32 = 0x4e59_5352;
/// In each partition's metadata block: slots 0-1 hold its log checkpoints, 2-3 the second
/// store's watermark, 4 (partition 0's) the takeover note.
const SLOT: u64 = 5;
const _: () = assert!((SLOT + 1) * PartitionCheckpoint::SLOT_BYTES <= META_BLOCK);
/// Range numbers (global, over every LUN) the note can hold.
pub const MAX_RANGES: usize = range_note::max_ranges(8);

/// One partition's part: its records through seq `through` were replayed into our
/// outdated medium, of `ranges` (global range numbers, `Lun::first_range` + range).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartSyncNote {
    pub through: u64,
    pub ranges: Vec<u32>,
}

/// Writes (or with `None` clears) partition `p`'s note, durably. A torn write leaves the
/// note as it was (`range_note`): written before the log advances (the records are still in
/// the log, or the earlier note still names them), cleared after the partner wrote its
/// copies.
pub fn write(
    region: &NvramRegion,
    layout: &Layout,
    p: u32,
    note: Option<&RestartSyncNote>,
) -> io::Result<()> {
    let through = note.map(|n| n.through.to_le_bytes());
    range_note::write_ranges(
        region,
        layout.checkpoint_offset(p, SLOT),
        MAGIC,
        note.zip(through.as_ref())
            .map(|(n, through)| (through.as_slice(), n.ranges.as_slice())),
        "restart sync note",
    )
}

/// Partition `p`'s note, if a restart sync was under way when this node stopped.
pub fn read(region: &NvramRegion, layout: &Layout, p: u32) -> Option<RestartSyncNote> {
    let (fields, ranges) =
        range_note::read_ranges(region, layout.checkpoint_offset(p, SLOT), MAGIC, 8)?;
    let through = u64::from_le_bytes(fields.try_into().ok()?);
    Some(RestartSyncNote { through, ranges })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;
    use std::sync::Arc;

    #[test]
    fn a_note_round_trips_per_partition_and_clears() {
        let layout = Layout::compute(64 << 20, 4, true).expect("layout");
        let region = NvramRegion::in_memory(Arc::new(MemoryNvram::new("nvram", 64 << 20)));
        let n = RestartSyncNote {
            through: 0x0102_0304_0506_0708,
            ranges: vec![0, 3, 9, MAX_RANGES as u32 - 1],
        };
        write(&region, &layout, 2, Some(&n)).expect("write");
        assert_eq!(read(&region, &layout, 2), Some(n));
        assert_eq!(read(&region, &layout, 1), None);
        write(&region, &layout, 2, None).expect("clear");
        assert_eq!(read(&region, &layout, 2), None);
        let too_far = RestartSyncNote {
            through: 1,
            ranges: vec![MAX_RANGES as u32],
        };
        assert!(write(&region, &layout, 0, Some(&too_far)).is_err());
    }
}
