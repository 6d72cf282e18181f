//! The TCP transport end to end on loopback (no root needed).

mod common;

use common::*;
use hmac::{Hmac, Mac};
use rdma_link::proto::{
    self, FrameMac, FrameReader, Hello, Msg, NodeInfo, MAGIC, PROTOCOL_VERSION,
};
use rdma_link::{HandshakeError, LinkError, LinkState, NodeRole, Post, Region};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn post(seq: u64, off: u64, len: u32) -> Post {
    Post {
        partition: (seq % 3) as u32,
        seq,
        local_offset: off,
        remote_offset: off,
        len,
    }
}

// current_thread: the post tasks start in spawn order, so the link receives them in seq order
// (the window semaphore is FIFO) and the partner must see them in that order.
#[tokio::test]
async fn records_land_in_order_and_are_persisted_before_ack() {
    let p = pair().await;
    let mut expected = Vec::new();
    let mut futs = Vec::new();
    let mut off = 0u64;
    for seq in 1..=300u64 {
        let len = 1 + (seq * 977 % 9000) as u32;
        let data = fill(&p.local, off, len as usize, seq);
        expected.push((off, len, crc32c::crc32c(&data), seq));
        let link = p.client.clone();
        let store = p.store.clone();
        let pst = post(seq, off, len);
        futs.push(tokio::spawn(async move {
            link.post(pst).await?;
            // The ack implies persist already ran on these exact bytes.
            let log = store.log.lock().unwrap();
            assert!(
                log.persisted
                    .iter()
                    .any(|&(o, l, _)| o == pst.remote_offset && l == u64::from(pst.len)),
                "acked before persist"
            );
            Ok::<_, LinkError>(())
        }));
        off += u64::from(len);
    }
    for f in futs {
        within(10, f).await.unwrap().unwrap();
    }
    let log = p.store.log.lock().unwrap();
    // Every record's bytes were in the region when persist ran, and still are.
    for (o, l, crc, _) in &expected {
        assert!(
            log.persisted.contains(&(*o, u64::from(*l), *crc)),
            "record at {o} persisted with wrong bytes"
        );
        assert_eq!(
            crc32c::crc32c(&p.store.region.read_bytes(*o, *l as usize).unwrap()),
            *crc
        );
    }
    // Single stream: the partner sees records in post order.
    let seqs: Vec<u64> = log.records.iter().map(|r| r.1).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert_eq!(p.client.counters().1, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_bounds_posts_in_flight() {
    let p = pair_with(|_| {}, |c| c.window = 4).await;
    p.store.close_gate();
    let mut futs = Vec::new();
    for seq in 0..10u64 {
        fill(&p.local, seq * 4096, 4096, seq);
        let link = p.client.clone();
        futs.push(tokio::spawn(async move {
            link.post(post(seq, seq * 4096, 4096)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The receiver is stuck in the first persist; at most 4 records were sent.
    assert!(futs.iter().all(|f| !f.is_finished()));
    p.store.open_gate();
    for f in futs {
        within(5, f).await.unwrap().unwrap();
    }
    assert_eq!(p.store.log.lock().unwrap().records.len(), 10);
    // With the gate closed, the receiver can have seen at most `window` records.
    let p2 = pair_with(|_| {}, |c| c.window = 4).await;
    p2.store.close_gate();
    let mut futs = Vec::new();
    for seq in 0..10u64 {
        let link = p2.client.clone();
        futs.push(tokio::spawn(async move {
            link.post(post(seq, seq * 4096, 4096)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (posts, _, _, _) = p2.client.counters();
    assert_eq!(
        posts, 4,
        "only a window's worth of posts may be handed to the connection"
    );
    p2.store.open_gate();
    for f in futs {
        within(5, f).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_tied_to_their_posts() {
    let p = pair().await;
    *p.store.fail_offset.lock().unwrap() = Some(5 * 4096);
    let mut futs = Vec::new();
    for seq in 0..10u64 {
        let link = p.client.clone();
        futs.push((
            seq,
            tokio::spawn(async move { link.post(post(seq, seq * 4096, 4096)).await }),
        ));
    }
    for (seq, f) in futs {
        let r = within(5, f).await.unwrap();
        if seq == 5 {
            match r {
                Err(LinkError::PersistFailed { seq: 5, .. }) => {}
                other => panic!("post 5 should fail to persist, got {other:?}"),
            }
        } else {
            r.unwrap();
        }
    }
    // The link stays up after a failed persist.
    p.client.post(post(11, 0, 100)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_delivered() {
    let p = pair().await;
    p.client.post(post(1, 0, 512)).await.unwrap();
    p.client.release(3, 42).unwrap();
    p.client.release(0, 7).unwrap();
    within(5, async {
        loop {
            if p.store.log.lock().unwrap().releases == vec![(3, 42), (0, 7)] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Heartbeats (every 50 ms) give both sides an RTT estimate.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(p.client.rtt().is_some() && p.server.rtt().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_posts_are_refused() {
    let p = pair().await;
    assert!(matches!(
        p.client.post(post(1, REGION as u64 - 10, 100)).await,
        Err(LinkError::InvalidPost(_))
    ));
    assert!(matches!(
        p.client.post(post(1, 0, 0)).await,
        Err(LinkError::InvalidPost(_))
    ));
    assert!(matches!(
        p.client.post(post(1, 0, 2 << 20)).await,
        Err(LinkError::InvalidPost(_))
    ));
    // A node without a local region cannot post.
    assert!(matches!(
        p.server.post(post(1, 0, 10)).await,
        Err(LinkError::InvalidPost(_))
    ));
}

/// A TCP proxy that can be made silent (it keeps the sockets open and drops everything).
struct Proxy {
    addr: std::net::SocketAddr,
    silent: Arc<AtomicBool>,
}

async fn proxy(to: std::net::SocketAddr) -> Proxy {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let silent = Arc::new(AtomicBool::new(false));
    let s2 = silent.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            // The server's listener starts in the background: under load the first
            // connection can arrive before it listens (the client would then wait out its
            // 30 s reconnect delay), so retry the upstream connect for a while.
            let mut upstream = None;
            for _ in 0..250 {
                match TcpStream::connect(to).await {
                    Ok(b) => {
                        upstream = Some(b);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let Some(b) = upstream else {
                continue;
            };
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            for (mut r, mut w) in [(ar, bw), (br, aw)] {
                let silent = s2.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !silent.load(Ordering::Relaxed) && w.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                    // Keep the write half open while silent: the peer must notice by heartbeat.
                    while silent.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        }
    });
    Proxy { addr, silent }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_reported_down_within_the_heartbeat_timeout() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let _server = server(addr, &store, |_| {});
    let px = proxy(addr).await;
    let local = Region::leaked(REGION);
    let client = client(px.addr, local, |c| {
        c.reconnect_delay = Duration::from_secs(30)
    });
    within(5, client.wait_up()).await.unwrap();
    client.post(post(1, 0, 4096)).await.unwrap();
    store.close_gate(); // keep the next posts in flight
    let mut futs = Vec::new();
    for seq in 2..10u64 {
        let link = client.clone();
        futs.push(tokio::spawn(async move {
            link.post(post(seq, seq * 4096, 4096)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    px.silent.store(true, Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    let reason = wait_down_with(&client, "no heartbeat").await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "down after {took:?} (timeout 500 ms): {reason}"
    );
    for f in futs {
        let r = within(2, f).await.unwrap();
        assert!(
            matches!(r, Err(LinkError::Down { .. })),
            "in-flight post must fail: {r:?}"
        );
    }
    store.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_mid_stream_fails_every_inflight_post() {
    let p = pair().await;
    *p.store.delay.lock().unwrap() = Duration::from_millis(2);
    let mut futs = Vec::new();
    for seq in 0..400u64 {
        let link = p.client.clone();
        futs.push(tokio::spawn(async move {
            link.post(post(seq, (seq % 512) * 8192, 8192)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.server.crash();
    let (mut ok, mut failed) = (0, 0);
    for f in futs {
        match within(5, f).await.unwrap() {
            Ok(()) => ok += 1,
            Err(LinkError::Down { .. }) => failed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        ok > 0 && failed > 0,
        "ok {ok} failed {failed}: the kill should land mid-stream"
    );
    let (posts, acked, fails, _) = p.client.counters();
    assert_eq!(acked, ok);
    assert_eq!(posts, acked + fails, "every post completes exactly once");
    // Posting on a down link fails at once.
    let r = within(1, p.client.post(post(1, 0, 10))).await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_peer_returns_with_its_resync_point() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    store.set_resync(0, 17);
    let s1 = server(addr, &store, |_| {});
    let local = Region::leaked(REGION);
    let client = client(addr, local, |_| {});
    let up1 = within(5, client.wait_up()).await.unwrap();
    assert_eq!(up1.peer_resync.second_store[0].seq, 17);
    fill(&local, 0, 4096, 1);
    client.post(post(1, 0, 4096)).await.unwrap();
    s1.crash();
    wait_down_with(&client, "").await;
    // The partner comes back (same store, newer resync point).
    store.set_resync(0, 99);
    let s2 = server(addr, &store, |_| {});
    let up2 = within(10, client.wait_up()).await.unwrap();
    assert!(up2.generation > up1.generation);
    assert_eq!(up2.peer_resync.second_store[0].seq, 99);
    assert_eq!(up2.peer_resync.first_store[0].seq, 1099);
    client.post(post(2, 4096, 4096)).await.unwrap();
    // The server saw the client's resync point too (empty: the client has no second store).
    let sup = within(5, s2.wait_up()).await.unwrap();
    assert!(sup.peer_resync.second_store.is_empty());
    client.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_says_goodbye() {
    let p = pair().await;
    p.client.shutdown().await;
    let r = wait_down_with(&p.server, "closed the link").await;
    assert!(r.contains("node 1"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_rejected_on_both_sides() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let s = server(addr, &store, |_| {});
    let c = client(addr, Region::leaked(REGION), |c| {
        c.secret = b"another-secret-of-the-wrong-cluster".to_vec()
    });
    let rc = wait_down_with(&c, "authentication failed").await;
    let rs = wait_down_with(&s, "authentication failed").await;
    assert!(
        rc.contains("cluster secret") && rs.contains("cluster secret"),
        "{rc} / {rs}"
    );
    assert!(matches!(
        c.state(),
        LinkState::Down(LinkError::Handshake {
            source: HandshakeError::Auth { .. },
            ..
        }) | LinkState::Connecting
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cluster_and_node_are_rejected_on_both_sides() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let s = server(addr, &store, |_| {});
    let c = client(addr, Region::leaked(REGION), |c| c.cluster_id = 7);
    wait_down_with(&c, "cluster id mismatch").await;
    wait_down_with(&s, "cluster id mismatch").await;
    c.shutdown().await;
    let c = client(addr, Region::leaked(REGION), |c| c.node_id = 5);
    wait_down_with(&c, "node id mismatch").await;
    wait_down_with(&s, "node id mismatch").await;
    c.shutdown().await;
    // A correct client still gets in afterwards.
    let c = client(addr, Region::leaked(REGION), |_| {});
    within(5, c.wait_up()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_roles_are_rejected_naming_both() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    // A destination listening for a source: a pair node and another destination are refused.
    let s = server(addr, &store, |s| s.node_role = NodeRole::Destination);
    let c = client(addr, Region::leaked(REGION), |_| {});
    let rs = wait_down_with(&s, "role mismatch").await;
    assert!(
        rs.contains(
            "this node is a log-shipping destination but the peer is a node of a mirrored pair"
        ),
        "{rs}"
    );
    wait_down_with(&c, "role mismatch").await;
    c.shutdown().await;
    let c = client(addr, Region::leaked(REGION), |c| {
        c.node_role = NodeRole::Destination
    });
    let rc = wait_down_with(&c, "role mismatch").await;
    assert!(
        rc.contains(
            "this node is a log-shipping destination but the peer is a log-shipping destination"
        ),
        "{rc}"
    );
    c.shutdown().await;
    // A source with another log geometry is told how to make them agree.
    let c = client(addr, Region::leaked(REGION), |c| {
        c.node_role = NodeRole::Source;
        c.layout_tag = 99;
    });
    let rc = wait_down_with(&c, "layout mismatch").await;
    assert!(rc.contains("nvram_size the source's nvram.size"), "{rc}");
    c.shutdown().await;
    // A source gets in.
    let c = client(addr, Region::leaked(REGION), |c| {
        c.node_role = NodeRole::Source
    });
    within(5, c.wait_up()).await.unwrap();
}

fn hello(version: u16, nonce: [u8; 32]) -> Hello {
    Hello {
        magic: MAGIC,
        version,
        cluster_id: CLUSTER,
        from_node: 1,
        to_node: 2,
        nonce,
        info: NodeInfo {
            first_len: 0,
            second_len: 0,
            layout_tag: 0,
            window: 16,
            max_record: 1 << 20,
            transport: proto::TRANSPORT_TCP,
            request_window: 16,
            max_request: proto::DEFAULT_MAX_REQUEST,
            role: 0,
        },
    }
}

async fn send(s: &mut TcpStream, m: &Msg) {
    let mut b = Vec::new();
    proto::encode_frame(m, &mut b);
    s.write_all(&b).await.unwrap();
}

async fn recv(s: &mut TcpStream) -> Result<Msg, rdma_link::FrameError> {
    let mut r = proto::FrameReader::new(1 << 20);
    r.read(&mut unbuffered(s), |_| Err(rdma_link::FrameError::Closed))
        .await
}

/// The socket as the buffered reader `FrameReader` wants, buffering nothing past what a read
/// asked for (a reader of capacity 1 passes every read through once it is empty), so that
/// dropping it after a frame loses nothing.
fn unbuffered(s: &mut TcpStream) -> BufReader<&mut TcpStream> {
    BufReader::with_capacity(1, s)
}

/// Read until EOF (the server closed the connection); fails the test if it stays open.
async fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    within(3, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_is_rejected_on_both_sides() {
    let p = pair().await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    send(&mut s, &Msg::Hello(hello(PROTOCOL_VERSION + 1, [1; 32]))).await;
    match within(3, recv(&mut s)).await {
        Ok(Msg::Reject { reason }) => assert!(reason.contains("version mismatch"), "{reason}"),
        other => panic!("expected a reject, got {other:?}"),
    }
    expect_closed(&mut s).await;
    // The established link was not disturbed.
    assert!(p.server.state().is_up());
    p.client.post(post(1, 0, 100)).await.unwrap();
}

struct Solo {
    addr: std::net::SocketAddr,
    server: rdma_link::Link,
}

/// HMAC-SHA256(secret, label | version | cluster | ids | nonces | both hellos' facts | flags | extra)
/// — the handshake's transcript, written here from the protocol's description.
#[allow(clippy::too_many_arguments)]
fn transcript_mac(
    label: &[u8],
    nonce_c: &[u8; 32],
    c: &Hello,
    a: &Hello,
    flags: u8,
    extra: &[u8],
) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
    m.update(label);
    m.update(&PROTOCOL_VERSION.to_le_bytes());
    m.update(&CLUSTER.to_le_bytes());
    m.update(&1u32.to_le_bytes());
    m.update(&2u32.to_le_bytes());
    m.update(nonce_c);
    m.update(&a.nonce);
    for i in [&c.info, &a.info] {
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
    m.update(&[flags]);
    m.update(extra);
    m.finalize().into_bytes().into()
}

/// A connection authenticated by hand as node 1, with its frame keys: `tx` seals what we send,
/// `rd` checks what the server sends.
struct Fake {
    s: TcpStream,
    tx: FrameMac,
    rd: FrameReader,
}

impl Fake {
    /// Send a control message or a request / response, sealed.
    async fn send(&mut self, m: &Msg) {
        let mut b = Vec::new();
        if m.is_data() {
            let (head, payload) =
                proto::data_frame_header(m, proto::FrameCrc::CoveredByMac).unwrap();
            b.extend_from_slice(&head);
            b.extend_from_slice(payload);
            b.extend_from_slice(&self.tx.tag(&head[proto::FRAME_HEADER_LEN..], payload));
        } else {
            proto::encode_frame_mac(m, Some(&mut self.tx), &mut b);
        }
        self.s.write_all(&b).await.unwrap();
    }

    /// The bytes of a record frame, sealed (the next message's MAC).
    fn record_frame(&mut self, hdr: &proto::RecordHdr, data: &[u8]) -> Vec<u8> {
        let head = proto::record_frame_header(hdr, data, proto::FrameCrc::CoveredByMac);
        let mut b = head.to_vec();
        b.extend_from_slice(data);
        b.extend_from_slice(&self.tx.tag(&head[proto::FRAME_HEADER_LEN..], data));
        b
    }

    async fn recv(&mut self) -> Result<Msg, rdma_link::FrameError> {
        self.rd
            .read(&mut unbuffered(&mut self.s), |_| {
                Err(rdma_link::FrameError::Closed)
            })
            .await
    }

    /// The next message that is not a heartbeat.
    async fn recv_no_ping(&mut self) -> Result<Msg, rdma_link::FrameError> {
        loop {
            match within(3, self.recv()).await {
                Ok(Msg::Ping { stamp }) => self.send(&Msg::Pong { stamp }).await,
                Ok(Msg::Pong { .. }) => {}
                other => return other,
            }
        }
    }
}

/// Complete the handshake by hand as node 1 (the wire protocol, independently written).
async fn fake_authenticated_client(addr: std::net::SocketAddr) -> Fake {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let nonce_c = [7u8; 32];
    let ours = hello(PROTOCOL_VERSION, nonce_c);
    send(&mut s, &Msg::Hello(ours.clone())).await;
    let Ok(Msg::Challenge {
        hello: h, flags, ..
    }) = recv(&mut s).await
    else {
        panic!("no challenge")
    };
    // resync point: two empty lists; region: none.
    let carried = [0u8, 0, 0, 0, 0];
    let mac = transcript_mac(
        b"nvmirror-link connector",
        &nonce_c,
        &ours,
        &h,
        flags,
        &carried,
    );
    send(
        &mut s,
        &Msg::Auth {
            mac,
            resync: Default::default(),
            region: None,
        },
    )
    .await;
    assert!(matches!(recv(&mut s).await, Ok(Msg::Welcome { .. })));
    assert_eq!(flags, proto::FLAG_FRAME_MAC, "frame MACs are on by default");
    let tx = transcript_mac(
        b"nvmirror-link frame key connector->acceptor",
        &nonce_c,
        &ours,
        &h,
        flags,
        &[],
    );
    let rx = transcript_mac(
        b"nvmirror-link frame key acceptor->connector",
        &nonce_c,
        &ours,
        &h,
        flags,
        &[],
    );
    let mut rd = FrameReader::new(1 << 20);
    rd.set_mac(FrameMac::new(rx));
    Fake {
        s,
        tx: FrameMac::new(tx),
        rd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection_and_the_server_keeps_serving() {
    let p = pair().await;
    let garbage: Vec<Vec<u8>> = vec![
        // bad crc
        {
            let mut b = Vec::new();
            proto::encode_frame(&Msg::Hello(hello(PROTOCOL_VERSION, [0; 32])), &mut b);
            b[5] ^= 0xff;
            b
        },
        // oversized length
        [0xffu8, 0xff, 0xff, 0x7f, 0, 0, 0, 0].to_vec(),
        // garbage
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // unknown kind with a valid crc
        {
            let payload = [200u8, 1, 2, 3];
            let mut b = (payload.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            b.extend_from_slice(&payload);
            b
        },
    ];
    for g in &garbage {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(g).await.unwrap();
        expect_closed(&mut s).await;
        // The real client is still served.
        p.client.post(post(1, 0, 4096)).await.unwrap();
        assert!(p.client.state().is_up());
    }
    // After authentication too: a record frame with a crc (the MAC replaces it) drops that
    // connection.
    let mut f = fake_authenticated_client(p.addr).await;
    let hdr = proto::RecordHdr {
        tag: 1,
        partition: 0,
        seq: 1,
        offset: 0,
        len: 16,
    };
    let mut frame =
        proto::record_frame_header(&hdr, &[9u8; 16], proto::FrameCrc::Computed).to_vec();
    frame.extend_from_slice(&[9u8; 16]);
    frame.extend_from_slice(&{
        let payload = &frame[proto::FRAME_HEADER_LEN..];
        let (head, body) = payload.split_at(proto::mac_head_len(payload));
        f.tx.tag(head, body)
    });
    f.s.write_all(&frame).await.unwrap();
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "in a frame with a MAC (must be 0)").await;
    // An oversized record claim after authentication.
    let mut f = fake_authenticated_client(p.addr).await;
    let hdr = proto::RecordHdr {
        tag: 1,
        partition: 0,
        seq: 1,
        offset: REGION as u64 - 8,
        len: 16,
    };
    let frame = f.record_frame(&hdr, &[1u8; 16]);
    f.s.write_all(&frame).await.unwrap();
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "does not fit").await;
    // The real client reconnects (its connection was replaced by the fake ones).
    within(10, async {
        loop {
            if p.client.post(post(2, 0, 4096)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_traffic_closes_the_connection() {
    // Only a server: a real client would reconnect and replace our fake connections.
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let p = Solo {
        addr,
        server: server(addr, &store, |_| {}),
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A request before authentication: refused without buffering its payload.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    send(
        &mut s,
        &Msg::Request {
            id: 1,
            payload: vec![0u8; 64 << 10].into(),
        },
    )
    .await;
    expect_closed(&mut s).await;
    // On the wire: the server has no handler and says so in the response to our id.
    let mut f = fake_authenticated_client(p.addr).await;
    f.send(&Msg::Request {
        id: 77,
        payload: b"hello"[..].into(),
    })
    .await;
    match f.recv_no_ping().await {
        Ok(Msg::Response {
            id,
            status,
            payload,
        }) => assert_eq!(
            (id, status, payload.len()),
            (77, proto::STATUS_NO_HANDLER, 0)
        ),
        other => panic!("expected a response, got {other:?}"),
    }
    // A response to a request never made.
    f.send(&Msg::Response {
        id: 5,
        status: 0,
        payload: b"x"[..].into(),
    })
    .await;
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "response to unknown request id 5").await;
    // A request larger than the server's limit.
    let mut f = fake_authenticated_client(p.addr).await;
    let big = Msg::Request {
        id: 1,
        payload: vec![0u8; proto::DEFAULT_MAX_REQUEST as usize + 1].into(),
    };
    let (head, payload) = proto::data_frame_header(&big, proto::FrameCrc::CoveredByMac).unwrap();
    let tag = f.tx.tag(&head[proto::FRAME_HEADER_LEN..], payload);
    f.s.write_all(&head).await.unwrap();
    // The server may close before reading it all.
    if f.s.write_all(payload).await.is_ok() {
        let _ = f.s.write_all(&tag).await;
    }
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "exceeds the limit").await;
    // More requests in flight than the request window (32): a handler that never answers.
    p.server
        .set_request_handler(Some(Arc::new(|_p: rdma_link::Bytes| {
            std::future::pending::<rdma_link::Bytes>()
        })));
    let mut f = fake_authenticated_client(p.addr).await;
    for id in 1..=33u64 {
        f.send(&Msg::Request {
            id,
            payload: vec![id as u8; 100].into(),
        })
        .await;
    }
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "exceeded the request window of 32").await;
    // A request id reused while in service.
    let mut f = fake_authenticated_client(p.addr).await;
    for _ in 0..2 {
        f.send(&Msg::Request {
            id: 9,
            payload: b"again"[..].into(),
        })
        .await;
    }
    expect_closed(&mut f.s).await;
    wait_down_with(&p.server, "request id 9 reused").await;
}

// ---- issue #15: the link under attack --------------------------------------------------------

/// A TCP connection from `ip` (a loopback address: the partner is 127.0.0.1).
async fn connect_from(ip: [u8; 4], to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((ip, 0)))?;
    sock.connect(to).await
}

/// `n` strangers from `ips` (in turn) that connect, say nothing, and reconnect as soon as the
/// server drops them, until `stop`. Returns how many connections they made.
fn idle_strangers(
    to: std::net::SocketAddr,
    ips: &[[u8; 4]],
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Arc<AtomicU64> {
    let made = Arc::new(AtomicU64::new(0));
    for i in 0..n {
        let (ip, stop, made) = (ips[i % ips.len()], stop.clone(), made.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = connect_from(ip, to).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                made.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 256];
                loop {
                    tokio::select! {
                        r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            if stop.load(Ordering::Relaxed) { return; }
                        }
                    }
                }
            }
        });
    }
    made
}

/// The partner gets in while `strangers` hold connections, within `secs`, twice (the second
/// time the listener knows its address).
async fn partner_gets_in_despite(ips: &[[u8; 4]]) {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let server = server(addr, &store, |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let made = idle_strangers(addr, ips, 20, &stop);
    // Let them fill every slot there is.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        made.load(Ordering::Relaxed) >= 16,
        "the strangers did not connect"
    );
    for round in 0..2 {
        let local = Region::leaked(REGION);
        let t0 = std::time::Instant::now();
        let c = client(addr, local, |_| {});
        let up = tokio::time::timeout(Duration::from_millis(1500), c.wait_up()).await;
        assert!(
            matches!(up, Ok(Ok(_))),
            "round {round}: the partner was kept out by 20 idle strangers ({} connections made); state {:?}",
            made.load(Ordering::Relaxed),
            c.state()
        );
        println!("round {round}: partner up after {:?}", t0.elapsed());
        fill(&local, 0, 4096, 1);
        c.post(post(1, 0, 4096)).await.unwrap();
        c.shutdown().await;
    }
    // The strangers were dropped and came back all along.
    assert!(
        made.load(Ordering::Relaxed) > 20,
        "strangers were never dropped"
    );
    stop.store(true, Ordering::Relaxed);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_from_one_address_do_not_keep_the_partner_out() {
    partner_gets_in_despite(&[[127, 0, 0, 2]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_from_many_addresses_do_not_keep_the_partner_out() {
    let ips: Vec<[u8; 4]> = (2..22).map(|i| [127, 0, 0, i]).collect();
    partner_gets_in_despite(&ips).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_that_says_nothing_is_dropped_after_the_accept_timeout() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let _server = server(addr, &store, |c| {
        c.accept_timeout = Duration::from_millis(300)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = connect_from([127, 0, 0, 3], addr).await.unwrap();
    let t0 = std::time::Instant::now();
    expect_closed(&mut s).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "dropped after {took:?} (accept timeout 300 ms)"
    );
    wait_down_with(&_server, "did not authenticate within").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_layout_tag_is_refused_on_both_sides() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let s = server(addr, &store, |c| c.layout_tag = 0x1111);
    let c = client(addr, Region::leaked(REGION), |c| c.layout_tag = 0x2222);
    let rc = wait_down_with(&c, "layout mismatch").await;
    let rs = wait_down_with(&s, "layout mismatch").await;
    for r in [&rc, &rs] {
        assert!(
            r.contains("0x1111")
                && r.contains("0x2222")
                && r.contains("node 1")
                && r.contains("node 2"),
            "{r}"
        );
    }
    assert!(!c.state().is_up() && !s.state().is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_store_refuses_fails_its_post_and_the_link_stays_up() {
    let p = pair().await;
    *p.store.refuse_partition.lock().unwrap() = Some(2);
    fill(&p.local, 0, 4096, 2);
    // post(seq) goes to partition seq % 3.
    match p.client.post(post(2, 0, 4096)).await {
        Err(
            e @ LinkError::RecordRefused {
                partition: 2,
                seq: 2,
                ..
            },
        ) => {
            let t = e.to_string();
            assert!(
                t.contains("not in this node's layout") && t.contains("node 2"),
                "{t}"
            );
        }
        other => panic!("a refused record must fail its post, got {other:?}"),
    }
    // Not held; the link stays up and other records are.
    p.client.post(post(3, 4096, 4096)).await.unwrap();
    assert_eq!(p.store.log.lock().unwrap().records, vec![(0, 3)]);
    assert!(p.client.state().is_up());
    let (posts, acked, failed, _) = p.client.counters();
    assert_eq!((posts, acked, failed), (2, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_version_peer_is_refused_with_a_clear_error() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let server = server(addr, &store, |_| {});
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A node of the previous release: its hello has the same layout, version 2.
    let mut s = TcpStream::connect(addr).await.unwrap();
    send(&mut s, &Msg::Hello(hello(2, [1; 32]))).await;
    match within(3, recv(&mut s)).await {
        Ok(Msg::Reject { reason }) => assert!(
            reason.contains("version mismatch")
                && reason.contains(&format!("v{PROTOCOL_VERSION}"))
                && reason.contains("v2"),
            "{reason}"
        ),
        other => panic!("expected a reject, got {other:?}"),
    }
    expect_closed(&mut s).await;
    wait_down_with(&server, "the peer speaks v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_without_a_valid_mac_are_rejected_and_nothing_is_acknowledged() {
    // Only a server: we are node 1, by hand.
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let server = server(addr, &store, |_| {});
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rec = |tag: u64, seq: u64, offset: u64| proto::RecordHdr {
        tag,
        partition: 0,
        seq,
        offset,
        len: 4096,
    };
    // Read until the server closes; no acknowledgement may come.
    async fn no_ack_then_closed(f: &mut Fake) {
        loop {
            match within(3, f.recv()).await {
                Ok(Msg::Ack { tag, .. }) => panic!("record {tag} was acknowledged"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    // 1. A legitimate record is held and acknowledged.
    let mut f = fake_authenticated_client(addr).await;
    let frame = f.record_frame(&rec(1, 1, 0), &[0xa1; 4096]);
    f.s.write_all(&frame).await.unwrap();
    assert!(matches!(
        f.recv_no_ping().await,
        Ok(Msg::Ack {
            tag: 1,
            status: proto::AckStatus::Held,
            ..
        })
    ));
    // 2. Injected by someone without the keys: a well-formed record frame (what the version 2
    //    protocol accepted as a medium write) with a made-up MAC.
    let mut forged = proto::record_frame_header(
        &rec(2, 2, 8192),
        &[0xbd; 4096],
        proto::FrameCrc::CoveredByMac,
    )
    .to_vec();
    forged.extend_from_slice(&[0xbd; 4096]);
    forged.extend_from_slice(&[0u8; proto::TAG_LEN]);
    f.s.write_all(&forged).await.unwrap();
    no_ack_then_closed(&mut f).await;
    wait_down_with(&server, "failed its authentication").await;

    // 3. Replayed: the same sealed record twice; the copy is refused.
    let mut f = fake_authenticated_client(addr).await;
    let frame = f.record_frame(&rec(3, 3, 4096), &[0xc3; 4096]);
    f.s.write_all(&frame).await.unwrap();
    assert!(matches!(
        f.recv_no_ping().await,
        Ok(Msg::Ack { tag: 3, .. })
    ));
    f.s.write_all(&frame).await.unwrap();
    no_ack_then_closed(&mut f).await;

    // 4. Altered on the way: one byte of a sealed record changed (and the crc fixed up).
    let mut f = fake_authenticated_client(addr).await;
    let mut frame = f.record_frame(&rec(4, 4, 12288), &[0xd4; 4096]);
    let data_at = proto::FRAME_HEADER_LEN + proto::RECORD_HDR_LEN;
    frame[data_at + 100] ^= 0x01;
    let crc = crc32c::crc32c(&frame[proto::FRAME_HEADER_LEN..data_at + 4096]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    f.s.write_all(&frame).await.unwrap();
    no_ack_then_closed(&mut f).await;

    // 5. An injected control message (a release would let the engine reclaim its copies).
    let mut f = fake_authenticated_client(addr).await;
    send(
        &mut f.s,
        &Msg::Release {
            partition: 0,
            through_seq: 99,
        },
    )
    .await;
    no_ack_then_closed(&mut f).await;

    // Only the authentic records were held, and the forged bytes never reached the store.
    let log = store.log.lock().unwrap();
    assert_eq!(log.records, vec![(0, 1), (0, 3)]);
    assert!(log.releases.is_empty(), "a forged release was delivered");
    let region = &store.region;
    assert_eq!(region.read_bytes(8192, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(region.read_bytes(12288, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(region.read_bytes(0, 4096).unwrap(), vec![0xa1; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_mac_settings_must_agree_and_off_on_both_still_works() {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let s = server(addr, &store, |_| {});
    let c = client(addr, Region::leaked(REGION), |c| c.frame_mac = false);
    let rc = wait_down_with(&c, "frame authentication").await;
    let rs = wait_down_with(&s, "frame authentication").await;
    assert!(rc.contains("off on node 1 but on on node 2"), "{rc}");
    assert!(rs.contains("off on node 1 but on on node 2"), "{rs}");
    c.shutdown().await;
    s.shutdown().await;
    // Off on both nodes (to measure what the MACs cost): records still land byte-exact.
    let p = pair_with(|c| c.frame_mac = false, |c| c.frame_mac = false).await;
    let data = fill(&p.local, 0, 8192, 5);
    p.client.post(post(1, 0, 8192)).await.unwrap();
    assert_eq!(p.store.region.read_bytes(0, 8192).unwrap(), data);
}
