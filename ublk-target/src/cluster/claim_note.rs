//! A takeover's claim whose replay has not ended, noted on the arbiter (the shared medium's
//! metadata area).
//!
//! A takeover claims the old owner's ranges in the table (new epochs), then replays the old
//! owner's mirrored writes from its second store. Until that replay ends the taker serves
//! nothing of those ranges, so the old owner's own staged records of them are the newest data
//! there is. The old owner, restarting, skips its records of ranges the table no longer gives
//! it (the taker replays them from its copies); if the taker died before its replay and the
//! old owner later took the ranges back, those writes were gone (simulator seed 4755: two
//! overlapping failures). The taker's NVRAM note (`nvram::takeover_note`) lets the taker
//! finish at its own restart; this note tells the old owner, which cannot read the taker's
//! NVRAM, that the claim is unfinished (`engine::unfinished_claims`).
//!
//! Slot `CLAIM_SLOT + taker`: only the taker writes it, before the claim, and clears it after
//! the replay, before the ranges open. Each entry names the epoch the claim gave the range and
//! counts only while the table still gives the range to the taker at that epoch, so a note
//! the claim never followed, or one left behind, says nothing about a range that moved on. A
//! damaged slot reads as no note: a torn write of it comes before the claim, a torn clear
//! after the replay.

use crate::ownership::{OwnershipTable, TableError, TableStore, CLAIM_SLOT, SLOT_BYTES};
use std::collections::BTreeMap;

const CLAIM_MAGIC: u32 = 0x4e43_564e; // "NVCN"
const CLAIM_VERSION: u32 = 1;
/// Takers the slots have room for (to the end of the metadata area).
pub const MAX_TAKERS: u32 = 16;
const _: () =
    assert!(CLAIM_SLOT + MAX_TAKERS as u64 <= crate::ownership::METADATA_BYTES / SLOT_BYTES);
const HEADER: usize = 32;
const CRC_AT: usize = SLOT_BYTES as usize - 4;
/// Global ranges one note holds an epoch for.
pub const MAX_RANGES: usize = (CRC_AT - HEADER) / 8;

/// `taker` claimed ranges from `from`: per global range (`Lun::first_range` + range), the
/// epoch the claim wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimNote {
    pub taker: u32,
    pub from: u32,
    pub epochs: BTreeMap<u32, u64>,
}

impl ClaimNote {
    fn encode(&self, cluster_id: u64) -> Result<Vec<u8>, TableError> {
        if let Some((&r, _)) = self.epochs.iter().find(|(&r, _)| r as usize >= MAX_RANGES) {
            return Err(TableError::TooLarge(r as usize + 1));
        }
        let mut b = vec![0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(&CLAIM_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&CLAIM_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&cluster_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.taker.to_le_bytes());
        b[20..24].copy_from_slice(&self.from.to_le_bytes());
        for (&r, &epoch) in &self.epochs {
            let at = HEADER + r as usize * 8;
            b[at..at + 8].copy_from_slice(&epoch.to_le_bytes());
        }
        let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// None: blank, damaged, of another cluster or another taker's slot, or a version this
    /// build does not know (each reads as no note; see the module's notes).
    fn decode(b: &[u8], cluster_id: u64, taker: u32) -> Option<ClaimNote> {
        if b.len() < SLOT_BYTES as usize {
            return None;
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let long = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        if word(0) != CLAIM_MAGIC
            || word(4) != CLAIM_VERSION
            || rdma_link::checksum::crc32c(&b[..CRC_AT]) != word(CRC_AT)
            || long(8) != cluster_id
            || word(16) != taker
        {
            return None;
        }
        let epochs = (0..MAX_RANGES as u32)
            .map(|r| (r, long(HEADER + r as usize * 8)))
            .filter(|&(_, epoch)| epoch != 0)
            .collect();
        Some(ClaimNote {
            taker,
            from: word(20),
            epochs,
        })
    }

    /// The (LUN, range)s of `t` this note still describes: the table gives them to the taker
    /// at the epoch the claim wrote.
    pub fn unfinished(&self, t: &OwnershipTable) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut global = 0u32;
        for (l, ranges) in t.luns.iter().enumerate() {
            for (r, entry) in ranges.iter().enumerate() {
                let claimed = self.epochs.get(&global);
                if entry.owner == self.taker && claimed == Some(&entry.epoch) {
                    out.push((l as u32, r as u32));
                }
                global += 1;
            }
        }
        out
    }
}

fn slot(taker: u32) -> Result<u64, TableError> {
    if taker >= MAX_TAKERS {
        return Err(TableError::TooLarge(taker as usize + 1));
    }
    Ok(CLAIM_SLOT + taker as u64)
}

/// `taker`'s note, if it has one standing.
pub fn load(
    store: &dyn TableStore,
    cluster_id: u64,
    taker: u32,
) -> Result<Option<ClaimNote>, TableError> {
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    store.read_slot(slot(taker)?, &mut buf)?;
    Ok(ClaimNote::decode(&buf, cluster_id, taker))
}

/// Writes `note` into its taker's slot.
pub fn save(store: &dyn TableStore, cluster_id: u64, note: &ClaimNote) -> Result<(), TableError> {
    store.write_slot(slot(note.taker)?, &note.encode(cluster_id)?)?;
    Ok(())
}

/// Per claiming node, the (LUN, range)s of its unfinished claim.
pub type Unfinished = Vec<(u32, Vec<(u32, u32)>)>;

/// Per node other than `me` (of `nodes`) whose note names ranges it claimed from `me` and
/// has not finished replaying: those ranges, as the table on the medium says now.
pub fn unfinished_on(
    store: &dyn TableStore,
    cluster_id: u64,
    me: u32,
    nodes: u32,
) -> Result<Unfinished, TableError> {
    let Some(t) = crate::ownership::load(store)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for taker in (0..nodes.min(MAX_TAKERS)).filter(|&n| n != me) {
        let Some(note) = load(store, cluster_id, taker)? else {
            continue;
        };
        let ranges = note.unfinished(&t);
        if note.from == me && !ranges.is_empty() {
            out.push((taker, ranges));
        }
    }
    Ok(out)
}

/// Clears `taker`'s slot.
pub fn clear(store: &dyn TableStore, taker: u32) -> Result<(), TableError> {
    store.write_slot(slot(taker)?, &vec![0u8; SLOT_BYTES as usize])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::RangeOwner;

    fn table(entries: &[(u32, u64)]) -> OwnershipTable {
        OwnershipTable {
            cluster_id: 7,
            generation: 1,
            luns: vec![entries
                .iter()
                .map(|&(owner, epoch)| RangeOwner { owner, epoch })
                .collect()],
        }
    }

    #[test]
    fn a_note_round_trips_and_counts_only_at_the_claimed_epoch() {
        let note = ClaimNote {
            taker: 0,
            from: 1,
            epochs: BTreeMap::from([(1, 5), (2, 9)]),
        };
        let bytes = note.encode(7).expect("fits");
        assert_eq!(ClaimNote::decode(&bytes, 7, 0), Some(note.clone()));
        // Another cluster's or another taker's slot is no note.
        assert_eq!(ClaimNote::decode(&bytes, 8, 0), None);
        assert_eq!(ClaimNote::decode(&bytes, 7, 1), None);
        // Range 1 is the taker's at the claimed epoch; range 2 moved on; range 0 was not claimed.
        let t = table(&[(0, 3), (0, 5), (0, 10)]);
        assert_eq!(note.unfinished(&t), vec![(0, 1)]);
        // The old owner took range 1 back: nothing unfinished.
        let t = table(&[(0, 3), (1, 6), (0, 9)]);
        assert_eq!(note.unfinished(&t), vec![(0, 2)]);
    }

    #[test]
    fn a_torn_or_blank_slot_reads_as_no_note() {
        let note = ClaimNote {
            taker: 1,
            from: 0,
            epochs: BTreeMap::from([(0, 2)]),
        };
        let mut bytes = note.encode(7).expect("fits");
        bytes[HEADER] ^= 1;
        assert_eq!(ClaimNote::decode(&bytes, 7, 1), None);
        assert_eq!(
            ClaimNote::decode(&vec![0u8; SLOT_BYTES as usize], 7, 1),
            None
        );
    }
}
