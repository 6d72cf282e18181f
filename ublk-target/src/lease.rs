//! Disk leases: which node may serve, and when a node may take another's ranges.
//!
//! Every cluster node keeps a heartbeat on the shared medium (its `LeaseRecord` slot, see
//! `ownership`): every `renew` it writes the next counter with O_DIRECT|O_DSYNC. A write
//! issued at `t` that completes within `io_timeout` makes the node's lease valid until
//! `t + lease` on its own clock. The same loop reads the other nodes' slots and remembers
//! when each last changed.
//!
//! The rules (the algorithm, its timing assumptions and the failure table are in
//! docs/arbitration.md; the simulator tries to break them):
//! * A node serves its ranges only while it holds its lease (the engine also accepts the
//!   mirror link's proof that the partner hears it: see `Engine::may_serve`), and writes the
//!   medium only while the lease stays valid for another `io_timeout`.
//! * Node B may declare node A dead only after A's heartbeat has not changed for
//!   `dead_after()`: A's lease, from a write issued before the change B saw, has then run out
//!   even if A's clock runs `DRIFT` slow, and A's last medium write has completed or failed.
//!   A heartbeat marked `released` (a clean stop) is dead at once.
//! * A node that gains its lease (at start, or again after losing it) waits `settle()`
//!   before it counts as holding it: any takeover another node decided on its old lease has
//!   been written to the ownership table by then, so the table it reads next is the truth.

use crate::host::Host;
use crate::ownership::{load_lease, save_lease, LeaseRecord, TableStore};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How far apart two nodes' clocks may run (a rate, not an offset: each node measures only
/// intervals on its own monotonic clock).
pub const DRIFT: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Between two heartbeat writes.
    pub renew: Duration,
    /// How long a heartbeat write keeps the lease valid.
    pub lease: Duration,
    /// The longest a medium I/O may take (a slower one does not count; see the docs).
    pub io_timeout: Duration,
}

impl LeaseTiming {
    /// How long after the last change of a node's heartbeat (as seen here) the node is dead.
    pub fn dead_after(&self) -> Duration {
        self.lease.mul_f64(1.0 + DRIFT) + self.io_timeout + self.renew
    }

    /// After gaining its lease, how long a node waits before it counts as holding it.
    pub fn settle(&self) -> Duration {
        self.renew * 2 + self.io_timeout * 2
    }

    /// What the config's values must satisfy (a lease must outlast a renewal and its I/O).
    pub fn check(&self) -> Result<(), String> {
        if self.renew.is_zero() || self.io_timeout.is_zero() {
            return Err("the renewal interval and the I/O timeout must be above 0".into());
        }
        if self.lease < self.renew * 2 + self.io_timeout {
            return Err(format!(
                "the lease ({:?}) must be at least twice the renewal interval plus the I/O timeout ({:?})",
                self.lease,
                self.renew * 2 + self.io_timeout
            ));
        }
        Ok(())
    }
}

/// This node's hold on its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    /// Heartbeats are being written; serving starts once they have settled.
    Acquiring,
    Held,
    /// The heartbeat could not be renewed in time: this node serves nothing.
    Expired,
}

/// What this node makes of another node's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It changed `ago` ago (or the node was not watched long enough to tell).
    Alive { ago: Duration },
    /// Unchanged for at least `dead_after`, or released.
    Dead { silent: Duration },
    /// This node does not hold its own lease: it cannot judge (its reads may be failing).
    Unknown,
    /// The node never wrote a heartbeat (it has not started since the cluster was made):
    /// it serves nothing, and nothing of it is staged anywhere.
    Absent,
}

#[derive(Clone, Copy, Debug)]
struct Watched {
    record: Option<LeaseRecord>,
    /// When the record last changed as seen here (or when watching began).
    changed_at: Instant,
    /// When it was last read. Death is judged on what was seen, from `changed_at` to
    /// here, never on the clock alone: a node that was paused (or could not read) saw
    /// nothing meanwhile, and must look again before it calls a heartbeat dead (simulator
    /// seed 600048: resumed after 2.4 s, a node took over ranges its partner, restarted
    /// meanwhile, was serving).
    seen_at: Instant,
}

impl Watched {
    /// How long the record had not changed, as of the last read.
    fn seen_silent(&self) -> Duration {
        self.seen_at.saturating_duration_since(self.changed_at)
    }
}

struct Inner {
    counter: u64,
    state: LeaseState,
    /// The lease holds until then (own clock); None: never renewed.
    valid_until: Option<Instant>,
    /// Since when renewals have succeeded without a gap (for the settle period).
    renewing_since: Option<Instant>,
    watched: Vec<Watched>,
    renewals: u64,
    failures: u64,
    last_error: Option<String>,
    /// Bumped every time the lease is (re)gained: the engine re-reads the table then.
    acquisitions: u64,
    /// Given up (a clean stop): no more heartbeats.
    released: bool,
}

pub struct DiskLease {
    host: Arc<dyn Host>,
    store: Arc<dyn TableStore>,
    cluster_id: u64,
    me: u32,
    timing: LeaseTiming,
    incarnation: u64,
    inner: Mutex<Inner>,
    changed: Notify,
}

/// This node's lease and its view of the others, for status.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LeaseStatus {
    pub state: LeaseState,
    /// Milliseconds until the lease runs out (negative: ran out that long ago).
    pub expires_in_ms: Option<i64>,
    pub incarnation: String,
    pub counter: u64,
    pub renewals: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub renew_ms: u64,
    pub lease_ms: u64,
    /// After this long without a change another node is dead.
    pub dead_after_ms: u64,
    pub peers: Vec<PeerLeaseStatus>,
    /// Where the heartbeats live: "shared medium", "arbiter device" or "voters" (absent in
    /// the status of daemons from before 2026-12-07). A string on the wire, so that a
    /// reader older than the daemon still parses the status; [`LeaseStatus::place`] reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<String>,
}

impl LeaseStatus {
    /// Where the heartbeats live, if the status says and this build knows the place.
    pub fn place(&self) -> Option<crate::ownership::ArbiterPlace> {
        crate::ownership::ArbiterPlace::from_status_name(self.place.as_deref()?)
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerLeaseStatus {
    pub node: u32,
    /// "alive", "dead", "released", "absent" (never started) or "unknown" (we hold no lease).
    pub verdict: String,
    /// Since its heartbeat last changed as seen here.
    pub last_change_ms_ago: u64,
    pub counter: Option<u64>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskLease {
    /// A lease for node `me` (of `nodes`) in cluster `cluster_id`, not yet renewing: run
    /// [`DiskLease::run`] as a background task, then wait for [`DiskLease::acquired`].
    pub fn new(
        host: Arc<dyn Host>,
        store: Arc<dyn TableStore>,
        cluster_id: u64,
        me: u32,
        nodes: u32,
        timing: LeaseTiming,
        incarnation: u64,
    ) -> Arc<DiskLease> {
        let now = host.now();
        Arc::new(DiskLease {
            store,
            cluster_id,
            me,
            timing,
            incarnation,
            inner: Mutex::new(Inner {
                counter: 0,
                state: LeaseState::Acquiring,
                valid_until: None,
                renewing_since: None,
                watched: (0..nodes)
                    .map(|_| Watched {
                        record: None,
                        changed_at: now,
                        seen_at: now,
                    })
                    .collect(),
                renewals: 0,
                failures: 0,
                last_error: None,
                acquisitions: 0,
                released: false,
            }),
            changed: Notify::new(),
            host,
        })
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// Where the heartbeats live (for messages).
    pub fn place(&self) -> crate::ownership::ArbiterPlace {
        self.store.place()
    }

    /// Renews the heartbeat and watches the others' until the task is dropped. Medium I/O
    /// is synchronous: on a real machine this task has a thread of its own.
    pub async fn run(self: Arc<Self>) {
        loop {
            if lock(&self.inner).released {
                return;
            }
            let issued = self.renew_once();
            self.watch_others();
            let next = issued + self.timing.renew;
            let now = self.host.now();
            if next > now {
                self.host.sleep(next - now).await;
            }
        }
    }

    /// One heartbeat write; returns when it was issued.
    pub(crate) fn renew_once(&self) -> Instant {
        let issued = self.host.now();
        let record = {
            let mut st = lock(&self.inner);
            if st.released {
                return issued;
            }
            st.counter += 1;
            LeaseRecord {
                cluster_id: self.cluster_id,
                node: self.me,
                incarnation: self.incarnation,
                counter: st.counter,
                released: false,
            }
        };
        let result = save_lease(self.store.as_ref(), &record);
        let done = self.host.now();
        let mut st = lock(&self.inner);
        let in_time = done.saturating_duration_since(issued) <= self.timing.io_timeout;
        match result {
            Ok(()) if in_time => {
                st.renewals += 1;
                // A renewal issued after the lease ran out (the node was paused, or its
                // writes failed) does not extend it: the lease lapsed, and must be gained
                // again, settle period and all.
                if st.valid_until.is_none_or(|v| issued >= v) {
                    self.expire_if_due(&mut st, issued);
                    st.renewing_since = None;
                }
                st.valid_until = Some(issued + self.timing.lease);
                let since = *st.renewing_since.get_or_insert(issued);
                if st.state != LeaseState::Held
                    && issued.saturating_duration_since(since) >= self.timing.settle()
                {
                    st.state = LeaseState::Held;
                    st.acquisitions += 1;
                    tracing::info!(
                        counter = st.counter,
                        "{} held: heartbeats renewed for {:?}",
                        self.place().lease(),
                        self.timing.settle()
                    );
                    drop(st);
                    self.changed.notify_waiters();
                    crate::transitions::changed();
                }
            }
            other => {
                st.failures += 1;
                st.renewing_since = None;
                let heartbeat = self.place().heartbeat();
                let why = match other {
                    Err(e) => format!("writing the {heartbeat} failed: {e}"),
                    Ok(()) => format!(
                        "writing the {heartbeat} took {:?}, more than the I/O timeout {:?}",
                        done.saturating_duration_since(issued),
                        self.timing.io_timeout
                    ),
                };
                if st.last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!("{why}");
                }
                st.last_error = Some(why);
                self.expire_if_due(&mut st, done);
            }
        }
        issued
    }

    /// Moves to Expired once the lease ran out (the data path checks the time itself).
    fn expire_if_due(&self, st: &mut Inner, now: Instant) {
        if st.state == LeaseState::Held && st.valid_until.is_none_or(|v| now >= v) {
            st.state = LeaseState::Expired;
            tracing::error!(
                "{} expired: the heartbeat could not be renewed ({}); this node stops serving until it holds its lease again",
                self.place().lease(),
                st.last_error.as_deref().unwrap_or("no renewal")
            );
            self.changed.notify_waiters();
            crate::transitions::changed();
        }
    }

    pub(crate) fn watch_others(&self) {
        let n = lock(&self.inner).watched.len() as u32;
        for node in (0..n).filter(|&x| x != self.me) {
            // An unreadable slot (our path fails) leaves the last view: `verdict` then
            // answers Unknown, because we hold no lease.
            let Ok(record) = load_lease(self.store.as_ref(), self.cluster_id, node) else {
                continue;
            };
            let now = self.host.now();
            let mut st = lock(&self.inner);
            let w = &mut st.watched[node as usize];
            if w.record != record {
                w.record = record;
                w.changed_at = now;
            }
            w.seen_at = now;
        }
    }

    /// Resolves once the lease is held (at start: after the settle period).
    pub async fn acquired(&self) {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.holds() {
                return;
            }
            changed.await;
        }
    }

    /// Resolves at the next change of state (acquired, expired).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The lease is held and valid now.
    pub fn holds(&self) -> bool {
        self.holds_for(Duration::ZERO)
    }

    /// The lease is held and stays valid for at least `d` (a medium write must complete
    /// before it runs out).
    pub fn holds_for(&self, d: Duration) -> bool {
        let now = self.host.now();
        let mut st = lock(&self.inner);
        self.expire_if_due(&mut st, now);
        st.state == LeaseState::Held && st.valid_until.is_some_and(|v| now + d < v)
    }

    /// Times the lease was gained (at start and after each expiry).
    pub fn acquisitions(&self) -> u64 {
        lock(&self.inner).acquisitions
    }

    /// What this node makes of `node`'s heartbeat.
    pub fn verdict(&self, node: u32) -> Verdict {
        if !self.holds() {
            return Verdict::Unknown;
        }
        let now = self.host.now();
        let st = lock(&self.inner);
        let Some(w) = st.watched.get(node as usize) else {
            return Verdict::Unknown;
        };
        let silent = now.saturating_duration_since(w.changed_at);
        // A silence seen long ago proves nothing now: the node may have restarted since and
        // hold its lease again (its settle period counts from its first new heartbeat, so a
        // claim must follow a recent read; simulator seed 3101: paused between its last read
        // and the takeover, a node claimed ranges its restarted partner was serving).
        let fresh = now.saturating_duration_since(w.seen_at) <= self.fresh_for();
        match w.record {
            None => Verdict::Absent,
            Some(r) if r.released => Verdict::Dead {
                silent: w.seen_silent(),
            },
            Some(_) if fresh && w.seen_silent() >= self.timing.dead_after() => Verdict::Dead {
                silent: w.seen_silent(),
            },
            Some(_) => Verdict::Alive { ago: silent },
        }
    }

    /// How old the last read of another node's heartbeat may be for a verdict of death: the
    /// watch reads every renewal, and a read takes at most the I/O timeout. A node that
    /// restarts heartbeats for `settle()` (twice that) before it reads the table, so a claim
    /// written right after such a verdict is in the table it reads.
    fn fresh_for(&self) -> Duration {
        self.timing.renew + self.timing.io_timeout
    }

    /// A clean stop: marks the heartbeat released (the partner may take over at once) and
    /// stops serving. Call only once nothing is staged (after a drain).
    pub fn release(&self) -> Result<(), String> {
        let record = {
            let mut st = lock(&self.inner);
            st.released = true;
            st.state = LeaseState::Expired;
            st.valid_until = None;
            st.counter += 1;
            LeaseRecord {
                cluster_id: self.cluster_id,
                node: self.me,
                incarnation: self.incarnation,
                counter: st.counter,
                released: true,
            }
        };
        self.changed.notify_waiters();
        crate::transitions::changed();
        save_lease(self.store.as_ref(), &record).map_err(|e| e.to_string())
    }

    pub fn status(&self) -> LeaseStatus {
        let now = self.host.now();
        let st = lock(&self.inner);
        let ms = |d: Duration| d.as_millis() as i64;
        LeaseStatus {
            state: st.state,
            expires_in_ms: st.valid_until.map(
                |v| {
                    if v >= now {
                        ms(v - now)
                    } else {
                        -ms(now - v)
                    }
                },
            ),
            incarnation: format!("{:016x}", self.incarnation),
            counter: st.counter,
            renewals: st.renewals,
            failures: st.failures,
            last_error: st.last_error.clone(),
            renew_ms: self.timing.renew.as_millis() as u64,
            lease_ms: self.timing.lease.as_millis() as u64,
            dead_after_ms: self.timing.dead_after().as_millis() as u64,
            place: Some(self.place().status_name().into()),
            peers: st
                .watched
                .iter()
                .enumerate()
                .filter(|(n, _)| *n as u32 != self.me)
                .map(|(n, w)| {
                    let silent = now.saturating_duration_since(w.changed_at);
                    PeerLeaseStatus {
                        node: n as u32,
                        verdict: match (st.state, w.record) {
                            (LeaseState::Held, None) => "absent",
                            (LeaseState::Held, Some(r)) if r.released => "released",
                            (LeaseState::Held, _)
                                if w.seen_silent() >= self.timing.dead_after() =>
                            {
                                "dead"
                            }
                            (LeaseState::Held, _) => "alive",
                            _ => "unknown",
                        }
                        .into(),
                        last_change_ms_ago: silent.as_millis() as u64,
                        counter: w.record.map(|r| r.counter),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ManualClock;
    use crate::ownership::MemTableStore;

    fn timing() -> LeaseTiming {
        LeaseTiming {
            renew: Duration::from_millis(100),
            lease: Duration::from_millis(400),
            io_timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_lease_is_held_after_settling_and_expires_without_renewals() {
        let clock = Arc::new(ManualClock::default());
        let advance = |d: u64| clock.advance(Duration::from_millis(d));
        let store = Arc::new(MemTableStore::default());
        let a = DiskLease::new(clock.clone(), store.clone(), 1, 0, 2, timing(), 11);
        let b = DiskLease::new(clock.clone(), store, 1, 1, 2, timing(), 22);
        // Settle: 2 x 100 + 2 x 100 ms of unbroken renewals.
        for _ in 0..5 {
            assert!(!a.holds());
            a.renew_once();
            b.renew_once();
            a.watch_others();
            b.watch_others();
            advance(100);
        }
        a.renew_once();
        b.renew_once();
        assert!(a.holds() && b.holds());
        assert!(matches!(a.verdict(1), Verdict::Alive { .. }));
        // b stops renewing: its own lease runs out after 400 ms...
        for _ in 0..4 {
            advance(100);
            a.renew_once();
            a.watch_others();
        }
        assert!(!b.holds(), "b's lease ran out");
        assert!(
            matches!(a.verdict(1), Verdict::Alive { .. }),
            "not dead yet for a"
        );
        // ... and a calls it dead only after 1.1 x 400 + 100 + 100 ms without a change, counted
        // from when a read the last change (t = 600 ms): at t >= 1240 ms.
        for _ in 0..3 {
            advance(100);
            a.renew_once();
            a.watch_others();
        }
        assert!(
            matches!(a.verdict(1), Verdict::Alive { .. }),
            "t = 1200 ms: not yet"
        );
        for _ in 0..1 {
            advance(100);
            a.renew_once();
            a.watch_others();
        }
        assert!(matches!(a.verdict(1), Verdict::Dead { .. }));
        assert_eq!(b.status().state, LeaseState::Expired);
    }

    #[test]
    fn a_released_heartbeat_is_dead_at_once() {
        let clock = Arc::new(ManualClock::default());
        let store = Arc::new(MemTableStore::default());
        let a = DiskLease::new(clock.clone(), store.clone(), 1, 0, 2, timing(), 1);
        let b = DiskLease::new(clock.clone(), store, 1, 1, 2, timing(), 2);
        for _ in 0..6 {
            a.renew_once();
            b.renew_once();
            a.watch_others();
            clock.advance(Duration::from_millis(100));
        }
        assert!(matches!(a.verdict(1), Verdict::Alive { .. }));
        b.release().expect("release");
        b.renew_once();
        a.renew_once();
        a.watch_others();
        assert!(
            matches!(a.verdict(1), Verdict::Dead { .. }),
            "a renewal after the release writes nothing"
        );
        assert!(!b.holds());
    }

    #[test]
    fn timing_is_checked() {
        assert!(timing().check().is_ok());
        let mut t = timing();
        t.lease = Duration::from_millis(250);
        assert!(t.check().unwrap_err().contains("twice the renewal"));
    }
}
