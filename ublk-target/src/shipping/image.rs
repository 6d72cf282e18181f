//! Consistency points on the destination (claim set C, claims 1, 3, 15, 22, 23): a source
//! partition's logged records, through the seq the source names, are applied in order to
//! the destination's image of the source's volume; the image is synced; only then is the
//! log file started again after that seq (records that arrived beyond it carried over).
//!
//! A crash anywhere in between is safe: until the new log file has replaced the old one, the
//! old one still begins right after the previous consistency point, and applying it again
//! from its start ends in the same image (the same writes in the same order).

use super::log_file::{LogFile, LogFileError};
use crate::nvram::record::RecordKind;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Log(#[from] LogFileError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "consistency point through seq {through}: the log file holds seqs {first} to {last} \
         (a gap would be lost: the source must resend from seq {})",
        last + 1
    )]
    NotLoggedYet { through: u64, first: u64, last: u64 },
    #[error(
        "{path}: seq {seq} writes {len} bytes at {offset}, beyond the image's {size} bytes \
         (image_size smaller than the source's LUN?)"
    )]
    BeyondImage {
        path: PathBuf,
        seq: u64,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("seq {seq}: a {kind:?} record has no meaning in a shipped log (only data, zero and wrap markers)")]
    UnexpectedKind { seq: u64, kind: RecordKind },
}

/// What a consistency point did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub records: u64,
    pub bytes: u64,
    /// Records beyond the consistency point carried into the new log file.
    pub carried: u64,
}

/// Applies the log's records through `through` to `image`, syncs the image, and starts the
/// log file again at `through + 1` (returned). `image_size` bounds the writes.
pub fn consistency_point(
    log: LogFile,
    log_path: &Path,
    image: &File,
    image_path: &Path,
    image_size: u64,
    through: u64,
) -> Result<(LogFile, Applied), ImageError> {
    let first = log.first_seq();
    let last = log.next_seq().saturating_sub(1);
    if through >= log.next_seq() {
        return Err(ImageError::NotLoggedYet {
            through,
            first,
            last,
        });
    }
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, source }
    };
    let records = log.read_all()?;
    let mut applied = Applied {
        records: 0,
        bytes: 0,
        carried: 0,
    };
    let mut rest = Vec::new();
    for r in records {
        let h = r.header;
        if h.seq > through {
            rest.push(r);
            continue;
        }
        let len = h.len as u64;
        if h.offset.checked_add(len).is_none_or(|end| end > image_size) {
            return Err(ImageError::BeyondImage {
                path: image_path.to_owned(),
                seq: h.seq,
                offset: h.offset,
                len,
                size: image_size,
            });
        }
        match h.kind {
            RecordKind::Data => image.write_all_at(&r.data, h.offset),
            RecordKind::Zero => image.write_all_at(&vec![0u8; h.len as usize], h.offset),
            // A wrap marker (the source skipped its partition's end) writes nothing.
            RecordKind::Wrap => continue,
            kind => return Err(ImageError::UnexpectedKind { seq: h.seq, kind }),
        }
        .map_err(io_err(image_path))?;
        applied.records += 1;
        applied.bytes += len;
    }
    image.sync_data().map_err(io_err(image_path))?;
    // The new file under a temporary name, then renamed over the old one: the old file
    // stays whole until the new one is complete and durable.
    let tmp = log_path.with_extension("log.next");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut next = LogFile::create(&tmp, log.source_log_id(), log.partition(), through + 1)?;
    let carried: Vec<_> = rest.iter().map(|r| (r.header, &r.data[..])).collect();
    next.append(&carried)?;
    next.sync()?;
    std::fs::rename(&tmp, log_path).map_err(io_err(log_path))?;
    if let Some(dir) = log_path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    applied.carried = carried.len() as u64;
    drop(log);
    Ok((next.renamed(log_path), applied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::record::RecordHeader;
    use proptest::prelude::*;

    const LOG: u64 = 0xabc;
    const IMAGE: u64 = 64 << 10;

    fn write(seq: u64, offset: u64, len: u32, fill: u8, zero: bool) -> (RecordHeader, Vec<u8>) {
        let data = if zero {
            Vec::new()
        } else {
            vec![fill; len as usize]
        };
        let h = RecordHeader {
            kind: if zero {
                RecordKind::Zero
            } else {
                RecordKind::Data
            },
            flags: 0,
            log_id: LOG,
            seq,
            lun: 0,
            partition: 0,
            offset,
            len,
            data_len: data.len() as u32,
            acked_through: seq - 1,
            data_crc: crc32c::crc32c(&data),
        };
        (h, data)
    }

    proptest! {
        /// Writes logged in order, consistency points at arbitrary seqs (some of them
        /// repeated after a crash before the log was started again): after each one the
        /// image equals the volume the writes made through that seq.
        #[test]
        fn the_image_equals_the_volume_at_each_consistency_point(
            writes in proptest::collection::vec((0u64..60, 1u32..8, any::<u8>(), any::<bool>()), 1..60),
            points in proptest::collection::vec(0usize..60, 1..6),
            crash_before_rotate in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let log_path = dir.path().join("p0.log");
            let image_path = dir.path().join("image");
            let image = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&image_path)
                .expect("image");
            image.set_len(IMAGE).expect("size");
            let recs: Vec<_> = writes.iter().enumerate().map(|(i, &(block, blocks, fill, zero))| {
                write(i as u64 + 1, block * 512, blocks * 512, fill, zero)
            }).collect();
            let mut log = LogFile::create(&log_path, LOG, 0, 1).expect("create");
            let refs: Vec<_> = recs.iter().map(|(h, d)| (*h, &d[..])).collect();
            log.append(&refs).expect("append");
            log.sync().expect("sync");

            let mut points: Vec<u64> = points.iter().map(|&p| (p % recs.len()) as u64 + 1).collect();
            points.sort_unstable();
            points.dedup();
            let mut model = vec![0u8; IMAGE as usize];
            let mut modelled = 0u64;
            for through in points {
                if crash_before_rotate {
                    // Applied and synced, then a crash: the old log file is still there and
                    // is applied again from its start.
                    let (_, _) = consistency_point(
                        LogFile::open(&log_path).expect("reopen").log,
                        &dir.path().join("scratch.log"), &image, &image_path, IMAGE, through,
                    ).expect("apply");
                    std::fs::remove_file(dir.path().join("scratch.log")).expect("rm");
                }
                let (next, applied) = consistency_point(log, &log_path, &image, &image_path, IMAGE, through)
                    .expect("consistency point");
                log = next;
                for (h, d) in &recs[modelled as usize..through as usize] {
                    let span = h.offset as usize..(h.offset + h.len as u64) as usize;
                    match h.kind {
                        RecordKind::Zero => model[span].fill(0),
                        _ => model[span].copy_from_slice(d),
                    }
                }
                prop_assert_eq!(applied.records, through - modelled);
                prop_assert_eq!(applied.carried, recs.len() as u64 - through);
                modelled = through;
                let mut got = vec![0u8; IMAGE as usize];
                image.read_exact_at(&mut got, 0).expect("read image");
                prop_assert!(got == model, "image differs from the volume at seq {}", through);
                let reopened = LogFile::open(&log_path).expect("reopen");
                prop_assert_eq!(reopened.log.first_seq(), through + 1);
                prop_assert_eq!(reopened.log.next_seq(), recs.len() as u64 + 1);
            }
        }
    }

    #[test]
    fn a_point_beyond_the_log_or_a_write_beyond_the_image_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("p0.log");
        let image_path = dir.path().join("image");
        let image = File::create(&image_path).expect("image");
        let mut log = LogFile::create(&log_path, LOG, 0, 1).expect("create");
        let (h, d) = write(1, IMAGE - 512, 1024, 1, false);
        log.append(&[(h, &d[..])]).expect("append");
        let log = match consistency_point(log, &log_path, &image, &image_path, IMAGE, 2) {
            Err(ImageError::NotLoggedYet {
                through: 2,
                first: 1,
                last: 1,
            }) => LogFile::open(&log_path).expect("reopen").log,
            other => panic!("a point beyond the log: {other:?}"),
        };
        assert!(matches!(
            consistency_point(log, &log_path, &image, &image_path, IMAGE, 1),
            Err(ImageError::BeyondImage { seq: 1, .. })
        ));
    }
}
