//! The handle the engine holds ([`Link`]): starts a link on the chosen transport — TCP, RDMA,
//! or a custom [`Network`] — and turns posts, releases and requests into commands for the
//! current connection, which the background tasks (`driver`) carry out.

use crate::api::{LinkState, Post, RequestHandler, SecondStore, UpInfo};
use crate::config::{LinkConfig, Transport};
use crate::custom::NetCarrier;
use crate::driver;
use crate::error::{LinkError, Result};
use crate::network::Network;
use crate::rdma::RdmaCarrier;
use crate::region::Region;
use crate::shared::{Cmd, ConnHandle, Shared, Stats};
use crate::spawn::{Spawn, TaskHandle};
use crate::tcp::TcpCarrier;
use crate::wire::Carrier;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

/// The handle the engine holds. Cheap to clone; all clones drive the same link. Works from any
/// executor: its futures wait only on channels, the I/O runs on the link's own runtime.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

/// Dropped with the last clone of the handle: ends the link.
struct Owner {
    shared: Arc<Shared>,
    /// The runtime the link owns ([`Link::start`]), if any.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    /// The root task (connect or listen loop), until `shutdown` waits for it.
    root: Mutex<Option<TaskHandle>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        let rt = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }
}

impl Link {
    /// Start a link. `local` is the region posts read from (None: this node never posts);
    /// `store` is this node's second store (None: this node never receives records).
    ///
    /// The link runs on a dedicated one-thread tokio runtime it owns (so a slow `persist` or the
    /// engine's own executor never stalls it). Returns at once; see [`Link::subscribe`].
    pub fn start(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
    ) -> Result<Link> {
        Self::start_owned(cfg, local, store, None)
    }

    /// Like [`Link::start`], with a handler serving the peer's requests (see
    /// [`Link::request`]). Without one, every request from the peer is answered with
    /// [`LinkError::RequestFailed`] (until [`Link::set_request_handler`]).
    pub fn start_with_handler(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<Link> {
        Self::start_owned(cfg, local, store, Some(handler))
    }

    /// Like [`Link::start`], on an existing tokio runtime.
    pub fn start_on(
        handle: &tokio::runtime::Handle,
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
    ) -> Result<Link> {
        Self::start_transport(cfg, local, store, None, Arc::new(handle.clone()), None)
    }

    /// Like [`Link::start_on`], with a request handler (see [`Link::start_with_handler`]).
    pub fn start_on_with_handler(
        handle: &tokio::runtime::Handle,
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<Link> {
        Self::start_transport(
            cfg,
            local,
            store,
            Some(handler),
            Arc::new(handle.clone()),
            None,
        )
    }

    /// Start a link over a custom [`Network`] (a simulator's), running every task of the link
    /// through `spawner`: the real handshake, session, heartbeats, timeouts and requests, with
    /// the network carrying the messages. `cfg.role` gives the addresses for the network;
    /// `cfg.transport` is only announced in the handshake (both nodes must agree on it). Busy
    /// polling is off (`cfg.busy_poll` is ignored): over a paused clock it would spin forever.
    ///
    /// Call it from inside the runtime the spawner runs tasks on. With a current-thread runtime
    /// whose clock is paused and a deterministic network, a run depends only on its inputs:
    /// every `select!` of the link is biased, all its timing comes from tokio's clock, and no
    /// decision depends on hash order (the handshake's random nonces change no decision).
    pub fn start_over(
        mut cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
        network: Arc<dyn Network>,
        spawner: Arc<dyn Spawn>,
    ) -> Result<Link> {
        cfg.busy_poll = Duration::ZERO;
        Self::start_carrier(
            cfg,
            local,
            store,
            handler,
            NetCarrier(network),
            spawner,
            None,
        )
    }

    fn start_owned(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
    ) -> Result<Link> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nvm-link")
            .enable_all()
            .build()
            .map_err(|e| LinkError::io("creating the link's tokio runtime", e))?;
        let spawner = Arc::new(rt.handle().clone());
        Self::start_transport(cfg, local, store, handler, spawner, Some(rt))
    }

    fn start_transport(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
        spawner: Arc<dyn Spawn>,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> Result<Link> {
        match cfg.transport {
            Transport::Tcp => {
                Self::start_carrier(cfg, local, store, handler, TcpCarrier, spawner, runtime)
            }
            Transport::Rdma => {
                Self::start_carrier(cfg, local, store, handler, RdmaCarrier, spawner, runtime)
            }
        }
    }

    fn start_carrier<C: Carrier>(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
        carrier: C,
        spawner: Arc<dyn Spawn>,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> Result<Link> {
        cfg.validate()?;
        let shared = Arc::new(Shared::new(cfg, local, store, handler, spawner));
        let root = shared.tasks.spawn(driver::run(shared.clone(), carrier));
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            runtime: Mutex::new(runtime),
            root: Mutex::new(Some(root)),
        });
        Ok(Link { shared, owner })
    }

    /// Install (or remove) the handler of the peer's requests. Requests already being served
    /// keep the handler they started with.
    pub fn set_request_handler(&self, handler: Option<Arc<dyn RequestHandler>>) {
        self.shared.set_handler(handler);
    }

    /// Mirror one record. Resolves Ok only once the peer reported the bytes durable in its second
    /// store; Err at once if the link is not up, and promptly if it fails while the post is in
    /// flight. The source bytes must stay unchanged until this resolves; when it resolves
    /// (either way) the link no longer reads them.
    ///
    /// The post is handed to the link when this is called, not when the future is first
    /// polled, so the caller can do its local work (persisting its own copy) while the record
    /// travels; only when the window is full does the hand-off wait for the future.
    pub fn post(
        &self,
        post: Post,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        enum Start {
            Failed(LinkError),
            Sent(oneshot::Receiver<Result<()>>),
            AwaitWindow(Arc<ConnHandle>, Post),
        }
        let start = match self.check_post(&post) {
            Err(e) => Start::Failed(e),
            Ok(h) => match h.window.clone().try_acquire_owned() {
                Ok(permit) => match self.send_post(&h, post, permit) {
                    Ok(rx) => Start::Sent(rx),
                    Err(e) => Start::Failed(e),
                },
                Err(_) => Start::AwaitWindow(h, post),
            },
        };
        let link = self.clone();
        async move {
            let rx = match start {
                Start::Failed(e) => return Err(e),
                Start::Sent(rx) => rx,
                Start::AwaitWindow(h, post) => {
                    let permit = match h.window.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return Err(link.not_up_error()),
                    };
                    link.send_post(&h, post, permit)?
                }
            };
            match rx.await {
                Ok(r) => r,
                // The driver dropped the reply without answering: only on a runtime shutdown.
                Err(_) => Err(link.not_up_error()),
            }
        }
    }

    /// The connection a post goes out on, once the post is checked against both regions.
    fn check_post(&self, post: &Post) -> Result<Arc<ConnHandle>> {
        let h = self.shared.conn();
        let Some(h) = h else {
            return Err(self.not_up_error());
        };
        let local = self.shared.local.ok_or_else(|| {
            LinkError::InvalidPost("this link was started without a local region".into())
        })?;
        if post.len == 0 {
            return Err(LinkError::InvalidPost("record length 0".into()));
        }
        if !local.check(post.local_offset, u64::from(post.len)) {
            return Err(LinkError::InvalidPost(format!(
                "local range [{}, +{}) is outside the {}-byte local region",
                post.local_offset,
                post.len,
                local.len()
            )));
        }
        if post
            .remote_offset
            .checked_add(u64::from(post.len))
            .is_none_or(|e| e > h.peer_second_len)
        {
            return Err(LinkError::InvalidPost(format!(
                "remote range [{}, +{}) is outside node {}'s {}-byte second store",
                post.remote_offset, post.len, self.shared.cfg.peer_node_id, h.peer_second_len
            )));
        }
        if post.len > h.peer_max_record.min(self.shared.cfg.max_record) {
            return Err(LinkError::InvalidPost(format!(
                "record of {} bytes exceeds the limit of {} bytes",
                post.len,
                h.peer_max_record.min(self.shared.cfg.max_record)
            )));
        }
        Ok(h)
    }

    fn send_post(
        &self,
        h: &ConnHandle,
        post: Post,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (tx, rx) = oneshot::channel();
        Stats::count(&self.shared.stats.posts);
        h.cmd
            .send(Cmd::Post {
                post,
                permit,
                reply: tx,
            })
            .map_err(|_| self.not_up_error())?;
        Ok(rx)
    }

    /// Send `payload` to the peer's [`RequestHandler`] and wait for its answer. The payload is
    /// opaque to the link; request and answer may be up to `max_request` bytes (the smaller of
    /// both nodes' limits). Waits for a request-window slot first; requests are answered in any
    /// order and matched by id.
    ///
    /// Errors: [`LinkError::InvalidRequest`] at once for an oversized payload; the link's error
    /// at once if it is not up, and promptly (exactly once) if it fails while the request is in
    /// flight — the request may or may not have been executed by the peer then;
    /// [`LinkError::RequestFailed`] if the peer could not serve it (the link stays up).
    ///
    /// Dropping the future abandons the answer but keeps the window slot until the peer
    /// answered (or the link went down), so the peer never serves more than the window.
    pub async fn request(&self, payload: impl Into<Bytes>) -> Result<Bytes> {
        let payload = payload.into();
        let h = self.shared.conn();
        let Some(h) = h else {
            return Err(self.not_up_error());
        };
        let limit = h.peer_max_request.min(self.shared.cfg.max_request);
        if payload.len() > limit as usize {
            return Err(LinkError::InvalidRequest(format!(
                "payload of {} bytes exceeds the request limit of {limit} bytes",
                payload.len()
            )));
        }
        let permit = match h.req_window.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Err(self.not_up_error()),
        };
        let (tx, rx) = oneshot::channel();
        Stats::count(&self.shared.stats.requests);
        if h.cmd
            .send(Cmd::Request {
                payload,
                permit,
                reply: tx,
            })
            .is_err()
        {
            Stats::count(&self.shared.stats.requests_failed);
            return Err(self.not_up_error());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.not_up_error()),
        }
    }

    /// (requests started, answered Ok, failed, requests from the peer served by our handler)
    pub fn request_counters(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared.stats;
        (
            s.requests.load(Ordering::Relaxed),
            s.answered.load(Ordering::Relaxed),
            s.requests_failed.load(Ordering::Relaxed),
            s.served.load(Ordering::Relaxed),
        )
    }

    /// Tell the peer that records of `partition` up to `through_seq` are on the medium and their
    /// second-store space may be reused. Best effort: lost if the link is down (the resync point
    /// of the next connection carries the truth).
    pub fn release(&self, partition: u32, through_seq: u64) -> Result<()> {
        let h = self.shared.conn();
        match h {
            Some(h)
                if h.cmd
                    .send(Cmd::Release {
                        partition,
                        through_seq,
                    })
                    .is_ok() =>
            {
                Ok(())
            }
            _ => Err(self.not_up_error()),
        }
    }

    fn not_up_error(&self) -> LinkError {
        match &*self.shared.state.borrow() {
            LinkState::Down(e) => e.clone(),
            LinkState::Closed => LinkError::Closed,
            _ => self.shared.down_err("not connected yet"),
        }
    }

    pub fn state(&self) -> LinkState {
        self.shared.state.borrow().clone()
    }

    /// The current connection's generation while the link is up, else None (no clone of
    /// the state: cheap enough to ask per request).
    pub fn up_generation(&self) -> Option<u64> {
        match &*self.shared.state.borrow() {
            LinkState::Up(info) => Some(info.generation),
            _ => None,
        }
    }

    /// A receiver that sees every state change (`changed().await`).
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }

    /// Wait until the link is up.
    pub async fn wait_up(&self) -> Result<UpInfo> {
        let mut rx = self.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Up(i) => return Ok(i.clone()),
                LinkState::Closed => return Err(LinkError::Closed),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(LinkError::Closed);
            }
        }
    }

    /// Wait until the link is no longer up; returns the reason.
    pub async fn wait_down(&self) -> LinkError {
        let mut rx = self.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Down(e) => return e.clone(),
                LinkState::Closed => return LinkError::Closed,
                _ => {}
            }
            if rx.changed().await.is_err() {
                return LinkError::Closed;
            }
        }
    }

    /// Smoothed round-trip time of heartbeats, if measured.
    pub fn rtt(&self) -> Option<Duration> {
        match self.shared.stats.rtt_ns.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// When the latest of our heartbeats that the peer answered was sent: the peer heard us
    /// at that moment or later, so it will not call us silent before then plus its
    /// heartbeat timeout. (The peer echoes the stamp; one from the future is ignored.)
    pub fn peer_heard_us_at(&self) -> Option<std::time::Instant> {
        self.shared.heard_at().map(|t| t.into_std())
    }

    /// (posts started, posts acknowledged, posts failed, records received)
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared.stats;
        (
            s.posts.load(Ordering::Relaxed),
            s.acked.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.records_in.load(Ordering::Relaxed),
        )
    }

    /// Simulate a crash (tests, simulation): stop every task of the link at once, without a
    /// goodbye or failing anything gracefully — the link's own runtime for [`Link::start`],
    /// the link's tasks on a runtime or spawner of the caller's.
    #[doc(hidden)]
    pub fn crash(self) {
        let rt = self
            .owner
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match rt {
            Some(rt) => rt.shutdown_background(),
            None => self.shared.tasks.kill(),
        }
    }

    /// Stop the link: in-flight posts fail, the connection is closed with a goodbye, and the
    /// background tasks have ended when this returns (after that the regions are no longer
    /// used). Request handlers still running are stopped.
    pub async fn shutdown(self) {
        self.shared.shutdown.send_replace(true);
        let root = self
            .owner
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(root) = root {
            root.join().await;
        }
        self.shared.tasks.kill();
        self.shared.tasks.idle().await;
        self.shared.state.send_replace(LinkState::Closed);
    }
}
