//! nvmirror: a block device whose writes are durable in NVRAM, mirrored to a partner node,
//! before they are acknowledged, and flushed to the storage medium in the background.
//!
//! Data path, top to bottom: `frontend` (ublk queue) -> `engine` (`routing`, then
//! `datapath`) -> `log` (NVRAM staging, group commit) -> `mirror` (the copy to the partner)
//! -> `flusher` (`apply` to the medium, then release). `index` serves reads of staged data;
//! `nvram` is the on-device format; `medium` the backing storage; `cluster` and `ownership`
//! say who serves which range, `lease` (a heartbeat on the shared medium) who may serve and
//! when a node is dead, `watchdog` the self-fence when a medium write hangs (it watches
//! `medium_writes`); `node` is the daemon's behaviour (link set-up, partner
//! watch, control socket); `state_events` is what `nvmirrorctl events` streams; `host` is
//! the seam to the machine (time, tasks).
//!
//! Layers (a module imports only modules in layers below it; `tests/module_layers.rs`
//! checks it):
//! 1. `block`, `host`, `index`, `io_latency`, `medium_writes`, `reservation`, then `ownership`, `nvram`
//! 2. `medium`, `lease`, `watchdog`, then `lun`, `config`, `apply`, `inspect`, `shipping`
//! 3. `log`, then `flusher`, then `mirror`, then `cluster`
//! 4. `engine`
//! 5. `control`, `frontend`, then `devices`, `state_events`
//! 6. `node`
//! 7. `fuzzing` (hidden: the bodies of the fuzz targets in `fuzz/`, for them and their corpus
//!    replay only)

pub mod apply;
pub mod block;
pub mod cluster;
pub mod config;
pub mod control;
pub mod copy_fence;
pub mod devices;
pub mod engine;
pub mod flusher;
pub mod frontend;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod index;
pub mod inspect;
pub mod io_latency;
pub mod lease;
pub mod log;
pub mod lun;
pub mod medium;
mod medium_ring;
pub mod medium_writes;
pub mod mirror;
pub mod node;
pub mod nvram;
pub mod ownership;
pub mod release;
pub mod reservation;
pub mod shipping;
pub mod state_events;
pub mod transitions;
pub mod watchdog;
