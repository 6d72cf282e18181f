//! A node daemon's life: open the engine (the NVRAM is replayed into the media BEFORE any
//! device is added or recovered, so no request can read or write around a staged record),
//! start the mirror link, serve every LUN as a ublk device and the control socket, tell
//! systemd when ready, and on SIGTERM/SIGINT stop the devices and drain to the medium.

use super::control_handler::ControlHandler;
use super::link::{shutdown_link, start_link, start_source_link};
use super::signals::{block_stop_signals, wait_for_stop_signal};
use crate::config::{NodeConfig, ShippingRole, TakeoverPolicy, WritePrioritySection};
use crate::control;
use crate::devices::DeviceSet;
use crate::engine::{Engine, OpenMode, WritePriorityPolicy};
use crate::frontend::DeviceSpec;
use crate::watchdog::Watchdog;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What `nvmirrord` is started with: its command line (here, not in the binary, so that
/// `nvmirrorctl` can write its man page and completions).
#[derive(clap::Parser, Debug)]
#[command(
    name = "nvmirrord",
    version,
    long_version = crate::release::long_version(),
    about = "nvmirror node daemon: NVRAM-staged, mirrored ublk block devices",
    after_help = "Exit codes: 0 stopped cleanly (SIGTERM/SIGINT, staged writes drained), 1 could not start or failed, 2 invalid config (the message names the field)"
)]
pub struct DaemonArgs {
    /// The node's TOML configuration.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Where device ids are remembered between runs (for crash recovery).
    #[arg(long, default_value = "/run/nvmirror")]
    pub state_dir: PathBuf,
}

/// Runs the node until a signal stops it (or every device stopped by itself).
pub fn run(args: DaemonArgs, cfg: NodeConfig) -> anyhow::Result<()> {
    let signals = block_stop_signals()?;
    // Which crc32c implementation this process uses (chosen at its first checksum, which may
    // have been the config check's): every role says it before touching NVRAM.
    tracing::info!("{}", rdma_link::checksum::choice());
    if cfg
        .shipping
        .as_ref()
        .is_some_and(|s| s.role == ShippingRole::Destination)
    {
        return super::destination::run(cfg, &config_path(&args), signals);
    }

    let config_path = config_path(&args);
    for warning in cfg.environment_warnings() {
        tracing::warn!("{warning}");
    }
    // Armed before the replay: from the first medium write on, a hung one resets the node.
    let watchdog = match cfg
        .cluster
        .as_ref()
        .and_then(|c| Some((c, c.watchdog.as_ref()?)))
    {
        Some((c, device)) => Some(
            Watchdog::arm(device, c.watchdog_timeout(), c.lease_timing().io_timeout)
                .map_err(|e| anyhow::anyhow!("cluster.watchdog: {e}"))?,
        ),
        None => None,
    };
    let engine = {
        let _replaying = StartNotifier::start();
        Engine::open_config(&cfg, &config_path, OpenMode::Normal)?
    };
    let replay = engine.status().replay;
    tracing::info!(
        node = cfg.node.name,
        "NVRAM ready: replayed {} record(s) ({} bytes) in {} ms{}",
        replay.records,
        replay.bytes,
        replay.millis,
        if replay.formatted {
            ", freshly formatted"
        } else {
            ""
        }
    );

    let link = match (&cfg.cluster, &cfg.shipping) {
        (Some(c), _) => Some(start_link(&cfg, c, &engine)?.0),
        (None, Some(s)) => Some(start_source_link(&cfg, s, &engine)?.0),
        (None, None) => None,
    };

    if let (Some(l), Some(s), None) = (&link, &cfg.shipping, &cfg.cluster) {
        // Before any device: the destination may have exported our volume (then another
        // node serves it), or be giving it back.
        // (Two heartbeat timeouts, as long as a batch waits out a blip, and at least 5 s:
        // a connection over RDMA takes seconds to set up on a loaded host.)
        let wait = (Duration::from_millis(s.heartbeat_timeout_ms) * 2).max(Duration::from_secs(5));
        super::ship_return::before_serving(&engine, l, wait)?;
        // And again at every reconnect: an export while we were cut off stops us then.
        super::ship_return::watch_volume(engine.clone(), l.clone())?;
    }
    if let (Some(l), Some(c)) = (&link, &cfg.cluster) {
        // Give a live partner a moment to connect, so that the kernel's first reads of the
        // new device (partition scan) can reach the partner's ranges.
        let deadline = std::time::Instant::now() + Duration::from_millis(c.heartbeat_timeout_ms);
        while !l.state().is_up() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let specs = cfg
        .luns
        .iter()
        .enumerate()
        .map(|(i, lun)| DeviceSpec {
            lun_index: i,
            lun_name: lun.name.clone(),
            node: cfg.node.name.clone(),
            size: engine.luns()[i].size,
            dev_id: lun.device_id,
            queues: lun.queues,
            depth: lun.queue_depth,
            pin_queues: lun.pin_queues,
            config_path: config_path.clone(),
            state_dir: args.state_dir.clone(),
        })
        .collect();
    let devices = DeviceSet::new(engine.clone(), specs);
    let socket = cfg.control_socket();
    let handler = Arc::new(ControlHandler {
        engine: engine.clone(),
        devices: devices.clone(),
        link: link.clone(),
        config_path: config_path.clone(),
        watchdog: watchdog.as_ref().map(|w| w.view()),
        grace: Duration::from_millis(
            cfg.cluster
                .as_ref()
                .map(|c| c.heartbeat_timeout_ms)
                .unwrap_or(0),
        ),
        write_priority: write_priority_on_request(&cfg),
    });
    let control = handler.clone();
    control::serve(
        &socket,
        Arc::new(move |req| control.handle(req)),
        crate::state_events::same_state,
    )
    .with_context(|| format!("control socket {}", socket.display()))?;
    if let Some(addr) = cfg.metrics_listen() {
        let engine = engine.clone();
        super::metrics::serve(
            addr,
            Arc::new(move || super::metrics::Scrape {
                status: handler.status(),
                latency: super::metrics::latency_of(&engine),
            }),
        )?;
    }

    for i in 0..cfg.luns.len() {
        devices.add(i)?;
    }

    // Wait for SIGTERM/SIGINT, or for every device to stop by itself.
    let sig_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_stop_signal(&signals))
        .context("spawning the signal thread")?;
    let mut ready = false;
    // systemd's WatchdogSec: petted while the engine answers a status snapshot (it takes the
    // locks the data path and the flusher share, so a deadlock there stops the petting).
    let watchdog_every = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut last_pet = std::time::Instant::now();
    loop {
        if sig_thread.is_finished() {
            break;
        }
        if watchdog_every.is_some_and(|every| last_pet.elapsed() >= every) {
            let _ = engine.status();
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                tracing::warn!("petting systemd's watchdog: {e}");
            }
            last_pet = std::time::Instant::now();
        }
        if devices.all_stopped_unexpectedly() {
            break;
        }
        if let Some(why) = engine.restart_wanted() {
            restart_by_exiting(&why);
        }
        let live: Vec<String> = devices
            .statuses()
            .iter()
            .map(|x| format!("{} on {}", x.lun, x.path))
            .collect();
        if !ready && live.len() == cfg.luns.len() {
            // systemd (Type=notify): replay is done and every device is live.
            ready = true;
            let status = format!("serving {}", live.join(", "));
            if let Err(e) = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]) {
                tracing::warn!("telling systemd we are ready: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let stop_signal = if sig_thread.is_finished() {
        sig_thread.join().ok().and_then(|r| r.ok())
    } else {
        None
    };
    let failed = match stop_signal {
        Some(sig) => {
            tracing::info!("{sig:?}: stopping devices, then draining staged writes to the medium");
            // I/O waiting for a takeover of the partner's ranges would hold the devices up.
            engine.stop_waiting_for_takeovers();
            devices.stop_all()
        }
        None => devices.join_all(),
    };
    if !engine.drain_blocking(Duration::from_secs(120)) {
        tracing::error!(
            "staged writes remain in the NVRAM; they will be replayed at the next start"
        );
    }
    // A clean stop with nothing staged gives the disk lease up: the partner may take over at
    // once instead of waiting for the heartbeat to die.
    let drained = engine.drain_blocking(Duration::ZERO);
    if let Some(lease) = engine.cluster().and_then(|c| c.lease()) {
        if drained && failed.is_none() {
            match lease.release() {
                Ok(()) => tracing::info!(
                    "{} released (clean stop, nothing staged)",
                    lease.place().lease()
                ),
                Err(e) => tracing::warn!("releasing the {}: {e}", lease.place().lease()),
            }
        }
    }
    engine.detach_mirror();
    if let Some(l) = link {
        shutdown_link(l);
    }
    engine.shutdown();
    let _ = std::fs::remove_file(&socket);
    // Every medium write has ended: stop the watchdog counting.
    drop(watchdog);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn config_path(args: &DaemonArgs) -> String {
    std::fs::canonicalize(&args.config)
        .unwrap_or_else(|_| args.config.clone())
        .display()
        .to_string()
}

/// Exit status of a daemon that stops so that its service manager starts it again
/// (`nvmirrord@.service` restarts on failure, the OCF agent's monitor restarts a crashed
/// daemon in place): EX_TEMPFAIL.
pub const EXIT_RESTART: i32 = 75;

/// Ends the process as a crash would: no drain, the disk lease kept, the ublk devices left
/// for the next start to recover (their I/O waits meanwhile), the watchdog (if armed) still
/// counting, so a medium write that hangs cannot outlive it. The next start replays the
/// NVRAM and serves what this one could not.
fn restart_by_exiting(why: &str) -> ! {
    tracing::error!(
        "{why}; exiting (status {EXIT_RESTART}) so that the service manager starts the daemon again: a start replays the NVRAM and serves the partition's ranges again (without a service manager, start it again or run nvmirrorctl recover)"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
        "restarting: an NVRAM partition was fenced",
    )]);
    std::process::exit(EXIT_RESTART)
}

/// Tells systemd what the start is doing while the NVRAM is replayed (before READY=1), and
/// extends the start timeout while it does: a large NVRAM replayed into a slow medium may
/// take longer than `TimeoutStartSec`. A replay stuck on a hung medium write is the
/// watchdog's business (`cluster.watchdog`), not the start timeout's.
struct StartNotifier {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StartNotifier {
    const EVERY: Duration = Duration::from_secs(10);

    fn start() -> StartNotifier {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("start-notify".into())
            .spawn(move || {
                let began = std::time::Instant::now();
                loop {
                    let status = format!(
                        "replaying the NVRAM into the media ({} s)",
                        began.elapsed().as_secs()
                    );
                    let _ = sd_notify::notify(&[
                        sd_notify::NotifyState::Status(&status),
                        sd_notify::NotifyState::ExtendTimeoutUsec(
                            (3 * Self::EVERY).as_micros() as u32
                        ),
                    ]);
                    if stopped.recv_timeout(Self::EVERY)
                        != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    {
                        return;
                    }
                }
            })
            .ok();
        StartNotifier {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for StartNotifier {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `nvmirrorctl write-priority on` may set on this node (the same rules as the config's
/// `[cluster.write_priority]`).
fn write_priority_on_request(cfg: &NodeConfig) -> Result<WritePriorityPolicy, String> {
    let Some(c) = &cfg.cluster else {
        return Err(
            "write priority moves ranges between cluster nodes: this node has no [cluster]".into(),
        );
    };
    if c.takeover == TakeoverPolicy::Manual {
        return Err("with takeover = \"manual\" the cluster manager (Pacemaker) decides where ranges are served: write priority stays off".into());
    }
    Ok(WritePriorityPolicy::from(
        c.write_priority
            .as_ref()
            .unwrap_or(&WritePrioritySection::default()),
    ))
}
