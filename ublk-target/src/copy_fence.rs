//! Ordering a resync's copies against the flusher's batches (`storage = "own"`).
//!
//! A resync copies regions of a range from our medium to the partner's while the range's
//! writes continue. Each flushed batch goes to our medium and then, at our request, to the
//! partner's. A copy that read our medium before a batch overwrote a region must reach the
//! partner's medium before that batch does, or the partner keeps the older bytes. So a copy
//! and a batch whose extents overlap never run at the same time: each waits until the other
//! kind has left its extents (a copy holds its chunk from our read until the partner's
//! answer; a batch from before its medium write until the partner's answer). Copies do not
//! exclude copies, nor batches batches.
//!
//! It also counts, per range, the batches the partner's medium did not get: their regions
//! are marked out of sync, and a resync that clears the range's marks at its end must not
//! run over one that happened while it copied.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Who holds extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A flush batch, from its write to our medium to the partner's answer.
    Batch,
    /// A resync copy, from its read of our medium to the partner's answer.
    Copy,
}

/// `(lun, offset, len)`.
pub type Extent = (u32, u64, u64);

#[derive(Default)]
pub struct CopyFence {
    state: Mutex<State>,
    left: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: Vec<Hold>,
    /// `(lun, range)` -> batches of it the partner's medium did not get, ever.
    missed: HashMap<(u32, u32), u64>,
}

struct Hold {
    id: u64,
    holder: Holder,
    extent: Extent,
}

/// Extents held until dropped.
pub struct Entered {
    fence: Arc<CopyFence>,
    id: u64,
}

fn overlap(a: Extent, b: Extent) -> bool {
    a.0 == b.0 && a.1 < b.1.saturating_add(b.2) && b.1 < a.1.saturating_add(a.2)
}

impl CopyFence {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no holder of the other kind holds an extent overlapping `extents`, then
    /// holds them until the returned value is dropped.
    pub async fn enter(self: &Arc<Self>, holder: Holder, extents: &[Extent]) -> Entered {
        loop {
            // Created before the check: a leave between the check and the wait still wakes it.
            let left = self.left.notified();
            {
                let mut s = self.state();
                let blocked = s
                    .held
                    .iter()
                    .any(|h| h.holder != holder && extents.iter().any(|&e| overlap(e, h.extent)));
                if !blocked {
                    let id = s.next_id;
                    s.next_id += 1;
                    s.held
                        .extend(extents.iter().map(|&extent| Hold { id, holder, extent }));
                    return Entered {
                        fence: self.clone(),
                        id,
                    };
                }
            }
            left.await;
        }
    }

    /// The partner's medium did not get a batch of these ranges.
    pub fn note_missed(&self, ranges: &[(u32, u32)]) {
        let mut s = self.state();
        for &r in ranges {
            *s.missed.entry(r).or_default() += 1;
        }
    }

    /// How many batches of `range` the partner's medium missed so far.
    pub fn missed(&self, range: (u32, u32)) -> u64 {
        self.state().missed.get(&range).copied().unwrap_or(0)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.fence.state().held.retain(|h| h.id != self.id);
        self.fence.left.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_copy_waits_for_an_overlapping_batch_and_not_for_others() {
        let f = CopyFence::new();
        let batch = f
            .enter(Holder::Batch, &[(0, 4096, 8192)])
            .now_or_never()
            .expect("nothing held");
        // Another batch, and a copy elsewhere (or of another LUN), go ahead.
        assert!(f
            .enter(Holder::Batch, &[(0, 0, 1 << 20)])
            .now_or_never()
            .is_some());
        assert!(f
            .enter(Holder::Copy, &[(0, 12288, 4096), (1, 4096, 4096)])
            .now_or_never()
            .is_some());
        // An overlapping copy waits until the batch is done.
        let mut copy = Box::pin(f.enter(Holder::Copy, &[(0, 8192, 4096)]));
        assert!((&mut copy).now_or_never().is_none());
        drop(batch);
        assert!(copy.now_or_never().is_some());
    }

    #[test]
    fn misses_are_counted_per_range() {
        let f = CopyFence::new();
        assert_eq!(f.missed((0, 1)), 0);
        f.note_missed(&[(0, 1), (0, 2)]);
        f.note_missed(&[(0, 1)]);
        assert_eq!((f.missed((0, 1)), f.missed((0, 2))), (2, 1));
    }
}
