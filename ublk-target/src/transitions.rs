//! The engine's transitions, raised where they happen (a partition failing, a gate opening,
//! the link going down, ...) so that the event stream (`state_events`, `nvmirrorctl
//! events`) snapshots the node at once instead of at its next poll. A leaf module: every
//! layer raises, none of it depends on what follows the states.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many transitions the process has seen: the streams wait for it to move.
/// Process-wide because the states live in many parts of the engine and one daemon runs per
/// process; tests that run several engines in one process only get a spurious snapshot
/// that finds nothing new. The lock is a leaf (nothing is taken while it is held), so
/// [`changed`] may be called under any other lock.
static TRANSITIONS: Mutex<u64> = Mutex::new(0);
static TRANSITION_RAISED: Condvar = Condvar::new();

/// A state the event stream follows has just changed: wake the streams.
pub fn changed() {
    let mut n = TRANSITIONS.lock().unwrap_or_else(|p| p.into_inner());
    *n = n.wrapping_add(1);
    drop(n);
    TRANSITION_RAISED.notify_all();
}

/// The transitions seen so far: read before a snapshot, then [`wait_for_change`] from it.
pub fn count() -> u64 {
    *TRANSITIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the count moves past `seen` (true) or `timeout` passes (false).
pub fn wait_for_change(seen: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut n = TRANSITIONS.lock().unwrap_or_else(|p| p.into_inner());
    while *n == seen {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        n = match TRANSITION_RAISED.wait_timeout(n, left) {
            Ok((n, _)) => n,
            Err(p) => p.into_inner().0,
        };
    }
    true
}
