//! Which medium writes of this process are in flight, and since when: the watchdog
//! (`watchdog`) stops petting once one is older than the medium I/O timeout. Every write
//! the node issues to the shared medium registers here: flushes, replays, delegated
//! batches, the disk heartbeat and the ownership table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Medium writes in flight by id; ids grow with time, so the first entry is the oldest.
static IN_FLIGHT: Mutex<BTreeMap<u64, Instant>> = Mutex::new(BTreeMap::new());
static NEXT_WRITE: AtomicU64 = AtomicU64::new(0);

/// Registers a medium write for as long as it lives.
pub struct WriteInFlight(u64);

impl WriteInFlight {
    pub fn start() -> WriteInFlight {
        let id = NEXT_WRITE.fetch_add(1, Ordering::Relaxed);
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
        WriteInFlight(id)
    }
}

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// How long the oldest medium write in flight has been (None: none in flight).
pub fn oldest_write_age(now: Instant) -> Option<Duration> {
    let ids = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
    // Ids grow with time, so the first entry is the oldest write.
    ids.values()
        .next()
        .map(|&since| now.saturating_duration_since(since))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_flight_are_tracked_until_they_end() {
        let w = WriteInFlight::start();
        std::thread::sleep(Duration::from_millis(20));
        let age = oldest_write_age(Instant::now()).expect("one in flight");
        assert!(age >= Duration::from_millis(20));
        drop(w);
        // Other tests of this process may write meanwhile; this one's entry is gone.
        assert!(oldest_write_age(Instant::now()).is_none_or(|a| a < Duration::from_millis(20)));
    }
}
