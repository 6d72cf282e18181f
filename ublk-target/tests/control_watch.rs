//! `Request::Watch` over a real control socket: the daemon pushes a status when its state
//! changes and only then, refuses a bad interval, keeps answering other requests meanwhile,
//! and stops checking once the client hangs up.

use nvmirror::control::{self, DaemonStatus, Request, Response, Watch};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const FIXTURE: &str = include_str!("data/status-node-b.json");

struct FakeNode {
    /// Range lun0:0's epoch, the state under watch.
    epoch: AtomicU64,
    /// Bytes written: a counter that changes without being an event.
    writes: AtomicU64,
    status_calls: AtomicUsize,
}

impl FakeNode {
    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                self.status_calls.fetch_add(1, Ordering::SeqCst);
                let mut s: DaemonStatus = match serde_json::from_str(FIXTURE) {
                    Ok(s) => s,
                    Err(e) => panic!("fixture does not match DaemonStatus: {e}"),
                };
                s.engine.ranges[0].epoch = self.epoch.load(Ordering::SeqCst);
                s.engine.luns[0].writes = self.writes.fetch_add(1, Ordering::SeqCst);
                Response::Status(Box::new(s))
            }
            _ => Response::Ok,
        }
    }
}

fn expect_status(w: &mut Watch, within: Duration) -> DaemonStatus {
    match w.next(within) {
        Ok(Some(s)) => s,
        Ok(None) => panic!("no status pushed within {within:?}"),
        Err(e) => panic!("watch failed: {e}"),
    }
}

#[test]
fn watch_pushes_changes_only_and_ends_with_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ctl.sock");
    let node = Arc::new(FakeNode {
        epoch: AtomicU64::new(2),
        writes: AtomicU64::new(0),
        status_calls: AtomicUsize::new(0),
    });
    let n = node.clone();
    control::serve(
        &socket,
        Arc::new(move |req| n.handle(req)),
        nvmirror::state_events::same_state,
    )
    .expect("serve");

    let mut w = Watch::start(&socket, 10).expect("watch");
    assert_eq!(
        expect_status(&mut w, Duration::from_secs(5)).engine.ranges[0].epoch,
        2
    );
    // Checked many times meanwhile (the write counter moved each time): nothing pushed.
    let calls = node.status_calls.load(Ordering::SeqCst);
    assert!(matches!(w.next(Duration::from_millis(300)), Ok(None)));
    assert!(node.status_calls.load(Ordering::SeqCst) >= calls + 5);

    // Other requests are answered while the stream is open.
    match control::call(&socket, &Request::FlushPause, Duration::from_secs(5)) {
        Ok(Response::Ok) => {}
        other => panic!("a request beside the watch: {other:?}"),
    }

    node.epoch.store(7, Ordering::SeqCst);
    assert_eq!(
        expect_status(&mut w, Duration::from_secs(5)).engine.ranges[0].epoch,
        7
    );

    // Hanging up ends the daemon's checks at once, not at the next change.
    drop(w);
    std::thread::sleep(Duration::from_millis(100));
    let after_hangup = node.status_calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(node.status_calls.load(Ordering::SeqCst), after_hangup);

    // An interval out of range is refused with the range.
    let mut bad = Watch::start(&socket, 1).expect("watch");
    match bad.next(Duration::from_secs(5)) {
        Err(e) => assert!(e.to_string().contains("use 10 to 60000"), "{e}"),
        other => panic!("interval 1 ms accepted: {other:?}"),
    }
}
