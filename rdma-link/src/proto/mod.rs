//! The wire format shared by all transports. Unchanged by the custom-network seam: a custom
//! network carries the same messages as TCP, without the frame header.
//!
//! A message is `kind: u8` followed by a fixed little-endian body. Over TCP each message is a
//! frame `len: u32 | crc32c(payload): u32 | payload`, and a `Record` message carries the record
//! bytes right after its header inside the same frame. Over RDMA a message is the payload of one
//! SEND (the fabric checks integrity), and record bytes travel separately by RDMA WRITE.
//!
//! Requests and responses (the link's RPC facility) carry an opaque payload. Over TCP the payload
//! follows its header in the same frame; over RDMA a request / response is cut into `Chunk`
//! SENDs (see [`ChunkHdr`]) that the receiver reassembles.
//!
//! Over a custom network (see `network`) a message is the payload alone, a record followed by its
//! bytes ([`decode_message`]).
//!
//! After the handshake's challenge every message carries a MAC of [`TAG_LEN`] bytes at its end
//! (TCP: after the frame's payload; a custom network: at the end of the message; RDMA: at the
//! end of the SEND, and a record's MAC covers the bytes its RDMA WRITE placed): see `auth`.
//!
//! Decoding never panics and never allocates more than the `MAX_*` limits, whatever the input.
//!
//! Files, bottom up: `codec` (little-endian fields), `msg` (the messages, their encoding and
//! decoding), `auth` (handshake proofs, session keys, frame MACs), `frame` (how messages are carried: TCP frames, RDMA chunks, the whole messages of
//! a custom network, with the limits checked on receipt). Everything is re-exported here.

mod auth;
mod codec;
mod frame;
mod msg;

pub use auth::*;
pub use frame::*;
pub use msg::*;
