//! Fuzz target `nvram_scan`: the body is `nvmirror::fuzzing::nvram_scan` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::nvram_scan(data));
