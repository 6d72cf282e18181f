//! nvmirrord: serves a node's LUNs as ublk block devices.
//!
//! Start-up order matters: the NVRAM log is replayed into the media BEFORE any device is
//! added or recovered, so no request can read or write around a staged record.

use anyhow::Context;
use clap::Parser;
use nvmirror::config::NodeConfig;
use nvmirror::control::{self, DaemonStatus, Request, Response};
use nvmirror::devices::DeviceSet;
use nvmirror::engine::{Engine, OpenMode, RangesToMove};
use nvmirror::frontend::DeviceSpec;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "nvmirror node daemon: NVRAM-staged ublk block devices"
)]
struct Args {
    /// The node's TOML configuration.
    #[arg(long, short)]
    config: PathBuf,
    /// Where device ids are remembered between runs (for crash recovery).
    #[arg(long, default_value = "/run/nvmirror")]
    state_dir: PathBuf,
}

/// Exit codes (documented in the README).
const EXIT_CONFIG: i32 = 2;
const EXIT_START: i32 = 1;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nvmirrord: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Err(e) = run(args, cfg) {
        eprintln!("nvmirrord: {e:#}");
        std::process::exit(EXIT_START);
    }
}

fn run(args: Args, cfg: NodeConfig) -> anyhow::Result<()> {
    // Signals are taken by one thread with sigwait; block them before any thread starts.
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;

    let config_path = std::fs::canonicalize(&args.config)
        .unwrap_or_else(|_| args.config.clone())
        .display()
        .to_string();
    for warning in cfg.environment_warnings() {
        tracing::warn!("{warning}");
    }
    let engine = Engine::open_config(&cfg, &config_path, OpenMode::Normal)?;
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

    let link = match &cfg.cluster {
        Some(c) => Some(start_mirroring(&cfg, c, &engine)?),
        None => None,
    };

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
            config_path: config_path.clone(),
            state_dir: args.state_dir.clone(),
        })
        .collect();
    let devices = DeviceSet::new(engine.clone(), specs);
    let socket = cfg.control_socket();
    {
        let (engine, devices, config_path) = (engine.clone(), devices.clone(), config_path.clone());
        let (link, grace) = (
            link.clone(),
            Duration::from_millis(
                cfg.cluster
                    .as_ref()
                    .map(|c| c.heartbeat_timeout_ms)
                    .unwrap_or(0),
            ),
        );
        let handler = move |req: Request| -> Response {
            match req {
                Request::Status => Response::Status(Box::new(DaemonStatus {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    config: config_path.clone(),
                    devices: devices.statuses(),
                    engine: engine.status(),
                })),
                Request::FlushPause => {
                    engine.set_flush_paused(true);
                    tracing::warn!("flusher paused by nvmirrorctl");
                    Response::Ok
                }
                Request::FlushResume => {
                    engine.set_flush_paused(false);
                    tracing::info!("flusher resumed by nvmirrorctl");
                    Response::Ok
                }
                Request::Takeover { force, ref ranges } => {
                    let Some(c) = engine.cluster() else {
                        return Response::Error {
                            message: "this node is not in a cluster".into(),
                        };
                    };
                    if link.as_ref().is_some_and(|l| l.state().is_up()) && !force {
                        return Response::Error {
                            message: "the partner is reachable: taking over now would give two owners \
                                      the same ranges; stop it first, or use --force if it is fenced"
                                .into(),
                        };
                    }
                    let peer = 1 - c.me;
                    let only = match parse_ranges(&engine, ranges) {
                        Ok(o) => o,
                        Err(message) => return Response::Error { message },
                    };
                    match engine.take_over_ranges(peer, only.as_deref(), grace) {
                        Ok(_) => Response::Ok,
                        Err(message) => Response::Error { message },
                    }
                }
                Request::Giveback { timeout_secs } | Request::Handover { timeout_secs } => {
                    let which = if matches!(req, Request::Giveback { .. }) {
                        RangesToMove::PartnersRanges
                    } else {
                        RangesToMove::OwnRanges
                    };
                    let Some(l) = link.as_ref().filter(|l| l.state().is_up()) else {
                        return Response::Error {
                            message: "the partner is not connected: no one to hand ranges to"
                                .into(),
                        };
                    };
                    let l = l.clone();
                    let tell = move || {
                        use nvmirror::cluster::wire;
                        let req = wire::encode(wire::OP_RELOAD_OWNERSHIP, 0, 0, 0, &[]);
                        let answer = futures::executor::block_on(l.request(req))
                            .map_err(|e| e.to_string())?;
                        wire::answer(&answer).map(|_| ())
                    };
                    match engine.give_back(which, Duration::from_secs(timeout_secs), tell) {
                        Ok(_) => Response::Ok,
                        Err(message) => Response::Error { message },
                    }
                }
                Request::AddDevice { ref lun } | Request::DelDevice { ref lun } => {
                    let Some(i) = devices.lun_index(lun) else {
                        return Response::Error {
                            message: format!("no LUN named {lun:?} in {config_path}"),
                        };
                    };
                    let done = if matches!(req, Request::AddDevice { .. }) {
                        devices.add(i).and_then(|_| {
                            let deadline = std::time::Instant::now() + Duration::from_secs(30);
                            while !devices.statuses().iter().any(|d| &d.lun == lun) {
                                if std::time::Instant::now() > deadline {
                                    anyhow::bail!("the device of LUN {lun} did not come up within 30 s; see the daemon log");
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            Ok(())
                        })
                    } else {
                        devices.del(i, Duration::from_secs(30)).map(|_| ())
                    };
                    match done {
                        Ok(()) => Response::Ok,
                        Err(e) => Response::Error {
                            message: format!("{e:#}"),
                        },
                    }
                }
                Request::Drain { timeout_secs } => {
                    if engine.drain(Duration::from_secs(timeout_secs)) {
                        Response::Ok
                    } else {
                        Response::Error {
                            message: format!(
                                "staged writes did not reach the medium within {timeout_secs} s \
                                 (flusher paused or medium failing? see status)"
                            ),
                        }
                    }
                }
            }
        };
        control::serve(&socket, Arc::new(handler))
            .with_context(|| format!("control socket {}", socket.display()))?;
    }

    for i in 0..cfg.luns.len() {
        devices.add(i)?;
    }

    // Wait for SIGTERM/SIGINT, or for every device to stop by itself.
    let sig_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || signals.wait())
        .context("spawning the signal thread")?;
    let mut ready = false;
    loop {
        if sig_thread.is_finished() {
            break;
        }
        if devices.all_stopped_unexpectedly() {
            break;
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
            devices.stop_all()
        }
        None => devices.join_all(),
    };
    if !engine.drain(Duration::from_secs(120)) {
        tracing::error!(
            "staged writes remain in the NVRAM; they will be replayed at the next start"
        );
    }
    engine.detach_mirror();
    if let Some(l) = link {
        shutdown_link(l);
    }
    engine.shutdown();
    let _ = std::fs::remove_file(&socket);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Connects to the partner and starts mirroring; watches the link and takes over the
/// partner's ranges when it goes silent (with `takeover = "auto"`).
fn start_mirroring(
    cfg: &NodeConfig,
    c: &nvmirror::config::ClusterSection,
    engine: &Arc<Engine>,
) -> anyhow::Result<rdma_link::Link> {
    use nvmirror::config::{TakeoverPolicy, TransportKind};
    let secret = std::fs::read(&c.secret_file)
        .with_context(|| format!("reading cluster.secret_file {}", c.secret_file.display()))?;
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        anyhow::bail!(
            "cluster.secret_file {}: the secret must be at least 16 bytes (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            c.secret_file.display()
        );
    }
    let me = cfg
        .cluster_index()
        .context("node.name is not in [[cluster.node]]")?;
    let peer = 1 - me;
    let first: std::net::SocketAddr = c.nodes[0]
        .address
        .parse()
        .context("cluster.node[0].address")?;
    let role = if me == 0 {
        rdma_link::Role::Listen(first)
    } else {
        rdma_link::Role::Connect(first)
    };
    let transport = match c.transport {
        TransportKind::Tcp => rdma_link::Transport::Tcp,
        TransportKind::Rdma => rdma_link::Transport::Rdma,
    };
    let mut lc = rdma_link::LinkConfig::new(transport, role, c.id, me + 1, peer + 1, &secret);
    lc.heartbeat_interval = Duration::from_millis(c.heartbeat_interval_ms);
    lc.heartbeat_timeout = Duration::from_millis(c.heartbeat_timeout_ms);
    lc.busy_poll = Duration::from_micros(c.busy_poll_us);
    let store: Arc<dyn rdma_link::SecondStore> = engine
        .second_store()
        .context("the NVRAM has no second store (format it for a cluster)")?;
    // Requests the partner forwards to us: I/O to ranges we own.
    let served = engine.clone();
    let handler: Arc<dyn rdma_link::RequestHandler> = Arc::new(move |req: rdma_link::Bytes| {
        let engine = served.clone();
        async move { rdma_link::Bytes::from(serve_forwarded(engine, req).await) }
    });
    let link =
        rdma_link::Link::start_with_handler(lc, Some(engine.local_region()), Some(store), handler)
            .map_err(|e| anyhow::anyhow!("starting the mirror link: {e}"))?;
    engine.attach_mirror(Arc::new(link.clone()));
    if let Some(c) = engine.cluster() {
        // I/O for the partner's ranges goes to it as requests over the link.
        let to_partner = link.clone();
        c.set_forwarder(Some(Arc::new(nvmirror::cluster::RequestForwarder(
            move |req: Vec<u8>| -> nvmirror::cluster::ForwardFuture<Vec<u8>> {
                let link = to_partner.clone();
                Box::pin(async move {
                    link.request(req)
                        .await
                        .map(|a| a.to_vec())
                        .map_err(|e| e.to_string())
                })
            },
        ))));
    }
    // When our path to the medium fails, the partner writes our mirrored records.
    let delegate_link = link.clone();
    engine.set_flush_delegate(Some(Arc::new(
        move |partition: u32, first: u64, last: u64, count: usize| {
            use nvmirror::cluster::wire;
            let req = wire::encode(
                wire::OP_WRITE_FOR_PARTNER,
                partition,
                first,
                count as u32,
                &last.to_le_bytes(),
            );
            // The flusher is a plain thread; the link's futures run on any executor.
            let answer = futures::executor::block_on(delegate_link.request(req))
                .map_err(|e| e.to_string())?;
            wire::answer(&answer).map(|_| ())
        },
    )));

    let (watched, engine, policy) = (link.clone(), engine.clone(), c.takeover);
    let grace = Duration::from_millis(c.heartbeat_timeout_ms);
    let partner = c.nodes[peer as usize].name.clone();
    std::thread::Builder::new()
        .name("partner-watch".into())
        .spawn(move || {
            let mut was_up = false;
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let state = watched.state();
                match (&state, was_up) {
                    (rdma_link::LinkState::Up(_), false) => {
                        tracing::info!("partner {partner} connected: mirroring every write");
                        was_up = true;
                        engine.mirror_resynced();
                        engine.set_takeover_expected(policy == TakeoverPolicy::Auto);
                        // Whatever is already on the medium may go from the partner's second
                        // store: after our restart it still holds copies of records that our
                        // start-up replay flushed, and replaying those later would write
                        // old data over new.
                        for p in engine.status().partitions {
                            if p.flushed_through > 0 {
                                let _ = watched.release(p.partition, p.flushed_through);
                            }
                        }
                    }
                    (rdma_link::LinkState::Closed, _) => return,
                    (rdma_link::LinkState::Up(_), true) => {}
                    (_, true) => {
                        was_up = false;
                        tracing::warn!("partner {partner} is down ({state:?}): running degraded");
                        let owns = engine
                            .cluster()
                            .is_some_and(|c| !c.ranges_of(peer).is_empty());
                        if policy == TakeoverPolicy::Auto && owns {
                            if let Err(e) = engine.take_over(peer, grace) {
                                tracing::error!("automatic takeover from {partner} failed: {e}");
                            }
                        }
                    }
                    (_, false) => {}
                }
            }
        })
        .context("spawning the partner watcher")?;
    Ok(link)
}

/// "lun0:1" -> (LUN index, range); `None` for an empty list (all ranges).
fn parse_ranges(engine: &Engine, specs: &[String]) -> Result<Option<Vec<(u32, u32)>>, String> {
    if specs.is_empty() {
        return Ok(None);
    }
    let luns = engine.status().luns;
    specs
        .iter()
        .map(|spec| {
            let (name, range) = spec
                .rsplit_once(':')
                .ok_or_else(|| format!("range {spec:?}: write LUN:RANGE, e.g. lun0:1"))?;
            let (i, lun) = luns
                .iter()
                .enumerate()
                .find(|(_, l)| l.name == name)
                .ok_or_else(|| format!("range {spec:?}: no LUN named {name:?}"))?;
            let r: u32 = range
                .parse()
                .ok()
                .filter(|r| *r < lun.ranges)
                .ok_or_else(|| {
                    format!(
                        "range {spec:?}: LUN {name} has ranges 0 to {}",
                        lun.ranges.saturating_sub(1)
                    )
                })?;
            Ok((i as u32, r))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

fn shutdown_link(link: rdma_link::Link) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), link.shutdown()).await;
        }),
        Err(_) => drop(link),
    }
}

/// Runs a forwarded request. Reads touch the medium synchronously, so they go to a blocking
/// thread: the link's own thread also carries the heartbeats.
async fn serve_forwarded(engine: Arc<Engine>, req: rdma_link::Bytes) -> Vec<u8> {
    use nvmirror::cluster::wire;
    match wire::decode(&req) {
        Some(r) if r.op == wire::OP_WRITE_FOR_PARTNER => {
            let mut last = [0u8; 8];
            last.copy_from_slice(&r.data);
            let last = u64::from_le_bytes(last);
            let result = tokio::task::spawn_blocking(move || {
                engine.write_for_partner(r.lun, r.offset, last, r.len as usize)
            })
            .await;
            match result {
                Ok(Ok(_)) => wire::ok(&[]),
                Ok(Err(e)) => wire::err(&e),
                Err(e) => wire::err(&format!("task failed: {e}")),
            }
        }
        Some(r) if r.op == wire::OP_READ => {
            if !engine
                .serves_locally(r.lun as usize, r.offset, r.len as u64)
                .await
            {
                return wire::err("this node does not own the whole range (ownership moved?)");
            }
            let result = tokio::task::spawn_blocking(move || {
                engine.read_to_vec(r.lun as usize, r.offset, r.len as usize)
            })
            .await;
            match result {
                Ok(Ok(data)) => wire::ok(&data),
                Ok(Err(e)) => wire::err(&e.message),
                Err(e) => wire::err(&format!("read task failed: {e}")),
            }
        }
        _ => engine.serve_forwarded(&req).await,
    }
}
