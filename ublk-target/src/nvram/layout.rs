//! Where things live on the NVRAM, and the two small metadata structures.
//!
//! ```text
//! 0            superblock (4 KiB): identity of this log and the layout it was formatted for
//! 4 KiB        one 4 KiB checkpoint block per partition (two alternating slots)
//! data_offset  partition 0 log | partition 1 log | ...   (part_size each)
//!              [second store: the partner's partitions, same geometry]
//! oos_offset   [storage = "own": one out-of-sync map per LUN (`nvram::out_of_sync`)]
//! ```
//! Every structure carries a crc32c; a checkpoint is written to the slot its generation
//! selects, so a torn checkpoint write leaves the previous one intact.

use crate::block::MAX_IO_BYTES;

pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"NVMIRLOG";
pub const FORMAT_VERSION: u32 = 1;
pub const META_BLOCK: u64 = 4096;
/// A partition must hold at least four maximum-size writes plus their headers.
pub const MIN_PARTITION_BYTES: u64 = 4 * MAX_IO_BYTES + 64 * 1024;
const CHECKPOINT_MAGIC: u32 = 0x4b43_564e; // "NVCK"
const CHECKPOINT_SLOT: u64 = 512;
const MAX_LAYOUT_TEXT: usize = 3072;

/// Little-endian field writer/reader over a fixed buffer.
struct Fields<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Fields { buf, pos: 0 }
    }
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

fn get<const N: usize>(buf: &[u8], pos: &mut usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&buf[*pos..*pos + N]);
    *pos += N;
    a
}
fn get_u32(buf: &[u8], pos: &mut usize) -> u32 {
    u32::from_le_bytes(get(buf, pos))
}
fn get_u64(buf: &[u8], pos: &mut usize) -> u64 {
    u64::from_le_bytes(get(buf, pos))
}

/// Identity and geometry of a formatted NVRAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    /// Random at format time; every record and checkpoint carries it, so leftovers of an
    /// earlier format are never mistaken for live records.
    pub log_id: u64,
    pub created_unix: u64,
    pub node_name: String,
    pub partitions: u32,
    pub part_size: u64,
    pub data_offset: u64,
    /// 1 when the NVRAM also holds a second store (the partner's mirrored partitions,
    /// same geometry, right after this node's partitions), 0 for a single node.
    pub second_store: u32,
    /// Canonical description of the LUN layout the log was written for (see `layout_text`).
    pub layout: String,
    /// Where the out-of-sync maps start (`storage = "own"`), 0 for none. Superblocks written
    /// before the field existed hold zeroes there: no maps.
    pub oos_offset: u64,
}

/// Why a superblock could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum SuperblockState {
    /// All zeroes: never formatted.
    Blank,
    /// Not our magic: some other data lives there.
    Foreign,
    /// Our magic but a bad checksum or impossible fields.
    Corrupt(String),
    Valid(Superblock),
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; META_BLOCK as usize];
        let mut f = Fields::new(&mut buf);
        f.put(SUPERBLOCK_MAGIC);
        f.put(&self.version.to_le_bytes());
        f.put(&self.log_id.to_le_bytes());
        f.put(&self.created_unix.to_le_bytes());
        f.put(&self.partitions.to_le_bytes());
        f.put(&self.part_size.to_le_bytes());
        f.put(&self.data_offset.to_le_bytes());
        f.put(&self.second_store.to_le_bytes());
        let name = self.node_name.as_bytes();
        f.put(&(name.len() as u32).to_le_bytes());
        f.put(name);
        let layout = &self.layout.as_bytes()[..self.layout.len().min(MAX_LAYOUT_TEXT)];
        f.put(&(layout.len() as u32).to_le_bytes());
        f.put(layout);
        f.put(&self.oos_offset.to_le_bytes());
        let end = META_BLOCK as usize - 4;
        let crc = rdma_link::checksum::crc32c(&buf[..end]);
        buf[end..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8]) -> SuperblockState {
        if buf.len() < META_BLOCK as usize {
            return SuperblockState::Corrupt("superblock shorter than 4 KiB".into());
        }
        let buf = &buf[..META_BLOCK as usize];
        if buf.iter().all(|&b| b == 0) {
            return SuperblockState::Blank;
        }
        if &buf[..8] != SUPERBLOCK_MAGIC {
            return SuperblockState::Foreign;
        }
        let end = META_BLOCK as usize - 4;
        let stored = u32::from_le_bytes([buf[end], buf[end + 1], buf[end + 2], buf[end + 3]]);
        if rdma_link::checksum::crc32c(&buf[..end]) != stored {
            return SuperblockState::Corrupt("superblock checksum mismatch".into());
        }
        let mut pos = 8;
        let version = get_u32(buf, &mut pos);
        let log_id = get_u64(buf, &mut pos);
        let created_unix = get_u64(buf, &mut pos);
        let partitions = get_u32(buf, &mut pos);
        let part_size = get_u64(buf, &mut pos);
        let data_offset = get_u64(buf, &mut pos);
        let second_store = get_u32(buf, &mut pos);
        let mut text = |limit: usize| -> Option<String> {
            let n = get_u32(buf, &mut pos) as usize;
            if n > limit || pos + n > end {
                return None;
            }
            let s = String::from_utf8(buf[pos..pos + n].to_vec()).ok();
            pos += n;
            s
        };
        let Some(node_name) = text(255) else {
            return SuperblockState::Corrupt("node name field is damaged".into());
        };
        let Some(layout) = text(MAX_LAYOUT_TEXT) else {
            return SuperblockState::Corrupt("layout field is damaged".into());
        };
        if pos + 8 > end {
            return SuperblockState::Corrupt("the out-of-sync map field is cut off".into());
        }
        let oos_offset = get_u64(buf, &mut pos);
        let sb = Superblock {
            version,
            log_id,
            created_unix,
            node_name,
            partitions,
            part_size,
            data_offset,
            second_store,
            layout,
            oos_offset,
        };
        match sb.check_geometry() {
            Ok(()) => SuperblockState::Valid(sb),
            Err(problem) => SuperblockState::Corrupt(problem),
        }
    }

    /// The engine computes every offset from these fields: they must not overflow, and in this
    /// format they must be what a format writes (checkpoints right before the logs, 4 KiB logs).
    /// Of another format version only the overflow is checked: its rules may differ, and the
    /// version mismatch is the error to report.
    fn check_geometry(&self) -> Result<(), String> {
        if Layout::of(self).checked_end().is_none() {
            return Err(format!(
                "{} partitions of {} bytes from offset {} do not fit in 64 bits",
                self.partitions, self.part_size, self.data_offset
            ));
        }
        if self.version != FORMAT_VERSION {
            return Ok(());
        }
        if self.partitions == 0 {
            return Err("it has no partitions".into());
        }
        let metadata = Layout::metadata_bytes(self.partitions);
        if self.data_offset != metadata {
            return Err(format!(
                "the logs start at byte {} but the checkpoints of {} partitions end at byte {metadata}",
                self.data_offset, self.partitions
            ));
        }
        if self.part_size == 0 || !self.part_size.is_multiple_of(META_BLOCK) {
            return Err(format!(
                "the partition size {} is not a non-zero multiple of 4 KiB",
                self.part_size
            ));
        }
        if self.oos_offset != 0 && self.oos_offset < Layout::of(self).end() {
            return Err(format!(
                "the out-of-sync maps start at byte {} inside the logs (which end at byte {})",
                self.oos_offset,
                Layout::of(self).end()
            ));
        }
        if self.second_store > 1 {
            return Err(format!(
                "the second-store flag is {} (0 or 1)",
                self.second_store
            ));
        }
        Ok(())
    }
}

/// The geometry derived from a superblock (or a config at format time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub partitions: u32,
    pub part_size: u64,
    pub data_offset: u64,
    pub second_store: bool,
}

impl Layout {
    pub fn metadata_bytes(partitions: u32) -> u64 {
        META_BLOCK + partitions as u64 * META_BLOCK
    }

    /// Splits an NVRAM of `len` bytes into `partitions` equal, 4 KiB-aligned logs (and as
    /// many again for the partner's second store when `second_store`).
    pub fn compute(len: u64, partitions: u32, second_store: bool) -> Option<Layout> {
        let data_offset = Self::metadata_bytes(partitions);
        let logs = partitions as u64 * if second_store { 2 } else { 1 };
        // No partitions: nothing to split (and no division by zero).
        let per = len.checked_sub(data_offset)?.checked_div(logs)?;
        let part_size = per / META_BLOCK * META_BLOCK;
        (part_size >= MIN_PARTITION_BYTES).then_some(Layout {
            partitions,
            part_size,
            data_offset,
            second_store,
        })
    }

    pub fn of(sb: &Superblock) -> Layout {
        Layout {
            partitions: sb.partitions,
            part_size: sb.part_size,
            data_offset: sb.data_offset,
            second_store: sb.second_store != 0,
        }
    }

    /// Absolute NVRAM offset of the second store (the partner's partitions), if any.
    pub fn second_store_offset(&self) -> Option<u64> {
        self.second_store
            .then(|| self.data_offset + self.partitions as u64 * self.part_size)
    }

    pub fn second_store_len(&self) -> u64 {
        if self.second_store {
            self.partitions as u64 * self.part_size
        } else {
            0
        }
    }

    /// Absolute NVRAM offset of the start of partition `p`'s log.
    pub fn partition_base(&self, p: u32) -> u64 {
        self.data_offset + p as u64 * self.part_size
    }

    pub fn checkpoint_offset(&self, p: u32, slot: u64) -> u64 {
        META_BLOCK + p as u64 * META_BLOCK + slot * CHECKPOINT_SLOT
    }

    pub fn end(&self) -> u64 {
        self.partition_base(self.partitions) + self.second_store_len()
    }

    /// `end`, or None if it overflows (only a damaged superblock describes such a layout).
    fn checked_end(&self) -> Option<u64> {
        let logs = u64::from(self.partitions) * if self.second_store { 2 } else { 1 };
        logs.checked_mul(self.part_size)?
            .checked_add(self.data_offset)
    }
}

/// The LUN layout the log is written for, as text: a log written for one layout must not
/// be replayed into another (offsets would land on the wrong data).
/// `luns` is (name, size in bytes, ranges) for each LUN, in config order.
pub fn layout_text(partitions: u32, second_store: bool, luns: &[(&str, u64, u32)]) -> String {
    let mut s = format!(
        "partitions={partitions}{}",
        if second_store { ";mirrored" } else { "" }
    );
    for (name, size, ranges) in luns {
        s.push_str(&format!(";{name}:{size}:{ranges}"));
    }
    s
}

/// Where a partition's flusher has got to: everything before `tail_off` (in log order) is on
/// the medium, and the record at `tail_off` has sequence number `tail_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionCheckpoint {
    pub partition: u32,
    pub log_id: u64,
    pub generation: u64,
    pub tail_off: u64,
    pub tail_seq: u64,
}

impl PartitionCheckpoint {
    pub const SLOTS: u64 = 2;
    pub const SLOT_BYTES: u64 = CHECKPOINT_SLOT;

    pub fn slot(&self) -> u64 {
        self.generation % Self::SLOTS
    }

    pub fn encode(&self) -> [u8; 48] {
        let mut buf = [0u8; 48];
        let mut f = Fields::new(&mut buf);
        f.put(&CHECKPOINT_MAGIC.to_le_bytes());
        f.put(&self.partition.to_le_bytes());
        f.put(&self.log_id.to_le_bytes());
        f.put(&self.generation.to_le_bytes());
        f.put(&self.tail_off.to_le_bytes());
        f.put(&self.tail_seq.to_le_bytes());
        let crc = rdma_link::checksum::crc32c(&buf[..44]);
        buf[44..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8]) -> Option<PartitionCheckpoint> {
        if buf.len() < 48 {
            return None;
        }
        let mut pos = 0;
        if get_u32(buf, &mut pos) != CHECKPOINT_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes([buf[44], buf[45], buf[46], buf[47]]);
        if rdma_link::checksum::crc32c(&buf[..44]) != stored {
            return None;
        }
        Some(PartitionCheckpoint {
            partition: get_u32(buf, &mut pos),
            log_id: get_u64(buf, &mut pos),
            generation: get_u64(buf, &mut pos),
            tail_off: get_u64(buf, &mut pos),
            tail_seq: get_u64(buf, &mut pos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            log_id: 0xfeed_f00d,
            created_unix: 1,
            node_name: "node-a".into(),
            partitions: 4,
            part_size: 16 << 20,
            data_offset: Layout::metadata_bytes(4),
            second_store: 0,
            layout: "partitions=4;lun0:1073741824:4".into(),
            oos_offset: 0,
        }
    }

    #[test]
    fn superblock_round_trips() {
        assert_eq!(
            Superblock::decode(&sb().encode()),
            SuperblockState::Valid(sb())
        );
    }

    #[test]
    fn superblock_states() {
        assert_eq!(Superblock::decode(&[0u8; 4096]), SuperblockState::Blank);
        let mut foreign = vec![0u8; 4096];
        foreign[..4].copy_from_slice(b"XFSB");
        assert_eq!(Superblock::decode(&foreign), SuperblockState::Foreign);
        let mut bad = sb().encode();
        bad[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bad),
            SuperblockState::Corrupt(_)
        ));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let c = PartitionCheckpoint {
            partition: 2,
            log_id: 7,
            generation: 9,
            tail_off: 4096,
            tail_seq: 100,
        };
        assert_eq!(PartitionCheckpoint::decode(&c.encode()), Some(c));
        let mut b = c.encode();
        b[20] ^= 0x10;
        assert_eq!(PartitionCheckpoint::decode(&b), None);
        assert_eq!(c.slot(), 1);
    }

    #[test]
    fn layout_splits_aligned_partitions() {
        let l = Layout::compute(64 << 20, 4, false).expect("fits");
        assert_eq!(l.data_offset, 5 * 4096);
        assert_eq!(l.part_size % 4096, 0);
        assert!(l.end() <= 64 << 20);
        assert!(Layout::compute(4 << 20, 4, false).is_none());
        let m = Layout::compute(64 << 20, 4, true).expect("fits");
        assert_eq!(
            m.second_store_offset(),
            Some(m.data_offset + 4 * m.part_size)
        );
        assert!(m.end() <= 64 << 20 && m.part_size < l.part_size);
    }
}
