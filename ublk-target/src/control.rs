//! The control socket between `nvmirrord` and `nvmirrorctl`: one JSON request per line, one
//! JSON response per line, over a root-only Unix socket.

use crate::engine::{EngineStatus, VerifyReport};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Log-shipping destination: source `source` is gone; build its volume's images from
    /// its log files (`shipping::export`). `size`: each image's length at least.
    Export {
        source: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        force: bool,
    },
    /// Log-shipping destination: a consistency point of every partition of source
    /// `source` now (its log files applied to its images, `shipping::image`).
    Checkpoint {
        source: String,
    },
    /// Log-shipping destination: the exported images of source `source` go back to it when
    /// it next connects (it copies what differs onto its medium, then ships again).
    ReturnImage {
        source: String,
    },
    /// Stop moving staged writes to the medium (maintenance; writes continue until the
    /// NVRAM is full, then wait).
    FlushPause,
    FlushResume,
    /// Wait until every staged write is on the medium.
    Drain {
        timeout_secs: u64,
    },
    /// Take over the partner's ranges (replay its mirrored writes, then serve them).
    /// Refused while the partner is reachable unless `force`.
    Takeover {
        force: bool,
        /// Only these ranges ("LUN:RANGE", LUN by name); empty: all of the partner's.
        #[serde(default)]
        ranges: Vec<String>,
    },
    /// Return the ranges the config gives the partner (after a takeover, once it is back).
    Giveback {
        timeout_secs: u64,
    },
    /// Hand our own configured ranges to the partner (switchover before maintenance).
    Handover {
        timeout_secs: u64,
    },
    /// Serve LUN `lun` as a ublk device again (after `DelDevice`).
    AddDevice {
        lun: String,
    },
    /// Stop and delete LUN `lun`'s ublk device; the daemon keeps flushing and mirroring.
    DelDevice {
        lun: String,
    },
    /// Compare our medium with the partner's for every range we serve (`storage = "own"`);
    /// with `repair`, copy differences from ours onto the partner's.
    Verify {
        #[serde(default)]
        repair: bool,
        /// Bytes per second to compare at most (None: unlimited).
        #[serde(default)]
        rate: Option<u64>,
    },
    /// With `storage = "own"`: the operator keeps our medium's copy of `ranges` ("LUN:RANGE",
    /// LUN by name), marked outdated on both media, losing the writes it misses
    /// (`Cluster::force_own_medium_current`). Only while the partner is down.
    ForceCurrent {
        ranges: Vec<String>,
    },
    /// Set the resync's rate limit (`storage = "own"`) until the daemon restarts; a resync
    /// under way follows at once.
    ResyncRate {
        /// Bytes per second to copy at most (None: unlimited).
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Turn write priority that follows the writer (`cluster.write_priority`) on or off on
    /// this node until the daemon restarts (then the config applies again).
    WritePriority {
        on: bool,
        /// With `on`: writes to the partner's ranges wait for the range (queued until
        /// granted) instead of being forwarded, whatever `queue_writes` says.
        #[serde(default)]
        queue: bool,
        /// With `on`: this `min_hold_ms` instead of the config's.
        #[serde(default)]
        min_hold_ms: Option<u64>,
    },
    /// With `storage = "own"`: serve reads of the partner's ranges here under its read lease
    /// (`cluster.local_reads`), or forward them, until the daemon restarts.
    LocalReads {
        on: bool,
    },
    /// A stream, not one answer: a `Status` now and again each time the node's state changes
    /// (as the `SameState` given to `serve` judges it), checked every `interval_ms` in the
    /// daemon, until the client hangs up or sends anything.
    Watch {
        #[serde(default = "default_watch_interval_ms")]
        interval_ms: u64,
    },
}

fn default_watch_interval_ms() -> u64 {
    100
}

/// The range `Request::Watch` accepts for its interval: finer would spin the control
/// thread, coarser would hide a takeover's phases.
pub const WATCH_INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub lun: String,
    pub dev_id: u32,
    pub path: String,
    pub attach: String,
    pub queues: u16,
    pub depth: u16,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub devices: Vec<DeviceStatus>,
    pub engine: EngineStatus,
    /// The self-fence, if a watchdog is configured.
    #[serde(default)]
    pub watchdog: Option<crate::watchdog::WatchdogStatus>,
}

/// A log-shipping destination's answer to `Status`: what it holds of each source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestinationStatus {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub node: String,
    pub sources: Vec<ShippedSourceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShippedSourceStatus {
    pub name: String,
    pub listen: String,
    /// "up", "connecting", "down" or "closed".
    pub link: String,
    /// Why the link is down, if it is.
    pub link_error: Option<String>,
    /// Records of the source held in its NVRAM area here (not yet in its log files).
    pub held_records: usize,
    pub held_bytes: u64,
    pub capacity_bytes: u64,
    /// The source's log files, per partition.
    #[serde(default)]
    pub log_files: Vec<crate::shipping::log_writer::PartitionLogStatus>,
    /// Why appending to them fails now, if it does (the records wait in the NVRAM).
    #[serde(default)]
    pub log_error: Option<String>,
    /// What our copy of the source's volume is: "shipping", "exported" (served from the
    /// images; the source may not serve) or "returning" (given back; the source takes it
    /// at its next start), with the Unix time of the export or the return.
    #[serde(default)]
    pub volume: String,
    #[serde(default)]
    pub volume_since_unix: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Status(Box<DaemonStatus>),
    Destination(Box<DestinationStatus>),
    Verified(Box<VerifyReport>),
    Exported(Box<crate::shipping::export::ExportReport>),
    Checkpointed(Box<CheckpointReport>),
    Error { message: String },
}

/// What `nvmirrorctl checkpoint` did on a log-shipping destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub source: String,
    pub points: Vec<crate::shipping::image::Point>,
    /// What the images lack of the source's history (they are not its volume).
    #[serde(default)]
    pub missing: Vec<String>,
}

/// Line length cap: a request is a few dozen bytes; anything longer is not ours.
const MAX_LINE: usize = 64 * 1024;

/// Whether two statuses show the same state, for `Request::Watch`: counters that move with
/// every write must not count as changes (the node passes `state_events::same_state`).
pub type SameState = fn(&DaemonStatus, &DaemonStatus) -> bool;

/// Binds the socket (root-only) and serves requests on a background thread.
pub fn serve(
    path: &Path,
    handler: Arc<dyn Fn(Request) -> Response + Send + Sync>,
    same_state: SameState,
) -> std::io::Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A stale socket from a crashed daemon; a live one would answer.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another nvmirrord answers on {}; stop it or set node.control_socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let h = handler.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || serve_conn(stream, h, same_state));
                    }
                    Err(e) => tracing::warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(path.to_owned())
}

fn serve_conn(
    stream: UnixStream,
    handler: Arc<dyn Fn(Request) -> Response + Send + Sync>,
    same_state: SameState,
) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let peer_uid =
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.uid())
            .ok();
    let allowed = peer_uid == Some(0) || peer_uid == Some(nix::unistd::geteuid().as_raw());
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Refuse after reading the request, so the client is not cut off mid-write and
        // gets the reason instead of a broken pipe.
        if !allowed {
            let _ = reply(
                &mut out,
                &Response::Error {
                    message: "permission denied: nvmirrord's control socket is for root only"
                        .into(),
                },
            );
            return;
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Watch { interval_ms }) if WATCH_INTERVAL_MS.contains(&interval_ms) => {
                return stream_changes(&mut out, handler.as_ref(), same_state, interval_ms);
            }
            Ok(Request::Watch { interval_ms }) => Response::Error {
                message: format!(
                    "interval_ms {interval_ms} is out of range: use {} to {}",
                    WATCH_INTERVAL_MS.start(),
                    WATCH_INTERVAL_MS.end()
                ),
            },
            Ok(req) => handler(req),
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        if reply(&mut out, &resp).is_err() {
            return;
        }
        reader.set_limit(MAX_LINE as u64);
    }
}

/// `Request::Watch`: pushes the status whenever its snapshot changes. It takes a snapshot as
/// soon as the engine raises a transition (`transitions::changed`), and every `interval_ms`
/// for what raises none. While it waits it looks for the client hanging up (or writing)
/// every [`HANGUP_CHECK`], so a gone client ends the stream soon, not at the next change.
fn stream_changes(
    out: &mut UnixStream,
    handler: &(dyn Fn(Request) -> Response + Send + Sync),
    same_state: SameState,
    interval_ms: u64,
) {
    // A client that stops reading (a paused `nvmirrorctl events`) is dropped, not waited
    // for: the thread is the only thing it holds.
    if out
        .set_write_timeout(Some(Duration::from_secs(30)))
        .is_err()
    {
        return;
    }
    let interval = Duration::from_millis(interval_ms);
    let mut last: Option<Box<DaemonStatus>> = None;
    loop {
        // Also here, not only while waiting: a stream woken by transitions all the time
        // would otherwise never look.
        if client_done(out) {
            return;
        }
        // Read before the snapshot: a transition during it wakes the wait below at once.
        let seen = crate::transitions::count();
        let resp = handler(Request::Status);
        let unchanged = match (&resp, &last) {
            (Response::Status(now), Some(before)) => same_state(before, now),
            _ => false,
        };
        if !unchanged {
            if reply(out, &resp).is_err() {
                return;
            }
            last = match resp {
                Response::Status(now) => Some(now),
                // Nothing to follow (a log-shipping destination's status, an error).
                _ => return,
            };
        }
        let poll_at = std::time::Instant::now() + interval;
        loop {
            let left = poll_at.saturating_duration_since(std::time::Instant::now());
            if crate::transitions::wait_for_change(seen, left.min(HANGUP_CHECK)) {
                break;
            }
            if client_done(out) {
                return;
            }
            if left <= HANGUP_CHECK {
                break;
            }
        }
    }
}

/// How often a stream that waits for a transition looks whether its client hung up.
const HANGUP_CHECK: Duration = Duration::from_millis(250);

/// The client hung up, wrote something (a stream takes no requests) or the connection
/// broke: peeks without blocking and without taking the bytes.
fn client_done(conn: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    match recv(
        conn.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => false,
        // End of file, bytes or an error.
        _ => true,
    }
}

/// A read that ended by its timeout (or a signal), not by the peer.
fn no_data_yet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn reply(out: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

use std::io::Read as _;

/// The client side of `Request::Watch`: one connection, one status per change.
pub struct Watch {
    reader: BufReader<UnixStream>,
    /// A line cut short by a timeout, completed by the next call.
    partial: Vec<u8>,
}

/// The longest status line a client reads.
const MAX_STATUS_LINE: usize = 64 << 20;

impl Watch {
    pub fn start(path: &Path, interval_ms: u64) -> std::io::Result<Watch> {
        let mut s = UnixStream::connect(path)?;
        let mut text = serde_json::to_string(&Request::Watch { interval_ms })
            .map_err(std::io::Error::other)?;
        text.push('\n');
        s.write_all(text.as_bytes())?;
        Ok(Watch {
            reader: BufReader::new(s),
            partial: Vec::new(),
        })
    }

    /// The next status the daemon pushes: `Ok(None)` when none came within `timeout`, an
    /// error when the daemon hung up, refused the request or sent something unreadable.
    pub fn next(&mut self, timeout: Duration) -> std::io::Result<Option<DaemonStatus>> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let limit = (MAX_STATUS_LINE.saturating_sub(self.partial.len()) as u64).max(1);
        match (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.partial)
        {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if self.partial.last() != Some(&b'\n') => {
                return Err(if self.partial.len() >= MAX_STATUS_LINE {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a status line from nvmirrord longer than 64 MiB",
                    )
                } else {
                    std::io::ErrorKind::UnexpectedEof.into()
                });
            }
            Ok(_) => {}
            Err(e) if no_data_yet(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        let line = std::mem::take(&mut self.partial);
        match serde_json::from_slice(&line) {
            Ok(Response::Status(s)) => Ok(Some(*s)),
            Ok(Response::Error { message }) => Err(std::io::Error::other(message)),
            Ok(other) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected answer from nvmirrord: {other:?}"),
            )),
            Err(e) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected answer from nvmirrord: {e}"),
            )),
        }
    }
}

/// Client side: sends one request and reads the response.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut text = serde_json::to_string(req).map_err(std::io::Error::other)?;
    text.push('\n');
    s.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).take(64 << 20).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected answer from nvmirrord: {e}"),
        )
    })
}
