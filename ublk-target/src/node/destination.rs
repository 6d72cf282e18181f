//! A log-shipping destination's life (claim set C, docs/log-shipping.md): open its NVRAM
//! and one area per source in it, listen for each source on that source's port, hold
//! every record a source posts until its log file has it (`shipping::log_writer`, a
//! thread per source), answer the source's "is this batch logged?" and `nvmirrorctl
//! status`, and stop on SIGTERM/SIGINT.
//!
//! Built so far (steps 1 and 2). Images, consistency points and `export` (steps 3-4, the
//! storage side of which is `crate::shipping::image`) are not wired in yet.

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

/// Serves a source's requests: only `OP_SHIP_LOGGED`.
fn log_questions(logs: Arc<SourceLogs>) -> Arc<dyn rdma_link::RequestHandler> {
    Arc::new(move |payload: rdma_link::Bytes| {
        let logs = logs.clone();
        async move {
            let asked = wire::decode(&payload)
                .filter(|r| r.op == wire::OP_SHIP_LOGGED)
                .and_then(|r| wire::ShipLogged::of(&r));
            let Some(asked) = asked else {
                tracing::warn!(
                    "a source sent a request that is not a log question (op {:?}): refused",
                    payload.first()
                );
                return rdma_link::Bytes::from(wire::err(
                    "a log-shipping destination answers only whether a batch is in its log file",
                ));
            };
            rdma_link::Bytes::from(match logs.wait_logged(&asked, LOGGED_PATIENCE).await {
                Ok(()) => wire::ok(&[]),
                Err(e) => wire::err(&e),
            })
        }
    })
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
        let link = Link::start_with_handler(lc, None, Some(store), log_questions(logs.clone()))
            .map_err(|e| anyhow::anyhow!("starting the link for source {}: {e}", src.name))?;
        if let Some(at) = logs.image_state().exported_unix {
            // Its images were handed over: whoever serves them now owns the volume, so the
            // source (if it comes back) must not ship into files nobody applies.
            tracing::warn!(
                source = src.name,
                "exported at Unix time {at}: its link stays closed (giving the images back is not built)"
            );
            shutdown_link(link.clone());
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
            other => Response::Error {
                message: format!(
                    "a log-shipping destination answers only status, checkpoint and export; {other:?} is for nodes that serve LUNs"
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
                "export: {} image(s), {} record(s) from {} log file(s) applied by the last consistency point; the source's link is closed",
                report.images.len(),
                report.records,
                report.files
            );
            shutdown_link(s.link.clone());
            Response::Exported(Box::new(report))
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
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
                }
            })
            .collect(),
    }
}
