//! Running a job on one range we own with its I/O paused: the range's gate closes, every
//! staged write is flushed (with `storage = "own"` that puts it on both media), the job runs
//! while nothing writes the range, and the range opens again as the table says. Resync and
//! the exact pass of `verify` use it; it is a range move as far as other moves go (one at a
//! time).

use super::core::Engine;
use super::takeover_state::RangeJob;
use crate::lun::Lun;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long the flush before a paused range's job may take.
const PAUSE_DRAIN: Duration = Duration::from_secs(60);

impl Engine {
    /// Runs `job` on range `r` of LUN `l` while its I/O waits; fails if the range is not
    /// ours once its gate is closed.
    pub(super) async fn with_range_paused<T, Job>(
        &self,
        (l, r): (u32, u32),
        job: impl FnOnce(Arc<Lun>) -> Job,
    ) -> Result<T, String>
    where
        Job: Future<Output = Result<T, String>>,
    {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let lun = self
            .luns
            .get(l as usize)
            .cloned()
            .ok_or_else(|| format!("LUN {l} does not exist"))?;
        let _moving = self.takeover.begin_move()?;
        let ranges = [(l, r)];
        let held = c.owners_of(&ranges);
        c.close_gates(&ranges);
        let done = async {
            if !self.drain(PAUSE_DRAIN).await {
                return Err(format!(
                    "staged writes did not reach the medium within {PAUSE_DRAIN:?}"
                ));
            }
            // Still ours after the gate closed (a move may have raced the close).
            if c.owners_of(&ranges) != held || held.iter().any(|o| o.owner != c.me) {
                return Err("the range moved".to_string());
            }
            job(lun).await
        }
        .await;
        // Open as the table says (never as ours by default; see `give_back`).
        let regained = c.reopen_after_failed_move(&ranges, &held);
        if !regained.is_empty() {
            if let Err(e) = self.void_ranges(&regained).await {
                tracing::error!(error = %e, "voiding our records of a range lost and regained while paused");
            }
            c.finish_takeover(&regained);
        }
        done
    }

    /// Status: `job` on range `range` of `lun` has done `bytes_done` of `bytes_total`.
    pub(super) fn note_range_job(
        &self,
        job: &str,
        lun: &crate::lun::Lun,
        range: u32,
        bytes_done: u64,
        bytes_total: u64,
    ) {
        let mut now = self
            .takeover
            .range_job
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Progress alone is no transition for the event stream; a new job is.
        let new_job = now
            .as_ref()
            .is_none_or(|j| j.job != job || j.lun != lun.name || j.range != range);
        *now = Some(RangeJob {
            job: job.into(),
            lun: lun.name.clone(),
            range,
            bytes_done,
            bytes_total,
        });
        drop(now);
        if new_job {
            crate::transitions::changed();
        }
    }

    /// Status: no range job under way.
    pub(super) fn end_range_job(&self) {
        *self
            .takeover
            .range_job
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        crate::transitions::changed();
    }
}
