//! The majority lease (`nvmirror::cluster::quorum`) against random faults
//! (`nvmirror_sim::quorum`): hundreds of seeds hold the invariants, and each deliberate flaw
//! of the protocol is caught, so the simulator is known to look where it matters.

use nvmirror::cluster::quorum::Flaws;
use nvmirror_sim::quorum::{run_quorum, QuorumSettings};

fn first_violation(seeds: std::ops::Range<u64>, s: QuorumSettings) -> Option<(u64, String)> {
    seeds
        .into_iter()
        .find_map(|seed| run_quorum(seed, s).violation.map(|v| (seed, v)))
}

#[test]
fn three_voters_hold_the_invariants_across_1000_seeds() {
    let s = QuorumSettings::default();
    let (mut held, mut steps, mut tenures) = (0, 0, 0);
    for seed in 0..1000 {
        let o = run_quorum(seed, s);
        if seed == 0 {
            eprintln!("seed 0: {o:?}");
        }
        assert_eq!(o.violation, None, "seed {seed}");
        held += o.held_steps;
        steps += o.steps;
        tenures += o.tenures;
    }
    // Not vacuous: the lease was held much of the time and changed hands often.
    let share = held as f64 / steps as f64;
    assert!(share > 0.3, "held {share:.2} of the time");
    assert!(tenures > 1000 * 3, "{tenures} tenures");
}

#[test]
fn clocks_off_by_10_percent_hold_the_invariants_with_the_margin() {
    let s = QuorumSettings {
        max_drift_ppm: 100_000,
        ..QuorumSettings::default()
    };
    for seed in 0..300 {
        assert_eq!(run_quorum(seed, s).violation, None, "seed {seed}");
    }
}

#[test]
fn five_voters_hold_the_invariants() {
    let s = QuorumSettings {
        nodes: 5,
        ..QuorumSettings::default()
    };
    for seed in 0..200 {
        assert_eq!(run_quorum(seed, s).violation, None, "seed {seed}");
    }
}

fn flawed(flaws: Flaws) -> QuorumSettings {
    QuorumSettings {
        flaws,
        ..QuorumSettings::default()
    }
}

#[test]
fn a_promise_without_the_drift_margin_is_caught() {
    // With clocks up to 10% off, a lease and a promise of the same length on two clocks
    // differ by 400 ms of real time.
    let found = first_violation(
        0..300,
        QuorumSettings {
            max_drift_ppm: 100_000,
            ..flawed(Flaws {
                no_drift_margin: true,
                ..Flaws::default()
            })
        },
    );
    assert!(found.is_some(), "no seed caught the missing drift margin");
}

#[test]
fn granting_right_after_a_restart_is_caught() {
    let found = first_violation(
        0..300,
        flawed(Flaws {
            no_quiet_after_restart: true,
            ..Flaws::default()
        }),
    );
    assert!(found.is_some(), "no seed caught the missing quiet period");
}

#[test]
fn counting_answers_of_an_earlier_round_is_caught() {
    let found = first_violation(
        0..300,
        flawed(Flaws {
            count_stale_answers: true,
            ..Flaws::default()
        }),
    );
    assert!(found.is_some(), "no seed caught stale answers");
}

/// Rarer than the others (a candidate bumps its epoch with every round it votes for itself):
/// the first seed that catches it is 1526.
#[test]
fn granting_an_epoch_to_two_nodes_is_caught() {
    let found = first_violation(
        0..3000,
        flawed(Flaws {
            reuse_epochs: true,
            ..Flaws::default()
        }),
    );
    assert!(found.is_some(), "no seed caught a reused epoch");
}
