//! Engine tests without root: a file NVRAM in a temp dir and in-memory media.

use nvmirror::engine::{Engine, EngineError, EngineOptions, LunSpec, OpenMode};
use nvmirror::medium::MemMedium;
use nvmirror::nvram::NvramRegion;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const LUN_SIZE: u64 = 64 * MIB;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(
    nvram: &Path,
    nvram_size: u64,
    medium: &Arc<MemMedium>,
    node: &str,
    mode: OpenMode,
) -> Result<Arc<Engine>, EngineError> {
    let flush = nvmirror::flusher::FlushPolicy {
        batch_bytes: 4 * MIB,
        linger: std::time::Duration::from_millis(10),
    };
    open_with(nvram, nvram_size, medium, node, mode, flush)
}

fn open_with(
    nvram: &Path,
    nvram_size: u64,
    medium: &Arc<MemMedium>,
    node: &str,
    mode: OpenMode,
    flush: nvmirror::flusher::FlushPolicy,
) -> Result<Arc<Engine>, EngineError> {
    let region = NvramRegion::open(nvram, Some(nvram_size))?;
    Engine::open(
        region,
        EngineOptions {
            flush,
            mode,
            ..EngineOptions::single_node(node, 2)
        },
        vec![LunSpec {
            name: "lun0".into(),
            size: LUN_SIZE,
            ranges: 4,
            medium: medium.clone(),
        }],
    )
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read(e: &Engine, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(0, off, &mut buf).expect("read");
    buf
}

#[test]
fn staged_writes_read_back_and_reach_the_medium() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("open");
    e.set_flush_paused(true);
    let rt = rt();
    let a = pattern(1, 16384);
    let b = pattern(2, 4096);
    rt.block_on(e.write(0, 8192, &a)).expect("write a");
    rt.block_on(e.write(0, 12288, &b))
        .expect("write b overlaps a");
    // Staged: reads see the overlay, the medium has nothing yet.
    let got = read(&e, 8192, 16384);
    assert_eq!(&got[..4096], &a[..4096]);
    assert_eq!(&got[4096..8192], &b[..]);
    assert_eq!(&got[8192..], &a[8192..]);
    assert!(medium.snapshot()[8192..8192 + 16384]
        .iter()
        .all(|&x| x == 0));

    e.set_flush_paused(false);
    assert!(e.drain_blocking(Duration::from_secs(10)), "drain");
    let m = medium.snapshot();
    assert_eq!(&m[8192..8192 + 16384], &got[..]);
    assert_eq!(read(&e, 8192, 16384), got);
    let st = e.status();
    assert_eq!(st.luns[0].staged_extents, 0);
    assert!(st.partitions.iter().all(|p| p.used_bytes == 0));
}

/// Writers wake the lingering flusher only when their batch could end the linger: a lone
/// small write stays staged through it, a batch that grows to a quarter of the flush batch
/// size is flushed at once, not when the linger ends.
#[test]
fn a_batch_that_grows_ends_the_flushers_linger_early() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let flush = nvmirror::flusher::FlushPolicy {
        batch_bytes: 256 * 1024,
        linger: Duration::from_secs(20),
    };
    let e = open_with(
        &dir.path().join("nvram"),
        16 * MIB,
        &medium,
        "a",
        OpenMode::Normal,
        flush,
    )
    .expect("open");
    let rt = rt();
    let started = std::time::Instant::now();
    let first = pattern(7, 4096);
    rt.block_on(e.write(0, 0, &first)).expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        medium.snapshot()[..4096].iter().all(|&x| x == 0),
        "a lone small write waits for the linger"
    );
    // 16 more 4 KiB records in the same partition: the log holds over 64 KiB.
    let more = pattern(8, 4096);
    for i in 1..=16u64 {
        rt.block_on(e.write(0, i * 4096, &more)).expect("write");
    }
    // The batch that crossed the quarter is flushed (the first write with it); what came
    // after it may linger again.
    while medium.snapshot()[..4096] != first[..] {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the grown batch was not flushed before the 20 s linger: {:?}",
            e.status().partitions
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn write_crossing_a_range_boundary_spans_two_partitions() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(
        &dir.path().join("nv"),
        16 * MIB,
        &medium,
        "a",
        OpenMode::Normal,
    )
    .expect("open");
    e.set_flush_paused(true);
    let boundary = LUN_SIZE / 4;
    let data = pattern(3, 65536);
    rt().block_on(e.write(0, boundary - 32768, &data))
        .expect("write");
    let st = e.status();
    assert!(
        st.partitions.iter().all(|p| p.records_unflushed == 1),
        "{st:?}"
    );
    assert_eq!(read(&e, boundary - 32768, 65536), data);
}

#[test]
fn unflushed_records_are_replayed_at_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let mut expect = Vec::new();
    {
        let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("open");
        e.set_flush_paused(true);
        let rt = rt();
        for i in 0..50u64 {
            let off = (i * 7919 % 1000) * 4096;
            let data = pattern(i, 4096 * (1 + (i as usize % 3)));
            rt.block_on(e.write(0, off, &data)).expect("write");
            expect.push((off, data));
        }
        e.shutdown();
    }
    assert!(
        medium.snapshot().iter().all(|&b| b == 0),
        "nothing flushed before the crash"
    );
    let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("reopen");
    assert_eq!(e.status().replay.records, 50);
    let mut model = vec![0u8; LUN_SIZE as usize];
    for (off, d) in &expect {
        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    assert_eq!(
        medium.snapshot(),
        model,
        "replay applied every write in order"
    );
    assert_eq!(read(&e, 0, 8 * MIB as usize), model[..8 * MIB as usize]);
}

#[test]
fn back_pressure_completes_more_data_than_the_nvram_holds() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    // 2 partitions of ~2.1 MiB each; write 24 MiB.
    let size = nvmirror::nvram::Layout::metadata_bytes(2)
        + 2 * nvmirror::nvram::layout::MIN_PARTITION_BYTES;
    let e = open(&dir.path().join("nv"), size, &medium, "a", OpenMode::Normal).expect("open");
    let rt = rt();
    let mut model = vec![0u8; LUN_SIZE as usize];
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..96u64 {
            let off = (i * 37 % 200) * 65536 + (i % 4) * 4096;
            let data = pattern(100 + i, 256 * 1024);
            if off as usize + data.len() > model.len() {
                continue;
            }
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            tasks.push((off, data));
        }
        // Sequential writes keep the model's order meaningful for overlaps.
        for (off, data) in &tasks {
            e.write(0, *off, data)
                .await
                .expect("write under back-pressure");
        }
    });
    assert!(e.drain_blocking(Duration::from_secs(30)));
    assert_eq!(medium.snapshot(), model);
    assert!(e.status().bytes_flushed >= 20 * MIB);
}

#[test]
fn write_zeroes_reads_as_zero_before_and_after_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(
        &dir.path().join("nv"),
        16 * MIB,
        &medium,
        "a",
        OpenMode::Normal,
    )
    .expect("open");
    let rt = rt();
    rt.block_on(e.write(0, 0, &pattern(9, 65536)))
        .expect("write");
    assert!(e.drain_blocking(Duration::from_secs(10)));
    e.set_flush_paused(true);
    rt.block_on(e.write_zeroes(0, 4096, 8192)).expect("zero");
    let got = read(&e, 0, 65536);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&got[..4096], &pattern(9, 65536)[..4096]);
    e.set_flush_paused(false);
    assert!(e.drain_blocking(Duration::from_secs(10)));
    assert!(medium.snapshot()[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(read(&e, 0, 65536), got);
}

#[test]
fn flipped_byte_in_an_acknowledged_record_refuses_start_and_salvage_recovers() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let first_data_off;
    {
        let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("open");
        e.set_flush_paused(true);
        let rt = rt();
        // All in range 0 -> partition 0.
        for i in 0..10u64 {
            rt.block_on(e.write(0, i * 4096, &pattern(i, 4096)))
                .expect("write");
        }
        let layout_base = nvmirror::nvram::Layout::compute(16 * MIB, 2, false)
            .expect("layout")
            .partition_base(0);
        first_data_off = layout_base + 64 + 100;
        e.shutdown();
    }
    flip_byte(&nv, first_data_off);
    let err = match open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal) {
        Ok(_) => panic!("a corrupt acknowledged record must refuse the start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("seq 1") && err.contains("nvmirrorctl nvram salvage"),
        "{err}"
    );
    assert!(
        medium.snapshot().iter().all(|&b| b == 0),
        "nothing replayed on refusal"
    );

    let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Salvage).expect("salvage");
    assert!(e.status().replay.salvaged_from_corruption);
    drop(e);
    // After a salvage the log is fresh and starts normally.
    open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("normal start after salvage");
}

fn flip_byte(path: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read");
    b[0] ^= 0x5a;
    f.write_all_at(&b, off).expect("write");
}

#[test]
fn foreign_and_other_nodes_nvram_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    drop(open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("format"));
    let err = open(&nv, 16 * MIB, &medium, "b", OpenMode::Normal)
        .err()
        .expect("other node refused")
        .to_string();
    assert!(
        err.contains("belongs to node \"a\"") && err.contains("nvram format"),
        "{err}"
    );

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"XFSB not ours").expect("write");
    let err = open(&foreign, 16 * MIB, &medium, "a", OpenMode::Normal)
        .err()
        .expect("foreign refused")
        .to_string();
    assert!(err.contains("not an nvmirror log"), "{err}");
    // Format mode is the explicit override.
    open(&foreign, 16 * MIB, &medium, "a", OpenMode::Format).expect("forced format");
}

#[test]
fn layout_change_with_staged_records_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    {
        let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("open");
        e.set_flush_paused(true);
        rt().block_on(e.write(0, 0, &pattern(1, 4096)))
            .expect("write");
        e.shutdown();
    }
    let region = NvramRegion::open(&nv, Some(16 * MIB)).expect("region");
    let err = Engine::open(
        region,
        EngineOptions::single_node("a", 2),
        vec![LunSpec {
            name: "lun0".into(),
            size: LUN_SIZE / 2,
            ranges: 4,
            medium: medium.clone(),
        }],
    )
    .err()
    .expect("layout change refused")
    .to_string();
    assert!(err.contains("another LUN layout"), "{err}");
}

#[test]
fn concurrent_random_writes_match_a_model_across_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let mut model = vec![0u8; LUN_SIZE as usize];
    for round in 0..3u64 {
        let e = open(&nv, 8 * MIB, &medium, "a", OpenMode::Normal).expect("open");
        assert_eq!(read(&e, 0, LUN_SIZE as usize), model, "round {round} start");
        if round == 1 {
            e.set_flush_paused(true);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("rt");
        // Disjoint blocks per task so the model is exact under concurrency.
        let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
            .map(|i| {
                let off = ((i * 104_729 + round * 13) % (LUN_SIZE / 4096 / 8)) * 8 * 4096;
                (
                    off,
                    pattern(round * 1000 + i, 4096 * (1 + (i % 8) as usize)),
                )
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let writes: Vec<_> = writes
            .into_iter()
            .filter(|(o, _)| seen.insert(*o))
            .collect();
        rt.block_on(async {
            let mut handles = Vec::new();
            for (off, data) in writes.clone() {
                let e = e.clone();
                handles.push(tokio::spawn(async move { e.write(0, off, &data).await }));
            }
            for h in handles {
                h.await.expect("join").expect("write");
            }
        });
        for (off, d) in &writes {
            model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        assert_eq!(
            read(&e, 0, LUN_SIZE as usize),
            model,
            "round {round} after writes"
        );
        e.shutdown();
    }
}

#[test]
fn an_interrupted_format_is_redone_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let nv = dir.path().join("nvram");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    drop(open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal).expect("format"));
    // A crash after the checkpoints were rewritten for a new log id, before the superblock:
    // no checkpoint matches the superblock's log any more.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&nv)
            .expect("open");
        for p in 0..2u64 {
            f.write_all_at(&[0u8; 4096], 4096 + p * 4096)
                .expect("zero checkpoints");
        }
    }
    let e = open(&nv, 16 * MIB, &medium, "a", OpenMode::Normal)
        .expect("start after an interrupted format");
    assert!(e.status().replay.formatted);
}

#[test]
fn example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            nvmirror::config::NodeConfig::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "found {n} example configs");
}

/// Reads the medium like the frontend's io_uring does: each gap is its own future, and
/// they complete out of order (the later one first).
struct OutOfOrderReads {
    calls: std::sync::atomic::AtomicUsize,
}

impl nvmirror::engine::MediumReads for OutOfOrderReads {
    async fn read(
        &self,
        medium: &dyn nvmirror::medium::Medium,
        out: &mut [u8],
        off: u64,
    ) -> std::io::Result<()> {
        let nth = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Even calls yield a few times before reading, so the gaps of one read finish in
        // another order than they were issued.
        for _ in 0..(if nth.is_multiple_of(2) { 3 } else { 0 }) {
            tokio::task::yield_now().await;
        }
        medium.read_at(out, off)
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Reads that straddle staged and flushed (unstaged) extents, and a range boundary,
    /// assemble the same bytes as a model, on both read paths (this thread, and gaps read
    /// concurrently and completed out of order).
    #[test]
    fn reads_straddling_staged_and_flushed_extents_match_a_model(
        flushed in proptest::collection::vec((0u64..96, 1u64..12), 1..12),
        staged in proptest::collection::vec((0u64..96, 1u64..12), 1..12),
        reads in proptest::collection::vec((0u64..96, 1u64..40), 1..12),
    ) {
        // 96 blocks around the boundary of ranges 0 and 1 (16 MiB).
        let base = LUN_SIZE / 4 - 48 * 4096;
        let dir = tempfile::tempdir().expect("tmp");
        let medium = Arc::new(MemMedium::new(LUN_SIZE));
        let e = open(&dir.path().join("nvram"), 16 * MIB, &medium, "a", OpenMode::Normal)
            .expect("open");
        let mut model = vec![0u8; 96 * 4096];
        let rt = rt();
        let write = |i: u64, (block, n): (u64, u64), model: &mut Vec<u8>| {
            let n = n.min(96 - block);
            let data = pattern(i, (n * 4096) as usize);
            rt.block_on(e.write(0, base + block * 4096, &data)).expect("write");
            model[(block * 4096) as usize..((block + n) * 4096) as usize].copy_from_slice(&data);
        };
        for (i, w) in flushed.iter().enumerate() {
            write(i as u64, *w, &mut model);
        }
        proptest::prop_assert!(rt.block_on(e.drain(Duration::from_secs(10))), "drained");
        e.set_flush_paused(true);
        for (i, w) in staged.iter().enumerate() {
            write(1000 + i as u64, *w, &mut model);
        }
        let ooo = OutOfOrderReads { calls: Default::default() };
        for &(block, n) in &reads {
            let n = n.min(96 - block);
            let (at, len) = (base + block * 4096, (n * 4096) as usize);
            let want = &model[(block * 4096) as usize..(block * 4096) as usize + len];
            proptest::prop_assert_eq!(&read(&e, at, len)[..], want, "blocking read at block {}", block);
            let mut got = vec![0u8; len];
            rt.block_on(e.read_routed_via(0, at, &mut got, &ooo)).expect("read");
            proptest::prop_assert_eq!(&got[..], want, "concurrent read at block {}", block);
        }
        e.set_flush_paused(false);
        e.shutdown();
    }
}

/// The metrics endpoint's text: the LUN's I/O (counters, bytes, the latency histogram), the
/// NVRAM partitions and the node, in OpenMetrics form (the VM test runs `promtool check
/// metrics` on a live daemon's scrape).
#[test]
fn a_scrape_shows_the_luns_io_and_the_nvram_in_openmetrics_text() {
    use nvmirror::io_latency::IoKind;
    use nvmirror::node::metrics;
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(
        &dir.path().join("nvram"),
        16 * MIB,
        &medium,
        "a",
        OpenMode::Normal,
    )
    .expect("open");
    e.set_flush_paused(true);
    rt().block_on(e.write(0, 0, &pattern(3, 8192)))
        .expect("write");
    let lat = &e.luns()[0].stats.latency;
    lat.of(IoKind::Write)
        .record(Duration::from_micros(30), true);
    lat.of(IoKind::Read).record(Duration::from_millis(2), false);
    let scrape = metrics::Scrape {
        status: nvmirror::control::DaemonStatus {
            version: "test".into(),
            pid: 1,
            config: "test.toml".into(),
            devices: Vec::new(),
            engine: e.status(),
            watchdog: None,
        },
        latency: metrics::latency_of(&e),
    };
    let text = metrics::encode(scrape.clone(), metrics::Format::OpenMetrics).expect("encode");
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        )
    };
    has(r#"# TYPE nvmirror_lun_ios counter"#);
    has(r#"nvmirror_lun_ios_total{lun="lun0",op="write"} 1"#);
    has(r#"nvmirror_lun_io_errors_total{lun="lun0",op="read"} 1"#);
    has(r#"nvmirror_lun_io_bytes_total{lun="lun0",op="write"} 8192"#);
    has(r#"# TYPE nvmirror_lun_io_latency_seconds histogram"#);
    has(r#"nvmirror_lun_io_latency_seconds_bucket{le="0.000025",lun="lun0",op="write"} 0"#);
    has(r#"nvmirror_lun_io_latency_seconds_bucket{le="0.00005",lun="lun0",op="write"} 1"#);
    has(r#"nvmirror_lun_io_latency_seconds_bucket{le="+Inf",lun="lun0",op="write"} 1"#);
    has(r#"nvmirror_lun_io_latency_seconds_count{lun="lun0",op="read"} 1"#);
    has(r#"nvmirror_lun_staged_bytes{lun="lun0"} 8192.0"#);
    has(r#"nvmirror_nvram_unflushed_records{partition="0"} 1.0"#);
    has(r#"nvmirror_flush_paused 1.0"#);
    has(r#"nvmirror_mirror_state{state="standalone"} 1.0"#);
    assert!(
        text.lines().any(|l| l
            .starts_with(r#"nvmirror_node_info{node="a",version="test",log_id=""#)
            && l.ends_with(r#"storage="single"} 1.0"#)),
        "no node_info line in:\n{text}"
    );
    assert_eq!(text.lines().last(), Some("# EOF"));
    // The classic text format (what curl and `promtool check metrics` get): the family is
    // named as its samples, and there is no `# EOF`.
    let classic = metrics::encode(scrape, metrics::Format::PrometheusText).expect("encode");
    assert!(classic.contains("# TYPE nvmirror_lun_ios_total counter\n"));
    assert!(classic.contains("nvmirror_lun_ios_total{lun=\"lun0\",op=\"write\"} 1\n"));
    assert!(!classic.contains("# EOF"));
    if let Ok(dump) = std::env::var("NVM_METRICS_DUMP") {
        std::fs::write(dump, &classic).expect("dump");
    }
}
