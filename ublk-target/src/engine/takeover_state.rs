//! The engine's takeover bookkeeping: where a takeover stands (for status), whether one is
//! expected if the partner goes away, and how the flusher reaches the partner when our
//! medium path fails. Plain state; the behaviour is in `takeover`.

use crate::cluster::{Cluster, LunRange};
use crate::host::BoxFuture;
use crate::lun::Lun;
use crate::nvram::restart_sync_note::RestartSyncNote;
use crate::nvram::scan::ScanResult;
use crate::nvram::PartitionCheckpoint;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Asks the partner to write our mirrored records `first..=last` of a partition (`count`
/// data records) from its second store, because our path to the medium failed.
pub type FlushDelegate =
    Arc<dyn Fn(u32, u64, u64, usize) -> BoxFuture<Result<(), String>> + Send + Sync>;

/// Where the flusher finds the current delegate (set once the partner is connected).
pub(super) type DelegateSlot = Arc<RwLock<Option<FlushDelegate>>>;

/// Which ranges a planned move hands to the partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangesToMove {
    /// Giveback: the ranges the config assigns to the partner that we hold after a takeover.
    PartnersRanges,
    /// Handover: the ranges the config assigns to us (a switchover, e.g. before maintenance).
    OwnRanges,
    /// One range the partner asked for because it keeps writing to it (write priority
    /// follows the writer, `engine::write_priority`), if we own it.
    Asked { lun: u32, range: u32 },
}

/// Where a takeover stands (for `nvmirrorctl status`: progress bar and ETA).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TakeoverProgress {
    pub from: String,
    pub ranges: usize,
    /// "claiming", "grace", "replaying", "done" or "failed: <why>".
    pub phase: String,
    pub records_total: u64,
    pub bytes_total: u64,
    pub records_done: u64,
    pub bytes_done: u64,
    /// Mirrored records not replayed: the partner's flush marks show them on the medium.
    pub skipped_already_flushed: u64,
    /// Since the takeover began.
    pub elapsed_ms: u64,
    #[serde(skip)]
    pub(super) started: Option<Instant>,
}

/// A copy or comparison of one range under way (`storage = "own"`), for status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeJob {
    /// "resync" (to the partner's medium) or "verify".
    pub job: String,
    pub lun: String,
    pub range: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The engine's takeover bookkeeping.
#[derive(Default)]
pub(super) struct TakeoverState {
    /// The range job under way, if any.
    pub(super) range_job: Mutex<Option<RangeJob>>,
    /// Forwarded I/O that fails because the partner is gone waits for a takeover (see
    /// [`Engine::set_takeover_expected`]).
    expected: AtomicBool,
    /// The node is stopping its devices: such I/O waits no longer (see
    /// [`Engine::stop_waiting_for_takeovers`]).
    waits_ended: AtomicBool,
    /// I/Os to the partner's ranges waiting for a takeover now (status).
    waiting: Arc<AtomicU64>,
    progress: Arc<Mutex<Option<TakeoverProgress>>>,
    delegate: DelegateSlot,
    /// Why no takeover is happening (or what it waits for), for status.
    note: Mutex<Option<String>>,
    /// The partner was connected while its disk heartbeat never showed on our medium: the
    /// two nodes do not share the medium, so a takeover would serve a stale copy.
    partner_elsewhere: AtomicBool,
    /// A takeover or a planned move (giveback, handover) is under way: one at a time, or a
    /// handover could give away a range a takeover has claimed and not replayed yet
    /// (simulator seed 700188).
    moving: AtomicBool,
    /// Why this daemon must restart: a claim whose outcome is open (see
    /// [`crate::ownership::TableError::Uncertain`]).
    restart_wanted: Mutex<Option<String>>,
}

/// Held while a range move runs; lets the next one start when dropped.
pub(super) struct MoveGuard<'a>(&'a AtomicBool);

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl TakeoverState {
    /// Starts a range move, or says which kind of move is under way.
    pub(super) fn begin_move(&self) -> Result<MoveGuard<'_>, String> {
        // A claim or move whose table write is uncertain is settled by the restart it asked
        // for, from the notes it left: a move before that restart could find the uncertain
        // claim landed, take nothing, and clear those notes, and the restart would then
        // serve the claimed ranges without their replay (simulator seed 2129 with
        // `--voter-table --voter-tries 1`: a lost write).
        if let Some(why) = self.restart_wanted() {
            return Err(format!(
                "this node waits for the restart it asked for ({why}): no range moves until then"
            ));
        }
        match self
            .moving
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(MoveGuard(&self.moving)),
            Err(_) => Err(
                "another range move (takeover, giveback or handover) is under way on this node; try again when it is done"
                    .into(),
            ),
        }
    }

    pub(super) fn set_restart_wanted(&self, why: String) {
        *self
            .restart_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    pub(super) fn restart_wanted(&self) -> Option<String> {
        self.restart_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn expected(&self) -> bool {
        self.expected.load(Ordering::SeqCst) && !self.waits_ended.load(Ordering::SeqCst)
    }

    pub(super) fn end_waits(&self) {
        self.waits_ended.store(true, Ordering::SeqCst);
    }

    /// Counts an I/O as waiting for a takeover while the returned guard lives.
    pub(super) fn waiting_io(&self) -> WaitingIo {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingIo(self.waiting.clone())
    }

    pub(super) fn io_waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    pub(super) fn set_note(&self, note: Option<String>) {
        if let Ok(mut n) = self.note.lock() {
            *n = note;
        }
    }

    pub(super) fn note(&self) -> Option<String> {
        self.note.lock().ok().and_then(|n| n.clone())
    }

    pub(super) fn partner_elsewhere(&self) -> bool {
        self.partner_elsewhere.load(Ordering::SeqCst)
    }

    pub(super) fn set_partner_elsewhere(&self, elsewhere: bool) {
        self.partner_elsewhere.store(elsewhere, Ordering::SeqCst);
    }

    pub(super) fn set_expected(&self, expected: bool) {
        self.expected.store(expected, Ordering::SeqCst);
    }

    pub(super) fn delegate_slot(&self) -> DelegateSlot {
        self.delegate.clone()
    }

    pub(super) fn set_delegate(&self, d: Option<FlushDelegate>) {
        if let Ok(mut slot) = self.delegate.write() {
            *slot = d;
        }
    }

    /// The progress record the replay updates as it goes.
    pub(super) fn progress(&self) -> Arc<Mutex<Option<TakeoverProgress>>> {
        self.progress.clone()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Option<TakeoverProgress>)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
        }
        crate::transitions::changed();
    }

    /// The running or last takeover, its clock read at `now`.
    pub(super) fn snapshot(&self, now: Instant) -> Option<TakeoverProgress> {
        self.progress.lock().ok().and_then(|p| {
            p.clone().map(|mut p| {
                if let Some(t) = p.started {
                    p.elapsed_ms = now.saturating_duration_since(t).as_millis() as u64;
                }
                p
            })
        })
    }
}

/// What the partner's medium must get before some ranges serve after this start
/// (`engine::restart_sync`).
#[derive(Debug, Default)]
pub struct RestartSync {
    /// Ranges we own, our medium outdated for, with records replayed at this start (or at
    /// an earlier one whose restart sync did not finish).
    pub(super) ranges: Vec<LunRange>,
    /// Per partition: the last seq replayed (the partner writes its copies through it).
    pub(super) through: Vec<(u32, u64)>,
}

impl RestartSync {
    /// From the scan of our log at this start and the notes an earlier start left
    /// (`earlier`, per partition; `nvram::restart_sync_note`). Also returns, per partition,
    /// the note to keep until the partner has written its copies (None: nothing to wait
    /// for). Only ranges we own that our medium is outdated for count.
    pub(super) fn of_scans(
        c: &Cluster,
        luns: &[Arc<Lun>],
        scans: &[(PartitionCheckpoint, ScanResult)],
        earlier: &[Option<RestartSyncNote>],
    ) -> (RestartSync, Vec<Option<RestartSyncNote>>) {
        let waits = |(l, r): LunRange| c.owns(l, r) && c.own_medium_outdated(l, r);
        let of_global = |g: u32| {
            luns.iter().enumerate().find_map(|(l, lun)| {
                (lun.first_range..lun.first_range + lun.ranges)
                    .contains(&g)
                    .then(|| (l as u32, g - lun.first_range))
            })
        };
        let mut sync = RestartSync::default();
        let mut notes = Vec::with_capacity(scans.len());
        for (p, (_, scan)) in scans.iter().enumerate() {
            let mut note = RestartSyncNote::default();
            if let Some(e) = earlier.get(p).and_then(|e| e.as_ref()) {
                for &g in &e.ranges {
                    if of_global(g).is_some_and(waits) {
                        note.ranges.push(g);
                        note.through = note.through.max(e.through);
                    }
                }
            }
            for r in &scan.records {
                let h = &r.header;
                let Some(lun) = luns.get(h.lun as usize) else {
                    continue;
                };
                let range = lun.range_of(h.offset);
                if waits((h.lun, range)) {
                    note.ranges.push(lun.first_range + range);
                    note.through = note.through.max(h.seq);
                }
            }
            note.ranges.sort_unstable();
            note.ranges.dedup();
            if note.ranges.is_empty() {
                notes.push(None);
            } else {
                sync.ranges
                    .extend(note.ranges.iter().filter_map(|&g| of_global(g)));
                sync.through.push((p as u32, note.through));
                notes.push(Some(note));
            }
        }
        sync.ranges.sort_unstable();
        sync.ranges.dedup();
        (sync, notes)
    }
}

/// An I/O waiting for a takeover of the partner's ranges (see [`TakeoverState::waiting_io`]).
pub(super) struct WaitingIo(Arc<AtomicU64>);

impl Drop for WaitingIo {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_range_moves_once_a_restart_is_wanted() {
        let state = TakeoverState::default();
        drop(state.begin_move().expect("a first move starts"));
        state.set_restart_wanted("a takeover's claim is uncertain".into());
        let refused = state.begin_move().err().expect("refused");
        assert!(
            refused.contains("waits for the restart") && refused.contains("uncertain"),
            "{refused}"
        );
    }
}
