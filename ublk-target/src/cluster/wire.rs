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
const HEADER: usize = 17;

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
        OP_ZERO | OP_READ | OP_RELOAD_OWNERSHIP | OP_RESYNC_DONE | OP_VERIFY_DIGESTS
        | OP_SYNC_MEDIUM | OP_READ_MEDIUM | OP_OUT_OF_SYNC => r.data.is_empty(),
        OP_WRITE_FOR_PARTNER => r.data.len() == 8,
        _ => false,
    };
    data_ok.then_some(r)
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
        assert_eq!(decode(&encode(OP_VERIFY_DIGESTS, 0, 0, 1, &[0])), None);
        assert_eq!(decode(&encode(OP_SYNC_MEDIUM, 0, 0, 0, &[1])), None);
        let runs = vec![(0, 65536), (1 << 20, 131072)];
        assert_eq!(decode_runs(&encode_runs(&runs)), Some(runs));
        assert_eq!(decode_runs(&[0; 17]), None);
        assert_eq!(decode_runs(&[]), Some(vec![]));
        assert_eq!(answer(&ok(&[7])), Ok(&[7u8][..]));
        assert_eq!(answer(&err("no")), Err("no".to_string()));
    }
}
