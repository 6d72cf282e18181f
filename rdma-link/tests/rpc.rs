//! The request/response facility over the TCP transport (no root needed).

mod common;

use common::*;
use rdma_link::{Bytes, Link, LinkConfig, LinkError, Post, Region, RequestHandler, SecondStore};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// The answer the test handlers give: a header naming the request, then the payload reversed.
fn answer_for(req: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.len() + 8);
    out.extend_from_slice(&(req.len() as u64).to_le_bytes());
    out.extend(req.iter().rev().map(|b| b ^ 0x5a));
    out
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i as u64 * 17) % 253) as u8)
        .collect()
}

/// A handler that answers `answer_for(payload)`, after sleeping as many milliseconds as the
/// payload's first byte says (0 if empty), and counts calls.
fn echo_handler(calls: Arc<AtomicUsize>) -> Arc<dyn RequestHandler> {
    Arc::new(move |p: Bytes| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            let ms = p.first().copied().unwrap_or(0);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
            }
            Bytes::from(answer_for(&p))
        }
    })
}

struct RpcPair {
    server: Link,
    client: Link,
    _store: Arc<MemStore>,
    local: Region,
    addr: SocketAddr,
}

async fn rpc_pair(
    server_handler: Option<Arc<dyn RequestHandler>>,
    client_handler: Option<Arc<dyn RequestHandler>>,
    fs: impl FnOnce(&mut LinkConfig),
    fc: impl FnOnce(&mut LinkConfig),
) -> RpcPair {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let mut c = cfg(rdma_link::Role::Listen(addr), 2, 1);
    fs(&mut c);
    let st = Some(store.clone() as Arc<dyn SecondStore>);
    let server = match server_handler {
        Some(h) => Link::start_with_handler(c, None, st, h).unwrap(),
        None => Link::start(c, None, st).unwrap(),
    };
    let local = Region::leaked(REGION);
    let mut c = cfg(rdma_link::Role::Connect(addr), 1, 2);
    fc(&mut c);
    let client = match client_handler {
        Some(h) => Link::start_with_handler(c, Some(local), None, h).unwrap(),
        None => Link::start(c, Some(local), None).unwrap(),
    };
    within(5, client.wait_up()).await.unwrap();
    within(5, server.wait_up()).await.unwrap();
    RpcPair {
        server,
        client,
        _store: store,
        local,
        addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_round_trip_both_ways() {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = rpc_pair(
        Some(echo_handler(calls.clone())),
        Some(echo_handler(calls.clone())),
        |_| {},
        |_| {},
    )
    .await;
    // The largest request (1 MiB + 4 KiB minus the 8 bytes the answer adds, so the answer fits
    // too), a 1 MiB one, an empty one and a small one; client -> server and server -> client.
    let max = rdma_link::proto::DEFAULT_MAX_REQUEST as usize;
    for (i, len) in [MIB, max - 8, 0, 1, 4096 + 512].into_iter().enumerate() {
        let mut req = payload(i as u64, len);
        if let Some(b) = req.first_mut() {
            *b = 0; // no sleep
        }
        let got = within(10, p.client.request(req.clone())).await.unwrap();
        assert_eq!(got.len(), len + 8);
        assert!(
            got[..] == answer_for(&req)[..],
            "client->server answer {len}"
        );
        let got = within(10, p.server.request(Bytes::from(req.clone())))
            .await
            .unwrap();
        assert!(
            got[..] == answer_for(&req)[..],
            "server->client answer {len}"
        );
    }
    assert_eq!(calls.load(Ordering::Relaxed), 10);
    let (req, ok, failed, served) = p.client.request_counters();
    assert_eq!((req, ok, failed, served), (5, 5, 0, 5));
    assert!(p.client.state().is_up() && p.server.state().is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_answered_out_of_order() {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = rpc_pair(
        Some(echo_handler(calls.clone())),
        None,
        |c| c.request_window = 16,
        |c| c.request_window = 64,
    )
    .await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut futs = Vec::new();
    for i in 0..300u64 {
        // Sleeps of 0..40 ms in a scrambled order, sizes up to 256 KiB: answers overtake.
        let mut req = payload(i, 1 + (i as usize * 7919) % (256 << 10));
        req[0] = ((i * 37) % 41) as u8;
        let link = p.client.clone();
        let order = order.clone();
        futs.push(tokio::spawn(async move {
            let got = link.request(req.clone()).await?;
            assert!(got[..] == answer_for(&req)[..], "answer of request {i}");
            order.lock().unwrap().push(i);
            Ok::<_, LinkError>(())
        }));
    }
    for f in futs {
        within(30, f).await.unwrap().unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 300);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "answers should complete out of issue order"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 300);
    let (req, ok, failed, _) = p.client.request_counters();
    assert_eq!((req, ok, failed), (300, 300, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_does_not_hold_back_others() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let handler: Arc<dyn RequestHandler> = Arc::new(move |p: Bytes| {
        let g = g.clone();
        async move {
            if p.first() == Some(&b's') {
                g.notified().await;
            }
            Bytes::from(answer_for(&p))
        }
    });
    let p = rpc_pair(Some(handler), None, |_| {}, |_| {}).await;
    let slow = {
        let link = p.client.clone();
        tokio::spawn(async move { link.request(&b"slow request"[..]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    for i in 0..50u64 {
        let mut req = payload(i, 64 << 10);
        req[0] = b'f';
        let got = within(5, p.client.request(req.clone())).await.unwrap();
        assert!(got[..] == answer_for(&req)[..]);
    }
    assert!(
        !slow.is_finished(),
        "the slow request must still be in service"
    );
    println!("50 fast requests behind a stuck one: {:?}", t0.elapsed());
    gate.notify_one();
    let got = within(5, slow).await.unwrap().unwrap();
    assert!(got[..] == answer_for(b"slow request")[..]);
    // Mirroring is unaffected by requests in flight.
    fill(&p.local, 0, 4096, 1);
    within(
        5,
        p.client.post(Post {
            partition: 0,
            seq: 1,
            local_offset: 0,
            remote_offset: 0,
            len: 4096,
        }),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_fails_every_request_in_flight_promptly() {
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    // Never answers.
    let handler: Arc<dyn RequestHandler> = Arc::new(move |_p: Bytes| {
        s.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<Bytes>()
    });
    let p = rpc_pair(Some(handler), None, |_| {}, |_| {}).await;
    let mut futs = Vec::new();
    for i in 0..40u64 {
        let link = p.client.clone();
        let req = payload(i, if i % 4 == 0 { MIB } else { 4096 });
        futs.push(tokio::spawn(async move { link.request(req).await }));
    }
    // Some requests are being served, the others wait for a window slot (32).
    let t = Instant::now();
    while started.load(Ordering::Relaxed) < 32 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(started.load(Ordering::Relaxed), 32);
    let t0 = Instant::now();
    p.server.crash();
    for f in futs {
        match within(5, f).await.unwrap() {
            Err(LinkError::Down { .. }) => {}
            other => panic!("request should fail with Down, got {other:?}"),
        }
    }
    let took = t0.elapsed();
    // The socket closes with the crashed process's runtime: well under the heartbeat timeout.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let (req, ok, failed, _) = p.client.request_counters();
    assert_eq!(ok, 0);
    assert_eq!(req, ok + failed, "every request completes exactly once");
    // While down, a request fails at once.
    let t1 = Instant::now();
    let r = within(1, p.client.request(&b"x"[..])).await;
    assert!(matches!(r, Err(LinkError::Down { .. })), "{r:?}");
    assert!(t1.elapsed() < Duration::from_millis(100));
    // A restarted peer serves requests again on the new connection.
    let store = MemStore::new(REGION);
    let c = cfg(rdma_link::Role::Listen(p.addr), 2, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let s2 = Link::start_with_handler(
        c,
        None,
        Some(store as Arc<dyn SecondStore>),
        echo_handler(calls),
    )
    .unwrap();
    within(5, s2.wait_up()).await.unwrap();
    let mut up = within(5, p.client.wait_up()).await.unwrap();
    while up.generation < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        up = within(5, p.client.wait_up()).await.unwrap();
    }
    let got = within(5, p.client.request(vec![0u8, 1, 2])).await.unwrap();
    assert!(got[..] == answer_for(&[0, 1, 2])[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_request_takes_the_link_down_after_the_request_timeout() {
    let handler: Arc<dyn RequestHandler> = Arc::new(|_p: Bytes| std::future::pending::<Bytes>());
    let p = rpc_pair(
        Some(handler),
        None,
        |_| {},
        |c| c.request_timeout = Duration::from_millis(400),
    )
    .await;
    let t0 = Instant::now();
    let r = within(5, p.client.request(&b"hello"[..])).await;
    let e = match r {
        Err(e @ LinkError::Down { .. }) => e.to_string(),
        other => panic!("expected Down, got {other:?}"),
    };
    assert!(e.contains("did not answer a request"), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_answers_are_refused_without_harm() {
    let big: Arc<dyn RequestHandler> = Arc::new(|p: Bytes| async move {
        if p.first() == Some(&b'B') {
            Bytes::from(vec![7u8; 200 << 10]) // more than the client accepts
        } else if p.first() == Some(&b'P') {
            panic!("handler panics on purpose")
        } else {
            p
        }
    });
    let p = rpc_pair(
        Some(big),
        None,
        |_| {},
        |c| c.max_request = 128 << 10, // the client accepts 128 KiB
    )
    .await;
    // Larger than the client's own limit: refused at once, nothing sent.
    let r = p.client.request(vec![0u8; (128 << 10) + 1]).await;
    assert!(matches!(r, Err(LinkError::InvalidRequest(_))), "{r:?}");
    // The largest allowed one goes through.
    let got = within(5, p.client.request(vec![1u8; 128 << 10]))
        .await
        .unwrap();
    assert_eq!(got.len(), 128 << 10);
    // The server honours the client's (smaller) limit for its requests too.
    let r = p.server.request(vec![0u8; (128 << 10) + 1]).await;
    assert!(matches!(r, Err(LinkError::InvalidRequest(_))), "{r:?}");
    // An answer larger than the requester's limit: that request fails, the link stays up.
    let r = within(5, p.client.request(&b"B"[..])).await;
    match r {
        Err(LinkError::RequestFailed { reason, .. }) => {
            assert!(reason.contains("size limit"), "{reason}")
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
    // A panicking handler: that request fails, the link stays up.
    let r = within(5, p.client.request(&b"P"[..])).await;
    assert!(matches!(r, Err(LinkError::RequestFailed { .. })), "{r:?}");
    // Far beyond the protocol limit: refused, no allocation, no panic.
    let r = p.client.request(vec![0u8; 20 << 20]).await;
    assert!(matches!(r, Err(LinkError::InvalidRequest(_))), "{r:?}");
    assert!(p.client.state().is_up() && p.server.state().is_up());
    let got = within(5, p.client.request(&b"still up"[..])).await.unwrap();
    assert_eq!(&got[..], b"still up");
    // The client has no handler: the server's requests fail, the link stays up.
    let r = within(5, p.server.request(&b"anyone?"[..])).await;
    match r {
        Err(LinkError::RequestFailed { reason, .. }) => {
            assert!(reason.contains("no request handler"), "{reason}")
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
    assert!(p.client.state().is_up());
}

#[test]
fn config_limits_are_validated() {
    let mut c = cfg(rdma_link::Role::Listen(free_addr()), 2, 1);
    c.max_request = rdma_link::proto::MAX_REQUEST_LEN + 1;
    assert!(matches!(
        Link::start(c, None, None),
        Err(LinkError::Config(_))
    ));
    let mut c = cfg(rdma_link::Role::Listen(free_addr()), 2, 1);
    c.request_window = 0;
    assert!(matches!(
        Link::start(c, None, None),
        Err(LinkError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_posts_share_the_link() {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = rpc_pair(Some(echo_handler(calls)), None, |_| {}, |_| {}).await;
    let mut reqs = Vec::new();
    for i in 0..16u64 {
        let link = p.client.clone();
        let mut req = payload(i, MIB);
        req[0] = 0;
        reqs.push(tokio::spawn(async move {
            let got = link.request(req.clone()).await?;
            assert!(got[..] == answer_for(&req)[..]);
            Ok::<_, LinkError>(())
        }));
    }
    let mut posts = Vec::new();
    for seq in 1..=200u64 {
        let off = (seq % 64) * 16384;
        let link = p.client.clone();
        posts.push(tokio::spawn(async move {
            link.post(Post {
                partition: 0,
                seq,
                local_offset: off,
                remote_offset: off,
                len: 16384,
            })
            .await
        }));
    }
    for f in posts {
        within(20, f).await.unwrap().unwrap();
    }
    for f in reqs {
        within(20, f).await.unwrap().unwrap();
    }
    let _ = p.local;
}
