//! A memory mapping of the whole NVRAM device with explicit durability.
//!
//! Writes are plain memory copies into a shared mapping; `persist` makes a range durable:
//! - a file or a block device such as /dev/pmemN goes through the page cache, so persisting is
//!   msync(MS_SYNC) (a data sync for a file; for /dev/pmemN the pages are written back through
//!   the driver and the device cache is flushed);
//! - a device-DAX character device (/dev/daxN.M) maps the NVDIMM itself: persisting writes the
//!   CPU cache lines back (`cpu_cache`). It is also the NVRAM an RDMA device can register:
//!   Linux >= 6.5 refuses to pin page-cache mappings such as /dev/pmemN long-term.
//!
//! A process crash loses nothing that was copied, because the pages belong to the kernel (or
//! are the NVDIMM); a power cut loses what was not persisted, which is why a write is
//! acknowledged only after `persist`.

use super::memory::MemoryNvram;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot open NVRAM {path}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
    #[error(
        "NVRAM {path} does not exist; set nvram.size in the config so it can be created as a file"
    )]
    MissingSize { path: PathBuf },
    #[error("NVRAM {path} is {actual} bytes but nvram.size asks for {wanted}; use a size that fits or a bigger device")]
    TooSmall {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("NVRAM {path} is in use by another process ({errno}); is nvmirrord already running with it? Stop it first")]
    InUse {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("cannot map NVRAM {path} into memory: {cause}")]
    Map { path: PathBuf, cause: io::Error },
    #[error("NVRAM {path} is a character device but not a device-DAX one ({detail}); use /dev/daxN.M, /dev/pmemN, a block device or a file")]
    NotDax { path: PathBuf, detail: String },
    #[error("NVRAM {path}: nvram.size {wanted} is not a multiple of the device-DAX alignment {align}; use a multiple of it")]
    Unaligned {
        path: PathBuf,
        wanted: u64,
        align: u64,
    },
    #[error("NVRAM {path} is device-DAX, whose durability (CPU cache write-back) this build does not implement on this CPU architecture; use /dev/pmemN instead")]
    DaxUnsupported { path: PathBuf },
}

/// How `persist` makes stores durable (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Page-cache backed (file, block device): msync.
    Msync,
    /// Device-DAX: CPU cache-line write-back and a fence.
    CpuCacheWriteback,
    /// Process memory that tracks what was persisted (the simulator's NVRAM).
    Memory,
}

impl Durability {
    /// For logs: "msync", or the cache write-back with the instruction in use.
    pub fn describe(self) -> String {
        match self {
            Durability::Msync => "msync".into(),
            Durability::CpuCacheWriteback => format!(
                "CPU cache write-back ({}; device-DAX)",
                super::cpu_cache::instruction_name()
            ),
            Durability::Memory => "a persist in process memory (simulated NVRAM)".into(),
        }
    }
}

pub struct NvramRegion {
    path: PathBuf,
    /// The first byte of the mapping (or of the in-memory NVRAM).
    base: *mut u8,
    len: u64,
    durability: Durability,
    backing: Backing,
}

/// What holds the bytes.
enum Backing {
    /// A file or device mapped shared; the file is kept open (and locked) for the mapping's
    /// lifetime.
    Mapped {
        map: MmapRaw,
        _file: File,
        _lock: nix::fcntl::Flock<File>,
    },
    /// Process memory with explicit durability (the simulator's NVRAM).
    Memory(Arc<MemoryNvram>),
    /// A part of another region (a log-shipping destination's NVRAM area of one source),
    /// starting at `offset` in it.
    Window {
        parent: Arc<NvramRegion>,
        offset: u64,
    },
}

// SAFETY: the mapping is plain shared memory; all access goes through the bounds-checked
// copy methods below, and the engine's log discipline guarantees that no byte range is
// written by one thread while another reads or writes it (a range is written once, between
// its reservation and its publication, and reused only after every reader has let go).
unsafe impl Send for NvramRegion {}
unsafe impl Sync for NvramRegion {}

impl NvramRegion {
    /// Opens (and, for a missing file, creates) the NVRAM and maps `size` bytes of it
    /// (default: all of it).
    pub fn open(path: &Path, size: Option<u64>) -> Result<NvramRegion, RegionError> {
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(RegionError::MissingSize {
                path: path.to_owned(),
            });
        }
        let open_err = |source| RegionError::Open {
            path: path.to_owned(),
            cause: source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        // One process at a time: a second mapping (another daemon, or a ctl format/salvage
        // while the daemon runs) would corrupt the log.
        let lock = nix::fcntl::Flock::lock(
            file.try_clone().map_err(open_err)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, errno)| RegionError::InUse {
            path: path.to_owned(),
            errno,
        })?;
        let meta = file.metadata().map_err(open_err)?;
        let mut durability = Durability::Msync;
        // Device-DAX refuses a mapping whose length is not a multiple of its alignment.
        let mut map_align = 1;
        let actual = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(open_err)?
        } else if meta.file_type().is_char_device() {
            let dax = DaxDevice::probe(path, meta.rdev())?;
            if !super::cpu_cache::supported() {
                return Err(RegionError::DaxUnsupported {
                    path: path.to_owned(),
                });
            }
            if let Some(wanted) = size.filter(|w| w % dax.align != 0) {
                return Err(RegionError::Unaligned {
                    path: path.to_owned(),
                    wanted,
                    align: dax.align,
                });
            }
            durability = Durability::CpuCacheWriteback;
            map_align = dax.align;
            dax.size
        } else {
            meta.len()
        };
        let len = match size {
            Some(wanted) if wanted > actual => {
                if meta.file_type().is_file() {
                    // A file NVRAM is allocated up front so staging never hits ENOSPC later.
                    file.set_len(wanted).map_err(open_err)?;
                    allocate(&file, wanted).map_err(open_err)?;
                    wanted
                } else {
                    return Err(RegionError::TooSmall {
                        path: path.to_owned(),
                        actual,
                        wanted,
                    });
                }
            }
            Some(wanted) => wanted,
            None => actual - actual % map_align,
        };
        // Populated (MAP_POPULATE): every page is mapped now, so the write path never takes a
        // page fault on its first store into a log position or second-store slot.
        let map = MmapOptions::new()
            .len(len as usize)
            .populate()
            .map_raw(&file)
            .map_err(|source| RegionError::Map {
                path: path.to_owned(),
                cause: source,
            })?;
        Ok(NvramRegion {
            path: path.to_owned(),
            base: map.as_mut_ptr(),
            len,
            durability,
            backing: Backing::Mapped {
                map,
                _file: file,
                _lock: lock,
            },
        })
    }

    /// An NVRAM in process memory (see [`MemoryNvram`]); several regions may be opened over
    /// the same memory one after the other (a node's restarts).
    pub fn in_memory(memory: Arc<MemoryNvram>) -> NvramRegion {
        NvramRegion {
            path: PathBuf::from(memory.name()),
            base: memory.ptr(),
            len: memory.len() as u64,
            durability: Durability::Memory,
            backing: Backing::Memory(memory),
        }
    }

    /// The `len` bytes of `parent` from `offset` on, as a region of their own (offsets
    /// relative to `offset`); None if they do not lie inside `parent`.
    pub fn window(parent: &Arc<NvramRegion>, offset: u64, len: u64) -> Option<NvramRegion> {
        let end = offset.checked_add(len)?;
        if end > parent.len {
            return None;
        }
        Some(NvramRegion {
            path: parent.path.clone(),
            // SAFETY: offset + len lies inside the parent's mapping (checked above), which
            // lives as long as this window (it holds an Arc of the parent).
            base: unsafe { parent.base.add(offset as usize) },
            len,
            durability: parent.durability,
            backing: Backing::Window {
                parent: parent.clone(),
                offset,
            },
        })
    }

    /// How this NVRAM makes stores durable.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, len: usize) {
        // An out-of-bounds access is an engine bug, never input: stop before corrupting memory.
        assert!(
            off.checked_add(len as u64)
                .is_some_and(|end| end <= self.len),
            "NVRAM access {off}+{len} beyond {}",
            self.len
        );
    }

    /// Copies `data` into the NVRAM at `off` (not yet durable: see `persist`).
    pub fn write_at(&self, off: u64, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: bounds checked above; the range belongs to the caller exclusively (see the
        // Sync impl); source and destination cannot overlap (one is process heap or a ublk
        // buffer, the other the mapping).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off as usize), data.len())
        }
    }

    /// Copies NVRAM bytes at `off` into `out`.
    pub fn read_at(&self, off: u64, out: &mut [u8]) {
        self.check(off, out.len());
        // SAFETY: bounds checked above; nobody writes this range while it is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off as usize), out.as_mut_ptr(), out.len())
        }
    }

    /// A read-only view of NVRAM bytes, for writing them to the medium without a copy.
    pub fn slice(&self, off: u64, len: usize) -> &[u8] {
        self.check(off, len);
        // SAFETY: bounds checked above; the range is stable while the caller holds it
        // (the flusher releases log space only after its medium write returned).
        unsafe { std::slice::from_raw_parts(self.base.add(off as usize), len) }
    }

    /// Makes `[off, off+len)` durable on the NVRAM device.
    pub fn persist(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(off, len as usize);
        match (&self.backing, self.durability) {
            (Backing::Window { parent, offset }, _) => parent.persist(offset + off, len),
            (Backing::Memory(m), _) => {
                m.persist(off as usize, len as usize);
                Ok(())
            }
            (Backing::Mapped { map, .. }, Durability::Msync) => {
                map.flush_range(off as usize, len as usize)
            }
            // SAFETY: bounds checked above, so the range is inside the live mapping.
            (Backing::Mapped { .. }, _) => unsafe {
                super::cpu_cache::persist(self.base.add(off as usize), len as usize)
            },
        }
    }

    /// The mapping's base address and length, for registering it with an RDMA device.
    pub fn raw_parts(&self) -> (*mut u8, usize) {
        (self.base, self.len as usize)
    }
}

/// What sysfs says about a device-DAX character device.
pub(crate) struct DaxDevice {
    pub(crate) size: u64,
    pub(crate) align: u64,
}

impl DaxDevice {
    pub(crate) fn probe(path: &Path, rdev: u64) -> Result<DaxDevice, RegionError> {
        let not_dax = |detail: String| RegionError::NotDax {
            path: path.to_owned(),
            detail,
        };
        let sys = PathBuf::from(format!(
            "/sys/dev/char/{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        ));
        let subsystem = std::fs::read_link(sys.join("subsystem"))
            .map_err(|e| not_dax(format!("{}: {e}", sys.join("subsystem").display())))?;
        if subsystem.file_name().and_then(|n| n.to_str()) != Some("dax") {
            return Err(not_dax(format!("its subsystem is {}", subsystem.display())));
        }
        let read_u64 = |attr: &str| -> Result<u64, RegionError> {
            let file = sys.join(attr);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| not_dax(format!("{}: {e}", file.display())))?;
            text.trim()
                .parse()
                .map_err(|_| not_dax(format!("{} holds {:?}", file.display(), text.trim())))
        };
        let size = read_u64("size")?;
        // Kernels before 5.10 have no align attribute: their device-DAX alignment is 2 MiB.
        let align = if sys.join("align").exists() {
            read_u64("align")?.max(4096)
        } else {
            2 << 20
        };
        Ok(DaxDevice { size, align })
    }
}

fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // tmpfs and some filesystems do not support it; the file is still usable.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Size in bytes of a block device (BLKGETSIZE64).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into the pointer we pass.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_device_that_is_not_device_dax_is_refused_by_name() {
        // /dev/null: a character device of the "mem" subsystem.
        let path = Path::new("/dev/null");
        match NvramRegion::open(path, None) {
            Err(e @ RegionError::NotDax { .. }) => {
                let text = e.to_string();
                assert!(text.contains("/dev/null"), "{text}");
                assert!(text.contains("/dev/daxN.M"), "{text}");
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("/dev/null was accepted as NVRAM"),
        }
    }

    #[test]
    fn a_file_nvram_persists_by_msync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let region = NvramRegion::open(&dir.path().join("nv"), Some(1 << 20)).expect("open");
        assert_eq!(region.durability(), Durability::Msync);
        region.write_at(4096, b"durable");
        region.persist(4096, 7).expect("persist");
        let mut back = [0u8; 7];
        region.read_at(4096, &mut back);
        assert_eq!(&back, b"durable");
    }
}
