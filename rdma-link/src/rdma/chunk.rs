//! Reassembly of requests and responses that arrive over RDMA as chunks of one slot each
//! (see [`ChunkHdr`]): chunks of one message arrive in order, chunks of different messages may
//! interleave; bounded by the payload limit and the number of messages under reassembly.

use crate::proto::{ChunkHdr, Msg, CHUNK_HDR_LEN};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;

/// Bytes of one message slot (send and receive); a control message or a chunk fills one.
pub(crate) const SLOT: usize = 4096;
/// Payload bytes per chunk (room is left for the MAC at the end of every SEND).
pub(super) const CHUNK_DATA: usize = SLOT - CHUNK_HDR_LEN - crate::proto::TAG_LEN;

/// A request / response being reassembled from chunks.
pub(crate) struct Partial {
    status: u8,
    total: u32,
    buf: BytesMut,
}

/// Add one received chunk; returns the message once complete. `limits`: (largest payload we
/// accept, most messages under reassembly at once). Errors are protocol violations.
pub(crate) fn reassemble(
    partial: &mut HashMap<(bool, u64), Partial>,
    bytes: &[u8],
    limits: (u32, usize),
) -> std::result::Result<Option<Msg>, String> {
    let h = ChunkHdr::decode(bytes).map_err(|e| e.to_string())?;
    let data = &bytes[CHUNK_HDR_LEN..];
    if h.total > limits.0 {
        return Err(format!(
            "{} of {} bytes exceeds our limit of {}",
            if h.request { "request" } else { "response" },
            h.total,
            limits.0
        ));
    }
    let key = (h.request, h.id);
    let done = |status: u8, payload: Bytes| {
        if h.request {
            Msg::Request { id: h.id, payload }
        } else {
            Msg::Response {
                id: h.id,
                status,
                payload,
            }
        }
    };
    if h.offset == 0 {
        if partial.contains_key(&key) {
            return Err(format!("message id {} restarted mid-way", h.id));
        }
        if data.len() == h.total as usize {
            return Ok(Some(done(h.status, Bytes::copy_from_slice(data))));
        }
        if partial.len() >= limits.1 {
            return Err(format!(
                "more than {} requests / responses under reassembly",
                limits.1
            ));
        }
        let mut buf = BytesMut::with_capacity(h.total as usize);
        buf.extend_from_slice(data);
        partial.insert(
            key,
            Partial {
                status: h.status,
                total: h.total,
                buf,
            },
        );
        return Ok(None);
    }
    let Some(p) = partial.get_mut(&key) else {
        return Err(format!("chunk of unknown message id {}", h.id));
    };
    if p.status != h.status || p.total != h.total || p.buf.len() != h.offset as usize {
        return Err(format!(
            "chunk [{}, +{}) of message id {} out of sequence (have {} of {} bytes)",
            h.offset,
            data.len(),
            h.id,
            p.buf.len(),
            p.total
        ));
    }
    p.buf.extend_from_slice(data);
    if p.buf.len() < p.total as usize {
        return Ok(None);
    }
    let Some(p) = partial.remove(&key) else {
        return Ok(None);
    };
    Ok(Some(done(p.status, p.buf.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(request: bool, id: u64, total: u32, offset: u32, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; CHUNK_HDR_LEN];
        ChunkHdr {
            request,
            id,
            status: 0,
            total,
            offset,
        }
        .encode(&mut h);
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn chunks_reassemble_interleaved_and_reject_violations() {
        let mut p = HashMap::new();
        let lim = (1 << 20, 4);
        let a: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..5_000u32).map(|i| (i * 3) as u8).collect();
        // Two messages interleaved, one of each direction with the same id.
        let mut got = Vec::new();
        for (req, msg) in [(true, &a), (false, &b)] {
            let c = &msg[..CHUNK_DATA.min(msg.len())];
            assert!(
                reassemble(&mut p, &chunk(req, 1, msg.len() as u32, 0, c), lim)
                    .unwrap()
                    .is_none()
            );
        }
        for (req, msg) in [(true, &a), (false, &b)] {
            let mut off = CHUNK_DATA;
            while off < msg.len() {
                let n = (msg.len() - off).min(CHUNK_DATA);
                let r = reassemble(
                    &mut p,
                    &chunk(req, 1, msg.len() as u32, off as u32, &msg[off..off + n]),
                    lim,
                )
                .unwrap();
                off += n;
                if let Some(m) = r {
                    got.push(m);
                }
            }
        }
        assert_eq!(
            got,
            vec![
                Msg::Request {
                    id: 1,
                    payload: a.clone().into()
                },
                Msg::Response {
                    id: 1,
                    status: 0,
                    payload: b.clone().into()
                }
            ]
        );
        assert!(p.is_empty());
        // Empty and single-chunk messages complete at once.
        assert_eq!(
            reassemble(&mut p, &chunk(true, 2, 0, 0, &[]), lim).unwrap(),
            Some(Msg::Request {
                id: 2,
                payload: Bytes::new()
            })
        );
        // Violations.
        let too_big = chunk(true, 3, (1 << 20) + 1, 0, &[1]);
        assert!(reassemble(&mut p, &too_big, lim).is_err());
        assert!(reassemble(&mut p, &chunk(true, 4, 100, 10, &[1]), lim).is_err()); // unknown
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 0, &[1; 10]), lim)
            .unwrap()
            .is_none());
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 20, &[1; 10]), lim).is_err()); // gap
        assert!(reassemble(&mut p, &chunk(true, 5, 100, 0, &[1; 10]), lim).is_err()); // restart
        assert!(reassemble(&mut p, &chunk(true, 6, 100, 95, &[1; 10]), lim).is_err()); // beyond
        p.clear();
        for id in 0..4 {
            assert!(reassemble(&mut p, &chunk(true, id, 100, 0, &[1]), lim)
                .unwrap()
                .is_none());
        }
        // More messages under reassembly than allowed.
        assert!(reassemble(&mut p, &chunk(false, 9, 100, 0, &[1]), lim).is_err());
        // Truncated header.
        assert!(reassemble(&mut p, &chunk(true, 1, 1, 0, &[])[..10], lim).is_err());
    }
}
