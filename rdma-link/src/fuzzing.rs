//! The bodies of the link's fuzz targets (`fuzz/fuzz_targets/link_frames.rs` and
//! `handshake.rs` at the repository root), here so that the fuzz crate and the corpus replay in
//! `tests/fuzz_corpus.rs` run the same code, and so the handshake — crate-internal — can be
//! driven at all. Public only for those two callers: not part of the link's API, hidden from
//! its documentation, and nothing else may depend on it.
//!
//! Each target takes the raw fuzz input and panics only when the code under test breaks one of
//! its promises: decoding never panics, never hangs, never allocates beyond the `MAX_*` limits
//! (the harnesses keep their own buffers bounded, so libFuzzer's memory limit catches the
//! rest); what decodes re-encodes to the same message; the handshake accepts a peer only after
//! it proved the secret, and never waits on input that is all there.
//!
//! Checksums and MACs would stop a fuzzer at the first byte it changes, so a flag in the input
//! lets the harness fix them up (as an honest sender would compute them); inputs without the
//! flag exercise the rejection of damaged frames and forged MACs.

use crate::api::SecondStore;
use crate::config::{LinkConfig, Role, Transport};
use crate::error::{FrameError, LinkError, Result};
use crate::handshake::{self, MsgIo, PeerInfo};
use crate::proto::{
    self, decode_message, decode_message_mac, decode_payload_prefix, proof_payload, ChunkHdr,
    FrameMac, FrameReader, Hello, Msg, Proof, RecordHdr, RemoteRegion, Side, Transcript,
    CHUNK_HDR_LEN, DEFAULT_MAX_REQUEST, FLAG_FRAME_MAC, FRAME_HEADER_LEN, MAGIC, PROTOCOL_VERSION,
    TAG_LEN,
};
use crate::rdma::chunk::{reassemble, SLOT};
use crate::region::Region;
use crate::shared::Shared;
use crate::spawn::{Spawn, Task};
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

/// Largest record the harnesses accept, and the size of their second-store buffer.
const FUZZ_MAX_RECORD: u32 = 64 << 10;

/// Mode bits of the first input byte of `link_frames`.
const MODE_MASK: u8 = 0b11;
const MODE_TCP_FRAMES: u8 = 0;
const MODE_WHOLE_MESSAGE: u8 = 1;
const MODE_PAYLOAD: u8 = 2;
const MODE_RDMA_CHUNKS: u8 = 3;
/// `link_frames`: compute the crc32c (with [`FLAG_FRAME_MACS`], the MAC instead) of every TCP
/// frame, or the MAC of a whole message, as a sender does, before reading them.
pub const FLAG_SEAL_FRAMES: u8 = 0b100;
/// `link_frames`: TCP frames and whole messages are read as after the handshake with frame
/// MACs on: each ends in a MAC of [`TAG_LEN`] bytes under the session key [`FUZZ_FRAME_KEY`],
/// the first message with sequence number 0.
pub const FLAG_FRAME_MACS: u8 = 0b1000;
/// The receive key of `link_frames` inputs with [`FLAG_FRAME_MACS`].
pub const FUZZ_FRAME_KEY: [u8; 32] = [0x4b; 32];

/// Fuzz target `link_frames`: the first byte picks the decoder (bits 0-1), whether checksums
/// and MACs are fixed up ([`FLAG_SEAL_FRAMES`]) and whether frames carry MACs
/// ([`FLAG_FRAME_MACS`]); the rest is what arrives.
///
/// * 0: a TCP byte stream read by [`FrameReader`] until it fails;
/// * 1: one whole message of a custom network ([`decode_message_mac`]);
/// * 2: one message payload ([`Msg::decode`], [`decode_payload_prefix`], [`proto::decode_data`]);
/// * 3: RDMA receive slots (`u16` length, then up to one slot of bytes, repeated): chunks go to
///   the reassembly, anything else to [`Msg::decode`], until the first protocol violation
///   (without MACs: the flags do not apply).
pub fn link_frames(data: &[u8]) {
    let _ = decoded_messages(data);
}

/// `link_frames`, returning how many messages the input decoded to.
fn decoded_messages(data: &[u8]) -> usize {
    let Some((&head, rest)) = data.split_first() else {
        return 0;
    };
    let seal = head & FLAG_SEAL_FRAMES != 0;
    let macs = head & FLAG_FRAME_MACS != 0;
    match head & MODE_MASK {
        MODE_TCP_FRAMES => tcp_frames(rest, seal, macs),
        MODE_WHOLE_MESSAGE => usize::from(whole_message(rest, seal, macs)),
        MODE_PAYLOAD => usize::from(payload(rest)),
        _ => rdma_slots(rest),
    }
}

/// Runs a future whose I/O is all in memory to completion. `Pending` would mean it waits for
/// input that is never going to come (everything there is, is there): a hang, reported.
/// Runs inside a tokio runtime's context (not driven: nothing in it may wait), for the timers
/// the code under test sets up.
fn complete<F: Future>(fut: F) -> F::Output {
    struct NoWake;
    impl Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("cannot build the harness's runtime: {e}"),
        }
    });
    let _context = rt.enter();
    let waker = Waker::from(Arc::new(NoWake));
    let mut cx = Context::from_waker(&waker);
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("waiting for more input although all of it is there"),
    }
}

/// Where a record's bytes land: `region[offset..offset + len]`, as the second store does.
fn place<'a>(region: &'a mut [u8], h: &RecordHdr) -> Result<&'a mut [u8], FrameError> {
    let region_len = region.len() as u64;
    let out_of_region = FrameError::OutOfRegion {
        offset: h.offset,
        len: u64::from(h.len),
        region_len,
    };
    let start = usize::try_from(h.offset).map_err(|_| out_of_region.clone())?;
    let end = start
        .checked_add(h.len as usize)
        .ok_or_else(|| out_of_region.clone())?;
    region.get_mut(start..end).ok_or(out_of_region)
}

/// The record bytes a header points at in `region` (after `place` accepted it).
fn placed<'a>(region: &'a [u8], h: &RecordHdr) -> &'a [u8] {
    let start = h.offset as usize;
    &region[start..start + h.len as usize]
}

/// Fix up the crc32c of every complete frame, and with `mac` its MAC (the [`TAG_LEN`] bytes
/// after its payload), as a sender computes them.
fn seal_frames(bytes: &mut [u8], mut mac: Option<FrameMac>) {
    let tag_len = if mac.is_some() { TAG_LEN } else { 0 };
    let mut at = 0usize;
    while bytes.len() - at >= FRAME_HEADER_LEN {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let start = at + FRAME_HEADER_LEN;
        let Some(end) = start
            .checked_add(len as usize)
            .filter(|&end| end + tag_len <= bytes.len())
        else {
            return;
        };
        // With MACs the crc field is not checked, and a sender leaves it 0.
        let crc = match mac {
            Some(_) => 0,
            None => crate::checksum::crc32c(&bytes[start..end]),
        };
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        if let Some(mac) = &mut mac {
            // The MAC covers the whole payload: a record's header and bytes, a request's
            // header and payload, a control message.
            let (head, body) = bytes[start..end].split_at(proto::mac_head_len(&bytes[start..end]));
            let tag = mac.tag(head, body);
            bytes[end..end + TAG_LEN].copy_from_slice(&tag);
        }
        at = end + tag_len;
    }
}

/// A message as a TCP sender writes it (with its MAC when `mac` is given).
fn write_frame(msg: &Msg, record: Option<&[u8]>, mac: Option<&mut FrameMac>, out: &mut Vec<u8>) {
    let check = proto::FrameCrc::with_macs(mac.is_some());
    let (head, body): (Vec<u8>, &[u8]) = match (msg, record) {
        (Msg::Record(h), Some(bytes)) => {
            (proto::record_frame_header(h, bytes, check).to_vec(), bytes)
        }
        (Msg::Request { .. } | Msg::Response { .. }, _) => {
            let Some((head, payload)) = proto::data_frame_header(msg, check) else {
                panic!("{} has no data frame header", msg.name());
            };
            (head, &payload[..])
        }
        _ => {
            proto::encode_frame_mac(msg, mac, out);
            return;
        }
    };
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    if let Some(mac) = mac {
        out.extend_from_slice(&mac.tag(&head[FRAME_HEADER_LEN..], body));
    }
}

fn tcp_frames(input: &[u8], seal: bool, macs: bool) -> usize {
    let new_mac = || macs.then(|| FrameMac::new(FUZZ_FRAME_KEY));
    let mut stream = input.to_vec();
    if seal {
        seal_frames(&mut stream, new_mac());
    }
    let reader_for = |mac: Option<FrameMac>| {
        let mut reader = FrameReader::new(FUZZ_MAX_RECORD);
        if let Some(mac) = mac {
            reader.set_mac(mac);
        }
        reader
    };
    let mut reader = reader_for(new_mac());
    let mut region = vec![0u8; FUZZ_MAX_RECORD as usize];
    let mut rd = &stream[..];
    // What was read is written again as a sender would (its MACs in the same sequence), and
    // read back by a second reader.
    let mut writer_mac = new_mac();
    let mut reader_again = reader_for(new_mac());
    let mut scratch = vec![0u8; FUZZ_MAX_RECORD as usize];
    let mut decoded = 0;
    loop {
        let before = rd.len();
        let msg = match complete(reader.read(&mut rd, |h| place(&mut region, h))) {
            Ok(msg) => msg,
            Err(_) => return decoded,
        };
        decoded += 1;
        assert!(
            rd.len() < before,
            "a frame was read without consuming input"
        );
        let record = match &msg {
            Msg::Record(h) => Some(placed(&region, h).to_vec()),
            _ => None,
        };
        let mut again = Vec::new();
        write_frame(&msg, record.as_deref(), writer_mac.as_mut(), &mut again);
        // A few bytes at a time: a record's bytes are gathered before their MAC is checked
        // (the first reader had them all buffered at once).
        let mut rd_again = tokio::io::BufReader::with_capacity(5, &again[..]);
        let reread = complete(reader_again.read(&mut rd_again, |h| place(&mut scratch, h)));
        match reread {
            Ok(m) => assert_eq!(m, msg, "a frame does not read back as itself"),
            Err(e) => panic!(
                "the re-encoded {} frame does not read back: {e}",
                msg.name()
            ),
        }
        assert!(
            rd_again.get_ref().is_empty() && rd_again.buffer().is_empty(),
            "a re-encoded frame was not read whole"
        );
        if let (Some(bytes), Msg::Record(h)) = (record, &msg) {
            assert_eq!(placed(&scratch, h), &bytes[..], "record bytes changed");
        }
    }
}

fn whole_message(input: &[u8], seal: bool, macs: bool) -> bool {
    let mut message = input.to_vec();
    if seal && macs && message.len() > TAG_LEN {
        let body = message.len() - TAG_LEN;
        let tag = FrameMac::new(FUZZ_FRAME_KEY).tag(&message[..body], &[]);
        message[body..].copy_from_slice(&tag);
    }
    let mut region = vec![0u8; FUZZ_MAX_RECORD as usize];
    let msg = match decode_message_mac(
        Bytes::from(message),
        FUZZ_MAX_RECORD,
        DEFAULT_MAX_REQUEST,
        macs.then(|| FrameMac::new(FUZZ_FRAME_KEY)).as_mut(),
        |h| place(&mut region, h),
    ) {
        Ok(msg) => msg,
        Err(_) => return false,
    };
    let mut again = Vec::new();
    msg.encode(&mut again);
    match &msg {
        Msg::Record(h) => {
            assert!(h.len <= FUZZ_MAX_RECORD, "record beyond the limit accepted");
            again.extend_from_slice(placed(&region, h));
        }
        Msg::Request { payload, .. } | Msg::Response { payload, .. } => {
            assert!(
                payload.len() <= DEFAULT_MAX_REQUEST as usize,
                "request beyond the limit accepted"
            );
        }
        _ => {}
    }
    if macs {
        let tag = FrameMac::new(FUZZ_FRAME_KEY).tag(&again, &[]);
        again.extend_from_slice(&tag);
    }
    let mut scratch = vec![0u8; FUZZ_MAX_RECORD as usize];
    let reread = decode_message_mac(
        Bytes::from(again),
        FUZZ_MAX_RECORD,
        DEFAULT_MAX_REQUEST,
        macs.then(|| FrameMac::new(FUZZ_FRAME_KEY)).as_mut(),
        |h| place(&mut scratch, h),
    );
    match reread {
        Ok(m) => assert_eq!(m, msg, "a message does not decode back as itself"),
        Err(e) => panic!("the re-encoded {} does not decode: {e}", msg.name()),
    }
    if let Msg::Record(h) = &msg {
        assert_eq!(
            placed(&scratch, h),
            placed(&region, h),
            "record bytes changed"
        );
    }
    true
}

fn payload(input: &[u8]) -> bool {
    if let Ok((_, used)) = decode_payload_prefix(input) {
        assert!(used <= input.len(), "used {used} of {} bytes", input.len());
    }
    let _ = proto::decode_data(Bytes::copy_from_slice(input));
    let Ok(msg) = Msg::decode(input) else {
        return false;
    };
    let mut again = Vec::new();
    msg.encode(&mut again);
    match Msg::decode(&again) {
        Ok(m) => assert_eq!(m, msg, "a payload does not decode back as itself"),
        Err(e) => panic!("the re-encoded {} does not decode: {e}", msg.name()),
    }
    true
}

/// Reassembly limits as an RDMA connection with the default configuration sets them.
const FUZZ_REASSEMBLY: (u32, usize) = (DEFAULT_MAX_REQUEST, 2 * 32);

fn rdma_slots(mut input: &[u8]) -> usize {
    let mut partial = HashMap::new();
    let mut decoded = 0;
    while input.len() >= 2 {
        let n = (u16::from_le_bytes([input[0], input[1]]) as usize)
            .min(SLOT)
            .min(input.len() - 2);
        let (slot, rest) = input[2..].split_at(n);
        input = rest;
        if !proto::is_chunk(slot) {
            if Msg::decode(slot).is_err() {
                return decoded;
            }
            decoded += 1;
            continue;
        }
        if let Ok(h) = ChunkHdr::decode(slot) {
            let mut head = [0u8; CHUNK_HDR_LEN];
            h.encode(&mut head);
            assert_eq!(head[..], slot[..CHUNK_HDR_LEN], "chunk header round trip");
        }
        match reassemble(&mut partial, slot, FUZZ_REASSEMBLY) {
            Ok(Some(Msg::Request { payload, .. } | Msg::Response { payload, .. })) => {
                assert!(payload.len() <= FUZZ_REASSEMBLY.0 as usize);
                decoded += 1;
            }
            Ok(Some(m)) => panic!("reassembly produced a {}", m.name()),
            Ok(None) => {}
            // The connection closes at the first violation.
            Err(_) => return decoded,
        }
        assert!(
            partial.len() <= FUZZ_REASSEMBLY.1,
            "{} messages under reassembly",
            partial.len()
        );
    }
    decoded
}

// Flags of `handshake` (its first input byte).

/// Drive the connector instead of the acceptor.
pub const FLAG_CONNECTOR: u8 = 0b001;
/// Make the peer's hello one our configuration accepts (identity, transport, layout, sizes).
/// The challenge's flags stay as the input has them (our node wants frame MACs on).
pub const FLAG_FIX_HELLO: u8 = 0b010;
/// Give the peer's challenge / auth / welcome the proof an honest peer computes.
pub const FLAG_SIGN: u8 = 0b100;

/// The configuration of the node under test: node 1 of cluster 7, its peer is node 2, frame
/// MACs on (the default).
const FUZZ_NODE: u32 = 1;
const FUZZ_PEER: u32 = 2;
const FUZZ_CLUSTER: u64 = 7;
const FUZZ_SECRET: &[u8] = b"fuzzing-secret-0123456789";
const FUZZ_LAYOUT_TAG: u64 = 0x1a70;
const FUZZ_REGION: usize = 64 << 10;

/// Fuzz target `handshake`: the first byte holds `FLAG_*` bits; the rest is what the peer
/// sends, as messages of a `u16` length and a payload (decoded as [`decode_message`] does before
/// authentication: no records, no requests). The node under test runs one handshake.
pub fn handshake(data: &[u8]) {
    let _ = run_handshake(data);
}

/// Runs one handshake over the scripted peer and checks what it did; returns its outcome.
fn run_handshake(data: &[u8]) -> Result<PeerInfo> {
    let Some((&flags, script)) = data.split_first() else {
        return Err(LinkError::Closed);
    };
    let shared = fuzz_shared();
    let connector = flags & FLAG_CONNECTOR != 0;
    let mut peer = ScriptedPeer {
        script,
        flags,
        sent: Vec::new(),
        delivered: Vec::new(),
        authenticated: 0,
    };
    let hellos_ok = AtomicUsize::new(0);
    let outcome = if connector {
        complete(handshake::connector(&mut peer, shared))
    } else {
        // The peer's messages are all there: the deadline is never reached.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
        let hello_ok = || {
            hellos_ok.fetch_add(1, Ordering::Relaxed);
        };
        complete(handshake::acceptor(&mut peer, shared, deadline, &hello_ok))
    };
    peer.check(connector, hellos_ok.load(Ordering::Relaxed), &outcome);
    outcome
}

/// The link state of the node under test (one per process: its regions live forever).
fn fuzz_shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let mut cfg = LinkConfig::new(
            Transport::Tcp,
            Role::Listen(std::net::SocketAddr::from(([127, 0, 0, 1], 7470))),
            FUZZ_CLUSTER,
            FUZZ_NODE,
            FUZZ_PEER,
            FUZZ_SECRET,
        );
        cfg.layout_tag = FUZZ_LAYOUT_TAG;
        assert!(cfg.frame_mac, "the harness expects frame MACs on");
        Shared::new(
            cfg,
            Some(Region::leaked(FUZZ_REGION)),
            Some(Arc::new(FuzzStore(Region::leaked(FUZZ_REGION)))),
            None,
            Arc::new(NoTasks),
        )
    })
}

/// A second store that holds nothing (the handshake only asks for its size and resync point).
struct FuzzStore(Region);

impl SecondStore for FuzzStore {
    fn region(&self) -> Region {
        self.0
    }
    fn persist(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// The handshake starts no task; one that tried would be dropped.
struct NoTasks;

impl Spawn for NoTasks {
    fn spawn(&self, _task: Task) {}
}

/// The peer: plays the messages of the input, fixed up as the flags say.
struct ScriptedPeer<'a> {
    script: &'a [u8],
    flags: u8,
    /// What the node under test sent.
    sent: Vec<Msg>,
    /// What it received (after the fix-ups).
    delivered: Vec<Msg>,
    /// How often the node under test called [`MsgIo::authenticated`].
    authenticated: usize,
}

impl ScriptedPeer<'_> {
    fn next_message(&mut self) -> Result<Msg> {
        let down = |reason: &str| LinkError::Down {
            peer: FUZZ_PEER,
            reason: reason.into(),
        };
        if self.script.len() < 2 {
            return Err(down("the peer closed the connection"));
        }
        let n = (u16::from_le_bytes([self.script[0], self.script[1]]) as usize)
            .min(self.script.len() - 2);
        let (bytes, rest) = self.script[2..].split_at(n);
        self.script = rest;
        decode_message(Bytes::copy_from_slice(bytes), FUZZ_MAX_RECORD, 0, |_| {
            Err(FrameError::Malformed {
                what: "handshake",
                detail: "record before authentication".into(),
            })
        })
        .map_err(|source| LinkError::Frame {
            peer: FUZZ_PEER,
            source,
        })
    }

    fn connector_under_test(&self) -> bool {
        self.flags & FLAG_CONNECTOR != 0
    }

    /// The transcript as an honest peer with our configuration computes it: the connector's
    /// hello, the acceptor's hello and flags (one side ours, the other the peer's). `None`
    /// until both are known.
    fn transcript(&self) -> Option<Transcript> {
        let hello = |msgs: &[Msg]| {
            msgs.iter().find_map(|m| match m {
                Msg::Hello(h) => Some(h.clone()),
                _ => None,
            })
        };
        let challenge = |msgs: &[Msg]| {
            msgs.iter().find_map(|m| match m {
                Msg::Challenge { hello, flags, .. } => Some((hello.clone(), *flags)),
                _ => None,
            })
        };
        let (hello_c, (hello_a, flags_a)) = if self.connector_under_test() {
            (hello(&self.sent)?, challenge(&self.delivered)?)
        } else {
            (hello(&self.delivered)?, challenge(&self.sent)?)
        };
        // The side under test is node FUZZ_NODE; the peer is the other end of the transcript.
        let (connector, acceptor) = if self.connector_under_test() {
            (FUZZ_NODE, FUZZ_PEER)
        } else {
            (FUZZ_PEER, FUZZ_NODE)
        };
        Some(Transcript {
            cluster_id: FUZZ_CLUSTER,
            connector,
            acceptor,
            nonce_c: hello_c.nonce,
            nonce_a: hello_a.nonce,
            info_c: hello_c.info,
            info_a: hello_a.info,
            flags_a,
        })
    }

    /// The proof an honest sender of `m` computes (the acceptor's in its challenge and
    /// welcome, the connector's in its auth), if `m` carries one and the transcript is known.
    fn honest_proof(&self, m: &Msg) -> Option<[u8; 32]> {
        let t = self.transcript()?;
        Some(match m {
            Msg::Challenge { .. } => t.proof(FUZZ_SECRET, Proof::Challenge, &[]),
            Msg::Auth { resync, region, .. } => {
                t.proof(FUZZ_SECRET, Proof::Auth, &proof_payload(resync, region))
            }
            Msg::Welcome { resync, region, .. } => {
                t.proof(FUZZ_SECRET, Proof::Welcome, &proof_payload(resync, region))
            }
            _ => return None,
        })
    }

    /// Whether `m` carries the proof only a holder of the secret can compute.
    fn proven(&self, m: &Msg) -> bool {
        match m {
            Msg::Challenge { mac, .. } | Msg::Auth { mac, .. } | Msg::Welcome { mac, .. } => {
                self.honest_proof(m) == Some(*mac)
            }
            _ => false,
        }
    }

    fn fix_hello(h: &mut Hello) {
        h.magic = MAGIC;
        h.version = PROTOCOL_VERSION;
        h.cluster_id = FUZZ_CLUSTER;
        h.from_node = FUZZ_PEER;
        h.to_node = FUZZ_NODE;
        h.info.transport = Transport::Tcp.code();
        h.info.layout_tag = FUZZ_LAYOUT_TAG;
        h.info.first_len = h.info.first_len.min(FUZZ_REGION as u64);
        h.info.second_len = h.info.second_len.max(FUZZ_REGION as u64);
        h.info.window = h.info.window.max(1);
        h.info.max_record = h.info.max_record.max(1);
        h.info.request_window = h.info.request_window.max(1);
    }

    /// Every handshake, whatever the peer sent, must end like this.
    fn check(&self, connector: bool, hellos_ok: usize, outcome: &Result<PeerInfo>) {
        assert!(self.sent.len() <= 3, "sent {} messages", self.sent.len());
        let rejects = self
            .sent
            .iter()
            .filter(|m| matches!(m, Msg::Reject { .. }))
            .count();
        assert!(rejects <= 1, "rejected {rejects} times");
        if rejects == 1 {
            assert!(matches!(self.sent.last(), Some(Msg::Reject { .. })));
            assert!(outcome.is_err(), "accepted after rejecting");
        }
        // The acceptor reports an acceptable hello exactly when it answers it with a challenge.
        let challenged = self.sent.iter().any(|m| matches!(m, Msg::Challenge { .. }));
        assert_eq!(hellos_ok, usize::from(challenged), "hello_ok calls");
        assert!(self.authenticated <= 1, "authenticated twice");
        // What the node under test proves, an honest peer accepts.
        for m in &self.sent {
            if matches!(
                m,
                Msg::Challenge { .. } | Msg::Auth { .. } | Msg::Welcome { .. }
            ) {
                assert!(self.proven(m), "our {} carries a wrong proof", m.name());
            }
        }
        let Ok(peer) = outcome else {
            return;
        };
        // Accepted: the peer sent a hello we accept and proved the secret.
        assert_eq!(self.authenticated, 1, "accepted without `authenticated`");
        let names: Vec<&str> = self.delivered.iter().map(Msg::name).collect();
        let Some(t) = self.transcript() else {
            panic!("handshake succeeded after receiving {names:?} without a transcript");
        };
        match (connector, &self.delivered[..]) {
            (false, [Msg::Hello(h), auth @ Msg::Auth { resync, region, .. }]) => {
                assert!(
                    self.proven(auth),
                    "acceptor accepted a connector without the secret"
                );
                assert_eq!(
                    (&peer.info, &peer.resync, &peer.region),
                    (&h.info, resync, region)
                );
                assert!(matches!(
                    &self.sent[..],
                    [Msg::Challenge { .. }, Msg::Welcome { .. }]
                ));
                accepted_hello(h);
            }
            (
                true,
                [challenge @ Msg::Challenge { hello, flags, .. }, welcome @ Msg::Welcome { resync, region, .. }],
            ) => {
                assert!(
                    self.proven(challenge) && self.proven(welcome),
                    "connector accepted an acceptor without the secret"
                );
                assert_eq!(*flags, FLAG_FRAME_MAC, "connector accepted frame MACs off");
                assert_eq!(
                    (&peer.info, &peer.resync, &peer.region),
                    (&hello.info, resync, region)
                );
                assert!(matches!(&self.sent[..], [Msg::Hello(_), Msg::Auth { .. }]));
                accepted_hello(hello);
            }
            _ => panic!("handshake succeeded after receiving {names:?}"),
        }
        // The session keys are those the peer derives: our send key is its receive key.
        let Some(keys) = &peer.keys else {
            panic!("frame MACs are on but the handshake gave no session keys");
        };
        let side = if connector {
            Side::Acceptor
        } else {
            Side::Connector
        };
        let theirs = t.keys(FUZZ_SECRET, side);
        assert!(
            keys.tx == theirs.rx && keys.rx == theirs.tx,
            "session keys differ from the peer's"
        );
    }
}

/// A hello the handshake accepted must be one our configuration allows.
fn accepted_hello(h: &Hello) {
    assert_eq!(
        (h.magic, h.version, h.cluster_id, h.from_node, h.to_node),
        (MAGIC, PROTOCOL_VERSION, FUZZ_CLUSTER, FUZZ_PEER, FUZZ_NODE)
    );
    assert_eq!(h.info.layout_tag, FUZZ_LAYOUT_TAG);
    assert!(h.info.window > 0 && h.info.max_record > 0 && h.info.request_window > 0);
}

impl MsgIo for ScriptedPeer<'_> {
    async fn send_msg(&mut self, m: &Msg) -> Result<()> {
        self.sent.push(m.clone());
        Ok(())
    }

    async fn recv_msg(&mut self) -> Result<Msg> {
        let mut m = self.next_message()?;
        if self.flags & FLAG_FIX_HELLO != 0 {
            if let Msg::Hello(h) | Msg::Challenge { hello: h, .. } = &mut m {
                Self::fix_hello(h);
            }
        }
        // The peer's hello must be known before its proof can be computed.
        self.delivered.push(m);
        if self.flags & FLAG_SIGN != 0 {
            let honest = self.delivered.last().and_then(|m| self.honest_proof(m));
            if let (
                Some(honest),
                Some(Msg::Challenge { mac, .. } | Msg::Auth { mac, .. } | Msg::Welcome { mac, .. }),
            ) = (honest, self.delivered.last_mut())
            {
                *mac = honest;
            }
        }
        match self.delivered.last() {
            Some(m) => Ok(m.clone()),
            None => Err(LinkError::Closed),
        }
    }

    /// Called once the peer proved the secret, and only then: a stranger must never be given
    /// what only the peer may use (on RDMA, the second store's registration).
    fn authenticated(&mut self) -> Result<Option<RemoteRegion>> {
        self.authenticated += 1;
        // The proof the node under test just checked: the challenge's, or the auth's.
        let proven = match self.delivered.last() {
            Some(m @ Msg::Challenge { .. }) if self.connector_under_test() => self.proven(m),
            Some(m @ Msg::Auth { .. }) if !self.connector_under_test() => self.proven(m),
            _ => false,
        };
        assert!(proven, "`authenticated` before the peer proved the secret");
        // Over TCP there is no region to announce.
        Ok(None)
    }
}

/// Inputs that reach the end of each path, for the seed corpora (the replay test checks that
/// each still does what its name says; see `tests/fuzz_corpus.rs`).
pub mod seeds {
    use super::*;
    use crate::proto::{AckStatus, NodeInfo, PartitionSeq, ResyncPoint};

    fn hello(nonce: u8) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            cluster_id: FUZZ_CLUSTER,
            from_node: FUZZ_PEER,
            to_node: FUZZ_NODE,
            nonce: [nonce; 32],
            info: NodeInfo {
                first_len: 4096,
                second_len: FUZZ_REGION as u64,
                layout_tag: FUZZ_LAYOUT_TAG,
                window: 64,
                max_record: 1 << 20,
                transport: Transport::Tcp.code(),
                request_window: 32,
                max_request: DEFAULT_MAX_REQUEST,
                role: 0,
            },
        }
    }

    fn resync() -> ResyncPoint {
        ResyncPoint {
            first_store: vec![PartitionSeq {
                partition: 0,
                seq: 12,
            }],
            second_store: vec![PartitionSeq {
                partition: 1,
                seq: 7,
            }],
        }
    }

    /// One message of each kind.
    pub fn messages() -> Vec<Msg> {
        vec![
            Msg::Hello(hello(1)),
            Msg::Challenge {
                hello: hello(2),
                mac: [3; 32],
                flags: FLAG_FRAME_MAC,
            },
            Msg::Auth {
                mac: [4; 32],
                resync: resync(),
                region: Some(RemoteRegion {
                    addr: 0x1000,
                    rkey: 5,
                    len: 1 << 20,
                }),
            },
            Msg::Welcome {
                mac: [6; 32],
                resync: resync(),
                region: None,
            },
            Msg::Reject {
                reason: "layout mismatch".into(),
            },
            Msg::Record(RecordHdr {
                tag: 1,
                partition: 0,
                seq: 9,
                offset: 128,
                len: 100,
            }),
            Msg::Ack {
                tag: 1,
                partition: 0,
                seq: 9,
                status: AckStatus::Held,
            },
            Msg::Release {
                partition: 0,
                through_seq: 9,
            },
            Msg::Ping { stamp: 77 },
            Msg::Pong { stamp: 77 },
            Msg::Bye {
                reason: "shutdown".into(),
            },
            Msg::Request {
                id: 3,
                payload: Bytes::from_static(b"forwarded write"),
            },
            Msg::Response {
                id: 3,
                status: 0,
                payload: Bytes::from_static(b"ok"),
            },
        ]
    }

    /// Seeds of `link_frames`, by name.
    pub fn link_frames() -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let record = [0x5a_u8; 100];
        // A TCP stream with every message, the record carrying its bytes; and the same with
        // frame MACs, as after the handshake.
        for (name, head, mut mac) in [
            ("tcp-stream", MODE_TCP_FRAMES, None),
            (
                "tcp-stream-mac",
                MODE_TCP_FRAMES | FLAG_FRAME_MACS,
                Some(FrameMac::new(FUZZ_FRAME_KEY)),
            ),
        ] {
            let mut stream = vec![head];
            for m in messages() {
                let bytes = matches!(m, Msg::Record(_)).then_some(&record[..]);
                write_frame(&m, bytes, mac.as_mut(), &mut stream);
            }
            out.push((name.to_owned(), stream));
        }
        for m in messages() {
            let mut whole = vec![MODE_WHOLE_MESSAGE];
            m.encode(&mut whole);
            if let Msg::Record(_) = m {
                whole.extend_from_slice(&record);
            }
            let mut with_mac = whole.clone();
            with_mac[0] |= FLAG_FRAME_MACS;
            let tag = FrameMac::new(FUZZ_FRAME_KEY).tag(&with_mac[1..], &[]);
            with_mac.extend_from_slice(&tag);
            out.push((format!("message-{}", m.name()), whole));
            out.push((format!("message-{}-mac", m.name()), with_mac));
            let mut payload = vec![MODE_PAYLOAD];
            m.encode(&mut payload);
            out.push((format!("payload-{}", m.name()), payload));
        }
        // A request of three chunks interleaved with a one-chunk response and a control message.
        let request: Vec<u8> = (0..2 * SLOT as u32).map(|i| i as u8).collect();
        let chunk = |request: bool, id: u64, total: usize, offset: usize, data: &[u8]| {
            let mut head = [0u8; CHUNK_HDR_LEN];
            ChunkHdr {
                request,
                id,
                status: 0,
                total: total as u32,
                offset: offset as u32,
            }
            .encode(&mut head);
            let mut slot = head.to_vec();
            slot.extend_from_slice(data);
            slot
        };
        let per = SLOT - CHUNK_HDR_LEN;
        let mut slots = vec![chunk(true, 1, request.len(), 0, &request[..per])];
        slots.push(chunk(false, 1, 2, 0, b"ok"));
        let mut ping = Vec::new();
        Msg::Ping { stamp: 1 }.encode(&mut ping);
        slots.push(ping);
        slots.push(chunk(true, 1, request.len(), per, &request[per..2 * per]));
        slots.push(chunk(true, 1, request.len(), 2 * per, &request[2 * per..]));
        let mut rdma = vec![MODE_RDMA_CHUNKS];
        for s in slots {
            rdma.extend_from_slice(&(s.len() as u16).to_le_bytes());
            rdma.extend_from_slice(&s);
        }
        out.push(("rdma-chunks".to_owned(), rdma));
        out
    }

    fn script(flags: u8, msgs: &[Msg]) -> Vec<u8> {
        let mut out = vec![flags];
        for m in msgs {
            let mut b = Vec::new();
            m.encode(&mut b);
            out.extend_from_slice(&(b.len() as u16).to_le_bytes());
            out.extend_from_slice(&b);
        }
        out
    }

    /// Seeds of `handshake`, by name: both sides accepting an honest peer, and some refusals.
    /// The proofs in them are zero: the seeds that need them have [`FLAG_SIGN`].
    pub fn handshake() -> Vec<(String, Vec<u8>)> {
        let auth = Msg::Auth {
            mac: [0; 32],
            resync: resync(),
            region: None,
        };
        let challenge = |flags| Msg::Challenge {
            hello: hello(9),
            mac: [0; 32],
            flags,
        };
        let welcome = Msg::Welcome {
            mac: [0; 32],
            resync: resync(),
            region: None,
        };
        let honest = FLAG_FIX_HELLO | FLAG_SIGN;
        let mut wrong_cluster = hello(1);
        wrong_cluster.cluster_id += 1;
        vec![
            (
                "acceptor-accepts".into(),
                script(honest, &[Msg::Hello(hello(1)), auth.clone()]),
            ),
            (
                "connector-accepts".into(),
                script(
                    FLAG_CONNECTOR | honest,
                    &[challenge(FLAG_FRAME_MAC), welcome.clone()],
                ),
            ),
            (
                "acceptor-refuses-forged-mac".into(),
                script(FLAG_FIX_HELLO, &[Msg::Hello(hello(1)), auth]),
            ),
            (
                "connector-refuses-forged-welcome".into(),
                script(
                    FLAG_CONNECTOR | FLAG_FIX_HELLO,
                    &[challenge(FLAG_FRAME_MAC), welcome.clone()],
                ),
            ),
            (
                // A proven challenge that turns frame MACs off: a downgrade, refused.
                "connector-refuses-frame-macs-off".into(),
                script(FLAG_CONNECTOR | honest, &[challenge(0), welcome]),
            ),
            (
                "acceptor-refuses-other-cluster".into(),
                script(FLAG_SIGN, &[Msg::Hello(wrong_cluster)]),
            ),
            (
                "connector-told-rejected".into(),
                script(
                    FLAG_CONNECTOR,
                    &[Msg::Reject {
                        reason: "no".into(),
                    }],
                ),
            ),
        ]
    }

    /// Whether a seed's handshake is accepted (the replay test checks the names are true).
    pub fn handshake_accepts(input: &[u8]) -> bool {
        run_handshake(input).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds reach the end of their paths, so the fuzzer starts from deep inputs.
    #[test]
    fn link_frames_seeds_decode_completely() {
        let kinds = seeds::messages().len();
        for (name, input) in seeds::link_frames() {
            let want = match name.as_str() {
                "tcp-stream" | "tcp-stream-mac" => kinds,
                // A ping and two reassembled messages.
                "rdma-chunks" => 3,
                _ => 1,
            };
            assert_eq!(decoded_messages(&input), want, "seed {name}");
        }
    }

    /// With frame MACs, a damaged tag stops the stream there; sealing computes it again.
    #[test]
    fn frame_macs_are_checked_and_sealed() {
        let kinds = seeds::messages().len();
        let all = seeds::link_frames();
        let seed = |want: &str| match all.iter().find(|(name, _)| name == want) {
            Some((_, input)) => input.clone(),
            None => panic!("no seed {want}"),
        };
        let mut stream = seed("tcp-stream-mac");
        // The tag of the first frame (a hello) follows its payload.
        let len = u32::from_le_bytes([stream[1], stream[2], stream[3], stream[4]]) as usize;
        stream[1 + FRAME_HEADER_LEN + len] ^= 1;
        assert_eq!(decoded_messages(&stream), 0);
        stream[0] |= FLAG_SEAL_FRAMES;
        assert_eq!(decoded_messages(&stream), kinds);
        // Frames written without MACs, read with them: sealing gives the first frame a tag
        // (over the start of the second), and the stream ends there.
        let mut plain = seed("tcp-stream");
        plain[0] |= FLAG_FRAME_MACS | FLAG_SEAL_FRAMES;
        assert_eq!(decoded_messages(&plain), 1);

        let mut message = seed("message-record-mac");
        message[3] ^= 0x10;
        assert_eq!(decoded_messages(&message), 0);
        message[0] |= FLAG_SEAL_FRAMES;
        assert_eq!(decoded_messages(&message), 1);
    }

    /// The refusing seeds are refused for the reason their name gives.
    #[test]
    fn handshake_seeds_fail_for_their_reason() {
        use crate::error::HandshakeError as H;
        for (name, input) in seeds::handshake() {
            let outcome = run_handshake(&input);
            let why = match &outcome {
                Ok(_) => continue,
                Err(LinkError::Handshake { source, .. }) => source,
                Err(e) => panic!("seed {name}: {e}"),
            };
            let expected = match name.as_str() {
                "acceptor-refuses-forged-mac" | "connector-refuses-forged-welcome" => {
                    matches!(why, H::Auth { .. })
                }
                "connector-refuses-frame-macs-off" => matches!(why, H::FrameMac { .. }),
                "acceptor-refuses-other-cluster" => matches!(why, H::Cluster { .. }),
                "connector-told-rejected" => matches!(why, H::PeerRejected(_)),
                _ => false,
            };
            assert!(expected, "seed {name} refused with {why}");
        }
    }
}
