//! Online verify (`storage = "own"`): compares our medium with the partner's for every range
//! we serve, as DRBD's online verify does. The partner answers crc32c digests of its blocks
//! (`OP_VERIFY_DIGESTS`); we compare them with digests of ours.
//!
//! Two passes per range. The fast pass runs while writes continue, so a block being written
//! may differ for a moment; only its suspects go to the exact pass, which pauses the range
//! (`with_range_paused`: gate closed, every staged write on both media) and compares them
//! again. What still differs then differs for real. With `repair`, it is copied from our
//! medium (the owner's, the one reads are served from) onto the partner's, made durable,
//! and compared once more.

use super::core::Engine;
use super::pace::Pace;
use crate::cluster::{wire, RangeState};
use crate::lun::Lun;
use crate::medium::AlignedBuf;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// Bytes per digest.
pub const VERIFY_BLOCK: usize = 4096;
/// The largest span one digest request covers.
pub const VERIFY_CHUNK: usize = 1 << 20;
/// Direct I/O needs sector-aligned spans.
const SECTOR: u64 = 512;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The node whose medium ours was compared with.
    pub partner: String,
    pub ranges: Vec<RangeVerified>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeVerified {
    pub lun: String,
    pub range: u32,
    /// Bytes compared.
    pub bytes: u64,
    pub verdict: Verdict,
}

/// Extents are (offset in the LUN, length) in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    Identical,
    /// Still different with the range's I/O paused.
    Differ {
        extents: Vec<(u64, u64)>,
    },
    /// Differed, and now holds our bytes on both media.
    Repaired {
        extents: Vec<(u64, u64)>,
    },
    /// Another node serves the range: verify it there.
    ServedElsewhere {
        node: String,
    },
    /// The partner's medium is marked outdated for the range: the resync copies it whole.
    Outdated,
    /// Our own medium is marked outdated for the range (never the case for a range we serve;
    /// checked, not assumed): nothing is compared.
    OutdatedHere,
    /// Could not be compared.
    Failed {
        error: String,
    },
}

impl Verdict {
    /// The media may differ (a difference left, or a range we could not compare).
    pub fn is_bad(&self) -> bool {
        matches!(self, Verdict::Differ { .. } | Verdict::Failed { .. })
    }
}

impl Engine {
    /// Compares every range we serve with the partner's medium; `ask` sends one request to
    /// the partner and returns its answer. With `repair`, differences are copied from ours.
    /// `rate`: at most this many bytes per second are read for the comparison (None: as
    /// fast as the media go).
    pub async fn verify_partner<Asked>(
        &self,
        repair: bool,
        rate: Option<u64>,
        ask: impl Fn(Vec<u8>) -> Asked,
    ) -> Result<VerifyReport, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let c = self.cluster.as_ref().filter(|c| c.own_storage()).ok_or(
            "verify compares the two nodes' own media: it needs cluster.storage = \"own\"",
        )?;
        let partner = c.partner();
        let outdated = c
            .outdated_ranges(partner)
            .map_err(|e| format!("reading the outdated-media marks: {e}"))?;
        let mut ranges = Vec::new();
        // The rate limit, and the bytes compared so far.
        let mut pace = (Pace::new(self.host.now(), rate), 0);
        for (l, lun) in self.luns.iter().enumerate() {
            let l = l as u32;
            for r in 0..lun.ranges {
                let (start, end) = span_of(lun, r);
                let (bytes, verdict) = match c.state(l, r) {
                    RangeState::Remote(node) => (
                        0,
                        Verdict::ServedElsewhere {
                            node: c.node_name(node).to_owned(),
                        },
                    ),
                    RangeState::TakingOver => (
                        0,
                        Verdict::Failed {
                            error: "a takeover is replaying it".into(),
                        },
                    ),
                    RangeState::Local if outdated.contains(&(l, r)) => (0, Verdict::Outdated),
                    RangeState::Local if c.own_medium_outdated(l, r) => (0, Verdict::OutdatedHere),
                    RangeState::Local => {
                        let verdict = self.verify_range(l, r, repair, &mut pace, &ask).await;
                        self.end_range_job();
                        (
                            end - start,
                            verdict.unwrap_or_else(|error| Verdict::Failed { error }),
                        )
                    }
                };
                if verdict.is_bad() {
                    tracing::warn!(
                        "verify: LUN {} range {r} against node {}: {verdict:?}",
                        lun.name,
                        c.node_name(partner)
                    );
                }
                ranges.push(RangeVerified {
                    lun: lun.name.clone(),
                    range: r,
                    bytes,
                    verdict,
                });
            }
        }
        Ok(VerifyReport {
            partner: c.node_name(partner).to_owned(),
            ranges,
        })
    }

    async fn verify_range<Asked>(
        &self,
        l: u32,
        r: u32,
        repair: bool,
        (pace, compared): &mut (Pace, u64),
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Result<Verdict, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let lun = self
            .luns
            .get(l as usize)
            .cloned()
            .ok_or_else(|| format!("LUN {l} does not exist"))?;
        let (start, end) = span_of(&lun, r);
        let mut suspects = Vec::new();
        let mut at = start;
        while at < end {
            self.note_range_job("verify", &lun, r, at - start, end - start);
            let len = (end - at).min(VERIFY_CHUNK as u64);
            suspects.extend(self.differing(l, &lun, (at, len), ask).await?);
            at += len;
            *compared += len;
            if let Some(wait) = pace.wait_after(*compared, self.host.now()) {
                self.host.sleep(wait).await;
            }
        }
        if suspects.is_empty() {
            return Ok(Verdict::Identical);
        }
        self.with_range_paused((l, r), |lun| async move {
            let mut extents = Vec::new();
            for extent in suspects {
                extents.extend(merge(self.differing(l, &lun, extent, ask).await?));
            }
            if extents.is_empty() {
                return Ok(Verdict::Identical);
            }
            if !repair {
                return Ok(Verdict::Differ { extents });
            }
            for &(at, len) in &extents {
                let ours = self.read_own_medium(&lun, at, len as usize).await?;
                let req = wire::encode(wire::OP_RESYNC_WRITE, l, at, len as u32, &ours);
                wire::answer(&ask(req).await?)?;
            }
            let sync = wire::encode(wire::OP_SYNC_MEDIUM, l, 0, 0, &[]);
            wire::answer(&ask(sync).await?)?;
            for &extent in &extents {
                if !self.differing(l, &lun, extent, ask).await?.is_empty() {
                    return Err(format!(
                        "the partner's medium still differs at {}+{} after the repair",
                        extent.0, extent.1
                    ));
                }
            }
            tracing::warn!(
                "verify: LUN {} range {r}: {} extent(s) repaired from our medium",
                lun.name,
                extents.len()
            );
            Ok(Verdict::Repaired { extents })
        })
        .await
    }

    /// The blocks of `(at, len)` (at most `VERIFY_CHUNK`) that differ between our medium and
    /// the partner's, merged into extents.
    pub(super) async fn differing<Asked>(
        &self,
        l: u32,
        lun: &Lun,
        (at, len): (u64, u64),
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Result<Vec<(u64, u64)>, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let req = wire::encode(wire::OP_VERIFY_DIGESTS, l, at, len as u32, &[]);
        let theirs = ask(req).await?;
        let theirs = wire::answer(&theirs)?.to_vec();
        let ours = digests(&self.read_own_medium(lun, at, len as usize).await?);
        if theirs.len() != ours.len() {
            return Err(format!(
                "the partner answered {} digest bytes for {at}+{len}, not {}",
                theirs.len(),
                ours.len()
            ));
        }
        let blocks = ours
            .chunks(4)
            .zip(theirs.chunks(4))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| {
                let start = at + (i * VERIFY_BLOCK) as u64;
                (start, (at + len - start).min(VERIFY_BLOCK as u64))
            });
        Ok(merge(blocks))
    }

    /// The partner's verify: crc32c digests (little-endian u32 per `VERIFY_BLOCK`) of our
    /// medium of LUN `lun` at `offset..offset + len`.
    pub fn medium_digests(&self, lun: u32, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        if !self.cluster.as_ref().is_some_and(|c| c.own_storage()) {
            return Err("verify needs storage = \"own\" on this node too".into());
        }
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        let len_ok = len > 0 && len as usize <= VERIFY_CHUNK && (len as u64).is_multiple_of(SECTOR);
        let fits = offset.is_multiple_of(SECTOR)
            && offset.checked_add(len as u64).is_some_and(|e| e <= l.size);
        if !len_ok || !fits {
            return Err(format!(
                "verify span {offset}+{len} is not a sector-aligned span of at most {VERIFY_CHUNK} bytes inside LUN {}",
                l.name
            ));
        }
        let mut buf = AlignedBuf::zeroed(len as usize)
            .map_err(|e| format!("a {len}-byte read buffer: {e}"))?;
        l.medium
            .read_at(buf.as_mut(), offset)
            .map_err(|e| format!("reading our medium at {offset}: {e}"))?;
        Ok(digests(buf.as_slice()))
    }

    /// The partner repaired or resynced our medium of LUN `lun`: make it durable.
    pub fn sync_medium_for_partner(&self, lun: u32) -> Result<(), String> {
        let l = self
            .luns
            .get(lun as usize)
            .ok_or_else(|| format!("LUN {lun} does not exist"))?;
        l.medium
            .sync()
            .map_err(|e| format!("syncing our medium: {e}"))
    }
}

/// Bytes `start..end` of range `r` of `lun`.
fn span_of(lun: &Lun, r: u32) -> (u64, u64) {
    let start = r as u64 * lun.range_bytes;
    (start, (start + lun.range_bytes).min(lun.size))
}

/// crc32c per `VERIFY_BLOCK` of `data`, little-endian (the answer to `OP_VERIFY_DIGESTS`).
pub fn digests(data: &[u8]) -> Vec<u8> {
    data.chunks(VERIFY_BLOCK)
        .flat_map(|b| rdma_link::checksum::crc32c(b).to_le_bytes())
        .collect()
}

/// Adjacent extents joined, none longer than `VERIFY_CHUNK` (one request each).
fn merge(extents: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (at, len) in extents {
        match out.last_mut() {
            Some((s, l)) if *s + *l == at && *l + len <= VERIFY_CHUNK as u64 => *l += len,
            _ => out.push((at, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_merge_up_to_one_request() {
        let b = VERIFY_BLOCK as u64;
        assert_eq!(
            merge([(0, b), (b, b), (3 * b, b)]),
            vec![(0, 2 * b), (3 * b, b)]
        );
        let many = (0..300).map(|i| (i * b, b));
        let merged = merge(many);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0], (0, VERIFY_CHUNK as u64));
        assert_eq!(merged[1].1, 300 * b - VERIFY_CHUNK as u64);
    }
}
