//! At start: ranges the partner claimed from us (a takeover) whose
//! replay it never finished (`cluster::claim_note`). The partner served nothing of them since
//! the claim, so our own staged records of them are the newest data there is; skipping them,
//! as a start does for ranges the table gives another node, would lose them should we later
//! take the ranges back before the partner restarts (simulator seed 4755).
//!
//! Once the claimer's disk heartbeat is dead we replay our records of those ranges with our
//! own. The claimer's restart replays its copies of the same records before it serves them
//! (its NVRAM note): the same bytes again, in the same order. While the claimer lives it is
//! still replaying: [`wait_for_claimers`], called between the lease and `Engine::open`,
//! waits (a few lease periods at most) for its note to clear or its heartbeat to die; past
//! that our records of those ranges are dropped as before, and it is said why. The start
//! notes what it dropped, and a takeover leaves those ranges to the claimer until it
//! finishes (`dropped_ranges`).
//!
//! With a medium per node (`storage = "own"`) our records go to our own medium, and our
//! start marks their extents out of sync as it does for every record it finds (the
//! claimer's medium may lack them). If our medium was marked outdated for those ranges
//! (by the claimer before it died, or by anyone before the claim: the claim marks again at
//! its epoch), the mark stands: we cannot take them over until the claimer returns, replays
//! its copies and resyncs us.

use crate::cluster::{Cluster, ClusterSetup, LunRange};
use crate::host::Host;
use crate::lease::{DiskLease, Verdict};
use crate::ownership::TableError;
use std::sync::Arc;

type Claims = crate::cluster::claim_note::Unfinished;

/// The unfinished claims on our ranges: those of nodes whose heartbeat is dead, and the rest.
fn claims_by_verdict(lease: &DiskLease, claims: Claims) -> (Claims, Claims) {
    claims.into_iter().partition(|(taker, _)| {
        matches!(
            lease.verdict(*taker),
            Verdict::Dead { .. } | Verdict::Absent
        )
    })
}

/// With a held lease, before `Engine::open`: while a node that claimed
/// ranges from us is alive and has not finished replaying them, waits for it (its note to
/// clear) or for its heartbeat to read as dead, at most a few lease periods. A dead node's
/// heartbeat reads as dead only once it was watched silent for the lease's `dead_after`,
/// which a start that just gained its lease has not done yet.
pub async fn wait_for_claimers(setup: &ClusterSetup, host: &Arc<dyn Host>) {
    let Some(lease) = setup.lease.as_ref() else {
        return;
    };
    let timing = lease.timing();
    let deadline = host.now() + timing.dead_after() + timing.renew * 2 + timing.io_timeout;
    let mut said = false;
    let mut said_unreadable = false;
    while host.now() < deadline {
        let claims = crate::cluster::claim_note::unfinished_on(
            setup.table_store.as_ref(),
            setup.initial.cluster_id,
            setup.me,
            setup.nodes.len() as u32,
        );
        let claims = match claims {
            Ok(claims) => claims,
            Err(e) => {
                // Read again until the deadline: ending the wait here would let
                // `Engine::open` skip our records of ranges a claimer took, by a verdict
                // not yet watched long enough to call it dead (simulator seed 246 with
                // `--voter-table` and one try per operation: the claimer had lost its
                // power, and those records were lost). `Engine::open` says what failed.
                if !said_unreadable {
                    tracing::info!(
                        "reading the claim notes failed ({e}): trying again until the wait ends"
                    );
                    said_unreadable = true;
                }
                host.sleep(timing.renew).await;
                continue;
            }
        };
        let (_, alive) = claims_by_verdict(lease, claims);
        let Some((taker, ranges)) = alive.first() else {
            return;
        };
        if !said {
            tracing::info!(
                "node {} claimed range(s) {ranges:?} from this node and has not finished replaying them: waiting (at most {:?}) for it to finish or for its heartbeat to read as dead",
                setup.nodes.get(*taker as usize).map_or("?", |n| n.as_str()),
                deadline.saturating_duration_since(host.now())
            );
            said = true;
        }
        host.sleep(timing.renew).await;
    }
}

/// The ranges whose records this start replays although the table gives them to another
/// node: claimed from us by a node now dead that never replayed them.
pub(super) fn records_to_replay_for_dead_claimers(c: &Cluster) -> Vec<LunRange> {
    let Some(lease) = c.lease() else {
        return Vec::new();
    };
    let claims = c.unfinished_claims_on_us().unwrap_or_else(|e: TableError| {
        tracing::error!(
            "reading the other nodes' claim notes failed ({e}): records of ranges they took from this node are not replayed here"
        );
        Vec::new()
    });
    let (dead, alive) = claims_by_verdict(lease, claims);
    for (taker, ranges) in &alive {
        tracing::warn!(
            "node {} claimed range(s) {ranges:?} from this node and has not finished replaying them, and it is alive: it finishes; this node's records of them are not replayed",
            c.node_name(*taker)
        );
    }
    for (taker, ranges) in &dead {
        tracing::warn!(
            "node {} claimed range(s) {ranges:?} from this node and stopped before replaying them (its heartbeat is dead): nobody served them since, so this node replays its own records of them",
            c.node_name(*taker)
        );
    }
    dead.into_iter().flat_map(|(_, r)| r).collect()
}
