//! One simulated run: two nodes on one shared disk, each with its NVRAM, the real engine and
//! the real mirror link between them over the simulated network; clients writing and reading
//! through both nodes; the seed's faults; and the invariants, checked as the run goes:
//!
//! 1. every read returns the last acknowledged version of its block, or a later one whose
//!    outcome is unknown (`model`): no acknowledged write lost, no data nobody wrote;
//! 2. at most one node serves a LUN range at any instant (its gate open, its partition
//!    alive);
//! 3. a mirror copy is released only after the medium holds its data (checked when the
//!    partner's second store hears the release);
//! 4. the engine's own assertions (the log's invariants) never fire;
//! 5. after the faults end, every operation completes (liveness), every block reads back
//!    right through both nodes, and once drained the disk holds acknowledged data.
//!
//! The run stops at the first violation; the trace then ends with it.

use crate::disk::SimDisk;
use crate::faults::{self, Fault, Settings};
use crate::life::{Life, NodeClock, SimHost, SimSpawner, Stall};
use crate::model::{block_data, decode, Decoded, Model, BLOCK};
use crate::net::{Latency, SimNet};
use crate::trace::{self, SharedTrace, Trace, TraceLayer};
use crate::voter_table::{VoteLink, VoterTable};
use nvmirror::cluster::ClusterSetup;
use nvmirror::config::{DegradedPolicy, TakeoverPolicy};
use nvmirror::engine::OutOfSyncOptions;
use nvmirror::engine::{
    Engine, EngineOptions, LunSpec, OpenMode, RangesToMove, WritePriorityPolicy,
};
use nvmirror::flusher::FlushPolicy;
use nvmirror::host::Host;
use nvmirror::lease::DiskLease;
use nvmirror::mirror::SecondStoreArea;
use nvmirror::nvram::memory::MemoryNvram;
use nvmirror::nvram::out_of_sync::Fresh;
use nvmirror::nvram::{NvramRegion, RecordHeader, RecordKind};
use nvmirror::ownership::{OwnershipTable, RangeOwner, METADATA_BYTES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdma_link::{Link, LinkConfig, Region, ResyncPoint, Role, SecondStore, Transport};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

const NODES: usize = 2;
const NVRAM_BYTES: usize = 12 << 20;
const SECRET: &[u8] = b"simulated-cluster-secret-0123456789";
const CLUSTER_ID: u64 = 7;
/// After the faults: how long the cluster gets to settle before the final checks.
const SETTLE: Duration = Duration::from_secs(5);
/// An operation still running this long after the faults ended is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(90);
/// The warning a node logs when it marks a medium outdated (`Cluster::mark_outdated`).
const MARK_WARNING: &str = "(marked outdated on the arbiter;";

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub writes_lost_in_crash: u64,
    pub reads_checked: u64,
    pub reads_failed: u64,
    pub faults: u64,
    pub restarts: u64,
    /// With `--voter-table`: messages to or from a voter that arrived late.
    pub voter_late_deliveries: u64,
    /// With `--voter-table`: operations on the voters (each try), and ballot rounds taken
    /// after a refusal.
    pub voter_operations: u64,
    pub voter_new_rounds: u64,
}

/// The result of one seed.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub digest: u64,
    pub stats: Stats,
    pub simulated: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

thread_local! {
    /// Panics of simulated tasks on this thread (tokio keeps them from unwinding further).
    static PANICS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = PANICS.with(|p| {
                if let Some(list) = p.borrow_mut().as_mut() {
                    list.push(info.to_string().replace('\n', " "));
                    true
                } else {
                    false
                }
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

#[derive(Clone, Copy, Debug)]
enum OpKind {
    Write,
    Read,
}

struct Op {
    node: usize,
    kind: OpKind,
    /// Writes without a mirror copy on any node when the op began (see `end_op`).
    degraded_before: u64,
    /// (block, version written) — version 0 for reads.
    blocks: Vec<(u64, u64)>,
    started: Instant,
}

/// What the run's tasks share.
struct Shared {
    /// Node faults in effect now (a failed path, a frozen process): a weak write
    /// acknowledged meanwhile may be lost (see `model`).
    impaired: std::sync::atomic::AtomicUsize,
    /// The running engines, to count their degraded writes.
    engines: Mutex<Vec<std::sync::Weak<Engine>>>,
    /// Degraded writes of the engines that ended: a node's death must not take its count
    /// out of the total (seed 9076: the partner's death cancelled out the survivor's new
    /// degraded writes, and a write acknowledged with one NVRAM copy counted as mirrored).
    degraded_of_dead: std::sync::atomic::AtomicU64,
    trace: SharedTrace,
    /// `degraded = "nvram"`: writes without a mirror copy are acknowledged.
    nvram_policy: bool,
    /// Trace every client operation too.
    verbose: bool,
    model: Mutex<Model>,
    violations: Mutex<Vec<String>>,
    ops: Mutex<BTreeMap<u64, Op>>,
    stats: Mutex<Stats>,
    /// Per node: the disk its LUN lives on (the same one for both, unless `storage = "own"`).
    media: Vec<Arc<SimDisk>>,
    /// Reads of the partner's ranges served locally by engines that have ended.
    local_reads_ended: Arc<std::sync::atomic::AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Writes acknowledged without a mirror copy, on every running node.
    fn degraded_total(&self) -> u64 {
        lock(&self.engines)
            .iter()
            .filter_map(|e| e.upgrade())
            .map(|e| e.degraded_writes())
            .sum::<u64>()
            + self
                .degraded_of_dead
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn note(&self, line: impl AsRef<str>) {
        trace::lock(&self.trace).push(line);
    }

    fn violate(&self, what: String) {
        self.note(format!("VIOLATION: {what}"));
        lock(&self.violations).push(what);
    }

    fn violated(&self) -> bool {
        !lock(&self.violations).is_empty()
    }

    /// A write or read ended (the op task calls this; a crash ends its ops as unknown).
    /// `degraded_now`: writes acknowledged without a mirror copy, on all nodes, now; if it
    /// moved during the op and the policy is `degraded = "nvram"`, the write may have one
    /// copy only (weak, see `model`).
    fn end_op(&self, id: u64, result: Result<Option<Vec<u8>>, String>, degraded_now: u64) {
        let Some(op) = lock(&self.ops).remove(&id) else {
            return;
        };
        if self.verbose {
            self.note(format!(
                "op {id}: {:?} of {:?} on n{}: {}",
                op.kind,
                op.blocks,
                op.node,
                match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            ));
        }
        let mut model = lock(&self.model);
        let mut stats = lock(&self.stats);
        match op.kind {
            OpKind::Write => {
                let ok = result.is_ok();
                let weak = self.nvram_policy && degraded_now != op.degraded_before;
                let impaired = self.impaired.load(std::sync::atomic::Ordering::SeqCst) > 0;
                for &(b, v) in &op.blocks {
                    model.end_write(b, v, ok, weak, impaired);
                }
                if ok {
                    stats.writes_acked += 1;
                } else {
                    stats.writes_failed += 1;
                }
            }
            OpKind::Read => {
                for &(b, _) in &op.blocks {
                    model.end_read(b);
                }
                match result {
                    Ok(Some(data)) => {
                        stats.reads_checked += 1;
                        for (i, &(b, _)) in op.blocks.iter().enumerate() {
                            if let Err(e) = model.check_read(b, &data[i * BLOCK..(i + 1) * BLOCK]) {
                                drop(stats);
                                drop(model);
                                self.violate(format!("read through node n{}: {e}", op.node));
                                return;
                            }
                        }
                    }
                    _ => stats.reads_failed += 1,
                }
            }
        }
    }

    /// A node died: its operations in flight end with an unknown outcome, `settle` later.
    /// Until then their blocks stay busy (no client issues another operation on them): a
    /// write the dead node forwarded may still be staged by the owner until the owner refuses
    /// it, once the sender has not answered a heartbeat for half the heartbeat timeout or the
    /// link has dropped the connection (at most a timeout and one check after the last
    /// message; `serve_forwarded`). A write the client issued on the owner at the instant of
    /// the death was concurrent with it, and either may land last (seed 7510).
    fn node_died(self: &Arc<Self>, node: usize, settle: Duration) {
        let ids: Vec<u64> = lock(&self.ops)
            .iter()
            .filter(|(_, op)| op.node == node)
            .map(|(id, _)| *id)
            .collect();
        lock(&self.stats).writes_lost_in_crash += ids.len() as u64;
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(settle).await;
            for id in ids {
                shared.end_op(id, Err("its node died".into()), 0);
            }
        });
    }
}

/// The partner's second store, as the link sees it, with invariant 3 checked on release.
struct CheckedStore {
    inner: Arc<SecondStoreArea>,
    node: usize,
    lun_blocks: u64,
    /// Records the link landed here, by (partition, seq): (offset, len) in the store.
    held: Mutex<BTreeMap<(u32, u64), (u64, u32)>>,
    shared: Arc<Shared>,
    /// The node's engine (weakly: it holds the link, which holds this store).
    engine: std::sync::Weak<Engine>,
}

impl CheckedStore {
    /// Whether a record still held here carries `version` (or newer) of `block`: the owner
    /// staged the write again (its first record died when it lost the range meanwhile, see
    /// `nvram::void`), so releasing the first copy loses nothing.
    fn holds_version(&self, block: u64, version: u64) -> bool {
        let region = self.inner.region();
        let held: Vec<(u64, u32)> = lock(&self.held).values().copied().collect();
        held.into_iter().any(|(offset, len)| {
            let Some(bytes) = region.read_bytes(offset, len as usize) else {
                return false;
            };
            let Ok(h) = RecordHeader::decode(&bytes) else {
                return false;
            };
            let first = h.offset / BLOCK as u64;
            if h.kind != RecordKind::Data || block < first {
                return false;
            }
            let at = 64 + ((block - first) as usize) * BLOCK;
            at + BLOCK <= 64 + h.data_len as usize
                && at + BLOCK <= bytes.len()
                && matches!(decode(block, &bytes[at..at + BLOCK]), Decoded::Version(d) if d >= version)
        })
    }

    /// Whether this node's own log stages `version` (or newer) of `block`: the owner's record
    /// died (it lost the range after staging it, `nvram::void`) and the write, routed again,
    /// was staged here as the range's new owner (seed 6810: the dead record released before
    /// this node's record of the version reached the medium).
    fn staged_here(&self, block: u64, version: u64) -> bool {
        self.engine
            .upgrade()
            .and_then(|e| e.staged_copy(0, block * BLOCK as u64, BLOCK))
            .is_some_and(
                |bytes| matches!(decode(block, &bytes), Decoded::Version(d) if d >= version),
            )
    }
}

impl SecondStore for CheckedStore {
    fn region(&self) -> Region {
        self.inner.region()
    }
    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.persist(offset, len)
    }
    fn hold_record(&self, partition: u32, seq: u64, offset: u64, len: u32) -> Result<(), String> {
        self.inner.hold_record(partition, seq, offset, len)?;
        lock(&self.held).insert((partition, seq), (offset, len));
        Ok(())
    }
    fn on_release(&self, partition: u32, through_seq: u64) {
        // Copies the store keeps past the release (pinned for a takeover's replay) are not
        // released: only the others must be on a medium.
        self.inner.on_release(partition, through_seq);
        let released: Vec<(u64, u32)> = {
            let mut held = lock(&self.held);
            let keys: Vec<(u32, u64)> = held
                .range((partition, 0)..=(partition, through_seq))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| held.remove(k)).collect()
        };
        let region = self.inner.region();
        for (offset, len) in released {
            let Some(bytes) = region.read_bytes(offset, len as usize) else {
                continue;
            };
            let Ok(h) = RecordHeader::decode(&bytes) else {
                // Overwritten since: the owner reused the space after flushing it.
                continue;
            };
            if h.kind != RecordKind::Data
                || h.partition != partition
                || h.seq > through_seq
                || self.inner.holds(partition, h.seq)
            {
                continue;
            }
            let first = h.offset / BLOCK as u64;
            let data = &bytes[64..64 + h.data_len as usize];
            for (i, chunk) in data.chunks(BLOCK).enumerate() {
                let block = first + i as u64;
                if block >= self.lun_blocks {
                    continue;
                }
                let Decoded::Version(v) = decode(block, chunk) else {
                    continue;
                };
                // The release comes once the owner's medium holds the batch; with a medium
                // per node, ours may hold it instead (our takeover replayed it; a copy
                // dropped unwritten marks ours outdated, checked at the end).
                let holds = |disk: &SimDisk| {
                    let on_disk = decode(block, &disk.durable(block * BLOCK as u64, BLOCK));
                    (matches!(on_disk, Decoded::Version(d) if d >= v), on_disk)
                };
                let (owner_holds, on_disk) = holds(&self.shared.media[1 - self.node]);
                let fine = owner_holds
                    || holds(&self.shared.media[self.node]).0
                    || lock(&self.shared.model).may_be_dropped(block, v)
                    || self.holds_version(block, v)
                    || self.staged_here(block, v);
                if !fine {
                    self.shared.violate(format!(
                        "node n{} was told to release partition {partition} seq {} (block {block} version {v}) but the disk holds {on_disk:?}: a mirror copy released before the medium held its data",
                        self.node, h.seq
                    ));
                }
            }
        }
    }
    fn resync_point(&self) -> ResyncPoint {
        self.inner.resync_point()
    }
}

/// What a node's boot needs (it runs as a task of the node's process).
struct Boot {
    id: usize,
    name: String,
    settings: Settings,
    host: Arc<dyn Host>,
    life: Arc<Life>,
    table: Arc<dyn nvmirror::ownership::TableStore>,
    lease: Arc<DiskLease>,
    nvram: Arc<MemoryNvram>,
    medium: Arc<crate::disk::DiskView>,
    net: Arc<SimNet>,
    shared: Arc<Shared>,
    life_no: u32,
    /// Holds back the link's tasks alone (see [`Fault::LinkStall`]).
    link_stall: Arc<Stall>,
}

impl Boot {
    async fn run(self) -> Result<Running, String> {
        let s = &self.settings;
        let id = self.id;
        self.life.spawn(self.lease.clone().run());
        self.lease.acquired().await;
        let initial = OwnershipTable {
            cluster_id: CLUSTER_ID,
            generation: 1,
            luns: vec![(0..s.ranges)
                .map(|r| RangeOwner {
                    owner: r % NODES as u32,
                    epoch: 1,
                })
                .collect()],
        };
        let opts = EngineOptions {
            node_name: self.name.clone(),
            partitions: s.partitions,
            flush: FlushPolicy {
                batch_bytes: 1 << 20,
                linger: s.linger,
            },
            mode: OpenMode::Normal,
            mirrored: true,
            degraded: if s.degraded_nvram {
                DegradedPolicy::Nvram
            } else {
                DegradedPolicy::WriteThrough
            },
            cluster: Some(ClusterSetup {
                storage: if s.own_storage {
                    nvmirror::config::StorageMode::Own
                } else {
                    nvmirror::config::StorageMode::Shared
                },
                me: id as u32,
                nodes: (0..NODES).map(|n| format!("n{n}")).collect(),
                table_store: self.table.clone(),
                initial,
                lease: Some(self.lease.clone()),
                link_timeout: s.heartbeat_timeout,
                forward_wait: std::time::Duration::from_secs(60),
                reservations: Vec::new(),
            }),
            config_path: "sim.toml".into(),
            // Small regions: the simulated ranges are a few blocks long. Both disks start
            // zeroed, so new maps may say "in sync" (the first resync is partial too).
            out_of_sync: OutOfSyncOptions {
                region_bytes: BLOCK as u64,
                first_format: Fresh::InSync,
                resync_rate: s.resync_rate,
            },
            host: self.host.clone(),
        };
        let spec = LunSpec {
            name: "lun0".into(),
            size: s.lun_blocks * BLOCK as u64,
            ranges: s.ranges,
            medium: self.medium.clone(),
        };
        let region = NvramRegion::in_memory(self.nvram.clone());
        if let Some(setup) = &opts.cluster {
            nvmirror::engine::wait_for_claimers(setup, &self.host).await;
        }
        let engine = Engine::open(region, opts, vec![spec]).map_err(|e| e.to_string())?;
        // Quick to ask and to give up a range (a 30 ms hold), so that ranges move often,
        // bouncing between two writers too.
        engine.set_write_priority(s.write_priority.then_some(WritePriorityPolicy {
            ask_after_forwarded: 3,
            window: Duration::from_secs(1),
            min_hold: Duration::from_millis(30),
            queue_for: s.queue_writes.then(|| Duration::from_secs(2)),
        }));
        engine.set_local_reads(s.local_reads)?;
        let role = if id == 0 {
            Role::Listen(addr(0))
        } else {
            Role::Connect(addr(0))
        };
        let peer = 1 - id as u32;
        let mut lc = LinkConfig::new(
            Transport::Tcp,
            role,
            CLUSTER_ID,
            id as u32 + 1,
            peer + 1,
            SECRET,
        );
        lc.heartbeat_interval = s.heartbeat_interval;
        lc.heartbeat_timeout = s.heartbeat_timeout;
        let area = engine
            .second_store()
            .ok_or_else(|| "the NVRAM has no second store".to_string())?;
        let store = Arc::new(CheckedStore {
            inner: area,
            node: id,
            lun_blocks: s.lun_blocks,
            held: Mutex::new(BTreeMap::new()),
            shared: self.shared.clone(),
            engine: Arc::downgrade(&engine),
        });
        let link = Link::start_over(
            lc,
            Some(engine.local_region()),
            Some(store),
            Some(nvmirror::node::link::request_handler(&engine)),
            self.net.for_node(id),
            Arc::new(SimSpawner {
                life: self.life.clone(),
                stall: self.link_stall.clone(),
            }),
        )
        .map_err(|e| format!("the link did not start: {e}"))?;
        let policy = if s.takeover_auto {
            TakeoverPolicy::Auto
        } else {
            TakeoverPolicy::Manual
        };
        nvmirror::node::link::attach_link(&engine, &link, policy, s.heartbeat_timeout)
            .map_err(|e| format!("wiring the link failed: {e}"))?;
        let replay = engine.status().replay;
        self.shared.note(format!(
            "{} starts (life {}): lease held, replayed {} record(s){}",
            self.name,
            self.life_no,
            replay.records,
            if replay.skipped_not_owned > 0 {
                format!(", skipped {} of ranges it lost", replay.skipped_not_owned)
            } else {
                String::new()
            }
        ));
        Ok(Running {
            engine,
            local_reads_ended: self.shared.local_reads_ended.clone(),
            link,
            life: self.life,
        })
    }
}

struct Running {
    engine: Arc<Engine>,
    /// Where its local reads are counted when it ends.
    local_reads_ended: Arc<std::sync::atomic::AtomicU64>,
    /// Lives as long as the process; givebacks ask the partner through it.
    link: Link,
    life: Arc<Life>,
}

/// A process that ends gives its memory back, as a kill -9 does: the link's request handler
/// holds the engine, which holds the link, and with `storage = "own"` the cluster's forwarder
/// holds the link, whose second store holds the cluster. Without this, every life of every
/// seed stayed allocated (about 15 MB a seed: a sweep of 2000 seeds ran out of memory).
impl Drop for Running {
    fn drop(&mut self) {
        self.local_reads_ended.fetch_add(
            self.engine.local_reads_served(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.link.set_request_handler(None);
        if let Some(c) = self.engine.cluster() {
            c.set_forwarder(None);
        }
    }
}

struct Node {
    name: String,
    nvram: Arc<MemoryNvram>,
    run: Option<Running>,
    /// A boot under way (its process), and where it leaves its result.
    booting: Option<Arc<Life>>,
    booted: Arc<Mutex<Option<Result<Running, String>>>>,
    /// Counts the node's starts: events aimed at an earlier life are dropped.
    life_no: u32,
    /// The current life's link stall (see [`Fault::LinkStall`]).
    link_stall: Arc<Stall>,
}

#[derive(Debug)]
enum Event {
    Fault(Fault),
    CutEnd { from: usize, to: usize },
    VoteCutEnd { link: VoteLink },
    Restart { node: usize },
    Resume { node: usize, life_no: u32 },
    LinkGo { node: usize, life_no: u32 },
    PathBack { node: usize },
    MediumBack { node: usize },
    FlushResume { node: usize, life_no: u32 },
    IssueOp,
    Check,
    WriteBack,
    Settle,
    Final,
}

struct World {
    s: Settings,
    rng: ChaCha8Rng,
    shared: Arc<Shared>,
    /// The shared disk: the LUN and the table, or with `storage = "own"` the arbiter
    /// (the table only; each node's LUN is on its own disk in `media`).
    disk: Arc<SimDisk>,
    media: Vec<Arc<SimDisk>>,
    net: Arc<SimNet>,
    nodes: Vec<Node>,
    queue: BTreeMap<(Instant, u64), Event>,
    next_event: u64,
    next_op: u64,
    cuts: BTreeMap<(usize, usize), u32>,
    /// Ranges already reported as served twice (one violation per episode).
    double_served: Vec<bool>,
    faults_over: bool,
    /// With the table on voters: per node, cut off from a majority of them (see
    /// [`World::track_voter_isolation`]).
    voter_isolated: [bool; NODES],
    /// With a medium per node, a write before the link is up marks the partner's medium
    /// outdated for good (no resync yet): the clients wait for both nodes to mirror, so
    /// that a run without faults checks both media.
    clients_started: bool,
    start: Instant,
    /// With `--voter-table`: the arbiter's slots on three voters instead of `disk`.
    voter_table: Option<Arc<VoterTable>>,
}

fn addr(node: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, node as u8 + 1)), 7800)
}

/// Runs one seed's settings to the end (or to the first violation).
pub fn run(s: &Settings, verbose: bool) -> Outcome {
    install_panic_hook();
    // Every log invariant, also in the release build CI tests with.
    nvmirror::log::audit_queues();
    PANICS.with(|p| *p.borrow_mut() = Some(Vec::new()));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build the simulation's runtime: {e}"),
    };
    let outcome = rt.block_on(async {
        let trace = Trace::new();
        let layer = TraceLayer {
            trace: trace.clone(),
            verbose,
        };
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(layer);
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut world = World::new(s, trace, verbose);
        world.run().await;
        world.outcome()
    });
    drop(rt);
    PANICS.with(|p| *p.borrow_mut() = None);
    outcome
}

impl World {
    fn new(s: &Settings, trace: SharedTrace, verbose: bool) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
        let lun_bytes = s.lun_blocks * BLOCK as u64;
        let disk = SimDisk::new(NODES, lun_bytes, METADATA_BYTES);
        let media: Vec<Arc<SimDisk>> = (0..NODES)
            .map(|_| match s.own_storage {
                true => SimDisk::new(NODES, lun_bytes, METADATA_BYTES),
                false => disk.clone(),
            })
            .collect();
        let net_rng = ChaCha8Rng::seed_from_u64(rng.gen());
        let net = SimNet::new(
            net_rng,
            Latency {
                min: Duration::from_micros(30),
                max: Duration::from_micros(400),
            },
            &(0..NODES).map(|n| addr(n).ip()).collect::<Vec<_>>(),
        );
        let shared = Arc::new(Shared {
            impaired: std::sync::atomic::AtomicUsize::new(0),
            engines: Mutex::new((0..NODES).map(|_| std::sync::Weak::new()).collect()),
            degraded_of_dead: Default::default(),
            trace,
            nvram_policy: s.degraded_nvram,
            verbose,
            model: Mutex::new(Model::new(s.lun_blocks as usize)),
            violations: Mutex::new(Vec::new()),
            ops: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(Stats::default()),
            local_reads_ended: Arc::default(),
            media: media.clone(),
        });
        let voter_table = s.voter_table.then(|| {
            VoterTable::new(
                s.seed,
                NODES,
                s.voter_tries,
                s.separate_vote_link,
                net.clone(),
                disk.clone(),
            )
        });
        let nodes = (0..NODES)
            .map(|id| Node {
                name: format!("n{id}"),
                nvram: Arc::new(MemoryNvram::new(&format!("nvram-n{id}"), NVRAM_BYTES)),
                run: None,
                booting: None,
                booted: Arc::new(Mutex::new(None)),
                life_no: 0,
                link_stall: Arc::default(),
            })
            .collect();
        World {
            s: s.clone(),
            rng,
            shared,
            disk,
            media,
            net,
            nodes,
            queue: BTreeMap::new(),
            next_event: 0,
            next_op: 0,
            cuts: BTreeMap::new(),
            double_served: vec![false; s.ranges as usize],
            faults_over: false,
            voter_isolated: [false; NODES],
            clients_started: false,
            start: Instant::now(),
            voter_table,
        }
    }

    fn at(&mut self, when: Instant, e: Event) {
        self.next_event += 1;
        self.queue.insert((when, self.next_event), e);
    }

    fn after(&mut self, d: Duration, e: Event) {
        let when = Instant::now() + d;
        self.at(when, e);
    }

    fn note(&self, line: impl AsRef<str>) {
        self.shared.note(line);
    }

    /// Every disk a node's I/O reaches: the shared one, and its own with `storage = "own"`.
    fn disks_of(&self, node: usize) -> Vec<Arc<SimDisk>> {
        let mut d = vec![self.disk.clone()];
        if self.s.own_storage {
            d.push(self.media[node].clone());
        }
        d
    }

    fn outcome(&self) -> Outcome {
        let trace = trace::lock(&self.shared.trace).lines().to_vec();
        Outcome {
            seed: self.s.seed,
            violations: lock(&self.shared.violations).clone(),
            digest: trace::digest(&trace),
            trace,
            stats: Stats {
                voter_late_deliveries: self.voter_table.as_ref().map_or(0, |v| v.late_deliveries()),
                voter_operations: self
                    .voter_table
                    .as_ref()
                    .map_or(0, |v| v.operations_and_new_rounds().0),
                voter_new_rounds: self
                    .voter_table
                    .as_ref()
                    .map_or(0, |v| v.operations_and_new_rounds().1),
                ..lock(&self.shared.stats).clone()
            },
            simulated: Instant::now().duration_since(self.start),
        }
    }

    async fn run(&mut self) {
        self.note(format!(
            "seed {}: {} ranges, takeover {}, degraded {}, heartbeat {:?}/{:?}, flusher linger {:?}, {:.0} ops/s, {} faults",
            self.s.seed,
            self.s.ranges,
            if self.s.takeover_auto { "auto" } else { "manual" },
            if self.s.degraded_nvram { "nvram" } else { "write-through" },
            self.s.heartbeat_interval,
            self.s.heartbeat_timeout,
            self.s.linger,
            self.s.op_rate,
            self.s.faults.len()
        ));
        for n in 0..NODES {
            self.start_node(n);
        }
        let start = self.start;
        for (at, f) in self.s.faults.clone() {
            self.at(start + at, Event::Fault(f));
        }
        self.after(Duration::from_millis(200), Event::IssueOp);
        self.after(Duration::from_millis(1), Event::Check);
        self.after(Duration::from_millis(300), Event::WriteBack);
        self.at(start + self.s.duration, Event::Settle);
        while let Some(((when, _), event)) = self.queue.pop_first() {
            tokio::time::sleep_until(when).await;
            self.collect_panics();
            if self.shared.violated() {
                return;
            }
            if let Event::Final = event {
                self.final_checks().await;
                return;
            }
            self.handle(event);
            self.track_voter_isolation();
        }
    }

    /// With the table on voters: a node that no longer reaches a majority of them (its own
    /// and neither other, through vote cuts, the mirror link's cuts or a stopped partner) has
    /// failed as far as the model goes, like a node whose path to the shared disk failed:
    /// its weak acknowledgements (`degraded = "nvram"`) may be lost, and so may those made
    /// while it is cut off.
    fn track_voter_isolation(&mut self) {
        let Some(voters) = &self.voter_table else {
            return;
        };
        if self.faults_over {
            self.voter_isolated = [false; NODES];
            return;
        }
        for n in 0..NODES {
            let cut_off = self.nodes[n].run.is_some() && !voters.reaches_majority(n);
            if cut_off == self.voter_isolated[n] {
                continue;
            }
            self.voter_isolated[n] = cut_off;
            if cut_off {
                self.note(format!("n{n} reaches no majority of the voters"));
                lock(&self.shared.model).node_failed();
                self.impair(1);
            } else {
                self.impair(-1);
            }
        }
    }

    fn collect_panics(&self) {
        let panics = PANICS.with(|p| p.borrow_mut().as_mut().map(std::mem::take));
        for p in panics.unwrap_or_default() {
            self.shared.violate(format!(
                "a simulated task panicked (engine assertion?): {p}"
            ));
        }
    }

    fn timeout(&self) -> Duration {
        self.s.heartbeat_timeout
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Fault(f) => {
                if !self.faults_over {
                    lock(&self.shared.stats).faults += 1;
                    self.inject(f);
                }
            }
            Event::CutEnd { from, to } => self.uncut(from, to),
            Event::VoteCutEnd { link } => {
                if let Some(voters) = &self.voter_table {
                    voters.set_vote_cut(link, false);
                    self.note(format!(
                        "n{}'s link to voter {} delivers again",
                        link.node, link.voter
                    ));
                }
            }
            Event::Restart { node } => {
                if self.nodes[node].run.is_none() && self.nodes[node].booting.is_none() {
                    self.net.power_on(node);
                    lock(&self.shared.stats).restarts += 1;
                    self.start_node(node);
                }
            }
            Event::Resume { node, life_no } => {
                if self.nodes[node].life_no == life_no {
                    let life = (self.nodes[node].run.as_ref().map(|r| r.life.clone()))
                        .or_else(|| self.nodes[node].booting.clone());
                    if let Some(life) = life {
                        life.resume();
                        self.note(format!("n{node} continues (SIGCONT)"));
                    }
                }
                self.impair(-1);
            }
            Event::LinkGo { node, life_no } => {
                if self.nodes[node].life_no == life_no {
                    self.nodes[node].link_stall.go();
                    self.note(format!("n{node}'s link runs again"));
                }
                self.impair(-1);
            }
            Event::MediumBack { node } => {
                self.impair(-1);
                self.media[node].set_path_failed(node, false);
                self.note(format!("n{node}'s own medium works again"));
            }
            Event::PathBack { node } => {
                self.impair(-1);
                for d in self.disks_of(node) {
                    d.set_path_failed(node, false);
                }
                self.note(format!("n{node}'s path to the disk works again"));
            }
            Event::FlushResume { node, life_no } => {
                if let Some(r) = self.live(node, life_no) {
                    r.engine.set_flush_paused(false);
                    self.note(format!("n{node}: flusher resumed"));
                }
            }
            Event::IssueOp if self.s.own_storage && !self.clients_started => {
                // With a medium per node the clients start once both nodes mirror.
                let mirroring = self.nodes.iter().all(|n| {
                    n.run
                        .as_ref()
                        .is_some_and(|r| r.engine.status().mirror.state == "mirroring")
                });
                self.clients_started = mirroring;
                self.after(Duration::from_millis(20), Event::IssueOp);
            }
            Event::IssueOp => {
                if !self.faults_over {
                    self.issue_op();
                    let gap = -(1.0 - self.rng.gen::<f64>()).ln() / self.s.op_rate;
                    self.after(Duration::from_secs_f64(gap), Event::IssueOp);
                }
            }
            Event::Check => {
                self.adopt_booted();
                self.check_serving();
                self.restart_fenced();
                self.after(Duration::from_millis(10), Event::Check);
            }
            Event::WriteBack => {
                for n in 0..NODES {
                    for d in self.disks_of(n) {
                        let rng = &mut self.rng;
                        d.write_back_some(n, |_| rng.gen_bool(0.3));
                    }
                }
                let gap = Duration::from_millis(self.rng.gen_range(50..1000));
                self.after(gap, Event::WriteBack);
            }
            Event::Settle => self.settle(),
            Event::Final => {}
        }
    }

    fn live(&self, node: usize, life_no: u32) -> Option<&Running> {
        let n = &self.nodes[node];
        n.run.as_ref().filter(|_| n.life_no == life_no)
    }

    /// Boots node `id`: like the daemon, it first holds its disk lease, then opens the
    /// engine (replaying its NVRAM), then starts the mirror link. The boot runs as the
    /// node's first task; the node serves once `adopt_booted` sees it done.
    fn start_node(&mut self, id: usize) {
        let s = &self.s;
        let node = &mut self.nodes[id];
        node.life_no += 1;
        node.link_stall = Arc::default();
        let life = Life::new(&node.name);
        let host: Arc<dyn Host> = Arc::new(SimHost {
            clock: NodeClock {
                origin: self.start,
                rate: s.clock_rates[id],
            },
            life: life.clone(),
            io_delay: s.io_delay.then(|| {
                Mutex::new(ChaCha8Rng::seed_from_u64(
                    s.seed ^ ((id as u64) << 48) ^ node.life_no as u64,
                ))
            }),
        });
        let timing = s.lease_timing();
        let table: Arc<dyn nvmirror::ownership::TableStore> = match &self.voter_table {
            Some(voters) => Arc::new(voters.view(id, node.life_no)),
            None => Arc::new(self.disk.table_view(id)),
        };
        let lease = DiskLease::new(
            host.clone(),
            table.clone(),
            CLUSTER_ID,
            id as u32,
            NODES as u32,
            timing,
            // Not from the world's stream: each process gets its own, reproducibly.
            (self.s.seed ^ ((id as u64) << 56) ^ (node.life_no as u64) << 40)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                | 1,
        );
        let boot = Boot {
            id,
            name: node.name.clone(),
            settings: s.clone(),
            host,
            life: life.clone(),
            table,
            lease,
            nvram: node.nvram.clone(),
            medium: Arc::new(self.media[id].lun_view(id)),
            net: self.net.clone(),
            shared: self.shared.clone(),
            life_no: node.life_no,
            link_stall: node.link_stall.clone(),
        };
        let slot = node.booted.clone();
        life.spawn(async move {
            let result = boot.run().await;
            *lock(&slot) = Some(result);
        });
        node.booting = Some(life);
    }

    /// Nodes whose boot finished start serving (or the boot's failure is judged).
    fn adopt_booted(&mut self) {
        for id in 0..NODES {
            let Some(result) = lock(&self.nodes[id].booted).take() else {
                continue;
            };
            let life = self.nodes[id].booting.take();
            match result {
                Ok(run) => {
                    lock(&self.shared.engines)[id] = Arc::downgrade(&run.engine);
                    self.nodes[id].run = Some(run);
                }
                // The simulated disks fail I/O only while a path or medium fails (the failure
                // may have ended since the start gave up).
                // With the table on voters, a start that found no majority of them (the
                // partner down, messages held back) is tried again the same way.
                Err(e)
                    if self.disks_of(id).iter().any(|d| d.path_failed(id))
                        || e.to_string().contains("Input/output error")
                        || (self.voter_table.is_some()
                            && e.to_string().contains("no majority of the")) =>
                {
                    // The daemon cannot start without its medium; its service manager tries
                    // again later.
                    self.shared.note(format!(
                        "n{id} cannot start while its path to the disk fails ({e}); retrying in 1 s"
                    ));
                    if let Some(l) = life {
                        l.kill();
                    }
                    if let Some(voters) = &self.voter_table {
                        voters.stopped(id);
                    }
                    self.after(Duration::from_secs(1), Event::Restart { node: id });
                }
                Err(e) => self.shared.violate(format!("n{id} could not start: {e}")),
            }
        }
    }

    /// A daemon whose NVRAM partition was fenced exits so that its service manager starts
    /// it again (`Engine::restart_wanted`, `node::daemon`): as a crash, a second later.
    fn restart_fenced(&mut self) {
        for node in 0..NODES {
            let why = self.nodes[node]
                .run
                .as_ref()
                .and_then(|r| r.engine.restart_wanted());
            let Some(why) = why else { continue };
            self.note(format!("n{node} exits to be restarted: {why}"));
            lock(&self.shared.model).node_failed();
            if self.stop_node(node, false) {
                self.after(Duration::from_secs(1), Event::Restart { node });
            }
        }
    }

    /// kill -9 (`power` false) or a power cut of `node`.
    fn stop_node(&mut self, node: usize, power: bool) -> bool {
        let life = match (self.nodes[node].run.take(), self.nodes[node].booting.take()) {
            (Some(run), _) => {
                let ended = std::mem::take(&mut lock(&self.shared.engines)[node]);
                if let Some(engine) = ended.upgrade() {
                    self.shared.degraded_of_dead.fetch_add(
                        engine.degraded_writes(),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                }
                run.life.clone()
            }
            (None, Some(booting)) => booting,
            (None, None) => return false,
        };
        *lock(&self.nodes[node].booted) = None;
        if power {
            self.net.power_off(node);
        }
        if let Some(voters) = &self.voter_table {
            voters.stopped(node);
        }
        life.kill();
        self.shared
            .node_died(node, self.s.heartbeat_timeout + self.s.heartbeat_interval);
        if power {
            let (mut dirty, mut survived) = (0, 0);
            for d in self.disks_of(node) {
                let rng = &mut self.rng;
                let (lost, kept) = d.power_cut(node, |_| rng.gen_bool(0.5));
                dirty += lost;
                survived += kept;
            }
            let rng = &mut self.rng;
            let (lines, kept) = self.nodes[node].nvram.power_cut(|_| rng.gen_bool(0.5));
            self.note(format!(
                "n{node} loses power: {survived}/{dirty} dirty page(s) reached the disk, {kept}/{lines} unpersisted NVRAM line(s) survived"
            ));
        } else {
            for d in self.disks_of(node) {
                d.process_died(node);
            }
            self.note(format!("n{node} is killed (kill -9)"));
        }
        true
    }

    fn impair(&self, delta: isize) {
        use std::sync::atomic::Ordering;
        let _ = self
            .shared
            .impaired
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add_signed(delta))
            });
    }

    fn cut(&mut self, from: usize, to: usize) {
        let c = self.cuts.entry((from, to)).or_insert(0);
        *c += 1;
        if *c == 1 {
            self.net.set_cut(from, to, true);
        }
    }

    fn uncut(&mut self, from: usize, to: usize) {
        if let Some(c) = self.cuts.get_mut(&(from, to)) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.cuts.remove(&(from, to));
                self.net.set_cut(from, to, false);
                self.note(format!("link n{from}->n{to} delivers again"));
            }
        }
    }

    fn inject(&mut self, f: Fault) {
        self.note(format!("FAULT {f:?}"));
        if matches!(
            f,
            Fault::Kill { .. }
                | Fault::PowerCut { .. }
                | Fault::Pause { .. }
                | Fault::PathFailure { .. }
                | Fault::MediumFailure { .. }
        ) {
            lock(&self.shared.model).node_failed();
        }
        match f {
            Fault::Cut {
                from,
                to,
                both,
                duration,
            } => {
                self.cut(from, to);
                self.after(duration, Event::CutEnd { from, to });
                if both {
                    self.cut(to, from);
                    self.after(duration, Event::CutEnd { from: to, to: from });
                }
            }
            Fault::Flap { period, times } => {
                for i in 0..times {
                    let start = period * (2 * i);
                    let end = period * (2 * i + 1);
                    for (a, b) in [(0, 1), (1, 0)] {
                        let now = Instant::now();
                        self.at(
                            now + start,
                            Event::Fault(Fault::Cut {
                                from: a,
                                to: b,
                                both: false,
                                duration: end - start,
                            }),
                        );
                    }
                }
            }
            Fault::LatencyBurst { duration, latency } => {
                self.net.latency_burst(Instant::now() + duration, latency);
            }
            Fault::Reset => {
                let rng = &mut self.rng;
                self.net.reset_one(|n| rng.gen_range(0..n));
            }
            Fault::Duplicate => {
                let rng = &mut self.rng;
                self.net.duplicate_one(|n| rng.gen_range(0..n));
            }
            Fault::Kill { node, down } | Fault::PowerCut { node, down } => {
                let power = matches!(f, Fault::PowerCut { .. });
                if self.stop_node(node, power) {
                    self.after(down, Event::Restart { node });
                }
            }
            Fault::Pause { node, duration } => {
                let life = (self.nodes[node].run.as_ref().map(|r| r.life.clone()))
                    .or_else(|| self.nodes[node].booting.clone());
                if let Some(life) = life {
                    self.impair(1);
                    life.pause();
                    let life_no = self.nodes[node].life_no;
                    self.after(duration, Event::Resume { node, life_no });
                }
            }
            Fault::LinkStall { node, duration } => {
                self.impair(1);
                self.nodes[node].link_stall.stop();
                let life_no = self.nodes[node].life_no;
                self.after(duration, Event::LinkGo { node, life_no });
            }
            Fault::PathFailure { node, duration } => {
                self.impair(1);
                for d in self.disks_of(node) {
                    d.set_path_failed(node, true);
                }
                self.after(duration, Event::PathBack { node });
            }
            Fault::MediumFailure { node, duration } => {
                self.impair(1);
                self.media[node].set_path_failed(node, true);
                self.after(duration, Event::MediumBack { node });
            }
            Fault::FlushPause { node, duration } => {
                if let Some(r) = &self.nodes[node].run {
                    r.engine.set_flush_paused(true);
                    let life_no = self.nodes[node].life_no;
                    self.after(duration, Event::FlushResume { node, life_no });
                }
            }
            Fault::VoteCut {
                node,
                voter,
                answers_only,
                duration,
            } => {
                if let Some(voters) = &self.voter_table {
                    let link = VoteLink {
                        node,
                        voter,
                        answers_only,
                    };
                    voters.set_vote_cut(link, true);
                    self.after(duration, Event::VoteCutEnd { link });
                }
            }
            Fault::Takeover { node } => self.operator_takeover(node),
            Fault::Giveback { then_stop } | Fault::Handover { then_stop, .. } => {
                match f {
                    Fault::Handover { node, .. } => self.move_ranges(node, RangesToMove::OwnRanges),
                    _ => {
                        for n in 0..NODES {
                            self.move_ranges(n, RangesToMove::PartnersRanges);
                        }
                    }
                }
                if let Some((victim, power, after)) = then_stop {
                    let down = self.timeout() * 2;
                    let f = if power {
                        Fault::PowerCut { node: victim, down }
                    } else {
                        Fault::Kill { node: victim, down }
                    };
                    self.after(after, Event::Fault(f));
                }
            }
        }
    }

    /// `node`'s process, if it runs and is not paused (an operator's command reaches it).
    fn unpaused(&self, node: usize) -> Option<&Running> {
        self.nodes[node]
            .run
            .as_ref()
            .filter(|r| !r.life.is_paused())
    }

    /// What `nvmirrorctl takeover` (no --force) does on `node`, if it runs and is not
    /// paused: refused while the partner is connected; else waits for the partner's disk
    /// heartbeat to stop (or gives up), then claims and replays the partner's ranges.
    fn operator_takeover(&self, node: usize) {
        let Some(r) = self.unpaused(node) else {
            return;
        };
        if r.link.state().is_up() {
            self.note(format!(
                "n{node}: takeover refused: the partner is reachable"
            ));
            return;
        }
        let (engine, shared) = (r.engine.clone(), self.shared.clone());
        let from = 1 - node as u32;
        r.life.spawn(async move {
            let taken = match engine.await_partner_silence(from).await {
                Ok(()) => engine
                    .take_over_ranges(from, None, Duration::from_millis(100), true)
                    .await
                    .map(|r| r.records),
                Err(e) => Err(e),
            };
            match taken {
                Ok(n) => shared.note(format!(
                    "n{node}: operator takeover done ({n} record(s) replayed)"
                )),
                Err(e) => shared.note(format!("n{node}: operator takeover refused: {e}")),
            }
        });
    }

    /// What `nvmirrorctl giveback` (or `handover`) does on `node`, if it runs and is not
    /// paused: hand the partner the ranges its config gives the partner (or this node),
    /// flushed first.
    fn move_ranges(&self, node: usize, which: RangesToMove) {
        let Some(r) = self.unpaused(node) else {
            return;
        };
        let (engine, link, shared) = (r.engine.clone(), r.link.clone(), self.shared.clone());
        r.life.spawn(async move {
            let what = match which {
                RangesToMove::PartnersRanges => "giveback",
                RangesToMove::OwnRanges => "handover",
                RangesToMove::Asked { .. } => "asked hand-over",
            };
            let moved = engine
                .give_back(which, Duration::from_secs(2), || {
                    nvmirror::node::link::tell_partner_to_reload(&link)
                })
                .await;
            match moved {
                Ok(0) => {}
                Ok(n) => shared.note(format!("n{node}: {what}: moved {n} range(s)")),
                Err(e) => shared.note(format!("n{node}: {what} failed: {e}")),
            }
        });
    }

    /// The faults are over: heal everything, bring every node back, stop new I/O; then, after
    /// a while, the final checks.
    fn settle(&mut self) {
        self.faults_over = true;
        self.shared
            .impaired
            .store(0, std::sync::atomic::Ordering::SeqCst);
        self.note("faults end: network healed, paused nodes continue, paths and flushers back, dead nodes restart");
        self.cuts.clear();
        self.net.heal_all();
        if let Some(voters) = &self.voter_table {
            voters.calm();
        }
        for n in 0..NODES {
            for d in self.disks_of(n) {
                d.set_path_failed(n, false);
            }
            if let Some(r) = &self.nodes[n].run {
                r.life.resume();
                r.engine.set_flush_paused(false);
            } else if self.nodes[n].booting.is_none() {
                self.net.power_on(n);
                self.start_node(n);
            }
        }
        self.after(SETTLE + self.timeout() * 4, Event::Final);
    }

    fn issue_op(&mut self) {
        let candidates: Vec<usize> = (0..NODES)
            .filter(|&n| {
                self.nodes[n]
                    .run
                    .as_ref()
                    .is_some_and(|r| !r.life.is_paused())
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let node = candidates[self.rng.gen_range(0..candidates.len())];
        let blocks_total = self.s.lun_blocks;
        let write = self.rng.gen_bool(0.65);
        let two = write && self.rng.gen_bool(0.2);
        let mut first = None;
        for _ in 0..8 {
            let b = self.rng.gen_range(0..blocks_total - u64::from(two));
            let model = lock(&self.shared.model);
            if !(model.is_busy(b) || two && model.is_busy(b + 1)) {
                first = Some(b);
                break;
            }
        }
        let Some(first) = first else { return };
        let count = if two { 2 } else { 1 };
        let id = self.next_op;
        self.next_op += 1;
        let mut blocks = Vec::new();
        {
            let mut model = lock(&self.shared.model);
            for b in first..first + count {
                if write {
                    blocks.push((b, model.begin_write(b)));
                } else {
                    model.begin_read(b);
                    blocks.push((b, 0));
                }
            }
        }
        let kind = if write { OpKind::Write } else { OpKind::Read };
        lock(&self.shared.ops).insert(
            id,
            Op {
                node,
                kind,
                degraded_before: self.shared.degraded_total(),
                blocks: blocks.clone(),
                started: Instant::now(),
            },
        );
        let Some(run) = &self.nodes[node].run else {
            return;
        };
        let (engine, shared) = (run.engine.clone(), self.shared.clone());
        let offset = first * BLOCK as u64;
        run.life.spawn(async move {
            let result = match kind {
                OpKind::Write => {
                    let mut data = Vec::with_capacity(blocks.len() * BLOCK);
                    for &(b, v) in &blocks {
                        data.extend_from_slice(&block_data(b, v));
                    }
                    engine
                        .write(0, offset, &data)
                        .await
                        .map(|()| None)
                        .map_err(|e| e.message)
                }
                OpKind::Read => {
                    let mut buf = vec![0u8; blocks.len() * BLOCK];
                    engine
                        .read_routed(0, offset, &mut buf)
                        .await
                        .map(|()| Some(buf))
                        .map_err(|e| e.message)
                }
            };
            let degraded = shared.degraded_total();
            shared.end_op(id, result, degraded);
        });
    }

    /// Invariant 2: at most one running node serves each range.
    fn check_serving(&mut self) {
        for r in 0..self.s.ranges {
            let servers: Vec<usize> = (0..NODES)
                .filter(|&n| {
                    self.nodes[n]
                        .run
                        .as_ref()
                        .is_some_and(|run| !run.life.is_paused() && run.engine.serves(0, r))
                })
                .collect();
            let twice = servers.len() > 1;
            if twice && !self.double_served[r as usize] {
                let names: Vec<String> = servers.iter().map(|n| format!("n{n}")).collect();
                self.shared.violate(format!(
                    "range {r} is served by {} at once (split brain)",
                    names.join(" and ")
                ));
            }
            self.double_served[r as usize] = twice;
        }
    }

    /// With `storage = "own"`, once drained: every node's disk holds the acknowledged data of
    /// every range it is not marked outdated for (both media converge), and no node owns a
    /// range its medium is outdated for. False after a violation.
    fn check_own_media(&self) -> bool {
        let Some(engine) = self
            .nodes
            .iter()
            .find_map(|n| n.run.as_ref().map(|r| r.engine.clone()))
        else {
            self.note("no node runs at the end: the media are not checked");
            return true;
        };
        let status = engine.status();
        let range_blocks = self.s.lun_blocks / self.s.ranges as u64;
        // Only a fault that breaks a node, its path or the link for long may leave a medium
        // behind, even for a while: with flusher pauses and link blips alone, no node may
        // mark a medium outdated at any time (not only at the end, when resyncs have run).
        let harmless = faults::only_blips(&self.s.faults, self.s.heartbeat_timeout);
        if harmless {
            let marks: Vec<String> = trace::lock(&self.shared.trace)
                .lines()
                .iter()
                .filter(|l| l.contains(MARK_WARNING))
                .cloned()
                .collect();
            if let Some(first) = marks.first() {
                self.shared.violate(format!(
                    "{} medium(s) marked outdated although no fault broke a node, a path or the link for long (faults: {:?}); the first: {first}",
                    marks.len(),
                    self.s.faults
                ));
                return false;
            }
        }
        for n in 0..NODES {
            let stale = status
                .outdated_media
                .get(&format!("n{n}"))
                .cloned()
                .unwrap_or_default();
            let other_stale = status
                .outdated_media
                .get(&format!("n{}", 1 - n))
                .cloned()
                .unwrap_or_default();
            for r in &status.ranges {
                // An owner whose own medium failed writes reads the range from the partner's:
                // fine while that one holds every write, never with both media outdated.
                let medium_failed = self
                    .s
                    .faults
                    .iter()
                    .any(|(_, f)| matches!(f, Fault::MediumFailure { node, .. } if *node == n));
                if r.owner == format!("n{n}") && stale.contains(&(r.lun, r.range)) && !medium_failed
                {
                    self.shared.violate(format!(
                        "n{n} owns range {} but its medium is marked outdated for it, and its medium never failed (marks: {:?})",
                        r.range, status.outdated_media
                    ));
                    return false;
                }
                if r.owner == format!("n{n}")
                    && stale.contains(&(r.lun, r.range))
                    && other_stale.contains(&(r.lun, r.range))
                    && !self.both_media_failed()
                {
                    self.shared.violate(format!(
                        "both media are marked outdated for range {} (owner n{n}): no medium holds every write (marks: {:?})",
                        r.range, status.outdated_media
                    ));
                    return false;
                }
            }
            for b in 0..self.s.lun_blocks {
                if stale.contains(&(0, (b / range_blocks) as u32)) {
                    continue;
                }
                let data = self.media[n].durable(b * BLOCK as u64, BLOCK);
                if let Err(e) = lock(&self.shared.model).check_read(b, &data) {
                    self.shared.violate(format!(
                        "n{n}'s drained disk (not marked outdated for block {b}'s range {}): {e}",
                        b / range_blocks
                    ));
                    return false;
                }
            }
            if !stale.is_empty() {
                if harmless {
                    self.shared.violate(format!(
                        "n{n}'s medium is marked outdated for {stale:?} although no fault broke a node, a path or the link for long (faults: {:?}): the media diverged", self.s.faults
                    ));
                    return false;
                }
                self.note(format!("n{n}'s medium is marked outdated for {stale:?}"));
            }
        }
        true
    }

    /// With `storage = "own"`: each node's own disk failed at some point (a medium or path
    /// failure of each): two failures, after which a range may be left with no complete
    /// medium (unreadable, never wrong).
    fn both_media_failed(&self) -> bool {
        self.s.own_storage
            && (0..NODES).all(|n| {
                self.s.faults.iter().any(|(_, f)| {
                    matches!(f, Fault::MediumFailure { node, .. } | Fault::PathFailure { node, .. } if *node == n)
                })
            })
    }

    /// Invariant 5: liveness, every block through every node, and the drained disk.
    async fn final_checks(&mut self) {
        let deadline = Instant::now() + STUCK_AFTER;
        while !lock(&self.shared.ops).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.collect_panics();
        }
        let stuck: Vec<String> = lock(&self.shared.ops)
            .iter()
            .map(|(id, op)| {
                format!(
                    "op {id} ({:?} of blocks {:?} on n{}) in flight since {:?} into the run",
                    op.kind,
                    op.blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
                    op.node,
                    op.started.duration_since(self.start)
                )
            })
            .collect();
        if self.shared.verbose && !stuck.is_empty() {
            for s in &stuck {
                self.shared.note(format!("stuck: {s}"));
            }
            for (n, node) in self.nodes.iter().enumerate() {
                if let Some(c) = node.run.as_ref().and_then(|r| r.engine.cluster().cloned()) {
                    let states: Vec<String> = (0..self.s.ranges)
                        .map(|r| format!("{r}: {:?}", c.state(0, r)))
                        .collect();
                    self.shared
                        .note(format!("stuck: n{n}'s ranges {}", states.join(", ")));
                }
            }
        }
        if let Some(first) = stuck.first() {
            self.shared.violate(format!(
                "liveness: {} operation(s) never completed after the faults ended, e.g. {first}",
                stuck.len()
            ));
            return;
        }
        for n in 0..NODES {
            let Some(run) = &self.nodes[n].run else {
                continue;
            };
            let engine = run.engine.clone();
            for b in 0..self.s.lun_blocks {
                let mut buf = vec![0u8; BLOCK];
                match engine.read_routed(0, b * BLOCK as u64, &mut buf).await {
                    Ok(()) => {
                        if let Err(e) = lock(&self.shared.model).check_read(b, &buf) {
                            self.shared.violate(format!("final read through n{n}: {e}"));
                            return;
                        }
                    }
                    Err(e) if self.both_media_failed() && e.message.contains("outdated") => {
                        // Two failures (each node's disk failed once): a range whose two
                        // media each miss some writes stays unreadable; nothing is lost.
                        self.note(format!(
                            "both own disks failed during the run: block {b} is not readable through n{n} ({})",
                            e.message
                        ));
                        break;
                    }
                    Err(e) => {
                        self.shared.violate(format!(
                            "liveness: final read of block {b} through n{n} failed after the faults ended: {}",
                            e.message
                        ));
                        return;
                    }
                }
            }
        }
        let mut drained = true;
        for n in 0..NODES {
            if let Some(run) = &self.nodes[n].run {
                drained &= run.engine.drain(Duration::from_secs(30)).await;
            }
        }
        if !drained {
            self.note("not every node drained within 30 s; the disk is not checked");
            return;
        }
        if self.s.own_storage {
            if !self.check_own_media() {
                return;
            }
        } else {
            for b in 0..self.s.lun_blocks {
                let data = self.disk.durable(b * BLOCK as u64, BLOCK);
                if let Err(e) = lock(&self.shared.model).check_read(b, &data) {
                    self.shared.violate(format!("the drained disk: {e}"));
                    return;
                }
            }
        }
        let st = lock(&self.shared.stats).clone();
        let local_reads = self
            .nodes
            .iter()
            .filter_map(|n| n.run.as_ref())
            .map(|r| r.engine.local_reads_served())
            .sum::<u64>()
            + self
                .shared
                .local_reads_ended
                .load(std::sync::atomic::Ordering::Relaxed);
        self.note(format!(
            "end: {} writes acknowledged, {} failed, {} lost in crashes; {} reads checked ({} served under a read lease), {} failed; {} faults, {} restarts; every block verified through both nodes and on the drained disk",
            st.writes_acked, st.writes_failed, st.writes_lost_in_crash, st.reads_checked, local_reads, st.reads_failed, st.faults, st.restarts
        ));
    }
}
