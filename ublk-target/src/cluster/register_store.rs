//! The arbiter's slots (`ownership::TableStore`) kept by a majority of voters instead of a
//! shared medium (issue #17): each slot is a register of `register`, read and written
//! through the voters' channels (this node's own voter, the partner over the mirror link, a
//! tie-breaker over a link of its own).
//!
//! Epochs: a client instance needs an epoch no other instance ever had, and several nodes
//! write some slots (the ownership table), so epochs are Paxos-style ballots: `round *
//! voters + me`, with `round` kept durably before it is used (`BallotFile`) and raised past
//! the fence a refusal names. Each start takes a new round. An operation is tried up to four
//! times (again under a newer ballot after a refusal). A write that failed may or may not
//! have taken effect, as a disk's failed write may have; the register guarantees that it
//! can surface only until the next write that began after it failed completes, never after.
//!
//! The daemon builds one over its links in `voter_arbiter` (`[cluster.voters]`).

use super::quorum::Voter;
use super::register::{Flaws, Outcome, RegisterClient, RegisterMessage};
use super::register_wire::{decode_message, encode_message, replace_durably, MAX_VALUE_BYTES};
use super::voter_service::{Missing, VoterService};
use crate::ownership::TableStore;
use futures::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The way to one voter: sends a request and yields its answer, or None when none came (a
/// lost request, a link down, a voter that could not store its state).
pub trait VoterChannel: Send + Sync {
    fn ask(&self, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>;
}

/// This node's own voter, asked directly.
pub struct LocalVoter(pub Arc<VoterService>);

impl VoterChannel for LocalVoter {
    fn ask(&self, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>> {
        let answer = self.0.handle(None, &request);
        Box::pin(async move { answer })
    }
}

/// A voter at the other end of a link (the partner, or the tie-breaker): the request rides
/// the link's request channel; the voter answers an empty payload when it has no answer.
pub struct LinkVoter(pub rdma_link::Link);

impl VoterChannel for LinkVoter {
    fn ask(&self, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>> {
        let link = self.0.clone();
        Box::pin(async move {
            match link.request(request).await {
                Ok(b) if !b.is_empty() => Some(b.to_vec()),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!("vote request not answered: {e}");
                    None
                }
            }
        })
    }
}

const BALLOT_MAGIC: &[u8; 8] = b"NVMBALOT";
const BALLOT_VERSION: u16 = 1;
const BALLOT_BYTES: usize = 8 + 2 + 8 + 4;

/// The highest ballot round this node used, kept in a file: a round is stored before any
/// request of it leaves, so no restart ever reuses one.
pub struct BallotFile {
    path: PathBuf,
}

impl BallotFile {
    pub fn new(path: &Path) -> BallotFile {
        BallotFile {
            path: path.to_path_buf(),
        }
    }

    /// The stored round (0 for a new file created on purpose).
    pub fn load(&self, missing: Missing) -> Result<u64, String> {
        let b = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound && missing == Missing::CreateEmpty => {
                return Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "the ballot file {} does not exist. A node that has voted must never \
                     reuse a ballot, so it is not created here; on the node's first start, \
                     create it with --init",
                    self.path.display()
                ))
            }
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        decode_ballot(&b).map_err(|e| {
            format!(
                "{}: {e}; the node cannot know which ballots it used. Move the file away and \
                 start with --init only if every voter's state was created anew too",
                self.path.display()
            )
        })
    }

    pub fn store(&self, round: u64) -> io::Result<()> {
        let mut b = Vec::with_capacity(BALLOT_BYTES);
        b.extend_from_slice(BALLOT_MAGIC);
        b.extend_from_slice(&BALLOT_VERSION.to_le_bytes());
        b.extend_from_slice(&round.to_le_bytes());
        let crc = rdma_link::checksum::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        replace_durably(&self.path, &b)
    }
}

fn decode_ballot(b: &[u8]) -> Result<u64, String> {
    if b.len() != BALLOT_BYTES || &b[..8] != BALLOT_MAGIC {
        return Err("not a ballot file (no NVMBALOT magic, or the wrong size)".into());
    }
    let (body, crc) = b.split_at(BALLOT_BYTES - 4);
    if rdma_link::checksum::crc32c(body).to_le_bytes() != crc {
        return Err("the checksum does not match: the file is damaged".into());
    }
    let version = u16::from_le_bytes([body[8], body[9]]);
    if version != BALLOT_VERSION {
        return Err(format!(
            "version {version}; this build reads version {BALLOT_VERSION}"
        ));
    }
    let mut round = [0u8; 8];
    round.copy_from_slice(&body[10..18]);
    Ok(u64::from_le_bytes(round))
}

/// How many times an operation is tried, under a newer ballot after a refusal or again
/// after a timeout, before the caller gets the error: two writers that keep taking a slot
/// from each other are the lease's business, and a majority away for longer is a path
/// failure, not the store's. (The simulator can try fewer, `--voter-tries`, to make the
/// store fail far more often.)
pub const ATTEMPTS: u32 = 4;

/// A node's client of the voters and its ballot round: what the daemon's store and the
/// simulator's (`sim/src/voter_table.rs`) share. A refusal takes a newer round; a timeout
/// tries again; the register client prepares each slot before its first write under a
/// ballot (`register`), so that a write of ours that failed can surface only until the next
/// write of another ballot completes, never after it.
pub struct Ballots {
    me: Voter,
    voters: u32,
    round: u64,
    client: RegisterClient,
    /// Tries per operation ([`ATTEMPTS`] unless [`Ballots::with_attempts`]).
    attempts: u32,
}

/// Exchanges messages with the voters until the client's operation ends.
pub trait Exchange {
    fn exchange(
        &mut self,
        client: &mut RegisterClient,
        sends: Vec<(Voter, RegisterMessage)>,
    ) -> Outcome;

    /// The deadline of an operation starting now, in the client's clock.
    fn deadline(&self) -> u64;

    /// Stores `round` durably before any request of it leaves.
    fn persist_round(&mut self, round: u64) -> io::Result<()>;
}

impl Ballots {
    /// A client of `round`, which must be stored durably already and above every round this
    /// node used before.
    pub fn new(me: Voter, voters: u32, round: u64) -> Ballots {
        Ballots {
            me,
            voters,
            round,
            client: RegisterClient::new(me, voters, epoch_of(round, me, voters), Flaws::default()),
            attempts: ATTEMPTS,
        }
    }

    /// The same client trying each operation `attempts` times (at least once).
    pub fn with_attempts(mut self, attempts: u32) -> Ballots {
        self.attempts = attempts.max(1);
        self
    }

    pub fn epoch(&self) -> u64 {
        self.client.epoch()
    }

    /// Takes a round above `fence` (and ours), stored before use.
    fn outbid(&mut self, slot: u64, fence: u64, x: &mut impl Exchange) -> io::Result<()> {
        let round = (self.round + 1).max(fence / u64::from(self.voters) + 1);
        x.persist_round(round).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot store ballot round {round}: {e}"))
        })?;
        tracing::info!(
            slot,
            fence,
            round,
            "a newer ballot holds the slot; taking round {round}"
        );
        *self = Ballots::new(self.me, self.voters, round).with_attempts(self.attempts);
        Ok(())
    }

    fn no_majority(&self, slot: u64, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "slot {slot}: no majority of the {} voters answered {} tries in time{what}",
                self.voters, self.attempts
            ),
        )
    }

    /// Reads `slot`: its value (empty if never written).
    pub fn read(&mut self, slot: u64, x: &mut impl Exchange) -> io::Result<Vec<u8>> {
        self.read_with(slot, x, RegisterClient::read)
    }

    /// Reads `slot` and settles it (`RegisterClient::read_settled`): no write that failed
    /// before this read can surface after it.
    pub fn read_settled(&mut self, slot: u64, x: &mut impl Exchange) -> io::Result<Vec<u8>> {
        self.read_with(slot, x, RegisterClient::read_settled)
    }

    fn read_with(
        &mut self,
        slot: u64,
        x: &mut impl Exchange,
        start: fn(&mut RegisterClient, u64, u64) -> Vec<(Voter, RegisterMessage)>,
    ) -> io::Result<Vec<u8>> {
        for _ in 0..self.attempts {
            let sends = start(&mut self.client, slot, x.deadline());
            match x.exchange(&mut self.client, sends) {
                Outcome::Read { data, .. } => return Ok(data),
                Outcome::Refused { fence } => self.outbid(slot, fence, x)?,
                Outcome::TimedOut => {}
                Outcome::Written { .. } => {
                    return Err(io::Error::other(format!(
                        "slot {slot}: a read ended as a write"
                    )))
                }
            }
        }
        Err(self.no_majority(slot, ""))
    }

    /// Writes `data` to `slot`. An error after a write went out leaves its outcome open (it
    /// may surface until a write that began after the error completes), as a disk's failed
    /// write.
    pub fn write(&mut self, slot: u64, data: &[u8], x: &mut impl Exchange) -> io::Result<()> {
        for _ in 0..self.attempts {
            let sends = self.client.write(slot, data.to_vec(), x.deadline());
            match x.exchange(&mut self.client, sends) {
                Outcome::Written { .. } => return Ok(()),
                Outcome::Refused { fence } => self.outbid(slot, fence, x)?,
                Outcome::TimedOut => {}
                Outcome::Read { .. } => {
                    return Err(io::Error::other(format!(
                        "slot {slot}: a write ended as a read"
                    )))
                }
            }
        }
        Err(self.no_majority(slot, "; the write may still take effect"))
    }
}

/// A slot's value as `TableStore::read_slot` gives it: its bytes, zeros if never written.
pub fn fill_slot(slot: u64, data: &[u8], out: &mut [u8]) -> io::Result<()> {
    if data.is_empty() {
        out.fill(0);
        return Ok(());
    }
    if data.len() != out.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "slot {slot}: the voters hold {} bytes, the caller reads {}",
                data.len(),
                out.len()
            ),
        ));
    }
    out.copy_from_slice(data);
    Ok(())
}

/// Checks a write's size before it starts.
pub fn check_write(slot: u64, data: &[u8]) -> io::Result<()> {
    if data.len() > MAX_VALUE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "slot {slot}: {} bytes, a voter keeps at most {MAX_VALUE_BYTES}",
                data.len()
            ),
        ));
    }
    Ok(())
}

pub struct RegisterStore {
    voters: Vec<Arc<dyn VoterChannel>>,
    ballots_file: BallotFile,
    op_timeout: Duration,
    /// One operation at a time (the client's rule); held across the voters' round trips.
    /// Not on the data path: the arbiter's slots only.
    inner: Mutex<Inner>,
}

struct Inner {
    ballots: Ballots,
    runtime: tokio::runtime::Runtime,
    clock: Instant,
}

impl RegisterStore {
    /// A store for voter `me`, asking `voters` (indexed by voter id; `me`'s entry is usually
    /// a [`LocalVoter`]). Takes a new ballot round at once.
    pub fn open(
        me: Voter,
        voters: Vec<Arc<dyn VoterChannel>>,
        ballots_file: BallotFile,
        missing: Missing,
        op_timeout: Duration,
    ) -> Result<RegisterStore, String> {
        let n = voters.len() as u32;
        if n < 3 || n.is_multiple_of(2) || me >= n {
            return Err(format!(
                "voter {me} of {n} voters: a majority store needs an odd number of voters, \
                 at least three, and this node among them"
            ));
        }
        let round = ballots_file.load(missing)? + 1;
        ballots_file
            .store(round)
            .map_err(|e| format!("cannot store ballot round {round}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the vote runtime: {e}"))?;
        Ok(RegisterStore {
            voters,
            ballots_file,
            op_timeout,
            inner: Mutex::new(Inner {
                ballots: Ballots::new(me, n, round),
                runtime,
                clock: Instant::now(),
            }),
        })
    }

    /// The epoch this store's requests carry now.
    pub fn epoch(&self) -> u64 {
        self.lock().ballots.epoch()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` with this store's ballots over its voters' channels.
    fn with_ballots<T: Send>(
        &self,
        op: impl FnOnce(&mut Ballots, &mut Channels<'_>) -> io::Result<T> + Send,
    ) -> io::Result<T> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from an async task (a request handler re-reading the table): the store
            // blocks on a runtime of its own, which cannot start inside another, so the
            // operation runs on a thread of its own and this task waits for it, as it waits
            // for a disk arbiter's synchronous read.
            return std::thread::scope(|s| {
                s.spawn(|| self.with_ballots_here(op))
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a slot operation's thread panicked")))
            });
        }
        self.with_ballots_here(op)
    }

    fn with_ballots_here<T>(
        &self,
        op: impl FnOnce(&mut Ballots, &mut Channels<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut inner = self.lock();
        let Inner {
            ballots,
            runtime,
            clock,
        } = &mut *inner;
        let mut channels = Channels {
            store: self,
            runtime,
            clock,
        };
        op(ballots, &mut channels)
    }
}

/// The daemon's exchange: each request to its voter's channel, answers as they come, until
/// the operation's outcome or its deadline.
struct Channels<'a> {
    store: &'a RegisterStore,
    runtime: &'a tokio::runtime::Runtime,
    clock: &'a Instant,
}

impl Channels<'_> {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }
}

impl Exchange for Channels<'_> {
    fn deadline(&self) -> u64 {
        self.now() + self.store.op_timeout.as_nanos() as u64
    }

    fn persist_round(&mut self, round: u64) -> io::Result<()> {
        self.store.ballots_file.store(round)
    }

    fn exchange(
        &mut self,
        client: &mut RegisterClient,
        sends: Vec<(Voter, RegisterMessage)>,
    ) -> Outcome {
        let voters = &self.store.voters;
        let deadline = self.deadline();
        self.runtime.block_on(async {
            let mut pending = FuturesUnordered::new();
            let ask = |pending: &mut FuturesUnordered<_>, sends: Vec<(Voter, RegisterMessage)>| {
                for (to, m) in sends {
                    if let Some(ch) = voters.get(to as usize) {
                        pending.push(ch.ask(encode_message(&m)));
                    }
                }
            };
            ask(&mut pending, sends);
            loop {
                let t = self.now();
                // The client's own deadline is the one its operation was started with.
                if let Some(o) = client.tick(t) {
                    return o;
                }
                let left = Duration::from_nanos(deadline.saturating_sub(t));
                match tokio::time::timeout(left, pending.next()).await {
                    Ok(Some(Some(bytes))) => match decode_message(&bytes) {
                        Ok(m) => {
                            let (outcome, sends) = client.receive(m);
                            ask(&mut pending, sends);
                            if let Some(o) = outcome {
                                return o;
                            }
                        }
                        Err(e) => tracing::warn!("malformed vote answer dropped: {e}"),
                    },
                    Ok(Some(None)) => {}
                    // Nobody left to answer: only the deadline can end it.
                    Ok(None) => tokio::time::sleep(left).await,
                    Err(_) => {}
                }
            }
        })
    }
}

/// A node's voter number: its place among the voters' node ids in order (the two data nodes
/// and the tie-breaker, or three data nodes), the same on every node.
pub fn voter_number(node_ids: &[u32], node: u32) -> Result<Voter, String> {
    let mut ids = node_ids.to_vec();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!(
            "the voters' node ids {node_ids:?} repeat one: each voter needs a node id of its own"
        ));
    }
    ids.iter()
        .position(|&id| id == node)
        .map(|i| i as Voter)
        .ok_or_else(|| format!("node {node} is not one of the voters {node_ids:?}"))
}

pub fn epoch_of(round: u64, me: Voter, voters: u32) -> u64 {
    round * u64::from(voters) + u64::from(me)
}

impl TableStore for RegisterStore {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let data = self.with_ballots(|b, x| b.read(slot, x))?;
        fill_slot(slot, &data, out)
    }

    fn read_slot_settled(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let data = self.with_ballots(|b, x| b.read_settled(slot, x))?;
        fill_slot(slot, &data, out)
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        check_write(slot, data)?;
        self.with_ballots(|b, x| b.write(slot, data, x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ballot_round_survives_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = BallotFile::new(&dir.path().join("ballot"));
        assert!(b.load(Missing::Refuse).unwrap_err().contains("--init"));
        assert_eq!(b.load(Missing::CreateEmpty).unwrap(), 0);
        b.store(41).unwrap();
        assert_eq!(b.load(Missing::Refuse).unwrap(), 41);
        let mut bytes = std::fs::read(dir.path().join("ballot")).unwrap();
        bytes[12] ^= 1;
        std::fs::write(dir.path().join("ballot"), &bytes).unwrap();
        assert!(b.load(Missing::Refuse).unwrap_err().contains("damaged"));
    }

    #[test]
    fn epochs_of_different_nodes_and_rounds_never_meet() {
        let mut seen = std::collections::BTreeSet::new();
        for round in 1..50 {
            for me in 0..3 {
                let e = epoch_of(round, me, 3);
                assert!(e > 0 && seen.insert(e));
                // The round a refusal by this epoch leads to is above it.
                assert!(epoch_of(e / 3 + 1, 0, 3) > e);
            }
        }
    }
}
