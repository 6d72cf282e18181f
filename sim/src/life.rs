//! A simulated process: every task of one node incarnation (engine background tasks, the
//! link's tasks, the I/O the node serves) runs through its [`Life`], which can freeze them
//! all (SIGSTOP: nothing of the node runs, its timers fire unseen) and kill them all (kill -9
//! or a power cut: the tasks and everything they own are dropped at once).
//!
//! [`SimHost`] is the engine's `Host` for such a process: tokio's paused clock, tasks
//! through the life, blocking work run inline (simulated I/O does not block).

use nvmirror::host::{BoxFuture, Host, TaskHandle};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
struct LifeState {
    paused: bool,
    killed: bool,
    /// Tasks that found the process frozen.
    frozen: Vec<Waker>,
    tasks: Vec<tokio::task::AbortHandle>,
}

pub struct Life {
    state: Mutex<LifeState>,
    /// Every task of the process runs in it: the trace tags log lines with the node.
    span: tracing::Span,
}

impl Life {
    pub fn new(node: &str) -> Arc<Life> {
        Arc::new(Life {
            state: Mutex::new(LifeState::default()),
            span: tracing::info_span!("node", node = node),
        })
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    fn state(&self) -> MutexGuard<'_, LifeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `task` as part of this process.
    pub fn spawn(self: &Arc<Self>, task: impl Future<Output = ()> + Send + 'static) {
        if self.state().killed {
            return;
        }
        use tracing::Instrument;
        let guarded = Guarded {
            inner: Box::pin(task.instrument(self.span.clone())),
            life: self.clone(),
        };
        let handle = tokio::spawn(guarded);
        self.state().tasks.push(handle.abort_handle());
    }

    pub fn pause(&self) {
        self.state().paused = true;
    }

    pub fn resume(&self) {
        let frozen = {
            let mut st = self.state();
            st.paused = false;
            std::mem::take(&mut st.frozen)
        };
        for w in frozen {
            w.wake();
        }
    }

    /// Every task ends at once (their futures are dropped by the runtime).
    pub fn kill(&self) {
        let (tasks, frozen) = {
            let mut st = self.state();
            st.killed = true;
            (
                std::mem::take(&mut st.tasks),
                std::mem::take(&mut st.frozen),
            )
        };
        for t in tasks {
            t.abort();
        }
        for w in frozen {
            w.wake();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.state().paused
    }
}

/// A task of a [`Life`]: runs only while the process runs.
struct Guarded {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    life: Arc<Life>,
}

impl Future for Guarded {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut st = self.life.state();
            if st.killed {
                return Poll::Ready(());
            }
            if st.paused {
                st.frozen.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// A node's monotonic clock: it runs at `rate` times the simulation's (real) time from
/// `origin` on, so two nodes measure the same interval differently (`--clock-drift`). The
/// mirror link's timers run on real time: each clock of a node stays within the drift the
/// engine's leases allow for, as every clock of a real node is.
#[derive(Clone, Copy, Debug)]
pub struct NodeClock {
    pub origin: tokio::time::Instant,
    pub rate: f64,
}

impl NodeClock {
    /// Real time `at` as this clock reads it.
    fn read(&self, at: tokio::time::Instant) -> Instant {
        let since = at.saturating_duration_since(self.origin);
        self.origin.into_std() + since.mul_f64(self.rate)
    }

    /// How much real time passes while this clock advances `d`.
    fn real(&self, d: Duration) -> Duration {
        d.div_f64(self.rate)
    }
}

/// The engine's `Host` inside the simulation.
pub struct SimHost {
    pub life: Arc<Life>,
    /// With `--io-delay`: draws each blocking call's delay, reproducibly (seeded per life).
    pub io_delay: Option<Mutex<ChaCha8Rng>>,
    pub clock: NodeClock,
}

impl Host for SimHost {
    fn now(&self) -> Instant {
        self.clock.read(tokio::time::Instant::now())
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        Box::pin(tokio::time::sleep(self.clock.real(d)))
    }

    fn link_instant(&self, at: Instant) -> Instant {
        self.clock.read(tokio::time::Instant::from_std(at))
    }

    fn spawn(&self, _name: &str, task: BoxFuture<()>) -> std::io::Result<TaskHandle> {
        self.life.spawn(task);
        Ok(TaskHandle::detached())
    }

    fn blocking(&self, work: Box<dyn FnOnce() + Send>) -> BoxFuture<()> {
        // Simulated I/O never blocks: run it here, in simulated zero time.
        work();
        match &self.io_delay {
            None => Box::pin(std::future::ready(())),
            Some(rng) => {
                // 0-2 ms, in whole microseconds.
                let us = rng
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .gen_range(0..2000);
                Box::pin(tokio::time::sleep(Duration::from_micros(us)))
            }
        }
    }
}

/// Holds back some tasks of a running process while the rest of it runs: the mirror link's
/// thread blocked or unscheduled (its heartbeats stop, the engine goes on). Killing or
/// freezing the process still goes through its [`Life`].
#[derive(Default)]
pub struct Stall {
    state: Mutex<(bool, Vec<Waker>)>,
}

impl Stall {
    fn state(&self) -> MutexGuard<'_, (bool, Vec<Waker>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stop(&self) {
        self.state().0 = true;
    }

    pub fn go(&self) {
        let held = {
            let mut st = self.state();
            st.0 = false;
            std::mem::take(&mut st.1)
        };
        for w in held {
            w.wake();
        }
    }
}

/// A task that runs only while its [`Stall`] lets it.
struct Stallable {
    inner: rdma_link::Task,
    stall: Arc<Stall>,
}

impl Future for Stallable {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut st = self.stall.state();
            if st.0 {
                st.1.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// The link's spawner inside the simulation: its tasks belong to the node's life, and
/// `stall` holds them back alone.
pub struct SimSpawner {
    pub life: Arc<Life>,
    pub stall: Arc<Stall>,
}

impl rdma_link::Spawn for SimSpawner {
    fn spawn(&self, task: rdma_link::Task) {
        self.life.spawn(Stallable {
            inner: task,
            stall: self.stall.clone(),
        });
    }
}
