//! The flusher: moves durable records from a partition log to the medium, in sequence
//! order, then releases their log space.
//!
//! Order of one batch: write every record -> sync each medium touched -> drop the records
//! from the staged-extent index (reads now go to the medium) -> `release` (checkpoint first,
//! then the space is reusable). A medium error stops the batch and retries it after a pause:
//! records are never dropped, and writers feel back-pressure once the log is full.

use crate::engine::Lun;
use crate::log::{PartitionLog, RecordMeta};
use crate::nvram::record::{RecordKind, HEADER_BYTES};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a batch may not be written through our path.
pub enum Fence {
    /// The ranges belong to the partner now: never write them again.
    Lost(String),
    /// The ownership table cannot be read through our path (the path is failing).
    Unreadable(String),
}

/// Says whether this node may still write a batch's ranges to the medium (fencing).
pub type FenceCheck = Arc<dyn Fn(&[RecordMeta]) -> Result<(), Fence> + Send + Sync>;

/// Runs once a batch is on the medium, before its writes count as flushed (and before a
/// write-through acknowledgement): with the partner unreachable it leaves flush marks on the
/// medium and re-checks ownership (see [`crate::ownership::FlushMarks`]).
pub type SyncedHook = Arc<dyn Fn(u32, &[RecordMeta]) -> Result<(), Fence> + Send + Sync>;

/// Asks the partner to write the mirrored copies of a batch from its second store (our path
/// to the medium failed): (partition, first seq, last seq, number of data records).
pub type FlushDelegate = Arc<dyn Fn(u32, u64, u64, usize) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
pub struct FlusherStats {
    pub bytes_flushed: AtomicU64,
    pub batches: AtomicU64,
    pub medium_errors: AtomicU64,
    /// Batches the partner wrote for us because our medium path failed.
    pub delegated_batches: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// What the flusher asks of the rest of the node around each batch.
pub struct FlushHooks {
    /// The batch is on the medium: the partner may drop its copies.
    pub on_released: Arc<dyn Fn(u32, u64) + Send + Sync>,
    pub fence: FenceCheck,
    pub synced: SyncedHook,
    pub delegate: FlushDelegate,
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

pub fn run_flusher(
    log: Arc<PartitionLog>,
    luns: Arc<Vec<Arc<Lun>>>,
    policy: FlushPolicy,
    stats: Arc<FlusherStats>,
    hooks: FlushHooks,
) {
    let FlushHooks {
        on_released,
        fence,
        synced,
        delegate,
    } = hooks;
    let mut backoff = Duration::from_millis(10);
    while let Some(batch) = log.next_flush_batch(policy.batch_bytes, policy.linger) {
        // A failed medium write and an unreadable table both mean our path to the medium
        // fails: retry, or let the partner write from its mirror.
        let checked = fence(&batch).and_then(|()| {
            write_batch(&luns, &log, &batch)
                .map_err(Fence::Unreadable)
                .and_then(|bytes| synced(log.id, &batch).map(|()| bytes))
        });
        let result = match checked {
            Ok(bytes) => finish_batch(&log, &luns, &batch).map(|()| bytes),
            Err(Fence::Unreadable(why)) => Err(why),
            Err(Fence::Lost(why)) => {
                tracing::error!(
                    partition = log.id,
                    "{why}; this partition stops flushing and fails its writes"
                );
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = Some(why.clone());
                }
                log.fail(why);
                return;
            }
        };
        match result {
            Ok(bytes) => {
                if let Some(last) = batch.last() {
                    on_released(log.id, last.seq);
                }
                backoff = Duration::from_millis(10);
                stats.bytes_flushed.fetch_add(bytes, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = stats.last_error.lock() {
                    *e = None;
                }
            }
            Err(e) => {
                stats.medium_errors.fetch_add(1, Ordering::Relaxed);
                // Our path to the medium fails: the partner holds the same records in its
                // second store and can write them through its own path.
                let data: Vec<&RecordMeta> = batch
                    .iter()
                    .filter(|r| r.kind != RecordKind::Wrap)
                    .collect();
                if let (Some(first), Some(last)) = (data.first(), data.last()) {
                    match delegate(log.id, first.seq, last.seq, data.len())
                        .and_then(|()| finish_batch(&log, &luns, &batch))
                    {
                        Ok(()) => {
                            stats.delegated_batches.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                partition = log.id,
                                "medium path failed ({e}); the partner wrote seq {}..={} from its mirror",
                                first.seq,
                                last.seq
                            );
                            if let Ok(mut last_err) = stats.last_error.lock() {
                                *last_err =
                                    Some(format!("medium path failed, partner writes for us: {e}"));
                            }
                            on_released(log.id, last.seq);
                            continue;
                        }
                        Err(why) => tracing::warn!(
                            partition = log.id,
                            "the partner could not write for us: {why}"
                        ),
                    }
                }
                tracing::error!(
                    partition = log.id,
                    "flush to medium failed: {e}; records stay staged, retrying in {backoff:?}"
                );
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = Some(e);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Writes a batch to the medium and syncs it (not yet counted as flushed).
fn write_batch(luns: &[Arc<Lun>], log: &PartitionLog, batch: &[RecordMeta]) -> Result<u64, String> {
    let mut touched = vec![false; luns.len()];
    let mut bytes = 0;
    for r in batch {
        if r.kind == RecordKind::Wrap {
            continue;
        }
        let lun = &luns[r.lun as usize];
        touched[r.lun as usize] = true;
        let data: &[u8] = match r.kind {
            RecordKind::Data => log
                .region()
                .slice(log.nvram_offset(r.pos) + HEADER_BYTES, r.len as usize),
            _ => &[],
        };
        let res = crate::medium::apply_record(lun.medium.as_ref(), r.kind, r.offset, r.len, data);
        res.map_err(|e| {
            format!(
                "writing seq {} ({} bytes at {}) to {}: {e}",
                r.seq,
                r.len,
                r.offset,
                lun.medium.describe()
            )
        })?;
        bytes += r.len;
    }
    for (i, lun) in luns.iter().enumerate() {
        if touched[i] {
            lun.medium
                .sync()
                .map_err(|e| format!("syncing {}: {e}", lun.medium.describe()))?;
        }
    }
    Ok(bytes)
}

/// The batch is on the medium (written by us or by the partner): unindex, checkpoint,
/// free the space.
fn finish_batch(log: &PartitionLog, luns: &[Arc<Lun>], batch: &[RecordMeta]) -> Result<(), String> {
    for r in batch {
        if r.kind != RecordKind::Wrap {
            luns[r.lun as usize]
                .index()
                .remove_flushed(log.id, r.seq, r.offset, r.offset + r.len);
        }
    }
    log.release(batch)
        .map_err(|e| format!("persisting the checkpoint of partition {}: {e}", log.id))
}
