//! The self-fence: a node whose medium write hangs resets itself before its partner may
//! take its ranges over.
//!
//! The disk lease (`lease`) stops a node from *issuing* medium writes once its lease may have
//! run out, but a write already issued has no deadline of its own: a path that queues I/O
//! (multipath `queue_if_no_path`, a stalled HBA) can deliver it long after the partner took
//! the range over and wrote newer data. sbd and sanlock bound this with a watchdog, and so
//! does nvmirrord: a thread pets `/dev/watchdog` (a hardware watchdog, or `softdog`) only
//! while no medium write of this process has been in flight for longer than the medium I/O
//! timeout. When one has, or when the whole process is frozen, the petting stops and the
//! kernel resets the machine `timeout` later, which ends every I/O the node issued.
//!
//! The timing (docs/arbitration.md): a write issued at `w` while the lease held for another
//! I/O timeout is either complete by `w + io_timeout` or the machine resets by
//! `w + io_timeout + timeout`, before the partner's first write (at least the lease's
//! `dead_after()` after the node's last heartbeat), if `(timeout + POLL) * (1 + DRIFT)` stays
//! below the I/O timeout plus one heartbeat interval: [`max_timeout`].

use crate::lease::{LeaseTiming, DRIFT};
use crate::medium_writes::oldest_write_age;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

nix::ioctl_read!(wdioc_keepalive, b'W', 5, libc::c_int);
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

/// The longest watchdog timeout that still resets a node before its partner may write
/// (whole seconds: the kernel's unit); 0 when the lease timing leaves no room for one.
pub fn max_timeout(t: &LeaseTiming) -> u32 {
    let room = (t.io_timeout + t.renew).as_secs_f64() / (1.0 + DRIFT) - POLL.as_secs_f64();
    room.max(0.0).floor() as u32
}

/// How often the petting thread looks at the writes in flight (it may pet once more up to
/// this long after a write became overdue).
const POLL: Duration = Duration::from_millis(250);

/// What `status` shows of the watchdog.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WatchdogStatus {
    pub device: String,
    pub timeout_s: u32,
    /// Still petted (false: a medium write hung; the machine is about to reset).
    pub petting: bool,
    pub last_pet_ms_ago: u64,
}

struct Shared {
    device: PathBuf,
    timeout_s: u32,
    io_timeout: Duration,
    petting: AtomicBool,
    last_pet: Mutex<Instant>,
    stop: AtomicBool,
}

/// The armed watchdog and the thread that pets it.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<File>>,
}

impl Watchdog {
    /// Opens and arms `device` with `timeout_s`, and starts petting it while no medium write
    /// is overdue (older than `io_timeout`).
    pub fn arm(device: &Path, timeout_s: u32, io_timeout: Duration) -> Result<Watchdog, String> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|e| {
                format!(
                    "cannot open the watchdog {} ({e}); load a watchdog driver (`modprobe softdog` where the machine has none) or remove cluster.watchdog to run without a self-fence",
                    device.display()
                )
            })?;
        let mut want = timeout_s as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int at the pointer.
        let set = unsafe { wdioc_settimeout(file.as_raw_fd(), &mut want) };
        if let Err(e) = set {
            // Leave the watchdog disarmed where the driver allows it (magic close).
            let _ = file.write_all(b"V");
            return Err(format!(
                "the watchdog {} refused a {timeout_s} s timeout ({e})",
                device.display()
            ));
        }
        if want != timeout_s as libc::c_int {
            let _ = file.write_all(b"V");
            return Err(format!(
                "the watchdog {} set a {want} s timeout instead of {timeout_s} s; choose cluster.watchdog_timeout_s it supports",
                device.display()
            ));
        }
        let shared = Arc::new(Shared {
            device: device.to_owned(),
            timeout_s,
            io_timeout,
            petting: AtomicBool::new(true),
            last_pet: Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || pet_while_healthy(&s, file))
            .map_err(|e| format!("starting the watchdog thread: {e}"))?;
        tracing::info!(
            "watchdog {} armed: {timeout_s} s, petted while no medium write is older than {io_timeout:?}",
            device.display()
        );
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    pub fn view(&self) -> WatchdogView {
        WatchdogView(self.shared.clone())
    }
}

/// Read access to the watchdog's state (for status), separate from its ownership.
#[derive(Clone)]
pub struct WatchdogView(Arc<Shared>);

impl WatchdogView {
    pub fn status(&self) -> WatchdogStatus {
        let last = *self.0.last_pet.lock().unwrap_or_else(|p| p.into_inner());
        WatchdogStatus {
            device: self.0.device.display().to_string(),
            timeout_s: self.0.timeout_s,
            petting: self.0.petting.load(Ordering::SeqCst),
            last_pet_ms_ago: last.elapsed().as_millis() as u64,
        }
    }
}

/// A stop of the daemon (clean, or an error it returns): unless a medium write is overdue,
/// the watchdog is closed the magic way and stops counting (where the driver allows it). A
/// process that dies without this (kill -9, a crash) leaves it counting: the machine resets,
/// as with sbd, because its last writes cannot be known to have ended.
impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else {
            return;
        };
        match thread.join() {
            Ok(mut file)
                if self.shared.petting.load(Ordering::SeqCst)
                    && oldest_write_age(Instant::now())
                        .is_none_or(|a| a <= self.shared.io_timeout) =>
            {
                match file.write_all(b"V") {
                    Ok(()) => tracing::info!("watchdog disarmed (the daemon stops)"),
                    Err(e) => tracing::warn!("disarming the watchdog: {e}"),
                }
            }
            _ => tracing::error!("watchdog left armed: a medium write is overdue"),
        }
    }
}

fn pet_while_healthy(s: &Shared, file: File) -> File {
    while !s.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        match oldest_write_age(now) {
            Some(age) if age > s.io_timeout && s.petting.swap(false, Ordering::SeqCst) => {
                tracing::error!(
                    "self-fence: a medium write has been in flight for {age:?}, longer than the I/O timeout {:?}; the watchdog is no longer petted and resets this machine within {} s, before the partner may take over",
                    s.io_timeout,
                    s.timeout_s
                );
            }
            Some(age) if age > s.io_timeout => {}
            _ if s.petting.load(Ordering::SeqCst) => {
                let mut dummy: libc::c_int = 0;
                // SAFETY: WDIOC_KEEPALIVE writes at most one int at the pointer.
                match unsafe { wdioc_keepalive(file.as_raw_fd(), &mut dummy) } {
                    Ok(_) => *s.last_pet.lock().unwrap_or_else(|p| p.into_inner()) = now,
                    Err(e) => tracing::error!("petting the watchdog {}: {e}", s.device.display()),
                }
            }
            // Once a write was overdue the node stays fenced: the reset is the way out.
            _ => {}
        }
        std::thread::sleep(POLL);
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lease_timing_leaves_room_for_a_two_second_watchdog() {
        let t = LeaseTiming {
            renew: Duration::from_millis(1000),
            lease: Duration::from_millis(4000),
            io_timeout: Duration::from_millis(2000),
        };
        // 3 s / 1.1 - 0.25 s = 2.47 s.
        assert_eq!(max_timeout(&t), 2);
        let tight = LeaseTiming {
            renew: Duration::from_millis(300),
            lease: Duration::from_millis(1000),
            io_timeout: Duration::from_millis(300),
        };
        assert_eq!(max_timeout(&tight), 0);
    }
}
