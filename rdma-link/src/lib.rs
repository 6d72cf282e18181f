//! nvmirror's mirror link: carries each record staged in this node's NVRAM log (its "first
//! store") into the partner node's "second store", and reports it durable only when the partner
//! has persisted it. One interface ([`Link`]), two transports: RDMA (RC queue pair via
//! librdmacm, record bytes by RDMA WRITE straight between the registered NVRAM regions) and TCP
//! (tokio, for machines without RDMA and for tests).
//!
//! The link also carries requests and responses ([`Link::request`] and [`RequestHandler`]):
//! opaque payloads of up to `max_request` bytes, used to forward block I/O to the owning node.
//!
//! For a deterministic simulation, [`Link::start_over`] runs a real link over a custom
//! [`Network`], with every task going through a [`Spawn`] of the caller's.
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

//! ## Module map and layers
//!
//! Bottom up; a module uses only modules above it in this list (no import cycles):
//!
//! | module | job |
//! | --- | --- |
//! | [`checksum`] | crc32c by the faster of the CPU's instruction and tables (timed at first use) |
//! | `error` | error types, written for the operator |
//! | `region` | raw memory regions (the engine's NVRAM mapping) |
//! | [`proto`] | the wire format, the same for every transport, and its cryptography (`auth`) |
//! | `config` | [`LinkConfig`], [`Role`], [`Transport`], defaults and checks |
//! | `api` | what link and user exchange: [`Post`], [`LinkState`], [`SecondStore`], [`RequestHandler`] |
//! | `busy` | the busy-poll window of a connection loop |
//! | `spawn` | how the link runs its tasks ([`Spawn`]): counted, stoppable, panics caught |
//! | `network` | the public seam for custom networks ([`Network`]) |
//! | `shared` | state shared by the handle and the background tasks |
//! | `session` | the per-connection protocol state machine (pure logic, unit-tested) |
//! | `handshake` | version, identity and HMAC authentication over any message pipe |
//! | `wire` | what a transport provides: `Carrier` (open/accept) and `Wire` (move messages) |
//! | `driver` | the one connect loop, listen loop and connection loop, generic over `wire` |
//! | `stream` | a message-stream connection: shared by `tcp` and `custom` |
//! | `tcp` | TCP sockets and frames |
//! | `custom` | the transport over a user's [`Network`] |
//! | `rdma` | RDMA RC queue pairs (`verbs` → `cm` → `chunk` → `inbound` → `conn` → carrier) |
//! | `link` | the public [`Link`] handle, which chooses the transport |
//! | `fuzzing` | bodies of the fuzz targets in `fuzz/` (hidden; for them and their corpus replay only) |

mod api;
mod busy;
pub mod checksum;
mod config;
mod custom;
mod driver;
mod error;
/// Entry points of the fuzz targets in `fuzz/` and of their corpus replay; public only for
/// them (the handshake is crate-internal), not part of the API.
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod link;
mod network;
pub mod proto;
mod rdma;
mod refusals;
mod region;
mod session;
mod shared;
mod spawn;
mod stream;
mod tcp;
mod wire;

pub use api::{LinkState, Post, RequestHandler, SecondStore, UpInfo};
pub use bytes::Bytes;
pub use config::{
    default_busy_poll_us, LinkConfig, NodeRole, Role, Transport, BUSY_POLL_MIN_CPUS,
    DEFAULT_BUSY_POLL_US,
};
pub use error::{FrameError, HandshakeError, LinkError};
pub use link::Link;
pub use network::{Connection, Listener, MessageReceiver, MessageSender, NetFuture, Network};
pub use proto::{PartitionSeq, ResyncPoint};
pub use rdma::{rdma_capabilities, RdmaCapabilities};
pub use region::Region;
pub use spawn::{Spawn, Task};
