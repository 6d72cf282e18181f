//! Which node's own medium misses acknowledged writes of which ranges (`storage = "own"`).
//!
//! With a medium per node, a range's data lives on both media only while every write of it
//! reaches both. When one cannot (the partner is away, a mirror copy was dropped before it was
//! written), the node that knows marks the other (or itself) outdated for the range, durably
//! and BEFORE the write is acknowledged or the copy is dropped. A node never takes over, or is
//! given back, a range its medium is outdated for: it would serve old data. The marks are
//! sticky; a resync (not implemented yet) is what clears them.
//!
//! Each node writes only its own slot (`OUTDATED_SLOT + writer`, on the arbiter next to the
//! table), so two nodes marking at once never lose each other's marks; a node's outdated
//! ranges are the union over every writer's slot. A slot that is neither blank nor intact (a
//! torn write) counts as "every range of every node outdated": the safe reading.

/// A node: its index in the cluster's node list (as `ranges::NodeId`).
type NodeId = u32;
use crate::ownership::{TableError, TableStore, SLOT_BYTES};
use std::collections::BTreeSet;

const OUTDATED_MAGIC: u32 = 0x444f_564e; // "NVOD"
const OUTDATED_VERSION: u32 = 1;
/// Slot of writer `n`'s marks: after the flush marks, before the leases.
pub const OUTDATED_SLOT: u64 = 16;
const HEADER: usize = 32;
const CRC_AT: usize = SLOT_BYTES as usize - 4;

/// One writer's marks: per node, the global ranges whose data its medium misses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutdatedMarks {
    pub per_node: Vec<BTreeSet<u32>>,
}

impl OutdatedMarks {
    fn encode(&self, cluster_id: u64, writer: NodeId, ranges: u32) -> Result<Vec<u8>, TableError> {
        let row = (ranges as usize).div_ceil(8);
        if HEADER + row * self.per_node.len() > CRC_AT {
            return Err(TableError::TooLarge(ranges as usize));
        }
        let mut b = vec![0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(&OUTDATED_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&OUTDATED_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&cluster_id.to_le_bytes());
        b[16..20].copy_from_slice(&writer.to_le_bytes());
        b[20..24].copy_from_slice(&(self.per_node.len() as u32).to_le_bytes());
        b[24..28].copy_from_slice(&ranges.to_le_bytes());
        for (n, set) in self.per_node.iter().enumerate() {
            for &r in set.iter().filter(|&&r| r < ranges) {
                b[HEADER + n * row + r as usize / 8] |= 1 << (r % 8);
            }
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// None: blank (nothing marked). Err: damaged or not ours (the caller reads it as all).
    fn decode(b: &[u8], cluster_id: u64, writer: NodeId) -> Result<Option<Self>, String> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let stored = word(CRC_AT);
        if b.len() < SLOT_BYTES as usize
            || word(0) != OUTDATED_MAGIC
            || crc32c::crc32c(&b[..CRC_AT]) != stored
        {
            return Err("damaged (torn write or foreign data)".into());
        }
        if word(4) != OUTDATED_VERSION {
            return Err(format!("version {} is unknown", word(4)));
        }
        let found = u64::from_le_bytes(b[8..16].try_into().map_err(|_| "short slot")?);
        if found != cluster_id || word(16) != writer {
            return Err(format!(
                "belongs to cluster {found} node {}, not cluster {cluster_id} node {writer}",
                word(16)
            ));
        }
        let (nodes, ranges) = (word(20) as usize, word(24));
        let row = (ranges as usize).div_ceil(8);
        if HEADER + row * nodes > CRC_AT {
            return Err("its size fields do not fit the slot".into());
        }
        let per_node = (0..nodes)
            .map(|n| {
                (0..ranges)
                    .filter(|&r| b[HEADER + n * row + r as usize / 8] & (1 << (r % 8)) != 0)
                    .collect()
            })
            .collect();
        Ok(Some(OutdatedMarks { per_node }))
    }
}

/// The outdated marks of a cluster of `nodes` nodes and `ranges` global ranges on the arbiter.
pub struct OutdatedMedia {
    pub cluster_id: u64,
    pub nodes: u32,
    pub ranges: u32,
}

impl OutdatedMedia {
    fn load(&self, store: &dyn TableStore, writer: NodeId) -> Result<OutdatedMarks, TableError> {
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        store.read_slot(OUTDATED_SLOT + writer as u64, &mut buf)?;
        let empty = || OutdatedMarks {
            per_node: vec![BTreeSet::new(); self.nodes as usize],
        };
        match OutdatedMarks::decode(&buf, self.cluster_id, writer) {
            Ok(Some(mut m)) => {
                m.per_node.resize(self.nodes as usize, BTreeSet::new());
                Ok(m)
            }
            Ok(None) => Ok(empty()),
            Err(why) => {
                tracing::error!(
                    writer,
                    "the outdated-media marks node {writer} keeps on the arbiter are {why}: counting every range of every node as outdated"
                );
                Ok(OutdatedMarks {
                    per_node: vec![(0..self.ranges).collect(); self.nodes as usize],
                })
            }
        }
    }

    /// The ranges `node`'s medium misses writes of, by every writer's marks.
    pub fn of(&self, store: &dyn TableStore, node: NodeId) -> Result<BTreeSet<u32>, TableError> {
        let mut all = BTreeSet::new();
        for writer in 0..self.nodes {
            let marks = self.load(store, writer)?;
            if let Some(set) = marks.per_node.get(node as usize) {
                all.extend(set.iter().copied());
            }
        }
        Ok(all)
    }

    /// Writer `me` marks `node`'s medium outdated for `ranges` (durable on return). Cheap
    /// when they are all marked already: one slot read, no write.
    pub fn mark(
        &self,
        store: &dyn TableStore,
        me: NodeId,
        node: NodeId,
        ranges: &BTreeSet<u32>,
    ) -> Result<bool, TableError> {
        let mut marks = self.load(store, me)?;
        let Some(set) = marks.per_node.get_mut(node as usize) else {
            return Err(TableError::TooLarge(node as usize));
        };
        if ranges.is_subset(set) {
            return Ok(false);
        }
        set.extend(ranges.iter().copied());
        let data = marks.encode(self.cluster_id, me, self.ranges)?;
        store.write_slot(OUTDATED_SLOT + me as u64, &data)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::MemTableStore;

    fn media() -> OutdatedMedia {
        OutdatedMedia {
            cluster_id: 9,
            nodes: 2,
            ranges: 20,
        }
    }

    #[test]
    fn marks_are_sticky_per_writer_and_united_across_writers() {
        let (store, m) = (MemTableStore::default(), media());
        assert!(m.of(&store, 1).expect("read").is_empty());
        assert!(m.mark(&store, 0, 1, &[3, 17].into()).expect("mark"));
        assert!(
            !m.mark(&store, 0, 1, &[3].into()).expect("again"),
            "no write when marked"
        );
        assert!(m.mark(&store, 1, 1, &[5].into()).expect("self"));
        assert_eq!(m.of(&store, 1).expect("read"), [3, 5, 17].into());
        assert!(m.of(&store, 0).expect("read").is_empty());
    }

    #[test]
    fn a_damaged_or_foreign_slot_counts_as_every_range_outdated() {
        let (store, m) = (MemTableStore::default(), media());
        m.mark(&store, 0, 1, &[2].into()).expect("mark");
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        store.read_slot(OUTDATED_SLOT, &mut buf).expect("read");
        buf[HEADER] ^= 0x40;
        store.write_slot(OUTDATED_SLOT, &buf).expect("write");
        assert_eq!(m.of(&store, 0).expect("read").len(), 20);
        let other = OutdatedMedia {
            cluster_id: 10,
            ..media()
        };
        assert_eq!(other.of(&store, 1).expect("read").len(), 20);
    }
}
