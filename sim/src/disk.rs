//! The shared storage medium both nodes see, with each node's page cache in front of it.
//!
//! A node's buffered writes (the flusher's) land in its own page cache: the node reads them
//! back at once, the other node does not see them until they reach the disk, by the node's
//! `sync` or by the kernel writing dirty pages back on its own (at random times here). A
//! process crash keeps the page cache (the kernel writes it back); a power cut loses what
//! was not written back. The ownership table is written with O_DIRECT|O_DSYNC and so goes
//! straight to the disk. A node's path to the disk can fail (every I/O through it: EIO).

use nvmirror::medium::Medium;
use nvmirror::ownership::TableStore;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes per page of the page cache model.
pub const PAGE: u64 = 4096;

struct DiskState {
    /// What is on the disk.
    durable: Vec<u8>,
    /// Per node: dirty pages not yet on the disk (page index -> contents).
    cache: Vec<BTreeMap<u64, Vec<u8>>>,
    /// Per node: its path to the disk fails.
    path_failed: Vec<bool>,
}

/// The shared disk: the LUN's data, then the metadata area with the ownership table.
pub struct SimDisk {
    state: Mutex<DiskState>,
    /// Where the metadata area (table slots) starts.
    table_base: u64,
}

impl SimDisk {
    pub fn new(nodes: usize, lun_bytes: u64, metadata_bytes: u64) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            state: Mutex::new(DiskState {
                durable: vec![0; (lun_bytes + metadata_bytes) as usize],
                cache: vec![BTreeMap::new(); nodes],
                path_failed: vec![false; nodes],
            }),
            table_base: lun_bytes,
        })
    }

    fn state(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `node`'s view of the LUN's data.
    pub fn lun_view(self: &Arc<Self>, node: usize) -> DiskView {
        DiskView {
            disk: self.clone(),
            node,
            size: self.table_base,
        }
    }

    /// Node `node`'s view of the metadata area (the ownership table, flush marks).
    pub fn table_view(self: &Arc<Self>, node: usize) -> TableView {
        TableView {
            disk: self.clone(),
            node,
        }
    }

    /// Bytes on the disk itself (what a node that just started would read).
    pub fn durable(&self, off: u64, len: usize) -> Vec<u8> {
        self.state().durable[off as usize..off as usize + len].to_vec()
    }

    pub fn path_failed(&self, node: usize) -> bool {
        self.state().path_failed[node]
    }

    pub fn set_path_failed(&self, node: usize, failed: bool) {
        self.state().path_failed[node] = failed;
    }

    /// The kernel writes some of `node`'s dirty pages back on its own: `pick(page)` says which.
    pub fn write_back_some(&self, node: usize, mut pick: impl FnMut(u64) -> bool) -> usize {
        let mut st = self.state();
        let pages: Vec<u64> = st.cache[node]
            .keys()
            .copied()
            .filter(|&p| pick(p))
            .collect();
        for p in &pages {
            if let Some(data) = st.cache[node].remove(p) {
                let at = (p * PAGE) as usize;
                st.durable[at..at + data.len()].copy_from_slice(&data);
            }
        }
        pages.len()
    }

    /// A process crash: the kernel still writes the node's dirty pages back.
    pub fn process_died(&self, node: usize) {
        self.write_back_some(node, |_| true);
    }

    /// A power cut: dirty pages the kernel had not written back are lost, except those
    /// `survives(page)` picks (written back just before the cut). Returns (dirty, survived).
    pub fn power_cut(&self, node: usize, mut survives: impl FnMut(u64) -> bool) -> (usize, usize) {
        let dirty = self.state().cache[node].len();
        let survived = self.write_back_some(node, &mut survives);
        self.state().cache[node].clear();
        (dirty, survived)
    }

    fn check_path(st: &DiskState, node: usize) -> io::Result<()> {
        if st.path_failed[node] {
            Err(io::Error::from_raw_os_error(libc_eio()))
        } else {
            Ok(())
        }
    }
}

fn libc_eio() -> i32 {
    5 // EIO
}

/// One node's view of the LUN data on the shared disk (its `Medium`).
pub struct DiskView {
    disk: Arc<SimDisk>,
    node: usize,
    size: u64,
}

impl DiskView {
    fn bounds(&self, off: u64, len: u64) -> io::Result<()> {
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{off}+{len} beyond the simulated LUN medium ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Writes into the page cache, page by page (read-modify-write of partial pages).
    fn buffered_write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.bounds(off, data.len() as u64)?;
        let mut st = self.disk.state();
        SimDisk::check_path(&st, self.node)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let page = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let start = (page * PAGE) as usize;
            let base = st.durable[start..start + PAGE as usize].to_vec();
            let cached = st.cache[self.node].entry(page).or_insert(base);
            cached[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

impl Medium for DiskView {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.buffered_write(off, data)
    }

    fn read_at(&self, out: &mut [u8], off: u64) -> io::Result<()> {
        self.bounds(off, out.len() as u64)?;
        let st = self.disk.state();
        SimDisk::check_path(&st, self.node)?;
        // O_DIRECT: the disk, with this node's own dirty pages written back first (the
        // kernel flushes the range before a direct read).
        out.copy_from_slice(&st.durable[off as usize..off as usize + out.len()]);
        let first = off / PAGE;
        let last = (off + out.len() as u64).div_ceil(PAGE);
        for (&page, data) in st.cache[self.node].range(first..last) {
            let p_start = page * PAGE;
            let from = p_start.max(off);
            let to = (p_start + PAGE).min(off + out.len() as u64);
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - p_start) as usize..(to - p_start) as usize]);
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.buffered_write(off, &vec![0u8; len as usize])
    }

    fn sync(&self) -> io::Result<()> {
        {
            let st = self.disk.state();
            SimDisk::check_path(&st, self.node)?;
        }
        self.disk.write_back_some(self.node, |_| true);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("simulated shared disk (node {}'s path)", self.node)
    }
}

/// One node's view of the metadata area: whole 4 KiB slots, O_DIRECT|O_DSYNC.
pub struct TableView {
    disk: Arc<SimDisk>,
    node: usize,
}

impl TableStore for TableView {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let st = self.disk.state();
        SimDisk::check_path(&st, self.node)?;
        let at = (self.disk.table_base + slot * PAGE) as usize;
        out[..PAGE as usize].copy_from_slice(&st.durable[at..at + PAGE as usize]);
        Ok(())
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.disk.state();
        SimDisk::check_path(&st, self.node)?;
        let at = (self.disk.table_base + slot * PAGE) as usize;
        st.durable[at..at + PAGE as usize].copy_from_slice(&data[..PAGE as usize]);
        Ok(())
    }
}
