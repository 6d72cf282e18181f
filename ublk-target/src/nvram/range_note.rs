//! The layout the NVRAM's small notes share (`takeover_note`, `restart_sync_note`,
//! `range_epochs_note`): one 512-byte metadata slot holds two copies of a note, each a magic,
//! a generation, the note's body and a crc32c. An update overwrites the older copy, so a torn
//! update (a power cut in the middle) leaves the newer one: the note as it was before the
//! update began. Each note is written before what it describes happens, so the note as it
//! was is the right one then. (With one copy a torn update read as no note at all, which
//! forgot what the note said before, not only the update.) A slot without a valid copy reads
//! as no note.
//!
//! The range notes' body: whether the note is set (a cleared note is a valid copy too, so
//! that it outranks the older copy), the note's own fields, a bitmap of global range numbers
//! (`Lun::first_range` + range).

use super::layout::PartitionCheckpoint;
use super::region::NvramRegion;
use std::io;

/// A metadata slot.
pub const BYTES: usize = PartitionCheckpoint::SLOT_BYTES as usize;
/// One of its two copies.
const COPY: usize = BYTES / 2;
/// magic, generation.
const HEAD: usize = 8;
const CRC_AT: usize = COPY - 4;
/// The bytes of a copy's body.
pub const BODY: usize = CRC_AT - HEAD;

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// A copy's generation and body; None for an empty or damaged copy, or another note's.
fn decode_copy(magic: u32, copy: &[u8]) -> Option<(u32, &[u8])> {
    if u32_at(copy, 0) != magic
        || u32_at(copy, CRC_AT) != rdma_link::checksum::crc32c(&copy[..CRC_AT])
    {
        return None;
    }
    Some((u32_at(copy, 4), &copy[HEAD..CRC_AT]))
}

/// The newer valid copy in a slot's bytes: which copy it is, its generation and its body.
fn newest(magic: u32, slot: &[u8; BYTES]) -> Option<(usize, u32, &[u8])> {
    let copies = [0, 1].map(|i| decode_copy(magic, &slot[i * COPY..(i + 1) * COPY]));
    match copies {
        [Some((g0, b0)), Some((g1, b1))] => Some(if (g1.wrapping_sub(g0) as i32) > 0 {
            (1, g1, b1)
        } else {
            (0, g0, b0)
        }),
        [Some((g, b)), None] => Some((0, g, b)),
        [None, Some((g, b))] => Some((1, g, b)),
        [None, None] => None,
    }
}

/// Where the next update of the note at NVRAM offset `off` goes (the older copy's offset),
/// and its generation.
fn next_copy(region: &NvramRegion, off: u64, magic: u32) -> (u64, u32) {
    let (copy, generation) = match newest(magic, &read_slot(region, off)) {
        Some((copy, generation, _)) => (1 - copy, generation.wrapping_add(1)),
        None => (0, 1),
    };
    (off + (copy * COPY) as u64, generation)
}

fn encode_copy(magic: u32, generation: u32, body: &[u8]) -> [u8; COPY] {
    let mut b = [0u8; COPY];
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..8].copy_from_slice(&generation.to_le_bytes());
    b[HEAD..HEAD + body.len()].copy_from_slice(body);
    let crc = rdma_link::checksum::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Replaces the note with `magic` in the slot at NVRAM offset `off` by `body` (at most
/// [`BODY`] bytes), durably: over the older copy.
pub fn write_body(region: &NvramRegion, off: u64, magic: u32, body: &[u8]) -> io::Result<()> {
    if body.len() > BODY {
        return Err(io::Error::other(format!(
            "a note of {} bytes does not fit its NVRAM slot ({BODY} bytes)",
            body.len()
        )));
    }
    let (at, generation) = next_copy(region, off, magic);
    region.write_at(at, &encode_copy(magic, generation, body));
    region.persist(at, COPY as u64)
}

/// The body of the note with `magic` in the slot at NVRAM offset `off` (always [`BODY`]
/// bytes), or None if the slot holds no valid copy of it.
pub fn read_body(region: &NvramRegion, off: u64, magic: u32) -> Option<Vec<u8>> {
    newest(magic, &read_slot(region, off)).map(|(_, _, body)| body.to_vec())
}

fn read_slot(region: &NvramRegion, off: u64) -> [u8; BYTES] {
    let mut b = [0u8; BYTES];
    region.read_at(off, &mut b);
    b
}

/// Range numbers a range note whose own fields take `fields` bytes can hold (the ownership
/// table holds fewer, `ownership::MAX_ENTRIES`).
pub const fn max_ranges(fields: usize) -> usize {
    (BODY - 4 - fields - 4) * 8
}

/// A set range note's body: set, `fields`, the bitmap's length in bits, the bitmap.
pub fn encode_ranges(fields: &[u8], ranges: &[u32], what: &str) -> io::Result<Vec<u8>> {
    let max = max_ranges(fields.len());
    let head = 4 + fields.len() + 4;
    let mut b = vec![0u8; BODY];
    b[0..4].copy_from_slice(&1u32.to_le_bytes());
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
    Ok(b)
}

/// A cleared range note's body.
pub fn cleared() -> Vec<u8> {
    vec![0u8; 4]
}

/// A range note's own fields (`fields_len` bytes) and ranges; None if it is cleared.
pub fn decode_ranges(fields_len: usize, b: &[u8]) -> Option<(Vec<u8>, Vec<u32>)> {
    if b.len() < BODY || u32_at(b, 0) != 1 {
        return None;
    }
    Some(fields_and_ranges(b, fields_len, max_ranges(fields_len)))
}

/// Both layouts after their first 4 bytes (set flag, or the one-copy layout's magic): the
/// fields, the bitmap's length in bits (at most `max_bits`), the bitmap.
fn fields_and_ranges(b: &[u8], fields_len: usize, max_bits: usize) -> (Vec<u8>, Vec<u32>) {
    let head = 4 + fields_len + 4;
    let bits = (u32_at(b, head - 4) as usize).min(max_bits);
    let ranges = (0..bits)
        .filter(|&r| b[head + r / 8] & (1 << (r % 8)) != 0)
        .map(|r| r as u32)
        .collect();
    (b[4..head - 4].to_vec(), ranges)
}

/// A range note in the layout before 2026-12-07 (one copy filling the slot: magic, fields,
/// the bitmap's length, the bitmap, a crc32c at the end), which an upgraded node may find
/// in its NVRAM. Read only where the slot holds no copy of the present layout.
pub fn read_ranges_of_one_copy(
    region: &NvramRegion,
    off: u64,
    magic: u32,
    fields_len: usize,
) -> Option<(Vec<u8>, Vec<u32>)> {
    let b = read_slot(region, off);
    let crc_at = BYTES - 4;
    if u32_at(&b, 0) != magic || u32_at(&b, crc_at) != rdma_link::checksum::crc32c(&b[..crc_at]) {
        return None;
    }
    Some(fields_and_ranges(
        &b,
        fields_len,
        (crc_at - 8 - fields_len) * 8,
    ))
}

/// Writes a range note (`Some((fields, ranges))`) or clears it (`None`).
pub fn write_ranges(
    region: &NvramRegion,
    off: u64,
    magic: u32,
    note: Option<(&[u8], &[u32])>,
    what: &str,
) -> io::Result<()> {
    let body = match note {
        Some((fields, ranges)) => encode_ranges(fields, ranges, what)?,
        None => cleared(),
    };
    write_body(region, off, magic, &body)
}

/// A range note's fields and ranges, if set.
pub fn read_ranges(
    region: &NvramRegion,
    off: u64,
    magic: u32,
    fields_len: usize,
) -> Option<(Vec<u8>, Vec<u32>)> {
    match read_body(region, off, magic) {
        Some(body) => decode_ranges(fields_len, &body),
        None => read_ranges_of_one_copy(region, off, magic, fields_len),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nvram::memory::{MemoryNvram, CACHE_LINE};
    use std::sync::Arc;

    /// Every way a power cut can tear each update of `steps` (each cache line of the copy
    /// being written kept new or left old) reads back, through `read`, as the note before
    /// the update or after it; an untorn update as the one after. `write` does one update.
    pub(crate) fn torn_updates_read_as_before_or_after<T: PartialEq + std::fmt::Debug>(
        magic: u32,
        off: u64,
        steps: &[T],
        write: impl Fn(&NvramRegion, &T),
        read: impl Fn(&NvramRegion) -> T,
        body: impl Fn(&T) -> Vec<u8>,
    ) {
        let lines = COPY / CACHE_LINE;
        for (i, next) in steps.iter().enumerate() {
            for torn in 0..(1u32 << lines) {
                let memory = Arc::new(MemoryNvram::new("nvram", 1 << 20));
                let region = NvramRegion::in_memory(memory.clone());
                for done in &steps[..i] {
                    write(&region, done);
                }
                let before = read(&region);
                // The update's stores, not yet persisted, then the cut.
                let (at, generation) = next_copy(&region, off, magic);
                region.write_at(at, &encode_copy(magic, generation, &body(next)));
                let first_line = at as usize / CACHE_LINE;
                memory.power_cut(|line| {
                    line.checked_sub(first_line)
                        .is_some_and(|l| l < lines && torn & (1 << l) != 0)
                });
                let after = read(&region);
                match torn {
                    0 => assert_eq!(after, before, "step {i}: no line kept"),
                    t if t == (1 << lines) - 1 => {
                        assert_eq!(&after, next, "step {i}: every line kept")
                    }
                    _ => assert!(
                        after == before || &after == next,
                        "step {i}, lines kept {torn:#b}: {after:?}, neither {before:?} nor {next:?}"
                    ),
                }
            }
        }
    }

    const MAGIC: u32 = 0x5453_4554;

    #[test]
    fn a_range_note_survives_torn_updates_and_clears() {
        let steps: Vec<Option<(Vec<u8>, Vec<u32>)>> = vec![
            Some((vec![1, 0, 0, 0], vec![0, 5])),
            Some((vec![2, 0, 0, 0], vec![0, 5, max_ranges(4) as u32 - 1])),
            None,
            Some((vec![3, 0, 0, 0], vec![7])),
        ];
        torn_updates_read_as_before_or_after(
            MAGIC,
            4096,
            &steps,
            |region, s| {
                write_ranges(
                    region,
                    4096,
                    MAGIC,
                    s.as_ref().map(|(f, r)| (f.as_slice(), r.as_slice())),
                    "test note",
                )
                .expect("write")
            },
            |region| read_ranges(region, 4096, MAGIC, 4),
            |s| match s {
                Some((f, r)) => encode_ranges(f, r, "test note").expect("fits"),
                None => cleared(),
            },
        );
    }

    #[test]
    fn damage_and_other_notes_read_as_none_and_too_large_is_refused() {
        let region = NvramRegion::in_memory(Arc::new(MemoryNvram::new("nvram", 1 << 20)));
        assert_eq!(read_ranges(&region, 0, MAGIC, 4), None);
        write_ranges(&region, 0, MAGIC, Some((&[9, 0, 0, 0], &[3])), "n").expect("write");
        assert_eq!(
            read_ranges(&region, 0, MAGIC, 4),
            Some((vec![9, 0, 0, 0], vec![3]))
        );
        assert_eq!(read_ranges(&region, 0, MAGIC + 1, 4), None);
        let mut b = [0u8; 1];
        region.read_at(HEAD as u64 + 5, &mut b);
        region.write_at(HEAD as u64 + 5, &[b[0] ^ 0x40]);
        assert_eq!(
            read_ranges(&region, 0, MAGIC, 4),
            None,
            "a damaged copy is no copy"
        );
        assert!(encode_ranges(&[0; 4], &[max_ranges(4) as u32], "n").is_err());
        assert!(write_body(&region, 0, MAGIC, &[0; BODY + 1]).is_err());
    }

    #[test]
    fn a_note_of_the_one_copy_layout_is_still_read() {
        let region = NvramRegion::in_memory(Arc::new(MemoryNvram::new("nvram", 1 << 20)));
        // magic, 4 bytes of fields, the bitmap's length, ranges 2 and 9, the crc at the end.
        let mut b = [0u8; BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        b[8..12].copy_from_slice(&64u32.to_le_bytes());
        b[12] = 1 << 2;
        b[13] = 1 << 1;
        let crc = rdma_link::checksum::crc32c(&b[..BYTES - 4]);
        b[BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        region.write_at(0, &b);
        assert_eq!(
            read_ranges(&region, 0, MAGIC, 4),
            Some((7u32.to_le_bytes().to_vec(), vec![2, 9]))
        );
        write_ranges(&region, 0, MAGIC, None, "n").expect("clear");
        assert_eq!(read_ranges(&region, 0, MAGIC, 4), None);
    }
}
