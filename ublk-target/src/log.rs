//! One partition's staging log: a circular log in the NVRAM.
//!
//! A record goes through four states, always in sequence order:
//!
//! ```text
//! reserved --copy--> copied --persist (group commit)--> durable --flusher--> released
//! ```
//!
//! * `append` reserves space (waiting if the log is full: back-pressure, never an error),
//!   copies header and data into the mapping, and hands back a future that resolves when
//!   the record is durable.
//! * `commit` (group commit), called by the writer right after its copy (and its mirror
//!   post), makes the longest copied prefix durable with one persist per contiguous range and
//!   acknowledges those records in order, so the durable records are always a prefix of the
//!   log (recovery relies on it, see `nvram::scan`). One committer at a time: a writer that
//!   finds another one at work leaves its record to it, so an uncontended write becomes
//!   durable on its own thread without a hand-off, and concurrent ones share a persist.
//! * The flusher takes durable records, writes them to the medium and calls `release`, which
//!   persists a checkpoint first and only then lets the space be reused.
//!
//! Invariants (checked after every locked section, see `LogState::check`): the records between
//! tail and head occupy exactly `used` bytes; `flushed_through <= acked_through`, and
//! `acked_through <= durable_through` unless the partition failed; durable and pending records
//! are in sequence order. The background loops (`run_persister`, the flusher's
//! `next_flush_batch`) are async and wait on the [`Host`]'s clock, so the same code runs on
//! threads in the daemon and step by step in the simulator.
//!
//! The file is long (~850 lines) because it is one job: the record state machine above and the
//! lock that guards it. Splitting the states over files would spread that lock's rules.

use crate::host::Host;
use crate::nvram::layout::{Layout, PartitionCheckpoint};
use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES};
use crate::nvram::void::{VoidMark, VoidMarks};
use crate::nvram::NvramRegion;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    #[error("NVRAM partition {partition} failed to persist: {message}")]
    Persist { partition: u32, message: String },
    #[error("NVRAM partition {partition} is shutting down")]
    Shutdown { partition: u32 },
    #[error("record {seq} of NVRAM partition {partition} died unwritten: this node lost its range after staging it")]
    Dead { partition: u32, seq: u64 },
    #[error("not staged in NVRAM partition {partition}: {why}")]
    Refused { partition: u32, why: String },
}

/// What the flusher needs to know about a durable record.
#[derive(Clone, Copy, Debug)]
pub struct RecordMeta {
    pub seq: u64,
    /// Header offset within the partition.
    pub pos: u64,
    /// Bytes the record occupies (for a wrap marker: the rest of the partition).
    pub slot: u64,
    pub kind: RecordKind,
    pub lun: u32,
    pub offset: u64,
    pub len: u64,
    pub appended: Instant,
}

struct Pending {
    meta: RecordMeta,
    copied: bool,
    done: Option<oneshot::Sender<Result<(), LogError>>>,
}

struct LogState {
    /// Where the next record goes.
    head: u64,
    /// Where the oldest unreleased record is.
    tail: u64,
    /// Bytes between tail and head (wrap padding included).
    used: u64,
    next_seq: u64,
    /// Every record up to here is durable in this NVRAM.
    durable_through: u64,
    /// Every record up to here has been settled by the engine (acknowledged to the kernel,
    /// or failed for good): new records carry it, see `nvram::scan`.
    acked_through: u64,
    /// Settled records above `acked_through` (settlement can come out of order).
    settled_ahead: std::collections::BTreeSet<u64>,
    flushed_through: u64,
    pending: VecDeque<Pending>,
    durable: VecDeque<RecordMeta>,
    checkpoint_generation: u64,
    failed: Option<String>,
    /// The failure is a fence (the node lost a range), not a failed persist: the NVRAM
    /// still works, and void records may still be written (see `append_void`).
    fenced: bool,
    shutdown: bool,
    flush_paused: bool,
    /// A `commit` is persisting a batch (taken out of `pending`) right now.
    committing: bool,
    /// Log bytes of that batch (in neither queue while it persists).
    committing_bytes: u64,
    /// What a new durable or settled record must change for the waiting flusher to care.
    flusher_wake: FlusherWake,
    /// Spans of ranges this node lost: the records below each mark are dead (never flushed,
    /// never read). Forgotten once released past. See `nvram::void`.
    voids: VoidMarks,
    /// Seqs of the latest dead records released unwritten (at most `RELEASED_DEAD_KEPT`): a
    /// writer that waits for its record's flush, or looks after settling it, learns its
    /// write did not happen.
    released_dead: std::collections::BTreeSet<u64>,
    /// Records a start replayed and keeps (see [`KeptReplay`]).
    kept: Option<Kept>,
}

/// How many released dead seqs a partition remembers (a writer asks within moments).
const RELEASED_DEAD_KEPT: usize = 4096;

/// When a writer's commit or settlement wakes the flusher. Waking a sleeping thread per
/// write costs more CPU than the write itself (a futex wake, a context switch and a timer
/// re-armed), so writers wake it only when its last decision could change; every other
/// reason (waiters, pause, failure, shutdown) wakes it unconditionally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlusherWake {
    /// Nothing was ready to flush (or the flusher is between batches): any new record.
    AnyRecord,
    /// A small batch is lingering until its oldest record is old enough: only the log
    /// reaching this many used bytes ends the linger early.
    UsedReaches(u64),
    /// Flushing is paused: only `set_flush_paused` matters.
    Never,
}

impl FlusherWake {
    fn wanted(self, used: u64) -> bool {
        match self {
            FlusherWake::AnyRecord => true,
            FlusherWake::UsedReaches(limit) => used >= limit,
            FlusherWake::Never => false,
        }
    }
}

/// A record copied into the NVRAM (and its wrap marker, if it needed one).
pub struct Staged {
    pub record: RecordMeta,
    pub wrap: Option<RecordMeta>,
    /// Resolves when the record (and the marker) is durable in this NVRAM.
    pub durable: oneshot::Receiver<Result<(), LogError>>,
}

/// Where a fresh or recovered log starts.
#[derive(Clone, Copy, Debug)]
pub struct LogStart {
    pub pos: u64,
    pub next_seq: u64,
    pub checkpoint_generation: u64,
    /// Records the start replayed but keeps (see [`KeptReplay`]).
    pub kept: Option<KeptReplay>,
}

/// Records a start replayed into the medium but keeps in the log until
/// [`PartitionLog::release_kept`]: their space stays used and the checkpoint stays before
/// them, so a restart replays them again, and the partner is not told it may drop its copies
/// of them (`engine::restart_sync`: our own medium is outdated for some of their ranges, and
/// the partner's medium must get them first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptReplay {
    /// The checkpoint's tail: where the oldest of them is, and its seq.
    pub tail: u64,
    pub tail_seq: u64,
    /// Their log bytes (wrap padding included), from `tail` to the start's position.
    pub bytes: u64,
    /// The seq after them (the start's first).
    pub end_seq: u64,
}

/// The kept records and what the flusher released behind them meanwhile: the checkpoint
/// moves past both at once.
#[derive(Clone, Copy, Debug)]
struct Kept {
    replay: KeptReplay,
    /// The tail and tail seq of the latest release behind them, and the bytes released.
    released: Option<(u64, u64)>,
    released_bytes: u64,
}

pub struct PartitionLog {
    pub id: u32,
    region: Arc<NvramRegion>,
    layout: Layout,
    log_id: u64,
    host: Arc<dyn Host>,
    state: Mutex<LogState>,
    /// Wakes the persister (shutdown).
    persist_wanted: Notify,
    /// Wakes the flusher: records settled, a waiter arrived, pause changed, shutdown.
    flush_wanted: Notify,
    space_freed: Notify,
    /// A batch was released (drain waiters look again).
    released: Notify,
    /// Someone waits for the flusher (write-through ack, drain, a full log): no lingering.
    flush_waiters: std::sync::atomic::AtomicUsize,
    /// This node ever lost a range of this partition (a void mark was set): until then a
    /// writer's `is_dead` needs no lock.
    ever_voided: std::sync::atomic::AtomicBool,
    /// Held by `release` and `release_kept` from reading where the tail goes to freeing the
    /// space behind it, so that a checkpoint never lags the space it frees (the flusher and
    /// the restart sync; writers never take it).
    releasing: Mutex<()>,
}

/// How often the persister thread looks for copied records nobody committed.
const PERSIST_BACKSTOP: Duration = Duration::from_millis(100);

/// Counts a waiter for the flusher while alive (dropped on cancel too).
struct FlushWaiter<'a>(&'a PartitionLog);

impl<'a> FlushWaiter<'a> {
    fn new(log: &'a PartitionLog) -> Self {
        log.flush_waiters
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        log.flush_wanted.notify_one();
        FlushWaiter(log)
    }
}

impl Drop for FlushWaiter<'_> {
    fn drop(&mut self) {
        self.0
            .flush_waiters
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Snapshot for status output.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub records_unflushed: usize,
    pub records_in_flight: usize,
    pub next_seq: u64,
    pub durable_through: u64,
    pub acked_through: u64,
    pub flushed_through: u64,
    /// Age of the oldest record not yet on the medium.
    pub flush_lag_ms: u64,
    pub flush_paused: bool,
    pub failed: Option<String>,
}

/// Set by `audit_queues`: walk the queues on every check (see `LogState::check`).
static QUEUE_AUDIT: AtomicBool = AtomicBool::new(false);

/// Makes every log check its queues in full, also in a release build: the simulator and the
/// engine's tests call it, so running them with `--release` keeps every invariant checked.
pub fn audit_queues() {
    QUEUE_AUDIT.store(true, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; the state is still consistent enough to
    // report, and refusing to continue would only turn one bug into a hang.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogState {
    /// The log's invariants. The cheap ones hold in every build; the ones that walk the
    /// queues run in debug builds and wherever `audit_queues` was called (the simulator,
    /// which CI runs in a release build).
    fn check(&self, size: u64) {
        assert!(
            self.used <= size && self.head < size && self.tail < size,
            "log bounds: head {} tail {} used {} size {size}",
            self.head,
            self.tail,
            self.used
        );
        let span = (self.head + size - self.tail) % size;
        assert!(
            span == self.used || (span == 0 && self.used == size),
            "log space: head {} tail {} span {span} but used {} (size {size})",
            self.head,
            self.tail,
            self.used
        );
        assert!(
            self.durable_through < self.next_seq && self.acked_through < self.next_seq,
            "log seqs: durable {} acked {} next {}",
            self.durable_through,
            self.acked_through,
            self.next_seq
        );
        assert!(
            self.flushed_through <= self.acked_through
                && self.flushed_through <= self.durable_through,
            "flushed through {} beyond acked {} / durable {}",
            self.flushed_through,
            self.acked_through,
            self.durable_through
        );
        // A failed persist or a shutdown settles writes that never became durable.
        assert!(
            self.failed.is_some() || self.shutdown || self.acked_through <= self.durable_through,
            "settled through {} but durable only through {}",
            self.acked_through,
            self.durable_through
        );
        // At shutdown the pending writes are failed and dropped from the queue.
        if (cfg!(debug_assertions) || QUEUE_AUDIT.load(Ordering::Relaxed)) && !self.shutdown {
            let mut prev = self.flushed_through;
            for r in &self.durable {
                assert!(
                    r.seq > prev && r.seq <= self.durable_through,
                    "durable queue out of order at seq {}",
                    r.seq
                );
                prev = r.seq;
            }
            for p in &self.pending {
                assert!(
                    p.meta.seq > prev,
                    "pending queue out of order at seq {}",
                    p.meta.seq
                );
                prev = p.meta.seq;
            }
            let queued: u64 = self.durable.iter().map(|r| r.slot).sum::<u64>()
                + self.pending.iter().map(|p| p.meta.slot).sum::<u64>()
                + self.committing_bytes
                + self.kept.map_or(0, |k| k.replay.bytes + k.released_bytes);
            assert_eq!(
                queued, self.used,
                "queued records do not add up to the used space"
            );
            assert!(
                self.settled_ahead
                    .iter()
                    .all(|&s| s > self.acked_through + 1),
                "a settled seq was left behind acked_through {}",
                self.acked_through
            );
        }
    }
}

/// Waits for `notified` or until `timeout` passed on the host's clock.
async fn notified_or_timeout(
    notified: impl Future<Output = ()>,
    host: &dyn Host,
    timeout: Duration,
) {
    let notified = std::pin::pin!(notified);
    futures::future::select(notified, host.sleep(timeout)).await;
}

impl PartitionLog {
    pub fn new(
        id: u32,
        region: Arc<NvramRegion>,
        layout: Layout,
        log_id: u64,
        start: LogStart,
        host: Arc<dyn Host>,
    ) -> Arc<PartitionLog> {
        Arc::new(PartitionLog {
            id,
            region,
            layout,
            log_id,
            host,
            state: Mutex::new(LogState {
                head: start.pos,
                tail: start.kept.map_or(start.pos, |k| k.tail),
                used: start.kept.map_or(0, |k| k.bytes),
                next_seq: start.next_seq,
                durable_through: start.next_seq - 1,
                acked_through: start.next_seq - 1,
                settled_ahead: Default::default(),
                flushed_through: start.next_seq - 1,
                pending: VecDeque::new(),
                durable: VecDeque::new(),
                checkpoint_generation: start.checkpoint_generation,
                failed: None,
                fenced: false,
                shutdown: false,
                flush_paused: false,
                committing: false,
                committing_bytes: 0,
                flusher_wake: FlusherWake::AnyRecord,
                voids: VoidMarks::default(),
                released_dead: Default::default(),
                kept: start.kept.map(|replay| Kept {
                    replay,
                    released: None,
                    released_bytes: 0,
                }),
            }),
            persist_wanted: Notify::new(),
            flush_wanted: Notify::new(),
            space_freed: Notify::new(),
            flush_waiters: Default::default(),
            ever_voided: Default::default(),
            released: Notify::new(),
            releasing: Mutex::new(()),
        })
    }

    fn base(&self) -> u64 {
        self.layout.partition_base(self.id)
    }

    fn size(&self) -> u64 {
        self.layout.part_size
    }

    /// Absolute NVRAM offset of a position in this partition.
    pub fn nvram_offset(&self, pos: u64) -> u64 {
        self.base() + pos
    }

    /// Finds room for a record of `slot` bytes: Some((wrap padding, position)).
    fn try_reserve(&self, st: &LogState, slot: u64) -> Option<(u64, u64)> {
        let size = self.size();
        if size - st.used < slot {
            return None;
        }
        let wrapped = st.head < st.tail || (st.head == st.tail && st.used == size);
        if wrapped {
            return (st.head + slot <= st.tail).then_some((0, st.head));
        }
        if st.head + slot <= size {
            return Some((0, st.head));
        }
        let padding = size - st.head;
        (slot <= st.tail && st.used + padding + slot <= size).then_some((padding, 0))
    }

    /// Stages one record. `data` is the payload for `RecordKind::Data` (empty otherwise).
    /// `on_copied(seq, nvram_offset_of_data)` runs after the bytes are in the NVRAM and
    /// before the record can become durable (so before the flusher can see it): the engine
    /// indexes the record there. Returns a future that resolves when the record is durable.
    /// `placeable` is asked each time the record may take its place (before each try for
    /// space): an error refuses it (`LogError::Refused`), nothing staged.
    #[allow(clippy::too_many_arguments)]
    pub async fn append(
        &self,
        kind: RecordKind,
        lun: u32,
        offset: u64,
        len: u64,
        data: &[u8],
        placeable: &(dyn Fn() -> Result<(), String> + Sync),
        on_copied: impl FnOnce(u64, u64),
    ) -> Result<Staged, LogError> {
        assert!(kind != RecordKind::Wrap);
        let data_crc = rdma_link::checksum::crc32c(data);
        let slot = RecordHeader::slot_bytes(data.len() as u64);
        let mut waiting_for_space = None;
        let (record, wrap, acked_through, rx) = loop {
            let freed = self.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Asked each time the record may get its place (no wait between this and the
            // reservation below): a writer that waited for space may no longer be wanted.
            if let Err(why) = placeable() {
                return Err(LogError::Refused {
                    partition: self.id,
                    why,
                });
            }
            {
                let mut st = lock(&self.state);
                if let Some(msg) = &st.failed {
                    // A fenced partition takes void records still: they keep its dead
                    // records from a replay after the restart that revives it.
                    if !(st.fenced && kind == RecordKind::Void) {
                        return Err(LogError::Persist {
                            partition: self.id,
                            message: msg.clone(),
                        });
                    }
                }
                if st.shutdown {
                    return Err(LogError::Shutdown { partition: self.id });
                }
                if let Some((padding, pos)) = self.try_reserve(&st, slot) {
                    let now = self.host.now();
                    let mut wrap = None;
                    if padding > 0 {
                        let w = RecordMeta {
                            seq: st.next_seq,
                            pos: st.head,
                            slot: padding,
                            kind: RecordKind::Wrap,
                            lun: 0,
                            offset: 0,
                            len: 0,
                            appended: now,
                        };
                        st.next_seq += 1;
                        st.used += padding;
                        // Not copied yet: the record after it must not become durable
                        // before the marker is in place.
                        st.pending.push_back(Pending {
                            meta: w,
                            copied: false,
                            done: None,
                        });
                        wrap = Some(w);
                    }
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.used += slot;
                    st.head = pos + slot;
                    if st.head == self.size() {
                        st.head = 0;
                    }
                    let (tx, rx) = oneshot::channel();
                    let record = RecordMeta {
                        seq,
                        pos,
                        slot,
                        kind,
                        lun,
                        offset,
                        len,
                        appended: now,
                    };
                    st.pending.push_back(Pending {
                        meta: record,
                        copied: false,
                        done: Some(tx),
                    });
                    st.check(self.size());
                    break (record, wrap, st.acked_through, rx);
                }
            }
            // The log is full. Records a start kept for its restart sync go first (and only
            // when full): their partner may be away for long, and writes must not wait for it.
            if self.keeps_replayed() {
                tracing::warn!(
                    partition = self.id,
                    "the log is full: the records the last start replayed and kept until the partner's medium has them go now (the partner may drop its copies; the ranges stay closed until it has written them)"
                );
                if let Err(e) = self.release_kept() {
                    return Err(LogError::Persist {
                        partition: self.id,
                        message: format!("moving the checkpoint past the kept records: {e}"),
                    });
                }
                continue;
            }
            // The flusher must not linger.
            waiting_for_space.get_or_insert_with(|| FlushWaiter::new(self));
            freed.await;
        };
        drop(waiting_for_space);

        if let Some(w) = wrap {
            let h = RecordHeader {
                kind: RecordKind::Wrap,
                flags: 0,
                log_id: self.log_id,
                seq: w.seq,
                lun: 0,
                partition: self.id,
                offset: 0,
                len: 0,
                data_len: 0,
                acked_through,
                data_crc: rdma_link::checksum::crc32c(&[]),
            };
            self.region.write_at(self.nvram_offset(w.pos), &h.encode());
        }
        let (seq, pos) = (record.seq, record.pos);
        let header = RecordHeader {
            kind,
            flags: 0,
            log_id: self.log_id,
            seq,
            lun,
            partition: self.id,
            offset,
            // A void record's span is its payload (a range may exceed 32 bits).
            len: if kind == RecordKind::Void {
                0
            } else {
                len as u32
            },
            data_len: data.len() as u32,
            acked_through,
            data_crc,
        };
        let at = self.nvram_offset(pos);
        self.region.write_at(at, &header.encode());
        self.region.write_at(at + HEADER_BYTES, data);
        on_copied(seq, at + HEADER_BYTES);

        let mut st = lock(&self.state);
        for p in st.pending.iter_mut() {
            if p.meta.seq == seq || wrap.is_some_and(|w| w.seq == p.meta.seq) {
                p.copied = true;
            }
        }
        drop(st);
        Ok(Staged {
            record,
            wrap,
            durable: rx,
        })
    }

    /// This node lost (or is about to take back) the range `[start, end)` of LUN `lun`: every
    /// record of it staged so far is dead from now on, for the flusher (which skips it) and
    /// for `is_dead`. Returns the mark's seq bound. The void record that makes it durable
    /// follows with [`PartitionLog::append_void`].
    pub fn void_span(&self, lun: u32, start: u64, end: u64) -> u64 {
        let mut st = lock(&self.state);
        self.ever_voided
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let below_seq = st.next_seq;
        st.voids.add(VoidMark {
            lun,
            start,
            end,
            below_seq,
            epoch: None,
            awaiting_record: true,
        });
        below_seq
    }

    /// Appends the void record of a span marked with [`PartitionLog::void_span`]: the mark
    /// then also covers what was staged in between (writes routed before the range moved),
    /// and a restart or the partner's replay honours it. `epoch`: the range's epoch in the
    /// table as read when voiding (see `nvram::void`).
    pub async fn append_void(
        &self,
        lun: u32,
        start: u64,
        end: u64,
        epoch: u64,
    ) -> Result<Staged, LogError> {
        let payload = VoidMark::payload(start, end, epoch);
        self.append(
            RecordKind::Void,
            lun,
            start,
            end - start,
            &payload,
            &|| Ok(()),
            |seq, _| lock(&self.state).voids.raise(lun, start, end, seq),
        )
        .await
    }

    /// Whether a record staged as (`lun`, `[offset, offset + len)`, `seq`) is dead: the node
    /// lost its range after it was staged (or the flusher released it unwritten for that).
    pub fn is_dead(&self, lun: u32, offset: u64, len: u64, seq: u64) -> bool {
        // Set under the state lock before any mark: a writer that sees false took its seq
        // before a mark could cover it, or checks after it (the lock orders them).
        if !self.ever_voided.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let st = lock(&self.state);
        (!st.voids.is_empty() && st.voids.covers(lun, offset, len, seq))
            || st.released_dead.contains(&seq)
    }

    /// Whether the flusher released record `seq` unwritten because it was dead.
    pub fn released_dead(&self, seq: u64) -> bool {
        lock(&self.state).released_dead.contains(&seq)
    }

    /// The records of `batch` the flusher writes: data and zero records that are not dead.
    pub fn live_records(&self, batch: &[RecordMeta]) -> Vec<RecordMeta> {
        let st = lock(&self.state);
        batch
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
            .filter(|r| st.voids.is_empty() || !st.voids.covers(r.lun, r.offset, r.len, r.seq))
            .copied()
            .collect()
    }

    /// The engine is done with record `seq` (acknowledged, or failed for good). Records
    /// appended from now on carry the highest seq below which everything is settled.
    pub fn settle(&self, seq: u64) {
        let mut st = lock(&self.state);
        assert!(
            seq < st.next_seq,
            "partition {}: settling seq {seq}, which was never appended (next {})",
            self.id,
            st.next_seq
        );
        if seq <= st.acked_through {
            return;
        }
        st.settled_ahead.insert(seq);
        loop {
            let next = st.acked_through + 1;
            if !st.settled_ahead.remove(&next) {
                break;
            }
            st.acked_through = next;
        }
        st.check(self.size());
        let wake = st.flusher_wake.wanted(st.used);
        drop(st);
        if wake {
            self.flush_wanted.notify_one();
        }
    }

    /// Resolves once record `seq` is on the medium (the write-through path).
    pub async fn flushed(&self, seq: u64) -> Result<(), LogError> {
        let _waiter = FlushWaiter::new(self);
        loop {
            let freed = self.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let st = lock(&self.state);
                if st.flushed_through >= seq {
                    if st.released_dead.contains(&seq) {
                        return Err(LogError::Dead {
                            partition: self.id,
                            seq,
                        });
                    }
                    return Ok(());
                }
                if let Some(msg) = &st.failed {
                    return Err(LogError::Persist {
                        partition: self.id,
                        message: msg.clone(),
                    });
                }
                if st.shutdown {
                    return Err(LogError::Shutdown { partition: self.id });
                }
            }
            freed.await;
        }
    }

    /// Group commit: makes the longest copied prefix of the log durable and completes those
    /// records, unless another thread is committing (it then takes ours too: it looks again
    /// after its batch). Called by every writer after its copy, so no copied record waits.
    pub fn commit(&self) {
        loop {
            let (batch, earlier_failure): (Vec<Pending>, Option<String>) = {
                let mut st = lock(&self.state);
                let n = st.pending.iter().take_while(|p| p.copied).count();
                if st.committing || n == 0 {
                    return;
                }
                st.committing = true;
                let batch: Vec<Pending> = st.pending.drain(..n).collect();
                st.committing_bytes = batch.iter().map(|p| p.meta.slot).sum();
                // A fence does not make the NVRAM fail.
                (batch, st.failed.clone().filter(|_| !st.fenced))
            };
            // After a failed persist the kernel may report later ones as fine although the
            // failed pages never reached the device: nothing after a failure is durable.
            let result = match earlier_failure {
                Some(msg) => Err(Arc::new(std::io::Error::other(msg))),
                None => self.persist_batch(&batch),
            };
            let mut st = lock(&self.state);
            st.committing = false;
            st.committing_bytes = 0;
            match &result {
                Ok(()) => {
                    if let Some(last) = batch.last() {
                        st.durable_through = last.meta.seq;
                    }
                    st.durable.extend(batch.iter().map(|p| p.meta));
                    if st.flusher_wake.wanted(st.used) {
                        self.flush_wanted.notify_one();
                    }
                }
                Err(e) => {
                    tracing::error!(
                        partition = self.id,
                        "NVRAM persist failed: {e}; failing writes"
                    );
                    st.failed = Some(e.to_string());
                    st.fenced = false;
                    crate::transitions::changed();
                }
            }
            st.check(self.size());
            drop(st);
            for mut p in batch {
                if let Some(tx) = p.done.take() {
                    let r = result.clone().map_err(|e| LogError::Persist {
                        partition: self.id,
                        message: e.to_string(),
                    });
                    // The writer may have gone away (device torn down): nothing to tell.
                    let _ = tx.send(r);
                }
            }
        }
    }

    /// Runs until `shutdown` as a background task: commits what a writer that went away
    /// between its copy and its commit left behind (a backstop: writers commit themselves),
    /// and at shutdown fails the writes that never became durable.
    pub async fn run_persister(&self) {
        loop {
            self.commit();
            // Some(true): stop now; Some(false): a commit is under way, look again soon.
            let stopping = {
                let mut st = lock(&self.state);
                if st.shutdown && !st.committing {
                    for mut p in st.pending.drain(..) {
                        if let Some(tx) = p.done.take() {
                            let _ = tx.send(Err(LogError::Shutdown { partition: self.id }));
                        }
                    }
                }
                st.shutdown.then_some(!st.committing)
            };
            match stopping {
                Some(true) => break,
                Some(false) => self.host.sleep(Duration::from_millis(1)).await,
                None => {
                    notified_or_timeout(
                        self.persist_wanted.notified(),
                        self.host.as_ref(),
                        PERSIST_BACKSTOP,
                    )
                    .await
                }
            }
        }
    }

    fn persist_batch(&self, batch: &[Pending]) -> Result<(), std::sync::Arc<std::io::Error>> {
        // Merge physically contiguous records into one range each.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for p in batch {
            let (start, end) = (p.meta.pos, p.meta.pos + p.meta.slot);
            match ranges.last_mut() {
                Some(r) if r.1 == start => r.1 = end,
                _ => ranges.push((start, end)),
            }
        }
        for (start, end) in ranges {
            self.region
                .persist(self.nvram_offset(start), end - start)
                .map_err(Arc::new)?;
        }
        Ok(())
    }

    /// Waits for durable records and returns the oldest ones, up to `max_bytes` of log
    /// (at least one record). Returns None on shutdown.
    /// `linger`: how long a small batch (under a quarter of `max_bytes`) may grow before it
    /// is written; never applies while someone waits for a flush.
    pub async fn next_flush_batch(
        &self,
        max_bytes: u64,
        linger: Duration,
    ) -> Option<Vec<RecordMeta>> {
        loop {
            let wait = {
                let mut st = lock(&self.state);
                // On shutdown whatever is staged stays in the NVRAM for the next start's
                // replay (a graceful stop drains first).
                if st.shutdown {
                    return None;
                }
                // Only settled records: their mirror copy (if any) has landed, so the release
                // that follows the flush reaches the partner after the copy, never before.
                let mut wait = Duration::from_millis(200);
                st.flusher_wake = if st.flush_paused {
                    FlusherWake::Never
                } else {
                    FlusherWake::AnyRecord
                };
                if let Some(oldest) = st
                    .durable
                    .front()
                    .filter(|r| !st.flush_paused && r.seq <= st.acked_through)
                {
                    let age = self.host.now().saturating_duration_since(oldest.appended);
                    let small = st.used < max_bytes / 4;
                    let waited_for =
                        self.flush_waiters.load(std::sync::atomic::Ordering::SeqCst) > 0;
                    if age >= linger || !small || waited_for {
                        // Busy with a batch: it looks at the log again before it sleeps.
                        st.flusher_wake = FlusherWake::AnyRecord;
                        return Some(Self::oldest_settled(&st, max_bytes));
                    }
                    st.flusher_wake = FlusherWake::UsedReaches(max_bytes / 4);
                    wait = linger - age;
                }
                wait
            };
            notified_or_timeout(self.flush_wanted.notified(), self.host.as_ref(), wait).await;
        }
    }

    /// The oldest settled durable records, up to `max_bytes` of log (at least one).
    fn oldest_settled(st: &LogState, max_bytes: u64) -> Vec<RecordMeta> {
        let mut bytes = 0;
        let mut batch = Vec::new();
        for r in st.durable.iter() {
            if r.seq > st.acked_through || (!batch.is_empty() && bytes + r.slot > max_bytes) {
                break;
            }
            bytes += r.slot;
            batch.push(*r);
        }
        batch
    }

    /// The flusher has put `batch` (the oldest durable records, in order) on the medium:
    /// persist a checkpoint past them, then free their space.
    pub fn release(&self, batch: &[RecordMeta]) -> std::io::Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let mut new_tail = last.pos + last.slot;
        if new_tail >= self.size() {
            new_tail = 0;
        }
        // Behind kept records the checkpoint stays, and so does the space: both move when
        // they go (`release_kept`).
        let _releasing = lock(&self.releasing);
        let kept = lock(&self.state).kept.is_some();
        if !kept {
            self.write_tail(new_tail, last.seq + 1)?;
        }
        let mut st = lock(&self.state);
        if !st.voids.is_empty() {
            let dead: Vec<u64> = batch
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
                .filter(|r| st.voids.covers(r.lun, r.offset, r.len, r.seq))
                .map(|r| r.seq)
                .collect();
            st.released_dead.extend(dead);
            while st.released_dead.len() > RELEASED_DEAD_KEPT {
                st.released_dead.pop_first();
            }
        }
        let mut bytes = 0;
        for r in batch {
            let front = st.durable.pop_front();
            assert_eq!(
                front.map(|f| f.seq),
                Some(r.seq),
                "flusher released records out of order"
            );
            bytes += r.slot;
        }
        match st.kept.as_mut() {
            Some(k) => {
                k.released = Some((new_tail, last.seq + 1));
                k.released_bytes += bytes;
            }
            None => {
                st.used -= bytes;
                st.tail = new_tail;
            }
        }
        st.flushed_through = last.seq;
        st.voids.forget_through(last.seq);
        st.check(self.size());
        drop(st);
        self.released.notify_waiters();
        self.space_freed.notify_waiters();
        Ok(())
    }

    /// Persists a checkpoint with the log's tail at `tail` (seq `tail_seq`).
    fn write_tail(&self, tail: u64, tail_seq: u64) -> std::io::Result<()> {
        let generation = lock(&self.state).checkpoint_generation + 1;
        let cp = PartitionCheckpoint {
            partition: self.id,
            log_id: self.log_id,
            generation,
            tail_off: tail,
            tail_seq,
        };
        write_checkpoint(&self.region, &self.layout, &cp)?;
        lock(&self.state).checkpoint_generation = generation;
        Ok(())
    }

    /// The records the start kept (see [`KeptReplay`]) may go: the checkpoint moves past
    /// them and past whatever the flusher released behind them, and their space is free.
    /// Returns the seq the partner may now release its copies through.
    pub fn release_kept(&self) -> std::io::Result<u64> {
        let _releasing = lock(&self.releasing);
        let Some(k) = lock(&self.state).kept else {
            return Ok(self.partner_release_through());
        };
        let end = (k.replay.tail + k.replay.bytes) % self.size();
        let (tail, tail_seq) = k.released.unwrap_or((end, k.replay.end_seq));
        self.write_tail(tail, tail_seq)?;
        let mut st = lock(&self.state);
        st.used -= k.replay.bytes + k.released_bytes;
        st.tail = tail;
        st.kept = None;
        st.check(self.size());
        let through = st.flushed_through;
        drop(st);
        self.space_freed.notify_waiters();
        Ok(through)
    }

    /// Through which seq the partner may drop its copies of our records: those the flusher
    /// released, short of records the start keeps.
    pub fn partner_release_through(&self) -> u64 {
        let flushed = lock(&self.state).flushed_through;
        self.partner_may_release(flushed)
    }

    /// `through`, or less: never records the start keeps or anything after them.
    pub fn partner_may_release(&self, through: u64) -> u64 {
        match lock(&self.state).kept {
            Some(k) => through.min(k.replay.tail_seq - 1),
            None => through,
        }
    }

    /// Whether the start kept records it replayed (see [`KeptReplay`]).
    pub fn keeps_replayed(&self) -> bool {
        lock(&self.state).kept.is_some()
    }

    /// Stops the partition for good (fenced, or the NVRAM failed): new writes and writers
    /// waiting for the flusher get an error.
    pub fn fail(&self, message: String) {
        {
            let mut st = lock(&self.state);
            st.failed = Some(message);
            st.fenced = false;
        }
        self.failed_wake();
    }

    /// Stops the partition until the node restarts because it lost a range it has records
    /// of: like [`PartitionLog::fail`], but its NVRAM still takes void records.
    pub fn fence(&self, message: String) {
        {
            let mut st = lock(&self.state);
            if st.failed.is_none() {
                st.fenced = true;
            }
            st.failed = Some(message);
        }
        self.failed_wake();
    }

    fn failed_wake(&self) {
        crate::transitions::changed();
        self.space_freed.notify_waiters();
        self.flush_wanted.notify_one();
        self.released.notify_waiters();
    }

    /// The records durable and settled but not yet on the medium (wrap markers left out):
    /// what the partner's second store must hold.
    pub fn unflushed(&self) -> Vec<RecordMeta> {
        let st = lock(&self.state);
        st.durable
            .iter()
            .filter(|r| r.seq <= st.acked_through && r.kind != RecordKind::Wrap)
            .copied()
            .collect()
    }

    /// The partition stopped for good (fenced, or its NVRAM failed).
    pub fn is_failed(&self) -> bool {
        lock(&self.state).failed.is_some()
    }

    /// The partition stopped because it was fenced (its NVRAM works).
    pub fn is_fenced(&self) -> bool {
        lock(&self.state).fenced
    }

    /// Why the partition stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.state).failed.clone()
    }

    pub fn set_flush_paused(&self, paused: bool) {
        lock(&self.state).flush_paused = paused;
        crate::transitions::changed();
        self.flush_wanted.notify_one();
    }

    /// Resolves true once every record appended so far is on the medium, false if the
    /// partition failed or `deadline` passed first.
    pub async fn drained(&self, deadline: Instant) -> bool {
        let _waiter = FlushWaiter::new(self);
        let target = lock(&self.state).next_seq - 1;
        loop {
            let released = self.released.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            {
                let st = lock(&self.state);
                if st.flushed_through >= target {
                    return true;
                }
                if st.failed.is_some() {
                    return false;
                }
            }
            let now = self.host.now();
            if now >= deadline {
                return false;
            }
            notified_or_timeout(released, self.host.as_ref(), deadline - now).await;
        }
    }

    pub fn shutdown(&self) {
        lock(&self.state).shutdown = true;
        self.persist_wanted.notify_one();
        self.flush_wanted.notify_one();
        self.space_freed.notify_waiters();
        self.released.notify_waiters();
    }

    pub fn status(&self) -> PartitionStatus {
        let st = lock(&self.state);
        PartitionStatus {
            partition: self.id,
            capacity_bytes: self.size(),
            used_bytes: st.used,
            records_unflushed: st.durable.len() + st.pending.len(),
            records_in_flight: st.pending.len(),
            next_seq: st.next_seq,
            durable_through: st.durable_through,
            acked_through: st.acked_through,
            flushed_through: st.flushed_through,
            flush_lag_ms: st
                .durable
                .front()
                .map(|r| {
                    let age = self.host.now().saturating_duration_since(r.appended);
                    age.as_millis() as u64
                })
                .unwrap_or(0),
            flush_paused: st.flush_paused,
            failed: st.failed.clone(),
        }
    }

    pub fn region(&self) -> &NvramRegion {
        &self.region
    }

    /// Partition-relative position -> offset within the first store (the same offset
    /// names the record's place in the partner's second store).
    pub fn store_offset(&self, pos: u64) -> u64 {
        self.id as u64 * self.layout.part_size + pos
    }
}

/// Writes and persists a checkpoint into the slot its generation selects.
pub fn write_checkpoint(
    region: &NvramRegion,
    layout: &Layout,
    cp: &PartitionCheckpoint,
) -> std::io::Result<()> {
    let off = layout.checkpoint_offset(cp.partition, cp.slot());
    region.write_at(off, &cp.encode());
    region.persist(off, PartitionCheckpoint::SLOT_BYTES)
}

/// Reads the newest valid checkpoint of partition `p` for log `log_id`.
pub fn read_checkpoint(
    region: &NvramRegion,
    layout: &Layout,
    p: u32,
    log_id: u64,
) -> Option<PartitionCheckpoint> {
    (0..PartitionCheckpoint::SLOTS)
        .filter_map(|slot| {
            let mut buf = [0u8; 48];
            region.read_at(layout.checkpoint_offset(p, slot), &mut buf);
            PartitionCheckpoint::decode(&buf)
        })
        .filter(|c| c.log_id == log_id && c.partition == p && c.tail_off < layout.part_size)
        .max_by_key(|c| c.generation)
}
