//! The epoch-fenced majority register (`nvmirror::cluster::register`) against random faults
//! (`nvmirror_sim::register`): hundreds of seeds hold linearizability, late writes of older
//! epochs do happen and are read, and each deliberate flaw is caught, so the simulator is
//! known to look where it matters.

use nvmirror::cluster::register::Flaws;
use nvmirror_sim::register::{run_register, RegisterSettings, Replacements};

fn first_violation(seeds: std::ops::Range<u64>, s: RegisterSettings) -> Option<(u64, String)> {
    seeds
        .into_iter()
        .find_map(|seed| run_register(seed, s).violation.map(|v| (seed, v)))
}

#[test]
fn three_voters_stay_linearizable_across_300_seeds() {
    let s = RegisterSettings::default();
    let (mut reads, mut writes, mut failed, mut late) = (0, 0, 0, 0);
    for seed in 0..300 {
        let o = run_register(seed, s);
        assert_eq!(o.violation, None, "seed {seed}");
        reads += o.reads;
        writes += o.writes;
        failed += o.failed;
        late += o.late_writes_read;
    }
    eprintln!("{reads} reads, {writes} writes, {failed} failed, {late} reads of a failed write");
    // Not vacuous: many operations completed, many failed, and some reads found a write
    // whose client had given up on it.
    assert!(
        reads > 10_000 && writes > 10_000,
        "{reads} reads, {writes} writes"
    );
    assert!(failed > 1_000, "{failed} failed");
    assert!(late > 0, "no read found a failed write");
}

#[test]
fn five_voters_stay_linearizable() {
    let s = RegisterSettings {
        voters: 5,
        ..RegisterSettings::default()
    };
    assert_eq!(first_violation(0..100, s), None);
}

/// Runs `seeds` with `flaws` and asserts that one of them breaks an invariant.
fn assert_caught(flaws: Flaws, seeds: std::ops::Range<u64>, what: &str) {
    let s = RegisterSettings {
        flaws,
        ..RegisterSettings::default()
    };
    let found = first_violation(seeds, s);
    assert!(found.is_some(), "no seed caught {what}");
    eprintln!("caught: {found:?}");
}

#[test]
fn voters_without_the_fence_are_caught() {
    let flaws = Flaws {
        no_fence: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 0..100, "the missing fence");
}

#[test]
fn reads_without_the_write_back_are_caught() {
    let flaws = Flaws {
        no_write_back: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 0..100, "the missing write-back");
}

#[test]
fn answers_matched_without_their_epoch_are_caught() {
    // A restarted node's client counts its operation ids from 1 again; the late answers to
    // its earlier life's operations must not count. Rarer: it needs such an answer to come
    // while the new life's operation of the same id runs.
    let flaws = Flaws {
        ignore_answer_epochs: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 0..3000, "answers matched by id alone");
}

#[test]
fn writes_without_the_prepare_are_caught() {
    // A higher epoch's write that failed on a minority surfaces over a lower epoch's write
    // that completed after it (first at seed 186 of 3,000; at 476 while reads fenced).
    let flaws = Flaws {
        no_prepare: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 180..190, "writes without the prepare");
}

#[test]
fn a_read_taken_for_a_prepare_is_caught() {
    // Reads fence nothing (since 2026-12-07): a client whose read of a slot let its writes
    // skip the prepare is caught as writes without it are (first at seed 473 of 3,000).
    let flaws = Flaws {
        reads_prepare: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 470..480, "a read taken for the prepare");
}

#[test]
fn a_write_back_without_a_prepare_is_caught() {
    // A read that writes a value back under its own epoch must fence a majority first, as
    // a write (found while reads stopped fencing: 6 of 1,500 seeds, the first 523).
    let flaws = Flaws {
        unfenced_write_back: true,
        ..Flaws::default()
    };
    assert_caught(flaws, 520..530, "a write-back without a prepare");
}

#[test]
fn settling_reads_leave_no_failed_write_to_surface() {
    let s = RegisterSettings {
        settled_reads: true,
        ..RegisterSettings::default()
    };
    let (mut reads, mut late) = (0, 0);
    for seed in 0..300 {
        let o = run_register(seed, s);
        assert_eq!(o.violation, None, "seed {seed}");
        reads += o.reads;
        late += o.late_writes_read;
    }
    assert!(reads > 10_000, "{reads} reads");
    assert!(late > 0, "no read found a failed write");
    let five = RegisterSettings { voters: 5, ..s };
    assert_eq!(first_violation(0..100, five), None);
}

#[test]
fn settling_reads_that_are_plain_reads_are_caught() {
    let s = RegisterSettings {
        settled_reads: true,
        flaws: Flaws {
            unsettled_reads: true,
            ..Flaws::default()
        },
        ..RegisterSettings::default()
    };
    let found = first_violation(0..1000, s);
    assert!(
        found.is_some(),
        "no seed caught settling reads left unsettled"
    );
    eprintln!("caught: {found:?}");
}

#[test]
fn voters_replaced_from_a_majority_of_copies_keep_the_register() {
    // A voter that lost its state comes back seeded from copies of a majority of the
    // others' states (`RegisterVoter::seeded`), each taken at its own moment while it was
    // gone: no seed breaks an invariant, with three voters or five, plain or settling reads.
    let s = RegisterSettings {
        replacements: Replacements::Seeded,
        ..RegisterSettings::default()
    };
    let mut replaced = 0;
    for seed in 0..200 {
        let o = run_register(seed, s);
        assert_eq!(o.violation, None, "seed {seed}");
        replaced += o.replaced;
    }
    assert!(replaced > 200, "only {replaced} voters replaced");
    let settled = RegisterSettings {
        settled_reads: true,
        ..s
    };
    assert_eq!(first_violation(0..100, settled), None);
    let five = RegisterSettings { voters: 5, ..s };
    assert_eq!(first_violation(0..100, five), None);
}

#[test]
fn voters_replaced_empty_or_from_copies_taken_too_early_are_caught() {
    // The first version of the replacement: the new voter back, and its copies taken,
    // while an answer the lost voter sent may still count for an operation. Seed 3438 of
    // 5,000: a client's read returned an older value than its own completed write.
    for (how, seeds) in [
        (Replacements::Empty, 0..20),
        (Replacements::CopiesTooEarly, 3430..3440),
    ] {
        let s = RegisterSettings {
            replacements: how,
            ..RegisterSettings::default()
        };
        let found = first_violation(seeds, s);
        assert!(found.is_some(), "no seed caught {how:?}");
        eprintln!("caught {how:?}: {found:?}");
    }
}
