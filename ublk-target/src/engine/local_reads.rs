//! Reads of a range the partner owns served here (`cluster.local_reads`): from the
//! partner's records our second store holds, and the rest from our medium (our own with
//! `storage = "own"`, else the shared one), while the partner's read lease on the range
//! holds (`cluster::ReadLeases` says why that returns every write acknowledged before the
//! read). Without a lease, with our medium marked outdated, or while a void record of the
//! LUN is held, the read is forwarded as before.
//!
//! Both sides live here: asking for the lease every eighth of a heartbeat timeout, granting
//! it, and the owner's wait before it marks our medium outdated or (a shared medium)
//! acknowledges a write the partner has no copy of.

use super::core::Engine;
use super::medium_reads::MediumReads;
use crate::cluster::{wire, Cluster, LunRange, RangeState};
use crate::host::{run_blocking, Host};
use crate::lun::Lun;
use crate::mirror::HeldRead;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

impl Engine {
    /// Serves reads of the partner's ranges from this node while it grants a read lease
    /// (off: every such read is forwarded).
    pub fn set_local_reads(self: &Arc<Self>, on: bool) -> Result<(), String> {
        let Some(leases) = self.cluster.as_ref().and_then(|c| c.read_leases()) else {
            return if on {
                Err("local reads need a cluster".into())
            } else {
                Ok(())
            };
        };
        // Built before the first lease is asked for: each local read then looks only at the
        // held records overlapping it.
        if let Some(store) = self.second_store() {
            store.index_for_reads(on);
        }
        if !leases.set_reading(on) {
            return Ok(());
        }
        let asker = ask_for_read_leases(Arc::downgrade(self), self.host.clone());
        let task = self
            .host
            .spawn("read-lease", Box::pin(asker))
            .map_err(|e| format!("cannot start asking for read leases: {e}"))?;
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(())
    }

    pub fn local_reads_enabled(&self) -> bool {
        self.cluster
            .as_ref()
            .and_then(|c| c.read_leases())
            .is_some_and(|l| l.reading())
    }

    /// Read pieces of the partner's ranges served here so far (every LUN).
    pub fn local_reads_served(&self) -> u64 {
        self.luns
            .iter()
            .map(|l| l.stats.reads_leased.load(Ordering::Relaxed))
            .sum()
    }

    /// Owner: the ranges the partner may read from its medium now (`OP_READ_LEASE`): those
    /// we serve whose partner medium no mark (on the arbiter, or one being made) says is
    /// outdated (a shared medium has no marks).
    pub(super) async fn grant_read_lease(&self) -> Result<Vec<u8>, String> {
        let c = self
            .cluster
            .clone()
            .ok_or("not a cluster node: no read leases")?;
        let Some(_) = c.read_leases() else {
            return Err("this node grants no read leases".into());
        };
        // Only while the partner holds a copy of every unflushed record of ours (after a
        // reconnection, once the re-mirroring ends): void records among them too.
        if self.mirror.unmirrored().0 || !self.mirror.is_up() {
            return Ok(wire::encode_runs(&[]));
        }
        // Read before the grant is noted: a mark begun after this read is withheld below.
        let cc = c.clone();
        let marked = run_blocking(self.host.as_ref(), move || cc.outdated_ranges(cc.partner()))
            .await
            .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
        let serving: Vec<LunRange> = self
            .luns
            .iter()
            .enumerate()
            .flat_map(|(l, lun)| (0..lun.ranges).map(move |r| (l as u32, r)))
            .filter(|&(l, r)| self.serves(l as usize, r) && !marked.contains(&(l, r)))
            .collect();
        let granted = c
            .read_leases()
            .map(|leases| leases.grant(serving, self.host.now()))
            .unwrap_or_default();
        let pairs: Vec<(u64, u64)> = granted
            .iter()
            .map(|&(l, r)| (u64::from(l), u64::from(r)))
            .collect();
        Ok(wire::encode_runs(&pairs))
    }

    /// Reads `dst` at `at` of the partner's range here, if its read lease holds: true when
    /// done, false when the read must go to the owner.
    pub(super) async fn read_locally<R: MediumReads>(
        &self,
        lun_idx: usize,
        lun: &Lun,
        at: u64,
        dst: &mut [u8],
        reads: &R,
    ) -> bool {
        let (Some(c), Some(store)) = (self.cluster.as_ref(), self.second_store.as_ref()) else {
            return false;
        };
        if !c.read_leases().is_some_and(|l| l.reading()) {
            return false;
        }
        let range = (lun_idx as u32, lun.range_of(at));
        let global = lun.first_range + range.1;
        let readable = |c: &Cluster| {
            c.state(range.0, range.1) == RangeState::Remote(c.partner())
                && !c.own_medium_outdated(range.0, range.1)
        };
        let leased = c
            .read_leases()
            .is_some_and(|l| l.holds(range, self.host.now()));
        if !leased || !readable(c) {
            return false;
        }
        let partition = self.partition_of(global).id;
        let gaps = match store.read_held(partition, lun_idx as u32, at, dst) {
            HeldRead::Gaps(g) => g,
            HeldRead::Unsure => return false,
        };
        // After the held records: one released meanwhile is on our medium by now.
        for (start, end) in gaps {
            let piece = &mut dst[(start - at) as usize..(end - at) as usize];
            if reads.read(lun.medium.as_ref(), piece, start).await.is_err() {
                return false;
            }
        }
        // A copy dropped unwritten marks our medium outdated first: checked after the read.
        if !readable(c) {
            return false;
        }
        lun.stats.reads_leased.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Owner, before deciding whether to mark the partner's medium outdated for `ranges` (or,
/// with a shared medium, before acknowledging a write of them the partner has no copy of):
/// withholds them from read leases until the returned guard goes (a mark made meanwhile
/// keeps them withheld), and waits until the leases granted before have run out
/// (`cluster::ReadLeases`). Also says whether it waited.
pub(crate) async fn wait_out_read_leases(
    c: &Arc<Cluster>,
    host: &dyn Host,
    ranges: &[LunRange],
) -> (Deciding, bool) {
    let guard = Deciding {
        cluster: c.clone(),
        ranges: ranges.to_vec(),
    };
    let Some(until) = c.read_leases().and_then(|l| l.withhold(ranges)) else {
        return (guard, false);
    };
    let now = host.now();
    if now >= until {
        return (guard, false);
    }
    tracing::info!(
        "waiting {:?} for the partner's read lease to run out before a write it has no copy of counts",
        until - now
    );
    host.sleep(until - now).await;
    (guard, true)
}

/// Ranges withheld from the partner's read leases while their owner decides on a mark.
pub(crate) struct Deciding {
    cluster: Arc<Cluster>,
    ranges: Vec<LunRange>,
}

impl Drop for Deciding {
    fn drop(&mut self) {
        if let Some(l) = self.cluster.read_leases() {
            l.decided(&self.ranges);
        }
    }
}

/// Asks the partner for read leases every quarter of the lease period while the link is up
/// and local reads are on. A lease is never cut short (the link going down does not end
/// it): the owner's wait is what makes it safe, and the simulator tests that wait alone.
/// Ends with the engine.
async fn ask_for_read_leases(engine: Weak<Engine>, host: Arc<dyn Host>) {
    loop {
        let Some(e) = engine.upgrade() else { return };
        if e.stopping.is_set() {
            return;
        }
        let Some(c) = e.cluster.clone() else { return };
        let Some(period) = c.read_leases().map(|l| l.period()) else {
            return;
        };
        let asking = c.read_leases().is_some_and(|l| l.reading()) && e.mirror.is_up();
        drop(e);
        if let (true, Some(fwd)) = (asking, c.forwarder()) {
            let asked = host.now();
            match fwd.read_lease().await {
                Ok(answer) => {
                    let ranges = wire::decode_runs(&answer)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|(l, r)| Some((u32::try_from(l).ok()?, u32::try_from(r).ok()?)))
                        .collect();
                    if let Some(l) = c.read_leases() {
                        l.took(asked, ranges);
                    }
                }
                Err(err) => tracing::debug!("asking the partner for a read lease: {err}"),
            }
        }
        host.sleep(period / 4).await;
    }
}
