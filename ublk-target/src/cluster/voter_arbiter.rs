//! The arbiter as three voters (`[cluster.voters]`, issue #17): the ownership table's and
//! the leases' slots kept by a majority of this node's voter, the partner's and a diskless
//! tie-breaker's (`nvmirror-tiebreaker`) through the register of `register_store`, in place
//! of a device both nodes see.
//!
//! The links: the pair's vote link (the first node listens on its address's IP at
//! `voters.port`, the second connects), which both ends use to ask the other's voter and to
//! answer it, and this node's link to the tie-breaker. Both are apart from the mirror link, so
//! a node votes before its engine is open (the lease is taken before the mirror link starts)
//! and a vote never queues behind mirrored data.

use super::register_store::{
    voter_number, BallotFile, LinkVoter, LocalVoter, RegisterStore, VoterChannel, ATTEMPTS,
};
use super::register_wire::VoterIdentity;
use super::voter_service::{create_seeded, Missing, VoterService};
use crate::config::{read_secret, ClusterSection, TransportKind, VotersSection};
use crate::ownership::TableStore;
use rdma_link::{Bytes, Link, LinkConfig, NodeRole, RequestHandler, Role, Transport};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The voters' slot store and the links it asks through (kept running while it lives).
pub struct VoterArbiter {
    store: RegisterStore,
    links: Vec<Link>,
}

/// How long one try of a slot operation waits for a majority: all of an operation's tries
/// fit in the medium I/O timeout, as a disk's write must for the lease to count it.
pub fn try_timeout(io_timeout: Duration) -> Duration {
    (io_timeout / ATTEMPTS).max(Duration::from_millis(20))
}

/// The voter numbers of the data nodes (ids 1 and 2, their places in `[[cluster.node]]`)
/// and the tie-breaker.
fn voter_ids(c: &ClusterSection, v: &VotersSection) -> Vec<u32> {
    let mut ids: Vec<u32> = (1..=c.nodes.len() as u32).collect();
    ids.push(v.tiebreaker_id);
    ids
}

fn missing_state(v: &VotersSection, config: &str) -> String {
    format!(
        "this node's voter state {} or ballot file {} does not exist. A voter that has voted \
         must never come back empty, so the daemon does not create them: on this node's first \
         start run `nvmirrorctl init-voter --config {config}`; if they were lost (a replaced \
         disk), create them from copies of the partner's and the tie-breaker's voter state \
         files: `nvmirrorctl init-voter --config {config} --seed-from FILE --seed-from FILE`",
        v.state_file().display(),
        v.ballot_file().display()
    )
}

/// Creates this node's voter state and ballot file (`nvmirrorctl init-voter`), empty or, for
/// a node whose state is lost, from copies of the other two voters' states
/// (`voter_service::create_seeded`) with the ballot round above every epoch they saw, so
/// that no epoch of the node's lost life is used again. Refuses when either exists. Returns
/// for a seeded state its slot count and ballot round.
pub fn init(
    c: &ClusterSection,
    v: &VotersSection,
    me: u32,
    seed_from: &[PathBuf],
) -> Result<Option<(usize, u64)>, String> {
    for f in [v.state_file(), v.ballot_file()] {
        if f.exists() {
            return Err(format!(
                "{} exists: this voter has state already, and re-creating it empty could let \
                 two nodes both win a slot. Nothing was changed",
                f.display()
            ));
        }
    }
    let ids = voter_ids(c, v);
    let identity = VoterIdentity {
        cluster: c.id,
        node: me + 1,
    };
    let mine = voter_number(&ids, identity.node)?;
    std::fs::create_dir_all(&v.state_dir)
        .map_err(|e| format!("creating {}: {e}", v.state_dir.display()))?;
    let (round, seeded) = if seed_from.is_empty() {
        VoterService::open(&v.state_file(), identity, mine, 3, Missing::CreateEmpty)?;
        (0, None)
    } else {
        let state = create_seeded(&v.state_file(), identity, &ids, seed_from)?;
        // The next start takes the round after this one: an epoch above every fence.
        let round = state.max_fence() / 3 + 1;
        (round, Some((state.slots().count(), round)))
    };
    BallotFile::new(&v.ballot_file())
        .store(round)
        .map_err(|e| format!("creating {}: {e}", v.ballot_file().display()))?;
    Ok(seeded)
}

impl VoterArbiter {
    /// Opens node `me`'s voter (its place in `[[cluster.node]]`) and the links to the other
    /// two, and the slot store over the three. Returns at once: the links come up in the
    /// background, and an operation without a majority fails after its tries.
    pub fn open(
        c: &ClusterSection,
        v: &VotersSection,
        me: u32,
        config_path: &str,
    ) -> Result<VoterArbiter, String> {
        if !v.state_file().exists() || !v.ballot_file().exists() {
            return Err(missing_state(v, config_path));
        }
        let secret =
            read_secret("cluster.secret_file", &c.secret_file).map_err(|e| format!("{e:#}"))?;
        let ids = voter_ids(c, v);
        let my_id = me + 1;
        let partner_id = if me == 0 { 2 } else { 1 };
        let number = |id: u32| voter_number(&ids, id);
        let (mine, partner, tiebreaker) = (
            number(my_id)?,
            number(partner_id)?,
            number(v.tiebreaker_id)?,
        );
        let identity = VoterIdentity {
            cluster: c.id,
            node: my_id,
        };
        let voter = Arc::new(VoterService::open(
            &v.state_file(),
            identity,
            mine,
            3,
            Missing::Refuse,
        )?);
        let transport = match c.transport {
            TransportKind::Tcp => Transport::Tcp,
            TransportKind::Rdma => Transport::Rdma,
        };
        let link_config = |role: Role, peer: u32, node_role: NodeRole| {
            let mut lc = LinkConfig::new(transport, role, c.id, my_id, peer, &secret);
            lc.node_role = node_role;
            lc.heartbeat_interval = Duration::from_millis(c.heartbeat_interval_ms);
            lc.heartbeat_timeout = Duration::from_millis(c.heartbeat_timeout_ms);
            // Votes are few and small: no core spent polling for them.
            lc.busy_poll = Duration::ZERO;
            lc
        };
        let first: SocketAddr = c
            .nodes
            .first()
            .and_then(|n| n.address.parse().ok())
            .ok_or("cluster.node[0].address is not ip:port")?;
        let vote_addr = SocketAddr::new(first.ip(), v.port);
        let role = if me == 0 {
            Role::Listen(vote_addr)
        } else {
            Role::Connect(vote_addr)
        };
        let pair = Link::start_with_handler(
            link_config(role, partner_id, NodeRole::PairVoter),
            None,
            None,
            serve_voter(&voter, partner),
        )
        .map_err(|e| format!("starting the pair's vote link on {vote_addr}: {e}"))?;
        let tb_addr: SocketAddr = v
            .tiebreaker
            .get(me as usize)
            .and_then(|a| a.parse().ok())
            .ok_or("cluster.voters.tiebreaker has no address for this node")?;
        let to_tiebreaker = Link::start(
            link_config(
                Role::Connect(tb_addr),
                v.tiebreaker_id,
                NodeRole::TieBreakerClient,
            ),
            None,
            None,
        )
        .map_err(|e| format!("starting the link to the tie-breaker at {tb_addr}: {e}"))?;
        let mut channels: Vec<Option<Arc<dyn VoterChannel>>> = vec![None, None, None];
        channels[mine as usize] = Some(Arc::new(LocalVoter(voter)));
        channels[partner as usize] = Some(Arc::new(LinkVoter(pair.clone())));
        channels[tiebreaker as usize] = Some(Arc::new(LinkVoter(to_tiebreaker.clone())));
        let channels = channels.into_iter().flatten().collect();
        let store = RegisterStore::open(
            mine,
            channels,
            BallotFile::new(&v.ballot_file()),
            Missing::Refuse,
            try_timeout(c.lease_timing().io_timeout),
        )?;
        tracing::info!(
            voter = mine,
            partner_votes_on = %vote_addr,
            tiebreaker = %tb_addr,
            "the arbiter is three voters: this node's, the partner's and the tie-breaker's"
        );
        Ok(VoterArbiter {
            store,
            links: vec![pair, to_tiebreaker],
        })
    }

    /// Whether the links to the partner's voter and the tie-breaker are up, in that order.
    pub fn links_up(&self) -> (bool, bool) {
        (self.links[0].state().is_up(), self.links[1].state().is_up())
    }
}

/// Answers the partner's vote requests with our voter (each after its state is durable).
fn serve_voter(voter: &Arc<VoterService>, sender: u32) -> Arc<dyn RequestHandler> {
    let voter = voter.clone();
    Arc::new(move |request: Bytes| {
        let answer = voter.handle(Some(sender), &request).unwrap_or_default();
        async move { Bytes::from(answer) }
    })
}

impl TableStore for VoterArbiter {
    fn place(&self) -> crate::ownership::ArbiterPlace {
        crate::ownership::ArbiterPlace::Voters
    }

    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        self.store.read_slot(slot, out)
    }

    fn read_slot_settled(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        self.store.read_slot_settled(slot, out)
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        self.store.write_slot(slot, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::register::{RegisterMessage, Tag};
    use crate::cluster::register_store::epoch_of;
    use crate::cluster::register_wire::encode_message;

    /// node-a's cluster section, its voters' state in `dir`.
    fn cluster(dir: &std::path::Path) -> ClusterSection {
        let text = format!(
            r#"
[node]
name = "node-a"
[nvram]
path = "/dev/null"
[cluster]
id = 77
secret_file = "/nonexistent"
storage = "own"
[cluster.voters]
port = 7490
tiebreaker_id = 3
tiebreaker = ["127.0.0.1:7491", "127.0.0.1:7492"]
state_dir = "{}"
[[cluster.node]]
name = "node-a"
address = "127.0.0.1:7480"
[[cluster.node]]
name = "node-b"
address = "127.0.0.1:7481"
[[lun]]
name = "lun0"
medium = "/dev/null"
size = "8MiB"
ranges = 2
"#,
            dir.display()
        );
        crate::config::NodeConfig::parse(&text)
            .expect("valid config")
            .cluster
            .expect("a cluster")
    }

    fn voters(c: &ClusterSection) -> &VotersSection {
        c.voters.as_ref().expect("voters")
    }

    #[test]
    fn a_replaced_nodes_voter_is_seeded_and_its_ballots_start_above_every_fence() {
        let dir = tempfile::tempdir().unwrap();
        // node-b's voter (node 2) and the tie-breaker (node 3) seed node-a's (node 1).
        let other = cluster(&dir.path().join("other"));
        let v = voters(&other);
        assert_eq!(init(&other, v, 1, &[]), Ok(None));
        assert_eq!(
            BallotFile::new(&v.ballot_file()).load(Missing::Refuse),
            Ok(0)
        );
        let id = |node| VoterIdentity { cluster: 77, node };
        // Another voter saw epoch 40 on slot 2.
        let voter = VoterService::open(&v.state_file(), id(2), 1, 3, Missing::Refuse).unwrap();
        let write = RegisterMessage::Write {
            from: 2,
            op: 1,
            slot: 2,
            tag: Tag {
                epoch: 40,
                counter: 1,
            },
            data: b"table".to_vec(),
        };
        voter.handle(None, &encode_message(&write)).unwrap();
        let tiebreaker = dir.path().join("tiebreaker.state");
        VoterService::open(&tiebreaker, id(3), 2, 3, Missing::CreateEmpty).unwrap();

        let replaced = cluster(&dir.path().join("replaced"));
        let r = voters(&replaced);
        // node-b's copy cannot stand in for node-a's own.
        let e = init(&replaced, r, 1, &[v.state_file(), tiebreaker.clone()]).unwrap_err();
        assert!(e.contains("this voter's own state (node 2"), "{e}");
        assert!(!r.state_file().exists() && !r.ballot_file().exists());
        let got = init(&replaced, r, 0, &[v.state_file(), tiebreaker]).unwrap();
        assert_eq!(got, Some((1, 14)));
        // Its next start takes round 15: epoch 45 or more for any voter number, above 40.
        let round = BallotFile::new(&r.ballot_file())
            .load(Missing::Refuse)
            .unwrap();
        assert!(epoch_of(round + 1, 0, 3) > 40);
        let seeded = VoterService::open(&r.state_file(), id(1), 0, 3, Missing::Refuse).unwrap();
        assert_eq!(seeded.fence(2), 40);
        // Once created, refused.
        assert!(init(&replaced, r, 0, &[]).unwrap_err().contains("exists"));
    }
}
