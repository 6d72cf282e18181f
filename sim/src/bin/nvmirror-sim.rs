//! nvmirror-sim: runs the deterministic cluster simulator over many seeds (printing the first
//! that fails) or replays one seed with its whole trace.

use clap::Parser;
use nvmirror_sim::register::Replacements;
use nvmirror_sim::{run, FaultKind, FaultMix, Settings};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Deterministic simulator of an nvmirror cluster")]
struct Args {
    /// Run this many seeds, starting at --from; stop at the first failure.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Replay exactly this seed and print its whole trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated seconds of faults and client I/O per seed.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Also trace the engine's info messages.
    #[arg(long)]
    verbose: bool,
    /// Keep going after a failing seed (count failures).
    #[arg(long)]
    keep_going: bool,
    /// Only these kinds of fault (comma-separated, e.g. link-cut,reset), all by default:
    /// link-cut, one-way-cut, flap, latency-burst, reset, duplicate, kill, power-cut, pause,
    /// path-failure, flush-pause.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// No operator givebacks or handovers (the scenarios seeds named before they were
    /// simulated).
    #[arg(long)]
    no_givebacks: bool,
    /// No operator handovers (the scenarios seeds named before they were simulated).
    #[arg(long)]
    no_handovers: bool,
    /// With --storage own: no own-medium failures (the scenarios seeds named before they
    /// were simulated).
    #[arg(long)]
    no_medium_failures: bool,
    /// Also stall a node's mirror-link thread now and then while the rest of it runs (its
    /// heartbeats stop, its engine goes on). Off by default so that seeds named before keep
    /// their scenarios.
    #[arg(long)]
    link_stalls: bool,
    /// Force the takeover policy of both nodes: auto or manual (default: drawn per seed).
    #[arg(long)]
    takeover: Option<String>,
    /// Where the LUN lives: shared (one disk both nodes see, the default) or own (each node
    /// its own disk; the ownership table and leases on a third disk, the arbiter).
    #[arg(long, default_value = "shared")]
    storage: String,
    /// Medium I/O takes a few simulated milliseconds (its effect at once, the waiting task
    /// resumes later), so tasks interleave around it; the default runs it in zero time.
    #[arg(long)]
    io_delay: bool,
    /// With --storage own: the resync copies at most this many KiB per simulated second
    /// (a LUN is 256 KiB), so resyncs last while faults and writes go on.
    #[arg(long, value_name = "KIB_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    resync_rate: Option<u64>,
    /// Write priority follows the writer (`cluster.write_priority`): a node that keeps
    /// forwarding writes to a range asks its owner to hand it over.
    #[arg(long)]
    write_priority: bool,
    /// Write priority with queued writes (`cluster.write_priority.queue_writes`): a write to
    /// a range the partner holds waits until the partner hands it over (implies
    /// --write-priority).
    #[arg(long)]
    queue_writes: bool,
    /// Reads of the partner's ranges are served locally (from the node's medium, its own
    /// or the shared one, and second store) under its read lease (`cluster.local_reads`).
    #[arg(long)]
    local_reads: bool,
    /// The arbiter's slots on three voters (the nodes' and a tie-breaker's) instead of the
    /// shared disk: the daemon's register client and ballots, with messages lost or held
    /// back and delivered late (`sim/src/voter_table.rs`).
    #[arg(long)]
    voter_table: bool,
    /// With --voter-table: tries per voter operation before the store fails (the daemon
    /// tries 4 times; 1 makes the store fail far more often, to find what its failures break).
    #[arg(long, value_name = "N", default_value_t = nvmirror::cluster::register_store::ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..))]
    voter_tries: u32,
    /// With --voter-table: the links to the voters are cut on their own (a node from the
    /// partner's voter, the tie-breaker or both, whatever the mirror link does), and in half
    /// the seeds the mirror link's cuts leave the pair's vote link up.
    #[arg(long)]
    vote_cuts: bool,
    /// The nodes' clocks run at different rates: one PERCENT fast, the other PERCENT slow
    /// (the leases allow for two clocks 10% apart: up to 4.7 stays within that; more tries
    /// what happens beyond it).
    #[arg(long, value_name = "PERCENT", value_parser = parse_drift)]
    clock_drift: Option<f64>,
    /// Simulate the majority lease planned for shared-nothing mode (`cluster::quorum`)
    /// instead of the two-node cluster; uses --seeds, --from, --seed and --seconds.
    #[arg(long)]
    quorum: bool,
    /// Simulate the epoch-fenced majority register planned for the arbiter's slots in
    /// shared-nothing mode (`cluster::register`) instead of the two-node cluster; uses
    /// --seeds, --from, --seed, --seconds, --voters, --settled-reads, --replace-voters and
    /// --flaw.
    #[arg(long)]
    register: bool,
    /// With --register: one read in three settles its slot (what a node's start and a
    /// lease regained read the ownership table with), and the checker holds it to that.
    #[arg(long)]
    settled_reads: bool,
    /// With --register: now and then a voter loses its state for good and a new one takes
    /// its place, seeded from copies of a majority of the others' states (what
    /// `nvmirror-tiebreaker --create-state --seed-from` does).
    #[arg(long)]
    replace_voters: bool,
    /// With --quorum or --register: the number of voters.
    #[arg(long, default_value_t = 3)]
    voters: u32,
    /// With --quorum: the clocks' largest rate error, parts per million.
    #[arg(long, default_value_t = 20_000)]
    drift_ppm: u64,
    /// With --quorum or --register: run with a deliberate flaw, to see the simulator catch
    /// it: no-drift-margin, no-quiet-after-restart, count-stale-answers, reuse-epochs,
    /// forget-asked-epochs (--quorum); no-fence, no-write-back, ignore-answer-epochs,
    /// no-prepare, reads-prepare, unfenced-write-back, unsettled-reads (--register; the
    /// last with --settled-reads), empty-replacements, early-copies (--register
    /// --replace-voters: the new voter starts empty, or its copies are taken while the lost
    /// voter's last answers still count).
    #[arg(long)]
    flaw: Option<String>,
}

fn check_voters(args: &Args) -> Result<(), String> {
    if (1..=9).contains(&args.voters) {
        Ok(())
    } else {
        Err(format!("--voters {}: use 1 to 9", args.voters))
    }
}

fn quorum(args: &Args) -> Result<bool, String> {
    let mut flaws = nvmirror::cluster::quorum::Flaws::default();
    match args.flaw.as_deref() {
        None => {}
        Some("no-drift-margin") => flaws.no_drift_margin = true,
        Some("no-quiet-after-restart") => flaws.no_quiet_after_restart = true,
        Some("count-stale-answers") => flaws.count_stale_answers = true,
        Some("reuse-epochs") => flaws.reuse_epochs = true,
        Some("forget-asked-epochs") => flaws.forget_asked_epochs = true,
        Some(other) => return Err(format!("--flaw {other:?}: unknown (see --help)")),
    }
    check_voters(args)?;
    let settings = nvmirror_sim::quorum::QuorumSettings {
        nodes: args.voters,
        seconds: args.seconds,
        max_drift_ppm: args.drift_ppm.min(400_000),
        flaws,
        ..Default::default()
    };
    Ok(run_seeds(args, "quorum", |seed| {
        let o = nvmirror_sim::quorum::run_quorum(seed, settings);
        o.violation.map_or_else(
            || {
                Ok(format!(
                    "held {:.0}% of the time, {} tenures, {} messages",
                    100.0 * o.held_steps as f64 / o.steps.max(1) as f64,
                    o.tenures,
                    o.messages
                ))
            },
            Err,
        )
    }))
}

/// Runs `--seed` or `--seeds` from `--from` of a protocol simulator: `run` gives what a
/// passing seed did, or (Err) the seed's violation. True when every seed passed.
fn run_seeds(args: &Args, what: &str, run: impl Fn(u64) -> Result<String, String>) -> bool {
    let seeds = match args.seed {
        Some(s) => s..s + 1,
        None => args.from..args.from + args.seeds,
    };
    let (mut failed, mut ran) = (0, 0);
    let first = seeds.start;
    for seed in seeds {
        ran += 1;
        match run(seed) {
            Err(violation) => {
                failed += 1;
                println!("seed {seed}: FAIL: {violation}");
                if !args.keep_going {
                    break;
                }
            }
            Ok(summary) if args.seed.is_some() => println!("seed {seed}: PASS: {summary}"),
            Ok(_) => {}
        }
    }
    println!("{what}: {ran} seed(s) from {first}: {failed} failed");
    failed == 0
}

fn register(args: &Args) -> Result<bool, String> {
    let mut flaws = nvmirror::cluster::register::Flaws::default();
    match args.flaw.as_deref() {
        None => {}
        Some("no-fence") => flaws.no_fence = true,
        Some("no-write-back") => flaws.no_write_back = true,
        Some("ignore-answer-epochs") => flaws.ignore_answer_epochs = true,
        Some("no-prepare") => flaws.no_prepare = true,
        Some("reads-prepare") => flaws.reads_prepare = true,
        Some("unfenced-write-back") => flaws.unfenced_write_back = true,
        Some("unsettled-reads") => flaws.unsettled_reads = true,
        Some("empty-replacements" | "early-copies") if args.replace_voters => {}
        Some(f @ ("empty-replacements" | "early-copies")) => {
            return Err(format!("--flaw {f} needs --replace-voters"))
        }
        Some(other) => {
            return Err(format!(
                "--flaw {other:?}: unknown with --register (see --help)"
            ))
        }
    }
    check_voters(args)?;
    let settings = nvmirror_sim::register::RegisterSettings {
        voters: args.voters,
        seconds: args.seconds,
        flaws,
        settled_reads: args.settled_reads,
        replacements: match (args.replace_voters, args.flaw.as_deref()) {
            (false, _) => Replacements::Off,
            (true, Some("empty-replacements")) => Replacements::Empty,
            (true, Some("early-copies")) => Replacements::CopiesTooEarly,
            (true, _) => Replacements::Seeded,
        },
    };
    Ok(run_seeds(args, "register", |seed| {
        let o = nvmirror_sim::register::run_register(seed, settings);
        o.violation.map_or_else(
            || {
                Ok(format!(
                    "{} reads and {} writes completed, {} failed, {} read(s) of a failed write, \
                     {} voter(s) replaced",
                    o.reads, o.writes, o.failed, o.late_writes_read, o.replaced
                ))
            },
            Err,
        )
    }))
}

fn mix_of(names: &[String]) -> Result<FaultMix, String> {
    if names.is_empty() {
        return Ok(FaultMix::all());
    }
    let kinds = names
        .iter()
        .map(|n| {
            FaultKind::ALL
                .iter()
                .copied()
                .find(|k| k.name() == n)
                .ok_or_else(|| {
                    format!(
                        "unknown fault {n:?}; known: {}",
                        FaultKind::ALL.map(|k| k.name()).join(", ")
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FaultMix::only(&kinds, FaultMix::all().rate))
}

fn main() {
    let args = Args::parse();
    if args.quorum || args.register {
        let run = if args.quorum { quorum } else { register };
        match run(&args) {
            Ok(passed) => std::process::exit(if passed { 0 } else { 1 }),
            Err(e) => {
                eprintln!("nvmirror-sim: {e}");
                std::process::exit(2);
            }
        }
    }
    let mix = match mix_of(&args.faults).and_then(|mut m| {
        m.takeover_auto = match args.takeover.as_deref() {
            None => None,
            Some("auto") => Some(true),
            Some("manual") => Some(false),
            Some(other) => return Err(format!("--takeover {other:?}: use auto or manual")),
        };
        m.own_storage = match args.storage.as_str() {
            "shared" => false,
            "own" => true,
            other => return Err(format!("--storage {other:?}: use shared or own")),
        };
        m.io_delay = args.io_delay;
        m.write_priority = args.write_priority;
        m.queue_writes = args.queue_writes;
        m.local_reads = args.local_reads;
        m.voter_table = args.voter_table;
        if !args.voter_table && args.voter_tries != nvmirror::cluster::register_store::ATTEMPTS {
            return Err("--voter-tries counts the voters' tries: it needs --voter-table".into());
        }
        m.voter_tries = args.voter_tries;
        if args.vote_cuts && !args.voter_table {
            return Err("--vote-cuts cuts the links to the voters: it needs --voter-table".into());
        }
        m.vote_cuts = args.vote_cuts;
        m.clock_drift = args.clock_drift.map(|percent| percent / 100.0);
        m.resync_rate = args.resync_rate.map(|kib| kib << 10);
        if args.no_givebacks {
            m = m.without_givebacks();
        }
        if args.no_medium_failures {
            m.medium_failures = false;
        }
        if args.link_stalls {
            m = m.with_link_stalls();
        }
        if args.no_handovers {
            m = m.without_handovers();
        }
        Ok(m)
    }) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("nvmirror-sim: {e}");
            std::process::exit(2);
        }
    };
    let duration = Duration::from_secs(args.seconds);
    if let Some(seed) = args.seed {
        let o = run(&Settings::draw(seed, duration, &mix), args.verbose);
        for l in &o.trace {
            println!("{l}");
        }
        println!(
            "seed {seed}: {} ({:?} simulated, trace digest {:016x})",
            if o.passed() { "PASS" } else { "FAIL" },
            o.simulated,
            o.digest
        );
        std::process::exit(if o.passed() { 0 } else { 1 });
    }
    let started = std::time::Instant::now();
    let mut simulated = Duration::ZERO;
    let mut failures = 0u64;
    let (mut voter_ops, mut voter_rounds, mut voter_late) = (0u64, 0u64, 0u64);
    for seed in args.from..args.from + args.seeds {
        let o = run(&Settings::draw(seed, duration, &mix), args.verbose);
        simulated += o.simulated;
        voter_ops += o.stats.voter_operations;
        voter_rounds += o.stats.voter_new_rounds;
        voter_late += o.stats.voter_late_deliveries;
        if !o.passed() {
            failures += 1;
            println!("seed {seed}: FAIL: {}", o.violations[0]);
            if !args.keep_going {
                println!(
                    "replay it with: nvmirror-sim --seed {seed} --seconds {}",
                    args.seconds
                );
                break;
            }
        }
    }
    let wall = started.elapsed();
    println!(
        "{} seed(s) from {}: {failures} failed; {:.0} s simulated in {:.1} s ({:.1} seeds/s, {:.0}x real time)",
        args.seeds,
        args.from,
        simulated.as_secs_f64(),
        wall.as_secs_f64(),
        args.seeds as f64 / wall.as_secs_f64(),
        simulated.as_secs_f64() / wall.as_secs_f64()
    );
    if voter_ops > 0 {
        println!(
            "voters: {voter_ops} operations (tries), {voter_rounds} new ballot rounds after a \
             refusal, {voter_late} late messages"
        );
    }
    std::process::exit(if failures == 0 { 0 } else { 1 });
}

/// `--clock-drift`: a percentage from 0 to 50.
fn parse_drift(s: &str) -> Result<f64, String> {
    let percent: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (a percentage, e.g. 4.5)"))?;
    if (0.0..=50.0).contains(&percent) {
        Ok(percent)
    } else {
        Err(format!("{percent} is outside 0-50 (percent)"))
    }
}
