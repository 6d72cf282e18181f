//! The flusher: moves durable records from a partition log to the medium, in sequence
//! order, then releases their log space.
//!
//! Order of one batch: ask the node whether it may still write the batch's ranges (fencing)
//! -> write every record and sync each medium touched (`apply`) -> let the node record it
//! (flush marks; with a medium per node, the partner writes the batch to its own) -> drop the records from the staged-extent index (reads now go to the
//! medium) -> `release` (checkpoint first, then the space is reusable) -> tell the node,
//! which tells the partner to drop its copies. A medium error stops the batch: the partner
//! may write it from its mirror ([`FlushContext::delegate`]) or, each node with its own
//! medium, take it with its data sent along ([`FlushContext::ship_to_partner`]); otherwise it
//! is retried after a pause. Records are never dropped, and writers feel back-pressure once the log is full.
//!
//! The flusher knows nothing of clusters or links: everything around a batch is asked of a
//! [`FlushContext`], which the engine implements (and a test or the simulator may too).

pub use crate::apply::Fence;
use crate::apply::{Applier, ApplyError, RecordWrite};
use crate::copy_fence::{CopyFence, Holder};
use crate::host::{BoxFuture, Host};
use crate::log::{PartitionLog, RecordMeta};
use crate::lun::Lun;
use crate::nvram::record::{RecordKind, HEADER_BYTES};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the flusher asks of the rest of the node around each batch.
pub trait FlushContext: Send + Sync {
    /// Fencing, before the batch is written: may this node still write its ranges?
    fn check_fence(&self, batch: &[RecordMeta]) -> Result<(), Fence>;
    /// Before each medium write of the batch (cheap): may this node still write the medium
    /// for as long as one write may take? (Its disk lease.)
    fn may_write(&self) -> Result<(), Fence> {
        Ok(())
    }
    /// The batch (`written`: its records that went to the medium, `through_seq`: its last
    /// record) is on the medium (synced) and does not count as flushed yet (nor as a
    /// write-through acknowledgement): e.g. leave flush marks while the partner is away.
    fn on_synced(
        &self,
        partition: u32,
        through_seq: u64,
        written: &[RecordMeta],
    ) -> Result<(), Fence>;
    /// The batch (`batch`, of which `live` went to our medium) is synced there. With a
    /// medium per node, the partner's must hold it too before the log space is released
    /// (or be marked as missing it). Default: nothing to do (one shared medium).
    fn copy_to_partner<'d>(
        &self,
        _partition: u32,
        _batch: &[RecordMeta],
        _live: &[RecordMeta],
        _data_of: &dyn Fn(&RecordMeta) -> &'d [u8],
    ) -> BoxFuture<Result<(), Fence>> {
        Box::pin(async { Ok(()) })
    }
    /// With a medium per node: the fence that orders a resync's copies against batches
    /// (`copy_fence`). A batch holds its extents in it from its medium write to the end of
    /// `copy_to_partner`. Default: none (one shared medium).
    fn copy_fence(&self) -> Option<&Arc<CopyFence>> {
        None
    }
    /// With a medium per node, our medium failed the batch (`live`: its records to write,
    /// through seq `through_seq`): the partner's medium takes them, their data sent along
    /// (`data_of`), once ours is marked as missing them. None: not this node's way (one
    /// shared medium: [`Self::delegate`]).
    fn ship_to_partner<'d>(
        &self,
        _partition: u32,
        _through_seq: u64,
        _live: &[RecordMeta],
        _data_of: &dyn Fn(&RecordMeta) -> &'d [u8],
    ) -> Option<BoxFuture<Result<(), String>>> {
        None
    }
    /// The batch is flushed and its log space released: the partner may drop its copies.
    fn on_released(&self, partition: u32, through_seq: u64);
    /// Our path to the medium failed: ask the partner to write `batch`, records
    /// `first..=last` of `partition` (`count` data records), from its second store.
    fn delegate(
        &self,
        partition: u32,
        batch: &[RecordMeta],
        first: u64,
        last: u64,
        count: usize,
    ) -> BoxFuture<Result<(), String>>;
}

#[derive(Default)]
pub struct FlusherStats {
    pub bytes_flushed: AtomicU64,
    pub batches: AtomicU64,
    pub medium_errors: AtomicU64,
    /// Batches the partner wrote for us because our medium path failed.
    pub delegated_batches: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl FlusherStats {
    fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e;
        }
    }
}

/// When the flusher writes: batches of at most `batch_bytes` (one medium sync each); a
/// small batch waits up to `linger` to grow, so at low load one sync covers many records
/// and the flusher does not compete with the write path for CPU (records are durable in
/// NVRAM meanwhile, mirrored on a cluster).
#[derive(Clone, Copy, Debug)]
pub struct FlushPolicy {
    pub batch_bytes: u64,
    pub linger: Duration,
}

/// One partition's flusher; [`Flusher::run`] is its background task.
pub struct Flusher {
    pub log: Arc<PartitionLog>,
    pub luns: Arc<Vec<Arc<Lun>>>,
    pub policy: FlushPolicy,
    pub stats: Arc<FlusherStats>,
    pub context: Arc<dyn FlushContext>,
    pub host: Arc<dyn Host>,
}

/// Longest pause between two attempts of a batch whose medium write keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Flusher {
    /// Flushes until the log shuts down, or for good stops once the partition is fenced.
    pub async fn run(self) {
        let log = &self.log;
        let mut backoff = Duration::from_millis(10);
        while let Some(batch) = log
            .next_flush_batch(self.policy.batch_bytes, self.policy.linger)
            .await
        {
            // Dead records (of a range this node lost meanwhile, see `nvram::void`) are
            // released unwritten; only the live ones are fenced and written.
            let live = log.live_records(&batch);
            let through_seq = batch.last().map_or(0, |r| r.seq);
            let dead: Vec<u64> = batch
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
                .filter(|r| !live.iter().any(|l| l.seq == r.seq))
                .map(|r| r.seq)
                .collect();
            if !dead.is_empty() {
                tracing::info!(
                    partition = log.id,
                    "released unwritten: {} dead record(s) (seq {:?}) of ranges this node lost after staging them",
                    dead.len(),
                    dead
                );
            }
            // No resync copy of these extents may run between our medium write and the
            // partner's (held until this batch is done or about to back off).
            let fenced = match self.context.copy_fence() {
                Some(fence) => {
                    let extents: Vec<_> = live
                        .iter()
                        .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
                        .map(|r| (r.lun, r.offset, r.len))
                        .collect();
                    Some(fence.enter(Holder::Batch, &extents).await)
                }
                None => None,
            };
            // A failed medium write and an unreadable table both mean our path to the medium
            // fails: retry, or let the partner write from its mirror.
            let written = self.context.check_fence(&live).and_then(|()| {
                let bytes = write_batch(&self.luns, log, &live, self.context.as_ref())?;
                self.context.on_synced(log.id, through_seq, &live)?;
                Ok(bytes)
            });
            let written = match written {
                Ok(bytes) => self
                    .context
                    .copy_to_partner(log.id, &batch, &live, &|r| record_data(log, r))
                    .await
                    .map(|()| bytes),
                Err(e) => Err(e),
            };
            let failure = match written {
                Ok(bytes) => match finish_batch(log, &self.luns, &batch) {
                    Ok(()) => {
                        self.batch_done(&batch, bytes);
                        backoff = Duration::from_millis(10);
                        continue;
                    }
                    Err(e) => e,
                },
                Err(Fence::Unreadable(why)) => why,
                Err(Fence::Suspended(why)) => {
                    self.stats.set_last_error(Some(why));
                    // A resync chunk may copy these extents while we wait: the next attempt
                    // writes both media again.
                    drop(fenced);
                    self.host.sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(Fence::Lost(why)) => {
                    tracing::error!(
                        partition = log.id,
                        "{why}; this partition stops flushing and fails its writes"
                    );
                    self.stats.set_last_error(Some(why.clone()));
                    log.fence(why);
                    return;
                }
            };
            self.stats.medium_errors.fetch_add(1, Ordering::Relaxed);
            let data_of = |r: &RecordMeta| record_data(log, r);
            let ship = self
                .context
                .ship_to_partner(log.id, through_seq, &live, &data_of);
            let shipping = ship.is_some();
            if let Some(ship) = ship {
                let shipped = match ship.await {
                    Ok(()) => finish_batch(log, &self.luns, &batch),
                    Err(why) => Err(why),
                };
                match shipped {
                    Ok(()) => {
                        self.partner_took(&batch, &failure, "took the batch, sent along");
                        backoff = Duration::from_millis(10);
                        continue;
                    }
                    Err(why) => tracing::warn!(
                        partition = log.id,
                        "the partner's medium could not take the batch our medium failed: {why}"
                    ),
                }
            }
            // The partner writes a batch by its seqs: not one with dead or void records (it
            // may hold the dead ones without the void record that kills them).
            let delegable = batch
                .iter()
                .filter(|r| r.kind != RecordKind::Wrap)
                .map(|r| r.seq)
                .eq(live.iter().map(|r| r.seq));
            if !shipping && delegable && self.delegated(&batch, &failure).await {
                continue;
            }
            tracing::error!(
                partition = log.id,
                "flush to medium failed: {failure}; records stay staged, retrying in {backoff:?}"
            );
            self.stats.set_last_error(Some(failure));
            drop(fenced);
            self.host.sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn batch_done(&self, batch: &[RecordMeta], bytes: u64) {
        if let Some(last) = batch.last() {
            let through = self.log.partner_may_release(last.seq);
            self.context.on_released(self.log.id, through);
        }
        self.stats.bytes_flushed.fetch_add(bytes, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.set_last_error(None);
    }

    /// The partner's medium took a batch ours failed (`how`), and its log space is free.
    fn partner_took(&self, batch: &[RecordMeta], failure: &str, how: &str) {
        self.stats.delegated_batches.fetch_add(1, Ordering::Relaxed);
        let seqs = (batch.first().map(|r| r.seq), batch.last().map(|r| r.seq));
        if let (Some(first), Some(last)) = seqs {
            tracing::warn!(
                partition = self.log.id,
                "medium path failed ({failure}); the partner {how}: seq {first}..={last}"
            );
            let through = self.log.partner_may_release(last);
            self.context.on_released(self.log.id, through);
        }
        self.stats.set_last_error(Some(format!(
            "medium path failed, partner writes for us: {failure}"
        )));
    }

    /// Our path to the medium failed: the partner holds the same records in its second store
    /// and can write them through its own path. True if it did (the batch is released).
    async fn delegated(&self, batch: &[RecordMeta], failure: &str) -> bool {
        let log = &self.log;
        let data: Vec<&RecordMeta> = batch
            .iter()
            .filter(|r| r.kind != RecordKind::Wrap)
            .collect();
        let (Some(first), Some(last)) = (data.first(), data.last()) else {
            return false;
        };
        let done = match self
            .context
            .delegate(log.id, batch, first.seq, last.seq, data.len())
            .await
        {
            Ok(()) => finish_batch(log, &self.luns, batch),
            Err(why) => Err(why),
        };
        match done {
            Ok(()) => {
                self.partner_took(batch, failure, "wrote it from its mirror");
                true
            }
            Err(why) => {
                tracing::warn!(
                    partition = log.id,
                    "the partner could not write for us: {why}"
                );
                false
            }
        }
    }
}

/// Writes a batch to the medium and syncs it (not yet counted as flushed); returns its bytes.
/// The context's `may_write` gates every medium write (the applier merges adjacent records
/// into one write): a long batch must not outlive the node's right to write.
fn write_batch(
    luns: &[Arc<Lun>],
    log: &PartitionLog,
    batch: &[RecordMeta],
    context: &dyn FlushContext,
) -> Result<u64, Fence> {
    let fence_of = |e: ApplyError| match e {
        ApplyError::Fenced(fence) => fence,
        e => Fence::Unreadable(e.to_string()),
    };
    let gate = || context.may_write();
    let mut applier = Applier::gated(luns, &gate);
    for r in batch {
        let data = record_data(log, r);
        applier
            .apply(&RecordWrite {
                partition: log.id,
                seq: r.seq,
                kind: r.kind,
                lun: r.lun,
                offset: r.offset,
                len: r.len,
                data,
            })
            .map_err(fence_of)?;
    }
    Ok(applier.sync().map_err(fence_of)?.bytes)
}

/// The payload of a staged record in the NVRAM (empty unless a data record).
fn record_data<'a>(log: &'a PartitionLog, r: &RecordMeta) -> &'a [u8] {
    match r.kind {
        RecordKind::Data => log
            .region()
            .slice(log.nvram_offset(r.pos) + HEADER_BYTES, r.len as usize),
        _ => &[],
    }
}

/// Records unindexed under one acquisition of a LUN's index lock (each removal is a few
/// B-tree steps: the lock is held for microseconds).
const UNINDEX_RUN: usize = 64;

/// The batch is on the medium (written by us or by the partner): unindex, checkpoint,
/// free the space.
fn finish_batch(log: &PartitionLog, luns: &[Arc<Lun>], batch: &[RecordMeta]) -> Result<(), String> {
    // One lock of a LUN's index per run of records, not per record: the writers and readers
    // of that LUN take the same lock on every I/O. Runs stay short so none of them waits long.
    for run in batch.chunks(UNINDEX_RUN) {
        for (lun_idx, lun) in luns.iter().enumerate() {
            let mut mine = run
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
                .filter(|r| r.lun as usize == lun_idx)
                .peekable();
            if mine.peek().is_none() {
                continue;
            }
            let mut index = lun.index();
            for r in mine {
                index.remove_flushed(log.id, r.seq, r.offset, r.offset + r.len);
            }
        }
    }
    log.release(batch)
        .map_err(|e| format!("persisting the checkpoint of partition {}: {e}", log.id))
}
