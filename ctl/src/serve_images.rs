//! `nvmirrorctl export --serve`: after an export, start the node that serves the source's
//! images (the single-node config the export wrote, `serve.toml`) and wait until its
//! devices are up. It runs as a detached `nvmirrord` (a session of its own, so it outlives
//! this command and the terminal), logging to `serve-node.out` next to the images, with
//! the daemon's default state dir (as the by-hand start export prints: a crash of it is
//! recovered by starting it that way again). Under
//! systemd or Pacemaker, run `nvmirrord --config …/serve.toml` as a unit or resource
//! instead: they supervise it, this does not.

use anyhow::{bail, Context};
use nvmirror::control::DaemonStatus;
use nvmirror::shipping::export::SERVE_SOCKET;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the node may take to replay its NVRAM and add its devices.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The node's log, next to the images.
const SERVE_LOG: &str = "serve-node.out";

/// The images' node, up.
#[derive(serde::Serialize)]
pub struct ImagesNode {
    /// None: it was running already.
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// (LUN, device path) of each device it serves.
    pub devices: Vec<(String, String)>,
}

/// Starts the node `serve_config` describes, unless its control socket answers already,
/// and waits until it serves every LUN. `status` asks a control socket for the node's state.
pub fn serve_images(
    serve_config: &Path,
    status: impl Fn(&Path) -> anyhow::Result<DaemonStatus>,
) -> anyhow::Result<ImagesNode> {
    let dir = serve_config
        .parent()
        .context("the export's serve config has no directory")?;
    let socket = dir.join(SERVE_SOCKET);
    let log = dir.join(SERVE_LOG);
    if let Ok(s) = status(&socket) {
        return Ok(ImagesNode {
            pid: None,
            log,
            devices: devices(&s),
        });
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the images' node's log {}", log.display()))?;
    let err = out.try_clone().context("the images' node's log")?;
    let daemon = nvmirrord();
    let mut cmd = Command::new(&daemon);
    cmd.arg("--config")
        .arg(serve_config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process; in the
    // child it detaches the node from our session (a closed terminal must not stop it).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", daemon.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(exit) = child.try_wait().context("watching the images' node")? {
            bail!(
                "the images' node stopped at once ({exit}): see {} (start it by hand with nvmirrord --config {})",
                log.display(),
                serve_config.display()
            );
        }
        if let Ok(s) = status(&socket) {
            if s.devices.len() >= s.engine.luns.len() {
                return Ok(ImagesNode {
                    pid: Some(child.id()),
                    log,
                    devices: devices(&s),
                });
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the images' node (pid {}) did not bring up its devices within {START_TIMEOUT:?}: see {}",
                child.id(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn devices(s: &DaemonStatus) -> Vec<(String, String)> {
    s.devices
        .iter()
        .map(|d| (d.lun.clone(), d.path.clone()))
        .collect()
}

/// nvmirrord next to this nvmirrorctl (an install, a build tree), else from PATH.
fn nvmirrord() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("nvmirrord")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvmirrord"))
}
