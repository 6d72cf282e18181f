//! Log shipping's return (claim set C, docs/log-shipping.md): a source takes its volume back
//! from the destination's image, copying only the blocks that differ, refuses an image longer
//! than its LUN, and a source that hears its volume was exported stops serving it. The
//! destination is played by a closure over an in-memory image, answering as
//! `node::destination` does.

use nvmirror::cluster::wire;
use nvmirror::engine::{Engine, EngineOptions, LunSpec};
use nvmirror::medium::MemMedium;
use nvmirror::nvram::NvramRegion;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const LUN_SIZE: u64 = 8 * MIB;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(nvram: &Path, medium: &Arc<MemMedium>) -> Arc<Engine> {
    let region = NvramRegion::open(nvram, Some(16 * MIB)).expect("nvram");
    Engine::open(
        region,
        EngineOptions::single_node("src1", 2),
        vec![LunSpec {
            name: "lun0".into(),
            size: LUN_SIZE,
            ranges: 2,
            medium: medium.clone(),
        }],
    )
    .expect("open")
}

/// The destination's answers about `image`, as `node::destination` gives them to a source
/// taking its volume back; every request is counted in `asked`.
fn destination(
    image: Vec<u8>,
    asked: Arc<Mutex<Vec<u8>>>,
) -> impl Fn(Vec<u8>) -> std::future::Ready<Result<Vec<u8>, String>> {
    move |req| {
        let r = wire::decode(&req).expect("a well-formed request");
        asked.lock().expect("lock").push(r.op);
        let span = |off: u64, len: u32| -> Vec<u8> {
            let mut out = vec![0u8; len as usize];
            let from = (off as usize).min(image.len());
            let to = (off as usize + len as usize).min(image.len());
            out[..to - from].copy_from_slice(&image[from..to]);
            out
        };
        std::future::ready(Ok(match r.op {
            wire::OP_IMAGE_LEN => wire::ok(&(image.len() as u64).to_le_bytes()),
            wire::OP_VERIFY_DIGESTS => wire::ok(&nvmirror::engine::digests(&span(r.offset, r.len))),
            wire::OP_READ_MEDIUM => wire::ok(&span(r.offset, r.len)),
            op => wire::err(&format!("op {op} is not asked while taking back")),
        }))
    }
}

#[test]
fn taking_back_copies_only_the_blocks_that_differ_and_then_the_medium_is_the_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(&dir.path().join("nvram"), &medium);
    let rt = rt();
    // Our volume at the export: 1 MiB of writes; the images' node then rewrote three blocks
    // (one of them past what we ever wrote) and the image ends there, short of the LUN.
    let ours: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    rt.block_on(e.write(0, 0, &ours)).expect("write");
    assert!(e.drain_blocking(Duration::from_secs(10)), "drain");
    let mut image = ours.clone();
    image.resize(3 * MIB as usize, 0);
    for (block, fill) in [(3usize, 0xa1u8), (200, 0xb2), (700, 0xc3)] {
        image[block * 4096..(block + 1) * 4096].fill(fill);
    }
    let asked = Arc::new(Mutex::new(Vec::new()));
    let t = rt
        .block_on(e.take_back_lun(0, &destination(image.clone(), asked.clone())))
        .expect("take back");
    assert_eq!(t.compared_bytes, LUN_SIZE);
    assert_eq!(
        t.copied_bytes,
        3 * 4096,
        "only the three changed blocks cross"
    );
    assert_eq!(t.copied_extents, 3);
    let m = medium.snapshot();
    assert_eq!(&m[..image.len()], &image[..]);
    assert!(
        m[image.len()..].iter().all(|&b| b == 0),
        "past the image: zeros"
    );
    let reads = asked
        .lock()
        .expect("lock")
        .iter()
        .filter(|&&op| op == wire::OP_READ_MEDIUM)
        .count();
    assert_eq!(reads, 3);
    // Taken back again, nothing differs.
    let t = rt
        .block_on(e.take_back_lun(0, &destination(image, asked)))
        .expect("take back again");
    assert_eq!(t.copied_bytes, 0);
}

#[test]
fn an_image_longer_than_the_lun_is_refused_before_anything_is_copied() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(&dir.path().join("nvram"), &medium);
    let image = vec![0x5a; LUN_SIZE as usize + 4096];
    let asked = Arc::new(Mutex::new(Vec::new()));
    let err = rt()
        .block_on(e.take_back_lun(0, &destination(image, asked.clone())))
        .expect_err("an image longer than the LUN");
    assert!(
        err.contains("longer than the LUN here") && err.contains(&format!("{}", LUN_SIZE + 4096)),
        "{err}"
    );
    assert_eq!(*asked.lock().expect("lock"), vec![wire::OP_IMAGE_LEN]);
    assert!(medium.snapshot().iter().all(|&b| b == 0), "nothing copied");
}

#[test]
fn a_source_whose_volume_was_exported_stops_serving_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let medium = Arc::new(MemMedium::new(LUN_SIZE));
    let e = open(&dir.path().join("nvram"), &medium);
    let rt = rt();
    rt.block_on(e.write(0, 0, &[7u8; 4096]))
        .expect("write before");
    e.stop_serving_volume("the destination says it exported our volume");
    let err = rt
        .block_on(e.write(0, 4096, &[8u8; 4096]))
        .expect_err("a write after the export");
    assert!(format!("{err}").contains("exported our volume"), "{err}");
    let mut buf = vec![0u8; 4096];
    let err = e.read(0, 0, &mut buf).expect_err("a read after the export");
    assert!(format!("{err}").contains("exported our volume"), "{err}");
    assert!(e.status().partitions.iter().all(|p| p
        .failed
        .as_deref()
        .is_some_and(|f| f.contains("exported our volume"))));
}
