//! Latency histograms of the block device's I/O, per LUN and kind, for the metrics endpoint.
//! Recorded by every queue thread on every completion, so they are plain atomics with fixed
//! buckets: `prometheus_client`'s histogram takes a mutex on each observation, which the
//! queue threads of one LUN would contend on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kinds of block I/O the device serves (the `op` label of the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    /// DISCARD and WRITE_ZEROES (both stage a zero record).
    Discard,
}

impl IoKind {
    pub const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Discard];

    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
        }
    }
}

/// Upper bounds of the buckets in microseconds: from an NVRAM-speed write (tens of µs) to a
/// write held back by a takeover or a full log (seconds). Everything above the last lands
/// in the +Inf bucket.
pub const BUCKET_BOUNDS_US: [u64; 18] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000,
];

/// One histogram: counts per bucket (not cumulative), the sum in nanoseconds, and the failed
/// I/Os (counted in the buckets too: a failure's latency is part of what the user waited).
#[derive(Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKET_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
    errors: AtomicU64,
}

/// What a scrape reads from one histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_seconds: f64,
    /// (upper bound in seconds, count of that bucket alone), the last bound +Inf: what
    /// `prometheus_client` encodes (it adds them up into the cumulative `le` buckets).
    pub buckets: Vec<(f64, u64)>,
    pub errors: u64,
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration, ok: bool) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let bucket = BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot for a scrape. The buckets are read one by one while I/O goes on, so the
    /// count is taken as their total: the histogram stays consistent in itself.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut total = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            total += n;
            let bound = BUCKET_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            count: total,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// The histograms of one LUN, one per [`IoKind`].
#[derive(Default)]
pub struct LunLatency {
    kinds: [LatencyHistogram; IoKind::ALL.len()],
}

impl LunLatency {
    pub fn of(&self, kind: IoKind) -> &LatencyHistogram {
        &self.kinds[kind as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_latency_lands_in_the_first_bucket_that_holds_it() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(10), true); // on the bound: the 10 µs bucket
        h.record(Duration::from_micros(11), true); // the 25 µs bucket
        h.record(Duration::from_millis(3), false); // the 5 ms bucket, an error
        h.record(Duration::from_secs(60), true); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.errors, 1);
        assert_eq!(s.buckets[0], (10e-6, 1));
        assert_eq!(s.buckets[1], (25e-6, 1));
        let five_ms = s.buckets.iter().find(|(b, _)| *b == 5e-3).unwrap();
        assert_eq!(five_ms.1, 1);
        assert_eq!(s.buckets.last().unwrap(), &(f64::INFINITY, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert!((s.sum_seconds - (60.0 + 0.003 + 0.000021)).abs() < 1e-9);
    }

    #[test]
    fn kinds_have_their_own_histograms() {
        let l = LunLatency::default();
        l.of(IoKind::Write).record(Duration::from_micros(40), true);
        assert_eq!(l.of(IoKind::Write).snapshot().count, 1);
        assert_eq!(l.of(IoKind::Read).snapshot().count, 0);
    }
}
