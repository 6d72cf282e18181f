//! What the clients did and what they may read back: the checker of "no acknowledged write
//! is lost" and "a read returns only what was written".
//!
//! Every write carries its block number and a version in its bytes (versions count up per
//! block in the order the writes were issued), and the workload keeps at most one operation
//! per block in flight, so per block the writes are totally ordered. For each block the model
//! keeps the last acknowledged version and the versions whose outcome is unknown (the write
//! failed, or its node died with it in flight): a read must return the acknowledged version
//! or one of those later unknown ones. Anything else is a violation: an older version is a
//! lost acknowledged write; bytes that decode to no version are data nobody wrote.

use std::collections::BTreeMap;

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"NVMSIMv1";

/// The contents of version `version` of block `block` (version 0: never written, zeroes).
pub fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    if version == 0 {
        return b;
    }
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    for chunk in b[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    b
}

/// What a block's bytes say: a version of `block`, or something nobody wrote there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    Version(u64),
    Garbage,
}

pub fn decode(block: u64, data: &[u8]) -> Decoded {
    if data.iter().all(|&b| b == 0) {
        return Decoded::Version(0);
    }
    if data.len() != BLOCK || &data[..8] != MAGIC {
        return Decoded::Garbage;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&data[16..24]);
    let version = u64::from_le_bytes(v);
    if block_data(block, version) == data {
        Decoded::Version(version)
    } else {
        Decoded::Garbage
    }
}

/// What the model knows of a version above a block's floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Failed, or in flight on a node that died: it may or may not have happened.
    Unknown,
    /// Acknowledged. `weak`: with `degraded = "nvram"` and no mirror copy (one NVRAM copy
    /// until flushed); `excused`: a node failed since, so losing it is the documented
    /// trade-off of that policy, not a bug.
    Acked { weak: bool, excused: bool },
}

#[derive(Clone, Debug, Default)]
struct BlockModel {
    /// The last version acknowledged with two copies (0: the initial zeroes): a read must
    /// never return anything older.
    floor: u64,
    /// Versions above the floor and what became of them.
    above: BTreeMap<u64, Outcome>,
    /// The highest version issued so far.
    issued: u64,
    busy: bool,
}

impl BlockModel {
    fn acked(&self) -> u64 {
        self.above
            .iter()
            .rev()
            .find(|(_, o)| matches!(o, Outcome::Acked { .. }))
            .map_or(self.floor, |(v, _)| *v)
    }
}

pub struct Model {
    blocks: Vec<BlockModel>,
}

impl Model {
    pub fn new(blocks: usize) -> Model {
        Model {
            blocks: vec![BlockModel::default(); blocks],
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_busy(&self, block: u64) -> bool {
        self.blocks[block as usize].busy
    }

    /// A write of `block` starts; returns its version.
    pub fn begin_write(&mut self, block: u64) -> u64 {
        let b = &mut self.blocks[block as usize];
        assert!(!b.busy);
        b.busy = true;
        b.issued += 1;
        b.issued
    }

    pub fn begin_read(&mut self, block: u64) {
        let b = &mut self.blocks[block as usize];
        assert!(!b.busy);
        b.busy = true;
    }

    /// The write of `version` ended: acknowledged (`weak`: see [`Outcome`]; `excused`: a node
    /// is failing as it is acknowledged), or with an unknown outcome (an error, or its node
    /// died).
    pub fn end_write(
        &mut self,
        block: u64,
        version: u64,
        acknowledged: bool,
        weak: bool,
        excused: bool,
    ) {
        let b = &mut self.blocks[block as usize];
        b.busy = false;
        if version <= b.floor {
            return;
        }
        match (acknowledged, weak) {
            (true, false) => {
                // Everything older can no longer legitimately show up.
                b.floor = version;
                b.above = b.above.split_off(&(version + 1));
            }
            (true, true) => {
                b.above.insert(
                    version,
                    Outcome::Acked {
                        weak: true,
                        excused,
                    },
                );
            }
            (false, _) => {
                b.above.insert(version, Outcome::Unknown);
            }
        }
    }

    pub fn end_read(&mut self, block: u64) {
        self.blocks[block as usize].busy = false;
    }

    /// A node failed: weak acknowledged writes made so far may be lost (the trade-off of
    /// `degraded = "nvram"` when a node fails while the pair is degraded).
    pub fn node_failed(&mut self) {
        for b in &mut self.blocks {
            for o in b.above.values_mut() {
                if let Outcome::Acked {
                    weak: true,
                    excused,
                } = o
                {
                    *excused = true;
                }
            }
        }
    }

    /// Checks what a read of `block` returned; `Err` describes the violation.
    pub fn check_read(&self, block: u64, data: &[u8]) -> Result<u64, String> {
        let b = &self.blocks[block as usize];
        let acked = b.acked();
        let v = match decode(block, data) {
            Decoded::Garbage => {
                return Err(format!(
                    "block {block}: read bytes nobody wrote (acknowledged version {acked})"
                ))
            }
            Decoded::Version(v) => v,
        };
        let known = v == b.floor || b.above.contains_key(&v);
        // Every acknowledged version newer than what was read must be excusably lost.
        let lost: Vec<u64> = b
            .above
            .range(v + 1..)
            .filter(|(_, o)| {
                !matches!(
                    o,
                    Outcome::Unknown
                        | Outcome::Acked {
                            weak: true,
                            excused: true
                        }
                )
            })
            .map(|(v, _)| *v)
            .collect();
        if v < b.floor || !lost.is_empty() {
            return Err(format!(
                "block {block}: LOST ACKNOWLEDGED WRITE: read version {v}, but version {} was acknowledged",
                lost.last().copied().unwrap_or(b.floor)
            ));
        }
        if !known {
            return Err(format!(
                "block {block}: read version {v}, which was never written (acknowledged {acked}, issued {})",
                b.issued
            ));
        }
        Ok(v)
    }

    /// Whether `version` of `block` may be missing from the medium after its mirror copy
    /// was released: a newer version was acknowledged since (this one can no longer be
    /// read), or its write was never acknowledged (failed, or its node died), or it is a
    /// weak acknowledgement a node failure excused. Such a record may be dropped, and must
    /// be when its range moved to another node meanwhile (it would overwrite newer data).
    /// So may the record of a write still in flight: its node lost the range after staging
    /// it (a void record killed it), and the write is routed again to the new owner; were
    /// it acknowledged from the dropped record instead, the reads would catch the loss.
    pub fn may_be_dropped(&self, block: u64, version: u64) -> bool {
        let b = &self.blocks[block as usize];
        version < b.floor
            || (b.busy && version == b.issued)
            || matches!(
                b.above.get(&version),
                Some(Outcome::Unknown)
                    | Some(Outcome::Acked {
                        weak: true,
                        excused: true
                    })
            )
    }

    /// The latest acknowledged version of `block`.
    pub fn acked(&self, block: u64) -> u64 {
        self.blocks[block as usize].acked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_damage_is_garbage() {
        let d = block_data(7, 3);
        assert_eq!(decode(7, &d), Decoded::Version(3));
        assert_eq!(decode(8, &d), Decoded::Garbage);
        let mut bad = d.clone();
        bad[2000] ^= 1;
        assert_eq!(decode(7, &bad), Decoded::Garbage);
        assert_eq!(decode(7, &[0; BLOCK]), Decoded::Version(0));
    }

    #[test]
    fn an_older_version_after_an_acknowledgement_is_a_lost_write() {
        let mut m = Model::new(1);
        let v1 = m.begin_write(0);
        m.end_write(0, v1, true, false, false);
        let v2 = m.begin_write(0);
        m.end_write(0, v2, false, false, false);
        assert_eq!(m.check_read(0, &block_data(0, 1)), Ok(1));
        assert_eq!(m.check_read(0, &block_data(0, 2)), Ok(2));
        let v3 = m.begin_write(0);
        m.end_write(0, v3, true, false, false);
        assert!(m.check_read(0, &block_data(0, 2)).is_err());
        assert!(m
            .check_read(0, &block_data(0, 1))
            .unwrap_err()
            .contains("LOST ACKNOWLEDGED WRITE"));
    }

    #[test]
    fn a_weak_write_may_be_lost_only_after_a_node_failed() {
        let mut m = Model::new(1);
        let v1 = m.begin_write(0);
        m.end_write(0, v1, true, false, false);
        let v2 = m.begin_write(0);
        m.end_write(0, v2, true, true, false);
        assert!(
            m.check_read(0, &block_data(0, 1)).is_err(),
            "no failure yet"
        );
        m.node_failed();
        assert_eq!(m.check_read(0, &block_data(0, 1)), Ok(1));
        assert_eq!(m.check_read(0, &block_data(0, 2)), Ok(2));
        let v3 = m.begin_write(0);
        m.end_write(0, v3, true, true, false);
        assert!(
            m.check_read(0, &block_data(0, 2)).is_err(),
            "v3 is not excused"
        );
    }
}
