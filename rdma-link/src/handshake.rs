//! Connection handshake: version, cluster, node ids, layout and mutual HMAC authentication.
//!
//! ```text
//! connector                                  acceptor
//!   Hello{version, cluster, ids, nonce_c, info}  ->
//!                                            checks version, cluster, ids, layout
//!   <-  Challenge{hello(nonce_s, info), mac_a = HMAC(secret, "acceptor"  | transcript)}
//!   checks the same, verifies mac_a (the acceptor knows the secret)
//!   Auth{mac_c = HMAC(secret, "connector" | transcript), resync, region}  ->
//!                                            verifies mac_c (the connector knows the secret)
//!   <-  Welcome{resync, region}                    (or Reject{reason} at any step, both ways)
//! ```
//! The transcript covers both nonces, both node ids, the cluster id and the version, so a MAC
//! cannot be replayed into another session. The secret never crosses the wire, and each side
//! sends its RDMA region coordinates only to a peer that has already proven the secret.
//!
//! Runs over any [`MsgIo`] (a TCP stream, the RDMA QP's SEND/RECV, a custom network's
//! connection) before the connection loop takes over.

use crate::error::{HandshakeError, LinkError, Result};
use crate::proto::{
    transport_name, Hello, Msg, NodeInfo, RemoteRegion, ResyncPoint, MAGIC, PROTOCOL_VERSION,
};
use crate::shared::Shared;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::future::Future;

/// A message pipe used for the handshake.
pub(crate) trait MsgIo: Send {
    fn send_msg(&mut self, m: &Msg) -> impl Future<Output = Result<()>> + Send;
    fn recv_msg(&mut self) -> impl Future<Output = Result<Msg>> + Send;
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub info: NodeInfo,
    pub resync: ResyncPoint,
    pub region: Option<RemoteRegion>,
}

pub(crate) const LABEL_ACCEPTOR: &[u8] = b"nvmirror-link acceptor";
pub(crate) const LABEL_CONNECTOR: &[u8] = b"nvmirror-link connector";

pub(crate) fn mac(
    secret: &[u8],
    label: &[u8],
    cluster: u64,
    connector: u32,
    acceptor: u32,
    nonce_c: &[u8; 32],
    nonce_a: &[u8; 32],
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for Hmac.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(label);
    m.update(&PROTOCOL_VERSION.to_le_bytes());
    m.update(&cluster.to_le_bytes());
    m.update(&connector.to_le_bytes());
    m.update(&acceptor.to_le_bytes());
    m.update(nonce_c);
    m.update(nonce_a);
    m
}

fn our_hello(shared: &Shared, nonce: [u8; 32]) -> Hello {
    let cfg = &shared.cfg;
    Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        cluster_id: cfg.cluster_id,
        from_node: cfg.node_id,
        to_node: cfg.peer_node_id,
        nonce,
        info: NodeInfo {
            first_len: shared.local.map_or(0, |r| r.len() as u64),
            second_len: shared.store.as_ref().map_or(0, |s| s.region().len() as u64),
            layout_tag: cfg.layout_tag,
            window: cfg.window,
            max_record: cfg.max_record,
            transport: cfg.transport.code(),
            request_window: cfg.request_window,
            max_request: cfg.max_request,
        },
    }
}

/// Check the peer's hello against our configuration.
fn check_hello(shared: &Shared, h: &Hello) -> Result<(), HandshakeError> {
    let cfg = &shared.cfg;
    if h.magic != MAGIC {
        return Err(HandshakeError::BadMagic(h.magic));
    }
    if h.version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: h.version,
        });
    }
    if h.cluster_id != cfg.cluster_id {
        return Err(HandshakeError::Cluster {
            ours: cfg.cluster_id,
            theirs: h.cluster_id,
        });
    }
    if h.from_node != cfg.peer_node_id || h.to_node != cfg.node_id {
        return Err(HandshakeError::Node {
            expected: cfg.peer_node_id,
            got: h.from_node,
            they_expect: h.to_node,
            we_are: cfg.node_id,
        });
    }
    if h.info.transport != cfg.transport.code() {
        return Err(HandshakeError::Transport {
            ours: cfg.transport.name(),
            theirs: transport_name(h.info.transport),
        });
    }
    if h.info.layout_tag != cfg.layout_tag {
        return Err(HandshakeError::Layout(format!(
            "layout tag {:#x} here, {:#x} on node {}",
            cfg.layout_tag, h.info.layout_tag, h.from_node
        )));
    }
    let my_first = shared.local.map_or(0, |r| r.len() as u64);
    if my_first > h.info.second_len {
        return Err(HandshakeError::Layout(format!(
            "our first store is {my_first} bytes but node {}'s second store is only {} bytes",
            h.from_node, h.info.second_len
        )));
    }
    let my_second = shared.store.as_ref().map_or(0, |s| s.region().len() as u64);
    if h.info.first_len > my_second {
        return Err(HandshakeError::Layout(format!(
            "node {}'s first store is {} bytes but our second store is only {my_second} bytes",
            h.from_node, h.info.first_len
        )));
    }
    if h.info.request_window == 0 {
        return Err(HandshakeError::Protocol(
            "peer announced a request window of 0".into(),
        ));
    }
    if h.info.window == 0 || h.info.max_record == 0 {
        return Err(HandshakeError::Protocol(format!(
            "peer announced window {} and max record {}",
            h.info.window, h.info.max_record
        )));
    }
    Ok(())
}

fn fail(shared: &Shared, e: HandshakeError) -> LinkError {
    LinkError::Handshake {
        peer: shared.cfg.peer_node_id,
        source: e,
    }
}

/// Tell the peer why we refuse (best effort) and return our error.
async fn reject<I: MsgIo>(io: &mut I, shared: &Shared, e: HandshakeError) -> LinkError {
    tracing::warn!(peer = shared.cfg.peer_node_id, error = %e, "rejecting mirror-link handshake");
    let _ = io
        .send_msg(&Msg::Reject {
            reason: e.to_string(),
        })
        .await;
    fail(shared, e)
}

fn unexpected(shared: &Shared, m: Msg, wanted: &str) -> LinkError {
    match m {
        Msg::Reject { reason } => fail(shared, HandshakeError::PeerRejected(reason)),
        m => fail(
            shared,
            HandshakeError::Protocol(format!("got {} while waiting for {wanted}", m.name())),
        ),
    }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

pub(crate) async fn connector<I: MsgIo>(
    io: &mut I,
    shared: &Shared,
    region: Option<RemoteRegion>,
) -> Result<PeerInfo> {
    let cfg = &shared.cfg;
    let nonce_c = nonce();
    io.send_msg(&Msg::Hello(our_hello(shared, nonce_c))).await?;
    let (hello, mac_a) = match io.recv_msg().await? {
        Msg::Challenge { hello, mac } => (hello, mac),
        m => return Err(unexpected(shared, m, "challenge")),
    };
    if let Err(e) = check_hello(shared, &hello) {
        return Err(reject(io, shared, e).await);
    }
    let m = mac(
        &cfg.secret,
        LABEL_ACCEPTOR,
        cfg.cluster_id,
        cfg.node_id,
        cfg.peer_node_id,
        &nonce_c,
        &hello.nonce,
    );
    if m.verify_slice(&mac_a).is_err() {
        return Err(reject(
            io,
            shared,
            HandshakeError::Auth {
                peer: cfg.peer_node_id,
            },
        )
        .await);
    }
    let mac_c = mac(
        &cfg.secret,
        LABEL_CONNECTOR,
        cfg.cluster_id,
        cfg.node_id,
        cfg.peer_node_id,
        &nonce_c,
        &hello.nonce,
    )
    .finalize()
    .into_bytes();
    let resync = shared
        .store
        .as_ref()
        .map(|s| s.resync_point())
        .unwrap_or_default();
    io.send_msg(&Msg::Auth {
        mac: mac_c.into(),
        resync,
        region,
    })
    .await?;
    match io.recv_msg().await? {
        Msg::Welcome { resync, region } => Ok(PeerInfo {
            info: hello.info,
            resync,
            region,
        }),
        m => Err(unexpected(shared, m, "welcome")),
    }
}

pub(crate) async fn acceptor<I: MsgIo>(
    io: &mut I,
    shared: &Shared,
    region: Option<RemoteRegion>,
) -> Result<PeerInfo> {
    let cfg = &shared.cfg;
    let hello = match io.recv_msg().await? {
        Msg::Hello(h) => h,
        m => return Err(unexpected(shared, m, "hello")),
    };
    if let Err(e) = check_hello(shared, &hello) {
        return Err(reject(io, shared, e).await);
    }
    let nonce_a = nonce();
    let mac_a = mac(
        &cfg.secret,
        LABEL_ACCEPTOR,
        cfg.cluster_id,
        cfg.peer_node_id,
        cfg.node_id,
        &hello.nonce,
        &nonce_a,
    )
    .finalize()
    .into_bytes();
    io.send_msg(&Msg::Challenge {
        hello: our_hello(shared, nonce_a),
        mac: mac_a.into(),
    })
    .await?;
    let (mac_c, resync_c, region_c) = match io.recv_msg().await? {
        Msg::Auth {
            mac,
            resync,
            region,
        } => (mac, resync, region),
        m => return Err(unexpected(shared, m, "auth")),
    };
    let m = mac(
        &cfg.secret,
        LABEL_CONNECTOR,
        cfg.cluster_id,
        cfg.peer_node_id,
        cfg.node_id,
        &hello.nonce,
        &nonce_a,
    );
    if m.verify_slice(&mac_c).is_err() {
        return Err(reject(
            io,
            shared,
            HandshakeError::Auth {
                peer: cfg.peer_node_id,
            },
        )
        .await);
    }
    let resync = shared
        .store
        .as_ref()
        .map(|s| s.resync_point())
        .unwrap_or_default();
    io.send_msg(&Msg::Welcome { resync, region }).await?;
    Ok(PeerInfo {
        info: hello.info,
        resync: resync_c,
        region: region_c,
    })
}
