//! A lease granted by a majority of voters: the arbiter of shared-nothing mode (issue #17),
//! where there is no shared medium to hold a disk lease. Under Pacemaker, corosync's quorum
//! (with a qdevice as tie-breaker) plays this role and this code is not used; it is the
//! built-in arbiter for clusters that run without Pacemaker, as DRBD 9 has its own quorum.
//! Not wired into the engine yet (see docs/shared-nothing.md); the simulator in
//! `sim/src/quorum.rs` tries to break it.
//!
//! The protocol (majority leases, as in Chubby's master lease or Raft's leader lease):
//! * A candidate sends `Ask { round, epoch }` to every voter (itself included) and notes the
//!   time it sent it, on its own clock. Once a majority granted that round, it holds the lease
//!   until `sent + lease` on its own clock: measured from before any voter's promise began.
//! * A voter grants when it has no unexpired promise to another node and the epoch is new to
//!   it (above every epoch it granted) or is the one it granted last to this same node
//!   (a renewal). It then promises not to grant anyone else for `promise()`, on its own clock:
//!   long enough that, with clocks whose rates differ from real time by at most
//!   `max_drift_ppm`, the holder's belief ends before the promise does.
//! * Each voter grants an epoch to one node only, and keeps its highest granted epoch (and
//!   to whom) durably: two majorities share a voter, so no epoch is ever held by two nodes,
//!   and the owners' epochs (the ownership table's fencing tokens) only grow.
//! * A voter that restarts has forgotten its promises (its clock restarted too): it grants
//!   nothing for `promise()` after it starts.
//! * Answers of an earlier round are ignored: their promises may have begun before the
//!   current round was sent.
//!
//! Times are nanoseconds of the node's own monotonic clock, passed in by the caller, so that
//! the simulator can run clocks at different rates.

use std::collections::BTreeSet;

/// Voters are numbered `0..voters`.
pub type Voter = u32;

/// The protocol's constants; every node of a cluster must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumTiming {
    pub voters: u32,
    /// How long a granted lease lasts on the holder's clock, in nanoseconds.
    pub lease_ns: u64,
    /// The most any node's clock rate may differ from real time, in parts per million.
    pub max_drift_ppm: u64,
}

impl QuorumTiming {
    pub fn majority(&self) -> usize {
        self.voters as usize / 2 + 1
    }

    /// How long a voter keeps a promise, on its own clock: `lease * (1 + d) / (1 - d)`, so
    /// that a voter whose clock runs fast still waits longer in real time than a holder
    /// whose clock runs slow believes.
    pub fn promise_ns(&self) -> u64 {
        let d = self.max_drift_ppm.min(500_000) as u128;
        let p = self.lease_ns as u128 * (1_000_000 + d) / (1_000_000 - d) + 1;
        u64::try_from(p).unwrap_or(u64::MAX)
    }

    /// When a holder asks again to extend its lease.
    pub fn renew_after_ns(&self) -> u64 {
        self.lease_ns / 3
    }

    /// How long a candidate waits for a round's answers before it asks again.
    pub fn retry_ns(&self) -> u64 {
        self.lease_ns / 4
    }
}

/// Deliberate mistakes, for the simulator's own tests: each one must be caught. The daemon
/// never sets any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flaws {
    /// Promise exactly `lease`, ignoring clock drift.
    pub no_drift_margin: bool,
    /// Grant at once after a restart.
    pub no_quiet_after_restart: bool,
    /// Count grants of any round, not only the current one.
    pub count_stale_answers: bool,
    /// Grant an epoch to whoever asks, if no promise is running.
    pub reuse_epochs: bool,
    /// Keep no record of the epochs asked for: a restarted node may hold its old epoch again.
    pub forget_asked_epochs: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuorumMessage {
    Ask {
        from: Voter,
        round: u64,
        epoch: u64,
    },
    Answer {
        from: Voter,
        round: u64,
        epoch: u64,
        granted: bool,
        /// The highest epoch the voter has granted (so a refused candidate asks above it).
        seen_epoch: u64,
    },
}

/// What a voter must keep across restarts (on its NVRAM or disk) before it answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurableVote {
    /// The highest epoch granted, and to whom.
    pub epoch: u64,
    pub holder: Option<Voter>,
    /// The highest epoch this node asked for as a candidate. A restarted node asks above it,
    /// so no two of its lives hold the same epoch (a voter's renewal rule would otherwise
    /// grant a restarted node the epoch it held before): the epoch-fenced register
    /// (`register`) needs each epoch to have one writer instance only.
    pub asked: u64,
}

#[derive(Clone, Copy, Debug)]
struct Promise {
    holder: Voter,
    until: u64,
}

#[derive(Clone, Debug)]
struct Asking {
    round: u64,
    epoch: u64,
    sent: u64,
    granted: BTreeSet<Voter>,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    epoch: u64,
    until: u64,
}

/// One node: a voter, and a candidate when it wants the lease.
pub struct QuorumNode {
    me: Voter,
    timing: QuorumTiming,
    flaws: Flaws,
    vote: DurableVote,
    promise: Option<Promise>,
    quiet_until: u64,
    /// The highest epoch any voter said it granted (not durable: a new tenure asks above it).
    highest_seen: u64,
    wanted: bool,
    round: u64,
    asking: Option<Asking>,
    held: Option<Held>,
    next_ask: u64,
}

impl QuorumNode {
    /// A node starting (or restarting) at `now` on its clock, with the vote it kept.
    pub fn start(
        me: Voter,
        timing: QuorumTiming,
        vote: DurableVote,
        now: u64,
        flaws: Flaws,
    ) -> QuorumNode {
        let quiet_until = if flaws.no_quiet_after_restart {
            now
        } else {
            now.saturating_add(promise_ns(&timing, flaws))
        };
        QuorumNode {
            me,
            timing,
            flaws,
            vote,
            promise: None,
            quiet_until,
            highest_seen: if flaws.forget_asked_epochs {
                vote.epoch
            } else {
                vote.epoch.max(vote.asked)
            },
            wanted: false,
            round: 0,
            asking: None,
            held: None,
            next_ask: now,
        }
    }

    /// The vote to keep durably (changed by a grant and by the ask of a new tenure; store it
    /// before sending the answer or the asks).
    pub fn durable_vote(&self) -> DurableVote {
        self.vote
    }

    pub fn set_wanted(&mut self, wanted: bool) {
        self.wanted = wanted;
        if !wanted {
            self.asking = None;
        }
    }

    /// The epoch of the lease this node holds at `now`, if it holds one.
    pub fn holds(&self, now: u64) -> Option<u64> {
        self.held.filter(|h| now < h.until).map(|h| h.epoch)
    }

    /// Time passes: starts a round when one is due. Returns the messages to send (to every
    /// other voter); the node's own vote is counted inside.
    pub fn tick(&mut self, now: u64) -> Vec<(Voter, QuorumMessage)> {
        if !self.wanted || now < self.next_ask {
            return Vec::new();
        }
        let holding = self.held.filter(|h| now < h.until);
        if let Some(h) = holding {
            // The round that gave the lease was sent at `until - lease`.
            let sent = h.until - self.timing.lease_ns;
            if now < sent + self.timing.renew_after_ns() {
                return Vec::new();
            }
        }
        self.round += 1;
        let epoch = match holding {
            Some(h) => h.epoch,
            None => {
                // Above `asked` after a restart too: `start` counts it as seen.
                let epoch = self.vote.epoch.max(self.highest_seen) + 1;
                if !self.flaws.forget_asked_epochs {
                    self.vote.asked = self.vote.asked.max(epoch);
                }
                epoch
            }
        };
        self.asking = Some(Asking {
            round: self.round,
            epoch,
            sent: now,
            granted: BTreeSet::new(),
        });
        self.next_ask = now + self.timing.retry_ns();
        let ask = QuorumMessage::Ask {
            from: self.me,
            round: self.round,
            epoch,
        };
        let mine = self.receive(now, ask.clone());
        for (to, answer) in mine {
            assert_eq!(to, self.me);
            self.receive(now, answer);
        }
        (0..self.timing.voters)
            .filter(|&v| v != self.me)
            .map(|v| (v, ask.clone()))
            .collect()
    }

    /// A message arrived at `now`; returns the answer to send, if any.
    pub fn receive(&mut self, now: u64, msg: QuorumMessage) -> Vec<(Voter, QuorumMessage)> {
        match msg {
            QuorumMessage::Ask { from, round, epoch } => {
                let granted = self.may_grant(now, from, epoch);
                if granted {
                    self.vote = DurableVote {
                        epoch,
                        holder: Some(from),
                        ..self.vote
                    };
                    self.promise = Some(Promise {
                        holder: from,
                        until: now.saturating_add(promise_ns(&self.timing, self.flaws)),
                    });
                }
                vec![(
                    from,
                    QuorumMessage::Answer {
                        from: self.me,
                        round,
                        epoch,
                        granted,
                        seen_epoch: self.vote.epoch,
                    },
                )]
            }
            QuorumMessage::Answer {
                from,
                round,
                epoch,
                granted,
                seen_epoch,
            } => {
                self.on_answer(from, round, epoch, granted, seen_epoch);
                Vec::new()
            }
        }
    }

    fn may_grant(&self, now: u64, from: Voter, epoch: u64) -> bool {
        if now < self.quiet_until {
            return false;
        }
        if self
            .promise
            .is_some_and(|p| p.holder != from && now < p.until)
        {
            return false;
        }
        if self.flaws.reuse_epochs {
            return epoch >= self.vote.epoch;
        }
        epoch > self.vote.epoch || (epoch == self.vote.epoch && self.vote.holder == Some(from))
    }

    fn on_answer(&mut self, from: Voter, round: u64, epoch: u64, granted: bool, seen: u64) {
        // A new tenure asks above the highest epoch anyone granted.
        self.highest_seen = self.highest_seen.max(seen);
        if !granted {
            return;
        }
        let Some(a) = self.asking.as_mut() else {
            return;
        };
        if a.epoch != epoch || (a.round != round && !self.flaws.count_stale_answers) {
            return;
        }
        a.granted.insert(from);
        if a.granted.len() >= self.timing.majority() {
            let until = a.sent + self.timing.lease_ns;
            if self
                .held
                .is_none_or(|h| h.epoch != a.epoch || h.until < until)
            {
                self.held = Some(Held {
                    epoch: a.epoch,
                    until,
                });
            }
        }
    }
}

fn promise_ns(timing: &QuorumTiming, flaws: Flaws) -> u64 {
    if flaws.no_drift_margin {
        timing.lease_ns
    } else {
        timing.promise_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: QuorumTiming = QuorumTiming {
        voters: 3,
        lease_ns: 3_000_000_000,
        max_drift_ppm: 1000,
    };

    fn deliver(nodes: &mut [QuorumNode], now: u64, mut out: Vec<(Voter, QuorumMessage)>) {
        while let Some((to, m)) = out.pop() {
            let more = nodes[to as usize].receive(now, m);
            out.extend(more);
        }
    }

    #[test]
    fn one_candidate_gets_the_lease_renews_it_and_a_second_waits_for_the_promise() {
        let quiet = T.promise_ns();
        let mut n: Vec<QuorumNode> = (0..3)
            .map(|i| QuorumNode::start(i, T, DurableVote::default(), 0, Flaws::default()))
            .collect();
        n[0].set_wanted(true);
        // Voters are quiet after their start.
        let out = n[0].tick(1);
        deliver(&mut n, 1, out);
        assert_eq!(n[0].holds(1), None);
        let t = quiet + 1;
        let out = n[0].tick(t);
        deliver(&mut n, t, out);
        assert_eq!(n[0].holds(t), Some(1));
        // Renewal keeps the epoch and extends the lease.
        let t2 = t + T.renew_after_ns();
        let out = n[0].tick(t2);
        deliver(&mut n, t2, out);
        assert_eq!(n[0].holds(t + T.lease_ns + 1), Some(1));
        // Node 1 asks while node 0's promises run: refused by the others.
        n[1].set_wanted(true);
        let out = n[1].tick(t2 + 1);
        deliver(&mut n, t2 + 1, out);
        assert_eq!(n[1].holds(t2 + 1), None);
        // Node 0 stops renewing; once the promises ran out node 1 gets a higher epoch.
        n[0].set_wanted(false);
        let later = t2 + T.promise_ns() + 1;
        assert_eq!(n[0].holds(later), None);
        let out = n[1].tick(later);
        deliver(&mut n, later, out);
        assert_eq!(n[1].holds(later), Some(2));
        assert_eq!(
            n[2].durable_vote(),
            DurableVote {
                epoch: 2,
                holder: Some(1),
                asked: 0
            }
        );
    }

    /// Node 0 holds epoch 2 granted by the others while its own vote is still 1 (it was quiet
    /// after a restart), then restarts again: it must not hold epoch 2 in its new life.
    fn epoch_after_two_restarts(flaws: Flaws) -> Option<u64> {
        let quiet = T.promise_ns();
        let mut n: Vec<QuorumNode> = (0..3)
            .map(|i| QuorumNode::start(i, T, DurableVote::default(), 0, flaws))
            .collect();
        // Epoch 1 goes to node 1 with every vote; its promises then run out.
        n[1].set_wanted(true);
        let t = quiet + 1;
        let out = n[1].tick(t);
        deliver(&mut n, t, out);
        assert_eq!(n[1].holds(t), Some(1));
        n[1].set_wanted(false);
        // Node 0 restarts with its vote (epoch 1) and, quiet itself, gets epoch 2 from the
        // two others.
        let t = t + quiet + 1;
        n[0] = QuorumNode::start(0, T, n[0].durable_vote(), t, flaws);
        n[0].set_wanted(true);
        let out = n[0].tick(t);
        deliver(&mut n, t, out);
        assert_eq!(n[0].holds(t), Some(2));
        assert_eq!(n[0].durable_vote().epoch, 1);
        // It restarts again at once and asks: the others' last grant was epoch 2, to it.
        n[0] = QuorumNode::start(0, T, n[0].durable_vote(), t + 1, flaws);
        n[0].set_wanted(true);
        let mut held = None;
        for step in 1..4 {
            let now = t + 1 + step * T.retry_ns();
            let out = n[0].tick(now);
            deliver(&mut n, now, out);
            held = held.or(n[0].holds(now));
        }
        held
    }

    #[test]
    fn a_restarted_node_never_holds_an_epoch_it_held_before() {
        let again = epoch_after_two_restarts(Flaws::default());
        assert!(again.is_some_and(|e| e > 2), "{again:?}");
        // Without the record of the epochs asked for, the renewal rule gives it epoch 2 again.
        let flawed = epoch_after_two_restarts(Flaws {
            forget_asked_epochs: true,
            ..Flaws::default()
        });
        assert_eq!(flawed, Some(2));
    }

    #[test]
    fn the_promise_outlasts_the_lease_by_the_drift_on_both_clocks() {
        let p = T.promise_ns();
        // 3 s * 1.001 / 0.999
        assert!(p > 3_006_000_000 && p < 3_006_100_000, "{p}");
        assert_eq!(T.majority(), 2);
        let five = QuorumTiming { voters: 5, ..T };
        assert_eq!(five.majority(), 3);
    }
}
