//! The link's background work, written once for every transport ([`Carrier`] / [`Wire`]): the
//! connector's reconnect loop, the listener's accept loop with its bounds on unauthenticated
//! connections (see [`Admission`]), the handshake with its timeouts, and the connection loop
//! that feeds the [`Session`] with commands, messages, ticks and handler answers and has the
//! wire send what it queued.
//!
//! Every `select!` here is `biased` (stop and shutdown first, then arrivals, then commands):
//! tokio would otherwise pick among ready branches at random, and a simulation could not replay.

use crate::api::{LinkState, UpInfo};
use crate::busy::BusyPoll;
use crate::config::Role;
use crate::error::{HandshakeError, LinkError};
use crate::handshake::{self, PeerInfo};
use crate::proto::{PartitionSeq, STATUS_HANDLER_FAILED, STATUS_OK};
use crate::refusals::Verdict;
use crate::session::{Job, Session};
use crate::shared::{Answer, ConnHandle, Shared};
use crate::spawn::{CatchUnwind, TaskHandle};
use crate::wire::{Carrier, Wire};
use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::Instant;

/// Unauthenticated (pending) incoming connections a listener keeps at most.
const MAX_PENDING: usize = 16;
/// Pending incoming connections from one source address at most.
const MAX_PENDING_PER_SOURCE: usize = 4;
/// How often the listener says how many connections it turned away.
const TURNED_AWAY_REPORT: Duration = Duration::from_secs(10);
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
    // The last failure said at warn level in this outage: a retry that fails the same way
    // goes to debug, one that fails differently (the partner came up, but refuses us) is said.
    let mut last_said: Option<String> = None;
    while !shared.is_shutdown() {
        shared.set_state_if_not_up(LinkState::Connecting);
        let attempt = async {
            let mut conn = carrier.connect(shared, addr).await?;
            let peer = tokio::time::timeout(hs, handshake::connector(&mut conn, shared))
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
                last_said = None;
                let via = carrier.describe(&conn);
                tracing::info!(peer = shared.peer(), %addr, %via, "mirror link up ({}, connector)", C::NAME);
                serve(shared, carrier.as_ref(), conn, peer).await;
            }
            Err(e) => {
                // Say each kind of failure once per outage; the retries every
                // reconnect_delay that fail the same way go to debug.
                let text = e.to_string();
                if last_said.as_deref() != Some(text.as_str()) {
                    tracing::warn!(peer = shared.peer(), %addr, error = %e, "mirror link connection attempt failed; retrying");
                    last_said = Some(text);
                } else {
                    tracing::debug!(peer = shared.peer(), %addr, error = %e, "mirror link connection attempt failed");
                }
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
    let mut admission = Admission::new(shared.cfg.peer_ip);
    loop {
        let r = tokio::select! {
            biased;
            _ = wait_shutdown(&mut sd) => break,
            r = carrier.accept(shared, &mut listener) => r,
        };
        match r {
            Ok(Some((pending, from))) => {
                let ip = from.map(|a| a.ip());
                if !admission.make_room(ip) {
                    carrier.refuse(pending);
                    continue;
                }
                let state = Arc::new(AtomicU8::new(PENDING));
                let task = incoming(
                    shared.clone(),
                    carrier.clone(),
                    pending,
                    from,
                    state.clone(),
                );
                admission.admit(ip, state, shared.tasks.spawn_abortable(task));
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
    for t in admission.into_tasks() {
        t.join().await;
    }
    drop(listener);
}

/// States of an incoming connection, shared by its task and the listener: accepted, nothing
/// valid heard yet; its hello passed the checks (it knows the cluster's public facts); it
/// proved the secret; dropped by the listener.
const PENDING: u8 = 0;
const HELLO: u8 = 1;
const AUTHENTICATED: u8 = 2;
const EVICTED: u8 = 3;

/// Move `state` from pending (with or without a hello) to `to`; false if it was not pending.
fn leave_pending(state: &AtomicU8, to: u8) -> bool {
    state
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            matches!(s, PENDING | HELLO).then_some(to)
        })
        .is_ok()
}

struct Incoming {
    from: Option<IpAddr>,
    since: Instant,
    state: Arc<AtomicU8>,
    task: TaskHandle,
}

impl Incoming {
    fn pending(&self) -> bool {
        !self.task.is_finished() && matches!(self.state.load(Ordering::Acquire), PENDING | HELLO)
    }
    /// Pending and nothing valid heard yet.
    fn idle(&self) -> bool {
        !self.task.is_finished() && self.state.load(Ordering::Acquire) == PENDING
    }
}

/// Who gets a slot among the listener's unauthenticated connections, so that strangers cannot
/// keep the partner out (issue #15, item 7):
///
/// * an incoming connection must authenticate within `accept_timeout` (see `incoming`);
/// * at most [`MAX_PENDING_PER_SOURCE`] pending connections per source address: one more from
///   the same address replaces that address's oldest;
/// * at most [`MAX_PENDING`] pending connections: when full, a newcomer replaces the oldest
///   pending connection of the address holding the most slots, preferring connections that
///   have not even sent a valid hello, and never one from the partner's address (`peer_ip`, or
///   the address of the last authenticated connection). So idle strangers cannot push out a
///   partner that is handshaking (it sends its hello at once), strangers from other addresses
///   cannot push out the partner's address at all, and a stranger's connection gets no more
///   than a share of the slots while it lasts;
/// * authenticated connections hold no pending slot.
///
/// A newcomer is turned away only when no slot can be freed without evicting the partner.
/// Left open: before the first authenticated connection (and without `peer_ip`), strangers
/// from many addresses that send valid hellos (the cluster id and node ids are not secret)
/// and keep reconnecting can still crowd the partner out; they cannot once its address is
/// known.
struct Admission {
    conns: Vec<Incoming>,
    configured_peer: Option<IpAddr>,
    learned_peer: Option<IpAddr>,
    turned_away: u64,
    evicted: u64,
    last_report: Instant,
}

impl Admission {
    fn new(configured_peer: Option<IpAddr>) -> Admission {
        Admission {
            conns: Vec::new(),
            configured_peer,
            learned_peer: None,
            turned_away: 0,
            evicted: 0,
            last_report: Instant::now(),
        }
    }

    fn is_peer(&self, ip: Option<IpAddr>) -> bool {
        ip.is_some() && (ip == self.configured_peer || ip == self.learned_peer)
    }

    /// Forget finished connections and learn the partner's address from authenticated ones.
    fn tidy(&mut self) {
        self.conns.retain(|c| !c.task.is_finished());
        for c in &self.conns {
            if c.state.load(Ordering::Acquire) == AUTHENTICATED && c.from.is_some() {
                self.learned_peer = c.from;
            }
        }
    }

    /// Drop pending connection `i` (unless it authenticated this very moment).
    fn evict(&mut self, i: usize) -> bool {
        let c = &self.conns[i];
        if !leave_pending(&c.state, EVICTED) {
            return false;
        }
        tracing::debug!(from = ?c.from, age = ?c.since.elapsed(), "dropping a pending mirror-link connection to make room");
        c.task.abort();
        self.conns.swap_remove(i);
        self.evicted += 1;
        true
    }

    /// Make room for a connection from `ip`; false: turn it away.
    fn make_room(&mut self, ip: Option<IpAddr>) -> bool {
        self.tidy();
        let ok = self.make_room_inner(ip);
        if !ok {
            self.turned_away += 1;
        }
        if (self.turned_away > 0 || self.evicted > 0)
            && self.last_report.elapsed() >= TURNED_AWAY_REPORT
        {
            tracing::warn!(
                turned_away = self.turned_away,
                dropped = self.evicted,
                last_from = ?ip,
                "unauthenticated mirror-link connections turned away or dropped to make room (a stranger or a scanner on the mirror network?)"
            );
            self.turned_away = 0;
            self.evicted = 0;
            self.last_report = Instant::now();
        }
        ok
    }

    /// The oldest of `candidates`, preferring idle ones.
    fn oldest(&self, candidates: impl Iterator<Item = usize> + Clone) -> Option<usize> {
        let idle = candidates
            .clone()
            .filter(|&i| self.conns[i].idle())
            .min_by_key(|&i| self.conns[i].since);
        idle.or_else(|| candidates.min_by_key(|&i| self.conns[i].since))
    }

    fn make_room_inner(&mut self, ip: Option<IpAddr>) -> bool {
        // The per-source bound: the newcomer replaces one of its own address's.
        let same =
            (0..self.conns.len()).filter(|&i| self.conns[i].pending() && self.conns[i].from == ip);
        if same.clone().count() >= MAX_PENDING_PER_SOURCE {
            return self.oldest(same).is_some_and(|i| self.evict(i));
        }
        let pending = self.conns.iter().filter(|c| c.pending()).count();
        if pending < MAX_PENDING {
            return true;
        }
        // Full: one of the address holding the most slots, never the partner's.
        let mut per_source: Vec<(Option<IpAddr>, usize)> = Vec::new();
        for c in self.conns.iter().filter(|c| c.pending()) {
            if self.is_peer(c.from) {
                continue;
            }
            match per_source.iter_mut().find(|(a, _)| *a == c.from) {
                Some((_, n)) => *n += 1,
                None => per_source.push((c.from, 1)),
            }
        }
        let Some(most) = per_source.iter().map(|(_, n)| *n).max() else {
            return false;
        };
        let victims = (0..self.conns.len()).filter(|&i| {
            let c = &self.conns[i];
            c.pending()
                && !self.is_peer(c.from)
                && per_source.iter().any(|(a, n)| *a == c.from && *n == most)
        });
        self.oldest(victims).is_some_and(|i| self.evict(i))
    }

    fn admit(&mut self, from: Option<IpAddr>, state: Arc<AtomicU8>, task: TaskHandle) {
        self.conns.push(Incoming {
            from,
            since: Instant::now(),
            state,
            task,
        });
    }

    fn into_tasks(self) -> impl Iterator<Item = TaskHandle> {
        self.conns.into_iter().map(|c| c.task)
    }
}

/// One accepted connection: set up, handshake, then serve it until it fails. It must prove
/// the secret within `accept_timeout` of being accepted; `state` tells the listener whether it
/// still holds a pending slot.
async fn incoming<C: Carrier>(
    shared: Arc<Shared>,
    carrier: Arc<C>,
    pending: C::Pending,
    from: Option<SocketAddr>,
    state: Arc<AtomicU8>,
) {
    let hs = shared.cfg.handshake_timeout;
    let deadline = Instant::now() + shared.cfg.accept_timeout;
    let late = || LinkError::Handshake {
        peer: shared.cfg.peer_node_id,
        source: HandshakeError::AcceptTimeout(shared.cfg.accept_timeout),
    };
    let setup = async {
        let mut conn = tokio::time::timeout_at(deadline, carrier.establish(&shared, pending))
            .await
            .map_err(|_| late())??;
        let hello_ok = || {
            let _ = state.compare_exchange(PENDING, HELLO, Ordering::AcqRel, Ordering::Acquire);
        };
        let handshake = handshake::acceptor(&mut conn, &shared, deadline, &hello_ok);
        let peer = tokio::time::timeout(hs, handshake)
            .await
            .map_err(|_| handshake_timeout(&shared))??;
        Ok::<_, LinkError>((conn, peer))
    };
    match setup.await {
        Ok((conn, peer)) => {
            if !leave_pending(&state, AUTHENTICATED) {
                return; // dropped by the listener a moment ago
            }
            let via = carrier.describe(&conn);
            let refused = shared.refusals.clear();
            if refused > 0 {
                tracing::info!(
                    "the last refused mirror-link connection repeated {refused} more time(s)"
                );
            }
            tracing::info!(peer = shared.peer(), from = ?from, %via, "mirror link up ({}, acceptor)", C::NAME);
            serve(&shared, carrier.as_ref(), conn, peer).await;
        }
        Err(e) => {
            let reason = e.to_string();
            match shared
                .refusals
                .note(from.map(|a| a.ip()), &reason, Instant::now())
            {
                // repeats_before: how often the refusal logged before this one recurred.
                Verdict::Log { repeats_before } => tracing::warn!(
                    from = ?from,
                    error = %e,
                    repeats_before,
                    "refused a mirror-link connection"
                ),
                Verdict::Repeat => tracing::debug!(
                    from = ?from,
                    error = %e,
                    "refused a mirror-link connection (as before; counted)"
                ),
            }
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
