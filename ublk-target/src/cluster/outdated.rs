//! Which node's own medium misses acknowledged writes of which ranges (`storage = "own"`).
//!
//! With a medium per node, a range's data lives on both media only while every write of it
//! reaches both. When one cannot (the partner is away, a mirror copy was dropped before it was
//! written), the node that knows marks the other (or itself) outdated for the range, durably
//! and BEFORE the write is acknowledged or the copy is dropped. A node never takes over, or is
//! given back, a range its medium is outdated for: it would serve old data. A resync
//! (`engine::resync`) is what clears a mark.
//!
//! A mark names the range's epoch in the ownership table when it was made, and counts only
//! while the range is still at that epoch. A node cut off without knowing it lost a range
//! (paused past its lease) may still try to mark the new owner for writes it can no longer
//! acknowledge; the new owner's epoch makes such a mark void. A valid mark also stops the
//! epoch from moving on: the moves it blocks are exactly those that would bump it. A move
//! that may go ahead (a takeover from the node whose medium is marked) marks again at the new
//! epoch before it writes the table (`Cluster::carry_marks_to_next_epoch`).
//!
//! Slot `OUTDATED_SLOT + writer * MAX_NODES + subject` holds the marks `writer` made about
//! `subject`'s medium: only `writer` writes it, so two nodes marking at once never lose each
//! other's marks. A slot that is neither blank nor intact (a torn write) counts as every
//! range outdated at every epoch: the safe reading.

use crate::ownership::{TableError, TableStore, SLOT_BYTES};
use std::collections::BTreeMap;

/// A node: its index in the cluster's node list (as `ranges::NodeId`).
type NodeId = u32;

const OUTDATED_MAGIC: u32 = 0x444f_564e; // "NVOD"
const OUTDATED_VERSION: u32 = 2;
/// First slot of the marks: after the flush marks, before the leases (slot 32).
pub const OUTDATED_SLOT: u64 = 16;
/// Nodes the slots have room for (`MAX_NODES` squared slots from `OUTDATED_SLOT`).
pub const MAX_NODES: u32 = 4;
const HEADER: usize = 32;
const CRC_AT: usize = SLOT_BYTES as usize - 4;
/// Ranges one slot holds an epoch for.
pub const MAX_RANGES: usize = (CRC_AT - HEADER) / 8;

/// What one slot says: per global range, the epoch at which it was marked (absent: not).
/// `Every`: the slot is damaged, every range counts as outdated.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Marks {
    Epochs(BTreeMap<u32, u64>),
    Every,
}

fn encode(
    marks: &BTreeMap<u32, u64>,
    cluster_id: u64,
    writer: NodeId,
    subject: NodeId,
    ranges: u32,
) -> Result<Vec<u8>, TableError> {
    if ranges as usize > MAX_RANGES {
        return Err(TableError::TooLarge(ranges as usize));
    }
    let mut b = vec![0u8; SLOT_BYTES as usize];
    b[0..4].copy_from_slice(&OUTDATED_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&OUTDATED_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&cluster_id.to_le_bytes());
    b[16..20].copy_from_slice(&writer.to_le_bytes());
    b[20..24].copy_from_slice(&subject.to_le_bytes());
    b[24..28].copy_from_slice(&ranges.to_le_bytes());
    for (&r, &epoch) in marks.iter().filter(|(&r, _)| r < ranges) {
        let at = HEADER + r as usize * 8;
        b[at..at + 8].copy_from_slice(&epoch.to_le_bytes());
    }
    let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// Ok(None): blank. Err: damaged or not this writer's marks about this subject.
fn decode(
    b: &[u8],
    cluster_id: u64,
    writer: NodeId,
    subject: NodeId,
) -> Result<Option<BTreeMap<u32, u64>>, String> {
    if b.len() < SLOT_BYTES as usize {
        return Err("short slot".into());
    }
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let long = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    if word(0) != OUTDATED_MAGIC || rdma_link::checksum::crc32c(&b[..CRC_AT]) != word(CRC_AT) {
        return Err("damaged (torn write or foreign data)".into());
    }
    if word(4) != OUTDATED_VERSION {
        return Err(format!("version {} is unknown", word(4)));
    }
    if long(8) != cluster_id || word(16) != writer || word(20) != subject {
        return Err(format!(
            "belongs to cluster {} (node {} about node {}), not cluster {cluster_id} (node {writer} about node {subject})",
            long(8),
            word(16),
            word(20)
        ));
    }
    let ranges = (word(24) as usize).min(MAX_RANGES) as u32;
    Ok(Some(
        (0..ranges)
            .map(|r| (r, long(HEADER + r as usize * 8)))
            .filter(|&(_, epoch)| epoch != 0)
            .collect(),
    ))
}

/// The outdated marks of a cluster of `nodes` nodes and `ranges` global ranges on the arbiter.
pub struct OutdatedMedia {
    pub cluster_id: u64,
    pub nodes: u32,
    pub ranges: u32,
}

impl OutdatedMedia {
    fn slot(writer: NodeId, subject: NodeId) -> u64 {
        OUTDATED_SLOT + (writer * MAX_NODES + subject) as u64
    }

    fn load(
        &self,
        store: &dyn TableStore,
        writer: NodeId,
        subject: NodeId,
    ) -> Result<Marks, TableError> {
        if writer >= MAX_NODES || subject >= MAX_NODES {
            return Err(TableError::TooLarge(writer.max(subject) as usize));
        }
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        store.read_slot(Self::slot(writer, subject), &mut buf)?;
        match decode(&buf, self.cluster_id, writer, subject) {
            Ok(m) => Ok(Marks::Epochs(m.unwrap_or_default())),
            Err(why) => {
                tracing::error!(
                    "the marks node {writer} keeps on the arbiter about node {subject}'s medium are {why}: counting every range of it as outdated"
                );
                Ok(Marks::Every)
            }
        }
    }

    /// The global ranges `subject`'s medium misses writes of: marked by any writer at the
    /// epoch `epoch_of` gives the range now.
    pub fn of(
        &self,
        store: &dyn TableStore,
        subject: NodeId,
        epoch_of: &dyn Fn(u32) -> Option<u64>,
    ) -> Result<Vec<u32>, TableError> {
        let mut out = std::collections::BTreeSet::new();
        for writer in 0..self.nodes {
            match self.load(store, writer, subject)? {
                Marks::Every => out.extend(0..self.ranges),
                Marks::Epochs(m) => out.extend(
                    m.iter()
                        .filter(|(&r, &e)| epoch_of(r) == Some(e))
                        .map(|(&r, _)| r),
                ),
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Writer `me` marks `subject`'s medium outdated for `ranges`, each (global range,
    /// epoch) at the epoch it has now. Durable on return; true if the marks changed.
    pub fn mark(
        &self,
        store: &dyn TableStore,
        me: NodeId,
        subject: NodeId,
        ranges: &[(u32, u64)],
    ) -> Result<bool, TableError> {
        let mut marks = match self.load(store, me, subject)? {
            Marks::Epochs(m) => m,
            // Rewritten whole: every range marked at every epoch it may have is not
            // expressible, so at the epochs given and at the highest one for the rest.
            Marks::Every => {
                let top = ranges.iter().map(|&(_, e)| e).max().unwrap_or(1);
                (0..self.ranges).map(|r| (r, top)).collect()
            }
        };
        let before = marks.clone();
        for &(r, epoch) in ranges {
            marks.insert(r, epoch);
        }
        // Written even when the slot reads as marked already: a withdrawal of ours that
        // failed may still land (a voters' write kept by a minority, which this read need
        // not meet), and only a write that completes after it buries it. The caller calls
        // this only for marks it does not remember making (`Cluster::mark_outdated`).
        let data = encode(&marks, self.cluster_id, me, subject, self.ranges)?;
        // Settled when it fails: a mark taken for not made that lands later is never
        // withdrawn (the resync's clear reads it only where it landed).
        crate::ownership::write_own_slot(store, Self::slot(me, subject), &data)?;
        Ok(marks != before)
    }
}

impl OutdatedMedia {
    /// Whether node `me` ran in this cluster before: its slot of marks about itself was
    /// ever written (`note_ran` writes it, empty, at every start). A damaged slot counts as
    /// written.
    pub fn ran_before(&self, store: &dyn TableStore, me: NodeId) -> Result<bool, TableError> {
        if me >= MAX_NODES {
            return Err(TableError::TooLarge(me as usize));
        }
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        store.read_slot(Self::slot(me, me), &mut buf)?;
        Ok(!matches!(decode(&buf, self.cluster_id, me, me), Ok(None)))
    }

    /// Records that `me` ran: its slot about itself is written (empty) if it is blank.
    pub fn note_ran(&self, store: &dyn TableStore, me: NodeId) -> Result<(), TableError> {
        if self.ran_before(store, me)? {
            return Ok(());
        }
        let data = encode(&BTreeMap::new(), self.cluster_id, me, me, self.ranges)?;
        crate::ownership::write_own_slot(store, Self::slot(me, me), &data)?;
        Ok(())
    }
}

impl OutdatedMedia {
    /// Writer `me` withdraws its marks about `subject`'s medium for `ranges` (global), once a
    /// resync copied them. A damaged slot is rewritten with every other range marked at the
    /// epoch `epoch_of` gives it. Durable on return.
    pub fn clear(
        &self,
        store: &dyn TableStore,
        me: NodeId,
        subject: NodeId,
        ranges: &[u32],
        epoch_of: &dyn Fn(u32) -> Option<u64>,
    ) -> Result<(), TableError> {
        let mut marks = match self.load(store, me, subject)? {
            Marks::Epochs(m) => m,
            Marks::Every => (0..self.ranges)
                .filter_map(|r| Some((r, epoch_of(r)?)))
                .collect(),
        };
        let before = marks.clone();
        for r in ranges {
            marks.remove(r);
        }
        if marks != before {
            let data = encode(&marks, self.cluster_id, me, subject, self.ranges)?;
            crate::ownership::write_own_slot(store, Self::slot(me, subject), &data)?;
        }
        Ok(())
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
    fn a_node_that_ran_is_remembered_without_marking_anything() {
        let (store, m) = (MemTableStore::default(), media());
        assert!(!m.ran_before(&store, 1).expect("read"));
        m.note_ran(&store, 1).expect("note");
        assert!(m.ran_before(&store, 1).expect("read"));
        assert!(!m.ran_before(&store, 0).expect("read"), "only node 1 ran");
        assert!(m.of(&store, 1, &|_| Some(1)).expect("read").is_empty());
        // Marks about itself (a release that dropped copies) survive a later note.
        assert!(m.mark(&store, 1, 1, &[(4, 1)]).expect("mark"));
        m.note_ran(&store, 1).expect("note");
        assert_eq!(m.of(&store, 1, &|_| Some(1)).expect("read"), vec![4]);
    }

    #[test]
    fn a_mark_counts_while_its_range_keeps_the_epoch_and_writers_do_not_clash() {
        let (store, m) = (MemTableStore::default(), media());
        let at_one = |_: u32| Some(1);
        assert!(m.of(&store, 1, &at_one).expect("read").is_empty());
        assert!(m.mark(&store, 0, 1, &[(3, 1), (17, 1)]).expect("mark"));
        assert!(
            !m.mark(&store, 0, 1, &[(3, 1)]).expect("again"),
            "no write when marked"
        );
        assert!(m.mark(&store, 1, 1, &[(5, 1)]).expect("self"));
        assert_eq!(m.of(&store, 1, &at_one).expect("read"), vec![3, 5, 17]);
        assert!(m.of(&store, 0, &at_one).expect("read").is_empty());
        // Range 3 moved on (a new epoch): its mark is void.
        let moved = |r: u32| Some(if r == 3 { 2 } else { 1 });
        assert_eq!(m.of(&store, 1, &moved).expect("read"), vec![5, 17]);
        // A resync of range 17 withdraws node 0's mark; node 1's own mark of 5 stays.
        m.clear(&store, 0, 1, &[17], &at_one).expect("clear");
        assert_eq!(m.of(&store, 1, &at_one).expect("read"), vec![3, 5]);
    }

    #[test]
    fn a_damaged_or_foreign_slot_counts_as_every_range_outdated() {
        let (store, m) = (MemTableStore::default(), media());
        let at_one = |_: u32| Some(1);
        m.mark(&store, 0, 1, &[(2, 1)]).expect("mark");
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        let slot = OutdatedMedia::slot(0, 1);
        store.read_slot(slot, &mut buf).expect("read");
        buf[HEADER + 16] ^= 0x40;
        store.write_slot(slot, &buf).expect("write");
        assert_eq!(m.of(&store, 1, &at_one).expect("read").len(), 20);
        let other = OutdatedMedia {
            cluster_id: 10,
            ..media()
        };
        store
            .write_slot(slot, &{
                let mut b = buf.clone();
                b[HEADER + 16] ^= 0x40;
                b
            })
            .expect("repair");
        assert_eq!(m.of(&store, 1, &at_one).expect("read"), vec![2]);
        assert_eq!(other.of(&store, 1, &at_one).expect("read").len(), 20);
    }
}

/// The ranges this node's own medium is outdated for, in memory for the read path: a read
/// asks only an atomic flag while there are none.
#[derive(Default)]
pub struct StaleRanges {
    any: std::sync::atomic::AtomicBool,
    ranges: std::sync::RwLock<std::collections::BTreeSet<(u32, u32)>>,
}

impl StaleRanges {
    pub fn contains(&self, range: (u32, u32)) -> bool {
        use std::sync::atomic::Ordering;
        self.any.load(Ordering::Acquire)
            && self
                .ranges
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&range)
    }

    pub fn add(&self, ranges: &[(u32, u32)]) {
        let mut set = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        set.extend(ranges.iter().copied());
        self.any
            .store(!set.is_empty(), std::sync::atomic::Ordering::Release);
    }

    pub fn remove(&self, ranges: &[(u32, u32)]) {
        let mut set = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        for r in ranges {
            set.remove(r);
        }
        self.any
            .store(!set.is_empty(), std::sync::atomic::Ordering::Release);
    }
}
