//! A connection that carries whole messages in order over a reliable stream: a TCP socket
//! (`tcp`) or a custom network's connection (`custom`). Those two supply the halves
//! ([`MsgWrite`], [`MsgRead`]); this module has what they share — the handshake I/O, the
//! reader task that lands record bytes in the second store (after their MAC held), and the write
//! turn (control messages, then records, then requests and answers within a budget, bounded by
//! the heartbeat timeout so a peer that stopped reading cannot block the link forever). After
//! the handshake both halves authenticate every message with the connection's keys.

use crate::error::{FrameError, HandshakeError, LinkError, Result};
use crate::handshake::MsgIo;
use crate::proto::{FrameMac, Msg, RecordHdr, SessionKeys};
use crate::region::Region;
use crate::session::Session;
use crate::shared::Shared;
use crate::spawn::TaskHandle;
use crate::wire::Wire;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Request / response bytes written per turn of the connection loop, so control messages and
/// records are not stuck behind a burst of large answers.
const DATA_BUDGET: usize = 2 << 20;
/// How long the goodbye may take at shutdown.
const GOODBYE_WAIT: Duration = Duration::from_millis(200);
/// How long closing our direction may take.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// The sending half of a stream connection.
pub(crate) trait MsgWrite: Send + 'static {
    /// Write one control message (buffered until `flush`).
    fn control(&mut self, m: &Msg) -> impl Future<Output = io::Result<()>> + Send;
    /// Write one record: its header and its bytes. The bytes may be sent as late as the next
    /// `flush` (they stay unchanged until then, see [`RecordBytes`]).
    fn record(
        &mut self,
        hdr: &RecordHdr,
        data: RecordBytes,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Write one request or response; returns the bytes it took.
    fn data(&mut self, m: &Msg) -> impl Future<Output = io::Result<usize>> + Send;
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Nothing written and not flushed yet.
    fn is_idle(&self) -> bool;
    /// Close our direction (the peer reads the end of the stream).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// From the next message on, append a MAC to every message.
    fn start_mac(&mut self, mac: FrameMac);
}

/// The receiving half of a stream connection.
pub(crate) trait MsgRead: Send + 'static {
    /// The next message. Record bytes go where `sink` says; `Err(FrameError::Closed)` at a
    /// clean end of the stream.
    fn read(&mut self, sink: &RecordSink) -> impl Future<Output = Result<Msg, FrameError>> + Send;
    /// Authentication succeeded: accept requests and responses up to `max_request` bytes.
    fn allow_requests(&mut self, max_request: u32);
    /// From the next message on, every message must carry a valid MAC; a record's bytes reach
    /// the second store only once its MAC held.
    fn start_mac(&mut self, mac: FrameMac);
}

/// The bytes of a posted record in our local region, which a writer may send without copying
/// them first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordBytes {
    region: Region,
    offset: u64,
    len: usize,
}

impl RecordBytes {
    /// `None` if the range is outside `region`.
    ///
    /// # Safety
    /// No one may write `[offset, offset + len)` of `region` until the connection's writer has
    /// sent these bytes or the connection is closed: the post contract (the engine keeps a
    /// post's source bytes unchanged until its future resolves, which happens only after the
    /// peer acknowledged the record or after the connection closed).
    pub(crate) unsafe fn new(region: Region, offset: u64, len: usize) -> Option<RecordBytes> {
        region.check(offset, len as u64).then_some(RecordBytes {
            region,
            offset,
            len,
        })
    }

    pub(crate) fn get(&self) -> &[u8] {
        // SAFETY: in bounds (checked in `new`), and unchanged per `new`'s contract.
        match unsafe { self.region.slice(self.offset, self.len) } {
            Some(b) => b,
            None => unreachable!("checked in RecordBytes::new"),
        }
    }
}

/// Where the reader puts the bytes of a received record.
pub(crate) enum RecordSink {
    /// Before authentication: a record is a protocol violation.
    Refuse,
    /// Into our second store (if we have one), after checking the header against it.
    Store {
        region: Option<Region>,
        max_record: u32,
    },
}

impl RecordSink {
    /// The destination of `h`'s bytes.
    pub(crate) fn place<'a>(&self, h: &RecordHdr) -> Result<&'a mut [u8], FrameError> {
        let (region, max_record) = match self {
            RecordSink::Refuse => {
                return Err(FrameError::Malformed {
                    what: "handshake",
                    detail: "record before authentication".into(),
                })
            }
            RecordSink::Store { region, max_record } => (region, *max_record),
        };
        let region = region.ok_or(FrameError::Malformed {
            what: "record",
            detail: "this node has no second store".into(),
        })?;
        if h.len > max_record {
            return Err(FrameError::Oversized {
                len: u64::from(h.len),
                max: u64::from(max_record),
            });
        }
        // SAFETY: the peer owns this part of our second store while it mirrors into it; the
        // connection's reader task is the only writer, one record at a time, and it ends
        // (aborted and awaited) before the connection is reported finished.
        unsafe { region.slice_mut(h.offset, h.len as usize) }.ok_or(FrameError::OutOfRegion {
            offset: h.offset,
            len: u64::from(h.len),
            region_len: region.len() as u64,
        })
    }
}

/// Open a connection within the handshake timeout, with the operator's error messages.
pub(crate) async fn dial<T>(
    shared: &Shared,
    addr: SocketAddr,
    connect: impl Future<Output = io::Result<T>>,
) -> Result<T> {
    let hs = shared.cfg.handshake_timeout;
    tokio::time::timeout(hs, connect)
        .await
        .map_err(|_| shared.down_err(format!("connecting to {addr} timed out after {hs:?}")))?
        .map_err(|e| shared.down_err(format!("cannot connect to {addr}: {e}")))
}

/// A stream connection during the handshake.
pub(crate) struct StreamIo<W, R> {
    wr: W,
    rd: R,
    peer: u32,
}

impl<W: MsgWrite, R: MsgRead> StreamIo<W, R> {
    /// `rd` must refuse request payloads until `allow_requests` (nothing large is buffered for
    /// a stranger).
    pub(crate) fn new(shared: &Shared, wr: W, rd: R) -> Self {
        StreamIo {
            wr,
            rd,
            peer: shared.peer(),
        }
    }

    /// After the handshake: start the reader task and hand over the writer; from here on every
    /// message carries a MAC under `keys` (if any).
    pub(crate) fn into_wire(
        self,
        shared: &Arc<Shared>,
        keys: Option<&SessionKeys>,
    ) -> StreamWire<W> {
        let StreamIo { mut wr, mut rd, .. } = self;
        rd.allow_requests(shared.cfg.max_request);
        if let Some(k) = keys {
            wr.start_mac(FrameMac::new(k.tx));
            rd.start_mac(FrameMac::new(k.rx));
        }
        let sink = RecordSink::Store {
            region: shared.store.as_ref().map(|s| s.region()),
            max_record: shared.cfg.max_record,
        };
        let (tx, incoming) = mpsc::unbounded_channel();
        // The reader runs on its own so that a record's bytes are read straight into the
        // second store, however long the connection loop is busy elsewhere.
        let reader = shared.tasks.spawn_abortable(async move {
            loop {
                let r = rd.read(&sink).await;
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        StreamWire {
            wr,
            incoming,
            reader,
            shared: shared.clone(),
        }
    }
}

impl<W: MsgWrite, R: MsgRead> MsgIo for StreamIo<W, R> {
    async fn send_msg(&mut self, m: &Msg) -> Result<()> {
        let sent = async {
            self.wr.control(m).await?;
            self.wr.flush().await
        };
        sent.await
            .map_err(|e| LinkError::io("sending a handshake message", e))
    }

    async fn recv_msg(&mut self) -> Result<Msg> {
        let peer = self.peer;
        self.rd
            .read(&RecordSink::Refuse)
            .await
            .map_err(|e| match e {
                FrameError::Closed => LinkError::Handshake {
                    peer,
                    source: HandshakeError::PeerRejected(
                        "the peer closed the connection during the handshake".into(),
                    ),
                },
                e => LinkError::Frame { peer, source: e },
            })
    }

    fn authenticated(&mut self) -> Result<Option<crate::proto::RemoteRegion>> {
        Ok(None)
    }
}

/// An established stream connection: the writer, and the messages of the reader task.
pub(crate) struct StreamWire<W> {
    wr: W,
    incoming: mpsc::UnboundedReceiver<Result<Msg, FrameError>>,
    reader: TaskHandle,
    shared: Arc<Shared>,
}

impl<W: MsgWrite> StreamWire<W> {
    fn frame_down(&self, e: FrameError) -> LinkError {
        let shared = &self.shared;
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

    /// Control messages, then records, then requests and answers up to the budget; flushed.
    async fn write_turn(&mut self, session: &mut Session) -> io::Result<()> {
        while let Some(m) = session.pop_control() {
            self.wr.control(&m).await?;
        }
        while let Some(r) = session.records.pop_front() {
            let Some(local) = self.shared.local else {
                return Err(io::Error::other("a record to send but no local region"));
            };
            // SAFETY: the engine keeps the source bytes of a post unchanged until its future
            // resolves, which happens only after the peer acknowledged them (so after this
            // connection sent them) or after this connection closed.
            let Some(data) =
                (unsafe { RecordBytes::new(local, r.local_offset, r.hdr.len as usize) })
            else {
                return Err(io::Error::other("post outside the local region"));
            };
            self.wr.record(&r.hdr, data).await?;
        }
        let mut budget = DATA_BUDGET;
        while budget > 0 {
            let Some(m) = session.data_out.pop_front() else {
                break;
            };
            budget = budget.saturating_sub(self.wr.data(&m).await?);
        }
        self.wr.flush().await
    }
}

impl<W: MsgWrite> Wire for StreamWire<W> {
    // Waiting on the reader's channel costs nothing; the runtime polls the socket meanwhile.
    const RECEIVE_WHILE_HOT: bool = true;

    async fn send(&mut self, session: &mut Session) -> Result<()> {
        if !session.has_output() && self.wr.is_idle() {
            return Ok(());
        }
        let hb = self.shared.cfg.heartbeat_timeout;
        let peer = self.shared.peer();
        match tokio::time::timeout(hb, self.write_turn(session)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self
                .shared
                .down_err(format!("sending to node {peer} failed: {e}"))),
            Err(_) => Err(self
                .shared
                .down_err(format!("node {peer} stopped reading for {hb:?}"))),
        }
    }

    fn more_to_send(&self, session: &Session) -> bool {
        !session.data_out.is_empty()
    }

    async fn receive(&mut self, session: &mut Session) -> Result<()> {
        match self.incoming.recv().await {
            Some(Ok(msg)) => {
                session.on_msg(msg)?;
                // Handle whatever else already arrived before writing the replies.
                while let Ok(m) = self.incoming.try_recv() {
                    match m {
                        Ok(msg) => session.on_msg(msg)?,
                        Err(e) => return Err(self.frame_down(e)),
                    }
                }
                Ok(())
            }
            Some(Err(e)) => Err(self.frame_down(e)),
            None => Err(self.shared.down_err("connection reader ended")),
        }
    }

    async fn goodbye(&mut self, session: &mut Session) {
        let bye = async {
            while let Some(m) = session.pop_control() {
                self.wr.control(&m).await?;
            }
            self.wr.flush().await
        };
        let _ = tokio::time::timeout(GOODBYE_WAIT, bye).await;
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.wr.close()).await;
        drop(self.wr);
        // The reader writes into the second store: it must be gone before the connection is.
        self.reader.abort();
        self.reader.join().await;
    }
}
