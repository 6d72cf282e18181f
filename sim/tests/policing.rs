//! The policing protocol (`nvmirror::cluster::policing`) against random arrivals and message
//! delays (`nvmirror_sim::policing`): hundreds of seeds hold the invariants, each deliberate
//! flaw is caught, and the contended portion's wait is measured against the others'.

use nvmirror::cluster::policing::Flaws;
use nvmirror_sim::policing::{run_policing, PolicingSettings};

#[test]
fn two_and_three_nodes_hold_the_invariants() {
    for nodes in [2, 3] {
        let s = PolicingSettings {
            nodes,
            ..PolicingSettings::default()
        };
        let mut handovers = 0;
        for seed in 0..150 {
            let o = run_policing(seed, s);
            assert_eq!(o.violation, None, "{nodes} nodes, seed {seed}");
            assert_eq!(o.writes, 400 * nodes as u64);
            handovers += o.handovers;
        }
        // Not vacuous: the shared portion changed hands all the time.
        assert!(handovers > 150 * 5, "{handovers} handovers");
    }
}

#[test]
fn contention_costs_waiting_and_its_absence_costs_nothing() {
    let (mut shared, mut own) = (0.0, 0.0);
    for seed in 0..50 {
        let o = run_policing(seed, PolicingSettings::default());
        shared += o.mean_wait_shared_us / 50.0;
        own += o.mean_wait_own_us / 50.0;
    }
    eprintln!("mean wait before a write starts: contended portion {shared:.0} µs, own portions {own:.0} µs");
    // A write to a node's own portion never waits for the protocol.
    assert!(own < 1.0, "{own}");
    assert!(shared > 100.0, "{shared}");
    let alone = run_policing(
        0,
        PolicingSettings {
            shared_share: 0.0,
            ..PolicingSettings::default()
        },
    );
    assert_eq!(alone.handovers, 0);
    assert_eq!(alone.messages, 0);
}

#[test]
fn handing_over_with_writes_in_flight_is_caught() {
    let found = (0..200).find_map(|seed| {
        run_policing(
            seed,
            PolicingSettings {
                flaws: Flaws {
                    grant_before_drained: true,
                    ..Flaws::default()
                },
                ..PolicingSettings::default()
            },
        )
        .violation
    });
    let v = found.expect("no seed caught a handover with writes in flight");
    assert!(v.contains("writes running on nodes"), "{v}");
}

#[test]
fn starting_queued_writes_out_of_order_is_caught() {
    let found = (0..200).find_map(|seed| {
        run_policing(
            seed,
            PolicingSettings {
                flaws: Flaws {
                    lifo_queue: true,
                    ..Flaws::default()
                },
                ..PolicingSettings::default()
            },
        )
        .violation
    });
    let v = found.expect("no seed caught out-of-order starts");
    assert!(v.contains("arrived first"), "{v}");
}
