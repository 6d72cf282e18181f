//! Fuzz target `forward_wire`: the body is `nvmirror::fuzzing::forward_wire` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::forward_wire(data));
