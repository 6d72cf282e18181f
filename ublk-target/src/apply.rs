//! Putting staged records on the medium: the one loop behind the start-up replay, the
//! flusher, a takeover's replay of the partner's mirror and a write for a partner whose own
//! medium path failed. Each source of records decides WHICH records to write; [`Applier`]
//! writes them (bounds-checked against their LUN, in sequence order per partition, adjacent
//! records merged into one medium write) and syncs every medium it touched.

use crate::lun::Lun;
use crate::medium::AlignedBuf;
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

/// Why this node may not write the medium (now, or ever again).
#[derive(Debug)]
pub enum Fence {
    /// The ranges belong to another node now: never write them again.
    Lost(String),
    /// The ownership table cannot be read through our path (the path is failing).
    Unreadable(String),
    /// Not now: this node may not write the medium at the moment (it does not hold its disk
    /// lease, or, each node its own medium, the arbiter cannot be reached); try again later,
    /// nobody writes for us.
    Suspended(String),
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fence::Lost(why) => write!(f, "fenced: {why}"),
            Fence::Unreadable(why) => write!(f, "ownership unreadable: {why}"),
            Fence::Suspended(why) => write!(f, "writes suspended: {why}"),
        }
    }
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
    /// The gate refused a write: nothing more was written.
    #[error("{0}")]
    Fenced(Fence),
}

/// What an [`Applier`] accepted (written, or merged into a write still to be made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub records: usize,
    pub bytes: u64,
}

/// Longest medium write built from adjacent records (the largest I/O the device takes):
/// a sequential stream goes to the medium in few large writes.
pub const MAX_RUN_BYTES: usize = 512 << 10;

/// Most runs gathered before they are written together (in flight at once on a file medium).
pub const MAX_PENDING_RUNS: usize = 32;

/// The buffer the gathered runs are packed into (each run starts where the last ended, so
/// runs of whole 4 KiB blocks stay aligned for O_DIRECT). One per thread, kept for the
/// thread's next batch: a flusher thread faults its pages in once, not every batch.
pub const STAGING_BYTES: usize = 2 << 20;

thread_local! {
    static STAGING: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Asked before every medium write: may this node still write the medium?
pub type Gate<'a> = &'a dyn Fn() -> Result<(), Fence>;

/// Adjacent data records gathered for one medium write: `len` bytes at `at` in the staging
/// buffer go to `offset` of LUN `lun`.
struct Run {
    lun: u32,
    offset: u64,
    len: usize,
    first_seq: u64,
    at: usize,
}

impl Run {
    fn overlaps(&self, lun: u32, offset: u64, len: u64) -> bool {
        self.lun == lun && offset < self.offset + self.len as u64 && self.offset < offset + len
    }
}

/// Writes records to their LUNs' media; [`Applier::sync`] makes them durable. Data records
/// that continue each other on the same LUN are copied into one run (up to
/// [`MAX_RUN_BYTES`]), and up to [`MAX_PENDING_RUNS`] runs ([`STAGING_BYTES`] in all) are
/// written together, in flight at once. A record that overlaps a pending run makes the
/// pending runs go first: the medium ends as if each record were written alone, in order.
pub struct Applier<'a> {
    luns: &'a [Arc<Lun>],
    touched: Vec<bool>,
    /// The last seq applied per partition: records go to the medium in sequence order.
    last_seq: BTreeMap<u32, u64>,
    applied: Applied,
    gate: Option<Gate<'a>>,
    /// Gathered, not yet written; the last one may still grow.
    runs: Vec<Run>,
    /// Where the runs are packed (taken from the thread's at the first data record).
    staging: Option<AlignedBuf>,
    staged: usize,
}

impl Drop for Applier<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.staging.take() {
            STAGING.with(|slot| {
                if let Ok(mut slot) = slot.try_borrow_mut() {
                    slot.get_or_insert(buf);
                }
            });
        }
    }
}

impl<'a> Applier<'a> {
    pub fn new(luns: &'a [Arc<Lun>]) -> Applier<'a> {
        Applier {
            luns,
            touched: vec![false; luns.len()],
            last_seq: BTreeMap::new(),
            applied: Applied::default(),
            gate: None,
            runs: Vec::new(),
            staging: None,
            staged: 0,
        }
    }

    /// An applier that asks `gate` before each medium write (and before the sync) and stops
    /// with [`ApplyError::Fenced`] when it refuses.
    pub fn gated(luns: &'a [Arc<Lun>], gate: Gate<'a>) -> Applier<'a> {
        let mut applier = Applier::new(luns);
        applier.gate = Some(gate);
        applier
    }

    /// Takes one record (a wrap marker writes nothing): writes it, or keeps it to write with
    /// the records that continue it. Refuses a record that names an unknown LUN or reaches
    /// past its end: such a record is damage, never a write to make.
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
        // Markers: nothing to write (a void record's dead records are skipped by its caller).
        if matches!(r.kind, RecordKind::Wrap | RecordKind::Void) {
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
        match r.kind {
            RecordKind::Data => {
                if r.data.len() as u64 != r.len {
                    return Err(ApplyError::LengthMismatch {
                        seq: r.seq,
                        data: r.data.len(),
                        len: r.len,
                    });
                }
                self.add_to_run(r)?;
            }
            RecordKind::Zero => {
                self.write_runs()?;
                self.pass_gate()?;
                lun.medium
                    .write_zeroes(r.offset, r.len)
                    .map_err(|source| ApplyError::Write {
                        seq: r.seq,
                        len: r.len,
                        offset: r.offset,
                        medium: lun.medium.describe(),
                        source,
                    })?;
            }
            RecordKind::Wrap | RecordKind::Void => {}
        }
        self.touched[r.lun as usize] = true;
        self.applied.records += 1;
        self.applied.bytes += r.len;
        Ok(())
    }

    /// Appends a data record to the run it continues, or starts a run (writing the pending
    /// runs first when the record overlaps one of them, or when there is no room).
    fn add_to_run(&mut self, r: &RecordWrite<'_>) -> Result<(), ApplyError> {
        let len = r.data.len();
        if len > MAX_RUN_BYTES {
            // Larger than a run: written on its own, from the NVRAM, after what is pending.
            self.write_runs()?;
            self.pass_gate()?;
            let lun = &self.luns[r.lun as usize];
            return lun
                .medium
                .write_at(r.data, r.offset)
                .map_err(|source| ApplyError::Write {
                    seq: r.seq,
                    len: r.len,
                    offset: r.offset,
                    medium: lun.medium.describe(),
                    source,
                });
        }
        // An older pending write of the same blocks must land first, also when the record
        // continues the last run (it may overlap an earlier one).
        let overlaps = self
            .runs
            .iter()
            .any(|run| run.overlaps(r.lun, r.offset, r.len));
        if overlaps || self.staged + len > STAGING_BYTES {
            self.write_runs()?;
        }
        let continues = self.runs.last().is_some_and(|run| {
            run.lun == r.lun
                && run.offset + run.len as u64 == r.offset
                && run.len + len <= MAX_RUN_BYTES
        });
        if !continues {
            if self.runs.len() >= MAX_PENDING_RUNS {
                self.write_runs()?;
            }
            self.runs.push(Run {
                lun: r.lun,
                offset: r.offset,
                len: 0,
                first_seq: r.seq,
                at: self.staged,
            });
        }
        if self.staging.is_none() {
            let kept = STAGING.with(|slot| slot.try_borrow_mut().ok().and_then(|mut s| s.take()));
            let buf = match kept {
                Some(buf) => buf,
                None => AlignedBuf::zeroed(STAGING_BYTES).map_err(|source| ApplyError::Write {
                    seq: r.seq,
                    len: r.len,
                    offset: r.offset,
                    medium: "a staging buffer for medium writes".into(),
                    source,
                })?,
            };
            self.staging = Some(buf);
        }
        if let (Some(run), Some(staging)) = (self.runs.last_mut(), &mut self.staging) {
            staging.as_mut()[self.staged..self.staged + len].copy_from_slice(r.data);
            run.len += len;
            self.staged += len;
        }
        Ok(())
    }

    /// Writes the gathered runs (none overlaps another), one batch in flight per LUN.
    fn write_runs(&mut self) -> Result<(), ApplyError> {
        let runs = std::mem::take(&mut self.runs);
        self.staged = 0;
        let (false, Some(staging)) = (runs.is_empty(), &self.staging) else {
            return Ok(());
        };
        self.pass_gate()?;
        for (l, lun) in self.luns.iter().enumerate() {
            let mine: Vec<&Run> = runs.iter().filter(|r| r.lun as usize == l).collect();
            let Some(first) = mine.first() else {
                continue;
            };
            let (seq, offset, len) = (first.first_seq, first.offset, first.len as u64);
            let writes: Vec<(u64, &[u8])> = mine
                .iter()
                .map(|r| (r.offset, &staging.as_slice()[r.at..r.at + r.len]))
                .collect();
            lun.medium
                .write_many(&writes)
                .map_err(|source| ApplyError::Write {
                    seq,
                    len,
                    offset,
                    medium: lun.medium.describe(),
                    source,
                })?;
        }
        Ok(())
    }

    fn pass_gate(&self) -> Result<(), ApplyError> {
        match self.gate {
            Some(gate) => gate().map_err(ApplyError::Fenced),
            None => Ok(()),
        }
    }

    /// What has been accepted so far (not yet synced, possibly not yet written).
    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// Writes what is gathered and syncs every medium written to; the records are durable
    /// on the medium when this returns Ok.
    pub fn sync(mut self) -> Result<Applied, ApplyError> {
        self.write_runs()?;
        for (lun, touched) in self.luns.iter().zip(&self.touched) {
            if *touched {
                self.pass_gate()?;
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

#[cfg(test)]
mod run_tests {
    use super::*;
    use crate::lun::LunSpec;
    use crate::medium::{Medium, MemMedium};
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::sync::atomic::Ordering;

    const SIZE: u64 = 4 << 20;
    const BLOCK: u64 = 4096;

    fn lun() -> (Vec<Arc<Lun>>, Arc<MemMedium>) {
        let medium = Arc::new(MemMedium::new(SIZE));
        let luns = Lun::all(vec![LunSpec {
            name: "lun0".into(),
            size: SIZE,
            ranges: 4,
            medium: medium.clone(),
        }]);
        (luns, medium)
    }

    fn data(seq: u64, kind: RecordKind, offset: u64, data: &[u8]) -> RecordWrite<'_> {
        RecordWrite {
            partition: 0,
            seq,
            kind,
            lun: 0,
            offset,
            len: if kind == RecordKind::Zero {
                BLOCK
            } else {
                data.len() as u64
            },
            data,
        }
    }

    /// A sequential stream of records reaches the medium as one write per MAX_RUN_BYTES, and
    /// every write passed the gate first.
    #[test]
    fn adjacent_records_become_one_write_each_passing_the_gate() {
        let (luns, medium) = lun();
        let gates = Cell::new(0);
        let gate = || {
            gates.set(gates.get() + 1);
            Ok(())
        };
        let mut applier = Applier::gated(&luns, &gate);
        let block = vec![0x5au8; 128 << 10];
        let records = 2 * MAX_RUN_BYTES / block.len();
        for i in 0..records {
            let off = (i * block.len()) as u64;
            applier
                .apply(&data(i as u64 + 1, RecordKind::Data, off, &block))
                .expect("apply");
        }
        let applied = applier.sync().expect("sync");
        assert_eq!(applied.records, records);
        assert_eq!(medium.writes.load(Ordering::SeqCst), 2, "two runs of 1 MiB");
        // The two runs go together, then the sync: each step gated.
        assert_eq!(gates.get(), 2);
        assert!(medium.snapshot()[..2 * MAX_RUN_BYTES]
            .iter()
            .all(|&b| b == 0x5a));
    }

    /// A gate that refuses stops the applier before the write: nothing reaches the medium.
    #[test]
    fn a_refusing_gate_writes_nothing() {
        let (luns, medium) = lun();
        let gate = || Err(Fence::Suspended("no lease".into()));
        let mut applier = Applier::gated(&luns, &gate);
        let block = [1u8; BLOCK as usize];
        // Gathered, not yet written: accepted.
        applier
            .apply(&data(1, RecordKind::Data, 0, &block))
            .expect("gathered");
        let refused = applier.sync();
        assert!(
            matches!(refused, Err(ApplyError::Fenced(Fence::Suspended(_)))),
            "{refused:?}"
        );
        assert_eq!(medium.writes.load(Ordering::SeqCst), 0);
        assert!(medium.snapshot().iter().all(|&b| b == 0));
    }

    /// Lands the writes of a batch in reverse order: a batch that held two overlapping
    /// writes would leave the older bytes on the medium.
    struct ReversingMedium(MemMedium);

    impl Medium for ReversingMedium {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn write_at(&self, data: &[u8], off: u64) -> std::io::Result<()> {
            self.0.write_at(data, off)
        }
        fn write_many(&self, writes: &[(u64, &[u8])]) -> std::io::Result<()> {
            writes
                .iter()
                .rev()
                .try_for_each(|&(off, data)| self.0.write_at(data, off))
        }
        fn read_at(&self, out: &mut [u8], off: u64) -> std::io::Result<()> {
            self.0.read_at(out, off)
        }
        fn write_zeroes(&self, off: u64, len: u64) -> std::io::Result<()> {
            self.0.write_zeroes(off, len)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
        fn describe(&self) -> String {
            "reversing memory".into()
        }
    }

    proptest! {
        /// Whatever mix of data and zero records, overlapping or adjacent, the medium ends
        /// byte for byte as if each record had been written alone, in order, even when the
        /// writes of a batch land in any order.
        #[test]
        fn merged_writes_leave_the_medium_as_writing_each_record_in_order(
            ops in proptest::collection::vec((0u64..64, 1u64..48, any::<u8>(), 0u8..8), 1..60)
        ) {
            let medium = Arc::new(ReversingMedium(MemMedium::new(SIZE)));
            let luns = Lun::all(vec![LunSpec {
                name: "lun0".into(),
                size: SIZE,
                ranges: 4,
                medium: medium.clone(),
            }]);
            let mut model = vec![0u8; SIZE as usize];
            let payloads: Vec<Vec<u8>> = ops
                .iter()
                .map(|&(_, blocks, fill, _)| vec![fill; (blocks * BLOCK) as usize])
                .collect();
            let mut applier = Applier::new(&luns);
            for (i, (&(at, blocks, _, kind), payload)) in ops.iter().zip(&payloads).enumerate() {
                let offset = (at * BLOCK).min(SIZE - blocks * BLOCK);
                let zero = kind == 0;
                let r = if zero {
                    RecordWrite { len: blocks * BLOCK, ..data(i as u64 + 1, RecordKind::Zero, offset, &[]) }
                } else {
                    data(i as u64 + 1, RecordKind::Data, offset, payload)
                };
                applier.apply(&r).expect("apply");
                let span = offset as usize..(offset + blocks * BLOCK) as usize;
                if zero {
                    model[span].fill(0);
                } else {
                    model[span].copy_from_slice(payload);
                }
            }
            applier.sync().expect("sync");
            prop_assert!(medium.0.snapshot() == model);
        }
    }
}
