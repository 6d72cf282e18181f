//! What write priority that follows the writer (`write_priority`) counts: per range, when our
//! own clients last wrote to it, when it was last handed to us, and how many writes we
//! forwarded to its owner lately; and per range one lock that queued writes ask through. No
//! engine here: `write_priority` asks and answers with these.

use crate::config::WritePrioritySection;
use crate::lun::Lun;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When to ask for a range and how long to keep one (`cluster.write_priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritePriorityPolicy {
    /// Forwarded writes to one range within `window` after which we ask its owner for it.
    pub ask_after_forwarded: u32,
    pub window: Duration,
    /// An owner that wrote to the range itself this recently keeps it; an asker waits this
    /// long before asking for the same range again. With `queue_for`: a range handed to us
    /// stays ours at least this long, then goes to the first node that asks.
    pub min_hold: Duration,
    /// Set: a write to a range the partner holds waits (queued) until the range is handed to
    /// us, at most this long, and only then is forwarded. None: it is forwarded at once.
    pub queue_for: Option<Duration>,
}

impl From<&WritePrioritySection> for WritePriorityPolicy {
    fn from(w: &WritePrioritySection) -> Self {
        WritePriorityPolicy {
            ask_after_forwarded: w.ask_after_forwarded,
            window: Duration::from_millis(w.window_ms),
            min_hold: Duration::from_millis(w.min_hold_ms),
            queue_for: w
                .queue_writes
                .then(|| Duration::from_millis(w.queue_timeout_ms)),
        }
    }
}

/// Forwarded writes to one range of the other node's, counted for the next ask.
#[derive(Default)]
struct Demand {
    window_start: Option<Instant>,
    forwarded: u32,
    /// When we last asked for the range (answered or not).
    asked: Option<Instant>,
}

pub(super) struct WriteDemand {
    enabled: AtomicBool,
    policy: Mutex<Option<WritePriorityPolicy>>,
    /// The clock's zero for `local_write_ms`.
    base: Instant,
    /// Per LUN and range: milliseconds after `base` (plus one; 0 = never) of our clients'
    /// last write to it.
    local_write_ms: Vec<Vec<AtomicU64>>,
    /// Per LUN and range: as `local_write_ms`, when the partner last handed it to us.
    handed_to_us_ms: Vec<Vec<AtomicU64>>,
    forwarded: Mutex<HashMap<(u32, u32), Demand>>,
    /// Per (LUN, range) the partner holds: queued writes ask for it one at a time, so one ask
    /// is out and the writes behind it find the range ours once it came.
    asking: Mutex<HashMap<(u32, u32), AskLock>>,
    /// Ranges moved because one node asked for them (handed over by us or to us).
    moves: Arc<AtomicU64>,
    /// Writes that waited for write priority (`queue_for`), and those of them forwarded
    /// after all (the range did not come in time, or the link was down).
    queued: AtomicU64,
    queued_then_forwarded: AtomicU64,
}

/// The queue of writes waiting for one range: held by the write whose ask is out.
type AskLock = Arc<futures::lock::Mutex<()>>;

fn range_slots(luns: &[Arc<Lun>]) -> Vec<Vec<AtomicU64>> {
    luns.iter()
        .map(|l| (0..l.ranges).map(|_| AtomicU64::new(0)).collect())
        .collect()
}

impl WriteDemand {
    pub(super) fn new(base: Instant, luns: &[Arc<Lun>]) -> WriteDemand {
        WriteDemand {
            enabled: AtomicBool::new(false),
            policy: Mutex::new(None),
            base,
            local_write_ms: range_slots(luns),
            handed_to_us_ms: range_slots(luns),
            forwarded: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
            moves: Arc::default(),
            queued: AtomicU64::new(0),
            queued_then_forwarded: AtomicU64::new(0),
        }
    }

    pub(super) fn set_policy(&self, policy: Option<WritePriorityPolicy>) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
        self.enabled.store(policy.is_some(), Ordering::Relaxed);
    }

    pub(super) fn policy(&self) -> Option<WritePriorityPolicy> {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The counter of moves, for a task that ends after the engine's borrow does.
    pub(super) fn moves(&self) -> &Arc<AtomicU64> {
        &self.moves
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    /// Our client wrote `len` bytes at `offset` of `lun` at `now`; the pieces in `remote`
    /// (offset, len) went to the partner, the rest was ours.
    pub(super) fn note_local_write(
        &self,
        lun_idx: usize,
        lun: &Lun,
        (offset, len): (u64, u64),
        remote: &[(u64, u64)],
        now: Instant,
    ) {
        let Some(slots) = self.local_write_ms.get(lun_idx) else {
            return;
        };
        let now = self.millis(now);
        for r in lun.range_of(offset)..=lun.range_of(offset + len.max(1) - 1) {
            if remote.iter().any(|&(at, _)| lun.range_of(at) == r) {
                continue;
            }
            if let Some(s) = slots.get(r as usize) {
                s.store(now, Ordering::Relaxed);
            }
        }
    }

    /// How long ago (at `now`) our clients last wrote to `range` of `lun`; None: never.
    pub(super) fn since_local_write(&self, lun: u32, range: u32, now: Instant) -> Option<Duration> {
        self.since(&self.local_write_ms, lun, range, now)
    }

    /// The partner handed `range` of `lun` to us at `now`.
    pub(super) fn note_handed_to_us(&self, lun: u32, range: u32, now: Instant) {
        if let Some(s) = self
            .handed_to_us_ms
            .get(lun as usize)
            .and_then(|l| l.get(range as usize))
        {
            s.store(self.millis(now), Ordering::Relaxed);
        }
    }

    /// How long ago (at `now`) the partner last handed `range` of `lun` to us; None: never.
    pub(super) fn since_handed_to_us(
        &self,
        lun: u32,
        range: u32,
        now: Instant,
    ) -> Option<Duration> {
        self.since(&self.handed_to_us_ms, lun, range, now)
    }

    fn since(
        &self,
        slots: &[Vec<AtomicU64>],
        lun: u32,
        range: u32,
        now: Instant,
    ) -> Option<Duration> {
        let at = slots
            .get(lun as usize)
            .and_then(|l| l.get(range as usize))
            .map_or(0, |s| s.load(Ordering::Relaxed));
        (at != 0).then(|| Duration::from_millis(self.millis(now).saturating_sub(at)))
    }

    /// The lock queued writes to `range` of `lun` ask the partner through.
    pub(super) fn asking(&self, lun: u32, range: u32) -> AskLock {
        self.asking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((lun, range))
            .or_default()
            .clone()
    }

    pub(super) fn queued(&self) -> &AtomicU64 {
        &self.queued
    }

    pub(super) fn queued_then_forwarded(&self) -> &AtomicU64 {
        &self.queued_then_forwarded
    }

    /// Writes of `pieces` (offset, len) of `lun` were forwarded to their owner at `now`:
    /// counts them, and returns the (LUN, range)s to ask the owner for now.
    pub(super) fn note_forwarded(
        &self,
        policy: &WritePriorityPolicy,
        lun_idx: usize,
        lun: &Lun,
        pieces: &[(u64, u64)],
        now: Instant,
    ) -> Vec<(u32, u32)> {
        let mut ask = Vec::new();
        let mut demand = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        for &(at, n) in pieces {
            for r in lun.range_of(at)..=lun.range_of(at + n.max(1) - 1) {
                let d = demand.entry((lun_idx as u32, r)).or_default();
                if d.window_start
                    .is_none_or(|s| now.saturating_duration_since(s) > policy.window)
                {
                    d.window_start = Some(now);
                    d.forwarded = 0;
                }
                d.forwarded += 1;
                let rested = d
                    .asked
                    .is_none_or(|a| now.saturating_duration_since(a) >= policy.min_hold);
                if d.forwarded >= policy.ask_after_forwarded && rested {
                    d.asked = Some(now);
                    d.forwarded = 0;
                    d.window_start = None;
                    ask.push((lun_idx as u32, r));
                }
            }
        }
        ask
    }
}
