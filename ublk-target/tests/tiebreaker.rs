//! The arbiter's slots on three voters (issue #17): two data nodes, each with its own voter
//! and a `RegisterStore`, linked to each other and to a real `nvmirror-tiebreaker` process
//! over TCP on loopback. Checks the ownership table both nodes see through the voters, across
//! the tie-breaker's kill -9 and restart, and that a node without a majority gets an error
//! instead of a stale or unreplicated answer.

use nvmirror::cluster::register_store::VoterChannel;
use nvmirror::cluster::register_store::{BallotFile, LinkVoter, LocalVoter, RegisterStore};
use nvmirror::cluster::register_wire::VoterIdentity;
use nvmirror::cluster::voter_service::{Missing, VoterService};
use nvmirror::ownership::{self, OwnershipTable, RangeOwner, TableStore};
use rdma_link::{Bytes, Link, LinkConfig, NodeRole, RequestHandler, Role, Transport};
#[path = "support/tiebreaker.rs"]
mod tiebreaker_process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiebreaker_process::{free_addr, Killed, TIEBREAKER};

const CLUSTER: u64 = 0x7e5;
const SECRET: &[u8] = b"tie-breaker-test-secret-0123456789";

fn tiebreaker(dir: &Path, a1: SocketAddr, a2: SocketAddr, init: bool) -> Command {
    tiebreaker_process::command(CLUSTER, dir, [a1, a2], init)
}

fn link_cfg(role: Role, me: u32, peer: u32, node_role: NodeRole) -> LinkConfig {
    let mut c = LinkConfig::new(Transport::Tcp, role, CLUSTER, me, peer, SECRET);
    c.node_role = node_role;
    c.heartbeat_timeout = Duration::from_millis(800);
    c
}

fn serve_voter(voter: &Arc<VoterService>, sender: u32) -> Arc<dyn RequestHandler> {
    let voter = voter.clone();
    Arc::new(move |p: Bytes| {
        let answer = voter.handle(Some(sender), &p).unwrap_or_default();
        async move { Bytes::from(answer) }
    })
}

/// One data node: its voter, its link to the partner (which carries both nodes' votes) and
/// to the tie-breaker, and its slot store over the three.
struct Node {
    store: RegisterStore,
    partner: Link,
    tiebreaker: Link,
}

fn node(dir: &Path, id: u32, partner_role: Role, tb: SocketAddr) -> Node {
    let me = id - 1;
    let voter = Arc::new(
        VoterService::open(
            &dir.join(format!("voter{id}.state")),
            VoterIdentity {
                cluster: CLUSTER,
                node: id,
            },
            me,
            3,
            Missing::CreateEmpty,
        )
        .unwrap(),
    );
    let peer = 3 - id;
    let partner = Link::start_with_handler(
        link_cfg(partner_role, id, peer, NodeRole::Pair),
        None,
        None,
        serve_voter(&voter, peer - 1),
    )
    .unwrap();
    let tiebreaker = Link::start(
        link_cfg(
            Role::Connect(tb),
            id,
            TIEBREAKER,
            NodeRole::TieBreakerClient,
        ),
        None,
        None,
    )
    .unwrap();
    let mut voters: Vec<Arc<dyn VoterChannel>> = vec![
        Arc::new(LinkVoter(partner.clone())),
        Arc::new(LinkVoter(partner.clone())),
        Arc::new(LinkVoter(tiebreaker.clone())),
    ];
    voters[me as usize] = Arc::new(LocalVoter(voter));
    let store = RegisterStore::open(
        me,
        voters,
        BallotFile::new(&dir.join(format!("ballot{id}"))),
        Missing::CreateEmpty,
        Duration::from_millis(500),
    )
    .unwrap();
    Node {
        store,
        partner,
        tiebreaker,
    }
}

fn table(generation: u64, owner_of_range_1: u32) -> OwnershipTable {
    OwnershipTable {
        cluster_id: CLUSTER,
        generation,
        luns: vec![vec![
            RangeOwner { owner: 0, epoch: 1 },
            RangeOwner {
                owner: owner_of_range_1,
                epoch: generation,
            },
        ]],
    }
}

fn wait_up(link: &Link) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !link.state().is_up() {
        assert!(Instant::now() < deadline, "link not up: {:?}", link.state());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two data nodes and a new tie-breaker in a fresh directory, every link up.
struct Cluster {
    dir: tempfile::TempDir,
    /// The tie-breaker's addresses for node 1 and node 2, and the pair's.
    addrs: [SocketAddr; 3],
    tb: Killed,
    n1: Node,
    n2: Node,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let (tb1, tb2, pair) = (free_addr(), free_addr(), free_addr());
    let tb = Killed(tiebreaker(dir.path(), tb1, tb2, true).spawn().unwrap());
    let n1 = node(dir.path(), 1, Role::Listen(pair), tb1);
    let n2 = node(dir.path(), 2, Role::Connect(pair), tb2);
    for l in [&n1.partner, &n2.partner, &n1.tiebreaker, &n2.tiebreaker] {
        wait_up(l);
    }
    Cluster {
        dir,
        addrs: [tb1, tb2, pair],
        tb,
        n1,
        n2,
    }
}

#[test]
fn two_nodes_and_a_tiebreaker_keep_the_table_on_a_majority() {
    let Cluster {
        dir,
        addrs: [tb1, tb2, _],
        tb,
        n1,
        n2,
    } = cluster();

    // Node 1 creates the table; node 2 reads it through the voters, then moves range 1.
    let first_epoch = n1.store.epoch();
    let t1 = ownership::load_or_init(&n1.store, &table(1, 0)).unwrap();
    assert_eq!(t1, table(1, 0));
    assert_eq!(ownership::load(&n2.store).unwrap(), Some(table(1, 0)));
    ownership::save(&n2.store, &table(2, 1)).unwrap();
    assert_eq!(ownership::load(&n1.store).unwrap(), Some(table(2, 1)));
    // Reads fence nothing: node 1 read what node 2's newer ballot wrote without being
    // refused, so it still has its first ballot.
    assert_eq!(n1.store.epoch(), first_epoch);
    assert!(n2.store.epoch() > first_epoch);

    // kill -9 the tie-breaker: the two data nodes are still a majority.
    drop(tb);
    ownership::save(&n1.store, &table(3, 0)).unwrap();
    assert_eq!(ownership::load(&n2.store).unwrap(), Some(table(3, 0)));

    // It restarts from its state (no --init needed, and none given).
    let tb = Killed(tiebreaker(dir.path(), tb1, tb2, false).spawn().unwrap());
    wait_up(&n1.tiebreaker);
    wait_up(&n2.tiebreaker);

    // Node 2 gone: node 1 and the tie-breaker are a majority, and see what node 2 wrote.
    drop(n2);
    let t = ownership::load(&n1.store).unwrap();
    assert_eq!(t, Some(table(3, 0)));
    ownership::save(&n1.store, &table(4, 0)).unwrap();

    // Node 1 alone (tie-breaker killed too): no majority, so an error, not an answer.
    drop(tb);
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let e = n1.store.read_slot(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("no majority"), "{e}");
    // Four tries of 500 ms each, not a wait for ever.
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = n1.store.write_slot(0, &buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
}

#[test]
fn a_tiebreaker_whose_state_is_lost_is_replaced_from_copies_of_the_data_nodes_states() {
    let Cluster {
        dir,
        addrs: [tb1, tb2, pair],
        tb,
        n1,
        n2,
    } = cluster();
    ownership::load_or_init(&n1.store, &table(1, 0)).unwrap();
    assert_eq!(ownership::load(&n2.store).unwrap(), Some(table(1, 0)));

    // Node 2 away: node 1's write reaches only its own voter and the tie-breaker's.
    drop(n2);
    ownership::save(&n1.store, &table(2, 1)).unwrap();

    // The tie-breaker's disk dies. Its replacement is seeded from copies of both data
    // nodes' voter states (node 2's is stale: it missed the write).
    drop(tb);
    let state = dir.path().join("tiebreaker.state");
    // An old backup of the lost state itself cannot stand in for a data node's copy: it may
    // lack fences the tie-breaker gave since.
    let backup = dir.path().join("tiebreaker-backup.state");
    std::fs::rename(&state, &backup).unwrap();
    let refused = tiebreaker(dir.path(), tb1, tb2, false)
        .arg("--create-state")
        .args(["--seed-from".as_ref(), backup.as_path()])
        .args([
            "--seed-from".as_ref(),
            dir.path().join("voter1.state").as_path(),
        ])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{why}");
    assert!(why.contains("a copy of this voter's own state"), "{why}");
    assert!(!state.exists());
    let copies = [
        dir.path().join("copy1.state"),
        dir.path().join("copy2.state"),
    ];
    for (id, copy) in [1, 2].iter().zip(&copies) {
        std::fs::copy(dir.path().join(format!("voter{id}.state")), copy).unwrap();
    }
    let out = tiebreaker(dir.path(), tb1, tb2, false)
        .arg("--create-state")
        .args(copies.iter().flat_map(|c| [Path::new("--seed-from"), c]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second time: refused, the state exists.
    let again = tiebreaker(dir.path(), tb1, tb2, false)
        .arg("--create-state")
        .args(copies.iter().flat_map(|c| [Path::new("--seed-from"), c]))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));

    // Node 2 back, node 1 gone: node 2 and the new tie-breaker are the majority, and they
    // see node 1's write (an empty tie-breaker would have let node 2 read table 1).
    let _tb = Killed(tiebreaker(dir.path(), tb1, tb2, false).spawn().unwrap());
    let n2 = node(dir.path(), 2, Role::Connect(pair), tb2);
    wait_up(&n2.partner);
    wait_up(&n2.tiebreaker);
    drop(n1);
    assert_eq!(ownership::load(&n2.store).unwrap(), Some(table(2, 1)));
    ownership::save(&n2.store, &table(3, 1)).unwrap();
    assert_eq!(ownership::load(&n2.store).unwrap(), Some(table(3, 1)));
}

#[test]
fn a_tiebreaker_without_its_state_refuses_to_start_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let out = tiebreaker(dir.path(), free_addr(), free_addr(), false)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--init") && err.contains("never"), "{err}");
    assert!(!dir.path().join("tiebreaker.state").exists());
}

#[test]
fn a_pair_node_pointed_at_the_tiebreaker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let (tb1, tb2) = (free_addr(), free_addr());
    let _tb = Killed(tiebreaker(dir.path(), tb1, tb2, true).spawn().unwrap());
    // Node 1's mirror link (a pair node's) dialled at the tie-breaker by mistake.
    let wrong = Link::start(
        link_cfg(Role::Connect(tb1), 1, TIEBREAKER, NodeRole::Pair),
        None,
        None,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = format!("{:?}", wrong.state());
        if state.contains("tie-breaker") {
            break;
        }
        assert!(Instant::now() < deadline, "not refused by role: {state}");
        assert!(
            !state.starts_with("Up"),
            "a pair node got up with a tie-breaker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
