//! The out-of-sync map of shared-nothing mode (issue #17, step 4): which regions of a LUN
//! one node's medium holds and its partner's may not, so that the partner's return copies
//! only those regions.
//!
//! DRBD keeps such a bitmap on disk and, so as not to write it on every write, an activity
//! log of hot extents that a crash forces to be resynced whole. We keep the bitmap in the
//! NVRAM instead, where setting a bit durably costs a cache-line write-back, and take it off
//! the write path altogether: while a record sits in the staging log it can still be sent to
//! the partner when it returns, so its regions need to be marked only before the log lets the
//! record go. The flusher marks the regions of a batch the partner did not get, calls
//! [`OutOfSyncMap::persist`] once, and only then advances its checkpoint.
//!
//! Crash safety needs no atomic update: a bit is relied on only after `persist` returned, a
//! power cut keeps each unpersisted cache line old or new, and either way a region is at
//! worst marked when it need not be (one region copied for nothing), never the reverse.
//! Clearing (after a region was copied) may be lost the same way, with the same harmless
//! outcome.
//!
//! A new map (a format) says every region is out of sync: nothing tells a fresh NVRAM what
//! its node's medium missed before, so the first resync of a range copies it whole; from
//! then on only what was marked. [`LunMaps`] holds one map per LUN, where the superblock's
//! `oos_offset` says (docs/shared-nothing.md says where the engine marks and reads them).

use super::NvramRegion;
use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

const MAGIC: &[u8; 8] = b"NVMOOS01";
const VERSION: u32 = 1;
/// Bytes before the bitmap: the header, padded to a cache line so that the bits never share
/// a line with it.
const HEADER_BYTES: u64 = 64;
const LINE: u64 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutOfSyncError {
    #[error("the out-of-sync map at NVRAM offset {offset} is not one (no header); treat every region as out of sync (a full resync)")]
    Missing { offset: u64 },
    #[error("the out-of-sync map at NVRAM offset {offset} is damaged ({what}); treat every region as out of sync (a full resync)")]
    Damaged { offset: u64, what: String },
    #[error("the out-of-sync map at NVRAM offset {offset} describes {found}, not {wanted}; it belongs to another layout: a full resync is needed")]
    Mismatch {
        offset: u64,
        found: String,
        wanted: String,
    },
    #[error("the out-of-sync map needs {needed} bytes of NVRAM at offset {offset}, {given} are set aside")]
    TooSmall {
        offset: u64,
        needed: u64,
        given: u64,
    },
    #[error("out-of-sync region size {0} is not a power of two of at least 4096 bytes")]
    BadRegionSize(u64),
}

/// What the map covers: a LUN of `lun_bytes`, one bit per `region_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub lun_bytes: u64,
    pub region_bytes: u64,
}

impl Geometry {
    pub fn regions(&self) -> u64 {
        self.lun_bytes.div_ceil(self.region_bytes)
    }

    /// NVRAM bytes the map takes: the header and the bits, in whole cache lines.
    pub fn nvram_bytes(&self) -> u64 {
        HEADER_BYTES + self.regions().div_ceil(8).div_ceil(LINE) * LINE
    }

    fn describe(&self) -> String {
        format!(
            "a {}-byte LUN in {}-byte regions",
            self.lun_bytes, self.region_bytes
        )
    }

    /// A valid region size, and room for the map in the `space` bytes set aside at `offset`.
    fn fits(&self, offset: u64, space: u64) -> Result<(), OutOfSyncError> {
        if self.region_bytes < 4096 || !self.region_bytes.is_power_of_two() {
            return Err(OutOfSyncError::BadRegionSize(self.region_bytes));
        }
        if self.nvram_bytes() > space {
            return Err(OutOfSyncError::TooSmall {
                offset,
                needed: self.nvram_bytes(),
                given: space,
            });
        }
        Ok(())
    }
}

/// What a newly formatted map says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    /// Every region in sync (tests, and nothing else: see the module's comment).
    InSync,
    /// Every region out of sync: a node that knows nothing of its medium's past.
    OutOfSync,
}

pub struct OutOfSyncMap {
    region: Arc<NvramRegion>,
    /// Where the header starts in the NVRAM; the bits follow it.
    offset: u64,
    geometry: Geometry,
    /// Cache lines (by index into the bits) stored since the last persist.
    unpersisted: Mutex<BTreeSet<u64>>,
    /// Held across a whole persist, so that a caller whose lines another caller took returns
    /// only once that caller's write-back is done.
    persisting: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OutOfSyncMap {
    /// Writes a new map at `offset`, every region as `fresh` says, and makes it durable.
    pub fn format(
        region: Arc<NvramRegion>,
        offset: u64,
        space: u64,
        geometry: Geometry,
        fresh: Fresh,
    ) -> Result<OutOfSyncMap, OutOfSyncError> {
        geometry.fits(offset, space)?;
        let needed = geometry.nvram_bytes();
        let fill = if fresh == Fresh::OutOfSync { 0xff } else { 0 };
        region.write_at(
            offset + HEADER_BYTES,
            &vec![fill; (needed - HEADER_BYTES) as usize],
        );
        region.write_at(offset, &encode_header(geometry));
        region
            .persist(offset, needed)
            .map_err(|e| OutOfSyncError::Damaged {
                offset,
                what: format!("persisting the new map failed: {e}"),
            })?;
        Ok(OutOfSyncMap::new(region, offset, geometry))
    }

    /// Opens the map at `offset`, which must describe `geometry`.
    pub fn open(
        region: Arc<NvramRegion>,
        offset: u64,
        space: u64,
        geometry: Geometry,
    ) -> Result<OutOfSyncMap, OutOfSyncError> {
        geometry.fits(offset, space)?;
        let mut head = [0u8; HEADER_BYTES as usize];
        region.read_at(offset, &mut head);
        let found = decode_header(&head, offset)?;
        if found != geometry {
            return Err(OutOfSyncError::Mismatch {
                offset,
                found: found.describe(),
                wanted: geometry.describe(),
            });
        }
        Ok(OutOfSyncMap::new(region, offset, geometry))
    }

    fn new(region: Arc<NvramRegion>, offset: u64, geometry: Geometry) -> OutOfSyncMap {
        OutOfSyncMap {
            region,
            offset,
            geometry,
            unpersisted: Mutex::new(BTreeSet::new()),
            persisting: Mutex::new(()),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn bits_offset(&self) -> u64 {
        self.offset + HEADER_BYTES
    }

    /// Sets or clears one region's bit (in the NVRAM's cache, not yet durable).
    fn store(&self, index: u64, set: bool) {
        let at = self.bits_offset() + index / 8;
        let mask = 1u8 << (index % 8);
        // The byte is read, changed and written back under the lock that also records its
        // line, so two callers never lose each other's bits.
        let mut lines = lock(&self.unpersisted);
        let mut byte = [0u8];
        self.region.read_at(at, &mut byte);
        let new = if set { byte[0] | mask } else { byte[0] & !mask };
        if new != byte[0] {
            self.region.write_at(at, &[new]);
            lines.insert(index / 8 / LINE);
        }
    }

    /// Marks every region that `[offset, offset + len)` touches as out of sync. Durable only
    /// once [`Self::persist`] returns.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.geometry.lun_bytes {
            return;
        }
        let end = offset
            .saturating_add(len)
            .min(self.geometry.lun_bytes)
            .div_ceil(self.geometry.region_bytes);
        for index in offset / self.geometry.region_bytes..end {
            self.store(index, true);
        }
    }

    /// Region `index` was copied to the partner: in sync again (durable with the next
    /// persist; a clear that a power cut loses only means one more copy).
    pub fn clear(&self, index: u64) {
        if index < self.geometry.regions() {
            self.store(index, false);
        }
    }

    /// Makes every mark and clear made before this call durable.
    pub fn persist(&self) -> io::Result<()> {
        let _one_at_a_time = lock(&self.persisting);
        let lines = std::mem::take(&mut *lock(&self.unpersisted));
        for line in lines {
            if let Err(e) = self.region.persist(self.bits_offset() + line * LINE, LINE) {
                // What was not written back stays due: a later persist retries it.
                lock(&self.unpersisted).insert(line);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The out-of-sync regions, as (first byte, length) runs in LUN order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        self.runs_within(0, self.geometry.lun_bytes)
    }

    /// The out-of-sync parts of `[start, end)`: the marked regions that overlap it, cut to
    /// it, as runs in LUN order.
    pub fn runs_within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let rb = self.geometry.region_bytes;
        let end = end.min(self.geometry.lun_bytes);
        if start >= end {
            return Vec::new();
        }
        let (first, last) = (start / rb, end.div_ceil(rb));
        // Whole bytes of bits, from the one holding `first`.
        let byte0 = first / 8;
        let mut bits = vec![0u8; (last.div_ceil(8) - byte0) as usize];
        self.region.read_at(self.bits_offset() + byte0, &mut bits);
        let marked = |i: u64| bits[(i / 8 - byte0) as usize] & (1 << (i % 8)) != 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for index in (first..last).filter(|&i| marked(i)) {
            let from = (index * rb).max(start);
            let to = ((index + 1) * rb).min(end);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == from => *l += to - from,
                _ => runs.push((from, to - from)),
            }
        }
        runs
    }

    /// `[start, end)` was copied: clears the regions wholly inside it (and the LUN's short
    /// last region if `end` is the LUN's end). A region that straddles the edge stays marked:
    /// its other part was not copied.
    pub fn clear_within(&self, start: u64, end: u64) {
        let rb = self.geometry.region_bytes;
        let end = end.min(self.geometry.lun_bytes);
        let last = if end == self.geometry.lun_bytes {
            end.div_ceil(rb)
        } else {
            end / rb
        };
        for index in start.div_ceil(rb)..last {
            self.clear(index);
        }
    }

    /// Bytes of the LUN that are out of sync (for `status`).
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.runs().iter().map(|(_, l)| l).sum()
    }
}

/// Region size of the engine's maps: 16 bits per MiB of LUN, 2 MiB of NVRAM per TiB. (The
/// simulator uses 4 KiB, so that its small ranges hold many regions.)
pub const REGION_BYTES: u64 = 64 << 10;

/// One map per LUN, back to back from an offset (the superblock's `oos_offset`).
pub struct LunMaps {
    maps: Vec<OutOfSyncMap>,
}

impl LunMaps {
    fn geometries(lun_bytes: &[u64], region_bytes: u64) -> impl Iterator<Item = Geometry> + '_ {
        lun_bytes.iter().map(move |&b| Geometry {
            lun_bytes: b,
            region_bytes,
        })
    }

    /// NVRAM bytes the maps of LUNs of `lun_bytes` take, in whole 4 KiB blocks.
    pub fn nvram_bytes(lun_bytes: &[u64], region_bytes: u64) -> u64 {
        let all: u64 = Self::geometries(lun_bytes, region_bytes.max(1))
            .map(|g| g.nvram_bytes())
            .sum();
        all.div_ceil(4096) * 4096
    }

    /// New maps, every region of every LUN as `fresh` says (out of sync but where both
    /// media are known identical: see the module's comment).
    pub fn format(
        region: Arc<NvramRegion>,
        offset: u64,
        lun_bytes: &[u64],
        region_bytes: u64,
        fresh: Fresh,
    ) -> Result<LunMaps, OutOfSyncError> {
        let mut at = offset;
        let mut maps = Vec::new();
        for g in Self::geometries(lun_bytes, region_bytes) {
            let space = g.nvram_bytes();
            maps.push(OutOfSyncMap::format(region.clone(), at, space, g, fresh)?);
            at += space;
        }
        Ok(LunMaps { maps })
    }

    /// The maps written at `offset`; a missing, damaged or foreign one is formatted anew
    /// (every region out of sync: a full resync of what gets resynced), with a warning.
    pub fn open(
        region: Arc<NvramRegion>,
        offset: u64,
        lun_bytes: &[u64],
        region_bytes: u64,
    ) -> Result<LunMaps, OutOfSyncError> {
        let mut at = offset;
        let mut maps = Vec::new();
        for (lun, g) in Self::geometries(lun_bytes, region_bytes).enumerate() {
            let space = g.nvram_bytes();
            let map = match OutOfSyncMap::open(region.clone(), at, space, g) {
                Ok(map) => map,
                Err(e) => {
                    tracing::warn!("LUN {lun}: {e}");
                    OutOfSyncMap::format(region.clone(), at, space, g, Fresh::OutOfSync)?
                }
            };
            maps.push(map);
            at += space;
        }
        Ok(LunMaps { maps })
    }

    /// Marks what `[offset, offset + len)` of LUN `lun` touches (durable after `persist`).
    pub fn mark(&self, lun: u32, offset: u64, len: u64) {
        if let Some(m) = self.maps.get(lun as usize) {
            m.mark(offset, len);
        }
    }

    /// Makes every earlier mark and clear durable.
    pub fn persist(&self) -> io::Result<()> {
        self.maps.iter().try_for_each(|m| m.persist())
    }

    /// See [`OutOfSyncMap::runs_within`]; a LUN without a map is out of sync whole.
    pub fn runs_within(&self, lun: u32, start: u64, end: u64) -> Vec<(u64, u64)> {
        match self.maps.get(lun as usize) {
            Some(m) => m.runs_within(start, end),
            None if start < end => vec![(start, end - start)],
            None => Vec::new(),
        }
    }

    /// See [`OutOfSyncMap::clear_within`] (durable after `persist`).
    pub fn clear_within(&self, lun: u32, start: u64, end: u64) {
        if let Some(m) = self.maps.get(lun as usize) {
            m.clear_within(start, end);
        }
    }
}

fn encode_header(g: Geometry) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&g.lun_bytes.to_le_bytes());
    h[24..32].copy_from_slice(&g.region_bytes.to_le_bytes());
    let crc = rdma_link::checksum::crc32c(&h[..60]);
    h[60..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn decode_header(h: &[u8; HEADER_BYTES as usize], offset: u64) -> Result<Geometry, OutOfSyncError> {
    let word = |r: std::ops::Range<usize>| -> u64 {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    if &h[..8] != MAGIC {
        return Err(OutOfSyncError::Missing { offset });
    }
    let crc = word(60..64) as u32;
    if crc != rdma_link::checksum::crc32c(&h[..60]) {
        return Err(OutOfSyncError::Damaged {
            offset,
            what: "header checksum mismatch".into(),
        });
    }
    let version = word(8..12) as u32;
    if version != VERSION {
        return Err(OutOfSyncError::Damaged {
            offset,
            what: format!("format version {version}, this build reads {VERSION}"),
        });
    }
    Ok(Geometry {
        lun_bytes: word(16..24),
        region_bytes: word(24..32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const G: Geometry = Geometry {
        lun_bytes: 64 * 64 * KIB * 8 + 12 * KIB,
        region_bytes: 64 * KIB,
    };
    const AT: u64 = 4096;

    fn nvram() -> (Arc<MemoryNvram>, Arc<NvramRegion>) {
        let mem = Arc::new(MemoryNvram::new("oos-test", 64 * KIB as usize));
        let region = Arc::new(NvramRegion::in_memory(mem.clone()));
        (mem, region)
    }

    #[test]
    fn marks_cover_every_touched_region_and_runs_merge() {
        let (_, region) = nvram();
        let map = OutOfSyncMap::format(region, AT, 8 * KIB, G, Fresh::InSync).expect("format");
        assert_eq!(G.regions(), 513);
        assert_eq!(map.runs(), vec![]);
        map.mark(64 * KIB - 512, 1024); // straddles regions 0 and 1
        map.mark(5 * 64 * KIB, 1); // region 5
        map.mark(G.lun_bytes - 1, 100); // the last, short region; clipped at the LUN's end
        map.mark(0, 0); // nothing
        assert_eq!(
            map.runs(),
            vec![
                (0, 128 * KIB),
                (5 * 64 * KIB, 64 * KIB),
                (512 * 64 * KIB, 12 * KIB)
            ]
        );
        map.clear(1);
        map.clear(10_000); // out of range: ignored
        assert_eq!(map.runs()[0], (0, 64 * KIB));
        assert_eq!(map.out_of_sync_bytes(), 64 * KIB + 64 * KIB + 12 * KIB);
    }

    #[test]
    fn a_range_reads_its_own_part_and_clears_only_regions_wholly_inside() {
        let (_, region) = nvram();
        let map = OutOfSyncMap::format(region, AT, 8 * KIB, G, Fresh::InSync).expect("format");
        map.mark(0, 3 * 64 * KIB); // regions 0..3
        map.mark(20 * 64 * KIB, 1); // region 20
                                    // A "range" of bytes 100 KiB..1300 KiB: cut to it, region 20 (1280..1344 KiB) too.
        let (start, end) = (100 * KIB, 1300 * KIB);
        assert_eq!(
            map.runs_within(start, end),
            vec![(100 * KIB, 92 * KIB), (1280 * KIB, 20 * KIB)]
        );
        assert_eq!(map.runs_within(end, end), vec![]);
        map.clear_within(start, end);
        // Region 1 (64..128 KiB) and region 20 straddle the edges: still marked, as is
        // region 0 (outside); region 2 is clear.
        assert_eq!(map.runs(), vec![(0, 128 * KIB), (20 * 64 * KIB, 64 * KIB)]);
        // The LUN's short last region is cleared by a span that ends at the LUN's end.
        map.mark(G.lun_bytes - 1, 1);
        map.clear_within(512 * 64 * KIB, G.lun_bytes);
        assert_eq!(map.runs().len(), 2);
    }

    #[test]
    fn new_lun_maps_say_everything_is_out_of_sync_and_damage_resets_to_that() {
        let (_, region) = nvram();
        let sizes = [G.lun_bytes, 2 << 20];
        let bytes = LunMaps::nvram_bytes(&sizes, REGION_BYTES);
        assert_eq!(bytes % 4096, 0);
        let maps = LunMaps::format(region.clone(), AT, &sizes, REGION_BYTES, Fresh::OutOfSync)
            .expect("format");
        assert_eq!(maps.runs_within(1, 0, 2 << 20), vec![(0, 2 << 20)]);
        maps.clear_within(1, 0, 2 << 20);
        maps.persist().expect("persist");
        let maps = LunMaps::open(region.clone(), AT, &sizes, REGION_BYTES).expect("open");
        assert_eq!(maps.runs_within(1, 0, 2 << 20), vec![]);
        assert_eq!(maps.runs_within(0, 0, 64 * KIB), vec![(0, 64 * KIB)]);
        // LUN 1's header damaged: that map alone starts over, all out of sync.
        region.write_at(AT + G.nvram_bytes() + 17, &[0x5a]);
        let maps = LunMaps::open(region, AT, &sizes, REGION_BYTES).expect("open");
        assert_eq!(maps.runs_within(1, 4096, 8192), vec![(4096, 4096)]);
        assert_eq!(maps.runs_within(0, 0, 64 * KIB), vec![(0, 64 * KIB)]);
    }

    #[test]
    fn foreign_damaged_and_mismatched_maps_are_refused_with_the_way_out() {
        let (_, region) = nvram();
        let e = OutOfSyncMap::open(region.clone(), AT, 8 * KIB, G).err();
        assert_eq!(e, Some(OutOfSyncError::Missing { offset: AT }));
        assert!(e.expect("err").to_string().contains("full resync"));
        OutOfSyncMap::format(region.clone(), AT, 8 * KIB, G, Fresh::InSync).expect("format");
        let other = Geometry {
            lun_bytes: G.lun_bytes * 2,
            ..G
        };
        let e = OutOfSyncMap::open(region.clone(), AT, 8 * KIB, other)
            .err()
            .expect("a different LUN size is refused");
        assert!(matches!(e, OutOfSyncError::Mismatch { .. }), "{e}");
        region.write_at(AT + 20, &[0xff]);
        let e = OutOfSyncMap::open(region.clone(), AT, 8 * KIB, G)
            .err()
            .expect("a damaged header is refused");
        assert!(e.to_string().contains("checksum"), "{e}");
        let small = OutOfSyncMap::format(region.clone(), AT, 64, G, Fresh::InSync).err();
        assert!(matches!(small, Some(OutOfSyncError::TooSmall { .. })));
        let bad = Geometry {
            region_bytes: 5000,
            ..G
        };
        assert_eq!(
            OutOfSyncMap::format(region, AT, 8 * KIB, bad, Fresh::InSync).err(),
            Some(OutOfSyncError::BadRegionSize(5000))
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark(u64, u64),
        Clear(u64),
        Persist,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..G.lun_bytes, 1..300 * KIB).prop_map(|(o, l)| Op::Mark(o, l)),
            2 => (0..G.regions()).prop_map(Op::Clear),
            1 => Just(Op::Persist),
        ]
    }

    proptest! {
        /// Marks, clears and persists in any order, then a power cut that keeps or tears
        /// every unpersisted cache line at random, then a restart: every region marked
        /// before the last persist (and not cleared since, i.e. not copied) is still marked,
        /// and nothing is marked that no one ever marked.
        #[test]
        fn a_power_cut_never_loses_a_persisted_mark(
            ops in proptest::collection::vec(op(), 1..60),
            keep in proptest::collection::vec(any::<bool>(), 256),
        ) {
            let (mem, region) = nvram();
            let map = OutOfSyncMap::format(region, AT, 8 * KIB, G, Fresh::InSync).expect("format");
            // What the bits are now, and what must survive (set at the last persist).
            let mut now = vec![false; G.regions() as usize];
            let mut ever = now.clone();
            let mut relied = now.clone();
            for op in &ops {
                match *op {
                    Op::Mark(o, l) => {
                        map.mark(o, l);
                        let end = (o + l).min(G.lun_bytes).div_ceil(G.region_bytes);
                        for i in o / G.region_bytes..end {
                            now[i as usize] = true;
                            ever[i as usize] = true;
                        }
                    }
                    Op::Clear(i) => {
                        // Cleared because the region was copied: it may read back either way.
                        map.clear(i);
                        now[i as usize] = false;
                        relied[i as usize] = false;
                    }
                    Op::Persist => {
                        map.persist().expect("persist");
                        relied = now.clone();
                    }
                }
            }
            drop(map);
            mem.power_cut(|line| keep[line % keep.len()]);
            let region = Arc::new(NvramRegion::in_memory(mem.clone()));
            let map = OutOfSyncMap::open(region, AT, 8 * KIB, G).expect("the header was persisted");
            let mut after = vec![false; G.regions() as usize];
            for (s, l) in map.runs() {
                for i in s / G.region_bytes..(s + l).div_ceil(G.region_bytes) {
                    after[i as usize] = true;
                }
            }
            for i in 0..after.len() {
                prop_assert!(!relied[i] || after[i], "region {} was marked and persisted, lost", i);
                prop_assert!(!after[i] || ever[i], "region {} is marked but nobody marked it", i);
            }
        }
    }

    /// Many threads marking and persisting at once: every mark a thread persisted is durable
    /// when its own persist returns, even if another thread wrote its line back.
    #[test]
    fn concurrent_marks_are_durable_when_each_persist_returns() {
        let (mem, region) = nvram();
        let map =
            Arc::new(OutOfSyncMap::format(region, AT, 8 * KIB, G, Fresh::InSync).expect("format"));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for i in (t..G.regions()).step_by(4) {
                        map.mark(i * G.region_bytes, 1);
                        map.persist().expect("persist");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        drop(map);
        mem.power_cut(|_| false);
        let region = Arc::new(NvramRegion::in_memory(mem));
        let map = OutOfSyncMap::open(region, AT, 8 * KIB, G).expect("open");
        assert_eq!(map.runs(), vec![(0, G.lun_bytes)]);
    }
}
