//! Moving ranges between nodes: takeover (a node died: claim its ranges with a new epoch,
//! replay its mirrored records, then serve them), giveback and handover (planned moves:
//! flush, then hand the ranges over with a new epoch), and writing a partner's mirrored
//! records when its own medium path fails.
//!
//! A takeover closes the ranges' gates first, so their I/O waits rather than overtaking the
//! replay; a failed replay leaves them closed (serving them could lose writes).

use super::core::{Engine, ReplayReport};
use super::takeover_state::{FlushDelegate, RangesToMove, TakeoverProgress};
use crate::apply::RecordWrite;
use crate::cluster::wire;
use crate::cluster::{LunRange, NodeId, RangeState};
use crate::lease::Verdict;
use crate::mirror::{ReplayError, SecondStoreArea};
use crate::nvram::takeover_note::{self, TakeoverNote};
use crate::nvram::{Layout, RecordKind};
use std::future::Future;
use std::time::Duration;

/// How often an operator's takeover looks at the partner's heartbeat while it waits.
const SILENCE_POLL: Duration = Duration::from_millis(100);
/// How often a takeover whose replay failed (the medium failing) tries it again.
const REPLAY_RETRY: Duration = Duration::from_secs(1);

impl Engine {
    /// Whether a takeover follows if the partner dies: set once the partner has connected
    /// (under `takeover = "auto"` this node takes over; under `manual` the operator or
    /// Pacemaker, which fences the dead node and promotes this one). Then I/O forwarded to the
    /// partner that fails with the link down waits (`cluster.forward_wait_s`) for the
    /// takeover, or for the partner's return, and runs; before, it fails at once rather than
    /// stalling (e.g. the kernel's partition scan while the partner was never there).
    pub fn set_takeover_expected(&self, expected: bool) {
        self.takeover.set_expected(expected);
    }

    /// The node is stopping its devices (SIGTERM): I/O to the partner's ranges that waits for
    /// a takeover (up to `cluster.forward_wait_s`) fails with EIO now, and new such I/O fails
    /// at once, so that the devices stop without waiting that long (a cluster manager's stop
    /// timeout is shorter). For good: a stopping engine does not wait again.
    pub fn stop_waiting_for_takeovers(&self) {
        self.takeover.end_waits();
    }

    /// What the partner watch says about takeovers now ("the partner is alive on the disk:
    /// no takeover while the link is down", ...), shown in status.
    pub fn set_takeover_note(&self, note: Option<String>) {
        self.takeover.set_note(note);
    }

    /// The partner watch found the partner's disk heartbeat missing from our medium while
    /// the partner was connected (`true`), or showing again (`false`): a manual takeover is
    /// refused meanwhile unless forced.
    pub fn set_partner_elsewhere(&self, elsewhere: bool) {
        self.takeover.set_partner_elsewhere(elsewhere);
    }

    pub fn partner_elsewhere(&self) -> bool {
        self.takeover.partner_elsewhere()
    }

    /// Lets the flusher ask the partner to write mirrored records when our medium path fails.
    pub fn set_flush_delegate(&self, d: Option<FlushDelegate>) {
        self.takeover.set_delegate(d);
    }

    fn takeover_phase(&self, phase: String) {
        let now = self.host.now();
        self.takeover.update(|p| {
            if let Some(p) = p.as_mut() {
                if phase == "done" || phase.starts_with("failed") {
                    // Freeze the clock: status then shows how long the takeover took.
                    if let Some(t) = p.started.take() {
                        p.elapsed_ms = now.saturating_duration_since(t).as_millis() as u64;
                    }
                }
                p.phase = phase;
            }
        });
    }

    /// Takes over every range `from` owns: claims them on the medium with a new epoch,
    /// waits `grace` (the old owner's flusher sees the new epoch before its next batch),
    /// replays the mirrored records, and only then serves them. I/O to those ranges waits
    /// meanwhile.
    pub async fn take_over(&self, from: NodeId, grace: Duration) -> Result<ReplayReport, String> {
        self.take_over_ranges(from, None, grace, true).await
    }

    /// An operator's takeover (`nvmirrorctl takeover` without `--force`, Pacemaker's
    /// promote) needs `from` stopped: with the link down it may only be cut off, and still
    /// serve its ranges. Waits (at most the lease's `dead_after` plus two renewals) until the
    /// disk lease judges its heartbeat dead, as an automatic takeover does; an error if it
    /// keeps renewing. Without a disk lease there is nothing to wait for.
    pub async fn await_partner_silence(&self, from: NodeId) -> Result<(), String> {
        let Some(lease) = self.cluster.as_ref().and_then(|c| c.lease()) else {
            return Ok(());
        };
        let timing = lease.timing();
        let deadline = self.host.now() + timing.dead_after() + timing.renew * 2;
        let name = self
            .cluster
            .as_ref()
            .map_or(String::new(), |c| c.node_name(from).to_string());
        let mut said = false;
        loop {
            // The link counts as much as the heartbeat (an automatic takeover needs both
            // silent): a partner whose medium path failed serves on while we write for it.
            if self.mirror.is_up() {
                return Err(format!(
                    "node {name} is reachable over the mirror link: it is running; taking over now would give two owners the same ranges"
                ));
            }
            match lease.verdict(from) {
                // Unknown: this node does not hold its own lease; the takeover refuses.
                Verdict::Dead { .. } | Verdict::Absent | Verdict::Unknown => return Ok(()),
                Verdict::Alive { ago } => {
                    if self.host.now() >= deadline {
                        return Err(format!(
                            "node {name}'s {} still renews (it changed {} ms ago): it is running, only unreachable, and may serve its ranges; stop it or fence it (a fenced, powered-off node: --force takes over without waiting)",
                            lease.place().heartbeat(),
                            ago.as_millis()
                        ));
                    }
                    if !said {
                        tracing::warn!(
                            "takeover: waiting for node {name}'s {} to stop (at most {} ms)",
                            lease.place().heartbeat(),
                            (timing.dead_after() + timing.renew * 2).as_millis()
                        );
                        said = true;
                    }
                    self.host.sleep(SILENCE_POLL).await;
                }
            }
        }
    }

    /// Takeover of some of `from`'s ranges (`only`: (LUN index, range) pairs), or all.
    /// `require_silence`: the disk lease must judge `from` dead right before the claim (not
    /// for `--force`, where the operator vouches that it is fenced).
    pub async fn take_over_ranges(
        &self,
        from: NodeId,
        only: Option<&[(u32, u32)]>,
        grace: Duration,
        require_silence: bool,
    ) -> Result<ReplayReport, String> {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        if from == c.me {
            return Err("a node cannot take over from itself".into());
        }
        if let Some(lease) = c.lease().filter(|l| !l.holds()) {
            let place = lease.place();
            return Err(format!(
                "this node does not hold its {}, so it may not claim ranges in the ownership table on {}; {}",
                place.lease(),
                place.name(),
                place.check()
            ));
        }
        let _moving = self.takeover.begin_move()?;
        // The table first: while this node could not hear of it, ranges may have moved
        // (away from it, too: its records of those die, see `lost_ranges`).
        if let Err(e) = self.reload_ownership().await {
            return Err(format!("re-reading the ownership table: {e}"));
        }
        let held = self
            .second_store
            .as_ref()
            .map(|ss| ss.status())
            .unwrap_or_default();
        let started = self.host.now();
        self.takeover.update(|p| {
            *p = Some(TakeoverProgress {
                from: c.node_name(from).to_string(),
                phase: "claiming".into(),
                records_total: held.records as u64,
                bytes_total: held.bytes,
                started: Some(started),
                ..Default::default()
            })
        });
        // Our own records of those ranges (staged before we lost them, if we ever held them)
        // die first, durably, before the table makes the ranges ours: the new data is on the
        // medium or in our second store, and our old records must never land over it.
        let mut wanted: Vec<(u32, u32)> = c
            .ranges_of(from)
            .into_iter()
            .filter(|r| only.is_none_or(|o| o.contains(r)))
            .collect();
        // Ranges `from` claimed from us and has not finished replaying, whose records our
        // start dropped: `from` holds the only copies of some writes (`dropped_ranges`).
        let left_to_claimer = match self.ranges_only_claimer_holds(c, from, &wanted) {
            Ok(left) => left,
            Err(e) => {
                self.takeover_phase(format!("failed: {e}"));
                return Err(e);
            }
        };
        if !left_to_claimer.is_empty() {
            wanted.retain(|r| !left_to_claimer.contains(r));
            let why = format!(
                "node {} took range(s) {left_to_claimer:?} from this node and has not finished replaying them, and this node's start dropped its own records of them: node {}'s NVRAM holds the only copies of some acknowledged writes of them, so they stay with it until it starts again and finishes its replay",
                c.node_name(from),
                c.node_name(from)
            );
            if wanted.is_empty() {
                self.takeover_phase("failed: the partner holds the only copies".into());
                return Err(format!("{why}; nothing was taken"));
            }
            tracing::warn!("{why}; taking the other {} range(s)", wanted.len());
        }
        let narrowed = (!left_to_claimer.is_empty()).then(|| wanted.clone());
        let only: Option<&[(u32, u32)]> = narrowed.as_deref().or(only);
        // A range that stages in a partition of ours that stopped (fenced, or its NVRAM
        // failed) could not be served here until this daemon restarts, and taken it would
        // stay so even once `from` is back (simulator seed 12820 with `--storage own`):
        // nothing is taken; `from` keeps its ranges, or a restarted daemon takes them.
        let stopped: Vec<(u32, u32, String)> = wanted
            .iter()
            .filter_map(|&(l, r)| {
                let lun = self.luns.get(l as usize)?;
                let why = self.partition_of(lun.first_range + r).failure()?;
                Some((l, r, why))
            })
            .collect();
        if let Some((_, _, why)) = stopped.first() {
            self.takeover_phase("failed: a partition of this node stopped".into());
            let ranges: Vec<(u32, u32)> = stopped.iter().map(|&(l, r, _)| (l, r)).collect();
            return Err(format!(
                "range(s) {ranges:?} stage in an NVRAM partition of this node that stopped ({why}): this node cannot serve them until its daemon restarts (restart nvmirrord, then take over); nothing was taken"
            ));
        }
        // Each node its own medium: ours must hold every acknowledged write of the ranges,
        // else we would serve old data. (The old owner's is marked after the claim, below.)
        if c.own_storage() {
            let stale = c
                .outdated_ranges(c.me)
                .map_err(|e| format!("reading the outdated-media marks on the arbiter: {e}"))?;
            let stale: Vec<_> = wanted.iter().filter(|r| stale.contains(r)).collect();
            if !stale.is_empty() {
                self.takeover_phase("failed: this node's medium is outdated".into());
                return Err(format!(
                    "this node's medium misses acknowledged writes of {} of these range(s) {stale:?} (it was away, or dropped mirror copies, while they were written): taking them over would serve old data; nothing was taken. The owner resyncs them onto this medium while the link is up (`nvmirrorctl status` shows what is outdated)",
                    stale.len()
                ));
            }
        }
        if let Err(e) = self.void_ranges(&wanted).await {
            self.takeover_phase(format!("failed: {e}"));
            return Err(format!(
                "killing this node's old records of the ranges failed, nothing was taken: {e}"
            ));
        }
        // Noted before the claim, cleared after the replay: a crash in between is finished
        // at the next start (`nvram::takeover_note`).
        let note = TakeoverNote {
            from,
            ranges: wanted
                .iter()
                .filter_map(|&(l, r)| self.luns.get(l as usize).map(|lun| lun.first_range + r))
                .collect(),
        };
        if let Err(e) = self.write_takeover_note(Some(&note)) {
            self.takeover_phase(format!("failed: {e}"));
            return Err(format!(
                "noting the takeover in the NVRAM failed, nothing was taken: {e}"
            ));
        }
        // Judged again right before the claim, on a fresh read of its heartbeat: the steps
        // above wait for the medium, and a pause of this node among them may have let
        // `from` restart and settle meanwhile (`DiskLease::verdict`). Nothing in between.
        if let (true, Some(lease)) = (require_silence, c.lease()) {
            if let Verdict::Alive { ago } = lease.verdict(from) {
                if let Err(e) = self.write_takeover_note(None) {
                    tracing::error!(error = %e, "clearing the takeover note in the NVRAM failed");
                }
                self.takeover_phase("failed: the partner's heartbeat is alive".into());
                return Err(format!(
                    "node {}'s {} is not proven dead right before the claim (it changed {} ms ago, or was not read since this node was held up): nothing was taken",
                    c.node_name(from),
                    lease.place().heartbeat(),
                    ago.as_millis()
                ));
            }
        }
        let moved = match c.begin_takeover(from, only) {
            Ok(m) if m.is_empty() && only.is_some() => {
                let _ = self.write_takeover_note(None);
                self.takeover_phase("failed: none of the given ranges is the partner's".into());
                return Err(format!(
                    "none of the given ranges belongs to node {} (see the ownership table in status)",
                    c.node_name(from)
                ));
            }
            Ok(m) => m,
            Err(e @ crate::ownership::TableError::Uncertain(_)) => {
                // The claim may have landed or land later: both notes stay, and the daemon
                // restarts, whose start finishes the takeover if the table gives us the
                // ranges (`finish_noted_takeover`). Their gates stay closed meanwhile.
                self.takeover_phase(format!("failed: {e}"));
                self.takeover
                    .set_restart_wanted(format!("a takeover's claim is uncertain: {e}"));
                return Err(e.to_string());
            }
            Err(e) => {
                // Nothing was claimed (`begin_takeover`): nothing to finish at a restart.
                if let Err(e) = c.clear_claim_note() {
                    tracing::error!(error = %e, "clearing the takeover's claim note on the medium failed (the next start clears it)");
                }
                if let Err(e) = self.write_takeover_note(None) {
                    tracing::error!(error = %e, "clearing the takeover note in the NVRAM failed");
                }
                self.takeover_phase(format!("failed: {e}"));
                return Err(e.to_string());
            }
        };
        // A takeover of everything the partner owned fences it at the device too: whatever
        // write it still has queued is refused by the disk (SCSI-3 reservations, if set).
        if only.is_none() {
            match c.preempt(from) {
                Ok(true) => tracing::warn!(
                    "persistent reservation: node {}'s key preempted; the medium refuses its writes",
                    c.node_name(from)
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    "persistent reservation: preempting node {}'s key failed ({e}); only the disk lease fences it",
                    c.node_name(from)
                ),
            }
        }
        // Until the replay, the partner's releases must not drop these ranges' copies.
        if let Some(ss) = &self.second_store {
            let (pinned, luns) = (moved.clone(), self.luns.clone());
            ss.pin(Some(Box::new(move |lun: u32, offset: u64| {
                luns.get(lun as usize)
                    .is_some_and(|l| pinned.contains(&(lun, l.range_of(offset))))
            })));
        }
        self.takeover.update(|p| {
            if let Some(p) = p.as_mut() {
                p.ranges = moved.len();
                p.phase = "grace".into();
            }
        });
        tracing::warn!(
            "taking over {} range(s) from node {}: epochs bumped on the medium; replaying its mirrored writes",
            moved.len(),
            c.node_name(from)
        );
        self.host.sleep(grace).await;
        self.takeover_phase("replaying".into());
        // Only the records of the ranges moved now: a held copy of a range `from` no longer
        // owned (it moved earlier, while `from` was cut off) is stale.
        // Each node its own medium: the old owner's misses what the replay writes and whatever
        // we write from now (marked at the new epochs, before the gates open; the replay's
        // regions in our out-of-sync map, the later writes as the flusher finds the partner
        // away).
        let report = self
            .retry_with_ranges_closed("takeover replay", || {
                self.mark_out_of_sync_copies(&moved)
                    .and_then(|()| c.mark_outdated(from, &moved).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        format!("marking node {}'s medium outdated: {e}", c.node_name(from))
                    })
                    .and_then(|()| {
                        self.replay_mirror_of(from, Some(&moved))
                            .map_err(|e| e.to_string())
                    })
            })
            .await?;
        if let Some(ss) = &self.second_store {
            ss.pin(None);
        }
        // Before the gates open: once we write these ranges, replaying the note's records
        // again at a restart would land them over newer data, and so would the old owner's
        // replay of its own records if the claim note on the medium stood. That one goes
        // first: while the NVRAM note stands, a restart finishes and clears both.
        // Retried as the replay is: nothing else opens the ranges while this node runs (a
        // failed clear once left them closed for good: simulator seed 6473, a path failure).
        self.retry_with_ranges_closed("clearing the takeover's notes", || {
            c.clear_claim_note()
                .map_err(|e| format!("the claim note on the medium: {e}"))?;
            self.write_takeover_note(None)
                .map_err(|e| format!("the takeover note in the NVRAM: {e}"))
        })
        .await?;
        let opened = c.finish_takeover(&moved);
        self.takeover.update(|p| {
            if let Some(p) = p.as_mut() {
                p.skipped_already_flushed = report.skipped_already_flushed as u64;
            }
        });
        self.takeover_phase("done".into());
        tracing::warn!(
            "takeover complete: now serving {opened} more range(s){}",
            match moved.len() - opened {
                0 => String::new(),
                taken => format!(" ({taken} taken by another node meanwhile: routed to it)"),
            }
        );
        Ok(report)
    }

    /// Runs a takeover's `step` until it succeeds, every [`REPLAY_RETRY`], while the taken
    /// ranges stay closed (serving them before it could lose writes, and a path failure may
    /// pass); gives up only when the engine stops (a restart finishes it: the note).
    async fn retry_with_ranges_closed<T>(
        &self,
        what: &str,
        mut step: impl FnMut() -> Result<T, String>,
    ) -> Result<T, String> {
        let mut last_failure = String::new();
        loop {
            let e = match step() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let why = format!("{what} failed, ranges stay closed: {e}");
            if self.stopping.is_set() {
                self.takeover_phase(format!("failed: {why}"));
                return Err(why);
            }
            if why != last_failure {
                tracing::error!("{why}; retrying every {REPLAY_RETRY:?}");
                last_failure = why.clone();
            }
            self.takeover_phase(format!("retrying: {why}"));
            self.host.sleep(REPLAY_RETRY).await;
        }
    }

    fn write_takeover_note(&self, note: Option<&TakeoverNote>) -> std::io::Result<()> {
        takeover_note::write(&self.region, &Layout::of(&self.sb), note)
    }

    /// At start, before anything is served: a takeover this node had claimed but not
    /// replayed when it stopped is finished (the partner's mirrored writes of those of the
    /// noted ranges the table gives us go to the medium), then the note is cleared.
    pub(super) fn finish_noted_takeover(&self) -> Result<(), String> {
        let Some(note) = takeover_note::read(&self.region, &Layout::of(&self.sb)) else {
            // A claim note without the NVRAM note is one whose claim failed: it goes.
            if let Some(c) = &self.cluster {
                c.clear_claim_note().map_err(|e| {
                    format!("clearing a failed takeover's claim note on the medium: {e}")
                })?;
            }
            return Ok(());
        };
        if let Some(c) = &self.cluster {
            let ours: Vec<(u32, u32)> = self
                .luns
                .iter()
                .enumerate()
                .flat_map(|(l, lun)| {
                    (0..lun.ranges)
                        .filter(|r| note.ranges.contains(&(lun.first_range + r)))
                        .map(move |r| (l as u32, r))
                })
                .filter(|&(l, r)| c.state(l, r) == RangeState::Local)
                .collect();
            if !ours.is_empty() {
                tracing::warn!(
                    "a takeover of {} range(s) from node {} was under way when this node stopped: replaying its mirrored writes now",
                    ours.len(),
                    c.node_name(note.from)
                );
                self.mark_out_of_sync_copies(&ours)
                    .map_err(|e| format!("finishing the interrupted takeover: {e}"))?;
                c.mark_outdated(note.from, &ours).map_err(|e| {
                    format!("finishing the interrupted takeover: marking node {}'s medium outdated: {e}", c.node_name(note.from))
                })?;
                let report = self
                    .replay_mirror_of(note.from, Some(&ours))
                    .map_err(|e| format!("finishing the interrupted takeover's replay: {e}"))?;
                tracing::warn!(
                    "interrupted takeover finished: {} mirrored record(s), {} bytes, written to the medium",
                    report.records,
                    report.bytes
                );
            }
            c.clear_claim_note().map_err(|e| {
                format!("clearing the interrupted takeover's claim note on the medium: {e}")
            })?;
        }
        self.write_takeover_note(None)
            .map_err(|e| format!("clearing the takeover note in the NVRAM: {e}"))
    }

    /// Takeover: writes every record the partner mirrored to us into the medium. Call it
    /// before serving the partner's ranges.
    pub fn replay_partner(&self) -> Result<ReplayReport, ReplayError> {
        let from = self.cluster.as_ref().map(|c| c.partner()).unwrap_or(0);
        self.replay_mirror_of(from, None)
    }

    /// Replays the mirrored records `from` left in our second store, limited to `only`'s
    /// (LUN, range)s if given.
    /// Marks the regions of the held copies of `ranges` in the out-of-sync maps (if any):
    /// a replay writes them to our medium only.
    fn mark_out_of_sync_copies(&self, ranges: &[(u32, u32)]) -> Result<(), String> {
        let (Some(maps), Some(ss)) = (&self.out_of_sync, &self.second_store) else {
            return Ok(());
        };
        let luns = self.luns.clone();
        let selected = |lun: u32, offset: u64| {
            luns.get(lun as usize)
                .is_some_and(|l| ranges.contains(&(lun, l.range_of(offset))))
        };
        for (lun, offset, len) in ss.held_extents(&selected) {
            maps.mark(lun, offset, len);
        }
        maps.persist()
            .map_err(|e| format!("persisting the out-of-sync map: {e}"))
    }

    fn replay_mirror_of(
        &self,
        from: NodeId,
        only: Option<&[(u32, u32)]>,
    ) -> Result<ReplayReport, ReplayError> {
        let Some(ss) = &self.second_store else {
            return Ok(ReplayReport::default());
        };
        let started = self.host.now();
        // What the partner flushed while it could not tell us (flush marks on the medium),
        // and what it voided. With a medium per node (marks on the arbiter) its flushed
        // seqs describe its medium, not ours, so only its voids apply (the case of
        // simulator seed 41695: copies the partner voided where we never got the void
        // records, replayed over newer writes).
        let marks = match &self.cluster {
            Some(c) => c
                .flush_marks_of(from)
                .map_err(|e| {
                    ReplayError::Medium(format!("reading the partner's flush marks: {e}"))
                })?
                .map(|m| if c.own_storage() { m.voids_only() } else { m }),
            None => None,
        };
        let progress = self.takeover.progress();
        let luns = self.luns.clone();
        let selected = move |lun: u32, offset: u64| match (only, luns.get(lun as usize)) {
            (None, _) => true,
            (Some(o), Some(l)) => o.contains(&(lun, l.range_of(offset))),
            // A record of an unknown LUN: let the replay report it.
            (Some(_), None) => true,
        };
        // The epochs our claim holds the ranges under, in the table as last read.
        let cluster = self.cluster.clone();
        let luns = self.luns.clone();
        let claimed_epoch = move |lun: u32, offset: u64| {
            let (c, l) = (cluster.as_ref()?, luns.get(lun as usize)?);
            let range = (lun, l.range_of(offset));
            c.owns(range.0, range.1)
                .then(|| c.owners_of(&[range]).first().map(|o| o.epoch))
                .flatten()
        };
        let replayed = ss.replay_into(
            &self.luns,
            marks.as_ref(),
            &selected,
            &claimed_epoch,
            &|records, bytes| {
                if let Ok(mut p) = progress.lock() {
                    if let Some(p) = p.as_mut() {
                        p.records_done = records;
                        p.bytes_done = bytes;
                    }
                }
            },
        )?;
        let report = ReplayReport {
            records: replayed.records,
            bytes: replayed.bytes,
            discarded_unacknowledged: replayed.overwritten,
            skipped_already_flushed: replayed.skipped_already_flushed,
            millis: self
                .host
                .now()
                .saturating_duration_since(started)
                .as_millis() as u64,
            ..Default::default()
        };
        tracing::info!(
            "takeover replay: {} mirrored record(s), {} bytes, written to the medium in {} ms; {} skipped (the partner's flush marks show them on the medium)",
            report.records,
            report.bytes,
            report.millis,
            report.skipped_already_flushed
        );
        Ok(report)
    }

    /// Planned move of ranges to the partner: giveback (the ranges the config gives the
    /// partner, after a takeover) or handover (our own configured ranges, a switchover before
    /// maintenance). Their I/O waits while every staged write of their partitions is flushed (so the partner
    /// starts from the medium), `tell_partner` makes the partner re-read the table (and void
    /// what it lost unnoticed), the table on the medium moves them to the partner with a new
    /// epoch, `tell_partner` makes the partner re-read it again, and then their I/O is
    /// forwarded to the partner.
    pub async fn give_back<Told>(
        &self,
        which: RangesToMove,
        drain_timeout: Duration,
        tell_partner: impl Fn() -> Told,
    ) -> Result<usize, String>
    where
        Told: Future<Output = Result<(), String>>,
    {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let partner = c.partner();
        let ranges = match which {
            RangesToMove::PartnersRanges => c.ranges_to_give_back(partner),
            RangesToMove::OwnRanges => c.ranges_to_give_back(c.me),
            RangesToMove::Asked { lun, range } if c.owns(lun, range) => vec![(lun, range)],
            RangesToMove::Asked { .. } => Vec::new(),
        };
        if ranges.is_empty() {
            return Ok(0);
        }
        // The mark of a range our medium misses writes of names its epoch: a move would void
        // it, and a later move back would serve our stale medium.
        if let Some(r) = ranges.iter().find(|&&(l, r)| c.own_medium_outdated(l, r)) {
            return Err(format!(
                "this node's own medium is outdated for range {r:?} (its writes failed): it is repaired from node {}'s medium first, by itself while the link is up and our medium works; no range moved",
                c.node_name(partner)
            ));
        }
        let _moving = self.takeover.begin_move()?;
        let held = c.owners_of(&ranges);
        c.close_gates(&ranges);
        // The ranges may have moved while their gates were closed (we were cut off and the
        // partner took them): they open as the table now says, never as ours by default.
        let (ranges, held) = (&ranges, &held);
        let reopen = |why: String| async move {
            let regained = c.reopen_after_failed_move(ranges, held);
            if !regained.is_empty() {
                if let Err(e) = self.void_ranges(&regained).await {
                    tracing::error!(error = %e, "voiding our records of ranges lost and regained during a failed move");
                }
                c.finish_takeover(&regained);
            }
            Err(why)
        };
        if !self.drain_ranges(ranges, drain_timeout).await {
            return reopen(format!(
                "staged writes did not reach the medium within {drain_timeout:?}; no range moved"
            ))
            .await;
        }
        // Each node its own medium: the partner's must hold every write of the ranges.
        if c.own_storage() {
            // Copies it holds that we never asked it to write (records our restart replayed
            // into our medium) go to its medium now: dropped later, they would mark it
            // outdated at the epoch this move ends (simulator seed 3170 with --storage own).
            if let Err(e) = self.partner_writes_held().await {
                return reopen(format!(
                    "node {} did not write the copies it holds of our records: {e}; no range moved",
                    c.node_name(partner)
                ))
                .await;
            }
            // A batch our medium failed during the drain went to the partner's and marked
            // ours, at the epoch the move would end (simulator seed 271 with --storage own).
            if let Some(r) = ranges.iter().find(|&&(l, r)| c.own_medium_outdated(l, r)) {
                return reopen(format!(
                    "this node's own medium became outdated for range {r:?} while the staged writes drained (a batch failed on it): it is repaired from node {}'s medium first; no range moved",
                    c.node_name(partner)
                ))
                .await;
            }
            let stale = match c.outdated_ranges(partner) {
                Ok(stale) => stale,
                Err(e) => {
                    return reopen(format!(
                        "reading the outdated-media marks on the arbiter: {e}; no range moved"
                    ))
                    .await
                }
            };
            let stale: Vec<_> = ranges.iter().filter(|r| stale.contains(r)).collect();
            if !stale.is_empty() {
                return reopen(format!(
                    "node {}'s medium misses acknowledged writes of {} of these range(s) {stale:?} (it was away while they were written); it needs a resync first, which runs by itself while the link is up (see OUTDATED in `nvmirrorctl status`); no range moved",
                    c.node_name(partner),
                    stale.len()
                ))
                .await;
            }
        }
        // The partner first re-reads the table as it stands: if it lost these ranges without
        // noticing (paused or cut off when we took them), its staged records of them die
        // durably now (void records), before the table gives them back. Else a crash of the
        // partner right after the move would replay those stale records over what we wrote
        // since. A partner that does not answer is not running its engine, and gets nothing.
        if let Err(e) = tell_partner().await {
            return reopen(format!(
                "node {} did not confirm it re-read the ownership table ({e}); no range moved",
                c.node_name(partner)
            ))
            .await;
        }
        match c.hand_over(ranges, held, partner) {
            Ok(()) => {}
            Err(e @ crate::ownership::TableError::Uncertain(_)) => {
                // The move may land later: serving the ranges again could then make two
                // owners. Their gates stay closed, and the daemon restarts: its start
                // serves them as the table says then.
                self.takeover
                    .set_restart_wanted(format!("a move's table write is uncertain: {e}"));
                return Err(format!(
                    "updating the ownership table: {e}; the ranges stay closed and the daemon restarts"
                ));
            }
            Err(e) => return reopen(format!("updating the ownership table: {e}")).await,
        }
        tracing::warn!(
            "handed {} range(s) ({}) to node {}",
            ranges.len(),
            match which {
                RangesToMove::PartnersRanges => "giveback of its configured ranges",
                RangesToMove::OwnRanges => "handover of ours",
                RangesToMove::Asked { .. } => "asked for by the partner, which keeps writing to it",
            },
            c.node_name(partner)
        );
        tell_partner().await.map_err(|e| {
            format!(
                "the table now gives {} range(s) to node {}, but it did not confirm ({e}); it reads the table at its next start",
                ranges.len(),
                c.node_name(partner)
            )
        })?;
        Ok(ranges.len())
    }

    /// Node `from`'s medium path failed: write its mirrored records through ours, only
    /// records of ranges the medium's table still gives to `from` (never over a range that
    /// moved, e.g. to us by a takeover, where newer data may be).
    pub fn write_for_partner(
        &self,
        from: NodeId,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
    ) -> Result<usize, String> {
        let ss = self
            .second_store
            .as_ref()
            .ok_or("this node keeps no second store")?;
        if let Some(c) = &self.cluster {
            if let Some(lease) = c.lease().filter(|l| !l.holds()) {
                return Err(format!(
                    "this node does not hold its {} either",
                    lease.place().lease()
                ));
            }
        }
        let allowed = self.owned_by_checker(from);
        let n = ss.write_for_partner(partition, first, last, count, &self.luns, &allowed)?;
        if self.cluster.as_ref().is_some_and(|c| c.own_storage()) {
            // Each node its own medium: this is how the partner's writes reach ours.
            tracing::debug!(partition, "wrote the partner's records {first}..={last} ({n}) from our second store to our medium");
        } else {
            tracing::warn!(partition, "the partner's medium path failed: wrote its records {first}..={last} from our second store");
        }
        Ok(n)
    }

    /// Whether a record at (lun, offset) is of a range the ownership table on the medium
    /// gives to `from` (read once, at the first record asked about).
    fn owned_by_checker(&self, from: NodeId) -> impl Fn(u32, u64) -> Result<bool, String> + '_ {
        let table = std::cell::OnceCell::new();
        move |lun: u32, offset: u64| -> Result<bool, String> {
            let Some(c) = &self.cluster else {
                return Ok(true);
            };
            let range = self
                .luns
                .get(lun as usize)
                .map_or(0, |l| l.range_of(offset));
            let t = match table.get() {
                Some(t) => t,
                None => {
                    let read = c
                        .table_on_medium()
                        .map_err(|e| format!("reading the ownership table: {e}"))?;
                    table.get_or_init(|| read)
                }
            };
            Ok(t.as_ref()
                .and_then(|t| t.luns.get(lun as usize)?.get(range as usize))
                .is_some_and(|o| o.owner == from))
        }
    }

    /// `storage = "own"`: the partner's medium failed a flush batch of its `partition` and it
    /// sent the records along (`request`, see `wire::OP_WRITE_RECORDS_FOR_PARTNER`): writes
    /// them to our medium. Refused where ours is marked outdated too (neither medium would
    /// then hold the range whole) or the range is no longer the partner's.
    pub fn write_shipped_for_partner(
        &self,
        from: NodeId,
        partition: u32,
        through_seq: u64,
        chunk_flags: u32,
        records: &[u8],
    ) -> Result<usize, String> {
        let (ss, ours) = self.own_medium_request()?;
        let shipped = wire::decode_records(records).ok_or("malformed shipped records")?;
        let mut writes = Vec::with_capacity(shipped.len());
        for r in &shipped {
            let lun = self.luns.get(r.lun as usize).ok_or_else(|| {
                format!("shipped record seq {}: LUN {} does not exist", r.seq, r.lun)
            })?;
            let fits = r.offset.checked_add(r.len).is_some_and(|e| e <= lun.size);
            if !fits {
                return Err(format!(
                    "shipped record seq {}: {}+{} is outside LUN {}",
                    r.seq, r.offset, r.len, lun.name
                ));
            }
            let range = (r.lun, lun.range_of(r.offset));
            if ours.contains(&range) {
                return Err(format!(
                    "node {}'s medium is outdated for LUN {} range {} too: neither medium would hold it whole",
                    self.node, lun.name, range.1
                ));
            }
            writes.push(RecordWrite {
                partition,
                seq: r.seq,
                kind: if r.zero {
                    RecordKind::Zero
                } else {
                    RecordKind::Data
                },
                lun: r.lun,
                offset: r.offset,
                len: r.len,
                data: r.data,
            });
        }
        let chunk = (
            chunk_flags & wire::FIRST_CHUNK != 0,
            chunk_flags & wire::LAST_CHUNK != 0,
        );
        let allowed = self.owned_by_checker(from);
        let n = ss.write_shipped_for_partner(
            partition,
            through_seq,
            chunk,
            &writes,
            &self.luns,
            &allowed,
        )?;
        tracing::debug!(
            partition,
            "the partner's medium failed a batch: wrote its {n} record(s) through seq {through_seq} to our medium"
        );
        Ok(n)
    }

    /// `storage = "own"`: the partner restarted with its medium outdated for ranges whose
    /// records it replayed into it (see `engine::restart_sync`), or is about to move ranges
    /// (`partner_writes_held`): writes every copy we hold of its `partition` through
    /// `through_seq` to our medium. Copies of a range ours is outdated for are skipped (its
    /// resync copies the range from the partner's medium), unless the partner's is outdated
    /// for it too: then neither medium would hold it whole, and the request is refused.
    pub fn write_held_for_partner(
        &self,
        from: NodeId,
        partition: u32,
        through_seq: u64,
    ) -> Result<usize, String> {
        let (ss, ours) = self.own_medium_request()?;
        // Refusing for a range only ours misses would hold the partner's restart sync up
        // until our resync, which waits for that very restart sync (simulator seed 720).
        let theirs = match &self.cluster {
            Some(c) if !ours.is_empty() => c
                .outdated_ranges(from)
                .map_err(|e| format!("reading the outdated-media marks: {e}"))?,
            _ => Vec::new(),
        };
        let allowed = self.owned_by_checker(from);
        let luns = self.luns.clone();
        let not_outdated_here = |lun: u32, offset: u64| -> Result<bool, String> {
            let range = luns.get(lun as usize).map_or(0, |l| l.range_of(offset));
            if ours.contains(&(lun, range)) {
                if !theirs.contains(&(lun, range)) {
                    return Ok(false);
                }
                return Err(format!(
                    "node {}'s medium is outdated for LUN {lun} range {range} too: neither medium would hold it whole",
                    self.node
                ));
            }
            allowed(lun, offset)
        };
        let n =
            ss.write_held_for_partner(partition, through_seq, &self.luns, &not_outdated_here)?;
        tracing::info!(
            partition,
            "the partner asked (after its restart, or before a range move): wrote the {n} copies we held of its records through seq {through_seq} to our medium"
        );
        Ok(n)
    }

    /// `storage = "own"`, before a planned move: the partner writes every copy it holds of
    /// our records that we flushed to its medium (after the move's drain, these are only
    /// records our restart replayed into our medium and never asked it to write).
    async fn partner_writes_held(&self) -> Result<(), String> {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let fwd = c.forwarder().ok_or("the link to the partner is down")?;
        for p in &self.parts {
            let through = p.status().flushed_through;
            if through > 0 {
                fwd.write_held(p.id, through).await?;
            }
        }
        Ok(())
    }

    /// The partner asks us (each node its own medium) to write its records to our medium:
    /// our second store and the ranges our medium is outdated for, if we may write at all.
    fn own_medium_request(&self) -> Result<(&SecondStoreArea, Vec<LunRange>), String> {
        let ss = self
            .second_store
            .as_deref()
            .ok_or("this node keeps no second store")?;
        let c =
            self.cluster.as_ref().filter(|c| c.own_storage()).ok_or(
                "the partner's records reach our medium this way only with a medium per node",
            )?;
        if let Some(lease) = c.lease().filter(|l| !l.holds()) {
            return Err(format!(
                "this node does not hold its {} either",
                lease.place().lease()
            ));
        }
        let ours = c
            .outdated_ranges(c.me)
            .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
        Ok((ss, ours))
    }
}
