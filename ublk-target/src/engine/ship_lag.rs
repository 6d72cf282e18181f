//! A log-shipping source's view of how far its destination's log files lag behind its own
//! log (issue #18, item 6: "status on both sides shows the lag per source"). The
//! destination's side (records held in its NVRAM, not yet in a file; records not yet
//! applied to the images) is in its own status; this is what the source can see: the last
//! seq the destination confirmed in its log file per partition, the batch the flusher holds
//! because the destination has not confirmed it yet, and the batches that left our log
//! without it (its files have a gap there).

use crate::log::PartitionStatus;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Per partition, what the destination confirmed and what the flusher waits for.
pub(crate) struct ShipLag {
    parts: Vec<Mutex<PartLag>>,
    /// Flushed batches that left our log unconfirmed (the destination was away for longer
    /// than the grace): their records are missing from its log files.
    left_without: AtomicU64,
}

#[derive(Default)]
struct PartLag {
    confirmed_through: Option<u64>,
    confirmed_at: Option<Instant>,
    waiting: Option<Waiting>,
}

struct Waiting {
    first_seq: u64,
    through_seq: u64,
    since: Instant,
    asks: u32,
}

/// One partition's lag as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionShipLag {
    pub partition: u32,
    /// The last seq the destination confirmed is in its log file (None: none since start).
    pub confirmed_through: Option<u64>,
    pub confirmed_age_ms: Option<u64>,
    /// Records in our log, none of which the destination has confirmed yet (a confirmed
    /// batch leaves the log at once), their bytes, and the age of the oldest.
    pub unconfirmed_records: usize,
    pub unconfirmed_bytes: u64,
    pub oldest_unconfirmed_ms: u64,
    /// A flushed batch held in our log until the destination confirms it.
    pub waiting: Option<WaitingBatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingBatch {
    pub first_seq: u64,
    pub through_seq: u64,
    pub waiting_ms: u64,
    /// Times the destination was asked for it (each "not yet" re-posts its records).
    pub asks: u32,
}

/// A log-shipping source's lag behind its destination, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingSourceStatus {
    pub partitions: Vec<PartitionShipLag>,
    /// Flushed batches that left our log without the destination (since start).
    pub batches_without_destination: u64,
}

impl ShipLag {
    pub(crate) fn new(partitions: usize) -> ShipLag {
        ShipLag {
            parts: (0..partitions).map(|_| Mutex::default()).collect(),
            left_without: AtomicU64::new(0),
        }
    }

    fn part(&self, partition: u32) -> Option<std::sync::MutexGuard<'_, PartLag>> {
        let p = self.parts.get(partition as usize)?;
        Some(p.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The flusher asks the destination whether seqs `first..=through` are logged.
    pub(crate) fn asking(&self, partition: u32, first_seq: u64, through_seq: u64, now: Instant) {
        if let Some(mut p) = self.part(partition) {
            match &mut p.waiting {
                Some(w) if w.first_seq == first_seq && w.through_seq == through_seq => w.asks += 1,
                w => {
                    *w = Some(Waiting {
                        first_seq,
                        through_seq,
                        since: now,
                        asks: 1,
                    })
                }
            }
        }
    }

    /// The destination confirmed its log file holds the partition through `seq`.
    pub(crate) fn confirmed(&self, partition: u32, seq: u64, now: Instant) {
        if let Some(mut p) = self.part(partition) {
            p.confirmed_through = Some(p.confirmed_through.map_or(seq, |s| s.max(seq)));
            p.confirmed_at = Some(now);
            p.waiting = None;
        }
    }

    /// The batch leaves our log without the destination (or the flusher stops asking).
    pub(crate) fn gave_up(&self, partition: u32, left_log: bool) {
        if let Some(mut p) = self.part(partition) {
            p.waiting = None;
        }
        if left_log {
            self.left_without.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn status(&self, logs: &[PartitionStatus], now: Instant) -> ShippingSourceStatus {
        let ms = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
        ShippingSourceStatus {
            partitions: logs
                .iter()
                .map(|log| {
                    let mut lag = PartitionShipLag {
                        partition: log.partition,
                        unconfirmed_records: log.records_unflushed,
                        unconfirmed_bytes: log.used_bytes,
                        oldest_unconfirmed_ms: log.flush_lag_ms,
                        ..Default::default()
                    };
                    if let Some(p) = self.part(log.partition) {
                        lag.confirmed_through = p.confirmed_through;
                        lag.confirmed_age_ms = p.confirmed_at.map(ms);
                        lag.waiting = p.waiting.as_ref().map(|w| WaitingBatch {
                            first_seq: w.first_seq,
                            through_seq: w.through_seq,
                            waiting_ms: ms(w.since),
                            asks: w.asks,
                        });
                    }
                    lag
                })
                .collect(),
            batches_without_destination: self.left_without.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn log(partition: u32, records: usize, bytes: u64) -> PartitionStatus {
        PartitionStatus {
            partition,
            capacity_bytes: 1 << 20,
            used_bytes: bytes,
            records_unflushed: records,
            records_in_flight: 0,
            next_seq: 100,
            durable_through: 99,
            acked_through: 99,
            flushed_through: 0,
            flush_lag_ms: 40,
            flush_paused: false,
            failed: None,
        }
    }

    #[test]
    fn a_batch_waits_until_confirmed_and_a_batch_given_up_is_counted() {
        let t0 = Instant::now();
        let lag = ShipLag::new(2);
        lag.asking(1, 10, 20, t0);
        lag.asking(1, 10, 20, t0 + Duration::from_millis(5));
        let s = lag.status(
            &[log(0, 0, 0), log(1, 11, 4096)],
            t0 + Duration::from_secs(2),
        );
        let w = s.partitions[1].waiting.clone().expect("a waiting batch");
        assert_eq!(
            (w.first_seq, w.through_seq, w.asks, w.waiting_ms),
            (10, 20, 2, 2000)
        );
        assert_eq!(s.partitions[1].unconfirmed_records, 11);
        assert_eq!(s.partitions[0].waiting, None);

        lag.confirmed(1, 20, t0 + Duration::from_secs(3));
        lag.asking(0, 1, 4, t0);
        lag.gave_up(0, true);
        // A confirmation never moves the watermark back (an old batch answered late).
        lag.confirmed(1, 15, t0 + Duration::from_secs(3));
        let s = lag.status(&[log(0, 0, 0), log(1, 0, 0)], t0 + Duration::from_secs(4));
        assert_eq!(s.partitions[1].confirmed_through, Some(20));
        assert_eq!(s.partitions[1].confirmed_age_ms, Some(1000));
        assert_eq!(s.partitions[1].waiting, None);
        assert_eq!(s.partitions[0].waiting, None);
        assert_eq!(s.partitions[0].confirmed_through, None);
        assert_eq!(s.batches_without_destination, 1);
        // A partition the log does not have is ignored, not a panic.
        lag.asking(7, 1, 1, t0);
    }
}
