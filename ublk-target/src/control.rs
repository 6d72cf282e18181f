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
    /// Set the resync's rate limit (`storage = "own"`) until the daemon restarts; a resync
    /// under way follows at once.
    ResyncRate {
        /// Bytes per second to copy at most (None: unlimited).
        #[serde(default)]
        rate: Option<u64>,
    },
}

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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Status(Box<DaemonStatus>),
    Verified(Box<VerifyReport>),
    Error { message: String },
}

/// Line length cap: a request is a few dozen bytes; anything longer is not ours.
const MAX_LINE: usize = 64 * 1024;

/// Binds the socket (root-only) and serves requests on a background thread.
pub fn serve(
    path: &Path,
    handler: Arc<dyn Fn(Request) -> Response + Send + Sync>,
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
                            .spawn(move || serve_conn(stream, h));
                    }
                    Err(e) => tracing::warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(path.to_owned())
}

fn serve_conn(stream: UnixStream, handler: Arc<dyn Fn(Request) -> Response + Send + Sync>) {
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

fn reply(out: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

use std::io::Read as _;

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
