//! The block geometry every layer agrees on: the block size the device advertises and the
//! largest single I/O. A bottom module: it imports nothing of the crate.

/// Block size the device advertises (logical and physical). Every I/O is a multiple of it.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest single I/O the device accepts (the per-tag ublk buffer).
pub const MAX_IO_BYTES: u64 = 512 * 1024;
