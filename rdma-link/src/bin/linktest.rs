//! nvmirror-linktest: drive the mirror link between two processes (VM tests and benchmark).
//!
//! ```text
//! nvmirror-linktest server --transport tcp|rdma --listen ADDR [common] [--duration-s N] [--resync-seq N]
//!          [--rpc-delay-ms N]         the request handler waits N ms before answering
//! nvmirror-linktest client --transport tcp|rdma --connect ADDR [common] --count N --size BYTES --qd Q
//!          [--kill-self-after N]      SIGKILL this process after N acknowledged posts
//!          [--expect-peer-death]      post until the link fails; every in-flight post must error
//!          [--expect-reject TEXT]     the handshake must fail with TEXT in the reason
//!          [--rounds R]               after a round, wait for the link to drop and come back
//!          [--mode rpc]               send COUNT requests of SIZE bytes (QD Q) to the server's
//!                                     request handler instead of posting records; every answer
//!                                     is checked (with --expect-peer-death: request until the
//!                                     link fails; every in-flight request must error)
//! nvmirror-linktest caps              list RDMA devices and their FLUSH capability
//! common: --secret S --cluster N --node N --peer N --window N --region-mb N
//!         --hb-ms N --hb-timeout-ms N --timeout-s N --busy-poll-us N
//!         --layout-tag N (default 0)  --frame-mac 0|1 (default 1: every message authenticated;
//!         0 only to measure what that costs, on both sides)
//! ```
//! Every record's bytes are `seq` (8 bytes LE) followed by a pattern of its offset; the server
//! checks them when the record arrives and reports `verified` / `bad` counts. The server's
//! request handler answers `len (8 bytes LE) | payload reversed, xor 0x5a`; the client checks it.

use rdma_link::{
    Bytes, Link, LinkConfig, LinkError, LinkState, PartitionSeq, Post, Region, RequestHandler,
    ResyncPoint, Role, SecondStore, Transport,
};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args(HashMap<String, String>);

impl Args {
    fn parse(v: &[String]) -> AnyResult<Args> {
        let mut m = HashMap::new();
        let mut i = 0;
        while i < v.len() {
            let k = v[i]
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {:?}", v[i]))?;
            if matches!(k, "expect-peer-death" | "no-verify") {
                m.insert(k.to_string(), "1".to_string());
                i += 1;
            } else {
                let val = v.get(i + 1).ok_or_else(|| format!("--{k} needs a value"))?;
                m.insert(k.to_string(), val.clone());
                i += 2;
            }
        }
        Ok(Args(m))
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn num(&self, k: &str, default: u64) -> AnyResult<u64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| format!("--{k} {v:?}: {e}").into()),
        }
    }
    fn flag(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
}

/// The server's answer to a request.
fn rpc_answer(req: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.len() + 8);
    out.extend_from_slice(&(req.len() as u64).to_le_bytes());
    out.extend(req.iter().rev().map(|b| b ^ 0x5a));
    out
}

fn rpc_payload(id: u64, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len as u64)
        .map(|i| pattern_byte(id.wrapping_mul(7919).wrapping_add(i)))
        .collect();
    let n = len.min(8);
    p[..n].copy_from_slice(&id.to_le_bytes()[..n]);
    p
}

fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn fill_record(r: &Region, offset: u64, len: usize, seq: u64) {
    let mut b: Vec<u8> = (0..len as u64).map(|i| pattern_byte(offset + i)).collect();
    let n = len.min(8);
    b[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    r.write_bytes(offset, &b);
}

fn record_ok(r: &Region, offset: u64, len: usize, seq: u64) -> bool {
    let Some(b) = r.read_bytes(offset, len) else {
        return false;
    };
    let n = len.min(8);
    b[..n] == seq.to_le_bytes()[..n]
        && b[n..]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern_byte(offset + (n + i) as u64))
}

struct Store {
    region: Region,
    verify: bool,
    records: AtomicU64,
    verified: AtomicU64,
    bad: AtomicU64,
    resync: ResyncPoint,
}

impl SecondStore for Store {
    fn region(&self) -> Region {
        self.region
    }
    fn persist(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        // Anonymous memory: nothing to flush. A real second store does msync / cache flushes.
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }
    fn on_record(&self, _partition: u32, seq: u64, offset: u64, len: u32) {
        self.records.fetch_add(1, Ordering::Relaxed);
        if self.verify {
            if record_ok(&self.region, offset, len as usize, seq) {
                self.verified.fetch_add(1, Ordering::Relaxed);
            } else {
                self.bad.fetch_add(1, Ordering::Relaxed);
                eprintln!("BAD record seq {seq} at {offset}+{len}");
            }
        }
    }
    fn on_release(&self, partition: u32, through_seq: u64) {
        println!("RELEASE partition={partition} through={through_seq}");
    }
    fn resync_point(&self) -> ResyncPoint {
        self.resync.clone()
    }
}

fn config(a: &Args, role: Role, server: bool) -> AnyResult<LinkConfig> {
    let transport = match a.get("transport").unwrap_or("tcp") {
        "tcp" => Transport::Tcp,
        "rdma" => Transport::Rdma,
        t => return Err(format!("unknown transport {t:?} (tcp or rdma)").into()),
    };
    let (me, peer) = if server { (2, 1) } else { (1, 2) };
    let secret = a
        .get("secret")
        .unwrap_or("nvmirror-linktest-secret")
        .as_bytes();
    let mut c = LinkConfig::new(
        transport,
        role,
        a.num("cluster", 0x11)?,
        a.num("node", me)? as u32,
        a.num("peer", peer)? as u32,
        secret,
    );
    c.window = a.num("window", 128)? as u32;
    c.max_record = 1 << 20;
    c.heartbeat_interval = Duration::from_millis(a.num("hb-ms", 200)?);
    c.busy_poll = Duration::from_micros(a.num("busy-poll-us", rdma_link::default_busy_poll_us())?);
    c.heartbeat_timeout = Duration::from_millis(a.num("hb-timeout-ms", 3000)?);
    c.ack_timeout = Duration::from_millis(a.num("ack-timeout-ms", 10000)?);
    c.handshake_timeout = Duration::from_secs(5);
    c.reconnect_delay = Duration::from_millis(200);
    c.layout_tag = a.num("layout-tag", 0)?;
    c.frame_mac = match a.num("frame-mac", 1)? {
        0 => false,
        1 => true,
        v => return Err(format!("--frame-mac {v}: 0 or 1").into()),
    };
    Ok(c)
}

fn main() -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let r = match argv.first().map(String::as_str) {
        Some("server") => Args::parse(&argv[1..]).and_then(|a| server(&a)),
        Some("client") => Args::parse(&argv[1..]).and_then(|a| client(&a)),
        Some("caps") => {
            let c = rdma_link::rdma_capabilities();
            for (n, g, p) in &c.devices {
                println!("device {n}: RDMA FLUSH global={g} persistent={p}");
            }
            println!("userspace IBV_WR_FLUSH verb: {}", c.userspace_flush_verb);
            Ok(true)
        }
        _ => Err(
            "usage: nvmirror-linktest server|client|caps [options] (see the source header)".into(),
        ),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nvmirror-linktest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn rt() -> AnyResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn describe(s: &LinkState) -> String {
    match s {
        LinkState::Up(u) => format!(
            "up generation={} window={} peer_resync_second={:?} peer_resync_first={:?}",
            u.generation,
            u.window,
            u.peer_resync
                .second_store
                .iter()
                .map(|p| (p.partition, p.seq))
                .collect::<Vec<_>>(),
            u.peer_resync
                .first_store
                .iter()
                .map(|p| (p.partition, p.seq))
                .collect::<Vec<_>>()
        ),
        LinkState::Down(e) => format!("down reason={e}"),
        LinkState::Connecting => "connecting".into(),
        LinkState::Closed => "closed".into(),
    }
}

fn server(a: &Args) -> AnyResult<bool> {
    let addr = a
        .get("listen")
        .ok_or("--listen ADDR:PORT is required")?
        .parse()?;
    let cfg = config(a, Role::Listen(addr), true)?;
    let region = Region::leaked((a.num("region-mb", 64)? << 20) as usize);
    let rs = a.num("resync-seq", 0)?;
    let store = Arc::new(Store {
        region,
        verify: !a.flag("no-verify"),
        records: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        resync: ResyncPoint {
            first_store: vec![PartitionSeq {
                partition: 0,
                seq: rs + 1000,
            }],
            second_store: vec![PartitionSeq {
                partition: 0,
                seq: rs,
            }],
        },
    });
    let served = Arc::new(AtomicU64::new(0));
    let sv = served.clone();
    let delay = Duration::from_millis(a.num("rpc-delay-ms", 0)?);
    let handler: Arc<dyn RequestHandler> = Arc::new(move |p: Bytes| {
        sv.fetch_add(1, Ordering::Relaxed);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Bytes::from(rpc_answer(&p))
        }
    });
    let link = Link::start_with_handler(
        cfg,
        None,
        Some(store.clone() as Arc<dyn SecondStore>),
        handler,
    )?;
    let duration = Duration::from_secs(a.num("duration-s", 3600)?);
    println!("SERVER listening on {addr}");
    rt()?.block_on(async {
        let mut rx = link.subscribe();
        let t0 = Instant::now();
        let mut last = (u64::MAX, u64::MAX, u64::MAX);
        while t0.elapsed() < duration {
            let changed = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            if let Ok(Ok(())) = changed {
                println!("STATE {}", describe(&rx.borrow_and_update()));
            }
            let now = (
                store.records.load(Ordering::Relaxed),
                store.bad.load(Ordering::Relaxed),
                served.load(Ordering::Relaxed),
            );
            if now != last {
                println!(
                    "SERVER records={} verified={} bad={} requests={}",
                    now.0,
                    store.verified.load(Ordering::Relaxed),
                    now.1,
                    now.2
                );
                last = now;
            }
        }
    });
    Ok(store.bad.load(Ordering::Relaxed) == 0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn client(a: &Args) -> AnyResult<bool> {
    let addr = a
        .get("connect")
        .ok_or("--connect ADDR:PORT is required")?
        .parse()?;
    let cfg = config(a, Role::Connect(addr), false)?;
    let region_len = (a.num("region-mb", 64)? << 20) as usize;
    let local = Region::leaked(region_len);
    let count = a.num("count", 1000)?;
    let size = a.num("size", 4096)? as usize;
    let qd = a.num("qd", 1)?.max(1) as usize;
    let rounds = a.num("rounds", 1)?;
    let kill_after = a
        .get("kill-self-after")
        .map(str::parse::<u64>)
        .transpose()?;
    let timeout = Duration::from_secs(a.num("timeout-s", 60)?);
    let slots = (region_len / size).max(1) as u64;
    let transport = a.get("transport").unwrap_or("tcp").to_string();
    let link = Link::start(cfg, Some(local), None)?;
    rt()?.block_on(async move {
        if let Some(want) = a.get("expect-reject") {
            let r = tokio::time::timeout(timeout, async {
                loop {
                    let e = link.wait_down().await;
                    if let LinkError::Handshake { .. } = e {
                        return e;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            return Ok(match r {
                Ok(e) if e.to_string().contains(want) => {
                    println!("REJECTED as expected: {e}");
                    true
                }
                Ok(e) => {
                    println!("FAIL: rejected with {e:?}, expected {want:?}");
                    false
                }
                Err(_) => {
                    println!("FAIL: no handshake rejection within {timeout:?}; state {}", describe(&link.state()));
                    false
                }
            });
        }
        let mut seq = 0u64;
        for round in 1..=rounds {
            let up = match tokio::time::timeout(timeout, link.wait_up()).await {
                Ok(Ok(u)) => u,
                other => {
                    println!("FAIL: link not up within {timeout:?}: {other:?} state {}", describe(&link.state()));
                    return Ok(false);
                }
            };
            println!("STATE {}", describe(&LinkState::Up(up)));
            if a.get("mode") == Some("rpc") {
                if a.flag("expect-peer-death") {
                    return Ok(rpc_until_death(&link, size, qd, timeout).await);
                }
                if !rpc_round(&link, &transport, round, count, size, qd, timeout).await? {
                    return Ok(false);
                }
                println!("ROUND {round} OK");
                if round < rounds {
                    let e = link.wait_down().await;
                    println!("STATE down reason={e}");
                }
                continue;
            }
            if a.flag("expect-peer-death") {
                return Ok(stream_until_death(&link, local, size, qd, slots, timeout).await);
            }
            let mut lat = Vec::with_capacity(count as usize);
            let t0 = Instant::now();
            let mut inflight = tokio::task::JoinSet::new();
            let mut done = 0u64;
            let mut failed = 0u64;
            let mut issued = 0u64;
            while done < count {
                while issued < count && inflight.len() < qd {
                    seq += 1;
                    issued += 1;
                    let off = (seq % slots) * size as u64;
                    fill_record(&local, off, size, seq);
                    let l = link.clone();
                    let p = Post { partition: 0, seq, local_offset: off, remote_offset: off, len: size as u32 };
                    inflight.spawn(async move {
                        let t = Instant::now();
                        let r = l.post(p).await;
                        (r, t.elapsed())
                    });
                }
                let Some(j) = tokio::time::timeout(timeout, inflight.join_next()).await.map_err(|_| "a post hung")? else { break };
                let (r, d) = j?;
                done += 1;
                match r {
                    Ok(()) => lat.push(d),
                    Err(e) => {
                        failed += 1;
                        println!("post failed: {e}");
                    }
                }
                if kill_after == Some(done) {
                    println!("KILLING SELF after {done} acknowledged posts with {} in flight", inflight.len());
                    // SAFETY: plain syscall; this process is meant to die here (simulated crash).
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            }
            let el = t0.elapsed();
            lat.sort();
            let bytes = lat.len() as u64 * size as u64;
            println!(
                "RESULT transport={transport} round={round} size={size} qd={qd} count={count} ok={} failed={failed} p50_us={:.1} p99_us={:.1} MBps={:.1} iops={:.0}",
                lat.len(),
                percentile(&lat, 0.5).as_secs_f64() * 1e6,
                percentile(&lat, 0.99).as_secs_f64() * 1e6,
                bytes as f64 / el.as_secs_f64() / 1e6,
                lat.len() as f64 / el.as_secs_f64()
            );
            if failed > 0 {
                return Ok(false);
            }
            link.release(0, seq).ok();
            println!("ROUND {round} OK");
            if round < rounds {
                let e = link.wait_down().await;
                println!("STATE down reason={e}");
            }
        }
        link.shutdown().await;
        Ok(true)
    })
}

/// `count` requests of `size` bytes at QD `qd`; every answer checked. Ok(false) on failures.
async fn rpc_round(
    link: &Link,
    transport: &str,
    round: u64,
    count: u64,
    size: usize,
    qd: usize,
    timeout: Duration,
) -> AnyResult<bool> {
    let mut inflight = tokio::task::JoinSet::new();
    let (mut issued, mut done, mut failed, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut lat = Vec::with_capacity(count as usize);
    let t0 = Instant::now();
    while done < count {
        while issued < count && inflight.len() < qd {
            issued += 1;
            let l = link.clone();
            let id = issued;
            inflight.spawn(async move {
                let req = rpc_payload(id, size);
                let t = Instant::now();
                let r = l.request(req.clone()).await;
                let good = match &r {
                    Ok(ans) => ans[..] == rpc_answer(&req)[..],
                    Err(_) => false,
                };
                (r.map(|_| ()), good, t.elapsed())
            });
        }
        let Some(j) = tokio::time::timeout(timeout, inflight.join_next())
            .await
            .map_err(|_| "a request hung")?
        else {
            break;
        };
        let (r, good, d) = j?;
        done += 1;
        match r {
            Ok(()) if good => lat.push(d),
            Ok(()) => {
                bad += 1;
                println!("BAD answer");
            }
            Err(e) => {
                failed += 1;
                println!("request failed: {e}");
            }
        }
    }
    let el = t0.elapsed();
    lat.sort();
    println!(
        "RESULT mode=rpc transport={transport} round={round} size={size} qd={qd} count={count} ok={} failed={failed} bad={bad} p50_us={:.1} p99_us={:.1} MBps={:.1}",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        // request and answer both cross the link
        2.0 * (lat.len() * size) as f64 / el.as_secs_f64() / 1e6,
    );
    Ok(failed == 0 && bad == 0)
}

/// Request at QD `qd` until the link fails; every request must complete (checked answer before,
/// Err after), none may hang.
async fn rpc_until_death(link: &Link, size: usize, qd: usize, timeout: Duration) -> bool {
    let mut inflight = tokio::task::JoinSet::new();
    let (mut ok, mut failed, mut bad, mut id) = (0u64, 0u64, 0u64, 0u64);
    let (mut announced, mut dead) = (false, false);
    let t0 = Instant::now();
    loop {
        while !dead && inflight.len() < qd {
            id += 1;
            let l = link.clone();
            let req = rpc_payload(id, size);
            inflight.spawn(async move {
                let r = l.request(req.clone()).await;
                r.map(|ans| ans[..] == rpc_answer(&req)[..])
            });
        }
        if inflight.is_empty() {
            break;
        }
        match tokio::time::timeout(timeout, inflight.join_next()).await {
            Err(_) => {
                println!(
                    "FAIL: {} requests hung for {timeout:?} after the peer died",
                    inflight.len()
                );
                return false;
            }
            Ok(None) => break,
            Ok(Some(Ok(Ok(true)))) => ok += 1,
            Ok(Some(Ok(Ok(false)))) => bad += 1,
            Ok(Some(Ok(Err(e)))) => {
                if !dead {
                    println!("first failure after {ok} answered requests: {e}");
                }
                failed += 1;
                dead = true;
            }
            Ok(Some(Err(e))) => {
                println!("FAIL: request task: {e}");
                return false;
            }
        }
        if !announced && ok >= 20 {
            println!("STREAMING");
            announced = true;
        }
        if !dead && t0.elapsed() > timeout * 2 {
            println!("FAIL: the peer never died");
            return false;
        }
    }
    let (reqs, answered, fails, _) = link.request_counters();
    println!("PEER-DEATH mode=rpc ok={ok} failed={failed} bad={bad} hung=0 counters requests={reqs} answered={answered} failed={fails}");
    // `fails`: requests that were handed to the connection and failed (in flight at the death).
    fails > 0 && bad == 0 && reqs == answered + fails
}

/// Post at QD `qd` until the link fails; every post must complete (Ok before, Err after), none hang.
async fn stream_until_death(
    link: &Link,
    local: Region,
    size: usize,
    qd: usize,
    slots: u64,
    timeout: Duration,
) -> bool {
    let mut inflight = tokio::task::JoinSet::new();
    let (mut ok, mut failed, mut seq) = (0u64, 0u64, 0u64);
    let mut announced = false;
    let mut dead = false;
    let t0 = Instant::now();
    loop {
        while !dead && inflight.len() < qd {
            seq += 1;
            let off = (seq % slots) * size as u64;
            fill_record(&local, off, size, seq);
            let l = link.clone();
            let p = Post {
                partition: 0,
                seq,
                local_offset: off,
                remote_offset: off,
                len: size as u32,
            };
            inflight.spawn(async move { l.post(p).await });
        }
        if inflight.is_empty() {
            break;
        }
        match tokio::time::timeout(timeout, inflight.join_next()).await {
            Err(_) => {
                println!(
                    "FAIL: {} posts hung for {timeout:?} after the peer died",
                    inflight.len()
                );
                return false;
            }
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => ok += 1,
            Ok(Some(Ok(Err(e)))) => {
                if !dead {
                    println!("first failure after {ok} acknowledged posts: {e}");
                }
                failed += 1;
                dead = true;
            }
            Ok(Some(Err(e))) => {
                println!("FAIL: post task: {e}");
                return false;
            }
        }
        if !announced && ok >= 200 {
            println!("STREAMING");
            announced = true;
        }
        if !dead && t0.elapsed() > timeout * 2 {
            println!("FAIL: the peer never died");
            return false;
        }
    }
    let (posts, acked, fails, _) = link.counters();
    println!("PEER-DEATH ok={ok} failed={failed} hung=0 counters posts={posts} acked={acked} failed={fails}");
    failed > 0 && posts == acked + fails
}
