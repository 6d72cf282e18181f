//! The daemon's stop signals: SIGTERM and SIGINT stop it (drained), SIGHUP is logged and
//! ignored. They are blocked in every thread and taken by one with sigwait.

use anyhow::Context;

/// Signals are taken by one thread with sigwait; they are blocked before any thread starts.
pub fn block_stop_signals() -> anyhow::Result<nix::sys::signal::SigSet> {
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    Ok(signals)
}

/// Waits for SIGTERM or SIGINT. SIGHUP (a closed terminal, `kill -HUP`) must not stop the
/// daemon as its default action would, undrained: the config is read at start only, so it
/// is logged and ignored.
pub fn wait_for_stop_signal(
    signals: &nix::sys::signal::SigSet,
) -> nix::Result<nix::sys::signal::Signal> {
    loop {
        match signals.wait()? {
            nix::sys::signal::Signal::SIGHUP => tracing::warn!(
                "SIGHUP ignored: the config is read at start only; restart the daemon to apply a change (a restart replays the NVRAM and keeps the devices)"
            ),
            sig => return Ok(sig),
        }
    }
}
