//! The TCP transport: frames of `len | crc32c | payload` (after the handshake `len | 0 |
//! payload | MAC`) over one tokio `TcpStream` per peer.
//! Only what is specific to sockets lives here — connecting, listening, and writing and reading
//! frames (record bytes are read from the socket straight into the second-store region); the
//! connection itself is a `stream` connection.

use crate::error::{FrameError, LinkError, Result};
use crate::handshake::PeerInfo;
use crate::proto::{
    data_frame_header, encode_frame_mac, record_frame_header, FrameCrc, FrameMac, FrameReader, Msg,
    RecordHdr, FRAME_HEADER_LEN,
};
use crate::shared::Shared;
use crate::stream::{dial, MsgRead, MsgWrite, RecordBytes, RecordSink, StreamIo, StreamWire};
use crate::wire::Carrier;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const SOCKET_BUF: usize = 256 * 1024;

pub(crate) struct TcpCarrier;

type TcpIo = StreamIo<TcpWrite, TcpRead>;

fn tcp_io(shared: &Shared, s: TcpStream) -> Result<TcpIo> {
    s.set_nodelay(true)
        .map_err(|e| LinkError::io("setting TCP_NODELAY on the mirror link", e))?;
    let (rd, wr) = s.into_split();
    let wr = TcpWrite::new(wr);
    let rd = TcpRead {
        rd: BufReader::with_capacity(SOCKET_BUF, rd),
        // No request payloads before authentication.
        reader: FrameReader::with_limits(shared.cfg.max_record, 0),
        max_record: shared.cfg.max_record,
    };
    Ok(StreamIo::new(shared, wr, rd))
}

impl Carrier for TcpCarrier {
    type Conn = TcpIo;
    type Wire = StreamWire<TcpWrite>;
    type Listener = TcpListener;
    type Pending = (TcpStream, SocketAddr);
    const NAME: &'static str = "tcp";

    async fn connect(&self, shared: &Arc<Shared>, addr: SocketAddr) -> Result<TcpIo> {
        let s = dial(shared, addr, TcpStream::connect(addr)).await?;
        tcp_io(shared, s)
    }

    async fn listen(&self, _shared: &Arc<Shared>, addr: SocketAddr) -> Result<TcpListener> {
        TcpListener::bind(addr).await.map_err(|e| {
            LinkError::io(format!("cannot listen on {addr} for the mirror link (is the address configured and the port free?)"), e)
        })
    }

    async fn accept(
        &self,
        _shared: &Arc<Shared>,
        listener: &mut TcpListener,
    ) -> Result<Option<((TcpStream, SocketAddr), Option<SocketAddr>)>> {
        let (s, from) = listener
            .accept()
            .await
            .map_err(|e| LinkError::io("accepting a TCP connection", e))?;
        Ok(Some(((s, from), Some(from))))
    }

    fn refuse(&self, _pending: (TcpStream, SocketAddr)) {}

    async fn establish(
        &self,
        shared: &Arc<Shared>,
        (s, _): (TcpStream, SocketAddr),
    ) -> Result<TcpIo> {
        tcp_io(shared, s)
    }

    fn describe(&self, _conn: &TcpIo) -> String {
        "socket".into()
    }

    fn established(&self, shared: &Arc<Shared>, conn: TcpIo, peer: &PeerInfo) -> Self::Wire {
        conn.into_wire(shared, peer.keys.as_ref())
    }
}

/// Writes frames to the socket; after the handshake each frame is followed by its MAC.
///
/// Nothing is copied into a buffer but the small parts (frame and message headers, control
/// messages, MACs): a record's bytes are sent from our first store and a request's or
/// response's payload from its `Bytes`, gathered with `writev` at `flush` (or once
/// [`SOCKET_BUF`] bytes wait).
pub(crate) struct TcpWrite {
    sock: OwnedWriteHalf,
    /// The small parts of what waits to be sent, in the order `pieces` names them.
    small: Vec<u8>,
    /// What waits to be sent, in order.
    pieces: VecDeque<Piece>,
    /// Bytes of the first piece already sent.
    first_sent: usize,
    /// Bytes in `pieces`, less `first_sent`.
    waiting: usize,
    mac: Option<FrameMac>,
}

enum Piece {
    Small { start: usize, end: usize },
    Record(RecordBytes),
    Payload(Bytes),
}

/// Most pieces one `writev` takes (Linux's `IOV_MAX` is 1024).
const MAX_IOVECS: usize = 512;

impl TcpWrite {
    fn new(sock: OwnedWriteHalf) -> TcpWrite {
        TcpWrite {
            sock,
            small: Vec::new(),
            pieces: VecDeque::new(),
            first_sent: 0,
            waiting: 0,
            mac: None,
        }
    }

    fn frame_crc(&self) -> FrameCrc {
        FrameCrc::with_macs(self.mac.is_some())
    }

    /// Queue `bytes` as small parts (copied).
    fn push_small(&mut self, bytes: &[u8]) {
        let at = self.small.len();
        self.small.extend_from_slice(bytes);
        self.note_small(at);
    }

    /// The small parts from `at` to the end of `small` were appended: queue them.
    fn note_small(&mut self, at: usize) {
        let end = self.small.len();
        if end == at {
            return;
        }
        self.waiting += end - at;
        if let Some(Piece::Small { end: last, .. }) = self.pieces.back_mut() {
            if *last == at {
                *last = end;
                return;
            }
        }
        self.pieces.push_back(Piece::Small { start: at, end });
    }

    /// Queue `piece` (an empty one is left out: `flush` sends only non-empty slices).
    fn push(&mut self, piece: Piece) {
        let n = piece_bytes(&self.small, &piece).len();
        if n > 0 {
            self.waiting += n;
            self.pieces.push_back(piece);
        }
    }

    /// Send early once a socket buffer's worth waits, so a long turn keeps the wire busy.
    async fn flush_if_full(&mut self) -> io::Result<()> {
        if self.waiting >= SOCKET_BUF {
            self.flush().await?;
        }
        Ok(())
    }
}

fn piece_bytes<'a>(small: &'a [u8], piece: &'a Piece) -> &'a [u8] {
    match piece {
        Piece::Small { start, end } => &small[*start..*end],
        Piece::Record(r) => r.get(),
        Piece::Payload(b) => b,
    }
}

impl MsgWrite for TcpWrite {
    async fn control(&mut self, m: &Msg) -> io::Result<()> {
        let at = self.small.len();
        encode_frame_mac(m, self.mac.as_mut(), &mut self.small);
        self.note_small(at);
        self.flush_if_full().await
    }

    async fn record(&mut self, hdr: &RecordHdr, data: RecordBytes) -> io::Result<()> {
        let head = record_frame_header(hdr, data.get(), self.frame_crc());
        self.push_small(&head);
        self.push(Piece::Record(data));
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&head[FRAME_HEADER_LEN..], data.get());
            self.push_small(&tag);
        }
        self.flush_if_full().await
    }

    async fn data(&mut self, m: &Msg) -> io::Result<usize> {
        let Some((head, payload)) = data_frame_header(m, self.frame_crc()) else {
            return Ok(0);
        };
        let n = head.len() + payload.len();
        self.push_small(&head);
        let tag = self
            .mac
            .as_mut()
            .map(|mac| mac.tag(&head[FRAME_HEADER_LEN..], payload));
        self.push(Piece::Payload(payload.clone()));
        if let Some(tag) = tag {
            self.push_small(&tag);
        }
        self.flush_if_full().await?;
        Ok(n)
    }

    fn start_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    async fn flush(&mut self) -> io::Result<()> {
        let TcpWrite {
            sock,
            small,
            pieces,
            first_sent,
            waiting,
            ..
        } = self;
        while !pieces.is_empty() {
            let slices: Vec<IoSlice<'_>> = pieces
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, p)| {
                    let b = piece_bytes(small, p);
                    IoSlice::new(if i == 0 { &b[*first_sent..] } else { b })
                })
                .collect();
            let mut n = sock.write_vectored(&slices).await?;
            drop(slices);
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            *waiting -= n;
            while let Some(p) = pieces.front() {
                let left = piece_bytes(small, p).len() - *first_sent;
                if n < left {
                    *first_sent += n;
                    break;
                }
                n -= left;
                *first_sent = 0;
                pieces.pop_front();
            }
        }
        small.clear();
        Ok(())
    }

    fn is_idle(&self) -> bool {
        self.pieces.is_empty()
    }

    async fn close(&mut self) {
        // What still waits is dropped: the connection is going away.
        self.pieces.clear();
        let _ = self.sock.shutdown().await;
    }
}

/// Reads frames from a buffered socket.
pub(crate) struct TcpRead {
    rd: BufReader<OwnedReadHalf>,
    reader: FrameReader,
    max_record: u32,
}

impl MsgRead for TcpRead {
    async fn read(&mut self, sink: &RecordSink) -> Result<Msg, FrameError> {
        self.reader.read(&mut self.rd, |h| sink.place(h)).await
    }

    fn allow_requests(&mut self, max_request: u32) {
        self.reader.set_limits(self.max_record, max_request);
    }

    fn start_mac(&mut self, mac: FrameMac) {
        self.reader.set_mac(mac);
    }
}
