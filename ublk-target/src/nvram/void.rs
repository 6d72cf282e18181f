//! Void records: how a node drops its own older records of a range it lost.
//!
//! A node that was paused or cut off may lose a range to its partner (a takeover) while its
//! log still holds records of that range: acknowledged writes the partner replayed from its
//! mirror (and may since have overwritten), and writes that were never acknowledged. When
//! the node learns it lost the range, or before it takes the range back, it appends a void
//! record for the range's span: every earlier record of the same partition in that span is
//! dead. The flusher skips dead records, reads stop seeing them, and a replay (this node's
//! start-up, or the partner's takeover from its mirror) skips them, so they never land over
//! the newer data (simulator seed 200380: a read returned a node's own version 5 of a block
//! after the other node had acknowledged versions 6 to 12).
//!
//! The payload is the span (start and end, byte offsets into the LUN) and the range's epoch
//! in the ownership table the writer read when it voided (24 bytes; a 16-byte payload, without
//! the epoch, is still read). The header's `offset` is the start and its `len` is 0 (a range
//! may be larger than the header's 32-bit length field).
//!
//! The epoch says which takeovers a void binds. A takeover replay of the range under epoch E
//! honours the old owner's voids written under an epoch below E only: those kill records a
//! replay of an earlier move already wrote (or writes never acknowledged). A void written
//! under E itself, by an old owner that read the table after the claim and before the replay
//! finished (the replay was retried: the taker's medium failed), covers the acknowledged
//! writes this replay exists for (simulator seed 6473 with `--storage own`: the copy of an
//! acknowledged write skipped as dead, then released).

use super::record::{RecordHeader, RecordKind};

/// Payload bytes of a void record: start, end, epoch.
pub const VOID_PAYLOAD_BYTES: usize = 24;
/// Payload bytes of a void record written before it carried the epoch.
const VOID_PAYLOAD_BYTES_NO_EPOCH: usize = 16;

/// `[start, end)` of LUN `lun`: every record of the partition before `below_seq` that
/// overlaps it is dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoidMark {
    pub lun: u32,
    pub start: u64,
    pub end: u64,
    pub below_seq: u64,
    /// The range's epoch in the table the writer read when it voided (None: a record
    /// written without it, or a mark in memory, where it does not matter).
    pub epoch: Option<u64>,
    /// Set in memory ahead of its void record, which has not got its seq yet: the mark
    /// stays until then (it will cover more).
    pub awaiting_record: bool,
}

impl VoidMark {
    /// Whether this mark kills a record of `lun` covering `[offset, offset + len)` with `seq`.
    pub fn covers(&self, lun: u32, offset: u64, len: u64, seq: u64) -> bool {
        seq < self.below_seq
            && lun == self.lun
            && offset < self.end
            && self.start < offset.saturating_add(len.max(1))
    }

    /// Whether a takeover replay under `epoch` (None: unknown) must honour this mark: see
    /// the module's comment.
    pub fn binds_replay_under(&self, epoch: Option<u64>) -> bool {
        match (self.epoch, epoch) {
            (Some(voided), Some(claimed)) => voided < claimed,
            _ => true,
        }
    }

    /// The payload of the void record for `[start, end)`, written under `epoch`.
    pub fn payload(start: u64, end: u64, epoch: u64) -> [u8; VOID_PAYLOAD_BYTES] {
        let mut b = [0u8; VOID_PAYLOAD_BYTES];
        b[..8].copy_from_slice(&start.to_le_bytes());
        b[8..16].copy_from_slice(&end.to_le_bytes());
        b[16..].copy_from_slice(&epoch.to_le_bytes());
        b
    }

    /// The mark a void record on the NVRAM stands for (None: not a well-formed void record).
    pub fn of_record(header: &RecordHeader, payload: &[u8]) -> Option<VoidMark> {
        if header.kind != RecordKind::Void
            || !matches!(
                payload.len(),
                VOID_PAYLOAD_BYTES | VOID_PAYLOAD_BYTES_NO_EPOCH
            )
        {
            return None;
        }
        let word = |i: usize| payload[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        let (start, end) = (word(0)?, word(8)?);
        let epoch = if payload.len() == VOID_PAYLOAD_BYTES {
            Some(word(16)?)
        } else {
            None
        };
        (start < end).then_some(VoidMark {
            lun: header.lun,
            start,
            end,
            below_seq: header.seq,
            epoch,
            awaiting_record: false,
        })
    }
}

/// The void marks of one partition.
#[derive(Clone, Debug, Default)]
pub struct VoidMarks(Vec<VoidMark>);

impl VoidMarks {
    pub fn add(&mut self, mark: VoidMark) {
        self.0.push(mark);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a record (`lun`, `[offset, offset + len)`, `seq`) is dead.
    pub fn covers(&self, lun: u32, offset: u64, len: u64, seq: u64) -> bool {
        self.0.iter().any(|m| m.covers(lun, offset, len, seq))
    }

    /// Whether a takeover replay under `epoch` skips the record as dead: only the marks that
    /// bind it count ([`VoidMark::binds_replay_under`]).
    pub fn kill_in_replay(
        &self,
        lun: u32,
        offset: u64,
        len: u64,
        seq: u64,
        epoch: Option<u64>,
    ) -> bool {
        self.0
            .iter()
            .any(|m| m.binds_replay_under(epoch) && m.covers(lun, offset, len, seq))
    }

    /// Forgets the marks that can no longer cover anything: every record below them is
    /// released (`released_through`: the highest released seq), and they will not grow.
    pub fn forget_through(&mut self, released_through: u64) {
        self.0
            .retain(|m| m.awaiting_record || m.below_seq > released_through + 1);
    }

    /// The marks the void records among `records` (header, payload) stand for.
    pub fn of_records<'a>(records: impl IntoIterator<Item = (&'a RecordHeader, &'a [u8])>) -> Self {
        VoidMarks(
            records
                .into_iter()
                .filter_map(|(h, data)| VoidMark::of_record(h, data))
                .collect(),
        )
    }

    /// Raises the `below_seq` of a mark registered ahead of its void record (see
    /// `PartitionLog::void_span`) to the record's seq.
    pub fn raise(&mut self, lun: u32, start: u64, end: u64, below_seq: u64) {
        for m in self.0.iter_mut() {
            if m.lun == lun && m.start == start && m.end == end && m.below_seq < below_seq {
                m.below_seq = below_seq;
                m.awaiting_record = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: RecordKind, seq: u64) -> RecordHeader {
        RecordHeader {
            kind,
            flags: 0,
            log_id: 1,
            seq,
            lun: 2,
            partition: 0,
            offset: 4096,
            len: 0,
            data_len: VOID_PAYLOAD_BYTES as u32,
            acked_through: 0,
            data_crc: 0,
        }
    }

    #[test]
    fn a_void_record_kills_older_overlapping_records_only() {
        let payload = VoidMark::payload(4096, 8192, 3);
        let mark = VoidMark::of_record(&header(RecordKind::Void, 10), &payload).expect("void");
        assert_eq!(mark.epoch, Some(3));
        let marks = VoidMarks::of_records([(&header(RecordKind::Void, 10), &payload[..])]);
        assert!(mark.covers(2, 4096, 4096, 9));
        assert!(marks.covers(2, 0, 8192, 3), "overlapping the start");
        assert!(!marks.covers(2, 4096, 4096, 10), "the void record itself");
        assert!(!marks.covers(2, 4096, 4096, 11), "newer");
        assert!(!marks.covers(1, 4096, 4096, 9), "another LUN");
        assert!(!marks.covers(2, 8192, 4096, 9), "after the span");
        assert!(!marks.covers(2, 0, 4096, 9), "before the span");
        assert!(marks.covers(2, 5000, 0, 9), "a zero-length record inside");
    }

    #[test]
    fn malformed_void_records_are_not_marks() {
        let payload = VoidMark::payload(8192, 4096, 1);
        assert_eq!(
            VoidMark::of_record(&header(RecordKind::Void, 1), &payload),
            None
        );
        let payload = VoidMark::payload(0, 4096, 1);
        assert_eq!(
            VoidMark::of_record(&header(RecordKind::Data, 1), &payload),
            None
        );
        assert_eq!(
            VoidMark::of_record(&header(RecordKind::Void, 1), &payload[..8]),
            None
        );
    }

    #[test]
    fn a_replay_honours_only_voids_written_under_an_older_epoch() {
        let v = |epoch| VoidMark::payload(0, 8192, epoch);
        let (p3, p5) = (v(3), v(5));
        let marks = VoidMarks::of_records([
            (&header(RecordKind::Void, 10), &p3[..]),
            (&header(RecordKind::Void, 20), &p5[..]),
        ]);
        // Under epoch 5 (the claim the void of seq 20 saw): only the older void binds.
        assert!(marks.kill_in_replay(2, 0, 4096, 9, Some(5)));
        assert!(!marks.kill_in_replay(2, 0, 4096, 15, Some(5)));
        // A later claim honours both; an unknown epoch honours every void.
        assert!(marks.kill_in_replay(2, 0, 4096, 15, Some(6)));
        assert!(marks.kill_in_replay(2, 0, 4096, 15, None));
        // A void written without the epoch binds every replay.
        let old: Vec<u8> = p5[..16].to_vec();
        let legacy = VoidMarks::of_records([(&header(RecordKind::Void, 20), &old[..])]);
        assert!(legacy.kill_in_replay(2, 0, 4096, 15, Some(5)));
    }

    #[test]
    fn marks_are_forgotten_once_released_past() {
        let mut marks = VoidMarks::default();
        marks.add(VoidMark {
            lun: 0,
            start: 0,
            end: 10,
            below_seq: 5,
            epoch: None,
            awaiting_record: true,
        });
        marks.forget_through(9);
        assert!(!marks.is_empty(), "kept until its void record has a seq");
        marks.raise(0, 0, 10, 12);
        marks.forget_through(10);
        assert!(!marks.is_empty());
        marks.forget_through(11);
        assert!(marks.is_empty());
    }
}
