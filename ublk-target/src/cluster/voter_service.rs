//! One voter of the epoch-fenced register (`register`) as a service: requests arrive as
//! bytes (from a link, or from this node's own client), the voter's state is stored durably
//! in a file before any answer leaves, and the answer goes back as bytes. The tie-breaker
//! process (`nvmirror-tiebreaker`) is this and two links; a data node runs one for its own
//! vote.

use super::quorum::Voter;
use super::register::{Flaws, RegisterMessage, RegisterVoter};
use super::register_wire::{
    decode_message, encode_message, load_voter, store_voter, VoterIdentity,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What to do when the voter's state file does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Refuse to start: a voter that has voted must never come back empty (it would forget
    /// its fences, and two majorities would no longer share a voter that remembers).
    Refuse,
    /// Start empty and store that at once: the operator's first set-up only.
    CreateEmpty,
}

pub struct VoterService {
    identity: VoterIdentity,
    me: Voter,
    voters: u32,
    path: PathBuf,
    /// Held across the state file's write on purpose: a voter answers one request at a time,
    /// each after its state is durable, so no answer can overtake the store it depends on.
    /// Not on the data path (the arbiter's slots only).
    state: Mutex<RegisterVoter>,
}

impl VoterService {
    /// Opens the voter `me` (of `voters`), node `identity.node` of cluster
    /// `identity.cluster`, whose state lives at `path`. Refuses a state file that names
    /// another voter (a copy put in the wrong place); names one that names none (version 1).
    pub fn open(
        path: &Path,
        identity: VoterIdentity,
        me: Voter,
        voters: u32,
        missing: Missing,
    ) -> Result<Self, String> {
        if me >= voters {
            return Err(format!(
                "voter {me} is not one of the {voters} voters (numbered from 0)"
            ));
        }
        let state = match load_voter(path)? {
            Some(stored) if stored.identity == Some(identity) => stored.state,
            Some(stored) => match stored.identity {
                Some(other) => {
                    return Err(format!(
                        "{} is the voter state of {other}, not of this voter ({identity}): a \
                         voter serving another's state would vote twice. Point the state at \
                         this voter's own file; if this voter's state is lost, create it from \
                         copies of the other voters' states with --seed-from",
                        path.display()
                    ))
                }
                None => {
                    // Written before state files named their voter: name it now, so that a
                    // copy of it can be told from the others'.
                    store_voter(path, identity, &stored.state).map_err(|e| {
                        format!("cannot name the voter state {}: {e}", path.display())
                    })?;
                    tracing::info!(
                        path = %path.display(),
                        "the voter state now names its voter ({identity})"
                    );
                    stored.state
                }
            },
            None if missing == Missing::CreateEmpty => {
                let v = RegisterVoter::default();
                store_voter(path, identity, &v).map_err(|e| {
                    format!("cannot create the voter state {}: {e}", path.display())
                })?;
                v
            }
            None => {
                return Err(format!(
                    "the voter state {} does not exist. A voter that has voted must never \
                     restart empty, so it is not created here: on this voter's first start \
                     create it with --create-state (or start with --init); to replace a \
                     voter whose state is lost, create it from copies of the other voters' \
                     state files with --create-state --seed-from FILE --seed-from FILE",
                    path.display()
                ))
            }
        };
        Ok(VoterService {
            identity,
            me,
            voters,
            path: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    pub fn me(&self) -> Voter {
        self.me
    }

    /// Answers one request. `sender`: the voter the connection it came on is authenticated
    /// as (None: this node's own client, no connection). None for what gets no answer: a
    /// malformed request, one whose claimed sender is not the connection's, or a state that
    /// could not be stored (the voter then must not answer; the client times out or gets a
    /// majority elsewhere). Every refusal is logged.
    pub fn handle(&self, sender: Option<Voter>, request: &[u8]) -> Option<Vec<u8>> {
        let msg = match decode_message(request) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    voter = self.me,
                    ?sender,
                    "malformed vote request dropped: {e}"
                );
                return None;
            }
        };
        let from = match msg {
            RegisterMessage::Read { from, .. }
            | RegisterMessage::Prepare { from, .. }
            | RegisterMessage::Write { from, .. } => from,
            _ => {
                tracing::warn!(
                    voter = self.me,
                    ?sender,
                    "a vote answer sent as a request, dropped"
                );
                return None;
            }
        };
        if from >= self.voters || sender.is_some_and(|s| s != from) {
            tracing::warn!(
                voter = self.me,
                ?sender,
                claimed = from,
                voters = self.voters,
                "vote request from a voter that is not its sender's, dropped"
            );
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.clone();
        let answer = next.answer(self.me, &msg, Flaws::default())?;
        if next != *state {
            if let Err(e) = store_voter(&self.path, self.identity, &next) {
                tracing::error!(
                    voter = self.me,
                    path = %self.path.display(),
                    "cannot store the voter state, not answering: {e}"
                );
                return None;
            }
            *state = next;
        }
        Some(encode_message(&answer))
    }

    /// The voter's state as stored (for status and tests).
    pub fn state(&self) -> RegisterVoter {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The highest epoch a request for `slot` showed this voter.
    pub fn fence(&self, slot: u64) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fence(slot)
    }
}

/// Creates the state of a voter that replaces one whose state is lost (a dead disk), from
/// copies of other voters' state files (`RegisterVoter::seeded`, which says why that is
/// safe): at least a majority of the voters (`voter_nodes`, their node ids), all but the
/// lost one for three. Each copy must name another voter of the same cluster, each a
/// different one: a stale copy of the lost voter's own state would miss the fences it gave
/// since. Refuses when `path` exists. Returns the new state.
pub fn create_seeded(
    path: &Path,
    identity: VoterIdentity,
    voter_nodes: &[u32],
    sources: &[PathBuf],
) -> Result<RegisterVoter, String> {
    let voters = voter_nodes.len();
    let majority = voters / 2 + 1;
    if sources.len() < majority || sources.len() >= voters {
        return Err(format!(
            "{} state file(s) to seed from: give copies of {} of the other voters' states \
             (at least a majority of the {voters} voters, not counting the one replaced)",
            sources.len(),
            if majority + 1 == voters {
                format!("both ({majority})")
            } else {
                format!("{majority} to {}", voters - 1)
            }
        ));
    }
    if path.exists() {
        return Err(format!(
            "{} exists: this voter has state already, and replacing it could let two nodes \
             both win a slot. Nothing was changed",
            path.display()
        ));
    }
    let mut copies = Vec::with_capacity(sources.len());
    let mut seen: Vec<u32> = Vec::with_capacity(sources.len());
    for source in sources {
        let stored =
            load_voter(source)?.ok_or_else(|| format!("{}: no such file", source.display()))?;
        let named = stored.identity.ok_or_else(|| {
            format!(
                "{} names no voter (written by a build before 2026-12-08): start that voter \
                 once with this build, which names its state, and copy the file again. \
                 Nothing was changed",
                source.display()
            )
        })?;
        let refusal = if named.cluster != identity.cluster {
            Some(format!("is the state of {named}, another cluster's voter"))
        } else if named.node == identity.node {
            Some(format!(
                "is a copy of this voter's own state ({named}): an old copy of the state \
                 being replaced may lack fences it gave since; seed from the other voters' \
                 states"
            ))
        } else if !voter_nodes.contains(&named.node) {
            Some(format!(
                "is the state of {named}, which is not one of the voters (nodes {voter_nodes:?})"
            ))
        } else if seen.contains(&named.node) {
            Some(format!(
                "is a second copy of {named}'s state: the copies must be of different voters"
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            return Err(format!("{} {why}. Nothing was changed", source.display()));
        }
        seen.push(named.node);
        copies.push(stored.state);
    }
    let seeded = RegisterVoter::seeded(&copies)?;
    store_voter(path, identity, &seeded)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::register::Tag;

    /// Voter `n - 1` is node `n` (as on a data node: its place in `[[cluster.node]]`).
    fn id(node: u32) -> VoterIdentity {
        VoterIdentity {
            cluster: 0xc1,
            node,
        }
    }

    const NODES: [u32; 3] = [1, 2, 3];

    fn write(from: Voter, epoch: u64, slot: u64, data: &[u8]) -> Vec<u8> {
        encode_message(&RegisterMessage::Write {
            from,
            op: 1,
            slot,
            tag: Tag { epoch, counter: 1 },
            data: data.to_vec(),
        })
    }

    #[test]
    fn a_missing_state_is_refused_unless_created_on_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let e = VoterService::open(&path, id(3), 2, 3, Missing::Refuse)
            .err()
            .unwrap();
        assert!(e.contains("--create-state --seed-from"), "{e}");
        VoterService::open(&path, id(3), 2, 3, Missing::CreateEmpty).unwrap();
        assert!(path.exists());
        VoterService::open(&path, id(3), 2, 3, Missing::Refuse).unwrap();
        assert!(VoterService::open(&path, id(4), 3, 3, Missing::Refuse).is_err());
        // Another voter's state (a copy in the wrong place) is refused, naming both.
        let e = VoterService::open(&path, id(2), 1, 3, Missing::Refuse)
            .err()
            .unwrap();
        assert!(
            e.contains("of node 3 of cluster 193, not of this voter (node 2"),
            "{e}"
        );
    }

    #[test]
    fn a_state_that_names_no_voter_is_named_at_its_next_start() {
        use crate::cluster::register_wire::{encode_voter, StoredVoter};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let old = RegisterVoter::from_slots([(4, 9, Tag::default(), Vec::new())]);
        std::fs::write(
            &path,
            encode_voter(&StoredVoter {
                identity: None,
                state: old.clone(),
            }),
        )
        .unwrap();
        // Unnamed, it cannot seed a replacement: nobody can tell whose it is.
        let other = dir.path().join("other.state");
        let e = create_seeded(&other, id(1), &NODES, &[path.clone(), path.clone()]).unwrap_err();
        assert!(e.contains("names no voter"), "{e}");
        let v = VoterService::open(&path, id(3), 2, 3, Missing::Refuse).unwrap();
        assert_eq!(v.state(), old);
        let stored = load_voter(&path).unwrap().unwrap();
        assert_eq!((stored.identity, stored.state), (Some(id(3)), old));
    }

    #[test]
    fn fences_and_values_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let v = VoterService::open(&path, id(3), 2, 3, Missing::CreateEmpty).unwrap();
        let a = v.handle(Some(0), &write(0, 9, 4, b"nine")).unwrap();
        assert!(matches!(
            decode_message(&a).unwrap(),
            RegisterMessage::Stored { epoch: 9, .. }
        ));
        drop(v);
        let v = VoterService::open(&path, id(3), 2, 3, Missing::Refuse).unwrap();
        assert_eq!(v.fence(4), 9);
        let a = v.handle(Some(1), &write(1, 5, 4, b"five")).unwrap();
        assert!(matches!(
            decode_message(&a).unwrap(),
            RegisterMessage::Refused { fence: 9, .. }
        ));
    }

    #[test]
    fn a_replacement_is_seeded_with_each_slots_highest_fence_and_newest_value() {
        let dir = tempfile::tempdir().unwrap();
        let (a_path, b_path) = (dir.path().join("a.state"), dir.path().join("b.state"));
        let a = VoterService::open(&a_path, id(1), 0, 3, Missing::CreateEmpty).unwrap();
        let b = VoterService::open(&b_path, id(2), 1, 3, Missing::CreateEmpty).unwrap();
        // Slot 4: b saw the newer write. Slot 5: only a has it. Slot 6: b's fence is higher.
        a.handle(None, &write(2, 7, 4, b"seven")).unwrap();
        b.handle(None, &write(2, 9, 4, b"nine")).unwrap();
        a.handle(None, &write(2, 3, 5, b"three")).unwrap();
        a.handle(None, &write(2, 4, 6, b"four")).unwrap();
        b.handle(None, &write(2, 8, 6, b"eight")).unwrap();
        let new = dir.path().join("new.state");
        let sources = [a_path.clone(), b_path.clone()];
        let seeded = create_seeded(&new, id(3), &NODES, &sources).unwrap();
        let slots: Vec<_> = seeded
            .slots()
            .map(|(n, fence, tag, data)| (n, fence, tag.epoch, data.to_vec()))
            .collect();
        assert_eq!(
            slots,
            vec![
                (4, 9, 9, b"nine".to_vec()),
                (5, 3, 3, b"three".to_vec()),
                (6, 8, 8, b"eight".to_vec()),
            ]
        );
        // What was stored is what a restarted voter serves by.
        let v = VoterService::open(&new, id(3), 2, 3, Missing::Refuse).unwrap();
        assert_eq!(v.state(), seeded);
        // Refused: the state exists, too few copies, one copy twice.
        let e = create_seeded(&new, id(3), &NODES, &sources).unwrap_err();
        assert!(e.contains("exists"), "{e}");
        let other = dir.path().join("other.state");
        let e = create_seeded(&other, id(3), &NODES, &sources[..1]).unwrap_err();
        assert!(e.contains("both"), "{e}");
        let e =
            create_seeded(&other, id(3), &NODES, &[a_path.clone(), a_path.clone()]).unwrap_err();
        assert!(e.contains("second copy of node 1"), "{e}");
        // A copy of the replaced voter's own state (an old backup of it) is refused, and so
        // is one of another cluster's voter or of a node that is no voter.
        let e = create_seeded(&other, id(3), &NODES, &[a_path.clone(), new.clone()]).unwrap_err();
        assert!(e.contains("this voter's own state (node 3"), "{e}");
        let foreign = dir.path().join("foreign.state");
        VoterService::open(
            &foreign,
            VoterIdentity {
                cluster: 0xc2,
                node: 2,
            },
            1,
            3,
            Missing::CreateEmpty,
        )
        .unwrap();
        let e = create_seeded(&other, id(3), &NODES, &[a_path.clone(), foreign]).unwrap_err();
        assert!(e.contains("another cluster"), "{e}");
        let e = create_seeded(&other, id(3), &[1, 3, 4], &[a_path.clone(), b_path.clone()])
            .unwrap_err();
        assert!(e.contains("not one of the voters"), "{e}");
        assert!(!other.exists());
    }

    #[test]
    fn bad_requests_get_no_answer_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let v = VoterService::open(&path, id(3), 2, 3, Missing::CreateEmpty).unwrap();
        assert!(v.handle(Some(0), b"garbage").is_none());
        // Claims to be voter 1 on voter 0's connection.
        assert!(v.handle(Some(0), &write(1, 9, 4, b"x")).is_none());
        // Not a voter at all.
        assert!(v.handle(None, &write(7, 9, 4, b"x")).is_none());
        let answer = encode_message(&RegisterMessage::Stored {
            from: 0,
            op: 1,
            epoch: 9,
        });
        assert!(v.handle(Some(0), &answer).is_none());
        assert_eq!(v.fence(4), 0);
    }
}
