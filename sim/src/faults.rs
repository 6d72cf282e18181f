//! What one seed runs: the cluster's settings and the faults, drawn from the seed up front, so
//! that a seed names one exact scenario.

use nvmirror::cluster::register_store::ATTEMPTS;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// The kinds of fault the world injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Both directions of the link deliver nothing (silently) for a while.
    LinkCut,
    /// One direction delivers nothing for a while.
    OneWayCut,
    /// The link goes down and up several times.
    Flap,
    /// Every message is slow for a while.
    LatencyBurst,
    /// One connection is reset.
    Reset,
    /// A message is delivered twice (the receiver must reject the stream).
    Duplicate,
    /// A node's process is killed (kill -9) and restarted later.
    Kill,
    /// A node loses power (NVRAM keeps only what was persisted, its page cache is lost) and
    /// boots again later.
    PowerCut,
    /// A node's process is frozen (SIGSTOP) and later continues.
    Pause,
    /// A node's path to the shared disk fails for a while.
    PathFailure,
    /// The operator pauses a node's flusher for a while.
    FlushPause,
}

impl FaultKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LinkCut => "link-cut",
            FaultKind::OneWayCut => "one-way-cut",
            FaultKind::Flap => "flap",
            FaultKind::LatencyBurst => "latency-burst",
            FaultKind::Reset => "reset",
            FaultKind::Duplicate => "duplicate",
            FaultKind::Kill => "kill",
            FaultKind::PowerCut => "power-cut",
            FaultKind::Pause => "pause",
            FaultKind::PathFailure => "path-failure",
            FaultKind::FlushPause => "flush-pause",
        }
    }

    pub const ALL: [FaultKind; 11] = [
        FaultKind::LinkCut,
        FaultKind::OneWayCut,
        FaultKind::Flap,
        FaultKind::LatencyBurst,
        FaultKind::Reset,
        FaultKind::Duplicate,
        FaultKind::Kill,
        FaultKind::PowerCut,
        FaultKind::Pause,
        FaultKind::PathFailure,
        FaultKind::FlushPause,
    ];
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Cut {
        from: usize,
        to: usize,
        both: bool,
        duration: Duration,
    },
    Flap {
        period: Duration,
        times: u32,
    },
    LatencyBurst {
        duration: Duration,
        latency: Duration,
    },
    Reset,
    Duplicate,
    Kill {
        node: usize,
        down: Duration,
    },
    PowerCut {
        node: usize,
        down: Duration,
    },
    Pause {
        node: usize,
        duration: Duration,
    },
    PathFailure {
        node: usize,
        duration: Duration,
    },
    /// A node's mirror-link thread stops (blocked or unscheduled) while the rest of the node
    /// runs: its heartbeats, acknowledgements and requests stop, its engine goes on.
    LinkStall {
        node: usize,
        duration: Duration,
    },
    /// With `storage = "own"`: a node's own medium (not the arbiter) fails every read and
    /// write for a while.
    MediumFailure {
        node: usize,
        duration: Duration,
    },
    FlushPause {
        node: usize,
        duration: Duration,
    },
    /// The operator moves ranges home (`nvmirrorctl giveback`, or Pacemaker's demote): every
    /// running node hands the partner the ranges the config gives the partner that it holds.
    /// With `then_stop`, node `victim` is killed (or loses power) that long after: a crash
    /// while the ranges change hands.
    Giveback {
        then_stop: Option<(usize, bool, Duration)>,
    },
    /// The operator moves `node`'s own configured ranges to the partner (`nvmirrorctl
    /// handover`, a switchover before maintenance); `then_stop` as for a giveback.
    Handover {
        node: usize,
        then_stop: Option<(usize, bool, Duration)>,
    },
    /// The operator takes the partner's ranges over on `node` (`nvmirrorctl takeover`
    /// without --force): refused while the link is up, then it waits for the partner's disk
    /// heartbeat to stop, or gives up.
    Takeover {
        node: usize,
    },
    /// With the table on voters (`--vote-cuts`): `node`'s link to voter `voter` (the
    /// partner's or the tie-breaker's) delivers nothing either way for a while, whatever the
    /// mirror link does; with `answers_only`, its requests still arrive (and take effect)
    /// but no answer comes back.
    VoteCut {
        node: usize,
        voter: u32,
        answers_only: bool,
        duration: Duration,
    },
}

impl Fault {
    /// Whether, with `storage = "own"`, no medium may ever be marked outdated in a run whose
    /// faults are all like this one: nothing stops a node or its paths, and the link never
    /// goes down. A silent cut or a latency burst well inside the link's heartbeat timeout
    /// `link_timeout` does not take it down; an operator's flusher pause delays flushing only.
    /// (A reset or a duplicated message does take the link down until it reconnects: a write
    /// in between runs degraded, and its range's mark on the partner's medium is right.)
    pub fn leaves_media_equal(&self, link_timeout: Duration) -> bool {
        match self {
            Fault::FlushPause { .. } => true,
            Fault::Cut { duration, .. } => *duration * 10 < link_timeout * 6,
            Fault::LatencyBurst { latency, .. } => *latency * 3 < link_timeout,
            _ => false,
        }
    }

    /// How long a fault of the link lasts (a cut or a latency burst); None for the others.
    pub fn link_span(&self) -> Option<Duration> {
        match self {
            Fault::Cut { duration, .. } | Fault::LatencyBurst { duration, .. } => Some(*duration),
            _ => None,
        }
    }
}

/// Whether, with `storage = "own"`, no medium may ever be marked outdated in a run with these
/// faults: each is a blip ([`Fault::leaves_media_equal`]) and the link's blips lie at least
/// `link_timeout` apart (short cuts back to back add up to a long one).
pub fn only_blips(faults: &[(Duration, Fault)], link_timeout: Duration) -> bool {
    let mut by_time: Vec<&(Duration, Fault)> = faults.iter().collect();
    by_time.sort_by_key(|(at, _)| *at);
    let mut link_quiet_from = Duration::ZERO;
    for (at, f) in by_time {
        if !f.leaves_media_equal(link_timeout) {
            return false;
        }
        let Some(lasts) = f.link_span() else {
            continue;
        };
        if *at < link_quiet_from {
            return false;
        }
        link_quiet_from = *at + lasts + link_timeout;
    }
    true
}

/// Which faults a run may draw, and how often.
#[derive(Clone, Debug)]
pub struct FaultMix {
    pub kinds: Vec<(FaultKind, u32)>,
    /// Faults per simulated second, on average.
    pub rate: f64,
    /// Force `takeover = "auto"` (true) or `"manual"` (false) instead of drawing it.
    pub takeover_auto: Option<bool>,
    /// `storage = "own"`: each node its own disk, the table on a third (the arbiter).
    pub own_storage: bool,
    /// Operator givebacks after the faults that can move ranges (drawn from a stream of
    /// their own, so the other faults of a seed stay as they were without them).
    pub givebacks: bool,
    /// Operator handovers at random times, each followed by a giveback (a stream of their
    /// own too).
    pub handovers: bool,
    /// With `takeover = "manual"`: the operator's takeovers (`nvmirrorctl takeover`, what
    /// Pacemaker's promote runs) after faults that cut a node off or stop it.
    pub takeovers: bool,
    /// With `storage = "own"`: a node's own medium fails now and then (a stream of its own,
    /// so the other faults of every seed stay as they were).
    pub medium_failures: bool,
    /// A node's link thread stalls now and then ([`Fault::LinkStall`]; a stream of its own,
    /// so the other faults of every seed stay as they were). Off in [`FaultMix::all`]: the
    /// seeds named before it was simulated keep their scenarios.
    pub link_stalls: bool,
    /// Blocking work (medium I/O) takes a few simulated milliseconds instead of none: its
    /// effects happen at once, the task that waits for it resumes later, so other tasks run
    /// in between (a read then reports bytes that may have changed since).
    pub io_delay: bool,
    /// With `storage = "own"`: the resync's rate limit in bytes per simulated second
    /// (None: none), which keeps a resync running while more faults and writes arrive.
    pub resync_rate: Option<u64>,
    /// Write priority follows the writer (`cluster.write_priority`): a node that keeps
    /// forwarding writes to a range asks its owner for it. Draws nothing, so every seed
    /// keeps its faults; off in [`FaultMix::all`].
    pub write_priority: bool,
    /// With `write_priority`: a write to a range the partner holds waits until the range is
    /// handed over (`cluster.write_priority.queue_writes`) instead of being forwarded. Draws
    /// nothing; off in [`FaultMix::all`].
    pub queue_writes: bool,
    /// Reads of the partner's ranges served locally under its read lease
    /// (`cluster.local_reads`), with either storage. Draws nothing; off in [`FaultMix::all`].
    pub local_reads: bool,
    /// The nodes' clocks run at different rates: one this fraction fast, the other as much
    /// slow (drawn from a stream of its own, so every seed keeps its faults). None: both
    /// exact, as before.
    pub clock_drift: Option<f64>,
    /// The arbiter's slots live on three voters (`voter_table`) instead of the shared disk:
    /// its operations may time out, and a timed-out write may surface later. Draws from a
    /// stream of its own; off in [`FaultMix::all`].
    pub voter_table: bool,
    /// With `voter_table`: tries per voter operation before the store fails (the daemon's
    /// [`ATTEMPTS`]; fewer make the store fail far more often).
    pub voter_tries: u32,
    /// With `voter_table`: the links to the voters fail on their own ([`Fault::VoteCut`]),
    /// and in half the seeds the pair's vote link does not share the mirror link's cuts (a
    /// vote link over Ethernet beside an InfiniBand mirror link). A stream of its own; off
    /// in [`FaultMix::all`].
    pub vote_cuts: bool,
}

impl FaultMix {
    /// Every kind of fault.
    pub fn all() -> FaultMix {
        FaultMix {
            kinds: vec![
                (FaultKind::LinkCut, 3),
                (FaultKind::OneWayCut, 2),
                (FaultKind::Flap, 1),
                (FaultKind::LatencyBurst, 2),
                (FaultKind::Reset, 2),
                (FaultKind::Duplicate, 1),
                (FaultKind::Kill, 3),
                (FaultKind::PowerCut, 3),
                (FaultKind::Pause, 2),
                (FaultKind::PathFailure, 2),
                (FaultKind::FlushPause, 2),
            ],
            rate: 0.4,
            takeover_auto: None,
            own_storage: false,
            givebacks: true,
            handovers: true,
            takeovers: true,
            medium_failures: true,
            link_stalls: false,
            io_delay: false,
            resync_rate: None,
            write_priority: false,
            queue_writes: false,
            local_reads: false,
            clock_drift: None,
            voter_table: false,
            voter_tries: ATTEMPTS,
            vote_cuts: false,
        }
    }

    /// The same mix without operator givebacks: the scenarios seeds named before givebacks
    /// were simulated.
    pub fn without_givebacks(mut self) -> FaultMix {
        self.givebacks = false;
        self.handovers = false;
        self.takeovers = false;
        self
    }

    /// The same mix without operator handovers and takeovers, with only the givebacks after
    /// faults (the scenarios the giveback seeds were found in).
    pub fn without_handovers(mut self) -> FaultMix {
        self.handovers = false;
        self.takeovers = false;
        self
    }

    /// The same mix with link-thread stalls ([`FaultMix::link_stalls`]).
    pub fn with_link_stalls(mut self) -> FaultMix {
        self.link_stalls = true;
        self
    }

    /// Only `kinds`, equally likely.
    pub fn only(kinds: &[FaultKind], rate: f64) -> FaultMix {
        FaultMix {
            kinds: kinds.iter().map(|k| (*k, 1)).collect(),
            rate,
            takeover_auto: None,
            own_storage: false,
            givebacks: false,
            handovers: false,
            takeovers: false,
            medium_failures: false,
            link_stalls: false,
            io_delay: false,
            resync_rate: None,
            write_priority: false,
            queue_writes: false,
            local_reads: false,
            clock_drift: None,
            voter_table: false,
            voter_tries: ATTEMPTS,
            vote_cuts: false,
        }
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> Option<FaultKind> {
        let total: u32 = self.kinds.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut x = rng.gen_range(0..total);
        for (k, w) in &self.kinds {
            if x < *w {
                return Some(*k);
            }
            x -= w;
        }
        None
    }
}

/// The settings a seed runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    pub duration: Duration,
    pub lun_blocks: u64,
    pub ranges: u32,
    pub partitions: u32,
    pub takeover_auto: bool,
    /// Each node its own disk (`storage = "own"`).
    pub own_storage: bool,
    /// See [`FaultMix::io_delay`].
    pub io_delay: bool,
    /// See [`FaultMix::resync_rate`].
    pub resync_rate: Option<u64>,
    /// See [`FaultMix::write_priority`].
    pub write_priority: bool,
    /// See [`FaultMix::queue_writes`].
    pub queue_writes: bool,
    /// See [`FaultMix::local_reads`].
    pub local_reads: bool,
    /// See [`FaultMix::voter_table`].
    pub voter_table: bool,
    /// See [`FaultMix::voter_tries`].
    pub voter_tries: u32,
    /// With `voter_table`: the pair's vote link is cut only by [`Fault::VoteCut`], not with
    /// the mirror link (see [`FaultMix::vote_cuts`]).
    pub separate_vote_link: bool,
    /// Each node's clock rate against real time (see [`FaultMix::clock_drift`]).
    pub clock_rates: [f64; 2],
    pub degraded_nvram: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub linger: Duration,
    /// The disk lease: heartbeat interval, lease, medium I/O timeout.
    pub disk_heartbeat: Duration,
    pub disk_lease: Duration,
    pub medium_io_timeout: Duration,
    /// Client operations per simulated second.
    pub op_rate: f64,
    pub faults: Vec<(Duration, Fault)>,
}

fn between(rng: &mut ChaCha8Rng, lo: Duration, hi: Duration) -> Duration {
    let (lo, hi) = (lo.as_micros() as u64, hi.as_micros() as u64);
    Duration::from_micros(rng.gen_range(lo..=hi.max(lo)))
}

impl Settings {
    pub fn lease_timing(&self) -> nvmirror::lease::LeaseTiming {
        nvmirror::lease::LeaseTiming {
            renew: self.disk_heartbeat,
            lease: self.disk_lease,
            io_timeout: self.medium_io_timeout,
        }
    }

    /// Draws a scenario from `seed`: settings, then faults of `mix` over `duration`.
    pub fn draw(seed: u64, duration: Duration, mix: &FaultMix) -> Settings {
        let mut s = Self::draw_settings(seed, duration, mix);
        if let Some(auto) = mix.takeover_auto {
            s.takeover_auto = auto;
        }
        s.own_storage = mix.own_storage;
        s.io_delay = mix.io_delay;
        s.resync_rate = mix.resync_rate;
        s.write_priority = mix.write_priority || mix.queue_writes;
        s.queue_writes = mix.queue_writes;
        s.local_reads = mix.local_reads;
        s.voter_table = mix.voter_table;
        s.voter_tries = mix.voter_tries;
        if let Some(drift) = mix.clock_drift {
            use rand::SeedableRng;
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc10c_0000_0000_0001);
            let fast = rng.gen_range(0..2);
            s.clock_rates[fast] = 1.0 + drift;
            s.clock_rates[1 - fast] = 1.0 - drift;
        }
        if mix.own_storage && mix.medium_failures {
            let end = duration.saturating_sub(Duration::from_secs(1));
            s.faults.extend(draw_medium_failures(seed, end));
        }
        if mix.link_stalls {
            let end = duration.saturating_sub(Duration::from_secs(1));
            s.faults
                .extend(draw_link_stalls(seed, end, s.heartbeat_timeout));
        }
        if mix.voter_table && mix.vote_cuts {
            let end = duration.saturating_sub(Duration::from_secs(1));
            let (separate, cuts) = draw_vote_cuts(seed, end, s.heartbeat_timeout);
            s.separate_vote_link = separate;
            s.faults.extend(cuts);
        }
        if mix.takeovers && !s.takeover_auto {
            let t = s.heartbeat_timeout;
            let end = duration.saturating_sub(Duration::from_secs(1));
            let takeovers = draw_takeovers(seed, &s.faults, t, end);
            s.faults.extend(takeovers);
        }
        s
    }

    fn draw_settings(seed: u64, duration: Duration, mix: &FaultMix) -> Settings {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005e_ed0f_5ce9_a710);
        let heartbeat_timeout = between(
            &mut rng,
            Duration::from_millis(300),
            Duration::from_millis(1000),
        );
        let heartbeat_interval = heartbeat_timeout / 4;
        // Log-uniform from 1 ms to 2 s: a flusher that writes at once, or lets records pile up.
        let linger = Duration::from_micros((1000.0 * 2000f64.powf(rng.gen::<f64>())) as u64);
        let ranges = [2, 4][rng.gen_range(0..2)];
        // Drawn from a stream of their own, so that adding them left every seed's faults as
        // they were (the seeds that found bugs name the same scenarios).
        let mut lease_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1ea5_e000_0000_0001);
        let disk_heartbeat = between(&mut lease_rng, heartbeat_timeout / 8, heartbeat_timeout / 2);
        let medium_io_timeout = disk_heartbeat;
        let lease_min = disk_heartbeat * 2 + medium_io_timeout;
        let disk_lease = between(&mut lease_rng, lease_min, lease_min * 3);
        let mut s = Settings {
            seed,
            duration,
            lun_blocks: 64,
            ranges,
            partitions: 2,
            takeover_auto: rng.gen_bool(0.85),
            own_storage: false,
            io_delay: false,
            resync_rate: None,
            write_priority: false,
            queue_writes: false,
            local_reads: false,
            voter_table: false,
            voter_tries: ATTEMPTS,
            separate_vote_link: false,
            clock_rates: [1.0, 1.0],
            degraded_nvram: rng.gen_bool(0.4),
            heartbeat_interval,
            heartbeat_timeout,
            linger,
            disk_heartbeat,
            disk_lease,
            medium_io_timeout,
            op_rate: rng.gen_range(50.0..200.0),
            faults: Vec::new(),
        };
        let t = heartbeat_timeout;
        let mut at = Duration::from_millis(500);
        let end = duration.saturating_sub(Duration::from_secs(1));
        loop {
            let gap = -(1.0 - rng.gen::<f64>()).ln() / mix.rate.max(1e-6);
            at += Duration::from_secs_f64(gap);
            if at >= end {
                break;
            }
            let Some(kind) = mix.pick(&mut rng) else {
                break;
            };
            let node = rng.gen_range(0..2);
            let fault = match kind {
                FaultKind::LinkCut => Fault::Cut {
                    from: 0,
                    to: 1,
                    both: true,
                    duration: between(&mut rng, t / 5, t * 5),
                },
                FaultKind::OneWayCut => Fault::Cut {
                    from: node,
                    to: 1 - node,
                    both: false,
                    duration: between(&mut rng, t / 5, t * 5),
                },
                FaultKind::Flap => Fault::Flap {
                    period: between(&mut rng, t / 2, t * 3),
                    times: rng.gen_range(2..6),
                },
                FaultKind::LatencyBurst => Fault::LatencyBurst {
                    duration: between(&mut rng, t / 2, t * 4),
                    latency: between(&mut rng, Duration::from_millis(5), t * 2),
                },
                FaultKind::Reset => Fault::Reset,
                FaultKind::Duplicate => Fault::Duplicate,
                FaultKind::Kill => Fault::Kill {
                    node,
                    down: between(&mut rng, t / 2, t * 6),
                },
                FaultKind::PowerCut => Fault::PowerCut {
                    node,
                    down: between(&mut rng, t / 2, t * 6),
                },
                FaultKind::Pause => Fault::Pause {
                    node,
                    duration: between(&mut rng, t / 4, t * 4),
                },
                FaultKind::PathFailure => Fault::PathFailure {
                    node,
                    duration: between(&mut rng, t / 2, t * 6),
                },
                FaultKind::FlushPause => Fault::FlushPause {
                    node,
                    duration: between(&mut rng, Duration::from_millis(100), Duration::from_secs(4)),
                },
            };
            s.faults.push((at, fault));
        }
        if mix.givebacks {
            s.faults.extend(draw_givebacks(seed, &s.faults, t, end));
        }
        if mix.handovers {
            s.faults.extend(draw_handovers(seed, end));
        }
        s
    }
}

/// Givebacks after the faults that can move ranges (a takeover follows them), some soon
/// after the fault ends (the node that lost its ranges may not have noticed yet), some with
/// a node crashing while the ranges change hands.
fn draw_givebacks(
    seed: u64,
    faults: &[(Duration, Fault)],
    t: Duration,
    end: Duration,
) -> Vec<(Duration, Fault)> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x61fe_bac4_0000_0001);
    let mut out = Vec::new();
    for (at, f) in faults {
        let over = match f {
            Fault::Cut { duration, .. }
            | Fault::Pause { duration, .. }
            | Fault::PathFailure { duration, .. } => *at + *duration,
            Fault::Kill { down, .. } | Fault::PowerCut { down, .. } => *at + *down,
            _ => continue,
        };
        if !rng.gen_bool(0.5) {
            continue;
        }
        let when = over + between(&mut rng, Duration::ZERO, t * 4);
        if when >= end {
            continue;
        }
        let then_stop = maybe_crash(&mut rng);
        out.push((when, Fault::Giveback { then_stop }));
    }
    out
}

/// A node killed or powered off up to 50 ms after an operator's move, 30% of the time.
fn maybe_crash(rng: &mut ChaCha8Rng) -> Option<(usize, bool, Duration)> {
    rng.gen_bool(0.3).then(|| {
        (
            rng.gen_range(0..2),
            rng.gen_bool(0.5),
            between(rng, Duration::ZERO, Duration::from_millis(50)),
        )
    })
}

/// With `takeover = "manual"`: after most faults that cut a node off or stop it, the
/// operator runs a takeover on the other node 0-3 heartbeat timeouts later (while the fault
/// may still last: a cut node is alive, a paused one frozen, a killed one down).
fn draw_takeovers(
    seed: u64,
    faults: &[(Duration, Fault)],
    t: Duration,
    end: Duration,
) -> Vec<(Duration, Fault)> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7a6e_0000_0000_0003);
    let mut out = Vec::new();
    for (at, f) in faults {
        let victim = match f {
            Fault::Cut { from, .. } | Fault::VoteCut { node: from, .. } => *from,
            Fault::Pause { node, .. }
            | Fault::Kill { node, .. }
            | Fault::PowerCut { node, .. }
            | Fault::PathFailure { node, .. } => *node,
            _ => continue,
        };
        if !rng.gen_bool(0.7) {
            continue;
        }
        let when = *at + between(&mut rng, Duration::ZERO, t * 3);
        if when < end {
            out.push((when, Fault::Takeover { node: 1 - victim }));
        }
    }
    out
}

/// A stream of faults of its own (seeded by `seed ^ stream`), so adding it leaves the other
/// faults of every seed as they were: from 0.5 s on, exponential gaps of `mean_gap` seconds
/// on average until `end`, each at a random node, `fault` drawing the rest.
fn node_fault_stream(
    seed: u64,
    stream: u64,
    mean_gap: f64,
    end: Duration,
    mut fault: impl FnMut(&mut ChaCha8Rng, usize) -> Fault,
) -> Vec<(Duration, Fault)> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stream);
    let mut out = Vec::new();
    let mut at = Duration::from_millis(500);
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.gen::<f64>()).ln() * mean_gap);
        if at >= end {
            return out;
        }
        let node = rng.gen_range(0..2);
        out.push((at, fault(&mut rng, node)));
    }
}

/// Link-thread stalls, about one per 8 simulated seconds, each for 0.2 to 3 heartbeat
/// timeouts (shorter ones the link must ride out, longer ones the partner sees as silence).
fn draw_link_stalls(seed: u64, end: Duration, timeout: Duration) -> Vec<(Duration, Fault)> {
    node_fault_stream(seed, 0x11c5_7a11_0000_0005, 8.0, end, |rng, node| {
        Fault::LinkStall {
            node,
            duration: between(rng, timeout / 5, timeout * 3),
        }
    })
}

/// The voter the simulator calls the tie-breaker (the data nodes' voters are 0 and 1).
pub const TIEBREAKER_VOTER: u32 = 2;

/// Cuts of the links to the voters (`--vote-cuts`), about one per 5 simulated seconds, each
/// for 0.2 to 6 heartbeat timeouts: a node's link to the partner's voter, to the tie-breaker,
/// or to both at once (the node alone with its own voter, its mirror link up); a quarter of
/// them lose only the answers (requests land, the node hears nothing). Half of them
/// followed by a giveback. Also draws whether the pair's vote link is separate from the
/// mirror link (half the seeds).
fn draw_vote_cuts(seed: u64, end: Duration, t: Duration) -> (bool, Vec<(Duration, Fault)>) {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7073_0000_0000_0006);
    // A stream of its own, added after the first seeds were named (30082, 30238).
    let mut one_way = ChaCha8Rng::seed_from_u64(seed ^ 0x7073_0000_0000_0007);
    let separate = rng.gen_bool(0.5);
    let mut out = Vec::new();
    let mut at = Duration::from_millis(500);
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.gen::<f64>()).ln() * 5.0);
        if at >= end {
            return (separate, out);
        }
        let node = rng.gen_range(0..2);
        let duration = between(&mut rng, t / 5, t * 6);
        let partner = 1 - node as u32;
        let voters: &[u32] = match rng.gen_range(0..3) {
            0 => &[partner],
            1 => &[TIEBREAKER_VOTER],
            _ => &[partner, TIEBREAKER_VOTER],
        };
        let answers_only = one_way.gen_bool(0.25);
        for &voter in voters {
            out.push((
                at,
                Fault::VoteCut {
                    node,
                    voter,
                    answers_only,
                    duration,
                },
            ));
        }
        if rng.gen_bool(0.5) {
            let when = at + duration + between(&mut rng, Duration::ZERO, t * 4);
            if when < end {
                let then_stop = maybe_crash(&mut rng);
                out.push((when, Fault::Giveback { then_stop }));
            }
        }
    }
}

/// Own media failing (`storage = "own"`), about one per 10 simulated seconds, each for
/// 0.3-4 s.
fn draw_medium_failures(seed: u64, end: Duration) -> Vec<(Duration, Fault)> {
    node_fault_stream(seed, 0x3ed1_0000_0000_0004, 10.0, end, |rng, node| {
        Fault::MediumFailure {
            node,
            duration: between(rng, Duration::from_millis(300), Duration::from_secs(4)),
        }
    })
}

/// Switchovers at random times (about one per 8 simulated seconds), each followed by a
/// giveback 0.2-3 s later that brings the ranges home again. A stream of its own (as the
/// givebacks after faults), so adding it left those as they were.
fn draw_handovers(seed: u64, end: Duration) -> Vec<(Duration, Fault)> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4a4d_0000_0000_0002);
    let mut out = Vec::new();
    let mut at = Duration::from_millis(500);
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.gen::<f64>()).ln() * 8.0);
        if at >= end {
            break;
        }
        let node = rng.gen_range(0..2);
        let then_stop = maybe_crash(&mut rng);
        out.push((at, Fault::Handover { node, then_stop }));
        let back = at + between(&mut rng, Duration::from_millis(200), Duration::from_secs(3));
        if back < end {
            let then_stop = maybe_crash(&mut rng);
            out.push((back, Fault::Giveback { then_stop }));
        }
    }
    out
}
