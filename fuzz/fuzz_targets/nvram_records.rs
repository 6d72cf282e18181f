//! Fuzz target `nvram_records`: the body is `nvmirror::fuzzing::nvram_records` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::nvram_records(data));
