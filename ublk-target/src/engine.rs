//! The engine: LUNs, their ranges and partitions, and the data path.
//!
//! ```text
//! write: split at LUN-range boundaries (pieces of the partner's ranges are forwarded)
//!        -> PartitionLog::append (copy into NVRAM, index) -> mirror post (to the partner)
//!        -> PartitionLog::commit (persist, on this thread) -> await both -> complete
//!        ... flusher: medium write -> medium sync -> unindex -> checkpoint -> release
//! read:  staged-extent index -> staged pieces from NVRAM, gaps from the medium
//! start: superblock check -> scan every partition -> replay into the medium -> serve
//! ```
//! The engine knows nothing of ublk: the daemon's frontend calls `write`, `read`,
//! `write_zeroes` and `flush`, and tests call them directly with in-memory media.

use crate::cluster::{wire, Cluster, ClusterSetup, RangeState, RangeStatus};
use crate::config::{NodeConfig, BLOCK_SIZE};
use crate::flusher::{run_flusher, FlushPolicy, FlusherStats};
use crate::index::{Extent, Piece, Source, StagedIndex};
use crate::log::{
    read_checkpoint, write_checkpoint, LogError, LogStart, PartitionLog, PartitionStatus,
};
use crate::medium::{FileMedium, Medium, MediumError};
use crate::mirror::{DegradedPolicy, Mirror, ReplayError, SecondStoreArea, SecondStoreStatus};
use crate::nvram::layout::{layout_text, SuperblockState, FORMAT_VERSION};
use crate::nvram::record::RecordKind;
use crate::nvram::region::RegionError;
use crate::nvram::scan::{scan_partition, CorruptRecord, ScanResult};
use crate::nvram::{Layout, NvramRegion, PartitionCheckpoint, Superblock};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
}

/// An I/O request failed; `errno` goes back to the kernel.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    pub errno: i32,
    pub message: String,
}

impl From<LogError> for IoError {
    fn from(e: LogError) -> Self {
        IoError {
            errno: libc::EIO,
            message: e.to_string(),
        }
    }
}

pub struct LunSpec {
    pub name: String,
    pub size: u64,
    pub ranges: u32,
    pub medium: Arc<dyn Medium>,
}

#[derive(Default)]
pub struct LunStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub struct Lun {
    pub name: String,
    pub size: u64,
    pub ranges: u32,
    pub range_bytes: u64,
    /// Global index of this LUN's first range (ranges of all LUNs are numbered in order).
    first_range: u32,
    pub medium: Arc<dyn Medium>,
    index: Mutex<StagedIndex>,
    pub stats: LunStats,
}

impl Lun {
    pub fn index(&self) -> MutexGuard<'_, StagedIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits `[offset, offset+len)` at range boundaries (and at 1 GiB, the largest record).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let range = at / self.range_bytes;
            let range_end = ((range + 1) * self.range_bytes)
                .min(end)
                .min(at + (1 << 30));
            out.push((at, range_end - at, self.first_range + range as u32));
            at = range_end;
        }
        out
    }
}

/// How long I/O to the partner's ranges waits, once the partner is unreachable and a takeover
/// is expected (see [`Engine::set_takeover_expected`]), for the takeover to make the ranges
/// ours (or for the partner to come back) before it fails with EIO. An automatic takeover
/// needs about two heartbeat timeouts plus the replay.
const PARTNER_LOSS_WAIT: Duration = Duration::from_secs(60);
/// How often I/O waiting so looks again.
const PARTNER_LOSS_POLL: Duration = Duration::from_millis(50);

/// Why a routed read failed: the forward (the partner may be gone), or anything else.
enum ReadFailure {
    Forward(String),
    Io(IoError),
}

impl From<IoError> for ReadFailure {
    fn from(e: IoError) -> Self {
        ReadFailure::Io(e)
    }
}

/// What the start-up replay did.
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
}

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
}

/// Which ranges a planned move hands to the partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangesToMove {
    /// Giveback: the ranges the config assigns to the partner that we hold after a takeover.
    PartnersRanges,
    /// Handover: the ranges the config assigns to us (a switchover, e.g. before maintenance).
    OwnRanges,
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
}

/// Where a takeover stands (for `nvmirrorctl status`: progress bar and ETA).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TakeoverProgress {
    pub from: String,
    pub ranges: usize,
    /// "claiming", "grace", "replaying", "done" or "failed: <why>".
    pub phase: String,
    pub records_total: u64,
    pub bytes_total: u64,
    pub records_done: u64,
    pub bytes_done: u64,
    /// Mirrored records not replayed: the partner's flush marks show them on the medium.
    pub skipped_already_flushed: u64,
    /// Since the takeover began.
    pub elapsed_ms: u64,
    #[serde(skip)]
    started: Option<std::time::Instant>,
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
    pub cluster: Option<ClusterSetup>,
    /// Shown in error messages as the `--config` argument of the recovery commands.
    pub config_path: String,
}

/// The mirror the engine posts to, if any, and how it fared.
struct MirrorSlot {
    link: std::sync::RwLock<Option<Arc<dyn Mirror>>>,
    policy: DegradedPolicy,
    mirrored_records: AtomicU64,
    degraded_records: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// A write went without a mirror copy since the partner last (re)connected: until it
    /// reconnects, flushes leave flush marks on the medium.
    unmirrored: std::sync::atomic::AtomicBool,
}

impl MirrorSlot {
    fn current(&self) -> Option<Arc<dyn Mirror>> {
        self.link.read().ok().and_then(|l| l.clone())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub attached: bool,
    /// "mirroring" (partner connected), "degraded" (partner unreachable: single copy or
    /// write-through, see `degraded_policy`), or "standalone" (no partner configured).
    pub state: String,
    /// Transport of the live connection ("tcp", "rdma").
    pub transport: Option<String>,
    /// Heartbeat round trip in microseconds.
    pub rtt_us: Option<u64>,
    pub link: Option<String>,
    pub degraded_policy: Option<DegradedPolicy>,
    pub mirrored_records: u64,
    /// Writes acknowledged without a mirror copy (partner unreachable).
    pub degraded_records: u64,
    pub last_error: Option<String>,
    pub second_store: Option<SecondStoreStatus>,
}

/// How the flusher reaches the partner when our medium path fails (set by the daemon).
type DelegateSlot = Arc<std::sync::RwLock<Option<crate::flusher::FlushDelegate>>>;

pub struct Engine {
    node: String,
    cluster: Option<Arc<Cluster>>,
    flush_delegate: DelegateSlot,
    /// Forwarded I/O that fails because the partner is gone waits for a takeover (see
    /// [`Engine::set_takeover_expected`]).
    takeover_expected: std::sync::atomic::AtomicBool,
    takeover: Arc<Mutex<Option<TakeoverProgress>>>,
    mirror: Arc<MirrorSlot>,
    second_store: Option<Arc<SecondStoreArea>>,
    region: Arc<NvramRegion>,
    sb: Superblock,
    parts: Vec<Arc<PartitionLog>>,
    luns: Arc<Vec<Arc<Lun>>>,
    flusher_stats: Arc<FlusherStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    replay: ReplayReport,
}

impl Engine {
    /// Opens the NVRAM and media named in `cfg`, replays the log, starts the background
    /// threads. No I/O should be accepted before this returns.
    pub fn open_config(
        cfg: &NodeConfig,
        config_path: &str,
        mode: OpenMode,
    ) -> Result<Arc<Engine>, EngineError> {
        let mut specs = Vec::new();
        let mut table_at = None;
        for lun in &cfg.luns {
            // A cluster keeps the ownership table at the end of the (shared) medium.
            let reserve = if cfg.cluster.is_some() {
                crate::ownership::METADATA_BYTES
            } else {
                0
            };
            let whole = FileMedium::open(&lun.medium, None)?.size();
            let usable = whole.saturating_sub(reserve) / BLOCK_SIZE * BLOCK_SIZE;
            let size = lun.size.map(|s| s.0).unwrap_or(usable);
            if size > usable {
                return Err(EngineError::Medium(MediumError::TooSmall {
                    path: lun.medium.clone(),
                    actual: whole,
                    wanted: size + reserve,
                }));
            }
            if table_at.is_none() && reserve > 0 {
                table_at = Some((lun.medium.clone(), whole - reserve));
            }
            let medium = FileMedium::open(&lun.medium, Some(size))?;
            specs.push(LunSpec {
                name: lun.name.clone(),
                size,
                ranges: lun.ranges(cfg.nvram.partitions),
                medium: Arc::new(medium),
            });
        }
        let region = NvramRegion::open(&cfg.nvram.path, cfg.nvram.size.map(|s| s.0))?;
        tracing::info!(
            path = %region.path().display(),
            bytes = region.len(),
            "NVRAM mapped; durable by {}",
            region.durability().describe()
        );
        let cluster = match (&cfg.cluster, cfg.cluster_index(), table_at) {
            (Some(c), Some(me), Some((path, base))) => {
                let store =
                    crate::ownership::MediumTableStore::open(&path, base).map_err(|source| {
                        EngineError::Medium(MediumError::Open {
                            path: path.clone(),
                            cause: source,
                        })
                    })?;
                let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
                let owner_of = |lun: &crate::config::LunSection, r: u32| -> u32 {
                    match &lun.owners {
                        Some(o) => {
                            let name = &o[r as usize % o.len()];
                            nodes.iter().position(|n| n == name).unwrap_or(0) as u32
                        }
                        None => r % nodes.len() as u32,
                    }
                };
                let initial = crate::ownership::OwnershipTable {
                    cluster_id: c.id,
                    generation: 1,
                    luns: cfg
                        .luns
                        .iter()
                        .map(|l| {
                            (0..l.ranges(cfg.nvram.partitions))
                                .map(|r| crate::ownership::RangeOwner {
                                    owner: owner_of(l, r),
                                    epoch: 1,
                                })
                                .collect()
                        })
                        .collect(),
                };
                Some(ClusterSetup {
                    me,
                    nodes,
                    table_store: Box::new(store),
                    initial,
                })
            }
            _ => None,
        };
        let opts = EngineOptions {
            node_name: cfg.node.name.clone(),
            partitions: cfg.nvram.partitions,
            flush: FlushPolicy {
                batch_bytes: cfg.flusher.batch_bytes.0,
                linger: Duration::from_millis(cfg.flusher.linger_ms),
            },
            mode,
            mirrored: cfg.cluster.is_some(),
            degraded: cfg
                .cluster
                .as_ref()
                .map(|c| c.degraded)
                .unwrap_or(DegradedPolicy::WriteThrough),
            cluster,
            config_path: config_path.to_owned(),
        };
        Engine::open(region, opts, specs)
    }

    /// Opens an engine over an already opened NVRAM region and media.
    pub fn open(
        region: NvramRegion,
        mut opts: EngineOptions,
        specs: Vec<LunSpec>,
    ) -> Result<Arc<Engine>, EngineError> {
        let started = Instant::now();
        let region = Arc::new(region);
        let lun_shapes: Vec<(&str, u64, u32)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.size, s.ranges))
            .collect();
        let want_layout = layout_text(opts.partitions, opts.mirrored, &lun_shapes);
        let path = region.path().to_owned();
        let config = opts.config_path.clone();

        // Ownership first: a restart replays only records of ranges this node still owns
        // (the partner replayed the others from its second store when it took them over).
        let cluster = match opts.cluster.take() {
            Some(setup) => {
                Some(Arc::new(Cluster::open(setup).map_err(|e| {
                    EngineError::Replay(format!("ownership table: {e}"))
                })?))
            }
            None => None,
        };
        let range_bytes: Vec<u64> = specs
            .iter()
            .map(|s| s.size.div_ceil(s.ranges as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
            .collect();
        let owned = |lun: u32, offset: u64| -> bool {
            match (&cluster, range_bytes.get(lun as usize)) {
                (Some(c), Some(rb)) => c.owns(lun, (offset / rb) as u32),
                _ => true,
            }
        };
        let mut first = vec![0u8; 4096];
        region.read_at(0, &mut first);
        let mut report = ReplayReport::default();
        let existing = match (Superblock::decode(&first), opts.mode) {
            (_, OpenMode::Format) | (SuperblockState::Blank, _) => None,
            (SuperblockState::Foreign, _) => return Err(EngineError::Foreign { path, config }),
            (SuperblockState::Corrupt(reason), _) => {
                return Err(EngineError::CorruptSuperblock {
                    path,
                    reason,
                    config,
                })
            }
            (SuperblockState::Valid(sb), _) => {
                if sb.version != FORMAT_VERSION {
                    return Err(EngineError::Version {
                        path,
                        found: sb.version,
                        supported: FORMAT_VERSION,
                        config,
                    });
                }
                if sb.node_name != opts.node_name {
                    return Err(EngineError::WrongNode {
                        path,
                        found: sb.node_name,
                        expected: opts.node_name.clone(),
                        config,
                    });
                }
                Some(sb)
            }
        };

        let (sb, starts) = match existing {
            Some(sb) => {
                let layout = Layout::of(&sb);
                if layout.end() > region.len() {
                    return Err(EngineError::CorruptSuperblock {
                        path,
                        reason: format!(
                            "it describes {} bytes but the device has {}",
                            layout.end(),
                            region.len()
                        ),
                        config,
                    });
                }
                let layout_ok = (0..sb.partitions)
                    .any(|p| crate::log::read_checkpoint(&region, &layout, p, sb.log_id).is_some());
                if !layout_ok {
                    // The superblock is intact but no partition has a checkpoint of its log:
                    // a format was interrupted after the checkpoints were rewritten. Format
                    // runs only on a blank device or after a replay, so nothing is staged.
                    tracing::warn!(
                        "NVRAM {}: an earlier format was interrupted; formatting again",
                        path.display()
                    );
                    report.formatted = true;
                    let (sb, starts) = format(&region, &opts, &want_layout)?;
                    return Engine::finish_open(
                        region, opts, specs, cluster, sb, starts, report, started,
                    );
                }
                let scans = scan_all(&region, &sb, &config)?;
                let corrupt = scans.iter().find_map(|(_, s)| s.corruption.clone());
                let unflushed: usize = scans.iter().map(|(_, s)| s.records.len()).sum();
                if sb.layout != want_layout && unflushed > 0 {
                    return Err(EngineError::Layout {
                        path,
                        found: sb.layout.clone(),
                        expected: want_layout,
                        records: unflushed,
                        config,
                    });
                }
                if let Some(corrupt) = corrupt {
                    if opts.mode != OpenMode::Salvage {
                        return Err(EngineError::CorruptRecord {
                            path,
                            corrupt,
                            config,
                        });
                    }
                    tracing::warn!("salvaging: {corrupt}; replaying the intact records before it and discarding the rest");
                    report.salvaged_from_corruption = true;
                }
                // Records name their LUN by index; a layout change with an empty log is fine.
                replay(&region, &sb, &scans, &specs, &owned, &mut report)?;
                if sb.layout != want_layout || report.salvaged_from_corruption {
                    tracing::info!(
                        "reformatting NVRAM {} for layout {want_layout}",
                        path.display()
                    );
                    report.formatted = true;
                    format(&region, &opts, &want_layout)?
                } else {
                    let starts = restart_points(&region, &sb, &scans)?;
                    (sb, starts)
                }
            }
            None => {
                report.formatted = true;
                tracing::info!(
                    "formatting NVRAM {} for node {} ({want_layout})",
                    path.display(),
                    opts.node_name
                );
                format(&region, &opts, &want_layout)?
            }
        };
        Engine::finish_open(region, opts, specs, cluster, sb, starts, report, started)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_open(
        region: Arc<NvramRegion>,
        opts: EngineOptions,
        specs: Vec<LunSpec>,
        cluster: Option<Arc<Cluster>>,
        sb: Superblock,
        starts: Vec<LogStart>,
        mut report: ReplayReport,
        started: Instant,
    ) -> Result<Arc<Engine>, EngineError> {
        report.millis = started.elapsed().as_millis() as u64;

        let layout = Layout::of(&sb);
        let parts: Vec<Arc<PartitionLog>> = starts
            .into_iter()
            .enumerate()
            .map(|(p, start)| PartitionLog::new(p as u32, region.clone(), layout, sb.log_id, start))
            .collect();

        let mut first_range = 0;
        let luns: Vec<Arc<Lun>> = specs
            .into_iter()
            .map(|s| {
                let range_bytes =
                    s.size.div_ceil(s.ranges as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                let lun = Lun {
                    name: s.name,
                    size: s.size,
                    ranges: s.ranges,
                    range_bytes,
                    first_range,
                    medium: s.medium,
                    index: Mutex::new(StagedIndex::new()),
                    stats: LunStats::default(),
                };
                first_range += s.ranges;
                Arc::new(lun)
            })
            .collect();

        let second_store = SecondStoreArea::new(region.clone(), layout);
        let engine = Arc::new(Engine {
            node: opts.node_name,
            cluster,
            flush_delegate: Arc::default(),
            takeover_expected: Default::default(),
            takeover: Arc::default(),
            mirror: Arc::new(MirrorSlot {
                link: std::sync::RwLock::new(None),
                policy: opts.degraded,
                mirrored_records: AtomicU64::new(0),
                degraded_records: AtomicU64::new(0),
                unmirrored: Default::default(),
                last_error: Mutex::new(None),
            }),
            second_store,
            region,
            sb,
            parts,
            luns: Arc::new(luns),
            flusher_stats: Arc::new(FlusherStats::default()),
            threads: Mutex::new(Vec::new()),
            replay: report,
        });
        engine.start_threads(opts.flush)?;
        Ok(engine)
    }

    fn start_threads(&self, policy: FlushPolicy) -> Result<(), EngineError> {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for part in &self.parts {
            let p = part.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("persist-{}", part.id))
                    .spawn(move || p.run_persister())?,
            );
            let (p, luns, stats) = (part.clone(), self.luns.clone(), self.flusher_stats.clone());
            // Once on the medium, the partner's copy can go.
            let mirror = self.mirror.clone();
            let on_released = Arc::new(move |partition: u32, seq: u64| {
                if let Some(m) = mirror.current() {
                    m.release(partition, seq);
                }
            });
            // Fencing: before each batch, the medium's ownership table must still say ours.
            let (cluster, fence_luns) = (self.cluster.clone(), self.luns.clone());
            let fence = Arc::new(
                move |batch: &[crate::log::RecordMeta]| -> Result<(), crate::flusher::Fence> {
                    let Some(c) = &cluster else { return Ok(()) };
                    let mut checks: Vec<(u32, u32)> = batch
                        .iter()
                        .filter(|r| r.kind != RecordKind::Wrap)
                        .filter_map(|r| {
                            let lun = fence_luns.get(r.lun as usize)?;
                            Some((r.lun, (r.offset / lun.range_bytes) as u32))
                        })
                        .collect();
                    checks.sort_unstable();
                    checks.dedup();
                    c.still_owned(&checks)
                },
            );
            // Partner unreachable: the release cannot reach it, so flush marks on the medium
            // tell a taking-over partner which of its copies are stale; then make sure we
            // still own the ranges before the batch counts as flushed (write-through ack).
            let (cluster, marks_mirror, log_id, nparts) = (
                self.cluster.clone(),
                self.mirror.clone(),
                self.sb.log_id,
                self.parts.len(),
            );
            let fence_after = fence.clone();
            let synced: crate::flusher::SyncedHook = Arc::new(
                move |partition: u32,
                      batch: &[crate::log::RecordMeta]|
                      -> Result<(), crate::flusher::Fence> {
                    let Some(c) = &cluster else { return Ok(()) };
                    if !marks_mirror.unmirrored.load(Ordering::SeqCst)
                        && marks_mirror.current().is_some_and(|m| m.is_up())
                    {
                        return Ok(());
                    }
                    let Some(last) = batch.last() else {
                        return Ok(());
                    };
                    c.record_flushed(log_id, nparts, partition, last.seq)
                        .map_err(|e| {
                            crate::flusher::Fence::Unreadable(format!(
                                "writing flush marks to the medium: {e}"
                            ))
                        })?;
                    fence_after(batch)
                },
            );
            let delegate_to = self.flush_delegate.clone();
            let delegate: crate::flusher::FlushDelegate =
                Arc::new(move |partition: u32, first: u64, last: u64, count: usize| {
                    let d = delegate_to.read().ok().and_then(|d| d.clone());
                    match d {
                        Some(d) => d(partition, first, last, count),
                        None => Err("no partner to write for us".into()),
                    }
                });
            threads.push(
                std::thread::Builder::new()
                    .name(format!("flush-{}", part.id))
                    .spawn(move || {
                        let hooks = crate::flusher::FlushHooks {
                            on_released,
                            fence,
                            synced,
                            delegate,
                        };
                        run_flusher(p, luns, policy, stats, hooks)
                    })?,
            );
        }
        Ok(())
    }

    pub fn luns(&self) -> &[Arc<Lun>] {
        &self.luns
    }

    /// Starts mirroring every new write through `m`.
    pub fn attach_mirror(&self, m: Arc<dyn Mirror>) {
        if let Ok(mut l) = self.mirror.link.write() {
            *l = Some(m);
        }
    }

    /// Whether a takeover follows if the partner dies (the daemon sets it while the partner is
    /// connected under `takeover = "auto"`). Then I/O forwarded to the partner that fails
    /// with the link down waits for the takeover and runs here; otherwise it fails at once
    /// rather than stalling (e.g. the kernel's partition scan while the partner is away).
    pub fn set_takeover_expected(&self, expected: bool) {
        self.takeover_expected.store(expected, Ordering::SeqCst);
    }

    /// The partner (re)connected and resynchronized its second store with our logs: flushes
    /// need no flush marks until a write goes unmirrored again.
    pub fn mirror_resynced(&self) {
        self.mirror.unmirrored.store(false, Ordering::SeqCst);
    }

    pub fn detach_mirror(&self) {
        if let Ok(mut l) = self.mirror.link.write() {
            *l = None;
        }
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

    /// The area of our NVRAM that holds the partner's mirrored partitions.
    pub fn second_store(&self) -> Option<Arc<SecondStoreArea>> {
        self.second_store.clone()
    }

    /// Takeover: writes every record the partner mirrored to us into the medium. Call it
    /// before serving the partner's ranges.
    pub fn replay_partner(&self) -> Result<ReplayReport, ReplayError> {
        self.replay_partner_ranges(None)
    }

    /// Like [`Engine::replay_partner`], limited to the records of `only`'s (LUN, range)s.
    fn replay_partner_ranges(
        &self,
        only: Option<&[(u32, u32)]>,
    ) -> Result<ReplayReport, ReplayError> {
        let Some(ss) = &self.second_store else {
            return Ok(ReplayReport::default());
        };
        let media: Vec<Arc<dyn Medium>> = self.luns.iter().map(|l| l.medium.clone()).collect();
        // What the partner flushed while it could not tell us (flush marks on the medium).
        let marks = match &self.cluster {
            Some(c) => c.flush_marks_of(1 - c.me).map_err(|e| {
                ReplayError::Medium(format!("reading the partner's flush marks: {e}"))
            })?,
            None => None,
        };
        let progress = self.takeover.clone();
        let luns = self.luns.clone();
        let selected = move |lun: u32, offset: u64| match (only, luns.get(lun as usize)) {
            (None, _) => true,
            (Some(o), Some(l)) => o.contains(&(lun, (offset / l.range_bytes) as u32)),
            // A record of an unknown LUN: let the replay report it.
            (Some(_), None) => true,
        };
        let report = ss.replay_into(&media, marks.as_ref(), &selected, &|records, bytes| {
            if let Ok(mut p) = progress.lock() {
                if let Some(p) = p.as_mut() {
                    p.records_done = records;
                    p.bytes_done = bytes;
                }
            }
        })?;
        tracing::info!(
            "takeover replay: {} mirrored record(s), {} bytes, written to the medium in {} ms; {} skipped (the partner's flush marks show them on the medium)",
            report.records,
            report.bytes,
            report.millis,
            report.skipped_already_flushed
        );
        Ok(report)
    }

    pub fn log_id(&self) -> u64 {
        self.sb.log_id
    }

    fn lun_for(&self, lun: usize, offset: u64, len: u64) -> Result<&Arc<Lun>, IoError> {
        let l = self.luns.get(lun).ok_or(IoError {
            errno: libc::ENODEV,
            message: format!("no LUN {lun}"),
        })?;
        if offset.checked_add(len).is_none_or(|end| end > l.size) {
            return Err(IoError {
                errno: libc::EINVAL,
                message: format!(
                    "I/O {offset}+{len} beyond the end of LUN {} ({})",
                    l.name, l.size
                ),
            });
        }
        Ok(l)
    }

    fn partition_of(&self, global_range: u32) -> &Arc<PartitionLog> {
        &self.parts[(global_range % self.parts.len() as u32) as usize]
    }

    /// Stages a write; returns once it is durable in the NVRAM (and mirrored). Pieces in
    /// ranges the partner owns are forwarded to it.
    pub async fn write(&self, lun_idx: usize, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, data.len() as u64)?;
        self.route_write(
            lun_idx,
            lun,
            RecordKind::Data,
            offset,
            data.len() as u64,
            data,
        )
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
        self.route_write(lun_idx, lun, RecordKind::Zero, offset, len, &[])
            .await
    }

    /// Splits an I/O into the part we serve and the parts the partner owns, waiting while
    /// a range is being taken over. Returns (local pieces, remote pieces) as (offset, len).
    async fn route(
        &self,
        lun_idx: usize,
        lun: &Lun,
        offset: u64,
        len: u64,
    ) -> (bool, Vec<(u64, u64)>) {
        let Some(c) = &self.cluster else {
            return (true, Vec::new());
        };
        let mut all_local = true;
        let mut remote = Vec::new();
        for (at, n, range) in lun.pieces(offset, len) {
            let local_range = range - lun.first_range;
            if let RangeState::Remote(_) = c.route(lun_idx as u32, local_range).await {
                all_local = false;
                remote.push((at, n));
            }
        }
        (all_local, remote)
    }

    fn forwarder(&self) -> Result<Arc<dyn crate::cluster::Forwarder>, IoError> {
        self.cluster
            .as_ref()
            .and_then(|c| c.forwarder())
            .ok_or_else(|| IoError {
                errno: libc::EIO,
                message:
                    "the range is owned by the partner, which is unreachable (no takeover happened)"
                        .into(),
            })
    }

    /// A forward to the partner failed. With the link up, the partner answered and its
    /// error stands: false; likewise when no takeover is expected. With the link down (the
    /// partner died with the I/O in flight, or before it) and a takeover expected, waits
    /// until the takeover makes one of the `remote` pieces' ranges ours or the link is back:
    /// true, route the I/O again (a write's data is the same, so redoing it is harmless; it
    /// was never acknowledged). False once `deadline` (set at the first call) passes.
    async fn partner_lost(
        &self,
        lun_idx: usize,
        lun: &Lun,
        remote: &[(u64, u64)],
        deadline: &mut Option<Instant>,
    ) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        let link_up = || self.mirror.current().is_some_and(|m| m.is_up());
        if link_up() || !self.takeover_expected.load(Ordering::SeqCst) {
            return false;
        }
        let deadline = deadline.get_or_insert_with(|| Instant::now() + PARTNER_LOSS_WAIT);
        let moved = || {
            remote.iter().any(|&(at, n)| {
                lun.pieces(at, n).into_iter().any(|(_, _, range)| {
                    !matches!(
                        c.state(lun_idx as u32, range - lun.first_range),
                        RangeState::Remote(_)
                    )
                })
            })
        };
        loop {
            if moved() || link_up() {
                return true;
            }
            if Instant::now() >= *deadline {
                return false;
            }
            // A timer of its own reactor: engine futures also run on the ublk queue threads,
            // which have no tokio runtime.
            smol::Timer::after(PARTNER_LOSS_POLL).await;
        }
    }

    async fn route_write(
        &self,
        lun_idx: usize,
        lun: &Lun,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<(), IoError> {
        // Set at the first failed forward: the common path does not read the clock.
        let mut deadline = None;
        loop {
            let (all_local, remote) = self.route(lun_idx, lun, offset, len).await;
            if all_local {
                return self.stage(lun_idx, lun, kind, offset, len, data, &[]).await;
            }
            let fwd = self.forwarder()?;
            let forwarded = futures::future::join_all(remote.iter().map(|&(at, n)| match kind {
                RecordKind::Data => fwd.write(
                    lun_idx as u32,
                    at,
                    data[(at - offset) as usize..(at - offset + n) as usize].to_vec(),
                ),
                _ => fwd.write_zeroes(lun_idx as u32, at, n),
            }));
            let (local, forwarded) = futures::future::join(
                self.stage(lun_idx, lun, kind, offset, len, data, &remote),
                forwarded,
            )
            .await;
            local?;
            let Some(message) = forwarded.into_iter().find_map(Result::err) else {
                return Ok(());
            };
            if !self
                .partner_lost(lun_idx, lun, &remote, &mut deadline)
                .await
            {
                return Err(IoError {
                    errno: libc::EIO,
                    message: format!("forwarded to the owner: {message}"),
                });
            }
            tracing::info!(offset, len, error = %message, "a forwarded write failed with the partner gone: routing it again after the takeover");
        }
    }

    /// Reads, forwarding the parts the partner owns.
    pub async fn read_routed(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, out.len() as u64)?;
        // Set at the first failed forward: the common path does not read the clock.
        let mut deadline = None;
        loop {
            let (all_local, remote) = self.route(lun_idx, lun, offset, out.len() as u64).await;
            if all_local {
                return self.read(lun_idx, offset, out);
            }
            match self.read_pieces(lun_idx, offset, out, &remote).await {
                Err(ReadFailure::Forward(message)) => {
                    if !self
                        .partner_lost(lun_idx, lun, &remote, &mut deadline)
                        .await
                    {
                        return Err(IoError {
                            errno: libc::EIO,
                            message: format!("forwarded read: {message}"),
                        });
                    }
                    tracing::info!(offset, error = %message, "a forwarded read failed with the partner gone: routing it again after the takeover");
                }
                Err(ReadFailure::Io(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Reads `out` at `offset`: the `remote` pieces from the partner, the rest here.
    async fn read_pieces(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
        remote: &[(u64, u64)],
    ) -> Result<(), ReadFailure> {
        let fwd = self.forwarder()?;
        let mut cursor = offset;
        let end = offset + out.len() as u64;
        for &(at, n) in remote.iter().chain(std::iter::once(&(end, 0))) {
            if cursor < at {
                let dst = &mut out[(cursor - offset) as usize..(at - offset) as usize];
                self.read(lun_idx, cursor, dst)?;
            }
            if n > 0 {
                let data = fwd
                    .read(lun_idx as u32, at, n as u32)
                    .await
                    .map_err(ReadFailure::Forward)?;
                if data.len() != n as usize {
                    return Err(ReadFailure::Io(IoError {
                        errno: libc::EIO,
                        message: format!("forwarded read returned {} bytes, not {n}", data.len()),
                    }));
                }
                out[(at - offset) as usize..(at - offset + n) as usize].copy_from_slice(&data);
            }
            cursor = at + n;
        }
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

    /// Serves a request the partner forwarded to us (we own its range).
    pub async fn serve_forwarded(&self, request: &[u8]) -> Vec<u8> {
        let Some(req) = wire::decode(request) else {
            tracing::warn!(
                "malformed forwarded request ({} bytes) rejected",
                request.len()
            );
            return wire::err("malformed forwarded request");
        };
        let lun = req.lun as usize;
        // Served only if every piece is ours: a forwarded request is never forwarded again.
        let needs_ownership = matches!(req.op, wire::OP_WRITE | wire::OP_ZERO | wire::OP_READ);
        if needs_ownership && !self.serves_locally(lun, req.offset, req.len as u64).await {
            return wire::err(&format!(
                "node {} does not own all of {}+{} on LUN {lun} (ownership moved?)",
                self.node, req.offset, req.len
            ));
        }
        let result = match req.op {
            wire::OP_RELOAD_OWNERSHIP => {
                return match self.cluster.as_ref().map(|c| c.reload()) {
                    Some(Ok(())) => {
                        tracing::info!("the partner changed range ownership: table re-read");
                        wire::ok(&[])
                    }
                    Some(Err(e)) => wire::err(&e.to_string()),
                    None => wire::err("not a cluster node"),
                }
            }
            wire::OP_WRITE => self
                .write(lun, req.offset, &req.data)
                .await
                .map(|_| Vec::new()),
            wire::OP_ZERO => self
                .write_zeroes(lun, req.offset, req.len as u64)
                .await
                .map(|_| Vec::new()),
            _ => self.read_to_vec(lun, req.offset, req.len as usize),
        };
        match result {
            Ok(data) => wire::ok(&data),
            Err(e) => wire::err(&e.message),
        }
    }

    /// Planned move of ranges to the partner: giveback (the ranges the config gives the
    /// partner, after a takeover) or handover (our own configured ranges, a switchover before
    /// maintenance). Their I/O waits while every staged write is flushed (so the partner
    /// starts from the medium), the table on the medium moves them to the partner with a new
    /// epoch, `tell_partner` makes the partner re-read it, and then their I/O is forwarded to
    /// the partner.
    pub fn give_back(
        &self,
        which: RangesToMove,
        drain_timeout: Duration,
        tell_partner: impl FnOnce() -> Result<(), String>,
    ) -> Result<usize, String> {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        let partner = 1 - c.me;
        let ranges = c.ranges_to_give_back(match which {
            RangesToMove::PartnersRanges => partner,
            RangesToMove::OwnRanges => c.me,
        });
        if ranges.is_empty() {
            return Ok(0);
        }
        c.close_gates(&ranges);
        let reopen = |why: String| {
            c.finish_takeover(&ranges);
            Err(why)
        };
        if !self.drain(drain_timeout) {
            return reopen(format!(
                "staged writes did not reach the medium within {drain_timeout:?}; nothing was given back"
            ));
        }
        if let Err(e) = c.hand_over(&ranges, partner) {
            return reopen(format!("updating the ownership table: {e}"));
        }
        tracing::warn!(
            "handed {} range(s) ({}) to node {}",
            ranges.len(),
            match which {
                RangesToMove::PartnersRanges => "giveback of its configured ranges",
                RangesToMove::OwnRanges => "handover of ours",
            },
            c.node_name(partner)
        );
        tell_partner().map_err(|e| {
            format!(
                "the table now gives {} range(s) to node {}, but it did not confirm ({e}); it reads the table at its next start",
                ranges.len(),
                c.node_name(partner)
            )
        })?;
        Ok(ranges.len())
    }

    /// Lets the flusher ask the partner to write mirrored records when our medium path fails.
    pub fn set_flush_delegate(&self, d: Option<crate::flusher::FlushDelegate>) {
        if let Ok(mut slot) = self.flush_delegate.write() {
            *slot = d;
        }
    }

    /// The partner's medium path failed: write its mirrored records through ours.
    pub fn write_for_partner(
        &self,
        partition: u32,
        first: u64,
        last: u64,
        count: usize,
    ) -> Result<usize, String> {
        let ss = self
            .second_store
            .as_ref()
            .ok_or("this node keeps no second store")?;
        let media: Vec<Arc<dyn Medium>> = self.luns.iter().map(|l| l.medium.clone()).collect();
        let n = ss.write_for_partner(partition, first, last, count, &media)?;
        tracing::warn!(partition, "the partner's medium path failed: wrote its records {first}..={last} from our second store");
        Ok(n)
    }

    /// Whether this node serves every byte of the range itself (waits out a takeover).
    pub async fn serves_locally(&self, lun_idx: usize, offset: u64, len: u64) -> bool {
        match self.lun_for(lun_idx, offset, len) {
            Ok(lun) => self.route(lun_idx, lun, offset, len).await.0,
            Err(_) => false,
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    fn set_takeover(&self, f: impl FnOnce(&mut Option<TakeoverProgress>)) {
        if let Ok(mut p) = self.takeover.lock() {
            f(&mut p);
        }
    }

    fn takeover_phase(&self, phase: String) {
        self.set_takeover(|p| {
            if let Some(p) = p.as_mut() {
                if phase == "done" || phase.starts_with("failed") {
                    // Freeze the clock: status then shows how long the takeover took.
                    if let Some(t) = p.started.take() {
                        p.elapsed_ms = t.elapsed().as_millis() as u64;
                    }
                }
                p.phase = phase;
            }
        });
    }

    /// Takes over every range `from` owns: claims them on the medium with a new epoch,
    /// waits `grace` (the old owner's flusher sees the new epoch before its next batch),
    /// replays the mirrored records, and only then serves them. I/O to those ranges waits
    /// meanwhile.
    pub fn take_over(&self, from: u32, grace: Duration) -> Result<ReplayReport, String> {
        self.take_over_ranges(from, None, grace)
    }

    /// Takeover of some of `from`'s ranges (`only`: (LUN index, range) pairs), or all.
    pub fn take_over_ranges(
        &self,
        from: u32,
        only: Option<&[(u32, u32)]>,
        grace: Duration,
    ) -> Result<ReplayReport, String> {
        let c = self.cluster.as_ref().ok_or("not a cluster node")?;
        if from == c.me {
            return Err("a node cannot take over from itself".into());
        }
        let held = self
            .second_store
            .as_ref()
            .map(|ss| ss.status())
            .unwrap_or_default();
        self.set_takeover(|p| {
            *p = Some(TakeoverProgress {
                from: c.node_name(from).to_string(),
                phase: "claiming".into(),
                records_total: held.records as u64,
                bytes_total: held.bytes,
                started: Some(std::time::Instant::now()),
                ..Default::default()
            })
        });
        let moved = match c.begin_takeover(from, only) {
            Ok(m) if m.is_empty() && only.is_some() => {
                self.takeover_phase("failed: none of the given ranges is the partner's".into());
                return Err(format!(
                    "none of the given ranges belongs to node {} (see the ownership table in status)",
                    c.node_name(from)
                ));
            }
            Ok(m) => m,
            Err(e) => {
                self.takeover_phase(format!("failed: {e}"));
                return Err(e.to_string());
            }
        };
        self.set_takeover(|p| {
            if let Some(p) = p.as_mut() {
                p.ranges = moved.len();
                p.phase = "grace".into();
            }
        });
        tracing::warn!(
            "taking over {} range(s) from node {}: epochs bumped on the medium; replaying its mirrored writes",
            moved.len(),
            c.node_name(from)
        );
        std::thread::sleep(grace);
        self.takeover_phase("replaying".into());
        let report = match self.replay_partner_ranges(only) {
            Ok(r) => r,
            Err(e) => {
                // Leave the gates closed: serving these ranges now could lose writes.
                let why = format!("takeover replay failed, ranges stay closed: {e}");
                self.takeover_phase(format!("failed: {why}"));
                return Err(why);
            }
        };
        c.finish_takeover(&moved);
        self.set_takeover(|p| {
            if let Some(p) = p.as_mut() {
                p.skipped_already_flushed = report.skipped_already_flushed as u64;
            }
        });
        self.takeover_phase("done".into());
        tracing::warn!(
            "takeover complete: now serving {} more range(s)",
            moved.len()
        );
        Ok(report)
    }

    /// Stages the pieces of an I/O that fall in ranges we serve (`skip`: pieces forwarded
    /// to the partner), mirrors them, and waits for both copies.
    #[allow(clippy::too_many_arguments)]
    async fn stage(
        &self,
        lun_idx: usize,
        lun: &Lun,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        skip: &[(u64, u64)],
    ) -> Result<(), IoError> {
        let mirror = self.mirror.current();
        let mut staged = Vec::with_capacity(2);
        for (at, n, range) in lun.pieces(offset, len) {
            if skip.iter().any(|&(s, _)| s == at) {
                continue;
            }
            let part = self.partition_of(range);
            let payload: &[u8] = match kind {
                RecordKind::Data => &data[(at - offset) as usize..(at - offset + n) as usize],
                _ => &[],
            };
            let s = part
                .append(kind, lun_idx as u32, at, n, payload, |seq, nvram_off| {
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
                })
                .await?;
            // The copy goes to the partner first, then this thread persists the local copy
            // while it travels (group commit: with a committer at work, it takes ours).
            let post = mirror.as_ref().map(|m| {
                m.post(rdma_link::Post {
                    partition: part.id,
                    seq: s.record.seq,
                    local_offset: part.store_offset(s.record.pos),
                    remote_offset: part.store_offset(s.record.pos),
                    len: s.record.slot as u32,
                })
            });
            part.commit();
            staged.push((part, s, post));
        }
        // Local persist and mirror post of every piece run at once; the write completes when
        // all have answered.
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
                    Err(_) => Err(IoError {
                        errno: libc::EIO,
                        message: "NVRAM persister stopped before the write was durable".into(),
                    }),
                };
                if mirrored.is_err() && self.second_store.is_some() {
                    // Before the flusher can take the record: its flush must leave marks.
                    self.mirror.unmirrored.store(true, Ordering::SeqCst);
                }
                // Both answers are in: the flusher may take the record from now on.
                if let Some(w) = s.wrap {
                    part.settle(w.seq);
                }
                part.settle(s.record.seq);
                match (local, mirrored) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Ok(())) => {
                        self.mirror.mirrored_records.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    (Ok(()), Err(why)) => {
                        self.degraded(part, s.record.seq, mirror_attached, why)
                            .await
                    }
                }
            }
        }))
        .await;
        outcomes.into_iter().collect()
    }

    /// A write is durable locally but has no mirror copy.
    async fn degraded(
        &self,
        part: &PartitionLog,
        seq: u64,
        had_mirror: bool,
        why: String,
    ) -> Result<(), IoError> {
        if !had_mirror && self.second_store.is_none() {
            // A single node by configuration: the NVRAM copy is the acknowledgement.
            return Ok(());
        }
        self.mirror.degraded_records.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.mirror.last_error.lock() {
            if e.as_deref() != Some(why.as_str()) {
                tracing::warn!("running degraded: a write has no mirror copy ({why})");
                *e = Some(why);
            }
        }
        match self.mirror.policy {
            DegradedPolicy::Nvram => Ok(()),
            // Keep two copies: the NVRAM one and the medium.
            DegradedPolicy::WriteThrough => part.flushed(seq).await.map_err(IoError::from),
        }
    }

    /// Reads the newest data: staged pieces from the NVRAM, the rest from the medium.
    pub fn read(&self, lun_idx: usize, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, out.len() as u64)?;
        let end = offset + out.len() as u64;
        let gaps: Vec<(u64, u64)> = {
            // Staged bytes are copied while the index lock pins them: the flusher unindexes
            // a record before its space can be reused.
            let index = lun.index();
            let mut gaps = Vec::new();
            for piece in index.lookup(offset, end) {
                match piece {
                    Piece::Staged(x) => {
                        let dst = &mut out[(x.start - offset) as usize..(x.end - offset) as usize];
                        match x.src {
                            Source::Log { nvram_off } => self.region.read_at(nvram_off, dst),
                            Source::Zero => dst.fill(0),
                        }
                    }
                    Piece::Medium { start, end } => gaps.push((start, end)),
                }
            }
            gaps
        };
        for (start, gap_end) in gaps {
            let dst = &mut out[(start - offset) as usize..(gap_end - offset) as usize];
            lun.medium.read_at(dst, start).map_err(|e| IoError {
                errno: e.raw_os_error().unwrap_or(libc::EIO),
                message: format!("reading {} at {start}: {e}", lun.medium.describe()),
            })?;
        }
        lun.stats.reads.fetch_add(1, Ordering::Relaxed);
        lun.stats
            .bytes_read
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
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

    /// Waits until every staged write is on the medium.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.parts
            .iter()
            .all(|p| p.wait_drained(deadline.saturating_duration_since(Instant::now())))
    }

    /// Stops the background threads; staged records stay in the NVRAM for the next start.
    pub fn shutdown(&self) {
        for p in &self.parts {
            p.shutdown();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            node: self.node.clone(),
            nvram_path: self.region.path().display().to_string(),
            nvram_bytes: self.region.len(),
            log_id: format!("{:016x}", self.sb.log_id),
            partitions: self.parts.iter().map(|p| p.status()).collect(),
            luns: self
                .luns
                .iter()
                .map(|l| {
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
                    }
                })
                .collect(),
            bytes_flushed: self.flusher_stats.bytes_flushed.load(Ordering::Relaxed),
            flush_batches: self.flusher_stats.batches.load(Ordering::Relaxed),
            medium_errors: self.flusher_stats.medium_errors.load(Ordering::Relaxed),
            delegated_batches: self.flusher_stats.delegated_batches.load(Ordering::Relaxed),
            last_medium_error: self
                .flusher_stats
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone()),
            replay: self.replay.clone(),
            mirror: MirrorStatus {
                attached: self.mirror.current().is_some(),
                state: match (&self.second_store, self.mirror.current()) {
                    (None, _) => "standalone",
                    (Some(_), Some(m)) if m.is_up() => "mirroring",
                    (Some(_), _) => "degraded",
                }
                .into(),
                transport: self
                    .mirror
                    .current()
                    .and_then(|m| m.transport())
                    .map(String::from),
                rtt_us: self
                    .mirror
                    .current()
                    .and_then(|m| m.rtt())
                    .map(|d| d.as_micros() as u64),
                link: self.mirror.current().map(|m| m.describe()),
                degraded_policy: self.second_store.as_ref().map(|_| self.mirror.policy),
                mirrored_records: self.mirror.mirrored_records.load(Ordering::Relaxed),
                degraded_records: self.mirror.degraded_records.load(Ordering::Relaxed),
                last_error: self.mirror.last_error.lock().ok().and_then(|e| e.clone()),
                second_store: self.second_store.as_ref().map(|s| s.status()),
            },
            ranges: self
                .cluster
                .as_ref()
                .map(|c| c.status())
                .unwrap_or_default(),
            takeover: self.takeover.lock().ok().and_then(|p| {
                p.clone().map(|mut p| {
                    if let Some(t) = p.started {
                        p.elapsed_ms = t.elapsed().as_millis() as u64;
                    }
                    p
                })
            }),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Scans every partition from its checkpoint.
pub fn scan_all(
    region: &NvramRegion,
    sb: &Superblock,
    config: &str,
) -> Result<Vec<(PartitionCheckpoint, ScanResult)>, EngineError> {
    let layout = Layout::of(sb);
    let mut out = Vec::new();
    for p in 0..sb.partitions {
        let cp = read_checkpoint(region, &layout, p, sb.log_id).ok_or_else(|| {
            EngineError::CorruptSuperblock {
                path: region.path().to_owned(),
                reason: format!("no valid checkpoint for partition {p}"),
                config: config.to_owned(),
            }
        })?;
        let log = region.slice(layout.partition_base(p), layout.part_size as usize);
        let scan = scan_partition(log, p, sb.log_id, cp.tail_off, cp.tail_seq);
        out.push((cp, scan));
    }
    Ok(out)
}

/// Writes every scanned record into its medium, in sequence order per partition, and syncs.
fn replay(
    region: &NvramRegion,
    sb: &Superblock,
    scans: &[(PartitionCheckpoint, ScanResult)],
    luns: &[LunSpec],
    owned: &dyn Fn(u32, u64) -> bool,
    report: &mut ReplayReport,
) -> Result<(), EngineError> {
    let layout = Layout::of(sb);
    let mut touched = vec![false; luns.len()];
    for (p, (_, scan)) in scans.iter().enumerate() {
        report.discarded_unacknowledged += scan.discarded_tail;
        if scan.discarded_tail > 0 {
            tracing::warn!(
                partition = p,
                "dropping {} record(s) at the log tail that were never acknowledged (the node stopped while writing them)",
                scan.discarded_tail
            );
        }
        for r in &scan.records {
            let h = &r.header;
            if !owned(h.lun, h.offset) {
                report.skipped_not_owned += 1;
                continue;
            }
            let lun = luns.get(h.lun as usize).ok_or_else(|| {
                EngineError::Replay(format!(
                    "record seq {} names LUN {} which is not configured",
                    h.seq, h.lun
                ))
            })?;
            if h.offset
                .checked_add(h.len as u64)
                .is_none_or(|end| end > lun.size)
            {
                return Err(EngineError::Replay(format!(
                    "record seq {} ends beyond LUN {} ({} bytes)",
                    h.seq, lun.name, lun.size
                )));
            }
            let at = layout.partition_base(p as u32) + r.data_pos();
            let res = crate::medium::apply_record(
                lun.medium.as_ref(),
                h.kind,
                h.offset,
                h.len as u64,
                region.slice(at, h.data_len as usize),
            );
            res.map_err(|e| {
                EngineError::Replay(format!("seq {} to {}: {e}", h.seq, lun.medium.describe()))
            })?;
            touched[h.lun as usize] = true;
            report.records += 1;
            report.bytes += h.len as u64;
        }
    }
    for (i, lun) in luns.iter().enumerate() {
        if touched[i] {
            lun.medium.sync().map_err(|e| {
                EngineError::Replay(format!("syncing {}: {e}", lun.medium.describe()))
            })?;
        }
    }
    if report.skipped_not_owned > 0 {
        tracing::warn!(
            "{} staged record(s) belong to ranges the partner took over; it replayed them from its mirror, so they are not replayed here",
            report.skipped_not_owned
        );
    }
    if report.records > 0 {
        tracing::info!(
            "replayed {} staged record(s), {} bytes, into the medium",
            report.records,
            report.bytes
        );
    }
    Ok(())
}

/// After a replay, every partition restarts empty where its log ended.
fn restart_points(
    region: &NvramRegion,
    sb: &Superblock,
    scans: &[(PartitionCheckpoint, ScanResult)],
) -> Result<Vec<LogStart>, EngineError> {
    let layout = Layout::of(sb);
    let mut starts = Vec::new();
    for (p, (cp, scan)) in scans.iter().enumerate() {
        // Skip over the seqs of a discarded tail so its leftovers never look current.
        let next_seq = scan.next_seq.max(scan.max_seq_seen + 1);
        let new = PartitionCheckpoint {
            partition: p as u32,
            log_id: sb.log_id,
            generation: cp.generation + 1,
            tail_off: scan.next_pos,
            tail_seq: next_seq,
        };
        write_checkpoint(region, &layout, &new)?;
        starts.push(LogStart {
            pos: scan.next_pos,
            next_seq,
            checkpoint_generation: new.generation,
        });
    }
    Ok(starts)
}

fn format(
    region: &NvramRegion,
    opts: &EngineOptions,
    layout_desc: &str,
) -> Result<(Superblock, Vec<LogStart>), EngineError> {
    let layout = Layout::compute(region.len(), opts.partitions, opts.mirrored).ok_or(
        EngineError::TooSmall {
            path: region.path().to_owned(),
            size: region.len(),
            partitions: opts.partitions,
        },
    )?;
    let sb = Superblock {
        version: FORMAT_VERSION,
        log_id: rand::random::<u64>() | 1,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        node_name: opts.node_name.clone(),
        partitions: layout.partitions,
        part_size: layout.part_size,
        data_offset: layout.data_offset,
        second_store: layout.second_store as u32,
        layout: layout_desc.to_owned(),
    };
    // Checkpoints first, superblock last: a crash in between leaves the old superblock
    // (whose log_id the new checkpoints do not match) or a blank device, never a mix.
    let mut starts = Vec::new();
    for p in 0..layout.partitions {
        let blank = [0u8; PartitionCheckpoint::SLOT_BYTES as usize];
        region.write_at(layout.checkpoint_offset(p, 1), &blank);
        let cp = PartitionCheckpoint {
            partition: p,
            log_id: sb.log_id,
            generation: 0,
            tail_off: 0,
            tail_seq: 1,
        };
        write_checkpoint(region, &layout, &cp)?;
        region.persist(
            layout.checkpoint_offset(p, 1),
            PartitionCheckpoint::SLOT_BYTES,
        )?;
        starts.push(LogStart {
            pos: 0,
            next_seq: 1,
            checkpoint_generation: 0,
        });
    }
    region.write_at(0, &sb.encode());
    region.persist(0, 4096)?;
    Ok((sb, starts))
}
