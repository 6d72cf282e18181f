//! The ublk frontend: a thin adapter from `/dev/ublkbN` requests to the engine.
//!
//! One thread per ublk queue runs a single-threaded executor with one task per tag:
//! fetch a request -> call the engine -> commit the result -> fetch the next. Engine futures
//! may complete on other threads (the mirror link's, another queue's group commit, the
//! flusher for write-through), which cannot wake a thread sleeping in io_uring_enter; so every
//! wake-up also writes the queue's eventfd, on which a read is always pending in the ring.

use crate::block::{BLOCK_SIZE, MAX_IO_BYTES};
use crate::engine::{Engine, IoError, MediumReads};
use crate::io_latency::IoKind;
use crate::medium::Medium;
use anyhow::{bail, Context};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// What the daemon asks the frontend to expose.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub lun_index: usize,
    pub lun_name: String,
    pub node: String,
    pub size: u64,
    /// Fixed id from the config, if any; otherwise the id saved by the previous run is
    /// reused (so a crashed device is recovered), else the kernel picks one.
    pub dev_id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Keep each queue thread on its kernel-mapped CPUs (`lun.pin_queues`).
    pub pin_queues: bool,
    pub config_path: String,
    pub state_dir: PathBuf,
}

impl DeviceSpec {
    fn id_file(&self) -> PathBuf {
        self.state_dir
            .join(format!("{}.{}.devid", self.node, self.lun_name))
    }
}

/// How a device came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Added,
    Recovered,
}

fn ublk_char_exists(id: u32) -> bool {
    std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Decides between adding a new device and recovering one a crashed daemon left behind.
fn plan_attach(spec: &DeviceSpec) -> anyhow::Result<(i32, Attach)> {
    let saved = std::fs::read_to_string(spec.id_file())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let Some(id) = spec.dev_id.or(saved) else {
        return Ok((-1, Attach::Added));
    };
    if !ublk_char_exists(id) {
        return Ok((id as i32, Attach::Added));
    }
    // The kernel moves a device to QUIESCED once the dead daemon's last reference is gone;
    // give that a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ctrl = UblkCtrl::new_simple(id as i32)
            .map_err(|e| anyhow::anyhow!("querying ublk device {id}: {e}"))?;
        let info = ctrl.dev_info();
        match info.state as u32 {
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => {
                return Ok((id as i32, Attach::Recovered))
            }
            sys::UBLK_S_DEV_LIVE if process_alive(info.ublksrv_pid) => bail!(
                "ublk device {id} (/dev/ublkb{id}) is already served by process {}; stop it first \
                 or choose another lun.device_id",
                info.ublksrv_pid
            ),
            sys::UBLK_S_DEV_DEAD => {
                // Added but never started (a daemon died during start-up): start over.
                let _ = ctrl.del_dev();
                return Ok((id as i32, Attach::Added));
            }
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            state => bail!(
                "ublk device {id} is in state {state} and its daemon (pid {}) is gone, but the \
                 kernel did not quiesce it; delete it with `nvmirrorctl del {id}`",
                info.ublksrv_pid
            ),
        }
    }
}

/// Serves one LUN as a ublk device until the device is stopped. `on_started` runs once the
/// device is live (or recovered).
pub fn serve(
    engine: Arc<Engine>,
    spec: DeviceSpec,
    on_started: impl FnOnce(&UblkCtrl, Attach) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let (id, attach) = plan_attach(&spec)?;
    if attach == Attach::Recovered {
        let ctrl =
            UblkCtrl::new_simple(id).map_err(|e| anyhow::anyhow!("ublk device {id}: {e}"))?;
        ctrl.start_user_recover()
            .map_err(|e| anyhow::anyhow!("starting user recovery of ublk device {id}: {e}"))?;
        tracing::info!("recovering /dev/ublkb{id} left by a previous nvmirrord");
    }
    let ctrl = UblkCtrlBuilder::default()
        .name("nvmirror")
        .id(id)
        .nr_queues(spec.queues)
        .depth(spec.depth)
        .io_buf_bytes(MAX_IO_BYTES as u32)
        // User recovery keeps /dev/ublkbN alive across a daemon crash; reissue sends the
        // requests that were in flight to the restarted daemon instead of failing them.
        .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64)
        .dev_flags(match attach {
            Attach::Added => UblkFlags::UBLK_DEV_F_ADD_DEV,
            Attach::Recovered => UblkFlags::UBLK_DEV_F_RECOVER_DEV,
        })
        .build()
        .map_err(|e| anyhow::anyhow!("creating ublk device (is ublk_drv loaded?): {e}"))?;
    let dev_id = ctrl.dev_info().dev_id;
    std::fs::create_dir_all(&spec.state_dir)
        .and_then(|_| std::fs::write(spec.id_file(), format!("{dev_id}\n")))
        .with_context(|| format!("saving the device id under {}", spec.state_dir.display()))?;

    let size = spec.size;
    let target_json = serde_json::json!({
        "nvmirror": {
            "node": spec.node,
            "lun": spec.lun_name,
            "config": spec.config_path,
        }
    });
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size);
        dev.set_target_json(target_json);
        Ok(())
    };
    let lun = spec.lun_index;
    let q_engine = engine.clone();
    let queue_threads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let q_threads = queue_threads.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        q_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(nix::unistd::gettid());
        if let Err(e) = run_queue(qid, dev, q_engine, lun) {
            tracing::error!("ublk queue {qid} stopped: {e}");
        }
    };
    let unpin_to = (!spec.pin_queues)
        .then(DaemonCpus::of_this_thread)
        .flatten();
    ctrl.run_target(tgt_init, q_fn, move |c: &UblkCtrl| {
        // libublk has placed every queue thread by now (before the device started), and
        // every queue thread has noted itself (the start waits for each queue's first
        // fetch).
        if let Some(cpus) = &unpin_to {
            let tids = queue_threads.lock().unwrap_or_else(|p| p.into_inner());
            cpus.apply_to(&tids, dev_id);
        }
        on_started(c, attach)
    })
    .map_err(|e| anyhow::anyhow!("running ublk device {dev_id}: {e}"))?;
    // Stopped on purpose: remove the device. The asynchronous delete returns at once even
    // when a holder (a mount, a device-mapper table) still has /dev/ublkbN open, which a
    // synchronous one (what dropping `ctrl` would do) waits for, forever, before the staged
    // writes were drained. Kernels before 6.9 lack it; they get the synchronous delete.
    if ctrl.del_dev_async().is_err() {
        let _ = ctrl.del_dev();
    }
    wait_until_freed(dev_id);
    Ok(())
}

/// The CPUs this daemon may run on, for queue threads that are not pinned (`lun.pin_queues
/// = false`). libublk places each queue thread on the CPUs the kernel maps to its queue; with
/// one queue per CPU that is one CPU, the one whose processes submit to that queue, so the
/// queue thread and the submitter take turns on it while other CPUs idle (one node, 4 KiB
/// random reads at QD32 in the 2-vCPU test VM: 8.6k IOPS pinned, 13.6k unpinned).
struct DaemonCpus(CpuSet);

impl DaemonCpus {
    fn of_this_thread() -> Option<DaemonCpus> {
        match sched_getaffinity(Pid::from_raw(0)) {
            Ok(set) => Some(DaemonCpus(set)),
            Err(e) => {
                tracing::warn!(
                    "reading this daemon's CPU affinity failed ({e}): ublk queue threads stay \
                     where libublk placed them"
                );
                None
            }
        }
    }

    fn list(&self) -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|&c| self.0.is_set(c).unwrap_or(false))
            .collect()
    }

    fn apply_to(&self, tids: &[Pid], dev_id: u32) {
        for &tid in tids {
            if let Err(e) = sched_setaffinity(tid, &self.0) {
                tracing::warn!(
                    "widening the CPU affinity of /dev/ublkb{dev_id}'s queue thread {tid} \
                     failed: {e}"
                );
            }
        }
        tracing::info!(
            "/dev/ublkb{dev_id}: {} queue thread(s) may run on CPUs {:?} (lun.pin_queues = \
             false)",
            tids.len(),
            self.list()
        );
    }
}

/// Waits (bounded) until the kernel has freed a deleted device, so that a daemon started
/// next finds its id free, as a synchronous delete guaranteed; a device still held open
/// stays until its holder lets go, which is said, not waited for. A synchronous delete of
/// the deleted device is what waits: on a thread of its own, left blocked in the kernel
/// when the holder stays (the process's exit interrupts it).
fn wait_until_freed(dev_id: u32) {
    let (freed, on_freed) = std::sync::mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name(format!("ublk-free-{dev_id}"))
        .spawn(move || {
            if let Ok(ctrl) = UblkCtrl::new_simple(dev_id as i32) {
                let _ = ctrl.del_dev();
            }
            let _ = freed.send(());
        });
    if waiter.is_ok() && on_freed.recv_timeout(Duration::from_secs(10)).is_err() {
        tracing::warn!(
            "/dev/ublkb{dev_id} is deleted but still held open (a mount, or a device-mapper or \
             LVM table on it?): the kernel frees it when that holder closes it, and until then \
             device id {dev_id} cannot be used again"
        );
    }
}

fn set_params(dev: &mut UblkDev, size: u64) {
    let depth = dev.dev_info.queue_depth;
    let shift = BLOCK_SIZE.trailing_zeros() as u8;
    let tgt = &mut dev.tgt;
    tgt.dev_size = size;
    // One SQE per tag, a medium read or two per tag, and the eventfd read (a full ring is
    // submitted and retried, not an error).
    tgt.sq_depth = depth * 3;
    tgt.cq_depth = depth * 3;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // No UBLK_ATTR_VOLATILE_CACHE: a completed write is durable in NVRAM, so the
            // device is write-through and the kernel need not send FLUSH or FUA.
            attrs: 0,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: (MAX_IO_BYTES >> 9) as u32,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: BLOCK_SIZE as u32,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Reads the medium on the queue's own io_uring: a queue keeps as many reads in flight as it
/// has tags, and its thread never blocks on one.
struct RingReads;

impl MediumReads for RingReads {
    async fn read(&self, medium: &dyn Medium, out: &mut [u8], off: u64) -> io::Result<()> {
        let Some(fd) = medium.direct_read_fd() else {
            return medium.read_at(out, off);
        };
        let mut done = 0usize;
        while done < out.len() {
            let rest = &mut out[done..];
            // The buffer is the tag's, which lives until the queue thread exits; the tag's
            // task completes this read before it commits the request.
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(fd),
                rest.as_mut_ptr(),
                rest.len() as u32,
            )
            .offset(off + done as u64)
            .build();
            let res = ublk_submit_sqe_async(sqe, libublk::UblkUringData::Target as u64)
                .await
                .map_err(|e| io::Error::other(format!("queueing a medium read: {e}")))?;
            match res {
                n if n < 0 => return Err(io::Error::from_raw_os_error(-n)),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the medium ended before the read did",
                    ))
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }
}

/// Wakes the task and, when woken from another thread, kicks the queue thread out of
/// io_uring_enter. A wake-up on the queue thread itself (a medium read completed on its
/// ring) needs no kick: the thread is running its executor.
struct QueueWaker {
    task: Waker,
    eventfd: i32,
    queue_thread: std::thread::ThreadId,
}

impl Wake for QueueWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.task.wake_by_ref();
        if std::thread::current().id() == self.queue_thread {
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to an eventfd the queue owns for its whole lifetime (the
        // engine completes every request before the queue thread exits). A failed write
        // (counter saturated) still leaves the fd readable, so the wake-up is not lost.
        unsafe { libc::write(self.eventfd, one.as_ptr().cast(), one.len()) };
    }
}

/// Runs an engine future so that its wake-ups reach the queue thread.
struct Kicked<F> {
    inner: F,
    eventfd: i32,
    /// The task's waker and the kicking waker built from it at the first poll (rebuilt only
    /// if the task's waker changes): no allocation per poll.
    wakers: Option<(Waker, Waker)>,
}

impl<F> Kicked<F> {
    fn new(inner: F, eventfd: i32) -> Kicked<F> {
        Kicked {
            inner,
            eventfd,
            wakers: None,
        }
    }
}

impl<F: Future + Unpin> Future for Kicked<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let wakers = match this.wakers.take() {
            Some((task, kicking)) if task.will_wake(cx.waker()) => (task, kicking),
            _ => {
                let kicking = Waker::from(Arc::new(QueueWaker {
                    task: cx.waker().clone(),
                    eventfd: this.eventfd,
                    queue_thread: std::thread::current().id(),
                }));
                (cx.waker().clone(), kicking)
            }
        };
        let mut cx2 = TaskContext::from_waker(&wakers.1);
        let polled = Pin::new(&mut this.inner).poll(&mut cx2);
        this.wakers = Some(wakers);
        polled
    }
}

fn run_queue(qid: u16, dev: &UblkDev, engine: Arc<Engine>, lun: usize) -> anyhow::Result<()> {
    let efd: OwnedFd =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .context("creating the queue eventfd")?
            .into();
    let raw_efd = efd.as_raw_fd();
    let q = Rc::new(UblkQueue::new(qid, dev).map_err(|e| anyhow::anyhow!("queue {qid}: {e}"))?);
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tag_tasks = Vec::new();
    for tag in q.tags() {
        let (q, engine) = (q.clone(), engine.clone());
        tag_tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, &engine, lun, raw_efd).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    // Keeps a read pending on the eventfd so cross-thread wake-ups end io_uring_enter.
    let _pump = exe.spawn(async move {
        let mut buf = [0u8; 8];
        loop {
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(raw_efd),
                buf.as_mut_ptr(),
                buf.len() as u32,
            )
            .build();
            if ublk_submit_sqe_async(sqe, libublk::UblkUringData::Target as u64)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let run_exe = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while run_exe.try_tick() {};
        let done = || tag_tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!("queue {qid} event loop: {e}");
        }
    }));
    drop(efd);
    Ok(())
}

async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    engine: &Engine,
    lun: usize,
    eventfd: i32,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(q, tag, engine, lun, buf.as_mut_slice(), eventfd).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

async fn handle(
    q: &UblkQueue<'_>,
    tag: u16,
    engine: &Engine,
    lun: usize,
    buf: &mut [u8],
    eventfd: i32,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let bytes = (iod.nr_sectors as u64) << 9;
    if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) && bytes as usize > buf.len() {
        return -libc::EINVAL;
    }
    let kind = match op {
        sys::UBLK_IO_OP_READ => IoKind::Read,
        sys::UBLK_IO_OP_WRITE => IoKind::Write,
        sys::UBLK_IO_OP_FLUSH => IoKind::Flush,
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => IoKind::Discard,
        _ => return -libc::EOPNOTSUPP,
    };
    let started = Instant::now();
    let result: Result<(), IoError> = match kind {
        IoKind::Read => {
            Kicked::new(
                Box::pin(engine.read_routed_via(
                    lun,
                    offset,
                    &mut buf[..bytes as usize],
                    &RingReads,
                )),
                eventfd,
            )
            .await
        }
        IoKind::Write => {
            Kicked::new(
                Box::pin(engine.write(lun, offset, &buf[..bytes as usize])),
                eventfd,
            )
            .await
        }
        IoKind::Flush => engine.flush(),
        IoKind::Discard => {
            Kicked::new(Box::pin(engine.write_zeroes(lun, offset, bytes)), eventfd).await
        }
    };
    if let Some(l) = engine.luns().get(lun) {
        l.stats
            .latency
            .of(kind)
            .record(started.elapsed(), result.is_ok());
    }
    match result {
        Ok(()) => bytes as i32,
        Err(e) => {
            tracing::error!("I/O op {op} at {offset}+{bytes} failed: {e}");
            -e.errno
        }
    }
}
