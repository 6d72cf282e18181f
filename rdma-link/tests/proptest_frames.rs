//! Property tests of the frame decoder: never panics, never over-allocates, round-trips.

use proptest::prelude::*;
use rdma_link::proto::{
    self, FrameReader, Hello, Msg, NodeInfo, PartitionSeq, RecordHdr, RemoteRegion, ResyncPoint,
};
use rdma_link::FrameError;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Read frames from `bytes` until an error; records go into a scratch buffer.
fn read_all(bytes: &[u8]) -> (Vec<Msg>, FrameError) {
    rt().block_on(async {
        let mut rd = bytes;
        let mut r = FrameReader::new(64 * 1024);
        let mut scratch = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        loop {
            match r
                .read(&mut rd, |h| {
                    scratch.get_mut(..h.len as usize).ok_or(FrameError::Closed)
                })
                .await
            {
                Ok(m) => out.push(m),
                Err(e) => return (out, e),
            }
        }
    })
}

fn arb_seqs() -> impl Strategy<Value = Vec<PartitionSeq>> {
    prop::collection::vec(
        (any::<u32>(), any::<u64>()).prop_map(|(partition, seq)| PartitionSeq { partition, seq }),
        0..20,
    )
}

fn arb_region() -> impl Strategy<Value = Option<RemoteRegion>> {
    prop::option::of(
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(addr, rkey, len)| RemoteRegion {
            addr,
            rkey,
            len,
        }),
    )
}

fn arb_resync() -> impl Strategy<Value = ResyncPoint> {
    (arb_seqs(), arb_seqs()).prop_map(|(first_store, second_store)| ResyncPoint {
        first_store,
        second_store,
    })
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    let hello = (
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 32]>(),
        any::<(u64, u64, u64, u32, u32, u8)>(),
    )
        .prop_map(
            |(version, cluster_id, from_node, to_node, nonce, i)| Hello {
                magic: proto::MAGIC,
                version,
                cluster_id,
                from_node,
                to_node,
                nonce,
                info: NodeInfo {
                    first_len: i.0,
                    second_len: i.1,
                    layout_tag: i.2,
                    window: i.3,
                    max_record: i.4,
                    transport: i.5,
                    request_window: i.3 ^ 7,
                    max_request: i.4 >> 1,
                },
            },
        );
    prop_oneof![
        hello.clone().prop_map(Msg::Hello),
        (hello, any::<[u8; 32]>()).prop_map(|(hello, mac)| Msg::Challenge { hello, mac }),
        (any::<[u8; 32]>(), arb_resync(), arb_region()).prop_map(|(mac, resync, region)| {
            Msg::Auth {
                mac,
                resync,
                region,
            }
        }),
        (arb_resync(), arb_region()).prop_map(|(resync, region)| Msg::Welcome { resync, region }),
        "[a-z ]{0,100}".prop_map(|reason| Msg::Reject { reason }),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(tag, partition, seq, ok)| Msg::Ack {
                tag,
                partition,
                seq,
                ok
            }
        ),
        (any::<u32>(), any::<u64>()).prop_map(|(partition, through_seq)| Msg::Release {
            partition,
            through_seq
        }),
        any::<u64>().prop_map(|stamp| Msg::Ping { stamp }),
        any::<u64>().prop_map(|stamp| Msg::Pong { stamp }),
        "[a-z ]{0,100}".prop_map(|reason| Msg::Bye { reason }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(id, p)| {
                Msg::Request {
                    id,
                    payload: p.into(),
                }
            }),
        (
            any::<u64>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(id, status, p)| Msg::Response {
                id,
                status,
                payload: p.into(),
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Msg::decode(&bytes);
        let (_, err) = read_all(&bytes);
        // Garbage ends in an error, never a hang or a panic.
        let _ = err.to_string();
    }

    #[test]
    fn frames_round_trip(msgs in prop::collection::vec(arb_msg(), 1..8), rec in prop::collection::vec(any::<u8>(), 1..2048)) {
        let mut wire = Vec::new();
        for m in &msgs {
            proto::encode_frame(m, &mut wire);
        }
        let hdr = RecordHdr { tag: 9, partition: 1, seq: 2, offset: 3, len: rec.len() as u32 };
        wire.extend_from_slice(&proto::record_frame_header(&hdr, &rec));
        wire.extend_from_slice(&rec);
        let (got, end) = read_all(&wire);
        prop_assert!(matches!(end, FrameError::Closed), "ended with {end}");
        let mut want = msgs.clone();
        want.push(Msg::Record(hdr));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn corrupted_frames_are_rejected(m in arb_msg(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut wire = Vec::new();
        proto::encode_frame(&m, &mut wire);
        let i = pos.index(wire.len());
        wire[i] ^= 1 << bit;
        let (got, _) = read_all(&wire);
        // crc32c detects every single-bit error: a flipped bit never yields a message.
        prop_assert!(got.is_empty(), "{:?} decoded from a corrupted frame of {:?}", got, m);
    }

    #[test]
    fn oversized_lengths_do_not_allocate(len in (proto::MAX_CONTROL_LEN as u32 + 1)..u32::MAX, kind in any::<u8>()) {
        let mut wire = len.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0, 0, 0, 0, kind]);
        let (got, err) = read_all(&wire);
        prop_assert!(got.is_empty());
        prop_assert!(matches!(err, FrameError::Oversized { .. } | FrameError::Closed | FrameError::Malformed { .. }), "{err}");
    }
}
