//! nvmirror-sim: runs the deterministic cluster simulator over many seeds (printing the first
//! that fails) or replays one seed with its whole trace.

use clap::Parser;
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
    /// Force the takeover policy of both nodes: auto or manual (default: drawn per seed).
    #[arg(long)]
    takeover: Option<String>,
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
    let mix = match mix_of(&args.faults).and_then(|mut m| {
        m.takeover_auto = match args.takeover.as_deref() {
            None => None,
            Some("auto") => Some(true),
            Some("manual") => Some(false),
            Some(other) => return Err(format!("--takeover {other:?}: use auto or manual")),
        };
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
    for seed in args.from..args.from + args.seeds {
        let o = run(&Settings::draw(seed, duration, &mix), args.verbose);
        simulated += o.simulated;
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
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
