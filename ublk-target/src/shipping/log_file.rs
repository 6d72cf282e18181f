//! The destination's log file for one source partition (claim set C, claims 1, 10, 17, 21):
//! append-only, records in sequence order with no gap, each exactly as it sat in the
//! source's NVRAM (`nvram::record`: a 64-byte header with crc32c, the data, padding to 64).
//!
//! ```text
//! file header, 64 bytes:
//!  0 magic "NVMSHIPL"   8 version u32   12 partition u32   16 source log_id u64
//! 24 first_seq u64 (the seq of the first record; the file starts again after each
//!    consistency point)   60 header_crc u32 (crc32c of bytes 0..60)
//! then records back to back from byte 64.
//! ```
//!
//! Opening checks every record. A bad record at the end is a torn append (a crash before
//! the batch's fdatasync, so never acknowledged): it is cut off. A bad record with a good one
//! after it is damage to synced data and refuses the file, naming the offset.

use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES, RECORD_ALIGN};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"NVMSHIPL";
const VERSION: u32 = 1;
const FILE_HEADER_BYTES: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an nvmirror log file ({why})")]
    NotALogFile { path: PathBuf, why: String },
    #[error(
        "{path}: damaged record at byte {offset} ({why}) with good records after it; the \
         file is refused rather than cut short. Keep it for inspection; the source resends \
         what the destination lacks once the file is moved away"
    )]
    Damaged {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("{path}: record for {what} appended to the log file of {expected}")]
    Foreign {
        path: PathBuf,
        what: String,
        expected: String,
    },
    #[error("{path}: record seq {got} appended where seq {expected} belongs")]
    OutOfOrder {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
}

/// `DIR/pN-LOGID-FIRSTSEQ.log`: names sort by partition, log and first seq (one file per
/// source partition and log segment).
pub fn segment_path(dir: &Path, partition: u32, log_id: u64, first_seq: u64) -> PathBuf {
    dir.join(format!("p{partition}-{log_id:016x}-{first_seq:020}.log"))
}

#[derive(Debug)]
pub struct LogFile {
    file: File,
    path: PathBuf,
    source_log_id: u64,
    partition: u32,
    first_seq: u64,
    next_seq: u64,
    len: u64,
    /// As of the last successful `sync` (or the open): what is durable.
    synced_next_seq: u64,
    synced_len: u64,
}

/// What `LogFile::open` found.
#[derive(Debug)]
pub struct Opened {
    pub log: LogFile,
    /// Bytes of a torn last append that were cut off.
    pub torn_bytes: u64,
}

fn encode_file_header(partition: u32, source_log_id: u64, first_seq: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&partition.to_le_bytes());
    b[16..24].copy_from_slice(&source_log_id.to_le_bytes());
    b[24..32].copy_from_slice(&first_seq.to_le_bytes());
    let crc = rdma_link::checksum::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// One record read back from a log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRecord {
    pub header: RecordHeader,
    pub data: Vec<u8>,
}

/// The intact record at `at` (its header and where it ends), or why it is not one.
fn check_record(buf: &[u8], at: usize) -> Result<(RecordHeader, usize), String> {
    let header = RecordHeader::decode(&buf[at..]).map_err(|p| format!("header: {p:?}"))?;
    let data_start = at + HEADER_BYTES as usize;
    let data_end = data_start + header.data_len as usize;
    let slot_end = at + header.slot() as usize;
    if slot_end > buf.len() {
        return Err(format!(
            "{} bytes of data announced, {} present",
            header.data_len,
            buf.len().saturating_sub(data_start)
        ));
    }
    if rdma_link::checksum::crc32c(&buf[data_start..data_end]) != header.data_crc {
        return Err("data checksum".into());
    }
    Ok((header, slot_end))
}

impl LogFile {
    /// A new, empty log file whose first record will be `first_seq` (it must not exist).
    pub fn create(
        path: &Path,
        source_log_id: u64,
        partition: u32,
        first_seq: u64,
    ) -> Result<LogFile, LogFileError> {
        let io_err = |source| LogFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        file.write_all(&encode_file_header(partition, source_log_id, first_seq))
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        // The file's name must survive a crash too.
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(LogFile {
            file,
            path: path.to_owned(),
            source_log_id,
            partition,
            first_seq,
            next_seq: first_seq,
            len: FILE_HEADER_BYTES,
            synced_next_seq: first_seq,
            synced_len: FILE_HEADER_BYTES,
        })
    }

    /// Opens an existing log file, checking every record; a torn last append is cut off.
    pub fn open(path: &Path) -> Result<Opened, LogFileError> {
        Self::open_synced_through(path, u64::MAX)
    }

    /// `open`, knowing that no record above seq `synced_through` was ever confirmed synced
    /// (the destination still holds them in its NVRAM): bad bytes followed only by such
    /// records are a torn append (a power cut may persist a later page of it and not an
    /// earlier one), not damage.
    pub fn open_synced_through(path: &Path, synced_through: u64) -> Result<Opened, LogFileError> {
        let io_err = |source| LogFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(io_err)?;
        let Checked {
            partition,
            source_log_id,
            first_seq,
            next_seq,
            end: at,
            ..
        } = check_all(path, &buf, synced_through)?;
        let torn_bytes = (buf.len() - at) as u64;
        if torn_bytes > 0 {
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_err)?;
            tracing::warn!(
                "{}: cut off a torn last append ({torn_bytes} bytes, from seq {next_seq})",
                path.display()
            );
        }
        Ok(Opened {
            log: LogFile {
                file,
                path: path.to_owned(),
                source_log_id,
                partition,
                first_seq,
                next_seq,
                len: at as u64,
                synced_next_seq: next_seq,
                synced_len: at as u64,
            },
            torn_bytes,
        })
    }

    /// Whether an intact record with a later seq follows the bad bytes at `bad` (then they
    /// are damage, not a torn tail). Records are 64-byte aligned, so every slot is tried.
    fn good_record_after(buf: &[u8], bad: usize, missing_seq: u64, synced_through: u64) -> bool {
        let align = RECORD_ALIGN as usize;
        (bad + align..buf.len()).step_by(align).any(|at| {
            matches!(check_record(buf, at), Ok((h, _)) if h.seq > missing_seq && h.seq <= synced_through)
        })
    }

    /// Appends records (in sequence order, continuing the file) in one write. They are
    /// durable only after `sync`.
    pub fn append(&mut self, records: &[(RecordHeader, &[u8])]) -> Result<(), LogFileError> {
        let mut out = Vec::with_capacity(
            records
                .iter()
                .map(|(h, _)| h.slot() as usize)
                .sum::<usize>(),
        );
        let mut seq = self.next_seq;
        for (h, data) in records {
            if h.log_id != self.source_log_id || h.partition != self.partition {
                return Err(LogFileError::Foreign {
                    path: self.path.clone(),
                    what: format!("log {:016x} partition {}", h.log_id, h.partition),
                    expected: format!(
                        "log {:016x} partition {}",
                        self.source_log_id, self.partition
                    ),
                });
            }
            if h.seq != seq {
                return Err(LogFileError::OutOfOrder {
                    path: self.path.clone(),
                    expected: seq,
                    got: h.seq,
                });
            }
            let intact = h.data_len as usize == data.len()
                && (h.kind != RecordKind::Data || h.len as usize == data.len())
                && rdma_link::checksum::crc32c(data) == h.data_crc;
            if !intact {
                return Err(LogFileError::Damaged {
                    path: self.path.clone(),
                    offset: self.len + out.len() as u64,
                    why: format!("seq {} arrived with data that fails its checksum", h.seq),
                });
            }
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(RECORD_ALIGN as usize), 0);
            seq += 1;
        }
        if let Err(source) = self.file.write_all(&out) {
            // Part of it may be in the file: cut it off, or the next append would follow it.
            let _ = self.file.set_len(self.len);
            return Err(LogFileError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += out.len() as u64;
        self.next_seq = seq;
        Ok(())
    }

    /// Makes every appended record durable (fdatasync): only then may the destination
    /// release them from its NVRAM.
    pub fn sync(&mut self) -> Result<(), LogFileError> {
        self.file.sync_data().map_err(|source| LogFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.synced_next_seq = self.next_seq;
        self.synced_len = self.len;
        Ok(())
    }

    /// After a failed append or sync: back to what the last sync made durable (after a
    /// failed fdatasync, nothing written since counts; the records are appended again).
    pub fn roll_back_unsynced(&mut self) -> Result<(), LogFileError> {
        self.file
            .set_len(self.synced_len)
            .map_err(|source| LogFileError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.len = self.synced_len;
        self.next_seq = self.synced_next_seq;
        Ok(())
    }

    /// The seq after the last durable record.
    pub fn synced_next_seq(&self) -> u64 {
        self.synced_next_seq
    }

    /// The seq the next append must start with.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn source_log_id(&self) -> u64 {
        self.source_log_id
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The same open file, known by the name it was renamed to.
    pub fn renamed(self, path: &Path) -> LogFile {
        LogFile {
            path: path.to_owned(),
            ..self
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == self.first_seq
    }

    /// Every record, in order (for applying them to the image or for `export`).
    pub fn read_all(&self) -> Result<Vec<LoggedRecord>, LogFileError> {
        let io_err = |source| LogFileError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = &self.file;
        let mut buf = vec![0u8; (self.len - FILE_HEADER_BYTES) as usize];
        f.seek(SeekFrom::Start(FILE_HEADER_BYTES))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(io_err)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let (header, end) = check_record(&buf, at).map_err(|why| LogFileError::Damaged {
                path: self.path.clone(),
                offset: FILE_HEADER_BYTES + at as u64,
                why,
            })?;
            let data_start = at + HEADER_BYTES as usize;
            out.push(LoggedRecord {
                header,
                data: buf[data_start..data_start + header.data_len as usize].to_vec(),
            });
            at = end;
        }
        Ok(out)
    }
}

/// What a log file holds, checked record by record.
struct Checked {
    partition: u32,
    source_log_id: u64,
    first_seq: u64,
    next_seq: u64,
    /// Where the intact records end (a torn last append follows).
    end: usize,
    /// Records other than wrap markers, and markers.
    data_records: u64,
    markers: u64,
}

fn check_all(path: &Path, buf: &[u8], synced_through: u64) -> Result<Checked, LogFileError> {
    let not_ours = |why: &str| LogFileError::NotALogFile {
        path: path.to_owned(),
        why: why.into(),
    };
    if buf.len() < FILE_HEADER_BYTES as usize || &buf[0..8] != MAGIC {
        return Err(not_ours("no log file header"));
    }
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if rdma_link::checksum::crc32c(&buf[..60]) != u32_at(60) {
        return Err(not_ours("file header checksum"));
    }
    if u32_at(8) != VERSION {
        return Err(not_ours(&format!(
            "format version {}, this nvmirror reads {VERSION}",
            u32_at(8)
        )));
    }
    let (partition, source_log_id, first_seq) = (u32_at(12), u64_at(16), u64_at(24));
    let mut at = FILE_HEADER_BYTES as usize;
    let mut next_seq = first_seq;
    let (mut data_records, mut markers) = (0u64, 0u64);
    while at < buf.len() {
        match check_record(buf, at) {
            Ok((h, end)) => {
                if h.log_id != source_log_id || h.partition != partition {
                    return Err(LogFileError::Damaged {
                        path: path.to_owned(),
                        offset: at as u64,
                        why: format!(
                            "a record of log {:016x} partition {} in the file of log \
                                 {source_log_id:016x} partition {partition}",
                            h.log_id, h.partition
                        ),
                    });
                }
                if h.seq != next_seq {
                    return Err(LogFileError::Damaged {
                        path: path.to_owned(),
                        offset: at as u64,
                        why: format!("seq {} where seq {next_seq} belongs", h.seq),
                    });
                }
                next_seq += 1;
                if h.kind == RecordKind::Wrap {
                    markers += 1;
                } else {
                    data_records += 1;
                }
                at = end;
            }
            Err(why) => {
                if LogFile::good_record_after(buf, at, next_seq, synced_through) {
                    return Err(LogFileError::Damaged {
                        path: path.to_owned(),
                        offset: at as u64,
                        why,
                    });
                }
                break;
            }
        }
    }
    Ok(Checked {
        partition,
        source_log_id,
        first_seq,
        next_seq,
        end: at,
        data_records,
        markers,
    })
}

/// A log file as `nvmirrorctl log-files` shows it (read-only: a torn tail is reported,
/// not cut off).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogFileSummary {
    pub file: String,
    pub partition: u32,
    pub source_log_id: String,
    pub first_seq: u64,
    /// The seq the next record would have.
    pub next_seq: u64,
    /// Records other than wrap markers (the source skipping its partition's end).
    pub records: u64,
    pub wrap_markers: u64,
    pub bytes: u64,
    pub torn_bytes: u64,
}

/// Checks the log file at `path` without changing it.
pub fn summarize(path: &Path) -> Result<LogFileSummary, LogFileError> {
    let buf = std::fs::read(path).map_err(|source| LogFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let c = check_all(path, &buf, u64::MAX)?;
    Ok(LogFileSummary {
        file: path.display().to_string(),
        partition: c.partition,
        source_log_id: format!("{:016x}", c.source_log_id),
        first_seq: c.first_seq,
        next_seq: c.next_seq,
        records: c.data_records,
        wrap_markers: c.markers,
        bytes: c.end as u64,
        torn_bytes: (buf.len() - c.end) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: u64 = 0xfeed_0001;

    fn record(seq: u64, fill: u8, len: usize) -> (RecordHeader, Vec<u8>) {
        let data = vec![fill; len];
        let h = RecordHeader {
            acked_through: seq.saturating_sub(1),
            ..RecordHeader::test_data(LOG, 2, seq, seq * 4096, &data)
        };
        (h, data)
    }

    fn append(log: &mut LogFile, recs: &[(RecordHeader, Vec<u8>)]) -> Result<(), LogFileError> {
        let refs: Vec<(RecordHeader, &[u8])> = recs.iter().map(|(h, d)| (*h, &d[..])).collect();
        log.append(&refs)
    }

    #[test]
    fn a_failed_sync_rolls_back_to_the_last_durable_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p2.log");
        let mut log = LogFile::create(&path, LOG, 2, 1).unwrap();
        append(&mut log, &[record(1, 1, 4096)]).unwrap();
        log.sync().unwrap();
        append(&mut log, &[record(2, 2, 4096), record(3, 3, 4096)]).unwrap();
        assert_eq!((log.next_seq(), log.synced_next_seq()), (4, 2));
        log.roll_back_unsynced().unwrap();
        assert_eq!(log.next_seq(), 2);
        append(&mut log, &[record(2, 7, 4096)]).unwrap();
        log.sync().unwrap();
        let back = LogFile::open(&path).unwrap().log.read_all().unwrap();
        assert_eq!(
            back.iter()
                .map(|r| (r.header.seq, r.data[0]))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 7)]
        );
    }

    #[test]
    fn bad_bytes_followed_only_by_unconfirmed_records_are_a_torn_append() {
        let dir = tempfile::tempdir().unwrap();
        let recs = [record(1, 1, 4096), record(2, 2, 4096), record(3, 3, 4096)];
        let path = file_with(dir.path(), &recs);
        // Record 2's data lost (a page of the last append not on disk), 3's there.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let at = FILE_HEADER_BYTES + recs[0].0.slot() + HEADER_BYTES + 100;
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 8], at).unwrap();
        // Synced through 3: damage. Through 1 (2 and 3 still in the NVRAM): torn.
        assert!(matches!(
            LogFile::open_synced_through(&path, 3),
            Err(LogFileError::Damaged { .. })
        ));
        let opened = LogFile::open_synced_through(&path, 1).unwrap();
        assert_eq!(opened.log.next_seq(), 2);
        assert!(opened.torn_bytes > 0);
    }

    fn file_with(dir: &Path, recs: &[(RecordHeader, Vec<u8>)]) -> PathBuf {
        let path = dir.join("p2.log");
        let mut log = LogFile::create(&path, LOG, 2, 1).expect("create");
        append(&mut log, recs).expect("append");
        log.sync().expect("sync");
        path
    }

    #[test]
    fn records_read_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recs: Vec<_> = (1..=5)
            .map(|s| record(s, s as u8, 100 * s as usize))
            .collect();
        let path = file_with(dir.path(), &recs);
        let opened = LogFile::open(&path).expect("open");
        assert_eq!(opened.torn_bytes, 0);
        assert_eq!(opened.log.next_seq(), 6);
        let back = opened.log.read_all().expect("read");
        assert_eq!(back.len(), 5);
        for (got, (h, d)) in back.iter().zip(&recs) {
            assert_eq!((&got.header, &got.data), (h, d));
        }
    }

    #[test]
    fn out_of_order_foreign_and_damaged_appends_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p2.log");
        let mut log = LogFile::create(&path, LOG, 2, 1).expect("create");
        append(&mut log, &[record(1, 1, 512)]).expect("append");
        let len = log.len();
        assert!(matches!(
            append(&mut log, &[record(3, 3, 512)]),
            Err(LogFileError::OutOfOrder {
                expected: 2,
                got: 3,
                ..
            })
        ));
        let (mut foreign, d) = record(2, 2, 512);
        foreign.log_id = 7;
        assert!(matches!(
            append(&mut log, &[(foreign, d)]),
            Err(LogFileError::Foreign { .. })
        ));
        let (h, mut d) = record(2, 2, 512);
        d[7] ^= 1;
        assert!(matches!(
            append(&mut log, &[(h, d)]),
            Err(LogFileError::Damaged { .. })
        ));
        assert_eq!((log.len(), log.next_seq()), (len, 2));
        append(&mut log, &[record(2, 2, 512)]).expect("the right record still goes in");
    }

    #[test]
    fn a_torn_last_append_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recs: Vec<_> = (1..=3).map(|s| record(s, s as u8, 4096)).collect();
        let path = file_with(dir.path(), &recs);
        let full = std::fs::metadata(&path).expect("stat").len();
        // The last record only partly reached the disk.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(full - 1000))
            .expect("tear");
        let opened = LogFile::open(&path).expect("open");
        assert_eq!(opened.log.next_seq(), 3);
        assert!(opened.torn_bytes > 0);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            opened.log.len()
        );
        assert_eq!(opened.log.read_all().expect("read").len(), 2);
    }

    #[test]
    fn damage_before_a_good_record_refuses_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recs: Vec<_> = (1..=3).map(|s| record(s, s as u8, 4096)).collect();
        let path = file_with(dir.path(), &recs);
        let mut bytes = std::fs::read(&path).expect("read");
        // A bit flip in the data of seq 2; seq 3 after it is intact.
        let second = (FILE_HEADER_BYTES + recs[0].0.slot() + HEADER_BYTES + 10) as usize;
        bytes[second] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        match LogFile::open(&path) {
            Err(LogFileError::Damaged { offset, .. }) => {
                assert_eq!(offset, FILE_HEADER_BYTES + recs[0].0.slot())
            }
            other => panic!("damaged file accepted: {other:?}"),
        }
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "nothing was cut"
        );
    }

    #[test]
    fn a_file_that_is_not_a_log_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other");
        std::fs::write(&path, [0u8; 4096]).expect("write");
        assert!(matches!(
            LogFile::open(&path),
            Err(LogFileError::NotALogFile { .. })
        ));
        assert!(
            LogFile::create(&path, LOG, 2, 1).is_err(),
            "create must not overwrite"
        );
    }
}
