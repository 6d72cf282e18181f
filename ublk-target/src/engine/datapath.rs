//! The data path of the ranges this node serves, top to bottom:
//!
//! ```text
//! write -> stage: PartitionLog::append (copy into NVRAM, index the extent)
//!                 -> mirror post (the copy travels to the partner's second store)
//!                 -> PartitionLog::commit (persist the local copy meanwhile; group commit)
//!       -> both durable: settle (the flusher may take the record) -> complete
//!          (partner unreachable: `degraded` decides: write-through waits for the flusher)
//! read  -> staged-extent index: staged pieces from NVRAM, gaps from the medium
//! ```
//! Writes and reads arrive here already routed (`routing`): every piece is in a range we
//! serve, or is explicitly skipped because it was forwarded.

use super::core::{Engine, IoError};
use super::medium_reads::MediumReads;

/// Where a staged write ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    Done,
    /// A range moved to another node while the write was staged: route it again.
    Moved,
}

/// One write as the data path carries it from routing to staging: its LUN, where, the kind
/// of record, and its data (`len` bytes for `RecordKind::Data`, empty otherwise).
#[derive(Clone, Copy)]
pub(super) struct WriteOp<'a> {
    pub lun_idx: usize,
    pub lun: &'a Lun,
    pub kind: RecordKind,
    pub offset: u64,
    pub len: u64,
    pub data: &'a [u8],
}

impl<'a> WriteOp<'a> {
    /// The data of its piece `[at, at + n)`: empty unless it writes data.
    pub(super) fn payload(&self, at: u64, n: u64) -> &'a [u8] {
        match self.kind {
            RecordKind::Data => {
                &self.data[(at - self.offset) as usize..(at - self.offset + n) as usize]
            }
            _ => &[],
        }
    }
}
use crate::config::DegradedPolicy;
use crate::host::run_blocking;
use crate::index::{Extent, Piece, Source};
use crate::log::{PartitionLog, RecordMeta};
use crate::lun::Lun;
use crate::nvram::record::RecordKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// `[start, end)` of a read that no staged write covers: the medium has its newest data.
type Gap = (u64, u64);

fn stale_here_error(lun: &Lun, start: u64) -> IoError {
    IoError::new(
        libc::EIO,
        format!(
            "this node's own medium is marked outdated for LUN {} at {start}",
            lun.name
        ),
    )
}

pub(super) fn medium_read_error(lun: &Lun, start: u64, e: std::io::Error) -> IoError {
    IoError::new(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("reading {} at {start}: {e}", lun.medium.describe()),
    )
}

impl Engine {
    pub(super) fn lun_for(&self, lun: usize, offset: u64, len: u64) -> Result<&Arc<Lun>, IoError> {
        let l = self
            .luns
            .get(lun)
            .ok_or_else(|| IoError::new(libc::ENODEV, format!("no LUN {lun}")))?;
        if !l.contains(offset, len) {
            return Err(IoError::new(
                libc::EINVAL,
                format!(
                    "I/O {offset}+{len} beyond the end of LUN {} ({})",
                    l.name, l.size
                ),
            ));
        }
        Ok(l)
    }

    /// The staging log of a global range: ranges are spread over the partitions in turn.
    pub(super) fn partition_of(&self, global_range: u32) -> &Arc<PartitionLog> {
        &self.parts[crate::config::partition_of_range(global_range, self.parts.len()) as usize]
    }

    /// Stages a write; returns once it is durable in the NVRAM (and mirrored). Pieces in
    /// ranges another node owns are forwarded to it.
    pub async fn write(&self, lun_idx: usize, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, data.len() as u64)?;
        self.route_write(WriteOp {
            lun_idx,
            lun,
            kind: RecordKind::Data,
            offset,
            len: data.len() as u64,
            data,
        })
        .await?;
        lun.stats.writes.fetch_add(1, Ordering::Relaxed);
        lun.stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// WRITE_ZEROES and DISCARD: the range reads as zeroes once this returns.
    pub async fn write_zeroes(&self, lun_idx: usize, offset: u64, len: u64) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, len)?;
        self.route_write(WriteOp {
            lun_idx,
            lun,
            kind: RecordKind::Zero,
            offset,
            len,
            data: &[],
        })
        .await
    }

    /// [`Engine::stage`] for a write of our own clients: wanted until it is staged.
    pub(super) async fn stage_own(
        &self,
        w: WriteOp<'_>,
        skip: &[(u64, u64)],
    ) -> Result<Placement, IoError> {
        self.stage(w, skip, &|| Ok(())).await
    }

    /// Stages the pieces of an I/O that fall in ranges we serve (`skip`: pieces forwarded
    /// to another node), mirrors them, and waits for both copies. `Moved`: a piece's range
    /// stopped being ours meanwhile (another node took it while we did not hold our lease):
    /// the write must be routed again, to its owner. `placeable` is asked each time a piece
    /// may get its place in the log (see [`Engine::stage_own`] for our own clients' writes).
    pub(super) async fn stage(
        &self,
        w: WriteOp<'_>,
        skip: &[(u64, u64)],
        placeable: &(dyn Fn() -> Result<(), String> + Sync),
    ) -> Result<Placement, IoError> {
        let WriteOp {
            lun_idx,
            lun,
            kind,
            offset,
            len,
            ..
        } = w;
        let mirror = self.mirror.current();
        let mut staged = Vec::with_capacity(2);
        // A piece that cannot be staged fails the write, but the pieces staged before it
        // still go through to their settlement below: a record that is never settled
        // would hold its partition's acknowledged-through mark back for good.
        let mut failed = None;
        for (at, n, range) in lun.pieces(offset, len) {
            if skip.iter().any(|&(s, _)| s == at) {
                continue;
            }
            if staged.is_empty() && failed.is_none() {
                // Nothing is staged that this node may not serve now: a write it staged and
                // then refused (its lease had lapsed) would sit in the log as a record that
                // was never acknowledged, and could be mirrored and replayed over the newer
                // data of the node that took the range (simulator seed 100306). The check at
                // completion stays, for a lease that lapses while the write is under way.
                self.check_serving()?;
            }
            let part = self.partition_of(range);
            let payload = w.payload(at, n);
            let appended = part
                .append(
                    kind,
                    lun_idx as u32,
                    at,
                    n,
                    payload,
                    placeable,
                    |seq, nvram_off| {
                        lun.index().insert(Extent {
                            start: at,
                            end: at + n,
                            partition: part.id,
                            seq,
                            src: match kind {
                                RecordKind::Data => Source::Log { nvram_off },
                                _ => Source::Zero,
                            },
                        })
                    },
                )
                .await;
            let s = match appended {
                Ok(s) => s,
                Err(e) => {
                    failed = Some(IoError::from(e));
                    break;
                }
            };
            // The copy goes to the partner first; the local copy is persisted below, while
            // it travels.
            let post = mirror
                .as_ref()
                .map(|m| m.post(mirror_post(part, &s.record)));
            staged.push((part, s, post));
        }
        // Group commit: let the other writers this thread has ready (a queue's tags that
        // arrived together) stage theirs first, so that one persist (one msync, or one fence
        // after the cache-line write-backs) makes all of them durable instead of one each.
        // A committer at work on another thread takes ours too.
        if !staged.is_empty() {
            smol::future::yield_now().await;
        }
        for (part, _, _) in &staged {
            part.commit();
        }
        let pieces: Vec<_> = staged
            .iter()
            .map(|(part, s, _)| (*part, s.record, s.wrap))
            .collect();
        // Local persist and mirror post of every piece run at once; the write completes when
        // all have answered. Each answer says whether its record was settled already.
        let outcomes = futures::future::join_all(staged.into_iter().map(|(part, s, post)| {
            let mirror_attached = mirror.is_some();
            async move {
                let (local, mirrored) = futures::future::join(s.durable, async move {
                    match post {
                        Some(p) => p.await,
                        None => Err(String::from("no partner attached")),
                    }
                })
                .await;
                let local = match local {
                    Ok(r) => r.map_err(IoError::from),
                    Err(_) => Err(IoError::new(
                        libc::EIO,
                        "NVRAM persister stopped before the write was durable",
                    )),
                };
                // A pair node (it has a second store) or a log-shipping source (its mirror is
                // the destination's link): the copy it lacks is sent when the link returns.
                if mirrored.is_err() && (self.second_store.is_some() || mirror_attached) {
                    // Before the flusher can take the record: its flush must leave marks.
                    self.mirror.note_unmirrored();
                }
                match (local, mirrored) {
                    (Err(e), _) => (Err(e), false),
                    (Ok(()), Ok(())) => {
                        self.mirror.note_mirrored();
                        (Ok(()), false)
                    }
                    (Ok(()), Err(why)) => {
                        // A write-through acknowledgement waits for the flusher, which takes
                        // settled records only. (A record it releases dead shows below.)
                        settle(part, &s.record, s.wrap);
                        let seq = s.record.seq;
                        let range = self
                            .luns
                            .get(s.record.lun as usize)
                            .map(|l| (s.record.lun, l.range_of(s.record.offset)));
                        let result = self
                            .degraded(part, &s.record, range, mirror_attached, why)
                            .await;
                        match result {
                            Err(_) if part.released_dead(seq) => (Ok(()), true),
                            r => (r, true),
                        }
                    }
                }
            }
        }))
        .await;
        // Self-fencing: no acknowledgement without the right to serve (a lost lease, or a
        // pause long enough for the partner to take over).
        let serving = self.check_serving();
        // A piece whose range this node lost after it was staged is dead (a void record, see
        // `lost_ranges`): it never reaches the medium, so the write is routed again. Asked
        // after the right to serve (a node that re-read the table has killed what it lost)
        // and before settling (the flusher cannot release a record before it is settled).
        let died = pieces
            .iter()
            .any(|(part, r, _)| part.is_dead(r.lun, r.offset, r.len, r.seq));
        // Both answers are in and the write's fate is decided: the flusher may take them.
        for ((part, r, wrap), (_, settled)) in pieces.iter().zip(&outcomes) {
            if !settled {
                settle(part, r, *wrap);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        outcomes.into_iter().try_for_each(|(r, _)| r)?;
        serving?;
        Ok(
            if !died && self.still_ours(lun_idx, lun, offset, len, skip) {
                Placement::Done
            } else {
                Placement::Moved
            },
        )
    }

    /// Whether the ranges of `[offset, offset+len)` (but `skip`) are still served here, as
    /// they were when the I/O was routed: a node that lost its lease and then held it again
    /// re-reads the table, and an I/O routed before that may have gone to a range that moved.
    pub(super) fn still_ours(
        &self,
        lun_idx: usize,
        lun: &Lun,
        offset: u64,
        len: u64,
        skip: &[(u64, u64)],
    ) -> bool {
        let Some(c) = &self.cluster else {
            return true;
        };
        lun.pieces(offset, len)
            .into_iter()
            .filter(|(at, _, _)| !skip.iter().any(|&(s, _)| s == *at))
            .all(|(_, _, range)| {
                c.state(lun_idx as u32, range - lun.first_range)
                    == crate::cluster::RangeState::Local
                    && !self.partition_of(range).is_failed()
            })
    }

    /// Err(EIO) if a piece of `[offset, offset + len)` stages in a partition that stopped for
    /// good (fenced, or its NVRAM failed). Its range is not served from here: the index may
    /// still hold records that never became acknowledged writes (a write staged, then
    /// refused) or that another node has superseded, and they would shadow the medium's
    /// newer data (the simulator's seed 100040 read back an unacknowledged version that
    /// way, over a replayed acknowledged one). Before this check, a routed read of such a
    /// range also looped without end: the gate said local, `still_ours` said no.
    pub(super) fn check_partitions(&self, lun: &Lun, offset: u64, len: u64) -> Result<(), IoError> {
        for (_, _, range) in lun.pieces(offset, len) {
            let part = self.partition_of(range);
            if let Some(why) = part.failure() {
                return Err(IoError::new(
                    libc::EIO,
                    format!(
                        "LUN {} range {} stages in NVRAM partition {}, which stopped: {why}",
                        lun.name,
                        range - lun.first_range,
                        part.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Err(EIO) unless this node may serve its ranges now (see `serving`).
    pub(super) fn check_serving(&self) -> Result<(), IoError> {
        if self.serving.may_serve() {
            Ok(())
        } else {
            Err(IoError::new(libc::EIO, self.serving.refusal()))
        }
    }

    /// A write is durable locally but has no mirror copy.
    async fn degraded(
        &self,
        part: &PartitionLog,
        record: &RecordMeta,
        range: Option<(u32, u32)>,
        had_mirror: bool,
        why: String,
    ) -> Result<(), IoError> {
        if !had_mirror && self.second_store.is_none() {
            // A single node by configuration: the NVRAM copy is the acknowledgement.
            return Ok(());
        }
        self.mirror.note_degraded(why);
        // A shared medium: the partner may be reading this range from the medium and its
        // second store under our read lease (`local_reads`), and this write is in neither
        // until it is flushed: no acknowledgement before that lease has run out. (No new
        // one is granted until the partner holds a copy of every unflushed record.)
        if let (Some(c), Some(range)) = (self.cluster.clone().filter(|c| !c.own_storage()), range) {
            let (_deciding, _) =
                super::local_reads::wait_out_read_leases(&c, self.host.as_ref(), &[range]).await;
            return self.degraded_policy(part, record.seq).await;
        }
        // Each node its own medium: the partner's will miss this write, so it must never
        // take the range over (stale) before a resync. Durable before the acknowledgement.
        if let (Some(c), Some(range)) = (self.cluster.clone().filter(|c| c.own_storage()), range) {
            // Ours misses writes of the range and the partner's would miss this one: no
            // medium would hold the range whole, and nothing could resync it.
            let neither = || {
                IoError::new(
                    libc::EIO,
                    "the partner is away and this node's own medium is marked outdated for the range: no medium can take this write",
                )
            };
            if c.own_medium_outdated(range.0, range.1) {
                return Err(neither());
            }
            let (_deciding, waited) =
                super::local_reads::wait_out_read_leases(&c, self.host.as_ref(), &[range]).await;
            if waited && self.mirror_after_the_wait(part, record).await {
                return self.degraded_policy(part, record.seq).await;
            }
            // Asked again after the wait: our medium may have failed a batch of the range
            // meanwhile (simulator seed 16886 with `--storage own --local-reads --takeover
            // manual`: the mark then left both media outdated for good).
            if waited && c.own_medium_outdated(range.0, range.1) {
                return Err(neither());
            }
            let marked = run_blocking(self.host.as_ref(), move || {
                c.mark_outdated(c.partner(), &[range])
            })
            .await;
            marked.map_err(|e| {
                IoError::new(
                    libc::EIO,
                    format!("the partner is away and marking its medium outdated on the arbiter failed: {e}"),
                )
            })?;
        }
        self.degraded_policy(part, record.seq).await
    }

    /// What a write without a mirror copy waits for: nothing (`degraded = "nvram"`), or the
    /// medium (two copies: the NVRAM one and the medium).
    async fn degraded_policy(&self, part: &PartitionLog, seq: u64) -> Result<(), IoError> {
        match self.mirror.policy {
            DegradedPolicy::Nvram => Ok(()),
            DegradedPolicy::WriteThrough => part.flushed(seq).await.map_err(IoError::from),
        }
    }

    /// A degraded write waited for the partner's read lease to run out (`local_reads`), and
    /// the link may have come back meanwhile: posts its record again. True once the partner
    /// holds the copy: no mark is needed (and none is made, which would leave both media
    /// outdated should ours fail a batch next: simulator seeds 832 and 1083). Not for a dead
    /// record (the re-mirroring skips those too) or a stopped partition. A copy that crossed
    /// the record's flush is harmless: the partner's write of that batch finds it held, or
    /// refuses the batch, and the flusher marks the partner then.
    async fn mirror_after_the_wait(&self, part: &PartitionLog, record: &RecordMeta) -> bool {
        if part.is_failed() || part.is_dead(record.lun, record.offset, record.len, record.seq) {
            return false;
        }
        let Some(m) = self.mirror.current().filter(|m| m.is_up()) else {
            return false;
        };
        match m.post(mirror_post(part, record)).await {
            Ok(()) => {
                tracing::info!(
                    partition = part.id,
                    seq = record.seq,
                    "the link came back while the write waited for the partner's read lease: its copy is mirrored now, no mark"
                );
                true
            }
            Err(_) => false,
        }
    }

    /// Reads the newest data of ranges we serve: staged pieces from the NVRAM, the rest
    /// from the medium, on this thread.
    pub fn read(&self, lun_idx: usize, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let (lun, gaps) = self.read_staged(lun_idx, offset, out)?;
        for (start, gap_end) in gaps {
            if self.gap_is_stale_here(lun_idx, lun, start, gap_end) {
                return Err(stale_here_error(lun, start));
            }
            let dst = &mut out[(start - offset) as usize..(gap_end - offset) as usize];
            lun.medium
                .read_at(dst, start)
                .map_err(|e| medium_read_error(lun, start, e))?;
        }
        self.read_done(lun, out.len())
    }

    /// The same as [`Engine::read`], with the medium's part read through `reads` (the
    /// frontend's io_uring: many reads in flight, none blocking the queue thread).
    pub(super) async fn read_via<R: MediumReads>(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
        reads: &R,
    ) -> Result<(), IoError> {
        let (lun, gaps) = self.read_staged(lun_idx, offset, out)?;
        if !gaps.is_empty() {
            // Every gap at once: one piece of a read does not wait for the one before it.
            let mut rest = &mut out[..];
            let mut at = offset;
            let mut dsts = Vec::with_capacity(gaps.len());
            for &(start, gap_end) in &gaps {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - at) as usize);
                let (dst, tail) = tail.split_at_mut((gap_end - start) as usize);
                dsts.push((start, dst));
                rest = tail;
                at = gap_end;
            }
            let medium = lun.medium.as_ref();
            let results =
                futures::future::join_all(dsts.into_iter().map(|(start, dst)| async move {
                    let end = start + dst.len() as u64;
                    if self.gap_is_stale_here(lun_idx, lun, start, end) {
                        let ours = stale_here_error(lun, start);
                        return self
                            .read_partners_medium(lun_idx, lun, start, dst, ours)
                            .await;
                    }
                    match reads.read(medium, dst, start).await {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            let ours = medium_read_error(lun, start, e);
                            self.read_partners_medium(lun_idx, lun, start, dst, ours)
                                .await
                        }
                    }
                }))
                .await;
            results.into_iter().collect::<Result<Vec<()>, IoError>>()?;
        }
        self.read_done(lun, out.len())
    }

    /// Whether our own medium is outdated for a range `start..end` of `lun` touches: its
    /// unstaged data is on the partner's medium only (`storage = "own"`).
    pub(super) fn gap_is_stale_here(
        &self,
        lun_idx: usize,
        lun: &Lun,
        start: u64,
        end: u64,
    ) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        (lun.range_of(start)..=lun.range_of(end.max(start + 1) - 1))
            .any(|r| c.own_medium_outdated(lun_idx as u32, r))
    }

    /// Copies the staged pieces of `[offset, offset + out.len())` into `out`; returns the
    /// gaps, which the medium holds the newest data of (reading them may race only with
    /// later writes, never show older data: a record leaves the index only once it is on
    /// the medium).
    fn read_staged(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(&Arc<Lun>, Vec<Gap>), IoError> {
        let lun = self.lun_for(lun_idx, offset, out.len() as u64)?;
        self.check_partitions(lun, offset, out.len() as u64)?;
        // Staged bytes are copied while the index lock pins them: the flusher unindexes
        // a record before its space can be reused.
        let gaps = lun
            .index()
            .copy_staged(offset, out, |at, dst| self.region.read_at(at, dst));
        Ok((lun, gaps))
    }

    /// The bytes of LUN `lun_idx` at `offset..offset + len` if one record staged in this
    /// node's log covers them whole: where a version lives (the simulator's checker asks).
    pub fn staged_copy(&self, lun_idx: usize, offset: u64, len: usize) -> Option<Vec<u8>> {
        let lun = self.luns.get(lun_idx)?;
        let index = lun.index();
        let [Piece::Staged(x)] = index.lookup(offset, offset + len as u64)[..] else {
            return None;
        };
        let mut out = vec![0u8; len];
        if let Source::Log { nvram_off } = x.src {
            self.region.read_at(nvram_off, &mut out);
        }
        Some(out)
    }

    /// The end of every read: none of a range this node may no longer serve (its data may
    /// be stale), and the statistics.
    fn read_done(&self, lun: &Lun, len: usize) -> Result<(), IoError> {
        self.check_serving()?;
        lun.stats.reads.fetch_add(1, Ordering::Relaxed);
        lun.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads into a fresh buffer (for a forwarded read). The medium is read with O_DIRECT,
    /// which needs a 4 KiB-aligned buffer.
    pub fn read_to_vec(&self, lun_idx: usize, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        const ALIGN: usize = 4096;
        let mut raw = vec![0u8; len + ALIGN];
        let pad = raw.as_ptr().align_offset(ALIGN);
        self.read(lun_idx, offset, &mut raw[pad..pad + len])?;
        raw.drain(..pad);
        raw.truncate(len);
        Ok(raw)
    }

    /// FLUSH: nothing to do. Every completed write is already durable in the NVRAM (the
    /// device advertises no volatile cache), so there is no cache to flush.
    pub fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    pub fn set_flush_paused(&self, paused: bool) {
        for p in &self.parts {
            p.set_flush_paused(paused);
        }
    }

    /// Resolves true once every staged write is on the medium, false after `timeout`.
    pub async fn drain(&self, timeout: Duration) -> bool {
        // A huge timeout (from the control socket) means "no deadline", not a panic.
        let now = self.host.now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(u32::MAX as u64));
        for p in &self.parts {
            if !p.drained(deadline).await {
                return false;
            }
        }
        true
    }

    /// [`Engine::drain`] of the partitions `ranges` (LUN, range) stage in: every write of
    /// theirs staged before the call is on the medium (a range stages in one partition, see
    /// `config::partition_of_range`), while the other partitions go on as they are.
    pub(super) async fn drain_ranges(&self, ranges: &[(u32, u32)], timeout: Duration) -> bool {
        let now = self.host.now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(u32::MAX as u64));
        let mut parts: Vec<u32> = ranges
            .iter()
            .filter_map(|&(l, r)| self.luns.get(l as usize).map(|lun| lun.first_range + r))
            .map(|global| self.partition_of(global).id)
            .collect();
        parts.sort_unstable();
        parts.dedup();
        for id in parts {
            if let Some(p) = self.parts.iter().find(|p| p.id == id) {
                if !p.drained(deadline).await {
                    return false;
                }
            }
        }
        true
    }

    /// [`Engine::drain`] for a plain thread (the control socket, shutdown).
    pub fn drain_blocking(&self, timeout: Duration) -> bool {
        futures::executor::block_on(self.drain(timeout))
    }
}

/// The copy of a staged record to the partner: the same bytes at the same place of its
/// second store.
pub(super) fn mirror_post(part: &PartitionLog, record: &RecordMeta) -> rdma_link::Post {
    rdma_link::Post {
        partition: part.id,
        seq: record.seq,
        local_offset: part.store_offset(record.pos),
        remote_offset: part.store_offset(record.pos),
        len: record.slot as u32,
    }
}

/// The engine is done with a staged record (and its wrap marker): the flusher may take it.
fn settle(part: &PartitionLog, record: &RecordMeta, wrap: Option<RecordMeta>) {
    if let Some(w) = wrap {
        part.settle(w.seq);
    }
    part.settle(record.seq);
}

#[cfg(test)]
mod tests {
    use crate::engine::{Engine, EngineOptions, LunSpec};
    use crate::medium::MemMedium;
    use crate::nvram::NvramRegion;
    use futures::executor::block_on;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    /// A write split over two partitions whose second piece cannot be staged fails, and its
    /// first piece is still settled: before, the write returned at once and the first piece's
    /// record was never acknowledged, so its partition never flushed again.
    #[test]
    fn a_write_whose_second_piece_fails_still_settles_the_first() {
        let dir = tempfile::tempdir().expect("tmp");
        let region = NvramRegion::open(&dir.path().join("nv"), Some(16 * MIB)).expect("nvram");
        let engine = Engine::open(
            region,
            EngineOptions {
                flush: crate::flusher::FlushPolicy {
                    batch_bytes: MIB,
                    linger: Duration::from_millis(5),
                },
                ..EngineOptions::single_node("a", 2)
            },
            vec![LunSpec {
                name: "lun0".into(),
                size: 8 * MIB,
                ranges: 2,
                medium: Arc::new(MemMedium::new(8 * MIB)),
            }],
        )
        .expect("engine");
        let boundary = engine.luns[0].range_bytes;
        // Range 1 lives in partition 1: make its log refuse new records.
        engine.partition_of(1).shutdown();
        let straddling = block_on(engine.write(0, boundary - 4096, &[7u8; 8192]));
        assert!(straddling.is_err(), "the second piece cannot be staged");
        block_on(engine.write(0, 0, &[1u8; 4096])).expect("a write to partition 0");
        let p0 = engine.partition_of(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = p0.status();
            if s.flushed_through + 1 == s.next_seq {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partition 0 stopped flushing: {:?}",
                (s.acked_through, s.flushed_through, s.next_seq)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        engine.shutdown();
    }
}
