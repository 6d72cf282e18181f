//! A deterministic simulator of an nvmirror cluster, in the manner of TigerBeetle's VOPR:
//! the real engine and the real mirror link run on simulated time (tokio's paused clock),
//! over a simulated network (`net`), on a simulated shared disk with per-node page caches
//! (`disk`) and in-memory NVRAM with power-cut semantics, as simulated processes that can be
//! frozen or killed (`life`). One seed draws the settings and the faults (`faults`); the
//! world (`world`) runs them with clients writing and reading through both nodes and checks
//! the invariants as it goes (`model` for the data). Same seed, same trace, byte for byte.

pub mod disk;
pub mod faults;
pub mod life;
pub mod model;
pub mod net;
pub mod policing;
pub mod quorum;
pub mod register;
pub mod trace;
pub mod voter_table;
pub mod world;

pub use faults::{only_blips, Fault, FaultKind, FaultMix, Settings};
pub use world::{run, Outcome, Stats};
