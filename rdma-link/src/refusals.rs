//! The listener's log of refused connections. A partner that keeps retrying with a setting
//! we refuse (another secret, protocol version or `frame_mac`) connects every
//! `reconnect_delay`; each refusal at warn level would bury everything else in the log. A
//! refusal like the one just logged (same source address, same reason, within
//! [`REPEAT_WINDOW`]) is counted instead, and the count is said with the next one logged.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long a logged refusal covers the same ones after it.
pub(crate) const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Log it; `repeats_before` refusals like the previous one logged went unlogged since.
    Log { repeats_before: u64 },
    /// The same as the last one logged, within the window: counted.
    Repeat,
}

struct Last {
    from: Option<IpAddr>,
    reason: String,
    logged_at: Instant,
    repeats: u64,
}

#[derive(Default)]
pub(crate) struct Refusals {
    last: Mutex<Option<Last>>,
}

impl Refusals {
    /// Notes a refused connection from `from` for `reason` at `now`.
    pub(crate) fn note(&self, from: Option<IpAddr>, reason: &str, now: Instant) -> Verdict {
        // A poisoned lock only means a panic between two plain field updates.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = last
            .as_mut()
            .filter(|l| l.from == from && l.reason == reason && now < l.logged_at + REPEAT_WINDOW)
        {
            l.repeats += 1;
            return Verdict::Repeat;
        }
        let repeats_before = last.as_ref().map_or(0, |l| l.repeats);
        *last = Some(Last {
            from,
            reason: reason.to_owned(),
            logged_at: now,
            repeats: 0,
        });
        Verdict::Log { repeats_before }
    }

    /// A connection was accepted: the next refusal is news whatever it says.
    pub(crate) fn clear(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.take().map_or(0, |l| l.repeats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_refusal_is_counted_until_it_changes_or_the_window_ends() {
        let r = Refusals::default();
        let t = Instant::now();
        let a: Option<IpAddr> = "10.0.0.2".parse().ok();
        let b: Option<IpAddr> = "10.0.0.9".parse().ok();
        let log = |n| Verdict::Log { repeats_before: n };
        assert_eq!(r.note(a, "frame_mac differs", t), log(0));
        assert_eq!(r.note(a, "frame_mac differs", t), Verdict::Repeat);
        assert_eq!(r.note(a, "frame_mac differs", t), Verdict::Repeat);
        // Another reason, or another address, is said at once, with the count before it.
        assert_eq!(r.note(a, "wrong secret", t), log(2));
        assert_eq!(r.note(b, "wrong secret", t), log(0));
        assert_eq!(r.note(b, "wrong secret", t + REPEAT_WINDOW), log(0));
        assert_eq!(
            r.note(b, "wrong secret", t + REPEAT_WINDOW),
            Verdict::Repeat
        );
        assert_eq!(r.clear(), 1);
        assert_eq!(r.note(b, "wrong secret", t + REPEAT_WINDOW), log(0));
    }
}
