//! Putting staged records on the medium: the one loop behind the start-up replay, the
//! flusher, a takeover's replay of the partner's mirror and a write for a partner whose own
//! medium path failed. Each source of records decides WHICH records to write; [`Applier`]
//! writes them (bounds-checked against their LUN, in sequence order per partition) and
//! syncs every medium it touched.

use crate::lun::Lun;
use crate::nvram::RecordKind;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One staged write, as it goes to the medium.
#[derive(Clone, Copy, Debug)]
pub struct RecordWrite<'a> {
    pub partition: u32,
    pub seq: u64,
    pub kind: RecordKind,
    pub lun: u32,
    pub offset: u64,
    pub len: u64,
    /// The payload of a data record (empty for zero records).
    pub data: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("record seq {seq} names LUN {lun} which is not configured")]
    UnknownLun { seq: u64, lun: u32 },
    #[error("record seq {seq} ({len} bytes at {offset}) ends beyond LUN {lun} ({size} bytes)")]
    OutOfBounds {
        seq: u64,
        lun: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("record seq {seq} carries {data} bytes of data for a {len}-byte write")]
    LengthMismatch { seq: u64, data: usize, len: u64 },
    #[error("writing seq {seq} ({len} bytes at {offset}) to {medium}: {source}")]
    Write {
        seq: u64,
        len: u64,
        offset: u64,
        medium: String,
        source: std::io::Error,
    },
    #[error("syncing {medium}: {source}")]
    Sync {
        medium: String,
        source: std::io::Error,
    },
}

/// What an [`Applier`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub records: usize,
    pub bytes: u64,
}

/// Writes records to their LUNs' media; [`Applier::sync`] makes them durable.
pub struct Applier<'a> {
    luns: &'a [Arc<Lun>],
    touched: Vec<bool>,
    /// The last seq applied per partition: records go to the medium in sequence order.
    last_seq: BTreeMap<u32, u64>,
    applied: Applied,
}

impl<'a> Applier<'a> {
    pub fn new(luns: &'a [Arc<Lun>]) -> Applier<'a> {
        Applier {
            luns,
            touched: vec![false; luns.len()],
            last_seq: BTreeMap::new(),
            applied: Applied::default(),
        }
    }

    /// Writes one record (a wrap marker writes nothing). Refuses a record that names an
    /// unknown LUN or reaches past its end: such a record is damage, never a write to make.
    pub fn apply(&mut self, r: &RecordWrite<'_>) -> Result<(), ApplyError> {
        let last = self.last_seq.entry(r.partition).or_insert(0);
        assert!(
            r.seq > *last,
            "partition {}: record seq {} applied after seq {}",
            r.partition,
            r.seq,
            *last
        );
        *last = r.seq;
        if r.kind == RecordKind::Wrap {
            return Ok(());
        }
        let lun = self
            .luns
            .get(r.lun as usize)
            .ok_or(ApplyError::UnknownLun {
                seq: r.seq,
                lun: r.lun,
            })?;
        if !lun.contains(r.offset, r.len) {
            return Err(ApplyError::OutOfBounds {
                seq: r.seq,
                lun: lun.name.clone(),
                offset: r.offset,
                len: r.len,
                size: lun.size,
            });
        }
        let result = match r.kind {
            RecordKind::Data => {
                if r.data.len() as u64 != r.len {
                    return Err(ApplyError::LengthMismatch {
                        seq: r.seq,
                        data: r.data.len(),
                        len: r.len,
                    });
                }
                lun.medium.write_at(r.data, r.offset)
            }
            RecordKind::Zero => lun.medium.write_zeroes(r.offset, r.len),
            RecordKind::Wrap => Ok(()),
        };
        result.map_err(|source| ApplyError::Write {
            seq: r.seq,
            len: r.len,
            offset: r.offset,
            medium: lun.medium.describe(),
            source,
        })?;
        self.touched[r.lun as usize] = true;
        self.applied.records += 1;
        self.applied.bytes += r.len;
        Ok(())
    }

    /// What has been written so far (not yet synced).
    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// Syncs every medium written to; the records are durable on the medium when this returns Ok.
    pub fn sync(self) -> Result<Applied, ApplyError> {
        for (lun, touched) in self.luns.iter().zip(&self.touched) {
            if *touched {
                lun.medium.sync().map_err(|source| ApplyError::Sync {
                    medium: lun.medium.describe(),
                    source,
                })?;
            }
        }
        Ok(self.applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::LunSpec;
    use crate::medium::{Medium, MemMedium};

    const SIZE: u64 = 1 << 20;

    fn lun() -> (Vec<Arc<Lun>>, Arc<MemMedium>) {
        let medium = Arc::new(MemMedium::new(SIZE));
        let luns = Lun::all(vec![LunSpec {
            name: "lun0".into(),
            size: SIZE,
            ranges: 2,
            medium: medium.clone(),
        }]);
        (luns, medium)
    }

    fn record(seq: u64, lun: u32, offset: u64, len: u64, data: &[u8]) -> RecordWrite<'_> {
        RecordWrite {
            partition: 0,
            seq,
            kind: RecordKind::Data,
            lun,
            offset,
            len,
            data,
        }
    }

    /// A damaged or foreign record (a takeover replays the partner's bytes) is refused by
    /// name and writes nothing: not past the LUN's end (where the ownership table lives), not
    /// with an offset that wraps around, not into a LUN that does not exist.
    #[test]
    fn records_that_do_not_fit_their_lun_are_refused_and_write_nothing() {
        let (luns, medium) = lun();
        let mut applier = Applier::new(&luns);
        let block = [0xabu8; 4096];
        let past_end = applier.apply(&record(1, 0, SIZE - 2048, 4096, &block));
        assert!(
            matches!(past_end, Err(ApplyError::OutOfBounds { .. })),
            "{past_end:?}"
        );
        let wraps = applier.apply(&record(2, 0, u64::MAX - 1024, 4096, &block));
        assert!(
            matches!(wraps, Err(ApplyError::OutOfBounds { .. })),
            "{wraps:?}"
        );
        let unknown = applier.apply(&record(3, 7, 0, 4096, &block));
        assert!(
            matches!(unknown, Err(ApplyError::UnknownLun { .. })),
            "{unknown:?}"
        );
        let short = applier.apply(&record(4, 0, 0, 8192, &block));
        assert!(
            matches!(short, Err(ApplyError::LengthMismatch { .. })),
            "{short:?}"
        );
        assert_eq!(applier.applied(), Applied::default());
        let mut back = vec![0u8; SIZE as usize];
        medium.read_at(&mut back, 0).expect("read");
        assert!(
            back.iter().all(|&b| b == 0),
            "a refused record reached the medium"
        );
        // A record that fits still goes through after the refusals.
        applier
            .apply(&record(5, 0, 4096, 4096, &block))
            .expect("fits");
        assert_eq!(applier.sync().expect("sync").records, 1);
    }
}
