//! Drives the engine's write path without ublk, for profiling outside the VM:
//!
//! ```text
//! cargo build --release --examples
//! valgrind --tool=callgrind target/release/examples/write_path tcp 2000 1
//! ```
//!
//! `write_path single|tcp|tcp-nomac [WRITES] [QUEUE_DEPTH] [BLOCK_KIB]` writes WRITES random
//! blocks of BLOCK_KIB (default 4) KiB (default 20000 writes) at QUEUE_DEPTH (default 1) into
//! one node (single) or into node a of two engines mirroring over the TCP link on loopback
//! (tcp; tcp-nomac: without frame MACs, as `cluster.frame_mac = false`). The
//! NVRAM is a file in /dev/shm, the medium in memory, so what is measured is the engine and
//! the link. Prints microseconds per write (wall clock) and the CPU time per write of every
//! thread in the process, and first what the record checksum (crc32c), the copy and the
//! link's frame MAC (BLAKE3) of one block cost on this CPU (under QEMU TCG all are emulated).

use nvmirror::engine::{Engine, EngineOptions, LunSpec};
use nvmirror::medium::{Medium, MemMedium};
use nvmirror::nvram::NvramRegion;
use rdma_link::{Link, LinkConfig, Role, SecondStore, Transport};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const LUN_SIZE: u64 = 256 * MIB;

fn engine(nvram: &Path, node: &str, medium: &Arc<MemMedium>, mirrored: bool) -> Arc<Engine> {
    let region = NvramRegion::open(nvram, Some(64 * MIB)).expect("nvram");
    Engine::open(
        region,
        EngineOptions {
            flush: nvmirror::flusher::FlushPolicy {
                batch_bytes: 8 * MIB,
                linger: std::time::Duration::from_millis(10),
            },
            mirrored,
            config_path: "write_path".into(),
            ..EngineOptions::single_node(node, 4)
        },
        vec![LunSpec {
            name: "lun0".into(),
            size: LUN_SIZE,
            ranges: 4,
            medium: medium.clone(),
        }],
    )
    .expect("engine")
}

fn link(e: &Arc<Engine>, role: Role, me: u32, peer: u32, frame_mac: bool) -> Link {
    let mut cfg = LinkConfig::new(
        Transport::Tcp,
        role,
        7,
        me,
        peer,
        b"write-path-profiling-secret",
    );
    cfg.frame_mac = frame_mac;
    let store: Arc<dyn SecondStore> = e.second_store().expect("mirrored layout");
    Link::start(cfg, Some(e.local_region()), Some(store)).expect("link")
}

/// Links `a` and `b` over TCP on loopback, each the other's mirror, once both ends are up.
/// The links live as long as what this returns.
fn mirror_pair(
    a: &Arc<Engine>,
    b: &Arc<Engine>,
    rt: &tokio::runtime::Runtime,
    frame_mac: bool,
) -> (Link, Link) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let (la, lb) = (
        link(a, Role::Listen(addr), 1, 2, frame_mac),
        link(b, Role::Connect(addr), 2, 1, frame_mac),
    );
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            la.wait_up().await.expect("a up");
            lb.wait_up().await.expect("b up");
        })
        .await
        .expect("the link came up")
    });
    a.attach_mirror(Arc::new(la.clone()));
    b.attach_mirror(Arc::new(lb.clone()));
    (la, lb)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("single");
    let writes: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let depth: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let block_kib: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    if mode == "held-reads" {
        held_reads(writes);
        return;
    }
    if !["single", "tcp", "tcp-nomac"].contains(&mode)
        || !(4..=512).contains(&block_kib)
        || !block_kib.is_multiple_of(4)
    {
        eprintln!("usage: write_path single|tcp|tcp-nomac [WRITES] [QUEUE_DEPTH] [BLOCK_KIB: 4..512, a multiple of 4]\n       write_path held-reads [WRITES]");
        std::process::exit(2);
    }
    let block = block_kib << 10;
    per_block_costs(block);
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    // Touch every page of the in-memory medium now: a real medium is written by DMA, so
    // its first-touch page faults (one per 4 KiB, in the flushers) are not the engine's cost.
    medium
        .write_zeroes(0, LUN_SIZE)
        .expect("an in-memory medium");
    let mirrored = mode != "single";
    let a = engine(&dir.path().join("nv-a"), "a", &medium, mirrored);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Kept alive for the run: node b and both ends of the link.
    let _partner = mirrored.then(|| {
        let b = engine(&dir.path().join("nv-b"), "b", &medium, true);
        let links = mirror_pair(&a, &b, &rt, mode == "tcp");
        (b, links)
    });

    let data = vec![0x5au8; block];
    let blocks = LUN_SIZE / block as u64;
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    rt.block_on(async {
        let mut lanes = Vec::new();
        for lane in 0..depth {
            let (a, data) = (a.clone(), data.clone());
            lanes.push(async move {
                let mut x = lane.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..writes / depth {
                    // xorshift: a cheap, repeatable random block
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % blocks) * block as u64;
                    a.write(0, off, &data).await.expect("write");
                }
            });
        }
        futures::future::join_all(lanes).await;
    });
    let took = started.elapsed();
    let cpu = process_cpu_seconds() - cpu_before;
    let done = writes / depth * depth;
    // CPU counts every thread of the process: the writer, persisters, flushers and, for tcp,
    // both nodes and both ends of the link (what a mirrored write costs the pair).
    println!(
        "{mode}: {done} x {block_kib} KiB writes at QD{depth} in {:.2} s: {:.1} us per write, {:.0} IOPS, {:.1} us CPU per write",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / done as f64,
        done as f64 / took.as_secs_f64(),
        cpu * 1e6 / done as f64
    );
    a.shutdown();
}

/// User + system CPU time of the whole process so far.
fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF cannot fail.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// What a record's checksum and one copy of its data cost here, per block.
fn per_block_costs(block: usize) {
    let data = vec![0xa5u8; block];
    let mut copy = vec![0u8; block];
    let rounds = (64 << 20) / block;
    let started = Instant::now();
    let mut crc = 0;
    for _ in 0..rounds {
        crc ^= rdma_link::checksum::crc32c(std::hint::black_box(&data));
    }
    let crc_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        copy.copy_from_slice(std::hint::black_box(&data));
        std::hint::black_box(&copy);
    }
    let copy_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    // The link's frame MAC (keyed BLAKE3), computed by the sender and checked by the receiver.
    let started = Instant::now();
    let mut tag = 0u8;
    for _ in 0..rounds {
        tag ^= blake3::keyed_hash(&[7; 32], std::hint::black_box(&data)).as_bytes()[0];
    }
    let mac_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "per {} KiB block: crc32c {crc_us:.1} us ({:.0} MB/s; {}), copy {copy_us:.1} us ({:.0} MB/s), frame MAC (BLAKE3) {mac_us:.1} us ({:.0} MB/s) [{crc:x}{tag:x}]",
        block >> 10,
        block as f64 / crc_us,
        rdma_link::checksum::choice(),
        block as f64 / copy_us,
        block as f64 / mac_us
    );
}

/// `held-reads`: node a writes WRITES random 4 KiB blocks with its flusher paused, so node b's
/// second store holds every one of them; then node b serves 4 KiB reads from what it holds
/// (`SecondStoreArea::read_held`, what a local read under a read lease does before it reads
/// its medium). Prints the time per read against the number of records held.
fn held_reads(writes: u64) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let a = engine(&dir.path().join("nv-a"), "a", &medium, true);
    let b = engine(&dir.path().join("nv-b"), "b", &medium, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _links = mirror_pair(&a, &b, &rt, true);
    a.set_flush_paused(true);
    const BLOCK: u64 = 4096;
    let blocks = LUN_SIZE / BLOCK;
    let data = vec![0x5au8; BLOCK as usize];
    let next = |x: &mut u64| {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x % blocks) * BLOCK
    };
    rt.block_on(async {
        let lanes = (0..32u64).map(|lane| {
            let (a, data) = (a.clone(), data.clone());
            async move {
                let mut x = lane.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..writes / 32 {
                    let off = next(&mut x);
                    a.write(0, off, &data).await.expect("write");
                }
            }
        });
        futures::future::join_all(lanes).await;
    });
    let store = b.second_store().expect("mirrored layout");
    // What `cluster.local_reads` switches on (its read leases need an arbiter; here the
    // reads go to the store directly). NVM_HELD_UNINDEXED=1 measures the plain scan.
    store.index_for_reads(std::env::var_os("NVM_HELD_UNINDEXED").is_none());
    let held = store.status().records;
    let ranges = 4u64;
    let range_size = LUN_SIZE / ranges;
    let mut out = vec![0u8; BLOCK as usize];
    let reads: u64 = std::env::var("NVM_HELD_READS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut found = 0u64;
    let started = Instant::now();
    for _ in 0..reads {
        let off = next(&mut x);
        let partition = nvmirror::config::partition_of_range((off / range_size) as u32, 4);
        match store.read_held(partition, 0, off, &mut out) {
            nvmirror::mirror::HeldRead::Gaps(g) if g.is_empty() => found += 1,
            _ => {}
        }
    }
    let took = started.elapsed();
    println!(
        "held-reads: {reads} reads of 4 KiB from {held} held records ({found} served whole from them): {:.2} us per read",
        took.as_secs_f64() * 1e6 / reads as f64
    );
    a.set_flush_paused(false);
    a.shutdown();
    b.shutdown();
}
