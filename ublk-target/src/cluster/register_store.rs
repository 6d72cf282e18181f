//! The arbiter's slots (`ownership::TableStore`) kept by a majority of voters instead of a
//! shared medium (issue #17): each slot is a register of `register`, read and written
//! through the voters' channels (this node's own voter, the partner over the mirror link, a
//! tie-breaker over a link of its own).
//!
//! Epochs: a client instance needs an epoch no other instance ever had, and several nodes
//! write some slots (the ownership table), so epochs are Paxos-style ballots: `round *
//! voters + me`, with `round` kept durably before it is used (`BallotFile`) and raised past
//! the fence a refusal names. Each start takes a new round. A refused operation is retried
//! once under the new ballot: it may or may not have taken effect, as a timed-out disk write
//! may have, and the register guarantees that if it did not it never will once the retry
//! (or anything of a newer ballot) completes.
//!
//! Not wired into the daemon yet: the serving rule on top is open (docs/shared-nothing.md).

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

/// How many times an operation refused by a newer ballot is tried again under a newer one
/// of ours before the caller gets the error: two writers that keep taking a slot from each
/// other are the lease's business, not the store's.
const ATTEMPTS: u32 = 3;

pub struct RegisterStore {
    me: Voter,
    voters: Vec<Arc<dyn VoterChannel>>,
    ballots: BallotFile,
    op_timeout: Duration,
    /// One operation at a time (the client's rule); held across the voters' round trips.
    /// Not on the data path: the arbiter's slots only.
    inner: Mutex<Inner>,
}

struct Inner {
    client: RegisterClient,
    round: u64,
    runtime: tokio::runtime::Runtime,
    clock: Instant,
}

impl RegisterStore {
    /// A store for voter `me`, asking `voters` (indexed by voter id; `me`'s entry is usually
    /// a [`LocalVoter`]). Takes a new ballot round at once.
    pub fn open(
        me: Voter,
        voters: Vec<Arc<dyn VoterChannel>>,
        ballots: BallotFile,
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
        let round = ballots.load(missing)? + 1;
        ballots
            .store(round)
            .map_err(|e| format!("cannot store ballot round {round}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the vote runtime: {e}"))?;
        Ok(RegisterStore {
            me,
            ballots,
            op_timeout,
            inner: Mutex::new(Inner {
                client: RegisterClient::new(me, n, epoch_of(round, me, n), Flaws::default()),
                round,
                runtime,
                clock: Instant::now(),
            }),
            voters,
        })
    }

    /// The epoch this store's requests carry now.
    pub fn epoch(&self) -> u64 {
        self.lock().client.epoch()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(
        &self,
        slot: u64,
        start: impl Fn(&mut RegisterClient, u64) -> Vec<(Voter, RegisterMessage)>,
    ) -> io::Result<Outcome> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(io::Error::other(
                "the voters' slot store was called from an async task; call it from a thread of its own",
            ));
        }
        let n = self.voters.len() as u64;
        let mut inner = self.lock();
        for _ in 0..ATTEMPTS {
            match self.once(&mut inner, &start) {
                Outcome::Refused { fence } => {
                    let round = (inner.round + 1).max(fence / n + 1);
                    self.ballots.store(round).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot store ballot round {round}: {e}"))
                    })?;
                    tracing::info!(
                        slot,
                        fence,
                        round,
                        "a newer ballot holds the slot; taking ballot round {round}"
                    );
                    inner.round = round;
                    inner.client = RegisterClient::new(
                        self.me,
                        n as u32,
                        epoch_of(round, self.me, n as u32),
                        Flaws::default(),
                    );
                }
                Outcome::TimedOut => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "slot {slot}: no majority of the {n} voters answered within {:?}",
                            self.op_timeout
                        ),
                    ))
                }
                done => return Ok(done),
            }
        }
        Err(io::Error::other(format!(
            "slot {slot}: refused {ATTEMPTS} times by newer ballots (another node keeps writing it)"
        )))
    }

    /// One operation under the current ballot, until its outcome.
    fn once(
        &self,
        inner: &mut Inner,
        start: &impl Fn(&mut RegisterClient, u64) -> Vec<(Voter, RegisterMessage)>,
    ) -> Outcome {
        let Inner {
            client,
            runtime,
            clock,
            ..
        } = inner;
        let now = |clock: &Instant| clock.elapsed().as_nanos() as u64;
        let deadline = now(clock) + self.op_timeout.as_nanos() as u64;
        runtime.block_on(async {
            let mut pending = FuturesUnordered::new();
            let ask = |pending: &mut FuturesUnordered<_>, sends: Vec<(Voter, RegisterMessage)>| {
                for (to, m) in sends {
                    if let Some(ch) = self.voters.get(to as usize) {
                        pending.push(ch.ask(encode_message(&m)));
                    }
                }
            };
            ask(&mut pending, start(client, deadline));
            loop {
                let t = now(clock);
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

fn epoch_of(round: u64, me: Voter, voters: u32) -> u64 {
    round * u64::from(voters) + u64::from(me)
}

impl TableStore for RegisterStore {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        match self.run(slot, |c, deadline| c.read(slot, deadline))? {
            Outcome::Read { data, .. } if data.is_empty() => {
                out.fill(0);
                Ok(())
            }
            Outcome::Read { data, .. } if data.len() == out.len() => {
                out.copy_from_slice(&data);
                Ok(())
            }
            Outcome::Read { data, .. } => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "slot {slot}: the voters hold {} bytes, the caller reads {}",
                    data.len(),
                    out.len()
                ),
            )),
            other => Err(io::Error::other(format!(
                "slot {slot}: a read ended as {other:?}"
            ))),
        }
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        if data.len() > MAX_VALUE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "slot {slot}: {} bytes, a voter keeps at most {MAX_VALUE_BYTES}",
                    data.len()
                ),
            ));
        }
        match self.run(slot, |c, deadline| c.write(slot, data.to_vec(), deadline))? {
            Outcome::Written { .. } => Ok(()),
            other => Err(io::Error::other(format!(
                "slot {slot}: a write ended as {other:?}"
            ))),
        }
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
