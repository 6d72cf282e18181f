//! Reading a partition log back after a restart (or a takeover: a second store has the
//! same format).
//!
//! The scan starts at the checkpoint (the oldest record not yet on the medium) and follows
//! records while each one is intact and carries the next sequence number. Where that chain
//! ends there are two possibilities, and telling them apart is the whole point:
//!
//! * the end of the log, possibly with a torn tail: records that were being written when
//!   the node died. They were never acknowledged, so dropping them loses nothing;
//! * corruption: a record that WAS acknowledged is damaged. Replaying around it would lose an
//!   acknowledged write, so the scan refuses.
//!
//! Acknowledgement is in order, and every record carries `acked_through` (all records up to
//! that seq were acknowledged when it was appended). So if any intact record anywhere in the
//! partition says `acked_through >= n`, record `n` was acknowledged and its absence is
//! corruption.

use super::record::{HeaderProblem, RecordHeader, RecordKind, HEADER_BYTES, RECORD_ALIGN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    pub header: RecordHeader,
    /// Offset of the header within the partition log.
    pub pos: u64,
}

impl ScannedRecord {
    pub fn data_pos(&self) -> u64 {
        self.pos + HEADER_BYTES
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ScanResult {
    /// Data and zero records in sequence order (wrap markers left out).
    pub records: Vec<ScannedRecord>,
    /// Where the next record goes and the seq it gets.
    pub next_pos: u64,
    pub next_seq: u64,
    /// Intact-looking records after the end that were never acknowledged (a torn tail).
    pub discarded_tail: usize,
    /// Bytes of log the live records occupy (from the start position to `next_pos`).
    pub used_bytes: u64,
    /// Highest seq seen anywhere in the partition for this log (new records must go above
    /// it, so leftovers of a torn tail are never mistaken for new records).
    pub max_seq_seen: u64,
    /// Set when an acknowledged record is damaged; `records` then holds only the intact
    /// records before it (what a salvage can replay).
    pub corruption: Option<CorruptRecord>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("partition {partition}: record seq {seq} at log offset {pos} is {problem}, but record seq {proof_seq} shows it was acknowledged")]
pub struct CorruptRecord {
    pub partition: u32,
    pub seq: u64,
    pub pos: u64,
    pub problem: String,
    pub proof_seq: u64,
}

/// Scans `log` (one partition's bytes) from `start_pos`, expecting `start_seq` there.
pub fn scan_partition(
    log: &[u8],
    partition: u32,
    log_id: u64,
    start_pos: u64,
    start_seq: u64,
) -> ScanResult {
    let len = log.len() as u64;
    let mut records = Vec::new();
    let mut pos = start_pos;
    let mut expect = start_seq;
    let mut advanced = 0u64;
    let problem: String = loop {
        if pos >= len {
            pos = 0;
        }
        if advanced >= len {
            break "the end of a full log".into();
        }
        let header = match RecordHeader::decode(&log[pos as usize..]) {
            Ok(h) => h,
            Err(HeaderProblem::NoMagic) => break "missing (no record header)".into(),
            Err(HeaderProblem::Damaged) => break "damaged (header checksum mismatch)".into(),
        };
        if header.log_id != log_id || header.partition != partition {
            break "missing (a record of another log is there)".into();
        }
        if header.seq != expect {
            break format!("missing (record seq {} is there)", header.seq);
        }
        // No log gets near the last sequence number: a record there is damage, and no record
        // could follow it.
        let Some(after) = expect.checked_add(1) else {
            break "damaged (its sequence number is the largest possible)".into();
        };
        let slot = header.slot();
        if pos + slot > len || header.data_len > header.len && header.kind == RecordKind::Data {
            break "damaged (length beyond the partition)".into();
        }
        let data = &log[(pos + HEADER_BYTES) as usize
            ..(pos + HEADER_BYTES) as usize + header.data_len as usize];
        if rdma_link::checksum::crc32c(data) != header.data_crc {
            break "damaged (data checksum mismatch)".into();
        }
        let step = if header.kind == RecordKind::Wrap {
            len - pos
        } else {
            slot
        };
        // The log never writes past its oldest record: a chain that does has gone around
        // the partition and would replay the same bytes twice.
        if advanced + step > len {
            break "damaged (it overlaps the start of the scan)".into();
        }
        advanced += step;
        if header.kind == RecordKind::Wrap {
            pos = 0;
        } else {
            records.push(ScannedRecord { header, pos });
            pos += slot;
        }
        expect = after;
    };

    // Where the chain ended: is there proof that record `expect` was acknowledged?
    let mut discarded_tail = 0;
    let mut corruption = None;
    let mut max_seq_seen = expect.saturating_sub(1);
    let mut off = 0u64;
    while off + HEADER_BYTES <= len {
        if let Ok(h) = RecordHeader::decode(&log[off as usize..]) {
            if h.log_id == log_id && h.partition == partition && h.seq >= expect {
                max_seq_seen = max_seq_seen.max(h.seq);
                if h.acked_through >= expect && corruption.is_none() {
                    corruption = Some(CorruptRecord {
                        partition,
                        seq: expect,
                        pos,
                        problem: problem.clone(),
                        proof_seq: h.seq,
                    });
                }
                discarded_tail += 1;
            }
        }
        off += RECORD_ALIGN;
    }
    if corruption.is_some() {
        discarded_tail = 0;
    }
    ScanResult {
        records,
        next_pos: if pos >= len { 0 } else { pos },
        next_seq: expect,
        discarded_tail,
        used_bytes: advanced,
        max_seq_seen,
        corruption,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG_ID: u64 = 99;

    /// Appends records the way the log does, returning the positions.
    struct Writer {
        log: Vec<u8>,
        pos: u64,
        seq: u64,
    }

    impl Writer {
        fn new(len: usize) -> Writer {
            Writer {
                log: vec![0; len],
                pos: 0,
                seq: 1,
            }
        }
        fn append(&mut self, data: &[u8], acked_through: u64) -> u64 {
            let slot = RecordHeader::slot_bytes(data.len() as u64);
            let len = self.log.len() as u64;
            if self.pos + slot > len {
                let wrap = RecordHeader {
                    kind: RecordKind::Wrap,
                    flags: 0,
                    log_id: LOG_ID,
                    seq: self.seq,
                    lun: 0,
                    partition: 0,
                    offset: 0,
                    len: 0,
                    data_len: 0,
                    acked_through,
                    data_crc: rdma_link::checksum::crc32c(&[]),
                };
                self.log[self.pos as usize..self.pos as usize + 64].copy_from_slice(&wrap.encode());
                self.seq += 1;
                self.pos = 0;
            }
            let h = RecordHeader {
                kind: RecordKind::Data,
                flags: 0,
                log_id: LOG_ID,
                seq: self.seq,
                lun: 0,
                partition: 0,
                offset: self.seq * 4096,
                len: data.len() as u32,
                data_len: data.len() as u32,
                acked_through,
                data_crc: rdma_link::checksum::crc32c(data),
            };
            let p = self.pos as usize;
            self.log[p..p + 64].copy_from_slice(&h.encode());
            self.log[p + 64..p + 64 + data.len()].copy_from_slice(data);
            self.pos += slot;
            self.seq += 1;
            p as u64
        }
    }

    #[test]
    fn reads_back_every_record_in_order() {
        let mut w = Writer::new(64 * 1024);
        for i in 0..5u64 {
            w.append(&[i as u8; 4096], i);
        }
        let r = scan_partition(&w.log, 0, LOG_ID, 0, 1);
        assert_eq!(r.records.len(), 5);
        assert_eq!(r.next_seq, 6);
        assert_eq!(r.discarded_tail, 0);
        assert!(r
            .records
            .windows(2)
            .all(|p| p[0].header.seq + 1 == p[1].header.seq));
    }

    #[test]
    fn follows_a_wrap_and_stops_at_an_older_lap() {
        let mut w = Writer::new(5 * 4160 + 100);
        for i in 0..5u64 {
            w.append(&[1; 4096], i);
        }
        // Flushed the first three: start from record 4.
        let start = 3 * 4160;
        w.append(&[2; 4096], 5); // wraps: seq 6 is a wrap marker, data at 0 is seq 7
        let r = scan_partition(&w.log, 0, LOG_ID, start, 4);
        let seqs: Vec<u64> = r.records.iter().map(|r| r.header.seq).collect();
        assert_eq!(seqs, vec![4, 5, 7]);
        assert_eq!(r.next_seq, 8);
        assert_eq!(r.next_pos, 4160);
    }

    #[test]
    fn torn_unacknowledged_tail_is_dropped_not_refused() {
        let mut w = Writer::new(64 * 1024);
        w.append(&[1; 4096], 0);
        w.append(&[2; 4096], 1);
        let torn = w.append(&[3; 4096], 2);
        w.append(&[4; 4096], 2); // in flight too: acked_through does not cover seq 3
        w.log[torn as usize + 100] ^= 0xff;
        let r = scan_partition(&w.log, 0, LOG_ID, 0, 1);
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.discarded_tail, 2);
        assert_eq!(r.next_seq, 3);
    }

    #[test]
    fn damaged_acknowledged_record_is_refused() {
        let mut w = Writer::new(64 * 1024);
        let first = w.append(&[1; 4096], 0);
        w.append(&[2; 4096], 1);
        w.append(&[3; 4096], 2);
        w.log[first as usize + 64 + 7] ^= 0x01;
        let e = scan_partition(&w.log, 0, LOG_ID, 0, 1)
            .corruption
            .expect("must refuse");
        assert_eq!(e.seq, 1);
        assert!(e.problem.contains("data checksum"), "{}", e.problem);
        assert!(e.to_string().contains("acknowledged"));
    }

    #[test]
    fn damaged_header_of_acknowledged_record_is_refused() {
        let mut w = Writer::new(64 * 1024);
        w.append(&[1; 4096], 0);
        let second = w.append(&[2; 4096], 1);
        w.append(&[3; 4096], 2);
        w.log[second as usize + 17] ^= 0x01;
        let e = scan_partition(&w.log, 0, LOG_ID, 0, 1)
            .corruption
            .expect("must refuse");
        assert_eq!(e.seq, 2);
    }

    #[test]
    fn records_of_another_log_are_not_replayed() {
        let mut w = Writer::new(64 * 1024);
        w.append(&[1; 4096], 0);
        let r = scan_partition(&w.log, 0, LOG_ID + 1, 0, 1);
        assert!(r.records.is_empty());
    }
}
