//! The engine: LUNs, their ranges and partitions, and the data path.
//!
//! ```text
//! write: split at LUN-range boundaries (pieces of other nodes' ranges are forwarded)
//!        -> PartitionLog::append (copy into NVRAM, index) -> mirror post (to the partner)
//!        -> PartitionLog::commit (persist, on this thread) -> await both -> complete
//!        ... flusher: fence -> medium write + sync -> flush marks -> unindex -> checkpoint
//!                     -> release to the partner
//! read:  staged-extent index -> staged pieces from NVRAM, gaps from the medium
//! start: superblock check -> scan every partition -> replay into the medium -> serve
//! ```
//! One file per job: `core` (what an engine holds, its options and errors), `open`
//! (start-up: check, scan, replay, format), `datapath` (write and read of ranges we
//! serve), `routing` (which node serves an I/O; forwarding both ways), `takeover`
//! (takeover, giveback, handover, writing for a partner whose medium path failed) with its
//! bookkeeping in `takeover_state` (and at start `unfinished_claims`: ranges taken from us
//! by a node that died before replaying them, and `dropped_ranges`: ranges a start dropped
//! records of, left to their taker until its replay ends), `lost_ranges` (killing our records of ranges we lost:
//! void records), `mirroring` (what happens when the partner connects:
//! releases, re-mirroring what it lacks), `serving` (the right to serve: the disk lease, or the
//! partner's word), `flush_context` (what the flusher asks of the node; a log-shipping source's lag behind its destination in `ship_lag`), `partner_reads`
//! (reads our medium cannot serve, from the partner's), and with `storage = "own"`:
//! `resync` (copying a range onto the partner's outdated medium), `repair` (copying it back
//! onto ours after our medium failed batches), `verify` (comparing both media online), `write_priority` (a range handed to the node that keeps writing to it; its counts in `write_demand`), `take_back` (a log-shipping source taking its volume back from the destination's images), both through `range_pause` (a job on one
//! range with its I/O paused); and `status`. Every file below `mod.rs` adds `impl Engine` blocks for its job; none imports
//! `mod.rs`, which only declares and re-exports.
//! The engine knows nothing of ublk, sockets or threads: the daemon's frontend calls
//! `write`, `read_routed`, `write_zeroes` and `flush`; tests and the simulator call them
//! directly with in-memory media, and everything time- or thread-related goes through the
//! [`Host`].

mod core;
mod datapath;
mod dropped_ranges;
mod flush_context;
mod local_reads;
mod lost_ranges;
mod medium_reads;
mod mirroring;
mod open;
mod pace;
mod partner_reads;
mod range_pause;
mod repair;
mod restart_sync;
mod resync;
mod routing;
mod serving;
mod ship_lag;
mod status;
mod take_back;
mod takeover;
mod takeover_state;
mod unfinished_claims;
mod verify;
mod write_demand;
mod write_priority;

pub use self::core::{
    Engine, EngineError, EngineOptions, IoError, OpenMode, OutOfSyncOptions, ReplayReport,
};
pub use crate::lun::{Lun, LunSpec};
pub use medium_reads::{BlockingMediumReads, MediumReads};
pub use open::scan_all;
pub use ship_lag::{PartitionShipLag, ShippingSourceStatus, WaitingBatch};
pub use status::{EngineStatus, LunStatus, MirrorStatus};
pub use take_back::TakenBack;
pub use takeover_state::{FlushDelegate, RangeJob, RangesToMove, TakeoverProgress};
pub use unfinished_claims::wait_for_claimers;
pub use verify::{digests, RangeVerified, Verdict, VerifyReport, VERIFY_CHUNK};
pub use write_demand::WritePriorityPolicy;
