//! Mirroring: each record staged in this node's first store is copied into the partner's
//! second store, and the partner's records land in ours.
//!
//! * [`Mirror`] is what the engine posts through (the `rdma-link` `Link`, or a fake in tests).
//! * [`SecondStoreArea`] is the part of our NVRAM that holds the partner's partitions, with
//!   the same geometry as its first store: a record at offset X of the partner's partition
//!   log sits at offset X of the matching partition here. It tracks which records are
//!   unreleased, and on takeover replays them into the medium with the same scan the local
//!   restart uses.

use crate::engine::ReplayReport;
use crate::medium::Medium;
use crate::nvram::record::{RecordHeader, HEADER_BYTES};
use crate::nvram::scan::CorruptRecord;
use crate::nvram::{Layout, NvramRegion};
use rdma_link::{PartitionSeq, Post, Region, ResyncPoint};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

pub type PostFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where the engine sends copies of its records.
pub trait Mirror: Send + Sync {
    /// Resolves Ok once the partner reports the bytes durable in its second store.
    fn post(&self, post: Post) -> PostFuture;
    /// The partner may reclaim everything of `partition` up to `through_seq`.
    fn release(&self, partition: u32, through_seq: u64);
    fn describe(&self) -> String;
    /// Connected now (mirroring possible)?
    fn is_up(&self) -> bool {
        true
    }
    /// Transport name while connected ("tcp", "rdma").
    fn transport(&self) -> Option<&'static str> {
        None
    }
    /// Heartbeat round trip, if measured.
    fn rtt(&self) -> Option<std::time::Duration> {
        None
    }
}

impl Mirror for rdma_link::Link {
    fn post(&self, post: Post) -> PostFuture {
        // Handed to the link now: the record travels while the caller persists its own copy.
        let sent = rdma_link::Link::post(self, post);
        Box::pin(async move { sent.await.map_err(|e| e.to_string()) })
    }
    fn release(&self, partition: u32, through_seq: u64) {
        // While the link is down the partner's second store is rebuilt on reconnect anyway.
        let _ = rdma_link::Link::release(self, partition, through_seq);
    }
    fn describe(&self) -> String {
        format!("{:?}", self.state())
    }
    fn is_up(&self) -> bool {
        self.state().is_up()
    }
    fn transport(&self) -> Option<&'static str> {
        match self.state() {
            rdma_link::LinkState::Up(info) => Some(info.transport.name()),
            _ => None,
        }
    }
    fn rtt(&self) -> Option<std::time::Duration> {
        rdma_link::Link::rtt(self)
    }
}

/// What to do with a write whose mirror copy could not be made (partner down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DegradedPolicy {
    /// Acknowledge only once the write is on the medium: still two copies (NVRAM + medium).
    WriteThrough,
    /// Acknowledge from the local NVRAM alone: fast, but a single copy until it is flushed.
    Nvram,
}

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
        media: &[Arc<dyn Medium>],
        marks: Option<&crate::ownership::FlushMarks>,
        selected: &dyn Fn(u32, u64) -> bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ReplayReport, ReplayError> {
        let started = std::time::Instant::now();
        let mut report = ReplayReport::default();
        let held: Vec<BTreeMap<u64, Held>> = self.held().clone();
        let mut touched = vec![false; media.len()];
        let mut done: Vec<Vec<u64>> = vec![Vec::new(); held.len()];
        for (p, records) in held.iter().enumerate() {
            let part_base = self.base + p as u64 * self.layout.part_size;
            let log = self.region.slice(part_base, self.layout.part_size as usize);
            let mut log_id = None;
            for (&seq, held) in records {
                let at = held.pos as usize;
                let header = match RecordHeader::decode(&log[at..]) {
                    Ok(h) if h.seq == seq && h.partition == p as u32 => h,
                    // Space is reused only after the partner flushed the record, so a record
                    // overwritten by a newer one is already on the medium.
                    _ => {
                        tracing::warn!(partition = p, seq, "mirrored record was overwritten by a newer one (already flushed by the partner); skipped");
                        report.discarded_unacknowledged += 1;
                        done[p].push(seq);
                        continue;
                    }
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
                let data = &log[at + HEADER_BYTES as usize
                    ..at + HEADER_BYTES as usize + header.data_len as usize];
                if at as u64 + header.slot() > self.layout.part_size
                    || crc32c::crc32c(data) != header.data_crc
                {
                    return Err(ReplayError::Damaged(CorruptRecord {
                        partition: p as u32,
                        seq,
                        pos: held.pos,
                        problem: "damaged (data checksum mismatch) in the second store".into(),
                        proof_seq: seq,
                    }));
                }
                let medium = media.get(header.lun as usize).ok_or_else(|| {
                    ReplayError::Corrupt(format!(
                        "record seq {seq} names LUN {} which is not configured",
                        header.lun
                    ))
                })?;
                crate::medium::apply_record(
                    medium.as_ref(),
                    header.kind,
                    header.offset,
                    header.len as u64,
                    data,
                )
                .map_err(|e| ReplayError::Medium(format!("seq {seq}: {e}")))?;
                touched[header.lun as usize] = true;
                report.records += 1;
                report.bytes += header.len as u64;
                progress(report.records as u64, report.bytes);
            }
        }
        for (i, medium) in media.iter().enumerate() {
            if touched[i] {
                medium.sync().map_err(|e| {
                    ReplayError::Medium(format!("syncing {}: {e}", medium.describe()))
                })?;
            }
        }
        let mut now_held = self.held();
        for (p, seqs) in done.iter().enumerate() {
            if let Some(m) = now_held.get_mut(p) {
                for seq in seqs {
                    m.remove(seq);
                }
            }
        }
        drop(now_held);
        report.millis = started.elapsed().as_millis() as u64;
        Ok(report)
    }
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
        media: &[Arc<dyn Medium>],
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
        let part_base = self.base + partition as u64 * self.layout.part_size;
        let log = self.region.slice(part_base, self.layout.part_size as usize);
        let mut touched = vec![false; media.len()];
        for (seq, h) in &held {
            let at = h.pos as usize;
            let header = match RecordHeader::decode(&log[at..]) {
                Ok(hd) if hd.seq == *seq => hd,
                _ => return Err(format!("mirrored record seq {seq} is not intact")),
            };
            let end = at + HEADER_BYTES as usize + header.data_len as usize;
            if end > log.len() {
                return Err(format!("mirrored record seq {seq} exceeds its partition"));
            }
            let data = &log[at + HEADER_BYTES as usize..end];
            if crc32c::crc32c(data) != header.data_crc {
                return Err(format!("mirrored record seq {seq}: data checksum mismatch"));
            }
            let medium = media
                .get(header.lun as usize)
                .ok_or_else(|| format!("record seq {seq} names an unknown LUN"))?;
            crate::medium::apply_record(
                medium.as_ref(),
                header.kind,
                header.offset,
                header.len as u64,
                data,
            )
            .map_err(|e| format!("writing seq {seq}: {e}"))?;
            touched[header.lun as usize] = true;
        }
        for (i, m) in media.iter().enumerate() {
            if touched[i] {
                m.sync()
                    .map_err(|e| format!("syncing {}: {e}", m.describe()))?;
            }
        }
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
