//! The cluster as one node sees it: who owns which LUN range ([`Cluster`], `ranges`), how
//! I/O to another node's range gets there ([`Forwarder`], `forward`), and the format of a
//! forwarded request (`wire`). The engine routes every I/O through it; takeover and giveback
//! change it.

pub mod claim_note;
mod forward;
pub mod outdated;
pub mod policing;
pub mod quorum;
mod ranges;
mod read_lease;
pub mod register;
pub mod register_store;
pub mod register_wire;
pub mod voter_arbiter;
pub mod voter_service;
pub mod wire;

pub use forward::{ForwardFuture, Forwarder, RequestForwarder};
pub use ranges::{
    Cluster, ClusterSetup, LostAt, LunRange, NodeId, RangeState, RangeStatus, Reloaded,
};
pub use read_lease::ReadLeases;
