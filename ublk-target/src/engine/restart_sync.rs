//! A start with our own medium outdated for ranges we own (`storage = "own"`): our medium
//! failed batches of them, which went to the partner's medium, so their reads come from the
//! partner's. The start replays our log into our medium as always; the records of those
//! ranges are then on our (outdated) medium only, and reads from the partner's would miss
//! them (simulator seed 354 with --storage own: a read answered an older version). So those
//! ranges stay closed until the partner has written its copies of these records (it holds
//! every one we replayed: acknowledged writes of a range ours is outdated for were
//! mirrored) to its medium, once the link is up. Until then our log keeps the replayed
//! records (`log::KeptReplay`: the partner is not told to drop its copies, which it could
//! not always write to its medium then, seed 30020), and the NVRAM notes the ranges
//! (`nvram::restart_sync_note`): a stop before it happens must not forget them (seed 31444).

use super::core::Engine;
use super::takeover_state::RestartSync;
use crate::cluster::{wire, LunRange, RangeState};
use crate::nvram::restart_sync_note;
use crate::nvram::Layout;
use std::future::Future;

impl Engine {
    /// At the start: the ranges waiting for the partner stay closed (their I/O waits).
    pub(super) fn hold_restart_sync(&self) {
        let (Some(c), sync) = (&self.cluster, self.restart_sync_state()) else {
            return;
        };
        if sync.ranges.is_empty() {
            return;
        }
        tracing::warn!(
            "our own medium is outdated for range(s) {:?}, and this start replayed records of them into it: they serve once node {}'s medium has them too (when the link is up)",
            sync.ranges,
            c.node_name(c.partner())
        );
        c.close_gates(&sync.ranges);
    }

    fn restart_sync_state(&self) -> std::sync::MutexGuard<'_, RestartSync> {
        self.restart_sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While the link is up: has the partner write its copies of the records this start
    /// replayed into our outdated medium to its own, then opens those ranges.
    pub async fn finish_restart_sync<Asked>(
        &self,
        ask: impl Fn(Vec<u8>) -> Asked,
    ) -> Result<(), String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let through = self.restart_sync_state().through.clone();
        if through.is_empty() {
            return Ok(());
        }
        for &(partition, last) in &through {
            let req = wire::encode(wire::OP_WRITE_HELD_FOR_PARTNER, partition, last, 0, &[]);
            wire::answer(&ask(req).await?).map_err(|e| {
                format!(
                    "node {} did not write its copies of partition {partition} through seq {last} to its medium: {e}",
                    c.node_name(c.partner())
                )
            })?;
        }
        // The partner has the records: the notes go before the ranges open (a start that
        // still found them would only wait for the partner once more).
        let layout = Layout::of(&self.sb);
        for &(partition, _) in &through {
            restart_sync_note::write(&self.region, &layout, partition, None).map_err(|e| {
                format!("clearing the restart sync note of partition {partition}: {e}")
            })?;
        }
        // Our log kept the replayed records until now (`log::KeptReplay`): they may go, and
        // the partner, whose medium has them, may drop its copies.
        for &(partition, _) in &through {
            let Some(log) = self.parts.iter().find(|p| p.id == partition) else {
                continue;
            };
            let releasable = log.release_kept().map_err(|e| {
                format!("moving partition {partition}'s checkpoint past the replayed records: {e}")
            })?;
            if let Some(m) = self.mirror.current() {
                m.release(partition, releasable);
            }
        }
        let ranges = std::mem::take(&mut *self.restart_sync_state()).ranges;
        // Only ranges still closed. One may have moved to the partner meanwhile (its
        // takeover, which a re-read does not open a closed gate for): its I/O goes there
        // now, or it waited for good (simulator seed 7469 with --storage own).
        let open: Vec<LunRange> = ranges
            .into_iter()
            .filter(|&(l, r)| c.state(l, r) == RangeState::TakingOver)
            .collect();
        c.open_as_the_table_says(&open);
        tracing::warn!(
            "node {}'s medium has the records this start replayed of range(s) {open:?}: they serve again",
            c.node_name(c.partner())
        );
        Ok(())
    }
}
