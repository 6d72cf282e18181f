//! What the flusher asks of this node around each batch (see [`FlushContext`]): fencing
//! against the ownership table, flush marks while the partner cannot hear releases, the
//! release itself, and the partner writing for us when our medium path fails.

use super::serving::ServingRight;
use super::takeover_state::DelegateSlot;
use crate::cluster::{wire, Cluster};
use crate::copy_fence::CopyFence;
use crate::flusher::{Fence, FlushContext};
use crate::host::{BoxFuture, Host};
use crate::log::RecordMeta;
use crate::lun::Lun;
use crate::mirror::{Mirror, MirrorSlot};
use crate::nvram::out_of_sync::LunMaps;
use crate::nvram::RecordKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) struct NodeFlushContext {
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) luns: Arc<Vec<Arc<Lun>>>,
    pub(super) mirror: Arc<MirrorSlot>,
    pub(super) log_id: u64,
    pub(super) partitions: usize,
    pub(super) delegate: DelegateSlot,
    pub(super) serving: Arc<ServingRight>,
    /// `storage = "own"`: where the two media may differ (marked for a batch the partner's
    /// medium did not get, before our log lets it go).
    pub(super) out_of_sync: Option<Arc<LunMaps>>,
    /// Batches in a row the partner's medium did not get: the first is logged as a warning,
    /// the rest only counted (every batch while the partner is away would flood the log).
    pub(super) partner_misses: Arc<AtomicU64>,
    /// `storage = "own"`: orders the resync's copies against our batches, and counts the
    /// batches the partner's medium missed per range.
    pub(super) copy_fence: Option<Arc<CopyFence>>,
    /// The clock (`copy_to_partner` waits out a link blip on it).
    pub(super) host: Arc<dyn Host>,
    /// Bytes per partition of our log (a record's offset in the region the mirror posts
    /// from: `PartitionLog::store_offset`).
    pub(super) part_size: u64,
    /// A log-shipping source: what the destination confirmed, for status.
    pub(super) ship_lag: Arc<super::ship_lag::ShipLag>,
}

/// How often a batch the partner missed because the link was down looks at the link again.
const BLIP_RETRY_EVERY: Duration = Duration::from_millis(100);

/// Log shipping: how often a batch whose records the destination has not logged yet is
/// posted to it again before the flusher backs off and writes the batch again.
const NOT_YET_RESENDS: u32 = 2;

/// How long a batch the partner missed waits for the link to come back before marking the
/// partner's medium outdated: two heartbeat timeouts (the link is called down after one,
/// then reconnects), so a blip costs a short flush delay instead of a resync and, until
/// that resync, the partner's right to take the range over.
fn blip_grace(c: &Cluster) -> Duration {
    c.link_timeout() * 2
}

impl FlushContext for NodeFlushContext {
    /// Our disk lease must hold for the write's duration, and the medium's ownership table
    /// must still give us every range of the batch.
    fn check_fence(&self, batch: &[RecordMeta]) -> Result<(), Fence> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        self.may_write()?;
        let mut checks: Vec<(u32, u32)> = batch
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
            .filter_map(|r| {
                let lun = self.luns.get(r.lun as usize)?;
                Some((r.lun, lun.range_of(r.offset)))
            })
            .collect();
        checks.sort_unstable();
        checks.dedup();
        c.still_owned(&checks).map_err(|f| match f {
            Fence::Unreadable(why) => self.arbiter_failed(why),
            f => f,
        })
    }

    fn may_write(&self) -> Result<(), Fence> {
        match self.serving.may_write_medium() {
            Ok(()) => Ok(()),
            // The partner hears us and writes the batch from its mirror.
            Err((true, why)) => Err(self.arbiter_failed(why)),
            Err((false, why)) => Err(Fence::Suspended(why)),
        }
    }

    /// Partner unreachable: the release cannot reach it, so flush marks on the medium tell a
    /// taking-over partner which of its copies are stale; then make sure we still own the
    /// ranges before the batch counts as flushed (a write-through acknowledgement).
    fn on_synced(
        &self,
        partition: u32,
        through_seq: u64,
        written: &[RecordMeta],
    ) -> Result<(), Fence> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        if !self.mirror.needs_flush_marks() {
            return Ok(());
        }
        c.record_flushed(self.log_id, self.partitions, partition, through_seq)
            .map_err(|e| self.arbiter_failed(format!("writing flush marks to the medium: {e}")))?;
        self.check_fence(written)
    }

    /// Each node its own medium: the partner writes the batch from its second store to its
    /// medium (the request our medium-path failures use). If it cannot (unreachable, or the
    /// batch has records it never got), its medium is marked outdated for the batch's
    /// ranges before our log lets the records go: it then never takes them over stale.
    fn copy_to_partner<'d>(
        &self,
        partition: u32,
        batch: &[RecordMeta],
        live: &[RecordMeta],
        data_of: &dyn Fn(&RecordMeta) -> &'d [u8],
    ) -> BoxFuture<Result<(), Fence>> {
        let Some(c) = self.cluster.clone().filter(|c| c.own_storage()) else {
            let shipping = self
                .cluster
                .is_none()
                .then(|| self.mirror.current())
                .flatten();
            if let Some((m, grace)) = shipping.and_then(|m| m.keeps_log().map(|g| (m, g))) {
                return self.batch_in_destination_log(m, grace, partition, batch);
            }
            return Box::pin(async { Ok(()) });
        };
        let ranges = self.ranges_of(live);
        if ranges.iter().any(|&(l, r)| c.own_medium_outdated(l, r)) {
            // Our medium misses earlier writes of these ranges: the partner's is the one that
            // holds them all, so it must get this batch too (marking it would leave no
            // complete medium). The data goes along: a link flap may have left the partner's
            // copies incomplete (simulator seeds 1276 and 1765 stuck a node that asked by seq).
            let through_seq = batch.last().map_or(0, |r| r.seq);
            let shipped = self.ship(partition, through_seq, live, data_of, false);
            return Box::pin(async move {
                shipped.await.map_err(|why| {
                    Fence::Suspended(format!(
                        "our medium is outdated for the batch's ranges and the partner's did not take the batch ({why}): the records stay staged"
                    ))
                })
            });
        }
        let data: Vec<u64> = batch
            .iter()
            .filter(|r| r.kind != RecordKind::Wrap)
            .map(|r| r.seq)
            .collect();
        // The partner writes a batch by its seqs: not one with dead or void records.
        let whole = data.iter().copied().eq(live.iter().map(|r| r.seq));
        let extents: Vec<(u32, u64, u64)> = batch
            .iter()
            .filter(|r| r.kind != RecordKind::Wrap)
            .map(|r| (r.lun, r.offset, r.len))
            .collect();
        let maps = self.out_of_sync.clone();
        let misses = self.partner_misses.clone();
        let fence = self.copy_fence.clone();
        let ask = match (whole, data.first(), data.last()) {
            (true, Some(&first), Some(&last)) => {
                Some(self.partner_writer(partition, first, last, data.len()))
            }
            _ => None,
        };
        let (host, mirror, grace) = (self.host.clone(), self.mirror.clone(), blip_grace(&c));
        Box::pin(async move {
            let why = match ask {
                Some(ask) => {
                    // Safe to wait: until this batch ends, the partner keeps its copies of
                    // the batch's records, which a takeover would replay into its medium.
                    let give_up_at = host.now() + grace;
                    loop {
                        let why = match ask().await {
                            Ok(()) => {
                                let missed = misses.swap(0, Ordering::Relaxed);
                                if missed > 0 {
                                    tracing::info!(
                                        "the partner's medium gets our batches again ({missed} batch(es) missed before: marked out of sync, a resync copies them)"
                                    );
                                }
                                return Ok(());
                            }
                            Err(why) => why,
                        };
                        // A partner that answered with an error, or a link down for longer
                        // than a blip, gets its marks now; so do the batches after one that
                        // gave up, until the partner gets one again (each waiting out the
                        // grace would hold the flush back for as long as the partner is away).
                        if mirror.is_up()
                            || host.now() >= give_up_at
                            || misses.load(Ordering::Relaxed) > 0
                        {
                            break why;
                        }
                        while !mirror.is_up() && host.now() < give_up_at {
                            host.sleep(BLIP_RETRY_EVERY).await;
                        }
                    }
                }
                None if ranges.is_empty() => return Ok(()),
                None => "the batch holds records of a range this node lost".to_string(),
            };
            if misses.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    partition,
                    "the partner's medium did not get this batch ({why}); it is marked out of sync and outdated, and later batches it misses are only counted until it gets one again"
                );
            } else {
                tracing::debug!(
                    partition,
                    "the partner's medium did not get this batch ({why})"
                );
            }
            let (_deciding, _) =
                super::local_reads::wait_out_read_leases(&c, host.as_ref(), &ranges).await;
            let marked = (|| {
                if let Some(maps) = maps {
                    for (lun, offset, len) in extents {
                        maps.mark(lun, offset, len);
                    }
                    maps.persist().map_err(|e| {
                        Fence::Unreadable(format!("persisting the out-of-sync map failed: {e}"))
                    })?;
                }
                c.mark_outdated(c.partner(), &ranges).map_err(|e| {
                    // Never our medium's failure: the batch waits (see `arbiter_failed`).
                    Fence::Suspended(format!(
                        "marking the partner's medium outdated on the arbiter failed: {e}; the records stay staged"
                    ))
                })
            })();
            // Counted after the marks: a resync that saw this count also sees the marks in
            // the map it reads next; one that saw the count before notices it changed.
            if let Some(fence) = &fence {
                fence.note_missed(&ranges);
            }
            marked
        })
    }

    /// Each node its own medium, and ours failed the batch: ours is marked as missing it
    /// (and the batch counted, see `Cluster::mark_own_medium_missed`), then the partner
    /// writes the records, sent along, to its medium.
    fn ship_to_partner<'d>(
        &self,
        partition: u32,
        through_seq: u64,
        live: &[RecordMeta],
        data_of: &dyn Fn(&RecordMeta) -> &'d [u8],
    ) -> Option<BoxFuture<Result<(), String>>> {
        self.cluster.as_ref().filter(|c| c.own_storage())?;
        Some(self.ship(partition, through_seq, live, data_of, true))
    }

    fn copy_fence(&self) -> Option<&Arc<CopyFence>> {
        self.copy_fence.as_ref()
    }

    /// Once on the medium, the partner's copy can go.
    fn on_released(&self, partition: u32, through_seq: u64) {
        if let Some(m) = self.mirror.current() {
            m.release(partition, through_seq);
        }
    }

    fn delegate(
        &self,
        partition: u32,
        _batch: &[RecordMeta],
        first: u64,
        last: u64,
        count: usize,
    ) -> BoxFuture<Result<(), String>> {
        if self.cluster.as_ref().is_some_and(|c| c.own_storage()) {
            // Our records stay staged until our own medium is back: the partner writing its
            // medium would leave ours without them (unless ours were marked outdated first:
            // tried, and the simulator found a node stuck after it, docs/shared-nothing.md).
            return Box::pin(async {
                Err("with storage = \"own\" the partner cannot write our medium for us".into())
            });
        }
        self.ask_partner_to_write(partition, first, last, count)
    }
}

impl NodeFlushContext {
    /// The arbiter (ownership table, flush marks, lease) failed us, not necessarily our
    /// medium. With one shared medium that holds the table the two are one path, so the
    /// partner writes the batch for us. With each node its own medium they are not: taking
    /// it for our medium's failure would mark a medium outdated that holds every write (and
    /// make that mark on the very arbiter that fails; one-try simulator seed 530), so the
    /// batch stays staged and is tried again, as while our lease does not hold.
    fn arbiter_failed(&self, why: String) -> Fence {
        if self.cluster.as_ref().is_some_and(|c| c.own_storage()) {
            Fence::Suspended(format!(
                "{why} (the arbiter, not our medium: the records stay staged)"
            ))
        } else {
            Fence::Unreadable(why)
        }
    }
}

/// The most one shipping request carries (the link's requests are at most 1 MiB + 4 KiB).
const SHIP_REQUEST_BYTES: usize = 1 << 20;

impl NodeFlushContext {
    /// Sends the data and zero records of `live` (of a batch through `through_seq`) to the
    /// partner, which writes them to its medium (`wire::OP_WRITE_RECORDS_FOR_PARTNER`), in requests of at most
    /// [`SHIP_REQUEST_BYTES`]. `ours_missed`: our medium failed them, so it is marked
    /// outdated for their ranges first. Refused while the partner's medium is outdated for
    /// one of them (neither medium would hold the range whole).
    fn ship<'d>(
        &self,
        partition: u32,
        through_seq: u64,
        live: &[RecordMeta],
        data_of: &dyn Fn(&RecordMeta) -> &'d [u8],
        ours_missed: bool,
    ) -> BoxFuture<Result<(), String>> {
        let Some(c) = self.cluster.clone() else {
            return Box::pin(async { Err("not a cluster node".to_string()) });
        };
        let ranges = self.ranges_of(live);
        let mut requests: Vec<Vec<u8>> = Vec::new();
        let mut current = Vec::new();
        for r in live
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
        {
            let record = wire::ShippedRecord {
                seq: r.seq,
                zero: r.kind == RecordKind::Zero,
                lun: r.lun,
                offset: r.offset,
                len: r.len,
                data: data_of(r),
            };
            if !current.is_empty()
                && current.len() + wire::shipped_len(&record) > SHIP_REQUEST_BYTES
            {
                requests.push(std::mem::take(&mut current));
            }
            wire::encode_record(&mut current, &record);
        }
        if !current.is_empty() {
            requests.push(current);
        }
        let up = self.mirror.is_up();
        let maps = self.out_of_sync.clone().filter(|_| ours_missed);
        let extents: Vec<(u32, u64, u64)> = live
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
            .map(|r| (r.lun, r.offset, r.len))
            .collect();
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(());
            }
            let fwd = c
                .forwarder()
                .filter(|_| up)
                .ok_or("the link to the partner is down")?;
            let theirs = c
                .outdated_ranges(c.partner())
                .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
            if let Some(r) = ranges.iter().find(|r| theirs.contains(r)) {
                return Err(format!(
                    "node {}'s medium is outdated for range {r:?} too: no medium would hold the batch",
                    c.node_name(c.partner())
                ));
            }
            if ours_missed {
                // Where ours misses them: the repair copies those regions back.
                c.mark_own_medium_missed(&ranges, || {
                    let Some(maps) = maps else {
                        return Ok(());
                    };
                    for (lun, offset, len) in extents {
                        maps.mark(lun, offset, len);
                    }
                    maps.persist()
                        .map_err(|e| format!("persisting the out-of-sync map: {e}"))
                })?;
            }
            let last = requests.len() - 1;
            for (i, records) in requests.into_iter().enumerate() {
                let first_flag = if i == 0 { wire::FIRST_CHUNK } else { 0 };
                let last_flag = if i == last { wire::LAST_CHUNK } else { 0 };
                fwd.write_records(partition, through_seq, first_flag | last_flag, records)
                    .await?;
            }
            Ok(())
        })
    }

    /// A log-shipping source: the batch leaves our log once the destination's log file has
    /// it. While the destination is away for longer than `grace` (a blip costs a short
    /// flush delay), batches go without it: serving goes on, and its log files get a gap
    /// there (the destination sees it from the next batch's first seq and says so).
    fn batch_in_destination_log(
        &self,
        m: Arc<dyn Mirror>,
        grace: Duration,
        partition: u32,
        batch: &[RecordMeta],
    ) -> BoxFuture<Result<(), Fence>> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Box::pin(async { Ok(()) });
        };
        let asked = wire::ShipLogged {
            partition,
            through_seq: last.seq,
            log_id: self.log_id,
            first_seq: first.seq,
            wraps: batch
                .iter()
                .filter(|r| r.kind == RecordKind::Wrap)
                .map(|r| r.seq)
                .collect(),
        };
        // A record the destination never got while the link stayed up (a post that failed
        // as the link came up, one it refused) would hold the batch for good: before asking
        // again after a "not yet", the batch's records go to it once more (holding a copy
        // twice, or one already logged, changes nothing there).
        let posts: Vec<rdma_link::Post> = batch
            .iter()
            .filter(|r| r.kind != RecordKind::Wrap)
            .map(|r| rdma_link::Post {
                partition,
                seq: r.seq,
                local_offset: u64::from(partition) * self.part_size + r.pos,
                remote_offset: u64::from(partition) * self.part_size + r.pos,
                len: r.slot as u32,
            })
            .collect();
        let (host, misses) = (self.host.clone(), self.partner_misses.clone());
        let lag = self.ship_lag.clone();
        Box::pin(async move {
            let give_up_at = host.now() + grace;
            let mut not_yet = 0;
            loop {
                if m.is_up() {
                    if not_yet > 0 {
                        let sent: Vec<_> = posts.iter().map(|p| m.post(*p)).collect();
                        for s in sent {
                            let _ = s.await;
                        }
                    }
                    lag.asking(partition, asked.first_seq, asked.through_seq, host.now());
                    match m.logged(asked.clone()).await {
                        Ok(()) => {
                            lag.confirmed(partition, asked.through_seq, host.now());
                            let missed = misses.swap(0, Ordering::Relaxed);
                            if missed > 0 {
                                tracing::info!(
                                    "the destination logs our batches again ({missed} batch(es) left our log without it: its log files have a gap there)"
                                );
                            }
                            return Ok(());
                        }
                        Err(_) if m.is_up() && not_yet < NOT_YET_RESENDS => {
                            not_yet += 1;
                            continue;
                        }
                        Err(why) if m.is_up() => {
                            return Err(Fence::Suspended(format!(
                                "the destination has not logged partition {partition} through seq {} yet ({why}): the batch stays in our log",
                                asked.through_seq
                            )))
                        }
                        Err(_) => {}
                    }
                }
                if host.now() >= give_up_at || misses.load(Ordering::Relaxed) > 0 {
                    break;
                }
                host.sleep(BLIP_RETRY_EVERY).await;
            }
            lag.gave_up(partition, true);
            if misses.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    partition,
                    "the destination is away: flushed batches leave our log without it, so its log files get a gap (later batches are only counted until it logs one again)"
                );
            }
            Ok(())
        })
    }

    /// The (LUN, range)s of a batch's data records.
    fn ranges_of(&self, records: &[RecordMeta]) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = records
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Data | RecordKind::Zero))
            .filter_map(|r| Some((r.lun, self.luns.get(r.lun as usize)?.range_of(r.offset))))
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        ranges
    }

    /// Asks the partner to write our records `first..=last` of `partition` (`count` of them)
    /// from its second store to the medium it writes.
    fn ask_partner_to_write(
        &self,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
    ) -> BoxFuture<Result<(), String>> {
        self.partner_writer(partition, first, last, count)()
    }

    /// The request that has the partner write records `first..=last` (`count` of them) of
    /// `partition` from its second store to its medium, as often as it is called.
    fn partner_writer(
        &self,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
    ) -> impl Fn() -> BoxFuture<Result<(), String>> + Send + 'static {
        let d = self.delegate.read().ok().and_then(|d| d.clone());
        move || match &d {
            Some(d) => d(partition, first, last, count),
            None => Box::pin(async { Err("no partner to write for us".to_string()) }),
        }
    }
}
