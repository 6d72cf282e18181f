//! The RDMA transport: one RC queue pair per peer, set up with librdmacm.
//!
//! * Control messages (handshake, acks, heartbeats, releases) are SENDs of the `proto` payload
//!   into pre-posted receive slots.
//! * A record is an unsignaled RDMA WRITE from the local first-store MR straight into the peer's
//!   second-store MR, chained with a signaled SEND of the record header. RC ordering guarantees
//!   the peer sees the SEND only after the written bytes are placed; it persists the range and
//!   SENDs an `Ack`. No copy on either side.
//! * Requests and responses (the link's RPC) are cut into chunks of up to one slot and SENT
//!   into the same pre-posted receive slots; the receiver reassembles them by (direction, id).
//!   At most `DATA_SLOTS` chunks are in flight, in send slots of their own, so a burst of large
//!   requests never holds back records, acks or heartbeats.
//! * The second store's address and rkey travel in the `Auth` / `Welcome` messages, i.e. only to
//!   a peer that already proved it knows the cluster secret.
//! * Completions are driven from tokio: the completion channel's fd is non-blocking and
//!   registered with `AsyncFd` (see README for the measurement behind this choice).

mod verbs;

use crate::error::{LinkError, Result};
use crate::handshake::{self, MsgIo, PeerInfo};
use crate::link::{
    finish_connection, seqs_summary, BusyPoll, Cmd, ConnHandle, LinkState, Role, Session, Shared,
    UpInfo,
};
use crate::proto::{ChunkHdr, Msg, RecordHdr, RemoteRegion, CHUNK_HDR_LEN};
use bytes::{Bytes, BytesMut};
use rdma_sys::rdma_cm_event_type as ev;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use verbs::{
    ChannelFd, CmEvent, CmId, CompChannel, Completion, Cq, EventChannel, Mr, Pd, Qp, RegBuf,
    SendBatch, VerbsError,
};

/// Bytes of one control-message slot (send and receive).
const SLOT: usize = 4096;
const KIND_RECV: u64 = 1 << 56;
const KIND_SEND: u64 = 2 << 56;
const KIND_WRITE: u64 = 3 << 56;
const KIND_CHUNK: u64 = 4 << 56;
/// Request / response chunks in flight at most (each holds a send slot until its completion).
const DATA_SLOTS: usize = 64;
/// Payload bytes per chunk.
const CHUNK_DATA: usize = SLOT - CHUNK_HDR_LEN;
const KIND_MASK: u64 = 0xff << 56;

/// Kernel `IB_UVERBS_DEVICE_FLUSH_GLOBAL` / `_PERSISTENT` bits of `device_cap_flags_ex`.
const CAP_FLUSH_GLOBAL: u64 = 1 << 38;
const CAP_FLUSH_PERSISTENT: u64 = 1 << 39;

/// What the RDMA devices of this machine can do.
#[derive(Debug, Clone)]
pub struct RdmaCapabilities {
    /// (device name, supports RDMA FLUSH to global visibility, to persistence)
    pub devices: Vec<(String, bool, bool)>,
    /// Whether this build's rdma-core headers have the `IBV_WR_FLUSH` verb (rdma-core 45+).
    pub userspace_flush_verb: bool,
}

/// Probe the RDMA devices (never fails: no device means an empty list).
pub fn rdma_capabilities() -> RdmaCapabilities {
    let devices = verbs::list_devices()
        .into_iter()
        .map(|(n, caps)| {
            let c = caps.unwrap_or(0);
            (n, c & CAP_FLUSH_GLOBAL != 0, c & CAP_FLUSH_PERSISTENT != 0)
        })
        .collect();
    // rdma-core 44 (Debian 12) has no IBV_WR_FLUSH; rdma-sys is generated from those headers.
    RdmaCapabilities {
        devices,
        userspace_flush_verb: false,
    }
}

fn verr(shared: &Shared, e: VerbsError) -> LinkError {
    shared.down_err(format!("RDMA {e}"))
}

pub(crate) async fn run(shared: Arc<Shared>) {
    match shared.cfg.role {
        Role::Listen(addr) => listen_loop(shared, addr).await,
        Role::Connect(addr) => connect_loop(shared, addr).await,
    }
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn readable(fd: &AsyncFd<ChannelFd>) -> std::io::Result<()> {
    let mut g = fd.readable().await?;
    g.clear_ready();
    Ok(())
}

/// Wait for the next rdma_cm event on `ch`.
async fn next_event(
    ch: &EventChannel,
    afd: &AsyncFd<ChannelFd>,
) -> std::result::Result<CmEvent, VerbsError> {
    loop {
        if let Some(e) = ch.get()? {
            return Ok(e);
        }
        readable(afd).await.map_err(|err| VerbsError {
            op: "waiting for an rdma_cm event",
            err,
        })?;
    }
}

async fn expect_event(
    shared: &Shared,
    ch: &EventChannel,
    afd: &AsyncFd<ChannelFd>,
    want: u32,
    what: &str,
) -> Result<()> {
    let e = next_event(ch, afd).await.map_err(|e| verr(shared, e))?;
    if e.kind() != want {
        let extra = match e.kind() {
            ev::RDMA_CM_EVENT_REJECTED => {
                " (connection refused: is the peer's nvmirror listening on that address?)"
            }
            ev::RDMA_CM_EVENT_ADDR_ERROR | ev::RDMA_CM_EVENT_ROUTE_ERROR => {
                " (no RDMA device routes to that address)"
            }
            ev::RDMA_CM_EVENT_UNREACHABLE => " (peer unreachable)",
            _ => "",
        };
        return Err(shared.down_err(format!(
            "{what}: got rdma_cm event {} (status {}){extra}",
            e.name(),
            e.status()
        )));
    }
    Ok(())
}

fn cm_afd(shared: &Shared, ch: &Arc<EventChannel>) -> Result<AsyncFd<ChannelFd>> {
    ChannelFd::Cm(ch.clone())
        .register()
        .map_err(|e| shared.down_err(format!("registering the rdma_cm channel with tokio: {e}")))
}

async fn connect_loop(shared: Arc<Shared>, addr: SocketAddr) {
    let mut sd = shared.shutdown.subscribe();
    let mut failed_attempts = 0u64;
    while !shared.is_shutdown() {
        shared.set_state_if_not_up(LinkState::Connecting);
        let attempt = async {
            let ch = EventChannel::new().map_err(|e| verr(&shared, e))?;
            let afd = cm_afd(&shared, &ch)?;
            let id = Arc::new(CmId::new(ch.clone()).map_err(|e| verr(&shared, e))?);
            id.resolve_addr(addr, 2000).map_err(|e| verr(&shared, e))?;
            expect_event(
                &shared,
                &ch,
                &afd,
                ev::RDMA_CM_EVENT_ADDR_RESOLVED,
                &format!("resolving {addr}"),
            )
            .await?;
            id.resolve_route(2000).map_err(|e| verr(&shared, e))?;
            expect_event(
                &shared,
                &ch,
                &afd,
                ev::RDMA_CM_EVENT_ROUTE_RESOLVED,
                &format!("resolving the route to {addr}"),
            )
            .await?;
            let mut conn = RdmaConn::setup(&shared, id, afd)?;
            conn.qp.id().connect().map_err(|e| verr(&shared, e))?;
            expect_event(
                &shared,
                &ch,
                &conn.cm_fd,
                ev::RDMA_CM_EVENT_ESTABLISHED,
                &format!("connecting to {addr}"),
            )
            .await?;
            let region = conn.store_region();
            let peer = tokio::time::timeout(
                shared.cfg.handshake_timeout,
                handshake::connector(&mut conn, &shared, region),
            )
            .await
            .map_err(|_| handshake_timeout(&shared))??;
            Ok::<_, LinkError>((conn, peer))
        };
        let res = tokio::select! {
            r = tokio::time::timeout(shared.cfg.handshake_timeout * 2, attempt) => r.unwrap_or_else(|_| Err(handshake_timeout(&shared))),
            _ = wait_shutdown(&mut sd) => break,
        };
        match res {
            Ok((conn, peer)) => {
                failed_attempts = 0;
                tracing::info!(peer = shared.cfg.peer_node_id, %addr, device = %conn.qp.id().device_name(), "mirror link up (rdma, connector)");
                let err = run_connection(shared.clone(), conn, peer).await;
                tracing::warn!(peer = shared.cfg.peer_node_id, error = %err, "mirror link down");
            }
            Err(e) => {
                // Say it once per outage; the retries every reconnect_delay go to debug.
                if failed_attempts == 0 {
                    tracing::warn!(peer = shared.cfg.peer_node_id, %addr, error = %e, "mirror link connection attempt failed; retrying");
                } else {
                    tracing::debug!(peer = shared.cfg.peer_node_id, %addr, error = %e, "mirror link connection attempt failed");
                }
                failed_attempts += 1;
                shared.set_state_if_not_up(LinkState::Down(e));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.cfg.reconnect_delay) => {}
            _ = wait_shutdown(&mut sd) => break,
        }
    }
    shared.set_state(LinkState::Closed);
}

fn handshake_timeout(shared: &Shared) -> LinkError {
    LinkError::Handshake {
        peer: shared.cfg.peer_node_id,
        source: crate::error::HandshakeError::Timeout(shared.cfg.handshake_timeout),
    }
}

async fn listen_loop(shared: Arc<Shared>, addr: SocketAddr) {
    let mut sd = shared.shutdown.subscribe();
    let listen = || -> Result<(Arc<EventChannel>, AsyncFd<ChannelFd>, CmId)> {
        let ch = EventChannel::new().map_err(|e| verr(&shared, e))?;
        let afd = cm_afd(&shared, &ch)?;
        let id = CmId::new(ch.clone()).map_err(|e| verr(&shared, e))?;
        id.bind(addr).map_err(|e| verr(&shared, e))?;
        id.listen(16).map_err(|e| verr(&shared, e))?;
        Ok((ch, afd, id))
    };
    let (ch, afd, _listen_id) = loop {
        match listen() {
            Ok(x) => break x,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for the RDMA mirror link (is an RDMA device bound to that address?)");
                shared.set_state_if_not_up(LinkState::Down(e));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = wait_shutdown(&mut sd) => { shared.set_state(LinkState::Closed); return; }
                }
            }
        }
    };
    tracing::info!(%addr, "mirror link listening (rdma)");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = next_event(&ch, &afd) => match r {
                Ok(e) if e.kind() == ev::RDMA_CM_EVENT_CONNECT_REQUEST => {
                    let raw = e.id();
                    drop(e); // acknowledge before migrating the new id
                    let setup = EventChannel::new().and_then(|ch2| {
                        // SAFETY: raw is the new id of the CONNECT_REQUEST we just received; nobody else owns it.
                        unsafe { CmId::from_request(raw, ch2) }
                    });
                    match setup {
                        Ok(id) if conns.len() < 16 => { conns.spawn(incoming(shared.clone(), id)); }
                        Ok(id) => { tracing::warn!("too many pending RDMA mirror-link connections; rejecting"); id.reject(); }
                        Err(e) => tracing::warn!(error = %e, "cannot take an RDMA connection request"),
                    }
                }
                Ok(e) => tracing::debug!(event = %e.name(), "rdma_cm event on the listener"),
                Err(e) => {
                    tracing::error!(error = %e, "rdma_cm listener failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = wait_shutdown(&mut sd) => break,
        }
    }
    while conns.join_next().await.is_some() {}
    shared.set_state(LinkState::Closed);
}

async fn incoming(shared: Arc<Shared>, id: CmId) {
    let hs = async {
        let ch = id.channel().clone();
        let afd = cm_afd(&shared, &ch)?;
        let id = Arc::new(id);
        let mut conn = match RdmaConn::setup(&shared, id.clone(), afd) {
            Ok(c) => c,
            Err(e) => {
                id.reject();
                return Err(e);
            }
        };
        conn.qp.id().accept().map_err(|e| verr(&shared, e))?;
        expect_event(
            &shared,
            &ch,
            &conn.cm_fd,
            ev::RDMA_CM_EVENT_ESTABLISHED,
            "accepting a connection",
        )
        .await?;
        let region = conn.store_region();
        let peer = tokio::time::timeout(
            shared.cfg.handshake_timeout,
            handshake::acceptor(&mut conn, &shared, region),
        )
        .await
        .map_err(|_| handshake_timeout(&shared))??;
        Ok::<_, LinkError>((conn, peer))
    };
    match tokio::time::timeout(shared.cfg.handshake_timeout * 2, hs)
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(&shared)))
    {
        Ok((conn, peer)) => {
            tracing::info!(peer = shared.cfg.peer_node_id, device = %conn.qp.id().device_name(), "mirror link up (rdma, acceptor)");
            let err = run_connection(shared.clone(), conn, peer).await;
            tracing::warn!(peer = shared.cfg.peer_node_id, error = %err, "mirror link down");
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused an RDMA mirror-link connection");
            shared.set_state_if_not_up(LinkState::Down(e));
        }
    }
}

/// The verbs resources of one connection. Field order is drop order: the fds leave tokio first,
/// then the QP is destroyed (no more DMA), then the MRs, the receive/send buffers, the CQ (and
/// its channel), the PD and finally the cm_id (held by the QP and `cm_id`).
struct RdmaConn {
    cq_fd: AsyncFd<ChannelFd>,
    cm_fd: AsyncFd<ChannelFd>,
    qp: Qp,
    /// Sends queued by `try_send*`, posted together by `post_queued`.
    batch: SendBatch,
    local_mr: Option<Mr>,
    store_mr: Option<Mr>,
    recv: RegBuf,
    send: RegBuf,
    cq: Cq,
    _pd: Arc<Pd>,
    cm_id: Arc<CmId>,
    shared: Arc<Shared>,
    free_send: Vec<usize>,
    send_slots: usize,
    /// Request / response chunks posted and not yet completed.
    chunks_in_flight: usize,
    /// Bytes of the front of `Session::data_out` already sent.
    data_cursor: usize,
    /// Requests / responses being reassembled, by (is request, id).
    partial: HashMap<(bool, u64), Partial>,
    /// Something arrived since the session last looked (chunks do not reach the session).
    rx_activity: bool,
    inbox: VecDeque<Msg>,
    comps: Vec<Completion>,
    peer_region: Option<RemoteRegion>,
}

impl RdmaConn {
    fn setup(shared: &Arc<Shared>, id: Arc<CmId>, cm_fd: AsyncFd<ChannelFd>) -> Result<RdmaConn> {
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
        let local_mr = match shared.local {
            // SAFETY: the Region contract keeps the memory mapped for the link's life, longer
            // than this MR (dropped with the connection).
            Some(r) => Some(
                unsafe { Mr::register(&pd, r.as_ptr(), r.len(), verbs::ACCESS_LOCAL) }
                    .map_err(e)?,
            ),
            None => None,
        };
        let store_mr = match &shared.store {
            Some(s) => {
                let r = s.region();
                // SAFETY: as above; remote write access is given only to the authenticated peer
                // (the rkey is sent after authentication).
                Some(
                    unsafe { Mr::register(&pd, r.as_ptr(), r.len(), verbs::ACCESS_REMOTE_WRITE) }
                        .map_err(e)?,
                )
            }
            None => None,
        };
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
            local_mr,
            store_mr,
            recv,
            send,
            cq,
            _pd: pd,
            cm_id: id,
            shared: shared.clone(),
            free_send: (0..send_slots).rev().collect(),
            send_slots,
            chunks_in_flight: 0,
            data_cursor: 0,
            partial: HashMap::new(),
            rx_activity: false,
            inbox: VecDeque::new(),
            comps: Vec::with_capacity(64),
            peer_region: None,
        })
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
                let msg = if crate::proto::is_chunk(bytes) {
                    let limits = (
                        self.shared.cfg.max_request,
                        2 * self.shared.cfg.request_window as usize,
                    );
                    reassemble(&mut self.partial, bytes, limits)
                } else {
                    Msg::decode(bytes).map(Some).map_err(|e| e.to_string())
                };
                self.qp
                    .post_recv(c.wr_id, &self.recv, slot)
                    .map_err(|e| self.err(e))?;
                match msg {
                    Ok(Some(m)) => self.inbox.push_back(m),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(peer = self.shared.peer(), error = %e, "malformed RDMA message; closing the connection");
                        return Err(self.shared.down_err(format!("malformed traffic: {e}")));
                    }
                }
            }
            _ => {}
        }
        Ok(())
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
        self.batch.send(
            KIND_CHUNK | i as u64,
            &self.send,
            i,
            CHUNK_HDR_LEN + data.len(),
        );
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
        if b.len() > SLOT {
            return Err(self.shared.down_err(format!(
                "{} message of {} bytes exceeds the RDMA slot of {SLOT} bytes",
                m.name(),
                b.len()
            )));
        }
        self.send.slot_mut(i)[..b.len()].copy_from_slice(&b);
        self.batch
            .send(KIND_SEND | i as u64, &self.send, i, b.len());
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
        debug_assert!(
            local.check(local_offset, u64::from(hdr.len))
                && hdr.offset + u64::from(hdr.len) <= remote.len
        );
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
        self.batch
            .send(KIND_SEND | i as u64, &self.send, i, b.len());
        Ok(true)
    }

    /// Wait for completions or a connection event; returns Err if the connection ended.
    async fn wait(&mut self) -> Result<()> {
        tokio::select! {
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

    /// Send as much of the session outbox and the pending records as slots allow.
    fn flush(
        &mut self,
        session: &mut Session,
        pending: &mut VecDeque<(RecordHdr, u64)>,
    ) -> Result<()> {
        let queued = self.queue_sends(session, pending);
        let posted = self.post_queued();
        queued.and(posted)
    }

    /// Post what `try_send*` queued, with one doorbell.
    fn post_queued(&mut self) -> Result<()> {
        self.qp
            .post_batch(&mut self.batch)
            .map_err(|e| verr(&self.shared, e))
    }

    fn queue_sends(
        &mut self,
        session: &mut Session,
        pending: &mut VecDeque<(RecordHdr, u64)>,
    ) -> Result<()> {
        while let Some(m) = session.outbox.front() {
            let m = m.clone();
            if !self.try_send(&m)? {
                return Ok(());
            }
            session.outbox.pop_front();
        }
        while let Some((hdr, off)) = pending.front() {
            let (hdr, off) = (*hdr, *off);
            if !self.try_send_record(&hdr, off)? {
                return Ok(());
            }
            pending.pop_front();
        }
        self.flush_data(session)
    }
}

/// A request / response being reassembled from chunks.
struct Partial {
    status: u8,
    total: u32,
    buf: BytesMut,
}

/// Add one received chunk; returns the message once complete. `limits`: (largest payload we
/// accept, most messages under reassembly at once). Errors are protocol violations.
fn reassemble(
    partial: &mut HashMap<(bool, u64), Partial>,
    bytes: &[u8],
    limits: (u32, usize),
) -> std::result::Result<Option<Msg>, String> {
    let h = ChunkHdr::decode(bytes).map_err(|e| e.to_string())?;
    let data = &bytes[CHUNK_HDR_LEN..];
    if h.total > limits.0 {
        return Err(format!(
            "{} of {} bytes exceeds our limit of {}",
            if h.request { "request" } else { "response" },
            h.total,
            limits.0
        ));
    }
    let key = (h.request, h.id);
    let done = |status: u8, payload: Bytes| {
        if h.request {
            Msg::Request { id: h.id, payload }
        } else {
            Msg::Response {
                id: h.id,
                status,
                payload,
            }
        }
    };
    if h.offset == 0 {
        if partial.contains_key(&key) {
            return Err(format!("message id {} restarted mid-way", h.id));
        }
        if data.len() == h.total as usize {
            return Ok(Some(done(h.status, Bytes::copy_from_slice(data))));
        }
        if partial.len() >= limits.1 {
            return Err(format!(
                "more than {} requests / responses under reassembly",
                limits.1
            ));
        }
        let mut buf = BytesMut::with_capacity(h.total as usize);
        buf.extend_from_slice(data);
        partial.insert(
            key,
            Partial {
                status: h.status,
                total: h.total,
                buf,
            },
        );
        return Ok(None);
    }
    let Some(p) = partial.get_mut(&key) else {
        return Err(format!("chunk of unknown message id {}", h.id));
    };
    if p.status != h.status || p.total != h.total || p.buf.len() != h.offset as usize {
        return Err(format!(
            "chunk [{}, +{}) of message id {} out of sequence (have {} of {} bytes)",
            h.offset,
            data.len(),
            h.id,
            p.buf.len(),
            p.total
        ));
    }
    p.buf.extend_from_slice(data);
    if p.buf.len() < p.total as usize {
        return Ok(None);
    }
    let Some(p) = partial.remove(&key) else {
        return Ok(None);
    };
    Ok(Some(done(p.status, p.buf.freeze())))
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
            if let Some(m) = self.inbox.pop_front() {
                return Ok(m);
            }
            self.wait().await?;
        }
    }
}

async fn run_connection(shared: Arc<Shared>, mut conn: RdmaConn, peer: PeerInfo) -> LinkError {
    let cfg = shared.cfg.clone();
    let generation = shared.next_generation();
    let window = cfg.window.min(peer.info.window);
    let sem = Arc::new(Semaphore::new(window as usize));
    let req_sem = Arc::new(Semaphore::new(
        cfg.request_window.min(peer.info.request_window) as usize,
    ));
    let (answer_tx, mut answer_rx) = mpsc::unbounded_channel();
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let stop = Arc::new(Notify::new());
    conn.peer_region = peer.region;
    let handle = Arc::new(ConnHandle {
        generation,
        cmd: cmd_tx,
        window: sem.clone(),
        peer_second_len: peer.region.map_or(0, |r| r.len.min(peer.info.second_len)),
        peer_max_record: peer.info.max_record,
        req_window: req_sem.clone(),
        peer_max_request: peer.info.max_request,
        stop: stop.clone(),
    });
    tracing::info!(
        peer = cfg.peer_node_id,
        generation,
        window,
        peer_first = %seqs_summary(&peer.resync.first_store),
        peer_second = %seqs_summary(&peer.resync.second_store),
        "mirror link resync point"
    );
    let mut session = Session::new(
        shared.clone(),
        generation,
        cfg.window,
        peer.info.max_request,
        answer_tx,
    );
    // Messages that arrived right after the handshake.
    let early: Vec<Msg> = conn.inbox.drain(..).collect();
    let info = UpInfo {
        peer_node: cfg.peer_node_id,
        transport: cfg.transport,
        generation,
        window,
        peer_resync: peer.resync,
        peer_second_len: peer.info.second_len,
    };
    if let Some(old) = shared.install(handle, info) {
        old.stop.notify_one();
    }
    let mut pending: VecDeque<(RecordHdr, u64)> = VecDeque::new();
    let mut sd = shared.shutdown.subscribe();
    let tick_every = cfg
        .heartbeat_interval
        .min(cfg.heartbeat_timeout / 4)
        .max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let handle_inbox = |conn: &mut RdmaConn, session: &mut Session| -> Result<()> {
        if std::mem::take(&mut conn.rx_activity) {
            session.touch();
        }
        while let Some(m) = conn.inbox.pop_front() {
            if let Msg::Record(h) = &m {
                session.check_record(h)?;
            }
            session.on_msg(m)?;
        }
        Ok(())
    };
    conn.inbox.extend(early);
    // While hot, completions are polled, not waited for.
    let mut busy = BusyPoll::new(cfg.busy_poll);
    let err: LinkError = 'main: loop {
        if let Err(e) = handle_inbox(&mut conn, &mut session)
            .and_then(|_| conn.flush(&mut session, &mut pending))
        {
            break 'main e;
        }
        if busy.cooled() {
            // Going back to sleeping on the channel: arm the CQ first, handling what came in.
            match conn.pump() {
                Ok(0) => {}
                Ok(_) => {
                    busy.traffic();
                    continue 'main;
                }
                Err(e) => break 'main e,
            }
        }
        let hot = busy.is_hot();
        tokio::select! {
            biased;
            _ = stop.notified() => break 'main shared.down_err("replaced by a newer connection from the same peer"),
            _ = wait_shutdown(&mut sd) => {
                session.outbox.push_back(Msg::Bye { reason: "link shut down".into() });
                let _ = conn.flush(&mut session, &mut pending);
                // Let the goodbye leave before the disconnect.
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_millis(100) && conn.pump().is_ok() && conn.free_send.len() < conn.send_slots {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                break 'main LinkError::Closed;
            }
            r = conn.wait(), if !hot => match r {
                Ok(()) => busy.traffic(),
                Err(e) => break 'main e,
            },
            // Lets the runtime look at timers and sockets between two polls.
            _ = tokio::task::yield_now(), if hot => match conn.poll_completions(false) {
                Ok(0) => std::thread::yield_now(),
                Ok(_) => busy.traffic(),
                Err(e) => break 'main e,
            },
            c = cmd_rx.recv() => {
                let Some(c) = c else { break 'main shared.down_err("command channel closed") };
                let mut next = Some(c);
                let mut n = 0;
                while let Some(c) = next.take() {
                    match c {
                        Cmd::Post { post, permit, reply } => {
                            let hdr = session.start_post(post, permit, reply);
                            pending.push_back((hdr, post.local_offset));
                        }
                        Cmd::Release { partition, through_seq } => session.outbox.push_back(Msg::Release { partition, through_seq }),
                        Cmd::Request { payload, permit, reply } => session.start_request(payload, permit, reply),
                    }
                    n += 1;
                    if n < 64 {
                        next = cmd_rx.try_recv().ok();
                    }
                }
                busy.traffic();
            }
            _ = tick.tick() => if let Err(e) = session.on_tick() { break 'main e; },
            Some(a) = answer_rx.recv() => {
                session.on_answer(a);
                while let Ok(a) = answer_rx.try_recv() {
                    session.on_answer(a);
                }
            }
        }
    };
    // Tear down: disconnect, destroy the QP and MRs (no more DMA from or into the regions),
    // then fail whatever is pending.
    conn.cm_id.disconnect();
    drop(conn);
    drop(pending);
    finish_connection(&mut session, &mut cmd_rx, &sem, &req_sem, &err);
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(request: bool, id: u64, total: u32, offset: u32, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; CHUNK_HDR_LEN];
        ChunkHdr {
            request,
            id,
            status: 0,
            total,
            offset,
        }
        .encode(&mut h);
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn chunks_reassemble_interleaved_and_reject_violations() {
        let mut p = HashMap::new();
        let lim = (1 << 20, 4);
        let a: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..5_000u32).map(|i| (i * 3) as u8).collect();
        // Two messages interleaved, one of each direction with the same id.
        let mut got = Vec::new();
        for (req, msg) in [(true, &a), (false, &b)] {
            let c = &msg[..CHUNK_DATA.min(msg.len())];
            assert!(
                reassemble(&mut p, &chunk(req, 1, msg.len() as u32, 0, c), lim)
                    .unwrap()
                    .is_none()
            );
        }
        for (req, msg) in [(true, &a), (false, &b)] {
            let mut off = CHUNK_DATA;
            while off < msg.len() {
                let n = (msg.len() - off).min(CHUNK_DATA);
                let r = reassemble(
                    &mut p,
                    &chunk(req, 1, msg.len() as u32, off as u32, &msg[off..off + n]),
                    lim,
                )
                .unwrap();
                off += n;
                if let Some(m) = r {
                    got.push(m);
                }
            }
        }
        assert_eq!(
            got,
            vec![
                Msg::Request {
                    id: 1,
                    payload: a.clone().into()
                },
                Msg::Response {
                    id: 1,
                    status: 0,
                    payload: b.clone().into()
                }
            ]
        );
        assert!(p.is_empty());
        // Empty and single-chunk messages complete at once.
        assert_eq!(
            reassemble(&mut p, &chunk(true, 2, 0, 0, &[]), lim).unwrap(),
            Some(Msg::Request {
                id: 2,
                payload: Bytes::new()
            })
        );
        // Violations.
        let too_big = chunk(true, 3, (1 << 20) + 1, 0, &[1]);
        assert!(reassemble(&mut p, &too_big, lim).is_err());
        assert!(reassemble(&mut p, &chunk(true, 4, 100, 10, &[1]), lim).is_err()); // unknown
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 0, &[1; 10]), lim)
            .unwrap()
            .is_none());
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 20, &[1; 10]), lim).is_err()); // gap
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 0, &[1; 10]), lim).is_err()); // restart
        assert!(reassemble(&mut p, &chunk(true, 6, 100, 95, &[1; 10]), lim).is_err()); // beyond
        p.clear();
        for id in 0..4 {
            assert!(reassemble(&mut p, &chunk(true, id, 100, 0, &[1]), lim)
                .unwrap()
                .is_none());
        }
        // More messages under reassembly than allowed.
        assert!(reassemble(&mut p, &chunk(false, 9, 100, 0, &[1]), lim).is_err());
        // Truncated header.
        assert!(reassemble(&mut p, &chunk(true, 1, 1, 0, &[])[..10], lim).is_err());
    }
}
