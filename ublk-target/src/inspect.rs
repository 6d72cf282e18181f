//! Read-only inspection of an NVRAM log, for `nvmirrorctl nvram inspect` (support and
//! tests). It never writes and takes no lock, so it can look at a live daemon's log (the
//! picture may then be a moment out of date).

use crate::nvram::layout::SuperblockState;
use crate::nvram::scan::scan_partition;
use crate::nvram::{Layout, PartitionCheckpoint, Superblock};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionReport {
    pub partition: u32,
    pub checkpoint_generation: u64,
    pub tail_offset: u64,
    pub tail_seq: u64,
    /// Records not yet on the medium (they would be replayed at start).
    pub records: usize,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Absolute NVRAM offset of the first unflushed record's header.
    pub first_record_offset: Option<u64>,
    pub discarded_unacknowledged: usize,
    pub corruption: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InspectReport {
    pub path: String,
    /// blank, foreign, corrupt or valid
    pub state: String,
    pub detail: Option<String>,
    pub node: Option<String>,
    pub format_version: Option<u32>,
    pub log_id: Option<String>,
    pub layout: Option<String>,
    pub partitions: Vec<PartitionReport>,
}

/// Reads NVRAM bytes without the daemon's lock (inspection is read-only): pread for a file
/// or block device; device-DAX has no read(2), so it is mapped read-only.
enum NvramReader {
    Pread(File),
    Mapped(memmap2::Mmap),
}

impl NvramReader {
    fn open(path: &Path) -> std::io::Result<NvramReader> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.file_type().is_char_device() {
            return Ok(NvramReader::Pread(file));
        }
        let dax = crate::nvram::region::DaxDevice::probe(path, meta.rdev())
            .map_err(std::io::Error::other)?;
        // SAFETY: a read-only view; the bytes may change under us while a daemon runs, which
        // the report tolerates (every structure it decodes is checksummed).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len((dax.size - dax.size % dax.align) as usize)
                .map(&file)?
        };
        Ok(NvramReader::Mapped(map))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            NvramReader::Pread(f) => f.read_exact_at(buf, offset),
            NvramReader::Mapped(map) => {
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|start| map.get(start..start.checked_add(buf.len())?))
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("NVRAM read {offset}+{} beyond its end", buf.len()),
                        )
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

pub fn inspect(path: &Path) -> std::io::Result<InspectReport> {
    let f = NvramReader::open(path)?;
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0)?;
    let mut report = InspectReport {
        path: path.display().to_string(),
        state: String::new(),
        detail: None,
        node: None,
        format_version: None,
        log_id: None,
        layout: None,
        partitions: Vec::new(),
    };
    let sb = match Superblock::decode(&head) {
        SuperblockState::Blank => {
            report.state = "blank".into();
            return Ok(report);
        }
        SuperblockState::Foreign => {
            report.state = "foreign".into();
            report.detail = Some("no nvmirror signature".into());
            return Ok(report);
        }
        SuperblockState::Corrupt(why) => {
            report.state = "corrupt".into();
            report.detail = Some(why);
            return Ok(report);
        }
        SuperblockState::Valid(sb) => sb,
    };
    report.state = "valid".into();
    report.node = Some(sb.node_name.clone());
    report.format_version = Some(sb.version);
    report.log_id = Some(format!("{:016x}", sb.log_id));
    report.layout = Some(sb.layout.clone());
    let layout = Layout::of(&sb);
    let mut log = vec![0u8; layout.part_size as usize];
    for p in 0..sb.partitions {
        let mut cps = Vec::new();
        for slot in 0..PartitionCheckpoint::SLOTS {
            let mut b = [0u8; 48];
            f.read_exact_at(&mut b, layout.checkpoint_offset(p, slot))?;
            if let Some(c) = PartitionCheckpoint::decode(&b) {
                if c.log_id == sb.log_id && c.partition == p && c.tail_off < layout.part_size {
                    cps.push(c);
                }
            }
        }
        let Some(cp) = cps.into_iter().max_by_key(|c| c.generation) else {
            report.partitions.push(PartitionReport {
                partition: p,
                checkpoint_generation: 0,
                tail_offset: 0,
                tail_seq: 0,
                records: 0,
                bytes: 0,
                first_seq: None,
                last_seq: None,
                first_record_offset: None,
                discarded_unacknowledged: 0,
                corruption: Some("no valid checkpoint".into()),
            });
            continue;
        };
        f.read_exact_at(&mut log, layout.partition_base(p))?;
        let scan = scan_partition(&log, p, sb.log_id, cp.tail_off, cp.tail_seq);
        report.partitions.push(PartitionReport {
            partition: p,
            checkpoint_generation: cp.generation,
            tail_offset: cp.tail_off,
            tail_seq: cp.tail_seq,
            records: scan.records.len(),
            bytes: scan.records.iter().map(|r| r.header.len as u64).sum(),
            first_seq: scan.records.first().map(|r| r.header.seq),
            last_seq: scan.records.last().map(|r| r.header.seq),
            first_record_offset: scan
                .records
                .first()
                .map(|r| layout.partition_base(p) + r.pos)
                .or(scan
                    .corruption
                    .as_ref()
                    .map(|c| layout.partition_base(p) + c.pos)),
            discarded_unacknowledged: scan.discarded_tail,
            corruption: scan.corruption.map(|c| c.to_string()),
        });
    }
    Ok(report)
}
