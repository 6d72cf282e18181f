//! A clustered engine with a disk lease stops: `Engine::shutdown` joins every task it
//! started, so a task that runs until the engine stops (lease-follow) must end on it. A
//! graceful `nvmirrord` stop once hung here for good (found by tests/vm/25-restart-partner).

use nvmirror::config::NodeConfig;
use nvmirror::engine::{Engine, OpenMode};
use std::sync::mpsc;
use std::time::Duration;

fn config(dir: &std::path::Path) -> NodeConfig {
    let medium = dir.join("medium.img");
    std::fs::File::create(&medium)
        .and_then(|f| f.set_len(64 << 20))
        .expect("medium file");
    std::fs::write(dir.join("secret"), "a secret of more than sixteen bytes").expect("secret");
    let text = format!(
        r#"
[node]
name = "node-a"

[nvram]
path = "{nvram}"
size = "16MiB"
partitions = 2

[cluster]
id = 7
secret_file = "{secret}"
takeover = "manual"
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
disk_heartbeat_ms = 50
disk_lease_ms = 400
medium_io_timeout_ms = 100

[[cluster.node]]
name = "node-a"
address = "127.0.0.1:1"

[[cluster.node]]
name = "node-b"
address = "127.0.0.1:2"

[[lun]]
name = "lun0"
medium = "{medium}"
device_id = 0
ranges = 2
"#,
        nvram = dir.join("nvram.img").display(),
        secret = dir.join("secret").display(),
        medium = medium.display(),
    );
    NodeConfig::parse(&text).expect("valid config")
}

fn stops_within_20_s(release_first: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let engine = Engine::open_config(&cfg, "test.toml", OpenMode::Normal).expect("open");
    assert!(engine.may_serve(), "the lease is held after open");
    if release_first {
        let lease = engine.cluster().and_then(|c| c.lease()).expect("a lease");
        lease.release().expect("release");
    }
    let (done, stopped) = mpsc::channel();
    std::thread::spawn(move || {
        engine.shutdown();
        let _ = done.send(());
    });
    stopped
        .recv_timeout(Duration::from_secs(20))
        .expect("Engine::shutdown returned (a task ignored the stop)");
}

#[test]
fn an_engine_holding_its_disk_lease_shuts_down() {
    stops_within_20_s(false);
}

#[test]
fn an_engine_that_released_its_disk_lease_shuts_down() {
    stops_within_20_s(true);
}
