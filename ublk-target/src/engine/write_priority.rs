//! Write priority follows the writer (issue #17's policing protocol, its hand-over): a range's
//! owner holds its write priority, and a write to a range the other node owns is forwarded to
//! it. When this node keeps forwarding writes to one range (`ask_after_forwarded` within
//! `window`) it asks the owner for the range; the owner hands it over (the planned move of
//! `give_back`: the range's I/O waits, every staged write reaches the medium, the table moves
//! it with a new epoch, the asker re-reads the table) unless it wrote to the range itself
//! within `min_hold`: under contention the holder keeps the priority and the other node goes
//! on forwarding, so a range never bounces between two writers. An asker that was refused
//! asks again only after `min_hold`. The counts live in `write_demand`.
//!
//! With `queue_writes` (claim set B's "a write without priority is queued until granted"),
//! a write to a range the partner holds is not forwarded: it waits while this node asks for
//! the range (one ask per range at a time; the writes behind it find the range ours once it
//! came), and is staged here once the range is. The holder hands a range over once it has
//! held it for `min_hold`, whether it writes to it or not, so two writers take turns of at
//! least `min_hold` each and neither starves. A write whose range has not come within
//! `queue_for` (the holder cannot move it: its lease, a failing flush, a resync first) is
//! forwarded after all, and so is one asked while the link is down.
//!
//! Off unless `cluster.write_priority` is set (`Engine::set_write_priority`); then a local
//! write stores the time in its range's slot (one atomic store) and nothing else.

use super::core::Engine;
use super::datapath::WriteOp;
use super::takeover_state::RangesToMove;
use super::write_demand::WritePriorityPolicy;
use crate::cluster::RangeState;
use crate::lun::Lun;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long the owner's hand-over may wait for its staged writes to reach the medium. The
/// range's I/O waits meanwhile, for a move that only saves the asker a forward: short.
const HAND_OVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl Engine {
    /// Turns write priority that follows the writer on (with its policy) or off.
    pub fn set_write_priority(&self, policy: Option<WritePriorityPolicy>) {
        self.write_demand.set_policy(policy);
    }

    pub fn write_priority_enabled(&self) -> bool {
        self.write_demand.enabled()
    }

    /// Ranges moved between the nodes because one asked for them (handed over or taken).
    pub fn write_priority_moves(&self) -> u64 {
        self.write_demand.moves().load(Ordering::Relaxed)
    }

    /// Whether writes to the partner's ranges wait for the range (`queue_writes`).
    pub fn write_priority_queues(&self) -> bool {
        self.write_demand.enabled()
            && self
                .write_demand
                .policy()
                .is_some_and(|p| p.queue_for.is_some())
    }

    /// Writes that waited for a range the partner held (`queue_writes`), and those of them
    /// forwarded after all.
    pub fn write_priority_queued(&self) -> (u64, u64) {
        (
            self.write_demand.queued().load(Ordering::Relaxed),
            self.write_demand
                .queued_then_forwarded()
                .load(Ordering::Relaxed),
        )
    }

    /// With `queue_writes`: the pieces of a write in `remote` fall in ranges the partner
    /// holds. Waits until the first of those ranges is ours (asking for it, or behind the
    /// write that asks), the link goes down, or `deadline` (set at the first call) passes.
    /// True: it waited, route the write again. False (no wait): forward what is remote;
    /// so without `queue_writes`, without a link, and after the deadline.
    pub(super) async fn queue_for_priority(
        &self,
        lun_idx: usize,
        lun: &Lun,
        remote: &[(u64, u64)],
        deadline: &mut Option<Instant>,
    ) -> bool {
        let Some(wait) = self
            .write_demand
            .policy()
            .filter(|_| self.write_demand.enabled())
            .and_then(|p| p.queue_for.map(|q| (q, p.min_hold)))
        else {
            return false;
        };
        let (queue_for, min_hold) = wait;
        let Some(c) = self.cluster.as_ref() else {
            return false;
        };
        let Some(&(at, _)) = remote.first() else {
            return false;
        };
        let lun_no = lun_idx as u32;
        let range = lun.range_of(at);
        let until = *deadline.get_or_insert_with(|| {
            self.write_demand.queued().fetch_add(1, Ordering::Relaxed);
            self.host.now() + queue_for
        });
        // Asked again while refused: often enough that a turn is not lost, rarely enough that
        // the asks cost the holder nothing.
        let retry = (min_hold / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        // Once this waited, the routing the caller holds is stale (ranges moved meanwhile):
        // whatever ends the wait, the write is routed again before it is staged or forwarded.
        let mut waited = false;
        loop {
            if self.host.now() >= until {
                return waited;
            }
            let Some(fwd) = c.forwarder().filter(|_| self.mirror.is_up()) else {
                return waited;
            };
            waited = true;
            // The queue itself: held across the ask, so one ask per range is out at a time.
            let asking = self.write_demand.asking(lun_no, range);
            let turn = asking.lock().await;
            if !matches!(c.route(lun_no, range).await, RangeState::Remote(_)) {
                return true;
            }
            match fwd.ask_for_range(lun_no, range).await {
                Ok(()) => {
                    self.note_handed_to_us(lun_no, range);
                    return true;
                }
                Err(e) => tracing::debug!(
                    lun = lun_no,
                    range,
                    "a queued write waits: the partner keeps the range for now: {e}"
                ),
            }
            drop(turn);
            let left = until.saturating_duration_since(self.host.now());
            if self.mirror.is_up() && !left.is_zero() {
                self.host.sleep(retry.min(left)).await;
            }
        }
    }

    fn note_handed_to_us(&self, lun: u32, range: u32) {
        self.write_demand.moves().fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            lun,
            range,
            "the partner handed us the range we write to (write priority)"
        );
    }

    /// Our client wrote `w`; the pieces in `remote` went to the partner, the rest was ours.
    pub(super) fn note_local_write(&self, w: &WriteOp<'_>, remote: &[(u64, u64)]) {
        if self.write_demand.enabled() {
            let now = self.host.now();
            self.write_demand
                .note_local_write(w.lun_idx, w.lun, (w.offset, w.len), remote, now);
        }
    }

    /// Writes of `pieces` (offset, len) were forwarded to their owner and acknowledged: count
    /// them, and ask the owner for a range we keep writing to.
    pub(super) fn note_forwarded(&self, lun_idx: usize, lun: &Lun, pieces: &[(u64, u64)]) {
        if !self.write_demand.enabled() {
            return;
        }
        // With queued writes the writes ask themselves; these were forwarded because their
        // range did not come in time.
        let Some(policy) = self.write_demand.policy().filter(|p| p.queue_for.is_none()) else {
            return;
        };
        let now = self.host.now();
        for (lun, range) in self
            .write_demand
            .note_forwarded(&policy, lun_idx, lun, pieces, now)
        {
            self.ask_for_range(lun, range);
        }
    }

    /// Asks the owner for `range` of `lun` in the background; the owner's hand-over makes us
    /// re-read the table, after which our writes to it are local.
    fn ask_for_range(&self, lun: u32, range: u32) {
        let Some(fwd) = self.cluster.as_ref().and_then(|c| c.forwarder()) else {
            return;
        };
        let moves = self.write_demand.moves().clone();
        let asked = Box::pin(async move {
            match fwd.ask_for_range(lun, range).await {
                Ok(()) => {
                    moves.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        lun,
                        range,
                        "the partner handed us the range we kept writing to (write priority)"
                    );
                }
                Err(e) => tracing::info!(
                    lun,
                    range,
                    "the partner keeps the range we write to (write priority): {e}"
                ),
            }
        });
        // Detached: it ends with the answer, or when the link goes down.
        if let Err(e) = self.host.spawn("ask-write-priority", asked) {
            tracing::warn!("asking the partner for a range: no task: {e}");
        }
    }

    /// The partner asks for `range` of `lun`, which it keeps writing to through us: hand it
    /// over, unless write priority is off here, the range is not ours, or our own clients
    /// wrote to it within the minimum hold (we keep it, the partner goes on forwarding).
    pub(super) async fn hand_over_on_request(&self, lun: u32, range: u32) -> Result<(), String> {
        let policy = self.write_demand.policy().ok_or_else(|| {
            format!(
                "write priority does not follow the writer on node {} (cluster.write_priority is not set)",
                self.node
            )
        })?;
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        if !c.owns(lun, range) {
            return Err(format!(
                "node {} does not own range {range} of LUN {lun}",
                self.node
            ));
        }
        let now = self.host.now();
        if policy.queue_for.is_some() {
            // Queued writes: turns of at least `min_hold` from when the range came to us.
            if let Some(ago) = self
                .write_demand
                .since_handed_to_us(lun, range, now)
                .filter(|&ago| ago < policy.min_hold)
            {
                return Err(format!(
                    "node {} got range {range} of LUN {lun} {} ms ago: it keeps the write priority for {} ms",
                    self.node,
                    ago.as_millis(),
                    policy.min_hold.as_millis()
                ));
            }
        } else if let Some(ago) = self
            .write_demand
            .since_local_write(lun, range, now)
            .filter(|&ago| ago < policy.min_hold)
        {
            return Err(format!(
                "node {} wrote to range {range} of LUN {lun} itself {} ms ago: it keeps the write priority until {} ms after its last write",
                self.node,
                ago.as_millis(),
                policy.min_hold.as_millis()
            ));
        }
        self.fit_to_hand_over(c)?;
        let fwd = c.forwarder().ok_or("no link to the partner")?;
        let moved = self
            .give_back(
                RangesToMove::Asked { lun, range },
                HAND_OVER_DRAIN_TIMEOUT,
                || fwd.reload_ownership(),
            )
            .await?;
        if moved == 0 {
            return Err(format!("range {range} of LUN {lun} could not move"));
        }
        self.write_demand.moves().fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this node may start an asked hand-over now. It is an optimisation, so it
    /// yields to anything that would make it wait or fail after the range's I/O stopped:
    /// a flush that fails (the drain would time out with the gate closed), a lease not held,
    /// and a resync or repair that is due (an outdated mark stands): those range jobs take
    /// the same one-at-a-time move slot, and asks every few milliseconds would starve them
    /// (simulator seed 3371 with --storage own --write-priority).
    fn fit_to_hand_over(&self, c: &crate::cluster::Cluster) -> Result<(), String> {
        if let Some(lease) = c.lease().filter(|l| !l.holds()) {
            return Err(format!(
                "node {} does not hold its {}; no range moves until it does",
                self.node,
                lease.place().lease()
            ));
        }
        let flush_error = self
            .flusher_stats
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone());
        if let Some(e) = flush_error {
            return Err(format!(
                "node {}'s flusher reports a failure ({e}); no range moves until a batch reaches the medium",
                self.node
            ));
        }
        if c.own_storage() {
            let me = c.me;
            for node in [me, c.partner()] {
                let marks = c
                    .outdated_ranges(node)
                    .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
                if !marks.is_empty() {
                    return Err(format!(
                        "node {}'s medium is marked outdated for {} range(s): its resync or repair goes first",
                        c.node_name(node),
                        marks.len()
                    ));
                }
            }
        }
        Ok(())
    }
}
