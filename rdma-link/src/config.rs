//! How a link is configured: which transport, who connects, the node ids and secret, and the
//! windows, limits and timers — with their defaults and the checks run at start.

use crate::error::{LinkError, Result};
use crate::proto::{
    DEFAULT_MAX_REQUEST, MAX_RECORD_LEN, MAX_REQUEST_LEN, TRANSPORT_RDMA, TRANSPORT_TCP,
};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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
            Transport::Tcp => TRANSPORT_TCP,
            Transport::Rdma => TRANSPORT_RDMA,
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

/// What a node is to its peer: one of a mirrored pair (claim set A), or in log shipping
/// (claim set C) a source whose records go to a destination that keeps them for N sources,
/// or in shared-nothing mode a data node asking a diskless tie-breaker for its vote (the
/// arbiter's slots kept by a majority of voters, issue #17). A link joins a pair node to a
/// pair node, a source to a destination, or a data node to a tie-breaker; the handshake
/// refuses any other combination, naming both roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeRole {
    #[default]
    Pair,
    Source,
    Destination,
    /// A data node's link to the tie-breaker: carries only vote requests, no records.
    TieBreakerClient,
    /// The tie-breaker's end: answers vote requests, keeps no records.
    TieBreaker,
    /// A data node's vote link to its partner (`[cluster.voters]`): each end asks the
    /// other's voter and answers its requests; no records. Apart from the mirror link so
    /// that a vote never waits behind mirrored data, and so that a node can vote before its
    /// engine (and with it the mirror link) is open.
    PairVoter,
}

impl NodeRole {
    pub(crate) fn code(self) -> u8 {
        match self {
            NodeRole::Pair => 0,
            NodeRole::Source => 1,
            NodeRole::Destination => 2,
            NodeRole::TieBreakerClient => 3,
            NodeRole::TieBreaker => 4,
            NodeRole::PairVoter => 5,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<NodeRole> {
        match code {
            0 => Some(NodeRole::Pair),
            1 => Some(NodeRole::Source),
            2 => Some(NodeRole::Destination),
            3 => Some(NodeRole::TieBreakerClient),
            4 => Some(NodeRole::TieBreaker),
            5 => Some(NodeRole::PairVoter),
            _ => None,
        }
    }

    /// The role a peer of this one must have.
    pub fn counterpart(self) -> NodeRole {
        match self {
            NodeRole::Pair => NodeRole::Pair,
            NodeRole::Source => NodeRole::Destination,
            NodeRole::Destination => NodeRole::Source,
            NodeRole::TieBreakerClient => NodeRole::TieBreaker,
            NodeRole::TieBreaker => NodeRole::TieBreakerClient,
            NodeRole::PairVoter => NodeRole::PairVoter,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeRole::Pair => "a node of a mirrored pair",
            NodeRole::Source => "a log-shipping source",
            NodeRole::Destination => "a log-shipping destination",
            NodeRole::TieBreakerClient => "a data node voting through a tie-breaker",
            NodeRole::TieBreaker => "a tie-breaker",
            NodeRole::PairVoter => "a data node's vote link to its partner",
        }
    }
}

/// Default of [`LinkConfig::busy_poll`], in microseconds: long enough to span the gap
/// between two writes at queue depth 1 (so the link thread never sleeps while a writer is
/// active), short enough that an idle link stops spinning at once.
pub const DEFAULT_BUSY_POLL_US: u64 = 1000;

/// Fewest CPUs on which a link busy-polls by default. A polling link thread keeps a core
/// busy that the queue threads, the flusher, the application (and, with Soft-RoCE, the
/// kernel's RDMA work) also need: on 2 vCPUs, turning it off doubled mirrored 4 KiB write
/// IOPS (docs/benchmarks.md), and two polling linktest processes starved rxe long enough to
/// miss heartbeats.
pub const BUSY_POLL_MIN_CPUS: usize = 4;

/// [`DEFAULT_BUSY_POLL_US`] with at least [`BUSY_POLL_MIN_CPUS`] CPUs, else 0: the busy-poll
/// window a link uses unless configured otherwise.
pub fn default_busy_poll_us() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= BUSY_POLL_MIN_CPUS {
        DEFAULT_BUSY_POLL_US
    } else {
        0
    }
}

/// Configuration of one link (one peer).
#[derive(Clone)]
pub struct LinkConfig {
    pub transport: Transport,
    pub role: Role,
    /// What this node is to the peer (default: a pair node).
    pub node_role: NodeRole,
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
    /// Listener: how long an incoming connection may take from being accepted until the
    /// connector has proven the secret. Until then it holds one of a few pending slots (at
    /// most 16, at most 4 per source address); a stranger that connects and says nothing is
    /// dropped after this. Short: the partner authenticates within a few round trips.
    pub accept_timeout: Duration,
    /// Listener: the IP address the partner connects from, if known (usually its cluster
    /// address). Its connections are never turned away because strangers hold the pending
    /// slots: a stranger's pending connection is dropped to make room. Without it, the address
    /// of the last authenticated connection is used the same way.
    pub peer_ip: Option<IpAddr>,
    /// Authenticate every message after the handshake with a MAC under a key of this
    /// connection (keyed BLAKE3 over a per-direction sequence number and the message, a
    /// record's bytes included), so that nobody on the network path can inject, alter, replay
    /// or reorder traffic — e.g. write the partner's second store. Both nodes must agree. On
    /// by default; off (the daemon's `cluster.frame_mac = false`) for a dedicated link or an
    /// isolated fabric, where TCP frames carry a crc32c instead.
    pub frame_mac: bool,
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
    /// while the link is busy. Zero: never poll, always sleep. Not used over a custom
    /// [`crate::Network`] (see [`crate::Link::start_over`]).
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
            node_role: NodeRole::Pair,
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
            accept_timeout: Duration::from_secs(1),
            peer_ip: None,
            frame_mac: true,
            reconnect_delay: Duration::from_millis(200),
            request_window: 32,
            max_request: DEFAULT_MAX_REQUEST,
            request_timeout: Duration::from_secs(30),
            busy_poll: Duration::from_micros(default_busy_poll_us()),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.max_record == 0 || self.max_record > MAX_RECORD_LEN {
            return bad(format!(
                "max_record {} out of range 1..={MAX_RECORD_LEN}",
                self.max_record
            ));
        }
        if self.request_window == 0 || self.request_window > 4096 {
            return bad(format!(
                "request window {} out of range 1..=4096",
                self.request_window
            ));
        }
        if self.max_request > MAX_REQUEST_LEN {
            return bad(format!(
                "max_request {} out of range 0..={MAX_REQUEST_LEN}",
                self.max_request
            ));
        }
        if self.accept_timeout.is_zero() || self.handshake_timeout.is_zero() {
            return bad(format!(
                "handshake timeout {:?} and accept timeout {:?} must not be zero",
                self.handshake_timeout, self.accept_timeout
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

    /// How often a connection checks its timers and sends heartbeats.
    pub(crate) fn tick_interval(&self) -> Duration {
        self.heartbeat_interval
            .min(self.heartbeat_timeout / 4)
            .max(Duration::from_millis(1))
    }
}
