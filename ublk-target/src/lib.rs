//! nvmirror: a block device whose writes are durable in NVRAM (and, later, mirrored to a
//! partner node) before they are acknowledged, and flushed to the storage medium in the
//! background.
//!
//! Data path, top to bottom: `frontend` (ublk queue) -> `engine` (split by LUN range) ->
//! `log` (NVRAM staging, group commit) -> `flusher` (medium, then release). `index` serves
//! reads of staged data; `nvram` is the on-device format; `medium` the backing storage.

pub mod cluster;
pub mod config;
pub mod control;
pub mod devices;
pub mod engine;
pub mod flusher;
pub mod frontend;
pub mod index;
pub mod inspect;
pub mod log;
pub mod medium;
pub mod mirror;
pub mod nvram;
pub mod ownership;
