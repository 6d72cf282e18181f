//! The engine's fuzz corpora, replayed on stable Rust: each test runs one fuzz target's body
//! (`nvmirror::fuzzing`) on every input kept in `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/` (see `docs/fuzzing.md`).

#[path = "../../fuzz/replay/mod.rs"]
mod replay;

use nvmirror::fuzzing;
use replay::replay;

#[test]
fn nvram_records_corpus() {
    replay("nvram_records", fuzzing::nvram_records);
}

#[test]
fn nvram_scan_corpus() {
    replay("nvram_scan", fuzzing::nvram_scan);
}

#[test]
fn ownership_table_corpus() {
    replay("ownership_table", fuzzing::ownership_table);
}

#[test]
fn config_corpus() {
    replay("config", fuzzing::config);
}

#[test]
fn forward_wire_corpus() {
    replay("forward_wire", fuzzing::forward_wire);
}

#[test]
fn register_wire_corpus() {
    replay("register_wire", fuzzing::register_wire);
}

/// The example configs (`examples/*.toml`, checked by `tests/engine.rs`): the seeds of the
/// config corpus.
fn example_configs() -> Vec<(String, String)> {
    let dir = replay::fuzz_dir().join("../examples");
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            out.push((name, text));
        }
    }
    out.sort();
    out
}

/// The seeds on disk are the ones the harness writes today.
#[test]
fn seed_corpus_is_current() {
    replay::check_seeds("nvram_records", fuzzing::seeds::nvram_records());
    replay::check_seeds("nvram_scan", fuzzing::seeds::nvram_scan());
    replay::check_seeds("ownership_table", fuzzing::seeds::ownership_table());
    replay::check_seeds("forward_wire", fuzzing::seeds::forward_wire());
    replay::check_seeds("register_wire", fuzzing::seeds::register_wire());
    let configs = example_configs()
        .into_iter()
        .map(|(name, text)| (name, text.into_bytes()))
        .collect();
    replay::check_seeds("config", configs);
}

/// Writes the seed inputs into the corpora: `cargo test -p ublk-target --test fuzz_corpus --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "writes into fuzz/corpus; run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    replay::write_seeds("nvram_records", fuzzing::seeds::nvram_records());
    replay::write_seeds("nvram_scan", fuzzing::seeds::nvram_scan());
    replay::write_seeds("ownership_table", fuzzing::seeds::ownership_table());
    replay::write_seeds("forward_wire", fuzzing::seeds::forward_wire());
    replay::write_seeds("register_wire", fuzzing::seeds::register_wire());
    let configs = example_configs()
        .into_iter()
        .map(|(name, text)| (name, text.into_bytes()))
        .collect();
    replay::write_seeds("config", configs);
}
