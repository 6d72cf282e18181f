//! The link's background work, written once for every transport ([`Carrier`] / [`Wire`]): the
//! connector's reconnect loop, the listener's accept loop with a bound on pending connections,
//! the handshake with its timeouts, and the connection loop that feeds the [`Session`] with
//! commands, messages, ticks and handler answers and has the wire send what it queued.
//!
//! Every `select!` here is `biased` (stop and shutdown first, then arrivals, then commands):
//! tokio would otherwise pick among ready branches at random, and a simulation could not replay.

use crate::api::{LinkState, UpInfo};
use crate::busy::BusyPoll;
use crate::config::Role;
use crate::error::{HandshakeError, LinkError};
use crate::handshake::{self, PeerInfo};
use crate::proto::{PartitionSeq, STATUS_HANDLER_FAILED, STATUS_OK};
use crate::session::{Job, Session};
use crate::shared::{Answer, ConnHandle, Shared};
use crate::spawn::{CatchUnwind, TaskHandle};
use crate::wire::{Carrier, Wire};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

/// Handshaking and established connections a listener keeps at most; more are turned away.
const MAX_PENDING: usize = 16;
/// Commands taken from the handle per turn of the connection loop, so a flood of posts cannot
/// starve the other branches.
const CMD_BATCH: usize = 64;

/// The root task of a link: connect or listen until shutdown.
pub(crate) async fn run<C: Carrier>(shared: Arc<Shared>, carrier: C) {
    let carrier = Arc::new(carrier);
    match shared.cfg.role {
        Role::Listen(addr) => listen_loop(&shared, &carrier, addr).await,
        Role::Connect(addr) => connect_loop(&shared, &carrier, addr).await,
    }
    shared.set_state(LinkState::Closed);
    // Request handlers of earlier connections may still run; they must not outlive the link.
    shared.tasks.kill();
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn handshake_timeout(shared: &Shared) -> LinkError {
    LinkError::Handshake {
        peer: shared.cfg.peer_node_id,
        source: HandshakeError::Timeout(shared.cfg.handshake_timeout),
    }
}

async fn connect_loop<C: Carrier>(shared: &Arc<Shared>, carrier: &Arc<C>, addr: SocketAddr) {
    let mut sd = shared.shutdown.subscribe();
    let hs = shared.cfg.handshake_timeout;
    let mut failed_attempts = 0u64;
    while !shared.is_shutdown() {
        shared.set_state_if_not_up(LinkState::Connecting);
        let attempt = async {
            let mut conn = carrier.connect(shared, addr).await?;
            let region = carrier.store_region(&conn);
            let peer = tokio::time::timeout(hs, handshake::connector(&mut conn, shared, region))
                .await
                .map_err(|_| handshake_timeout(shared))??;
            Ok::<_, LinkError>((conn, peer))
        };
        let res = tokio::select! {
            biased;
            _ = wait_shutdown(&mut sd) => break,
            r = tokio::time::timeout(hs * 2, attempt) => r.unwrap_or_else(|_| Err(handshake_timeout(shared))),
        };
        match res {
            Ok((conn, peer)) => {
                failed_attempts = 0;
                let via = carrier.describe(&conn);
                tracing::info!(peer = shared.peer(), %addr, %via, "mirror link up ({}, connector)", C::NAME);
                serve(shared, carrier.as_ref(), conn, peer).await;
            }
            Err(e) => {
                // Say it once per outage; the retries every reconnect_delay go to debug.
                if failed_attempts == 0 {
                    tracing::warn!(peer = shared.peer(), %addr, error = %e, "mirror link connection attempt failed; retrying");
                } else {
                    tracing::debug!(peer = shared.peer(), %addr, error = %e, "mirror link connection attempt failed");
                }
                failed_attempts += 1;
                shared.set_state_if_not_up(LinkState::Down(e));
            }
        }
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut sd) => break,
            _ = tokio::time::sleep(shared.cfg.reconnect_delay) => {}
        }
    }
}

async fn listen_loop<C: Carrier>(shared: &Arc<Shared>, carrier: &Arc<C>, addr: SocketAddr) {
    let mut sd = shared.shutdown.subscribe();
    let mut listener = loop {
        let r = tokio::select! {
            biased;
            _ = wait_shutdown(&mut sd) => return,
            r = carrier.listen(shared, addr) => r,
        };
        match r {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "mirror link listener");
                shared.set_state_if_not_up(LinkState::Down(e));
                tokio::select! {
                    biased;
                    _ = wait_shutdown(&mut sd) => return,
                    _ = tokio::time::sleep(shared.cfg.reconnect_delay.max(Duration::from_millis(500))) => {}
                }
            }
        }
    };
    tracing::info!(%addr, "mirror link listening ({})", C::NAME);
    let mut conns: Vec<TaskHandle> = Vec::new();
    loop {
        let r = tokio::select! {
            biased;
            _ = wait_shutdown(&mut sd) => break,
            r = carrier.accept(shared, &mut listener) => r,
        };
        match r {
            Ok(Some((pending, from))) => {
                conns.retain(|t| !t.is_finished());
                // Bound the number of half-open / handshaking connections.
                if conns.len() >= MAX_PENDING {
                    tracing::warn!(from = ?from, "too many pending mirror-link connections; refusing this one");
                    carrier.refuse(pending);
                    continue;
                }
                let task = incoming(shared.clone(), carrier.clone(), pending, from);
                conns.push(shared.tasks.spawn(task));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accepting a mirror-link connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The connections end on the shutdown signal too. The listener goes last (as the RDMA
    // transport always did: its connections' ids came from it).
    for t in conns {
        t.join().await;
    }
    drop(listener);
}

/// One accepted connection: set up, handshake, then serve it until it fails.
async fn incoming<C: Carrier>(
    shared: Arc<Shared>,
    carrier: Arc<C>,
    pending: C::Pending,
    from: Option<SocketAddr>,
) {
    let hs = shared.cfg.handshake_timeout;
    let setup = async {
        let mut conn = carrier.establish(&shared, pending).await?;
        let region = carrier.store_region(&conn);
        let peer = tokio::time::timeout(hs, handshake::acceptor(&mut conn, &shared, region))
            .await
            .map_err(|_| handshake_timeout(&shared))??;
        Ok::<_, LinkError>((conn, peer))
    };
    match tokio::time::timeout(hs * 2, setup)
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(&shared)))
    {
        Ok((conn, peer)) => {
            let via = carrier.describe(&conn);
            tracing::info!(peer = shared.peer(), from = ?from, %via, "mirror link up ({}, acceptor)", C::NAME);
            serve(&shared, carrier.as_ref(), conn, peer).await;
        }
        Err(e) => {
            tracing::warn!(from = ?from, error = %e, "refused a mirror-link connection");
            shared.set_state_if_not_up(LinkState::Down(e));
        }
    }
}

async fn serve<C: Carrier>(shared: &Arc<Shared>, carrier: &C, conn: C::Conn, peer: PeerInfo) {
    let wire = carrier.established(shared, conn, &peer);
    let err = run_connection(shared.clone(), wire, peer).await;
    tracing::warn!(peer = shared.peer(), error = %err, "mirror link down");
}

/// Drive an established connection until it fails; returns why.
async fn run_connection<W: Wire>(shared: Arc<Shared>, mut wire: W, peer: PeerInfo) -> LinkError {
    let cfg = &shared.cfg;
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
        peer_second_len: wire.peer_store_len(&peer),
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
    let mut session = Session::new(shared.clone(), peer.info.max_request);
    shared.install(
        handle,
        UpInfo {
            peer_node: cfg.peer_node_id,
            transport: cfg.transport,
            generation,
            window,
            peer_resync: peer.resync,
            peer_second_len: peer.info.second_len,
        },
    );

    let mut sd = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(cfg.tick_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut busy = BusyPoll::new(cfg.busy_poll);
    let mut handlers: Vec<TaskHandle> = Vec::new();
    let err: LinkError = 'main: loop {
        if let Err(e) = wire.send(&mut session).await {
            break 'main e;
        }
        if busy.cooled() {
            match wire.cooled(&mut session) {
                Ok(0) => {}
                Ok(_) => {
                    busy.traffic();
                    continue 'main;
                }
                Err(e) => break 'main e,
            }
        }
        for job in session.take_jobs() {
            handlers.retain(|h| !h.is_finished());
            handlers.push(start_job(&shared, &answer_tx, job));
        }
        let hot = busy.is_hot();
        let mut traffic = false;
        tokio::select! {
            biased;
            _ = stop.notified() => break 'main shared.down_err("replaced by a newer connection from the same peer"),
            _ = wait_shutdown(&mut sd) => {
                session.queue_goodbye();
                wire.goodbye(&mut session).await;
                break 'main LinkError::Closed;
            }
            r = wire.receive(&mut session), if W::RECEIVE_WHILE_HOT || !hot => match r {
                Ok(()) => traffic = true,
                Err(e) => break 'main e,
            },
            c = cmd_rx.recv() => {
                let Some(c) = c else { break 'main shared.down_err("command channel closed") };
                traffic = true;
                session.on_cmd(c);
                for _ in 1..CMD_BATCH {
                    let Ok(c) = cmd_rx.try_recv() else { break };
                    session.on_cmd(c);
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
            // More to send than one turn took: go round again at once.
            _ = std::future::ready(()), if wire.more_to_send(&session) => {}
            // Busy polling: let the runtime look at timers and sockets, then poll once more.
            _ = tokio::task::yield_now(), if hot => match wire.poll(&mut session) {
                Ok(0) => std::thread::yield_now(),
                Ok(_) => traffic = true,
                Err(e) => break 'main e,
            },
        }
        if traffic {
            busy.traffic();
        }
    };
    // Tear down: release the transport (no more DMA from or into the regions, no more reads
    // into the second store) and only then fail what is pending.
    wire.close().await;
    sem.close();
    req_sem.close();
    shared.uninstall(generation, &err);
    cmd_rx.close();
    while let Ok(c) = cmd_rx.try_recv() {
        session.refuse(c, &err);
    }
    session.fail_all(&err);
    handlers.retain(|h| !h.is_finished());
    if !handlers.is_empty() {
        tracing::info!(
            peer = cfg.peer_node_id,
            generation,
            running = handlers.len(),
            "request handlers of the closed connection still run; their answers are dropped"
        );
    }
    err
}

/// Run the peer's request in a task of its own; its answer (or its panic) comes back through
/// `answers` to the connection that received it.
fn start_job(shared: &Shared, answers: &mpsc::UnboundedSender<Answer>, job: Job) -> TaskHandle {
    let Job {
        id,
        payload,
        handler,
    } = job;
    let answers = answers.clone();
    let peer = shared.peer();
    shared.tasks.spawn(async move {
        let a = match CatchUnwind::new(async move { handler.handle(payload).await }).await {
            Ok(payload) => Answer {
                id,
                status: STATUS_OK,
                payload,
            },
            Err(panic) => {
                tracing::error!(peer, id, error = %panic, "request handler panicked");
                Answer {
                    id,
                    status: STATUS_HANDLER_FAILED,
                    payload: Bytes::new(),
                }
            }
        };
        // The connection may be gone: then the answer is dropped.
        let _ = answers.send(a);
    })
}

fn seqs_summary(v: &[PartitionSeq]) -> String {
    let mut s = String::new();
    for p in v.iter().take(8) {
        s.push_str(&format!("p{}:{} ", p.partition, p.seq));
    }
    if v.len() > 8 {
        s.push_str("...");
    }
    s
}
