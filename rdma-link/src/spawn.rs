//! How the link runs its background tasks. Every task — the connection driver, the listener's
//! handshakes, a TCP connection's reader, the request handlers — goes through the [`Spawn`]
//! given at start (tokio by default; a simulator passes its own, so it can freeze or kill all
//! tasks of a node). The link counts its tasks, can stop one (the reader of a closed
//! connection) or all of them (a crash, the end of the link), and can wait until none is left.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// One task of the link, ready to run.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs the link's tasks. The tasks use tokio's timers (and, for TCP and RDMA, tokio's I/O
/// driver), so they must run inside a tokio runtime with those enabled.
///
/// A simulator wraps each task it is given, e.g. in a future that returns `Pending` while its
/// node is frozen (a paused process) and `Ready` once its node is killed (the task and
/// everything it owns are dropped, like the memory of a killed process).
pub trait Spawn: Send + Sync + 'static {
    /// Run `task` concurrently until it completes — or drop it; the link then takes the task as
    /// ended. Must not poll it before returning.
    fn spawn(&self, task: Task);
}

/// The default: a task of the given tokio runtime.
impl Spawn for tokio::runtime::Handle {
    fn spawn(&self, task: Task) {
        // Detached: the link keeps track of its tasks itself (see `Tasks`).
        drop(tokio::runtime::Handle::spawn(self, task));
    }
}

/// The tasks of one link.
pub(crate) struct Tasks {
    spawner: Arc<dyn Spawn>,
    /// Raised once: every task of the link stops at its next poll.
    kill: watch::Sender<bool>,
    /// Tasks not finished yet.
    live: Arc<watch::Sender<usize>>,
}

/// One task, for stopping it or waiting for its end. Dropping the handle detaches the task (it
/// still ends with the link).
pub(crate) struct TaskHandle {
    abort: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

impl TaskHandle {
    /// Stop the task at its next poll (only tasks started with `spawn_abortable`).
    pub(crate) fn abort(&self) {
        self.abort.send_replace(true);
    }

    pub(crate) fn is_finished(&self) -> bool {
        // A dropped sender: the spawner dropped the task.
        *self.done.borrow() || self.done.has_changed().is_err()
    }

    /// Wait until the task has ended; its future has been dropped when this returns.
    pub(crate) async fn join(mut self) {
        let _ = self.done.wait_for(|d| *d).await;
    }
}

/// Counts a task as live from its creation until its future is dropped.
struct Live(Arc<watch::Sender<usize>>);

impl Live {
    fn new(count: Arc<watch::Sender<usize>>) -> Live {
        count.send_modify(|n| *n += 1);
        Live(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Resolves once the flag is raised; never if its sender is gone without raising it.
async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Tasks {
    pub(crate) fn new(spawner: Arc<dyn Spawn>) -> Tasks {
        Tasks {
            spawner,
            kill: watch::Sender::new(false),
            live: Arc::new(watch::Sender::new(0)),
        }
    }

    pub(crate) fn spawn<F>(&self, fut: F) -> TaskHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.start(fut, false)
    }

    /// A task that [`TaskHandle::abort`] can stop.
    pub(crate) fn spawn_abortable<F>(&self, fut: F) -> TaskHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.start(fut, true)
    }

    fn start<F>(&self, fut: F, abortable: bool) -> TaskHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (done_tx, done) = watch::channel(false);
        let (abort, mut aborted) = watch::channel(false);
        let mut killed = self.kill.subscribe();
        let live = Live::new(self.live.clone());
        self.spawner.spawn(Box::pin(async move {
            let _live = live;
            tokio::select! {
                biased;
                () = raised(&mut killed) => {}
                () = raised(&mut aborted), if abortable => {}
                () = fut => {}
            }
            done_tx.send_replace(true);
        }));
        TaskHandle { abort, done }
    }

    /// Stop every task of the link at its next poll, without any goodbye (a crash, or what is
    /// left when the link has ended).
    pub(crate) fn kill(&self) {
        self.kill.send_replace(true);
    }

    /// Wait until no task of the link is left.
    pub(crate) async fn idle(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

/// Runs a future and turns a panic while it is polled into `Err(message)`: a request
/// handler's panic is reported to the requester, whatever runs the task.
pub(crate) struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> CatchUnwind<F> {
    pub(crate) fn new(fut: F) -> Self {
        CatchUnwind(Box::pin(fut))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        // AssertUnwindSafe: after a panic the future is never polled again (we return Ready).
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(if let Some(s) = panic.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = panic.downcast_ref::<String>() {
                s.clone()
            } else {
                "a panic without a message".to_string()
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn tasks() -> Tasks {
        Tasks::new(Arc::new(tokio::runtime::Handle::current()))
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_are_counted_aborted_and_killed() {
        let t = tasks();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let quick = t.spawn(async move {
            r.fetch_add(1, Ordering::Relaxed);
        });
        let forever = t.spawn_abortable(std::future::pending());
        let detached = t.spawn(std::future::pending());
        drop(detached); // detached, not stopped
        quick.join().await;
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert!(!forever.is_finished());
        forever.abort();
        forever.join().await;
        assert_eq!(*t.live.borrow(), 1, "the detached task still runs");
        // Killing stops every task, including one started afterwards.
        t.kill();
        let late = t.spawn(std::future::pending());
        tokio::time::timeout(Duration::from_secs(1), t.idle())
            .await
            .expect("every task ends once killed");
        assert!(late.is_finished());
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error() {
        let r = CatchUnwind::new(async { panic!("on purpose") }).await;
        assert_eq!(r, Err::<(), _>("on purpose".to_string()));
        let r = CatchUnwind::new(async { 7 }).await;
        assert_eq!(r, Ok(7));
    }
}
