//! Fuzz target `register_wire`: the body is `nvmirror::fuzzing::register_wire` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::register_wire(data));
