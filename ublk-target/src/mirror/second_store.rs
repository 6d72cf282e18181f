//! The second store: the part of our NVRAM that holds the partner's partitions, with the
//! same geometry as its first store (a record at offset X of the partner's partition log sits
//! at offset X of the matching partition here). The mirror link lands the partner's records
//! here (`rdma_link::SecondStore`); this area tracks which are unreleased, and on a takeover
//! replays them into the medium, or writes them for a partner whose medium path failed.
//!
//! What is unreleased survives a restart of this node: per partner partition a watermark
//! (the partner's log id and the seq it released through) is persisted in the partition's
//! checkpoint block (slots 2 and 3, written alternately), and at start the index of held
//! records is rebuilt by scanning the partition for intact records of that log above it.
//! Records of another log (the partner reformatted: it replayed its old log first) are
//! dropped; a record at or below the watermark is never held again.

use crate::apply::{Applied, Applier, ApplyError, RecordWrite};
use crate::lun::Lun;
use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES};
use crate::nvram::scan::CorruptRecord;
use crate::nvram::void::VoidMarks;
use crate::nvram::{Layout, NvramRegion, PartitionCheckpoint};
use crate::ownership::FlushMarks;
use rdma_link::{PartitionSeq, Region, ResyncPoint};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub(super) mod held_reads;
mod held_records;

use held_records::{Held, HeldRecords};

/// What we hold of one partition of the partner.
#[derive(Clone, Debug, Default)]
struct PartnerPartition {
    /// The partner's log the records belong to (None: nothing seen yet).
    log_id: Option<u64>,
    /// Every record of that log up to this seq is on the medium (released).
    released: u64,
    /// Generation of the persisted watermark (selects its slot).
    generation: u64,
    /// Unreleased records by seq.
    records: HeldRecords,
    /// The highest seq the partner said it flushed (its releases), even where we kept the
    /// copies (marking our medium outdated failed): those are on its medium.
    heard_flushed: u64,
}

/// Checkpoint-block slots of the persisted watermark (slots 0 and 1 are the partition log's).
const WATERMARK_SLOT: u64 = 2;

/// Which records a release must not drop: those of ranges a takeover claimed and has not
/// replayed yet, as (lun, offset) -> pinned.
pub type Pin = Box<dyn Fn(u32, u64) -> bool + Send + Sync>;

/// With a medium per node (`storage = "own"`): durably marks our medium as missing the
/// records at these (lun, offset, len)s (None: records whose header is gone, so every
/// range), before they are dropped unwritten. Err: keep them.
pub type MarkOwnOutdated =
    Box<dyn Fn(Option<&[(u32, u64, u64)]>) -> Result<(), String> + Send + Sync>;

/// With a medium per node: whether each copy at (lun, offset) that a release would drop
/// unwritten goes to our medium first instead of marking it outdated: where the partner's
/// own medium misses the range (its writes failed), ours must stay the one that holds every
/// write.
pub type WriteBeforeDrop = Box<dyn Fn(&[(u32, u64)]) -> Vec<bool> + Send + Sync>;

/// What a release does with copies our medium lacks (`storage = "own"`).
pub struct OwnMedium {
    pub mark: MarkOwnOutdated,
    pub write_first: WriteBeforeDrop,
    pub luns: Arc<Vec<Arc<Lun>>>,
}

/// The partner's partitions inside our NVRAM.
pub struct SecondStoreArea {
    region: Arc<NvramRegion>,
    layout: Layout,
    base: u64,
    /// Per partition: unreleased records, and the watermark.
    held: Mutex<Vec<PartnerPartition>>,
    pin: Mutex<Option<Pin>>,
    /// Set with a medium per node: a release never drops a copy our medium lacks unmarked.
    own_medium: Mutex<Option<OwnMedium>>,
    /// A log-shipping destination's area: records leave once they are in the log file
    /// ([`SecondStoreArea::release_logged`]), whatever the source flushed.
    until_logged: std::sync::atomic::AtomicBool,
    /// In that mode: records of a source's old log dropped before they were logged, as
    /// (partition, old log, first seq, last seq), for the log writer to record.
    dropped_unlogged: Mutex<Vec<(u32, u64, u64, u64)>>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SecondStoreStatus {
    pub records: usize,
    pub bytes: u64,
    pub capacity_bytes: u64,
}

impl SecondStoreArea {
    /// The second store of an NVRAM with `layout`, its index rebuilt from what it holds.
    pub fn new(region: Arc<NvramRegion>, layout: Layout) -> Option<Arc<SecondStoreArea>> {
        let base = layout.second_store_offset()?;
        Some(Self::at(region, layout, base))
    }

    /// A log-shipping destination's area of one source: `region` is laid out like that
    /// source's NVRAM (metadata blocks, then `partitions` logs of `part_size`), and each of
    /// its records lands at the offset it has there. Block 0 is the area's own header
    /// (`shipping::area`); the watermarks use the partitions' metadata blocks as in a node's
    /// NVRAM.
    pub fn of_source(
        region: Arc<NvramRegion>,
        partitions: u32,
        part_size: u64,
    ) -> Arc<SecondStoreArea> {
        let data_offset = Layout::metadata_bytes(partitions);
        // `second_store` makes the capacity `partitions * part_size`; `base` says where.
        let layout = Layout {
            partitions,
            part_size,
            data_offset,
            second_store: true,
        };
        Self::at(region, layout, data_offset)
    }

    fn at(region: Arc<NvramRegion>, layout: Layout, base: u64) -> Arc<SecondStoreArea> {
        let area = SecondStoreArea {
            region,
            layout,
            base,
            held: Mutex::new(vec![
                PartnerPartition::default();
                layout.partitions as usize
            ]),
            pin: Mutex::new(None),
            own_medium: Mutex::new(None),
            until_logged: Default::default(),
            dropped_unlogged: Mutex::new(Vec::new()),
        };
        let rebuilt: Vec<PartnerPartition> =
            (0..layout.partitions).map(|p| area.rebuild(p)).collect();
        let records: usize = rebuilt.iter().map(|p| p.records.len()).sum();
        if records > 0 {
            tracing::info!(
                "second store: {records} unreleased record(s) of the partner found in the NVRAM"
            );
        }
        *area.held() = rebuilt;
        Arc::new(area)
    }

    /// While a takeover has claimed ranges and not yet replayed them, the partner's
    /// releases (a restarted partner names everything it has on the medium, except what it
    /// skipped because it lost the range) must not drop their records: `pin` says which.
    pub fn pin(&self, pin: Option<Pin>) {
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = pin;
    }

    /// With a medium per node: every held copy must reach our medium (the partner asks,
    /// `write_for_partner`), and one a release drops unwritten marks our medium outdated.
    pub fn keep_own_medium(&self, own: OwnMedium) {
        *self.own_medium.lock().unwrap_or_else(|p| p.into_inner()) = Some(own);
    }

    fn own_medium_kept(&self) -> bool {
        self.own_medium
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Drops the held records through `through_seq` of `partition` (they are on the
    /// medium), except pinned ones, and moves the watermark.
    fn release_held(&self, partition: u32, through_seq: u64) {
        self.release_held_of(None, partition, through_seq)
    }

    /// `release_held`, only while the held records are of source log `log_id` (if given):
    /// a seq of an older log must not move a newer log's watermark.
    fn release_held_of(&self, log_id: Option<u64>, partition: u32, through_seq: u64) {
        let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        let log = self.partition_log(partition);
        let mut held = self.held();
        let Some(pp) = held.get_mut(partition as usize) else {
            return;
        };
        if log_id.is_some_and(|l| pp.log_id != Some(l)) {
            return;
        }
        let released = pp.records.take_through(through_seq);
        let mut kept_below = None;
        if let Some(pin) = pin.as_ref() {
            for (seq, h) in released {
                let pinned = self
                    .held_header(log, partition, seq, &h)
                    .is_some_and(|hd| pin(hd.lun, hd.offset));
                if pinned {
                    kept_below.get_or_insert(seq);
                    pp.records.insert(seq, h);
                }
            }
        }
        // The watermark stops below a pinned record.
        let through = kept_below.map_or(through_seq, |s| s - 1).min(through_seq);
        if through > pp.released {
            pp.released = through;
            self.write_watermark(partition, pp);
        }
    }

    /// With a medium per node, before a release through `through_seq` of `partition`: marks
    /// our medium outdated for the copies it would drop unwritten. False: keep them.
    fn mark_before_drop(&self, partition: u32, through_seq: u64) -> bool {
        let own = self.own_medium.lock().unwrap_or_else(|p| p.into_inner());
        let Some(own) = own.as_ref() else {
            return true;
        };
        let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        let log = self.partition_log(partition);
        let (mut dropped, to_write, every_held, headless) = {
            let held = self.held();
            let Some(pp) = held.get(partition as usize) else {
                return true;
            };
            let mut headless = false;
            let mut unwritten = Vec::new();
            for (&seq, h) in pp.records.range(..=through_seq) {
                match self.held_header(log, partition, seq, h) {
                    // A pinned copy stays held (a takeover replays it).
                    Some(hd) if pin.as_ref().is_some_and(|p| p(hd.lun, hd.offset)) => {}
                    Some(hd) if matches!(hd.kind, RecordKind::Data | RecordKind::Zero) => {
                        unwritten.push((seq, *h, hd))
                    }
                    Some(_) => {}
                    None => headless = true,
                }
            }
            let keys: Vec<(u32, u64)> = unwritten
                .iter()
                .map(|(_, _, hd)| (hd.lun, hd.offset))
                .collect();
            let first = if keys.is_empty() {
                Vec::new()
            } else {
                (own.write_first)(&keys)
            };
            let (mut dropped, mut to_write) = (Vec::new(), Vec::new());
            for (i, (seq, h, hd)) in unwritten.into_iter().enumerate() {
                if first.get(i).copied().unwrap_or(false) {
                    to_write.push((seq, h));
                } else {
                    dropped.push((hd.lun, hd.offset, u64::from(hd.len)));
                }
            }
            let every: Vec<(u64, Held)> = pp.records.iter().map(|(s, h)| (*s, *h)).collect();
            (dropped, to_write, every, headless)
        };
        drop(pin);
        if !to_write.is_empty() {
            let mut applier = Applier::new(&own.luns);
            let written = self
                .apply_held(
                    partition,
                    &to_write,
                    &every_held,
                    0,
                    &mut applier,
                    &|_, _| Ok(true),
                )
                .and_then(|()| applier.sync().map(|_| ()).map_err(|e| e.to_string()));
            match written {
                Ok(()) => tracing::info!(
                    partition,
                    "wrote {} mirrored record(s) to our medium before dropping them: the partner's own medium misses their ranges",
                    to_write.len()
                ),
                Err(e) => {
                    tracing::error!(
                        partition,
                        "writing mirrored records to our medium before dropping them failed ({e}): marking it outdated instead"
                    );
                    for (seq, h) in &to_write {
                        if let Some(hd) = self.held_header(log, partition, *seq, h) {
                            dropped.push((hd.lun, hd.offset, u64::from(hd.len)));
                        }
                    }
                }
            }
        }
        if dropped.is_empty() && !headless {
            return true;
        }
        match (own.mark)((!headless).then_some(dropped.as_slice())) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    partition,
                    "mirrored record(s) our medium lacks would be dropped, and marking it outdated failed ({e}): kept"
                );
                false
            }
        }
    }

    /// Local reads (`held_reads`) are served from this area: keep the held records indexed
    /// by span, or stop keeping the index.
    pub fn index_for_reads(&self, on: bool) {
        for pp in self.held().iter_mut() {
            pp.records.set_indexed(on);
        }
    }

    fn held(&self) -> MutexGuard<'_, Vec<PartnerPartition>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The persisted watermark of partner partition `p` (the newest valid slot).
    fn read_watermark(&self, p: u32) -> Option<PartitionCheckpoint> {
        (WATERMARK_SLOT..WATERMARK_SLOT + 2)
            .filter_map(|slot| {
                let mut buf = [0u8; 48];
                self.region
                    .read_at(self.layout.checkpoint_offset(p, slot), &mut buf);
                PartitionCheckpoint::decode(&buf)
            })
            .filter(|c| c.partition == p)
            .max_by_key(|c| c.generation)
    }

    /// Persists partner partition `p`'s watermark (its log id, released through).
    fn write_watermark(&self, p: u32, pp: &mut PartnerPartition) {
        let Some(log_id) = pp.log_id else { return };
        pp.generation += 1;
        let cp = PartitionCheckpoint {
            partition: p,
            log_id,
            generation: pp.generation,
            tail_off: 0,
            tail_seq: pp.released + 1,
        };
        let off = self
            .layout
            .checkpoint_offset(p, WATERMARK_SLOT + pp.generation % 2);
        self.region.write_at(off, &cp.encode());
        if let Err(e) = self.region.persist(off, PartitionCheckpoint::SLOT_BYTES) {
            tracing::error!(
                partition = p,
                "persisting the second store's watermark failed: {e}"
            );
        }
    }

    /// Rebuilds what we hold of partner partition `p`: the intact records of the watermark's
    /// log above it. Without a watermark nothing is held: the first record the partner sends
    /// writes one, so there is none only before any record arrived, or after this NVRAM was
    /// formatted (its copies may be long released: the partner replays its own log).
    fn rebuild(&self, p: u32) -> PartnerPartition {
        let mark = self.read_watermark(p);
        let log = self.partition_log(p);
        let mut found: BTreeMap<u64, Vec<(u64, Held)>> = BTreeMap::new();
        let mut pos = 0u64;
        while pos + HEADER_BYTES <= self.layout.part_size {
            if let Some(h) = self.held_header_any(log, p, &Held::probe(pos)) {
                let held = Held::of(pos, &h);
                if h.kind != crate::nvram::RecordKind::Wrap
                    && self.record_data(log, &held, &h).is_some()
                {
                    found.entry(h.log_id).or_default().push((h.seq, held));
                    pos += h.slot();
                    continue;
                }
            }
            pos += crate::nvram::record::RECORD_ALIGN;
        }
        let (log_id, released, generation) = match mark {
            Some(m) => (Some(m.log_id), m.tail_seq.saturating_sub(1), m.generation),
            None => (None, 0, 0),
        };
        let records = log_id
            .and_then(|l| found.remove(&l))
            .unwrap_or_default()
            .into_iter()
            .filter(|(seq, _)| *seq > released)
            .collect();
        PartnerPartition {
            log_id,
            released,
            generation,
            records,
            heard_flushed: released,
        }
    }

    /// A log-shipping destination's area: records stay until the log file has them
    /// ([`Self::release_logged`]); the source's releases (it flushed them) do not drop them.
    /// Records of old source logs dropped before they were logged (see the field), taken.
    pub fn take_dropped_unlogged(&self) -> Vec<(u32, u64, u64, u64)> {
        std::mem::take(
            &mut *self
                .dropped_unlogged
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    pub fn keep_until_logged(&self) {
        self.until_logged
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The source's log that `partition`'s held records belong to, and the seq every
    /// record through which has left this area.
    pub fn log_state(&self, partition: u32) -> Option<(Option<u64>, u64)> {
        let held = self.held();
        let pp = held.get(partition as usize)?;
        Some((pp.log_id, pp.released))
    }

    /// The lowest seq held of `partition` at or above `from`.
    pub fn held_from(&self, partition: u32, from: u64) -> Option<u64> {
        let held = self.held();
        let pp = held.get(partition as usize)?;
        pp.records.range(from..).next().map(|(&seq, _)| seq)
    }

    /// A copy of held record `seq` of `partition` of log `log_id` (header, data), checked
    /// against its checksums after the copy. None: not held, or no longer intact.
    pub fn copy_held(
        &self,
        log_id: u64,
        partition: u32,
        seq: u64,
    ) -> Option<(RecordHeader, Vec<u8>, u64)> {
        let held = *self.held().get(partition as usize)?.records.get(&seq)?;
        let log = self.partition_log(partition);
        let header = self
            .held_header(log, partition, seq, &held)
            .filter(|h| h.log_id == log_id)?;
        let at = usize::try_from(held.pos).ok()?;
        if held.pos.checked_add(header.slot())? > self.layout.part_size {
            return None;
        }
        let start = at + HEADER_BYTES as usize;
        let data = log.get(start..start + header.data_len as usize)?.to_vec();
        // Checked on the copy: the bytes in the NVRAM may change under us once the source
        // reused the space (it went on without us while we were away).
        let again = RecordHeader::decode(log.get(at..)?).ok();
        (again == Some(header) && rdma_link::checksum::crc32c(&data) == header.data_crc)
            .then_some((header, data, held.pos))
    }

    /// The log file holds `partition`'s records of source log `log_id` through
    /// `through_seq`: they leave the area (nothing, if the area holds another log by now).
    pub fn release_logged(&self, log_id: u64, partition: u32, through_seq: u64) {
        self.release_held_of(Some(log_id), partition, through_seq);
    }

    /// Forgets the held records of `partition` through `through_seq` that are no longer
    /// intact records of log `log_id` (the source reused their space: it went on without
    /// us); how many. They never reach the log file, and the writer must not wait on them.
    pub fn forget_overwritten(&self, log_id: u64, partition: u32, through_seq: u64) -> usize {
        let log = self.partition_log(partition);
        let mut held = self.held();
        let Some(pp) = held.get_mut(partition as usize) else {
            return 0;
        };
        let before = pp.records.len();
        pp.records.retain(|&seq, h| {
            if seq > through_seq {
                return true;
            }
            self.held_header(log, partition, seq, h)
                .filter(|hd| hd.log_id == log_id)
                .is_some_and(|hd| self.record_data(log, h, &hd).is_some())
        });
        before - pp.records.len()
    }

    /// Whether record `seq` of the partner's `partition` is held (e.g. pinned past a release).
    pub fn holds(&self, partition: u32, seq: u64) -> bool {
        self.held()
            .get(partition as usize)
            .is_some_and(|pp| pp.records.contains_key(&seq))
    }

    pub fn status(&self) -> SecondStoreStatus {
        let held = self.held();
        SecondStoreStatus {
            records: held.iter().map(|m| m.records.len()).sum(),
            bytes: held
                .iter()
                .flat_map(|m| m.records.values())
                .map(|h| h.len as u64)
                .sum(),
            capacity_bytes: self.layout.second_store_len(),
        }
    }

    /// (lun, offset, len) of every held copy whose header is intact and that `selected`
    /// (lun, offset) approves: writes one medium may get and the other not.
    pub fn held_extents(&self, selected: &dyn Fn(u32, u64) -> bool) -> Vec<(u32, u64, u64)> {
        let held = self.held();
        let mut out = Vec::new();
        for (p, pp) in held.iter().enumerate() {
            let log = self.partition_log(p as u32);
            for (&seq, h) in &pp.records {
                if let Some(hd) = self.held_header(log, p as u32, seq, h) {
                    if hd.kind != RecordKind::Wrap && selected(hd.lun, hd.offset) {
                        out.push((hd.lun, hd.offset, u64::from(hd.len)));
                    }
                }
            }
        }
        out
    }

    /// Forgets everything (the partner restarts mirroring from scratch).
    /// With a medium per node, the partner's resync wrote `lun` at `offset..offset + len` of
    /// our medium from its own: the copies we still hold there of records it said it
    /// flushed are older than those bytes (the copy fence keeps its batches of the extent
    /// from landing on its medium between its read and our write). Applied later as copies
    /// it never asked us to write, they would overwrite them (simulator seed 3581 with
    /// --storage own: copies kept when marking failed, written after the resync): forgotten.
    /// In memory only: after a restart the partner's next release drops them.
    pub fn forget_resynced(&self, lun: u32, offset: u64, len: u64) -> usize {
        let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        let mut held = self.held();
        let mut forgotten = 0;
        for (p, pp) in held.iter_mut().enumerate() {
            let log = self.partition_log(p as u32);
            let flushed = pp.heard_flushed;
            pp.records.retain(|&seq, h| {
                if seq > flushed {
                    return true;
                }
                let Some(hd) = self.held_header(log, p as u32, seq, h) else {
                    return true;
                };
                let overlaps = hd.lun == lun
                    && hd.offset < offset.saturating_add(len)
                    && offset < hd.offset.saturating_add(u64::from(hd.len));
                let forget = overlaps
                    && matches!(hd.kind, RecordKind::Data | RecordKind::Zero)
                    && !pin.as_ref().is_some_and(|pinned| pinned(hd.lun, hd.offset));
                forgotten += usize::from(forget);
                !forget
            });
        }
        forgotten
    }

    /// With a medium per node: tries again the releases that kept their copies because
    /// marking our medium outdated for those it would drop unwritten failed
    /// (`mark_before_drop`). Each later release tries again too, but a last one (the
    /// partner writes nothing more to that partition) would leave the copies held and our
    /// medium without their writes and unmarked for good (simulator seed 12144 with
    /// `--voter-table --voter-tries 1 --storage own --local-reads`). How many partitions
    /// still keep such copies.
    pub fn retry_kept_releases(&self) -> usize {
        if !self.own_medium_kept() || self.until_logged.load(std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        let kept: Vec<(u32, u64)> = self
            .held()
            .iter()
            .enumerate()
            .filter(|(_, pp)| {
                pp.heard_flushed > pp.released
                    && pp.records.range(..=pp.heard_flushed).next().is_some()
            })
            .map(|(p, pp)| (p as u32, pp.heard_flushed))
            .collect();
        let mut still = 0;
        for (partition, heard) in kept {
            if self.mark_before_drop(partition, heard) {
                self.release_held(partition, heard);
            } else {
                still += 1;
            }
        }
        still
    }

    pub fn clear(&self) {
        for m in self.held().iter_mut() {
            m.records.clear();
        }
    }

    /// Takeover: replays every unreleased record of the partner into the medium, partition
    /// by partition in sequence order, then syncs.
    ///
    /// The held records are replayed as a set, not followed as a chain: mirror posts
    /// complete out of order, so a record may be here while an older one (in flight when
    /// the partner died, hence never acknowledged) is not. Every acknowledged record is
    /// here, because the partner acknowledges only after our persist.
    /// `progress` hears (records, bytes) replayed so far after every record. Records at or
    /// below the partner's flush `marks` are skipped: they are on the medium already, and
    /// newer writes the partner made without a mirror may have overwritten them there.
    /// Only records `selected(lun, offset)` approves are replayed (and forgotten); the
    /// others stay held for a later takeover of their ranges. `claimed_epoch(lun, offset)`
    /// is the epoch the takeover holds the record's range under: the partner's void records
    /// written under it or later do not kill records for this replay (`nvram::void`).
    pub fn replay_into(
        &self,
        luns: &[Arc<Lun>],
        marks: Option<&FlushMarks>,
        selected: &dyn Fn(u32, u64) -> bool,
        claimed_epoch: &dyn Fn(u32, u64) -> Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<SecondStoreReplay, ReplayError> {
        let mut report = SecondStoreReplay::default();
        let held: Vec<BTreeMap<u64, Held>> = self
            .held()
            .iter()
            .map(|p| p.records.iter().map(|(s, h)| (*s, *h)).collect())
            .collect();
        let mut applier = Applier::new(luns);
        let mut done: Vec<Vec<u64>> = vec![Vec::new(); held.len()];
        for (p, records) in held.iter().enumerate() {
            let log = self.partition_log(p as u32);
            let dead = self.void_marks(log, p as u32, records.iter());
            let mut log_id = None;
            for (&seq, held) in records {
                let Some(header) = self.held_header(log, p as u32, seq, held) else {
                    // Space is reused only after the partner flushed the record, so a record
                    // overwritten by a newer one is already on the medium.
                    tracing::warn!(partition = p, seq, "mirrored record was overwritten by a newer one (already flushed by the partner); skipped");
                    report.overwritten += 1;
                    done[p].push(seq);
                    continue;
                };
                if !selected(header.lun, header.offset) {
                    continue;
                }
                done[p].push(seq);
                if *log_id.get_or_insert(header.log_id) != header.log_id {
                    return Err(ReplayError::Corrupt(format!(
                        "partition {p}: mirrored records of two different logs (seq {seq})"
                    )));
                }
                let marks = marks.filter(|m| m.log_id == header.log_id);
                let flushed = marks
                    .map(|m| {
                        // A range its old owner lost to this claim: its records above the
                        // bound died there unwritten (`FlushMarks::lost`).
                        let range = luns
                            .get(header.lun as usize)
                            .map_or(u32::MAX, |l| l.range_of(header.offset));
                        let claimed = claimed_epoch(header.lun, header.offset);
                        m.flushed_bound(p as u32, header.lun, range, claimed)
                    })
                    .unwrap_or(0);
                if seq <= flushed {
                    report.skipped_already_flushed += 1;
                    continue;
                }
                // Voided by the partner where we never saw the void record (its flush marks).
                let range = luns
                    .get(header.lun as usize)
                    .map_or(u32::MAX, |l| l.range_of(header.offset));
                let claimed = claimed_epoch(header.lun, header.offset);
                if marks.is_some_and(|m| m.voided_kills(p as u32, header.lun, range, seq, claimed))
                {
                    report.dead += 1;
                    continue;
                }
                if dead.kill_in_replay(
                    header.lun,
                    header.offset,
                    header.len as u64,
                    seq,
                    claimed_epoch(header.lun, header.offset),
                ) {
                    report.dead += 1;
                    continue;
                }
                let data = self.record_data(log, held, &header).ok_or_else(|| {
                    ReplayError::Damaged(CorruptRecord {
                        partition: p as u32,
                        seq,
                        pos: held.pos,
                        problem: "damaged (data checksum mismatch) in the second store".into(),
                        proof_seq: seq,
                    })
                })?;
                applier
                    .apply(&record_write(p as u32, &header, data))
                    .map_err(ReplayError::Apply)?;
                let so_far = applier.applied();
                progress(so_far.records as u64, so_far.bytes);
            }
        }
        let Applied { records, bytes } = applier.sync().map_err(ReplayError::Apply)?;
        report.records = records;
        report.bytes = bytes;
        let mut now_held = self.held();
        for (p, seqs) in done.iter().enumerate() {
            if let Some(m) = now_held.get_mut(p) {
                for seq in seqs {
                    m.records.remove(seq);
                }
                // Replayed records are on the medium: released, so that a restart of this
                // node does not hold (and a later takeover replay) them again. The watermark
                // stops below the oldest record still held.
                let through = match m.records.keys().next() {
                    Some(&oldest) => oldest - 1,
                    None => seqs.iter().copied().max().unwrap_or(0),
                };
                if through > m.released {
                    m.released = through;
                    self.write_watermark(p as u32, m);
                }
            }
        }
        Ok(report)
    }

    /// What the void records among `records` of partner partition `p` kill (`nvram::void`).
    fn void_marks<'a>(
        &self,
        log: &[u8],
        p: u32,
        records: impl Iterator<Item = (&'a u64, &'a Held)>,
    ) -> VoidMarks {
        let voids: Vec<(RecordHeader, &[u8])> = records
            .filter_map(|(&seq, held)| {
                let header = self.held_header(log, p, seq, held)?;
                if header.kind != RecordKind::Void {
                    return None;
                }
                Some((header, self.record_data(log, held, &header)?))
            })
            .collect();
        VoidMarks::of_records(voids.iter().map(|(h, d)| (h, *d)))
    }

    /// The bytes of the partner's partition `p` in our NVRAM.
    fn partition_log(&self, p: u32) -> &[u8] {
        let part_base = self.base + p as u64 * self.layout.part_size;
        self.region.slice(part_base, self.layout.part_size as usize)
    }

    /// The header of held record `seq`, if it is still the record we were told about.
    fn held_header(&self, log: &[u8], p: u32, seq: u64, held: &Held) -> Option<RecordHeader> {
        self.held_header_any(log, p, held).filter(|h| h.seq == seq)
    }

    /// The intact header of partition `p` at `held.pos`, if there is one.
    fn held_header_any(&self, log: &[u8], p: u32, held: &Held) -> Option<RecordHeader> {
        let at = usize::try_from(held.pos).ok()?;
        match RecordHeader::decode(log.get(at..)?) {
            Ok(h) if h.partition == p => Some(h),
            _ => None,
        }
    }

    /// A held record's payload, if it fits its partition and matches its checksum.
    fn record_data<'a>(
        &self,
        log: &'a [u8],
        held: &Held,
        header: &RecordHeader,
    ) -> Option<&'a [u8]> {
        let at = usize::try_from(held.pos).ok()?;
        if held.pos.checked_add(header.slot())? > self.layout.part_size {
            return None;
        }
        let start = at + HEADER_BYTES as usize;
        let data = log.get(start..start + header.data_len as usize)?;
        (rdma_link::checksum::crc32c(data) == header.data_crc).then_some(data)
    }
}

/// A mirrored record as a medium write.
fn record_write<'a>(partition: u32, h: &RecordHeader, data: &'a [u8]) -> RecordWrite<'a> {
    RecordWrite {
        partition,
        seq: h.seq,
        kind: h.kind,
        lun: h.lun,
        offset: h.offset,
        len: h.len as u64,
        data,
    }
}

/// What a takeover's replay of the second store did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondStoreReplay {
    pub records: usize,
    pub bytes: u64,
    /// Held records a newer record overwrote: the partner flushed them before reusing space.
    pub overwritten: usize,
    /// Records at or below the partner's flush marks: on the medium already.
    pub skipped_already_flushed: usize,
    /// Records of a range the partner lost after staging them (killed by its void record).
    pub dead: usize,
}

impl SecondStoreArea {
    /// The partner's path to the medium failed: write its mirrored records `first..=last` of
    /// `partition` (exactly `count` of them must be here) through ours, then forget them.
    /// `allowed(lun, offset)` must approve every record (the range is still the partner's).
    pub fn write_for_partner(
        &self,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
        luns: &[Arc<Lun>],
        allowed: &dyn Fn(u32, u64) -> Result<bool, String>,
    ) -> Result<usize, String> {
        let held: Vec<(u64, Held)> = self
            .held()
            .get(partition as usize)
            .map(|m| {
                m.records
                    .range(first..=last)
                    .map(|(s, h)| (*s, *h))
                    .collect()
            })
            .unwrap_or_default();
        if held.len() != count {
            let have: std::collections::BTreeSet<u64> = held.iter().map(|(s, _)| *s).collect();
            let lacking: Vec<u64> = (first..=last)
                .filter(|s| !have.contains(s))
                .take(8)
                .collect();
            return Err(format!(
                "partition {partition}: {} of the {count} records {first}..={last} are in the second store (some were never mirrored; not held: {lacking:?}, wrap markers among them)",
                held.len()
            ));
        }
        if partition >= self.layout.partitions {
            return Err(format!("partition {partition} does not exist"));
        }
        let every_held: Vec<(u64, Held)> = self
            .held()
            .get(partition as usize)
            .map(|m| m.records.iter().map(|(s, h)| (*s, *h)).collect())
            .unwrap_or_default();
        let older = self.older_unasked(first, &every_held);
        let mut applier = Applier::new(luns);
        let asked_from = held.first().map_or(first, |(s, _)| *s);
        let records: Vec<(u64, Held)> = older.iter().chain(&held).copied().collect();
        self.apply_held(
            partition,
            &records,
            &every_held,
            asked_from,
            &mut applier,
            allowed,
        )?;
        applier.sync().map_err(|e| e.to_string())?;
        self.release_held(partition, last);
        Ok(older.len() + held.len())
    }

    /// With a medium per node the partner's request is the normal way its records reach
    /// ours: older held copies it never asked for (it replayed them itself at a restart) go
    /// first, in sequence order, so that our medium applies its writes in its order.
    fn older_unasked(&self, first: u64, every_held: &[(u64, Held)]) -> Vec<(u64, Held)> {
        if !self.own_medium_kept() {
            return Vec::new();
        }
        every_held
            .iter()
            .filter(|(s, _)| *s < first)
            .copied()
            .collect()
    }

    /// Applies held copies `records` of `partition` (in order) through `applier`, skipping
    /// dead and void ones; a copy of a range that is no longer the partner's is skipped if
    /// older than `asked_from` (the new owner replayed it, or it was never acknowledged),
    /// else an error.
    fn apply_held(
        &self,
        partition: u32,
        records: &[(u64, Held)],
        every_held: &[(u64, Held)],
        asked_from: u64,
        applier: &mut Applier<'_>,
        allowed: &dyn Fn(u32, u64) -> Result<bool, String>,
    ) -> Result<(), String> {
        let log = self.partition_log(partition);
        let dead = self.void_marks(log, partition, every_held.iter().map(|(s, h)| (s, h)));
        for (seq, h) in records {
            let header = self
                .held_header(log, partition, *seq, h)
                .ok_or_else(|| format!("mirrored record seq {seq} is not intact"))?;
            let data = self.record_data(log, h, &header).ok_or_else(|| {
                format!(
                    "mirrored record seq {seq}: data checksum mismatch or outside its partition"
                )
            })?;
            if dead.covers(header.lun, header.offset, header.len as u64, *seq)
                || header.kind == RecordKind::Void
            {
                continue;
            }
            if !allowed(header.lun, header.offset)? {
                if *seq < asked_from {
                    continue;
                }
                return Err(format!(
                    "mirrored record seq {seq} is for a range that is no longer the partner's; not written"
                ));
            }
            applier
                .apply(&record_write(partition, &header, data))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// With a medium per node: the partner restarted with its medium outdated for ranges it
    /// replayed records of (see `engine::restart_sync`): writes every copy we hold of its
    /// `partition` through `through_seq` (in order; dead ones and those of ranges no longer
    /// the partner's skipped) to our medium, then drops them.
    pub fn write_held_for_partner(
        &self,
        partition: u32,
        through_seq: u64,
        luns: &[Arc<Lun>],
        allowed: &dyn Fn(u32, u64) -> Result<bool, String>,
    ) -> Result<usize, String> {
        if partition >= self.layout.partitions {
            return Err(format!("partition {partition} does not exist"));
        }
        let every_held: Vec<(u64, Held)> = self
            .held()
            .get(partition as usize)
            .map(|m| m.records.iter().map(|(s, h)| (*s, *h)).collect())
            .unwrap_or_default();
        let asked: Vec<(u64, Held)> = every_held
            .iter()
            .filter(|(s, _)| *s <= through_seq)
            .copied()
            .collect();
        let mut applier = Applier::new(luns);
        self.apply_held(
            partition,
            &asked,
            &every_held,
            u64::MAX,
            &mut applier,
            allowed,
        )?;
        applier.sync().map_err(|e| e.to_string())?;
        self.release_held(partition, through_seq);
        Ok(asked.len())
    }

    /// With a medium per node: the partner's medium failed a flush batch of `partition` and
    /// it sent the batch's records along (`shipped`, in seq order, through `through_seq`):
    /// writes them to our medium (not from our copies, which a link flap may have left
    /// incomplete). On the batch's first request the older copies it never asked for go
    /// first; after its last, our copies through `through_seq` go. `allowed` as for
    /// [`Self::write_for_partner`].
    #[allow(clippy::too_many_arguments)]
    pub fn write_shipped_for_partner(
        &self,
        partition: u32,
        through_seq: u64,
        chunk: (bool, bool),
        shipped: &[RecordWrite<'_>],
        luns: &[Arc<Lun>],
        allowed: &dyn Fn(u32, u64) -> Result<bool, String>,
    ) -> Result<usize, String> {
        if partition >= self.layout.partitions {
            return Err(format!("partition {partition} does not exist"));
        }
        let (first_chunk, last_chunk) = chunk;
        let mut applier = Applier::new(luns);
        let mut older = 0;
        if first_chunk {
            let every_held: Vec<(u64, Held)> = self
                .held()
                .get(partition as usize)
                .map(|m| m.records.iter().map(|(s, h)| (*s, *h)).collect())
                .unwrap_or_default();
            let below = shipped.first().map_or(through_seq + 1, |r| r.seq);
            let unasked = self.older_unasked(below, &every_held);
            self.apply_held(
                partition,
                &unasked,
                &every_held,
                below,
                &mut applier,
                allowed,
            )?;
            older = unasked.len();
        }
        for r in shipped {
            if !allowed(r.lun, r.offset)? {
                return Err(format!(
                    "shipped record seq {} is for a range that is no longer the partner's; not written",
                    r.seq
                ));
            }
            applier.apply(r).map_err(|e| e.to_string())?;
        }
        applier.sync().map_err(|e| e.to_string())?;
        if last_chunk {
            self.release_held(partition, through_seq);
        }
        Ok(older + shipped.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("mirrored record damaged: {0}")]
    Damaged(CorruptRecord),
    #[error("second store is inconsistent: {0}")]
    Corrupt(String),
    #[error("writing mirrored records to the medium failed: {0}")]
    Apply(ApplyError),
    #[error("writing mirrored records to the medium failed: {0}")]
    Medium(String),
}

impl rdma_link::SecondStore for SecondStoreArea {
    fn region(&self) -> Region {
        let (ptr, _) = self.region.raw_parts();
        // SAFETY: the second store is a sub-range of the NVRAM mapping, which lives as long as
        // this area (it holds an Arc of the region); the partner writes only inside it.
        match unsafe {
            Region::new(
                ptr.add(self.base as usize),
                self.layout.second_store_len() as usize,
            )
        } {
            Ok(r) => r,
            Err(_) => Region::leaked(0),
        }
    }

    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.region.persist(self.base + offset, len)
    }

    /// Holds a record the partner's post just made durable here, or says why it cannot: the
    /// partner's post then fails instead of counting a copy nobody could replay.
    fn hold_record(&self, partition: u32, seq: u64, offset: u64, len: u32) -> Result<(), String> {
        let part_size = self.layout.part_size;
        if partition >= self.layout.partitions || offset / part_size != partition as u64 {
            tracing::warn!(
                partition,
                seq,
                offset,
                "mirrored record outside its partition; refused"
            );
            return Err(format!(
                "record {seq} of partition {partition} at second-store offset {offset} is outside that partition here ({} partitions of {part_size} bytes): the nodes' layouts differ",
                self.layout.partitions
            ));
        }
        let pos = offset % part_size;
        // The bytes are in place (persisted before this call): the header says which log.
        let header = self.held_header(
            self.partition_log(partition),
            partition,
            seq,
            &Held {
                len,
                ..Held::probe(pos)
            },
        );
        let Some(header) = header else {
            tracing::warn!(
                partition,
                seq,
                "mirrored record not intact after its persist; refused"
            );
            return Err(format!(
                "record {seq} of partition {partition} is not intact in the second store after its persist"
            ));
        };
        let old_log_dropped = self.held().get(partition as usize).is_some_and(|pp| {
            pp.log_id.is_some_and(|l| l != header.log_id) && !pp.records.is_empty()
        });
        if old_log_dropped && !self.mark_before_drop(partition, u64::MAX) {
            return Err(format!(
                "partition {partition}: the partner's log changed and our medium lacks copies of its old log that could not be marked outdated"
            ));
        }
        let mut held = self.held();
        let Some(pp) = held.get_mut(partition as usize) else {
            return Err(format!("partition {partition} has no second store here"));
        };
        if pp.log_id != Some(header.log_id) {
            // A new log of the partner: it replayed its old one before formatting, so
            // nothing of the old log is needed any more.
            if pp.log_id.is_some()
                && self.until_logged.load(std::sync::atomic::Ordering::Relaxed)
                && !pp.records.is_empty()
            {
                tracing::warn!(
                    partition,
                    "the source's log changed (it reformatted its NVRAM): {} record(s) of its old log were not in the log files yet and are dropped (the source replayed them into its medium before formatting)",
                    pp.records.len()
                );
                if let (Some(old), Some(first), Some(last)) = (
                    pp.log_id,
                    pp.records.keys().next().copied(),
                    pp.records.keys().next_back().copied(),
                ) {
                    self.dropped_unlogged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((partition, old, first, last));
                }
            } else if pp.log_id.is_some() {
                tracing::info!(
                    partition,
                    "the partner's log changed (it reformatted its NVRAM): dropping {} record(s) of its old log",
                    pp.records.len()
                );
            }
            pp.records.clear();
            pp.log_id = Some(header.log_id);
            pp.released = 0;
            pp.heard_flushed = 0;
            self.write_watermark(partition, pp);
        }
        // A copy of a record the partner already flushed and released (a re-mirror that
        // crossed the release) is stale: never hold it again.
        if seq > pp.released {
            pp.records.insert(seq, Held::of(pos, &header));
        }
        Ok(())
    }

    fn on_release(&self, partition: u32, through_seq: u64) {
        if let Some(pp) = self.held().get_mut(partition as usize) {
            pp.heard_flushed = pp.heard_flushed.max(through_seq);
        }
        if self.until_logged.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if self.mark_before_drop(partition, through_seq) {
            self.release_held(partition, through_seq);
        }
    }

    fn resync_point(&self) -> ResyncPoint {
        ResyncPoint {
            first_store: Vec::new(),
            second_store: self
                .held()
                .iter()
                .enumerate()
                .filter_map(|(p, m)| {
                    m.records.keys().next_back().map(|&seq| PartitionSeq {
                        partition: p as u32,
                        seq,
                    })
                })
                .collect(),
        }
    }
}
