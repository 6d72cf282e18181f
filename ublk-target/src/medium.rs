//! The storage medium behind a LUN: a file or block device.
//!
//! Writes come only from `apply` (the flusher and the replays), in sequence order, with
//! O_DIRECT, and are made durable with one `sync` per batch. O_DIRECT because a write must
//! have reached the device when it returns: a buffered one could sit in the page cache and
//! land long after this node lost its lease (even after the process died), over what the
//! node that took the range over wrote since. Reads use O_DIRECT too, so they always see what
//! is on the device, never a stale cached page.

use crate::medium_writes::WriteInFlight;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What the engine needs from a medium; tests use an in-memory one.
pub trait Medium: Send + Sync {
    fn size(&self) -> u64;
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()>;
    /// Writes that may be in flight together (none overlaps another; the order among them
    /// does not matter): all are done, or one error is returned, when this returns.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        writes
            .iter()
            .try_for_each(|&(off, data)| self.write_at(data, off))
    }
    /// `out` is 4 KiB-aligned in address and length when it comes from the device path.
    fn read_at(&self, out: &mut [u8], off: u64) -> io::Result<()>;
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    fn describe(&self) -> String;
    /// The file descriptor, opened with O_DIRECT, that reads may be issued on asynchronously
    /// (io_uring) with 4 KiB-aligned buffers, offsets and lengths; None: only `read_at`.
    fn direct_read_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MediumError {
    #[error("cannot open storage medium {path}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
    #[error("storage medium {path} is {actual} bytes, smaller than the LUN size {wanted}; grow it or set a smaller lun size")]
    TooSmall {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error(
        "storage medium {path} is {actual} bytes, not a multiple of 4096; set lun size explicitly"
    )]
    Unaligned { path: PathBuf, actual: u64 },
}

pub struct FileMedium {
    path: PathBuf,
    /// O_DIRECT for reads and writes.
    direct: File,
    size: u64,
    is_block: bool,
}

/// Alignment of O_DIRECT buffers, offsets and lengths (the device's block size at most).
const DIRECT_ALIGN: usize = 4096;

/// A zeroed, page-aligned buffer (what O_DIRECT writes from): an anonymous mapping, so
/// the kernel zeroes pages lazily and a large buffer costs only the pages actually used.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let len = len.max(1);
        // SAFETY: a fresh private anonymous mapping; no address hint, no fd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::NonNull::new(p.cast::<u8>())
            .map(|ptr| AlignedBuf { ptr, len })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: we own the `len` mapped (zero-initialised) bytes at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: we own the `len` mapped (zero-initialised) bytes at `ptr`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: mapped in `zeroed` with this length; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl FileMedium {
    pub fn open(path: &Path, size: Option<u64>) -> Result<FileMedium, MediumError> {
        let err = |source| MediumError::Open {
            path: path.to_owned(),
            cause: source,
        };
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(err)?;
        let meta = direct.metadata().map_err(err)?;
        let is_block = meta.file_type().is_block_device();
        let actual = if is_block {
            crate::nvram::region::block_device_size(&direct).map_err(err)?
        } else {
            meta.len()
        };
        let size = match size {
            Some(wanted) if wanted > actual => {
                return Err(MediumError::TooSmall {
                    path: path.to_owned(),
                    actual,
                    wanted,
                })
            }
            Some(wanted) => wanted,
            None if actual % crate::block::BLOCK_SIZE != 0 || actual == 0 => {
                return Err(MediumError::Unaligned {
                    path: path.to_owned(),
                    actual,
                })
            }
            None => actual,
        };
        Ok(FileMedium {
            path: path.to_owned(),
            direct,
            size,
            is_block,
        })
    }
}

impl Medium for FileMedium {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        let _in_flight = WriteInFlight::start();
        let aligned = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
        if aligned
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && off.is_multiple_of(DIRECT_ALIGN as u64)
        {
            return self.direct.write_all_at(data, off);
        }
        if !data.len().is_multiple_of(DIRECT_ALIGN) || !off.is_multiple_of(DIRECT_ALIGN as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write of {} bytes at {off} is not aligned to {DIRECT_ALIGN} bytes",
                    data.len()
                ),
            ));
        }
        // Record data sits after its header in the NVRAM: copy it to an aligned buffer.
        let mut buf = AlignedBuf::zeroed(data.len())?;
        buf.as_mut().copy_from_slice(data);
        self.direct.write_all_at(buf.as_mut(), off)
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let aligned = |&(off, data): &(u64, &[u8])| {
            (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
                && data.len().is_multiple_of(DIRECT_ALIGN)
                && off.is_multiple_of(DIRECT_ALIGN as u64)
        };
        if writes.len() < 2 || !writes.iter().all(aligned) {
            return writes
                .iter()
                .try_for_each(|&(off, data)| self.write_at(data, off));
        }
        let _in_flight = WriteInFlight::start();
        crate::medium_ring::write_all(self.direct.as_raw_fd(), writes)
    }

    fn read_at(&self, out: &mut [u8], off: u64) -> io::Result<()> {
        self.direct.read_exact_at(out, off)
    }

    fn direct_read_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.direct.as_raw_fd())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let _in_flight = WriteInFlight::start();
        // ZERO_RANGE works on block devices (it zeroes) and most filesystems; fall back to
        // writing zeroes where it is not supported (tmpfs, old filesystems).
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe {
            libc::fallocate(
                self.direct.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                let mut zeroes = AlignedBuf::zeroed(1 << 20)?;
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(1 << 20) as usize;
                    self.write_at(&zeroes.as_mut()[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }

    fn sync(&self) -> io::Result<()> {
        let _in_flight = WriteInFlight::start();
        // The writes are on the device already; this flushes its volatile cache.
        self.direct.sync_data()
    }

    fn describe(&self) -> String {
        format!(
            "{} ({})",
            self.path.display(),
            if self.is_block {
                "block device"
            } else {
                "file"
            }
        )
    }
}

/// A medium in memory, for tests and the simulator. It can be told to fail writes.
#[derive(Default)]
pub struct MemMedium {
    data: std::sync::Mutex<Vec<u8>>,
    pub fail_writes: std::sync::atomic::AtomicBool,
    pub syncs: std::sync::atomic::AtomicU64,
    /// Data writes (`write_at` calls) so far.
    pub writes: std::sync::atomic::AtomicU64,
}

impl MemMedium {
    pub fn new(size: u64) -> MemMedium {
        MemMedium {
            data: std::sync::Mutex::new(vec![0; size as usize]),
            ..Default::default()
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_fail(&self) -> io::Result<()> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl Medium for MemMedium {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.check_fail()?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut d = self.lock();
        d[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read_at(&self, out: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.lock();
        out.copy_from_slice(&d[off as usize..off as usize + out.len()]);
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.check_fail()?;
        let mut d = self.lock();
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.check_fail()?;
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More writes than the ring holds, in flight together on a real file with O_DIRECT,
    /// land where they were aimed.
    #[test]
    fn many_writes_in_flight_land_where_they_were_aimed() {
        // /tmp may be tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tmp dir");
        let path = dir.path().join("medium");
        const BLOCK: usize = 8192;
        const WRITES: usize = 80;
        std::fs::File::create(&path)
            .and_then(|f| f.set_len((2 * WRITES * BLOCK) as u64))
            .expect("medium file");
        let medium = FileMedium::open(&path, None).expect("open with O_DIRECT");
        let mut bufs: Vec<AlignedBuf> = (0..WRITES)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(BLOCK).expect("buffer");
                b.as_mut().fill(i as u8 + 1);
                b
            })
            .collect();
        // Every other block, so a misplaced write would show as a stray block.
        let writes: Vec<(u64, &[u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| ((2 * i * BLOCK) as u64, &*b.as_mut()))
            .collect();
        medium.write_many(&writes).expect("write_many");
        medium.sync().expect("sync");
        let mut back = AlignedBuf::zeroed(2 * WRITES * BLOCK).expect("buffer");
        medium.read_at(back.as_mut(), 0).expect("read");
        for (i, block) in back.as_mut().chunks(BLOCK).enumerate() {
            let want = if i % 2 == 0 { (i / 2) as u8 + 1 } else { 0 };
            assert!(block.iter().all(|&b| b == want), "block {i}");
        }
    }
}
