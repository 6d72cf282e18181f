//! The TCP transport: frames of `len | crc32c | payload` over one tokio `TcpStream` per peer.
//! The receiver reads record bytes from the socket straight into its second-store region.

use crate::error::{FrameError, LinkError, Result};
use crate::handshake::{self, MsgIo, PeerInfo};
use crate::link::{
    finish_connection, seqs_summary, BusyPoll, Cmd, ConnHandle, LinkState, Role, Session, Shared,
    UpInfo,
};
use crate::proto::{data_frame_header, encode_frame, record_frame_header, FrameReader, Msg};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

const SOCKET_BUF: usize = 256 * 1024;
/// Request / response bytes written per turn of the connection loop, so control messages and
/// records are not stuck behind a burst of large answers.
const DATA_BUDGET: usize = 2 << 20;

pub(crate) async fn run(shared: Arc<Shared>) {
    match shared.cfg.role {
        Role::Listen(addr) => listen_loop(shared, addr).await,
        Role::Connect(addr) => connect_loop(shared, addr).await,
    }
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn connect_loop(shared: Arc<Shared>, addr: SocketAddr) {
    let mut sd = shared.shutdown.subscribe();
    let mut failed_attempts = 0u64;
    while !shared.is_shutdown() {
        shared.set_state_if_not_up(LinkState::Connecting);
        let attempt = async {
            let s = tokio::time::timeout(shared.cfg.handshake_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    shared.down_err(format!(
                        "connecting to {addr} timed out after {:?}",
                        shared.cfg.handshake_timeout
                    ))
                })?
                .map_err(|e| shared.down_err(format!("cannot connect to {addr}: {e}")))?;
            let mut io = TcpIo::new(&shared, s)?;
            let peer = tokio::time::timeout(
                shared.cfg.handshake_timeout,
                handshake::connector(&mut io, &shared, None),
            )
            .await
            .map_err(|_| handshake_timeout(&shared))??;
            Ok::<_, LinkError>((io, peer))
        };
        let res = tokio::select! {
            r = attempt => r,
            _ = wait_shutdown(&mut sd) => break,
        };
        match res {
            Ok((io, peer)) => {
                failed_attempts = 0;
                tracing::info!(peer = shared.cfg.peer_node_id, %addr, "mirror link up (tcp, connector)");
                let err = run_connection(shared.clone(), io, peer).await;
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
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                let err = LinkError::io(format!("cannot listen on {addr} for the mirror link (is the address configured and the port free?)"), e);
                tracing::error!(error = %err, "mirror link listener");
                shared.set_state_if_not_up(LinkState::Down(err));
                tokio::select! {
                    _ = tokio::time::sleep(shared.cfg.reconnect_delay.max(Duration::from_millis(500))) => {}
                    _ = wait_shutdown(&mut sd) => { shared.set_state(LinkState::Closed); return; }
                }
            }
        }
    };
    tracing::info!(%addr, "mirror link listening (tcp)");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, from)) => {
                    // Bound the number of half-open / handshaking connections.
                    if conns.len() >= 16 {
                        tracing::warn!(%from, "too many pending mirror-link connections; dropping this one");
                        continue;
                    }
                    conns.spawn(incoming(shared.clone(), s, from));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a mirror-link connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = wait_shutdown(&mut sd) => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    shared.set_state(LinkState::Closed);
}

async fn incoming(shared: Arc<Shared>, s: TcpStream, from: SocketAddr) {
    let hs = async {
        let mut io = TcpIo::new(&shared, s)?;
        let peer = tokio::time::timeout(
            shared.cfg.handshake_timeout,
            handshake::acceptor(&mut io, &shared, None),
        )
        .await
        .map_err(|_| handshake_timeout(&shared))??;
        Ok::<_, LinkError>((io, peer))
    };
    match hs.await {
        Ok((io, peer)) => {
            tracing::info!(peer = shared.cfg.peer_node_id, %from, "mirror link up (tcp, acceptor)");
            let err = run_connection(shared.clone(), io, peer).await;
            tracing::warn!(peer = shared.cfg.peer_node_id, error = %err, "mirror link down");
        }
        Err(e) => {
            tracing::warn!(%from, error = %e, "refused a mirror-link connection");
            shared.set_state_if_not_up(LinkState::Down(e));
        }
    }
}

/// The stream during the handshake.
pub(crate) struct TcpIo {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    reader: FrameReader,
    buf: Vec<u8>,
    peer: u32,
}

impl TcpIo {
    fn new(shared: &Shared, s: TcpStream) -> Result<TcpIo> {
        s.set_nodelay(true)
            .map_err(|e| LinkError::io("setting TCP_NODELAY on the mirror link", e))?;
        let (rd, wr) = s.into_split();
        Ok(TcpIo {
            rd: BufReader::with_capacity(SOCKET_BUF, rd),
            wr: BufWriter::with_capacity(SOCKET_BUF, wr),
            // No request payloads before authentication (nothing large is buffered for a
            // stranger); run_connection lifts the limit.
            reader: FrameReader::with_limits(shared.cfg.max_record, 0),
            buf: Vec::new(),
            peer: shared.cfg.peer_node_id,
        })
    }
}

impl MsgIo for TcpIo {
    async fn send_msg(&mut self, m: &Msg) -> Result<()> {
        self.buf.clear();
        encode_frame(m, &mut self.buf);
        self.wr
            .write_all(&self.buf)
            .await
            .map_err(|e| LinkError::io("sending a handshake message", e))?;
        self.wr
            .flush()
            .await
            .map_err(|e| LinkError::io("sending a handshake message", e))
    }
    async fn recv_msg(&mut self) -> Result<Msg> {
        let peer = self.peer;
        self.reader
            .read(&mut self.rd, |_| {
                Err(FrameError::Malformed {
                    what: "handshake",
                    detail: "record before authentication".into(),
                })
            })
            .await
            .map_err(|e| match e {
                FrameError::Closed => LinkError::Handshake {
                    peer,
                    source: crate::error::HandshakeError::PeerRejected(
                        "the peer closed the connection during the handshake".into(),
                    ),
                },
                e => LinkError::Frame { peer, source: e },
            })
    }
}

/// Drive an established connection until it fails; returns why.
async fn run_connection(shared: Arc<Shared>, io: TcpIo, peer: PeerInfo) -> LinkError {
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
    let handle = Arc::new(ConnHandle {
        generation,
        cmd: cmd_tx,
        window: sem.clone(),
        peer_second_len: peer.info.second_len,
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

    let TcpIo {
        mut rd,
        mut wr,
        mut buf,
        ..
    } = io;
    let mut reader = FrameReader::with_limits(cfg.max_record, cfg.max_request);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Result<Msg, FrameError>>();
    let region = shared.store.as_ref().map(|s| s.region());
    let max_record = cfg.max_record;
    let reader_task = tokio::spawn(async move {
        loop {
            let r = reader
                .read(&mut rd, |h| {
                    let region = region.ok_or(FrameError::Malformed {
                        what: "record",
                        detail: "this node has no second store".into(),
                    })?;
                    let out = || FrameError::OutOfRegion {
                        offset: h.offset,
                        len: u64::from(h.len),
                        region_len: region.len() as u64,
                    };
                    if h.len > max_record {
                        return Err(FrameError::Oversized {
                            len: u64::from(h.len),
                            max: u64::from(max_record),
                        });
                    }
                    // SAFETY: the peer owns this part of our second store while it mirrors into it;
                    // this task is the only writer, one record at a time, and it ends (aborted and
                    // awaited) before the connection is reported finished.
                    unsafe { region.slice_mut(h.offset, h.len as usize) }.ok_or_else(out)
                })
                .await;
            let stop = r.is_err();
            if in_tx.send(r).is_err() || stop {
                break;
            }
        }
    });

    let mut sd = shared.shutdown.subscribe();
    let tick_every = cfg
        .heartbeat_interval
        .min(cfg.heartbeat_timeout / 4)
        .max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let peer_id = cfg.peer_node_id;
    // Busy polling (see `LinkConfig::busy_poll`): while hot the runtime thread keeps
    // yielding instead of parking, so the socket is polled (epoll with no timeout) and data
    // that arrives costs no thread wake-up. Traffic extends it.
    let mut busy = BusyPoll::new(cfg.busy_poll);
    let err: LinkError = 'main: loop {
        let mut records = Vec::new();
        let hot = busy.is_hot();
        let mut traffic = false;
        tokio::select! {
            biased;
            _ = stop.notified() => break 'main shared.down_err("replaced by a newer connection from the same peer"),
            _ = wait_shutdown(&mut sd) => {
                session.outbox.push_back(Msg::Bye { reason: "link shut down".into() });
                let _ = tokio::time::timeout(Duration::from_millis(200), flush_outbox(&mut session, &mut wr, &mut buf)).await;
                break 'main LinkError::Closed;
            }
            m = in_rx.recv() => match m {
                Some(Ok(msg)) => {
                    traffic = true;
                    if let Err(e) = session.on_msg(msg) { break 'main e; }
                    // Handle whatever else already arrived before writing the replies.
                    while let Ok(m) = in_rx.try_recv() {
                        match m {
                            Ok(msg) => if let Err(e) = session.on_msg(msg) { break 'main e; },
                            Err(e) => break 'main frame_down(&shared, e),
                        }
                    }
                }
                Some(Err(e)) => break 'main frame_down(&shared, e),
                None => break 'main shared.down_err("connection reader ended"),
            },
            c = cmd_rx.recv() => {
                let Some(c) = c else { break 'main shared.down_err("command channel closed") };
                traffic = true;
                let mut next = Some(c);
                let mut n = 0;
                while let Some(c) = next.take() {
                    match c {
                        Cmd::Post { post, permit, reply } => {
                            let hdr = session.start_post(post, permit, reply);
                            records.push((hdr, post.local_offset));
                        }
                        Cmd::Release { partition, through_seq } => session.outbox.push_back(Msg::Release { partition, through_seq }),
                        Cmd::Request { payload, permit, reply } => session.start_request(payload, permit, reply),
                    }
                    n += 1;
                    if n < 64 {
                        next = cmd_rx.try_recv().ok();
                    }
                }
            }
            _ = tick.tick() => if let Err(e) = session.on_tick() { break 'main e; },
            Some(a) = answer_rx.recv() => {
                traffic = true;
                session.on_answer(a);
                while let Ok(a) = answer_rx.try_recv() {
                    session.on_answer(a);
                }
            }
            // More requests / answers to write than one turn's budget.
            _ = std::future::ready(()), if !session.data_out.is_empty() => {}
            // Nothing happened: spin once more (the runtime polls the socket in between).
            _ = tokio::task::yield_now(), if hot => {
                std::thread::yield_now();
                if session.outbox.is_empty() {
                    continue 'main;
                }
            }
        }
        if traffic {
            busy.traffic();
        }
        // Write: control messages, then records, then flush — bounded by the heartbeat timeout
        // so a peer that stopped reading cannot block us forever.
        let local = shared.local;
        let write = async {
            flush_outbox_nowait(&mut session, &mut wr, &mut buf).await?;
            for (hdr, local_offset) in &records {
                let Some(local) = local else { break };
                // SAFETY: the engine keeps the source bytes of a post unchanged until its future
                // resolves, which happens only after this write (success or connection failure).
                let Some(data) = (unsafe { local.slice(*local_offset, hdr.len as usize) }) else {
                    return Err(std::io::Error::other("post outside the local region"));
                };
                wr.write_all(&record_frame_header(hdr, data)).await?;
                wr.write_all(data).await?;
            }
            let mut budget = DATA_BUDGET;
            while budget > 0 {
                let Some(m) = session.data_out.pop_front() else {
                    break;
                };
                if let Some((head, payload)) = data_frame_header(&m) {
                    wr.write_all(&head).await?;
                    wr.write_all(payload).await?;
                    budget = budget.saturating_sub(head.len() + payload.len());
                }
            }
            wr.flush().await
        };
        match tokio::time::timeout(cfg.heartbeat_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                break 'main shared.down_err(format!("sending to node {peer_id} failed: {e}"))
            }
            Err(_) => {
                break 'main shared.down_err(format!(
                    "node {peer_id} stopped reading for {:?}",
                    cfg.heartbeat_timeout
                ))
            }
        }
    };
    // Tear down: close the socket, stop the reader (it writes into the second store) and only
    // then fail what is pending.
    let _ = tokio::time::timeout(Duration::from_millis(100), wr.shutdown()).await;
    drop(wr);
    reader_task.abort();
    let _ = reader_task.await;
    finish_connection(&mut session, &mut cmd_rx, &sem, &req_sem, &err);
    err
}

fn frame_down(shared: &Shared, e: FrameError) -> LinkError {
    match e {
        FrameError::Closed => shared.down_err(format!(
            "node {} closed the connection",
            shared.cfg.peer_node_id
        )),
        // A reset or a dead route is the peer (or the network) going away, not bad traffic.
        FrameError::Io(e) => shared.down_err(format!("connection lost: {e}")),
        e => {
            tracing::error!(peer = shared.cfg.peer_node_id, error = %e, "malformed mirror-link traffic; closing the connection");
            shared.down_err(format!("malformed traffic: {e}"))
        }
    }
}

async fn flush_outbox_nowait(
    session: &mut Session,
    wr: &mut BufWriter<OwnedWriteHalf>,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    if session.outbox.is_empty() {
        return Ok(());
    }
    buf.clear();
    while let Some(m) = session.outbox.pop_front() {
        encode_frame(&m, buf);
    }
    wr.write_all(buf).await
}

async fn flush_outbox(
    session: &mut Session,
    wr: &mut BufWriter<OwnedWriteHalf>,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    flush_outbox_nowait(session, wr, buf).await?;
    wr.flush().await
}
