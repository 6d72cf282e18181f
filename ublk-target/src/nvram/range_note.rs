//! The layout the NVRAM's small notes share (`takeover_note`, `restart_sync_note`): in one
//! metadata slot, a magic, the note's own fields, a bitmap of global range numbers
//! (`Lun::first_range` + range) and a crc32c over the rest. An empty or damaged slot reads as
//! no note.

use super::layout::PartitionCheckpoint;
use super::region::NvramRegion;
use std::io;

pub const BYTES: usize = PartitionCheckpoint::SLOT_BYTES as usize;
const CRC_AT: usize = BYTES - 4;

/// Range numbers a note whose own fields take `fields` bytes can hold (the ownership table
/// holds fewer, `ownership::MAX_ENTRIES`).
pub const fn max_ranges(fields: usize) -> usize {
    (CRC_AT - 8 - fields) * 8
}

/// The slot's bytes: `magic`, `fields`, the bitmap's length in bits, the bitmap, the crc.
pub fn encode(magic: u32, fields: &[u8], ranges: &[u32], what: &str) -> io::Result<[u8; BYTES]> {
    let max = max_ranges(fields.len());
    let head = 8 + fields.len();
    let mut b = [0u8; BYTES];
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..head - 4].copy_from_slice(fields);
    b[head - 4..head].copy_from_slice(&(max as u32).to_le_bytes());
    for &r in ranges {
        let r = r as usize;
        if r >= max {
            return Err(io::Error::other(format!(
                "range {r} does not fit the {what} (at most {max} ranges)"
            )));
        }
        b[head + r / 8] |= 1 << (r % 8);
    }
    let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// The note's own fields (`fields_len` bytes) and ranges; None for an empty or damaged
/// slot, or one that holds another kind of note.
pub fn decode(magic: u32, fields_len: usize, b: &[u8; BYTES]) -> Option<(&[u8], Vec<u32>)> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != magic || u32_at(CRC_AT) != rdma_link::checksum::crc32c(&b[..CRC_AT]) {
        return None;
    }
    let head = 8 + fields_len;
    let bits = (u32_at(head - 4) as usize).min(max_ranges(fields_len));
    let ranges = (0..bits)
        .filter(|&r| b[head + r / 8] & (1 << (r % 8)) != 0)
        .map(|r| r as u32)
        .collect();
    Some((&b[4..head - 4], ranges))
}

/// Writes a slot's bytes at NVRAM offset `off`, durably.
pub fn write(region: &NvramRegion, off: u64, bytes: &[u8; BYTES]) -> io::Result<()> {
    region.write_at(off, bytes);
    region.persist(off, BYTES as u64)
}

/// The slot's bytes at NVRAM offset `off`.
pub fn read(region: &NvramRegion, off: u64) -> [u8; BYTES] {
    let mut b = [0u8; BYTES];
    region.read_at(off, &mut b);
    b
}
