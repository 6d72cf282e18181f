//! Fuzz target `config`: the body is `nvmirror::fuzzing::config` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::config(data));
