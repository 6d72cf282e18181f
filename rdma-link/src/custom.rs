//! The transport over a user-supplied [`Network`] (see `network` and
//! [`crate::Link::start_over`]): each message is sent whole, a record with its bytes; on
//! receipt the link checks every message against its limits and copies a record's bytes into
//! its second store. The connection itself is a `stream` connection, as for TCP.

use crate::error::{FrameError, LinkError, Result};
use crate::handshake::PeerInfo;
use crate::network::{Connection, Listener, MessageReceiver, MessageSender, Network};
use crate::proto::{decode_message_mac, FrameMac, Msg, RecordHdr};
use crate::shared::Shared;
use crate::stream::{dial, MsgRead, MsgWrite, RecordBytes, RecordSink, StreamIo, StreamWire};
use crate::wire::Carrier;
use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) struct NetCarrier(pub(crate) Arc<dyn Network>);

type NetIo = StreamIo<NetWrite, NetRead>;

fn net_io(shared: &Shared, c: Connection) -> NetIo {
    let rd = NetRead {
        rx: c.receiver,
        max_record: shared.cfg.max_record,
        // No request payloads before authentication.
        max_request: 0,
        mac: None,
    };
    StreamIo::new(
        shared,
        NetWrite {
            tx: c.sender,
            mac: None,
        },
        rd,
    )
}

impl Carrier for NetCarrier {
    type Conn = NetIo;
    type Wire = StreamWire<NetWrite>;
    type Listener = Box<dyn Listener>;
    type Pending = Connection;
    const NAME: &'static str = "custom network";

    async fn connect(&self, shared: &Arc<Shared>, addr: SocketAddr) -> Result<NetIo> {
        let c = dial(shared, addr, self.0.connect(addr)).await?;
        Ok(net_io(shared, c))
    }

    async fn listen(&self, _shared: &Arc<Shared>, addr: SocketAddr) -> Result<Box<dyn Listener>> {
        self.0
            .listen(addr)
            .await
            .map_err(|e| LinkError::io(format!("cannot listen on {addr} for the mirror link"), e))
    }

    async fn accept(
        &self,
        _shared: &Arc<Shared>,
        listener: &mut Box<dyn Listener>,
    ) -> Result<Option<(Connection, Option<SocketAddr>)>> {
        let (c, from) = listener
            .accept()
            .await
            .map_err(|e| LinkError::io("accepting a connection", e))?;
        Ok(Some((c, Some(from))))
    }

    fn refuse(&self, _pending: Connection) {}

    async fn establish(&self, shared: &Arc<Shared>, pending: Connection) -> Result<NetIo> {
        Ok(net_io(shared, pending))
    }

    fn describe(&self, _conn: &NetIo) -> String {
        "custom network".into()
    }

    fn established(&self, shared: &Arc<Shared>, conn: NetIo, peer: &PeerInfo) -> Self::Wire {
        conn.into_wire(shared, peer.keys.as_ref())
    }
}

/// Sends whole messages; after the handshake each ends in its MAC.
pub(crate) struct NetWrite {
    tx: Box<dyn MessageSender>,
    mac: Option<FrameMac>,
}

impl NetWrite {
    /// Append the MAC of the message in `b` (if frames are authenticated) and send it.
    async fn seal_and_send(&mut self, mut b: Vec<u8>) -> io::Result<()> {
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&b, &[]);
            b.extend_from_slice(&tag);
        }
        self.tx.send(b.into()).await
    }
}

impl MsgWrite for NetWrite {
    async fn control(&mut self, m: &Msg) -> io::Result<()> {
        let mut b = Vec::with_capacity(64);
        m.encode(&mut b);
        self.seal_and_send(b).await
    }

    async fn record(&mut self, hdr: &RecordHdr, data: RecordBytes) -> io::Result<()> {
        let data = data.get();
        let mut b =
            Vec::with_capacity(crate::proto::RECORD_HDR_LEN + data.len() + crate::proto::TAG_LEN);
        Msg::Record(*hdr).encode(&mut b);
        b.extend_from_slice(data);
        self.seal_and_send(b).await
    }

    async fn data(&mut self, m: &Msg) -> io::Result<usize> {
        let Some((head, payload)) = m.data_parts() else {
            return Ok(0);
        };
        let mut b = Vec::with_capacity(head.len() + payload.len() + crate::proto::TAG_LEN);
        b.extend_from_slice(&head);
        b.extend_from_slice(payload);
        let n = b.len();
        self.seal_and_send(b).await?;
        Ok(n)
    }

    fn start_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    // Messages go out whole; nothing is buffered here.
    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn is_idle(&self) -> bool {
        true
    }

    // Dropping the sender closes our direction.
    async fn close(&mut self) {}
}

pub(crate) struct NetRead {
    rx: Box<dyn MessageReceiver>,
    max_record: u32,
    max_request: u32,
    mac: Option<FrameMac>,
}

impl MsgRead for NetRead {
    async fn read(&mut self, sink: &RecordSink) -> Result<Msg, FrameError> {
        let m: Bytes = self.rx.recv().await?.ok_or(FrameError::Closed)?;
        // The MAC is checked before a record's bytes are copied into the second store.
        decode_message_mac(
            m,
            self.max_record,
            self.max_request,
            self.mac.as_mut(),
            |h| sink.place(h),
        )
    }

    fn allow_requests(&mut self, max_request: u32) {
        self.max_request = max_request;
    }

    fn start_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }
}
