//! The real `nvmirror-tiebreaker` process, for the tests that need a third voter
//! (`tiebreaker.rs`, `voters.rs`): node ids 1 and 2 are the data nodes, 3 the tie-breaker;
//! its secret is `DIR/secret` and its state `DIR/tiebreaker.state`.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const TIEBREAKER: u32 = 3;

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The tie-breaker of `cluster` serving node 1 at `serve[0]` and node 2 at `serve[1]`, its
/// stderr piped; `--init` when `init`.
pub fn command(cluster: u64, dir: &Path, serve: [SocketAddr; 2], init: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvmirror-tiebreaker"));
    c.arg("--cluster-id")
        .arg(format!("{cluster:#x}"))
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .arg("--node-id")
        .arg(TIEBREAKER.to_string())
        .arg("--serve")
        .arg(format!("1={}", serve[0]))
        .arg("--serve")
        .arg(format!("2={}", serve[1]))
        .arg("--state")
        .arg(dir.join("tiebreaker.state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if init {
        c.arg("--init");
    }
    c
}

/// A child process killed (-9) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
