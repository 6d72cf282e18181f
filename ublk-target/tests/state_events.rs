//! `nvmirrorctl events` over the control socket (`Request::Watch`): the engine raises each
//! transition, so the stream pushes a state as it happens, even one far shorter than the
//! stream's polling interval.

use nvmirror::control::{self, DaemonStatus, Request, Response};
use nvmirror::engine::{Engine, EngineOptions, LunSpec};
use nvmirror::medium::MemMedium;
use nvmirror::nvram::NvramRegion;
use nvmirror::state_events;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn open(dir: &std::path::Path) -> Arc<Engine> {
    let region = NvramRegion::open(&dir.join("nvram"), Some(16 * MIB)).expect("nvram");
    Engine::open(
        region,
        EngineOptions::single_node("node-a", 2),
        vec![LunSpec {
            name: "lun0".into(),
            size: 8 * MIB,
            ranges: 2,
            medium: Arc::new(MemMedium::new(8 * MIB)),
        }],
    )
    .expect("open")
}

fn serve(engine: Arc<Engine>, socket: &std::path::Path) {
    let handler = move |req: Request| match req {
        Request::Status => Response::Status(Box::new(DaemonStatus {
            version: "test".into(),
            pid: std::process::id(),
            config: "test".into(),
            devices: Vec::new(),
            engine: engine.status(),
            watchdog: None,
        })),
        other => Response::Error {
            message: format!("not served in this test: {other:?}"),
        },
    };
    control::serve(socket, Arc::new(handler), state_events::same_state).expect("serve");
}

fn paused(s: &DaemonStatus) -> Vec<bool> {
    s.engine.partitions.iter().map(|p| p.flush_paused).collect()
}

/// An engine, its control socket, and a stream of its status with a minute between polls
/// (anything pushed sooner was raised by the engine), with the first status it pushed.
fn watched_engine() -> (tempfile::TempDir, Arc<Engine>, control::Watch, DaemonStatus) {
    let dir = tempfile::tempdir().expect("tmp");
    let engine = open(dir.path());
    let socket = dir.path().join("control.sock");
    serve(engine.clone(), &socket);
    let mut watch = control::Watch::start(&socket, 60_000).expect("watch");
    let first = watch
        .next(Duration::from_secs(10))
        .expect("first status")
        .expect("the current state at once");
    (dir, engine, watch, first)
}

#[test]
fn a_state_shorter_than_the_polling_interval_is_pushed_as_it_happens() {
    let (_dir, engine, mut watch, first) = watched_engine();
    assert_eq!(paused(&first), [false, false]);

    let started = Instant::now();
    engine.set_flush_paused(true);
    // Paused for a moment only, as `flush pause` then `flush resume` would.
    std::thread::sleep(Duration::from_secs(1));
    engine.set_flush_paused(false);

    // Each partition pauses in turn, so a push may show some paused and not others.
    let all_paused = vec![true, true];
    let none_paused = vec![false, false];
    let mut seen: Vec<Vec<bool>> = Vec::new();
    let done = |seen: &[Vec<bool>]| {
        seen.iter()
            .position(|s| *s == all_paused)
            .is_some_and(|i| seen[i..].contains(&none_paused))
    };
    while !done(&seen) {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "pushed only {seen:?} in 20 s");
        if let Some(s) = watch.next(left).expect("a pushed status") {
            seen.push(paused(&s));
        }
    }
}

#[test]
fn a_failed_partition_is_pushed_with_its_reason() {
    let (_dir, engine, mut watch, first) = watched_engine();
    let before = state_events::snapshot(&first);

    engine.stop_serving_volume("the destination exported this volume");
    let started = Instant::now();
    let after = loop {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "no push within 20 s of the failure");
        if let Some(s) = watch.next(left).expect("a pushed status") {
            break s;
        }
    };
    let lines: Vec<String> = state_events::diff(&before, &state_events::snapshot(&after))
        .iter()
        .map(state_events::Event::render)
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("change partition 0 failed:") && l.contains("exported")),
        "{lines:?}"
    );
}
