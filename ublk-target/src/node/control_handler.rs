//! Answers `nvmirrorctl` (one request from the control socket at a time per connection, on
//! the control socket's threads): status, flusher pause/resume, drain, takeover, giveback,
//! handover, verify, and adding or deleting a LUN's device.

use super::link::tell_partner_to_reload;
use super::partner_watch::ask_partner;
use crate::config::WritePrioritySection;
use crate::control::{DaemonStatus, Request, Response};
use crate::devices::DeviceSet;
use crate::engine::{Engine, RangesToMove, WritePriorityPolicy};
use futures::executor::block_on;
use rdma_link::Link;
use std::sync::Arc;
use std::time::Duration;

pub struct ControlHandler {
    pub engine: Arc<Engine>,
    pub devices: Arc<DeviceSet>,
    pub link: Option<Link>,
    /// The daemon's config file, for status and error messages.
    pub config_path: String,
    /// The self-fence, for status.
    pub watchdog: Option<crate::watchdog::WatchdogView>,
    /// A manual takeover's grace period (the heartbeat timeout).
    pub grace: Duration,
    /// What `nvmirrorctl write-priority on` sets: the config's `[cluster.write_priority]` or
    /// its defaults; why it is refused on this node otherwise.
    pub write_priority: Result<WritePriorityPolicy, String>,
}

/// The longest timeout a request may ask for (a day): larger numbers are refused, not
/// wrapped or panicked on.
const MAX_TIMEOUT_SECS: u64 = 86_400;

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

impl ControlHandler {
    /// What `nvmirrorctl status` and the metrics endpoint show.
    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            config: self.config_path.clone(),
            devices: self.devices.statuses(),
            engine: self.engine.status(),
            watchdog: self.watchdog.as_ref().map(|w| w.status()),
        }
    }

    pub fn handle(&self, req: Request) -> Response {
        let engine = &self.engine;
        if let Request::Drain { timeout_secs }
        | Request::Giveback { timeout_secs }
        | Request::Handover { timeout_secs } = req
        {
            if timeout_secs > MAX_TIMEOUT_SECS {
                return error(format!(
                    "timeout_secs {timeout_secs} is too long; use at most {MAX_TIMEOUT_SECS} (a day)"
                ));
            }
        }
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
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
            Request::Takeover { force, ref ranges } => self.takeover(force, ranges),
            Request::Giveback { timeout_secs } => {
                self.move_ranges(RangesToMove::PartnersRanges, timeout_secs)
            }
            Request::Handover { timeout_secs } => {
                self.move_ranges(RangesToMove::OwnRanges, timeout_secs)
            }
            Request::Verify { repair, rate } => self.verify(repair, rate),
            Request::ForceCurrent { ref ranges } => self.force_current(ranges),
            Request::Export { .. } | Request::Checkpoint { .. } | Request::ReturnImage { .. } => error(
                "export, checkpoint and return-image are for a log-shipping destination; this node serves LUNs"
                    .to_string(),
            ),
            Request::WritePriority {
                on,
                queue,
                min_hold_ms,
            } => {
                let policy = match (&self.write_priority, on) {
                    (_, false) => None,
                    (Ok(p), true) => {
                        let mut p = *p;
                        if queue && p.queue_for.is_none() {
                            p.queue_for = Some(Duration::from_millis(
                                WritePrioritySection::default().queue_timeout_ms,
                            ));
                        }
                        match min_hold_ms {
                            Some(0) => return error("the minimum hold must be at least 1 ms".to_string()),
                            Some(ms) => p.min_hold = Duration::from_millis(ms),
                            None => {}
                        }
                        Some(p)
                    }
                    (Err(why), true) => return error(why.clone()),
                };
                engine.set_write_priority(policy);
                tracing::warn!(
                    "write priority that follows the writer turned {} by nvmirrorctl{}",
                    if on { "on" } else { "off" },
                    match policy {
                        Some(p) => format!(
                            " (writes without it {}, minimum hold {} ms)",
                            if p.queue_for.is_some() { "queue" } else { "are forwarded" },
                            p.min_hold.as_millis()
                        ),
                        None => String::new(),
                    }
                );
                Response::Ok
            }
            Request::LocalReads { on } => match engine.set_local_reads(on) {
                Ok(()) => {
                    tracing::warn!(
                        "local reads of the partner's ranges turned {} by nvmirrorctl",
                        if on { "on" } else { "off" }
                    );
                    Response::Ok
                }
                Err(e) => error(e),
            },
            Request::ResyncRate { rate } => {
                if !engine.cluster().is_some_and(|c| c.own_storage()) {
                    return error(
                        "a resync copies between the nodes' own media: it needs cluster.storage = \"own\"",
                    );
                }
                engine.set_resync_rate(rate);
                tracing::warn!(
                    "resync rate limit set by nvmirrorctl: {}",
                    match rate {
                        Some(r) => format!("{} MiB/s", r.div_ceil(1 << 20)),
                        None => "none".into(),
                    }
                );
                Response::Ok
            }
            // The control socket streams it itself, calling back here for each status.
            Request::Watch { .. } => error("watch is a stream, served by the control socket"),
            Request::AddDevice { ref lun } => self.add_device(lun),
            Request::DelDevice { ref lun } => {
                let Some(i) = self.devices.lun_index(lun) else {
                    return self.no_such_lun(lun);
                };
                match self.devices.del(i, Duration::from_secs(30)) {
                    Ok(_) => Response::Ok,
                    Err(e) => error(format!("{e:#}")),
                }
            }
            Request::Drain { timeout_secs } => {
                if engine.drain_blocking(Duration::from_secs(timeout_secs)) {
                    return Response::Ok;
                }
                // A failed partition never drains: say why at once instead of a timeout.
                let failed: Vec<String> = engine
                    .status()
                    .partitions
                    .iter()
                    .filter_map(|p| {
                        p.failed
                            .as_ref()
                            .map(|f| format!("partition {}: {f}", p.partition))
                    })
                    .collect();
                if failed.is_empty() {
                    error(format!(
                        "staged writes did not reach the medium within {timeout_secs} s \
                         (flusher paused or medium failing? see status)"
                    ))
                } else {
                    error(format!(
                        "staged writes cannot reach the medium from this node: {}",
                        failed.join("; ")
                    ))
                }
            }
        }
    }

    fn no_such_lun(&self, lun: &str) -> Response {
        error(format!("no LUN named {lun:?} in {}", self.config_path))
    }

    fn takeover(&self, force: bool, ranges: &[String]) -> Response {
        let Some(c) = self.engine.cluster() else {
            return error("this node is not in a cluster");
        };
        if self.link.as_ref().is_some_and(|l| l.state().is_up()) && !force {
            return error(
                "the partner is reachable: taking over now would give two owners \
                 the same ranges; stop it first, or use --force if it is fenced",
            );
        }
        if self.engine.partner_elsewhere() && !force {
            return error(
                "the partner was connected but its disk heartbeat never appeared on this \
                 node's medium: the nodes do not see the same medium, and a takeover would \
                 serve this medium's stale copy of the partner's flushed writes. Fix \
                 lun.medium on both nodes (one shared disk); --force overrides",
            );
        }
        let only = match parse_ranges(&self.engine, ranges) {
            Ok(o) => o,
            Err(message) => return error(message),
        };
        let from = c.mirrored_for_us().first().copied().unwrap_or(c.partner());
        if !force {
            if let Err(message) = block_on(self.engine.await_partner_silence(from)) {
                return error(message);
            }
        }
        match block_on(
            self.engine
                .take_over_ranges(from, only.as_deref(), self.grace, !force),
        ) {
            Ok(_) => Response::Ok,
            Err(message) => error(message),
        }
    }

    fn force_current(&self, ranges: &[String]) -> Response {
        let Some(c) = self.engine.cluster() else {
            return error("this node is not in a cluster");
        };
        if self.link.as_ref().is_some_and(|l| l.state().is_up()) {
            return error(
                "the partner is connected: stop its daemon first (while it runs, its marks \
                 about this node's medium are its own to write)",
            );
        }
        let only = match parse_ranges(&self.engine, ranges) {
            Ok(Some(only)) => only,
            Ok(None) => return error("name the ranges to force: --range LUN:RANGE"),
            Err(message) => return error(message),
        };
        match c.force_own_medium_current(&only) {
            Ok(()) => Response::Ok,
            Err(message) => error(message),
        }
    }

    fn move_ranges(&self, which: RangesToMove, timeout_secs: u64) -> Response {
        let Some(l) = self.link.as_ref().filter(|l| l.state().is_up()) else {
            return error("the partner is not connected: no one to hand ranges to");
        };
        let tell = || tell_partner_to_reload(l);
        match block_on(
            self.engine
                .give_back(which, Duration::from_secs(timeout_secs), tell),
        ) {
            Ok(_) => Response::Ok,
            Err(message) => error(message),
        }
    }

    fn verify(&self, repair: bool, rate: Option<u64>) -> Response {
        let Some(l) = self.link.as_ref().filter(|l| l.state().is_up()) else {
            return error(
                "the partner is not connected: there is no second medium to compare with",
            );
        };
        let ask = |req: Vec<u8>| ask_partner(l.clone(), req);
        match block_on(self.engine.verify_partner(repair, rate, ask)) {
            Ok(report) => Response::Verified(Box::new(report)),
            Err(message) => error(message),
        }
    }

    fn add_device(&self, lun: &str) -> Response {
        let Some(i) = self.devices.lun_index(lun) else {
            return self.no_such_lun(lun);
        };
        let done = self.devices.add(i).and_then(|_| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !self.devices.statuses().iter().any(|d| d.lun == lun) {
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "the device of LUN {lun} did not come up within 30 s; see the daemon log"
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        });
        match done {
            Ok(()) => Response::Ok,
            Err(e) => error(format!("{e:#}")),
        }
    }
}

/// "lun0:1" -> (LUN index, range); `None` for an empty list (all ranges).
fn parse_ranges(engine: &Engine, specs: &[String]) -> Result<Option<Vec<(u32, u32)>>, String> {
    if specs.is_empty() {
        return Ok(None);
    }
    let luns = engine.luns();
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
