//! The busy-poll window of a connection loop (see [`crate::LinkConfig::busy_poll`]): traffic
//! opens or extends it; while it is open the loop polls instead of sleeping. Time comes from
//! tokio's clock, so a paused clock (simulation) sees the same decisions on every run.

use std::time::Duration;
use tokio::time::Instant;

pub(crate) struct BusyPoll {
    window: Duration,
    until: Option<Instant>,
}

impl BusyPoll {
    pub(crate) fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            window,
            until: None,
        }
    }

    /// Something was sent or received: keep polling for another window.
    pub(crate) fn traffic(&mut self) {
        if !self.window.is_zero() {
            self.until = Some(Instant::now() + self.window);
        }
    }

    pub(crate) fn is_hot(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }

    /// True once per window, when it has just run out (the loop goes back to sleeping).
    pub(crate) fn cooled(&mut self) -> bool {
        !self.is_hot() && self.until.take().is_some()
    }
}
