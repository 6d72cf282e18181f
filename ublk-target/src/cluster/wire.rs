//! Wire format of a request forwarded to a range's owner and of its answer (opaque to the
//! link, which carries it as a request payload).

pub const OP_WRITE: u8 = 1;
pub const OP_ZERO: u8 = 2;
pub const OP_READ: u8 = 3;
/// Write records `offset..=last` (last in the data) of partition `lun` from your second
/// store; `len` of them must be there.
pub const OP_WRITE_FOR_PARTNER: u8 = 4;
/// The ownership table changed on the medium (a giveback): re-read it.
pub const OP_RELOAD_OWNERSHIP: u8 = 5;
/// Resync (`storage = "own"`): write `data` at `offset` of LUN `lun` on your own medium, a
/// range the sender owns and your medium is outdated for.
pub const OP_RESYNC_WRITE: u8 = 6;
/// Resync done: range `offset` of LUN `lun` is copied; sync your medium and withdraw your
/// marks of it.
pub const OP_RESYNC_DONE: u8 = 7;
/// Verify (`storage = "own"`): answer crc32c digests of your medium's blocks of LUN `lun` at
/// `offset..offset + len`.
pub const OP_VERIFY_DIGESTS: u8 = 8;
/// Sync your medium of LUN `lun` (after a verify's repair).
pub const OP_SYNC_MEDIUM: u8 = 9;
/// Our path to the medium failed a read: answer `len` bytes of your medium of LUN `lun` at
/// `offset` (a part no staged write of ours covers).
pub const OP_READ_MEDIUM: u8 = 10;
/// Resync (`storage = "own"`): answer the out-of-sync parts of range `offset` of LUN `lun`
/// in your out-of-sync map, as (offset, len) pairs of u64 (the whole range without a map).
pub const OP_OUT_OF_SYNC: u8 = 11;
/// Each node its own medium, and ours failed a flush batch: write these records (their data
/// sent along, see [`encode_records`]) of partition `lun` to your medium, in order. `len`
/// holds [`FIRST_CHUNK`] and [`LAST_CHUNK`]; on the first chunk, older copies you hold of the
/// partition go first; after the last, drop your copies through seq `offset`.
pub const OP_WRITE_RECORDS_FOR_PARTNER: u8 = 12;
/// `OP_WRITE_RECORDS_FOR_PARTNER`: the batch's first request.
pub const FIRST_CHUNK: u32 = 1;
/// `OP_WRITE_RECORDS_FOR_PARTNER`: the batch's last request.
pub const LAST_CHUNK: u32 = 2;
/// Each node its own medium, and ours is outdated for ranges whose records our start
/// replayed into it: write every copy you hold of partition `lun` through seq `offset` to
/// your medium, then drop them.
pub const OP_WRITE_HELD_FOR_PARTNER: u8 = 13;
/// Log shipping, source to destination, before the source's log lets a flushed batch go:
/// answer once your log file holds our records of partition `lun` through seq `offset`
/// (durably). `data`: our log id, the batch's first seq (everything before it has left our
/// log), then the seqs of the batch's wrap markers (never posted: no record to wait for).
pub const OP_SHIP_LOGGED: u8 = 14;
/// Log shipping, source to destination, before the source serves: answer what the
/// destination's copy of our volume is now ([`ShipState`]). With `Returning`, the source
/// takes its volume back from the images (`OP_VERIFY_DIGESTS` and `OP_READ_MEDIUM` then read
/// the images), then says `OP_SHIP_RETURNED`. `offset` says who asks:
/// [`SHIP_STATE_BEFORE_SERVING`] (a source starting, which takes a returning volume back on
/// this connection) or [`SHIP_STATE_WHILE_SERVING`] (a serving source checking that its
/// volume was not exported meanwhile: it takes nothing back).
pub const OP_SHIP_STATE: u8 = 15;
pub const SHIP_STATE_BEFORE_SERVING: u64 = 0;
pub const SHIP_STATE_WHILE_SERVING: u64 = 1;
/// Log shipping: our medium now holds what your images hold, and our log is empty through
/// seq `through` of each partition (`data`: our log id, then one u64 per partition); log
/// our next records after those, and apply them to the images again.
pub const OP_SHIP_RETURNED: u8 = 16;
/// Log shipping, while the source takes its volume back: how long is your image of LUN
/// `lun`? (Answer: the length, a u64; past it the image reads as zeros.)
pub const OP_IMAGE_LEN: u8 = 17;
/// Write priority follows the writer: the sender keeps forwarding writes to range `offset` of
/// LUN `lun` and asks us to hand it over (`engine::write_priority`). Answered once the range
/// moved (we told the sender to re-read the table), or with why we keep it.
pub const OP_ASK_FOR_RANGE: u8 = 18;
/// In a refusal of forwarded I/O: the range is not (or no longer) the answering node's. The
/// sender waits for a move in progress and routes the I/O again.
/// Each node its own medium: may the asker read our ranges from its own medium and second
/// store for a while (`cluster::ReadLeases`)? The answer: the (lun, range) pairs granted, as
/// runs (see [`encode_runs`]).
pub const OP_READ_LEASE: u8 = 19;
pub const OWNERSHIP_MOVED: &str = "(ownership moved?)";
/// In a refusal of a forwarded write: not staged now (the answering node has not heard the
/// sender lately); the sender waits a moment and routes it again.
pub const TRY_AGAIN: &str = "(try again)";
const HEADER: usize = 17;
/// A shipped record's header: seq, kind, lun, offset, len.
const RECORD_HEADER: usize = 8 + 1 + 4 + 8 + 8;

/// One record of an `OP_WRITE_RECORDS_FOR_PARTNER` request (data only for `KIND_DATA`).
#[derive(Debug, PartialEq, Eq)]
pub struct ShippedRecord<'a> {
    pub seq: u64,
    pub zero: bool,
    pub lun: u32,
    pub offset: u64,
    pub len: u64,
    pub data: &'a [u8],
}

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// Bytes one record takes in a request.
pub fn shipped_len(r: &ShippedRecord<'_>) -> usize {
    RECORD_HEADER + r.data.len()
}

/// Appends `r` to a request's data.
pub fn encode_record(out: &mut Vec<u8>, r: &ShippedRecord<'_>) {
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.push(if r.zero { KIND_ZERO } else { KIND_DATA });
    out.extend_from_slice(&r.lun.to_le_bytes());
    out.extend_from_slice(&r.offset.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
    out.extend_from_slice(r.data);
}

/// The records of an `OP_WRITE_RECORDS_FOR_PARTNER` request, or None if malformed (a data
/// record's bytes are `len` long, a zero record has none, seqs ascend, nothing is left over).
pub fn decode_records(mut b: &[u8]) -> Option<Vec<ShippedRecord<'_>>> {
    let mut out: Vec<ShippedRecord<'_>> = Vec::new();
    while !b.is_empty() {
        let (head, rest) = b.split_at_checked(RECORD_HEADER)?;
        let u64_at = |at: usize| {
            head.get(at..at + 8)?
                .first_chunk::<8>()
                .map(|w| u64::from_le_bytes(*w))
        };
        let seq = u64_at(0)?;
        let zero = match head[8] {
            KIND_DATA => false,
            KIND_ZERO => true,
            _ => return None,
        };
        let lun = u32::from_le_bytes(*head.get(9..13)?.first_chunk::<4>()?);
        let (offset, len) = (u64_at(13)?, u64_at(21)?);
        let bytes = if zero { 0 } else { usize::try_from(len).ok()? };
        let (data, rest) = rest.split_at_checked(bytes)?;
        if out.last().is_some_and(|p| p.seq >= seq) || len == 0 {
            return None;
        }
        out.push(ShippedRecord {
            seq,
            zero,
            lun,
            offset,
            len,
            data,
        });
        b = rest;
    }
    (!out.is_empty()).then_some(out)
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    pub lun: u32,
    pub offset: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

/// (offset, len) runs as an answer's bytes.
pub fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    runs.iter()
        .flat_map(|&(o, l)| o.to_le_bytes().into_iter().chain(l.to_le_bytes()))
        .collect()
}

/// The runs of an `OP_OUT_OF_SYNC` answer, or None if it is not a whole number of pairs.
pub fn decode_runs(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    if !b.len().is_multiple_of(16) {
        return None;
    }
    let word = |c: &[u8]| c.first_chunk::<8>().map(|w| u64::from_le_bytes(*w));
    b.chunks_exact(16)
        .map(|c| Some((word(c)?, word(&c[8..])?)))
        .collect()
}

pub fn encode(op: u8, lun: u32, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + data.len());
    b.push(op);
    b.extend_from_slice(&lun.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(data);
    b
}

pub fn decode(b: &[u8]) -> Option<Request> {
    if b.len() < HEADER {
        return None;
    }
    let mut lun = [0u8; 4];
    lun.copy_from_slice(&b[1..5]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[5..13]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&b[13..17]);
    let r = Request {
        op: b[0],
        lun: u32::from_le_bytes(lun),
        offset: u64::from_le_bytes(off),
        len: u32::from_le_bytes(len),
        data: b[HEADER..].to_vec(),
    };
    let data_ok = match r.op {
        OP_WRITE | OP_RESYNC_WRITE => r.data.len() == r.len as usize,
        OP_ZERO
        | OP_READ
        | OP_RELOAD_OWNERSHIP
        | OP_RESYNC_DONE
        | OP_VERIFY_DIGESTS
        | OP_SYNC_MEDIUM
        | OP_READ_MEDIUM
        | OP_OUT_OF_SYNC
        | OP_SHIP_STATE
        | OP_IMAGE_LEN
        | OP_ASK_FOR_RANGE
        | OP_READ_LEASE
        | OP_WRITE_HELD_FOR_PARTNER => r.data.is_empty(),
        OP_SHIP_RETURNED => r.data.len() >= 8 && r.data.len().is_multiple_of(8),
        OP_WRITE_FOR_PARTNER => r.data.len() == 8,
        OP_SHIP_LOGGED => r.data.len() >= 16 && r.data.len().is_multiple_of(8),
        OP_WRITE_RECORDS_FOR_PARTNER => {
            r.len & !(FIRST_CHUNK | LAST_CHUNK) == 0 && decode_records(&r.data).is_some()
        }
        _ => false,
    };
    data_ok.then_some(r)
}

/// What an `OP_SHIP_LOGGED` request asks (see there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipLogged {
    pub partition: u32,
    pub through_seq: u64,
    pub log_id: u64,
    pub first_seq: u64,
    pub wraps: Vec<u64>,
}

impl ShipLogged {
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::with_capacity(16 + 8 * self.wraps.len());
        data.extend_from_slice(&self.log_id.to_le_bytes());
        data.extend_from_slice(&self.first_seq.to_le_bytes());
        for w in &self.wraps {
            data.extend_from_slice(&w.to_le_bytes());
        }
        encode(OP_SHIP_LOGGED, self.partition, self.through_seq, 0, &data)
    }

    /// From a request `decode` accepted with op `OP_SHIP_LOGGED`.
    pub fn of(r: &Request) -> Option<ShipLogged> {
        let mut words = r.data.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        });
        Some(ShipLogged {
            partition: r.lun,
            through_seq: r.offset,
            log_id: words.next()?,
            first_seq: words.next()?,
            wraps: words.collect(),
        })
    }
}

/// What a log-shipping destination's copy of a source's volume is (`OP_SHIP_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShipState {
    /// The destination logs the source's records and applies them to its images.
    Shipping,
    /// The images were exported (Unix time): someone else serves the volume now, so the
    /// source must not.
    Exported(u64),
    /// Exported, and the operator gave the volume back to the source (`nvmirrorctl
    /// return-image`, Unix time): the source copies what differs from the images.
    Returning(u64),
}

impl ShipState {
    pub fn encode(self) -> Vec<u8> {
        let (tag, at) = match self {
            ShipState::Shipping => (0u8, 0),
            ShipState::Exported(at) => (1, at),
            ShipState::Returning(at) => (2, at),
        };
        let mut b = vec![tag];
        b.extend_from_slice(&at.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<ShipState> {
        let (&tag, rest) = b.split_first()?;
        let at = u64::from_le_bytes(*rest.first_chunk::<8>()?);
        match (tag, rest.len()) {
            (0, 8) if at == 0 => Some(ShipState::Shipping),
            (1, 8) => Some(ShipState::Exported(at)),
            (2, 8) => Some(ShipState::Returning(at)),
            _ => None,
        }
    }
}

/// What an `OP_SHIP_RETURNED` request says (see there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipReturned {
    pub log_id: u64,
    /// Per partition, the last seq the source's log had when it took its volume back.
    pub through: Vec<u64>,
}

impl ShipReturned {
    pub fn encode(&self) -> Vec<u8> {
        let data: Vec<u8> = std::iter::once(self.log_id)
            .chain(self.through.iter().copied())
            .flat_map(u64::to_le_bytes)
            .collect();
        encode(OP_SHIP_RETURNED, 0, 0, 0, &data)
    }

    /// From a request `decode` accepted with op `OP_SHIP_RETURNED`.
    pub fn of(r: &Request) -> Option<ShipReturned> {
        let mut words = r
            .data
            .chunks_exact(8)
            .filter_map(|c| c.first_chunk::<8>().map(|w| u64::from_le_bytes(*w)));
        Some(ShipReturned {
            log_id: words.next()?,
            through: words.collect(),
        })
    }
}

/// Answer: 0 + data on success, 1 + UTF-8 message on failure.
pub fn ok(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + data.len());
    b.push(0);
    b.extend_from_slice(data);
    b
}

pub fn err(msg: &str) -> Vec<u8> {
    let mut b = vec![1];
    b.extend_from_slice(msg.as_bytes());
    b
}

pub fn answer(b: &[u8]) -> Result<&[u8], String> {
    match b.split_first() {
        Some((0, data)) => Ok(data),
        Some((1, msg)) => Err(String::from_utf8_lossy(msg).into_owned()),
        _ => Err("malformed answer from the partner".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn round_trip_and_rejects_malformed() {
        let b = encode(OP_WRITE, 2, 8192, 3, &[1, 2, 3]);
        assert_eq!(
            decode(&b),
            Some(Request {
                op: OP_WRITE,
                lun: 2,
                offset: 8192,
                len: 3,
                data: vec![1, 2, 3]
            })
        );
        assert_eq!(decode(&b[..10]), None);
        assert_eq!(decode(&encode(OP_WRITE, 0, 0, 5, &[1])), None);
        assert_eq!(decode(&encode(200, 0, 0, 0, &[])), None);
        // Verify requests carry no data: one that does is malformed.
        assert!(decode(&encode(OP_VERIFY_DIGESTS, 0, 4096, 4096, &[])).is_some());
        let asked = ShipLogged {
            partition: 3,
            through_seq: 90,
            log_id: 7,
            first_seq: 60,
            wraps: vec![71, 88],
        };
        let back = decode(&asked.encode()).and_then(|r| ShipLogged::of(&r));
        assert_eq!(back, Some(asked));
        assert_eq!(decode(&encode(OP_SHIP_LOGGED, 0, 1, 0, &[0; 12])), None);
        let returned = ShipReturned {
            log_id: 9,
            through: vec![5, 0, 77],
        };
        let back = decode(&returned.encode()).and_then(|r| ShipReturned::of(&r));
        assert_eq!(back, Some(returned));
        assert_eq!(decode(&encode(OP_SHIP_RETURNED, 0, 0, 0, &[0; 7])), None);
        assert_eq!(decode(&encode(OP_SHIP_STATE, 0, 0, 0, &[0])), None);
        assert_eq!(decode(&encode(OP_IMAGE_LEN, 0, 0, 0, &[0])), None);
        assert!(decode(&encode(OP_IMAGE_LEN, 2, 0, 0, &[])).is_some_and(|r| r.lun == 2));
        assert_eq!(decode(&encode(OP_ASK_FOR_RANGE, 0, 3, 0, &[1])), None);
        assert!(decode(&encode(OP_ASK_FOR_RANGE, 1, 3, 0, &[])).is_some_and(|r| r.offset == 3));
        for s in [
            ShipState::Shipping,
            ShipState::Exported(17),
            ShipState::Returning(u64::MAX),
        ] {
            assert_eq!(ShipState::decode(&s.encode()), Some(s));
        }
        assert_eq!(ShipState::decode(&[3; 9]), None);
        assert_eq!(ShipState::decode(&[1; 8]), None);
        assert_eq!(ShipState::decode(&[0, 1, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode(&encode(OP_VERIFY_DIGESTS, 0, 0, 1, &[0])), None);
        assert_eq!(decode(&encode(OP_SYNC_MEDIUM, 0, 0, 0, &[1])), None);
        let runs = vec![(0, 65536), (1 << 20, 131072)];
        assert_eq!(decode_runs(&encode_runs(&runs)), Some(runs));
        assert_eq!(decode_runs(&[0; 17]), None);
        assert_eq!(decode_runs(&[]), Some(vec![]));
        assert_eq!(answer(&ok(&[7])), Ok(&[7u8][..]));
        let recs = [
            ShippedRecord {
                seq: 4,
                zero: false,
                lun: 1,
                offset: 4096,
                len: 3,
                data: &[9, 8, 7],
            },
            ShippedRecord {
                seq: 6,
                zero: true,
                lun: 0,
                offset: 0,
                len: 1 << 20,
                data: &[],
            },
        ];
        let mut data = Vec::new();
        recs.iter().for_each(|r| encode_record(&mut data, r));
        assert_eq!(data.len(), recs.iter().map(shipped_len).sum::<usize>());
        assert_eq!(decode_records(&data).as_deref(), Some(&recs[..]));
        let req = encode(
            OP_WRITE_RECORDS_FOR_PARTNER,
            2,
            6,
            FIRST_CHUNK | LAST_CHUNK,
            &data,
        );
        assert!(decode(&req).is_some());
        // Truncated, trailing bytes, seqs out of order, unknown flags: malformed.
        assert_eq!(decode_records(&data[..data.len() - 1]), None);
        assert_eq!(decode_records(&data[..RECORD_HEADER + 1]), None);
        let mut swapped = Vec::new();
        recs.iter()
            .rev()
            .for_each(|r| encode_record(&mut swapped, r));
        assert_eq!(decode_records(&swapped), None);
        assert_eq!(
            decode(&encode(OP_WRITE_RECORDS_FOR_PARTNER, 2, 6, 4, &data)),
            None
        );
        assert_eq!(
            decode(&encode(OP_WRITE_RECORDS_FOR_PARTNER, 2, 6, 1, &[])),
            None
        );
        assert_eq!(answer(&err("no")), Err("no".to_string()));
    }
}
