//! Raw memory regions shared with the engine (its NVRAM mapping).

use crate::error::LinkError;
use std::ptr::NonNull;

/// A byte range of memory the link reads records from (the first store) or writes records into
/// (the second store): normally the engine's mmap of its NVRAM device.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region is only an address range; `Region::new`'s contract makes the memory valid for
// the link's whole life from any thread, and the link never hands out overlapping `&mut` slices
// (the receive path writes one record at a time, in the single task of the connection).
unsafe impl Send for Region {}
// SAFETY: see `Send`; shared use only reads the pointer value.
unsafe impl Sync for Region {}

impl Region {
    /// Wrap `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as any [`crate::Link`] built
    /// with it (or its background tasks) exists — i.e. until [`crate::Link::shutdown`] returned,
    /// or for the rest of the process (an NVRAM mapping usually is). While a post is in flight
    /// the engine must not modify its source bytes; the link must be the only writer of a second
    /// store range a peer is sending into.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Result<Region, LinkError> {
        let ptr =
            NonNull::new(ptr).ok_or_else(|| LinkError::Config("region pointer is null".into()))?;
        if len == 0 || len > isize::MAX as usize {
            return Err(LinkError::Config(format!(
                "region length {len} is not usable"
            )));
        }
        Ok(Region { ptr, len })
    }

    /// A zeroed heap region that lives for the rest of the process (tests and the linktest tool).
    pub fn leaked(len: usize) -> Region {
        let buf: &'static mut [u8] = Box::leak(vec![0u8; len.max(1)].into_boxed_slice());
        Region {
            ptr: NonNull::from(&mut buf[0]),
            len: buf.len(),
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn check(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// Read access to `[offset, offset+len)`.
    ///
    /// # Safety
    /// No one may write the range while the returned slice is alive (the post contract).
    pub(crate) unsafe fn slice(&self, offset: u64, len: usize) -> Option<&[u8]> {
        if !self.check(offset, len as u64) {
            return None;
        }
        // SAFETY: in bounds (checked above) and valid per `Region::new`'s contract; the caller
        // guarantees no concurrent writer.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset as usize), len) })
    }

    /// Write access to `[offset, offset+len)`.
    ///
    /// # Safety
    /// No other reference to the range may be alive while the returned slice is, and the slice
    /// must not outlive the region's validity (the lifetime is chosen by the caller).
    pub(crate) unsafe fn slice_mut<'a>(&self, offset: u64, len: usize) -> Option<&'a mut [u8]> {
        if !self.check(offset, len as u64) {
            return None;
        }
        // SAFETY: in bounds (checked above), valid per `Region::new`; exclusivity is the caller's.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset as usize), len) })
    }

    /// Copy out (tests, verification in the linktest tool).
    pub fn read_bytes(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        // SAFETY: a momentary read for a copy; concurrent writes would only give torn bytes.
        unsafe { self.slice(offset, len).map(<[u8]>::to_vec) }
    }

    /// Copy in (tests and the linktest tool fill the first store with this).
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> bool {
        // SAFETY: the range is in bounds; callers use it only on ranges not in flight.
        match unsafe { self.slice_mut(offset, data.len()) } {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}
