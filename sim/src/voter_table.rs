//! The arbiter's slots on three voters instead of the shared disk (`--voter-table`, issue
//! #17): each node's slot store is the daemon's register client with its ballots
//! (`cluster::register_store::Ballots`), asking three real `RegisterVoter`s: node 0's, node
//! 1's and a diskless tie-breaker's. Each message is delivered at once, lost, or held back
//! and delivered during a later operation of either node: a request that timed out surfaces
//! late, as over a network, even after its node died and restarted. A node reaches the
//! other node's voter only while that node runs and the link between them is not cut in
//! that direction (the mirror link's cuts, unless the seed keeps the vote link separate),
//! with `--vote-cuts` a node's link to either other voter fails on its own, both ways or
//! only for the answers (`Fault::VoteCut`), and with its disk path failed (`Fault::PathFailure`) it reaches only
//! its own voter, so it has no majority. Voters keep their state through kills and power cuts
//! (the daemon stores it before each answer), and so does each node's ballot round.
//!
//! An operation is atomic in simulated time: it runs to its outcome, or to "no majority"
//! (the store's timeout) once no message is left to deliver.

use crate::disk::SimDisk;
use crate::net::SimNet;
use nvmirror::cluster::quorum::Voter;
use nvmirror::cluster::register::{Flaws, Outcome, RegisterClient, RegisterMessage, RegisterVoter};
use nvmirror::cluster::register_store::{check_write, fill_slot, Ballots, Exchange};
use nvmirror::ownership::TableStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// The tie-breaker's voter number (the data nodes are voters 0 and 1).
const TIEBREAKER: Voter = crate::faults::TIEBREAKER_VOTER;
const VOTERS: u32 = 3;

/// A node's link to a voter, as a vote cut cuts it: both ways, or only the voter's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoteLink {
    pub node: usize,
    pub voter: Voter,
    pub answers_only: bool,
}

/// Where a message goes: a voter, or the client of a node's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum To {
    Voter(Voter),
    Client { node: usize, life: u32 },
}

struct Held {
    to: To,
    /// Who asked (a request's client), so that the answer finds its way back.
    origin: (usize, u32),
    msg: RegisterMessage,
}

struct State {
    voters: Vec<RegisterVoter>,
    /// Messages held back by the network.
    held: Vec<Held>,
    /// Per node: the highest ballot round it stored.
    rounds: Vec<u64>,
    /// Per node: running (its voter answers).
    running: Vec<bool>,
    /// (node, voter, answers only): how many vote cuts between that node and that voter are
    /// in force (both ways, or only the voter's answers).
    vote_cuts: BTreeMap<(usize, Voter, bool), u32>,
    rng: ChaCha8Rng,
    late: u64,
    /// Operations run (each try of a read or a write), and ballot rounds taken after a
    /// refusal: how often the nodes take slots from each other.
    operations: u64,
    new_rounds: u64,
    /// The faults are over: every message arrives, those held back at the next operation.
    calm: bool,
}

pub struct VoterTable {
    /// Tries per operation.
    tries: u32,
    /// The pair's vote link does not share the mirror link's cuts.
    separate_vote_link: bool,
    state: Mutex<State>,
    net: Arc<SimNet>,
    disk: Arc<SimDisk>,
}

impl VoterTable {
    /// `net` for the cuts between the nodes (unless `separate_vote_link`), `disk` for the
    /// nodes' path failures; each operation tried `tries` times (the daemon's
    /// `register_store::ATTEMPTS`, or fewer).
    pub fn new(
        seed: u64,
        nodes: usize,
        tries: u32,
        separate_vote_link: bool,
        net: Arc<SimNet>,
        disk: Arc<SimDisk>,
    ) -> Arc<Self> {
        Arc::new(VoterTable {
            tries,
            separate_vote_link,
            state: Mutex::new(State {
                voters: vec![RegisterVoter::default(); VOTERS as usize],
                held: Vec::new(),
                rounds: vec![0; nodes],
                running: vec![false; nodes],
                vote_cuts: BTreeMap::new(),
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0x766f_7465_7273),
                late: 0,
                operations: 0,
                new_rounds: 0,
                calm: false,
            }),
            net,
            disk,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `node`'s store for its life `life` (a new ballot round, as the daemon's start).
    pub fn view(self: &Arc<Self>, node: usize, life: u32) -> VoterTableView {
        let round = {
            let mut st = self.state();
            st.rounds[node] += 1;
            st.running[node] = true;
            st.rounds[node]
        };
        VoterTableView {
            table: self.clone(),
            node,
            life,
            ballots: Mutex::new(
                Ballots::new(node as Voter, VOTERS, round).with_attempts(self.tries),
            ),
        }
    }

    /// The node's process ended (kill -9 or power cut): its voter stops answering.
    pub fn stopped(&self, node: usize) {
        self.state().running[node] = false;
    }

    /// The faults are over (the network heals): no message is lost or held back from now.
    pub fn calm(&self) {
        let mut st = self.state();
        st.calm = true;
        st.vote_cuts.clear();
    }

    /// A cut of `link` starts (`cut`) or ends; cuts may overlap.
    pub fn set_vote_cut(&self, link: VoteLink, cut: bool) {
        let mut st = self.state();
        let key = (link.node, link.voter, link.answers_only);
        let n = st.vote_cuts.entry(key).or_insert(0);
        if cut {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.vote_cuts.remove(&key);
            }
        }
    }

    /// Messages that were held back and delivered late, so far.
    pub fn late_deliveries(&self) -> u64 {
        self.state().late
    }

    /// Operations run, and ballot rounds taken after a refusal, so far.
    pub fn operations_and_new_rounds(&self) -> (u64, u64) {
        let st = self.state();
        (st.operations, st.new_rounds)
    }

    /// Whether a message between `node`'s client and `voter` can travel now.
    fn reachable(&self, st: &State, node: usize, voter: Voter, to_voter: bool) -> bool {
        if voter as usize == node {
            return true; // its own voter, in its own process
        }
        if self.disk.path_failed(node)
            || st.vote_cuts.contains_key(&(node, voter, false))
            || (!to_voter && st.vote_cuts.contains_key(&(node, voter, true)))
        {
            return false;
        }
        if voter == TIEBREAKER {
            return true;
        }
        let other = voter as usize;
        let (from, to) = if to_voter {
            (node, other)
        } else {
            (other, node)
        };
        st.running[other] && (self.separate_vote_link || !self.net.is_cut(from, to))
    }

    /// Whether `node`'s client reaches a majority of the voters both ways now (its own
    /// counts).
    pub fn reaches_majority(&self, node: usize) -> bool {
        let st = self.state();
        let reached = (0..VOTERS)
            .filter(|&v| self.reachable(&st, node, v, true) && self.reachable(&st, node, v, false))
            .count() as u32;
        reached > VOTERS / 2
    }

    /// Sends `msg`: to the queue of this operation, held back, or lost.
    fn send(&self, st: &mut State, queue: &mut VecDeque<Held>, h: Held) {
        let (voter, to_voter) = match h.to {
            To::Voter(v) => (v, true),
            To::Client { .. } => match &h.msg {
                RegisterMessage::Value { from, .. }
                | RegisterMessage::Stored { from, .. }
                | RegisterMessage::Refused { from, .. } => (*from, false),
                _ => return,
            },
        };
        if !self.reachable(st, h.origin.0, voter, to_voter) {
            return;
        }
        if voter as usize == h.origin.0 || st.calm {
            queue.push_back(h);
            return;
        }
        // Mostly delivered; 3% lost, 5% held back (and so late).
        match st.rng.gen_range(0..100) {
            0..92 => queue.push_back(h),
            92..95 => {}
            _ => st.held.push(h),
        }
    }

    /// Runs one operation of `client` (node `node`, life `life`) to its outcome.
    fn pump(
        &self,
        node: usize,
        life: u32,
        client: &mut RegisterClient,
        sends: Vec<(Voter, RegisterMessage)>,
    ) -> Outcome {
        let mut st = self.state();
        st.operations += 1;
        let mut queue = VecDeque::new();
        let origin = (node, life);
        for (v, msg) in sends {
            let h = Held {
                to: To::Voter(v),
                origin,
                msg,
            };
            self.send(&mut st, &mut queue, h);
        }
        // Messages held back may arrive now, each with even odds: a write that timed out
        // surfaces when a later operation meets it.
        let mut i = 0;
        while i < st.held.len() {
            if st.calm || st.rng.gen_bool(0.5) {
                let h = st.held.swap_remove(i);
                st.late += 1;
                queue.push_back(h);
            } else {
                i += 1;
            }
        }
        while let Some(h) = queue.pop_front() {
            match h.to {
                To::Voter(v) => {
                    let Some(answer) = st.voters[v as usize].answer(v, &h.msg, Flaws::default())
                    else {
                        continue;
                    };
                    let back = Held {
                        to: To::Client {
                            node: h.origin.0,
                            life: h.origin.1,
                        },
                        origin: h.origin,
                        msg: answer,
                    };
                    self.send(&mut st, &mut queue, back);
                }
                // Only this operation's client is listening; any other client's answer
                // arrives to an operation that ended (or a process that did).
                To::Client { node: n, life: l } if (n, l) == origin => {
                    let (outcome, more) = client.receive(h.msg);
                    for (v, msg) in more {
                        let h = Held {
                            to: To::Voter(v),
                            origin,
                            msg,
                        };
                        self.send(&mut st, &mut queue, h);
                    }
                    if let Some(o) = outcome {
                        return o;
                    }
                }
                To::Client { .. } => {}
            }
        }
        client.tick(u64::MAX).unwrap_or(Outcome::TimedOut)
    }
}

/// One node's slot store for one life.
pub struct VoterTableView {
    table: Arc<VoterTable>,
    node: usize,
    life: u32,
    ballots: Mutex<Ballots>,
}

/// The simulator's exchange: `pump`, in zero simulated time.
struct Pump<'a> {
    view: &'a VoterTableView,
}

impl Exchange for Pump<'_> {
    fn exchange(
        &mut self,
        client: &mut RegisterClient,
        sends: Vec<(Voter, RegisterMessage)>,
    ) -> Outcome {
        let v = self.view;
        v.table.pump(v.node, v.life, client, sends)
    }

    fn deadline(&self) -> u64 {
        // No simulated time passes in an operation: `pump` ends it.
        1
    }

    fn persist_round(&mut self, round: u64) -> io::Result<()> {
        let v = self.view;
        let mut st = v.table.state();
        st.rounds[v.node] = round;
        st.new_rounds += 1;
        Ok(())
    }
}

impl TableStore for VoterTableView {
    fn place(&self) -> nvmirror::ownership::ArbiterPlace {
        nvmirror::ownership::ArbiterPlace::Voters
    }

    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let data = self.ballots().read(slot, &mut Pump { view: self })?;
        fill_slot(slot, &data, out)
    }

    fn read_slot_settled(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let data = self
            .ballots()
            .read_settled(slot, &mut Pump { view: self })?;
        fill_slot(slot, &data, out)
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        check_write(slot, data)?;
        self.ballots().write(slot, data, &mut Pump { view: self })
    }
}

impl VoterTableView {
    fn ballots(&self) -> MutexGuard<'_, Ballots> {
        self.ballots.lock().unwrap_or_else(|p| p.into_inner())
    }
}
