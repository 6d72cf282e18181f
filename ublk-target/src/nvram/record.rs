//! One staged write as it sits in a partition log: a 64-byte header followed by its data.
//!
//! ```text
//!  0 magic u32 "NVMR"    4 version u16   6 kind u8   7 flags u8
//!  8 log_id u64         16 seq u64      24 lun u32  28 partition u32
//! 32 offset u64 (bytes into the LUN)    40 len u32 (bytes of the LUN affected)
//! 44 data_len u32 (payload bytes after the header)
//! 48 acked_through u64 (every record of this partition up to this seq was acknowledged
//!    when this one was appended; recovery uses it to tell a torn tail from corruption)
//! 56 data_crc u32 (crc32c of the payload)   60 header_crc u32 (crc32c of bytes 0..60)
//! ```
//! Records start on 64-byte boundaries so a scan can find headers without knowing lengths.

pub const HEADER_BYTES: u64 = 64;
pub const RECORD_ALIGN: u64 = 64;
const MAGIC: u32 = 0x524d_564e; // "NVMR"
pub const RECORD_VERSION: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// `len` bytes of data follow the header.
    Data = 1,
    /// The LUN range reads as zeroes from now on (WRITE_ZEROES, DISCARD).
    Zero = 2,
    /// Padding: the rest of the partition is unused; the next record is at its start.
    Wrap = 3,
    /// Every earlier record of this partition in a span of the LUN is dead (the node lost
    /// that range meanwhile); the span is the payload. See `nvram::void`.
    Void = 4,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Data),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::Wrap),
            4 => Some(RecordKind::Void),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u8,
    pub log_id: u64,
    pub seq: u64,
    pub lun: u32,
    pub partition: u32,
    pub offset: u64,
    pub len: u32,
    pub data_len: u32,
    pub acked_through: u64,
    pub data_crc: u32,
}

/// Why a header could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    /// No record magic: never written, or padding.
    NoMagic,
    /// Magic present but the header checksum or a field is wrong.
    Damaged,
}

impl RecordHeader {
    /// A data record of `data` at `offset` of LUN 0, for tests that build logs; each sets
    /// what else it needs with struct update syntax.
    #[cfg(test)]
    pub(crate) fn test_data(
        log_id: u64,
        partition: u32,
        seq: u64,
        offset: u64,
        data: &[u8],
    ) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            flags: 0,
            log_id,
            seq,
            lun: 0,
            partition,
            offset,
            len: data.len() as u32,
            data_len: data.len() as u32,
            acked_through: 0,
            data_crc: rdma_link::checksum::crc32c(data),
        }
    }

    /// Bytes the record occupies in the log, header and padding included.
    pub fn slot_bytes(data_len: u64) -> u64 {
        (HEADER_BYTES + data_len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
    }

    pub fn slot(&self) -> u64 {
        Self::slot_bytes(self.data_len as u64)
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut b = [0u8; HEADER_BYTES as usize];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.log_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.lun.to_le_bytes());
        b[28..32].copy_from_slice(&self.partition.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.len.to_le_bytes());
        b[44..48].copy_from_slice(&self.data_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.acked_through.to_le_bytes());
        b[56..60].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = rdma_link::checksum::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, HeaderProblem> {
        if b.len() < HEADER_BYTES as usize {
            return Err(HeaderProblem::Damaged);
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != MAGIC {
            return Err(HeaderProblem::NoMagic);
        }
        if rdma_link::checksum::crc32c(&b[..60]) != u32_at(60) {
            return Err(HeaderProblem::Damaged);
        }
        if u16::from_le_bytes([b[4], b[5]]) != RECORD_VERSION {
            return Err(HeaderProblem::Damaged);
        }
        let kind = RecordKind::from_u8(b[6]).ok_or(HeaderProblem::Damaged)?;
        Ok(RecordHeader {
            kind,
            flags: b[7],
            log_id: u64_at(8),
            seq: u64_at(16),
            lun: u32_at(24),
            partition: u32_at(28),
            offset: u64_at(32),
            len: u32_at(40),
            data_len: u32_at(44),
            acked_through: u64_at(48),
            data_crc: u32_at(56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            flags: 0,
            log_id: 42,
            seq: 7,
            lun: 1,
            partition: 3,
            offset: 8192,
            len: 4096,
            data_len: 4096,
            acked_through: 6,
            data_crc: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(RecordHeader::decode(&h().encode()), Ok(h()));
    }

    #[test]
    fn slot_is_aligned_and_covers_the_data() {
        assert_eq!(RecordHeader::slot_bytes(0), 64);
        assert_eq!(RecordHeader::slot_bytes(4096), 4096 + 64);
        assert_eq!(RecordHeader::slot_bytes(1), 128);
    }

    #[test]
    fn blank_bytes_have_no_magic() {
        assert_eq!(
            RecordHeader::decode(&[0u8; 64]),
            Err(HeaderProblem::NoMagic)
        );
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_detected(byte in 0usize..64, bit in 0u8..8) {
            let mut b = h().encode();
            b[byte] ^= 1 << bit;
            prop_assert!(RecordHeader::decode(&b).is_err());
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = RecordHeader::decode(&b);
        }
    }
}
