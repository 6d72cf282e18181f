//! Error types of the mirror link.
//!
//! Every error says what failed and, where there is one, what the operator can do about it.
//! [`LinkError`] is `Clone` so one link failure can be handed to every in-flight post.

use std::sync::Arc;

/// Why a handshake was refused. Both sides see the same kind of reason: the side that detects the
/// problem logs it and sends a `Reject` with the text, the other side gets [`HandshakeError::PeerRejected`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandshakeError {
    #[error("protocol version mismatch: we speak v{ours}, the peer speaks v{theirs}; run the same nvmirror release on both nodes")]
    Version { ours: u16, theirs: u16 },
    #[error(
        "the peer is not a mirror-link endpoint (bad magic {0:#010x}); check the address and port"
    )]
    BadMagic(u32),
    #[error("cluster id mismatch: ours is {ours:#x}, the peer's is {theirs:#x}; both nodes need the same cluster configuration")]
    Cluster { ours: u64, theirs: u64 },
    #[error("node id mismatch: expected to talk to node {expected}, the peer says it is node {got} (and expects us to be node {they_expect}, we are {we_are}); check the node ids in the cluster configuration")]
    Node {
        expected: u32,
        got: u32,
        they_expect: u32,
        we_are: u32,
    },
    #[error("authentication failed: node {peer} and this node do not hold the same cluster secret (HMAC mismatch); make the secret identical on both nodes")]
    Auth { peer: u32 },
    #[error("layout mismatch: {0}; both nodes need the same NVRAM layout")]
    Layout(String),
    #[error("role mismatch: this node is {ours} but the peer is {theirs}; {fix}")]
    Role {
        ours: &'static str,
        theirs: &'static str,
        fix: &'static str,
    },
    #[error("transport mismatch: we use {ours}, the peer uses {theirs}; configure the same mirror transport on both nodes")]
    Transport {
        ours: &'static str,
        theirs: &'static str,
    },
    #[error("frame authentication is {ours} on node {node} but {theirs} on node {peer}; set the same cluster.frame_mac on both nodes")]
    FrameMac {
        node: u32,
        ours: &'static str,
        peer: u32,
        theirs: &'static str,
    },
    #[error("an incoming connection did not authenticate within {0:?} of being accepted (a stranger, or a partner too slow to connect); dropped it")]
    AcceptTimeout(std::time::Duration),
    #[error("the peer rejected the handshake: {0}")]
    PeerRejected(String),
    #[error("unexpected message during the handshake: {0}")]
    Protocol(String),
    #[error("the handshake did not finish within {0:?}; is the peer an overloaded or stuck nvmirror node?")]
    Timeout(std::time::Duration),
}

/// Errors of the wire format (TCP frames and RDMA messages).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: u64, max: u64 },
    #[error("frame checksum mismatch (crc32c {got:#010x}, expected {expected:#010x})")]
    BadCrc { got: u32, expected: u32 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("record [{offset}, +{len}) does not fit in the {region_len}-byte second-store region")]
    OutOfRegion {
        offset: u64,
        len: u64,
        region_len: u64,
    },
    #[error("message {seq} of this connection failed its authentication (MAC mismatch): forged, altered, replayed or reordered traffic on the mirror network")]
    BadMac { seq: u64 },
    #[error("connection closed by the peer")]
    Closed,
    #[error("I/O error: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(Arc::new(e))
        }
    }
}

/// Errors reported by the link to its user.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("mirror link to node {peer} is down: {reason}")]
    Down { peer: u32, reason: String },
    #[error("invalid post: {0}")]
    InvalidPost(String),
    /// The request was refused before it was sent (payload too large, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Node `peer` received the request but could not serve it (no handler, handler panicked,
    /// answer too large). The link stays up.
    #[error("node {peer} could not serve the request: {reason}")]
    RequestFailed { peer: u32, reason: String },
    #[error("node {peer} could not make record (partition {partition}, seq {seq}) durable in its second store: {message}")]
    PersistFailed {
        peer: u32,
        partition: u32,
        seq: u64,
        message: String,
    },
    #[error("node {peer} refused to hold record (partition {partition}, seq {seq}): {reason}; the two nodes' NVRAM layouts (LUN size, ranges, partitions) must agree")]
    RecordRefused {
        peer: u32,
        partition: u32,
        seq: u64,
        reason: String,
    },
    #[error("handshake with node {peer} failed: {source}")]
    Handshake { peer: u32, source: HandshakeError },
    #[error("malformed traffic from node {peer}: {source}")]
    Frame { peer: u32, source: FrameError },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: Arc<std::io::Error>,
    },
    #[error("RDMA {op} failed: {detail}")]
    Rdma { op: &'static str, detail: String },
    #[error("invalid link configuration: {0}")]
    Config(String),
    #[error("the mirror link was shut down")]
    Closed,
}

impl LinkError {
    pub(crate) fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        LinkError::Io {
            what: what.into(),
            source: Arc::new(e),
        }
    }
}

pub type Result<T, E = LinkError> = std::result::Result<T, E>;
