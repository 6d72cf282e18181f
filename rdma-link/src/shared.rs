//! The state the user's [`crate::Link`] handle and the link's background tasks share: the
//! configuration and regions, the link state and the current connection (what posts and
//! requests are sent to), the counters, the shutdown flag, the clock of heartbeat stamps and the
//! link's tasks. Also the messages that flow between the handle and a connection
//! ([`Cmd`], [`Answer`]).

use crate::api::{LinkState, Post, RequestHandler, SecondStore, UpInfo};
use crate::config::LinkConfig;
use crate::error::{LinkError, Result};
use crate::refusals::Refusals;
use crate::region::Region;
use crate::spawn::{Spawn, Tasks};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Counters, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) rtt_ns: AtomicU64,
    /// 1 + the stamp of the latest of our pings the peer answered (0: none yet).
    pub(crate) heard_stamp: AtomicU64,
    pub(crate) posts: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) records_in: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) served: AtomicU64,
}

impl Stats {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the handle asks of the current connection.
pub(crate) enum Cmd {
    Post {
        post: Post,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<()>>,
    },
    Release {
        partition: u32,
        through_seq: u64,
    },
    Request {
        payload: Bytes,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<Bytes>>,
    },
}

/// A handler's answer, sent back to the connection that received the request.
pub(crate) struct Answer {
    pub(crate) id: u64,
    pub(crate) status: u8,
    pub(crate) payload: Bytes,
}

/// What the driver of the current connection exposes to posters.
pub(crate) struct ConnHandle {
    pub(crate) generation: u64,
    pub(crate) cmd: mpsc::UnboundedSender<Cmd>,
    pub(crate) window: Arc<Semaphore>,
    pub(crate) peer_second_len: u64,
    pub(crate) peer_max_record: u32,
    /// Requests in flight (effective request window).
    pub(crate) req_window: Arc<Semaphore>,
    pub(crate) peer_max_request: u32,
    /// Told to stop when a newer connection replaces this one.
    pub(crate) stop: Arc<Notify>,
}

pub(crate) struct Shared {
    pub(crate) cfg: LinkConfig,
    pub(crate) local: Option<Region>,
    pub(crate) store: Option<Arc<dyn SecondStore>>,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    pub(crate) state: watch::Sender<LinkState>,
    conn: Mutex<Option<Arc<ConnHandle>>>,
    pub(crate) stats: Stats,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) tasks: Tasks,
    /// The listener's refused connections, so that a retrying peer's are said once.
    pub(crate) refusals: Refusals,
    next_generation: AtomicU64,
    next_tag: AtomicU64,
    /// Origin of heartbeat stamps (tokio's clock: paused in a simulation).
    started: Instant,
}

impl Shared {
    pub(crate) fn new(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
        spawner: Arc<dyn Spawn>,
    ) -> Shared {
        Shared {
            cfg,
            local,
            store,
            handler: RwLock::new(handler),
            state: watch::Sender::new(LinkState::Connecting),
            conn: Mutex::new(None),
            stats: Stats::default(),
            shutdown: watch::Sender::new(false),
            tasks: Tasks::new(spawner),
            refusals: Refusals::default(),
            next_generation: AtomicU64::new(0),
            next_tag: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn conn_lock(&self) -> MutexGuard<'_, Option<Arc<ConnHandle>>> {
        // A poisoned lock only means another thread panicked while holding a plain Option swap.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection posts and requests go to, if one is up.
    pub(crate) fn conn(&self) -> Option<Arc<ConnHandle>> {
        self.conn_lock().clone()
    }

    pub(crate) fn handler(&self) -> Option<Arc<dyn RequestHandler>> {
        self.handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_handler(&self, handler: Option<Arc<dyn RequestHandler>>) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    pub(crate) fn peer(&self) -> u32 {
        self.cfg.peer_node_id
    }

    pub(crate) fn down_err(&self, reason: impl Into<String>) -> LinkError {
        LinkError::Down {
            peer: self.cfg.peer_node_id,
            reason: reason.into(),
        }
    }

    pub(crate) fn set_state(&self, s: LinkState) {
        if *self.shutdown.borrow() {
            self.state.send_replace(LinkState::Closed);
            return;
        }
        self.state.send_replace(s);
    }

    /// Set a Down/Connecting state unless a connection is up (a failed second connection attempt
    /// must not hide a working one).
    pub(crate) fn set_state_if_not_up(&self, s: LinkState) {
        if self.conn_lock().is_none() {
            self.set_state(s);
        }
    }

    pub(crate) fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn next_tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn set_rtt(&self, d: Duration) {
        let new = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let old = self.stats.rtt_ns.load(Ordering::Relaxed);
        let v = if old == 0 { new } else { (old * 7 + new) / 8 };
        self.stats.rtt_ns.store(v, Ordering::Relaxed);
    }

    /// The peer answered our ping sent at `stamp`: it heard us then (a stamp from the
    /// future is not believed).
    pub(crate) fn set_heard(&self, stamp: u64) {
        if stamp <= self.now_stamp() {
            self.stats
                .heard_stamp
                .fetch_max(stamp.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// When the latest ping the peer answered was sent.
    pub(crate) fn heard_at(&self) -> Option<Instant> {
        match self.stats.heard_stamp.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.started + Duration::from_nanos(n - 1)),
        }
    }

    pub(crate) fn now_stamp(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub(crate) fn stamp_age(&self, stamp: u64) -> Duration {
        Duration::from_nanos(self.now_stamp().saturating_sub(stamp))
    }

    /// Make a new connection the current one; the previous one (if any) is told to stop.
    pub(crate) fn install(&self, h: Arc<ConnHandle>, info: UpInfo) {
        let old = self.conn_lock().replace(h);
        self.set_state(LinkState::Up(info));
        if let Some(old) = old {
            old.stop.notify_one();
        }
    }

    /// Remove connection `generation` (if still current) and report the link down.
    pub(crate) fn uninstall(&self, generation: u64, err: &LinkError) {
        let mut g = self.conn_lock();
        if g.as_ref().is_some_and(|h| h.generation == generation) {
            *g = None;
            drop(g);
            self.set_state(LinkState::Down(err.clone()));
        }
    }
}
