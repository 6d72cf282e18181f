//! Fuzz target `link_frames`: the body is `rdma_link::fuzzing::link_frames` (replayed by
//! `rdma-link/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rdma_link::fuzzing::link_frames(data));
