//! The mirror link of a cluster node: its configuration from the node's config, the
//! transport it names (TCP or RDMA), and the wiring into the engine: the engine mirrors
//! through it, forwards I/O for other nodes' ranges over it, asks the partner over it to
//! write for us when our medium path fails, serves the partner's requests, and a
//! [`PartnerWatch`] follows its state.

use super::partner_watch::PartnerWatch;
use super::ship_faults::ShipFaults;
use crate::cluster::{wire, ForwardFuture, RequestForwarder};
use crate::config::{ClusterSection, NodeConfig, ShippingSection, TakeoverPolicy, TransportKind};
use crate::engine::Engine;
use crate::host::TaskHandle;
use anyhow::Context;
use rdma_link::{Link, LinkConfig, RequestHandler};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::read_secret;

/// The link configuration `c` describes for this node (reads the cluster secret).
pub fn link_config(cfg: &NodeConfig, c: &ClusterSection) -> anyhow::Result<LinkConfig> {
    let secret = read_secret("cluster.secret_file", &c.secret_file)?;
    let me = cfg
        .cluster_index()
        .context("node.name is not in [[cluster.node]]")?;
    // The first node listens, the others connect to it (a pair: one link).
    let peer = if me == 0 { 1 } else { 0 };
    let first: std::net::SocketAddr = c.nodes[0]
        .address
        .parse()
        .context("cluster.node[0].address")?;
    let role = if me == 0 {
        rdma_link::Role::Listen(first)
    } else {
        rdma_link::Role::Connect(first)
    };
    let transport = match c.transport {
        TransportKind::Tcp => rdma_link::Transport::Tcp,
        TransportKind::Rdma => rdma_link::Transport::Rdma,
    };
    let mut lc = LinkConfig::new(transport, role, c.id, me + 1, peer + 1, &secret);
    lc.heartbeat_interval = Duration::from_millis(c.heartbeat_interval_ms);
    lc.heartbeat_timeout = Duration::from_millis(c.heartbeat_timeout_ms);
    lc.busy_poll = Duration::from_micros(c.busy_poll_us);
    lc.frame_mac = c.frame_mac;
    Ok(lc)
}

/// The handler of the partner's requests: I/O to ranges we own, and its requests of us.
pub fn request_handler(engine: &Arc<Engine>) -> Arc<dyn RequestHandler> {
    let served = engine.clone();
    Arc::new(move |req: rdma_link::Bytes| {
        let engine = served.clone();
        async move { rdma_link::Bytes::from(engine.serve_forwarded(&req).await) }
    })
}

/// Starts the mirror link `c` describes and wires it into `engine` (see [`attach_link`]).
pub fn start_link(
    cfg: &NodeConfig,
    c: &ClusterSection,
    engine: &Arc<Engine>,
) -> anyhow::Result<(Link, TaskHandle)> {
    let mut lc = link_config(cfg, c)?;
    let (layout_tag, layout) = engine.mirror_layout();
    lc.layout_tag = layout_tag;
    tracing::info!(layout_tag = %format!("{layout_tag:016x}"), "mirror layout: {layout}");
    let store: Arc<dyn rdma_link::SecondStore> = engine
        .second_store()
        .context("the NVRAM has no second store (format it for a cluster)")?;
    let link = Link::start_with_handler(
        lc,
        Some(engine.local_region()),
        Some(store),
        request_handler(engine),
    )
    .map_err(|e| anyhow::anyhow!("starting the mirror link: {e}"))?;
    let grace = Duration::from_millis(c.heartbeat_timeout_ms);
    let watcher =
        attach_link(engine, &link, c.takeover, grace).context("spawning the partner watcher")?;
    Ok((link, watcher))
}

/// Wires a started link into the engine: every new write is mirrored through it, I/O to the
/// partner's ranges is forwarded over it, the flusher may ask the partner over it to write
/// for us, and a [`PartnerWatch`] (a host task) follows its state, taking over with
/// `takeover = "auto"` when the partner dies after `grace`.
pub fn attach_link(
    engine: &Arc<Engine>,
    link: &Link,
    policy: TakeoverPolicy,
    grace: Duration,
) -> std::io::Result<TaskHandle> {
    engine.attach_mirror(Arc::new(link.clone()));
    let partner = engine.cluster().map(|c| c.partner()).unwrap_or(0);
    if let Some(c) = engine.cluster() {
        // I/O for the partner's ranges goes to it as requests over the link.
        let to_partner = link.clone();
        c.set_forwarder(Some(Arc::new(RequestForwarder(
            move |req: Vec<u8>| -> ForwardFuture<Vec<u8>> {
                let link = to_partner.clone();
                Box::pin(async move {
                    link.request(req)
                        .await
                        .map(|a| a.to_vec())
                        .map_err(|e| e.to_string())
                })
            },
        ))));
    }
    // When our path to the medium fails, the partner writes our mirrored records.
    let delegate_link = link.clone();
    engine.set_flush_delegate(Some(Arc::new(
        move |partition: u32, first: u64, last: u64, count: usize| {
            let req = wire::encode(
                wire::OP_WRITE_FOR_PARTNER,
                partition,
                first,
                count as u32,
                &last.to_le_bytes(),
            );
            let link = delegate_link.clone();
            Box::pin(async move {
                let answer = link.request(req).await.map_err(|e| e.to_string())?;
                wire::answer(&answer).map(|_| ())
            })
        },
    )));
    let watch = PartnerWatch {
        engine: engine.clone(),
        link: link.clone(),
        policy,
        grace,
        partner,
    };
    let resync = super::partner_watch::resync_while_up(engine.clone(), link.clone());
    engine.host().spawn(
        "partner-watch",
        Box::pin(async move {
            futures::future::join(watch.run(), resync).await;
        }),
    )
}

/// Asks the partner to re-read the ownership table (after a giveback or handover).
pub async fn tell_partner_to_reload(link: &Link) -> Result<(), String> {
    let req = wire::encode(wire::OP_RELOAD_OWNERSHIP, 0, 0, 0, &[]);
    let answer = link.request(req).await.map_err(|e| e.to_string())?;
    wire::answer(&answer).map(|_| ())
}

/// The link of one log-shipping peer, as `s` and the names describe it (the ids on the link
/// come from the node names, see [`ShippingSection::link_node_id`]).
pub fn shipping_link_config(
    s: &ShippingSection,
    role: rdma_link::Role,
    node_role: rdma_link::NodeRole,
    me: &str,
    peer: &str,
    layout_tag: u64,
) -> anyhow::Result<LinkConfig> {
    let secret = read_secret("shipping.secret_file", &s.secret_file)?;
    let transport = match s.transport {
        TransportKind::Tcp => rdma_link::Transport::Tcp,
        TransportKind::Rdma => rdma_link::Transport::Rdma,
    };
    let mut lc = LinkConfig::new(
        transport,
        role,
        s.id,
        ShippingSection::link_node_id(me),
        ShippingSection::link_node_id(peer),
        &secret,
    );
    lc.node_role = node_role;
    lc.layout_tag = layout_tag;
    lc.heartbeat_interval = Duration::from_millis(s.heartbeat_interval_ms);
    lc.heartbeat_timeout = Duration::from_millis(s.heartbeat_timeout_ms);
    lc.busy_poll = Duration::from_micros(s.busy_poll_us);
    lc.frame_mac = s.frame_mac;
    Ok(lc)
}

/// A log-shipping source's link to its destination: every staged record is posted to the
/// destination's NVRAM area for us and a write is acknowledged once both hold it (while
/// the destination is away, the degraded policy decides); when it (re)connects it gets the
/// records it lacks, as a pair's partner does. A flushed batch leaves our log once the
/// destination's log file holds it. The destination takes nothing over and sends no
/// requests.
pub fn start_source_link(
    cfg: &NodeConfig,
    s: &ShippingSection,
    engine: &Arc<Engine>,
) -> anyhow::Result<(Link, TaskHandle)> {
    let dest = s
        .destination
        .as_ref()
        .context("shipping.destination is missing")?;
    let address: std::net::SocketAddr = dest
        .address
        .parse()
        .context("shipping.destination.address")?;
    let (partitions, part_size) = engine.log_geometry();
    let (tag, text) = crate::shipping::area::Geometry {
        partitions,
        part_size,
    }
    .link_tag();
    tracing::info!(destination = dest.name, %address, "shipping layout: {text}");
    let lc = shipping_link_config(
        s,
        rdma_link::Role::Connect(address),
        rdma_link::NodeRole::Source,
        &cfg.node.name,
        &dest.name,
        tag,
    )?;
    let link = Link::start(lc, Some(engine.local_region()), None)
        .map_err(|e| anyhow::anyhow!("starting the link to destination {}: {e}", dest.name))?;
    let faults = ShipFaults::from_env()?;
    if faults.is_some() {
        tracing::warn!(
            "{}: TEST FAULTS on the way to the destination ({:?}); never set this in production",
            super::ship_faults::ENV,
            std::env::var(super::ship_faults::ENV).unwrap_or_default()
        );
    }
    engine.attach_mirror(Arc::new(ToDestination {
        link: link.clone(),
        // As a pair's batch waits out a link blip: two heartbeat timeouts.
        away_grace: Duration::from_millis(s.heartbeat_timeout_ms) * 2,
        faults: faults.map(|f| (f, engine.host().clone())),
    }));
    let watch = PartnerWatch {
        engine: engine.clone(),
        link: link.clone(),
        policy: TakeoverPolicy::Manual,
        grace: Duration::ZERO,
        partner: 0,
    };
    let watcher = engine
        .host()
        .spawn("destination-watch", Box::pin(watch.run()))
        .context("spawning the destination watcher")?;
    Ok((link, watcher))
}

/// Closes a link, waiting at most 5 s for it to say goodbye.
pub fn shutdown_link(link: rdma_link::Link) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), link.shutdown()).await;
        }),
        Err(_) => drop(link),
    }
}

/// The mirror of a log-shipping source: the link, plus asking the destination whether its
/// log file holds a batch (`wire::OP_SHIP_LOGGED`).
struct ToDestination {
    link: Link,
    away_grace: Duration,
    /// Tests only (`node::ship_faults`).
    faults: Option<(ShipFaults, Arc<dyn crate::host::Host>)>,
}

impl crate::mirror::Mirror for ToDestination {
    fn post(&self, post: rdma_link::Post) -> crate::mirror::PostFuture {
        match &self.faults {
            None => crate::mirror::Mirror::post(&self.link, post),
            Some((faults, host)) => faults.post(&self.link, host, post),
        }
    }
    fn release(&self, partition: u32, through_seq: u64) {
        crate::mirror::Mirror::release(&self.link, partition, through_seq)
    }
    fn describe(&self) -> String {
        crate::mirror::Mirror::describe(&self.link)
    }
    fn is_up(&self) -> bool {
        crate::mirror::Mirror::is_up(&self.link)
    }
    fn state_name(&self) -> &'static str {
        crate::mirror::Mirror::state_name(&self.link)
    }
    fn transport(&self) -> Option<&'static str> {
        crate::mirror::Mirror::transport(&self.link)
    }
    fn rtt(&self) -> Option<Duration> {
        self.link.rtt()
    }
    fn heard_by_partner(&self) -> Option<(u64, std::time::Instant)> {
        crate::mirror::Mirror::heard_by_partner(&self.link)
    }
    fn keeps_log(&self) -> Option<Duration> {
        Some(self.away_grace)
    }
    fn logged(&self, asked: wire::ShipLogged) -> crate::mirror::PostFuture {
        let (link, req) = (self.link.clone(), asked.encode());
        Box::pin(async move {
            let answer = link.request(req).await.map_err(|e| e.to_string())?;
            wire::answer(&answer).map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[shipping]` link settings reach the link: frame MACs on by default, off when
    /// `shipping.frame_mac = false` (the link's handshake then refuses a peer that differs).
    #[test]
    fn shipping_links_take_frame_mac_from_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").expect("secret");
        let config = |extra: &str| {
            format!(
                "[node]\nname = \"dest\"\n[nvram]\npath = \"/tmp/n\"\nsize = \"64MiB\"\n\
                 [shipping]\nrole = \"destination\"\nid = 7\nsecret_file = {secret:?}\n\
                 dir = \"/var/lib/x\"\n{extra}\n\
                 [[shipping.source]]\nname = \"src1\"\nlisten = \"127.0.0.1:7900\"\n\
                 nvram_size = \"64MiB\"\n"
            )
        };
        let link_of = |extra: &str| {
            let cfg = NodeConfig::parse(&config(extra)).expect("valid");
            let s = cfg.shipping.as_ref().expect("shipping");
            let listen = "127.0.0.1:7900".parse().expect("addr");
            shipping_link_config(
                s,
                rdma_link::Role::Listen(listen),
                rdma_link::NodeRole::Destination,
                "dest",
                "src1",
                0,
            )
            .expect("link config")
        };
        assert!(link_of("").frame_mac);
        assert!(!link_of("frame_mac = false").frame_mac);
    }
}
