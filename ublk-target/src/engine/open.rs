//! Start-up: open the NVRAM and the media a config names, check what the NVRAM holds, replay
//! its staged records into the media, and start the background tasks. No I/O is served
//! before this is done.

use super::core::{
    Engine, EngineError, EngineOptions, OpenMode, OutOfSyncOptions, ReplayReport, Stopping,
};
use super::dropped_ranges::{forget_kept_ranges, kept_ranges_given_back, note_dropped_ranges};
use super::flush_context::NodeFlushContext;
use super::serving::ServingRight;
use super::takeover_state::{RestartSync, TakeoverState};
use super::unfinished_claims::{records_to_replay_for_dead_claimers, wait_for_claimers};
use crate::apply::{Applier, RecordWrite};
use crate::block::BLOCK_SIZE;
use crate::cluster::voter_arbiter::VoterArbiter;
use crate::cluster::{Cluster, ClusterSetup};
use crate::config::{DegradedPolicy, NodeConfig, StorageMode};
use crate::copy_fence::CopyFence;
use crate::flusher::{FlushPolicy, Flusher, FlusherStats};
use crate::log::{read_checkpoint, write_checkpoint, KeptReplay, LogStart, PartitionLog};
use crate::lun::{Lun, LunSpec};
use crate::medium::{FileMedium, Medium, MediumError};
use crate::mirror::{MirrorSlot, SecondStoreArea};
use crate::nvram::layout::{layout_text, SuperblockState, FORMAT_VERSION};
use crate::nvram::out_of_sync::{Fresh, LunMaps};
use crate::nvram::restart_sync_note::{self, RestartSyncNote};
use crate::nvram::scan::{scan_partition, ScanResult, ScannedRecord};
use crate::nvram::void::VoidMarks;
use crate::nvram::{Layout, NvramRegion, PartitionCheckpoint, Superblock};
use crate::ownership::{MediumTableStore, OwnershipTable, RangeOwner, METADATA_BYTES};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

impl Engine {
    /// Opens the NVRAM and media named in `cfg`, replays the log, starts the background
    /// tasks. No I/O should be accepted before this returns.
    pub fn open_config(
        cfg: &NodeConfig,
        config_path: &str,
        mode: OpenMode,
    ) -> Result<Arc<Engine>, EngineError> {
        if cfg
            .shipping
            .as_ref()
            .is_some_and(|s| s.role == crate::config::ShippingRole::Destination)
        {
            return Err(EngineError::Destination {
                path: cfg.nvram.path.clone(),
                config: config_path.to_owned(),
            });
        }
        let mut specs = Vec::new();
        // Each node its own media: the ownership table and the leases live on the arbiter.
        let own_storage = cfg
            .cluster
            .as_ref()
            .filter(|c| c.storage == StorageMode::Own);
        let mut table_at = match own_storage.and_then(|c| c.arbiter.as_ref()) {
            Some(arbiter) => {
                let size = FileMedium::open(arbiter, None)?.size();
                if size < METADATA_BYTES {
                    return Err(EngineError::ArbiterTooSmall {
                        path: arbiter.clone(),
                        size,
                        wanted: METADATA_BYTES,
                    });
                }
                Some((arbiter.clone(), 0))
            }
            None => None,
        };
        for lun in &cfg.luns {
            // A cluster keeps the ownership table at the end of the (shared) medium.
            let reserve = if cfg.cluster.is_some() && own_storage.is_none() {
                METADATA_BYTES
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
        let host = crate::host::system();
        let region = NvramRegion::open(&cfg.nvram.path, cfg.nvram.size.map(|s| s.0))?;
        tracing::info!(
            path = %region.path().display(),
            bytes = region.len(),
            "NVRAM mapped; durable by {}",
            region.durability().describe()
        );
        // Where the ownership table and the leases live: three voters, or a device (the
        // arbiter, or the end of the shared medium).
        let voters = own_storage.and_then(|c| Some((c, c.voters.as_ref()?)));
        let on_arbiter_device = own_storage.is_some_and(|c| c.arbiter.is_some());
        let table_store: Option<Arc<dyn crate::ownership::TableStore>> =
            match (voters, cfg.cluster_index(), table_at) {
                (Some((c, v)), Some(me), _) => Some(Arc::new(
                    VoterArbiter::open(c, v, me, config_path).map_err(EngineError::Voters)?,
                )),
                (None, _, Some((path, base))) => {
                    let store = MediumTableStore::open(&path, base).map_err(|source| {
                        EngineError::Medium(MediumError::Open {
                            path: path.clone(),
                            cause: source,
                        })
                    })?;
                    Some(Arc::new(if on_arbiter_device {
                        store.on_arbiter_device()
                    } else {
                        store
                    }))
                }
                _ => None,
            };
        let cluster = match (&cfg.cluster, cfg.cluster_index(), table_store) {
            (Some(c), Some(me), Some(store)) => {
                let initial = OwnershipTable {
                    cluster_id: c.id,
                    generation: 1,
                    luns: cfg
                        .luns
                        .iter()
                        .map(|l| {
                            l.range_owners(cfg.nvram.partitions, &c.nodes)
                                .into_iter()
                                .map(|owner| RangeOwner { owner, epoch: 1 })
                                .collect()
                        })
                        .collect(),
                };
                // Registered before the first heartbeat: with a registrants-only reservation
                // standing, an unregistered node cannot write even that. Registering grants
                // the device's permission only; what this node writes is still decided by
                // its lease and the ownership table.
                let reservations = register_reservations(cfg, c, me)?;
                let lease = acquire_lease(&host, store.clone(), c, me)?;
                let setup = ClusterSetup {
                    me,
                    nodes: c.nodes.iter().map(|n| n.name.clone()).collect(),
                    table_store: store,
                    initial,
                    lease: Some(lease),
                    link_timeout: Duration::from_millis(c.heartbeat_timeout_ms),
                    forward_wait: Duration::from_secs(c.forward_wait_s),
                    reservations,
                    storage: c.storage,
                };
                futures::executor::block_on(wait_for_claimers(&setup, &host));
                Some(setup)
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
                .or(cfg.shipping.as_ref().map(|s| s.degraded))
                .unwrap_or(DegradedPolicy::WriteThrough),
            cluster,
            config_path: config_path.to_owned(),
            out_of_sync: OutOfSyncOptions {
                resync_rate: cfg
                    .cluster
                    .as_ref()
                    .map(|c| c.resync_rate_mib_s.saturating_mul(1 << 20))
                    .filter(|&rate| rate > 0),
                ..Default::default()
            },
            host,
        };
        let engine = Engine::open(region, opts, specs)?;
        engine.set_write_priority(
            cfg.cluster
                .as_ref()
                .and_then(|c| c.write_priority.as_ref())
                .map(super::write_demand::WritePriorityPolicy::from),
        );
        engine
            .set_local_reads(cfg.cluster.as_ref().is_some_and(|c| c.local_reads_on()))
            .map_err(|e| EngineError::Io(std::io::Error::other(e)))?;
        Ok(engine)
    }

    /// Opens an engine over an already opened NVRAM region and media.
    pub fn open(
        region: NvramRegion,
        mut opts: EngineOptions,
        specs: Vec<LunSpec>,
    ) -> Result<Arc<Engine>, EngineError> {
        let started = opts.host.now();
        let region = Arc::new(region);
        let lun_shapes: Vec<(&str, u64, u32)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.size, s.ranges))
            .collect();
        let want_layout = layout_text(opts.partitions, opts.mirrored, &lun_shapes);
        let luns = Lun::all(specs);
        let path = region.path().to_owned();
        let config = opts.config_path.clone();

        // Ownership first: a restart replays only records of ranges this node still owns
        // (the partner replayed the others from its second store when it took them over).
        let cluster = match opts.cluster.take() {
            Some(setup) => {
                let c = Cluster::open(setup)
                    .map_err(|e| EngineError::Replay(format!("ownership table: {e}")))?;
                // Ranges our own medium misses writes of are read from the partner's.
                c.load_own_outdated().map_err(|e| {
                    EngineError::Replay(format!("the outdated-media marks on the arbiter: {e}"))
                })?;
                Some(Arc::new(c))
            }
            None => None,
        };
        // Each node its own medium: the out-of-sync maps live at the NVRAM's end.
        let oos_luns: Option<Vec<u64>> = cluster
            .as_ref()
            .filter(|c| c.own_storage())
            .map(|_| luns.iter().map(|l| l.size).collect());
        // What our log held at this start: our medium may hold these writes (replayed now,
        // or flushed before the stop) and the partner's not (docs/shared-nothing.md).
        let mut restart_extents: Vec<(u32, u64, u64)> = Vec::new();
        let mut restart_sync = (RestartSync::default(), Vec::new());
        // Ranges claimed from us by a node that died before replaying them: ours to replay.
        let claimed_unreplayed = cluster
            .as_ref()
            .map(|c| records_to_replay_for_dead_claimers(c))
            .unwrap_or_default();
        let mut first = vec![0u8; 4096];
        region.read_at(0, &mut first);
        // Ranges whose records were kept for this restart, given back to us since: stale.
        let given_back = match (&cluster, Superblock::decode(&first)) {
            (Some(c), SuperblockState::Valid(sb)) => kept_ranges_given_back(&region, &sb, c, &luns),
            _ => Vec::new(),
        };
        let owned = |lun: u32, offset: u64| -> bool {
            match (&cluster, luns.get(lun as usize)) {
                (Some(c), Some(l)) => {
                    let range = l.range_of(offset);
                    (c.owns(lun, range) && !given_back.contains(&(lun, range)))
                        || claimed_unreplayed.contains(&(lun, range))
                }
                _ => true,
            }
        };
        let mut report = ReplayReport::default();
        let blank = Superblock::decode(&first) == SuperblockState::Blank;
        if let Some(c) = cluster.as_ref().filter(|c| c.own_storage() && blank) {
            // A new NVRAM on a node that ran before: nothing knows what its medium missed.
            c.outdate_unknown_medium()
                .and_then(|_| c.load_own_outdated())
                .map_err(|e| {
                    EngineError::Replay(format!(
                        "marking a medium of unknown history outdated: {e}"
                    ))
                })?;
        } else if let Some(c) = cluster.as_ref().filter(|c| c.own_storage()) {
            c.note_ran().map_err(|e| {
                EngineError::Replay(format!("noting this node on the arbiter: {e}"))
            })?;
        }
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
            Some(sb) => 'existing: {
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
                    .any(|p| read_checkpoint(&region, &layout, p, sb.log_id).is_some());
                if !layout_ok {
                    // The superblock is intact but no partition has a checkpoint of its log:
                    // a format was interrupted after the checkpoints were rewritten. Format
                    // runs only on a blank device or after a replay, so nothing is staged.
                    tracing::warn!(
                        "NVRAM {}: an earlier format was interrupted; formatting again",
                        path.display()
                    );
                    report.formatted = true;
                    break 'existing format(
                        &region,
                        &opts,
                        &want_layout,
                        oos_luns.as_deref(),
                        false,
                    )?;
                }
                let scans = scan_all(&region, &sb, &config)?;
                restart_extents.extend(scans.iter().flat_map(|(_, s)| {
                    s.records
                        .iter()
                        .map(|r| (r.header.lun, r.header.offset, u64::from(r.header.len)))
                }));
                if let Some(c) = cluster.as_ref().filter(|c| c.own_storage()) {
                    let earlier: Vec<_> = (0..sb.partitions)
                        .map(|p| restart_sync_note::read(&region, &layout, p))
                        .collect();
                    let (sync, notes) = RestartSync::of_scans(c, &luns, &scans, &earlier);
                    if sb.layout != want_layout && !sync.ranges.is_empty() {
                        return Err(EngineError::Replay(format!(
                            "NVRAM {}: a restart sync is unfinished for range(s) {:?} (our medium is outdated for them and holds records the partner's medium may lack; docs/shared-nothing.md), and the config changes the NVRAM layout ({} -> {want_layout}), which would forget it: start nvmirrord with the old config until `nvmirrorctl status` shows the ranges serving, then change it",
                            path.display(),
                            sync.ranges,
                            sb.layout
                        )));
                    }
                    // Durable before the log advances past the replayed records.
                    write_restart_sync_notes(&region, &layout, &earlier, &notes)?;
                    restart_sync = (sync, notes);
                }
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
                if let Some(c) = &cluster {
                    note_dropped_ranges(&region, &sb, c, &luns, &scans, &owned)?;
                }
                // Records name their LUN by index; a layout change with an empty log is fine.
                replay(&region, &sb, &scans, &luns, &owned, &mut report)?;
                if sb.layout != want_layout || report.salvaged_from_corruption {
                    tracing::info!(
                        "reformatting NVRAM {} for layout {want_layout}",
                        path.display()
                    );
                    report.formatted = true;
                    let (sb, starts) =
                        format(&region, &opts, &want_layout, oos_luns.as_deref(), false)?;
                    // A salvage keeps the layout: the notes mean the same after it.
                    write_restart_sync_notes(&region, &Layout::of(&sb), &[], &restart_sync.1)?;
                    (sb, starts)
                } else {
                    let keep: Vec<u32> = restart_sync.0.through.iter().map(|&(p, _)| p).collect();
                    let starts = restart_points(&region, &sb, &scans, &keep)?;
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
                format(&region, &opts, &want_layout, oos_luns.as_deref(), blank)?
            }
        };
        // The log moved past the records kept for this restart (replayed or dropped).
        forget_kept_ranges(&region, &sb)?;
        Engine::finish_open(
            region,
            opts,
            luns,
            cluster,
            (sb, starts),
            (restart_extents, restart_sync.0),
            report,
            started,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_open(
        region: Arc<NvramRegion>,
        opts: EngineOptions,
        luns: Vec<Arc<Lun>>,
        cluster: Option<Arc<Cluster>>,
        (sb, starts): (Superblock, Vec<LogStart>),
        (restart_extents, restart_sync): (Vec<(u32, u64, u64)>, RestartSync),
        mut report: ReplayReport,
        started: Instant,
    ) -> Result<Arc<Engine>, EngineError> {
        let host = opts.host.clone();
        report.millis = host.now().saturating_duration_since(started).as_millis() as u64;

        let layout = Layout::of(&sb);
        let parts: Vec<Arc<PartitionLog>> = starts
            .into_iter()
            .enumerate()
            .map(|(p, start)| {
                PartitionLog::new(
                    p as u32,
                    region.clone(),
                    layout,
                    sb.log_id,
                    start,
                    host.clone(),
                )
            })
            .collect();

        let second_store = SecondStoreArea::new(region.clone(), layout);
        let dropped_during_resync = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let out_of_sync = open_out_of_sync_maps(&region, &sb, &opts, cluster.as_deref(), &luns)?;
        if let Some(maps) = &out_of_sync {
            // Before anything runs: our log's writes of the last run and the partner's
            // copies we hold may be on one medium only.
            let held = second_store
                .as_ref()
                .map(|ss| ss.held_extents(&|_, _| true))
                .unwrap_or_default();
            for &(lun, offset, len) in restart_extents.iter().chain(&held) {
                maps.mark(lun, offset, len);
            }
            maps.persist().map_err(|e| {
                EngineError::Replay(format!("persisting the out-of-sync maps: {e}"))
            })?;
        }
        if let (Some(ss), Some(c)) = (&second_store, cluster.clone().filter(|c| c.own_storage())) {
            // A mirror copy dropped before it reached our medium leaves our medium outdated,
            // unless it is written first: it is where the partner's own medium misses the
            // range (its writes failed), since ours must then hold every write.
            let write_first = {
                let (c, luns) = (c.clone(), luns.clone());
                Box::new(move |copies: &[(u32, u64)]| -> Vec<bool> {
                    let theirs = c.outdated_ranges(c.partner()).unwrap_or_default();
                    copies
                        .iter()
                        .map(|&(lun, offset)| {
                            let Some(r) = luns.get(lun as usize).map(|l| l.range_of(offset)) else {
                                return false;
                            };
                            c.state(lun, r) == crate::cluster::RangeState::Remote(c.partner())
                                && theirs.contains(&(lun, r))
                        })
                        .collect()
                })
            };
            let own_luns = Arc::new(luns.clone());
            let luns = luns.clone();
            let maps = out_of_sync.clone();
            let dropped_ranges = dropped_during_resync.clone();
            let mark = Box::new(move |dropped: Option<&[(u32, u64, u64)]>| {
                // Only ranges we do not serve. Of a range we own, every write goes through
                // us: the partner's copies are from before our takeover (which replayed them)
                // or staged by it unaware that the range had moved (never acknowledged, and
                // never to be written). Copies whose header a newer record overwrote (None):
                // the partner released them, which it does only once we wrote them or it
                // marked us outdated; marked again, to be safe.
                let not_ours =
                    |&(l, r): &(u32, u32)| c.state(l, r) != crate::cluster::RangeState::Local;
                let range_of =
                    |lun: u32, off: u64| Some((lun, luns.get(lun as usize)?.range_of(off)));
                let mut ranges: Vec<(u32, u32)> = match dropped {
                    Some(d) => d
                        .iter()
                        .filter_map(|&(lun, off, _)| range_of(lun, off))
                        .filter(not_ours)
                        .collect(),
                    None => luns
                        .iter()
                        .enumerate()
                        .flat_map(|(l, lun)| (0..lun.ranges).map(move |r| (l as u32, r)))
                        .filter(not_ours)
                        .collect(),
                };
                ranges.sort_unstable();
                ranges.dedup();
                if ranges.is_empty() {
                    return Ok(());
                }
                if let Some(maps) = &maps {
                    match dropped {
                        Some(d) => d
                            .iter()
                            .filter(|&&(lun, off, _)| {
                                range_of(lun, off).is_some_and(|r| not_ours(&r))
                            })
                            .for_each(|&(lun, off, len)| maps.mark(lun, off, len)),
                        None => {
                            for &(l, r) in &ranges {
                                if let Some(lun) = luns.get(l as usize) {
                                    let (start, end) = lun.range_span(r);
                                    maps.mark(l, start, end - start);
                                }
                            }
                        }
                    }
                    maps.persist()
                        .map_err(|e| format!("persisting the out-of-sync maps: {e}"))?;
                }
                c.mark_outdated(c.me, &ranges).map_err(|e| e.to_string())?;
                dropped_ranges
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ranges);
                Ok(())
            });
            ss.keep_own_medium(crate::mirror::OwnMedium {
                mark,
                write_first,
                luns: own_luns,
            });
        }
        let mirror = Arc::new(MirrorSlot::new(opts.degraded));
        let serving = Arc::new(ServingRight::new(
            host.clone(),
            cluster.clone(),
            mirror.clone(),
        ));
        let part_count = parts.len();
        let engine = Arc::new(Engine {
            host,
            node: opts.node_name,
            cluster,
            takeover: TakeoverState::default(),
            mirror,
            second_store,
            out_of_sync,
            dropped_during_resync,
            resyncs_begun: Mutex::default(),
            restart_sync: Mutex::new(restart_sync),
            copy_fence: CopyFence::new(),
            resync_rate: opts.out_of_sync.resync_rate.unwrap_or(0).into(),
            region,
            sb,
            parts,
            luns: Arc::new(luns.clone()),
            flusher_stats: Arc::new(FlusherStats::default()),
            tasks: Mutex::new(Vec::new()),
            replay: report,
            serving,
            stopping: Arc::default(),
            ship_lag: Arc::new(super::ship_lag::ShipLag::new(part_count)),
            write_demand: super::write_demand::WriteDemand::new(started, &luns),
        });
        engine.hold_restart_sync();
        engine
            .finish_noted_takeover()
            .map_err(EngineError::Replay)?;
        engine.start_tasks(opts.flush)?;
        engine.follow_the_lease()?;
        Ok(engine)
    }

    /// One persister (the group-commit backstop) and one flusher per partition.
    fn start_tasks(&self, policy: FlushPolicy) -> Result<(), EngineError> {
        let context = Arc::new(NodeFlushContext {
            cluster: self.cluster.clone(),
            luns: self.luns.clone(),
            mirror: self.mirror.clone(),
            log_id: self.sb.log_id,
            partitions: self.parts.len(),
            delegate: self.takeover.delegate_slot(),
            serving: self.serving.clone(),
            out_of_sync: self.out_of_sync.clone(),
            partner_misses: Default::default(),
            copy_fence: self
                .cluster
                .as_ref()
                .filter(|c| c.own_storage())
                .map(|_| self.copy_fence.clone()),
            host: self.host.clone(),
            part_size: self.sb.part_size,
            ship_lag: self.ship_lag.clone(),
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for part in &self.parts {
            let p = part.clone();
            let persister = Box::pin(async move { p.run_persister().await });
            tasks.push(
                self.host
                    .spawn(&format!("persist-{}", part.id), persister)?,
            );
            let flusher = Flusher {
                log: part.clone(),
                luns: self.luns.clone(),
                policy,
                stats: self.flusher_stats.clone(),
                context: context.clone(),
                host: self.host.clone(),
            };
            tasks.push(
                self.host
                    .spawn(&format!("flush-{}", part.id), Box::pin(flusher.run()))?,
            );
        }
        Ok(())
    }

    /// On a cluster with a disk lease: starts [`follow_lease`].
    fn follow_the_lease(self: &Arc<Self>) -> Result<(), EngineError> {
        let Some(lease) = self.cluster.as_ref().and_then(|c| c.lease()) else {
            return Ok(());
        };
        let follow = follow_lease(
            lease.clone(),
            Arc::downgrade(self),
            self.serving.clone(),
            self.host.clone(),
            self.stopping.clone(),
        );
        let task = self.host.spawn("lease-follow", Box::pin(follow))?;
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(())
    }
}

/// Follows the disk lease: re-reads the ownership table each time the lease is held again
/// (another node may have taken our ranges while we did not hold it; until then this node
/// serves nothing, see `Cluster::table_is_current`), and notes the mirror connection
/// trusted while it holds.
/// The engine is held weakly (it owns this task): the task ends with it.
async fn follow_lease(
    lease: Arc<crate::lease::DiskLease>,
    engine: std::sync::Weak<Engine>,
    serving: Arc<ServingRight>,
    host: Arc<dyn crate::host::Host>,
    stopping: Arc<Stopping>,
) {
    let mut failed_during = None;
    while !stopping.is_set() {
        let Some(cluster) = engine.upgrade().and_then(|e| e.cluster.clone()) else {
            return;
        };
        if lease.holds() && !cluster.table_is_current() {
            let reloaded = match engine.upgrade() {
                Some(e) => e.reload_ownership().await,
                None => return,
            };
            match reloaded {
                Ok(()) if cluster.table_is_current() => tracing::warn!(
                    "{} held again: the ownership table was re-read before serving",
                    lease.place().lease()
                ),
                Ok(()) => {}
                Err(e) if failed_during != Some(lease.acquisitions()) => {
                    failed_during = Some(lease.acquisitions());
                    tracing::error!(
                        "re-reading the ownership table after regaining the disk lease (this node serves nothing until it can): {e}"
                    )
                }
                Err(_) => {}
            }
        }
        serving.refresh();
        let changed = std::pin::pin!(lease.changed());
        let stop = std::pin::pin!(stopping.wait());
        let tick = futures::future::select(changed, host.sleep(lease.timing().renew));
        futures::future::select(stop, tick).await;
    }
}

/// With `cluster.reservations = "scsi3"`: registers this node's key with every LUN's medium
/// (before anything is written there) and makes sure a "registrants only" reservation
/// stands.
fn register_reservations(
    cfg: &crate::config::NodeConfig,
    c: &crate::config::ClusterSection,
    me: u32,
) -> Result<Vec<crate::reservation::Reservation>, EngineError> {
    if c.reservations != crate::config::ReservationMode::Scsi3 {
        return Ok(Vec::new());
    }
    let key = crate::reservation::key_of(c.id, me);
    let mut paths: Vec<&std::path::Path> = cfg.luns.iter().map(|l| l.medium.as_path()).collect();
    paths.sort();
    paths.dedup();
    let mut out = Vec::new();
    for path in paths {
        let r = crate::reservation::Reservation::open(path, key)
            .and_then(|r| r.register_and_reserve().map(|()| r))
            .map_err(|e| {
                EngineError::Reservation(format!(
                    "cluster.reservations = \"scsi3\": registering key {key:#018x} with {} failed: {e}; use a SCSI medium that supports persistent reservations, or set reservations = \"none\"",
                    path.display()
                ))
            })?;
        tracing::info!(
            "persistent reservation: key {key:#018x} registered with {} ({:?})",
            path.display(),
            r.status()
        );
        out.push(r);
    }
    Ok(out)
}

/// Starts renewing this node's disk heartbeat and waits until the lease is held: only then
/// is the ownership table the truth (see `lease`), and the start-up replay may write the
/// medium.
fn acquire_lease(
    host: &Arc<dyn crate::host::Host>,
    store: Arc<dyn crate::ownership::TableStore>,
    c: &crate::config::ClusterSection,
    me: u32,
) -> Result<Arc<crate::lease::DiskLease>, EngineError> {
    let timing = c.lease_timing();
    let lease = crate::lease::DiskLease::new(
        host.clone(),
        store,
        c.id,
        me,
        c.nodes.len() as u32,
        timing,
        rand::random::<u64>() | 1,
    );
    host.spawn("disk-lease", Box::pin(lease.clone().run()))?;
    let on_voters = c.voters.is_some() && c.storage == crate::config::StorageMode::Own;
    tracing::info!(
        "acquiring the {}: heartbeats on {} for {:?} before serving",
        lease.place().lease(),
        lease.place().name(),
        timing.settle()
    );
    let limit = timing.settle() + timing.renew * 5 + timing.io_timeout * 2;
    let acquired = futures::executor::block_on(async {
        let held = std::pin::pin!(lease.acquired());
        matches!(
            futures::future::select(held, host.sleep(limit)).await,
            futures::future::Either::Left(_)
        )
    });
    if !acquired && on_voters {
        return Err(EngineError::VoterLease(format!(
            "no lease within {limit:?}: {}",
            lease
                .status()
                .last_error
                .unwrap_or_else(|| "the heartbeat writes did not complete".into())
        )));
    }
    if !acquired {
        return Err(EngineError::Lease {
            place: lease.place(),
            why: format!(
                "no disk lease within {limit:?}: {}",
                lease
                    .status()
                    .last_error
                    .unwrap_or_else(|| "the heartbeat writes did not complete".into())
            ),
        });
    }
    Ok(lease)
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

/// Writes every scanned record of a range we own into its medium, in sequence order per
/// partition, and syncs.
fn replay(
    region: &NvramRegion,
    sb: &Superblock,
    scans: &[(PartitionCheckpoint, ScanResult)],
    luns: &[Arc<Lun>],
    owned: &dyn Fn(u32, u64) -> bool,
    report: &mut ReplayReport,
) -> Result<(), EngineError> {
    let layout = Layout::of(sb);
    let mut applier = Applier::new(luns);
    for (p, (_, scan)) in scans.iter().enumerate() {
        report.discarded_unacknowledged += scan.discarded_tail;
        if scan.discarded_tail > 0 {
            tracing::warn!(
                partition = p,
                "dropping {} record(s) at the log tail that were never acknowledged (the node stopped while writing them)",
                scan.discarded_tail
            );
        }
        let payload_of = |r: &ScannedRecord| {
            let at = layout.partition_base(p as u32) + r.data_pos();
            region.slice(at, r.header.data_len as usize)
        };
        // Records of a range this node lost after staging them are dead (`nvram::void`).
        let dead = VoidMarks::of_records(scan.records.iter().map(|r| (&r.header, payload_of(r))));
        for r in &scan.records {
            let h = &r.header;
            if !owned(h.lun, h.offset) {
                report.skipped_not_owned += 1;
                continue;
            }
            if dead.covers(h.lun, h.offset, h.len as u64, h.seq) {
                report.skipped_dead += 1;
                continue;
            }
            let at = layout.partition_base(p as u32) + r.data_pos();
            applier
                .apply(&RecordWrite {
                    partition: p as u32,
                    seq: h.seq,
                    kind: h.kind,
                    lun: h.lun,
                    offset: h.offset,
                    len: h.len as u64,
                    data: region.slice(at, h.data_len as usize),
                })
                .map_err(|e| EngineError::Replay(e.to_string()))?;
        }
    }
    let applied = applier
        .sync()
        .map_err(|e| EngineError::Replay(e.to_string()))?;
    report.records += applied.records;
    report.bytes += applied.bytes;
    if report.skipped_not_owned > 0 {
        tracing::warn!(
            "{} staged record(s) belong to ranges the partner took over; it replayed them from its mirror, so they are not replayed here",
            report.skipped_not_owned
        );
    }
    if report.skipped_dead > 0 {
        tracing::warn!(
            "{} staged record(s) belong to ranges this node lost after staging them (void records); not replayed",
            report.skipped_dead
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
/// Writes this start's restart sync notes (`notes`, per partition) and clears those of
/// `earlier` (what the NVRAM held) no longer needed.
fn write_restart_sync_notes(
    region: &NvramRegion,
    layout: &Layout,
    earlier: &[Option<RestartSyncNote>],
    notes: &[Option<RestartSyncNote>],
) -> Result<(), EngineError> {
    for p in 0..notes.len().max(earlier.len()) {
        let note = notes.get(p).and_then(|n| n.as_ref());
        let was = earlier.get(p).and_then(|n| n.as_ref());
        if note.is_some() || was.is_some() {
            restart_sync_note::write(region, layout, p as u32, note).map_err(|e| {
                EngineError::Replay(format!(
                    "writing the restart sync note of partition {p}: {e}"
                ))
            })?;
        }
    }
    Ok(())
}

/// Where each partition's log goes on after the start's replay: past the replayed records,
/// except in the partitions of `keep` (a restart sync waits for the partner's medium, see
/// `engine::restart_sync`), whose logs keep them ([`KeptReplay`]).
fn restart_points(
    region: &NvramRegion,
    sb: &Superblock,
    scans: &[(PartitionCheckpoint, ScanResult)],
    keep: &[u32],
) -> Result<Vec<LogStart>, EngineError> {
    let layout = Layout::of(sb);
    let mut starts = Vec::new();
    for (p, (cp, scan)) in scans.iter().enumerate() {
        // Skip over the seqs of a discarded tail so its leftovers never look current.
        let next_seq = scan.next_seq.max(scan.max_seq_seen + 1);
        // Kept records and the new ones must follow each other seq by seq (a scan stops at
        // a gap), so not after a discarded tail: the restart sync note covers that case.
        let kept =
            (keep.contains(&(p as u32)) && next_seq == scan.next_seq && !scan.records.is_empty())
                .then(|| {
                    let bytes = (scan.next_pos + layout.part_size - cp.tail_off) % layout.part_size;
                    KeptReplay {
                        tail: cp.tail_off,
                        tail_seq: cp.tail_seq,
                        // A log the records filled whole ends where it began.
                        bytes: if bytes == 0 { layout.part_size } else { bytes },
                        end_seq: next_seq,
                    }
                });
        let new = PartitionCheckpoint {
            partition: p as u32,
            log_id: sb.log_id,
            generation: cp.generation + 1,
            tail_off: kept.map_or(scan.next_pos, |k| k.tail),
            tail_seq: kept.map_or(next_seq, |k| k.tail_seq),
        };
        write_checkpoint(region, &layout, &new)?;
        starts.push(LogStart {
            pos: scan.next_pos,
            next_seq,
            checkpoint_generation: new.generation,
            kept,
        });
    }
    Ok(starts)
}

/// Formats the NVRAM: checkpoints, the out-of-sync maps (`oos_luns`: the LUN sizes, with
/// `storage = "own"`) at the end, then the superblock.
/// The out-of-sync maps of a node with its own medium (None otherwise, or when the NVRAM was
/// formatted without them: then every resync copies whole ranges).
fn open_out_of_sync_maps(
    region: &Arc<NvramRegion>,
    sb: &Superblock,
    opts: &EngineOptions,
    cluster: Option<&Cluster>,
    luns: &[Arc<Lun>],
) -> Result<Option<Arc<LunMaps>>, EngineError> {
    if !cluster.is_some_and(|c| c.own_storage()) {
        return Ok(None);
    }
    let sizes: Vec<u64> = luns.iter().map(|l| l.size).collect();
    let fits = sb
        .oos_offset
        .checked_add(LunMaps::nvram_bytes(&sizes, opts.out_of_sync.region_bytes))
        .is_some_and(|end| end <= region.len());
    if sb.oos_offset == 0 || !fits {
        tracing::warn!(
            "NVRAM {}: no room for out-of-sync maps (formatted without them): every resync copies whole ranges; `nvmirrorctl nvram format` (daemon stopped, log drained) adds them",
            region.path().display()
        );
        return Ok(None);
    }
    LunMaps::open(
        region.clone(),
        sb.oos_offset,
        &sizes,
        opts.out_of_sync.region_bytes,
    )
    .map(|m| Some(Arc::new(m)))
    .map_err(|e| EngineError::Replay(format!("opening the out-of-sync maps: {e}")))
}

/// `blank`: the NVRAM held no log before (`OutOfSyncOptions::first_format` applies).
fn format(
    region: &Arc<NvramRegion>,
    opts: &EngineOptions,
    layout_desc: &str,
    oos_luns: Option<&[u64]>,
    blank: bool,
) -> Result<(Superblock, Vec<LogStart>), EngineError> {
    let region_bytes = opts.out_of_sync.region_bytes;
    let fresh = if blank {
        opts.out_of_sync.first_format
    } else {
        Fresh::OutOfSync
    };
    let oos_bytes = oos_luns.map_or(0, |l| LunMaps::nvram_bytes(l, region_bytes));
    let layout = Layout::compute(
        region.len().saturating_sub(oos_bytes),
        opts.partitions,
        opts.mirrored,
    )
    .ok_or(EngineError::TooSmall {
        path: region.path().to_owned(),
        size: region.len(),
        partitions: opts.partitions,
    })?;
    let oos_offset = if oos_luns.is_some() { layout.end() } else { 0 };
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
        oos_offset,
    };
    // Checkpoints first, superblock last: a crash in between leaves the old superblock
    // (whose log_id the new checkpoints do not match) or a blank device, never a mix.
    let mut starts = Vec::new();
    for p in 0..layout.partitions {
        let blank = [0u8; PartitionCheckpoint::SLOT_BYTES as usize];
        // Slot 1: the log's other checkpoint; 2 and 3: the second store's watermark of the
        // partner's log (forgotten: a fresh format holds none of the partner's records).
        // Slot 4 (partition 0's): a takeover note (`nvram::takeover_note`), none after a format;
        // slot 5: a restart sync note (`nvram::restart_sync_note`), rewritten by the caller.
        // Slots 6 and 7 (partition 0's) stay: a format after a replay keeps the note of the
        // ranges whose records it dropped (`nvram::range_epochs_note`).
        for slot in 1..6 {
            region.write_at(layout.checkpoint_offset(p, slot), &blank);
            region.persist(
                layout.checkpoint_offset(p, slot),
                PartitionCheckpoint::SLOT_BYTES,
            )?;
        }
        let cp = PartitionCheckpoint {
            partition: p,
            log_id: sb.log_id,
            generation: 0,
            tail_off: 0,
            tail_seq: 1,
        };
        write_checkpoint(region, &layout, &cp)?;
        starts.push(LogStart {
            pos: 0,
            next_seq: 1,
            checkpoint_generation: 0,
            kept: None,
        });
    }
    if let Some(sizes) = oos_luns {
        LunMaps::format(region.clone(), oos_offset, sizes, region_bytes, fresh)
            .map_err(|e| EngineError::Replay(format!("formatting the out-of-sync maps: {e}")))?;
    }
    region.write_at(0, &sb.encode());
    region.persist(0, 4096)?;
    Ok((sb, starts))
}
