//! Repair (`storage = "own"`): a range we own whose flush batches our own medium failed went
//! to the partner's medium meanwhile (`flush_context`: shipped, ours marked outdated). Once
//! our medium takes writes again, its missing parts are copied back from the partner's, and
//! the marks withdrawn.
//!
//! The range's I/O continues throughout, and nothing waits for its staged writes to drain
//! (they may be the very ones our medium failed). Each chunk holds its extent in the copy
//! fence from the partner's read to our write, as a batch holds it from our medium write to
//! the partner's answer, so no chunk lands older bytes over a batch. The marks go only if no
//! batch missed our medium while the copy ran (`Cluster::finish_own_repair`); else the next
//! round copies again.

use super::core::Engine;
use crate::cluster::{wire, RangeState};
use crate::copy_fence::Holder;
use crate::host::run_blocking;
use std::future::Future;

/// Bytes per request for the partner's medium (well under the link's largest request).
const REPAIR_CHUNK: u64 = 256 << 10;

impl Engine {
    /// Repairs every range we serve that our own medium is outdated for; `ask` sends one
    /// request to the partner and returns its answer. Fails, to be retried, while our medium
    /// still fails. Returns the ranges repaired.
    pub async fn repair_own_medium<Asked>(
        &self,
        ask: impl Fn(Vec<u8>) -> Asked,
    ) -> Result<usize, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let Some(c) = self.cluster.as_ref().filter(|c| c.own_storage()) else {
            return Ok(0);
        };
        let stale: Vec<(u32, u32)> = self
            .luns
            .iter()
            .enumerate()
            .flat_map(|(l, lun)| (0..lun.ranges).map(move |r| (l as u32, r)))
            .filter(|&(l, r)| c.own_medium_outdated(l, r) && c.state(l, r) == RangeState::Local)
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let theirs = c
            .outdated_ranges(c.partner())
            .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
        let mut repaired = 0;
        for range in stale {
            if theirs.contains(&range) {
                return Err(format!(
                    "both media are outdated for LUN {} range {}: neither holds every write; nothing is copied (`nvmirrorctl force-current` keeps one of them, losing what it misses)",
                    range.0, range.1
                ));
            }
            let done = self.repair_range(range, &ask).await;
            self.end_range_job();
            if done? {
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    /// Copies the parts of range `r` of LUN `l` our medium may miss from the partner's;
    /// true if its marks went.
    async fn repair_range<Asked>(
        &self,
        (l, r): (u32, u32),
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Result<bool, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let partner = c.node_name(c.partner()).to_owned();
        let lun = self
            .luns
            .get(l as usize)
            .cloned()
            .ok_or_else(|| format!("LUN {l} does not exist"))?;
        let seen = c.own_medium_misses((l, r));
        let (start, end) = lun.range_span(r);
        // The shipped batches marked their extents in the out-of-sync map; without maps,
        // the whole range.
        let runs = match &self.out_of_sync {
            Some(maps) => maps.runs_within(l, start, end),
            None => vec![(start, end - start)],
        };
        let total: u64 = runs.iter().map(|&(_, len)| len).sum();
        let mut done = 0;
        for (run_start, run_len) in runs {
            let run_end = run_start + run_len;
            let mut at = run_start;
            while at < run_end {
                self.note_range_job("repair", &lun, r, done, total);
                let len = (run_end - at).min(REPAIR_CHUNK);
                let _held = self.copy_fence.enter(Holder::Copy, &[(l, at, len)]).await;
                let req = wire::encode(wire::OP_READ_MEDIUM, l, at, len as u32, &[]);
                let answer = ask(req).await?;
                let data = wire::answer(&answer)
                    .map_err(|e| format!("repair: node {partner}'s medium at {at}: {e}"))?
                    .to_vec();
                if data.len() as u64 != len {
                    return Err(format!(
                        "repair: node {partner} answered {} bytes of its medium, not {len}",
                        data.len()
                    ));
                }
                let medium = lun.medium.clone();
                run_blocking(self.host.as_ref(), move || medium.write_at(&data, at))
                    .await
                    .map_err(|e| format!("repair: writing our medium at {at}: {e}"))?;
                at += len;
                done += len;
            }
        }
        let medium = lun.medium.clone();
        run_blocking(self.host.as_ref(), move || medium.sync())
            .await
            .map_err(|e| format!("repair: syncing our medium: {e}"))?;
        // The two media now agree on the range (while ours was outdated, every batch of it
        // went to the partner's medium or stayed staged): its map regions go too, or the
        // next resync would copy them again.
        let maps = self.out_of_sync.clone();
        let cleared = c
            .finish_own_repair((l, r), seen, || {
                let Some(maps) = maps else {
                    return Ok(());
                };
                maps.clear_within(l, start, end);
                maps.persist()
                    .map_err(|e| format!("persisting our out-of-sync map: {e}"))
            })
            .map_err(|e| format!("repair: {e}"))?;
        if cleared {
            tracing::warn!(
                "repair: LUN {} range {r}: copied {total} byte(s) from node {partner}'s medium; ours is up to date for it again",
                lun.name
            );
        } else {
            tracing::info!(
                "repair: LUN {} range {r}: our medium missed a batch while it was copied; copying again",
                lun.name
            );
        }
        Ok(cleared)
    }
}
