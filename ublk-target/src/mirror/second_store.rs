//! The second store: the part of our NVRAM that holds the partner's partitions, with the
//! same geometry as its first store (a record at offset X of the partner's partition log sits
//! at offset X of the matching partition here). The mirror link lands the partner's records
//! here (`rdma_link::SecondStore`); this area tracks which are unreleased, and on a takeover
//! replays them into the medium, or writes them for a partner whose medium path failed.

use crate::apply::{Applied, Applier, ApplyError, RecordWrite};
use crate::lun::Lun;
use crate::nvram::record::{RecordHeader, HEADER_BYTES};
use crate::nvram::scan::CorruptRecord;
use crate::nvram::{Layout, NvramRegion};
use crate::ownership::FlushMarks;
use rdma_link::{PartitionSeq, Region, ResyncPoint};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Copy, Debug)]
struct Held {
    pos: u64,
    len: u32,
}

/// The partner's partitions inside our NVRAM.
pub struct SecondStoreArea {
    region: Arc<NvramRegion>,
    layout: Layout,
    base: u64,
    /// Per partition: unreleased records by seq.
    held: Mutex<Vec<BTreeMap<u64, Held>>>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SecondStoreStatus {
    pub records: usize,
    pub bytes: u64,
    pub capacity_bytes: u64,
}

impl SecondStoreArea {
    pub fn new(region: Arc<NvramRegion>, layout: Layout) -> Option<Arc<SecondStoreArea>> {
        let base = layout.second_store_offset()?;
        Some(Arc::new(SecondStoreArea {
            region,
            layout,
            base,
            held: Mutex::new(vec![BTreeMap::new(); layout.partitions as usize]),
        }))
    }

    fn held(&self) -> MutexGuard<'_, Vec<BTreeMap<u64, Held>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> SecondStoreStatus {
        let held = self.held();
        SecondStoreStatus {
            records: held.iter().map(|m| m.len()).sum(),
            bytes: held
                .iter()
                .flat_map(|m| m.values())
                .map(|h| h.len as u64)
                .sum(),
            capacity_bytes: self.layout.second_store_len(),
        }
    }

    /// Forgets everything (the partner restarts mirroring from scratch).
    pub fn clear(&self) {
        for m in self.held().iter_mut() {
            m.clear();
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
    /// others stay held for a later takeover of their ranges.
    pub fn replay_into(
        &self,
        luns: &[Arc<Lun>],
        marks: Option<&FlushMarks>,
        selected: &dyn Fn(u32, u64) -> bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<SecondStoreReplay, ReplayError> {
        let mut report = SecondStoreReplay::default();
        let held: Vec<BTreeMap<u64, Held>> = self.held().clone();
        let mut applier = Applier::new(luns);
        let mut done: Vec<Vec<u64>> = vec![Vec::new(); held.len()];
        for (p, records) in held.iter().enumerate() {
            let log = self.partition_log(p as u32);
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
                let flushed = marks
                    .filter(|m| m.log_id == header.log_id)
                    .and_then(|m| m.flushed_through.get(p).copied())
                    .unwrap_or(0);
                if seq <= flushed {
                    report.skipped_already_flushed += 1;
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
                    m.remove(seq);
                }
            }
        }
        Ok(report)
    }

    /// The bytes of the partner's partition `p` in our NVRAM.
    fn partition_log(&self, p: u32) -> &[u8] {
        let part_base = self.base + p as u64 * self.layout.part_size;
        self.region.slice(part_base, self.layout.part_size as usize)
    }

    /// The header of held record `seq`, if it is still the record we were told about.
    fn held_header(&self, log: &[u8], p: u32, seq: u64, held: &Held) -> Option<RecordHeader> {
        let at = usize::try_from(held.pos).ok()?;
        match RecordHeader::decode(log.get(at..)?) {
            Ok(h) if h.seq == seq && h.partition == p => Some(h),
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
        (crc32c::crc32c(data) == header.data_crc).then_some(data)
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
}

impl SecondStoreArea {
    /// The partner's path to the medium failed: write its mirrored records `first..=last` of
    /// `partition` (exactly `count` of them must be here) through ours, then forget them.
    pub fn write_for_partner(
        &self,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
        luns: &[Arc<Lun>],
    ) -> Result<usize, String> {
        let held: Vec<(u64, Held)> = self
            .held()
            .get(partition as usize)
            .map(|m| m.range(first..=last).map(|(s, h)| (*s, *h)).collect())
            .unwrap_or_default();
        if held.len() != count {
            return Err(format!(
                "partition {partition}: {} of the {count} records {first}..={last} are in the second store (some were never mirrored)",
                held.len()
            ));
        }
        if partition >= self.layout.partitions {
            return Err(format!("partition {partition} does not exist"));
        }
        let log = self.partition_log(partition);
        let mut applier = Applier::new(luns);
        for (seq, h) in &held {
            let header = self
                .held_header(log, partition, *seq, h)
                .ok_or_else(|| format!("mirrored record seq {seq} is not intact"))?;
            let data = self.record_data(log, h, &header).ok_or_else(|| {
                format!(
                    "mirrored record seq {seq}: data checksum mismatch or outside its partition"
                )
            })?;
            applier
                .apply(&record_write(partition, &header, data))
                .map_err(|e| e.to_string())?;
        }
        applier.sync().map_err(|e| e.to_string())?;
        rdma_link::SecondStore::on_release(self, partition, last);
        Ok(held.len())
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

    fn on_record(&self, partition: u32, seq: u64, offset: u64, len: u32) {
        let part_size = self.layout.part_size;
        if partition >= self.layout.partitions || offset / part_size != partition as u64 {
            tracing::warn!(
                partition,
                seq,
                offset,
                "mirrored record outside its partition; ignored"
            );
            return;
        }
        if let Some(m) = self.held().get_mut(partition as usize) {
            m.insert(
                seq,
                Held {
                    pos: offset % part_size,
                    len,
                },
            );
        }
    }

    fn on_release(&self, partition: u32, through_seq: u64) {
        if let Some(m) = self.held().get_mut(partition as usize) {
            *m = m.split_off(&(through_seq + 1));
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
                    m.keys().next_back().map(|&seq| PartitionSeq {
                        partition: p as u32,
                        seq,
                    })
                })
                .collect(),
        }
    }
}
