//! `nvmirror-tiebreaker`: the diskless third voter of a shared-nothing pair (issue #17), as
//! DRBD 9's diskless tie-breaker: it keeps no records and no LUN, only its vote, so that the
//! arbiter's slots live on a majority of three (the two data nodes and this). It listens for
//! each data node's link and answers their vote requests, each after its state is durable.
//!
//! Voters are numbered by node id: the three node ids in order give voters 0, 1 and 2, on
//! every node alike.

use crate::cluster::register_store::voter_number;
use crate::cluster::register_wire::VoterIdentity;
use crate::cluster::voter_service::{create_seeded, Missing, VoterService};
use crate::node::link::read_secret;
use anyhow::{bail, Context};
use clap::Parser;
use rdma_link::{Bytes, Link, LinkConfig, NodeRole, RequestHandler, Role, Transport};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// What `nvmirror-tiebreaker` is started with (here, not in the binary, so that `nvmirrorctl`
/// writes its man page and completions).
#[derive(Parser, Debug)]
#[command(
    name = "nvmirror-tiebreaker",
    version,
    long_version = crate::release::long_version(),
    about = "The diskless tie-breaker voter of an nvmirror shared-nothing pair",
    long_about = "The diskless tie-breaker voter of an nvmirror shared-nothing pair.\n\n\
        With storage = \"own\" and [cluster.voters], the two data nodes keep the ownership \
        table and their leases on a majority of three voters: each node's own, and this one, \
        on a third machine. It keeps no data, only its vote, synced to --state before each \
        answer. It listens for each data node on an address of its own (--serve, once per \
        node: the nodes' voters.tiebreaker list, in order) and takes only links that prove \
        the cluster secret.\n\n\
        First set-up: --create-state (refused once the state exists: a voter that has voted \
        must never restart empty). A tie-breaker replacing one whose state is lost (a dead \
        disk) is created from copies of both data nodes' voter state files, taken after the \
        old one stopped: --create-state --seed-from A --seed-from B. Under systemd: \
        nvmirror-tiebreaker.service, arguments in /etc/nvmirror/tiebreaker.env \
        (TIEBREAKER_ARGS).",
    after_help = "Example: nvmirror-tiebreaker --cluster-id 1 --secret-file /etc/nvmirror/secret \
        --node-id 3 --serve 1=192.168.10.3:7481 --serve 2=192.168.10.3:7482\n\n\
        Exit codes: 0 --create-state done, 1 could not start (the message says why), 2 invalid arguments"
)]
pub struct TieBreakerArgs {
    /// The cluster's id (`[cluster] id` of the data nodes).
    #[arg(long, value_parser = parse_u64)]
    pub cluster_id: u64,
    /// File holding the cluster secret (the data nodes' `[cluster] secret_file`).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// This tie-breaker's node id (distinct from both data nodes').
    #[arg(long)]
    pub node_id: u32,
    /// A data node to serve: NODE_ID=LISTEN_ADDR (twice, one per data node).
    #[arg(long = "serve", value_name = "NODE_ID=ADDR", value_parser = parse_serve, required = true)]
    pub serve: Vec<(u32, SocketAddr)>,
    /// The voter's durable state.
    #[arg(long, default_value = "/var/lib/nvmirror/tiebreaker.state")]
    pub state: PathBuf,
    /// Create the state if it does not exist (the first start only: a voter that has voted
    /// must never restart empty).
    #[arg(long)]
    pub init: bool,
    /// Create the state (refused when it exists) and exit, without serving: the first
    /// set-up of a tie-breaker run by systemd (`nvmirror-tiebreaker.service`).
    #[arg(long, conflicts_with = "init")]
    pub create_state: bool,
    /// With --create-state, for a tie-breaker that replaces one whose state is lost: a copy
    /// of a data node's voter state file (`<voters.state_dir>/voter.state`), taken after the
    /// old tie-breaker stopped; twice, one per data node. The new state holds each slot's
    /// highest fence and newest value of the two, so it remembers all the old one did.
    /// Each file names its voter: a copy of the tie-breaker's own old state, or another
    /// cluster's, is refused.
    #[arg(long, value_name = "FILE", requires = "create_state")]
    pub seed_from: Vec<PathBuf>,
    /// The links' transport.
    #[arg(long, default_value = "tcp", value_parser = parse_transport)]
    pub transport: Transport,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a number: {e}"))
}

fn parse_serve(s: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE_ID=LISTEN_ADDR, e.g. 1=10.0.0.3:7480"))?;
    let id = id
        .parse()
        .map_err(|e| format!("{id:?} is not a node id: {e}"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address like 10.0.0.3:7480: {e}"))?;
    Ok((id, addr))
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s {
        "tcp" => Ok(Transport::Tcp),
        "rdma" => Ok(Transport::Rdma),
        _ => Err(format!("{s:?}: the transport is tcp or rdma")),
    }
}

/// Serves the votes until the process is killed (every answer is durable before it leaves).
pub fn run(args: TieBreakerArgs) -> anyhow::Result<()> {
    if args.serve.len() != 2 {
        bail!(
            "--serve is given {} times; a tie-breaker serves exactly the two data nodes",
            args.serve.len()
        );
    }
    let nodes = [args.serve[0].0, args.serve[1].0, args.node_id];
    let me = voter_number(&nodes, args.node_id).map_err(anyhow::Error::msg)?;
    let identity = VoterIdentity {
        cluster: args.cluster_id,
        node: args.node_id,
    };
    let secret = read_secret("--secret-file", &args.secret_file)?;
    if args.create_state {
        if args.state.exists() {
            bail!(
                "{} exists: this voter has state already, and re-creating it empty could let \
                 two nodes both win a slot. Nothing was changed",
                args.state.display()
            );
        }
        if let Some(dir) = args.state.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if args.seed_from.is_empty() {
            VoterService::open(&args.state, identity, me, 3, Missing::CreateEmpty)
                .map_err(anyhow::Error::msg)?;
            println!(
                "created the tie-breaker's voter state {}",
                args.state.display()
            );
        } else {
            let seeded = create_seeded(&args.state, identity, &nodes, &args.seed_from)
                .map_err(anyhow::Error::msg)?;
            println!(
                "created the tie-breaker's voter state {} from {} copies: {} slot(s), highest \
                 fence {}",
                args.state.display(),
                args.seed_from.len(),
                seeded.slots().count(),
                seeded.max_fence()
            );
        }
        return Ok(());
    }
    let missing = if args.init {
        Missing::CreateEmpty
    } else {
        Missing::Refuse
    };
    let voter = Arc::new(
        VoterService::open(&args.state, identity, me, 3, missing).map_err(anyhow::Error::msg)?,
    );
    let mut links = Vec::new();
    for &(node, addr) in &args.serve {
        let sender = voter_number(&nodes, node).map_err(anyhow::Error::msg)?;
        let mut cfg = LinkConfig::new(
            args.transport,
            Role::Listen(addr),
            args.cluster_id,
            args.node_id,
            node,
            &secret,
        );
        cfg.node_role = NodeRole::TieBreaker;
        let voter = voter.clone();
        // A vote is small and rare; its state file is synced inline, on the link's runtime.
        let handler: Arc<dyn RequestHandler> = Arc::new(move |p: Bytes| {
            let answer = voter.handle(Some(sender), &p).unwrap_or_default();
            async move { Bytes::from(answer) }
        });
        let link = Link::start_with_handler(cfg, None, None, handler)
            .with_context(|| format!("listening for node {node} on {addr}"))?;
        tracing::info!(node, %addr, voter = sender, "serving the votes of node {node}");
        links.push(link);
    }
    tracing::info!(voter = me, state = %args.state.display(), "tie-breaker up");
    // Serves until killed: every answer was durable before it left.
    loop {
        std::thread::park();
    }
}
