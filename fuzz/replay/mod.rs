//! Replay of the fuzz corpora on stable Rust, shared by the `fuzz_corpus` tests of
//! `ublk-target` and `rdma-link` (included with `#[path]`): every input of
//! `fuzz/corpus/<target>/` and every crash kept as a regression in `fuzz/artifacts/<target>/`
//! goes through the same function the fuzz target runs.

use std::path::{Path, PathBuf};

/// The `fuzz/` directory of the repository.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs `target`'s body on each of its inputs; fails naming every input that panics.
pub fn replay(target: &str, run: fn(&[u8])) {
    let mut inputs = 0usize;
    let mut failed = Vec::new();
    for kind in ["corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            // Artifacts exist only for targets whose crashes are kept as regressions.
            assert_ne!(kind, "corpus", "no corpus at {}", dir.display());
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            inputs += 1;
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(inputs > 0, "fuzz target {target} has no inputs");
    assert!(
        failed.is_empty(),
        "{} of {inputs} inputs of fuzz target {target} fail: {failed:#?}",
        failed.len()
    );
}

/// Writes seeds into `fuzz/corpus/<target>/seed-<name>`.
pub fn write_seeds(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// Checks that `fuzz/corpus/<target>/` holds exactly these seeds (`seed-<name>`, byte for
/// byte): a seed written for an older format would still replay without a panic, but would no
/// longer reach what its name says.
pub fn check_seeds(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut problems = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (name, bytes) in seeds {
        let file = format!("seed-{name}");
        match std::fs::read(dir.join(&file)) {
            Ok(on_disk) if on_disk == bytes => {}
            Ok(_) => problems.push(format!("{file} differs")),
            Err(e) => problems.push(format!("{file}: {e}")),
        }
        names.insert(file);
    }
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with("seed-") && !names.contains(&file) {
            problems.push(format!("{file} is no longer a seed"));
        }
    }
    assert!(
        problems.is_empty(),
        "the seeds of {target} are stale (rewrite them with the ignored test \
         write_seed_corpus): {problems:#?}"
    );
}
