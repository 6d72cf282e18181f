//! The transport-independent half of the link: the user's handle, configuration, connection
//! state, the window of in-flight posts and the per-connection session logic (acks, heartbeats,
//! releases, timeouts). The transports (`tcp`, `rdma`) only move messages and record bytes.

use crate::error::{LinkError, Result};
use crate::proto::{Msg, PartitionSeq, RecordHdr, ResyncPoint};
use crate::region::Region;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

/// Which transport carries the mirror traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    /// RDMA RC via librdmacm; the address is the IP of the RDMA device (RoCE / IPoIB).
    Rdma,
}

impl Transport {
    pub(crate) fn code(self) -> u8 {
        match self {
            Transport::Tcp => crate::proto::TRANSPORT_TCP,
            Transport::Rdma => crate::proto::TRANSPORT_RDMA,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
        }
    }
}

/// Who opens the connection. One node of the pair listens, the other connects (and reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Listen(SocketAddr),
    Connect(SocketAddr),
}

/// The busy-poll window of a connection loop (see [`LinkConfig::busy_poll`]): traffic opens
/// or extends it; while it is open the loop polls instead of sleeping.
pub(crate) struct BusyPoll {
    window: Duration,
    until: Option<Instant>,
}

impl BusyPoll {
    pub(crate) fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            window,
            until: None,
        }
    }

    /// Something was sent or received: keep polling for another window.
    pub(crate) fn traffic(&mut self) {
        if !self.window.is_zero() {
            self.until = Some(Instant::now() + self.window);
        }
    }

    pub(crate) fn is_hot(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }

    /// True once per window, when it has just run out (the loop goes back to sleeping).
    pub(crate) fn cooled(&mut self) -> bool {
        !self.is_hot() && self.until.take().is_some()
    }
}

/// Default of [`LinkConfig::busy_poll`], in microseconds: long enough to span the gap
/// between two writes at queue depth 1 (so the link thread never sleeps while a writer is
/// active), short enough that an idle link stops spinning at once.
pub const DEFAULT_BUSY_POLL_US: u64 = 1000;

/// Configuration of one link (one peer).
#[derive(Clone)]
pub struct LinkConfig {
    pub transport: Transport,
    pub role: Role,
    pub cluster_id: u64,
    pub node_id: u32,
    pub peer_node_id: u32,
    /// Shared cluster secret (at least 16 bytes). Never sent; used as the HMAC key.
    pub secret: Vec<u8>,
    /// Opaque fingerprint of the NVRAM layout (partition table); must match on both nodes.
    pub layout_tag: u64,
    /// Posts in flight at most (the effective window is the smaller of both nodes' windows).
    pub window: u32,
    /// Largest record accepted, in bytes.
    pub max_record: u32,
    pub heartbeat_interval: Duration,
    /// The peer is declared down when nothing arrived for this long.
    pub heartbeat_timeout: Duration,
    /// The link is declared down when a post stays unacknowledged for this long.
    pub ack_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Pause between connection attempts (connector).
    pub reconnect_delay: Duration,
    /// Requests this node serves concurrently; the peer keeps at most
    /// min(its, ours) requests in flight to us.
    pub request_window: u32,
    /// Largest request / response payload, in bytes (both nodes' limits apply).
    pub max_request: u32,
    /// The link is declared down when a request stays unanswered for this long (the peer's
    /// handler is wedged). Callers wanting a shorter, per-request bound wrap `request` in a
    /// timeout of their own.
    pub request_timeout: Duration,
    /// After traffic, the link thread keeps polling for this long before it sleeps: RDMA polls
    /// its completion queue instead of waiting on the completion channel, TCP keeps its
    /// runtime from parking so the socket is polled. A message arriving meanwhile costs no
    /// thread wake-up (which dominates a QD1 round trip), at the price of one core spinning
    /// while the link is busy. Zero: never poll, always sleep.
    pub busy_poll: Duration,
}

impl LinkConfig {
    pub fn new(
        transport: Transport,
        role: Role,
        cluster_id: u64,
        node_id: u32,
        peer_node_id: u32,
        secret: &[u8],
    ) -> Self {
        LinkConfig {
            transport,
            role,
            cluster_id,
            node_id,
            peer_node_id,
            secret: secret.to_vec(),
            layout_tag: 0,
            window: 64,
            max_record: 1 << 20,
            heartbeat_interval: Duration::from_millis(250),
            heartbeat_timeout: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            reconnect_delay: Duration::from_millis(200),
            request_window: 32,
            max_request: crate::proto::DEFAULT_MAX_REQUEST,
            request_timeout: Duration::from_secs(30),
            busy_poll: Duration::from_micros(DEFAULT_BUSY_POLL_US),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LinkError::Config(m));
        if self.secret.len() < 16 {
            return bad(format!(
                "the cluster secret is {} bytes; use at least 16 random bytes",
                self.secret.len()
            ));
        }
        if self.node_id == self.peer_node_id {
            return bad(format!(
                "node id {} and peer node id are equal; each node needs its own id",
                self.node_id
            ));
        }
        if self.window == 0 || self.window > 4096 {
            return bad(format!("window {} out of range 1..=4096", self.window));
        }
        if self.max_record == 0 || self.max_record > crate::proto::MAX_RECORD_LEN {
            return bad(format!(
                "max_record {} out of range 1..={}",
                self.max_record,
                crate::proto::MAX_RECORD_LEN
            ));
        }
        if self.request_window == 0 || self.request_window > 4096 {
            return bad(format!(
                "request window {} out of range 1..=4096",
                self.request_window
            ));
        }
        if self.max_request > crate::proto::MAX_REQUEST_LEN {
            return bad(format!(
                "max_request {} out of range 0..={}",
                self.max_request,
                crate::proto::MAX_REQUEST_LEN
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("request timeout must not be zero".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(format!(
                "heartbeat timeout {:?} must be longer than the interval {:?}",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        Ok(())
    }
}

/// The receiving side of mirroring: the engine's second store (the NVRAM area that holds the
/// peer's records). Called from the link's own threads.
pub trait SecondStore: Send + Sync + 'static {
    /// The whole second-store region; the peer's record at offset X lands at offset X here.
    fn region(&self) -> Region;
    /// Make `[offset, offset+len)` durable (cache flush / msync). The acknowledgement is sent only
    /// after this returned Ok; an Err is reported to the sender's post.
    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// A record is durable and about to be acknowledged.
    fn on_record(&self, _partition: u32, _seq: u64, _offset: u64, _len: u32) {}
    /// The peer flushed its records of `partition` up to `through_seq` to its medium: their
    /// second-store space may be reclaimed.
    fn on_release(&self, _partition: u32, _through_seq: u64) {}
    /// What this node holds, sent to the peer on every (re)connect.
    fn resync_point(&self) -> ResyncPoint {
        ResyncPoint::default()
    }
}

/// The serving side of [`Link::request`]: the link calls `handle` for every request the peer
/// sends, on the link's runtime, many concurrently (up to `request_window`). That runtime also
/// drives the link (one worker thread with [`Link::start`]): the future must not block — hand
/// blocking work to `spawn_blocking` or the engine's own threads and await the result. The future's
/// output is the response payload; it must not be larger than `max_request` (else the requester
/// gets [`LinkError::RequestFailed`]). A panic in the handler is reported to the requester the
/// same way. If the link goes down while a handler runs, the handler still runs to completion
/// and its answer is dropped.
///
/// Any `Fn(Bytes) -> impl Future<Output = Bytes>` closure is a handler.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(&self, payload: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>>;
}

impl<F, Fut> RequestHandler for F
where
    F: Fn(Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send + 'static,
{
    fn handle(&self, payload: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
        Box::pin(self(payload))
    }
}

/// One mirror record to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Post {
    pub partition: u32,
    pub seq: u64,
    /// Offset of the record bytes in this node's (first-store) region.
    pub local_offset: u64,
    /// Offset in the peer's second-store region (same layout: usually equal to local_offset).
    pub remote_offset: u64,
    pub len: u32,
}

/// Facts about the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpInfo {
    pub peer_node: u32,
    pub transport: Transport,
    /// Increases with every new connection.
    pub generation: u64,
    /// Effective window (min of both nodes').
    pub window: u32,
    /// What the peer holds (for restarting mirroring after a reconnect).
    pub peer_resync: ResyncPoint,
    /// The peer's second-store length.
    pub peer_second_len: u64,
}

#[derive(Debug, Clone)]
pub enum LinkState {
    /// Trying to (re)connect / waiting for the peer.
    Connecting,
    Up(UpInfo),
    /// The last connection (or attempt) failed; the link keeps retrying/listening.
    Down(LinkError),
    /// `shutdown` was called.
    Closed,
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        matches!(self, LinkState::Up(_))
    }
}

/// Counters, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    rtt_ns: AtomicU64,
    pub(crate) posts: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) records_in: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) served: AtomicU64,
}

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
    pub(crate) stop: Arc<tokio::sync::Notify>,
}

pub(crate) struct Shared {
    pub(crate) cfg: LinkConfig,
    pub(crate) local: Option<Region>,
    pub(crate) store: Option<Arc<dyn SecondStore>>,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    state: watch::Sender<LinkState>,
    conn: Mutex<Option<Arc<ConnHandle>>>,
    pub(crate) stats: Stats,
    pub(crate) shutdown: watch::Sender<bool>,
    next_generation: AtomicU64,
    next_tag: AtomicU64,
    started: Instant,
}

impl Shared {
    fn conn_lock(&self) -> MutexGuard<'_, Option<Arc<ConnHandle>>> {
        // A poisoned lock only means another thread panicked while holding a plain Option swap.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn handler(&self) -> Option<Arc<dyn RequestHandler>> {
        self.handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    pub(crate) fn now_stamp(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub(crate) fn stamp_age(&self, stamp: u64) -> Duration {
        Duration::from_nanos(self.now_stamp().saturating_sub(stamp))
    }

    /// Make a new connection the current one; the previous one (if any) is told to stop.
    pub(crate) fn install(&self, h: Arc<ConnHandle>, info: UpInfo) -> Option<Arc<ConnHandle>> {
        let old = self.conn_lock().replace(h);
        self.set_state(LinkState::Up(info));
        old
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

/// The handle the engine holds. Cheap to clone; all clones drive the same link. Works from any
/// executor: its futures wait only on channels, the I/O runs on the link's own runtime.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

struct Owner {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        let rt = Self::own_runtime()?;
        let handle = rt.handle().clone();
        Self::start_inner(cfg, local, store, None, &handle, Some(rt))
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
        let rt = Self::own_runtime()?;
        let handle = rt.handle().clone();
        Self::start_inner(cfg, local, store, Some(handler), &handle, Some(rt))
    }

    fn own_runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nvm-link")
            .enable_all()
            .build()
            .map_err(|e| LinkError::io("creating the link's tokio runtime", e))
    }

    /// Install (or remove) the handler of the peer's requests. Requests already being served
    /// keep the handler they started with.
    pub fn set_request_handler(&self, handler: Option<Arc<dyn RequestHandler>>) {
        *self
            .shared
            .handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = handler;
    }

    /// Like [`Link::start`], on an existing tokio runtime.
    pub fn start_on(
        handle: &tokio::runtime::Handle,
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
    ) -> Result<Link> {
        Self::start_inner(cfg, local, store, None, handle, None)
    }

    /// Like [`Link::start_on`], with a request handler (see [`Link::start_with_handler`]).
    pub fn start_on_with_handler(
        handle: &tokio::runtime::Handle,
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<Link> {
        Self::start_inner(cfg, local, store, Some(handler), handle, None)
    }

    fn start_inner(
        cfg: LinkConfig,
        local: Option<Region>,
        store: Option<Arc<dyn SecondStore>>,
        handler: Option<Arc<dyn RequestHandler>>,
        handle: &tokio::runtime::Handle,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> Result<Link> {
        cfg.validate()?;
        let (state, _) = watch::channel(LinkState::Connecting);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            local,
            store,
            handler: RwLock::new(handler),
            state,
            conn: Mutex::new(None),
            stats: Stats::default(),
            shutdown,
            next_generation: AtomicU64::new(0),
            next_tag: AtomicU64::new(0),
            started: Instant::now(),
        });
        let task = {
            let shared = shared.clone();
            match shared.cfg.transport {
                Transport::Tcp => handle.spawn(crate::tcp::run(shared)),
                Transport::Rdma => handle.spawn(crate::rdma::run(shared)),
            }
        };
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            runtime: Mutex::new(runtime),
            tasks: Mutex::new(vec![task]),
        });
        Ok(Link { shared, owner })
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
        let h = self.shared.conn_lock().clone();
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
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (tx, rx) = oneshot::channel();
        self.shared.stats.posts.fetch_add(1, Ordering::Relaxed);
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
        let h = self.shared.conn_lock().clone();
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
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        if h.cmd
            .send(Cmd::Request {
                payload,
                permit,
                reply: tx,
            })
            .is_err()
        {
            self.shared
                .stats
                .requests_failed
                .fetch_add(1, Ordering::Relaxed);
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
        let h = self.shared.conn_lock().clone();
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

    /// Stop the link: in-flight posts fail, the connection is closed with a goodbye, and the
    /// background tasks have ended when this returns (after that the regions are no longer used).
    /// Simulate a crash (tests): stop the link's runtime at once, without a goodbye or failing
    /// anything gracefully. Only for links created with [`Link::start`].
    #[doc(hidden)]
    pub fn crash(self) {
        let rt = self
            .owner
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }

    pub async fn shutdown(self) {
        self.shared.shutdown.send_replace(true);
        let tasks: Vec<_> =
            std::mem::take(&mut *self.owner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        self.shared.state.send_replace(LinkState::Closed);
    }
}

struct Pending {
    post: Post,
    reply: oneshot::Sender<Result<()>>,
    _permit: OwnedSemaphorePermit,
    sent: Instant,
}

struct PendingRequest {
    reply: oneshot::Sender<Result<Bytes>>,
    _permit: OwnedSemaphorePermit,
    sent: Instant,
}

/// Per-connection protocol logic shared by both transports. The transport feeds it received
/// messages and timer ticks and sends what it queues in `outbox`.
pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) generation: u64,
    inflight: HashMap<u64, Pending>,
    pub(crate) outbox: VecDeque<Msg>,
    last_rx: Instant,
    last_ping: Instant,
    /// Records received and not yet acknowledged (bounded by our window).
    pub(crate) records_unacked: u32,
    pub(crate) window: u32,
    /// Our requests awaiting an answer.
    requests: HashMap<u64, PendingRequest>,
    next_request: u64,
    /// Requests (and answers) to send, after the control messages.
    pub(crate) data_out: VecDeque<Msg>,
    /// Ids of the peer's requests our handler is serving.
    serving: HashSet<u64>,
    answers: mpsc::UnboundedSender<Answer>,
    /// Largest answer the peer accepts.
    peer_max_request: u32,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        generation: u64,
        window: u32,
        peer_max_request: u32,
        answers: mpsc::UnboundedSender<Answer>,
    ) -> Session {
        let now = Instant::now();
        Session {
            shared,
            generation,
            inflight: HashMap::new(),
            outbox: VecDeque::new(),
            last_rx: now,
            last_ping: now,
            records_unacked: 0,
            window,
            requests: HashMap::new(),
            next_request: 0,
            data_out: VecDeque::new(),
            serving: HashSet::new(),
            answers,
            peer_max_request,
        }
    }

    /// Something arrived from the peer (also counts for chunks the transport reassembles).
    pub(crate) fn touch(&mut self) {
        self.last_rx = Instant::now();
    }

    /// Queue one of our requests.
    pub(crate) fn start_request(
        &mut self,
        payload: Bytes,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<Bytes>>,
    ) {
        self.next_request += 1;
        let id = self.next_request;
        self.requests.insert(
            id,
            PendingRequest {
                reply,
                _permit: permit,
                sent: Instant::now(),
            },
        );
        self.data_out.push_back(Msg::Request { id, payload });
    }

    /// A handler finished: queue its answer (if the request belongs to this connection).
    pub(crate) fn on_answer(&mut self, a: Answer) {
        if !self.serving.remove(&a.id) {
            return;
        }
        let limit = self.peer_max_request.min(self.shared.cfg.max_request);
        let (status, payload) =
            if a.status == crate::proto::STATUS_OK && a.payload.len() > limit as usize {
                tracing::error!(
                    peer = self.shared.peer(),
                    id = a.id,
                    len = a.payload.len(),
                    limit,
                    "request handler answered more than the response limit; failing the request"
                );
                (crate::proto::STATUS_TOO_LARGE, Bytes::new())
            } else {
                (a.status, a.payload)
            };
        self.data_out.push_back(Msg::Response {
            id: a.id,
            status,
            payload,
        });
    }

    fn on_request(&mut self, id: u64, payload: Bytes) -> Result<()> {
        if payload.len() > self.shared.cfg.max_request as usize {
            return Err(self.protocol(format!(
                "request of {} bytes exceeds our limit of {}",
                payload.len(),
                self.shared.cfg.max_request
            )));
        }
        if self.serving.len() >= self.shared.cfg.request_window as usize {
            return Err(self.protocol(format!(
                "peer exceeded the request window of {}",
                self.shared.cfg.request_window
            )));
        }
        if !self.serving.insert(id) {
            return Err(self.protocol(format!("request id {id} reused while in service")));
        }
        let Some(handler) = self.shared.handler() else {
            self.on_answer(Answer {
                id,
                status: crate::proto::STATUS_NO_HANDLER,
                payload: Bytes::new(),
            });
            return Ok(());
        };
        self.shared.stats.served.fetch_add(1, Ordering::Relaxed);
        let answers = self.answers.clone();
        let peer = self.shared.peer();
        // The handler runs in its own task (a panic is caught by its JoinHandle); its answer
        // comes back through `answers` to this connection's loop.
        let job = tokio::spawn(async move { handler.handle(payload).await });
        tokio::spawn(async move {
            let a = match job.await {
                Ok(payload) => Answer {
                    id,
                    status: crate::proto::STATUS_OK,
                    payload,
                },
                Err(e) => {
                    tracing::error!(peer, id, error = %e, "request handler failed");
                    Answer {
                        id,
                        status: crate::proto::STATUS_HANDLER_FAILED,
                        payload: Bytes::new(),
                    }
                }
            };
            // The connection may be gone: then the answer is dropped.
            let _ = answers.send(a);
        });
        Ok(())
    }

    fn on_response(&mut self, id: u64, status: u8, payload: Bytes) -> Result<()> {
        let Some(p) = self.requests.remove(&id) else {
            return Err(self.protocol(format!("response to unknown request id {id}")));
        };
        let stats = &self.shared.stats;
        if status == crate::proto::STATUS_OK {
            if payload.len() > self.shared.cfg.max_request as usize {
                let e = self.protocol(format!(
                    "response of {} bytes exceeds our limit of {}",
                    payload.len(),
                    self.shared.cfg.max_request
                ));
                stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = p.reply.send(Err(e.clone()));
                return Err(e);
            }
            stats.answered.fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Ok(payload));
        } else {
            stats.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(LinkError::RequestFailed {
                peer: self.shared.peer(),
                reason: crate::proto::status_text(status).into(),
            }));
        }
        Ok(())
    }

    /// Register a post about to be sent; returns its wire header.
    pub(crate) fn start_post(
        &mut self,
        post: Post,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<()>>,
    ) -> RecordHdr {
        let tag = self.shared.next_tag();
        let hdr = RecordHdr {
            tag,
            partition: post.partition,
            seq: post.seq,
            offset: post.remote_offset,
            len: post.len,
        };
        let prev = self.inflight.insert(
            tag,
            Pending {
                post,
                reply,
                _permit: permit,
                sent: Instant::now(),
            },
        );
        assert!(prev.is_none(), "post tags are unique");
        hdr
    }

    /// Handle one received message (record bytes already landed in the region for `Record`).
    pub(crate) fn on_msg(&mut self, msg: Msg) -> Result<()> {
        self.last_rx = Instant::now();
        match msg {
            Msg::Record(h) => self.on_record(h),
            Msg::Ack {
                tag,
                partition,
                seq,
                ok,
            } => {
                let Some(p) = self.inflight.remove(&tag) else {
                    return Err(
                        self.protocol(format!("acknowledgement for unknown post tag {tag}"))
                    );
                };
                if p.post.partition != partition || p.post.seq != seq {
                    let e = self.protocol(format!(
                        "acknowledgement for tag {tag} names partition {partition} seq {seq}, the post was partition {} seq {}",
                        p.post.partition, p.post.seq
                    ));
                    let _ = p.reply.send(Err(e.clone()));
                    return Err(e);
                }
                if ok {
                    self.shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                    let _ = p.reply.send(Ok(()));
                } else {
                    self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = p.reply.send(Err(LinkError::PersistFailed {
                        peer: self.shared.peer(),
                        partition,
                        seq,
                        message: "the partner's persist (flush/msync) failed; see its log".into(),
                    }));
                }
                Ok(())
            }
            Msg::Release {
                partition,
                through_seq,
            } => {
                if let Some(s) = &self.shared.store {
                    s.on_release(partition, through_seq);
                }
                Ok(())
            }
            Msg::Ping { stamp } => {
                self.outbox.push_back(Msg::Pong { stamp });
                Ok(())
            }
            Msg::Pong { stamp } => {
                self.shared.set_rtt(self.shared.stamp_age(stamp));
                Ok(())
            }
            Msg::Request { id, payload } => self.on_request(id, payload),
            Msg::Response {
                id,
                status,
                payload,
            } => self.on_response(id, status, payload),
            Msg::Bye { reason } => Err(self.shared.down_err(format!(
                "node {} closed the link: {reason}",
                self.shared.peer()
            ))),
            other => Err(self.protocol(format!(
                "unexpected {} message on an established link",
                other.name()
            ))),
        }
    }

    fn on_record(&mut self, h: RecordHdr) -> Result<()> {
        self.records_unacked += 1;
        if self.records_unacked > self.window {
            return Err(self.protocol(format!(
                "peer exceeded the window of {} records",
                self.window
            )));
        }
        let Some(store) = &self.shared.store else {
            return Err(
                self.protocol("peer sent a record but this node has no second store".into())
            );
        };
        let ok = match store.persist(h.offset, u64::from(h.len)) {
            Ok(()) => {
                store.on_record(h.partition, h.seq, h.offset, h.len);
                true
            }
            Err(e) => {
                tracing::error!(partition = h.partition, seq = h.seq, offset = h.offset, len = h.len, error = %e, "persisting a mirrored record failed");
                false
            }
        };
        self.shared.stats.records_in.fetch_add(1, Ordering::Relaxed);
        self.records_unacked -= 1;
        self.outbox.push_back(Msg::Ack {
            tag: h.tag,
            partition: h.partition,
            seq: h.seq,
            ok,
        });
        Ok(())
    }

    /// Check that a received record header fits in our second store.
    pub(crate) fn check_record(&self, h: &RecordHdr) -> Result<()> {
        let Some(store) = &self.shared.store else {
            return Err(
                self.protocol("peer sent a record but this node has no second store".into())
            );
        };
        if h.len == 0
            || h.len > self.shared.cfg.max_record
            || !store.region().check(h.offset, u64::from(h.len))
        {
            return Err(self.protocol(format!(
                "record [{}, +{}) does not fit the {}-byte second store / {}-byte record limit",
                h.offset,
                h.len,
                store.region().len(),
                self.shared.cfg.max_record
            )));
        }
        Ok(())
    }

    /// Timer: queue a heartbeat when due; fail the link on a silent peer or a stuck post.
    pub(crate) fn on_tick(&mut self) -> Result<()> {
        let cfg = &self.shared.cfg;
        let now = Instant::now();
        let silent = now.duration_since(self.last_rx);
        if silent > cfg.heartbeat_timeout {
            return Err(self.shared.down_err(format!(
                "no heartbeat or message from node {} for {:?} (timeout {:?})",
                cfg.peer_node_id, silent, cfg.heartbeat_timeout
            )));
        }
        if let Some(oldest) = self.inflight.values().map(|p| p.sent).min() {
            let age = now.duration_since(oldest);
            if age > cfg.ack_timeout {
                return Err(self.shared.down_err(format!(
                    "node {} did not acknowledge a record within {:?}",
                    cfg.peer_node_id, cfg.ack_timeout
                )));
            }
        }
        if let Some(oldest) = self.requests.values().map(|p| p.sent).min() {
            if now.duration_since(oldest) > cfg.request_timeout {
                return Err(self.shared.down_err(format!(
                    "node {} did not answer a request within {:?}",
                    cfg.peer_node_id, cfg.request_timeout
                )));
            }
        }
        if now.duration_since(self.last_ping) >= cfg.heartbeat_interval {
            self.last_ping = now;
            self.outbox.push_back(Msg::Ping {
                stamp: self.shared.now_stamp(),
            });
        }
        Ok(())
    }

    pub(crate) fn protocol(&self, what: String) -> LinkError {
        self.shared.down_err(format!("protocol error: {what}"))
    }

    /// The connection ended: fail everything still pending with `err`.
    pub(crate) fn fail_all(&mut self, err: &LinkError) {
        for (_, p) in self.inflight.drain() {
            self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(err.clone()));
        }
        for (_, p) in self.requests.drain() {
            self.shared
                .stats
                .requests_failed
                .fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(err.clone()));
        }
        self.data_out.clear();
        self.serving.clear();
    }
}

/// End of a connection: stop accepting posts, fail queued and in-flight ones, report Down.
/// Called after the transport resources are gone (so no post's bytes are read any more).
pub(crate) fn finish_connection(
    session: &mut Session,
    cmd_rx: &mut mpsc::UnboundedReceiver<Cmd>,
    window: &Semaphore,
    req_window: &Semaphore,
    err: &LinkError,
) {
    window.close();
    req_window.close();
    session.shared.uninstall(session.generation, err);
    cmd_rx.close();
    while let Ok(c) = cmd_rx.try_recv() {
        match c {
            Cmd::Post { reply, .. } => {
                session.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Err(err.clone()));
            }
            Cmd::Request { reply, .. } => {
                session
                    .shared
                    .stats
                    .requests_failed
                    .fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Err(err.clone()));
            }
            Cmd::Release { .. } => {}
        }
    }
    session.fail_all(err);
}

pub(crate) fn seqs_summary(v: &[PartitionSeq]) -> String {
    let mut s = String::new();
    for p in v.iter().take(8) {
        s.push_str(&format!("p{}:{} ", p.partition, p.seq));
    }
    if v.len() > 8 {
        s.push_str("...");
    }
    s
}
