//! How the data path reads the medium: the part of a read that no staged write covers.
//!
//! The engine does not know how its caller waits for I/O. The ublk frontend reads on its
//! queue's io_uring, so a queue keeps many reads in flight and never blocks on one; the
//! simulator, the tests and the forwarded-read server read on their own thread.

use crate::medium::Medium;
use std::future::Future;
use std::io;

/// Reads `out.len()` bytes of `medium` at `off`. `out`, `off` and the length are 4 KiB-
/// aligned (the device's logical block size), as O_DIRECT needs.
pub trait MediumReads {
    fn read(
        &self,
        medium: &dyn Medium,
        out: &mut [u8],
        off: u64,
    ) -> impl Future<Output = io::Result<()>>;
}

/// Reads with `Medium::read_at`, on the calling thread.
pub struct BlockingMediumReads;

impl MediumReads for BlockingMediumReads {
    async fn read(&self, medium: &dyn Medium, out: &mut [u8], off: u64) -> io::Result<()> {
        medium.read_at(out, off)
    }
}
