//! The messages of the link and their encoding: `kind: u8` followed by a fixed little-endian
//! body (see the module documentation of `proto`). One job, the wire format of every message
//! kind, kept in one file so that an encoder and its decoder are read side by side.

use super::codec::{R, W};
use crate::error::FrameError;
use bytes::Bytes;

/// "NVML" — first field of every hello, so a stray client is told apart from a version mismatch.
pub const MAGIC: u32 = 0x4c4d_564e;
/// Version of this wire protocol. Bump on any incompatible change. The hello keeps the layout
/// of version 2 (magic, version, then the same fields), so that nodes of different versions
/// still read each other's hello and refuse with a clear "version mismatch" on both sides.
///
/// * 3: every message after the handshake's challenge carries a MAC (see [`super::auth`]); the
///   challenge carries the acceptor's flags; an ack says why a record was not held.
/// * 4: the frame MAC hashes a message's bytes before its header (a record's bytes on a BLAKE3
///   chunk boundary: 2.5x faster at 4 KiB).
/// * 6: a TCP frame that carries a MAC carries no crc32c (the field must be 0).
pub const PROTOCOL_VERSION: u16 = 6;
/// Bytes of the TCP frame header (`len`, `crc`).
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest non-record message (a hello with two full resync lists fits).
pub const MAX_CONTROL_LEN: usize = 2 * MAX_RESYNC_ENTRIES * 12 + 256;
/// Most partitions a resync point can describe.
pub const MAX_RESYNC_ENTRIES: usize = 1024;
/// Longest reject / bye reason kept.
pub const MAX_REASON_LEN: usize = 512;
/// Bytes of an encoded record header (kind included).
pub const RECORD_HDR_LEN: usize = 1 + 8 + 4 + 8 + 8 + 4;
/// Largest record the protocol allows (the configured limit is usually smaller).
pub const MAX_RECORD_LEN: u32 = 16 << 20;
/// Largest request / response payload the protocol allows (the configured limit is smaller).
pub const MAX_REQUEST_LEN: u32 = 16 << 20;
/// Default request / response payload limit: a 512 KiB (or 1 MiB) forwarded write plus a header.
pub const DEFAULT_MAX_REQUEST: u32 = (1 << 20) + 4096;
/// Bytes of an encoded request header (kind, id, len) before its payload.
pub const REQUEST_HDR_LEN: usize = 1 + 8 + 4;
/// Bytes of an encoded response header (kind, id, status, len) before its payload.
pub const RESPONSE_HDR_LEN: usize = 1 + 8 + 1 + 4;
/// Bytes of an encoded RDMA chunk header (kind, of, id, status, total, offset).
pub const CHUNK_HDR_LEN: usize = 1 + 1 + 8 + 1 + 4 + 4;

/// Response status: the handler answered; the payload is its answer.
pub const STATUS_OK: u8 = 0;
/// Response status: the serving node has no request handler.
pub const STATUS_NO_HANDLER: u8 = 1;
/// Response status: the handler panicked.
pub const STATUS_HANDLER_FAILED: u8 = 2;
/// Response status: the handler's answer exceeded the requester's size limit.
pub const STATUS_TOO_LARGE: u8 = 3;

pub(crate) fn status_text(s: u8) -> &'static str {
    match s {
        STATUS_OK => "ok",
        STATUS_NO_HANDLER => "the serving node has no request handler",
        STATUS_HANDLER_FAILED => "the serving node's request handler panicked; see its log",
        STATUS_TOO_LARGE => "the serving node's answer exceeds the response size limit",
        _ => "unknown failure status",
    }
}

/// Transport codes carried in the hello.
pub const TRANSPORT_TCP: u8 = 1;
pub const TRANSPORT_RDMA: u8 = 2;

pub(crate) fn transport_name(t: u8) -> &'static str {
    match t {
        TRANSPORT_TCP => "tcp",
        TRANSPORT_RDMA => "rdma",
        _ => "unknown",
    }
}

/// Last sequence number held for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSeq {
    pub partition: u32,
    pub seq: u64,
}

/// What a node holds, exchanged on every (re)connect so mirroring can restart from there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncPoint {
    /// Last sequence number appended to each partition log of this node's first store.
    pub first_store: Vec<PartitionSeq>,
    /// Last sequence number held (durable) in this node's second store for each partition of the peer.
    pub second_store: Vec<PartitionSeq>,
}

/// Static facts a node announces in its hello.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Length of the region this node posts from (its first store); 0 if it never posts.
    pub first_len: u64,
    /// Length of this node's second-store region (where the peer's records land); 0 if none.
    pub second_len: u64,
    /// Opaque layout fingerprint computed by the engine; must be equal on both nodes.
    pub layout_tag: u64,
    /// Records this node accepts in flight from the peer.
    pub window: u32,
    /// Largest record this node accepts.
    pub max_record: u32,
    pub transport: u8,
    /// Requests this node serves concurrently (the peer may have this many in flight).
    pub request_window: u32,
    /// Largest request / response payload this node accepts.
    pub max_request: u32,
    /// What this node is to the peer ([`crate::NodeRole::code`]).
    pub role: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub magic: u32,
    pub version: u16,
    pub cluster_id: u64,
    pub from_node: u32,
    pub to_node: u32,
    pub nonce: [u8; 32],
    pub info: NodeInfo,
}

/// The RDMA coordinates of a second-store region, sent only after authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHdr {
    /// Sender-chosen id tying the acknowledgement to the post.
    pub tag: u64,
    pub partition: u32,
    pub seq: u64,
    /// Offset in the receiver's second-store region.
    pub offset: u64,
    pub len: u32,
}

/// What became of a record, as its ack tells the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStatus {
    /// Persisted and held: the post succeeds.
    Held,
    /// The receiver's persist (flush / msync) failed; the text says how.
    PersistFailed(String),
    /// The receiver's second store will not hold this record (e.g. it lies outside the
    /// record's partition: the nodes' layouts disagree); the text says why.
    Refused(String),
}

const ACK_PERSIST_FAILED: u8 = 0;
const ACK_HELD: u8 = 1;
const ACK_REFUSED: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Connector -> acceptor.
    Hello(Hello),
    /// Acceptor -> connector: its own hello plus proof that it knows the secret, and its
    /// flags ([`super::auth::FLAG_FRAME_MAC`]).
    Challenge {
        hello: Hello,
        mac: [u8; 32],
        flags: u8,
    },
    /// Connector -> acceptor: proof that the connector knows the secret, and its resync point
    /// and (RDMA) second-store coordinates — the acceptor has already proven itself.
    Auth {
        mac: [u8; 32],
        resync: ResyncPoint,
        region: Option<RemoteRegion>,
    },
    /// Acceptor -> connector: accepted; `mac` proves the acceptor sent this resync point and
    /// region.
    Welcome {
        mac: [u8; 32],
        resync: ResyncPoint,
        region: Option<RemoteRegion>,
    },
    Reject {
        reason: String,
    },
    /// A mirror record. Over TCP its bytes follow in the same frame.
    Record(RecordHdr),
    /// The receiver's answer to a record: held, or why not.
    Ack {
        tag: u64,
        partition: u32,
        seq: u64,
        status: AckStatus,
    },
    Release {
        partition: u32,
        through_seq: u64,
    },
    Ping {
        stamp: u64,
    },
    Pong {
        stamp: u64,
    },
    Bye {
        reason: String,
    },
    /// A request for the peer's request handler; answered by a `Response` with the same id.
    Request {
        id: u64,
        payload: Bytes,
    },
    /// The answer to request `id`; `status != STATUS_OK` means the link-level serving failed
    /// (the payload is then empty).
    Response {
        id: u64,
        status: u8,
        payload: Bytes,
    },
}

const K_HELLO: u8 = 1;
const K_CHALLENGE: u8 = 2;
const K_AUTH: u8 = 3;
const K_WELCOME: u8 = 4;
const K_REJECT: u8 = 5;
pub(super) const K_RECORD: u8 = 6;
const K_ACK: u8 = 7;
const K_RELEASE: u8 = 8;
const K_PING: u8 = 9;
const K_PONG: u8 = 10;
const K_BYE: u8 = 11;
pub(super) const K_REQUEST: u8 = 12;
pub(super) const K_RESPONSE: u8 = 13;
pub(super) const K_CHUNK: u8 = 14;

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "hello",
            Msg::Challenge { .. } => "challenge",
            Msg::Auth { .. } => "auth",
            Msg::Welcome { .. } => "welcome",
            Msg::Reject { .. } => "reject",
            Msg::Record(_) => "record",
            Msg::Ack { .. } => "ack",
            Msg::Release { .. } => "release",
            Msg::Ping { .. } => "ping",
            Msg::Pong { .. } => "pong",
            Msg::Bye { .. } => "bye",
            Msg::Request { .. } => "request",
            Msg::Response { .. } => "response",
        }
    }

    /// A request or response (payload-carrying, sent after the control messages).
    pub fn is_data(&self) -> bool {
        matches!(self, Msg::Request { .. } | Msg::Response { .. })
    }

    /// The encoded header (no frame header) and payload of a request / response; None for
    /// other messages.
    pub fn data_parts(&self) -> Option<(Vec<u8>, &Bytes)> {
        let mut h = Vec::with_capacity(RESPONSE_HDR_LEN);
        let mut w = W(&mut h);
        match self {
            Msg::Request { id, payload } => {
                w.u8(K_REQUEST);
                w.u64(*id);
                w.u32(payload.len() as u32);
                Some((h, payload))
            }
            Msg::Response {
                id,
                status,
                payload,
            } => {
                w.u8(K_RESPONSE);
                w.u64(*id);
                w.u8(*status);
                w.u32(payload.len() as u32);
                Some((h, payload))
            }
            _ => None,
        }
    }

    /// Append the payload (kind + body, no frame header, no record bytes) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            Msg::Hello(h) => {
                w.u8(K_HELLO);
                w.hello(h);
            }
            Msg::Challenge { hello, mac, flags } => {
                w.u8(K_CHALLENGE);
                w.hello(hello);
                w.bytes(mac);
                w.u8(*flags);
            }
            Msg::Auth {
                mac,
                resync,
                region,
            } => {
                w.u8(K_AUTH);
                w.bytes(mac);
                w.resync(resync);
                w.region(region);
            }
            Msg::Welcome {
                mac,
                resync,
                region,
            } => {
                w.u8(K_WELCOME);
                w.bytes(mac);
                w.resync(resync);
                w.region(region);
            }
            Msg::Reject { reason } => {
                w.u8(K_REJECT);
                w.string(reason);
            }
            Msg::Record(r) => {
                w.u8(K_RECORD);
                w.u64(r.tag);
                w.u32(r.partition);
                w.u64(r.seq);
                w.u64(r.offset);
                w.u32(r.len);
            }
            Msg::Ack {
                tag,
                partition,
                seq,
                status,
            } => {
                w.u8(K_ACK);
                w.u64(*tag);
                w.u32(*partition);
                w.u64(*seq);
                match status {
                    AckStatus::Held => w.u8(ACK_HELD),
                    AckStatus::PersistFailed(why) => {
                        w.u8(ACK_PERSIST_FAILED);
                        w.string(why);
                    }
                    AckStatus::Refused(why) => {
                        w.u8(ACK_REFUSED);
                        w.string(why);
                    }
                }
            }
            Msg::Release {
                partition,
                through_seq,
            } => {
                w.u8(K_RELEASE);
                w.u32(*partition);
                w.u64(*through_seq);
            }
            Msg::Ping { stamp } => {
                w.u8(K_PING);
                w.u64(*stamp);
            }
            Msg::Pong { stamp } => {
                w.u8(K_PONG);
                w.u64(*stamp);
            }
            Msg::Bye { reason } => {
                w.u8(K_BYE);
                w.string(reason);
            }
            Msg::Request { .. } | Msg::Response { .. } => {
                if let Some((h, payload)) = self.data_parts() {
                    out.extend_from_slice(&h);
                    out.extend_from_slice(payload);
                }
            }
        }
    }

    /// Decode one complete payload. A `Record` payload may be followed by record bytes
    /// (TCP); those are not looked at here — see [`decode_payload_prefix`].
    pub fn decode(payload: &[u8]) -> Result<Msg, FrameError> {
        let (msg, used) = decode_payload_prefix(payload)?;
        if used != payload.len() && !matches!(msg, Msg::Record(_)) {
            return Err(FrameError::Malformed {
                what: msg.name(),
                detail: format!("{} trailing bytes", payload.len() - used),
            });
        }
        Ok(msg)
    }
}

/// Decode the message at the start of `payload`; returns it and the bytes it used.
pub fn decode_payload_prefix(payload: &[u8]) -> Result<(Msg, usize), FrameError> {
    let mut r = R {
        buf: payload,
        pos: 0,
        what: "message",
    };
    let kind = r.u8()?;
    let msg = match kind {
        K_HELLO => {
            r.what = "hello";
            let h = r.hello()?;
            if h.magic != MAGIC || h.version != PROTOCOL_VERSION {
                // Another protocol (or version): its hello is read as far as magic and version,
                // so that the handshake can say which; the rest is not ours to interpret.
                return Ok((Msg::Hello(h), payload.len()));
            }
            Msg::Hello(h)
        }
        K_CHALLENGE => {
            r.what = "challenge";
            let hello = r.hello()?;
            if hello.magic != MAGIC || hello.version != PROTOCOL_VERSION {
                // Another protocol: only the hello's head is ours to read.
                return Ok((
                    Msg::Challenge {
                        hello,
                        mac: [0; 32],
                        flags: 0,
                    },
                    payload.len(),
                ));
            }
            let mac = r.arr32()?;
            Msg::Challenge {
                hello,
                mac,
                flags: r.u8()?,
            }
        }
        K_AUTH => {
            r.what = "auth";
            let mac = r.arr32()?;
            let resync = r.resync()?;
            Msg::Auth {
                mac,
                resync,
                region: r.region()?,
            }
        }
        K_WELCOME => {
            r.what = "welcome";
            let mac = r.arr32()?;
            let resync = r.resync()?;
            Msg::Welcome {
                mac,
                resync,
                region: r.region()?,
            }
        }
        K_REJECT => {
            r.what = "reject";
            Msg::Reject {
                reason: r.string()?,
            }
        }
        K_RECORD => {
            r.what = "record";
            let tag = r.u64()?;
            let partition = r.u32()?;
            let seq = r.u64()?;
            let offset = r.u64()?;
            let len = r.u32()?;
            Msg::Record(RecordHdr {
                tag,
                partition,
                seq,
                offset,
                len,
            })
        }
        K_ACK => {
            r.what = "ack";
            let tag = r.u64()?;
            let partition = r.u32()?;
            let seq = r.u64()?;
            let status = match r.u8()? {
                ACK_HELD => AckStatus::Held,
                ACK_PERSIST_FAILED => AckStatus::PersistFailed(r.string()?),
                ACK_REFUSED => AckStatus::Refused(r.string()?),
                v => return Err(r.bad(format!("ack status {v}"))),
            };
            Msg::Ack {
                tag,
                partition,
                seq,
                status,
            }
        }
        K_RELEASE => {
            r.what = "release";
            let partition = r.u32()?;
            Msg::Release {
                partition,
                through_seq: r.u64()?,
            }
        }
        K_PING => Msg::Ping { stamp: r.u64()? },
        K_PONG => Msg::Pong { stamp: r.u64()? },
        K_BYE => {
            r.what = "bye";
            Msg::Bye {
                reason: r.string()?,
            }
        }
        K_REQUEST | K_RESPONSE => {
            let (msg, start) = decode_data_header(payload)?;
            // Copies: only tests and tools decode data messages from a borrowed slice; the
            // transports use `decode_data` on an owned buffer.
            return Ok((
                with_payload(msg, Bytes::copy_from_slice(&payload[start..])),
                payload.len(),
            ));
        }
        k => return Err(FrameError::UnknownKind(k)),
    };
    Ok((msg, r.pos))
}

/// Parse the header of a request / response payload; returns the message (with an empty
/// payload) and where its payload starts. Checks that the declared length matches.
fn decode_data_header(payload: &[u8]) -> Result<(Msg, usize), FrameError> {
    let mut r = R {
        buf: payload,
        pos: 0,
        what: "request",
    };
    let msg = match r.u8()? {
        K_REQUEST => Msg::Request {
            id: r.u64()?,
            payload: Bytes::new(),
        },
        K_RESPONSE => {
            r.what = "response";
            let id = r.u64()?;
            Msg::Response {
                id,
                status: r.u8()?,
                payload: Bytes::new(),
            }
        }
        k => return Err(FrameError::UnknownKind(k)),
    };
    let len = r.u32()? as usize;
    if len > MAX_REQUEST_LEN as usize {
        return Err(FrameError::Oversized {
            len: len as u64,
            max: u64::from(MAX_REQUEST_LEN),
        });
    }
    if payload.len() - r.pos != len {
        return Err(r.bad(format!(
            "header says {len} payload bytes, the message carries {}",
            payload.len() - r.pos
        )));
    }
    Ok((msg, r.pos))
}

fn with_payload(msg: Msg, p: Bytes) -> Msg {
    match msg {
        Msg::Request { id, .. } => Msg::Request { id, payload: p },
        Msg::Response { id, status, .. } => Msg::Response {
            id,
            status,
            payload: p,
        },
        other => other,
    }
}

/// Decode a complete request / response payload without copying its data.
pub fn decode_data(payload: Bytes) -> Result<Msg, FrameError> {
    let (msg, start) = decode_data_header(&payload)?;
    Ok(with_payload(msg, payload.slice(start..)))
}

/// What an `Auth` or `Welcome` proof covers besides the transcript: the message's resync point
/// and region, as they are encoded on the wire.
pub fn proof_payload(resync: &ResyncPoint, region: &Option<RemoteRegion>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = W(&mut out);
    w.resync(resync);
    w.region(region);
    out
}

/// The part of a reject / bye reason that is kept: at most [`MAX_REASON_LEN`] bytes, cut at a
/// character boundary.
fn kept_reason(s: &str) -> &str {
    let mut end = s.len().min(MAX_REASON_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The message-level fields.
impl W<'_> {
    fn string(&mut self, s: &str) {
        let s = kept_reason(s);
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }
    fn hello(&mut self, h: &Hello) {
        self.u32(h.magic);
        self.u16(h.version);
        self.u64(h.cluster_id);
        self.u32(h.from_node);
        self.u32(h.to_node);
        self.bytes(&h.nonce);
        self.u64(h.info.first_len);
        self.u64(h.info.second_len);
        self.u64(h.info.layout_tag);
        self.u32(h.info.window);
        self.u32(h.info.max_record);
        self.u8(h.info.transport);
        self.u32(h.info.request_window);
        self.u32(h.info.max_request);
        self.u8(h.info.role);
    }
    fn seqs(&mut self, v: &[PartitionSeq]) {
        let n = v.len().min(MAX_RESYNC_ENTRIES);
        self.u16(n as u16);
        for p in &v[..n] {
            self.u32(p.partition);
            self.u64(p.seq);
        }
    }
    fn resync(&mut self, r: &ResyncPoint) {
        self.seqs(&r.first_store);
        self.seqs(&r.second_store);
    }
    fn region(&mut self, r: &Option<RemoteRegion>) {
        match r {
            None => self.u8(0),
            Some(r) => {
                self.u8(1);
                self.u64(r.addr);
                self.u32(r.rkey);
                self.u64(r.len);
            }
        }
    }
}

impl R<'_> {
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        if n > MAX_REASON_LEN {
            return Err(self.bad(format!("text of {n} bytes")));
        }
        let b = self.take(n)?;
        // Each invalid byte becomes a 3-byte U+FFFD: keep what the writer would, so a decoded
        // reason encodes back to itself.
        Ok(kept_reason(&String::from_utf8_lossy(b)).to_owned())
    }
    /// A hello. Of a hello with another magic or version only those two fields are read
    /// (the rest is zero): the handshake refuses it by them.
    fn hello(&mut self) -> Result<Hello, FrameError> {
        let magic = self.u32()?;
        let version = self.u16()?;
        if magic != MAGIC || version != PROTOCOL_VERSION {
            self.pos = self.buf.len();
            return Ok(Hello {
                magic,
                version,
                cluster_id: 0,
                from_node: 0,
                to_node: 0,
                nonce: [0; 32],
                info: NodeInfo::default(),
            });
        }
        Ok(Hello {
            magic,
            version,
            cluster_id: self.u64()?,
            from_node: self.u32()?,
            to_node: self.u32()?,
            nonce: self.arr32()?,
            info: NodeInfo {
                first_len: self.u64()?,
                second_len: self.u64()?,
                layout_tag: self.u64()?,
                window: self.u32()?,
                max_record: self.u32()?,
                transport: self.u8()?,
                request_window: self.u32()?,
                max_request: self.u32()?,
                role: self.u8()?,
            },
        })
    }
    fn seqs(&mut self) -> Result<Vec<PartitionSeq>, FrameError> {
        let n = self.u16()? as usize;
        if n > MAX_RESYNC_ENTRIES {
            return Err(self.bad(format!("{n} resync entries (max {MAX_RESYNC_ENTRIES})")));
        }
        // Bounded: n <= MAX_RESYNC_ENTRIES, and take() fails before reading past the buffer.
        let mut v = Vec::with_capacity(n.min((self.buf.len() - self.pos) / 12));
        for _ in 0..n {
            v.push(PartitionSeq {
                partition: self.u32()?,
                seq: self.u64()?,
            });
        }
        Ok(v)
    }
    fn resync(&mut self) -> Result<ResyncPoint, FrameError> {
        Ok(ResyncPoint {
            first_store: self.seqs()?,
            second_store: self.seqs()?,
        })
    }
    fn region(&mut self) -> Result<Option<RemoteRegion>, FrameError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(RemoteRegion {
                addr: self.u64()?,
                rkey: self.u32()?,
                len: self.u64()?,
            })),
            v => Err(self.bad(format!("region flag {v}"))),
        }
    }
}
