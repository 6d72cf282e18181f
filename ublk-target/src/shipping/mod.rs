//! Claim set C (issue #18): N sources ship their NVRAM logs to one destination, which keeps
//! a log file per source partition and applies it to an image of the source's volume at
//! consistency points. The design and order of work are in `docs/log-shipping.md`.
//!
//! Built so far: `area` cuts a destination's NVRAM into one area per source, each laid out
//! like that source's NVRAM, where its records are held until it releases them (step 1,
//! used by `node::destination`). Step 2's storage side, not yet wired to the link or the
//! daemon: `sequencer` puts a partition's records back in sequence order (gaps held,
//! duplicates dropped, an overdue gap reported); `log_file` appends them durably and checks
//! them when reopened (a torn last append cut off, damage refused); `image` applies a
//! partition's log to the image at a consistency point and starts the log file again after it.

pub mod area;
pub mod image;
pub mod log_file;
pub mod sequencer;
