//! The link's fuzz corpora, replayed on stable Rust: each test runs one fuzz target's body
//! (`rdma_link::fuzzing`) on every input kept in `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/` (see `docs/fuzzing.md`).

#[path = "../../fuzz/replay/mod.rs"]
mod replay;

use rdma_link::fuzzing;
use replay::replay;

#[test]
fn link_frames_corpus() {
    replay("link_frames", fuzzing::link_frames);
}

#[test]
fn handshake_corpus() {
    replay("handshake", fuzzing::handshake);
}

/// The seeds named for an accepted handshake are accepted, the others refused: the harness
/// can reach both ends, so the fuzzer can too.
#[test]
fn handshake_seeds_reach_both_outcomes() {
    for (name, input) in fuzzing::seeds::handshake() {
        let accepted = fuzzing::seeds::handshake_accepts(&input);
        assert_eq!(accepted, name.ends_with("-accepts"), "seed {name}");
    }
}

/// The seeds on disk are the ones the harness writes today.
#[test]
fn seed_corpus_is_current() {
    replay::check_seeds("link_frames", fuzzing::seeds::link_frames());
    replay::check_seeds("handshake", fuzzing::seeds::handshake());
}

/// Writes the seed inputs into the corpora: `cargo test -p rdma-link --test fuzz_corpus --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "writes into fuzz/corpus; run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    replay::write_seeds("link_frames", fuzzing::seeds::link_frames());
    replay::write_seeds("handshake", fuzzing::seeds::handshake());
}
