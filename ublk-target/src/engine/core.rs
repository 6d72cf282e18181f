//! What an engine holds (`Engine`), how it is opened (`EngineOptions`, `OpenMode`), and
//! how it fails (`EngineError` at start, `IoError` per request); plus the small accessors
//! the daemon and the link need. Behaviour lives in the sibling files.

use super::serving::ServingRight;
use super::takeover_state::TakeoverState;
use crate::cluster::Cluster;
use crate::config::DegradedPolicy;
use crate::flusher::{FlushPolicy, FlusherStats};
use crate::host::{Host, TaskHandle};
use crate::log::{LogError, PartitionLog};
use crate::lun::Lun;
use crate::medium::MediumError;
use crate::mirror::{Mirror, MirrorSlot, SecondStoreArea};
use crate::nvram::out_of_sync::{Fresh, REGION_BYTES};
use crate::nvram::region::RegionError;
use crate::nvram::scan::CorruptRecord;
use crate::nvram::{Layout, NvramRegion, Superblock};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How to treat what is found on the NVRAM at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Replay a valid log; format a blank device; refuse anything else.
    Normal,
    /// Replay the intact records before a damaged one, discard the rest, reformat.
    Salvage,
    /// Discard whatever is there and format (operator's explicit decision).
    Format,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Medium(#[from] MediumError),
    #[error("NVRAM {path} holds data that is not an nvmirror log; refusing to overwrite it. If the device is meant for nvmirror, erase it with `nvmirrorctl nvram format --config {config} --force`")]
    Foreign { path: PathBuf, config: String },
    #[error("NVRAM {path} has a damaged superblock ({reason}); refusing to guess what it holds. Inspect it with `nvmirrorctl nvram inspect --config {config}`; if its staged writes are not needed, `nvmirrorctl nvram format --config {config} --force`")]
    CorruptSuperblock {
        path: PathBuf,
        reason: String,
        config: String,
    },
    #[error("NVRAM {path} was written in log format version {found}; this nvmirrord reads version {supported}. Start the nvmirrord that wrote it to drain the log, or discard it with `nvmirrorctl nvram format --config {config} --force`")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
        config: String,
    },
    #[error("NVRAM {path} belongs to node {found:?}, but this is node {expected:?} (node.name); check nvram.path. If node {found:?}'s staged writes are no longer needed, `nvmirrorctl nvram format --config {config} --force`")]
    WrongNode {
        path: PathBuf,
        found: String,
        expected: String,
        config: String,
    },
    #[error("NVRAM {path} holds {records} unflushed record(s) written for another LUN layout ({found}); the config now says ({expected}). Replaying them would put data at the wrong place: start nvmirrord with the old config to drain them, or discard them with `nvmirrorctl nvram format --config {config} --force`")]
    Layout {
        path: PathBuf,
        found: String,
        expected: String,
        records: usize,
        config: String,
    },
    #[error("{config} is a log-shipping destination's config: its NVRAM {path} holds the sources' areas, not a node's log, so no engine (and no `nvmirrorctl nvram` command) opens it; a source's area is cleared as the destination's start-up error says")]
    Destination { path: PathBuf, config: String },
    #[error("NVRAM {path} is too small: {size} bytes cannot hold {partitions} partitions; use a bigger device or fewer partitions (nvram.partitions)")]
    TooSmall {
        path: PathBuf,
        size: u64,
        partitions: u32,
    },
    #[error("NVRAM {path}: {corrupt}. Refusing to start, so that no acknowledged write is lost silently. Inspect with `nvmirrorctl nvram inspect --config {config}`. To replay the intact records before it and DISCARD the rest, run `nvmirrorctl nvram salvage --config {config}`")]
    CorruptRecord {
        path: PathBuf,
        corrupt: CorruptRecord,
        config: String,
    },
    #[error("replaying the NVRAM log into the medium failed: {0}; nothing was discarded, fix the medium and start again")]
    Replay(String),
    #[error("NVRAM I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot hold this node's disk lease on {} ({why}); {} (every cluster node heartbeats there before it serves)", place.name(), place.check())]
    Lease {
        place: crate::ownership::ArbiterPlace,
        why: String,
    },
    #[error("cannot hold this node's lease on the voters ({0}); a majority of the three voters (this node, the partner, the tie-breaker) must answer: start the partner's daemon or nvmirror-tiebreaker, and check [cluster.voters]")]
    VoterLease(String),
    #[error("the arbiter's voters ([cluster.voters]): {0}")]
    Voters(String),
    #[error("{0}")]
    Reservation(String),
    #[error("the arbiter {path} (cluster.arbiter) is {size} bytes; it must hold at least {wanted} (the ownership table and the disk leases): use a bigger device")]
    ArbiterTooSmall {
        path: PathBuf,
        size: u64,
        wanted: u64,
    },
}

/// An I/O request failed; `errno` goes back to the kernel.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    pub errno: i32,
    pub message: String,
}

impl IoError {
    pub fn new(errno: i32, message: impl Into<String>) -> IoError {
        IoError {
            errno,
            message: message.into(),
        }
    }
}

impl From<LogError> for IoError {
    fn from(e: LogError) -> Self {
        IoError::new(libc::EIO, e.to_string())
    }
}

/// What the start-up replay (or a takeover's replay) did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplayReport {
    pub records: usize,
    pub bytes: u64,
    pub discarded_unacknowledged: usize,
    pub millis: u64,
    pub formatted: bool,
    pub salvaged_from_corruption: bool,
    /// Records of ranges another node took over while we were away (it replayed them).
    pub skipped_not_owned: usize,
    /// Takeover: mirrored records the partner's flush marks show on the medium already.
    #[serde(default)]
    pub skipped_already_flushed: usize,
    /// Records of a range this node lost after staging them (killed by a void record).
    #[serde(default)]
    pub skipped_dead: usize,
}

pub struct EngineOptions {
    pub node_name: String,
    pub partitions: u32,
    pub flush: FlushPolicy,
    pub mode: OpenMode,
    /// Reserve a second store for a partner's mirrored partitions.
    pub mirrored: bool,
    pub degraded: DegradedPolicy,
    /// Two-node operation: ranges, their owners, the table on the medium.
    pub cluster: Option<crate::cluster::ClusterSetup>,
    /// Shown in error messages as the `--config` argument of the recovery commands.
    pub config_path: String,
    /// The out-of-sync maps (`storage = "own"`; `nvram::out_of_sync`).
    pub out_of_sync: OutOfSyncOptions,
    /// The clock, timers and background tasks (`host::system()` on a real machine).
    pub host: Arc<dyn Host>,
}

impl EngineOptions {
    /// One node's options with the usual defaults (tests, examples, tools): a normal open,
    /// no partner and no second store, write-through when degraded, 4 MiB flush batches
    /// lingering 10 ms, the real machine's clock. Set what differs with `..`.
    pub fn single_node(node_name: &str, partitions: u32) -> EngineOptions {
        EngineOptions {
            node_name: node_name.into(),
            partitions,
            flush: FlushPolicy {
                batch_bytes: 4 << 20,
                linger: std::time::Duration::from_millis(10),
            },
            mode: OpenMode::Normal,
            mirrored: false,
            degraded: DegradedPolicy::WriteThrough,
            cluster: None,
            config_path: "test.toml".into(),
            out_of_sync: OutOfSyncOptions::default(),
            host: crate::host::system(),
        }
    }
}

/// How the out-of-sync maps are made, and how fast the resync they drive copies.
#[derive(Clone, Copy, Debug)]
pub struct OutOfSyncOptions {
    /// LUN bytes per bit.
    pub region_bytes: u64,
    /// What the maps of a blank NVRAM's first format say. Out of sync (the default) unless
    /// both media are known identical then (the simulator's zeroed disks); a later format
    /// (a layout change, a salvage, a damaged map) always says out of sync.
    pub first_format: Fresh,
    /// The resync's limit in bytes per second (`cluster.resync_rate_mib_s`); None: none.
    pub resync_rate: Option<u64>,
}

impl Default for OutOfSyncOptions {
    fn default() -> Self {
        OutOfSyncOptions {
            region_bytes: REGION_BYTES,
            first_format: Fresh::OutOfSync,
            resync_rate: None,
        }
    }
}

pub struct Engine {
    pub(super) host: Arc<dyn Host>,
    pub(super) node: String,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) takeover: TakeoverState,
    pub(super) mirror: Arc<MirrorSlot>,
    pub(super) second_store: Option<Arc<SecondStoreArea>>,
    /// `storage = "own"`: the regions where our medium and the partner's may differ
    /// (`nvram::out_of_sync`); None without own storage or maps.
    pub(super) out_of_sync: Option<Arc<crate::nvram::out_of_sync::LunMaps>>,
    /// (LUN, range)s of which our second store dropped copies unwritten (our medium was
    /// marked outdated for them) since the partner's resync last asked for our map of the
    /// range: a resync that was copying it meanwhile may have missed them (`engine::resync`).
    pub(super) dropped_during_resync: Arc<Mutex<std::collections::BTreeSet<(u32, u32)>>>,
    /// (LUN, range)s whose resync onto our medium the partner began in this life of the
    /// node (it asked for our out-of-sync runs): only those may finish (`finish_resync`).
    pub(super) resyncs_begun: Mutex<std::collections::BTreeSet<(u32, u32)>>,
    /// `storage = "own"`: records of ranges our medium is outdated for that this start
    /// replayed into it; the partner's medium gets them before the ranges serve.
    pub(super) restart_sync: Mutex<super::takeover_state::RestartSync>,
    /// `storage = "own"`: orders the resync's copies against the flusher's batches.
    pub(super) copy_fence: Arc<crate::copy_fence::CopyFence>,
    /// The resync's rate limit in bytes per second, 0: none (`cluster.resync_rate_mib_s`,
    /// changed at run time by `nvmirrorctl resync-rate`).
    pub(super) resync_rate: std::sync::atomic::AtomicU64,
    pub(super) region: Arc<NvramRegion>,
    pub(super) sb: Superblock,
    pub(super) parts: Vec<Arc<PartitionLog>>,
    pub(super) luns: Arc<Vec<Arc<Lun>>>,
    pub(super) flusher_stats: Arc<FlusherStats>,
    pub(super) tasks: Mutex<Vec<TaskHandle>>,
    pub(super) replay: ReplayReport,
    pub(super) serving: Arc<ServingRight>,
    /// Set by `shutdown`: the engine's endless tasks (lease-follow) end on it.
    pub(super) stopping: Arc<Stopping>,
    /// Write priority that follows the writer (`cluster.write_priority`; off by default).
    pub(super) write_demand: super::write_demand::WriteDemand,
    /// A log-shipping source: what its destination confirmed of its log (status).
    pub(super) ship_lag: Arc<super::ship_lag::ShipLag>,
}

/// A one-way "the engine is stopping" signal for its background tasks.
#[derive(Default)]
pub(super) struct Stopping {
    set: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stopping {
    pub(super) fn stop(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(super) fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Resolves once `stop` was called.
    pub(super) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

impl Engine {
    pub fn luns(&self) -> &[Arc<Lun>] {
        &self.luns
    }

    pub fn host(&self) -> &Arc<dyn Host> {
        &self.host
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn log_id(&self) -> u64 {
        self.sb.log_id
    }

    /// Writes acknowledged without a mirror copy so far (the partner was unreachable).
    pub fn degraded_writes(&self) -> u64 {
        self.mirror.degraded_records()
    }

    /// Whether this node may serve its ranges now: it holds its disk lease, or the partner
    /// still hears it over the mirror link (see `serving`). Always without a lease.
    pub fn may_serve(&self) -> bool {
        self.serving.may_serve()
    }

    /// Starts mirroring every new write through `m`.
    pub fn attach_mirror(&self, m: Arc<dyn Mirror>) {
        self.mirror.attach(Some(m));
    }

    pub fn detach_mirror(&self) {
        self.mirror.attach(None);
    }

    /// This node's first store (all its partition logs) in the NVRAM mapping, for the mirror
    /// link to send records from without a copy. Offsets in it are `store_offset`s.
    pub fn local_region(&self) -> rdma_link::Region {
        let layout = Layout::of(&self.sb);
        let (ptr, _) = self.region.raw_parts();
        let len = layout.partitions as u64 * layout.part_size;
        // SAFETY: the first store is inside the mapping, which lives as long as the engine;
        // the engine outlives the link it is given to (the daemon shuts the link down before
        // dropping the engine); the link only reads the records it was asked to post.
        unsafe { rdma_link::Region::new(ptr.add(layout.data_offset as usize), len as usize) }
            .unwrap_or_else(|_| rdma_link::Region::leaked(0))
    }

    /// What the partner must agree on for our records to land in its second store where its
    /// takeover replay expects them: the NVRAM geometry (partitions, log size) and the LUN
    /// shapes. The text is logged so that two nodes' disagreeing layouts can be compared; the
    /// tag (the first 8 bytes of its BLAKE3 hash) is checked in the link handshake.
    pub fn mirror_layout(&self) -> (u64, String) {
        let text = format!("{}; nvram log {} bytes", self.sb.layout, self.sb.part_size);
        let hash = blake3::hash(text.as_bytes());
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(tag), text)
    }

    /// The staging logs' geometry: how many partitions, of how many bytes each.
    pub fn log_geometry(&self) -> (u32, u64) {
        (self.sb.partitions, self.sb.part_size)
    }

    /// The area of our NVRAM that holds the partner's mirrored partitions.
    pub fn second_store(&self) -> Option<Arc<SecondStoreArea>> {
        self.second_store.clone()
    }

    /// Stops the background tasks; staged records stay in the NVRAM for the next start.
    /// Why this daemon should restart, if it should: an NVRAM partition of ours was fenced
    /// (the node lost a range it had staged records of before it heard of the loss). Every
    /// range that stages in that partition is unserved until a start replays the NVRAM
    /// (skipping the lost range's records), and a takeover of such a range is refused; a
    /// restart, as after a crash, serves them again within seconds. Or a takeover's claim
    /// is uncertain (its table write failed and could not be settled), which a start settles.
    pub fn restart_wanted(&self) -> Option<String> {
        if let Some(why) = self.takeover.restart_wanted() {
            return Some(why);
        }
        let p = self.parts.iter().find(|p| p.is_fenced())?;
        Some(format!(
            "NVRAM partition {} stopped: {}",
            p.id,
            p.failure().unwrap_or_default()
        ))
    }

    pub fn shutdown(&self) {
        self.stopping.stop();
        for p in &self.parts {
            p.shutdown();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
