//! Resync (`storage = "own"`): the owner of a range copies it onto the partner's medium when
//! that medium is marked outdated for it (`cluster::outdated`), then both withdraw their marks.
//!
//! One range at a time, while its I/O continues: the out-of-sync parts of the range (the
//! regions our out-of-sync map or the partner's marks: `nvram::out_of_sync`; the whole range
//! without maps) are read from our medium and written onto the partner's in chunks. Writes
//! meanwhile reach both media through the flusher as always; the copy fence
//! (`crate::copy_fence`) keeps a chunk and an overlapping batch from interleaving, so the
//! partner's medium never ends with a chunk older than a batch. At the end the range's I/O
//! pauses for a moment (its gate closes and every staged write is flushed to both media), and
//! unless the partner's medium missed a batch of the range during the copy (then its marks
//! stay and the copy runs again), the partner syncs, clears its map's regions of the range
//! and withdraws its own marks, we do the same, and the range opens again.

use super::core::Engine;
use super::pace::Pace;
use crate::cluster::{wire, NodeId, RangeState};
use crate::copy_fence::Holder;
use crate::host::run_blocking;
use crate::lun::Lun;
use crate::medium::AlignedBuf;
use futures::{StreamExt, TryStreamExt};
use std::future::Future;

/// Bytes per resync request (well under the link's largest request).
const RESYNC_CHUNK: usize = 256 << 10;
/// Resync requests in flight at once.
const RESYNC_IN_FLIGHT: usize = 4;

/// A run `(start, len)` of a resync as its requests: `(offset, len)` of at most
/// `RESYNC_CHUNK` bytes each. (A named function, not a closure: the resync's future must be
/// `Send`, which a closure over a borrowed run defeats.)
fn chunks_of_run((start, len): (u64, u64)) -> impl Iterator<Item = (u64, usize)> {
    let end = start + len;
    (start..end)
        .step_by(RESYNC_CHUNK)
        .map(move |at| (at, (end - at).min(RESYNC_CHUNK as u64) as usize))
}

impl Engine {
    /// Copies every range we own that the partner's medium is outdated for; `ask` sends one
    /// request to the partner and returns its answer. Returns the ranges copied.
    pub async fn resync_partner<Asked>(
        &self,
        ask: impl Fn(Vec<u8>) -> Asked,
    ) -> Result<usize, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let Some(c) = self.cluster.as_ref().filter(|c| c.own_storage()) else {
            return Ok(0);
        };
        let partner = c.partner();
        let stale: Vec<(u32, u32)> = c
            .outdated_ranges(partner)
            .map_err(|e| format!("reading the outdated-media marks: {e}"))?
            .into_iter()
            .filter(|&(l, r)| c.state(l, r) == RangeState::Local)
            // Never copy a range our own medium misses writes of (it is repaired first).
            .filter(|&(l, r)| !c.own_medium_outdated(l, r))
            .collect();
        if !stale.is_empty() && self.parts.iter().any(|p| p.status().flush_paused) {
            // The flush before a copy could not finish: the range's I/O would only wait.
            return Err("the flusher is paused (nvmirrorctl flush resume)".into());
        }
        let mut copied = 0;
        for range in stale {
            let done = self.resync_range(partner, range, &ask).await;
            self.end_range_job();
            done?;
            copied += 1;
        }
        Ok(copied)
    }

    /// The resync's rate limit in bytes per second (None: none).
    pub fn resync_rate(&self) -> Option<u64> {
        Some(self.resync_rate.load(std::sync::atomic::Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Changes the resync's rate limit (None: none); a resync under way follows at once.
    pub fn set_resync_rate(&self, rate: Option<u64>) {
        self.resync_rate
            .store(rate.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until `bytes` copied so far are within the resync's rate limit (which may have
    /// changed since the copy started).
    async fn keep_resync_pace(&self, pace: &std::sync::Mutex<Pace>, bytes: u64) {
        let wait = {
            let mut pace = pace.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.host.now();
            pace.follow(self.resync_rate(), bytes, now);
            pace.wait_after(bytes, now)
        };
        if let Some(wait) = wait {
            self.host.sleep(wait).await;
        }
    }

    async fn resync_range<Asked>(
        &self,
        partner: NodeId,
        (l, r): (u32, u32),
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Result<(), String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let ranges = [(l, r)];
        let lun = self
            .luns
            .get(l as usize)
            .cloned()
            .ok_or_else(|| format!("LUN {l} does not exist"))?;
        let (start, end) = lun.range_span(r);
        // A batch of the range the partner's medium misses from now on marks its regions
        // out of sync again: the marks must then outlive this resync (checked at its end).
        let missed_before = self.copy_fence.missed((l, r));
        let runs = self.out_of_sync_parts(l, r, (start, end), ask).await;
        let total: u64 = runs.iter().map(|&(_, len)| len).sum();
        let limit = match self.resync_rate() {
            Some(rate) if rate % (1 << 20) == 0 => format!("at most {} MiB/s", rate >> 20),
            Some(rate) => format!("at most {} KiB/s", rate.div_ceil(1 << 10)),
            None => "with no rate limit".to_string(),
        };
        tracing::warn!(
            "resync: copying {total} out-of-sync byte(s) of LUN {} range {r} ({} bytes) in {} run(s) to node {}'s medium, {limit}, while its I/O continues",
            lun.name,
            end - start,
            runs.len(),
            c.node_name(partner)
        );
        // Several chunks in flight: our medium's read of one overlaps the link and the
        // partner's write of others. Each holds its extent in the copy fence from our read
        // to the partner's answer, so no batch of the range overtakes it on the partner's
        // medium with newer bytes (`copy_fence`).
        // Each chunk starts when the bytes before it are within the rate limit.
        let chunks =
            runs.clone()
                .into_iter()
                .flat_map(chunks_of_run)
                .scan(0u64, |before, (at, len)| {
                    let chunk = (*before, at, len);
                    *before += len as u64;
                    Some(chunk)
                });
        let pace = std::sync::Mutex::new(Pace::new(self.host.now(), self.resync_rate()));
        let (lun_ref, fence, pace) = (&lun, &self.copy_fence, &pace);
        let mut copies = futures::stream::iter(chunks)
            .map(|(before, at, len)| async move {
                self.keep_resync_pace(pace, before).await;
                let _held = fence.enter(Holder::Copy, &[(l, at, len as u64)]).await;
                let chunk = self.read_own_medium(lun_ref, at, len).await?;
                let req = wire::encode(wire::OP_RESYNC_WRITE, l, at, len as u32, &chunk);
                wire::answer(&ask(req).await?)?;
                Ok::<u64, String>(len as u64)
            })
            .buffer_unordered(RESYNC_IN_FLIGHT);
        let mut done_bytes = 0;
        self.note_range_job("resync", &lun, r, done_bytes, total);
        let copied = async {
            while let Some(copied) = copies.try_next().await? {
                done_bytes += copied;
                self.note_range_job("resync", &lun, r, done_bytes, total);
            }
            // The last chunk's bytes count too: a range's copy takes at least bytes / rate.
            self.keep_resync_pace(pace, total).await;
            Ok::<(), String>(())
        }
        .await;
        drop(copies);
        // The end, with the range's I/O paused for a moment: every staged write on both media
        // (or marked as missed), then the marks go on both sides.
        let copied = match copied {
            Err(e) => Err(e),
            Ok(()) => {
                self.with_range_paused((l, r), |lun| async move {
                    if self.copy_fence.missed((l, r)) != missed_before {
                        return Err(
                            "the partner's medium missed a batch of the range during the copy: copying again"
                                .to_string(),
                        );
                    }
                    let done = wire::encode(wire::OP_RESYNC_DONE, l, r as u64, 0, &[]);
                    wire::answer(&ask(done).await?)?;
                    if let Some(maps) = &self.out_of_sync {
                        maps.clear_within(l, start, end);
                        maps.persist()
                            .map_err(|e| format!("persisting our out-of-sync map: {e}"))?;
                    }
                    c.clear_outdated(partner, &ranges)
                        .map_err(|e| format!("withdrawing our marks on the arbiter: {e}"))?;
                    Ok((lun.name.clone(), total, end - start, runs.len()))
                })
                .await
            }
        };
        match copied {
            Ok((name, bytes, range_bytes, runs)) => {
                tracing::warn!(
                    "resync: LUN {name} range {r}: copied {bytes} of its {range_bytes} bytes ({runs} out-of-sync run(s)); node {}'s medium is up to date for it",
                    c.node_name(partner)
                );
                Ok(())
            }
            Err(e) => Err(format!(
                "resync of LUN {l} range {r} to node {}: {e}",
                c.node_name(partner)
            )),
        }
    }

    /// What of range `r` of LUN `l` (bytes `span`) the copy must cover: the union of our
    /// map's out-of-sync parts and the partner's (the whole range where a map is missing or
    /// the partner cannot answer).
    async fn out_of_sync_parts<Asked>(
        &self,
        l: u32,
        r: u32,
        (start, end): (u64, u64),
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Vec<(u64, u64)>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let whole = vec![(start, end - start)];
        // Asked even without a map of ours: the question starts the partner's watch for
        // copies it drops meanwhile (`finish_resync`).
        let req = wire::encode(wire::OP_OUT_OF_SYNC, l, r as u64, 0, &[]);
        let theirs = match ask(req)
            .await
            .and_then(|a| wire::answer(&a).map(wire::decode_runs))
        {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!("resync: the partner's out-of-sync map of LUN {l} range {r} is unknown ({e}): copying the whole range");
                None
            }
        };
        let (Some(theirs), Some(maps)) = (theirs, &self.out_of_sync) else {
            return whole;
        };
        let mut runs: Vec<(u64, u64)> = maps
            .runs_within(l, start, end)
            .into_iter()
            .chain(theirs)
            // Only what lies inside the range (a partner's answer is input).
            .filter_map(|(o, len)| {
                let (from, to) = (o.max(start), o.saturating_add(len).min(end));
                (from < to).then_some((from, to))
            })
            .collect();
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (from, to) in runs {
            match merged.last_mut() {
                Some((_, last_to)) if from <= *last_to => *last_to = (*last_to).max(to),
                _ => merged.push((from, to)),
            }
        }
        merged.into_iter().map(|(f, t)| (f, t - f)).collect()
    }

    /// The partner's resync of range `range` of LUN `lun` asks what our out-of-sync map
    /// holds of it (the whole range without a map).
    pub fn out_of_sync_runs(
        &self,
        from: NodeId,
        lun: u32,
        range: u32,
    ) -> Result<Vec<(u64, u64)>, String> {
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let (start, end) = l.range_span(range);
        self.resync_target(from, lun, start, 0)?;
        self.dropped_during_resync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(lun, range));
        self.resyncs_begun
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((lun, range));
        Ok(match &self.out_of_sync {
            Some(maps) => maps.runs_within(lun, start, end),
            None => vec![(start, end - start)],
        })
    }

    /// `len` bytes of our own medium of `lun` at `at`, read off the async runtime.
    pub(super) async fn read_own_medium(
        &self,
        lun: &Lun,
        at: u64,
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let medium = lun.medium.clone();
        run_blocking(self.host.as_ref(), move || {
            let mut buf = AlignedBuf::zeroed(len)?;
            medium.read_at(buf.as_mut(), at)?;
            Ok::<_, std::io::Error>(buf.as_slice().to_vec())
        })
        .await
        .map_err(|e| format!("reading our medium at {at}: {e}"))
    }

    /// The partner's resync: `data` goes to our medium at `offset` of LUN `lun`, a range the
    /// table gives to `from` (never one we serve).
    pub fn apply_resync_write(
        &self,
        from: NodeId,
        lun: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let (_, l) = self.resync_target(from, lun, offset, data.len() as u64)?;
        l.medium
            .write_at(data, offset)
            .map_err(|e| format!("writing our medium at {offset}: {e}"))?;
        if let Some(ss) = &self.second_store {
            ss.forget_resynced(lun, offset, data.len() as u64);
        }
        Ok(())
    }

    /// The partner's resync of range `range` of LUN `lun` is complete: make it durable, then
    /// withdraw our own marks of it.
    pub fn finish_resync(&self, from: NodeId, lun: u32, range: u32) -> Result<(), String> {
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let (c, _) = self.resync_target(from, lun, range as u64 * l.range_bytes, 0)?;
        if !self
            .resyncs_begun
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(lun, range))
        {
            // The copy began before this node's start: what it wrote before then may have
            // been lost with the page cache (a power cut; simulator seed 2288 with `--storage
            // own --resync-rate 64 --io-delay`: the marks went while the medium lacked
            // acknowledged writes).
            return Err(format!(
                "the resync of LUN {} range {range} began before this node started: it must be copied again",
                l.name
            ));
        }
        if self
            .dropped_during_resync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(lun, range))
        {
            // The copy may have passed their regions already: keep the marks, copy again.
            return Err(format!(
                "copies of LUN {} range {range} were dropped unwritten while it was copied: it must be copied again",
                l.name
            ));
        }
        l.medium
            .sync()
            .map_err(|e| format!("syncing our medium: {e}"))?;
        if let Some(maps) = &self.out_of_sync {
            let (start, end) = l.range_span(range);
            maps.clear_within(lun, start, end);
            maps.persist()
                .map_err(|e| format!("persisting our out-of-sync map: {e}"))?;
        }
        c.clear_outdated(c.me, &[(lun, range)])
            .map_err(|e| format!("withdrawing our marks on the arbiter: {e}"))
    }

    fn resync_target(
        &self,
        from: NodeId,
        lun: u32,
        offset: u64,
        len: u64,
    ) -> Result<(&crate::cluster::Cluster, &crate::lun::Lun), String> {
        let c = self
            .cluster
            .as_ref()
            .filter(|c| c.own_storage())
            .ok_or("a resync needs storage = \"own\"")?;
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let end = offset.checked_add(len).filter(|&e| e <= l.size);
        let range = l.range_of(offset);
        if end.is_none() || (len > 0 && l.range_of(offset + len - 1) != range) {
            return Err(format!(
                "resync write {offset}+{len} does not fit one range of LUN {}",
                l.name
            ));
        }
        let owner = c
            .owner_on_medium(lun, range)
            .map_err(|e| format!("reading the ownership table: {e}"))?;
        if owner != Some(from) || owner == Some(c.me) {
            return Err(format!(
                "LUN {} range {range} is not node {}'s on the medium: no resync of it",
                l.name,
                c.node_name(from)
            ));
        }
        Ok((c, l))
    }
}
