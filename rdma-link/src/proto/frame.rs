//! How messages are carried: TCP frames (`len | crc32c | payload`, records read straight to
//! where the caller says), RDMA chunks of requests and responses ([`ChunkHdr`]), and the whole
//! messages of a custom network — with the receiver's limits checked.
//!
//! A TCP frame's crc32c guards the handshake only. Once frames carry MACs ([`FrameMac`]) the
//! MAC covers every byte the crc would, so the crc is neither computed nor checked
//! ([`FrameCrc::CoveredByMac`]: the field is sent as 0): it cost two passes over every record
//! (one per node) for nothing the MAC misses, as RDMA messages never had one.

use super::auth::{split_tag, FrameMac, TAG_LEN};
use super::codec::R;
use super::msg::{
    decode_data, decode_payload_prefix, Msg, RecordHdr, CHUNK_HDR_LEN, DEFAULT_MAX_REQUEST,
    FRAME_HEADER_LEN, K_CHUNK, K_RECORD, K_REQUEST, K_RESPONSE, MAX_CONTROL_LEN, MAX_RECORD_LEN,
    MAX_REQUEST_LEN, RECORD_HDR_LEN, REQUEST_HDR_LEN, RESPONSE_HDR_LEN,
};
use crate::error::FrameError;
use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt};

/// Whether a TCP frame's header carries the crc32c of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCrc {
    /// Before the frame MACs start (the handshake, or a link without MACs).
    Computed,
    /// The frame's MAC covers the payload: the field is 0 (the receiver refuses anything else).
    CoveredByMac,
}

impl FrameCrc {
    /// The rule for a connection whose frames do (`true`) or do not carry MACs.
    pub fn with_macs(macs: bool) -> FrameCrc {
        if macs {
            FrameCrc::CoveredByMac
        } else {
            FrameCrc::Computed
        }
    }

    fn of(self, parts: &[&[u8]]) -> u32 {
        match self {
            FrameCrc::CoveredByMac => 0,
            FrameCrc::Computed => parts
                .iter()
                .fold(0, |c, p| crate::checksum::crc32c_append(c, p)),
        }
    }
}

/// Frame header and message header of a request / response frame (the payload follows).
pub fn data_frame_header(msg: &Msg, check: FrameCrc) -> Option<(Vec<u8>, &Bytes)> {
    let (h, payload) = msg.data_parts()?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + h.len());
    let len = (h.len() + payload.len()) as u32;
    let crc = check.of(&[&h, payload]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&h);
    Some((out, payload))
}

/// Where the MAC's head ends in a TCP frame's payload (see [`FrameMac`]): after the message
/// header of a record, request or response (their bytes are the body); a control message is
/// all head. A payload too short for its header is all head (its MAC or decoding fails).
pub fn mac_head_len(payload: &[u8]) -> usize {
    let head = match payload.first() {
        Some(&K_RECORD) => RECORD_HDR_LEN,
        Some(&K_REQUEST) => REQUEST_HDR_LEN,
        Some(&K_RESPONSE) => RESPONSE_HDR_LEN,
        _ => payload.len(),
    };
    head.min(payload.len())
}

/// Encode a complete TCP frame for a control message (not a record), with its crc32c.
pub fn encode_frame(msg: &Msg, out: &mut Vec<u8>) {
    encode_frame_checked(msg, FrameCrc::Computed, out)
}

fn encode_frame_checked(msg: &Msg, check: FrameCrc, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    msg.encode(out);
    let payload = &out[start + FRAME_HEADER_LEN..];
    let len = payload.len() as u32;
    let crc = check.of(&[payload]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Encode a complete TCP frame for a control message, followed by its MAC when `mac` is given
/// (after the handshake's challenge; then without a crc).
pub fn encode_frame_mac(msg: &Msg, mac: Option<&mut FrameMac>, out: &mut Vec<u8>) {
    let start = out.len();
    encode_frame_checked(msg, FrameCrc::with_macs(mac.is_some()), out);
    if let Some(mac) = mac {
        let payload = &out[start + FRAME_HEADER_LEN..];
        let (head, body) = payload.split_at(mac_head_len(payload));
        let tag = mac.tag(head, body);
        out.extend_from_slice(&tag);
    }
}

/// Frame header for a record frame: the payload is the encoded header followed by `data`.
pub fn record_frame_header(
    hdr: &RecordHdr,
    data: &[u8],
    check: FrameCrc,
) -> [u8; FRAME_HEADER_LEN + RECORD_HDR_LEN] {
    let mut out = [0u8; FRAME_HEADER_LEN + RECORD_HDR_LEN];
    let mut body = Vec::with_capacity(RECORD_HDR_LEN);
    Msg::Record(*hdr).encode(&mut body);
    let len = (RECORD_HDR_LEN + data.len()) as u32;
    let crc = check.of(&[&body, data]);
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[8..].copy_from_slice(&body);
    out
}

/// Reads TCP frames. Control payloads go to an internal buffer bounded by
/// [`MAX_CONTROL_LEN`]; record bytes go straight to the slice the caller's sink returns
/// (the receiver's second-store region), so a record is never copied twice — unless frames
/// are authenticated ([`FrameReader::set_mac`]): then each frame's MAC (after its payload) is
/// checked instead of its crc, and a record's bytes are checked where the buffered reader holds
/// them (or, when it holds only part of them, in a buffer of this reader's) and only then
/// copied to the sink's slice, so that a forged record never changes the second store.
pub struct FrameReader {
    max_record: u32,
    max_request: u32,
    buf: Vec<u8>,
    mac: Option<FrameMac>,
    /// A record's bytes until its MAC is checked (at most `max_record`).
    bounce: Vec<u8>,
}

impl FrameReader {
    /// A reader accepting records up to `max_record` bytes and requests / responses up to
    /// [`DEFAULT_MAX_REQUEST`] bytes of payload.
    pub fn new(max_record: u32) -> Self {
        Self::with_limits(max_record, DEFAULT_MAX_REQUEST)
    }

    pub fn with_limits(max_record: u32, max_request: u32) -> Self {
        FrameReader {
            max_record: max_record.min(MAX_RECORD_LEN),
            max_request: max_request.min(MAX_REQUEST_LEN),
            buf: Vec::new(),
            mac: None,
            bounce: Vec::new(),
        }
    }

    /// Change the limits (requests are refused until the peer is authenticated).
    pub fn set_limits(&mut self, max_record: u32, max_request: u32) {
        self.max_record = max_record.min(MAX_RECORD_LEN);
        self.max_request = max_request.min(MAX_REQUEST_LEN);
    }

    /// From the next frame on, every frame must carry a valid MAC under `mac`.
    pub fn set_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    async fn read_tag<Rd: AsyncRead + Unpin>(
        &self,
        rd: &mut Rd,
    ) -> Result<Option<[u8; TAG_LEN]>, FrameError> {
        if self.mac.is_none() {
            return Ok(None);
        }
        let mut tag = [0u8; TAG_LEN];
        rd.read_exact(&mut tag).await?;
        Ok(Some(tag))
    }

    /// Read the next frame. For a `Record`, `sink(hdr)` must return the destination of the
    /// record bytes (exactly `hdr.len` long) or an error; the crc (or the MAC) covers header and
    /// bytes and is checked before this returns (the caller must not acknowledge a record before
    /// this returns Ok; without MACs the bytes land before the check).
    pub async fn read<'a, Rd, F>(&mut self, rd: &mut Rd, sink: F) -> Result<Msg, FrameError>
    where
        Rd: AsyncBufRead + Unpin,
        F: FnOnce(&RecordHdr) -> Result<&'a mut [u8], FrameError>,
    {
        let mut head = [0u8; FRAME_HEADER_LEN];
        // A clean EOF between frames is a close, not an error.
        let n = rd.read(&mut head[..1]).await?;
        if n == 0 {
            return Err(FrameError::Closed);
        }
        rd.read_exact(&mut head[1..]).await?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let max_data = RESPONSE_HDR_LEN + self.max_request as usize;
        let max = (RECORD_HDR_LEN + self.max_record as usize)
            .max(MAX_CONTROL_LEN)
            .max(max_data);
        if len > max {
            return Err(FrameError::Oversized {
                len: len as u64,
                max: max as u64,
            });
        }
        if len == 0 {
            return Err(FrameError::Malformed {
                what: "frame",
                detail: "empty payload".into(),
            });
        }
        if self.mac.is_some() && crc != 0 {
            return Err(FrameError::Malformed {
                what: "frame",
                detail: format!("crc field {crc:#010x} in a frame with a MAC (must be 0)"),
            });
        }
        // Peek the kind: records are read in two parts.
        let mut kind = [0u8; 1];
        rd.read_exact(&mut kind).await?;
        if kind[0] == K_RECORD {
            if len < RECORD_HDR_LEN {
                return Err(FrameError::Malformed {
                    what: "record",
                    detail: format!("frame of {len} bytes"),
                });
            }
            let mut hb = [0u8; RECORD_HDR_LEN];
            hb[0] = K_RECORD;
            rd.read_exact(&mut hb[1..]).await?;
            let (msg, _) = decode_payload_prefix(&hb)?;
            let Msg::Record(hdr) = msg else {
                return Err(FrameError::Malformed {
                    what: "record",
                    detail: "not a record".into(),
                });
            };
            let dst = record_destination(&hdr, len - RECORD_HDR_LEN, self.max_record, sink)?;
            let Some(mac) = &mut self.mac else {
                rd.read_exact(dst).await?;
                check_crc(crc, &[&hb, dst])?;
                return Ok(Msg::Record(hdr));
            };
            // Authenticated frames: the bytes reach the second store only once their MAC held.
            // Checked where the reader buffered them when it holds them all (one copy, into
            // the second store), else gathered in a buffer of ours first.
            let buffered = rd.fill_buf().await?;
            if buffered.len() >= dst.len() + TAG_LEN {
                let (body, rest) = buffered.split_at(dst.len());
                mac.check(&hb, body, &rest[..TAG_LEN])?;
                dst.copy_from_slice(body);
                rd.consume(dst.len() + TAG_LEN);
                return Ok(Msg::Record(hdr));
            }
            self.bounce.clear();
            self.bounce.resize(dst.len(), 0);
            rd.read_exact(&mut self.bounce).await?;
            let mut tag = [0u8; TAG_LEN];
            rd.read_exact(&mut tag).await?;
            mac.check(&hb, &self.bounce, &tag)?;
            dst.copy_from_slice(&self.bounce);
            return Ok(Msg::Record(hdr));
        }
        if kind[0] == K_REQUEST || kind[0] == K_RESPONSE {
            if len > max_data {
                return Err(FrameError::Oversized {
                    len: len as u64,
                    max: max_data as u64,
                });
            }
            // A fresh buffer per message: the payload is handed on without a copy.
            let mut b = vec![0u8; len];
            b[0] = kind[0];
            rd.read_exact(&mut b[1..]).await?;
            let tag = self.read_tag(rd).await?;
            match (&mut self.mac, tag) {
                (Some(mac), Some(tag)) => {
                    let (head, body) = b.split_at(mac_head_len(&b));
                    mac.check(head, body, &tag)?;
                }
                _ => check_crc(crc, &[&b])?,
            }
            return decode_data_within(Bytes::from(b), self.max_request);
        }
        if len > MAX_CONTROL_LEN {
            return Err(FrameError::Oversized {
                len: len as u64,
                max: MAX_CONTROL_LEN as u64,
            });
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        self.buf[0] = kind[0];
        rd.read_exact(&mut self.buf[1..]).await?;
        let tag = self.read_tag(rd).await?;
        match (&mut self.mac, tag) {
            (Some(mac), Some(tag)) => mac.check(&self.buf, &[], &tag)?,
            _ => check_crc(crc, &[&self.buf])?,
        }
        Msg::decode(&self.buf)
    }
}

/// A frame without a MAC: its crc32c must match the payload (`parts` in order).
fn check_crc(expected: u32, parts: &[&[u8]]) -> Result<(), FrameError> {
    let got = FrameCrc::Computed.of(parts);
    if got != expected {
        return Err(FrameError::BadCrc { got, expected });
    }
    Ok(())
}

/// Check a received record header against the bytes that came with it and our limit; returns
/// where the bytes go (from `sink`, exactly `data_len` long).
fn record_destination<'a, F>(
    hdr: &RecordHdr,
    data_len: usize,
    max_record: u32,
    sink: F,
) -> Result<&'a mut [u8], FrameError>
where
    F: FnOnce(&RecordHdr) -> Result<&'a mut [u8], FrameError>,
{
    if hdr.len as usize != data_len {
        return Err(FrameError::Malformed {
            what: "record",
            detail: format!("header says {} bytes, frame carries {data_len}", hdr.len),
        });
    }
    if hdr.len > max_record {
        return Err(FrameError::Oversized {
            len: u64::from(hdr.len),
            max: u64::from(max_record),
        });
    }
    let dst = sink(hdr)?;
    if dst.len() != data_len {
        return Err(FrameError::Malformed {
            what: "record",
            detail: "sink length".into(),
        });
    }
    Ok(dst)
}

/// Decode a complete request / response and check its payload against our limit.
fn decode_data_within(payload: Bytes, max_request: u32) -> Result<Msg, FrameError> {
    let msg = decode_data(payload)?;
    let n = match &msg {
        Msg::Request { payload, .. } | Msg::Response { payload, .. } => payload.len(),
        _ => 0,
    };
    if n > max_request as usize {
        return Err(FrameError::Oversized {
            len: n as u64,
            max: u64::from(max_request),
        });
    }
    Ok(msg)
}

/// Decode one whole message of a message network (a custom [`crate::Network`]): the payload as
/// [`Msg::encode`] writes it, with a record's bytes right after its header — a TCP frame
/// without the frame header. The limits are those of [`FrameReader`]; a record's bytes are
/// copied to the slice `sink` returns for its header.
pub fn decode_message<'a, F>(
    message: Bytes,
    max_record: u32,
    max_request: u32,
    sink: F,
) -> Result<Msg, FrameError>
where
    F: FnOnce(&RecordHdr) -> Result<&'a mut [u8], FrameError>,
{
    let max_record = max_record.min(MAX_RECORD_LEN);
    let max_request = max_request.min(MAX_REQUEST_LEN);
    match message.first() {
        None => Err(FrameError::Malformed {
            what: "message",
            detail: "empty message".into(),
        }),
        Some(&K_RECORD) => {
            if message.len() < RECORD_HDR_LEN {
                return Err(FrameError::Malformed {
                    what: "record",
                    detail: format!("message of {} bytes", message.len()),
                });
            }
            let (msg, _) = decode_payload_prefix(&message[..RECORD_HDR_LEN])?;
            let Msg::Record(hdr) = msg else {
                return Err(FrameError::Malformed {
                    what: "record",
                    detail: "not a record".into(),
                });
            };
            let data = &message[RECORD_HDR_LEN..];
            record_destination(&hdr, data.len(), max_record, sink)?.copy_from_slice(data);
            Ok(msg)
        }
        Some(&K_REQUEST | &K_RESPONSE) => {
            let max_data = RESPONSE_HDR_LEN + max_request as usize;
            if message.len() > max_data {
                return Err(FrameError::Oversized {
                    len: message.len() as u64,
                    max: max_data as u64,
                });
            }
            decode_data_within(message, max_request)
        }
        Some(_) => {
            if message.len() > MAX_CONTROL_LEN {
                return Err(FrameError::Oversized {
                    len: message.len() as u64,
                    max: MAX_CONTROL_LEN as u64,
                });
            }
            Msg::decode(&message)
        }
    }
}

/// [`decode_message`] for a message that ends in a MAC ([`TAG_LEN`] bytes) when `mac` is given:
/// the MAC is checked before anything is decoded or copied.
pub fn decode_message_mac<'a, F>(
    message: Bytes,
    max_record: u32,
    max_request: u32,
    mac: Option<&mut FrameMac>,
    sink: F,
) -> Result<Msg, FrameError>
where
    F: FnOnce(&RecordHdr) -> Result<&'a mut [u8], FrameError>,
{
    let message = match mac {
        None => message,
        Some(mac) => {
            let (body, tag) = split_tag(&message)?;
            mac.check(body, &[], tag)?;
            message.slice(..body.len())
        }
    };
    decode_message(message, max_record, max_request, sink)
}

/// Header of one RDMA chunk of a request or response: the SEND carries `CHUNK_HDR_LEN` header
/// bytes and then the payload bytes `[offset, offset + n)` of a message of `total` bytes.
/// Chunks of one message are sent in order (RC keeps them in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHdr {
    /// `true`: part of a request; `false`: part of a response.
    pub request: bool,
    pub id: u64,
    /// Response status (0 for requests).
    pub status: u8,
    pub total: u32,
    pub offset: u32,
}

impl ChunkHdr {
    pub fn encode(&self, out: &mut [u8; CHUNK_HDR_LEN]) {
        out[0] = K_CHUNK;
        out[1] = if self.request { K_REQUEST } else { K_RESPONSE };
        out[2..10].copy_from_slice(&self.id.to_le_bytes());
        out[10] = self.status;
        out[11..15].copy_from_slice(&self.total.to_le_bytes());
        out[15..19].copy_from_slice(&self.offset.to_le_bytes());
    }

    /// Decode the header at the start of a chunk SEND; the rest of `b` is the chunk's data.
    pub fn decode(b: &[u8]) -> Result<ChunkHdr, FrameError> {
        let mut r = R {
            buf: b,
            pos: 0,
            what: "chunk",
        };
        if r.u8()? != K_CHUNK {
            return Err(r.bad("not a chunk".into()));
        }
        let request = match r.u8()? {
            K_REQUEST => true,
            K_RESPONSE => false,
            k => return Err(r.bad(format!("chunk of message kind {k}"))),
        };
        let id = r.u64()?;
        let status = r.u8()?;
        let total = r.u32()?;
        let offset = r.u32()?;
        if total > MAX_REQUEST_LEN {
            return Err(FrameError::Oversized {
                len: u64::from(total),
                max: u64::from(MAX_REQUEST_LEN),
            });
        }
        let data = b.len() - CHUNK_HDR_LEN;
        if u64::from(offset) + data as u64 > u64::from(total) {
            return Err(r.bad(format!(
                "chunk [{offset}, +{data}) beyond the message's {total} bytes"
            )));
        }
        Ok(ChunkHdr {
            request,
            id,
            status,
            total,
            offset,
        })
    }
}

/// True if a payload's first byte starts an RDMA chunk.
pub fn is_chunk(payload: &[u8]) -> bool {
    payload.first() == Some(&K_CHUNK)
}

/// Whether a message is a record (its header; over RDMA its bytes came by RDMA WRITE).
pub fn is_record(payload: &[u8]) -> bool {
    payload.first() == Some(&K_RECORD)
}
