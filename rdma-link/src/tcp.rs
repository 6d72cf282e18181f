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
use crate::stream::{dial, MsgRead, MsgWrite, RecordSink, StreamIo, StreamWire};
use crate::wire::Carrier;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const SOCKET_BUF: usize = 256 * 1024;

pub(crate) struct TcpCarrier;

type TcpIo = StreamIo<TcpWrite, TcpRead>;

fn tcp_io(shared: &Shared, s: TcpStream) -> Result<TcpIo> {
    s.set_nodelay(true)
        .map_err(|e| LinkError::io("setting TCP_NODELAY on the mirror link", e))?;
    let (rd, wr) = s.into_split();
    let wr = TcpWrite {
        wr: BufWriter::with_capacity(SOCKET_BUF, wr),
        buf: Vec::new(),
        mac: None,
    };
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

/// Writes frames into a buffered socket; after the handshake each frame is followed by its MAC.
pub(crate) struct TcpWrite {
    wr: BufWriter<OwnedWriteHalf>,
    /// Scratch for encoding control frames.
    buf: Vec<u8>,
    mac: Option<FrameMac>,
}

impl MsgWrite for TcpWrite {
    async fn control(&mut self, m: &Msg) -> io::Result<()> {
        self.buf.clear();
        encode_frame_mac(m, self.mac.as_mut(), &mut self.buf);
        self.wr.write_all(&self.buf).await
    }

    async fn record(&mut self, hdr: &RecordHdr, data: &[u8]) -> io::Result<()> {
        let head = record_frame_header(hdr, data, FrameCrc::with_macs(self.mac.is_some()));
        self.wr.write_all(&head).await?;
        self.wr.write_all(data).await?;
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&head[FRAME_HEADER_LEN..], data);
            self.wr.write_all(&tag).await?;
        }
        Ok(())
    }

    async fn data(&mut self, m: &Msg) -> io::Result<usize> {
        let Some((head, payload)) = data_frame_header(m, FrameCrc::with_macs(self.mac.is_some()))
        else {
            return Ok(0);
        };
        self.wr.write_all(&head).await?;
        self.wr.write_all(payload).await?;
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&head[FRAME_HEADER_LEN..], payload);
            self.wr.write_all(&tag).await?;
        }
        Ok(head.len() + payload.len())
    }

    fn start_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.wr.flush().await
    }

    fn is_idle(&self) -> bool {
        self.wr.buffer().is_empty()
    }

    async fn close(&mut self) {
        let _ = self.wr.shutdown().await;
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
