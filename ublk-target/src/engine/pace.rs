//! The rate limit of the background copies (`verify`, `resync`): how long to wait before
//! going past a given number of bytes so that the copy stays within its rate.

use std::time::{Duration, Instant};

pub(super) struct Pace {
    /// Since when, and from how many bytes on, the current rate counts.
    start: Instant,
    from_bytes: u64,
    /// Bytes per second; None: no limit.
    rate: Option<u64>,
}

impl Pace {
    /// A copy starting at `start`, at most `rate` bytes per second (None or 0: no limit).
    pub(super) fn new(start: Instant, rate: Option<u64>) -> Pace {
        Pace {
            start,
            from_bytes: 0,
            rate: rate.filter(|&r| r > 0),
        }
    }

    /// A rate changed while the copy runs (`nvmirrorctl resync-rate`) counts from `now` and
    /// `bytes` on: the bytes copied before are not paid for again at the new rate.
    pub(super) fn follow(&mut self, rate: Option<u64>, bytes: u64, now: Instant) {
        let rate = rate.filter(|&r| r > 0);
        if rate != self.rate {
            *self = Pace {
                start: now,
                from_bytes: bytes,
                rate,
            };
        }
    }

    /// At `now`, with `bytes` bytes handled since the start: how long to wait before the next
    /// byte (None: go on).
    pub(super) fn wait_after(&self, bytes: u64, now: Instant) -> Option<Duration> {
        let bytes = bytes.saturating_sub(self.from_bytes);
        let due = Duration::from_secs_f64(bytes as f64 / self.rate? as f64);
        due.checked_sub(now.saturating_duration_since(self.start))
            .filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_waits_only_when_ahead_of_the_rate() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let p = Pace::new(start, Some(2 << 20));
        assert_eq!(p.wait_after(4 << 20, start + second), Some(second));
        assert_eq!(p.wait_after(4 << 20, start + 3 * second), None);
        assert_eq!(p.wait_after(0, start), None);
        for unlimited in [None, Some(0)] {
            assert_eq!(Pace::new(start, unlimited).wait_after(4 << 20, start), None);
        }
    }

    #[test]
    fn a_new_rate_counts_from_where_the_copy_is() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut p = Pace::new(start, None);
        // 64 MiB copied unlimited in 1 s, then limited to 1 MiB/s: the next MiB waits 1 s,
        // not the 63 s the whole copy would owe at the new rate.
        p.follow(Some(1 << 20), 64 << 20, start + second);
        assert_eq!(p.wait_after(65 << 20, start + second), Some(second));
        assert_eq!(p.wait_after(65 << 20, start + 2 * second), None);
        // The same rate again changes nothing; lifting it waits no more.
        p.follow(Some(1 << 20), 70 << 20, start + 3 * second);
        assert_eq!(p.wait_after(66 << 20, start + second), Some(2 * second));
        p.follow(Some(0), 70 << 20, start + 3 * second);
        assert_eq!(p.wait_after(80 << 20, start + 3 * second), None);
    }
}
