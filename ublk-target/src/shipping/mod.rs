//! Claim set C (issue #18): N sources ship their NVRAM logs to one destination, which keeps
//! a log file per source partition and applies it to an image of the source's volume at
//! consistency points. The design and order of work are in `docs/log-shipping.md`.
//!
//! Built so far (steps 1 and 2, used by `node::destination`): `area` cuts a destination's
//! NVRAM into one area per source, each laid out like that source's NVRAM, where its
//! records wait until they are in the log file; `log_writer` appends them there in sequence
//! order (the area's index by seq is what puts them back in order) and answers the source's
//! question whether a batch is logged; `log_file` is the file format (a torn last append cut
//! off on reopening, damage refused). Not yet wired in: `image` applies a partition's log to
//! the image at a consistency point and starts the log file again after it (step 3).

pub mod area;
pub mod export;
pub mod image;
pub mod log_file;
pub mod log_writer;
