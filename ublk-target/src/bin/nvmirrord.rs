//! nvmirrord: serves a node's LUNs as ublk block devices. Parses its arguments and the
//! config, then runs the node (`nvmirror::node::daemon`).

use clap::Parser;
use nvmirror::config::NodeConfig;
use nvmirror::node::daemon::{self, DaemonArgs};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "nvmirror node daemon: NVRAM-staged ublk block devices"
)]
struct Args {
    /// The node's TOML configuration.
    #[arg(long, short)]
    config: PathBuf,
    /// Where device ids are remembered between runs (for crash recovery).
    #[arg(long, default_value = "/run/nvmirror")]
    state_dir: PathBuf,
}

/// Exit codes (documented in the README).
const EXIT_CONFIG: i32 = 2;
const EXIT_START: i32 = 1;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nvmirrord: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let args = DaemonArgs {
        config: args.config,
        state_dir: args.state_dir,
    };
    if let Err(e) = daemon::run(args, cfg) {
        eprintln!("nvmirrord: {e:#}");
        std::process::exit(EXIT_START);
    }
}
