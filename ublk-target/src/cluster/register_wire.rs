//! The bytes of the epoch-fenced register (`register`): its messages as they would travel
//! between a client and the voters, and a voter's durable state as a file. Everything here
//! comes from outside the process, so decoding checks every length and refuses what it
//! does not fully understand, with a reason.

use super::register::{RegisterMessage, RegisterVoter, Tag};
use std::io::Write;
use std::path::Path;

/// The largest value a slot holds: the arbiter's slots are 4 KiB.
pub const MAX_VALUE_BYTES: usize = 4096;

const K_READ: u8 = 1;
const K_WRITE: u8 = 2;
const K_VALUE: u8 = 3;
const K_STORED: u8 = 4;
const K_REFUSED: u8 = 5;
const K_PREPARE: u8 = 6;

const STATE_MAGIC: &[u8; 8] = b"NVMVOTER";
/// Version 1 named no voter; version 2 names its cluster and node (`VoterIdentity`).
const STATE_VERSION_UNNAMED: u16 = 1;
const STATE_VERSION: u16 = 2;
/// More slots than the arbiter has by far (it has a few per node and LUN).
const MAX_STATE_SLOTS: u32 = 1 << 16;

pub fn encode_message(m: &RegisterMessage) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    let head = |b: &mut Vec<u8>, kind: u8, from: u32, op: u64| {
        b.push(kind);
        b.extend_from_slice(&from.to_le_bytes());
        b.extend_from_slice(&op.to_le_bytes());
    };
    match m {
        RegisterMessage::Read {
            from,
            op,
            slot,
            epoch,
        } => {
            head(&mut b, K_READ, *from, *op);
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&epoch.to_le_bytes());
        }
        RegisterMessage::Prepare {
            from,
            op,
            slot,
            epoch,
        } => {
            head(&mut b, K_PREPARE, *from, *op);
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&epoch.to_le_bytes());
        }
        RegisterMessage::Write {
            from,
            op,
            slot,
            tag,
            data,
        } => {
            head(&mut b, K_WRITE, *from, *op);
            b.extend_from_slice(&slot.to_le_bytes());
            put_value(&mut b, *tag, data);
        }
        RegisterMessage::Value {
            from,
            op,
            epoch,
            tag,
            data,
        } => {
            head(&mut b, K_VALUE, *from, *op);
            b.extend_from_slice(&epoch.to_le_bytes());
            put_value(&mut b, *tag, data);
        }
        RegisterMessage::Stored { from, op, epoch } => {
            head(&mut b, K_STORED, *from, *op);
            b.extend_from_slice(&epoch.to_le_bytes());
        }
        RegisterMessage::Refused {
            from,
            op,
            epoch,
            fence,
        } => {
            head(&mut b, K_REFUSED, *from, *op);
            b.extend_from_slice(&epoch.to_le_bytes());
            b.extend_from_slice(&fence.to_le_bytes());
        }
    }
    b
}

fn put_value(b: &mut Vec<u8>, tag: Tag, data: &[u8]) {
    b.extend_from_slice(&tag.epoch.to_le_bytes());
    b.extend_from_slice(&tag.counter.to_le_bytes());
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
}

/// Reads fields off the front of a buffer, naming what was cut short.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err(format!("cut short in its {what}"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let mut a = [0; 2];
        a.copy_from_slice(self.take(2, what)?);
        Ok(u16::from_le_bytes(a))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }

    fn value(&mut self) -> Result<(Tag, Vec<u8>), String> {
        let tag = Tag {
            epoch: self.u64("tag")?,
            counter: self.u64("tag")?,
        };
        let len = self.u32("value length")? as usize;
        if len > MAX_VALUE_BYTES {
            return Err(format!(
                "a value of {len} bytes (a slot holds at most {MAX_VALUE_BYTES})"
            ));
        }
        Ok((tag, self.take(len, "value")?.to_vec()))
    }

    fn end(&self, what: &str) -> Result<(), String> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} byte(s) after the end of the {what}",
                self.b.len()
            ))
        }
    }
}

/// A message from its bytes; the error says what is wrong with them.
pub fn decode_message(b: &[u8]) -> Result<RegisterMessage, String> {
    let mut r = Reader { b };
    let kind = r.u8("kind")?;
    let from = r.u32("sender")?;
    let op = r.u64("operation id")?;
    let m = match kind {
        K_READ => RegisterMessage::Read {
            from,
            op,
            slot: r.u64("slot")?,
            epoch: r.u64("epoch")?,
        },
        K_PREPARE => RegisterMessage::Prepare {
            from,
            op,
            slot: r.u64("slot")?,
            epoch: r.u64("epoch")?,
        },
        K_WRITE => {
            let slot = r.u64("slot")?;
            let (tag, data) = r.value()?;
            RegisterMessage::Write {
                from,
                op,
                slot,
                tag,
                data,
            }
        }
        K_VALUE => {
            let epoch = r.u64("epoch")?;
            let (tag, data) = r.value()?;
            RegisterMessage::Value {
                from,
                op,
                epoch,
                tag,
                data,
            }
        }
        K_STORED => RegisterMessage::Stored {
            from,
            op,
            epoch: r.u64("epoch")?,
        },
        K_REFUSED => RegisterMessage::Refused {
            from,
            op,
            epoch: r.u64("epoch")?,
            fence: r.u64("fence")?,
        },
        other => return Err(format!("unknown register message kind {other}")),
    };
    r.end("message")?;
    Ok(m)
}

/// Whose state a voter's file holds: the cluster and the voter's node id. A copy of a state
/// may seed only a replacement of another voter of the same cluster (`create_seeded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoterIdentity {
    pub cluster: u64,
    pub node: u32,
}

impl std::fmt::Display for VoterIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} of cluster {}", self.node, self.cluster)
    }
}

/// A voter's file: its state and, since version 2, whose it is (None: a version 1 file,
/// written before files named their voter; the voter names it at its next start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVoter {
    pub identity: Option<VoterIdentity>,
    pub state: RegisterVoter,
}

/// A voter's state as the bytes of its file: magic, version, the identity (version 2), the
/// slots, and a crc32c of all that comes before it. A file without an identity is written
/// as version 1, so that what was read is written back unchanged.
pub fn encode_voter(v: &StoredVoter) -> Vec<u8> {
    encode_state(v.identity, &v.state)
}

fn encode_state(identity: Option<VoterIdentity>, state: &RegisterVoter) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(STATE_MAGIC);
    match identity {
        Some(id) => {
            b.extend_from_slice(&STATE_VERSION.to_le_bytes());
            b.extend_from_slice(&id.cluster.to_le_bytes());
            b.extend_from_slice(&id.node.to_le_bytes());
        }
        None => b.extend_from_slice(&STATE_VERSION_UNNAMED.to_le_bytes()),
    }
    let slots: Vec<_> = state.slots().collect();
    b.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for (slot, fence, tag, data) in slots {
        b.extend_from_slice(&slot.to_le_bytes());
        b.extend_from_slice(&fence.to_le_bytes());
        put_value(&mut b, tag, data);
    }
    let crc = rdma_link::checksum::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_voter(b: &[u8]) -> Result<StoredVoter, String> {
    if b.len() < STATE_MAGIC.len() + 4 || &b[..STATE_MAGIC.len()] != STATE_MAGIC {
        return Err("not a voter's state (no NVMVOTER magic)".into());
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let mut want = [0; 4];
    want.copy_from_slice(crc);
    if rdma_link::checksum::crc32c(body) != u32::from_le_bytes(want) {
        return Err("the checksum does not match: the state is damaged".into());
    }
    let mut r = Reader {
        b: &body[STATE_MAGIC.len()..],
    };
    let identity = match r.u16("version")? {
        STATE_VERSION => Some(VoterIdentity {
            cluster: r.u64("cluster id")?,
            node: r.u32("node id")?,
        }),
        STATE_VERSION_UNNAMED => None,
        version => {
            return Err(format!(
                "version {version}; this build reads versions {STATE_VERSION_UNNAMED} and \
                 {STATE_VERSION}"
            ))
        }
    };
    let count = r.u32("slot count")?;
    if count > MAX_STATE_SLOTS {
        return Err(format!("{count} slots (at most {MAX_STATE_SLOTS})"));
    }
    let mut slots = Vec::with_capacity(count as usize);
    let mut last = None;
    for _ in 0..count {
        let slot = r.u64("slot")?;
        if last.is_some_and(|l| slot <= l) {
            return Err(format!("slot {slot} out of order"));
        }
        last = Some(slot);
        let fence = r.u64("fence")?;
        let (tag, data) = r.value()?;
        slots.push((slot, fence, tag, data));
    }
    r.end("state")?;
    Ok(StoredVoter {
        identity,
        state: RegisterVoter::from_slots(slots),
    })
}

/// Stores a voter's state durably: a new file written and synced, renamed over the old one,
/// and the directory synced; a crash leaves the old state or the new one, whole.
pub fn store_voter(path: &Path, identity: VoterIdentity, v: &RegisterVoter) -> std::io::Result<()> {
    replace_durably(path, &encode_state(Some(identity), v))
}

/// Replaces the file at `path` by `bytes`: a new file written and synced, renamed over the
/// old one, and the directory synced.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // The whole name plus ".tmp" (not the extension replaced): two files of one stem
    // (`voter.state`, `voter.ballot`) stored at once must not share a temporary file.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Loads a voter's state. None when the file does not exist: a voter that has voted must
/// never start afresh (it would forget its fences and break the majorities' overlap), so
/// only the operator's first set-up may take None for an empty voter.
pub fn load_voter(path: &Path) -> Result<Option<StoredVoter>, String> {
    match std::fs::read(path) {
        Ok(b) => decode_voter(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_one_stem_are_replaced_at_once_without_sharing_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("voter.state"),
            dir.path().join("voter.ballot"),
        );
        std::thread::scope(|s| {
            for (path, byte) in [(&a, 1u8), (&b, 2u8)] {
                s.spawn(move || {
                    for len in 1..200 {
                        replace_durably(path, &vec![byte; len]).unwrap();
                    }
                });
            }
        });
        assert_eq!(std::fs::read(&a).unwrap(), vec![1u8; 199]);
        assert_eq!(std::fs::read(&b).unwrap(), vec![2u8; 199]);
    }
    use crate::cluster::register::Flaws;

    fn messages() -> Vec<RegisterMessage> {
        let tag = Tag {
            epoch: 7,
            counter: 3,
        };
        vec![
            RegisterMessage::Read {
                from: 1,
                op: 2,
                slot: 3,
                epoch: 4,
            },
            RegisterMessage::Prepare {
                from: 1,
                op: 5,
                slot: 3,
                epoch: 4,
            },
            RegisterMessage::Write {
                from: 1,
                op: 9,
                slot: 0,
                tag,
                data: vec![0xab; MAX_VALUE_BYTES],
            },
            RegisterMessage::Value {
                from: 2,
                op: 9,
                epoch: 7,
                tag,
                data: b"table".to_vec(),
            },
            RegisterMessage::Stored {
                from: 0,
                op: 5,
                epoch: 7,
            },
            RegisterMessage::Refused {
                from: 2,
                op: 6,
                epoch: 7,
                fence: 11,
            },
        ]
    }

    #[test]
    fn messages_come_back_as_they_went_and_every_cut_is_refused() {
        for m in messages() {
            let b = encode_message(&m);
            assert_eq!(decode_message(&b), Ok(m.clone()));
            for cut in 0..b.len() {
                assert!(decode_message(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(decode_message(&longer)
                .unwrap_err()
                .contains("after the end"));
        }
        assert!(decode_message(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err()
            .contains("unknown"));
    }

    #[test]
    fn an_oversized_value_is_refused() {
        let mut b = encode_message(&RegisterMessage::Value {
            from: 0,
            op: 1,
            epoch: 1,
            tag: Tag::default(),
            data: vec![1; MAX_VALUE_BYTES],
        });
        // The length field follows kind, sender, op, epoch and tag: 1 + 4 + 8 + 8 + 16.
        b[37..41].copy_from_slice(&(MAX_VALUE_BYTES as u32 + 1).to_le_bytes());
        b.push(1);
        assert!(decode_message(&b).unwrap_err().contains("at most"));
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let b: Vec<u8> = (0..len % 80)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_message(&b);
            let _ = decode_voter(&b);
        }
    }

    #[test]
    fn a_voters_state_survives_its_file_and_damage_is_refused() {
        let mut v = RegisterVoter::default();
        for m in messages() {
            v.answer(0, &m, Flaws::default());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("voter.state");
        assert_eq!(load_voter(&path), Ok(None));
        let me = VoterIdentity {
            cluster: 0x5eed,
            node: 3,
        };
        store_voter(&path, me, &v).expect("store");
        let loaded = load_voter(&path).expect("load").expect("present");
        assert_eq!(loaded.identity, Some(me));
        assert_eq!(loaded.state, v);
        assert_eq!((loaded.state.fence(3), loaded.state.fence(0)), (4, 7));
        let mut b = std::fs::read(&path).expect("read");
        let last = b.len() - 5;
        b[last] ^= 1;
        std::fs::write(&path, &b).expect("write");
        assert!(load_voter(&path).unwrap_err().contains("damaged"));
        std::fs::write(&path, b"something else").expect("write");
        assert!(load_voter(&path).unwrap_err().contains("magic"));
    }

    #[test]
    fn a_version_1_state_names_no_voter_and_is_written_back_unchanged() {
        let v = RegisterVoter::from_slots([(0, 7, Tag::default(), b"table".to_vec())]);
        let unnamed = StoredVoter {
            identity: None,
            state: v.clone(),
        };
        let b = encode_voter(&unnamed);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), STATE_VERSION_UNNAMED);
        assert_eq!(decode_voter(&b), Ok(unnamed));
        let named = StoredVoter {
            identity: Some(VoterIdentity {
                cluster: 9,
                node: 2,
            }),
            state: v,
        };
        let b2 = encode_voter(&named);
        assert_eq!(b2.len(), b.len() + 12);
        assert_eq!(decode_voter(&b2), Ok(named));
        // A version 2 file cut short in its identity is refused, not read as slots.
        let mut short = b2[..14].to_vec();
        let crc = rdma_link::checksum::crc32c(&short);
        short.extend_from_slice(&crc.to_le_bytes());
        assert!(decode_voter(&short).is_err());
    }
}
