//! The ublk devices one daemon serves: one per LUN, each on its own thread, added at start
//! and added or deleted at run time (`nvmirrorctl add` / `del --lun`). Deleting a device
//! stops only the kernel-facing side: the LUN's staged writes keep flushing and the node
//! keeps mirroring for its partner.

use crate::control::DeviceStatus;
use crate::engine::Engine;
use crate::frontend::{self, Attach, DeviceSpec};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type DeviceThread = JoinHandle<anyhow::Result<()>>;

pub struct DeviceSet {
    engine: Arc<Engine>,
    specs: Vec<DeviceSpec>,
    live: Mutex<Vec<DeviceStatus>>,
    threads: Mutex<Vec<Option<DeviceThread>>>,
    /// LUNs whose device was deleted on purpose (their threads ending is not a failure).
    deleted: Mutex<Vec<bool>>,
}

impl DeviceSet {
    pub fn new(engine: Arc<Engine>, specs: Vec<DeviceSpec>) -> Arc<DeviceSet> {
        let n = specs.len();
        Arc::new(DeviceSet {
            engine,
            specs,
            live: Mutex::default(),
            threads: Mutex::new((0..n).map(|_| None).collect()),
            deleted: Mutex::new(vec![false; n]),
        })
    }

    /// The devices that are live now.
    pub fn statuses(&self) -> Vec<DeviceStatus> {
        self.live.lock().map(|d| d.clone()).unwrap_or_default()
    }

    pub fn lun_index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.lun_name == name)
    }

    /// Starts serving LUN `i` (adds its device, or recovers the one a crashed daemon left).
    /// Returns once the device thread runs; the device is live when it shows in `statuses`.
    pub fn add(self: &Arc<Self>, i: usize) -> anyhow::Result<()> {
        let spec = self
            .specs
            .get(i)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no LUN number {i}"))?;
        let mut threads = self
            .threads
            .lock()
            .map_err(|_| anyhow::anyhow!("device table poisoned"))?;
        if threads[i].as_ref().is_some_and(|t| !t.is_finished()) {
            anyhow::bail!("LUN {} already has a device", spec.lun_name);
        }
        if let Some(old) = threads[i].take() {
            let _ = old.join();
        }
        if let Ok(mut d) = self.deleted.lock() {
            d[i] = false;
        }
        let set = self.clone();
        let name = spec.lun_name.clone();
        threads[i] = Some(
            std::thread::Builder::new()
                .name(format!("lun-{name}"))
                .spawn(move || set.serve(spec))?,
        );
        Ok(())
    }

    fn serve(self: Arc<Self>, spec: DeviceSpec) -> anyhow::Result<()> {
        let (queues, depth, lun_name) = (spec.queues, spec.depth, spec.lun_name.clone());
        let set = self.clone();
        let started = move |ctrl: &libublk::ctrl::UblkCtrl, attach: Attach| {
            let id = ctrl.dev_info().dev_id;
            let path = format!("/dev/ublkb{id}");
            tracing::info!("LUN {lun_name} is live on {path} ({attach:?})");
            if let Ok(mut d) = set.live.lock() {
                d.retain(|x| x.lun != lun_name);
                d.push(DeviceStatus {
                    lun: lun_name.clone(),
                    dev_id: id,
                    path,
                    attach: format!("{attach:?}").to_lowercase(),
                    queues,
                    depth,
                    pid: std::process::id(),
                });
            }
            crate::transitions::changed();
        };
        let lun_name = spec.lun_name.clone();
        let result = frontend::serve(self.engine.clone(), spec, started);
        if let Ok(mut d) = self.live.lock() {
            d.retain(|x| x.lun != lun_name);
        }
        crate::transitions::changed();
        result
    }

    /// Stops and deletes LUN `i`'s device (its pending I/O fails; users must let go first).
    pub fn del(&self, i: usize, timeout: Duration) -> anyhow::Result<u32> {
        let name = &self
            .specs
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("no LUN number {i}"))?
            .lun_name;
        let id = self
            .statuses()
            .iter()
            .find(|d| &d.lun == name)
            .map(|d| d.dev_id)
            .ok_or_else(|| anyhow::anyhow!("LUN {name} has no live device"))?;
        if let Ok(mut d) = self.deleted.lock() {
            d[i] = true;
        }
        let ctrl = libublk::ctrl::UblkCtrl::new_simple(id as i32)
            .map_err(|e| anyhow::anyhow!("ublk device {id}: {e}"))?;
        ctrl.kill_dev()
            .map_err(|e| anyhow::anyhow!("stopping /dev/ublkb{id}: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let done = self
                .threads
                .lock()
                .map(|t| t[i].as_ref().is_none_or(|t| t.is_finished()))
                .unwrap_or(true);
            if done {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("/dev/ublkb{id} did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(mut t) = self.threads.lock() {
            if let Some(Err(e)) = t[i].take().map(|h| h.join()) {
                tracing::warn!("device thread of LUN {name} panicked: {e:?}");
            }
        }
        tracing::warn!("deleted /dev/ublkb{id} of LUN {name} (nvmirrorctl del)");
        Ok(id)
    }

    /// True once every device that was not deleted on purpose has stopped (and at least one
    /// had been started): the daemon has nothing left to serve.
    pub fn all_stopped_unexpectedly(&self) -> bool {
        let (Ok(threads), Ok(deleted)) = (self.threads.lock(), self.deleted.lock()) else {
            return true;
        };
        let expected: Vec<_> = threads
            .iter()
            .zip(deleted.iter())
            .filter(|(_, &d)| !d)
            .collect();
        !expected.is_empty()
            && expected
                .iter()
                .all(|(t, _)| t.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Stops every device (shutdown) and collects the threads' results.
    pub fn stop_all(&self) -> Option<anyhow::Error> {
        for d in self.statuses() {
            if let Ok(ctrl) = libublk::ctrl::UblkCtrl::new_simple(d.dev_id as i32) {
                let _ = ctrl.kill_dev();
            }
        }
        self.join_all()
    }

    /// Waits for every device thread; returns the last failure.
    pub fn join_all(&self) -> Option<anyhow::Error> {
        let threads: Vec<DeviceThread> = match self.threads.lock() {
            Ok(mut t) => t.iter_mut().filter_map(|t| t.take()).collect(),
            Err(_) => return Some(anyhow::anyhow!("device table poisoned")),
        };
        let mut failed = None;
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("{e:#}");
                    failed = Some(e);
                }
                Err(_) => failed = Some(anyhow::anyhow!("a device thread panicked")),
            }
        }
        failed
    }
}
