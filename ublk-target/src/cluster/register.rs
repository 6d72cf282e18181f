//! Slots kept by a majority of voters, for an arbiter without a shared medium (issue #17):
//! what would let the arbiter's 4 KiB slots (`ownership::TableStore`: the ownership table,
//! the flush and outdated marks) live on three voters instead of a disk (`[cluster.voters]`,
//! through `register_store` and `voter_arbiter`; docs/shared-nothing.md, "Arbitration without
//! a shared medium"). The simulator in `sim/src/register.rs` tries to break it.
//!
//! Why not a plain majority register (Attiya, Bar-Noy and Dolev): a write that timed out
//! after reaching a minority can surface much later, when a read first meets it, and so land
//! after newer writes. A disk bounds a late write by its I/O timeout and the watchdog; a
//! network does not. So every request carries an epoch, as a Paxos ballot (the register of
//! CASPaxos, with one writer per epoch):
//! * Each client instance has an epoch no other instance ever had: the majority lease's
//!   epochs (`cluster::quorum`: a restarted node never asks for an epoch it held), or for a
//!   node's own slots the node's id and a durable count of its starts.
//! * A voter keeps per slot a fence, the highest epoch any request for the slot showed it,
//!   and the value with the highest tag `(epoch, counter)` it was sent. It refuses a write
//!   or a prepare of an epoch below the slot's fence (saying the fence), and raises the
//!   fence to the epoch of those it takes. All of it durably, before it answers. The fences are per slot (CASPaxos's per key), so each slot may have its own
//!   writers, as the arbiter's slots do (each node writes its own lease heartbeat).
//! * A write of epoch E tags its value `(E, n)`, n counting this instance's writes, and is
//!   done once a majority stored it. Every older epoch is below it; a newer epoch's completed
//!   prepare or write of the slot fenced a majority, one of which refuses this write, so it
//!   cannot complete.
//! * A client's first write of a slot prepares it: a `Prepare`, which reads the slot and
//!   fences a majority at the client's epoch (Paxos's prepare). Without it a lower epoch could complete a write on
//!   a majority that never saw a higher epoch's failed one, which, held by a minority under
//!   its higher tag, would surface over it later (`Flaws::no_prepare`; the register
//!   simulator's `check_failed_writes` catches it).
//! * A read asks a majority for the slot and takes the highest tag. Unless a majority
//!   answered that very tag, it writes that value back under its own epoch (or the value's,
//!   if newer) before it returns, so that the value it returns is on a majority above
//!   anything older: a late write of an older epoch can then never be read again.
//! * A read fences nothing and no voter refuses one (since 2026-12-07): each node reads the
//!   other's lease heartbeat, and a fencing read took the slot from its writer every time,
//!   whose next write was refused and tried again under a newer ballot (a round trip and a
//!   synced ballot file per heartbeat). Only a read that must write a value back under its
//!   own epoch fences, with a prepare first, as a write (`Flaws::unfenced_write_back`).
//!
//! * A settling read (`read_settled`; what a node serves by after a start or a lease
//!   regained) prepares as a write does, and always writes the newest value it saw back
//!   under a new tag of its epoch: no write that failed before it began can surface after
//!   it, unless it returned that write's value (a plain read leaves such a write, held by a
//!   minority under a higher tag, to surface at a later read).
//!
//! So reads and writes are linearizable (each completed operation sees every operation that
//! completed before it began), and a write that failed or timed out surfaces, if ever,
//! before the next write that began after it failed completes, never after it, as a disk's
//! late write. (Not before the next newer epoch's *read*, as this said before 2026-12-06: a
//! read that asks a majority without the voter holding the failed write leaves it there.)
//!
//! One operation at a time per client, as the synchronous `TableStore` calls it. Times are
//! nanoseconds of the caller's clock, used only for the operation's deadline.

use super::quorum::Voter;
use std::collections::{BTreeMap, BTreeSet};

/// Orders the values of a slot: the writer's epoch, then its count of writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag {
    pub epoch: u64,
    pub counter: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterMessage {
    /// Asks for the slot's value; fences nothing and is never refused, so that reading
    /// another writer's slot (a node reads the other's lease heartbeat) does not take the
    /// slot from it.
    Read {
        from: Voter,
        op: u64,
        slot: u64,
        epoch: u64,
    },
    /// A write's prepare: asks for the slot's value and fences the slot at `epoch`.
    Prepare {
        from: Voter,
        op: u64,
        slot: u64,
        epoch: u64,
    },
    Write {
        from: Voter,
        op: u64,
        slot: u64,
        /// Always of the writer's epoch (a read's write-back re-tags an older value), which
        /// the voter fences on.
        tag: Tag,
        data: Vec<u8>,
    },
    /// The answers name the operation by its id and its client's epoch: a restarted node's
    /// new client counts its ids from 1 again, and must not take the late answers to its
    /// earlier life's operations for its own.
    Value {
        from: Voter,
        op: u64,
        epoch: u64,
        tag: Tag,
        data: Vec<u8>,
    },
    Stored {
        from: Voter,
        op: u64,
        epoch: u64,
    },
    Refused {
        from: Voter,
        op: u64,
        epoch: u64,
        fence: u64,
    },
}

/// Deliberate mistakes, for the simulator's own tests: each one must be caught. The daemon
/// never sets any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flaws {
    /// Voters store and answer requests of any epoch (no fence).
    pub no_fence: bool,
    /// Reads return the highest tag they saw without writing it back.
    pub no_write_back: bool,
    /// Clients match answers by operation id alone.
    pub ignore_answer_epochs: bool,
    /// Writes go out without first fencing a majority with a prepare.
    pub no_prepare: bool,
    /// A completed read counts as the prepare of the client's later writes of the slot (it
    /// fenced a majority before reads stopped fencing, 2026-12-07; now it fences nothing).
    pub reads_prepare: bool,
    /// A read writes a value back under its own epoch without first fencing a majority.
    pub unfenced_write_back: bool,
    /// A settling read is a plain read.
    pub unsettled_reads: bool,
}

/// One voter's state; all of it is durable (store it before sending the answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterVoter {
    /// Per slot: the highest epoch a request showed, and the value with the highest tag.
    slots: BTreeMap<u64, Slot>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Slot {
    fence: u64,
    tag: Tag,
    data: Vec<u8>,
}

impl RegisterVoter {
    /// Answers a request (None for anything else).
    pub fn answer(
        &mut self,
        me: Voter,
        msg: &RegisterMessage,
        flaws: Flaws,
    ) -> Option<RegisterMessage> {
        let (op, slot, epoch) = match *msg {
            RegisterMessage::Read {
                op, slot, epoch, ..
            } => {
                // Fences nothing, so no need to refuse it either: what a read returns rests
                // on the majorities meeting, and its write-back is a write, fenced as any.
                let held = self.slots.get(&slot);
                return Some(RegisterMessage::Value {
                    from: me,
                    op,
                    epoch,
                    tag: held.map_or_else(Tag::default, |h| h.tag),
                    data: held.map_or_else(Vec::new, |h| h.data.clone()),
                });
            }
            RegisterMessage::Prepare {
                op, slot, epoch, ..
            } => (op, slot, epoch),
            RegisterMessage::Write { op, slot, tag, .. } => (op, slot, tag.epoch),
            _ => return None,
        };
        let held = self.slots.entry(slot).or_default();
        if epoch < held.fence && !flaws.no_fence {
            return Some(RegisterMessage::Refused {
                from: me,
                op,
                epoch,
                fence: held.fence,
            });
        }
        held.fence = held.fence.max(epoch);
        Some(match msg {
            RegisterMessage::Prepare { .. } => RegisterMessage::Value {
                from: me,
                op,
                epoch,
                tag: held.tag,
                data: held.data.clone(),
            },
            RegisterMessage::Write { tag, data, .. } => {
                if *tag > held.tag {
                    held.tag = *tag;
                    held.data = data.clone();
                }
                RegisterMessage::Stored {
                    from: me,
                    op,
                    epoch,
                }
            }
            _ => return None,
        })
    }

    /// Every slot the voter knows: (slot, fence, tag, value), in slot order (to store it).
    pub fn slots(&self) -> impl Iterator<Item = (u64, u64, Tag, &[u8])> {
        self.slots
            .iter()
            .map(|(&n, s)| (n, s.fence, s.tag, s.data.as_slice()))
    }

    /// A voter with these slots (as `slots` gave them; loaded from where they were stored).
    pub fn from_slots(slots: impl IntoIterator<Item = (u64, u64, Tag, Vec<u8>)>) -> RegisterVoter {
        RegisterVoter {
            slots: slots
                .into_iter()
                .map(|(n, fence, tag, data)| (n, Slot { fence, tag, data }))
                .collect(),
        }
    }

    /// The highest epoch a request for `slot` showed this voter (for status and tests).
    pub fn fence(&self, slot: u64) -> u64 {
        self.slots.get(&slot).map_or(0, |s| s.fence)
    }

    /// The highest fence of any slot: an epoch above it is new to this voter.
    pub fn max_fence(&self) -> u64 {
        self.slots.values().map(|s| s.fence).max().unwrap_or(0)
    }

    /// The state of a voter replacing one whose state is lost, from copies of other voters'
    /// states, each taken once no operation can still count an answer of the lost voter (an
    /// operation's deadline after its last answer; a dead machine's are long past) and
    /// before the new one first answers: per slot the highest fence and the value with the
    /// highest tag.
    ///
    /// Why it is safe when `sources` are a majority of the voters: every operation that
    /// completed reached a majority, which meets the sources in a voter; so the new voter
    /// remembers every fence and value a completed operation left, as the lost one did (or
    /// more). More is safe: a higher fence only refuses more, and a value held by a minority
    /// (a failed write) copied here surfaces no later than it could have before, because
    /// every write completed since it failed has a higher tag. Operations that complete
    /// after a copy is taken reach a majority without the lost voter, so they stay on one.
    /// `sim/src/register.rs` replaces voters so (`nvmirror-sim --register --replace-voters`);
    /// with empty states instead, or copies taken too soon, its checker finds majorities
    /// that no longer meet.
    pub fn seeded(sources: &[RegisterVoter]) -> Result<RegisterVoter, String> {
        let mut seeded = RegisterVoter::default();
        for source in sources {
            for (&n, s) in &source.slots {
                let slot = seeded.slots.entry(n).or_default();
                slot.fence = slot.fence.max(s.fence);
                if s.tag > slot.tag {
                    slot.tag = s.tag;
                    slot.data.clone_from(&s.data);
                } else if s.tag == slot.tag && s.data != slot.data {
                    return Err(format!(
                        "slot {n} holds two values under one tag (epoch {}, write {}): these \
                         states are not of one cluster's voters",
                        s.tag.epoch, s.tag.counter
                    ));
                }
            }
        }
        Ok(seeded)
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read's value (empty with tag 0: never written).
    Read {
        tag: Tag,
        data: Vec<u8>,
    },
    Written {
        tag: Tag,
    },
    /// A voter has seen a newer epoch on the slot: this client is superseded there (a write
    /// may or may not have taken effect, and if not it may still surface, but never after a
    /// write that began after this ended has completed).
    Refused {
        fence: u64,
    },
    /// No majority answered by the deadline (the same uncertainty as `Refused`).
    TimedOut,
}

#[derive(Clone, Debug)]
enum Phase {
    /// A read, or a prepare (`fencing`: the requests were `Prepare`s): a write's
    /// (`then_write`: the value to write once a majority is fenced), or a read's before it
    /// writes a value back under our epoch. A settling read (`settle`) writes the value
    /// back under our epoch whatever a majority holds.
    Reading {
        answers: BTreeMap<Voter, (Tag, Vec<u8>)>,
        then_write: Option<Vec<u8>>,
        fencing: bool,
        settle: bool,
    },
    /// A write, or a read's write-back (`returns`: the value the read returns).
    Storing {
        tag: Tag,
        stored: BTreeSet<Voter>,
        returns: Option<Vec<u8>>,
    },
}

#[derive(Clone, Debug)]
struct Op {
    id: u64,
    slot: u64,
    deadline: u64,
    phase: Phase,
}

/// A client of the voters: the holder of one epoch.
pub struct RegisterClient {
    me: Voter,
    voters: u32,
    epoch: u64,
    writes: u64,
    next_op: u64,
    op: Option<Op>,
    /// Slots this client has fenced a majority of (a prepare of it completed).
    prepared: BTreeSet<u64>,
    flaws: Flaws,
}

impl RegisterClient {
    /// A client instance with `epoch`, which no other instance may ever have used.
    pub fn new(me: Voter, voters: u32, epoch: u64, flaws: Flaws) -> RegisterClient {
        RegisterClient {
            me,
            voters,
            epoch,
            writes: 0,
            next_op: 0,
            op: None,
            prepared: BTreeSet::new(),
            flaws,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn majority(&self) -> usize {
        self.voters as usize / 2 + 1
    }

    fn to_all(&self, msg: RegisterMessage) -> Vec<(Voter, RegisterMessage)> {
        (0..self.voters).map(|v| (v, msg.clone())).collect()
    }

    fn begin(&mut self, slot: u64, deadline: u64, phase: Phase) -> u64 {
        self.next_op += 1;
        self.op = Some(Op {
            id: self.next_op,
            slot,
            deadline,
            phase,
        });
        self.next_op
    }

    /// Begins a reading phase of `slot` as a new operation and returns its requests: a
    /// `Prepare` that fences (`fencing`), else a plain `Read`.
    fn begin_reading(
        &mut self,
        slot: u64,
        deadline: u64,
        then_write: Option<Vec<u8>>,
        fencing: bool,
        settle: bool,
    ) -> Vec<(Voter, RegisterMessage)> {
        let phase = Phase::Reading {
            answers: BTreeMap::new(),
            then_write,
            fencing,
            settle,
        };
        let (from, epoch) = (self.me, self.epoch);
        let op = self.begin(slot, deadline, phase);
        self.to_all(if fencing {
            RegisterMessage::Prepare {
                from,
                op,
                slot,
                epoch,
            }
        } else {
            RegisterMessage::Read {
                from,
                op,
                slot,
                epoch,
            }
        })
    }

    /// Starts a read of `slot` (abandoning any operation still running); returns the
    /// requests to send, to every voter.
    pub fn read(&mut self, slot: u64, deadline: u64) -> Vec<(Voter, RegisterMessage)> {
        self.begin_reading(slot, deadline, None, false, false)
    }

    /// Starts a settling read of `slot` (abandoning any operation still running): a read
    /// whose value a node acts on for good (what it serves after a start or a lease
    /// regained). A plain read leaves a failed write of a newer epoch that a minority holds
    /// where it is, to surface at a later read (simulator seed 11344 of `--voter-table
    /// --voter-tries 1`: a claim that failed surfaced at a restart after the old owner had
    /// read the table without it and served). This one fences a majority at our epoch
    /// first (a prepare: refused, it is tried again under a ballot above the fence), then
    /// writes the newest value it saw back under our epoch with a new count, above every
    /// tag it can meet: a failed write it did not see can then never be read again, and
    /// one it saw is what it returns.
    pub fn read_settled(&mut self, slot: u64, deadline: u64) -> Vec<(Voter, RegisterMessage)> {
        if self.flaws.unsettled_reads {
            return self.read(slot, deadline);
        }
        self.begin_reading(slot, deadline, None, true, true)
    }

    /// Starts a write of `data` to `slot` (abandoning any operation still running). The
    /// first write of a slot prepares it first: a `Prepare` that fences a majority at our
    /// epoch (see the module's doc), then the write.
    pub fn write(
        &mut self,
        slot: u64,
        data: Vec<u8>,
        deadline: u64,
    ) -> Vec<(Voter, RegisterMessage)> {
        if !self.prepared.contains(&slot) && !self.flaws.no_prepare {
            return self.begin_reading(slot, deadline, Some(data), true, false);
        }
        self.store(slot, data, deadline)
    }

    fn store(&mut self, slot: u64, data: Vec<u8>, deadline: u64) -> Vec<(Voter, RegisterMessage)> {
        self.writes += 1;
        let tag = Tag {
            epoch: self.epoch,
            counter: self.writes,
        };
        let op = self.begin(
            slot,
            deadline,
            Phase::Storing {
                tag,
                stored: BTreeSet::new(),
                returns: None,
            },
        );
        self.to_all(RegisterMessage::Write {
            from: self.me,
            op,
            slot,
            tag,
            data,
        })
    }

    /// Time passes: the running operation times out at its deadline.
    pub fn tick(&mut self, now: u64) -> Option<Outcome> {
        if self.op.as_ref().is_some_and(|o| now >= o.deadline) {
            self.op = None;
            return Some(Outcome::TimedOut);
        }
        None
    }

    /// An answer arrived: the outcome once the operation ends, and what to send next.
    pub fn receive(
        &mut self,
        msg: RegisterMessage,
    ) -> (Option<Outcome>, Vec<(Voter, RegisterMessage)>) {
        let (from, id, epoch) = match msg {
            RegisterMessage::Value {
                from, op, epoch, ..
            }
            | RegisterMessage::Stored { from, op, epoch }
            | RegisterMessage::Refused {
                from, op, epoch, ..
            } => (from, op, epoch),
            _ => return (None, Vec::new()),
        };
        if from >= self.voters {
            // Not one of the voters: counting it could make a majority of too few.
            return (None, Vec::new());
        }
        let majority = self.majority();
        let ours = epoch == self.epoch || self.flaws.ignore_answer_epochs;
        let Some(op) = self.op.as_mut().filter(|o| o.id == id && ours) else {
            // An answer to an operation that ended, maybe of an earlier life: nothing to do.
            return (None, Vec::new());
        };
        if let RegisterMessage::Refused { fence, .. } = msg {
            self.op = None;
            return (Some(Outcome::Refused { fence }), Vec::new());
        }
        match (&mut op.phase, msg) {
            (
                Phase::Reading {
                    answers,
                    then_write,
                    fencing,
                    settle,
                },
                RegisterMessage::Value { tag, data, .. },
            ) => {
                answers.insert(from, (tag, data));
                if answers.len() < majority {
                    return (None, Vec::new());
                }
                let slot = op.slot;
                if *fencing || self.flaws.reads_prepare {
                    self.prepared.insert(slot);
                }
                if let Some(value) = then_write.take() {
                    // Prepared: every value a majority holds is of our epoch or older, so
                    // our next tag is above them all. The same operation goes on.
                    self.writes += 1;
                    let tag = Tag {
                        epoch: self.epoch,
                        counter: self.writes,
                    };
                    let id = op.id;
                    op.phase = Phase::Storing {
                        tag,
                        stored: BTreeSet::new(),
                        returns: None,
                    };
                    let sends = self.to_all(RegisterMessage::Write {
                        from: self.me,
                        op: id,
                        slot,
                        tag,
                        data: value,
                    });
                    return (None, sends);
                }
                let (tag, data) = answers
                    .values()
                    .max_by_key(|(t, _)| *t)
                    .cloned()
                    .unwrap_or_default();
                let held_by = answers.values().filter(|(t, _)| *t == tag).count();
                // A settling read fenced a majority at our epoch: every tag it saw is of our
                // epoch or older, and its write-back goes under a new tag of ours.
                let settle = *settle && *fencing;
                if (held_by >= majority && !settle) || self.flaws.no_write_back {
                    self.op = None;
                    return (Some(Outcome::Read { tag, data }), Vec::new());
                }
                // Only a minority holds it: put it on a majority first. A value of an older
                // epoch goes under our own, so that no write of its epoch surfacing later can
                // rank above it (under its old tag, a later write of that epoch would); and,
                // as any write of ours, only once a majority is fenced at our epoch (a read
                // fences nothing): unfenced, a lower epoch could complete a write on a
                // majority that never saw our write-back, which, kept by a minority under its
                // higher tag, would surface over it (simulator seed 523 of `--register`). A
                // newer epoch's value (read, not fenced, since 2026-12-07) goes back under
                // its own tag: the same as its own write arriving late.
                if tag.epoch < self.epoch
                    && !self.prepared.contains(&slot)
                    && !self.flaws.unfenced_write_back
                {
                    let deadline = op.deadline;
                    // A new operation id, so that late answers to the read do not count as
                    // answers to the prepare.
                    let sends = self.begin_reading(slot, deadline, None, true, false);
                    return (None, sends);
                }
                let tag = if tag.epoch < self.epoch || (settle && tag.epoch == self.epoch) {
                    self.writes += 1;
                    Tag {
                        epoch: self.epoch,
                        counter: self.writes,
                    }
                } else {
                    tag
                };
                let (id, slot) = (op.id, op.slot);
                op.phase = Phase::Storing {
                    tag,
                    stored: BTreeSet::new(),
                    returns: Some(data.clone()),
                };
                let sends = self.to_all(RegisterMessage::Write {
                    from: self.me,
                    op: id,
                    slot,
                    tag,
                    data,
                });
                (None, sends)
            }
            (
                Phase::Storing {
                    tag,
                    stored,
                    returns,
                },
                RegisterMessage::Stored { .. },
            ) => {
                stored.insert(from);
                if stored.len() < majority {
                    return (None, Vec::new());
                }
                let outcome = match returns.take() {
                    Some(data) => Outcome::Read { tag: *tag, data },
                    None => Outcome::Written { tag: *tag },
                };
                self.op = None;
                (Some(outcome), Vec::new())
            }
            // A late answer of the other phase (a read's values once it writes back).
            _ => (None, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers every request to the voters in `reach` at once, and every answer back;
    /// returns the operation's outcome.
    fn run(
        c: &mut RegisterClient,
        voters: &mut [RegisterVoter],
        reach: &[Voter],
        mut sends: Vec<(Voter, RegisterMessage)>,
    ) -> Option<Outcome> {
        let mut outcome = None;
        while !sends.is_empty() {
            let mut next = Vec::new();
            for (to, m) in sends {
                if !reach.contains(&to) {
                    continue;
                }
                if let Some(a) = voters[to as usize].answer(to, &m, Flaws::default()) {
                    let (done, more) = c.receive(a);
                    outcome = outcome.or(done);
                    next.extend(more);
                }
            }
            sends = next;
        }
        outcome
    }

    #[test]
    fn a_late_write_of_an_older_epoch_once_read_is_what_every_majority_answers() {
        let mut voters = vec![RegisterVoter::default(); 3];
        // Epoch 1 writes "a" everywhere, then "b" that reaches voter 0 only.
        let mut old = RegisterClient::new(9, 3, 1, Flaws::default());
        let s = old.write(0, b"a".to_vec(), u64::MAX);
        assert!(matches!(
            run(&mut old, &mut voters, &[0, 1, 2], s),
            Some(Outcome::Written { .. })
        ));
        let late = old.write(0, b"b".to_vec(), u64::MAX);
        // Epoch 2 reads from voters 1 and 2: "a", held by both, so no write-back, and no
        // fence either.
        let mut new = RegisterClient::new(8, 3, 2, Flaws::default());
        let s = new.read(0, u64::MAX);
        match run(&mut new, &mut voters, &[1, 2], s) {
            Some(Outcome::Read { data, .. }) => assert_eq!(data, b"a"),
            other => panic!("{other:?}"),
        }
        assert_eq!((voters[1].fence(0), voters[2].fence(0)), (1, 1));
        // "b" gets to voter 0: a read of voters 0 and 1 sees it as the highest tag, and
        // returns it only once it fenced voters 0 and 1 at epoch 2 (a prepare) and wrote it
        // back under epoch 2.
        for (to, m) in &late {
            if *to == 0 {
                let _ = voters[0].answer(0, m, Flaws::default());
            }
        }
        let s = new.read(0, u64::MAX);
        let first = run(&mut new, &mut voters, &[0, 1], s);
        let Some(Outcome::Read { tag, data }) = first else {
            panic!("{first:?}")
        };
        assert_eq!((tag.epoch, data.as_slice()), (2, &b"b"[..]));
        // The late "b" reaches voters 1 and 2 now: voter 1 refuses it (fenced at 2); voter 2
        // takes it, below epoch 2's copy.
        let refusals = late
            .iter()
            .filter(|(to, _)| *to != 0)
            .filter_map(|(to, m)| voters[*to as usize].answer(*to, m, Flaws::default()))
            .filter(|a| matches!(a, RegisterMessage::Refused { fence: 2, .. }))
            .count();
        assert_eq!(refusals, 1);
        // From now on every majority answers "b" at epoch 2: reads agree whichever they ask.
        for reach in [[1, 2], [0, 2], [0, 1]] {
            let s = new.read(0, u64::MAX);
            match run(&mut new, &mut voters, &reach, s) {
                Some(Outcome::Read { data, .. }) => assert_eq!(data, b"b", "{reach:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_older_epoch_cannot_complete_a_write_once_a_newer_one_completed_an_operation() {
        let mut voters = vec![RegisterVoter::default(); 3];
        let mut new = RegisterClient::new(1, 3, 5, Flaws::default());
        let s = new.write(0, b"new".to_vec(), u64::MAX);
        assert!(matches!(
            run(&mut new, &mut voters, &[0, 1], s),
            Some(Outcome::Written { .. })
        ));
        assert_eq!((voters[0].fence(0), voters[2].fence(0)), (5, 0));
        let mut old = RegisterClient::new(2, 3, 4, Flaws::default());
        let s = old.write(0, b"old".to_vec(), u64::MAX);
        assert_eq!(
            run(&mut old, &mut voters, &[0, 1, 2], s),
            Some(Outcome::Refused { fence: 5 })
        );
        let s = new.read(0, u64::MAX);
        match run(&mut new, &mut voters, &[1, 2], s) {
            Some(Outcome::Read { data, .. }) => assert_eq!(data, b"new"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_read_leaves_the_slot_to_its_writer() {
        let mut voters = vec![RegisterVoter::default(); 3];
        let mut writer = RegisterClient::new(0, 3, 3, Flaws::default());
        let mut reader = RegisterClient::new(1, 3, 9, Flaws::default());
        for n in 0..3u8 {
            let s = writer.write(0, vec![n], u64::MAX);
            assert!(
                matches!(
                    run(&mut writer, &mut voters, &[0, 1, 2], s),
                    Some(Outcome::Written { .. })
                ),
                "write {n}"
            );
            let s = reader.read(0, u64::MAX);
            match run(&mut reader, &mut voters, &[0, 1, 2], s) {
                Some(Outcome::Read { data, .. }) => assert_eq!(data, [n]),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(voters[1].fence(0), 3);
    }

    #[test]
    fn fences_are_per_slot_so_each_slot_may_have_its_own_writer() {
        let mut voters = vec![RegisterVoter::default(); 3];
        let mut a = RegisterClient::new(1, 3, 9, Flaws::default());
        let s = a.write(0, b"a's".to_vec(), u64::MAX);
        assert!(matches!(
            run(&mut a, &mut voters, &[0, 1, 2], s),
            Some(Outcome::Written { .. })
        ));
        // Epoch 3 writes slot 1 although every voter has seen epoch 9 on slot 0.
        let mut b = RegisterClient::new(2, 3, 3, Flaws::default());
        let s = b.write(1, b"b's".to_vec(), u64::MAX);
        assert!(matches!(
            run(&mut b, &mut voters, &[0, 1, 2], s),
            Some(Outcome::Written { .. })
        ));
        assert_eq!((voters[1].fence(0), voters[1].fence(1)), (9, 3));
    }

    #[test]
    fn answers_of_no_voter_or_of_another_epoch_do_not_count() {
        let mut c = RegisterClient::new(0, 3, 4, Flaws::default());
        // Slot 0 prepared by a first write (operation 1), so the next (2) goes out at once.
        let mut voters = vec![RegisterVoter::default(); 3];
        let s = c.write(0, b"w".to_vec(), u64::MAX);
        assert!(matches!(
            run(&mut c, &mut voters, &[1, 2], s),
            Some(Outcome::Written { .. })
        ));
        let sends = c.write(0, b"x".to_vec(), u64::MAX);
        assert!(matches!(sends[0].1, RegisterMessage::Write { op: 2, .. }));
        for (from, epoch) in [(3, 4), (7, 4), (1, 3), (2, 5)] {
            let (done, _) = c.receive(RegisterMessage::Stored { from, op: 2, epoch });
            assert_eq!(done, None, "from {from} at epoch {epoch}");
        }
        let (done, _) = c.receive(RegisterMessage::Stored {
            from: 1,
            op: 2,
            epoch: 4,
        });
        assert_eq!(done, None, "one voter is not a majority");
        let (done, _) = c.receive(RegisterMessage::Stored {
            from: 2,
            op: 2,
            epoch: 4,
        });
        assert!(matches!(done, Some(Outcome::Written { .. })));
    }

    /// Epoch 5 reads slot 0, then its write prepares the slot on voters 0 and 1, reaches
    /// voter 0 only and fails. Epoch 3 then writes through voters 1 and 2. Without the
    /// prepare, epoch 3's write completes, and a later read through voters 0 and 1 returns
    /// epoch 5's failed write over it (a late write landing after a newer one, which a disk
    /// never does); with it, voter 1 refuses epoch 3.
    fn late_high_write_after_a_lower_one(flaws: Flaws) -> (Option<Outcome>, Vec<u8>) {
        let mut voters = vec![RegisterVoter::default(); 3];
        let mut high = RegisterClient::new(0, 3, 5, flaws);
        let s = high.read(0, u64::MAX);
        assert!(matches!(
            run(&mut high, &mut voters, &[0, 1, 2], s),
            Some(Outcome::Read { .. })
        ));
        let mut writes = Vec::new();
        for (to, m) in high.write(0, b"high".to_vec(), u64::MAX) {
            if to == 2 {
                continue;
            }
            match m {
                RegisterMessage::Write { .. } => writes.push((to, m)),
                _ => {
                    let answer = voters[to as usize].answer(to, &m, flaws);
                    writes.extend(answer.map(|a| high.receive(a).1).unwrap_or_default());
                }
            }
        }
        for (to, m) in writes {
            if to == 0 {
                let _ = voters[0].answer(0, &m, flaws);
            }
        }
        let mut low = RegisterClient::new(1, 3, 3, flaws);
        let s = low.write(0, b"low".to_vec(), u64::MAX);
        let low_outcome = run(&mut low, &mut voters, &[1, 2], s);
        let mut reader = RegisterClient::new(2, 3, 6, flaws);
        let s = reader.read(0, u64::MAX);
        let read = match run(&mut reader, &mut voters, &[0, 1], s) {
            Some(Outcome::Read { data, .. }) => data,
            other => panic!("the read ended as {other:?}"),
        };
        (low_outcome, read)
    }

    #[test]
    fn a_failed_write_never_surfaces_over_a_write_that_completed_after_it() {
        let (low, read) = late_high_write_after_a_lower_one(Flaws::default());
        assert_eq!(low, Some(Outcome::Refused { fence: 5 }));
        assert_ne!(read, b"low");
        let (low, read) = late_high_write_after_a_lower_one(Flaws {
            no_prepare: true,
            ..Flaws::default()
        });
        assert!(matches!(low, Some(Outcome::Written { .. })));
        assert_eq!(read, b"high", "the flaw this prepare is for");
        // A read fences nothing, so it cannot stand in for the prepare.
        let (low, read) = late_high_write_after_a_lower_one(Flaws {
            reads_prepare: true,
            ..Flaws::default()
        });
        assert!(matches!(low, Some(Outcome::Written { .. })));
        assert_eq!(read, b"high", "a read taken for the prepare");
    }

    #[test]
    fn an_operation_without_a_majority_times_out() {
        let mut voters = vec![RegisterVoter::default(); 3];
        let mut c = RegisterClient::new(0, 3, 1, Flaws::default());
        let s = c.read(0, 100);
        assert_eq!(run(&mut c, &mut voters, &[0], s), None);
        assert_eq!(c.tick(99), None);
        assert_eq!(c.tick(100), Some(Outcome::TimedOut));
    }
}
