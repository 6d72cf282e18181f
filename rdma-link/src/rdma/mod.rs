//! The RDMA transport: one RC queue pair per peer, set up with librdmacm.
//!
//! * Control messages (handshake, acks, heartbeats, releases) are SENDs of the `proto` payload
//!   into pre-posted receive slots.
//! * A record is an unsignaled RDMA WRITE from the local first-store MR straight into the peer's
//!   second-store MR, chained with a signaled SEND of the record header. RC ordering guarantees
//!   the peer sees the SEND only after the written bytes are placed; it persists the range and
//!   SENDs an `Ack`. No copy on either side.
//! * Requests and responses (the link's RPC) are cut into chunks of up to one slot and SENT
//!   into the same pre-posted receive slots; the receiver reassembles them by (direction, id).
//!   At most `DATA_SLOTS` chunks are in flight, in send slots of their own, so a burst of large
//!   requests never holds back records, acks or heartbeats.
//! * The second store's address and rkey travel in the `Auth` / `Welcome` messages, i.e. only to
//!   a peer that already proved it knows the cluster secret.
//! * Completions are driven from tokio: the completion channel's fd is non-blocking and
//!   registered with `AsyncFd` (see README for the measurement behind this choice).
//!
//! * Nothing a stranger could use exists before the handshake: the regions are registered, and
//!   request chunks accepted, only once the peer has proven the secret. After the handshake every
//!   SEND ends in a MAC (a record's covers the bytes its WRITE placed).
//!
//! Modules, bottom up: `verbs` (all unsafe verbs / rdma_cm calls), `cm` (waiting for events),
//! `chunk` (reassembly), `inbound` (checking and decoding what arrives), `conn` (one connection:
//! slots, completions, sends); this file opens and accepts connections (the [`Carrier`]) and
//! probes the devices.

// Crate-visible for the fuzz target of the reassembly (`crate::fuzzing`).
pub(crate) mod chunk;
mod cm;
mod conn;
mod inbound;
mod verbs;

use crate::error::Result;
use crate::handshake::PeerInfo;
use crate::shared::Shared;
use crate::wire::Carrier;
use cm::{cm_afd, expect_event, next_event, verr};
use conn::RdmaConn;
use rdma_sys::rdma_cm_event_type as ev;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use verbs::{ChannelFd, CmId, EventChannel, CAP_FLUSH_GLOBAL, CAP_FLUSH_PERSISTENT};

/// What the RDMA devices of this machine can do.
#[derive(Debug, Clone)]
pub struct RdmaCapabilities {
    /// (device name, supports RDMA FLUSH to global visibility, to persistence)
    pub devices: Vec<(String, bool, bool)>,
    /// Whether this build's rdma-core headers have the `IBV_WR_FLUSH` verb (rdma-core 45+).
    pub userspace_flush_verb: bool,
}

/// Probe the RDMA devices (never fails: no device means an empty list).
pub fn rdma_capabilities() -> RdmaCapabilities {
    let devices = verbs::list_devices()
        .into_iter()
        .map(|(n, caps)| {
            let c = caps.unwrap_or(0);
            (n, c & CAP_FLUSH_GLOBAL != 0, c & CAP_FLUSH_PERSISTENT != 0)
        })
        .collect();
    // rdma-core 44 (Debian 12) has no IBV_WR_FLUSH; rdma-sys is generated from those headers.
    RdmaCapabilities {
        devices,
        userspace_flush_verb: false,
    }
}

pub(crate) struct RdmaCarrier;

/// A listening cm_id and its event channel (the id must outlive nothing but the loop).
pub(crate) struct RdmaListener {
    ch: Arc<EventChannel>,
    afd: AsyncFd<ChannelFd>,
    _id: CmId,
}

impl Carrier for RdmaCarrier {
    type Conn = RdmaConn;
    type Wire = RdmaConn;
    type Listener = RdmaListener;
    type Pending = CmId;
    const NAME: &'static str = "rdma";

    async fn connect(&self, shared: &Arc<Shared>, addr: SocketAddr) -> Result<RdmaConn> {
        let ch = EventChannel::new().map_err(|e| verr(shared, e))?;
        let afd = cm_afd(shared, &ch)?;
        let id = Arc::new(CmId::new(ch.clone()).map_err(|e| verr(shared, e))?);
        id.resolve_addr(addr, 2000).map_err(|e| verr(shared, e))?;
        expect_event(
            shared,
            &ch,
            &afd,
            ev::RDMA_CM_EVENT_ADDR_RESOLVED,
            &format!("resolving {addr}"),
        )
        .await?;
        id.resolve_route(2000).map_err(|e| verr(shared, e))?;
        expect_event(
            shared,
            &ch,
            &afd,
            ev::RDMA_CM_EVENT_ROUTE_RESOLVED,
            &format!("resolving the route to {addr}"),
        )
        .await?;
        let conn = RdmaConn::setup(shared, id, afd)?;
        conn.qp.id().connect().map_err(|e| verr(shared, e))?;
        expect_event(
            shared,
            &ch,
            &conn.cm_fd,
            ev::RDMA_CM_EVENT_ESTABLISHED,
            &format!("connecting to {addr}"),
        )
        .await?;
        Ok(conn)
    }

    async fn listen(&self, shared: &Arc<Shared>, addr: SocketAddr) -> Result<RdmaListener> {
        let listen = || -> Result<RdmaListener> {
            let ch = EventChannel::new().map_err(|e| verr(shared, e))?;
            let afd = cm_afd(shared, &ch)?;
            let id = CmId::new(ch.clone()).map_err(|e| verr(shared, e))?;
            id.bind(addr).map_err(|e| verr(shared, e))?;
            id.listen(16).map_err(|e| verr(shared, e))?;
            Ok(RdmaListener { ch, afd, _id: id })
        };
        listen().map_err(|e| {
            shared.down_err(format!(
                "cannot listen on {addr} for the RDMA mirror link (is an RDMA device bound to that address?): {e}"
            ))
        })
    }

    async fn accept(
        &self,
        shared: &Arc<Shared>,
        l: &mut RdmaListener,
    ) -> Result<Option<(CmId, Option<SocketAddr>)>> {
        let e = next_event(&l.ch, &l.afd)
            .await
            .map_err(|e| shared.down_err(format!("rdma_cm listener failed: {e}")))?;
        if e.kind() != ev::RDMA_CM_EVENT_CONNECT_REQUEST {
            tracing::debug!(event = %e.name(), "rdma_cm event on the listener");
            return Ok(None);
        }
        let raw = e.id();
        drop(e); // acknowledge before migrating the new id
        let setup = EventChannel::new().and_then(|ch2| {
            // SAFETY: raw is the new id of the CONNECT_REQUEST we just received; nobody else owns it.
            unsafe { CmId::from_request(raw, ch2) }
        });
        match setup {
            Ok(id) => {
                let from = id.peer_addr();
                Ok(Some((id, from)))
            }
            Err(e) => {
                // One bad request does not stop the listener.
                tracing::warn!(error = %e, "cannot take an RDMA connection request");
                Ok(None)
            }
        }
    }

    fn refuse(&self, id: CmId) {
        id.reject();
    }

    async fn establish(&self, shared: &Arc<Shared>, id: CmId) -> Result<RdmaConn> {
        let ch = id.channel().clone();
        let afd = cm_afd(shared, &ch)?;
        let id = Arc::new(id);
        let conn = match RdmaConn::setup(shared, id.clone(), afd) {
            Ok(c) => c,
            Err(e) => {
                id.reject();
                return Err(e);
            }
        };
        conn.qp.id().accept().map_err(|e| verr(shared, e))?;
        expect_event(
            shared,
            &ch,
            &conn.cm_fd,
            ev::RDMA_CM_EVENT_ESTABLISHED,
            "accepting a connection",
        )
        .await?;
        Ok(conn)
    }

    fn describe(&self, conn: &RdmaConn) -> String {
        format!("device {}", conn.qp.id().device_name())
    }

    fn established(&self, _shared: &Arc<Shared>, mut conn: RdmaConn, peer: &PeerInfo) -> RdmaConn {
        conn.start(peer.region, peer.keys.as_ref());
        conn
    }
}
