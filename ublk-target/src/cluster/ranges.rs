//! Which node serves which LUN range right now: this node's view of the ownership table,
//! and the gates its I/O passes.
//!
//! Each range is in one of three states on this node:
//! * `Local`: we own it; its writes are staged here.
//! * `Remote(node)`: another node owns it; its I/O is forwarded there.
//! * `TakingOver`: we are replaying the partner's mirrored records for it; I/O waits (it is
//!   neither failed nor allowed to overtake the replay).
//!
//! The persistent truth is the ownership table on the shared medium (`ownership`); this is
//! the node's view of it plus the gates. Nodes are numbered by their place in the cluster's
//! node list ([`NodeId`]); each node's mirror lives on its [`Cluster::partner_of`].

use super::claim_note::{self, ClaimNote};
use super::forward::Forwarder;
use super::outdated::{OutdatedMedia, StaleRanges};
use crate::config::StorageMode;
use crate::flusher::Fence;
use crate::lease::{DiskLease, Verdict};
use crate::ownership::{self, OwnershipTable, RangeOwner, TableStore};
use crate::reservation::Reservation;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// A node: its index in the cluster's node list (the same on every node).
pub type NodeId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    Local,
    Remote(NodeId),
    TakingOver,
}

pub struct ClusterSetup {
    /// Our index in `nodes`.
    pub me: NodeId,
    pub nodes: Vec<String>,
    pub table_store: Arc<dyn TableStore>,
    /// Written to the medium if it holds no table yet.
    pub initial: OwnershipTable,
    /// This node's disk lease, already held (see `lease`): the arbiter of who serves and
    /// who may take over. None: no arbitration (unit tests of an engine pair).
    pub lease: Option<Arc<DiskLease>>,
    /// The mirror link's heartbeat timeout: the partner calls the link down after hearing
    /// nothing from us for this long.
    pub link_timeout: Duration,
    /// How long I/O to the partner's ranges rides out the partner's loss
    /// (`cluster.forward_wait_s`); zero: it fails at once.
    pub forward_wait: Duration,
    /// Persistent reservations on the media, already registered (`reservation`); empty
    /// without `cluster.reservations = "scsi3"`.
    pub reservations: Vec<Reservation>,
    /// Shared medium, or each node its own (`outdated` marks then guard range moves).
    pub storage: StorageMode,
}

pub struct Cluster {
    pub me: NodeId,
    pub nodes: Vec<String>,
    /// The owners the config asks for; giveback returns ranges to them.
    configured: OwnershipTable,
    store: Arc<dyn TableStore>,
    lease: Option<Arc<DiskLease>>,
    link_timeout: Duration,
    forward_wait: Duration,
    table: Mutex<OwnershipTable>,
    gates: Mutex<Vec<Vec<RangeState>>>,
    gate_opened: Notify,
    forwarder: std::sync::RwLock<Option<Arc<dyn Forwarder>>>,
    /// Our flush marks as last written to the medium (see [`ownership::FlushMarks`]).
    marks: Mutex<Option<ownership::FlushMarks>>,
    /// Ranges we lost (with the epoch we learned of), not yet in the marks: the next marks
    /// write bounds them where their partition was then (`FlushMarks::lost`).
    lost_since_marks: Mutex<Vec<(LunRange, u64)>>,
    /// The lease acquisition (`DiskLease::acquisitions`) during which the table was last
    /// read from the medium: the view is the truth only if the lease has not lapsed since.
    table_read_during: AtomicU64,
    reservations: Vec<Reservation>,
    cluster_id: u64,
    /// With `storage = "own"`: which node's medium misses which ranges' writes.
    outdated: Option<OutdatedMedia>,
    /// What we marked outdated so far, per node (our slot, which only we write): a range
    /// marked already costs no I/O. One read-modify-write of the slot at a time.
    marking: Mutex<std::collections::BTreeMap<NodeId, std::collections::BTreeMap<u32, u64>>>,
    /// The lease acquisition `marking` was built during: a node whose lease lapsed (paused)
    /// forgets it, since the partner may have forced its medium current meanwhile
    /// (`force_own_medium_current`, which withdraws our marks while we cannot write them).
    marking_during: AtomicU64,
    /// The ranges our own medium is marked outdated for (`storage = "own"`): never served
    /// from it. We may own such a range only after our medium failed a batch of it (the
    /// partner's medium took the batch) and until the repair copies it back.
    stale_here: StaleRanges,
    /// Per range we own: flush batches our own medium missed (the partner's took them). A
    /// repair clears the range's marks only if none came while it copied; counted and
    /// compared under this lock.
    own_misses: Mutex<std::collections::BTreeMap<LunRange, u64>>,
    /// Per node: its medium's outdated ranges as last read from the arbiter, for `status`
    /// while the arbiter cannot be read (a node cut off from its voters or its disk).
    outdated_last_read: Mutex<std::collections::BTreeMap<NodeId, Vec<LunRange>>>,
    /// With `storage = "own"`: the partner's leases to read our ranges locally, and ours
    /// to read its ranges (`read_lease`).
    read_leases: Option<super::read_lease::ReadLeases>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RangeStatus {
    pub lun: u32,
    pub range: u32,
    pub owner: String,
    pub epoch: u64,
    pub state: String,
    /// The owner the config gives this range (giveback returns it there).
    #[serde(default)]
    pub configured_owner: String,
    /// This node serves the range right now (it owns it, no takeover is replaying it, its
    /// partition is alive and the node may serve: its disk lease). Filled in by the engine.
    #[serde(default)]
    pub serving: bool,
}

/// A range of a LUN: (LUN index, range of the LUN).
pub type LunRange = (u32, u32);
/// A range the table moved away from this node, with the epoch it gives the range now.
pub type LostAt = (LunRange, u64);

/// The marks this node made, per node they are about (`Cluster::marking`), locked.
type MarkingGuard<'a> =
    MutexGuard<'a, std::collections::BTreeMap<NodeId, std::collections::BTreeMap<u32, u64>>>;

/// What a re-read of the ownership table found.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Ranges that were ours and moved since we last read the table (another node's now,
    /// or ours again under a newer epoch).
    pub lost: Vec<LunRange>,
    /// Those of them that are ours again: their gates stay closed until
    /// [`Cluster::finish_takeover`].
    pub held_again: Vec<LunRange>,
}

impl Cluster {
    pub fn open(setup: ClusterSetup) -> Result<Cluster, ownership::TableError> {
        let acquisition = setup.lease.as_ref().map_or(0, |l| l.acquisitions());
        let table = ownership::load_or_init(setup.table_store.as_ref(), &setup.initial)?;
        let cluster_id = table.cluster_id;
        let gates = Self::gates_from(&table, setup.me);
        let outdated = (setup.storage == StorageMode::Own).then(|| OutdatedMedia {
            cluster_id,
            nodes: setup.nodes.len() as u32,
            ranges: table.luns.iter().map(|l| l.len() as u32).sum(),
        });
        Ok(Cluster {
            me: setup.me,
            nodes: setup.nodes,
            configured: setup.initial,
            store: setup.table_store,
            lease: setup.lease,
            link_timeout: setup.link_timeout,
            forward_wait: setup.forward_wait,
            table: Mutex::new(table),
            gates: Mutex::new(gates),
            gate_opened: Notify::new(),
            forwarder: std::sync::RwLock::new(None),
            marks: Mutex::new(None),
            lost_since_marks: Mutex::new(Vec::new()),
            table_read_during: AtomicU64::new(acquisition),
            marking_during: AtomicU64::new(acquisition),
            cluster_id,
            reservations: setup.reservations,
            outdated,
            marking: Mutex::new(Default::default()),
            stale_here: StaleRanges::default(),
            own_misses: Mutex::new(Default::default()),
            outdated_last_read: Mutex::new(Default::default()),
            // Half the heartbeat timeout: a cut the link notices (no message for the
            // timeout) finds the partner's lease run out already, and a degraded write
            // waits for nothing more. Kept in both storage modes: each node answers the
            // partner's lease requests whatever its own `local_reads`.
            read_leases: Some(super::read_lease::ReadLeases::new(setup.link_timeout / 2)),
        })
    }

    fn gates_from(t: &OwnershipTable, me: u32) -> Vec<Vec<RangeState>> {
        t.luns
            .iter()
            .map(|l| {
                l.iter()
                    .map(|r| {
                        if r.owner == me {
                            RangeState::Local
                        } else {
                            RangeState::Remote(r.owner)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn gates(&self) -> MutexGuard<'_, Vec<Vec<RangeState>>> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table(&self) -> MutexGuard<'_, OwnershipTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lease(&self) -> Option<&Arc<DiskLease>> {
        self.lease.as_ref()
    }

    pub fn link_timeout(&self) -> Duration {
        self.link_timeout
    }

    /// How long I/O to the partner's ranges rides out the partner's loss.
    pub fn forward_wait(&self) -> Duration {
        self.forward_wait
    }

    /// The read leases (see `read_lease`; used with `cluster.local_reads`).
    pub fn read_leases(&self) -> Option<&super::read_lease::ReadLeases> {
        self.read_leases.as_ref()
    }

    /// Fences `node` at the device (a takeover of all its ranges): removes its key from
    /// every medium's persistent reservation. Ok(false) without reservations.
    pub fn preempt(&self, node: NodeId) -> Result<bool, String> {
        let victim = crate::reservation::key_of(self.cluster_id, node);
        let mut any = false;
        for r in &self.reservations {
            any |= r.preempt(victim).map_err(|e| e.to_string())?;
        }
        Ok(any)
    }

    pub fn reservation_status(&self) -> Vec<crate::reservation::ReservationStatus> {
        self.reservations.iter().map(|r| r.status()).collect()
    }

    /// The table was read from the medium since the lease was last (re)gained. A node
    /// whose lease lapsed may have lost ranges meanwhile: until it re-reads the table, its
    /// view is stale and it must not serve by it, lease or not.
    pub fn table_is_current(&self) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|l| l.acquisitions() == self.table_read_during.load(Ordering::SeqCst))
    }

    /// The owner of `range` of `lun` as the medium's table says now (re-read).
    /// The ownership table as the medium holds it now.
    pub fn table_on_medium(&self) -> Result<Option<OwnershipTable>, ownership::TableError> {
        ownership::load(self.store.as_ref())
    }

    pub fn owner_on_medium(
        &self,
        lun: u32,
        range: u32,
    ) -> Result<Option<NodeId>, ownership::TableError> {
        Ok(ownership::load(self.store.as_ref())?.and_then(|t| {
            t.luns
                .get(lun as usize)
                .and_then(|l| l.get(range as usize))
                .map(|o| o.owner)
        }))
    }

    /// The node whose second store holds `node`'s mirror, which takes over `node`'s ranges
    /// when it dies: the next node in the list (in a pair, the other one).
    pub fn partner_of(&self, node: NodeId) -> NodeId {
        let n = self.nodes.len().max(1) as NodeId;
        (node + 1) % n
    }

    /// The nodes whose mirror we hold (in a pair, the other node).
    pub fn mirrored_for_us(&self) -> Vec<NodeId> {
        (0..self.nodes.len() as NodeId)
            .filter(|&n| n != self.me && self.partner_of(n) == self.me)
            .collect()
    }

    /// Our mirror partner: the node whose second store holds our records.
    pub fn partner(&self) -> NodeId {
        self.partner_of(self.me)
    }

    pub fn node_name(&self, i: NodeId) -> &str {
        self.nodes
            .get(i as usize)
            .map(|s| s.as_str())
            .unwrap_or("?")
    }

    pub fn set_forwarder(&self, f: Option<Arc<dyn Forwarder>>) {
        if let Ok(mut w) = self.forwarder.write() {
            *w = f;
        }
    }

    pub fn forwarder(&self) -> Option<Arc<dyn Forwarder>> {
        self.forwarder.read().ok().and_then(|f| f.clone())
    }

    /// The state of a range, waiting while it is being taken over.
    pub async fn route(&self, lun: u32, range: u32) -> RangeState {
        loop {
            let opened = self.gate_opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            let state = self.state(lun, range);
            if state != RangeState::TakingOver {
                return state;
            }
            opened.await;
        }
    }

    /// Where I/O to `range` of `lun` goes right now (no waiting).
    pub fn state(&self, lun: u32, range: u32) -> RangeState {
        self.gates()
            .get(lun as usize)
            .and_then(|l| l.get(range as usize))
            .copied()
            .unwrap_or(RangeState::Local)
    }

    /// Whether the table says we own `range` of `lun`.
    pub fn owns(&self, lun: u32, range: u32) -> bool {
        self.table()
            .luns
            .get(lun as usize)
            .and_then(|l| l.get(range as usize))
            .is_some_and(|o| o.owner == self.me)
    }

    /// Ranges `node` owns now.
    pub fn ranges_of(&self, node: u32) -> Vec<(u32, u32)> {
        let t = self.table();
        let mut out = Vec::new();
        for (l, ranges) in t.luns.iter().enumerate() {
            for (r, o) in ranges.iter().enumerate() {
                if o.owner == node {
                    out.push((l as u32, r as u32));
                }
            }
        }
        out
    }

    /// Step 1 of a takeover: close the gates of `from`'s ranges (all, or those in `only`),
    /// then make us their owner with a new epoch, durably, on the medium. Returns the ranges
    /// moved.
    pub fn begin_takeover(
        &self,
        from: u32,
        only: Option<&[(u32, u32)]>,
    ) -> Result<Vec<(u32, u32)>, ownership::TableError> {
        let wanted: Vec<(u32, u32)> = self
            .ranges_of(from)
            .into_iter()
            .filter(|r| only.is_none_or(|o| o.contains(r)))
            .collect();
        self.set_gates(&wanted, RangeState::TakingOver);
        match self.claim(from, &wanted) {
            Ok(moved) => {
                // Ranges the medium no longer gives to `from` (it changed meanwhile) are not
                // taken: route them as the medium says.
                let left: Vec<(u32, u32)> = wanted
                    .iter()
                    .copied()
                    .filter(|r| !moved.contains(r))
                    .collect();
                if !left.is_empty() {
                    self.reload_ranges(&left);
                }
                Ok(moved)
            }
            // The claim may still land: the gates stay closed (this node restarts, and
            // its start finishes the claim or finds it did not land).
            Err(e @ ownership::TableError::Uncertain(_)) => Err(e),
            Err(e) => {
                // Nothing was claimed: their I/O goes to `from` again (never leave a gate
                // closed on an error).
                self.set_gates(&wanted, RangeState::Remote(from));
                self.routes_changed();
                Err(e)
            }
        }
    }

    /// Writes us as the owner of those of `ranges` the medium still gives to `from`, each
    /// with a new epoch (a compare-and-swap on the owner: only a node holding its lease
    /// writes the table, and only for a node whose lease is dead). Returns the ranges taken.
    fn claim(
        &self,
        from: u32,
        ranges: &[(u32, u32)],
    ) -> Result<Vec<(u32, u32)>, ownership::TableError> {
        // Re-read first: the medium is the truth (the partner may have changed it).
        let mut t = ownership::load(self.store.as_ref())?.unwrap_or_else(|| self.table().clone());
        let moved: Vec<(u32, u32)> = ranges
            .iter()
            .copied()
            .filter(|&(l, r)| {
                t.luns
                    .get(l as usize)
                    .and_then(|x| x.get(r as usize))
                    .is_some_and(|o| o.owner == from)
            })
            .collect();
        if moved.is_empty() {
            return Ok(moved);
        }
        // Until our replay of them ends, `from`'s own records of these ranges are the
        // newest data: the note tells `from` so, should we die before the replay.
        let note = ClaimNote {
            taker: self.me,
            from,
            epochs: moved
                .iter()
                .filter_map(|&r| self.global_range(&t, r))
                .map(|(g, epoch)| (g, epoch + 1))
                .collect(),
        };
        claim_note::save(self.store.as_ref(), self.cluster_id, &note)?;
        self.carry_marks_to_next_epoch(&t, &moved)?;
        t.generation += 1;
        for &(l, r) in &moved {
            let e = &mut t.luns[l as usize][r as usize];
            *e = RangeOwner {
                owner: self.me,
                epoch: e.epoch + 1,
            };
        }
        self.save_table_settled(&t, "the claim")?;
        *self.table() = t;
        crate::transitions::changed();
        Ok(moved)
    }

    /// Writes `t` to the medium. A write that failed is settled first
    /// (`ownership::settle_failed_write`): Ok if it landed after all, its error if it did
    /// not and now never will, `Uncertain` if that cannot be known (the caller's ranges must
    /// then stay closed: the write may still land). Only for a writer no other node races:
    /// a claim (the old owner's lease is dead) or a move of our own ranges (the partner
    /// re-read the table for it and waits).
    fn save_table_settled(
        &self,
        t: &OwnershipTable,
        what: &str,
    ) -> Result<(), ownership::TableError> {
        let Err(e) = ownership::save(self.store.as_ref(), t) else {
            return Ok(());
        };
        let settled = t.encode().map_err(std::io::Error::other).and_then(|data| {
            ownership::settle_failed_write(self.store.as_ref(), t.generation % 2, &data)
        });
        match settled {
            Ok(true) => {
                tracing::warn!("{what}'s table write failed ({e}), but it landed");
                Ok(())
            }
            Ok(false) => Err(e),
            Err(again) => Err(ownership::TableError::Uncertain(format!(
                "{what}'s table write failed ({e}) and could not be settled ({again}): it may still land"
            ))),
        }
    }

    /// Our takeover's replay ended (or none is under way): our claim note goes, before the
    /// ranges open (see `claim_note`).
    pub fn clear_claim_note(&self) -> Result<(), ownership::TableError> {
        let standing = claim_note::load(self.store.as_ref(), self.cluster_id, self.me)?;
        match standing {
            Some(_) => claim_note::clear(self.store.as_ref(), self.me),
            None => Ok(()),
        }
    }

    /// Ranges another node claimed from us and has not finished replaying (per claiming
    /// node), as the table on the medium says now.
    pub fn unfinished_claims_on_us(&self) -> Result<claim_note::Unfinished, ownership::TableError> {
        claim_note::unfinished_on(
            self.store.as_ref(),
            self.cluster_id,
            self.me,
            self.nodes.len() as u32,
        )
    }

    fn set_gates(&self, ranges: &[(u32, u32)], state: RangeState) {
        let mut gates = self.gates();
        for &(l, r) in ranges {
            if let Some(g) = gates
                .get_mut(l as usize)
                .and_then(|x| x.get_mut(r as usize))
            {
                *g = state;
            }
        }
        crate::transitions::changed();
    }

    /// Gates or owners changed: wake the I/O waiting at a gate and the event streams.
    fn routes_changed(&self) {
        self.gate_opened.notify_waiters();
        crate::transitions::changed();
    }

    /// Routes `ranges` as the medium's table says now (best effort: on a read error they
    /// keep their state).
    fn reload_ranges(&self, ranges: &[(u32, u32)]) {
        if let Ok(Some(t)) = ownership::load(self.store.as_ref()) {
            let fresh = Self::gates_from(&t, self.me);
            let mut gates = self.gates();
            for &(l, r) in ranges {
                if let Some(state) = fresh.get(l as usize).and_then(|x| x.get(r as usize)) {
                    gates[l as usize][r as usize] = *state;
                }
            }
            drop(gates);
            *self.table() = t;
        }
        self.routes_changed();
    }

    /// Ranges we own that the config gives to `node`: what a giveback returns.
    pub fn ranges_to_give_back(&self, node: u32) -> Vec<(u32, u32)> {
        let t = self.table();
        let mut out = Vec::new();
        for (l, ranges) in t.luns.iter().enumerate() {
            for (r, o) in ranges.iter().enumerate() {
                let configured = self
                    .configured
                    .luns
                    .get(l)
                    .and_then(|x| x.get(r))
                    .map(|c| c.owner);
                if o.owner == self.me && configured == Some(node) {
                    out.push((l as u32, r as u32));
                }
            }
        }
        out
    }

    /// Closes the gates of `ranges` (their I/O waits) ahead of a giveback.
    pub fn close_gates(&self, ranges: &[(u32, u32)]) {
        let mut gates = self.gates();
        for &(l, r) in ranges {
            gates[l as usize][r as usize] = RangeState::TakingOver;
        }
        crate::transitions::changed();
    }

    /// The owners and epochs of `ranges` in the table as last read.
    pub fn owners_of(&self, ranges: &[(u32, u32)]) -> Vec<RangeOwner> {
        let t = self.table();
        ranges
            .iter()
            .map(|&(l, r)| t.luns[l as usize][r as usize])
            .collect()
    }

    /// A planned move failed after [`Cluster::close_gates`]: each range opens as the table
    /// (as last read) says. `held` are their entries when the gates closed. A range the
    /// table moved meanwhile routes to its new owner; one that is ours under a newer epoch
    /// (lost and given back while the gate was closed: a re-read skips closed gates) stays
    /// closed and is returned, for the caller to void our records of it first.
    pub fn reopen_after_failed_move(
        &self,
        ranges: &[(u32, u32)],
        held: &[RangeOwner],
    ) -> Vec<(u32, u32)> {
        let now = self.owners_of(ranges);
        let mut regained = Vec::new();
        {
            let mut gates = self.gates();
            for ((&(l, r), then), now) in ranges.iter().zip(held).zip(now) {
                gates[l as usize][r as usize] = if now.owner != self.me {
                    RangeState::Remote(now.owner)
                } else if now == *then {
                    RangeState::Local
                } else {
                    regained.push((l, r));
                    RangeState::TakingOver
                };
            }
        }
        self.routes_changed();
        regained
    }

    /// Giveback: `to` owns `ranges` from now on, with a new epoch, durably on the medium.
    /// Their gates then send I/O to `to`. Only if the medium's table still gives each range
    /// to us with the entry in `held` (what we held when the move began): a range taken from
    /// us meanwhile is not ours to give, and bumping its epoch would make its owner think it
    /// lost it.
    pub fn hand_over(
        &self,
        ranges: &[(u32, u32)],
        held: &[RangeOwner],
        to: u32,
    ) -> Result<(), ownership::TableError> {
        let mut t = ownership::load(self.store.as_ref())?.unwrap_or_else(|| self.table().clone());
        for (&(l, r), then) in ranges.iter().zip(held) {
            let now = t.luns[l as usize][r as usize];
            if now != *then || now.owner != self.me {
                return Err(ownership::TableError::Moved(format!(
                    "range {r} of LUN {l} moved while the move waited (the table gives it to node {} with epoch {}; this node held epoch {}); the table is unchanged",
                    self.node_name(now.owner),
                    now.epoch,
                    then.epoch
                )));
            }
        }
        self.carry_marks_to_next_epoch(&t, ranges)?;
        t.generation += 1;
        for &(l, r) in ranges {
            let e = &mut t.luns[l as usize][r as usize];
            *e = RangeOwner {
                owner: to,
                epoch: e.epoch + 1,
            };
        }
        // Settled when it fails: a move taken for failed that lands later would leave both
        // nodes serving the ranges (simulator seed 182 with `--voter-table` and one try per
        // operation: a giveback's write failed, the giver reopened, the taker read it).
        self.save_table_settled(&t, "the move")?;
        *self.table() = t;
        {
            let mut gates = self.gates();
            for &(l, r) in ranges {
                gates[l as usize][r as usize] = RangeState::Remote(to);
            }
        }
        self.routes_changed();
        Ok(())
    }

    /// Re-reads the table on the medium (the partner changed it, e.g. gave ranges back) and
    /// routes accordingly (ranges being taken over keep their closed gates), and returns
    /// which ranges we lost since we last read the table: ours then, another node's now or
    /// ours under a newer epoch (taken from us and given back). Before
    /// the new table counts as read, `on_lost` hears of them, with the epochs the table
    /// gives them now (the node kills its records of them). The gates of the ranges held again stay closed until the caller's
    /// [`Cluster::finish_takeover`].
    pub fn reload_noting_losses(
        &self,
        on_lost: &mut dyn FnMut(&[LostAt]),
    ) -> Result<Reloaded, ownership::TableError> {
        // Noted before the read: a lapse during it leaves the view stale, to be read again.
        let acquisition = self.lease.as_ref().map_or(0, |l| l.acquisitions());
        // Settled: what this node serves from now on rests on it (a failed claim of the
        // partner's surfacing after this read would make two owners; seed 11344).
        let Some(t) = ownership::load_settled(self.store.as_ref())? else {
            return Ok(Reloaded::default());
        };
        let (mut lost, mut ours_again, mut held_again) = (Vec::new(), Vec::new(), Vec::new());
        {
            let known = self.table();
            for (l, ranges) in t.luns.iter().enumerate() {
                for (r, now) in ranges.iter().enumerate() {
                    let was = known.luns.get(l).and_then(|x| x.get(r));
                    if was.is_some_and(|w| w.owner == self.me && w != now) {
                        lost.push((l as u32, r as u32));
                        if now.owner == self.me {
                            ours_again.push((l as u32, r as u32));
                        }
                    }
                }
            }
        }
        if !lost.is_empty() {
            // Before the records die: the flusher releases dead ones unwritten, and the marks
            // it writes then must not count them as on the medium.
            let mut noted = self
                .lost_since_marks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let with_epochs: Vec<LostAt> = lost
                .iter()
                .map(|&(l, r)| ((l, r), t.luns[l as usize][r as usize].epoch))
                .collect();
            for &(range, epoch) in &with_epochs {
                noted.retain(|(x, _)| *x != range);
                noted.push((range, epoch));
            }
            drop(noted);
            on_lost(&with_epochs);
        }
        let fresh = Self::gates_from(&t, self.me);
        {
            let mut gates = self.gates();
            for (l, ranges) in fresh.into_iter().enumerate() {
                for (r, state) in ranges.into_iter().enumerate() {
                    if gates[l][r] == RangeState::TakingOver {
                        continue;
                    }
                    gates[l][r] = if ours_again.contains(&(l as u32, r as u32)) {
                        held_again.push((l as u32, r as u32));
                        RangeState::TakingOver
                    } else {
                        state
                    };
                }
            }
        }
        *self.table() = t;
        self.table_read_during.store(acquisition, Ordering::SeqCst);
        self.routes_changed();
        Ok(Reloaded { lost, held_again })
    }

    /// Opens the gates of `ranges` as the table (as last read) says: ours serve here, the
    /// others' I/O goes to their owner.
    pub fn open_as_the_table_says(&self, ranges: &[(u32, u32)]) {
        let owners = self.owners_of(ranges);
        {
            let mut gates = self.gates();
            for (&(l, r), now) in ranges.iter().zip(owners) {
                gates[l as usize][r as usize] = if now.owner == self.me {
                    RangeState::Local
                } else {
                    RangeState::Remote(now.owner)
                };
            }
        }
        self.routes_changed();
    }

    /// Last step of a takeover: the replay is done, open the gates. Returns how many of
    /// `moved` this node serves now (the others were taken from it meanwhile).
    pub fn finish_takeover(&self, moved: &[(u32, u32)]) -> usize {
        // Only as the table last read says: a takeover that kept retrying with its ranges
        // closed may end after a re-read found them taken from us meanwhile (simulator seed
        // 1442 with `--voter-table` and one try per operation: this node's path failed mid-
        // takeover, its lease lapsed and the partner took every range; once the path was
        // back, the takeover's retry succeeded and served ranges the partner served too).
        let owners = self.owners_of(moved);
        let mut opened = 0;
        {
            let mut gates = self.gates();
            for (&(l, r), now) in moved.iter().zip(&owners) {
                gates[l as usize][r as usize] = if now.owner == self.me {
                    opened += 1;
                    RangeState::Local
                } else {
                    tracing::warn!(
                        "range {r} of LUN {l} is node {}'s now (taken while this node held it closed): routed there, not served here",
                        self.node_name(now.owner)
                    );
                    RangeState::Remote(now.owner)
                };
            }
        }
        self.routes_changed();
        opened
    }

    /// Each node keeps its own medium (`storage = "own"`).
    pub fn own_storage(&self) -> bool {
        self.outdated.is_some()
    }

    /// With `storage = "own"`, before a move bumps the epochs of `ranges` (from those `t`
    /// gives them): every medium marked outdated for one of them at its current epoch is
    /// marked again (by us) at the next, durably, so that the bump voids no valid mark. The
    /// move's own marks come after the table is written, and a crash in between must not
    /// leave a stale medium looking current: simulator seed 55093, where the old owner had
    /// marked its own medium (a failed flush batch), the taker died right after its claim,
    /// and the old owner, back, took the range over again and served old data.
    fn carry_marks_to_next_epoch(
        &self,
        t: &OwnershipTable,
        ranges: &[LunRange],
    ) -> Result<(), ownership::TableError> {
        let Some(media) = &self.outdated else {
            return Ok(());
        };
        let moving: Vec<(u32, u64)> = ranges
            .iter()
            .filter_map(|&r| self.global_range(t, r))
            .collect();
        let epoch_of = |g: u32| {
            moving
                .iter()
                .find(|&&(mg, _)| mg == g)
                .map(|&(_, epoch)| epoch)
        };
        for subject in 0..self.nodes.len() as NodeId {
            let stale = media.of(self.store.as_ref(), subject, &epoch_of)?;
            let next: Vec<(u32, u64)> = moving
                .iter()
                .filter(|(g, _)| stale.contains(g))
                .map(|&(g, epoch)| (g, epoch + 1))
                .collect();
            if next.is_empty() {
                continue;
            }
            media.mark(self.store.as_ref(), self.me, subject, &next)?;
            tracing::warn!(
                "node {}'s medium stays marked outdated for {} moving range(s) (marked again at the new epoch before the move)",
                self.node_name(subject),
                next.len()
            );
        }
        Ok(())
    }

    /// (LUN, range) -> (its global number, its epoch in our view of the table).
    fn global_range(&self, t: &OwnershipTable, (lun, range): LunRange) -> Option<(u32, u64)> {
        let first: u32 = t
            .luns
            .iter()
            .take(lun as usize)
            .map(|l| l.len() as u32)
            .sum();
        let entry = t.luns.get(lun as usize)?.get(range as usize)?;
        Some((first + range, entry.epoch))
    }

    /// With `storage = "own"`: durably marks `node`'s medium as missing writes of `ranges`
    /// at their current epochs (see `outdated`); call it before the write is acknowledged
    /// or the copy dropped. Nothing to do with a shared medium.
    pub fn mark_outdated(
        &self,
        node: NodeId,
        ranges: &[LunRange],
    ) -> Result<(), ownership::TableError> {
        let Some(media) = &self.outdated else {
            return Ok(());
        };
        // Only the owner knows what the other misses, and a node marks itself only for
        // ranges it does not own. A node that learned of a move just now (its writes of the
        // range were staged before, and fail) must not mark the new owner at the new epoch.
        let (kept, marks): (Vec<LunRange>, Vec<(u32, u64)>) = {
            let t = self.table();
            ranges
                .iter()
                .filter(|&&(l, r)| {
                    let owner = t.luns.get(l as usize).and_then(|x| x.get(r as usize));
                    owner.is_some_and(|o| (o.owner == self.me) != (node == self.me))
                })
                .filter_map(|&r| self.global_range(&t, r).map(|g| (r, g)))
                .unzip()
        };
        if marks.is_empty() {
            return Ok(());
        }
        let mut known = self.marking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = &self.lease {
            let now = lease.acquisitions();
            if self.marking_during.swap(now, Ordering::SeqCst) != now {
                known.clear();
            }
        }
        let made = known.entry(node).or_default();
        if marks.iter().all(|(r, e)| made.get(r) == Some(e)) {
            return Ok(());
        }
        if node != self.me {
            // Not granted to the partner's read leases until the marks go. The caller has
            // waited out those granted before (`engine::local_reads::wait_out_read_leases`).
            if let Some(leases) = &self.read_leases {
                leases.marked(ranges);
            }
        }
        let wrote = media.mark(self.store.as_ref(), self.me, node, &marks)?;
        made.extend(marks.iter().copied());
        if node == self.me {
            // As `load_own_outdated` does at a start: our medium is behind for these ranges
            // of the partner's, so our local reads of them stop (they check after reading,
            // and the copies go only after this mark; simulator seed 8983) and our takeover
            // of them waits for the resync.
            self.stale_here.add(&kept);
        }
        crate::transitions::changed();
        if wrote {
            tracing::warn!(
                "node {}'s medium now misses writes of {} range(s) {:?} (marked outdated on the arbiter; it may not take them over until a resync copies them)",
                self.node_name(node),
                ranges.len(),
                ranges
            );
        }
        Ok(())
    }

    /// With `storage = "own"`: our medium failed a flush batch of `ranges`, which we own, and
    /// the partner's medium takes it instead. Durably marks ours outdated for them first
    /// (their reads then come from the partner's medium; they are never copied to the
    /// partner nor handed over until the repair in `engine::resync`), and counts the batch.
    /// `note_regions` records where (our out-of-sync map), under the same lock as the count.
    pub fn mark_own_medium_missed(
        &self,
        ranges: &[LunRange],
        note_regions: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let Some(media) = &self.outdated else {
            return Ok(());
        };
        let mut misses = self.own_misses.lock().unwrap_or_else(|p| p.into_inner());
        note_regions()?;
        let (owned, marks): (Vec<LunRange>, Vec<(u32, u64)>) = {
            let t = self.table();
            ranges
                .iter()
                .filter(|&&(l, r)| {
                    let owner = t.luns.get(l as usize).and_then(|x| x.get(r as usize));
                    owner.is_some_and(|o| o.owner == self.me)
                })
                .filter_map(|&r| Some((r, self.global_range(&t, r)?)))
                .unzip()
        };
        if owned.iter().any(|&r| !self.stale_here.contains(r)) {
            media
                .mark(self.store.as_ref(), self.me, self.me, &marks)
                .map_err(|e| format!("marking our medium outdated on the arbiter: {e}"))?;
            let mut known = self.marking.lock().unwrap_or_else(|p| p.into_inner());
            known
                .entry(self.me)
                .or_default()
                .extend(marks.iter().copied());
            crate::transitions::changed();
            tracing::error!(
                "our own medium misses writes of range(s) {owned:?} (a flush batch failed on it; node {}'s medium took it; marked outdated on the arbiter): their reads come from node {}'s medium until the repair",
                self.node_name(self.partner()),
                self.node_name(self.partner())
            );
        }
        self.stale_here.add(&owned);
        for r in owned {
            *misses.entry(r).or_default() += 1;
        }
        Ok(())
    }

    /// How many flush batches of `range` our own medium missed so far (see
    /// [`Self::mark_own_medium_missed`]).
    pub fn own_medium_misses(&self, range: LunRange) -> u64 {
        let misses = self.own_misses.lock().unwrap_or_else(|p| p.into_inner());
        misses.get(&range).copied().unwrap_or(0)
    }

    /// A repair copied `range` from the partner's medium onto ours: `clear_regions` (our
    /// out-of-sync map's regions of it), then our marks of it go, unless a batch missed our
    /// medium since the repair saw `seen` misses (false: the repair must run again). Under
    /// the lock that counts misses, so a batch's regions noted meanwhile are never cleared.
    pub fn finish_own_repair(
        &self,
        range: LunRange,
        seen: u64,
        clear_regions: impl FnOnce() -> Result<(), String>,
    ) -> Result<bool, String> {
        let misses = self.own_misses.lock().unwrap_or_else(|p| p.into_inner());
        if misses.get(&range).copied().unwrap_or(0) != seen {
            return Ok(false);
        }
        clear_regions()?;
        self.clear_outdated(self.me, &[range])
            .map_err(|e| format!("withdrawing the marks on the arbiter: {e}"))?;
        Ok(true)
    }

    /// With `storage = "own"`: whether our medium is marked outdated for `range` of `lun`
    /// (as this node knows it: loaded at start, kept as it marks and clears). Cheap.
    pub fn own_medium_outdated(&self, lun: u32, range: u32) -> bool {
        self.stale_here.contains((lun, range))
    }

    /// With `storage = "own"`, at a start with a blank NVRAM: if this node ran in the cluster
    /// before (a replaced node, or its NVRAM replaced), nothing tells what its medium misses:
    /// marks it outdated for every range it does not own (a full resync follows), except
    /// those the partner's medium is outdated for (ours may be the only copy left; warned).
    /// Then records that this node ran. Returns the ranges marked.
    pub fn outdate_unknown_medium(&self) -> Result<Vec<LunRange>, ownership::TableError> {
        let Some(media) = &self.outdated else {
            return Ok(Vec::new());
        };
        let mut marked = Vec::new();
        if media.ran_before(self.store.as_ref(), self.me)? {
            let partner_stale = self.outdated_ranges(self.partner())?;
            let t = self.table().clone();
            let all: Vec<LunRange> = t
                .luns
                .iter()
                .enumerate()
                .flat_map(|(l, rs)| (0..rs.len() as u32).map(move |r| (l as u32, r)))
                .collect();
            let (kept, mark): (Vec<LunRange>, Vec<LunRange>) =
                all.into_iter().partition(|r| partner_stale.contains(r));
            if !kept.is_empty() {
                tracing::error!(
                    "this node's NVRAM is new but it ran in the cluster before, and node {}'s medium is outdated for range(s) {kept:?}: ours is not marked outdated for them (it may hold the only copy); check it with `nvmirrorctl verify` once both are up",
                    self.node_name(self.partner())
                );
            }
            let owned: Vec<LunRange> = mark
                .iter()
                .copied()
                .filter(|&(l, r)| self.state(l, r) == RangeState::Local)
                .collect();
            if !owned.is_empty() {
                tracing::error!(
                    "this node's NVRAM is new but it ran in the cluster before, and it owns range(s) {owned:?}: their medium's history is unknown; hand them to the partner (`nvmirrorctl handover`) so that its resync copies them here"
                );
            }
            self.mark_outdated(self.me, &mark)?;
            marked = mark
                .into_iter()
                .filter(|&(l, r)| self.state(l, r) != RangeState::Local)
                .collect();
            tracing::warn!(
                "this node's NVRAM is new but it ran in the cluster before (a replaced node or NVRAM): its medium is marked outdated for {} range(s) until the partner's resync copies them whole",
                marked.len()
            );
        }
        media.note_ran(self.store.as_ref(), self.me)?;
        Ok(marked)
    }

    /// With `storage = "own"`: records on the arbiter that this node ran (see
    /// `outdate_unknown_medium`).
    pub fn note_ran(&self) -> Result<(), ownership::TableError> {
        match &self.outdated {
            Some(media) => media.note_ran(self.store.as_ref(), self.me),
            None => Ok(()),
        }
    }

    /// At start: which ranges our medium is marked outdated for (by anyone).
    pub fn load_own_outdated(&self) -> Result<(), ownership::TableError> {
        let stale = self.outdated_ranges(self.me)?;
        self.stale_here.add(&stale);
        Ok(())
    }

    /// Withdraws the marks each of `writers` made about `subject`'s medium for `ranges` (at
    /// the epochs our view of the table gives them) and forgets ours among them. Returns the
    /// marking lock, held: the caller finishes its bookkeeping before a mark can come in.
    fn withdraw_marks(
        &self,
        media: &OutdatedMedia,
        writers: &[NodeId],
        subject: NodeId,
        ranges: &[LunRange],
    ) -> Result<MarkingGuard<'_>, ownership::TableError> {
        let t = self.table().clone();
        let globals: Vec<u32> = ranges
            .iter()
            .filter_map(|&r| self.global_range(&t, r).map(|(g, _)| g))
            .collect();
        let epochs: Vec<u64> = t.luns.iter().flatten().map(|o| o.epoch).collect();
        let epoch_of = |g: u32| epochs.get(g as usize).copied();
        let mut known = self.marking.lock().unwrap_or_else(|p| p.into_inner());
        // Forgotten before the withdrawal, not after it: a withdrawal that fails may still
        // land, and a mark remembered as made would then never be written again (simulator
        // seed 340 with `--voter-table --storage own` and one try per operation: the
        // resync's withdrawal failed, a batch the partner's medium missed after it was
        // taken for marked already, and the withdrawal landed: a lost write).
        if let Some(made) = known.get_mut(&subject) {
            for g in &globals {
                made.remove(g);
            }
        }
        for &writer in writers {
            media.clear(self.store.as_ref(), writer, subject, &globals, &epoch_of)?;
        }
        Ok(known)
    }

    /// With `storage = "own"`, after a resync copied `ranges` to `node`'s medium: withdraws
    /// our marks about it for them.
    pub fn clear_outdated(
        &self,
        node: NodeId,
        ranges: &[LunRange],
    ) -> Result<(), ownership::TableError> {
        let Some(media) = &self.outdated else {
            return Ok(());
        };
        let _marking = self.withdraw_marks(media, &[self.me], node, ranges)?;
        if node == self.me {
            self.stale_here.remove(ranges);
        } else if let Some(leases) = &self.read_leases {
            leases.grant_again(ranges);
        }
        crate::transitions::changed();
        tracing::info!(
            "node {}'s medium holds {} range(s) {:?} again (resynced): marks withdrawn",
            self.node_name(node),
            ranges.len(),
            ranges
        );
        Ok(())
    }

    /// With `storage = "own"`, the operator's way out of a double failure: `ranges` are
    /// marked outdated on both media (each misses writes the other holds, so no resync or
    /// repair can run), and the operator chose our medium as the one to keep. Every mark
    /// about our medium for them goes, whoever made it; the partner's stay, so its medium
    /// gets ours copied over it when it returns. The writes our medium missed are lost.
    ///
    /// Only while the partner is provably down (its lease dead or never written: it cannot
    /// be writing its slots, which only it writes otherwise, nor serving the ranges) and
    /// only for ranges outdated on both media; anything else is refused with the reason.
    pub fn force_own_medium_current(&self, ranges: &[LunRange]) -> Result<(), String> {
        let Some(media) = &self.outdated else {
            return Err(
                "only with cluster.storage = \"own\": a shared medium is never outdated".into(),
            );
        };
        if ranges.is_empty() {
            return Err("name the ranges to force (--range LUN:RANGE)".into());
        }
        let partner = self.partner();
        let name = self.node_name(partner).to_owned();
        match self.lease.as_ref().map(|l| l.verdict(partner)) {
            Some(Verdict::Dead { .. } | Verdict::Absent) => {}
            Some(Verdict::Alive { ago }) => {
                return Err(format!(
                    "node {name} is alive on the arbiter (heartbeat {} ms ago): stop its daemon first (its marks are its own to write while it runs)",
                    ago.as_millis()
                ))
            }
            Some(Verdict::Unknown) => {
                return Err(
                    "this node does not hold its arbiter lease, so it cannot tell that the partner is down"
                        .into(),
                )
            }
            None => return Err("no arbiter lease: this node cannot tell that the partner is down".into()),
        }
        let read = |e: ownership::TableError| format!("reading the outdated-media marks: {e}");
        let ours = self.outdated_ranges(self.me).map_err(read)?;
        let theirs = self.outdated_ranges(partner).map_err(read)?;
        for &(l, r) in ranges {
            if !ours.contains(&(l, r)) {
                return Err(format!(
                    "LUN {l} range {r}: this node's medium is not marked outdated for it: nothing to force"
                ));
            }
            if !theirs.contains(&(l, r)) {
                return Err(format!(
                    "LUN {l} range {r}: node {name}'s medium holds every write of it: start node {name}, and the resync (or the repair) copies it onto this node's medium without losing anything"
                ));
            }
        }
        let every_node: Vec<NodeId> = (0..self.nodes.len() as NodeId).collect();
        let _marking = self
            .withdraw_marks(media, &every_node, self.me, ranges)
            .map_err(|e| format!("withdrawing the marks on the arbiter: {e}"))?;
        self.stale_here.remove(ranges);
        crate::transitions::changed();
        tracing::error!(
            "FORCED by the operator: this node's medium counts as current for range(s) {ranges:?} although it misses writes of them (both media did): those writes are lost; node {name}'s medium stays outdated and gets this one copied over it when it returns"
        );
        Ok(())
    }

    /// With `storage = "own"`: the (LUN, range)s whose writes `node`'s medium misses (marks
    /// made at the epoch our view of the table gives the range now).
    pub fn outdated_ranges(&self, node: NodeId) -> Result<Vec<LunRange>, ownership::TableError> {
        let Some(media) = &self.outdated else {
            return Ok(Vec::new());
        };
        let t = self.table().clone();
        let mut by_global = Vec::new();
        for (lun, ranges) in t.luns.iter().enumerate() {
            for (r, entry) in ranges.iter().enumerate() {
                by_global.push(((lun as u32, r as u32), entry.epoch));
            }
        }
        let epoch_of = |g: u32| by_global.get(g as usize).map(|&(_, e)| e);
        let stale = media.of(self.store.as_ref(), node, &epoch_of)?;
        let ranges: Vec<LunRange> = stale
            .into_iter()
            .filter_map(|g| by_global.get(g as usize).map(|&(r, _)| r))
            .collect();
        self.outdated_last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, ranges.clone());
        Ok(ranges)
    }

    /// `node`'s medium's outdated ranges as the last successful [`Self::outdated_ranges`]
    /// read them (None: never read).
    pub fn outdated_ranges_last_read(&self, node: NodeId) -> Option<Vec<LunRange>> {
        self.outdated_last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
    }

    /// Partner unreachable: records on the medium that our `partition` is flushed through
    /// `seq` (of NVRAM log `log_id`), so a takeover does not replay stale mirror copies.
    pub fn record_flushed(
        &self,
        log_id: u64,
        partitions: usize,
        partition: u32,
        seq: u64,
    ) -> Result<(), ownership::TableError> {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let m = self.current_marks(&mut marks, log_id, partitions)?;
        // Before this batch (which may release their records dead) moves the marks on.
        self.bound_lost_ranges(m, partitions);
        let slot = m
            .flushed_through
            .get_mut(partition as usize)
            .ok_or(ownership::TableError::TooLarge(partition as usize))?;
        *slot = (*slot).max(seq);
        ownership::save_marks(self.store.as_ref(), m)
    }

    /// At start, before the log moves past them: our records of `ranges` (another node's
    /// in the table) die unwritten, so the marks bound those ranges where their partitions
    /// are now. A taker whose replay of its copies of them is unfinished must not take
    /// them for flushed once our marks move on (simulator seed 6420).
    pub fn record_dropped_at_start(
        &self,
        log_id: u64,
        partitions: usize,
        ranges: &[LunRange],
    ) -> Result<(), ownership::TableError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let epochs = self.owners_of(ranges);
        {
            let mut noted = self
                .lost_since_marks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (&range, owner) in ranges.iter().zip(epochs) {
                noted.retain(|(x, _)| *x != range);
                noted.push((range, owner.epoch));
            }
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let m = self.current_marks(&mut marks, log_id, partitions)?;
        self.bound_lost_ranges(m, partitions);
        ownership::save_marks(self.store.as_ref(), m)
    }

    /// Ranges lost since the marks were last written go into them, bounded where their
    /// partition is now (`FlushMarks::lost`).
    fn bound_lost_ranges(&self, m: &mut ownership::FlushMarks, partitions: usize) {
        let newly_lost = std::mem::take(
            &mut *self
                .lost_since_marks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if !newly_lost.is_empty() {
            let t = self.table().clone();
            for ((lun, range), epoch) in newly_lost {
                let Some((global, _)) = self.global_range(&t, (lun, range)) else {
                    continue;
                };
                let p = crate::config::partition_of_range(global, partitions);
                let through = m.flushed_through.get(p as usize).copied().unwrap_or(0);
                m.lost.retain(|l| (l.lun, l.range) != (lun, range));
                m.lost.push(ownership::LostRange {
                    lun,
                    range,
                    epoch,
                    partition: p,
                    flushed_through: through,
                });
            }
            // The oldest go first when the slot is full: voided ranges before lost ones.
            let room = ownership::FlushMarks::lost_room(partitions);
            if m.lost.len() + m.voided.len() > room {
                m.voided.sort_by_key(|v| v.epoch);
                let excess = (m.lost.len() + m.voided.len() - room).min(m.voided.len());
                m.voided.drain(..excess);
            }
            if m.lost.len() > room {
                m.lost.sort_by_key(|l| l.epoch);
                let excess = m.lost.len() - room;
                m.lost.drain(..excess);
            }
        }
    }

    /// Our flush marks as the medium has them (loaded once after a start), started afresh
    /// for a new log or layout.
    fn current_marks<'m>(
        &self,
        marks: &'m mut Option<ownership::FlushMarks>,
        log_id: u64,
        partitions: usize,
    ) -> Result<&'m mut ownership::FlushMarks, ownership::TableError> {
        let cluster_id = self.table().cluster_id;
        if marks.is_none() {
            // After a restart: continue from what the medium has (never move a mark back).
            *marks = ownership::load_marks(self.store.as_ref(), cluster_id, self.me)?;
        }
        let fresh = || ownership::FlushMarks {
            cluster_id,
            node: self.me,
            log_id,
            flushed_through: vec![0; partitions],
            lost: Vec::new(),
            voided: Vec::new(),
        };
        let m = marks.get_or_insert_with(fresh);
        if m.log_id != log_id || m.flushed_through.len() != partitions {
            *m = fresh();
        }
        Ok(m)
    }

    /// Records in our flush marks (on the shared medium, or with a medium per node on the
    /// arbiter) that our records of these ranges below the given seqs are dead (`voids`:
    /// LUN, range, partition, below_seq), under the epochs the table gives the ranges now,
    /// before the void records are written. The partner gets the void records over the
    /// link; the marks reach it when the link is down and we die before it comes back
    /// (`FlushMarks::voided`).
    pub fn record_voided(
        &self,
        log_id: u64,
        partitions: usize,
        voids: &[(u32, u32, u32, u64)],
    ) -> Result<(), ownership::TableError> {
        if voids.is_empty() {
            return Ok(());
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let epochs: Vec<u64> = voids
            .iter()
            .map(|&(l, r, _, _)| self.owners_of(&[(l, r)]).first().map_or(0, |o| o.epoch))
            .collect();
        let m = self.current_marks(&mut marks, log_id, partitions)?;
        for (&(lun, range, partition, below_seq), epoch) in voids.iter().zip(epochs) {
            // A newer void of the range covers what an older one did.
            m.voided
                .retain(|v| (v.lun, v.range, v.partition) != (lun, range, partition));
            m.voided.push(ownership::VoidedRange {
                lun,
                range,
                epoch,
                partition,
                below_seq,
            });
        }
        // The oldest go first when the slot is full (lost ranges keep their room).
        let room = ownership::FlushMarks::lost_room(partitions).saturating_sub(m.lost.len());
        if m.voided.len() > room {
            m.voided.sort_by_key(|v| v.epoch);
            let excess = m.voided.len() - room;
            m.voided.drain(..excess);
        }
        ownership::save_marks(self.store.as_ref(), m)
    }

    /// The flush marks `node` left on the medium, if any.
    pub fn flush_marks_of(
        &self,
        node: u32,
    ) -> Result<Option<ownership::FlushMarks>, ownership::TableError> {
        let cluster_id = self.table().cluster_id;
        ownership::load_marks(self.store.as_ref(), cluster_id, node)
    }

    /// Fencing: re-reads the table on the medium and says whether we still own `range`
    /// of `lun` (ownership may have moved away while we were cut off).
    pub fn still_owned(&self, checks: &[(u32, u32)]) -> Result<(), Fence> {
        let t = match ownership::load(self.store.as_ref()) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(Fence::Unreadable(
                    "the ownership table is gone from the medium".into(),
                ))
            }
            Err(e) => {
                return Err(Fence::Unreadable(format!(
                    "cannot read the ownership table: {e}"
                )))
            }
        };
        for &(l, r) in checks {
            let owner = t
                .luns
                .get(l as usize)
                .and_then(|x| x.get(r as usize))
                .map(|o| (o.owner, o.epoch));
            match owner {
                Some((o, _)) if o == self.me => {}
                Some((o, epoch)) => {
                    return Err(Fence::Lost(format!(
                        "fenced: range {r} of LUN {l} now belongs to node {} (epoch {epoch}); this node must not write it",
                        self.node_name(o)
                    )))
                }
                None => {
                    return Err(Fence::Lost(format!(
                        "range {r} of LUN {l} is not in the ownership table"
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<RangeStatus> {
        let t = self.table().clone();
        let gates = self.gates().clone();
        let mut out = Vec::new();
        for (l, ranges) in t.luns.iter().enumerate() {
            for (r, o) in ranges.iter().enumerate() {
                out.push(RangeStatus {
                    lun: l as u32,
                    range: r as u32,
                    owner: self.node_name(o.owner).to_owned(),
                    epoch: o.epoch,
                    configured_owner: self
                        .configured
                        .luns
                        .get(l)
                        .and_then(|c| c.get(r))
                        .map(|c| self.node_name(c.owner).to_owned())
                        .unwrap_or_default(),
                    state: match gates.get(l).and_then(|g| g.get(r)) {
                        Some(RangeState::Local) => "local".into(),
                        Some(RangeState::Remote(_)) => "remote".into(),
                        Some(RangeState::TakingOver) => "taking-over".into(),
                        None => "?".into(),
                    },
                    serving: false,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ManualClock;
    use crate::lease::LeaseTiming;
    use crate::ownership::MemTableStore;

    /// Node 0's and node 1's disk leases on one arbiter, on a manual clock of 100 ms steps,
    /// and `renew(leases, n)`: n steps in which those leases renew and watch the others.
    #[allow(clippy::type_complexity)]
    fn two_leases() -> (
        Arc<MemTableStore>,
        [Arc<DiskLease>; 2],
        impl Fn(&[&Arc<DiskLease>], usize),
    ) {
        let clock = Arc::new(ManualClock::default());
        let step = Duration::from_millis(100);
        let timing = LeaseTiming {
            renew: step,
            lease: step * 4,
            io_timeout: step,
        };
        let store = Arc::new(MemTableStore::default());
        let a = DiskLease::new(clock.clone(), store.clone(), 7, 0, 2, timing, 1);
        let b = DiskLease::new(clock.clone(), store.clone(), 7, 1, 2, timing, 2);
        let renew = move |who: &[&Arc<DiskLease>], times: usize| {
            for _ in 0..times {
                for l in who {
                    l.renew_once();
                    l.watch_others();
                }
                clock.advance(step);
            }
        };
        (store, [a, b], renew)
    }

    /// Two nodes, one LUN of two ranges, each node owning one, at epoch 1.
    fn two_range_table() -> OwnershipTable {
        OwnershipTable {
            cluster_id: 7,
            generation: 1,
            luns: vec![vec![
                RangeOwner { owner: 0, epoch: 1 },
                RangeOwner { owner: 1, epoch: 1 },
            ]],
        }
    }

    /// Node `me`'s view of the two nodes' cluster, whose arbiter is `table_store`.
    fn open_view(
        storage: StorageMode,
        me: NodeId,
        table_store: Arc<dyn TableStore>,
        lease: Option<Arc<DiskLease>>,
    ) -> Cluster {
        Cluster::open(ClusterSetup {
            storage,
            me,
            nodes: vec!["node-a".into(), "node-b".into()],
            table_store,
            initial: two_range_table(),
            lease,
            link_timeout: Duration::from_secs(1),
            forward_wait: Duration::from_secs(60),
            reservations: Vec::new(),
        })
        .expect("open")
    }

    /// One arbiter with a two-node, two-range table (each node one range), and
    /// `view(me)`: node `me`'s cluster view of it, without a disk lease.
    fn views_without_leases(
        storage: StorageMode,
    ) -> (Arc<MemTableStore>, impl Fn(NodeId) -> Cluster) {
        let store = Arc::new(MemTableStore::default());
        let shared = store.clone();
        let view = move |me| open_view(storage, me, shared.clone(), None);
        (store, view)
    }

    use crate::ownership::FailingWrite;

    fn claim_with_a_failing_write(
        lands: bool,
        reads_fail: bool,
    ) -> (Result<Vec<(u32, u32)>, String>, Cluster) {
        // The table's slots: 0 and 1.
        let store = Arc::new(FailingWrite::new(0..2));
        let view = open_view(StorageMode::Shared, 1, store.clone(), None);
        store.arm(lands, reads_fail);
        let r = view.begin_takeover(0, None).map_err(|e| e.to_string());
        store.reconnect();
        let on_medium = ownership::load(store.as_ref()).unwrap().unwrap();
        if let Ok(moved) = &r {
            assert!(!moved.is_empty());
            assert_eq!(on_medium.luns[0][0].owner, 1, "the claim is on the medium");
        } else if !reads_fail {
            assert_eq!(on_medium.luns[0][0].owner, 0, "nothing claimed");
            assert_eq!(on_medium.generation, 1);
        }
        (r, view)
    }

    /// A claim's table write that failed may have landed (a disk's lost acknowledgement, a
    /// voters' write that reached a minority). The trace of simulator seed 272 with
    /// `--voter-table` and the store's first version (one try per operation): the takeover
    /// took it for nothing claimed, the next one found the ranges already its own (the claim
    /// had surfaced) and replayed nothing, and an acknowledged write was lost. The claim now
    /// reads its slot back, and writes back what it finds if its own table is not there.
    #[test]
    fn a_claims_failed_table_write_is_settled_before_it_counts_as_failed() {
        let (r, view) = claim_with_a_failing_write(true, false);
        assert_eq!(r, Ok(vec![(0, 0)]), "it landed: the claim stands");
        assert_eq!(view.state(0, 0), RangeState::TakingOver);
        let (r, view) = claim_with_a_failing_write(false, false);
        assert!(r.is_err(), "it did not land, and now never will");
        assert_eq!(view.state(0, 0), RangeState::Remote(0));
        let (r, view) = claim_with_a_failing_write(false, true);
        let e = r.unwrap_err();
        assert!(e.contains("may still land"), "{e}");
        assert_eq!(
            view.state(0, 0),
            RangeState::TakingOver,
            "its gate stays closed"
        );
    }

    /// A move's table write that failed may have landed too (simulator seed 182 with
    /// `--voter-table` and one try per operation: the giver reopened its ranges, the taker
    /// read the write that had landed, and both served them). It is settled as a claim's.
    #[test]
    fn a_moves_failed_table_write_is_settled_before_it_counts_as_failed() {
        let move_with_a_failing_write = |lands: bool, reads_fail: bool| {
            let store = Arc::new(FailingWrite::new(0..2));
            let view = open_view(StorageMode::Shared, 0, store.clone(), None);
            let held = view.owners_of(&[(0, 0)]);
            store.arm(lands, reads_fail);
            let r = view.hand_over(&[(0, 0)], &held, 1);
            store.reconnect();
            let on_medium = ownership::load(store.as_ref()).unwrap().unwrap();
            (r, view, on_medium)
        };
        let (r, view, on_medium) = move_with_a_failing_write(true, false);
        assert!(r.is_ok(), "it landed: the move stands ({r:?})");
        assert_eq!(view.state(0, 0), RangeState::Remote(1));
        assert_eq!(on_medium.luns[0][0].owner, 1);
        let (r, view, on_medium) = move_with_a_failing_write(false, false);
        assert!(
            r.as_ref()
                .is_err_and(|e| !matches!(e, ownership::TableError::Uncertain(_))),
            "it did not land, and now never will ({r:?})"
        );
        assert_eq!(view.owners_of(&[(0, 0)])[0].owner, 0);
        assert_eq!((on_medium.luns[0][0].owner, on_medium.generation), (0, 1));
        let (r, _, _) = move_with_a_failing_write(false, true);
        assert!(
            matches!(r, Err(ownership::TableError::Uncertain(_))),
            "{r:?}"
        );
    }

    /// A takeover that ends after a re-read found its ranges taken from it meanwhile opens
    /// them as the table says, not as its own (simulator seed 1442 with `--voter-table`).
    #[test]
    fn a_takeover_ending_after_its_ranges_were_taken_does_not_serve_them() {
        let (store, view) = views_without_leases(StorageMode::Shared);
        let node_b = view(1);
        assert_eq!(node_b.begin_takeover(0, None).expect("claim"), vec![(0, 0)]);
        assert_eq!(node_b.state(0, 0), RangeState::TakingOver);
        // node-a takes every range while node-b's replay keeps failing.
        let mut taken = ownership::load(store.as_ref())
            .expect("load")
            .expect("table");
        taken.generation += 1;
        for e in taken.luns[0].iter_mut() {
            *e = RangeOwner {
                owner: 0,
                epoch: e.epoch + 1,
            };
        }
        ownership::save(store.as_ref(), &taken).expect("save");
        node_b.reload_noting_losses(&mut |_| {}).expect("reload");
        assert_eq!(node_b.finish_takeover(&[(0, 0)]), 0, "nothing opened");
        assert_eq!(node_b.state(0, 0), RangeState::Remote(0));
        assert_eq!(node_b.state(0, 1), RangeState::Remote(0));
    }

    /// A withdrawal of marks that failed may still land (a voters' write kept by a
    /// minority): the mark made again after it must be written, not taken for made already
    /// (simulator seed 340 with `--voter-table --storage own` and one try per operation).
    #[test]
    fn a_mark_after_a_failed_withdrawal_is_written_again() {
        // node-b's marks about node-a: slot 16 + 1 * 4 + 0.
        let store = Arc::new(FailingWrite::new(20..21));
        let node_b = open_view(StorageMode::Own, 1, store.clone(), None);
        node_b.mark_outdated(0, &[(0, 1)]).expect("mark");
        store.arm(false, true);
        assert!(node_b.clear_outdated(0, &[(0, 1)]).is_err());
        store.reconnect();
        let before = store.writes.load(std::sync::atomic::Ordering::SeqCst);
        node_b.mark_outdated(0, &[(0, 1)]).expect("mark again");
        assert_eq!(
            store.writes.load(std::sync::atomic::Ordering::SeqCst),
            before + 1,
            "the mark is written again"
        );
        // Remembered now: the next one writes nothing.
        node_b
            .mark_outdated(0, &[(0, 1)])
            .expect("mark a third time");
        assert_eq!(
            store.writes.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
    }

    /// `status` shows the marks as last read when the arbiter cannot be read now (a node
    /// cut off from its voters), never an empty set as if nothing were outdated.
    #[test]
    fn the_marks_as_last_read_stay_known_while_the_arbiter_is_unreadable() {
        let store = Arc::new(FailingWrite::new(20..21));
        let node_b = open_view(StorageMode::Own, 1, store.clone(), None);
        assert_eq!(node_b.outdated_ranges_last_read(0), None);
        node_b.mark_outdated(0, &[(0, 1)]).expect("mark");
        assert_eq!(node_b.outdated_ranges(0).expect("read"), vec![(0, 1)]);
        // A withdrawal whose write fails (not landing) cuts the arbiter off.
        store.arm(false, true);
        assert!(node_b.clear_outdated(0, &[(0, 1)]).is_err());
        assert!(node_b.outdated_ranges(0).is_err());
        assert_eq!(node_b.outdated_ranges_last_read(0), Some(vec![(0, 1)]));
    }

    /// Found by the partition suite (tests/vm/24, cycle "stop-b"): a node paused past its
    /// lease, taken over, resumed, regained its lease and, until its lease follower got to
    /// re-read the table, served the range it had lost by its stale view.
    #[test]
    fn a_node_whose_lease_lapsed_does_not_trust_its_view_until_it_rereads_the_table() {
        let (store, [a, b], renew) = two_leases();
        renew(&[&a, &b], 6);
        assert!(a.holds() && b.holds());
        let view = open_view(StorageMode::Shared, 0, store.clone(), Some(a.clone()));
        assert!(view.table_is_current());
        assert_eq!(view.state(0, 0), RangeState::Local);

        // node-a is paused past its lease; node-b declares it dead and takes range 0.
        renew(&[&b], 14);
        assert!(matches!(b.verdict(0), crate::lease::Verdict::Dead { .. }));
        let mut taken = two_range_table();
        taken.generation += 1;
        taken.luns[0][0] = RangeOwner { owner: 1, epoch: 2 };
        ownership::save(store.as_ref(), &taken).expect("save");

        // node-a resumes and holds its lease again after the settle period...
        renew(&[&a, &b], 6);
        assert!(a.holds(), "node-a holds its lease again");
        // ... but its view still says range 0 is its own: it must not be trusted.
        assert_eq!(view.state(0, 0), RangeState::Local);
        assert!(!view.table_is_current());

        view.reload_noting_losses(&mut |_| {}).expect("reload");
        assert!(view.table_is_current());
        assert_eq!(view.state(0, 0), RangeState::Remote(1));
    }

    /// The operator's way out of a range outdated on both media: refused while the partner
    /// lives and for a range one medium holds whole; then our medium's marks go, whoever
    /// made them, and the partner's stay (its medium gets ours copied over it).
    #[test]
    fn forcing_our_medium_current_needs_both_media_outdated_and_the_partner_down() {
        let (store, [a, b], renew) = two_leases();
        renew(&[&a, &b], 6);
        let view = |me, lease| open_view(StorageMode::Own, me, store.clone(), lease);
        let (node_a, node_b) = (view(0, Some(a.clone())), view(1, Some(b.clone())));
        // node-b owns range 1: it wrote it while node-a was away (node-a's medium misses
        // those writes), then its own medium failed a batch of it (node-a's took it).
        node_b.mark_outdated(0, &[(0, 1)]).expect("mark node-a");
        node_b
            .mark_own_medium_missed(&[(0, 1)], || Ok(()))
            .expect("mark node-b");
        // node-a's own medium failed a batch of its range 0: node-b's holds it.
        node_a
            .mark_own_medium_missed(&[(0, 0)], || Ok(()))
            .expect("mark ourselves");
        assert_eq!(
            node_a.outdated_ranges(0).expect("read"),
            vec![(0, 0), (0, 1)]
        );
        assert_eq!(node_a.outdated_ranges(1).expect("read"), vec![(0, 1)]);

        let refused = node_a.force_own_medium_current(&[(0, 1)]).unwrap_err();
        assert!(refused.contains("is alive on the arbiter"), "{refused}");

        renew(&[&a], 14);
        assert!(matches!(a.verdict(1), Verdict::Dead { .. }));
        let refused = node_a.force_own_medium_current(&[(0, 0)]).unwrap_err();
        assert!(refused.contains("holds every write of it"), "{refused}");
        let fresh = view(0, Some(a.clone()));
        fresh
            .clear_outdated(0, &[(0, 0)])
            .expect("a resync of range 0");
        let refused = fresh.force_own_medium_current(&[(0, 0)]).unwrap_err();
        assert!(refused.contains("not marked outdated"), "{refused}");

        fresh.load_own_outdated().expect("load");
        assert!(fresh.own_medium_outdated(0, 1));
        fresh.force_own_medium_current(&[(0, 1)]).expect("forced");
        assert!(!fresh.own_medium_outdated(0, 1));
        assert!(fresh.outdated_ranges(0).expect("read").is_empty());
        assert_eq!(
            fresh.outdated_ranges(1).expect("read"),
            vec![(0, 1)],
            "node-b's medium stays outdated: ours is copied over it"
        );

        // node-b was only paused: it resumes, regains its lease and writes range 1 alone
        // again. Its memory says node-a is marked already; the lapse makes it write anyway.
        renew(&[&a, &b], 6);
        assert!(b.holds());
        node_b
            .mark_outdated(0, &[(0, 1)])
            .expect("mark node-a again");
        assert_eq!(fresh.outdated_ranges(0).expect("read"), vec![(0, 1)]);
    }

    /// Simulator seed 55093: node-a's own medium failed a batch of its range (marked by
    /// itself), node-b claimed the range and died before marking node-a's medium at the new
    /// epoch. The claim itself must keep node-a's medium outdated, or node-a, back and
    /// taking the range over again, would serve the batch it missed as old data.
    #[test]
    fn a_claim_keeps_the_old_owners_medium_outdated_at_the_new_epoch() {
        let (_, view) = views_without_leases(StorageMode::Own);
        let (node_a, node_b) = (view(0), view(1));
        node_a
            .mark_own_medium_missed(&[(0, 0)], || Ok(()))
            .expect("mark ourselves");
        node_b.reload_noting_losses(&mut |_| {}).expect("reload");
        assert_eq!(node_b.outdated_ranges(0).expect("read"), vec![(0, 0)]);

        // node-b claims both of node-a's ranges... and dies before any other mark.
        assert_eq!(node_b.begin_takeover(0, None).expect("claim"), vec![(0, 0)]);
        assert_eq!(node_b.owners_of(&[(0, 0)])[0].epoch, 2);
        // node-a, restarted, reads the table at the new epoch: still outdated.
        let node_a = view(0);
        node_a.reload_noting_losses(&mut |_| {}).expect("reload");
        assert_eq!(node_a.outdated_ranges(0).expect("read"), vec![(0, 0)]);
        // A medium nobody marked is not marked by a move.
        assert_eq!(node_a.outdated_ranges(1).expect("read"), Vec::new());
    }

    /// A takeover notes its claim on the medium for the node it took the ranges from until
    /// its replay ends (simulator seed 4755: the old owner skipped its records of ranges
    /// whose taker died before replaying them).
    #[test]
    fn a_claim_is_noted_for_the_old_owner_until_the_replay_ends() {
        let (store, view) = views_without_leases(StorageMode::Shared);
        let (a, b) = (view(0), view(1));
        assert!(a.unfinished_claims_on_us().expect("read").is_empty());

        // node-b takes node-a's range 0: until its replay ends, node-a learns of the claim.
        assert_eq!(b.begin_takeover(0, None).expect("claim"), vec![(0, 0)]);
        assert_eq!(
            a.unfinished_claims_on_us().expect("read"),
            vec![(1, vec![(0, 0)])]
        );
        assert!(b.unfinished_claims_on_us().expect("read").is_empty());
        b.clear_claim_note().expect("clear");
        assert!(a.unfinished_claims_on_us().expect("read").is_empty());

        // A note left standing says nothing once the range moved on from the claimed epoch.
        assert_eq!(a.begin_takeover(1, None).expect("claim"), vec![(0, 1)]);
        let mut moved_on = ownership::load(store.as_ref())
            .expect("load")
            .expect("table");
        moved_on.generation += 1;
        moved_on.luns[0][1].epoch += 1;
        ownership::save(store.as_ref(), &moved_on).expect("save");
        assert!(b.unfinished_claims_on_us().expect("read").is_empty());
    }
}
