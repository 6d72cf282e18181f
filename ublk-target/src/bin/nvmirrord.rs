//! nvmirrord: serves a node's LUNs as ublk block devices. Parses its arguments and the
//! config, then runs the node (`nvmirror::node::daemon`).

use clap::Parser;
use nvmirror::config::NodeConfig;
use nvmirror::node::daemon::{self, DaemonArgs};

/// Exit codes (documented in the README).
const EXIT_CONFIG: i32 = 2;
const EXIT_START: i32 = 1;

fn main() {
    let journal = init_logging();
    let args = DaemonArgs::parse();
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => fatal(journal, EXIT_CONFIG, &e.to_string()),
    };
    if let Err(e) = daemon::run(args, cfg) {
        fatal(journal, EXIT_START, &format!("{e:#}"));
    }
}

/// The last word before exiting: to the journal with error priority when logging goes there
/// (stderr would land at info), else to stderr.
fn fatal(journal: bool, code: i32, message: &str) -> ! {
    if journal {
        tracing::error!("{message}");
    } else {
        eprintln!("nvmirrord: {message}");
    }
    std::process::exit(code);
}

/// Logs to the journal, with each event's priority (`journalctl -p warning` shows warnings
/// and errors only), when systemd connected stderr to it; else to stderr. Returns whether
/// the journal gets the logs.
fn init_logging() -> bool {
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if stderr_is_the_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            // syslog's usual reading (tracing-journald would put info at notice).
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            tracing_subscriber::registry()
                .with(filter())
                .with(
                    journald
                        .with_syslog_identifier("nvmirrord".into())
                        .with_priority_mappings(priorities),
                )
                .init();
            return true;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    false
}

/// systemd sets `JOURNAL_STREAM` to "device:inode" of the stream it gave the service
/// (systemd.exec(5)); stderr is the journal when it is that stream (and not redirected).
fn stderr_is_the_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}
