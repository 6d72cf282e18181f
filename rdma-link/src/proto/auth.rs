//! The link's cryptography, in one place: the handshake's proofs (HMAC-SHA256 of the cluster
//! secret over the transcript), the session keys derived from them, and the MAC that every
//! message carries once the keys are in place ([`FrameMac`]).
//!
//! * **Transcript**: protocol version, cluster id, both node ids, both nonces, both nodes'
//!   announced facts ([`NodeInfo`]: store lengths, layout tag, windows, limits, transport) and
//!   the acceptor's flags (frame MACs on or off). A man in the middle who changes any of them
//!   breaks the proofs, so neither a layout nor a downgrade to unauthenticated frames can be
//!   slipped in. The `Auth` and `Welcome` proofs also cover what those messages carry (resync
//!   point, RDMA region): see [`Proof`].
//! * **Session keys**: one per direction, `HMAC-SHA256(secret, label | transcript)` (the
//!   expand step of HKDF with the secret as the pseudo-random key; the nonces make them fresh
//!   for every connection).
//! * **Frame MAC**: keyed BLAKE3 over `body | head | head length (u64 LE) | sequence number
//!   (u64 LE)`, truncated to [`TAG_LEN`] bytes and appended to the message. `head` is the
//!   message's header (a control message is all head), `body` the bytes it carries (a
//!   record's, a request's or response's payload), so the bulk bytes start the hash on a
//!   BLAKE3 chunk boundary, where it hashes several chunks at once (4 KiB: 1.3 µs instead of
//!   3.3 µs with the header in front, on this project's host); the head's length makes the
//!   split unambiguous. The sequence number counts the messages of one direction from 0; it
//!   is not sent, so a replayed, dropped, reordered or injected message fails the check of the
//!   one that follows.
//!
//! Public so that tools and tests can speak the protocol (see `tests/tcp.rs`).

use super::msg::{NodeInfo, PROTOCOL_VERSION};
use crate::error::FrameError;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the MAC appended to every message after the handshake.
pub const TAG_LEN: usize = 16;
/// Challenge flag: the acceptor authenticates every message after the handshake.
pub const FLAG_FRAME_MAC: u8 = 1;

const LABEL_ACCEPTOR: &[u8] = b"nvmirror-link acceptor";
const LABEL_CONNECTOR: &[u8] = b"nvmirror-link connector";
const LABEL_WELCOME: &[u8] = b"nvmirror-link welcome";
const LABEL_KEY_C2A: &[u8] = b"nvmirror-link frame key connector->acceptor";
const LABEL_KEY_A2C: &[u8] = b"nvmirror-link frame key acceptor->connector";

/// Which side of the handshake a connection's keys are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Connector,
    Acceptor,
}

/// The three proofs of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The acceptor's, in `Challenge`: over the transcript.
    Challenge,
    /// The connector's, in `Auth`: over the transcript and the message's resync point and region.
    Auth,
    /// The acceptor's, in `Welcome`: the same over its resync point and region.
    Welcome,
}

impl Proof {
    fn label(self) -> &'static [u8] {
        match self {
            Proof::Challenge => LABEL_ACCEPTOR,
            Proof::Auth => LABEL_CONNECTOR,
            Proof::Welcome => LABEL_WELCOME,
        }
    }
}

/// Everything both proofs and the session keys are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    pub cluster_id: u64,
    pub connector: u32,
    pub acceptor: u32,
    pub nonce_c: [u8; 32],
    pub nonce_a: [u8; 32],
    pub info_c: NodeInfo,
    pub info_a: NodeInfo,
    /// The acceptor's flags ([`FLAG_FRAME_MAC`]).
    pub flags_a: u8,
}

fn info_bytes(m: &mut Hmac<Sha256>, i: &NodeInfo) {
    m.update(&i.first_len.to_le_bytes());
    m.update(&i.second_len.to_le_bytes());
    m.update(&i.layout_tag.to_le_bytes());
    m.update(&i.window.to_le_bytes());
    m.update(&i.max_record.to_le_bytes());
    m.update(&[i.transport]);
    m.update(&i.request_window.to_le_bytes());
    m.update(&i.max_request.to_le_bytes());
    m.update(&[i.role]);
}

impl Transcript {
    fn hmac(&self, secret: &[u8], label: &[u8]) -> Hmac<Sha256> {
        let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        m.update(label);
        m.update(&PROTOCOL_VERSION.to_le_bytes());
        m.update(&self.cluster_id.to_le_bytes());
        m.update(&self.connector.to_le_bytes());
        m.update(&self.acceptor.to_le_bytes());
        m.update(&self.nonce_c);
        m.update(&self.nonce_a);
        info_bytes(&mut m, &self.info_c);
        info_bytes(&mut m, &self.info_a);
        m.update(&[self.flags_a]);
        m
    }

    /// A proof that its sender knows the secret. `carried`: what the message carries besides
    /// the proof ([`super::proof_payload`] for `Auth` and `Welcome`, empty for `Challenge`).
    pub fn proof(&self, secret: &[u8], which: Proof, carried: &[u8]) -> [u8; 32] {
        let mut m = self.hmac(secret, which.label());
        m.update(carried);
        m.finalize().into_bytes().into()
    }

    /// Check a proof (constant time).
    pub fn verify(&self, secret: &[u8], which: Proof, carried: &[u8], proof: &[u8; 32]) -> bool {
        let mut m = self.hmac(secret, which.label());
        m.update(carried);
        m.verify_slice(proof).is_ok()
    }

    /// The frame keys of `side`: (what it sends with, what it receives with).
    pub fn keys(&self, secret: &[u8], side: Side) -> SessionKeys {
        let key = |label| -> [u8; 32] { self.hmac(secret, label).finalize().into_bytes().into() };
        let (c2a, a2c) = (key(LABEL_KEY_C2A), key(LABEL_KEY_A2C));
        match side {
            Side::Connector => SessionKeys { tx: c2a, rx: a2c },
            Side::Acceptor => SessionKeys { tx: a2c, rx: c2a },
        }
    }
}

/// The two frame keys of one side of a connection.
#[derive(Clone)]
pub struct SessionKeys {
    pub tx: [u8; 32],
    pub rx: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// The MAC state of one direction of a connection: the key and the sequence number of the
/// next message.
#[derive(Clone)]
pub struct FrameMac {
    key: [u8; 32],
    seq: u64,
}

impl std::fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameMac {{ seq: {} }}", self.seq)
    }
}

impl FrameMac {
    pub fn new(key: [u8; 32]) -> FrameMac {
        FrameMac { key, seq: 0 }
    }

    /// Sequence number of the next message.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn compute(&self, head: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(body);
        h.update(head);
        h.update(&(head.len() as u64).to_le_bytes());
        h.update(&self.seq.to_le_bytes());
        truncate(&h)
    }

    /// The tag of the next message, `head` followed by `body` (sender); the sequence moves on.
    pub fn tag(&mut self, head: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let t = self.compute(head, body);
        self.seq += 1;
        t
    }

    /// Check the tag of the next message, `head` followed by `body` (receiver, constant
    /// time). The sequence moves on only on success: after a failure the connection is
    /// closed anyway.
    pub fn check(&mut self, head: &[u8], body: &[u8], tag: &[u8]) -> Result<(), FrameError> {
        let want = self.compute(head, body);
        let mut diff = u8::from(tag.len() != TAG_LEN);
        for (a, b) in want.iter().zip(tag.iter()) {
            diff |= a ^ b;
        }
        if diff != 0 {
            return Err(FrameError::BadMac { seq: self.seq });
        }
        self.seq += 1;
        Ok(())
    }
}

fn truncate(h: &blake3::Hasher) -> [u8; TAG_LEN] {
    let full = h.finalize();
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&full.as_bytes()[..TAG_LEN]);
    t
}

/// Split a whole message (custom network, RDMA SEND) into its body and its tag.
pub fn split_tag(message: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    if message.len() < TAG_LEN + 1 {
        return Err(FrameError::Malformed {
            what: "message",
            detail: format!(
                "{} bytes, too short to carry a {TAG_LEN}-byte MAC",
                message.len()
            ),
        });
    }
    Ok(message.split_at(message.len() - TAG_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_key_sequence_split_and_bytes() {
        let (mut tx, mut rx) = (FrameMac::new([1; 32]), FrameMac::new([1; 32]));
        let t0 = tx.tag(b"hello", b" world");
        let t1 = tx.tag(b"hello", b" world");
        assert_ne!(t0, t1, "the sequence number is in the MAC");
        // Replaying message 1 in place of message 0 fails; the right order passes.
        assert!(rx.clone().check(b"hello", b" world", &t1).is_err());
        // The same bytes split elsewhere between header and body are another message.
        assert!(rx.clone().check(b"hello world", b"", &t0).is_err());
        assert!(rx.clone().check(b"hello ", b"world", &t0).is_err());
        rx.check(b"hello", b" world", &t0).unwrap();
        rx.check(b"hello", b" world", &t1).unwrap();
        // Another key, one flipped bit, a short tag: refused.
        let mut other = FrameMac::new([2; 32]);
        let t = tx.tag(b"x", b"");
        assert!(other.check(b"x", b"", &t).is_err());
        let mut bad = t;
        bad[3] ^= 1;
        assert!(rx.clone().check(b"x", b"", &bad).is_err());
        assert!(rx.clone().check(b"x", b"", &t[..8]).is_err());
        rx.check(b"x", b"", &t).unwrap();
        assert_eq!((tx.seq(), rx.seq()), (3, 3));
    }
}
