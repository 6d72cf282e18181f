//! The simulator of the majority lease (`nvmirror::cluster::quorum`), the arbiter planned
//! for shared-nothing mode. It runs the production state machine of three (or five) nodes
//! against one seed's faults, in 1 ms steps of real time:
//! * clocks: each node's runs at its own rate within the promised drift, from its own
//!   origin; a restart starts a new clock (a new boot's monotonic time);
//! * network: per message a delay of 0-40 ms, one in 20 0.5-2 leases (a message that
//!   arrives long after it was sent), losses, duplicates, and cuts of single directions or
//!   whole nodes for up to three leases;
//! * processes: crashes (the node comes back later with only its durable vote), pauses
//!   (SIGSTOP: the node does nothing, its messages wait, its clock runs on);
//! * demand: each node starts or stops wanting the lease every half second or so, often
//!   several at once.
//!
//! Checked at every step: at most one node holds the lease; an epoch is only ever held by
//! one node, in one life of it (not again after a restart); and a new holder's epoch is above every earlier holder's. After the faults end
//! (links healed, every node up, one node wanting), that node must get the lease within a
//! few leases.

use nvmirror::cluster::quorum::{DurableVote, Flaws, QuorumMessage, QuorumNode, QuorumTiming};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

const MS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
pub struct QuorumSettings {
    pub nodes: u32,
    pub seconds: u64,
    pub lease_ms: u64,
    pub max_drift_ppm: u64,
    pub flaws: Flaws,
}

impl Default for QuorumSettings {
    fn default() -> Self {
        QuorumSettings {
            nodes: 3,
            seconds: 20,
            lease_ms: 2000,
            // Far above real crystals (about 100 ppm), so that drift matters within a run.
            max_drift_ppm: 20_000,
            flaws: Flaws::default(),
        }
    }
}

#[derive(Debug, Default)]
pub struct QuorumOutcome {
    /// The first invariant broken, with the real time it happened.
    pub violation: Option<String>,
    /// Steps in which some node held the lease, of all steps.
    pub held_steps: u64,
    pub steps: u64,
    /// Distinct holders over the run (tenures).
    pub tenures: u64,
    pub messages: u64,
}

struct Node {
    sm: QuorumNode,
    /// Clock: local = origin + real * (1e6 + drift_ppm) / 1e6.
    origin: u64,
    drift_ppm: i64,
    up: bool,
    paused_until: u64,
    down_until: u64,
    /// Restarts so far: each start is a new life of the node.
    life: u32,
}

impl Node {
    fn local(&self, real: u64) -> u64 {
        let r = real as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000;
        self.origin.wrapping_add(r as u64)
    }

    fn running(&self, real: u64) -> bool {
        self.up && real >= self.paused_until
    }
}

/// Messages in flight, by delivery time and then sending order: (real ns, seq) -> (to, message).
type InFlight = BTreeMap<(u64, u64), (u32, QuorumMessage)>;

fn sender(m: &QuorumMessage) -> u32 {
    match *m {
        QuorumMessage::Ask { from, .. } | QuorumMessage::Answer { from, .. } => from,
    }
}

/// Runs one seed.
pub fn run_quorum(seed: u64, s: QuorumSettings) -> QuorumOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let timing = QuorumTiming {
        voters: s.nodes,
        lease_ns: s.lease_ms * MS,
        max_drift_ppm: s.max_drift_ppm,
    };
    let drift = s.max_drift_ppm as i64;
    let mut votes = vec![DurableVote::default(); s.nodes as usize];
    let mut nodes: Vec<Node> = (0..s.nodes)
        .map(|i| {
            let origin = rng.gen_range(0..1000 * MS);
            let drift_ppm = rng.gen_range(-drift..=drift);
            let mut n = Node {
                sm: QuorumNode::start(i, timing, DurableVote::default(), origin, s.flaws),
                origin,
                drift_ppm,
                up: true,
                paused_until: 0,
                down_until: 0,
                life: 0,
            };
            n.sm.set_wanted(rng.gen_bool(0.5));
            n
        })
        .collect();
    let lease = s.lease_ms * MS;
    let faults_end = s.seconds * 1000 * MS;
    let end = faults_end + 10 * lease + 2000 * MS;
    // Cut directions: (from, to) -> until.
    let mut cut: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut queue: InFlight = BTreeMap::new();
    let mut seq = 0u64;
    let mut out = QuorumOutcome::default();
    // Who held each epoch: (node, life).
    let mut epoch_holder: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    let mut last_holder: Option<(u32, u64)> = None;
    let mut settled_wanter: Option<(u32, u64)> = None;

    let mut real = 0u64;
    while real < end {
        let faulty = real < faults_end;
        // Faults and demand, drawn per step.
        if faulty {
            for i in 0..s.nodes {
                let n = &mut nodes[i as usize];
                if rng.gen_bool(0.002) {
                    n.sm.set_wanted(rng.gen_bool(0.6));
                }
                if n.up && rng.gen_bool(0.00005) {
                    n.up = false;
                    n.down_until = real + rng.gen_range(0..3 * lease);
                } else if n.up && real >= n.paused_until && rng.gen_bool(0.00005) {
                    n.paused_until = real + rng.gen_range(0..3 * lease);
                }
            }
            if rng.gen_bool(0.0003) {
                let a = rng.gen_range(0..s.nodes);
                let until = real + rng.gen_range(0..3 * lease);
                if rng.gen_bool(0.5) {
                    // Isolate a node both ways.
                    for b in (0..s.nodes).filter(|&b| b != a) {
                        cut.insert((a, b), until);
                        cut.insert((b, a), until);
                    }
                } else {
                    let b = (a + rng.gen_range(1..s.nodes)) % s.nodes;
                    cut.insert((a, b), until);
                }
            }
        } else if real == faults_end {
            // Heal: every node up and running, no cuts, exactly one node wanting.
            cut.clear();
            let chosen = rng.gen_range(0..s.nodes);
            for (i, n) in nodes.iter_mut().enumerate() {
                n.paused_until = 0;
                n.sm.set_wanted(i as u32 == chosen);
            }
            settled_wanter = Some((chosen, real));
        }
        // Restarts: the node comes back with its durable vote and a new clock.
        for i in 0..s.nodes as usize {
            let n = &mut nodes[i];
            if !n.up && (real >= n.down_until || !faulty) {
                n.up = true;
                n.origin = rng.gen_range(0..1000 * MS);
                // Its clock restarts: local(real) must equal the new origin now.
                let now_rel = real as i128 * (1_000_000 + n.drift_ppm as i128) / 1_000_000;
                n.origin = n.origin.wrapping_sub(now_rel as u64);
                let now = n.local(real);
                n.sm = QuorumNode::start(i as u32, timing, votes[i], now, s.flaws);
                n.life += 1;
                n.sm.set_wanted(match settled_wanter {
                    Some((w, _)) => w == i as u32,
                    None => rng.gen_bool(0.6),
                });
            }
        }
        // Deliver what is due.
        while let Some(entry) = queue.first_entry().filter(|e| e.key().0 <= real) {
            let (to, msg) = entry.remove();
            let to = to as usize;
            if !nodes[to].up {
                continue;
            }
            if !nodes[to].running(real) {
                // A paused process reads its socket when it resumes.
                seq += 1;
                queue.insert((nodes[to].paused_until, seq), (to as u32, msg));
                continue;
            }
            let now = nodes[to].local(real);
            let answers = nodes[to].sm.receive(now, msg);
            votes[to] = nodes[to].sm.durable_vote();
            send(
                &mut queue, &mut seq, &mut rng, &cut, real, faulty, answers, &mut out,
            );
        }
        // Ticks.
        for i in 0..s.nodes as usize {
            if !nodes[i].running(real) {
                continue;
            }
            let now = nodes[i].local(real);
            let asks = nodes[i].sm.tick(now);
            votes[i] = nodes[i].sm.durable_vote();
            send(
                &mut queue, &mut seq, &mut rng, &cut, real, faulty, asks, &mut out,
            );
        }
        // The invariants. A crashed node holds nothing; a paused one still believes.
        let holders: Vec<(u32, u64)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.up)
            .filter_map(|(i, n)| n.sm.holds(n.local(real)).map(|e| (i as u32, e)))
            .collect();
        out.steps += 1;
        if holders.len() > 1 {
            out.violation = Some(format!(
                "at {} ms two nodes hold the lease: {holders:?} (node, epoch)",
                real / MS
            ));
            return out;
        }
        if let Some(&(node, epoch)) = holders.first() {
            out.held_steps += 1;
            let life = nodes[node as usize].life;
            match epoch_holder.get(&epoch) {
                Some(&(other, _)) if other != node => {
                    out.violation = Some(format!(
                        "at {} ms node {node} holds epoch {epoch}, which node {other} held before",
                        real / MS
                    ));
                    return out;
                }
                Some(&(_, earlier)) if earlier != life => {
                    out.violation = Some(format!(
                        "at {} ms node {node} holds epoch {epoch} again after a restart (it held it in an earlier life)",
                        real / MS
                    ));
                    return out;
                }
                _ => {
                    epoch_holder.insert(epoch, (node, life));
                }
            }
            if last_holder != Some((node, epoch)) {
                if let Some((prev, prev_epoch)) = last_holder {
                    if epoch <= prev_epoch {
                        out.violation = Some(format!(
                            "at {} ms node {node} holds epoch {epoch}, not above node {prev}'s earlier epoch {prev_epoch}",
                            real / MS
                        ));
                        return out;
                    }
                }
                out.tenures += 1;
                last_holder = Some((node, epoch));
            }
        }
        if let Some((w, since)) = settled_wanter {
            if real > since + 6 * lease && !holders.iter().any(|&(n, _)| n == w) {
                out.violation = Some(format!(
                    "liveness: {} ms after the faults ended node {w}, the only one wanting, does not hold the lease",
                    (real - since) / MS
                ));
                return out;
            }
        }
        real += MS;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn send(
    queue: &mut InFlight,
    seq: &mut u64,
    rng: &mut ChaCha8Rng,
    cut: &BTreeMap<(u32, u32), u64>,
    real: u64,
    faulty: bool,
    msgs: Vec<(u32, QuorumMessage)>,
    out: &mut QuorumOutcome,
) {
    for (to, m) in msgs {
        let from = sender(&m);
        out.messages += 1;
        if cut.get(&(from, to)).is_some_and(|&until| real < until) {
            continue;
        }
        let copies = if faulty && rng.gen_bool(0.02) {
            0
        } else if faulty && rng.gen_bool(0.02) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if faulty && rng.gen_bool(0.05) {
                rng.gen_range(1000..4000) * MS
            } else {
                rng.gen_range(0..40) * MS
            };
            *seq += 1;
            queue.insert((real + delay, *seq), (to, m.clone()));
        }
    }
}
