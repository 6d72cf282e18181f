//! Connection handshake: version, cluster, node ids, layout and mutual HMAC authentication,
//! then the session keys that authenticate every later message.
//!
//! ```text
//! connector                                  acceptor
//!   Hello{version, cluster, ids, nonce_c, info}  ->
//!                                            checks version, cluster, ids, layout
//!   <-  Challenge{hello(nonce_s, info), mac_a = HMAC(secret, "acceptor"  | transcript), flags}
//!   checks the same, verifies mac_a (the acceptor knows the secret)
//!   Auth{mac_c = HMAC(secret, "connector" | transcript | resync, region), resync, region}  ->
//!                                            verifies mac_c (the connector knows the secret)
//!   <-  Welcome{mac_w = HMAC(secret, "welcome" | transcript | resync, region), resync, region}
//!   verifies mac_w                                 (or Reject{reason} at any step, both ways)
//!   -- from here on every message of both sides carries a MAC under the session keys --
//! ```
//! The handshake's own messages go without frame MACs (each proves itself), so a refusal at
//! any step reaches the other side as a plain `Reject` it can read. The session keys are
//! derived from the same transcript, one per direction, and handed to the transport with the
//! [`PeerInfo`]; the first message after `Welcome` in either direction is the first with a MAC.
//! The transcript (see [`crate::proto::Transcript`]) covers both nonces, both node ids, the
//! cluster id, the version, both hellos' facts and the acceptor's flags, so a MAC cannot be
//! replayed into another session and nothing either side announced can be changed on the way.
//! The secret never crosses the wire. Each side sets up what only the peer may use — on RDMA
//! its second store, registered for remote writes — and sends its coordinates only once the
//! peer has proven the secret (`MsgIo::authenticated`).
//!
//! Runs over any [`MsgIo`] (a TCP stream, the RDMA QP's SEND/RECV, a custom network's
//! connection) before the connection loop takes over.

use crate::config::NodeRole;
use crate::error::{HandshakeError, LinkError, Result};
use crate::proto::{
    proof_payload, transport_name, Hello, Msg, NodeInfo, Proof, RemoteRegion, ResyncPoint,
    SessionKeys, Side, Transcript, FLAG_FRAME_MAC, MAGIC, PROTOCOL_VERSION,
};
use crate::shared::Shared;
use rand::RngCore;
use std::future::Future;
use tokio::time::Instant;

/// A message pipe used for the handshake.
pub(crate) trait MsgIo: Send {
    fn send_msg(&mut self, m: &Msg) -> impl Future<Output = Result<()>> + Send;
    fn recv_msg(&mut self) -> impl Future<Output = Result<Msg>> + Send;
    /// The peer has proven the secret: set up what only it may use (RDMA: register our second
    /// store for its remote writes) and return the coordinates to send it.
    fn authenticated(&mut self) -> Result<Option<RemoteRegion>>;
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub info: NodeInfo,
    pub resync: ResyncPoint,
    pub region: Option<RemoteRegion>,
    /// The frame keys of this connection (None: frame MACs are off on both nodes).
    pub keys: Option<SessionKeys>,
}

fn our_flags(shared: &Shared) -> u8 {
    if shared.cfg.frame_mac {
        FLAG_FRAME_MAC
    } else {
        0
    }
}

fn on_off(flags: u8) -> &'static str {
    if flags & FLAG_FRAME_MAC != 0 {
        "on"
    } else {
        "off"
    }
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
            role: cfg.node_role.code(),
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
    let theirs = NodeRole::from_code(h.info.role);
    if theirs != Some(cfg.node_role.counterpart()) {
        return Err(HandshakeError::Role {
            ours: cfg.node_role.name(),
            theirs: theirs.map_or("of a role this version does not know", |r| r.name()),
            fix: match cfg.node_role {
                NodeRole::Pair => "a pair node links only to its partner; check the address it connects to or listens on",
                NodeRole::Source => "a source links only to its destination; check [shipping] destination",
                NodeRole::Destination => "a destination links only to sources; check the source's [shipping] destination and this listen address",
                NodeRole::TieBreakerClient => "a data node's tie-breaker link goes only to nvmirror-tiebreaker; check the tie-breaker's address",
                NodeRole::TieBreaker => "a tie-breaker answers only data nodes' vote links; check that no mirror link or shipping source points at this address",
                NodeRole::PairVoter => "the pair's vote link goes only to the partner's vote port; check cluster.voters.port (it must differ from the mirror link's)",
            },
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
    if h.info.layout_tag != cfg.layout_tag && cfg.node_role != NodeRole::Pair {
        return Err(HandshakeError::Layout(format!(
            "the source's NVRAM log geometry (layout tag {:#x}) is not that of its area on the destination ({:#x}); give the destination's [[shipping.source]] nvram_size the source's nvram.size, with the same nvram.partitions on both (each side logs its geometry at start: \"shipping layout\" / \"listening for the source\")",
            if cfg.node_role == NodeRole::Source { cfg.layout_tag } else { h.info.layout_tag },
            if cfg.node_role == NodeRole::Source { h.info.layout_tag } else { cfg.layout_tag },
        )));
    }
    if h.info.layout_tag != cfg.layout_tag {
        return Err(HandshakeError::Layout(format!(
            "node {} has layout tag {:#x}, node {} has layout tag {:#x}",
            cfg.node_id, cfg.layout_tag, h.from_node, h.info.layout_tag
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
    // At debug: the caller's loop logs the returned error (the connector once per outage and
    // kind, the acceptor per refused connection), so a retried mismatch does not flood the log.
    tracing::debug!(peer = shared.cfg.peer_node_id, error = %e, "rejecting mirror-link handshake");
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

/// Both nodes' hellos and the acceptor's flags, as the proofs and keys see them.
fn transcript(hello_c: &Hello, hello_a: &Hello, flags_a: u8) -> Transcript {
    Transcript {
        cluster_id: hello_c.cluster_id,
        connector: hello_c.from_node,
        acceptor: hello_a.from_node,
        nonce_c: hello_c.nonce,
        nonce_a: hello_a.nonce,
        info_c: hello_c.info,
        info_a: hello_a.info,
        flags_a,
    }
}

pub(crate) async fn connector<I: MsgIo>(io: &mut I, shared: &Shared) -> Result<PeerInfo> {
    let cfg = &shared.cfg;
    let ours = our_hello(shared, nonce());
    io.send_msg(&Msg::Hello(ours.clone())).await?;
    let (hello, mac_a, flags) = match io.recv_msg().await? {
        Msg::Challenge { hello, mac, flags } => (hello, mac, flags),
        m => return Err(unexpected(shared, m, "challenge")),
    };
    if let Err(e) = check_hello(shared, &hello) {
        return Err(reject(io, shared, e).await);
    }
    let t = transcript(&ours, &hello, flags);
    if !t.verify(&cfg.secret, Proof::Challenge, &[], &mac_a) {
        let e = HandshakeError::Auth {
            peer: cfg.peer_node_id,
        };
        return Err(reject(io, shared, e).await);
    }
    if flags != our_flags(shared) {
        let e = HandshakeError::FrameMac {
            node: cfg.node_id,
            ours: on_off(our_flags(shared)),
            peer: cfg.peer_node_id,
            theirs: on_off(flags),
        };
        return Err(reject(io, shared, e).await);
    }
    // The acceptor has proven the secret.
    let region = io.authenticated()?;
    let resync = shared
        .store
        .as_ref()
        .map(|s| s.resync_point())
        .unwrap_or_default();
    let mac = t.proof(&cfg.secret, Proof::Auth, &proof_payload(&resync, &region));
    io.send_msg(&Msg::Auth {
        mac,
        resync,
        region,
    })
    .await?;
    let (mac_w, resync, region) = match io.recv_msg().await? {
        Msg::Welcome {
            mac,
            resync,
            region,
        } => (mac, resync, region),
        m => return Err(unexpected(shared, m, "welcome")),
    };
    if !t.verify(
        &cfg.secret,
        Proof::Welcome,
        &proof_payload(&resync, &region),
        &mac_w,
    ) {
        let e = HandshakeError::Auth {
            peer: cfg.peer_node_id,
        };
        return Err(reject(io, shared, e).await);
    }
    Ok(PeerInfo {
        info: hello.info,
        resync,
        region,
        keys: cfg.frame_mac.then(|| t.keys(&cfg.secret, Side::Connector)),
    })
}

/// `unauthenticated_until`: the connector must have proven the secret by then (a stranger
/// holds an accept slot no longer). `hello_ok` is called once its hello passed the checks.
pub(crate) async fn acceptor<I: MsgIo>(
    io: &mut I,
    shared: &Shared,
    unauthenticated_until: Instant,
    hello_ok: &(dyn Fn() + Sync),
) -> Result<PeerInfo> {
    let cfg = &shared.cfg;
    let late = || fail(shared, HandshakeError::AcceptTimeout(cfg.accept_timeout));
    let hello = match tokio::time::timeout_at(unauthenticated_until, io.recv_msg())
        .await
        .map_err(|_| late())??
    {
        Msg::Hello(h) => h,
        m => return Err(unexpected(shared, m, "hello")),
    };
    if let Err(e) = check_hello(shared, &hello) {
        return Err(reject(io, shared, e).await);
    }
    hello_ok();
    let ours = our_hello(shared, nonce());
    let flags = our_flags(shared);
    let t = transcript(&hello, &ours, flags);
    io.send_msg(&Msg::Challenge {
        hello: ours,
        mac: t.proof(&cfg.secret, Proof::Challenge, &[]),
        flags,
    })
    .await?;
    let (mac_c, resync_c, region_c) =
        match tokio::time::timeout_at(unauthenticated_until, io.recv_msg())
            .await
            .map_err(|_| late())??
        {
            Msg::Auth {
                mac,
                resync,
                region,
            } => (mac, resync, region),
            m => return Err(unexpected(shared, m, "auth")),
        };
    if !t.verify(
        &cfg.secret,
        Proof::Auth,
        &proof_payload(&resync_c, &region_c),
        &mac_c,
    ) {
        let e = HandshakeError::Auth {
            peer: cfg.peer_node_id,
        };
        return Err(reject(io, shared, e).await);
    }
    // The connector has proven the secret.
    let region = io.authenticated()?;
    let resync = shared
        .store
        .as_ref()
        .map(|s| s.resync_point())
        .unwrap_or_default();
    let mac = t.proof(
        &cfg.secret,
        Proof::Welcome,
        &proof_payload(&resync, &region),
    );
    io.send_msg(&Msg::Welcome {
        mac,
        resync,
        region,
    })
    .await?;
    Ok(PeerInfo {
        info: hello.info,
        resync: resync_c,
        region: region_c,
        keys: cfg.frame_mac.then(|| t.keys(&cfg.secret, Side::Acceptor)),
    })
}
