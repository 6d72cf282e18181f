//! What the link and its user exchange: a [`Post`] to mirror, the [`LinkState`] and
//! [`UpInfo`] the link reports, and the two traits the user implements — [`SecondStore`]
//! (where the peer's records land) and [`RequestHandler`] (who serves the peer's requests).

use crate::config::Transport;
use crate::error::LinkError;
use crate::proto::ResyncPoint;
use crate::region::Region;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

/// The receiving side of mirroring: the engine's second store (the NVRAM area that holds the
/// peer's records). Called from the link's own threads.
pub trait SecondStore: Send + Sync + 'static {
    /// The whole second-store region; the peer's record at offset X lands at offset X here.
    fn region(&self) -> Region;
    /// Make `[offset, offset+len)` durable (cache flush / msync). The acknowledgement is sent only
    /// after this returned Ok; an Err is reported to the sender's post.
    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// A record is durable and about to be acknowledged (called by the default
    /// [`SecondStore::hold_record`]; a store that may refuse records implements that instead).
    fn on_record(&self, _partition: u32, _seq: u64, _offset: u64, _len: u32) {}
    /// A record is durable (`persist` returned Ok): hold it, or refuse it. `Ok` acknowledges it
    /// as held and the sender's post succeeds; `Err(reason)` acknowledges it as refused and the
    /// sender's post fails with [`LinkError::RecordRefused`] carrying `reason` — for a record
    /// this store cannot account for (outside its partition, an unknown partition: the nodes'
    /// layouts disagree). Either way the link stays up. The default calls
    /// [`SecondStore::on_record`] and holds everything.
    fn hold_record(&self, partition: u32, seq: u64, offset: u64, len: u32) -> Result<(), String> {
        self.on_record(partition, seq, offset, len);
        Ok(())
    }
    /// The peer flushed its records of `partition` up to `through_seq` to its medium: their
    /// second-store space may be reclaimed.
    fn on_release(&self, _partition: u32, _through_seq: u64) {}
    /// What this node holds, sent to the peer on every (re)connect.
    fn resync_point(&self) -> ResyncPoint {
        ResyncPoint::default()
    }
}

/// The serving side of [`crate::Link::request`]: the link calls `handle` for every request the
/// peer sends, each in a task of its own on the link's runtime (or through the link's
/// [`crate::Spawn`]), many concurrently (up to `request_window`). That runtime also drives the
/// link (one worker thread with [`crate::Link::start`]): the future must not block — hand
/// blocking work to `spawn_blocking` or the engine's own threads and await the result. The
/// future's output is the response payload; it must not be larger than `max_request` (else the
/// requester gets [`LinkError::RequestFailed`]). A panic in the handler is reported to the
/// requester the same way. If the connection goes down while a handler runs, the handler still
/// runs to completion and its answer is dropped; handlers still running when the link itself
/// ends (shutdown, or every handle dropped) are stopped.
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
