//! What the engine needs from the machine it runs on: the time, timers, background tasks and
//! a place for blocking work called from async code.
//!
//! The engine never reads the clock or starts a thread by itself; it asks its [`Host`]. On a
//! real machine that is [`SystemHost`] (the monotonic clock, `smol` timers, one OS thread per
//! background task). The deterministic simulator supplies its own: simulated time, and tasks
//! it can freeze (a paused process) or drop (a crash) at any await point.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A background task the host started; `join` waits for it to end.
pub struct TaskHandle(Option<Box<dyn FnOnce() + Send>>);

impl TaskHandle {
    pub fn new(join: impl FnOnce() + Send + 'static) -> TaskHandle {
        TaskHandle(Some(Box::new(join)))
    }

    /// A task whose end nobody waits for (the host tracks it by other means).
    pub fn detached() -> TaskHandle {
        TaskHandle(None)
    }

    pub fn join(mut self) {
        if let Some(join) = self.0.take() {
            join()
        }
    }
}

pub trait Host: Send + Sync + 'static {
    /// The monotonic clock.
    fn now(&self) -> Instant;
    /// Resolves once `d` has passed on [`Host::now`]'s clock.
    fn sleep(&self, d: Duration) -> BoxFuture<()>;
    /// Runs `task` in the background until it ends. It may do blocking I/O (the flusher
    /// writes the medium): on a real machine every task has a thread of its own.
    fn spawn(&self, name: &str, task: BoxFuture<()>) -> std::io::Result<TaskHandle>;
    /// Runs blocking work (a medium read for the partner) without blocking the caller's
    /// executor, e.g. the mirror link's runtime, which also carries the heartbeats.
    fn blocking(&self, work: Box<dyn FnOnce() + Send>) -> BoxFuture<()>;
    /// An instant the mirror link took (on the process's monotonic clock, as the link's
    /// heartbeat times are) on [`Host::now`]'s clock. The same on a real machine; the
    /// simulator runs a node's clock at another rate than its link's (`--clock-drift`).
    fn link_instant(&self, at: Instant) -> Instant {
        at
    }
}

/// Runs `f` through [`Host::blocking`] and returns its result.
pub async fn run_blocking<T: Send + 'static>(
    host: &dyn Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let out = slot.clone();
    host.blocking(Box::new(move || {
        let value = f();
        *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }))
    .await;
    let value = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    // The host runs the work to completion before its future resolves; a panic in the work
    // propagates there.
    value.expect("Host::blocking resolved before its work ran")
}

/// The real machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemHost;

/// The real machine, as the engine takes it.
pub fn system() -> Arc<dyn Host> {
    Arc::new(SystemHost)
}

impl Host for SystemHost {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        // smol's timer has a reactor of its own: it works on every executor the engine's
        // futures run on (ublk queue threads, the link's tokio runtime, plain threads).
        Box::pin(async move {
            smol::Timer::after(d).await;
        })
    }

    fn spawn(&self, name: &str, task: BoxFuture<()>) -> std::io::Result<TaskHandle> {
        let task_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| futures::executor::block_on(task));
                if std::panic::catch_unwind(run).is_err() {
                    // A background task that panicked broke an invariant: fail-stop. A
                    // silently missing flusher would stall every writer instead; a restart
                    // replays the NVRAM and loses nothing.
                    tracing::error!("background task {task_name} panicked; aborting the process");
                    std::process::abort();
                }
            })?;
        Ok(TaskHandle::new(move || {
            let _ = thread.join();
        }))
    }

    fn blocking(&self, work: Box<dyn FnOnce() + Send>) -> BoxFuture<()> {
        Box::pin(smol::unblock(work))
    }
}

/// A clock a test moves by hand; timers never fire, spawned tasks never run.
#[cfg(test)]
pub(crate) struct ManualClock {
    base: Instant,
    offset: std::sync::Mutex<Duration>,
}

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock {
            base: Instant::now(),
            offset: std::sync::Mutex::new(Duration::ZERO),
        }
    }
}

#[cfg(test)]
impl ManualClock {
    pub(crate) fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner()) += d;
    }
}

#[cfg(test)]
impl Host for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn sleep(&self, _: Duration) -> BoxFuture<()> {
        Box::pin(std::future::pending())
    }
    fn spawn(&self, _: &str, _: BoxFuture<()>) -> std::io::Result<TaskHandle> {
        Ok(TaskHandle::detached())
    }
    fn blocking(&self, work: Box<dyn FnOnce() + Send>) -> BoxFuture<()> {
        work();
        Box::pin(std::future::ready(()))
    }
}
