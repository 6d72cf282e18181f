//! The simulator of the epoch-fenced majority register (`nvmirror::cluster::register`), the
//! store planned for the arbiter's slots in shared-nothing mode. It runs the production state
//! machines of three (or five) voters and a series of clients against one seed's faults, in
//! 100 µs steps:
//! * clients: each has an epoch of its own, drawn out of order (a newer epoch may start
//!   before an older one); they run on three nodes, at most one per node, and a node may
//!   restart its client (the new one gets the old one's late answers); each reads or writes one of two slots, one
//!   operation at a time, each with a unique value, and may stop at any time (a crash) with
//!   its requests still on the way; one that is refused (a newer epoch exists) stops too;
//! * network: per message a delay of 0-3 ms, one in 15 50-800 ms (far longer than an
//!   operation's 20 ms deadline: the late writes the fence is for), one in 20 lost, one in
//!   30 delivered twice;
//! * voters: crash and come back with their durable state (their fence and slots), and drop
//!   what reaches them while down; with `replace_voters`, one at a time loses its state for
//!   good and is replaced by a voter seeded from copies of a majority of the others' states
//!   (`RegisterVoter::seeded`, what `nvmirror-tiebreaker --create-state --seed-from` does),
//!   each copy taken at its own moment while the lost one is gone, but not before an
//!   operation's deadline has passed since it last answered (seed 3438 of 5,000 without that:
//!   an answer the lost voter sent just before, counted late, completed a write on it and
//!   on a voter whose copy had already been taken).
//!
//! Checked at the end over every completed operation (reads that returned, writes that were
//! stored by a majority): each read returns the value that some write with that tag wrote
//! (or nothing, tag 0), written before the read ended; and the tags follow real time: an
//! operation that began after another completed has a tag at least as high (strictly higher
//! for a write). With unique tags that is linearizability. And, stronger, as a disk: a write
//! that failed (timed out, or refused) is never read after a write that began after it
//! failed has completed (`check_failed_writes`).

use nvmirror::cluster::register::{
    Flaws, Outcome, RegisterClient, RegisterMessage, RegisterVoter, Tag,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const STEP: u64 = 100 * US;
const DEADLINE: u64 = 20 * MS;
/// The nodes clients run on (each client sends as its node).
const NODES: usize = 3;

#[derive(Clone, Copy, Debug)]
pub struct RegisterSettings {
    pub voters: u32,
    pub seconds: u64,
    pub flaws: Flaws,
    /// One read in three settles its slot (`RegisterClient::read_settled`), checked by
    /// `check_settled_reads`.
    pub settled_reads: bool,
    /// Whether voters lose their state and are replaced, and how (see the module's comment).
    pub replacements: Replacements,
}

/// How voters whose state is lost are replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replacements {
    /// Voters never lose their state.
    #[default]
    Off,
    /// Seeded from copies of a majority of the others, taken an operation's deadline after
    /// the lost voter last answered (`RegisterVoter::seeded`).
    Seeded,
    /// A flaw, the first version of `Seeded`: the new voter may be back, and its copies
    /// taken, at once, while answers the lost voter sent still count; and replacements come
    /// two and a half times as often.
    CopiesTooEarly,
    /// A flaw: the new voter starts empty.
    Empty,
}

impl Default for RegisterSettings {
    fn default() -> Self {
        RegisterSettings {
            voters: 3,
            seconds: 10,
            flaws: Flaws::default(),
            settled_reads: false,
            replacements: Replacements::Off,
        }
    }
}

#[derive(Debug, Default)]
pub struct RegisterOutcome {
    pub violation: Option<String>,
    pub reads: u64,
    pub writes: u64,
    /// Operations that ended without a result (timed out or refused).
    pub failed: u64,
    /// Completed reads that returned a value written by an operation that had failed.
    pub late_writes_read: u64,
    /// Voters that lost their state and were replaced.
    pub replaced: u64,
}

/// A voter whose state is lost, on its way back as a new one.
struct Replacement {
    voter: usize,
    /// When the new voter first answers.
    back_at: u64,
    /// The voters it is seeded from, when each one's copy is taken, and the copy.
    copies: Vec<(usize, u64, Option<RegisterVoter>)>,
}

impl Replacement {
    /// Plans the loss of a voter's state now: it answers nothing until it is back.
    fn plan(rng: &mut ChaCha8Rng, voters: usize, now: u64, how: Replacements) -> Replacement {
        let voter = rng.gen_range(0..voters);
        // No operation can count an answer it sent before now after this.
        let (settled, back_at) = if how == Replacements::CopiesTooEarly {
            (now, now + rng.gen_range(MS..300 * MS))
        } else {
            let settled = now + DEADLINE + STEP;
            (settled, settled + rng.gen_range(0..300 * MS))
        };
        let mut others: Vec<usize> = (0..voters).filter(|&v| v != voter).collect();
        others.shuffle(rng);
        others.truncate(voters / 2 + 1);
        let copies = others
            .into_iter()
            .map(|v| (v, rng.gen_range(settled..=back_at), None))
            .collect();
        Replacement {
            voter,
            back_at,
            copies,
        }
    }

    /// Takes the copies that are due; the new voter's state once it is back.
    fn step(&mut self, now: u64, voters: &[RegisterVoter], empty: bool) -> Option<RegisterVoter> {
        for (v, at, copy) in &mut self.copies {
            if copy.is_none() && now >= *at {
                // A voter that is down still has its state on its disk: copied all the same.
                *copy = Some(voters[*v].clone());
            }
        }
        if now < self.back_at {
            return None;
        }
        if empty {
            return Some(RegisterVoter::default());
        }
        let copies: Vec<RegisterVoter> = self.copies.iter().filter_map(|c| c.2.clone()).collect();
        Some(RegisterVoter::seeded(&copies).expect("copies of one cluster's voters"))
    }
}

/// A completed operation, for the checker.
#[derive(Clone, Debug)]
struct Done {
    client: usize,
    slot: u64,
    start: u64,
    end: u64,
    tag: Tag,
    /// For a read: the value it returned.
    read: Option<Vec<u8>>,
    /// For a write: the value it wrote.
    wrote: Option<Vec<u8>>,
    /// A settling read.
    settled: bool,
}

struct Client {
    sm: RegisterClient,
    /// Until when it runs (then it stops, as a crash would).
    until: u64,
    /// The running operation: slot, start, the value (a write's), whether a read settles,
    /// or None when idle.
    op: Option<(u64, u64, Option<Vec<u8>>, bool)>,
    next_value: u64,
    reads: u64,
}

/// Where a message goes: a voter, or the client a node runs now.
#[derive(Clone, Copy, Debug)]
enum To {
    Voter(u32),
    Client(usize),
}

/// Runs one seed.
pub fn run_register(seed: u64, s: RegisterSettings) -> RegisterOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = RegisterOutcome::default();
    let end = s.seconds * 1000 * MS;
    let mut voters = vec![RegisterVoter::default(); s.voters as usize];
    let mut voter_down_until = vec![0u64; s.voters as usize];
    // Its own stream, so that the seeds of runs without replacements stay as they were.
    let mut replace_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7265_706c_6163_6520);
    let mut replacing: Option<Replacement> = None;
    // Epochs of the clients to come, out of order: each used by one client only.
    let mut epochs: Vec<u64> = (1..=400).collect();
    epochs.shuffle(&mut rng);
    let mut clients: Vec<Client> = Vec::new();
    // Each node's client of its current life.
    let mut current: [Option<usize>; NODES] = [None; NODES];
    let mut queue: BTreeMap<(u64, u64), (To, RegisterMessage)> = BTreeMap::new();
    let mut seq = 0u64;
    let mut done: Vec<Done> = Vec::new();
    // Every value ever sent in a write: value -> (client, start).
    let mut written: BTreeMap<Vec<u8>, (usize, u64)> = BTreeMap::new();
    // Writes that ended without a result: value -> (slot, when it ended).
    let mut failed_values: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();

    let mut post = |queue: &mut BTreeMap<(u64, u64), (To, RegisterMessage)>,
                    rng: &mut ChaCha8Rng,
                    now: u64,
                    to: To,
                    msg: RegisterMessage| {
        if rng.gen_bool(0.05) {
            return;
        }
        let copies = if rng.gen_bool(1.0 / 30.0) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if rng.gen_bool(1.0 / 15.0) {
                rng.gen_range(50 * MS..800 * MS)
            } else {
                rng.gen_range(0..3 * MS)
            };
            seq += 1;
            queue.insert((now + delay, seq), (to, msg.clone()));
        }
    };

    let mut now = 0u64;
    while now < end {
        // New clients now and then on one of three nodes: on a node without a running one,
        // or replacing it (a restart: the new life gets the old one's late answers, which
        // carry the node's id as theirs did).
        if rng.gen_bool(0.002) {
            let node = rng.gen_range(0..NODES);
            let busy = current[node].is_some_and(|c| now < clients[c].until);
            if !busy || rng.gen_bool(0.2) {
                if let Some(epoch) = epochs.pop() {
                    if let Some(old) = current[node] {
                        clients[old].until = clients[old].until.min(now);
                    }
                    current[node] = Some(clients.len());
                    clients.push(Client {
                        sm: RegisterClient::new(node as u32, s.voters, epoch, s.flaws),
                        until: now + rng.gen_range(50 * MS..1500 * MS),
                        op: None,
                        next_value: 0,
                        reads: 0,
                    });
                }
            }
        }
        // Voter crashes.
        for down_until in voter_down_until.iter_mut() {
            if now >= *down_until && rng.gen_bool(0.0002) {
                *down_until = now + rng.gen_range(0..300 * MS);
            }
        }
        if s.replacements != Replacements::Off {
            let rate = if s.replacements == Replacements::CopiesTooEarly {
                0.0005
            } else {
                0.0002
            };
            if replacing.is_none() && replace_rng.gen_bool(rate) {
                let r = Replacement::plan(&mut replace_rng, voters.len(), now, s.replacements);
                voters[r.voter] = RegisterVoter::default();
                voter_down_until[r.voter] = u64::MAX;
                replacing = Some(r);
            }
            if let Some(r) = &mut replacing {
                if let Some(new) = r.step(now, &voters, s.replacements == Replacements::Empty) {
                    voters[r.voter] = new;
                    voter_down_until[r.voter] = now;
                    out.replaced += 1;
                    replacing = None;
                }
            }
        }
        // Deliver what is due.
        while let Some(entry) = queue.first_entry().filter(|e| e.key().0 <= now) {
            let (to, msg) = entry.remove();
            match to {
                To::Voter(v) => {
                    if now < voter_down_until[v as usize] {
                        continue;
                    }
                    let from = match msg {
                        RegisterMessage::Read { from, .. }
                        | RegisterMessage::Prepare { from, .. }
                        | RegisterMessage::Write { from, .. } => from,
                        _ => continue,
                    };
                    if let Some(a) = voters[v as usize].answer(v, &msg, s.flaws) {
                        post(&mut queue, &mut rng, now, To::Client(from as usize), a);
                    }
                }
                To::Client(node) => {
                    let Some(c) = current[node] else { continue };
                    let cl = &mut clients[c];
                    if now >= cl.until {
                        continue;
                    }
                    let (outcome, sends) = cl.sm.receive(msg);
                    for (v, m) in sends {
                        post(&mut queue, &mut rng, now, To::Voter(v), m);
                    }
                    if let Some(o) = outcome {
                        finish(c, cl, o, now, &mut done, &mut out, &mut failed_values);
                    }
                }
            }
        }
        // Clients: time out, stop, start the next operation.
        for (c, cl) in clients.iter_mut().enumerate() {
            if now >= cl.until {
                continue;
            }
            if let Some(o) = cl.sm.tick(now) {
                finish(c, cl, o, now, &mut done, &mut out, &mut failed_values);
            }
            if cl.op.is_none() && rng.gen_bool(0.3) {
                let slot = rng.gen_range(0..2);
                let sends = if rng.gen_bool(0.5) {
                    // Chosen without the random stream, so that the seeds of the runs
                    // without settled reads stay as they were.
                    cl.reads += 1;
                    let settle = s.settled_reads && cl.reads % 3 == 0;
                    cl.op = Some((slot, now, None, settle));
                    if settle {
                        cl.sm.read_settled(slot, now + DEADLINE)
                    } else {
                        cl.sm.read(slot, now + DEADLINE)
                    }
                } else {
                    cl.next_value += 1;
                    let value = format!("c{c}e{}v{}", cl.sm.epoch(), cl.next_value).into_bytes();
                    written.insert(value.clone(), (c, now));
                    cl.op = Some((slot, now, Some(value.clone()), false));
                    cl.sm.write(slot, value, now + DEADLINE)
                };
                for (v, m) in sends {
                    post(&mut queue, &mut rng, now, To::Voter(v), m);
                }
            }
        }
        now += STEP;
    }
    out.violation = check(&done, &written)
        .or_else(|| check_failed_writes(&done, &failed_values))
        .or_else(|| check_settled_reads(&done, &failed_values));
    out.late_writes_read = done
        .iter()
        .filter_map(|d| d.read.as_ref())
        .filter(|v| failed_values.contains_key(*v))
        .count() as u64;
    out
}

fn finish(
    c: usize,
    cl: &mut Client,
    o: Outcome,
    now: u64,
    done: &mut Vec<Done>,
    out: &mut RegisterOutcome,
    failed_values: &mut BTreeMap<Vec<u8>, (u64, u64)>,
) {
    let Some((slot, start, value, settled)) = cl.op.take() else {
        return;
    };
    let (tag, read, wrote) = match o {
        Outcome::Read { tag, data } => {
            out.reads += 1;
            (tag, Some(data), None)
        }
        Outcome::Written { tag } => {
            out.writes += 1;
            (tag, None, value)
        }
        Outcome::Refused { .. } | Outcome::TimedOut => {
            if matches!(o, Outcome::Refused { .. }) {
                // Superseded: a newer epoch exists, so this holder's lease is gone; it stops.
                cl.until = now;
            }
            out.failed += 1;
            if let Some(v) = value {
                failed_values.insert(v, (slot, now));
            }
            return;
        }
    };
    done.push(Done {
        client: c,
        slot,
        start,
        end: now,
        tag,
        read,
        wrote,
        settled,
    });
}

/// A settling read is final about the writes that failed before it began: one it did not
/// return is never read after it completed (a node that served by the table it read must
/// not find a claim of its range surfacing later; simulator seed 11344 of `--voter-table
/// --voter-tries 1`).
fn check_settled_reads(done: &[Done], failed: &BTreeMap<Vec<u8>, (u64, u64)>) -> Option<String> {
    for r in done {
        let Some(v) = &r.read else { continue };
        let Some(&(slot, failed_at)) = failed.get(v) else {
            continue;
        };
        if let Some(s) = done.iter().find(|s| {
            s.settled
                && s.slot == slot
                && s.start > failed_at
                && s.end < r.start
                && s.read.as_ref() != Some(v)
        }) {
            return Some(format!(
                "slot {slot}: a write that failed at {} ms was read from {} ms on, after client {}'s settling read from {} to {} ms had returned something else",
                failed_at / MS,
                r.start / MS,
                s.client,
                s.start / MS,
                s.end / MS
            ));
        }
    }
    None
}

/// A write that failed surfaces, if ever, before the next write that began after it failed
/// completes, never after it: as a disk's late write, and what the arbiter's algorithms on
/// top assume. Linearizability alone allows more (a write that never returned may take
/// effect at any time), and the register without its prepare does more: a lower epoch's
/// write completes on a majority that never saw a higher epoch's failed one, which
/// surfaces over it later.
fn check_failed_writes(done: &[Done], failed: &BTreeMap<Vec<u8>, (u64, u64)>) -> Option<String> {
    for r in done {
        let Some(v) = &r.read else { continue };
        let Some(&(slot, failed_at)) = failed.get(v) else {
            continue;
        };
        if let Some(w) = done
            .iter()
            .find(|w| w.slot == slot && w.wrote.is_some() && w.start > failed_at && w.end < r.start)
        {
            return Some(format!(
                "slot {slot}: a write that failed at {} ms was read from {} ms on, after client {}'s write from {} to {} ms had completed",
                failed_at / MS,
                r.start / MS,
                w.client,
                w.start / MS,
                w.end / MS
            ));
        }
    }
    None
}

/// The checks of the module's doc, per slot.
fn check(done: &[Done], written: &BTreeMap<Vec<u8>, (usize, u64)>) -> Option<String> {
    // Which value each tag stands for, per slot (a tag must always stand for one value).
    let mut value_of: BTreeMap<(u64, Tag), &[u8]> = BTreeMap::new();
    for d in done {
        if let Some(v) = &d.wrote {
            if value_of.insert((d.slot, d.tag), v).is_some() {
                return Some(format!(
                    "slot {} tag {:?} given to two writes",
                    d.slot, d.tag
                ));
            }
        }
    }
    for d in done {
        if let Some(v) = &d.read {
            if d.tag == Tag::default() {
                if !v.is_empty() {
                    return Some(format!("a read returned {v:?} with tag 0"));
                }
                continue;
            }
            if v.is_empty() {
                // The slot as never written, which a settling read wrote back under a tag
                // of its own: right only if no write had completed when it began.
                if let Some(w) = done
                    .iter()
                    .find(|w| w.slot == d.slot && w.wrote.is_some() && w.end < d.start)
                {
                    return Some(format!(
                        "slot {}: a read from {} ms found it never written, but client {}'s write had completed at {} ms",
                        d.slot,
                        d.start / MS,
                        w.client,
                        w.end / MS
                    ));
                }
                continue;
            }
            match written.get(v) {
                None => return Some(format!("a read returned {v:?}, which no write wrote")),
                Some(&(_, start)) if start > d.end => {
                    return Some(format!(
                        "a read ending at {} returned a value written later",
                        d.end
                    ))
                }
                _ => {}
            }
            if let Some(other) = value_of.insert((d.slot, d.tag), v) {
                if other != v.as_slice() {
                    return Some(format!(
                        "slot {} tag {:?} read as {:?} and as {:?}",
                        d.slot,
                        d.tag,
                        String::from_utf8_lossy(other),
                        String::from_utf8_lossy(v)
                    ));
                }
            }
        }
    }
    for slot in 0..2 {
        let mut ops: Vec<&Done> = done.iter().filter(|d| d.slot == slot).collect();
        ops.sort_by_key(|d| d.end);
        // The highest tag among operations that ended before each operation began.
        let mut ended_max: Vec<(u64, Tag, usize)> = Vec::new();
        let mut max = (Tag::default(), usize::MAX);
        for d in &ops {
            if d.tag > max.0 {
                max = (d.tag, d.client);
            }
            ended_max.push((d.end, max.0, max.1));
        }
        for d in &ops {
            let before = ended_max.partition_point(|(end, _, _)| *end < d.start);
            if before == 0 {
                continue;
            }
            let (_, floor, by) = ended_max[before - 1];
            let write = d.read.is_none();
            if d.tag < floor || (write && d.tag == floor) {
                return Some(format!(
                    "slot {slot}: client {}'s {} from {} to {} ms has tag {:?}, but an operation of client {by} with tag {floor:?} had completed before it began",
                    d.client,
                    if write { "write" } else { "read" },
                    d.start / MS,
                    d.end / MS,
                    d.tag,
                ));
            }
        }
    }
    None
}
