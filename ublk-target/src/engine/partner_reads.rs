//! Reads our medium path cannot serve, served from the partner's medium: the part of a read
//! that no staged write covers is on the partner's medium too (with one shared medium it is
//! the same disk through the partner's path; with `storage = "own"` the flusher releases a
//! record only once the partner wrote it or was marked outdated, and a partner whose medium
//! is outdated for the range refuses; and since a restart replays the partner's records into
//! its medium alone, the copies we still hold of them are read over ours). Both sides of the
//! request live here.

use super::core::{Engine, IoError};
use crate::cluster::RangeState;
use crate::lun::Lun;
use crate::medium::AlignedBuf;
use std::sync::atomic::Ordering;

/// The largest read one request asks for (a ublk I/O is at most 512 KiB).
const MAX_PARTNER_READ: u32 = 1 << 20;

impl Engine {
    /// Our medium failed to read `dst` at `start` of LUN `lun_idx` (`ours` says how): read
    /// it from the partner's medium instead, or fail with both reasons.
    pub(super) async fn read_partners_medium(
        &self,
        lun_idx: usize,
        lun: &Lun,
        start: u64,
        dst: &mut [u8],
        ours: IoError,
    ) -> Result<(), IoError> {
        let Some(c) = self.cluster.as_ref() else {
            return Err(ours);
        };
        let Some(fwd) = c.forwarder() else {
            return Err(ours);
        };
        if c.own_storage() {
            // We serve the range, so our view of its epoch is current: the partner's may
            // not be (cut off, it may not know of our takeover or of its marks).
            let (first, last) = (
                lun.range_of(start),
                lun.range_of(start + dst.len() as u64 - 1),
            );
            let theirs = c.outdated_ranges(c.partner()).map_err(|e| {
                IoError::new(
                    ours.errno,
                    format!(
                        "{}; and reading the outdated-media marks failed: {e}",
                        ours.message
                    ),
                )
            })?;
            if let Some(r) = (first..=last).find(|&r| theirs.contains(&(lun_idx as u32, r))) {
                return Err(IoError::new(
                    ours.errno,
                    format!(
                        "{}; the partner's medium is outdated for range {r} too",
                        ours.message
                    ),
                ));
            }
        }
        let answer = fwd
            .read_medium(lun_idx as u32, start, dst.len() as u32)
            .await;
        match answer {
            Ok(data) if data.len() == dst.len() => {
                dst.copy_from_slice(&data);
                let n = lun.stats.reads_from_partner.fetch_add(1, Ordering::Relaxed);
                // A failing medium fails every read: say so now and then, not each time.
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(
                        "{}; served from the partner's medium ({} such read(s) so far)",
                        ours.message,
                        n + 1
                    );
                }
                Ok(())
            }
            Ok(data) => Err(IoError::new(
                libc::EIO,
                format!(
                    "{}; the partner's medium answered {} bytes, not {}",
                    ours.message,
                    data.len(),
                    dst.len()
                ),
            )),
            Err(why) => Err(IoError::new(
                ours.errno,
                format!("{}; nor from the partner's medium: {why}", ours.message),
            )),
        }
    }

    /// The partner's medium path failed a read: `len` bytes of our medium of LUN `lun` at
    /// `offset`. Refused where our medium may miss writes (`storage = "own"`, marked
    /// outdated for the range).
    pub fn read_medium_for_partner(
        &self,
        lun: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, String> {
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let aligned = offset.is_multiple_of(512) && len.is_multiple_of(512);
        let fits = offset.checked_add(len as u64).is_some_and(|e| e <= l.size);
        if len == 0 || len > MAX_PARTNER_READ || !aligned || !fits {
            return Err(format!(
                "medium read {offset}+{len} is not a sector-aligned span of at most {MAX_PARTNER_READ} bytes inside LUN {}",
                l.name
            ));
        }
        if let Some(c) = self.cluster.as_ref().filter(|c| c.own_storage()) {
            let (first, last) = (l.range_of(offset), l.range_of(offset + len as u64 - 1));
            let outdated = c
                .outdated_ranges(c.me)
                .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
            if let Some(r) = (first..=last).find(|&r| outdated.contains(&(lun, r))) {
                return Err(format!(
                    "node {}'s medium is outdated for LUN {} range {r}: it may miss acknowledged writes",
                    self.node, l.name
                ));
            }
        }
        // The partner's records we hold first, then our medium (a copy released meanwhile
        // is on it by then), as a local read does.
        let mut out = vec![0u8; len as usize];
        let gaps = self.read_partners_held_copies(lun, l, offset, &mut out);
        if gaps.is_empty() {
            return Ok(out);
        }
        let mut buf =
            AlignedBuf::zeroed(len as usize).map_err(|e| format!("a {len}-byte buffer: {e}"))?;
        l.medium
            .read_at(buf.as_mut(), offset)
            .map_err(|e| format!("reading node {}'s medium at {offset}: {e}", self.node))?;
        for (start, end) in gaps {
            let (from, to) = ((start - offset) as usize, (end - offset) as usize);
            out[from..to].copy_from_slice(&buf.as_slice()[from..to]);
        }
        Ok(out)
    }

    /// With `storage = "own"`: copies into `out` (at `offset` of LUN `lun`) the partner's
    /// records our second store holds there, and returns the gaps they leave, which our
    /// medium serves. A copy we hold may not be on our medium yet: the partner, restarting,
    /// replays its records into its own medium and we write our copies only when its next
    /// flush batch asks (`SecondStoreArea::write_held_for_partner`). Its medium failing
    /// before that, our medium alone would answer older data (simulator seed 57602). Held
    /// void records are read, not waited out: a repair's reads may come while one is held,
    /// and refusing them stalled it (seed 63951).
    fn read_partners_held_copies(
        &self,
        lun: u32,
        l: &Lun,
        offset: u64,
        out: &mut [u8],
    ) -> Vec<(u64, u64)> {
        let end = offset + out.len() as u64;
        let (Some(c), Some(store)) = (self.cluster.as_ref(), self.second_store.as_ref()) else {
            return vec![(offset, end)];
        };
        if !c.own_storage() {
            return vec![(offset, end)];
        }
        let mut gaps = Vec::new();
        let mut at = offset;
        while at < end {
            let range = l.range_of(at);
            let piece_end = l.range_span(range).1.min(end);
            let partition = self.partition_of(l.first_range + range).id;
            let piece = &mut out[(at - offset) as usize..(piece_end - offset) as usize];
            // Only copies of a range the partner owns (as our view says) are its newest data.
            if c.state(lun, range) != RangeState::Remote(c.partner()) {
                gaps.push((at, piece_end));
                at = piece_end;
                continue;
            }
            gaps.extend(store.read_held_past_voids(partition, lun, at, piece));
            at = piece_end;
        }
        gaps
    }
}
