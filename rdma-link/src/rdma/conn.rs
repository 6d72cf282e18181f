//! One RDMA connection: the RC queue pair with its registered regions and message slots, the
//! completion handling, and sending — control messages as SENDs, a record as an RDMA WRITE
//! straight from our first store into the peer's second store chained with a SEND of its
//! header (no copy on either side), requests and responses as chunk SENDs in slots of their own
//! (see `chunk`). Everything a pass of the connection loop queues goes to the QP with one
//! doorbell. Implements the handshake's `MsgIo` and the connection loop's `Wire`.
//!
//! Before the peer has proven the secret the connection has no memory registration a remote
//! peer could use: our second store is registered for remote writes (and our first store for
//! local reads) only in `MsgIo::authenticated`, its rkey sent in the handshake's `Auth` or
//! `Welcome`; request / response chunks are refused until then (`inbound`). After the handshake
//! every SEND ends in a MAC; a record's MAC covers the bytes its WRITE placed, computed by the
//! sender over its first store and checked by the receiver over its second store before it
//! persists or acknowledges anything.

use super::chunk::{CHUNK_DATA, SLOT};
use super::cm::{readable, verr};
use super::inbound::Inbound;
use super::verbs::{
    self, ChannelFd, CmId, CompChannel, Completion, Cq, Mr, Pd, Qp, RegBuf, SendBatch, VerbsError,
    CAP_FLUSH_GLOBAL, CAP_FLUSH_PERSISTENT,
};
use crate::error::{LinkError, Result};
use crate::handshake::{MsgIo, PeerInfo};
use crate::proto::{
    ChunkHdr, FrameMac, Msg, RecordHdr, RemoteRegion, SessionKeys, CHUNK_HDR_LEN, TAG_LEN,
};
use crate::session::Session;
use crate::shared::Shared;
use crate::wire::Wire;
use rdma_sys::rdma_cm_event_type as ev;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

const KIND_RECV: u64 = 1 << 56;
const KIND_SEND: u64 = 2 << 56;
const KIND_WRITE: u64 = 3 << 56;
const KIND_CHUNK: u64 = 4 << 56;
const KIND_MASK: u64 = 0xff << 56;
/// Request / response chunks in flight at most (each holds a send slot until its completion).
const DATA_SLOTS: usize = 64;
/// How long the goodbye may take to leave at shutdown.
const GOODBYE_WAIT: Duration = Duration::from_millis(100);

/// The verbs resources of one connection. Field order is drop order: the fds leave tokio first,
/// then the QP is destroyed (no more DMA), then the MRs, the receive/send buffers, the CQ (and
/// its channel), the PD and finally the cm_id (held by the QP and `cm_id`).
pub(crate) struct RdmaConn {
    cq_fd: AsyncFd<ChannelFd>,
    pub(super) cm_fd: AsyncFd<ChannelFd>,
    pub(super) qp: Qp,
    /// Sends queued by `try_send*`, posted together by `post_queued`.
    batch: SendBatch,
    local_mr: Option<Mr>,
    store_mr: Option<Mr>,
    recv: RegBuf,
    send: RegBuf,
    cq: Cq,
    pd: Arc<Pd>,
    cm_id: Arc<CmId>,
    shared: Arc<Shared>,
    free_send: Vec<usize>,
    send_slots: usize,
    /// Request / response chunks posted and not yet completed.
    chunks_in_flight: usize,
    /// Bytes of the front of `Session::data_out` already sent.
    data_cursor: usize,
    /// Checks and decodes what arrives (MACs, authentication, chunk reassembly).
    inbound: Inbound,
    /// Until the connection loop takes over (`start`), received SENDs are kept as they came
    /// and decoded one at a time: the first messages after the handshake carry MACs the
    /// handshake's reader does not expect yet.
    live: bool,
    raw: VecDeque<Vec<u8>>,
    /// The MAC state of our messages (after the handshake, if frames are authenticated).
    tx_mac: Option<FrameMac>,
    /// Something arrived since the session last looked (chunks do not reach the session).
    rx_activity: bool,
    inbox: VecDeque<Msg>,
    comps: Vec<Completion>,
    pub(super) peer_region: Option<RemoteRegion>,
}

impl RdmaConn {
    pub(super) fn setup(
        shared: &Arc<Shared>,
        id: Arc<CmId>,
        cm_fd: AsyncFd<ChannelFd>,
    ) -> Result<RdmaConn> {
        let e = |e| verr(shared, e);
        let w = shared.cfg.window as usize;
        // Receives: the peer's records (its window <= ours is enforced by the session), acks of
        // our posts (<= our window), heartbeats and releases (slack; RNR retry covers bursts).
        // Plus DATA_SLOTS for request / response chunks (the peer keeps at most that many in
        // flight) on both sides.
        let recv_slots = 2 * w + 64 + DATA_SLOTS;
        let send_slots = 2 * w + 64 + DATA_SLOTS;
        let pd = Pd::new(id.clone()).map_err(e)?;
        let chan: Arc<CompChannel> = CompChannel::new(id.clone()).map_err(e)?;
        let cq = Cq::new(&id, chan.clone(), (recv_slots + 2 * send_slots) as i32).map_err(e)?;
        let qp = Qp::new(
            id.clone(),
            &pd,
            &cq,
            (2 * send_slots) as u32,
            recv_slots as u32,
        )
        .map_err(e)?;
        let recv = RegBuf::new(&pd, recv_slots, SLOT).map_err(e)?;
        let send = RegBuf::new(&pd, send_slots, SLOT).map_err(e)?;
        if let Some(caps) = pd.device_caps_ex() {
            tracing::info!(
                device = %id.device_name(),
                flush_global = caps & CAP_FLUSH_GLOBAL != 0,
                flush_persistent = caps & CAP_FLUSH_PERSISTENT != 0,
                "RDMA device capabilities (FLUSH is not used: rdma-core 44 has no IBV_WR_FLUSH)"
            );
        }
        for i in 0..recv_slots {
            qp.post_recv(KIND_RECV | i as u64, &recv, i).map_err(e)?;
        }
        cq.arm().map_err(e)?;
        let cq_fd = ChannelFd::Comp(chan.clone()).register().map_err(|err| {
            shared.down_err(format!(
                "registering the completion channel with tokio: {err}"
            ))
        })?;
        Ok(RdmaConn {
            cq_fd,
            cm_fd,
            batch: SendBatch::new(&qp, 2 * send_slots),
            qp,
            local_mr: None,
            store_mr: None,
            recv,
            send,
            cq,
            pd,
            cm_id: id,
            shared: shared.clone(),
            free_send: (0..send_slots).rev().collect(),
            send_slots,
            chunks_in_flight: 0,
            data_cursor: 0,
            inbound: Inbound::new(
                (
                    shared.cfg.max_request,
                    2 * shared.cfg.request_window as usize,
                ),
                shared.store.as_ref().map(|s| s.region()),
                shared.cfg.max_record,
            ),
            live: false,
            raw: VecDeque::new(),
            tx_mac: None,
            rx_activity: false,
            inbox: VecDeque::new(),
            comps: Vec::with_capacity(64),
            peer_region: None,
        })
    }

    /// The peer has proven the secret: register our regions (the second store for its remote
    /// writes) and accept its requests and responses.
    fn register_regions(&mut self) -> Result<()> {
        let shared = self.shared.clone();
        let e = |e| verr(&shared, e);
        if let (None, Some(r)) = (&self.local_mr, shared.local) {
            // SAFETY: the Region contract keeps the memory mapped for the link's life, longer
            // than this MR (dropped with the connection).
            let mr = unsafe { Mr::register(&self.pd, r.as_ptr(), r.len(), verbs::ACCESS_LOCAL) }
                .map_err(e)?;
            self.local_mr = Some(mr);
        }
        if let (None, Some(s)) = (&self.store_mr, &shared.store) {
            let r = s.region();
            // SAFETY: as above; remote write access goes only to this authenticated peer (the
            // rkey is sent in the handshake's last step, after its proof).
            let mr =
                unsafe { Mr::register(&self.pd, r.as_ptr(), r.len(), verbs::ACCESS_REMOTE_WRITE) }
                    .map_err(e)?;
            self.store_mr = Some(mr);
        }
        self.inbound.authenticated();
        Ok(())
    }

    /// The connection loop takes over: messages carry MACs under `keys` from here on.
    pub(super) fn start(&mut self, peer_region: Option<RemoteRegion>, keys: Option<&SessionKeys>) {
        self.peer_region = peer_region;
        if let Some(k) = keys {
            self.tx_mac = Some(FrameMac::new(k.tx));
            self.inbound.start_mac(FrameMac::new(k.rx));
        }
        self.live = true;
    }

    fn store_region(&self) -> Option<RemoteRegion> {
        let (mr, s) = (self.store_mr.as_ref()?, self.shared.store.as_ref()?);
        let r = s.region();
        Some(RemoteRegion {
            addr: r.as_ptr() as u64,
            rkey: mr.rkey(),
            len: r.len() as u64,
        })
    }

    fn err(&self, e: VerbsError) -> LinkError {
        verr(&self.shared, e)
    }

    /// Take channel events and poll every completion; received messages go to `inbox`. Leaves
    /// the CQ armed, so the next completion raises a channel event.
    fn pump(&mut self) -> Result<usize> {
        self.cq.take_events().map_err(|e| self.err(e))?;
        self.poll_completions(true)
    }

    /// Handle every completion there is. `arm`: once the CQ is empty, arm it and look once
    /// more (a completion that slipped in between raises no event). Busy polling does not arm:
    /// on some providers (rxe) arming is a system call.
    fn poll_completions(&mut self, arm: bool) -> Result<usize> {
        let mut total = 0;
        loop {
            self.comps.clear();
            let mut comps = std::mem::take(&mut self.comps);
            let mut r = self.cq.poll(&mut comps, 256);
            if arm && matches!(r, Ok(0)) {
                r = self.cq.arm().and_then(|()| self.cq.poll(&mut comps, 256));
            }
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    self.comps = comps;
                    return Err(self.err(e));
                }
            };
            if n == 0 {
                self.comps = comps;
                return Ok(total);
            }
            total += n;
            let res = comps.iter().try_for_each(|c| self.complete(c));
            self.comps = comps;
            res?;
        }
    }

    fn complete(&mut self, c: &Completion) -> Result<()> {
        if !c.ok() {
            let what = match c.wr_id & KIND_MASK {
                KIND_RECV => "receive",
                KIND_SEND => "send",
                KIND_WRITE => "RDMA WRITE of a record",
                KIND_CHUNK => "send of a request / response chunk",
                _ => "work request",
            };
            return Err(self.shared.down_err(format!(
                "RDMA {what} failed: {} (status {}, vendor error {:#x}); the peer is gone or the fabric dropped the connection",
                c.status_str(),
                c.status,
                c.vendor_err
            )));
        }
        let slot = (c.wr_id & !KIND_MASK) as usize;
        match c.wr_id & KIND_MASK {
            KIND_SEND => self.free_send.push(slot),
            KIND_CHUNK => {
                self.free_send.push(slot);
                self.chunks_in_flight = self.chunks_in_flight.saturating_sub(1);
            }
            KIND_RECV if c.is_recv() => {
                self.rx_activity = true;
                let len = (c.byte_len as usize).min(SLOT);
                let bytes = &self.recv.slot(slot)[..len];
                // Decode / copy out of the slot before it is posted again.
                let msg = if self.live {
                    self.inbound.open(bytes)
                } else {
                    self.raw.push_back(bytes.to_vec());
                    Ok(None)
                };
                self.qp
                    .post_recv(c.wr_id, &self.recv, slot)
                    .map_err(|e| self.err(e))?;
                match msg {
                    Ok(Some(m)) => self.inbox.push_back(m),
                    Ok(None) => {}
                    Err(e) => return Err(self.malformed(e)),
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn malformed(&self, e: String) -> LinkError {
        tracing::error!(peer = self.shared.peer(), error = %e, "malformed RDMA message; closing the connection");
        self.shared.down_err(format!("malformed traffic: {e}"))
    }

    /// Decode the next SEND kept from before the connection loop took over.
    fn open_raw(&mut self) -> Result<Option<Option<Msg>>> {
        let Some(b) = self.raw.pop_front() else {
            return Ok(None);
        };
        match self.inbound.open(&b) {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(self.malformed(e)),
        }
    }

    /// Put our MAC at the end of the `len` bytes in send slot `i`; returns the new length.
    fn seal(&mut self, i: usize, len: usize, data: &[u8]) -> usize {
        let Some(mac) = self.tx_mac.as_mut() else {
            return len;
        };
        let slot = self.send.slot_mut(i);
        let tag = mac.tag(&slot[..len], data);
        slot[len..len + TAG_LEN].copy_from_slice(&tag);
        len + TAG_LEN
    }

    /// Queue one chunk of a request / response; false if no chunk slot is free.
    fn try_send_chunk(&mut self, hdr: &ChunkHdr, data: &[u8]) -> Result<bool> {
        if self.chunks_in_flight >= DATA_SLOTS {
            return Ok(false);
        }
        let Some(i) = self.free_send.pop() else {
            return Ok(false);
        };
        let mut h = [0u8; CHUNK_HDR_LEN];
        hdr.encode(&mut h);
        let slot = self.send.slot_mut(i);
        slot[..CHUNK_HDR_LEN].copy_from_slice(&h);
        slot[CHUNK_HDR_LEN..CHUNK_HDR_LEN + data.len()].copy_from_slice(data);
        let len = self.seal(i, CHUNK_HDR_LEN + data.len(), &[]);
        self.batch.send(KIND_CHUNK | i as u64, &self.send, i, len);
        self.chunks_in_flight += 1;
        Ok(true)
    }

    /// Send chunks of the queued requests / responses, in order, as far as slots allow.
    fn flush_data(&mut self, session: &mut Session) -> Result<()> {
        while let Some(m) = session.data_out.front() {
            let (request, id, status, payload) = match m {
                Msg::Request { id, payload } => (true, *id, 0, payload.clone()),
                Msg::Response {
                    id,
                    status,
                    payload,
                } => (false, *id, *status, payload.clone()),
                _ => {
                    session.data_out.pop_front();
                    continue;
                }
            };
            let total = payload.len();
            loop {
                let off = self.data_cursor.min(total);
                let n = (total - off).min(CHUNK_DATA);
                let hdr = ChunkHdr {
                    request,
                    id,
                    status,
                    total: total as u32,
                    offset: off as u32,
                };
                if !self.try_send_chunk(&hdr, &payload[off..off + n])? {
                    return Ok(());
                }
                self.data_cursor = off + n;
                if self.data_cursor >= total {
                    break;
                }
            }
            self.data_cursor = 0;
            session.data_out.pop_front();
        }
        Ok(())
    }

    /// Queue a control message; false if no send slot is free (try again after completions).
    fn try_send(&mut self, m: &Msg) -> Result<bool> {
        let Some(i) = self.free_send.pop() else {
            return Ok(false);
        };
        let mut b = Vec::with_capacity(64);
        m.encode(&mut b);
        if b.len() + TAG_LEN > SLOT {
            self.free_send.push(i);
            return Err(self.shared.down_err(format!(
                "{} message of {} bytes exceeds the RDMA slot of {SLOT} bytes",
                m.name(),
                b.len()
            )));
        }
        self.send.slot_mut(i)[..b.len()].copy_from_slice(&b);
        let len = self.seal(i, b.len(), &[]);
        self.batch.send(KIND_SEND | i as u64, &self.send, i, len);
        Ok(true)
    }

    /// Queue a record (WRITE + notification); false if no send slot is free.
    fn try_send_record(&mut self, hdr: &RecordHdr, local_offset: u64) -> Result<bool> {
        let (Some(remote), Some(local), Some(mr)) =
            (self.peer_region, self.shared.local, self.local_mr.as_ref())
        else {
            return Err(self
                .shared
                .down_err("internal: record without regions".to_string()));
        };
        let lkey = mr.lkey();
        let Some(i) = self.free_send.pop() else {
            return Ok(false);
        };
        let mut b = Vec::with_capacity(64);
        Msg::Record(*hdr).encode(&mut b);
        self.send.slot_mut(i)[..b.len()].copy_from_slice(&b);
        // Bounds were checked by Link::post against both regions.
        assert!(
            local.check(local_offset, u64::from(hdr.len))
                && hdr.offset + u64::from(hdr.len) <= remote.len
        );
        // The MAC covers the header and the bytes the WRITE carries.
        let len = if self.tx_mac.is_some() {
            // SAFETY: the engine keeps the source bytes of a post unchanged until it resolves.
            let Some(data) = (unsafe { local.slice(local_offset, hdr.len as usize) }) else {
                self.free_send.push(i);
                return Err(self
                    .shared
                    .down_err("internal: post outside the local region".to_string()));
            };
            self.seal(i, b.len(), data)
        } else {
            b.len()
        };
        // SAFETY: the range is inside the local MR (checked by Link::post); the engine keeps it
        // unchanged until the post resolves, which is after this SEND completes or the QP is gone.
        unsafe {
            self.batch.write(
                KIND_WRITE | (hdr.tag & !KIND_MASK),
                (local.as_ptr() as u64 + local_offset, hdr.len, lkey),
                remote.addr + hdr.offset,
                remote.rkey,
            )
        };
        self.batch.send(KIND_SEND | i as u64, &self.send, i, len);
        Ok(true)
    }

    /// Wait for completions or a connection event; returns Err if the connection ended.
    async fn wait(&mut self) -> Result<()> {
        tokio::select! {
            biased;
            r = readable(&self.cq_fd) => r.map_err(|e| self.shared.down_err(format!("completion channel: {e}")))?,
            r = readable(&self.cm_fd) => {
                r.map_err(|e| self.shared.down_err(format!("rdma_cm channel: {e}")))?;
                self.cm_events()?;
            }
        }
        self.pump().map(|_| ())
    }

    fn cm_events(&mut self) -> Result<()> {
        while let Some(e) = self.cm_id.channel().get().map_err(|e| self.err(e))? {
            match e.kind() {
                ev::RDMA_CM_EVENT_DISCONNECTED
                | ev::RDMA_CM_EVENT_DEVICE_REMOVAL
                | ev::RDMA_CM_EVENT_TIMEWAIT_EXIT => {
                    return Err(self.shared.down_err(format!(
                        "node {} disconnected (rdma_cm {})",
                        self.shared.peer(),
                        e.name()
                    )));
                }
                _ => tracing::debug!(event = %e.name(), "rdma_cm event"),
            }
        }
        Ok(())
    }

    /// Send as much of the session's control messages, records and requests / responses as
    /// slots allow.
    fn flush(&mut self, session: &mut Session) -> Result<()> {
        let queued = self.queue_sends(session);
        let posted = self.post_queued();
        queued.and(posted)
    }

    /// Post what `try_send*` queued, with one doorbell.
    fn post_queued(&mut self) -> Result<()> {
        self.qp
            .post_batch(&mut self.batch)
            .map_err(|e| verr(&self.shared, e))
    }

    fn queue_sends(&mut self, session: &mut Session) -> Result<()> {
        while let Some(m) = session.next_control() {
            if !self.try_send(m)? {
                return Ok(());
            }
            session.pop_control();
        }
        while let Some(r) = session.records.front() {
            if !self.try_send_record(&r.hdr, r.local_offset)? {
                return Ok(());
            }
            session.records.pop_front();
        }
        self.flush_data(session)
    }

    /// Hand what arrived to the session: `inbox` and, for chunks still being reassembled, the
    /// fact that the peer is alive.
    fn deliver(&mut self, session: &mut Session) -> Result<()> {
        if std::mem::take(&mut self.rx_activity) {
            session.touch();
        }
        // First what arrived before the connection loop took over, in order.
        while let Some(m) = self.open_raw()? {
            if let Some(m) = m {
                self.inbox.push_back(m);
            }
        }
        while let Some(m) = self.inbox.pop_front() {
            if let Msg::Record(h) = &m {
                // The peer's WRITE has placed the bytes already; the header must match the
                // region it was allowed to write.
                session.check_record(h)?;
            }
            session.on_msg(m)?;
        }
        Ok(())
    }
}

impl MsgIo for RdmaConn {
    async fn send_msg(&mut self, m: &Msg) -> Result<()> {
        while !self.try_send(m)? {
            self.wait().await?;
        }
        self.post_queued()
    }
    async fn recv_msg(&mut self) -> Result<Msg> {
        loop {
            if let Some(Some(m)) = self.open_raw()? {
                return Ok(m);
            }
            if self.raw.is_empty() {
                self.wait().await?;
            }
        }
    }

    fn authenticated(&mut self) -> Result<Option<RemoteRegion>> {
        self.register_regions()?;
        Ok(self.store_region())
    }
}

impl Wire for RdmaConn {
    // While busy polling, `poll` takes the completions; the channel is not armed then.
    const RECEIVE_WHILE_HOT: bool = false;

    fn peer_store_len(&self, peer: &PeerInfo) -> u64 {
        // Records are written at the peer's registered region: no further than it reaches.
        peer.region.map_or(0, |r| r.len.min(peer.info.second_len))
    }

    async fn send(&mut self, session: &mut Session) -> Result<()> {
        self.deliver(session)?;
        self.flush(session)
    }

    async fn receive(&mut self, _session: &mut Session) -> Result<()> {
        // What arrived is handed over by the next `send`, before anything is sent.
        self.wait().await
    }

    fn poll(&mut self, _session: &mut Session) -> Result<usize> {
        self.poll_completions(false)
    }

    fn cooled(&mut self, _session: &mut Session) -> Result<usize> {
        // Going back to sleeping on the channel: arm the CQ first, taking what came in.
        self.pump()
    }

    async fn goodbye(&mut self, session: &mut Session) {
        let _ = self.flush(session);
        // Let the goodbye leave before the disconnect.
        let t0 = Instant::now();
        while t0.elapsed() < GOODBYE_WAIT
            && self.pump().is_ok()
            && self.free_send.len() < self.send_slots
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn close(self) {
        // Disconnect, then destroy the QP and MRs (dropping self): no more DMA from or into
        // the regions.
        self.cm_id.disconnect();
    }
}
