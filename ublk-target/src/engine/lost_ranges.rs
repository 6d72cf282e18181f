//! Ranges this node lost: its own staged records of them die.
//!
//! A node that was paused or cut off can lose ranges to the partner without hearing of it
//! until its lease lapses and it re-reads the ownership table, and it can take them back
//! later (a takeover when the partner dies, a giveback). Whatever it staged for those ranges
//! before is stale by then: the acknowledged writes were replayed by the partner from its
//! mirror and maybe overwritten since, the others were never acknowledged. So when this node
//! learns of a loss (re-reading the table), and before it takes ranges over, it kills its
//! records of them with a void record (`nvram::void`): in memory at once (the flusher skips
//! them, the index drops them), then durably, so a restart or the partner's replay skips
//! them too.

use super::core::Engine;
use super::datapath::mirror_post;
use crate::cluster::{LostAt, LunRange};
use crate::nvram::range_epochs_note::{self as note, Note, RangeEpoch};
use crate::nvram::Layout;

/// A range's span whose records died in memory (`mark_dead`), for its void record.
struct DeadSpan {
    lun: u32,
    /// The global range number (`Lun::first_range` + range).
    global: u32,
    start: u64,
    end: u64,
}

impl Engine {
    /// Kills this node's staged records of `ranges` ((LUN index, range of the LUN)) and waits
    /// until the void records are durable here (and mirrored, if the partner is there).
    pub(super) async fn void_ranges(&self, ranges: &[(u32, u32)]) -> Result<(), String> {
        let spans = self.mark_dead(ranges);
        self.write_voids(&spans).await
    }

    /// The in-memory half of [`Engine::void_ranges`], at once (no waiting): the flusher and
    /// reads stop seeing the records. Returns the spans for [`Engine::write_voids`].
    fn mark_dead(&self, ranges: &[(u32, u32)]) -> Vec<DeadSpan> {
        let spans: Vec<(u32, u32, u64, u64)> = ranges
            .iter()
            .filter_map(|&(l, r)| {
                let lun = self.luns.get(l as usize)?;
                let start = r as u64 * lun.range_bytes;
                let end = (start + lun.range_bytes).min(lun.size);
                (start < end).then_some((l, lun.first_range + r, start, end))
            })
            .collect();
        if !spans.is_empty() {
            tracing::info!(
                "void records: this node's staged records of {} range(s) die ({:?})",
                spans.len(),
                ranges
            );
        }
        spans
            .into_iter()
            .map(|(l, global, start, end)| {
                let part = self.partition_of(global);
                let below = part.void_span(l, start, end);
                self.luns[l as usize]
                    .index()
                    .remove_dead(part.id, below, start, end);
                DeadSpan {
                    lun: l,
                    global,
                    start,
                    end,
                }
            })
            .collect()
    }

    /// The durable half: a void record per span, persisted here and posted to the partner.
    /// The void records also go into our flush marks (on the shared medium, or the arbiter
    /// with a medium per node) before this returns (before a takeover claims the ranges, or
    /// a regained range opens): the partner honours them should it never get the records
    /// themselves (the link down, and this node dead before it comes back; simulator seed
    /// 41695).
    async fn write_voids(&self, spans: &[DeadSpan]) -> Result<(), String> {
        if spans.is_empty() {
            return Ok(());
        }

        let mirror = self.mirror.current();
        let mut staged = Vec::with_capacity(spans.len());
        let mut failure = None;
        for &DeadSpan {
            lun: l,
            global,
            start,
            end,
            ..
        } in spans
        {
            let part = self.partition_of(global);
            // The epoch the table (as last read) gives the range: a takeover replay under
            // that epoch must still replay our acknowledged records (`nvram::void`).
            let epoch = self
                .cluster
                .as_ref()
                .zip(self.luns.get(l as usize))
                .and_then(|(c, lun)| {
                    c.owners_of(&[(l, global - lun.first_range)])
                        .first()
                        .copied()
                })
                .map_or(0, |o| o.epoch);
            let s = match part.append_void(l, start, end, epoch).await {
                Ok(s) => s,
                Err(e) => {
                    // The records appended before it are still settled below: an unsettled
                    // record would hold its partition's flushing back for good.
                    failure = Some(format!("writing the void record of range {global}: {e}"));
                    break;
                }
            };
            let post = mirror
                .as_ref()
                .map(|m| m.post(mirror_post(part, &s.record)));
            staged.push((part.clone(), s, post, (l, start, end)));
        }
        for (part, _, _, _) in &staged {
            part.commit();
        }
        let mut durable = Vec::with_capacity(staged.len());
        for (part, s, post, (l, start, end)) in staged {
            let local = s.durable.await;
            let mirrored = match post {
                Some(p) => p.await,
                None => Err(String::from("no partner attached")),
            };
            if mirrored.is_err() && self.second_store.is_some() {
                // The catch-up copies it when the partner is back.
                self.mirror.note_unmirrored();
            }
            if let Some(w) = s.wrap {
                part.settle(w.seq);
            }
            part.settle(s.record.seq);
            // Also dead: what was staged between the mark and its void record (writes
            // routed before the range moved; `stage` routes them again).
            self.luns[l as usize]
                .index()
                .remove_dead(part.id, s.record.seq, start, end);
            match local {
                Ok(Ok(())) => {
                    let range = self.luns[l as usize].range_of(start);
                    durable.push((l, range, part.id, s.record.seq));
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(format!("persisting a void record: {e}"));
                }
                Err(_) => {
                    failure.get_or_insert("the NVRAM persister stopped".into());
                }
            }
        }
        if let Some(c) = &self.cluster {
            if let Err(e) = c.record_voided(self.sb.log_id, self.parts.len(), &durable) {
                failure.get_or_insert(format!("noting the void records in our flush marks: {e}"));
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Splits `lost` into the ranges the partner claimed in a takeover whose replay it has
    /// not finished, and the rest. Our records of the first are the newest data there is:
    /// the claimer may die before its replay of its copies ends, and our own writes it never
    /// got exist only here (simulator seed 34378: they were voided and released, the claimer
    /// lost its power mid-replay, and they were lost when we took the ranges back). A claim
    /// note that cannot be read counts as unfinished.
    fn claimed_unfinished(&self, lost: &[LunRange]) -> (Vec<LunRange>, Vec<LunRange>) {
        let Some(c) = &self.cluster else {
            return (Vec::new(), lost.to_vec());
        };
        let claimed: Vec<LunRange> = match c.unfinished_claims_on_us() {
            Ok(claims) => claims.into_iter().flat_map(|(_, ranges)| ranges).collect(),
            Err(e) => {
                tracing::warn!("reading the partner's claim notes failed ({e}): treating every lost range as claimed");
                lost.to_vec()
            }
        };
        lost.iter().partition(|r| claimed.contains(r))
    }

    /// Ranges we lost to a claim whose replay is unfinished (with the epochs the claim gave
    /// them): their records must neither die nor reach the medium now, so the partitions
    /// they stage in stop and the daemon restarts (`Engine::restart_wanted`). The start
    /// replays them if the claimer died before finishing (`engine::unfinished_claims`,
    /// simulator seed 4755). They are noted first (`nvram::range_epochs_note`): should the
    /// ranges be ours again by then, the claim finished and they were given back, and the
    /// start must not replay records older than what was written since (simulator seed 6665).
    fn fence_for_claims(&self, claimed: &[LostAt]) {
        if claimed.is_empty() {
            return;
        }
        let layout = Layout::of(&self.sb);
        let mut kept = note::read(&self.region, &layout, Note::Kept);
        for &((l, r), epoch) in claimed {
            let Some(lun) = self.luns.get(l as usize) else {
                continue;
            };
            kept.retain(|k| k.range != lun.first_range + r);
            kept.push(RangeEpoch {
                range: lun.first_range + r,
                epoch,
            });
        }
        if let Err(e) = note::write(&self.region, &layout, Note::Kept, &kept) {
            tracing::error!(
                "noting the ranges whose records this node keeps for a restart failed ({e}): should they be given back before the restart, it would replay records older than their data"
            );
        }
        for &((l, r), _) in claimed {
            let Some(lun) = self.luns.get(l as usize) else {
                continue;
            };
            let part = self.partition_of(lun.first_range + r);
            tracing::warn!(
                partition = part.id,
                "range {r} of LUN {} was taken over by the partner, whose replay of it is unfinished: this node keeps its records of it and restarts to replay them",
                lun.name
            );
            part.fence(format!(
                "range {r} of LUN {} was claimed by the partner, whose replay of it is unfinished: restart to keep this node's records of it",
                lun.name
            ));
        }
    }

    /// Re-reads the ownership table (the lease was held again, or the partner changed the
    /// table) and kills our records of every range we lost since we last looked. A range we
    /// hold again after losing it in between opens only after its void record is durable:
    /// a write to it must never stage below that record.
    pub async fn reload_ownership(&self) -> Result<(), String> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        // The records die before the re-read table lets the flusher write again (it would
        // find them in a range that is not ours, and fence the partition).
        let mut spans = Vec::new();
        let ours_before = self.write_demand.enabled().then(|| c.ranges_of(c.me));
        let crate::cluster::Reloaded { lost, held_again } = c
            .reload_noting_losses(&mut |lost| {
                let ranges: Vec<LunRange> = lost.iter().map(|&(r, _)| r).collect();
                let (claimed, rest) = self.claimed_unfinished(&ranges);
                spans = self.mark_dead(&rest);
                let claimed: Vec<LostAt> = lost
                    .iter()
                    .filter(|(r, _)| claimed.contains(r))
                    .copied()
                    .collect();
                self.fence_for_claims(&claimed);
            })
            .map_err(|e| e.to_string())?;
        if let Some(before) = ours_before {
            // Write priority's turns count from here (a queued write's ask returns later).
            let now = self.host.now();
            for (lun, range) in c.ranges_of(c.me) {
                if !before.contains(&(lun, range)) {
                    self.write_demand.note_handed_to_us(lun, range, now);
                }
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            "{} range(s) moved away from this node since it last read the ownership table: its staged records of them are void (except those of ranges lost to an unfinished takeover, kept for a restart)",
            lost.len()
        );
        let voided = self.write_voids(&spans).await;
        // Open them even if the record failed: a failed persist fails the partition, which
        // then serves nothing anyway.
        c.finish_takeover(&held_again);
        voided
    }
}
