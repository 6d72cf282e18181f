//! The seam for custom networks: a [`Network`] opens and accepts connections that carry whole
//! messages in order. [`crate::Link::start_over`] runs a real link — handshake, session,
//! heartbeats, timeouts, requests — over it; a deterministic simulator uses it to put several
//! nodes in one process on a network it controls (delays, partitions, resets).
//!
//! The messages are opaque to the network: each is one `proto` message as [`crate::proto::Msg::encode`]
//! writes it, a record message followed by the record's bytes. The link encodes what it sends
//! and, on the receiving side, checks each message against its limits and places a record's
//! bytes into its [`crate::SecondStore`] region itself. A network may look inside (e.g. with
//! [`crate::proto::decode_payload_prefix`]) to aim faults at certain messages.

use bytes::Bytes;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

/// The future of a network operation.
pub type NetFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A network the link can run over instead of TCP or RDMA. The addresses are those of the
/// link's [`crate::Role`].
pub trait Network: Send + Sync + 'static {
    /// Open a connection to the node listening at `addr`. The link bounds this by its
    /// handshake timeout and retries every `reconnect_delay` on failure.
    fn connect(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Connection>>;
    /// Start accepting connections at `addr`. On failure the link retries.
    fn listen(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Box<dyn Listener>>>;
}

/// Where a listening link takes its incoming connections from.
pub trait Listener: Send + 'static {
    /// The next incoming connection and the address it comes from. The link drops this future
    /// only when it stops listening.
    fn accept(&mut self) -> NetFuture<'_, io::Result<(Connection, SocketAddr)>>;
}

/// One connection: two directions, each reliable and in order (like a TCP stream or an RDMA
/// RC queue pair). Dropping the sender closes our direction: the peer's receiver returns the
/// messages already sent, then `Ok(None)`. The link drops both halves when the connection ends.
pub struct Connection {
    pub sender: Box<dyn MessageSender>,
    pub receiver: Box<dyn MessageReceiver>,
}

/// The sending half of a [`Connection`].
pub trait MessageSender: Send + 'static {
    /// Send one whole message. Ok means accepted for delivery, not delivered. An error ends the
    /// connection (the link reports it down and reconnects). A send that never completes is
    /// taken as a peer that stopped reading: the link goes down after its heartbeat timeout.
    fn send(&mut self, message: Bytes) -> NetFuture<'_, io::Result<()>>;
}

/// The receiving half of a [`Connection`].
pub trait MessageReceiver: Send + 'static {
    /// The next message, in the order they were sent; `Ok(None)` once the peer closed its
    /// direction; an error (e.g. a reset) ends the connection.
    fn recv(&mut self) -> NetFuture<'_, io::Result<Option<Bytes>>>;
}
