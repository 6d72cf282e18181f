//! Claim set C (issue #18): N sources ship their NVRAM logs to one destination, which keeps
//! a log file per source partition and applies it to an image of the source's volume at
//! consistency points. The design and order of work are in `docs/log-shipping.md`.
//!
//! Built so far (steps 1 to 3, and step 4's export; used by `node::destination`): `area`
//! cuts a destination's NVRAM into one area per source, each laid out like that source's
//! NVRAM, where its records wait until they are in the log file; `log_writer` appends them
//! there in sequence order (the area's index by seq is what puts them back in order),
//! answers the source's question whether a batch is logged, and runs the consistency
//! points; `log_file` is the file format (a torn last append cut off on reopening, damage
//! refused); `image` applies a partition's log files to the images of the source's LUNs at
//! a consistency point, records what they hold and removes the files; `export` brings the
//! images of a dead source up to date and hands them over.

pub mod area;
pub mod export;
pub mod image;
pub mod log_file;
pub mod log_writer;
