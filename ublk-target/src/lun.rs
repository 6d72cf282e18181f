//! A LUN as the engine sees it: its size, its ranges (the unit of ownership), its medium,
//! and the index of its staged extents. A bottom module: the log, the flusher, the replays
//! and the data path all speak of `Lun`s.

pub use crate::block::{BLOCK_SIZE, MAX_IO_BYTES};
use crate::index::StagedIndex;
use crate::io_latency::LunLatency;
use crate::medium::Medium;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the engine is asked to serve (from the config, or from a test).
pub struct LunSpec {
    pub name: String,
    pub size: u64,
    pub ranges: u32,
    pub medium: Arc<dyn Medium>,
}

#[derive(Default)]
pub struct LunStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Medium reads that failed here and were served from the partner's medium.
    pub reads_from_partner: AtomicU64,
    /// Read pieces of the partner's ranges served here under its read lease
    /// (`cluster.local_reads`) instead of forwarded.
    pub reads_leased: AtomicU64,
    /// Latency of the device's I/O as its queues saw it (the metrics endpoint).
    pub latency: LunLatency,
}

pub struct Lun {
    pub name: String,
    pub size: u64,
    pub ranges: u32,
    pub range_bytes: u64,
    /// Global index of this LUN's first range (ranges of all LUNs are numbered in order).
    pub first_range: u32,
    pub medium: Arc<dyn Medium>,
    index: Mutex<StagedIndex>,
    pub stats: LunStats,
}

/// Bytes per range of a LUN: ranges are equal and block-aligned (the last may be shorter).
pub fn range_bytes(size: u64, ranges: u32) -> u64 {
    size.div_ceil(ranges.max(1) as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

impl Lun {
    /// Builds every LUN of `specs`, numbering their ranges globally in order.
    pub fn all(specs: Vec<LunSpec>) -> Vec<Arc<Lun>> {
        let mut first_range = 0;
        specs
            .into_iter()
            .map(|s| {
                let lun = Lun {
                    range_bytes: range_bytes(s.size, s.ranges),
                    name: s.name,
                    size: s.size,
                    ranges: s.ranges,
                    first_range,
                    medium: s.medium,
                    index: Mutex::new(StagedIndex::new()),
                    stats: LunStats::default(),
                };
                first_range += lun.ranges;
                Arc::new(lun)
            })
            .collect()
    }

    pub fn index(&self) -> MutexGuard<'_, StagedIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The range (of this LUN) that holds byte `offset`.
    pub fn range_of(&self, offset: u64) -> u32 {
        (offset / self.range_bytes) as u32
    }

    /// Bytes `[start, end)` of range `range` (of this LUN).
    pub fn range_span(&self, range: u32) -> (u64, u64) {
        let start = (range as u64 * self.range_bytes).min(self.size);
        (start, (start + self.range_bytes).min(self.size))
    }

    /// Whether `[offset, offset+len)` lies inside the LUN.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Splits `[offset, offset+len)` at range boundaries (and at 1 GiB, the largest record):
    /// (offset, len, global range) per piece.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let range = at / self.range_bytes;
            let range_end = ((range + 1) * self.range_bytes)
                .min(end)
                .min(at + (1 << 30));
            out.push((at, range_end - at, self.first_range + range as u32));
            at = range_end;
        }
        out
    }
}
