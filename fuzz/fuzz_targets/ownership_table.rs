//! Fuzz target `ownership_table`: the body is `nvmirror::fuzzing::ownership_table` (replayed by
//! `ublk-target/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmirror::fuzzing::ownership_table(data));
