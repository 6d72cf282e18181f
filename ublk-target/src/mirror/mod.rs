//! Mirroring: each record staged in this node's first store is copied into the partner's
//! second store, and the partner's records land in ours.
//!
//! * [`Mirror`] is what the engine posts through: the `rdma-link` `Link` (its impl is
//!   here), or a fake in tests.
//! * [`MirrorSlot`] is the engine's side of it: the mirror currently attached, the degraded
//!   policy, and whether a write went without a mirror copy since the partner last resynced.
//! * [`SecondStoreArea`] (in `second_store`) is the part of our NVRAM that holds the
//!   partner's partitions.

mod second_store;

pub use second_store::held_reads::HeldRead;
pub use second_store::{
    OwnMedium, ReplayError, SecondStoreArea, SecondStoreReplay, SecondStoreStatus,
};

use crate::config::DegradedPolicy;
use rdma_link::Post;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub type PostFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where the engine sends copies of its records.
pub trait Mirror: Send + Sync {
    /// Resolves Ok once the partner reports the bytes durable in its second store.
    fn post(&self, post: Post) -> PostFuture;
    /// The partner may reclaim everything of `partition` up to `through_seq`.
    fn release(&self, partition: u32, through_seq: u64);
    fn describe(&self) -> String;
    /// Connected now (mirroring possible)?
    fn is_up(&self) -> bool {
        true
    }
    /// "up", "connecting", "down" or "closed": the link's state for status and scripts.
    fn state_name(&self) -> &'static str {
        if self.is_up() {
            "up"
        } else {
            "down"
        }
    }
    /// Transport name while connected ("tcp", "rdma").
    fn transport(&self) -> Option<&'static str> {
        None
    }
    /// Heartbeat round trip, if measured.
    fn rtt(&self) -> Option<std::time::Duration> {
        None
    }
    /// While connected: the connection's generation and when the latest of our heartbeats
    /// that the partner answered was sent (it heard us then, or later).
    fn heard_by_partner(&self) -> Option<(u64, std::time::Instant)> {
        None
    }
    /// While connected: the connection's generation (it grows with every new connection).
    fn connection(&self) -> Option<u64> {
        None
    }
    /// A log-shipping destination keeps our records in log files: a flushed batch may leave
    /// our log only once they are there ([`Mirror::logged`]). Some(grace): how long a batch
    /// waits for a destination that is away before our log lets it go without it. None: the
    /// partner keeps no log (a pair's partner drops its copies once we flushed them).
    fn keeps_log(&self) -> Option<std::time::Duration> {
        None
    }
    /// Resolves Ok once the destination's log file holds `asked` (see
    /// [`crate::cluster::wire::OP_SHIP_LOGGED`]).
    fn logged(&self, _asked: crate::cluster::wire::ShipLogged) -> PostFuture {
        Box::pin(async { Ok(()) })
    }
}

impl Mirror for rdma_link::Link {
    fn post(&self, post: Post) -> PostFuture {
        // Handed to the link now: the record travels while the caller persists its own copy.
        let sent = rdma_link::Link::post(self, post);
        Box::pin(async move { sent.await.map_err(|e| e.to_string()) })
    }
    fn release(&self, partition: u32, through_seq: u64) {
        // While the link is down the partner's second store is rebuilt on reconnect anyway.
        let _ = rdma_link::Link::release(self, partition, through_seq);
    }
    fn describe(&self) -> String {
        format!("{:?}", self.state())
    }
    fn is_up(&self) -> bool {
        self.state().is_up()
    }
    fn state_name(&self) -> &'static str {
        match self.state() {
            rdma_link::LinkState::Up(_) => "up",
            rdma_link::LinkState::Connecting => "connecting",
            rdma_link::LinkState::Down(_) => "down",
            rdma_link::LinkState::Closed => "closed",
        }
    }
    fn transport(&self) -> Option<&'static str> {
        match self.state() {
            rdma_link::LinkState::Up(info) => Some(info.transport.name()),
            _ => None,
        }
    }
    fn rtt(&self) -> Option<std::time::Duration> {
        rdma_link::Link::rtt(self)
    }
    fn connection(&self) -> Option<u64> {
        self.up_generation()
    }
    fn heard_by_partner(&self) -> Option<(u64, std::time::Instant)> {
        match self.state() {
            rdma_link::LinkState::Up(info) => Some((info.generation, self.peer_heard_us_at()?)),
            _ => None,
        }
    }
}

/// The mirror the engine posts to, if any, and how it fared.
pub struct MirrorSlot {
    link: RwLock<Option<Arc<dyn Mirror>>>,
    pub policy: DegradedPolicy,
    mirrored_records: AtomicU64,
    degraded_records: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// A write went without a mirror copy since the partner last (re)connected: until it
    /// resyncs, flushes leave flush marks on the medium.
    unmirrored: AtomicBool,
    /// Counts writes that went without a mirror copy (a resync pass that saw none end can
    /// declare the pair mirrored).
    unmirrored_events: AtomicU64,
    /// Records still to copy to the partner in the resync under way.
    resync_left: AtomicU64,
}

impl MirrorSlot {
    pub fn new(policy: DegradedPolicy) -> MirrorSlot {
        MirrorSlot {
            link: RwLock::new(None),
            policy,
            mirrored_records: AtomicU64::new(0),
            degraded_records: AtomicU64::new(0),
            last_error: Mutex::new(None),
            unmirrored: AtomicBool::new(false),
            unmirrored_events: AtomicU64::new(0),
            resync_left: AtomicU64::new(0),
        }
    }

    pub fn current(&self) -> Option<Arc<dyn Mirror>> {
        self.link.read().ok().and_then(|l| l.clone())
    }

    pub fn attach(&self, m: Option<Arc<dyn Mirror>>) {
        if let Ok(mut l) = self.link.write() {
            *l = m;
        }
    }

    /// A mirror is attached and its link is up.
    pub fn is_up(&self) -> bool {
        self.current().is_some_and(|m| m.is_up())
    }

    /// A write has both copies.
    pub fn note_mirrored(&self) {
        self.mirrored_records.fetch_add(1, Ordering::Relaxed);
    }

    /// A staged record has no mirror copy; called before the flusher can take it, so that
    /// its flush leaves marks.
    pub fn note_unmirrored(&self) {
        self.unmirrored_events.fetch_add(1, Ordering::SeqCst);
        self.unmirrored.store(true, Ordering::SeqCst);
    }

    /// Whether a record lacks its mirror copy, and how many writes went unmirrored so far.
    pub fn unmirrored(&self) -> (bool, u64) {
        // Events first: a write that goes unmirrored after this read is seen by the caller's
        // `partner_resynced_if`.
        let events = self.unmirrored_events.load(Ordering::SeqCst);
        (self.unmirrored.load(Ordering::SeqCst), events)
    }

    /// The partner got a copy of everything unflushed that existed when `events` was read:
    /// mirrored again, unless another write went unmirrored since (then false: copy again).
    pub fn partner_resynced_if(&self, events: u64) -> bool {
        if self.unmirrored_events.load(Ordering::SeqCst) != events {
            return false;
        }
        self.unmirrored.store(false, Ordering::SeqCst);
        // A write may have gone unmirrored between the check and the store.
        if self.unmirrored_events.load(Ordering::SeqCst) != events {
            self.unmirrored.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub fn set_resync_left(&self, n: u64) {
        self.resync_left.store(n, Ordering::Relaxed);
    }

    pub fn resync_done_one(&self) {
        let _ = self
            .resync_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Records still to copy to the partner before the pair counts as mirrored again.
    pub fn resync_left(&self) -> u64 {
        self.resync_left.load(Ordering::Relaxed)
    }

    /// A write is acknowledged (or about to be) without a mirror copy, because of `why`.
    pub fn note_degraded(&self, why: String) {
        self.degraded_records.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            if e.as_deref() != Some(why.as_str()) {
                tracing::warn!("running degraded: a write has no mirror copy ({why})");
                *e = Some(why);
            }
        }
    }

    /// Whether a flushed batch must leave flush marks on the medium: the partner cannot hear
    /// the release now, or a write went unmirrored since it last resynced.
    pub fn needs_flush_marks(&self) -> bool {
        self.unmirrored.load(Ordering::SeqCst) || !self.is_up()
    }

    pub fn mirrored_records(&self) -> u64 {
        self.mirrored_records.load(Ordering::Relaxed)
    }

    pub fn degraded_records(&self) -> u64 {
        self.degraded_records.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}
