//! `nvmirrorctl export --source NAME` on the destination (claim set C, step 4): the source
//! is gone, so its volume is rebuilt from its log files: every record of every partition,
//! in sequence order, applied to an image per LUN (`DIR/SOURCE/lunN.img`), which is then
//! synced. Partitions hold disjoint LUN ranges (a range stages in exactly one partition),
//! so applying them one after the other keeps every block's writes in their order.
//!
//! The image starts from zeros: it is the source's volume only if the files hold its whole
//! history, from seq 1 of its log, without a gap. Otherwise export refuses, naming what is
//! missing (`force` applies what there is and lists it).

use super::log_file::{LogFile, LogFileError};
use crate::nvram::record::RecordKind;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Log(#[from] LogFileError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir} holds no log file: nothing of this source was ever logged")]
    Empty { dir: PathBuf },
    #[error(
        "the log files do not hold the source's whole history, so an image built from them \
         would not be its volume: {}. Add --force to build it anyway from what there is",
        .missing.join("; ")
    )]
    Incomplete { missing: Vec<String> },
    #[error(
        "{path} exists (exported before?): move it away, or add --force to build it again \
         (whatever was written to it since is lost)"
    )]
    ImageExists { path: PathBuf },
}

/// One LUN's image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportedImage {
    pub lun: u32,
    pub path: String,
    pub bytes: u64,
    pub records: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportReport {
    pub source: String,
    pub images: Vec<ExportedImage>,
    /// Log files applied.
    pub files: usize,
    /// What the files lack (only with `force`; export refuses otherwise).
    pub missing: Vec<String>,
    /// Seqs that never reached the destination and were in flight when the source died:
    /// never acknowledged (with `degraded = "nvram"`, possibly acknowledged by the source
    /// alone). Not a reason to refuse.
    #[serde(default)]
    pub unacknowledged: Vec<String>,
}

/// One log file, known by its name (`log_writer::segment_path`).
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    partition: u32,
    log_id: u64,
    first_seq: u64,
}

fn parse_name(path: &Path) -> Option<Segment> {
    let name = path.file_name()?.to_str()?.strip_suffix(".log")?;
    let mut parts = name.strip_prefix('p')?.split('-');
    let partition = parts.next()?.parse().ok()?;
    let log_id = u64::from_str_radix(parts.next()?, 16).ok()?;
    let first_seq = parts.next()?.parse().ok()?;
    parts.next().is_none().then(|| Segment {
        path: path.to_owned(),
        partition,
        log_id,
        first_seq,
    })
}

/// Builds the images of the source whose log files are in `dir` (see the module doc).
/// `size`: each image's length at least (the source's LUN size); without it, an image ends
/// after its last write. `in_flight`: (partition, first, last) seqs skipped because the
/// source died with them in flight (`SourceLogs::log_everything_held`): such a gap is
/// reported, not refused.
pub fn export(
    dir: &Path,
    source: &str,
    size: Option<u64>,
    force: bool,
    in_flight: &[(u32, u64, u64)],
) -> Result<ExportReport, ExportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ExportError::Io { path, source }
    };
    let mut segments: Vec<Segment> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_name(&e.path()))
        .collect();
    if segments.is_empty() {
        return Err(ExportError::Empty {
            dir: dir.to_owned(),
        });
    }
    segments.sort_by_key(|s| (s.partition, s.first_seq));
    let mut logs: Vec<u64> = segments.iter().map(|s| s.log_id).collect();
    logs.sort_unstable();
    logs.dedup();
    let mut missing = Vec::new();
    let mut unacknowledged = Vec::new();
    if logs.len() > 1 {
        missing.push(format!(
            "the source formatted its NVRAM while shipping (logs {}): which came first is not recorded",
            logs.iter()
                .map(|l| format!("{l:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Open every file (a torn last append is cut off) and check the seqs run on.
    let mut opened: BTreeMap<u32, Vec<LogFile>> = BTreeMap::new();
    for s in &segments {
        let log = LogFile::open(&s.path)?.log;
        let list = opened.entry(s.partition).or_default();
        let expected = list.last().map_or(1, |prev: &LogFile| prev.next_seq());
        let skipped_at_death =
            in_flight.contains(&(s.partition, expected, log.first_seq().wrapping_sub(1)));
        if log.first_seq() != expected && skipped_at_death {
            unacknowledged.push(format!(
                "partition {}: seqs {}..{}",
                s.partition,
                expected,
                log.first_seq() - 1
            ));
        } else if log.first_seq() != expected && logs.len() == 1 {
            missing.push(match list.last() {
                None => format!(
                    "partition {}: the files start at seq {}, not 1 (shipping began after the source's first writes)",
                    s.partition,
                    log.first_seq()
                ),
                Some(_) => format!(
                    "partition {}: seqs {}..{} (a gap: the destination was away while the source flushed them)",
                    s.partition,
                    expected,
                    log.first_seq() - 1
                ),
            });
        }
        list.push(log);
    }
    if !missing.is_empty() && !force {
        return Err(ExportError::Incomplete { missing });
    }
    let mut images: BTreeMap<u32, (PathBuf, File, ExportedImage)> = BTreeMap::new();
    for log in opened.values().flatten() {
        for r in log.read_all()? {
            let h = r.header;
            let zero;
            let data: &[u8] = match h.kind {
                RecordKind::Data => &r.data,
                RecordKind::Zero => {
                    zero = vec![0u8; h.len as usize];
                    &zero
                }
                // Markers and voids write nothing (a source has no partner whose ranges
                // it could lose, so it writes no voids).
                RecordKind::Wrap | RecordKind::Void => continue,
            };
            let (path, file, image) = match images.entry(h.lun) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let path = dir.join(format!("lun{}.img", h.lun));
                    if path.exists() && !force {
                        return Err(ExportError::ImageExists { path });
                    }
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&path)
                        .map_err(io(&path))?;
                    let image = ExportedImage {
                        lun: h.lun,
                        path: path.display().to_string(),
                        bytes: 0,
                        records: 0,
                    };
                    v.insert((path, file, image))
                }
            };
            file.write_all_at(data, h.offset).map_err(io(path))?;
            image.records += 1;
            image.bytes += data.len() as u64;
        }
    }
    let mut report = ExportReport {
        source: source.to_owned(),
        images: Vec::new(),
        files: segments.len(),
        missing,
        unacknowledged,
    };
    for (_, (path, file, image)) in images {
        if let Some(size) = size {
            let len = file.metadata().map_err(io(&path))?.len();
            if len < size {
                file.set_len(size).map_err(io(&path))?;
            }
        }
        file.sync_all().map_err(io(&path))?;
        report.images.push(image);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::record::RecordHeader;
    use crate::shipping::log_writer::segment_path;

    const LOG: u64 = 0x5eed;

    fn record(
        partition: u32,
        seq: u64,
        kind: RecordKind,
        offset: u64,
        fill: u8,
    ) -> (RecordHeader, Vec<u8>) {
        let data = if kind == RecordKind::Data {
            vec![fill; 4096]
        } else {
            Vec::new()
        };
        let h = RecordHeader {
            kind,
            flags: 0,
            log_id: LOG,
            seq,
            lun: 0,
            partition,
            offset,
            len: if kind == RecordKind::Wrap { 0 } else { 4096 },
            data_len: data.len() as u32,
            acked_through: 0,
            data_crc: crc32c::crc32c(&data),
        };
        (h, data)
    }

    fn file(dir: &Path, partition: u32, first: u64, recs: &[(RecordHeader, Vec<u8>)]) {
        let mut log = LogFile::create(
            &segment_path(dir, partition, LOG, first),
            LOG,
            partition,
            first,
        )
        .expect("create");
        let refs: Vec<(RecordHeader, &[u8])> = recs.iter().map(|(h, d)| (*h, &d[..])).collect();
        log.append(&refs).expect("append");
        log.sync().expect("sync");
    }

    fn block(image: &Path, offset: u64) -> Vec<u8> {
        let f = File::open(image).expect("image");
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, offset).expect("read");
        b
    }

    #[test]
    fn the_image_holds_every_logged_write_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // Partition 0: block 0 written twice, then zeroed block 1; a wrap marker between.
        file(
            d,
            0,
            1,
            &[
                record(0, 1, RecordKind::Data, 0, 1),
                record(0, 2, RecordKind::Data, 4096, 2),
                record(0, 3, RecordKind::Wrap, 0, 0),
            ],
        );
        file(
            d,
            0,
            4,
            &[
                record(0, 4, RecordKind::Data, 0, 4),
                record(0, 5, RecordKind::Zero, 4096, 0),
            ],
        );
        file(d, 1, 1, &[record(1, 1, RecordKind::Data, 1 << 20, 9)]);
        let r = export(d, "src", Some(2 << 20), false, &[]).expect("export");
        assert_eq!(r.files, 3);
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].records, 5);
        let img = d.join("lun0.img");
        assert_eq!(block(&img, 0), vec![4; 4096]);
        assert_eq!(block(&img, 4096), vec![0; 4096]);
        assert_eq!(block(&img, 1 << 20), vec![9; 4096]);
        assert_eq!(std::fs::metadata(&img).expect("meta").len(), 2 << 20);
        // Again: refused, the image exists.
        let e = export(d, "src", None, false, &[]).expect_err("exists");
        assert!(e.to_string().contains("exported before"), "{e}");
    }

    #[test]
    fn a_gap_or_a_late_start_is_refused_naming_the_seqs_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        file(d, 0, 1, &[record(0, 1, RecordKind::Data, 0, 1)]);
        file(d, 0, 5, &[record(0, 5, RecordKind::Data, 0, 5)]);
        file(d, 1, 3, &[record(1, 3, RecordKind::Data, 8192, 3)]);
        // A gap the source's death made (writes in flight) is reported, not refused.
        let r = export(d, "src", None, false, &[(0, 2, 4), (1, 1, 2)]).expect("in flight");
        assert_eq!(r.unacknowledged.len(), 2, "{r:?}");
        std::fs::remove_file(d.join("lun0.img")).expect("rm");
        let e = export(d, "src", None, false, &[])
            .expect_err("gap")
            .to_string();
        assert!(e.contains("partition 0: seqs 2..4 (a gap"), "{e}");
        assert!(
            e.contains("partition 1: the files start at seq 3, not 1"),
            "{e}"
        );
        let r = export(d, "src", None, true, &[]).expect("forced");
        assert_eq!(r.missing.len(), 2);
        assert_eq!(block(&d.join("lun0.img"), 0), vec![5; 4096]);
    }
}
