//! NVRAM in process memory, with the durability of a real NVDIMM made visible: what was
//! persisted is kept apart from what was only stored, so a simulated power cut can keep
//! exactly the persisted bytes and tear the rest. The engine sees it as any other
//! [`super::NvramRegion`] (`NvramRegion::in_memory`); the deterministic simulator owns it
//! across a node's crashes and restarts.

use std::sync::{Mutex, MutexGuard};

/// Bytes per unit a power cut keeps or loses as a whole (a CPU cache line).
pub const CACHE_LINE: usize = 64;

pub struct MemoryNvram {
    name: String,
    /// What the CPU stored: the engine and the mirror link read and write through this
    /// pointer (a leaked allocation of `len` bytes, freed on drop).
    current: *mut u8,
    len: usize,
    /// What a power cut keeps: updated by `persist`.
    durable: Mutex<Vec<u8>>,
}

// SAFETY: `current` is a plain heap allocation owned by this value; concurrent access to it
// follows the same discipline as a shared mapping (see `NvramRegion`'s Sync impl), and
// `durable` is behind a lock.
unsafe impl Send for MemoryNvram {}
unsafe impl Sync for MemoryNvram {}

impl MemoryNvram {
    /// A blank (zeroed) NVRAM of `len` bytes; `name` stands in for its path in messages.
    pub fn new(name: &str, len: usize) -> MemoryNvram {
        let current = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
        MemoryNvram {
            name: name.to_owned(),
            current,
            len,
            durable: Mutex::new(vec![0u8; len]),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.current
    }

    fn durable(&self) -> MutexGuard<'_, Vec<u8>> {
        self.durable.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> &[u8] {
        // SAFETY: `current` points to `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.current, self.len) }
    }

    /// Makes `[off, off+len)` durable (the caller checked the bounds).
    pub(crate) fn persist(&self, off: usize, len: usize) {
        let src = &self.current()[off..off + len];
        self.durable()[off..off + len].copy_from_slice(src);
    }

    /// A power cut: every cache line that was persisted keeps its persisted bytes; a line
    /// stored but not persisted comes back with its new or its old contents, as
    /// `keep_new(line_index)` decides (the CPU may or may not have evicted it). Returns the
    /// number of unpersisted lines and how many of them survived.
    pub fn power_cut(&self, mut keep_new: impl FnMut(usize) -> bool) -> (usize, usize) {
        let mut durable = self.durable();
        // SAFETY: `current` points to `len` bytes owned by self; nothing else runs while a
        // node is powered off (its engine is gone).
        let current = unsafe { std::slice::from_raw_parts_mut(self.current, self.len) };
        let (mut dirty, mut kept) = (0, 0);
        for (i, (cur, dur)) in current
            .chunks_mut(CACHE_LINE)
            .zip(durable.chunks_mut(CACHE_LINE))
            .enumerate()
        {
            if cur != dur {
                dirty += 1;
                if keep_new(i) {
                    kept += 1;
                    dur.copy_from_slice(cur);
                } else {
                    cur.copy_from_slice(dur);
                }
            }
        }
        (dirty, kept)
    }
}

impl Drop for MemoryNvram {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` as a boxed slice of `len` bytes.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.current,
                self.len,
            )))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_keeps_persisted_lines_and_tears_the_rest() {
        let m = MemoryNvram::new("test", 4 * CACHE_LINE);
        // SAFETY: inside the allocation.
        let write = |off: usize, b: u8| unsafe { *m.ptr().add(off) = b };
        write(0, 1);
        m.persist(0, CACHE_LINE);
        write(CACHE_LINE, 2);
        write(2 * CACHE_LINE, 3);
        let (dirty, kept) = m.power_cut(|line| line == 2);
        assert_eq!((dirty, kept), (2, 1));
        assert_eq!(m.current()[0], 1, "persisted line kept");
        assert_eq!(m.current()[CACHE_LINE], 0, "unpersisted line lost");
        assert_eq!(
            m.current()[2 * CACHE_LINE],
            3,
            "unpersisted line that happened to survive"
        );
    }
}
