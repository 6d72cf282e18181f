//! A log-shipping destination's life (claim set C, docs/log-shipping.md): open its NVRAM
//! and one area per source in it, listen for each source on that source's port, hold
//! every record a source posts until its log file has it (`shipping::log_writer`, a
//! thread per source), answer the source's requests (is this batch logged? what is our
//! copy of your volume? and, while giving an exported volume back, the image's digests and
//! blocks) and `nvmirrorctl` (status, checkpoint, export, return-image), and stop on
//! SIGTERM/SIGINT. The images and their consistency points are `crate::shipping::image`,
//! run by the log writer; export is `crate::shipping::export`.

use super::link::{shipping_link_config, shutdown_link};
use super::signals::wait_for_stop_signal;
use crate::cluster::wire;
use crate::config::{NodeConfig, ShippingRole};
use crate::control::{self, DestinationStatus, Request, Response, ShippedSourceStatus};
use crate::nvram::NvramRegion;
use crate::shipping::area::{open_areas, SourceArea};
use crate::shipping::log_writer::SourceLogs;
use anyhow::Context;
use rdma_link::{Link, LinkState};
use std::sync::Arc;
use std::time::Duration;

/// One source as the destination serves it.
struct Served {
    area: SourceArea,
    listen: String,
    link: Link,
    logs: Arc<SourceLogs>,
}

/// How long the destination holds a source's "is this batch logged?" before answering
/// "not yet" (the source asks again; well inside the link's request timeout).
const LOGGED_PATIENCE: Duration = Duration::from_secs(5);

/// How long the destination's writer may take to record a source's return.
const RETURN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves a source's requests: whether a batch is in its log file (`OP_SHIP_LOGGED`), what
/// our copy of its volume is (`OP_SHIP_STATE`), and, once its exported images were given
/// back (`nvmirrorctl return-image`), their digests and blocks (`OP_VERIFY_DIGESTS`,
/// `OP_READ_MEDIUM`) and the end of the return (`OP_SHIP_RETURNED`). `link` is filled in
/// once the link runs: a return is answered only on the connection whose `OP_SHIP_STATE`
/// heard "returning" (a source that starts by asking), never to one that serves already.
fn source_requests(
    logs: Arc<SourceLogs>,
    link: Arc<std::sync::OnceLock<Link>>,
) -> Arc<dyn rdma_link::RequestHandler> {
    let taking_back = Arc::new(std::sync::Mutex::new(None));
    Arc::new(move |payload: rdma_link::Bytes| {
        let source = Source {
            logs: logs.clone(),
            link: link.clone(),
            taking_back: taking_back.clone(),
        };
        async move {
            let answer = match wire::decode(&payload) {
                Some(r) => source.answer(r).await,
                None => Err(format!(
                    "a malformed request (op {:?}, {} bytes)",
                    payload.first(),
                    payload.len()
                )),
            };
            rdma_link::Bytes::from(match answer {
                Ok(data) => wire::ok(&data),
                Err(e) => {
                    tracing::warn!(
                        source = source.logs.source(),
                        "a source's request refused: {e}"
                    );
                    wire::err(&e)
                }
            })
        }
    })
}

/// What one source's requests are answered from.
struct Source {
    logs: Arc<SourceLogs>,
    link: Arc<std::sync::OnceLock<Link>>,
    /// The link's connection generation on which the source asked and heard "returning".
    taking_back: Arc<std::sync::Mutex<Option<u64>>>,
}

impl Source {
    fn generation(&self) -> Option<u64> {
        match self.link.get()?.state() {
            LinkState::Up(info) => Some(info.generation),
            _ => None,
        }
    }

    /// This connection asked for the state and heard "returning" (so it serves nothing).
    fn is_taking_back(&self) -> bool {
        let asked = *self.taking_back.lock().unwrap_or_else(|p| p.into_inner());
        asked.is_some() && asked == self.generation()
    }

    async fn answer(&self, r: wire::Request) -> Result<Vec<u8>, String> {
        let logs = &self.logs;
        let mut state = logs.ship_state();
        if let wire::ShipState::Returning(at) = state {
            // The images' node started again after return-image: the volume is served
            // from the images, so it is not the source's to take.
            if let Err(e) = images_node_idle(logs.dir()) {
                tracing::warn!(source = logs.source(), "{e}");
                state = wire::ShipState::Exported(at);
            }
        }
        match (r.op, state) {
            (wire::OP_SHIP_STATE, _) => {
                // Only a starting source takes the volume back on this connection; one that
                // serves already (it asks again while it serves) stops instead.
                if matches!(state, wire::ShipState::Returning(_))
                    && r.offset == wire::SHIP_STATE_BEFORE_SERVING
                {
                    *self.taking_back.lock().unwrap_or_else(|p| p.into_inner()) =
                        self.generation();
                }
                Ok(state.encode())
            }
            (wire::OP_SHIP_LOGGED, wire::ShipState::Shipping) => {
                let asked = wire::ShipLogged::of(&r).ok_or("a malformed log question")?;
                logs.wait_logged(&asked, LOGGED_PATIENCE)
                    .await
                    .map(|()| Vec::new())
            }
            // The source drains before it takes its volume back: the images, not these
            // records, are its volume.
            (wire::OP_SHIP_LOGGED, wire::ShipState::Returning(_)) if self.is_taking_back() => {
                Ok(Vec::new())
            }
            (wire::OP_SHIP_LOGGED, _) => Err(
                "your volume was exported and is served from the destination's images (or is being given back to a start of yours that asks first): nothing of yours is logged; stop serving and start again".into(),
            ),
            (wire::OP_VERIFY_DIGESTS | wire::OP_READ_MEDIUM, wire::ShipState::Returning(_))
                if self.is_taking_back() =>
            {
                let (dir, op) = (logs.dir().to_owned(), r.op);
                let read = tokio::task::spawn_blocking(move || {
                    crate::shipping::image::read_image(&dir, r.lun, r.offset, r.len as usize)
                })
                .await
                .map_err(|e| format!("reading the image: {e}"))??;
                // (read_image bounds the span: at most READ_IMAGE_MAX, one request.)
                Ok(if op == wire::OP_READ_MEDIUM {
                    read
                } else {
                    crate::engine::digests(&read)
                })
            }
            (wire::OP_IMAGE_LEN, wire::ShipState::Returning(_)) if self.is_taking_back() => {
                crate::shipping::image::image_len(logs.dir(), r.lun).map(|n| n.to_le_bytes().to_vec())
            }
            (wire::OP_SHIP_RETURNED, wire::ShipState::Returning(_)) if self.is_taking_back() => {
                let returned = wire::ShipReturned::of(&r).ok_or("a malformed return")?;
                let logs = logs.clone();
                tokio::task::spawn_blocking(move || logs.returned(returned, RETURN_TIMEOUT))
                    .await
                    .map_err(|e| format!("recording the return: {e}"))?
                    .map(|()| Vec::new())
            }
            (op, state) => Err(format!(
                "op {op} is not a log-shipping request, or not one this connection may make now (volume {state:?})"
            )),
        }
    }
}

/// Ok if the node `export` set up to serve the images is not running and left nothing in
/// its NVRAM that the images lack (it was stopped cleanly: drained); Err says which.
fn images_node_idle(dir: &std::path::Path) -> Result<(), String> {
    use crate::shipping::export::{SERVE_CONFIG, SERVE_NVRAM_FILE, SERVE_SOCKET};
    let socket = dir.join(SERVE_SOCKET);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "the node serving the images is running (its control socket {} answers): stop it first, so that only one node serves the volume",
            socket.display()
        ));
    }
    let nvram = dir.join(SERVE_NVRAM_FILE);
    if !nvram.exists() {
        return Ok(());
    }
    let report = crate::inspect::inspect(&nvram)
        .map_err(|e| format!("reading the images' node's NVRAM {}: {e}", nvram.display()))?;
    let held: usize = report.partitions.iter().map(|p| p.records).sum();
    match report.state.as_str() {
        "blank" => Ok(()),
        "valid" if held == 0 => Ok(()),
        "valid" => Err(format!(
            "the node serving the images stopped without draining: its NVRAM {} holds {held} write(s) the images lack. Start it again (nvmirrord --config {}, or the .returned copy) and stop it with SIGTERM, which drains it",
            nvram.display(),
            dir.join(SERVE_CONFIG).display()
        )),
        other => Err(format!(
            "the images' node's NVRAM {} is {other} ({}): check it with nvmirrorctl nvram inspect before giving the volume back",
            nvram.display(),
            report.detail.unwrap_or_default()
        )),
    }
}

/// Runs the destination until SIGTERM/SIGINT (`signals` are blocked already).
pub fn run(
    cfg: NodeConfig,
    config_path: &str,
    signals: nix::sys::signal::SigSet,
) -> anyhow::Result<()> {
    let s = cfg
        .shipping
        .as_ref()
        .filter(|s| s.role == ShippingRole::Destination)
        .context("not a log-shipping destination")?;
    let nvram = Arc::new(
        NvramRegion::open(&cfg.nvram.path, cfg.nvram.size.map(|b| b.0))
            .with_context(|| format!("nvram.path {}", cfg.nvram.path.display()))?,
    );
    let list: Vec<(String, u64)> = s
        .sources
        .iter()
        .map(|x| (x.name.clone(), x.nvram_size.0))
        .collect();
    let areas = open_areas(&nvram, cfg.nvram.partitions, &list)?;
    let dir = s
        .dir
        .as_ref()
        .context("shipping.dir is missing (config check names it)")?;
    let mut served = Vec::new();
    let mut writers = Vec::new();
    for (area, src) in areas.into_iter().zip(&s.sources) {
        let listen: std::net::SocketAddr = src
            .listen
            .parse()
            .with_context(|| format!("shipping.source {} listen", src.name))?;
        let (tag, text) = area.geometry.link_tag();
        tracing::info!(source = src.name, %listen, "listening for the source: {text}");
        let lc = shipping_link_config(
            s,
            rdma_link::Role::Listen(listen),
            rdma_link::NodeRole::Destination,
            &cfg.node.name,
            &src.name,
            tag,
        )?;
        area.held.keep_until_logged();
        let logs = SourceLogs::open(dir, &src.name, area.held.clone(), cfg.nvram.partitions)
            .with_context(|| format!("the log files of source {}", src.name))?;
        writers.push(
            logs.start()
                .with_context(|| format!("starting the log writer of source {}", src.name))?,
        );
        let store: Arc<dyn rdma_link::SecondStore> = area.held.clone();
        let cell = Arc::new(std::sync::OnceLock::new());
        let link = Link::start_with_handler(
            lc,
            None,
            Some(store),
            source_requests(logs.clone(), cell.clone()),
        )
        .map_err(|e| anyhow::anyhow!("starting the link for source {}: {e}", src.name))?;
        let _ = cell.set(link.clone());
        match logs.ship_state() {
            // Its images were handed over: whoever serves them now owns the volume. The link
            // stays open so that the source, if it comes back, hears so and does not serve
            // (`OP_SHIP_STATE`); what it sends is not logged.
            wire::ShipState::Exported(at) => tracing::warn!(
                source = src.name,
                "exported at Unix time {at}: its records are not logged, and it may not serve until its volume is returned (nvmirrorctl return-image)"
            ),
            wire::ShipState::Returning(at) => tracing::warn!(
                source = src.name,
                "exported, and given back at Unix time {at}: the source takes its volume back from the images when it connects"
            ),
            wire::ShipState::Shipping => {}
        }
        served.push(Served {
            area,
            listen: src.listen.clone(),
            link,
            logs,
        });
    }
    let served = Arc::new(served);

    let socket = cfg.control_socket();
    let config_path = config_path.to_owned();
    let node = cfg.node.name.clone();
    let answering = served.clone();
    control::serve(
        &socket,
        Arc::new(move |req| match req {
            Request::Status => Response::Destination(Box::new(status(
                &node,
                &config_path,
                &answering,
            ))),
            Request::Export {
                source,
                size,
                force,
            } => export(&answering, &source, size, force),
            Request::Checkpoint { source } => checkpoint(&answering, &source),
            Request::ReturnImage { source } => return_image(&answering, &source),
            other => Response::Error {
                message: format!(
                    "a log-shipping destination answers only status, checkpoint, export and return-image; {other:?} is for nodes that serve LUNs"
                ),
            },
        }),
        // A destination has no DaemonStatus to watch.
        |_, _| true,
    )
    .with_context(|| format!("control socket {}", socket.display()))?;
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "log-shipping destination of {} source(s)",
            served.len()
        )),
    ]) {
        tracing::warn!("telling systemd we are ready: {e}");
    }
    tracing::info!(
        sources = served.len(),
        "log-shipping destination ready: each source's records go to its NVRAM area, then its log files"
    );
    let sig = wait_for_stop_signal(&signals).context("waiting for a signal")?;
    tracing::info!("{sig:?}: closing the sources' links; their records stay in the NVRAM");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    for s in served.iter() {
        shutdown_link(s.link.clone());
        s.logs.stop();
    }
    for w in writers {
        let _ = w.join();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The source named `name`, or an error naming the ones this destination keeps.
fn find<'a>(served: &'a [Served], name: &str) -> Result<&'a Served, Response> {
    served
        .iter()
        .find(|s| s.area.source == name)
        .ok_or_else(|| {
            let names: Vec<&str> = served.iter().map(|s| s.area.source.as_str()).collect();
            Response::Error {
                message: format!(
                    "no source {name:?} here; this destination keeps {}",
                    names.join(", ")
                ),
            }
        })
}

/// `nvmirrorctl export`: source `name` is gone; its images are brought up to date from its
/// log files once every record its NVRAM area holds is in them (`shipping::export`).
fn export(served: &[Served], name: &str, size: Option<u64>, force: bool) -> Response {
    let s = match find(served, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if s.link.state().is_up() {
        return Response::Error {
            message: format!(
                "source {name} is connected: export is for a source that is gone (stop it, or make sure it is dead, first)"
            ),
        };
    }
    tracing::warn!(
        source = name,
        "export: the source is gone; bringing its images up to date from its log files"
    );
    match crate::shipping::export::export(&s.logs, name, size, force, EXPORT_TIMEOUT) {
        Ok(report) => {
            tracing::info!(
                source = name,
                "export: {} image(s), {} record(s) from {} log file(s) applied by the last consistency point; the source may not serve until its volume is returned",
                report.images.len(),
                report.records,
                report.files
            );
            Response::Exported(Box::new(report))
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// `nvmirrorctl return-image --source NAME`: the exported images go back to the source
/// when it next starts. Refused while the source is connected (it must start again and ask),
/// while the node `export` set up to serve the images runs, and when that node left writes
/// in its NVRAM (two servers of one volume must never be, and its writes must be in the
/// images first). Its config is then renamed, so it is not started again by mistake.
fn return_image(served: &[Served], name: &str) -> Response {
    let s = match find(served, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if s.link.state().is_up() {
        return Response::Error {
            message: format!(
                "source {name} is connected: stop it first (it takes its volume back when it starts again)"
            ),
        };
    }
    let dir = s.logs.dir();
    if let Err(message) = images_node_idle(dir) {
        return Response::Error { message };
    }
    let config = dir.join(crate::shipping::export::SERVE_CONFIG);
    if config.exists() {
        let retired = config.with_extension("toml.returned");
        if let Err(e) = std::fs::rename(&config, &retired) {
            return Response::Error {
                message: format!("retiring {}: {e}", config.display()),
            };
        }
    }
    match s.logs.allow_return() {
        Ok(at) => {
            tracing::warn!(
                source = name,
                "return-image: the images go back to the source when it next starts (allowed at Unix time {at}); {} is retired",
                config.display()
            );
            Response::Ok
        }
        Err(message) => Response::Error { message },
    }
}

/// `nvmirrorctl checkpoint --source NAME`: a consistency point of every partition of the
/// source now (what its log files hold goes to its images).
fn checkpoint(served: &[Served], name: &str) -> Response {
    let s = match find(served, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Some(at) = s.logs.image_state().exported_unix {
        return Response::Error {
            message: format!(
                "the images of {name} were exported (Unix time {at}) and belong to whoever serves them now; the destination no longer applies its log files to them"
            ),
        };
    }
    match s.logs.checkpoint(Vec::new(), EXPORT_TIMEOUT) {
        Ok(points) => {
            let state = s.logs.image_state();
            Response::Checkpointed(Box::new(crate::control::CheckpointReport {
                source: name.to_owned(),
                points,
                missing: state.missing(),
            }))
        }
        Err(message) => Response::Error { message },
    }
}

/// How long an export or a checkpoint waits for the records still in the NVRAM to reach the
/// log files, and for the consistency point.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(120);

fn status(node: &str, config: &str, served: &[Served]) -> DestinationStatus {
    DestinationStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        config: config.to_owned(),
        node: node.to_owned(),
        sources: served
            .iter()
            .map(|s| {
                let held = s.area.held.status();
                let (log_files, log_error) = s.logs.status();
                let state = s.link.state();
                ShippedSourceStatus {
                    name: s.area.source.clone(),
                    listen: s.listen.clone(),
                    link: match &state {
                        LinkState::Up(_) => "up",
                        LinkState::Connecting => "connecting",
                        LinkState::Down(_) => "down",
                        LinkState::Closed => "closed",
                    }
                    .to_owned(),
                    link_error: match &state {
                        LinkState::Down(e) => Some(e.to_string()),
                        _ => None,
                    },
                    held_records: held.records,
                    held_bytes: held.bytes,
                    capacity_bytes: held.capacity_bytes,
                    log_files,
                    log_error,
                    volume: match s.logs.ship_state() {
                        wire::ShipState::Shipping => "shipping",
                        wire::ShipState::Exported(_) => "exported",
                        wire::ShipState::Returning(_) => "returning",
                    }
                    .to_owned(),
                    volume_since_unix: match s.logs.ship_state() {
                        wire::ShipState::Shipping => None,
                        wire::ShipState::Exported(at) | wire::ShipState::Returning(at) => Some(at),
                    },
                }
            })
            .collect(),
    }
}
