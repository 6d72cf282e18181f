//! A snapshot of the engine for `nvmirrorctl status` (JSON and the human table), the
//! Pacemaker agent and tests: partitions, LUNs, flusher, mirror, ranges, takeover.

use super::core::{Engine, ReplayReport};
use super::takeover_state::TakeoverProgress;
use crate::cluster::RangeStatus;
use crate::config::DegradedPolicy;
use crate::log::PartitionStatus;
use crate::mirror::SecondStoreStatus;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LunStatus {
    pub name: String,
    pub size: u64,
    pub ranges: u32,
    pub medium: String,
    pub staged_extents: usize,
    pub staged_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Medium reads that failed on this node and were served from the partner's medium.
    #[serde(default)]
    pub reads_from_partner: u64,
    /// Read pieces of the partner's ranges served here under its read lease.
    #[serde(default)]
    pub reads_leased: u64,
    /// `storage = "own"`: bytes of the ranges marked outdated (for either node) that our
    /// out-of-sync map holds, what the next resync copies from our side (None: no map).
    #[serde(default)]
    pub out_of_sync_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineStatus {
    pub node: String,
    pub nvram_path: String,
    pub nvram_bytes: u64,
    pub log_id: String,
    pub partitions: Vec<PartitionStatus>,
    pub luns: Vec<LunStatus>,
    pub bytes_flushed: u64,
    pub flush_batches: u64,
    pub medium_errors: u64,
    /// Flush batches the partner wrote for us (our medium path failed).
    pub delegated_batches: u64,
    pub last_medium_error: Option<String>,
    pub replay: ReplayReport,
    pub mirror: MirrorStatus,
    /// Owner, epoch and state of every LUN range (two-node operation).
    pub ranges: Vec<RangeStatus>,
    /// The running or last takeover, if any since start.
    pub takeover: Option<TakeoverProgress>,
    /// This node's disk lease and its view of the others' (cluster nodes).
    #[serde(default)]
    pub lease: Option<crate::lease::LeaseStatus>,
    /// Whether this node may serve its ranges now (its lease, or the partner's word).
    #[serde(default)]
    pub may_serve: bool,
    /// Why a takeover is or is not happening now.
    #[serde(default)]
    pub takeover_note: Option<String>,
    /// I/Os to the partner's ranges waiting now, the partner lost, for a takeover (or its
    /// return) before they run (`cluster.forward_wait_s`).
    #[serde(default)]
    pub io_waiting_for_takeover: u64,
    /// The media's persistent reservations (`cluster.reservations = "scsi3"`).
    #[serde(default)]
    pub reservations: Vec<crate::reservation::ReservationStatus>,
    /// "shared" or "own" (each node its own medium); empty on a single node.
    #[serde(default)]
    pub storage: String,
    /// With `storage = "own"`: per node, the (LUN, range)s its medium misses writes of
    /// (marked outdated on the arbiter; only nodes with any are listed).
    #[serde(default)]
    pub outdated_media: std::collections::BTreeMap<String, Vec<(u32, u32)>>,
    /// Set when the marks could not be read from the arbiter for this status: why, and
    /// `outdated_media` holds the marks as last read (none for a node never read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_media_unread: Option<String>,
    /// With `storage = "own"`: the resync or verify of a range under way.
    #[serde(default)]
    pub range_job: Option<super::takeover_state::RangeJob>,
    /// With `storage = "own"`: the resync's rate limit in bytes per second (None: none).
    #[serde(default)]
    pub resync_rate: Option<u64>,
    /// A log-shipping source: how far its destination's log files lag behind its log.
    #[serde(default)]
    pub shipping: Option<super::ship_lag::ShippingSourceStatus>,
    /// `cluster.write_priority`: whether write priority follows the writer here.
    #[serde(default)]
    pub write_priority: bool,
    /// Ranges moved because one node asked for them (handed over by us or to us).
    #[serde(default)]
    pub write_priority_moves: u64,
    /// `cluster.write_priority.queue_writes`: writes to the partner's ranges wait for the
    /// range instead of being forwarded.
    #[serde(default)]
    pub write_priority_queues: bool,
    /// Writes that waited for a range the partner held, and those of them forwarded after
    /// all (the range did not come within `queue_timeout_ms`).
    #[serde(default)]
    pub writes_queued: u64,
    #[serde(default)]
    pub writes_queued_then_forwarded: u64,
    /// `cluster.local_reads`: reads of the partner's ranges served here under its lease.
    #[serde(default)]
    pub local_reads: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub attached: bool,
    /// "mirroring" (partner connected), "degraded" (partner unreachable: single copy or
    /// write-through, see `degraded_policy`), or "standalone" (no partner configured).
    pub state: String,
    /// The mirror link: "up", "connecting", "down", "closed", or "none" (no link attached).
    #[serde(default)]
    pub link_state: String,
    /// Transport of the live connection ("tcp", "rdma").
    pub transport: Option<String>,
    /// Heartbeat round trip in microseconds.
    pub rtt_us: Option<u64>,
    /// The link's state in words (for people; scripts read `link_state`).
    pub link: Option<String>,
    pub degraded_policy: Option<DegradedPolicy>,
    pub mirrored_records: u64,
    /// Writes acknowledged without a mirror copy (partner unreachable).
    pub degraded_records: u64,
    pub last_error: Option<String>,
    pub second_store: Option<SecondStoreStatus>,
    /// Records still being copied to the partner after it (re)connected; the pair counts as
    /// mirrored again once they are there.
    #[serde(default)]
    pub resync_left: u64,
    /// A staged record lacks its mirror copy (flushes leave flush marks until it is copied).
    #[serde(default)]
    pub unmirrored: bool,
}

impl Engine {
    pub fn status(&self) -> EngineStatus {
        let stats = &self.flusher_stats;
        let mirror = self.mirror.current();
        let partitions: Vec<_> = self.parts.iter().map(|p| p.status()).collect();
        let (outdated_media, outdated_media_unread) = self
            .cluster
            .as_ref()
            .filter(|c| c.own_storage())
            .map(|c| outdated_media_view(c))
            .unwrap_or_default();
        let mut outdated: Vec<(u32, u32)> = outdated_media.values().flatten().copied().collect();
        outdated.sort_unstable();
        outdated.dedup();
        EngineStatus {
            node: self.node.clone(),
            nvram_path: self.region.path().display().to_string(),
            nvram_bytes: self.region.len(),
            log_id: format!("{:016x}", self.sb.log_id),
            partitions: partitions.clone(),
            luns: self
                .luns
                .iter()
                .enumerate()
                .map(|(li, l)| {
                    let ix = l.index();
                    LunStatus {
                        name: l.name.clone(),
                        size: l.size,
                        ranges: l.ranges,
                        medium: l.medium.describe(),
                        staged_extents: ix.extents(),
                        staged_bytes: ix.staged_bytes(),
                        reads: l.stats.reads.load(Ordering::Relaxed),
                        writes: l.stats.writes.load(Ordering::Relaxed),
                        bytes_read: l.stats.bytes_read.load(Ordering::Relaxed),
                        bytes_written: l.stats.bytes_written.load(Ordering::Relaxed),
                        reads_from_partner: l.stats.reads_from_partner.load(Ordering::Relaxed),
                        reads_leased: l.stats.reads_leased.load(Ordering::Relaxed),
                        out_of_sync_bytes: self.out_of_sync.as_ref().map(|maps| {
                            outdated
                                .iter()
                                .filter(|&&(ol, _)| ol as usize == li)
                                .map(|&(_, r)| {
                                    let (start, end) = l.range_span(r);
                                    maps.runs_within(li as u32, start, end)
                                        .iter()
                                        .map(|&(_, len)| len)
                                        .sum::<u64>()
                                })
                                .sum()
                        }),
                    }
                })
                .collect(),
            bytes_flushed: stats.bytes_flushed.load(Ordering::Relaxed),
            flush_batches: stats.batches.load(Ordering::Relaxed),
            medium_errors: stats.medium_errors.load(Ordering::Relaxed),
            delegated_batches: stats.delegated_batches.load(Ordering::Relaxed),
            last_medium_error: stats.last_error.lock().ok().and_then(|e| e.clone()),
            replay: self.replay.clone(),
            mirror: MirrorStatus {
                attached: mirror.is_some(),
                // A pair node has a second store; a log-shipping source has only its link.
                state: match (self.second_store.is_some(), &mirror) {
                    (false, None) => "standalone",
                    (_, Some(m)) if m.is_up() => "mirroring",
                    _ => "degraded",
                }
                .into(),
                link_state: mirror
                    .as_ref()
                    .map(|m| m.state_name())
                    .unwrap_or("none")
                    .into(),
                transport: mirror
                    .as_ref()
                    .and_then(|m| m.transport())
                    .map(String::from),
                rtt_us: mirror
                    .as_ref()
                    .and_then(|m| m.rtt())
                    .map(|d| d.as_micros() as u64),
                link: mirror.as_ref().map(|m| m.describe()),
                degraded_policy: (self.second_store.is_some() || mirror.is_some())
                    .then_some(self.mirror.policy),
                mirrored_records: self.mirror.mirrored_records(),
                degraded_records: self.mirror.degraded_records(),
                last_error: self.mirror.last_error(),
                second_store: self.second_store.as_ref().map(|s| s.status()),
                resync_left: self.mirror.resync_left(),
                unmirrored: self.mirror.unmirrored().0,
            },
            ranges: self
                .cluster
                .as_ref()
                .map(|c| {
                    let mut ranges = c.status();
                    for r in &mut ranges {
                        r.serving = self.serves(r.lun as usize, r.range);
                    }
                    ranges
                })
                .unwrap_or_default(),
            takeover: self.takeover.snapshot(self.host.now()),
            lease: self
                .cluster
                .as_ref()
                .and_then(|c| c.lease())
                .map(|l| l.status()),
            may_serve: self.may_serve(),
            takeover_note: self.takeover.note(),
            io_waiting_for_takeover: self.takeover.io_waiting(),
            reservations: self
                .cluster
                .as_ref()
                .map(|c| c.reservation_status())
                .unwrap_or_default(),
            storage: match &self.cluster {
                Some(c) if c.own_storage() => "own".into(),
                Some(_) => "shared".into(),
                None => String::new(),
            },
            range_job: self
                .takeover
                .range_job
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            outdated_media,
            outdated_media_unread,
            resync_rate: self.resync_rate(),
            shipping: mirror
                .as_ref()
                .filter(|m| self.cluster.is_none() && m.keeps_log().is_some())
                .map(|_| self.ship_lag.status(&partitions, self.host.now())),
            write_priority: self.write_priority_enabled(),
            write_priority_moves: self.write_priority_moves(),
            write_priority_queues: self.write_priority_queues(),
            writes_queued: self.write_priority_queued().0,
            writes_queued_then_forwarded: self.write_priority_queued().1,
            local_reads: self.local_reads_enabled(),
        }
    }
}

/// Per node name, the (LUN, range)s its medium misses writes of.
type OutdatedMedia = std::collections::BTreeMap<String, Vec<(u32, u32)>>;

/// Per node with any, its medium's outdated ranges as the arbiter holds them now; and, when
/// the arbiter could not be read, why, with the marks as last read instead (an unreadable
/// arbiter must not show as "nothing outdated"). After one failed read the other nodes'
/// marks are not read: each would wait out the arbiter's I/O timeout too.
fn outdated_media_view(c: &crate::cluster::Cluster) -> (OutdatedMedia, Option<String>) {
    let mut view = std::collections::BTreeMap::new();
    let mut unread = None;
    for n in 0..c.nodes.len() as u32 {
        let stale = match unread {
            Some(_) => c.outdated_ranges_last_read(n),
            None => match c.outdated_ranges(n) {
                Ok(stale) => Some(stale),
                Err(e) => {
                    unread = Some(format!(
                        "the outdated-media marks could not be read ({e}); these are the marks \
                         as last read"
                    ));
                    c.outdated_ranges_last_read(n)
                }
            },
        };
        if let Some(stale) = stale.filter(|s| !s.is_empty()) {
            view.insert(c.node_name(n).to_string(), stale);
        }
    }
    (view, unread)
}
