//! The NVRAM: a memory-mapped device that holds the staging logs (the "first store").
//!
//! `region` maps the device and makes byte ranges durable, `layout` places the superblock,
//! the per-partition checkpoints and the partition logs, `record` is the on-NVRAM format of
//! one staged write, `scan` reads a partition log back after a restart, and `void` is the
//! record that kills a node's older records of a range it lost. `takeover_note` keeps a
//! takeover's ranges from its claim to the end of its replay, `restart_sync_note` the ranges
//! a start replayed into our outdated own medium until the partner's has them (both in the
//! layout of `range_note`), `range_epochs_note` the ranges a start dropped records of, and
//! those kept for a restart, with their epochs. `memory` is an NVRAM in process memory
//! for the simulator.

pub mod cpu_cache;
pub mod layout;
pub mod memory;
pub mod out_of_sync;
pub mod range_epochs_note;
pub mod range_note;
pub mod record;
pub mod region;
pub mod restart_sync_note;
pub mod scan;
pub mod takeover_note;
pub mod void;

pub use layout::{Layout, PartitionCheckpoint, Superblock};
pub use record::{RecordHeader, RecordKind};
pub use region::NvramRegion;
