//! The metadata area at the end of the shared medium (of LUN 0): 4 KiB slots written with
//! O_DIRECT|O_DSYNC, each sealed with a crc32c.
//!
//! * slots 0 and 1: the ownership table. Each range of each LUN has an owner node and an
//!   epoch; the two slots are written alternately with a generation, so a torn update leaves
//!   the previous table readable. A takeover bumps the epoch of the ranges it moves; a node
//!   re-reads the table before each flush batch and stops flushing ranges whose epoch moved on
//!   without it (fencing).
//! * slot `MARKS_SLOT + node`: that node's flush marks ([`FlushMarks`]).
//! * slot `LEASE_SLOT + node`: that node's disk heartbeat ([`LeaseRecord`], see `lease`).
//! * slot `OUTDATED_SLOT + ...` (`cluster::outdated`) and `CLAIM_SLOT + node`
//!   (`cluster::claim_note`): outdated-medium marks and a takeover's unfinished claim.

use std::io;

pub const TABLE_MAGIC: u32 = 0x544f_564e; // "NVOT"
pub const TABLE_VERSION: u32 = 1;
pub const SLOT_BYTES: u64 = 4096;
/// Bytes reserved at the end of the medium for the table (both slots, room to grow).
pub const METADATA_BYTES: u64 = 1 << 20;
// Both kinds of 4 KiB slot (table, flush marks) end with a crc32c of everything before it.
const SLOT_CRC_AT: usize = SLOT_BYTES as usize - 4;
/// LUNs the header has range counts for.
pub const MAX_LUNS: usize = 16;
/// Entries that fit in one slot, between the header and the checksum.
pub const MAX_ENTRIES: usize = (SLOT_CRC_AT - 64) / 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeOwner {
    /// Index of the owner in the cluster's node list.
    pub owner: u32,
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnershipTable {
    pub cluster_id: u64,
    pub generation: u64,
    /// Per LUN, per range.
    pub luns: Vec<Vec<RangeOwner>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the ownership table has {0} ranges in all; at most {MAX_ENTRIES} fit (use fewer lun ranges)")]
    TooLarge(usize),
    #[error("the ownership table has {0} LUNs; at most {MAX_LUNS} fit (use fewer LUNs)")]
    TooManyLuns(usize),
    #[error("the ownership table on the medium belongs to cluster {found}, this node is in cluster {expected}; check the medium path and cluster.id")]
    WrongCluster { found: u64, expected: u64 },
    #[error("the ownership table on the medium describes {found} LUN range(s), the config {expected}; every node must use the same LUN layout")]
    Layout { found: String, expected: String },
    #[error("ownership table I/O: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Moved(String),
    /// A table write failed and could not be settled either way: it may still land.
    #[error("{0}")]
    Uncertain(String),
}

fn seal_slot(b: &mut [u8]) {
    let crc = rdma_link::checksum::crc32c(&b[..SLOT_CRC_AT]);
    b[SLOT_CRC_AT..SLOT_BYTES as usize].copy_from_slice(&crc.to_le_bytes());
}

fn slot_crc_ok(b: &[u8]) -> bool {
    rdma_link::checksum::crc32c(&b[..SLOT_CRC_AT]) == u32_at(b, SLOT_CRC_AT)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

impl OwnershipTable {
    pub fn encode(&self) -> Result<Vec<u8>, TableError> {
        let total: usize = self.luns.iter().map(|l| l.len()).sum();
        if total > MAX_ENTRIES {
            return Err(TableError::TooLarge(total));
        }
        // The header has room for MAX_LUNS range counts: a table with more could not be read back.
        if self.luns.len() > MAX_LUNS {
            return Err(TableError::TooManyLuns(self.luns.len()));
        }
        let mut b = vec![0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(&TABLE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..28].copy_from_slice(&(self.luns.len() as u32).to_le_bytes());
        let mut at = 64;
        // Per LUN: the range count, then the entries.
        let mut counts = Vec::new();
        for l in &self.luns {
            counts.push(l.len() as u16);
        }
        for (i, c) in counts.iter().enumerate() {
            b[28 + i * 2..30 + i * 2].copy_from_slice(&c.to_le_bytes());
        }
        for l in &self.luns {
            for r in l {
                b[at..at + 4].copy_from_slice(&r.owner.to_le_bytes());
                b[at + 4..at + 12].copy_from_slice(&r.epoch.to_le_bytes());
                at += 12;
            }
        }
        seal_slot(&mut b);
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Option<OwnershipTable> {
        if b.len() < SLOT_BYTES as usize {
            return None;
        }
        let u32_at = |i: usize| u32_at(b, i);
        let u64_at = |i: usize| u64_at(b, i);
        let end = SLOT_CRC_AT;
        if u32_at(0) != TABLE_MAGIC || u32_at(4) != TABLE_VERSION || !slot_crc_ok(b) {
            return None;
        }
        let nluns = u32_at(24) as usize;
        if nluns > MAX_LUNS {
            return None;
        }
        let mut luns = Vec::new();
        let mut at = 64;
        for i in 0..nluns {
            let n = u16::from_le_bytes([b[28 + i * 2], b[29 + i * 2]]) as usize;
            let mut l = Vec::with_capacity(n);
            for _ in 0..n {
                if at + 12 > end {
                    return None;
                }
                l.push(RangeOwner {
                    owner: u32_at(at),
                    epoch: u64_at(at + 4),
                });
                at += 12;
            }
            luns.push(l);
        }
        Some(OwnershipTable {
            cluster_id: u64_at(8),
            generation: u64_at(16),
            luns,
        })
    }

    fn shape(&self) -> String {
        self.luns
            .iter()
            .map(|l| l.len().to_string())
            .collect::<Vec<_>>()
            .join("+")
    }
}

pub const MARKS_MAGIC: u32 = 0x4d46_564e; // "NVFM"
/// Slots 0 and 1 hold the table; slot `MARKS_SLOT + node` holds that node's flush marks.
pub const MARKS_SLOT: u64 = 2;
/// Partitions whose marks fit in one slot, between the header and the checksum.
pub const MAX_MARKS: usize = (SLOT_CRC_AT - 64) / 8;

/// How far each of a node's partitions is on the medium. The node writes them while its
/// partner is unreachable (a release cannot travel over the link then), before it
/// acknowledges a write that has no mirror copy. A partner that takes over skips the mirrored
/// records at or below them: replaying those would put old data over newer writes the node
/// made without a mirror.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlushMarks {
    pub cluster_id: u64,
    pub node: u32,
    /// The NVRAM log the sequence numbers belong to.
    pub log_id: u64,
    /// Per partition: every record up to this sequence number is on the medium, except the
    /// records of `lost` ranges above their own bound.
    pub flushed_through: Vec<u64>,
    /// Ranges this node lost with records of them staged: those records died unwritten (the
    /// flusher released them as dead), so `flushed_through` passing them does not mean they
    /// are on the medium. A takeover replay under `epoch` (the claim this node learned of)
    /// must replay the copies above `flushed_through` here (simulator seed 4387: a
    /// restarted taker's replay skipped, by the marks, the copy of an acknowledged write the
    /// old owner had released dead).
    #[serde(default)]
    pub lost: Vec<LostRange>,
    /// Ranges whose records below a seq this node voided (void records, `nvram::void`): the
    /// partner may never get the void records themselves (the link was down, and this node
    /// died before it came back), and its copies of those records are stale for any later
    /// claim (simulator seed 41695: a second takeover replayed an old copy over newer
    /// writes). A replay honours them as it honours void records.
    #[serde(default)]
    pub voided: Vec<VoidedRange>,
}

/// See [`FlushMarks::voided`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VoidedRange {
    pub lun: u32,
    pub range: u32,
    /// The range's epoch in the table the node read when it voided: binds replays under a
    /// later epoch only (`nvram::void::VoidMark::binds_replay_under`).
    pub epoch: u64,
    pub partition: u32,
    /// Every record of the range in `partition` below this seq is dead.
    pub below_seq: u64,
}

/// See [`FlushMarks::lost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostRange {
    pub lun: u32,
    pub range: u32,
    /// The range's epoch in the table the node read when it learned of the loss.
    pub epoch: u64,
    /// The partition the range stages in, and how far it was on the medium then.
    pub partition: u32,
    pub flushed_through: u64,
}

const LOST_RANGE_BYTES: usize = 32;

impl FlushMarks {
    /// The replay bound for a copy of `partition` in (`lun`, `range`) by a takeover that
    /// claimed the range under `claimed_epoch` (None: unknown, the lowest bound applies).
    pub fn flushed_bound(
        &self,
        partition: u32,
        lun: u32,
        range: u32,
        claimed_epoch: Option<u64>,
    ) -> u64 {
        let marks = self
            .flushed_through
            .get(partition as usize)
            .copied()
            .unwrap_or(0);
        self.lost
            .iter()
            .filter(|l| l.lun == lun && l.range == range && l.partition == partition)
            .filter(|l| claimed_epoch.is_none_or(|e| l.epoch >= e))
            .map(|l| l.flushed_through)
            .fold(marks, u64::min)
    }

    /// Whether a copy of `partition` in (`lun`, `range`) with `seq` is dead for a takeover
    /// replay under `claimed_epoch` (None: unknown, every void binds).
    pub fn voided_kills(
        &self,
        partition: u32,
        lun: u32,
        range: u32,
        seq: u64,
        claimed_epoch: Option<u64>,
    ) -> bool {
        self.voided.iter().any(|v| {
            v.partition == partition
                && v.lun == lun
                && v.range == range
                && seq < v.below_seq
                && claimed_epoch.is_none_or(|e| v.epoch < e)
        })
    }

    /// Only the voided ranges, for a replay into a medium these marks do not describe
    /// (`storage = "own"`: the partner's flushed seqs are on its own medium, not ours, so
    /// none bounds our replay), while its voids kill copies on any medium.
    pub fn voids_only(&self) -> FlushMarks {
        FlushMarks {
            flushed_through: vec![0; self.flushed_through.len()],
            lost: Vec::new(),
            ..self.clone()
        }
    }

    /// How many lost and voided ranges fit in the slot beside `partitions` marks.
    pub fn lost_room(partitions: usize) -> usize {
        SLOT_CRC_AT.saturating_sub(64 + partitions * 8) / LOST_RANGE_BYTES
    }

    pub fn encode(&self) -> Result<Vec<u8>, TableError> {
        if self.flushed_through.len() > MAX_MARKS {
            return Err(TableError::TooLarge(self.flushed_through.len()));
        }
        if self.lost.len() + self.voided.len() > Self::lost_room(self.flushed_through.len()) {
            return Err(TableError::TooLarge(self.lost.len() + self.voided.len()));
        }
        let mut b = vec![0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(&MARKS_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.node.to_le_bytes());
        b[20..28].copy_from_slice(&self.log_id.to_le_bytes());
        b[28..32].copy_from_slice(&(self.flushed_through.len() as u32).to_le_bytes());
        for (i, seq) in self.flushed_through.iter().enumerate() {
            b[64 + i * 8..72 + i * 8].copy_from_slice(&seq.to_le_bytes());
        }
        // Bytes 32..36 (36..40) were zero before lost (voided) ranges existed: an older slot
        // reads as having none.
        b[32..36].copy_from_slice(&(self.lost.len() as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(self.voided.len() as u32).to_le_bytes());
        let lost = self.lost.iter().map(|l| RangeEntry {
            lun: l.lun,
            range: l.range,
            epoch: l.epoch,
            partition: l.partition,
            seq: l.flushed_through,
        });
        let voided = self.voided.iter().map(|v| RangeEntry {
            lun: v.lun,
            range: v.range,
            epoch: v.epoch,
            partition: v.partition,
            seq: v.below_seq,
        });
        let at = 64 + self.flushed_through.len() * 8;
        for (i, entry) in lost.chain(voided).enumerate() {
            entry.put(&mut b[at + i * LOST_RANGE_BYTES..at + (i + 1) * LOST_RANGE_BYTES]);
        }
        seal_slot(&mut b);
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Option<FlushMarks> {
        if b.len() < SLOT_BYTES as usize {
            return None;
        }
        let u32_at = |i: usize| u32_at(b, i);
        let u64_at = |i: usize| u64_at(b, i);
        let n = u32_at(28) as usize;
        let lost = u32_at(32) as usize;
        let voided = u32_at(36) as usize;
        if u32_at(0) != MARKS_MAGIC
            || u32_at(4) != TABLE_VERSION
            || !slot_crc_ok(b)
            || n > MAX_MARKS
            || lost + voided > Self::lost_room(n)
        {
            return None;
        }
        let entry = |i: usize| RangeEntry::at(b, 64 + n * 8 + i * LOST_RANGE_BYTES);
        Some(FlushMarks {
            cluster_id: u64_at(8),
            node: u32_at(16),
            log_id: u64_at(20),
            flushed_through: (0..n).map(|i| u64_at(64 + i * 8)).collect(),
            lost: (0..lost)
                .map(entry)
                .map(|e| LostRange {
                    lun: e.lun,
                    range: e.range,
                    epoch: e.epoch,
                    partition: e.partition,
                    flushed_through: e.seq,
                })
                .collect(),
            voided: (lost..lost + voided)
                .map(entry)
                .map(|e| VoidedRange {
                    lun: e.lun,
                    range: e.range,
                    epoch: e.epoch,
                    partition: e.partition,
                    below_seq: e.seq,
                })
                .collect(),
        })
    }
}

/// How a lost or a voided range sits in the marks slot: 32 bytes, its seq (the bound) last.
struct RangeEntry {
    lun: u32,
    range: u32,
    epoch: u64,
    partition: u32,
    seq: u64,
}

impl RangeEntry {
    fn put(&self, e: &mut [u8]) {
        e[0..4].copy_from_slice(&self.lun.to_le_bytes());
        e[4..8].copy_from_slice(&self.range.to_le_bytes());
        e[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        e[16..20].copy_from_slice(&self.partition.to_le_bytes());
        e[24..32].copy_from_slice(&self.seq.to_le_bytes());
    }

    fn at(b: &[u8], e: usize) -> RangeEntry {
        RangeEntry {
            lun: u32_at(b, e),
            range: u32_at(b, e + 4),
            epoch: u64_at(b, e + 8),
            partition: u32_at(b, e + 16),
            seq: u64_at(b, e + 24),
        }
    }
}

/// `node`'s flush marks, if it ever wrote some (for this cluster).
pub fn load_marks(
    store: &dyn TableStore,
    cluster_id: u64,
    node: u32,
) -> Result<Option<FlushMarks>, TableError> {
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    store.read_slot(MARKS_SLOT + node as u64, &mut buf)?;
    Ok(FlushMarks::decode(&buf).filter(|m| m.cluster_id == cluster_id && m.node == node))
}

pub fn save_marks(store: &dyn TableStore, m: &FlushMarks) -> Result<(), TableError> {
    store.write_slot(MARKS_SLOT + m.node as u64, &m.encode()?)?;
    Ok(())
}

pub const LEASE_MAGIC: u32 = 0x4c48_564e; // "NVHL"
/// Slot `LEASE_SLOT + node` holds that node's disk heartbeat.
pub const LEASE_SLOT: u64 = 32;
/// Slot `CLAIM_SLOT + node` holds that node's unfinished takeover claim (`cluster::claim_note`).
pub const CLAIM_SLOT: u64 = 240;
/// Nodes whose heartbeats fit before the claim notes.
pub const MAX_LEASE_NODES: u64 = CLAIM_SLOT - LEASE_SLOT;

/// One node's disk heartbeat: it rewrites its slot with the next `counter` every renewal
/// interval while it holds its lease. A new process writes a new random `incarnation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    pub cluster_id: u64,
    pub node: u32,
    pub incarnation: u64,
    pub counter: u64,
    /// The node gave its lease up on purpose (a clean stop): it serves nothing.
    pub released: bool,
}

impl LeaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(&LEASE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.node.to_le_bytes());
        b[20..28].copy_from_slice(&self.incarnation.to_le_bytes());
        b[28..36].copy_from_slice(&self.counter.to_le_bytes());
        b[36] = u8::from(self.released);
        seal_slot(&mut b);
        b
    }

    pub fn decode(b: &[u8]) -> Option<LeaseRecord> {
        if b.len() < SLOT_BYTES as usize
            || u32_at(b, 0) != LEASE_MAGIC
            || u32_at(b, 4) != TABLE_VERSION
            || !slot_crc_ok(b)
            || b[36] > 1
        {
            return None;
        }
        Some(LeaseRecord {
            cluster_id: u64_at(b, 8),
            node: u32_at(b, 16),
            incarnation: u64_at(b, 20),
            counter: u64_at(b, 28),
            released: b[36] == 1,
        })
    }
}

/// `node`'s heartbeat as the medium has it (None: never written, or damaged).
pub fn load_lease(
    store: &dyn TableStore,
    cluster_id: u64,
    node: u32,
) -> Result<Option<LeaseRecord>, TableError> {
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    store.read_slot(LEASE_SLOT + node as u64, &mut buf)?;
    Ok(LeaseRecord::decode(&buf).filter(|r| r.cluster_id == cluster_id && r.node == node))
}

pub fn save_lease(store: &dyn TableStore, r: &LeaseRecord) -> Result<(), TableError> {
    if r.node as u64 >= MAX_LEASE_NODES {
        return Err(TableError::TooLarge(r.node as usize));
    }
    store.write_slot(LEASE_SLOT + r.node as u64, &r.encode())?;
    Ok(())
}

/// Where the table is kept: reads and writes of whole 4 KiB slots, durable on return.
pub trait TableStore: Send + Sync {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()>;
    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()>;

    /// Where the slots live, for messages.
    fn place(&self) -> ArbiterPlace {
        ArbiterPlace::SharedMedium
    }

    /// A read the caller acts on for good (what a node serves after a start or a lease
    /// regained): no write that failed before it may surface after it. A disk bounds a
    /// failed write by its I/O timeout and the lease timing, so a plain read is that; the
    /// voters' register settles the slot (`RegisterClient::read_settled`).
    fn read_slot_settled(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_slot(slot, out)
    }
}

/// Where a cluster's ownership table and leases live: what the operator reads in a message
/// about a heartbeat or a lease, so that it points at the thing to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArbiterPlace {
    /// The end of the medium both nodes share.
    SharedMedium,
    /// `cluster.arbiter`: a small device both nodes see (`storage = "own"`).
    Device,
    /// `[cluster.voters]`: a majority of three voters (`storage = "own"`).
    Voters,
}

impl ArbiterPlace {
    /// As `status` spells it (`LeaseStatus.place`).
    pub fn status_name(self) -> &'static str {
        match self {
            ArbiterPlace::SharedMedium => "shared medium",
            ArbiterPlace::Device => "arbiter device",
            ArbiterPlace::Voters => "voters",
        }
    }

    /// From its `status` spelling; None for one this build does not know.
    pub fn from_status_name(name: &str) -> Option<ArbiterPlace> {
        [
            ArbiterPlace::SharedMedium,
            ArbiterPlace::Device,
            ArbiterPlace::Voters,
        ]
        .into_iter()
        .find(|p| p.status_name() == name)
    }

    /// The lease, as messages name it ("disk lease" where a disk holds it).
    pub fn lease(self) -> &'static str {
        match self {
            ArbiterPlace::SharedMedium | ArbiterPlace::Device => "disk lease",
            ArbiterPlace::Voters => "lease on the voters",
        }
    }

    /// A node's heartbeat there.
    pub fn heartbeat(self) -> &'static str {
        match self {
            ArbiterPlace::SharedMedium | ArbiterPlace::Device => "disk heartbeat",
            ArbiterPlace::Voters => "heartbeat on the voters",
        }
    }

    /// The place itself.
    pub fn name(self) -> &'static str {
        match self {
            ArbiterPlace::SharedMedium => "the shared medium",
            ArbiterPlace::Device => "the arbiter device (cluster.arbiter)",
            ArbiterPlace::Voters => "the voters (cluster.voters)",
        }
    }

    /// What to check when this node cannot reach it.
    pub fn check(self) -> &'static str {
        match self {
            ArbiterPlace::SharedMedium => "check its path to the medium",
            ArbiterPlace::Device => "check its path to the arbiter device",
            ArbiterPlace::Voters => {
                "check its links to the partner's vote port and to the tie-breaker"
            }
        }
    }
}

/// Loads the newest valid table, or writes `initial` if the medium has none.
pub fn load_or_init(
    store: &dyn TableStore,
    initial: &OwnershipTable,
) -> Result<OwnershipTable, TableError> {
    match load_settled(store)? {
        Some(t) => {
            if t.cluster_id != initial.cluster_id {
                return Err(TableError::WrongCluster {
                    found: t.cluster_id,
                    expected: initial.cluster_id,
                });
            }
            if t.shape() != initial.shape() {
                return Err(TableError::Layout {
                    found: t.shape(),
                    expected: initial.shape(),
                });
            }
            Ok(t)
        }
        None => {
            save(store, initial)?;
            Ok(initial.clone())
        }
    }
}

pub fn load(store: &dyn TableStore) -> Result<Option<OwnershipTable>, TableError> {
    load_with(store, false)
}

/// [`load`] with settled reads ([`TableStore::read_slot_settled`]): for a table a node
/// serves by after a start or a lease regained.
pub fn load_settled(store: &dyn TableStore) -> Result<Option<OwnershipTable>, TableError> {
    load_with(store, true)
}

fn load_with(store: &dyn TableStore, settled: bool) -> Result<Option<OwnershipTable>, TableError> {
    let mut best: Option<OwnershipTable> = None;
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    for slot in 0..2 {
        if settled {
            store.read_slot_settled(slot, &mut buf)?;
        } else {
            store.read_slot(slot, &mut buf)?;
        }
        if let Some(t) = OwnershipTable::decode(&buf) {
            if best.as_ref().is_none_or(|b| t.generation > b.generation) {
                best = Some(t);
            }
        }
    }
    Ok(best)
}

/// A write of `data` to `slot` that failed may have landed, or land later: a disk's write
/// whose acknowledgement was lost, a voters' write that reached a minority
/// (`cluster::register_store`). Settles it: reads the slot back, and if `data` is not there
/// writes back what is, which the failed write can no longer land over. True if `data`
/// landed. Only for a writer no other node races on that slot (or the write-back could
/// undo another's write).
pub fn settle_failed_write(store: &dyn TableStore, slot: u64, data: &[u8]) -> io::Result<bool> {
    let mut held = vec![0u8; data.len()];
    store.read_slot(slot, &mut held)?;
    if held == data {
        return Ok(true);
    }
    store.write_slot(slot, &held)?;
    Ok(false)
}

/// Writes a slot only this node writes (its marks), settling a failed write
/// ([`settle_failed_write`]): an error means the write did not land and never will, unless
/// the error says it may still land (the settle failed too).
pub fn write_own_slot(store: &dyn TableStore, slot: u64, data: &[u8]) -> io::Result<()> {
    let Err(e) = store.write_slot(slot, data) else {
        return Ok(());
    };
    match settle_failed_write(store, slot, data) {
        Ok(true) => Ok(()),
        Ok(false) => Err(e),
        Err(again) => Err(io::Error::new(
            e.kind(),
            format!("{e}; not settled ({again}): the write may still land"),
        )),
    }
}

/// Writes `t` into the slot its generation selects (the other keeps the previous table).
pub fn save(store: &dyn TableStore, t: &OwnershipTable) -> Result<(), TableError> {
    let data = t.encode()?;
    store.write_slot(t.generation % 2, &data)?;
    Ok(())
}

/// The table in an aligned buffer on a medium file/device, at `base` (the metadata area).
pub struct MediumTableStore {
    file: std::fs::File,
    base: u64,
    place: ArbiterPlace,
}

impl MediumTableStore {
    pub fn open(path: &std::path::Path, base: u64) -> io::Result<MediumTableStore> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        Ok(MediumTableStore {
            file,
            base,
            place: ArbiterPlace::SharedMedium,
        })
    }

    /// The store is an arbiter device (`cluster.arbiter`), not the shared medium.
    pub fn on_arbiter_device(mut self) -> MediumTableStore {
        self.place = ArbiterPlace::Device;
        self
    }
}

/// A page-aligned 4 KiB buffer for O_DIRECT.
struct AlignedBlock(std::ptr::NonNull<u8>);

impl AlignedBlock {
    fn new() -> io::Result<AlignedBlock> {
        let layout = std::alloc::Layout::from_size_align(SLOT_BYTES as usize, 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: non-zero size layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        std::ptr::NonNull::new(p)
            .map(AlignedBlock)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: we own SLOT_BYTES bytes at this pointer.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), SLOT_BYTES as usize) }
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(SLOT_BYTES as usize, 4096) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.0.as_ptr(), layout) }
        }
    }
}

impl TableStore for MediumTableStore {
    fn place(&self) -> ArbiterPlace {
        self.place
    }
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut b = AlignedBlock::new()?;
        self.file
            .read_exact_at(b.as_mut(), self.base + slot * SLOT_BYTES)?;
        out[..SLOT_BYTES as usize].copy_from_slice(b.as_mut());
        Ok(())
    }
    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let _in_flight = crate::medium_writes::WriteInFlight::start();
        let mut b = AlignedBlock::new()?;
        b.as_mut().copy_from_slice(&data[..SLOT_BYTES as usize]);
        self.file
            .write_all_at(b.as_mut(), self.base + slot * SLOT_BYTES)?;
        self.file.sync_data()
    }
}

/// In memory, for tests.
#[derive(Default)]
pub struct MemTableStore(std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>);

impl TableStore for MemTableStore {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        out[..SLOT_BYTES as usize].fill(0);
        if let Some(src) = s.get(&slot) {
            out[..src.len()].copy_from_slice(src);
        }
        Ok(())
    }
    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        s.insert(slot, data[..SLOT_BYTES as usize].to_vec());
        Ok(())
    }
}

/// A store whose armed write fails, after landing or not (a lost acknowledgement), for the
/// tests of settling a failed write.
#[cfg(test)]
pub(crate) struct FailingWrite {
    pub inner: MemTableStore,
    /// The slots the arming and the cut-off apply to.
    slots: std::ops::Range<u64>,
    /// Armed: (the write lands, the accesses after it fail).
    armed: std::sync::Mutex<Option<(bool, bool)>>,
    cut_off: std::sync::atomic::AtomicBool,
    /// Writes of the slots tried so far.
    pub writes: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl FailingWrite {
    pub fn new(slots: std::ops::Range<u64>) -> FailingWrite {
        FailingWrite {
            inner: MemTableStore::default(),
            slots,
            armed: std::sync::Mutex::new(None),
            cut_off: std::sync::atomic::AtomicBool::new(false),
            writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next write of one of the slots fails, after landing if `lands`; then, if
    /// `then_cut_off`, every access to them fails until [`FailingWrite::reconnect`].
    pub fn arm(&self, lands: bool, then_cut_off: bool) {
        *self.armed.lock().unwrap() = Some((lands, then_cut_off));
    }

    pub fn reconnect(&self) {
        self.cut_off
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut(&self, slot: u64) -> bool {
        self.slots.contains(&slot) && self.cut_off.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl TableStore for FailingWrite {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        if self.cut(slot) {
            return Err(io::Error::other("reads fail"));
        }
        self.inner.read_slot(slot, out)
    }

    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        if self.slots.contains(&slot) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if self.cut(slot) {
            return Err(io::Error::other("writes fail"));
        }
        let armed = if self.slots.contains(&slot) {
            self.armed.lock().unwrap().take()
        } else {
            None
        };
        let Some((lands, then_cut_off)) = armed else {
            return self.inner.write_slot(slot, data);
        };
        if lands {
            self.inner.write_slot(slot, data)?;
        }
        self.cut_off
            .store(then_cut_off, std::sync::atomic::Ordering::SeqCst);
        Err(io::Error::other("the write's answer was lost"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbiter_places_read_back_from_their_status_names() {
        for p in [
            ArbiterPlace::SharedMedium,
            ArbiterPlace::Device,
            ArbiterPlace::Voters,
        ] {
            assert_eq!(ArbiterPlace::from_status_name(p.status_name()), Some(p));
        }
        assert_eq!(ArbiterPlace::from_status_name("a newer place"), None);
    }

    /// A failed write of a node's own slot (its marks) is settled: it stands if it landed,
    /// else what the slot held is written back over it, and only an unsettled one is said
    /// to be able to land still.
    #[test]
    fn a_failed_write_of_an_own_slot_is_settled() {
        let old = vec![1u8; SLOT_BYTES as usize];
        let new = vec![2u8; SLOT_BYTES as usize];
        for (lands, cut_off) in [(true, false), (false, false), (false, true)] {
            let store = FailingWrite::new(5..6);
            store.inner.write_slot(5, &old).unwrap();
            store.arm(lands, cut_off);
            let r = write_own_slot(&store, 5, &new);
            store.reconnect();
            let mut held = vec![0u8; SLOT_BYTES as usize];
            store.inner.read_slot(5, &mut held).unwrap();
            match (lands, cut_off) {
                (true, _) => assert!(r.is_ok() && held == new, "{r:?}"),
                (false, false) => {
                    let e = r.unwrap_err().to_string();
                    assert!(!e.contains("may still land") && held == old, "{e}");
                }
                (false, true) => {
                    let e = r.unwrap_err().to_string();
                    assert!(e.contains("may still land"), "{e}");
                }
            }
        }
    }

    fn table() -> OwnershipTable {
        OwnershipTable {
            cluster_id: 7,
            generation: 1,
            luns: vec![vec![
                RangeOwner { owner: 0, epoch: 1 },
                RangeOwner { owner: 1, epoch: 1 },
                RangeOwner { owner: 0, epoch: 3 },
            ]],
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let t = table();
        let b = t.encode().expect("encode");
        assert_eq!(OwnershipTable::decode(&b), Some(t));
        let mut bad = b.clone();
        bad[70] ^= 1;
        assert_eq!(OwnershipTable::decode(&bad), None);
    }

    #[test]
    fn newest_generation_wins_and_a_torn_update_keeps_the_old_one() {
        let store = MemTableStore::default();
        let mut t = load_or_init(&store, &table()).expect("init");
        t.generation += 1;
        t.luns[0][1] = RangeOwner { owner: 0, epoch: 2 };
        save(&store, &t).expect("save");
        assert_eq!(load(&store).expect("load"), Some(t.clone()));
        // A torn write of the next generation: the slot is garbage, the previous stays.
        store
            .write_slot((t.generation + 1) % 2, &[0xab; 4096])
            .expect("w");
        assert_eq!(load(&store).expect("load"), Some(t));
    }

    #[test]
    fn lease_records_round_trip_and_damage_is_refused() {
        let r = LeaseRecord {
            cluster_id: 7,
            node: 1,
            incarnation: 0xfeed,
            counter: 42,
            released: false,
        };
        let store = MemTableStore::default();
        assert_eq!(load_lease(&store, 7, 1).expect("read"), None);
        save_lease(&store, &r).expect("save");
        assert_eq!(load_lease(&store, 7, 1).expect("read"), Some(r));
        assert_eq!(
            load_lease(&store, 8, 1).expect("read"),
            None,
            "another cluster"
        );
        let mut bad = r.encode();
        bad[30] ^= 1;
        assert_eq!(LeaseRecord::decode(&bad), None);
    }

    #[test]
    fn another_cluster_or_layout_is_refused() {
        let store = MemTableStore::default();
        load_or_init(&store, &table()).expect("init");
        let mut other = table();
        other.cluster_id = 8;
        assert!(load_or_init(&store, &other)
            .unwrap_err()
            .to_string()
            .contains("cluster 8"));
        let mut shape = table();
        shape.luns[0].pop();
        assert!(matches!(
            load_or_init(&store, &shape),
            Err(TableError::Layout { .. })
        ));
    }

    #[test]
    fn flush_marks_keep_lost_ranges_and_bound_only_the_claim_they_saw() {
        let lost = LostRange {
            lun: 0,
            range: 1,
            epoch: 4,
            partition: 1,
            flushed_through: 10,
        };
        let m = FlushMarks {
            cluster_id: 7,
            node: 0,
            log_id: 9,
            flushed_through: vec![50, 60],
            lost: vec![lost],
            voided: Vec::new(),
        };
        let b = m.encode().expect("fits");
        assert_eq!(FlushMarks::decode(&b), Some(m.clone()));
        // The claim the node learned of (epoch 4) replays above 10; an older claim's replay
        // (done before that loss) and other ranges or partitions follow the marks.
        assert_eq!(m.flushed_bound(1, 0, 1, Some(4)), 10);
        assert_eq!(m.flushed_bound(1, 0, 1, None), 10);
        assert_eq!(m.flushed_bound(1, 0, 1, Some(5)), 60);
        assert_eq!(m.flushed_bound(1, 0, 0, Some(4)), 60);
        assert_eq!(m.flushed_bound(0, 0, 1, Some(4)), 50);
        // A slot written before lost ranges existed (bytes 32..36 zero) reads as none.
        let mut old = m.clone();
        old.lost.clear();
        let b = old.encode().expect("fits");
        assert_eq!(u32_at(&b, 32), 0);
        assert_eq!(FlushMarks::decode(&b).map(|d| d.lost.len()), Some(0));
        // Voided ranges travel beside them, and kill copies below their seq for a later
        // claim only.
        let mut with_voids = m.clone();
        with_voids.voided.push(VoidedRange {
            lun: 0,
            range: 1,
            epoch: 4,
            partition: 1,
            below_seq: 30,
        });
        let b = with_voids.encode().expect("fits");
        assert_eq!(FlushMarks::decode(&b), Some(with_voids.clone()));
        assert!(with_voids.voided_kills(1, 0, 1, 29, Some(5)));
        assert!(
            !with_voids.voided_kills(1, 0, 1, 30, Some(5)),
            "at or above the bound"
        );
        assert!(
            !with_voids.voided_kills(1, 0, 1, 29, Some(4)),
            "a claim at the void's epoch"
        );
        assert!(
            !with_voids.voided_kills(0, 0, 1, 29, Some(5)),
            "another partition"
        );
        assert!(
            !with_voids.voided_kills(1, 0, 0, 29, Some(5)),
            "another range"
        );
        // With a medium per node only the voids apply: no copy counts as flushed.
        let own = with_voids.voids_only();
        assert!(own.voided_kills(1, 0, 1, 29, Some(5)));
        assert!(!own.voided_kills(1, 0, 1, 29, Some(4)));
        for (partition, range, claim) in [(1, 1, Some(4)), (1, 1, Some(5)), (0, 1, None)] {
            assert_eq!(own.flushed_bound(partition, 0, range, claim), 0);
        }
        // More lost ranges than the slot holds are refused, not truncated silently.
        let mut full = m;
        full.lost = vec![lost; FlushMarks::lost_room(2) + 1];
        assert!(full.encode().is_err());
    }
}
