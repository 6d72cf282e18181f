//! nvmirror's mirror link: carries each record staged in this node's NVRAM log (its "first
//! store") into the partner node's "second store", and reports it durable only when the partner
//! has persisted it. One interface ([`Link`]), two transports: RDMA (RC queue pair via
//! librdmacm, record bytes by RDMA WRITE straight between the registered NVRAM regions) and TCP
//! (tokio, for machines without RDMA and for tests).
//!
//! The link also carries requests and responses ([`Link::request`] and [`RequestHandler`]):
//! opaque payloads of up to `max_request` bytes, used to forward block I/O to the owning node.
//!
//! ```no_run
//! # async fn demo(nvram: *mut u8, nvram_len: usize, store: std::sync::Arc<dyn rdma_link::SecondStore>) -> Result<(), rdma_link::LinkError> {
//! use rdma_link::{Link, LinkConfig, Post, Role, Transport};
//! let cfg = LinkConfig::new(Transport::Rdma, Role::Connect("10.0.0.2:7470".parse().unwrap()), 0xc1u64, 1, 2, b"0123456789abcdef-cluster-secret");
//! // SAFETY: the NVRAM mapping lives for the whole process.
//! let local = unsafe { rdma_link::Region::new(nvram, nvram_len)? };
//! let link = Link::start(cfg, Some(local), Some(store))?;
//! let up = link.wait_up().await?;                 // up.peer_resync: where to restart mirroring
//! link.post(Post { partition: 0, seq: 1, local_offset: 4096, remote_offset: 4096, len: 4096 }).await?;
//! link.release(0, 1)?;
//! # Ok(()) }
//! ```

mod error;
mod handshake;
mod link;
pub mod proto;
mod rdma;
mod region;
mod tcp;

pub use bytes::Bytes;
pub use error::{FrameError, HandshakeError, LinkError};
pub use link::{
    Link, LinkConfig, LinkState, Post, RequestHandler, Role, SecondStore, Transport, UpInfo,
    DEFAULT_BUSY_POLL_US,
};
pub use proto::{PartitionSeq, ResyncPoint};
pub use rdma::{rdma_capabilities, RdmaCapabilities};
pub use region::Region;
