//! What a received SEND is, decided before anything acts on it: its MAC checked (after the
//! handshake), a record's MAC checked over the bytes its RDMA WRITE placed in our second store,
//! request / response chunks refused until the peer has proven the secret and reassembled
//! after (see `chunk`), everything else decoded as a control message. Pure logic over bytes,
//! unit-tested below.

use super::chunk::{reassemble, Partial};
use crate::proto::{
    decode_payload_prefix, is_chunk, is_record, split_tag, FrameMac, Msg, RecordHdr,
};
use crate::region::Region;
use std::collections::HashMap;

pub(super) struct Inbound {
    /// The peer has proven the secret: its requests and responses may be reassembled.
    authenticated: bool,
    /// The MAC state of the peer's messages (after the handshake, if frames are authenticated).
    mac: Option<FrameMac>,
    /// Requests / responses being reassembled, by (is request, id). Only looked up, never
    /// iterated: its order cannot show in behaviour.
    partial: HashMap<(bool, u64), Partial>,
    /// (largest request / response payload, most messages under reassembly)
    limits: (u32, usize),
    /// Our second store (where the peer's WRITEs land) and our record limit.
    store: Option<Region>,
    max_record: u32,
}

impl Inbound {
    pub(super) fn new(limits: (u32, usize), store: Option<Region>, max_record: u32) -> Inbound {
        Inbound {
            authenticated: false,
            mac: None,
            partial: HashMap::new(),
            limits,
            store,
            max_record,
        }
    }

    /// The peer has proven the secret.
    pub(super) fn authenticated(&mut self) {
        self.authenticated = true;
    }

    /// From the next message on, every message must carry a valid MAC.
    pub(super) fn start_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// The bytes a record's WRITE placed in our second store.
    fn placed<'a>(
        store: &'a Option<Region>,
        max_record: u32,
        h: &RecordHdr,
    ) -> Result<&'a [u8], String> {
        let Some(store) = store else {
            return Err("peer sent a record but this node has no second store".into());
        };
        if h.len == 0 || h.len > max_record {
            return Err(format!("record of {} bytes (limit {max_record})", h.len));
        }
        // SAFETY: the peer's RDMA WRITE placed these bytes before its SEND (RC ordering) and
        // writes this range no more until we acknowledge it; we only read them. Bytes written
        // there meanwhile by anyone else fail the MAC.
        unsafe { store.slice(h.offset, h.len as usize) }.ok_or_else(|| {
            format!(
                "record [{}, +{}) outside the {}-byte second store",
                h.offset,
                h.len,
                store.len()
            )
        })
    }

    /// One received SEND: the message it completes, if any. Errors are protocol violations.
    pub(super) fn open(&mut self, bytes: &[u8]) -> Result<Option<Msg>, String> {
        let store = self.store;
        let body = match self.mac.as_mut() {
            None => bytes,
            Some(mac) => {
                let (body, tag) = split_tag(bytes).map_err(|e| e.to_string())?;
                let data: &[u8] = if is_record(body) {
                    match decode_payload_prefix(body).map_err(|e| e.to_string())? {
                        (Msg::Record(h), _) => Self::placed(&store, self.max_record, &h)?,
                        _ => return Err("malformed record header".into()),
                    }
                } else {
                    &[]
                };
                mac.check(body, data, tag).map_err(|e| e.to_string())?;
                body
            }
        };
        if is_chunk(body) {
            if !self.authenticated {
                return Err("request / response data before authentication".into());
            }
            return reassemble(&mut self.partial, body, self.limits);
        }
        Msg::decode(body).map(Some).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ChunkHdr, CHUNK_HDR_LEN};

    fn chunk(id: u64, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; CHUNK_HDR_LEN];
        ChunkHdr {
            request: true,
            id,
            status: 0,
            total: data.len() as u32,
            offset: 0,
        }
        .encode(&mut h);
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v
    }

    fn sealed(mac: &mut FrameMac, body: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&mac.tag(body, data));
        v
    }

    #[test]
    fn chunks_are_refused_before_authentication() {
        let mut rx = Inbound::new((1 << 20, 4), None, 1 << 20);
        let e = rx.open(&chunk(1, b"abc")).unwrap_err();
        assert!(e.contains("before authentication"), "{e}");
        // Control messages are read (the handshake), and after authentication chunks too.
        let mut ping = Vec::new();
        Msg::Ping { stamp: 5 }.encode(&mut ping);
        assert_eq!(rx.open(&ping).unwrap(), Some(Msg::Ping { stamp: 5 }));
        rx.authenticated();
        assert!(matches!(
            rx.open(&chunk(1, b"abc")).unwrap(),
            Some(Msg::Request { id: 1, .. })
        ));
    }

    #[test]
    fn macs_cover_messages_and_the_bytes_a_record_placed() {
        let store = Region::leaked(1 << 16);
        assert!(store.write_bytes(4096, &[7u8; 512]));
        let mut rx = Inbound::new((1 << 20, 4), Some(store), 1 << 20);
        rx.authenticated();
        rx.start_mac(FrameMac::new([9; 32]));
        let mut tx = FrameMac::new([9; 32]);
        let mut rec = Vec::new();
        let h = RecordHdr {
            tag: 1,
            partition: 0,
            seq: 1,
            offset: 4096,
            len: 512,
        };
        Msg::Record(h).encode(&mut rec);
        let good = sealed(&mut tx, &rec, &[7u8; 512]);
        assert_eq!(rx.clone_mac().open(&good).unwrap(), Some(Msg::Record(h)));
        // The same header, but other bytes in the store than the sender MACed: refused.
        assert!(store.write_bytes(4100, &[8u8; 1]));
        let e = rx.clone_mac().open(&good).unwrap_err();
        assert!(e.contains("MAC mismatch"), "{e}");
        assert!(store.write_bytes(4100, &[7u8; 1]));
        // In order it passes; replayed it fails (the sequence number moved on).
        rx.open(&good).unwrap();
        assert!(rx.open(&good).unwrap_err().contains("MAC mismatch"));
    }

    impl Inbound {
        /// A copy with the same MAC state (to try a message without consuming its number).
        fn clone_mac(&self) -> Inbound {
            Inbound {
                authenticated: self.authenticated,
                mac: self.mac.clone(),
                partial: HashMap::new(),
                limits: self.limits,
                store: self.store,
                max_record: self.max_record,
            }
        }
    }
}
