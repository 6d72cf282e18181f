//! Consistency points on the destination (claim set C, step 3; claims 1, 3, 15, 22, 23):
//! every log file of a source partition is applied, in sequence order, to the destination's
//! images of the source's LUNs (`DIR/SOURCE/lunN.img`), the images are synced, what was
//! applied is recorded (`DIR/SOURCE/images.json`), and only then are the files removed.
//! The log files so hold only what came after the last consistency point.
//!
//! Partitions hold disjoint LUN ranges (a range stages in exactly one partition), so each
//! partition's records can be applied on their own: after a point of partition p, the
//! images' ranges of p equal the source's volume as its writes through that seq made it.
//!
//! A crash anywhere is safe. Before the record of what was applied is replaced, applying
//! the same files again from their start rewrites the same blocks in the same order (a
//! suffix of an ordered sequence of writes, replayed over its own result, ends in the same
//! state); after it, the records it covers are skipped and their files removed.
//!
//! The images start from zeros: they equal the source's volume only if the files held its
//! whole history (from seq 1 of its log, without a gap). What they lack is recorded with
//! the partition (`missing`): export refuses such images unless forced.

use super::log_file::{LogFile, LogFileError};
use crate::nvram::record::RecordKind;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The record of what the images hold, in the source's log directory.
pub const STATE_FILE: &str = "images.json";
const STATE_VERSION: u32 = 1;

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
        "{path} is not a record of nvmirror images ({why}); move it away to start the images \
         again from the log files (they then lack what earlier consistency points applied)"
    )]
    BadState { path: PathBuf, why: String },
    #[error("{path}: seq {seq} writes {len} bytes at {offset}, past the largest file offset")]
    BeyondImage {
        path: PathBuf,
        seq: u64,
        offset: u64,
        len: u64,
    },
}

/// What the images hold of one source partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionImage {
    /// The source log the images follow in this partition, and its last seq applied.
    pub log_id: Option<u64>,
    pub applied_through: u64,
    /// Logs applied to their end before the source went on with a newer one (it formatted
    /// its NVRAM): a file of theirs found later is removed, not applied again.
    #[serde(default)]
    pub finished_logs: Vec<u64>,
    pub points: u64,
    pub applied_records: u64,
    pub applied_bytes: u64,
    /// Unix seconds of the last consistency point.
    pub last_point_unix: u64,
    /// Writes the images never got, so they are not the source's volume.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// What the images of one source hold (`images.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageState {
    pub version: u32,
    pub partitions: BTreeMap<u32, PartitionImage>,
    /// Unix seconds of the export: from then on whoever serves the images writes them.
    #[serde(default)]
    pub exported_unix: Option<u64>,
    /// Unix seconds of `nvmirrorctl return-image`: the source, when it next connects,
    /// copies what differs from the images onto its medium and ships again.
    #[serde(default)]
    pub returning_unix: Option<u64>,
}

impl ImageState {
    /// The record in `dir`, or an empty one if there is none yet.
    pub fn load(dir: &Path) -> Result<ImageState, ImageError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ImageState {
                    version: STATE_VERSION,
                    ..ImageState::default()
                })
            }
            Err(source) => return Err(ImageError::Io { path, source }),
        };
        let state: ImageState =
            serde_json::from_slice(&text).map_err(|e| ImageError::BadState {
                path: path.clone(),
                why: e.to_string(),
            })?;
        if state.version != STATE_VERSION {
            return Err(ImageError::BadState {
                path,
                why: format!(
                    "version {}, this nvmirror knows {STATE_VERSION}",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Replaces the record in `dir` durably (a new file renamed over the old one).
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.next"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| ImageError::BadState {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let io = |p: &Path| {
            let path = p.to_owned();
            move |source| ImageError::Io { path, source }
        };
        let f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all_at(&text, 0)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)
    }

    /// Every partition's missing writes, named.
    pub fn missing(&self) -> Vec<String> {
        self.partitions
            .iter()
            .flat_map(|(p, x)| x.missing.iter().map(move |m| format!("partition {p}: {m}")))
            .collect()
    }
}

/// What one consistency point of one partition did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub partition: u32,
    /// The source log and seq the partition's images now hold the writes through.
    pub log_id: Option<u64>,
    pub applied_through: u64,
    pub records: u64,
    pub bytes: u64,
    /// Log files applied and removed.
    pub files: usize,
    /// Seqs skipped because the source died with them in flight (export only).
    #[serde(default)]
    pub unacknowledged: Vec<String>,
}

/// One log file, known by its name (`log_file::segment_path`).
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub partition: u32,
    pub log_id: u64,
    pub first_seq: u64,
}

fn parse_segment_name(path: &Path) -> Option<Segment> {
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

/// The log files in `dir` (of `partition` only, if given), by partition, log, first seq.
pub fn list_segments(dir: &Path, partition: Option<u32>) -> Result<Vec<Segment>, ImageError> {
    let mut segments: Vec<Segment> = std::fs::read_dir(dir)
        .map_err(|source| ImageError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_segment_name(&e.path()))
        .filter(|s| partition.is_none_or(|p| s.partition == p))
        .collect();
    segments.sort_by_key(|s| (s.partition, s.log_id, s.first_seq));
    Ok(segments)
}

/// The image of LUN `lun` of the source whose directory is `dir`.
pub fn image_path(dir: &Path, lun: u32) -> PathBuf {
    dir.join(format!("lun{lun}.img"))
}

/// The length of the image of LUN `lun` (an error if the export made none).
pub fn image_len(dir: &Path, lun: u32) -> Result<u64, String> {
    let path = image_path(dir, lun);
    std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "there is no image of LUN {lun} ({}): the export made none",
                path.display()
            ),
            _ => format!("reading the length of {}: {e}", path.display()),
        })
}

/// The most one [`read_image`] reads (a request's worth).
pub const READ_IMAGE_MAX: usize = 1 << 20;

/// `len` bytes (1 to [`READ_IMAGE_MAX`]) of the image of LUN `lun` at `offset`, for a source
/// taking its volume back (zeros beyond the image's end: an image is as long as its last
/// write, or `export --size`). Err for a LUN without an image (it was never exported: taken
/// as zeros it would wipe the source's medium) and for a span that does not fit.
pub fn read_image(dir: &Path, lun: u32, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let path = image_path(dir, lun);
    if len == 0
        || len > READ_IMAGE_MAX
        || offset
            .checked_add(len as u64)
            .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(format!("an image span of {len} bytes at {offset} (1 to {READ_IMAGE_MAX} bytes, inside the image)"));
    }
    let file = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "there is no image of LUN {lun} ({}): the export made none",
            path.display()
        ),
        _ => format!("opening {}: {e}", path.display()),
    })?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| {
                format!(
                    "reading {} at {}: {e}",
                    path.display(),
                    offset + done as u64
                )
            })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}

/// Zeroes `len` bytes at `offset` (a zero record may cover up to a GiB: written in pieces).
fn write_zeroes(image: &File, offset: u64, len: u64) -> std::io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = PIECE.min(len - done);
        image.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// A consistency point of partition `p` (see the module doc): every log file of it in
/// `dir` is applied to the images, in order, then the images are synced, `state` is saved,
/// and the files are removed. No file of `p` may be appended to meanwhile (the writer
/// closes its file first). `current_log`: the source log the writer appends now (files of
/// another log are older). `released`: the seq through which the current log's records
/// left the destination's NVRAM (logged, or skipped as never coming): what the files lack
/// of it is missing. `in_flight`: (partition, first, last) seqs skipped because the source
/// died with them in flight: reported, not counted as missing, unless a later record says
/// the source had acknowledged them.
pub fn consistency_point(
    dir: &Path,
    state: &mut ImageState,
    p: u32,
    current_log: Option<u64>,
    released: u64,
    in_flight: &[(u32, u64, u64)],
) -> Result<Point, ImageError> {
    let segments = list_segments(dir, Some(p))?;
    let mut part = state.partitions.get(&p).cloned().unwrap_or_default();
    let mut point = Point {
        partition: p,
        log_id: part.log_id,
        applied_through: part.applied_through,
        ..Point::default()
    };
    let end_gap =
        current_log.is_some_and(|c| part.log_id == Some(c) && released > part.applied_through);
    if segments.is_empty() && !end_gap {
        return Ok(point);
    }
    // The order of the logs: the one the images follow, then older ones, then the current.
    let mut logs: Vec<u64> = segments.iter().map(|s| s.log_id).collect();
    logs.dedup();
    let mut order: Vec<u64> = Vec::new();
    if let Some(l) = part.log_id.filter(|l| logs.contains(l)) {
        order.push(l);
    }
    let others: Vec<u64> = logs
        .iter()
        .copied()
        .filter(|l| Some(*l) != part.log_id && Some(*l) != current_log)
        .filter(|l| !part.finished_logs.contains(l))
        .collect();
    if others.len() > 1 {
        part.missing.push(format!(
            "the source formatted its NVRAM more than once between consistency points (logs {}): \
             their order is not recorded, so they were applied in an arbitrary one",
            others
                .iter()
                .map(|l| format!("{l:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    order.extend(others);
    if let Some(c) = current_log.filter(|c| logs.contains(c) && !order.contains(c)) {
        order.push(c);
    }

    let mut images: BTreeMap<u32, File> = BTreeMap::new();
    let mut created = false;
    for log in order {
        // The images follow no log yet: their first record must be seq 1 of it.
        let mut first_ever = false;
        let mut expected = if part.log_id == Some(log) {
            part.applied_through + 1
        } else {
            // A newer log: the one the images followed is done.
            if let Some(prev) = part.log_id {
                part.finished_logs.push(prev);
            }
            first_ever = part.log_id.is_none();
            part.log_id = Some(log);
            part.applied_through = 0;
            1
        };
        // Seqs skipped as in flight at the source's death: unacknowledged unless a later
        // record's acked_through covers them.
        let mut in_flight_here: Vec<(u64, u64)> = Vec::new();
        for seg in segments.iter().filter(|s| s.log_id == log) {
            let released_here = if Some(log) == current_log {
                released
            } else {
                u64::MAX
            };
            let opened = match LogFile::open_synced_through(&seg.path, released_here) {
                Err(LogFileError::NotALogFile { .. })
                    if std::fs::metadata(&seg.path).is_ok_and(|m| m.len() < 64) =>
                {
                    // Its creation was cut short: it never held a record.
                    tracing::warn!(file = %seg.path.display(), "a log file without a whole header (its creation was cut short) is skipped and removed");
                    continue;
                }
                other => other?,
            };
            if opened.torn_bytes > 0 {
                tracing::error!(
                    file = %seg.path.display(),
                    "a closed log file ended in {} damaged byte(s): the records there are missing from the images",
                    opened.torn_bytes
                );
            }
            let file = opened.log;
            point.files += 1;
            for r in file.read_all()? {
                let h = r.header;
                if h.seq < expected {
                    continue; // applied by an earlier point whose files outlived it
                }
                in_flight_here.retain(|&(first, last)| {
                    let acknowledged = h.acked_through >= first;
                    if acknowledged {
                        part.missing.push(format!(
                            "seqs {first}..{last} of log {log:016x}: acknowledged by the source (seq {} says so) but never logged here",
                            h.seq
                        ));
                    }
                    !acknowledged
                });
                if h.seq > expected {
                    if in_flight.contains(&(p, expected, h.seq - 1)) {
                        in_flight_here.push((expected, h.seq - 1));
                    } else if first_ever && expected == 1 {
                        part.missing.push(format!(
                            "seqs 1..{} of log {log:016x}: shipping began after the source's first writes",
                            h.seq - 1
                        ));
                    } else {
                        part.missing.push(format!(
                            "seqs {expected}..{} of log {log:016x} never reached the destination \
                             (it was away while the source flushed them)",
                            h.seq - 1
                        ));
                    }
                }
                first_ever = false;
                expected = h.seq + 1;
                part.applied_through = h.seq;
                let data: Option<&[u8]> = match h.kind {
                    RecordKind::Data => Some(&r.data),
                    RecordKind::Zero => None,
                    // Markers and voids write nothing (a source has no partner whose
                    // ranges it could lose, so it writes no voids).
                    RecordKind::Wrap | RecordKind::Void => continue,
                };
                let path = image_path(dir, h.lun);
                if h.offset
                    .checked_add(h.len as u64)
                    .is_none_or(|end| end > i64::MAX as u64)
                {
                    return Err(ImageError::BeyondImage {
                        path,
                        seq: h.seq,
                        offset: h.offset,
                        len: h.len as u64,
                    });
                }
                let image = match images.entry(h.lun) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        created |= !path.exists();
                        let f = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&path)
                            .map_err(|source| ImageError::Io {
                                path: path.clone(),
                                source,
                            })?;
                        v.insert(f)
                    }
                };
                match data {
                    Some(data) => image.write_all_at(data, h.offset),
                    None => write_zeroes(image, h.offset, h.len as u64),
                }
                .map_err(|source| ImageError::Io { path, source })?;
                point.records += 1;
                point.bytes += h.len as u64;
            }
        }
        point.unacknowledged.extend(
            in_flight_here
                .iter()
                .map(|(first, last)| format!("partition {p}: seqs {first}..{last}")),
        );
    }
    // Seqs that left the NVRAM without reaching a file, after everything the files hold.
    if let Some(log) = current_log.filter(|&c| part.log_id == Some(c)) {
        if released > part.applied_through {
            let first = part.applied_through + 1;
            if in_flight.contains(&(p, first, released)) {
                point
                    .unacknowledged
                    .push(format!("partition {p}: seqs {first}..{released}"));
            } else {
                part.missing.push(format!(
                    "seqs {first}..{released} of log {log:016x} never reached the destination's log files"
                ));
            }
            part.applied_through = released;
        }
    }
    for (lun, image) in &images {
        image.sync_data().map_err(|source| ImageError::Io {
            path: image_path(dir, *lun),
            source,
        })?;
    }
    if created {
        sync_dir(dir)?;
    }
    part.points += 1;
    part.applied_records += point.records;
    part.applied_bytes += point.bytes;
    part.last_point_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    point.log_id = part.log_id;
    point.applied_through = part.applied_through;
    let mut next = state.clone();
    next.partitions.insert(p, part);
    next.save(dir)?;
    *state = next;
    for seg in &segments {
        std::fs::remove_file(&seg.path).map_err(|source| ImageError::Io {
            path: seg.path.clone(),
            source,
        })?;
    }
    sync_dir(dir)?;
    Ok(point)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::record::RecordHeader;
    use crate::shipping::log_file::segment_path;
    use proptest::prelude::*;

    const LOG: u64 = 0xabc;
    const IMAGE: usize = 64 << 10;

    #[test]
    fn an_image_reads_as_written_then_zeros_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = super::read_image(dir.path(), 0, 0, 4096).expect_err("no image");
        assert!(e.contains("no image of LUN 0"), "{e}");
        std::fs::write(image_path(dir.path(), 0), [7u8; 6000]).expect("image");
        let got = super::read_image(dir.path(), 0, 4096, 4096).expect("read");
        assert_eq!(&got[..1904], &[7u8; 1904][..]);
        assert!(got[1904..].iter().all(|&b| b == 0), "zeros past the end");
        for (offset, len) in [(0, 0), (0, READ_IMAGE_MAX + 1), (u64::MAX - 10, 4096)] {
            let e = super::read_image(dir.path(), 0, offset, len).expect_err("a bad span");
            assert!(e.contains("image span"), "{e}");
        }
    }

    fn write(
        seq: u64,
        offset: u64,
        len: u32,
        fill: u8,
        kind: RecordKind,
    ) -> (RecordHeader, Vec<u8>) {
        let data = if kind == RecordKind::Data {
            vec![fill; len as usize]
        } else {
            Vec::new()
        };
        let h = RecordHeader {
            kind,
            len: if kind == RecordKind::Wrap { 0 } else { len },
            acked_through: seq - 1,
            ..RecordHeader::test_data(LOG, 0, seq, offset, &data)
        };
        (h, data)
    }

    fn log_segment(dir: &Path, recs: &[(RecordHeader, Vec<u8>)]) {
        let Some((first, _)) = recs.first() else {
            return;
        };
        let mut f = LogFile::create(&segment_path(dir, 0, LOG, first.seq), LOG, 0, first.seq)
            .expect("create");
        let refs: Vec<_> = recs.iter().map(|(h, d)| (*h, &d[..])).collect();
        f.append(&refs).expect("append");
        f.sync().expect("sync");
    }

    /// A consistency point of partition 0 whose files come back afterwards (a crash before
    /// their removal was durable).
    fn point_leaving_the_files(dir: &Path, state: &mut ImageState, released: u64) {
        let kept: Vec<_> = list_segments(dir, Some(0))
            .expect("list")
            .iter()
            .map(|s| {
                let copy = s.path.with_extension("keep");
                std::fs::copy(&s.path, &copy).expect("copy");
                (copy, s.path.clone())
            })
            .collect();
        consistency_point(dir, state, 0, Some(LOG), released, &[]).expect("point");
        for (copy, path) in kept {
            std::fs::rename(copy, path).expect("put back");
        }
    }

    fn read_image(dir: &Path) -> Vec<u8> {
        let mut got = std::fs::read(image_path(dir, 0)).unwrap_or_default();
        got.resize(IMAGE, 0);
        got
    }

    proptest! {
        /// Writes logged in segments, consistency points after some of them (some repeated
        /// after a crash that left the applied files in place, some after a crash before
        /// the record was saved): after each one the image equals the volume the writes
        /// made through that seq, and the files are gone.
        #[test]
        fn the_image_equals_the_volume_at_each_consistency_point(
            writes in proptest::collection::vec((0u64..60, 1u32..8, any::<u8>(), 0u8..8), 1..60),
            cuts in proptest::collection::vec(0usize..60, 1..6),
            crash in 0u8..3,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let recs: Vec<_> = writes.iter().enumerate().map(|(i, &(block, blocks, fill, k))| {
                let kind = match k { 0 => RecordKind::Zero, 1 => RecordKind::Wrap, _ => RecordKind::Data };
                write(i as u64 + 1, block * 512, blocks * 512, fill, kind)
            }).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % recs.len() + 1).collect();
            cuts.push(recs.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut state = ImageState::load(dir.path()).expect("load");
            let mut model = vec![0u8; IMAGE];
            let mut done = 0usize;
            for cut in cuts {
                log_segment(dir.path(), &recs[done..cut]);
                match crash {
                    // The point ran, then a crash before its files were removed: they are
                    // found again next time and skipped.
                    1 => point_leaving_the_files(dir.path(), &mut state, cut as u64),
                    // Applied and synced, then a crash before the record was saved: the
                    // files are applied again from the old record.
                    2 => point_leaving_the_files(dir.path(), &mut state.clone(), cut as u64),
                    _ => {}
                }
                let point = consistency_point(dir.path(), &mut state, 0, Some(LOG), cut as u64, &[]).expect("point");
                for (h, d) in &recs[done..cut] {
                    let span = h.offset as usize..(h.offset + h.len as u64) as usize;
                    match h.kind {
                        RecordKind::Zero => model[span].fill(0),
                        RecordKind::Data => model[span].copy_from_slice(d),
                        _ => {}
                    }
                }
                if crash != 1 {
                    let expected = recs[done..cut].iter().filter(|(h, _)| h.kind != RecordKind::Wrap).count();
                    prop_assert_eq!(point.records, expected as u64);
                }
                prop_assert_eq!(point.applied_through, cut as u64);
                done = cut;
                prop_assert!(read_image(dir.path()) == model, "image differs from the volume at seq {}", cut);
                prop_assert!(list_segments(dir.path(), None).expect("list").is_empty());
                prop_assert_eq!(&ImageState::load(dir.path()).expect("reload"), &state);
                prop_assert!(state.missing().is_empty());
            }
        }
    }

    #[test]
    fn a_gap_and_a_late_start_are_recorded_as_missing_and_in_flight_seqs_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recs: Vec<_> = (1..=10)
            .map(|s| write(s, s * 512, 512, s as u8, RecordKind::Data))
            .collect();
        // Shipping began at seq 3.
        log_segment(dir.path(), &recs[2..5]);
        let mut state = ImageState::load(dir.path()).expect("load");
        consistency_point(dir.path(), &mut state, 0, Some(LOG), 5, &[]).expect("point");
        assert_eq!(state.missing().len(), 1, "{:?}", state.missing());
        assert!(
            state.missing()[0].contains("seqs 1..2"),
            "{:?}",
            state.missing()
        );
        // Seqs 6..7 never arrived, 9 was in flight when the source died.
        log_segment(dir.path(), &recs[7..8]);
        log_segment(dir.path(), &recs[9..10]);
        let point = consistency_point(dir.path(), &mut state, 0, Some(LOG), 10, &[(0, 9, 9)])
            .expect("point");
        assert_eq!(point.applied_through, 10);
        assert_eq!(
            point.unacknowledged,
            vec!["partition 0: seqs 9..9".to_string()]
        );
        let missing = state.missing();
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[1].contains("seqs 6..7"), "{missing:?}");
    }

    #[test]
    fn acknowledged_writes_never_logged_are_missing_even_when_the_source_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut recs: Vec<_> = (1..=10)
            .map(|s| write(s, s * 512, 512, s as u8, RecordKind::Data))
            .collect();
        // Seq 8 says every record through 5 was acknowledged: the skipped 4..5 were not
        // merely in flight (the source ran degraded and acknowledged them alone).
        recs[7].0.acked_through = 5;
        recs[7].0.data_crc = rdma_link::checksum::crc32c(&recs[7].1);
        log_segment(dir.path(), &recs[0..3]);
        log_segment(dir.path(), &recs[5..8]);
        let mut state = ImageState::default();
        // Released through 10: 9..10 left the NVRAM without reaching a file.
        let point = consistency_point(dir.path(), &mut state, 0, Some(LOG), 10, &[(0, 4, 5)])
            .expect("point");
        assert!(point.unacknowledged.is_empty(), "{point:?}");
        let missing = state.missing();
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(
            missing[0].contains("seqs 4..5") && missing[0].contains("acknowledged"),
            "{missing:?}"
        );
        assert!(missing[1].contains("seqs 9..10"), "{missing:?}");
        assert_eq!(point.applied_through, 10);
        // Nothing new: the end gap is not reported twice.
        consistency_point(dir.path(), &mut state, 0, Some(LOG), 10, &[]).expect("point");
        assert_eq!(state.missing().len(), 2);
    }

    #[test]
    fn a_newer_log_follows_the_old_one_and_old_files_found_later_are_not_applied_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old: Vec<_> = (1..=3)
            .map(|s| write(s, 0, 512, 1, RecordKind::Data))
            .collect();
        log_segment(dir.path(), &old);
        let mut state = ImageState::load(dir.path()).expect("load");
        consistency_point(dir.path(), &mut state, 0, Some(LOG), 3, &[]).expect("point");
        // The source formatted its NVRAM: a new log from seq 1.
        const NEW: u64 = 0xdef;
        let (mut h, d) = write(1, 0, 512, 2, RecordKind::Data);
        h.log_id = NEW;
        let mut f =
            LogFile::create(&segment_path(dir.path(), 0, NEW, 1), NEW, 0, 1).expect("create");
        f.append(&[(h, &d[..])]).expect("append");
        f.sync().expect("sync");
        drop(f);
        consistency_point(dir.path(), &mut state, 0, Some(NEW), 1, &[]).expect("point");
        assert_eq!(read_image(dir.path())[0], 2);
        assert!(state.missing().is_empty(), "{:?}", state.missing());
        // A file of the old log turns up again (a crash before its removal was durable).
        log_segment(dir.path(), &old);
        consistency_point(dir.path(), &mut state, 0, Some(NEW), 1, &[]).expect("point");
        assert_eq!(
            read_image(dir.path())[0],
            2,
            "the old log was applied again"
        );
        assert!(list_segments(dir.path(), None).expect("list").is_empty());
    }

    #[test]
    fn a_damaged_record_file_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").expect("write");
        let e = ImageState::load(dir.path()).expect_err("garbage accepted");
        assert!(e.to_string().contains("move it away"), "{e}");
    }
}
