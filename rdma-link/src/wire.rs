//! What a transport provides to the generic connection loop (`driver`): a [`Carrier`] opens
//! and accepts connections and hands an authenticated one over as a [`Wire`], which moves the
//! session's messages and record bytes. Everything else — handshake, timeouts, states,
//! heartbeats, posts, requests — is the same for every transport and lives in `driver` and
//! `session`.
//!
//! Implemented by `tcp` (TCP sockets), `custom` (a user-supplied [`crate::Network`]) and
//! `rdma` (an RC queue pair).

use crate::error::Result;
use crate::handshake::{MsgIo, PeerInfo};
use crate::session::Session;
use crate::shared::Shared;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Opens connections for one transport.
pub(crate) trait Carrier: Send + Sync + 'static {
    /// A connection during the handshake.
    type Conn: MsgIo + 'static;
    /// A connection after the handshake.
    type Wire: Wire;
    type Listener: Send + 'static;
    /// An incoming connection taken from the listener, set up in a task of its own.
    type Pending: Send + 'static;

    /// For logs: "tcp", "rdma", ...
    const NAME: &'static str;

    /// Open a connection to `addr`, ready for the handshake. Bounds its own waiting where the
    /// transport has a natural bound (the driver bounds connect and handshake together).
    fn connect(
        &self,
        shared: &Arc<Shared>,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Conn>> + Send;

    fn listen(
        &self,
        shared: &Arc<Shared>,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Listener>> + Send;

    /// The next incoming connection and where it comes from (if known); `None` for an event
    /// that is not a connection. Cancel-safe.
    #[allow(clippy::type_complexity)]
    fn accept(
        &self,
        shared: &Arc<Shared>,
        listener: &mut Self::Listener,
    ) -> impl Future<Output = Result<Option<(Self::Pending, Option<SocketAddr>)>>> + Send;

    /// Turn away an incoming connection (too many pending).
    fn refuse(&self, pending: Self::Pending);

    /// Set up an accepted connection for the handshake.
    fn establish(
        &self,
        shared: &Arc<Shared>,
        pending: Self::Pending,
    ) -> impl Future<Output = Result<Self::Conn>> + Send;

    /// For logs: what carries this connection (peer address, RDMA device).
    fn describe(&self, conn: &Self::Conn) -> String;

    /// The handshake succeeded: the connection becomes the connection loop's wire; from its
    /// first message on, it authenticates every message with `peer.keys` (if any).
    fn established(&self, shared: &Arc<Shared>, conn: Self::Conn, peer: &PeerInfo) -> Self::Wire;
}

/// An authenticated connection, driven by the connection loop. The loop runs, each turn:
/// `send`, then (when a busy-poll window just ran out) `cooled`, then waits for the first of:
/// stop, shutdown (`goodbye`), `receive`, a command, a tick, a handler's answer, more to send
/// (`more_to_send`), or — while busy polling — a yield followed by `poll`. When it ends,
/// `close` releases the transport before anything pending is failed.
pub(crate) trait Wire: Send + 'static {
    /// Whether `receive` is waited for while busy polling (else `poll` does the receiving).
    const RECEIVE_WHILE_HOT: bool;

    /// Bytes of the peer's second store that our posts may target.
    fn peer_store_len(&self, peer: &PeerInfo) -> u64 {
        peer.info.second_len
    }

    /// Send what the session queued, as far as the transport takes it now.
    fn send(&mut self, session: &mut Session) -> impl Future<Output = Result<()>> + Send;

    /// `send` left something it could send at once (the loop comes back without waiting).
    fn more_to_send(&self, _session: &Session) -> bool {
        false
    }

    /// Wait until something arrived and hand it to the session. Cancel-safe.
    fn receive(&mut self, session: &mut Session) -> impl Future<Output = Result<()>> + Send;

    /// Busy polling: look for arrivals without waiting; returns how many events were handled.
    fn poll(&mut self, _session: &mut Session) -> Result<usize> {
        Ok(0)
    }

    /// The busy-poll window ran out: prepare to sleep in `receive`; returns how many events
    /// were handled meanwhile (then the loop goes round again instead of sleeping).
    fn cooled(&mut self, _session: &mut Session) -> Result<usize> {
        Ok(0)
    }

    /// The link shuts down: send the queued goodbye, within a short bound.
    fn goodbye(&mut self, session: &mut Session) -> impl Future<Output = ()> + Send;

    /// Close the connection. When this returns the transport no longer reads from or writes
    /// into the regions.
    fn close(self) -> impl Future<Output = ()> + Send;
}
