//! The RDMA transport: one RC queue pair per peer, set up with librdmacm.
//!
//! * Control messages (handshake, acks, heartbeats, releases) are SENDs of the `proto` payload
//!   into pre-posted receive slots.
//! * A record is an unsignaled RDMA WRITE from the local first-store MR straight into the peer's
//!   second-store MR, chained with a signaled SEND of the record header. RC ordering guarantees
//!   the peer sees the SEND only after the written bytes are placed; it persists the range and
//!   SENDs an `Ack`. No copy on either side.
//! * The second store's address and rkey travel in the `Auth` / `Welcome` messages, i.e. only to
//!   a peer that already proved it knows the cluster secret.
//! * Completions are driven from tokio: the completion channel's fd is non-blocking and
//!   registered with `AsyncFd` (see README for the measurement behind this choice).

mod verbs;

use crate::error::{LinkError, Result};
use crate::handshake::{self, MsgIo, PeerInfo};
use crate::link::{
    finish_connection, seqs_summary, Cmd, ConnHandle, LinkState, Role, Session, Shared, UpInfo,
};
use crate::proto::{Msg, RecordHdr, RemoteRegion};
use rdma_sys::rdma_cm_event_type as ev;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use verbs::{
    ChannelFd, CmEvent, CmId, CompChannel, Completion, Cq, EventChannel, Mr, Pd, Qp, RegBuf,
    VerbsError,
};

/// Bytes of one control-message slot (send and receive).
const SLOT: usize = 4096;
const KIND_RECV: u64 = 1 << 56;
const KIND_SEND: u64 = 2 << 56;
const KIND_WRITE: u64 = 3 << 56;
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
                tracing::info!(peer = shared.cfg.peer_node_id, %addr, device = %conn.qp.id().device_name(), "mirror link up (rdma, connector)");
                let err = run_connection(shared.clone(), conn, peer).await;
                tracing::warn!(peer = shared.cfg.peer_node_id, error = %err, "mirror link down");
            }
            Err(e) => {
                tracing::warn!(peer = shared.cfg.peer_node_id, %addr, error = %e, "mirror link connection attempt failed");
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
    local_mr: Option<Mr>,
    store_mr: Option<Mr>,
    recv: RegBuf,
    send: RegBuf,
    cq: Cq,
    _pd: Arc<Pd>,
    cm_id: Arc<CmId>,
    shared: Arc<Shared>,
    free_send: Vec<usize>,
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
        let recv_slots = 2 * w + 64;
        let send_slots = 2 * w + 64;
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

    /// Take channel events and poll every completion; received messages go to `inbox`.
    fn pump(&mut self) -> Result<usize> {
        self.cq.take_events().map_err(|e| self.err(e))?;
        let mut total = 0;
        loop {
            self.comps.clear();
            let mut comps = std::mem::take(&mut self.comps);
            let r = self.cq.poll(&mut comps, 256).map_err(|e| self.err(e));
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    self.comps = comps;
                    return Err(e);
                }
            };
            if n == 0 {
                // Re-arm, then poll once more: a completion that slipped in between raises no event.
                self.cq.arm().map_err(|e| self.err(e))?;
                let r = self.cq.poll(&mut comps, 256).map_err(|e| self.err(e));
                let n2 = match r {
                    Ok(n) => n,
                    Err(e) => {
                        self.comps = comps;
                        return Err(e);
                    }
                };
                if n2 == 0 {
                    self.comps = comps;
                    return Ok(total);
                }
            }
            total += comps.len();
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
            KIND_RECV if c.is_recv() => {
                let len = (c.byte_len as usize).min(SLOT);
                let msg = Msg::decode(&self.recv.slot(slot)[..len]);
                self.qp
                    .post_recv(c.wr_id, &self.recv, slot)
                    .map_err(|e| self.err(e))?;
                match msg {
                    Ok(m) => self.inbox.push_back(m),
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

    /// Send a control message; false if no send slot is free (try again after completions).
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
        if let Err(e) = self
            .qp
            .post_send(KIND_SEND | i as u64, &self.send, i, b.len())
        {
            self.free_send.push(i);
            return Err(self.err(e));
        }
        Ok(true)
    }

    /// Send a record (WRITE + notification); false if no send slot is free.
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
        let r = unsafe {
            self.qp.post_write_and_send(
                KIND_WRITE | (hdr.tag & !KIND_MASK),
                local.as_ptr() as u64 + local_offset,
                hdr.len,
                lkey,
                remote.addr + hdr.offset,
                remote.rkey,
                KIND_SEND | i as u64,
                &self.send,
                i,
                b.len(),
            )
        };
        if let Err(e) = r {
            self.free_send.push(i);
            return Err(self.err(e));
        }
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
        Ok(())
    }
}

impl MsgIo for RdmaConn {
    async fn send_msg(&mut self, m: &Msg) -> Result<()> {
        while !self.try_send(m)? {
            self.wait().await?;
        }
        Ok(())
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
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let stop = Arc::new(Notify::new());
    conn.peer_region = peer.region;
    let handle = Arc::new(ConnHandle {
        generation,
        cmd: cmd_tx,
        window: sem.clone(),
        peer_second_len: peer.region.map_or(0, |r| r.len.min(peer.info.second_len)),
        peer_max_record: peer.info.max_record,
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
    let mut session = Session::new(shared.clone(), generation, cfg.window);
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
        while let Some(m) = conn.inbox.pop_front() {
            if let Msg::Record(h) = &m {
                session.check_record(h)?;
            }
            session.on_msg(m)?;
        }
        Ok(())
    };
    conn.inbox.extend(early);
    let err: LinkError = 'main: loop {
        if let Err(e) = handle_inbox(&mut conn, &mut session)
            .and_then(|_| conn.flush(&mut session, &mut pending))
        {
            break 'main e;
        }
        tokio::select! {
            biased;
            _ = stop.notified() => break 'main shared.down_err("replaced by a newer connection from the same peer"),
            _ = wait_shutdown(&mut sd) => {
                session.outbox.push_back(Msg::Bye { reason: "link shut down".into() });
                let _ = conn.flush(&mut session, &mut pending);
                // Let the goodbye leave before the disconnect.
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_millis(100) && conn.pump().is_ok() && conn.free_send.len() < 2 * cfg.window as usize + 64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                break 'main LinkError::Closed;
            }
            r = conn.wait() => if let Err(e) = r { break 'main e; },
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
                    }
                    n += 1;
                    if n < 64 {
                        next = cmd_rx.try_recv().ok();
                    }
                }
            }
            _ = tick.tick() => if let Err(e) = session.on_tick() { break 'main e; },
        }
    };
    // Tear down: disconnect, destroy the QP and MRs (no more DMA from or into the regions),
    // then fail whatever is pending.
    conn.cm_id.disconnect();
    drop(conn);
    drop(pending);
    finish_connection(&mut session, &mut cmd_rx, &sem, &err);
    err
}
