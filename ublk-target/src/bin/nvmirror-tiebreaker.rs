//! nvmirror-tiebreaker: the diskless third voter of a shared-nothing pair. Parses its
//! arguments, then serves (`nvmirror::node::tiebreaker`).

use clap::Parser;
use nvmirror::node::tiebreaker::{self, TieBreakerArgs};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = tiebreaker::run(TieBreakerArgs::parse()) {
        eprintln!("nvmirror-tiebreaker: {e:#}");
        std::process::exit(1);
    }
}
