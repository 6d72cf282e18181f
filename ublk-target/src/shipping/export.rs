//! `nvmirrorctl export --source NAME` on the destination (claim set C, step 4): the source
//! is gone, so its volume is what the destination's images of it hold (`shipping::image`),
//! brought up to date: every record the source's NVRAM area still holds goes to the log
//! files, and a last consistency point applies the files to the images (`DIR/SOURCE/lunN.img`),
//! which are synced and from then on are the source's LUNs.
//!
//! The images start from zeros: they are the source's volume only if they got its whole
//! history, from seq 1 of its log, without a gap. Otherwise export refuses, naming what is
//! missing (`force` exports what there is and lists it). Writes in flight when the source
//! died (never acknowledged) are reported, not counted as missing.

use super::image::{image_path, ImageState, Point};
use super::log_writer::SourceLogs;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] super::image::ImageError),
    #[error("{0}")]
    NotLogged(String),
    #[error("{dir} holds no image and no log file: nothing of this source was ever logged")]
    Empty { dir: PathBuf },
    #[error(
        "the images do not hold the source's whole history, so they are not its volume: {}. \
         They hold every write the destination got (its log files are applied); add --force \
         to export them anyway",
        .missing.join("; ")
    )]
    Incomplete { missing: Vec<String> },
    #[error(
        "the images of this source were exported before (Unix time {at}) and may have been \
         written since; add --force to export them again as they are"
    )]
    Exported { at: u64 },
    #[error(
        "the images of this source are being given back (return-image at Unix time {at}): \
         the source takes its volume back at its next start, and serving the images as well \
         would let two nodes serve it. Wait until the source has taken it back (the \
         destination's status shows it shipping again), then export anew"
    )]
    Returning { at: u64 },
}

/// One LUN's image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportedImage {
    pub lun: u32,
    pub path: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportReport {
    pub source: String,
    pub images: Vec<ExportedImage>,
    /// Log files applied by the export's consistency point, and their records.
    pub files: usize,
    #[serde(default)]
    pub records: u64,
    /// Records applied to the images by every consistency point, this one included.
    #[serde(default)]
    pub applied_records: u64,
    /// What the images lack (only with `force`; export refuses otherwise).
    pub missing: Vec<String>,
    /// Seqs that never reached the destination and were in flight when the source died:
    /// never acknowledged (with `degraded = "nvram"`, possibly acknowledged by the source
    /// alone). Not a reason to refuse.
    #[serde(default)]
    pub unacknowledged: Vec<String>,
    /// A single-node config that serves the images as `/dev/ublkbN`
    /// (`nvmirrord --config PATH`).
    #[serde(default)]
    pub serve_config: Option<String>,
}

/// The serving node's NVRAM (a file next to the images; edit the config for real NVRAM).
const SERVE_NVRAM: &str = "64MiB";
/// The control socket of the node `serve.toml` describes (in the source's directory):
/// `return-image` refuses while it answers.
pub const SERVE_SOCKET: &str = "serve.sock";
/// The config `export` writes for the node serving the images, and that node's NVRAM.
pub const SERVE_CONFIG: &str = "serve.toml";
pub const SERVE_NVRAM_FILE: &str = "serve-nvram.img";

/// Exports the images of the source whose log files `logs` writes (see the module doc).
/// `size`: each image's length at least (the source's LUN size); without it, an image ends
/// after its last write. `timeout` bounds the wait for the NVRAM's records to be logged and
/// for the last consistency point.
pub fn export(
    logs: &SourceLogs,
    source: &str,
    size: Option<u64>,
    force: bool,
    timeout: Duration,
) -> Result<ExportReport, ExportError> {
    // Not even with `force`: once given back, the images are the source's to take.
    logs.not_being_returned()
        .map_err(|at| ExportError::Returning { at })?;
    let points = match logs.image_state().exported_unix {
        Some(at) if !force => return Err(ExportError::Exported { at }),
        // Again: the images as they are (they may have been written since), nothing applied.
        Some(_) => Vec::new(),
        None => {
            let in_flight = logs
                .log_everything_held(timeout)
                .map_err(ExportError::NotLogged)?;
            logs.checkpoint(in_flight, timeout)
                .map_err(ExportError::NotLogged)?
        }
    };
    let mut report = finish(
        logs.dir(),
        source,
        &logs.image_state(),
        &points,
        size,
        force,
    )?;
    logs.mark_exported()?;
    report.serve_config = Some(write_serve_config(logs.dir(), source, &report.images)?);
    Ok(report)
}

/// After the last consistency point: refuses images that lack part of the history (unless
/// `force`), sizes and syncs them, and reports.
fn finish(
    dir: &Path,
    source: &str,
    state: &ImageState,
    points: &[Point],
    size: Option<u64>,
    force: bool,
) -> Result<ExportReport, ExportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ExportError::Io { path, source }
    };
    if state.partitions.values().all(|p| p.log_id.is_none()) {
        return Err(ExportError::Empty {
            dir: dir.to_owned(),
        });
    }
    let missing = state.missing();
    if !missing.is_empty() && !force {
        return Err(ExportError::Incomplete { missing });
    }
    let mut report = ExportReport {
        source: source.to_owned(),
        files: points.iter().map(|p| p.files).sum(),
        records: points.iter().map(|p| p.records).sum(),
        applied_records: state.partitions.values().map(|p| p.applied_records).sum(),
        missing,
        unacknowledged: points
            .iter()
            .flat_map(|p| p.unacknowledged.clone())
            .collect(),
        ..ExportReport::default()
    };
    let mut luns: Vec<u32> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("lun")?.strip_suffix(".img")?.parse().ok()
        })
        .collect();
    luns.sort_unstable();
    for lun in luns {
        let path = image_path(dir, lun);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let len = file.metadata().map_err(io(&path))?.len();
        // A LUN is a whole number of 4 KiB blocks.
        let bytes = size.unwrap_or(0).max(len).next_multiple_of(4096);
        if bytes > len {
            file.set_len(bytes).map_err(io(&path))?;
        }
        file.sync_all().map_err(io(&path))?;
        report.images.push(ExportedImage {
            lun,
            path: path.display().to_string(),
            bytes,
        });
    }
    Ok(report)
}

/// Writes `DIR/serve.toml`: a single node serving each image as a LUN (the exported source
/// is then an ordinary single node), with its NVRAM in a file next to them. Returns its path.
fn write_serve_config(
    dir: &Path,
    source: &str,
    images: &[ExportedImage],
) -> Result<String, ExportError> {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let path = dir.join(SERVE_CONFIG);
    let mut text = format!(
        "# Written by `nvmirrorctl export --source {source}`: the source's LUNs, served by a\n\
         # single node from the images the destination kept of them. Start it with\n\
         #   nvmirrord --config {}\n\
         # (the NVRAM below is a file: for a node that keeps running, put it on real NVRAM).\n\n\
         [node]\nname = {}\ncontrol_socket = {}\n\n[nvram]\npath = {}\nsize = \"{SERVE_NVRAM}\"\npartitions = 4\n",
        path.display(),
        quote(&format!("{source}-image")),
        quote(&dir.join(SERVE_SOCKET).display().to_string()),
        quote(&dir.join(SERVE_NVRAM_FILE).display().to_string()),
    );
    for image in images {
        text.push_str(&format!(
            "\n[[lun]]\nname = {}\nmedium = {}\n",
            quote(&format!("{source}-lun{}", image.lun)),
            quote(&image.path)
        ));
    }
    let tmp = dir.join("serve.toml.next");
    let io = |p: &Path| {
        let path = p.to_owned();
        move |source| ExportError::Io { path, source }
    };
    let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    std::os::unix::fs::FileExt::write_all_at(&f, text.as_bytes(), 0)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::record::{RecordHeader, RecordKind};
    use crate::shipping::image::{consistency_point, list_segments};
    use crate::shipping::log_file::segment_path;
    use crate::shipping::log_file::LogFile;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

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
            len: if kind == RecordKind::Wrap { 0 } else { 4096 },
            ..RecordHeader::test_data(LOG, partition, seq, offset, &data)
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

    /// The last consistency point of every partition, as export runs it.
    fn last_points(
        dir: &Path,
        state: &mut ImageState,
        in_flight: &[(u32, u64, u64)],
    ) -> Vec<Point> {
        (0..2)
            .map(|p| {
                let released = list_segments(dir, Some(p))
                    .expect("list")
                    .iter()
                    .map(|s| LogFile::open(&s.path).expect("open").log.next_seq() - 1)
                    .max()
                    .unwrap_or(0);
                consistency_point(dir, state, p, Some(LOG), released, in_flight).expect("point")
            })
            .collect()
    }

    #[test]
    fn the_image_holds_every_logged_write_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mut state = ImageState::default();
        // Partition 0: block 0 written twice, then zeroed block 1; a wrap marker between,
        // and a consistency point after seq 3.
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
        consistency_point(d, &mut state, 0, Some(LOG), 3, &[]).expect("point");
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
        let points = last_points(d, &mut state, &[]);
        let r = finish(d, "src", &state, &points, Some(2 << 20), false).expect("export");
        assert_eq!(r.files, 2);
        assert_eq!(r.records, 3);
        assert_eq!(r.applied_records, 5);
        assert_eq!(r.images.len(), 1);
        let img = d.join("lun0.img");
        assert_eq!(block(&img, 0), vec![4; 4096]);
        assert_eq!(block(&img, 4096), vec![0; 4096]);
        assert_eq!(block(&img, 1 << 20), vec![9; 4096]);
        assert_eq!(std::fs::metadata(&img).expect("meta").len(), 2 << 20);
    }

    /// Partition 0 lacks seqs 2..4; partition 1's files start at seq 3.
    fn gap_and_late_start(d: &Path) {
        file(d, 0, 1, &[record(0, 1, RecordKind::Data, 0, 1)]);
        file(d, 0, 5, &[record(0, 5, RecordKind::Data, 0, 5)]);
        file(d, 1, 3, &[record(1, 3, RecordKind::Data, 8192, 3)]);
    }

    #[test]
    fn a_gap_or_a_late_start_is_refused_naming_the_seqs_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        gap_and_late_start(d);
        // A gap the source's death made (writes in flight) is reported, not refused.
        let mut state = ImageState::default();
        let points = last_points(d, &mut state, &[(0, 2, 4), (1, 1, 2)]);
        let r = finish(d, "src", &state, &points, None, false).expect("in flight");
        assert_eq!(r.unacknowledged.len(), 2, "{r:?}");

        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        gap_and_late_start(d);
        let mut state = ImageState::default();
        let points = last_points(d, &mut state, &[]);
        let e = finish(d, "src", &state, &points, None, false)
            .expect_err("gap")
            .to_string();
        assert!(e.contains("partition 0: seqs 2..4 of log"), "{e}");
        assert!(
            e.contains("partition 1: seqs 1..2 of log 0000000000005eed: shipping began after"),
            "{e}"
        );
        let r = finish(d, "src", &state, &points, None, true).expect("forced");
        assert_eq!(r.missing.len(), 2);
        assert_eq!(block(&d.join("lun0.img"), 0), vec![5; 4096]);
    }

    #[test]
    fn the_serve_config_is_a_valid_single_node_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = [ExportedImage {
            lun: 0,
            path: dir.path().join("lun0.img").display().to_string(),
            bytes: 1 << 20,
        }];
        let path = write_serve_config(dir.path(), "src2", &images).expect("write");
        let cfg = crate::config::NodeConfig::load(Path::new(&path)).expect("a valid config");
        assert_eq!(cfg.node.name, "src2-image");
        assert_eq!(cfg.luns.len(), 1);
    }

    #[test]
    fn nothing_logged_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e =
            finish(dir.path(), "src", &ImageState::default(), &[], None, false).expect_err("empty");
        assert!(matches!(e, ExportError::Empty { .. }), "{e}");
    }
}
