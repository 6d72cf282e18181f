//! Which node serves which LUN range right now, and the request forwarding between nodes.
//!
//! Each range is in one of three states on this node:
//! * `Local`: we own it; its writes are staged here.
//! * `Remote(node)`: the partner owns it; its I/O is forwarded to the partner.
//! * `TakingOver`: we are replaying the partner's mirrored records for it; I/O waits (it is
//!   neither failed nor allowed to overtake the replay).
//!
//! The persistent truth is the ownership table on the shared medium (`ownership`); this is
//! the node's view of it plus the gates.

use crate::ownership::{self, OwnershipTable, RangeOwner, TableStore};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    Local,
    Remote(u32),
    TakingOver,
}

pub type ForwardFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// Sends I/O for ranges the partner owns to the partner.
pub trait Forwarder: Send + Sync {
    fn write(&self, lun: u32, offset: u64, data: Vec<u8>) -> ForwardFuture<()>;
    fn write_zeroes(&self, lun: u32, offset: u64, len: u64) -> ForwardFuture<()>;
    fn read(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>>;
}

/// A [`Forwarder`] over any request/response channel: `call` carries an encoded request to
/// the owner and brings back its raw answer (see [`wire`]).
pub struct RequestForwarder<C>(pub C);

impl<C> RequestForwarder<C>
where
    C: Fn(Vec<u8>) -> ForwardFuture<Vec<u8>> + Send + Sync,
{
    fn ask(&self, req: Vec<u8>) -> ForwardFuture<Vec<u8>> {
        let answer = (self.0)(req);
        Box::pin(async move { wire::answer(&answer.await?).map(|d| d.to_vec()) })
    }
}

impl<C> Forwarder for RequestForwarder<C>
where
    C: Fn(Vec<u8>) -> ForwardFuture<Vec<u8>> + Send + Sync,
{
    fn write(&self, lun: u32, offset: u64, data: Vec<u8>) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(
            wire::OP_WRITE,
            lun,
            offset,
            data.len() as u32,
            &data,
        ));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn write_zeroes(&self, lun: u32, offset: u64, len: u64) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(wire::OP_ZERO, lun, offset, len as u32, &[]));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn read(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>> {
        self.ask(wire::encode(wire::OP_READ, lun, offset, len, &[]))
    }
}

pub struct ClusterSetup {
    /// Our index in `nodes`.
    pub me: u32,
    pub nodes: Vec<String>,
    pub table_store: Box<dyn TableStore>,
    /// Written to the medium if it holds no table yet.
    pub initial: OwnershipTable,
}

pub struct Cluster {
    pub me: u32,
    pub nodes: Vec<String>,
    /// The owners the config asks for; giveback returns ranges to them.
    configured: OwnershipTable,
    store: Box<dyn TableStore>,
    table: Mutex<OwnershipTable>,
    gates: Mutex<Vec<Vec<RangeState>>>,
    gate_opened: Notify,
    forwarder: std::sync::RwLock<Option<Arc<dyn Forwarder>>>,
    /// Our flush marks as last written to the medium (see [`ownership::FlushMarks`]).
    marks: Mutex<Option<ownership::FlushMarks>>,
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
}

impl Cluster {
    pub fn open(setup: ClusterSetup) -> Result<Cluster, ownership::TableError> {
        let table = ownership::load_or_init(setup.table_store.as_ref(), &setup.initial)?;
        let gates = Self::gates_from(&table, setup.me);
        Ok(Cluster {
            me: setup.me,
            nodes: setup.nodes,
            configured: setup.initial,
            store: setup.table_store,
            table: Mutex::new(table),
            gates: Mutex::new(gates),
            gate_opened: Notify::new(),
            forwarder: std::sync::RwLock::new(None),
            marks: Mutex::new(None),
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

    pub fn node_name(&self, i: u32) -> &str {
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
        let moved: Vec<(u32, u32)> = self
            .ranges_of(from)
            .into_iter()
            .filter(|r| only.is_none_or(|o| o.contains(r)))
            .collect();
        {
            let mut gates = self.gates();
            for &(l, r) in &moved {
                gates[l as usize][r as usize] = RangeState::TakingOver;
            }
        }
        // Re-read first: the medium is the truth (the partner may have changed it).
        let mut t = ownership::load(self.store.as_ref())?.unwrap_or_else(|| self.table().clone());
        t.generation += 1;
        for &(l, r) in &moved {
            let e = &mut t.luns[l as usize][r as usize];
            *e = RangeOwner {
                owner: self.me,
                epoch: e.epoch + 1,
            };
        }
        ownership::save(self.store.as_ref(), &t)?;
        *self.table() = t;
        Ok(moved)
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
    }

    /// Giveback: `to` owns `ranges` from now on, with a new epoch, durably on the medium.
    /// Their gates then send I/O to `to`.
    pub fn hand_over(&self, ranges: &[(u32, u32)], to: u32) -> Result<(), ownership::TableError> {
        let mut t = ownership::load(self.store.as_ref())?.unwrap_or_else(|| self.table().clone());
        t.generation += 1;
        for &(l, r) in ranges {
            let e = &mut t.luns[l as usize][r as usize];
            *e = RangeOwner {
                owner: to,
                epoch: e.epoch + 1,
            };
        }
        ownership::save(self.store.as_ref(), &t)?;
        *self.table() = t;
        {
            let mut gates = self.gates();
            for &(l, r) in ranges {
                gates[l as usize][r as usize] = RangeState::Remote(to);
            }
        }
        self.gate_opened.notify_waiters();
        Ok(())
    }

    /// Re-reads the table on the medium (the partner changed it, e.g. gave ranges back) and
    /// routes accordingly. Ranges being taken over keep their closed gates.
    pub fn reload(&self) -> Result<(), ownership::TableError> {
        let Some(t) = ownership::load(self.store.as_ref())? else {
            return Ok(());
        };
        let fresh = Self::gates_from(&t, self.me);
        {
            let mut gates = self.gates();
            for (l, ranges) in fresh.into_iter().enumerate() {
                for (r, state) in ranges.into_iter().enumerate() {
                    if gates[l][r] != RangeState::TakingOver {
                        gates[l][r] = state;
                    }
                }
            }
        }
        *self.table() = t;
        self.gate_opened.notify_waiters();
        Ok(())
    }

    /// Last step of a takeover: the replay is done, open the gates.
    pub fn finish_takeover(&self, moved: &[(u32, u32)]) {
        {
            let mut gates = self.gates();
            for &(l, r) in moved {
                gates[l as usize][r as usize] = RangeState::Local;
            }
        }
        self.gate_opened.notify_waiters();
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
        let cluster_id = self.table().cluster_id;
        if marks.is_none() {
            // After a restart: continue from what the medium has (never move a mark back).
            *marks = ownership::load_marks(self.store.as_ref(), cluster_id, self.me)?;
        }
        let m = marks.get_or_insert_with(|| ownership::FlushMarks {
            cluster_id,
            node: self.me,
            log_id,
            flushed_through: vec![0; partitions],
        });
        if m.log_id != log_id || m.flushed_through.len() != partitions {
            *m = ownership::FlushMarks {
                cluster_id,
                node: self.me,
                log_id,
                flushed_through: vec![0; partitions],
            };
        }
        let slot = m
            .flushed_through
            .get_mut(partition as usize)
            .ok_or(ownership::TableError::TooLarge(partition as usize))?;
        *slot = (*slot).max(seq);
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
    pub fn still_owned(&self, checks: &[(u32, u32)]) -> Result<(), crate::flusher::Fence> {
        use crate::flusher::Fence;
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
                });
            }
        }
        out
    }
}

/// Wire format of a forwarded request and its answer (opaque to the link).
pub mod wire {
    pub const OP_WRITE: u8 = 1;
    pub const OP_ZERO: u8 = 2;
    pub const OP_READ: u8 = 3;
    /// Write records `offset..=last` (last in the data) of partition `lun` from your second
    /// store; `len` of them must be there.
    pub const OP_WRITE_FOR_PARTNER: u8 = 4;
    /// The ownership table changed on the medium (a giveback): re-read it.
    pub const OP_RELOAD_OWNERSHIP: u8 = 5;
    const HEADER: usize = 17;

    #[derive(Debug, PartialEq, Eq)]
    pub struct Request {
        pub op: u8,
        pub lun: u32,
        pub offset: u64,
        pub len: u32,
        pub data: Vec<u8>,
    }

    pub fn encode(op: u8, lun: u32, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + data.len());
        b.push(op);
        b.extend_from_slice(&lun.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Request> {
        if b.len() < HEADER {
            return None;
        }
        let mut lun = [0u8; 4];
        lun.copy_from_slice(&b[1..5]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[5..13]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[13..17]);
        let r = Request {
            op: b[0],
            lun: u32::from_le_bytes(lun),
            offset: u64::from_le_bytes(off),
            len: u32::from_le_bytes(len),
            data: b[HEADER..].to_vec(),
        };
        let data_ok = match r.op {
            OP_WRITE => r.data.len() == r.len as usize,
            OP_ZERO | OP_READ | OP_RELOAD_OWNERSHIP => r.data.is_empty(),
            OP_WRITE_FOR_PARTNER => r.data.len() == 8,
            _ => false,
        };
        data_ok.then_some(r)
    }

    /// Answer: 0 + data on success, 1 + UTF-8 message on failure.
    pub fn ok(data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + data.len());
        b.push(0);
        b.extend_from_slice(data);
        b
    }

    pub fn err(msg: &str) -> Vec<u8> {
        let mut b = vec![1];
        b.extend_from_slice(msg.as_bytes());
        b
    }

    pub fn answer(b: &[u8]) -> Result<&[u8], String> {
        match b.split_first() {
            Some((0, data)) => Ok(data),
            Some((1, msg)) => Err(String::from_utf8_lossy(msg).into_owned()),
            _ => Err("malformed answer from the partner".into()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        #[test]
        fn round_trip_and_rejects_malformed() {
            let b = encode(OP_WRITE, 2, 8192, 3, &[1, 2, 3]);
            assert_eq!(
                decode(&b),
                Some(Request {
                    op: OP_WRITE,
                    lun: 2,
                    offset: 8192,
                    len: 3,
                    data: vec![1, 2, 3]
                })
            );
            assert_eq!(decode(&b[..10]), None);
            assert_eq!(decode(&encode(OP_WRITE, 0, 0, 5, &[1])), None);
            assert_eq!(decode(&encode(9, 0, 0, 0, &[])), None);
            assert_eq!(answer(&ok(&[7])), Ok(&[7u8][..]));
            assert_eq!(answer(&err("no")), Err("no".to_string()));
        }
    }
}
