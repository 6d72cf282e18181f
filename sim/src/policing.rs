//! The simulator of the policing protocol (`nvmirror::cluster::policing`): 2 or 3 nodes run
//! the production state machine while writes arrive at every node for a few portions, in
//! 10 µs steps. Messages between two nodes keep their order and take 5 µs to 5 ms (one in 50
//! up to 50 ms); a write runs 20 µs to 2 ms once started. One seed draws it all.
//!
//! Checked at every step: no portion has writes running on two nodes; at most one node holds
//! a portion; each node starts a portion's writes in the order they arrived; and each new
//! holder's epoch is above the last. At the end every write has run (none waits forever).

use nvmirror::cluster::policing::{Action, Flaws, Policing, PolicingMessage, Portion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};

const US: u64 = 1_000;

#[derive(Clone, Copy, Debug)]
pub struct PolicingSettings {
    pub nodes: u32,
    pub portions: u64,
    pub writes_per_node: u64,
    /// Probability that a write goes to portion 0, which every node writes (contention);
    /// the rest go to portions whose initial holder is the writing node.
    pub shared_share: f64,
    /// Minimum hold after a grant, in µs.
    pub min_hold_us: u64,
    pub flaws: Flaws,
}

impl Default for PolicingSettings {
    fn default() -> Self {
        PolicingSettings {
            nodes: 2,
            portions: 8,
            writes_per_node: 400,
            shared_share: 0.5,
            min_hold_us: 1000,
            flaws: Flaws::default(),
        }
    }
}

#[derive(Debug, Default)]
pub struct PolicingOutcome {
    pub violation: Option<String>,
    pub writes: u64,
    /// Mean time from a write's arrival to its start, for portion 0 (contended) and the
    /// others, in µs.
    pub mean_wait_shared_us: f64,
    pub mean_wait_own_us: f64,
    pub handovers: u64,
    pub messages: u64,
}

struct Channel {
    queue: VecDeque<(u64, PolicingMessage)>,
    /// Delivery time of the last message queued (order is kept).
    last: u64,
}

/// Runs one seed.
pub fn run_policing(seed: u64, s: PolicingSettings) -> PolicingOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = s.nodes;
    let portions = s.portions.max(n as u64 + 1);
    // Portion 0 is node 0's at first; portion p > 0 is node (p - 1) % n's.
    let owner = move |p: Portion| {
        if p == 0 {
            0
        } else {
            ((p - 1) % n as u64) as u32
        }
    };
    let mut nodes: Vec<Policing> = (0..n)
        .map(|i| Policing::new(i, s.min_hold_us * US, Box::new(owner), s.flaws))
        .collect();
    let mut channels: BTreeMap<(u32, u32), Channel> = BTreeMap::new();
    // Per write: arrival time, node, portion.
    let mut arrived: BTreeMap<u64, (u64, u32, Portion)> = BTreeMap::new();
    // Per (node, portion): arrival order of its writes, to check the start order.
    let mut expected: BTreeMap<(u32, Portion), VecDeque<u64>> = BTreeMap::new();
    // Running writes: completion time -> (node, portion, write).
    let mut running: BTreeMap<(u64, u64), (u32, Portion)> = BTreeMap::new();
    let mut out = PolicingOutcome::default();
    let (mut wait_shared, mut n_shared, mut wait_own, mut n_own) = (0u64, 0u64, 0u64, 0u64);
    let mut last_epoch: BTreeMap<Portion, u64> = BTreeMap::new();
    let mut next_write = 0u64;
    let mut submitted = vec![0u64; n as usize];
    let mut started = 0u64;
    let total = s.writes_per_node * n as u64;

    let mut now = 0u64;
    let deadline = 60_000_000 * US;
    while started < total || !running.is_empty() {
        if now > deadline {
            out.violation = Some(format!(
                "liveness: after 60 s, {} of {total} writes have not started",
                total - started
            ));
            return out;
        }
        let mut actions: Vec<(u32, Action)> = Vec::new();
        // New writes: each node about every 100 µs until its share is in.
        for i in 0..n {
            if submitted[i as usize] < s.writes_per_node && rng.gen_bool(0.1) {
                submitted[i as usize] += 1;
                let portion = if rng.gen_bool(s.shared_share) {
                    0
                } else {
                    // One of the node's own portions.
                    let own: Vec<Portion> = (1..portions).filter(|&p| owner(p) == i).collect();
                    own[rng.gen_range(0..own.len())]
                };
                let w = next_write;
                next_write += 1;
                arrived.insert(w, (now, i, portion));
                expected.entry((i, portion)).or_default().push_back(w);
                for a in nodes[i as usize].submit(now, portion, w) {
                    actions.push((i, a));
                }
            }
        }
        // Completions due.
        while let Some((&(at, w), &(i, portion))) = running.iter().next() {
            if at > now {
                break;
            }
            running.remove(&(at, w));
            for a in nodes[i as usize].completed(now, portion) {
                actions.push((i, a));
            }
        }
        // Deliveries due, in order per channel.
        for (&(from, to), ch) in channels.iter_mut() {
            while ch.queue.front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, m)) = ch.queue.pop_front() else {
                    break;
                };
                let _ = from;
                for a in nodes[to as usize].receive(now, m) {
                    actions.push((to, a));
                }
            }
        }
        for i in 0..n {
            for a in nodes[i as usize].tick(now) {
                actions.push((i, a));
            }
        }
        // Carry the actions out (sends may cascade only through later steps).
        for (i, a) in actions {
            match a {
                Action::Start(w) => {
                    let Some(&(at, node, portion)) = arrived.get(&w) else {
                        out.violation = Some(format!("node {i} started unknown write {w}"));
                        return out;
                    };
                    if node != i {
                        out.violation = Some(format!("node {i} started node {node}'s write {w}"));
                        return out;
                    }
                    let first = expected.get_mut(&(i, portion)).and_then(|q| q.pop_front());
                    if first != Some(w) {
                        out.violation = Some(format!(
                            "at {} µs node {i} started write {w} of portion {portion} before write {first:?}, which arrived first",
                            now / US
                        ));
                        return out;
                    }
                    if portion == 0 {
                        wait_shared += now - at;
                        n_shared += 1;
                    } else {
                        wait_own += now - at;
                        n_own += 1;
                    }
                    started += 1;
                    let took = rng.gen_range(20..2000) * US;
                    running.insert((now + took, w), (i, portion));
                }
                Action::Send(to, m) => {
                    out.messages += 1;
                    let delay = if rng.gen_bool(0.02) {
                        rng.gen_range(5..50_000)
                    } else {
                        rng.gen_range(5..5_000)
                    } * US;
                    let ch = channels.entry((i, to)).or_insert(Channel {
                        queue: VecDeque::new(),
                        last: 0,
                    });
                    let at = (now + delay).max(ch.last);
                    ch.last = at;
                    ch.queue.push_back((at, m));
                }
            }
        }
        // Invariants.
        for p in 0..portions {
            let runners: Vec<u32> = {
                let mut r: Vec<u32> = running
                    .values()
                    .filter(|&&(_, q)| q == p)
                    .map(|&(i, _)| i)
                    .collect();
                r.sort_unstable();
                r.dedup();
                r
            };
            if runners.len() > 1 {
                out.violation = Some(format!(
                    "at {} µs portion {p} has writes running on nodes {runners:?}",
                    now / US
                ));
                return out;
            }
            let holders: Vec<(u32, u64)> = (0..n)
                .filter_map(|i| nodes[i as usize].holds(p).map(|e| (i, e)))
                .collect();
            if holders.len() > 1 {
                out.violation = Some(format!(
                    "at {} µs portion {p} is held by {holders:?} (node, epoch)",
                    now / US
                ));
                return out;
            }
            if let Some(&(_, e)) = holders.first() {
                let last = last_epoch.entry(p).or_insert(e);
                if e < *last {
                    out.violation = Some(format!(
                        "at {} µs portion {p} went back to epoch {e} from {last}",
                        now / US
                    ));
                    return out;
                }
                *last = e;
            }
        }
        now += 10 * US;
    }
    out.writes = started;
    out.mean_wait_shared_us = wait_shared as f64 / n_shared.max(1) as f64 / US as f64;
    out.mean_wait_own_us = wait_own as f64 / n_own.max(1) as f64 / US as f64;
    out.handovers = nodes.iter().map(|p| p.handed_over).sum();
    out
}
