//! One voter of the epoch-fenced register (`register`) as a service: requests arrive as
//! bytes (from a link, or from this node's own client), the voter's state is stored durably
//! in a file before any answer leaves, and the answer goes back as bytes. The tie-breaker
//! process (`nvmirror-tiebreaker`) is this and two links; a data node runs one for its own
//! vote.

use super::quorum::Voter;
use super::register::{Flaws, RegisterMessage, RegisterVoter};
use super::register_wire::{decode_message, encode_message, load_voter, store_voter};
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
    me: Voter,
    voters: u32,
    path: PathBuf,
    /// Held across the state file's write on purpose: a voter answers one request at a time,
    /// each after its state is durable, so no answer can overtake the store it depends on.
    /// Not on the data path (the arbiter's slots only).
    state: Mutex<RegisterVoter>,
}

impl VoterService {
    /// Opens the voter `me` (of `voters`) whose state lives at `path`.
    pub fn open(path: &Path, me: Voter, voters: u32, missing: Missing) -> Result<Self, String> {
        if me >= voters {
            return Err(format!(
                "voter {me} is not one of the {voters} voters (numbered from 0)"
            ));
        }
        let state = match load_voter(path)? {
            Some(v) => v,
            None if missing == Missing::CreateEmpty => {
                let v = RegisterVoter::default();
                store_voter(path, &v).map_err(|e| {
                    format!("cannot create the voter state {}: {e}", path.display())
                })?;
                v
            }
            None => {
                return Err(format!(
                    "the voter state {} does not exist. A voter that has voted must never \
                     restart empty, so it is not created here; if this is the first start of \
                     this voter (or it was replaced and the other voters are up), create it \
                     with --init",
                    path.display()
                ))
            }
        };
        Ok(VoterService {
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
            if let Err(e) = store_voter(&self.path, &next) {
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

    /// The highest epoch a request for `slot` showed this voter.
    pub fn fence(&self, slot: u64) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fence(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::register::Tag;

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
        let e = VoterService::open(&path, 2, 3, Missing::Refuse)
            .err()
            .unwrap();
        assert!(e.contains("--init"), "{e}");
        VoterService::open(&path, 2, 3, Missing::CreateEmpty).unwrap();
        assert!(path.exists());
        VoterService::open(&path, 2, 3, Missing::Refuse).unwrap();
        assert!(VoterService::open(&path, 3, 3, Missing::Refuse).is_err());
    }

    #[test]
    fn fences_and_values_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let v = VoterService::open(&path, 2, 3, Missing::CreateEmpty).unwrap();
        let a = v.handle(Some(0), &write(0, 9, 4, b"nine")).unwrap();
        assert!(matches!(
            decode_message(&a).unwrap(),
            RegisterMessage::Stored { epoch: 9, .. }
        ));
        drop(v);
        let v = VoterService::open(&path, 2, 3, Missing::Refuse).unwrap();
        assert_eq!(v.fence(4), 9);
        let a = v.handle(Some(1), &write(1, 5, 4, b"five")).unwrap();
        assert!(matches!(
            decode_message(&a).unwrap(),
            RegisterMessage::Refused { fence: 9, .. }
        ));
    }

    #[test]
    fn bad_requests_get_no_answer_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voter.state");
        let v = VoterService::open(&path, 2, 3, Missing::CreateEmpty).unwrap();
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
