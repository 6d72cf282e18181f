//! Resync (`storage = "own"`): the owner of a range copies it onto the partner's medium when
//! that medium is marked outdated for it (`cluster::outdated`), then both withdraw their marks.
//!
//! One range at a time, as a range move: its I/O waits (its gate closes), every staged write
//! is flushed (so our medium holds the range, and the partner has every batch that the
//! copy does not cover), the range is read from our medium and written onto the partner's in
//! chunks, the partner syncs and withdraws its own marks, we withdraw ours, and the range
//! opens again. Nothing writes the range meanwhile, so the copy is its exact state. The
//! price is the range's I/O pausing for its copy: configure more, smaller ranges for large
//! LUNs (a resync that copies while writes continue is the next step, docs/shared-nothing.md).

use super::core::Engine;
use crate::cluster::{wire, NodeId, RangeState};
use crate::host::run_blocking;
use crate::lun::Lun;
use crate::medium::AlignedBuf;
use std::future::Future;

/// Bytes per resync request (well under the link's largest request).
const RESYNC_CHUNK: usize = 256 << 10;

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
        let copied = self
            .with_range_paused((l, r), |lun| async move {
                let start = r as u64 * lun.range_bytes;
                let end = (start + lun.range_bytes).min(lun.size);
                tracing::warn!(
                    "resync: copying LUN {} range {r} ({} bytes) to node {}'s medium; its I/O waits meanwhile",
                    lun.name,
                    end - start,
                    c.node_name(partner)
                );
                let mut at = start;
                while at < end {
                    self.note_range_job("resync", &lun, r, at - start, end - start);
                    let len = (end - at).min(RESYNC_CHUNK as u64) as usize;
                    let chunk = self.read_own_medium(&lun, at, len).await?;
                    let req = wire::encode(wire::OP_RESYNC_WRITE, l, at, len as u32, &chunk);
                    wire::answer(&ask(req).await?)?;
                    at += len as u64;
                }
                let done = wire::encode(wire::OP_RESYNC_DONE, l, r as u64, 0, &[]);
                wire::answer(&ask(done).await?)?;
                c.clear_outdated(partner, &ranges)
                    .map_err(|e| format!("withdrawing our marks on the arbiter: {e}"))?;
                Ok((lun.name.clone(), end - start))
            })
            .await;
        match copied {
            Ok((name, bytes)) => {
                tracing::warn!(
                    "resync: LUN {name} range {r} ({bytes} bytes) copied; node {}'s medium is up to date for it",
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
            .map_err(|e| format!("writing our medium at {offset}: {e}"))
    }

    /// The partner's resync of range `range` of LUN `lun` is complete: make it durable, then
    /// withdraw our own marks of it.
    pub fn finish_resync(&self, from: NodeId, lun: u32, range: u32) -> Result<(), String> {
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let (c, _) = self.resync_target(from, lun, range as u64 * l.range_bytes, 0)?;
        l.medium
            .sync()
            .map_err(|e| format!("syncing our medium: {e}"))?;
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
