//! Ranges whose staged records a start dropped, left to the node that took them until its
//! replay of them ends.
//!
//! A start replays only the records of ranges the table gives this node; the node that took
//! the others over replays its mirror copies of them. Its claim note (`cluster::claim_note`)
//! stands until that replay ends. While it stands, those copies may be the only ones left of
//! writes this node acknowledged, so a takeover from that node must not take the ranges back:
//! it would serve them without those writes (simulator seed 6420: the taker's restart kept
//! failing, this node restarted, found it alive and dropped its records, and the taker
//! died). The start notes what it drops (`nvram::range_epochs_note`); a takeover leaves such a
//! range to its claimer, which finishes the replay when it starts again.
//!
//! A start that finds the claimer dead replays its own records of the claimed ranges
//! instead (`unfinished_claims`) and drops none of them, so those ranges can be taken.

use super::core::{Engine, EngineError};
use crate::cluster::{Cluster, LunRange, NodeId};
use crate::lun::Lun;
use crate::nvram::range_epochs_note::{self as note, Note, RangeEpoch};
use crate::nvram::scan::ScanResult;
use crate::nvram::{Layout, NvramRegion, PartitionCheckpoint, Superblock};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The (LUN, range) a global range number (`Lun::first_range` + range) names.
fn lun_range_of(luns: &[Arc<Lun>], global: u32) -> Option<LunRange> {
    luns.iter().enumerate().find_map(|(l, lun)| {
        (global >= lun.first_range && global < lun.first_range + lun.ranges)
            .then(|| (l as u32, global - lun.first_range))
    })
}

/// The epoch the table (as last read) gives another node for `range`; None if it is ours.
fn others_epoch(c: &Cluster, range: LunRange) -> Option<u64> {
    c.owners_of(&[range])
        .first()
        .filter(|o| o.owner != c.me)
        .map(|o| o.epoch)
}

/// At start, before the log moves past them: notes, durably, the ranges whose records this
/// start drops because the table gives them to another node, with the epochs it gives them,
/// here and in our flush marks (`Cluster::record_dropped_at_start`). Earlier entries here
/// stay while their range is still another node's at the noted epoch.
pub(super) fn note_dropped_ranges(
    region: &NvramRegion,
    sb: &Superblock,
    c: &Cluster,
    luns: &[Arc<Lun>],
    scans: &[(PartitionCheckpoint, ScanResult)],
    replayed: &dyn Fn(u32, u64) -> bool,
) -> Result<(), EngineError> {
    let layout = &Layout::of(sb);
    let noted = note::read(region, layout, Note::Dropped);
    let mut entries: BTreeMap<u32, u64> = noted
        .iter()
        .filter(|d| lun_range_of(luns, d.range).and_then(|r| others_epoch(c, r)) == Some(d.epoch))
        .map(|d| (d.range, d.epoch))
        .collect();
    let mut dropped: BTreeSet<LunRange> = BTreeSet::new();
    for r in scans.iter().flat_map(|(_, s)| &s.records) {
        let h = &r.header;
        let Some(lun) = luns.get(h.lun as usize) else {
            continue;
        };
        if replayed(h.lun, h.offset) {
            continue;
        }
        let range = lun.range_of(h.offset);
        if let Some(epoch) = others_epoch(c, (h.lun, range)) {
            entries.insert(lun.first_range + range, epoch);
            dropped.insert((h.lun, range));
        }
    }
    let dropped: Vec<LunRange> = dropped.into_iter().collect();
    c.record_dropped_at_start(sb.log_id, sb.partitions as usize, &dropped)
        .map_err(|e| {
            EngineError::Replay(format!(
                "noting in our flush marks the range(s) {dropped:?} whose records this start drops: {e}"
            ))
        })?;
    let entries: Vec<RangeEpoch> = entries
        .into_iter()
        .map(|(range, epoch)| RangeEpoch { range, epoch })
        .collect();
    if entries == noted {
        return Ok(());
    }
    note::write(region, layout, Note::Dropped, &entries).map_err(|e| {
        EngineError::Replay(format!(
            "noting the ranges whose records this start drops: {e}"
        ))
    })
}

/// At start: the ranges whose records this node kept for the restart, when another node's
/// claim of them looked unfinished (`Engine::fence_for_claims`), that the table gives back
/// to this node. The claim finished and the ranges were given back, so data newer than the
/// kept records may be on the medium: they are not replayed (simulator seed 6665).
pub(super) fn kept_ranges_given_back(
    region: &NvramRegion,
    sb: &Superblock,
    c: &Cluster,
    luns: &[Arc<Lun>],
) -> Vec<LunRange> {
    let back: Vec<LunRange> = note::read(region, &Layout::of(sb), Note::Kept)
        .iter()
        .filter_map(|k| lun_range_of(luns, k.range))
        .filter(|&(l, r)| c.owns(l, r))
        .collect();
    if !back.is_empty() {
        tracing::warn!(
            "this node kept its records of range(s) {back:?} for this restart when another node took them over, and the table gives them back: that node finished and may have written them since, so those records are not replayed"
        );
    }
    back
}

/// At start, once the log moved past them: the records kept for the restart are replayed or
/// dropped, so their note goes.
pub(super) fn forget_kept_ranges(region: &NvramRegion, sb: &Superblock) -> Result<(), EngineError> {
    let layout = Layout::of(sb);
    if note::read(region, &layout, Note::Kept).is_empty() {
        return Ok(());
    }
    note::write(region, &layout, Note::Kept, &[]).map_err(|e| {
        EngineError::Replay(format!(
            "clearing the note of the records kept for this restart: {e}"
        ))
    })
}

impl Engine {
    /// Of `wanted` (ranges `from` owns), those whose records a start of this node dropped
    /// while `from`'s claim of them, at the epoch the table still gives them, is unfinished:
    /// `from`'s NVRAM holds the only copies of some of their writes, so they stay `from`'s.
    /// An error if the claim notes cannot be read while such a range is wanted.
    pub(super) fn ranges_only_claimer_holds(
        &self,
        c: &Cluster,
        from: NodeId,
        wanted: &[LunRange],
    ) -> Result<Vec<LunRange>, String> {
        let noted = note::read(&self.region, &Layout::of(&self.sb), Note::Dropped);
        let dropped: Vec<LunRange> = noted
            .iter()
            .filter_map(|d| {
                let range = lun_range_of(&self.luns, d.range)?;
                (wanted.contains(&range) && others_epoch(c, range) == Some(d.epoch))
                    .then_some(range)
            })
            .collect();
        if dropped.is_empty() {
            return Ok(Vec::new());
        }
        let claims = c.unfinished_claims_on_us().map_err(|e| {
            format!(
                "this node dropped its staged records of range(s) {dropped:?} at a start, and reading whether node {}'s takeover of them is finished failed ({e}): nothing was taken",
                c.node_name(from)
            )
        })?;
        let unfinished: Vec<LunRange> = claims
            .into_iter()
            .filter(|(taker, _)| *taker == from)
            .flat_map(|(_, ranges)| ranges)
            .collect();
        Ok(dropped
            .into_iter()
            .filter(|r| unfinished.contains(r))
            .collect())
    }
}
