//! The destination's writer of one source's log files (claim set C, step 2 of
//! docs/log-shipping.md): it appends the records the source's NVRAM area holds to
//! `DIR/SOURCE/pN-LOGID-FIRSTSEQ.log`, one file per source partition and log segment, in
//! sequence order, fdatasyncs each batch, and only then lets the records leave the area.
//!
//! The area itself puts records back in order: they wait in the NVRAM, indexed by seq, until
//! the one before them is in the file. A missing seq is one of:
//! * a wrap marker (the source skips the end of its partition; never posted): the source
//!   names them when it asks whether a batch is logged, and the writer appends a marker;
//! * a record still on its way: the writer waits (a gap open for [`GAP_REPORT_AFTER`] is
//!   reported in status, naming the partition and the seq, and waited for still);
//! * a record the source no longer has (it flushed it while we were away, and the batch
//!   left its log without us): the source's next question says where its log starts, and
//!   the file ends there; a new segment starts at the next record we hold, and the gap is
//!   counted and logged.
//!
//! The source's flusher asks (`wire::OP_SHIP_LOGGED`) before its log lets a batch go:
//! [`SourceLogs::wait_logged`] answers once the file holds it.
//!
//! Consistency points (step 3, `shipping::image`) run on this thread too, so no file is
//! applied while it is appended to: when the source's partition filled (the writer appends
//! the wrap marker the source named: it went round its partition) and on
//! [`SourceLogs::checkpoint`] (`nvmirrorctl checkpoint`, and `export`). The file being
//! appended to is closed first; the next record starts a new one. A point is I/O on the
//! writer thread, so while it runs the source's questions wait: a slow image slows the
//! source down (back-pressure) and drops nothing.

use super::image::{self, ImageError, ImageState, Point};
use super::log_file::{segment_path, LogFile, LogFileError};
use crate::mirror::SecondStoreArea;
use crate::nvram::record::{RecordHeader, RecordKind};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The most one append carries.
const BATCH_BYTES: usize = 4 << 20;
/// How often the writer looks at the area when nothing woke it.
const POLL: Duration = Duration::from_millis(20);
/// A gap open this long with later records waiting behind it shows in status.
pub const GAP_REPORT_AFTER: Duration = Duration::from_secs(10);

/// What the writer knows of one source partition.
#[derive(Debug, Default)]
struct PartitionLog {
    /// The file appended to now (its log id is the source log it belongs to).
    segment: Option<LogFile>,
    /// With no segment: the source log and seq the next one starts at (after a gap).
    resume_at: Option<(u64, u64)>,
    /// The source went round this partition: a consistency point is due.
    point_due: bool,
    /// Since when the log files hold records the images do not (since the first append
    /// after the last point; after a restart, since the restart).
    unapplied_since: Option<Instant>,
    /// From the source's questions, for its log `hint_log`: every seq through `gone_through`
    /// has left its log; `wraps` are markers it never posted.
    hint_log: Option<u64>,
    gone_through: u64,
    wraps: BTreeSet<u64>,
    /// Records appended since the daemon started (markers included).
    appended: u64,
    appended_bytes: u64,
    /// Segments ended by records that never arrived.
    gaps: u64,
    /// Since when the record the file needs next has been missing while later ones wait.
    waiting_since: Option<(u64, Instant)>,
    /// The source log this partition had a file of since the daemon started: a skip in it
    /// is a gap (before the first file, it is only where our copy of the log begins).
    seen_log: Option<u64>,
}

impl PartitionLog {
    fn logged_through(&self, log_id: u64) -> Option<u64> {
        self.segment
            .as_ref()
            .filter(|f| f.source_log_id() == log_id)
            .map(|f| f.synced_next_seq() - 1)
    }
}

/// One partition as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionLogStatus {
    pub partition: u32,
    /// The current log file (None before the first record).
    pub file: Option<String>,
    /// Its first seq and the seq it needs next.
    pub first_seq: u64,
    pub next_seq: u64,
    pub file_bytes: u64,
    pub appended_records: u64,
    pub appended_bytes: u64,
    pub gaps: u64,
    /// A record that has not arrived for [`GAP_REPORT_AFTER`] while later ones wait.
    pub waiting_for: Option<String>,
    /// The images hold this partition's writes through this seq (of `image_log`).
    #[serde(default)]
    pub applied_through: u64,
    #[serde(default)]
    pub image_log: Option<String>,
    /// Consistency points so far, and the last one's time (Unix seconds, 0: none).
    #[serde(default)]
    pub points: u64,
    #[serde(default)]
    pub last_point_unix: u64,
    /// Records in the log file not yet applied to the images (the lag).
    #[serde(default)]
    pub unapplied_records: u64,
    #[serde(default)]
    pub unapplied_bytes: u64,
    /// How long the log files have held records the images do not (the lag in time).
    #[serde(default)]
    pub unapplied_for_s: u64,
}

/// A checkpoint asked of the writer thread.
struct PointRequest {
    in_flight: Vec<(u32, u64, u64)>,
    reply: std::sync::mpsc::Sender<Result<Vec<Point>, String>>,
}

/// The source took its volume back (`wire::OP_SHIP_RETURNED`), asked of the writer thread.
struct ReturnRequest {
    returned: crate::cluster::wire::ShipReturned,
    reply: std::sync::mpsc::Sender<Result<(), String>>,
}

/// The log files of one source, and the thread that writes them.
pub struct SourceLogs {
    source: String,
    dir: PathBuf,
    area: Arc<SecondStoreArea>,
    parts: Mutex<Vec<PartitionLog>>,
    /// The last append or sync error (the records stay in the NVRAM; retried).
    error: Mutex<Option<String>>,
    /// Per partition, the last failed automatic consistency point (its files stay;
    /// retried), until a point of that partition works. Apart from `error`: an append that
    /// works says nothing of the images.
    point_errors: Mutex<std::collections::BTreeMap<u32, String>>,
    /// Bumped after every append: `wait_logged` looks again.
    progress: tokio::sync::watch::Sender<u64>,
    stop: AtomicBool,
    /// Export: the source is gone, so a missing record never comes (it was never
    /// acknowledged, or it left the source's log while we were away): skip it.
    source_gone: AtomicBool,
    /// What was skipped so (partition, first seq, last seq), for the export's report.
    skipped_gone: Mutex<Vec<(u32, u64, u64)>>,
    thread: Mutex<Option<std::thread::Thread>>,
    /// What the images hold (`shipping::image`), as last saved.
    images: Mutex<ImageState>,
    point_request: Mutex<Option<PointRequest>>,
    return_request: Mutex<Option<ReturnRequest>>,
    /// Records of an exported source were dropped (said once).
    dropped_exported: AtomicBool,
    /// Held while a consistency point runs or the export is recorded.
    applying: Mutex<()>,
}

impl SourceLogs {
    /// Opens (or starts) the log files of `source` in `dir/source`: the newest segment of
    /// each partition for the log the area holds records of is checked and continued (a
    /// torn last append cut off; damage refuses, naming the file). What the files already
    /// hold leaves the area.
    pub fn open(
        dir: &Path,
        source: &str,
        area: Arc<SecondStoreArea>,
        partitions: u32,
    ) -> Result<Arc<SourceLogs>, ImageError> {
        let dir = dir.join(source);
        std::fs::create_dir_all(&dir).map_err(|e| LogFileError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let images = ImageState::load(&dir)?;
        let mut parts = Vec::new();
        for p in 0..partitions {
            let mut part = PartitionLog::default();
            if let Some((Some(log_id), released)) = area.log_state(p) {
                if let Some(opened) = open_newest_segment(&dir, p, log_id, released)? {
                    if opened.torn_bytes > 0 {
                        tracing::warn!(
                            source,
                            file = %opened.log.path().display(),
                            "cut off {} byte(s) of a torn last append (never synced, so never confirmed to the source)",
                            opened.torn_bytes
                        );
                    }
                    let through = opened.log.next_seq() - 1;
                    area.release_logged(log_id, p, through);
                    part.seen_log = Some(log_id);
                    if through >= released {
                        part.unapplied_since = Some(Instant::now());
                        part.segment = Some(opened.log);
                    }
                    // Else it ends before what left the NVRAM (a consistency point applied it
                    // and stopped before removing it, or a gap followed it): the next record
                    // starts a new file, and the next point skips what was applied.
                } else if let Some(applied) = images
                    .partitions
                    .get(&p)
                    .filter(|i| i.log_id == Some(log_id))
                    .map(|i| i.applied_through)
                {
                    // Every file of this log went to the images at a consistency point: a
                    // skip after what they hold is a gap all the same. What the area still
                    // holds at or below it is in the images (a return, whose watermark may
                    // not have been persisted): it leaves, and the next file starts after.
                    part.seen_log = Some(log_id);
                    if applied > released {
                        area.release_logged(log_id, p, applied);
                        part.resume_at = applied.checked_add(1).map(|next| (log_id, next));
                    }
                }
            }
            parts.push(part);
        }
        Ok(Arc::new(SourceLogs {
            source: source.to_owned(),
            dir,
            area,
            parts: Mutex::new(parts),
            error: Mutex::new(None),
            point_errors: Mutex::new(Default::default()),
            progress: tokio::sync::watch::channel(0).0,
            stop: AtomicBool::new(false),
            source_gone: AtomicBool::new(false),
            skipped_gone: Mutex::new(Vec::new()),
            thread: Mutex::new(None),
            images: Mutex::new(images),
            point_request: Mutex::new(None),
            return_request: Mutex::new(None),
            dropped_exported: AtomicBool::new(false),
            applying: Mutex::new(()),
        }))
    }

    /// Starts the writer thread (it ends after [`Self::stop`]).
    pub fn start(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("log-{}", self.source))
            .spawn(move || {
                while !me.stop.load(Ordering::Relaxed) {
                    if !me.pass() {
                        std::thread::park_timeout(POLL);
                    }
                }
            })?;
        *lock(&self.thread) = Some(handle.thread().clone());
        Ok(handle)
    }

    /// The source's name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The source's log files' directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Before an export (the source is gone): every record the area holds goes to the log
    /// files, the missing ones skipped (counted as gaps). Ok: the seqs skipped so, as
    /// (partition, first, last): writes in flight when the source died, never acknowledged
    /// (unless the source ran degraded and acknowledged them alone). Err if the area is not
    /// empty within `timeout` (the files cannot be written).
    pub fn log_everything_held(&self, timeout: Duration) -> Result<Vec<(u32, u64, u64)>, String> {
        self.source_gone.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let result = loop {
            self.wake();
            let held = self.area.status().records;
            if held == 0 {
                break Ok(std::mem::take(&mut *lock(&self.skipped_gone)));
            }
            if Instant::now() >= deadline {
                let why = lock(&self.error).clone().unwrap_or_default();
                break Err(format!(
                    "{} record(s) of {} are still in the NVRAM after {timeout:?}, not in its log files {why}",
                    held, self.source
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.source_gone.store(false, Ordering::Relaxed);
        result
    }

    /// A consistency point of every partition (`nvmirrorctl checkpoint`, `export`): what
    /// the log files hold is applied to the images, which are synced, and the files
    /// removed. Runs on the writer thread; Err if it fails or takes longer than `timeout`.
    /// `in_flight`: seqs the source died with in flight (export), reported, not missing.
    pub fn checkpoint(
        &self,
        in_flight: Vec<(u32, u64, u64)>,
        timeout: Duration,
    ) -> Result<Vec<Point>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        {
            let mut pending = lock(&self.point_request);
            if pending.is_some() {
                return Err(format!(
                    "a checkpoint of {} is already running",
                    self.source
                ));
            }
            *pending = Some(PointRequest { in_flight, reply });
        }
        self.wake();
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the checkpoint of {} did not finish within {timeout:?} (it goes on; see status)",
                self.source
            )),
        }
    }

    /// What the images hold.
    pub fn image_state(&self) -> ImageState {
        lock(&self.images).clone()
    }

    /// Records the export in the images' state.
    pub fn mark_exported(&self) -> Result<(), ImageError> {
        let _applying = lock(&self.applying);
        let mut images = lock(&self.images);
        let mut next = images.clone();
        next.exported_unix = Some(unix_now());
        next.save(&self.dir)?;
        *images = next;
        Ok(())
    }

    /// What our copy of the source's volume is now (the source asks before it serves).
    pub fn ship_state(&self) -> crate::cluster::wire::ShipState {
        use crate::cluster::wire::ShipState;
        let images = lock(&self.images);
        match (images.exported_unix, images.returning_unix) {
            (Some(_), Some(at)) => ShipState::Returning(at),
            (Some(at), None) => ShipState::Exported(at),
            (None, _) => ShipState::Shipping,
        }
    }

    /// Refuses (with the Unix time of the return) once `return-image` gave the images back:
    /// they are the source's to take, not to export or serve again.
    pub fn not_being_returned(&self) -> Result<(), u64> {
        match lock(&self.images).returning_unix {
            Some(at) => Err(at),
            None => Ok(()),
        }
    }

    /// `nvmirrorctl return-image`: the exported images go back to the source when it next
    /// connects (recorded, so a restart of either side keeps it).
    pub fn allow_return(&self) -> Result<u64, String> {
        let _applying = lock(&self.applying);
        let mut images = lock(&self.images);
        if images.exported_unix.is_none() {
            return Err(format!(
                "the images of {} were never exported: the source has its volume",
                self.source
            ));
        }
        if let Some(at) = images.returning_unix {
            return Ok(at);
        }
        let mut next = images.clone();
        let at = unix_now();
        next.returning_unix = Some(at);
        next.save(&self.dir).map_err(|e| e.to_string())?;
        *images = next;
        Ok(at)
    }

    /// The source copied the images onto its medium and its log is empty through
    /// `returned.through`: from its next records on, the files and the images follow it
    /// again. Runs on the writer thread (no file is written meanwhile).
    pub fn returned(
        &self,
        returned: crate::cluster::wire::ShipReturned,
        timeout: Duration,
    ) -> Result<(), String> {
        let (reply, answer) = std::sync::mpsc::channel();
        *lock(&self.return_request) = Some(ReturnRequest { returned, reply });
        self.wake();
        answer.recv_timeout(timeout).unwrap_or_else(|_| {
            Err(format!(
                "the destination's writer of {} did not record the return within {timeout:?}",
                self.source
            ))
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = lock(&self.thread).as_ref() {
            t.unpark();
        }
    }

    /// The source asks whether its records of `asked.partition` through `asked.through_seq`
    /// are in the log file (its question also says where its log starts and which seqs
    /// are wrap markers). Ok once they are; Err after `patience` (it asks again).
    pub async fn wait_logged(
        &self,
        asked: &crate::cluster::wire::ShipLogged,
        patience: Duration,
    ) -> Result<(), String> {
        {
            let mut parts = lock(&self.parts);
            let Some(part) = parts.get_mut(asked.partition as usize) else {
                return Err(format!(
                    "partition {} is not one of the {} this destination keeps for {}",
                    asked.partition,
                    parts.len(),
                    self.source
                ));
            };
            if part.hint_log != Some(asked.log_id) {
                part.hint_log = Some(asked.log_id);
                part.gone_through = 0;
                part.wraps.clear();
            }
            part.gone_through = part.gone_through.max(asked.first_seq.saturating_sub(1));
            part.wraps.extend(asked.wraps.iter().copied());
        }
        self.wake();
        let mut seen = self.progress.subscribe();
        let logged = |me: &Self| {
            let in_file = lock(&me.parts)
                .get(asked.partition as usize)
                .and_then(|p| p.logged_through(asked.log_id))
                .is_some_and(|t| t >= asked.through_seq);
            // Or gone from the area: logged in an earlier file, or skipped as a gap.
            in_file
                || me
                    .area
                    .log_state(asked.partition)
                    .is_some_and(|(log, released)| {
                        log == Some(asked.log_id) && released >= asked.through_seq
                    })
        };
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if logged(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, seen.changed())
                .await
                .is_err()
            {
                let why = lock(&self.error)
                    .clone()
                    .unwrap_or_else(|| "records before it have not arrived yet".to_string());
                return Err(format!(
                    "{}'s log file of partition {} does not hold seq {} yet: {why}",
                    self.source, asked.partition, asked.through_seq
                ));
            }
        }
    }

    /// One look at every partition; true if something was appended.
    fn pass(&self) -> bool {
        let partitions = lock(&self.parts).len() as u32;
        let asked = lock(&self.return_request).take();
        if let Some(req) = asked {
            let result = self.record_return(&req.returned).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(source = self.source, "recording the return failed: {e}");
            }
            let _ = req.reply.send(result);
        }
        if lock(&self.images).exported_unix.is_some() {
            self.drop_exported_records();
            self.run_points(partitions);
            return false;
        }
        let mut any = false;
        for p in 0..partitions {
            match self.write_partition(p) {
                Ok(n) => any |= n > 0,
                Err(e) => {
                    let text = e.to_string();
                    let mut last = lock(&self.error);
                    if last.as_deref() != Some(&text) {
                        tracing::error!(
                            source = self.source,
                            partition = p,
                            "writing the log file failed ({text}); the records stay in the NVRAM and the source waits"
                        );
                    }
                    *last = Some(text);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        if any {
            *lock(&self.error) = None;
            self.progress.send_modify(|n| *n += 1);
        }
        self.run_points(partitions);
        any
    }

    /// Since the export the images are someone else's volume: records the source still
    /// sends (what it resends at a reconnect) are not logged; it must take its volume back
    /// before it serves again (`OP_SHIP_STATE`).
    fn drop_exported_records(&self) {
        if self.area.status().records == 0 {
            return;
        }
        if !self.dropped_exported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                source = self.source,
                "the source sent records after its images were exported: dropped (its volume is served from the images now)"
            );
        }
        self.area.clear();
    }

    /// `OP_SHIP_RETURNED`, on the writer thread: the images equal the source's medium, and
    /// its log is empty through `returned.through`. Left-over files go, the state says the
    /// images follow the source's log from there, and each partition's next file starts
    /// after it.
    fn record_return(
        &self,
        returned: &crate::cluster::wire::ShipReturned,
    ) -> Result<(), ImageError> {
        let bad = |why: String| ImageError::BadState {
            path: self.dir.join(image::STATE_FILE),
            why,
        };
        let partitions = lock(&self.parts).len();
        if returned.through.len() != partitions {
            return Err(bad(format!(
                "the source names {} partition(s), this destination keeps {partitions}",
                returned.through.len()
            )));
        }
        if returned.through.contains(&u64::MAX) {
            return Err(bad("the source names seq 2^64-1: no log gets there".into()));
        }
        let _applying = lock(&self.applying);
        let mut next = self.image_state();
        if next.returning_unix.is_none() {
            return Err(bad("the source says it took its volume back, but no return was allowed (nvmirrorctl return-image)".into()));
        }
        for seg in image::list_segments(&self.dir, None)? {
            std::fs::remove_file(&seg.path).map_err(|source| ImageError::Io {
                path: seg.path.clone(),
                source,
            })?;
        }
        // What the source sent while exported is not its volume; the area's watermark moves
        // to where its log stands (persisted) before the state says the images follow it,
        // so a restart in between neither logs those records nor waits for older seqs.
        self.area.clear();
        for (p, &through) in returned.through.iter().enumerate() {
            self.area.release_logged(returned.log_id, p as u32, through);
        }
        next.exported_unix = None;
        next.returning_unix = None;
        for (p, &through) in returned.through.iter().enumerate() {
            let state = next.partitions.entry(p as u32).or_default();
            state.log_id = Some(returned.log_id);
            state.applied_through = through;
            state.missing.clear();
        }
        next.save(&self.dir)?;
        *lock(&self.images) = next;
        for (part, &through) in lock(&self.parts).iter_mut().zip(&returned.through) {
            *part = PartitionLog {
                resume_at: Some((returned.log_id, through + 1)),
                seen_log: Some(returned.log_id),
                ..PartitionLog::default()
            };
        }
        self.dropped_exported.store(false, Ordering::Relaxed);
        tracing::info!(
            source = self.source,
            "the source took its volume back from the images: its records after seqs {:?} of log {:016x} are logged and applied again",
            returned.through,
            returned.log_id
        );
        Ok(())
    }

    /// The consistency points that are due, and a checkpoint if one was asked for.
    fn run_points(&self, partitions: u32) {
        let request = lock(&self.point_request).take();
        if let Some(req) = request {
            if let Some(at) = lock(&self.images).exported_unix {
                let _ = req.reply.send(Err(format!(
                    "the images of {} were exported (Unix time {at}): no more consistency points",
                    self.source
                )));
                return;
            }
            let result = (0..partitions)
                .map(|p| self.point_noted(p, &req.in_flight))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(source = self.source, "checkpoint failed: {e}");
            }
            let _ = req.reply.send(result);
            return;
        }
        if lock(&self.images).exported_unix.is_some() {
            // The images belong to whoever serves them since the export: the files stay.
            return;
        }
        for p in 0..partitions {
            let due = lock(&self.parts)
                .get(p as usize)
                .is_some_and(|x| x.point_due);
            if !due {
                continue;
            }
            match self.point_noted(p, &[]) {
                Ok(done) => {
                    tracing::info!(
                        source = self.source,
                        partition = p,
                        "consistency point (the source went round its partition): {} record(s), {} bytes applied to the images, which hold its writes through seq {}",
                        done.records,
                        done.bytes,
                        done.applied_through
                    )
                }
                Err(e) => {
                    // Retried at the next pass; the files stay until it works.
                    let text = format!("consistency point of partition {p}: {e}");
                    tracing::error!(source = self.source, "{text}");
                    lock(&self.point_errors).insert(p, text);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// [`Self::point`], and a point of `p` that works ends the error an earlier one left.
    fn point_noted(&self, p: u32, in_flight: &[(u32, u64, u64)]) -> Result<Point, ImageError> {
        let done = self.point(p, in_flight)?;
        lock(&self.point_errors).remove(&p);
        Ok(done)
    }

    /// A consistency point of partition `p` (`image::consistency_point`), with the file
    /// being appended to closed first.
    fn point(&self, p: u32, in_flight: &[(u32, u64, u64)]) -> Result<Point, ImageError> {
        let (current, released) = match self.area.log_state(p) {
            Some((log, released)) => (log, released),
            None => (None, 0),
        };
        // One point or export record at a time (they share images.json and its temporary).
        let _applying = lock(&self.applying);
        if let Some(part) = lock(&self.parts).get_mut(p as usize) {
            // Synced through its last append (a failed one was rolled back); the next
            // record starts a new file after what the area released.
            part.segment = None;
        }
        let mut state = self.image_state();
        // Records of the source's old log the area dropped before they reached a file (it
        // formatted its NVRAM): the images never get them.
        let dropped = self.area.take_dropped_unlogged();
        if !dropped.is_empty() {
            for (q, old, first, last) in dropped {
                state.partitions.entry(q).or_default().missing.push(format!(
                    "seqs {first}..{last} of log {old:016x} were dropped from the destination's NVRAM when the source formatted its own, before they reached a log file"
                ));
            }
            state.save(&self.dir)?;
        }
        let done =
            image::consistency_point(&self.dir, &mut state, p, current, released, in_flight)?;
        *lock(&self.images) = state;
        if let Some(part) = lock(&self.parts).get_mut(p as usize) {
            part.point_due = false;
            part.unapplied_since = None;
        }
        Ok(done)
    }

    /// Appends what partition `p` can continue its file with; the number of records.
    fn write_partition(&self, p: u32) -> Result<usize, LogFileError> {
        let Some((Some(log_id), released)) = self.area.log_state(p) else {
            return Ok(0);
        };
        // Planned under the lock; the file I/O happens with only this partition's segment
        // taken out of it (the gate's questions keep being answered meanwhile).
        let (mut segment, mut next) = {
            let mut parts = lock(&self.parts);
            let Some(part) = parts.get_mut(p as usize) else {
                return Ok(0);
            };
            if part
                .segment
                .as_ref()
                .is_some_and(|f| f.source_log_id() != log_id)
            {
                tracing::info!(
                    source = self.source,
                    partition = p,
                    "the source's log changed (it formatted its NVRAM): a new log file follows"
                );
                part.segment = None;
                part.resume_at = None;
                // The old log's files are applied before the new log's first record.
                part.point_due = true;
            }
            if part.hint_log.is_some_and(|l| l != log_id) {
                part.hint_log = None;
                part.gone_through = 0;
                part.wraps.clear();
            }
            let next = match &part.segment {
                Some(f) => f.next_seq(),
                None => match part.resume_at {
                    Some((log, seq)) if log == log_id => seq.max(released + 1),
                    _ => released + 1,
                },
            };
            (part.segment.take(), next)
        };
        let result = self.append_run(p, log_id, &mut segment, &mut next);
        if result.is_err() {
            // Nothing appended since the last good sync counts: back to it (or, if even that
            // fails, to no open file: the next pass starts a file after what is released).
            if let Some(f) = segment.as_mut() {
                if f.roll_back_unsynced().is_err() {
                    segment = None;
                }
            }
        }
        let mut parts = lock(&self.parts);
        let Some(part) = parts.get_mut(p as usize) else {
            return result;
        };
        if segment.is_some() {
            part.seen_log = Some(log_id);
        }
        part.segment = segment;
        if let Ok(n) = &result {
            if *n == 0 {
                self.note_missing(p, part, log_id, next);
            } else {
                part.waiting_since = None;
            }
        }
        result
    }

    /// Appends the records from `next` on that are here (and markers the source named),
    /// syncs, and lets them leave the area.
    fn append_run(
        &self,
        p: u32,
        log_id: u64,
        segment: &mut Option<LogFile>,
        next: &mut u64,
    ) -> Result<usize, LogFileError> {
        let wraps: BTreeSet<u64> = lock(&self.parts)
            .get(p as usize)
            .map(|x| x.wraps.clone())
            .unwrap_or_default();
        let mut run: Vec<(RecordHeader, Vec<u8>)> = Vec::new();
        let mut bytes = 0usize;
        let mut seq = *next;
        while bytes < BATCH_BYTES {
            if let Some((h, data, _)) = self.area.copy_held(log_id, p, seq) {
                bytes += h.slot() as usize;
                run.push((h, data));
            } else if wraps.contains(&seq) {
                run.push((wrap_marker(log_id, p, seq), Vec::new()));
            } else {
                break;
            }
            seq += 1;
        }
        if run.is_empty() {
            return Ok(0);
        }
        let file = match segment {
            Some(f) => f,
            None => {
                let path = segment_path(&self.dir, p, log_id, *next);
                tracing::info!(source = self.source, partition = p, file = %path.display(), "new log file");
                segment.insert(LogFile::create(&path, log_id, p, *next)?)
            }
        };
        let refs: Vec<(RecordHeader, &[u8])> = run.iter().map(|(h, d)| (*h, &d[..])).collect();
        file.append(&refs)?;
        file.sync()?;
        let through = seq - 1;
        self.area.release_logged(log_id, p, through);
        *next = seq;
        let mut parts = lock(&self.parts);
        if let Some(part) = parts.get_mut(p as usize) {
            part.appended += run.len() as u64;
            part.appended_bytes += bytes as u64;
            part.wraps = part.wraps.split_off(&seq);
            part.resume_at = None;
            part.unapplied_since.get_or_insert_with(Instant::now);
            // A wrap marker: the source went round its partition ("its partition filled").
            part.point_due |= run.iter().any(|(h, _)| h.kind == RecordKind::Wrap);
        }
        Ok(run.len())
    }

    /// Nothing could be appended at `next`: a record on its way (wait; report a long wait),
    /// or one the source no longer has (end the segment there).
    fn note_missing(&self, p: u32, part: &mut PartitionLog, log_id: u64, next: u64) {
        let source_gone = self.source_gone.load(Ordering::Relaxed);
        let gone = source_gone || (part.hint_log == Some(log_id) && next <= part.gone_through);
        if !gone {
            match (self.area.held_from(p, next), part.waiting_since) {
                (None, _) => part.waiting_since = None,
                (Some(_), Some((seq, _))) if seq == next => {}
                (Some(_), _) => part.waiting_since = Some((next, Instant::now())),
            }
            return;
        }
        // What we lack through `gone_through` never comes (every seq of it left the
        // source's log; with the source gone, every seq). Held copies whose space the
        // source reused meanwhile are no longer records: forgotten, never waited on.
        let limit = if source_gone {
            u64::MAX
        } else {
            part.gone_through
        };
        let overwritten = self.area.forget_overwritten(log_id, p, limit);
        let resume = match self.area.held_from(p, next) {
            Some(later) if source_gone => later,
            Some(later) => later.min(part.gone_through + 1),
            None if source_gone => {
                part.waiting_since = None;
                return;
            }
            None => part.gone_through + 1,
        };
        if resume <= next {
            return;
        }
        let why = if source_gone {
            "the source is gone: they were never acknowledged, or it flushed them while we were away"
        } else {
            "the source flushed them while we were away"
        };
        if part.seen_log == Some(log_id) {
            part.gaps += 1;
            tracing::warn!(
                source = self.source,
                partition = p,
                "records {next}..{} never reached this destination ({why}{}): the log file ends before them, the next one starts at seq {resume}",
                resume - 1,
                if overwritten > 0 {
                    format!("; {overwritten} copy(ies) we held were overwritten before they were logged")
                } else {
                    String::new()
                }
            );
        } else {
            tracing::info!(
                source = self.source,
                partition = p,
                "the source's log starts at seq {resume} for us: the first log file starts there"
            );
        }
        part.segment = None;
        if source_gone {
            lock(&self.skipped_gone).push((p, next, resume - 1));
        }
        // Late copies of the skipped records must not stay held for ever.
        self.area.release_logged(log_id, p, resume - 1);
        part.resume_at = Some((log_id, resume));
        part.waiting_since = None;
    }

    /// Status of every partition.
    pub fn status(&self) -> (Vec<PartitionLogStatus>, Option<String>) {
        let now = Instant::now();
        let parts = lock(&self.parts);
        let images = lock(&self.images);
        let list = parts
            .iter()
            .enumerate()
            .map(|(p, x)| PartitionLogStatus {
                partition: p as u32,
                file: x.segment.as_ref().map(|f| f.path().display().to_string()),
                first_seq: x.segment.as_ref().map_or(0, |f| f.first_seq()),
                next_seq: x.segment.as_ref().map_or(0, |f| f.next_seq()),
                file_bytes: x.segment.as_ref().map_or(0, |f| f.len()),
                appended_records: x.appended,
                appended_bytes: x.appended_bytes,
                gaps: x.gaps,
                waiting_for: x.waiting_since.and_then(|(seq, since)| {
                    let open = now.saturating_duration_since(since);
                    (open >= GAP_REPORT_AFTER).then(|| {
                        format!(
                            "seq {seq} has not arrived for {} s while later records wait",
                            open.as_secs()
                        )
                    })
                }),
                unapplied_for_s: x
                    .unapplied_since
                    .map_or(0, |t| now.saturating_duration_since(t).as_secs()),
                ..image_status(images.partitions.get(&(p as u32)), x.segment.as_ref())
            })
            .collect();
        let errors: Vec<String> = lock(&self.error)
            .iter()
            .cloned()
            .chain(lock(&self.point_errors).values().cloned())
            .collect();
        (list, (!errors.is_empty()).then(|| errors.join("; ")))
    }
}

/// The image side of a partition's status: what the images hold, and what of the current
/// log file they do not yet.
fn image_status(
    image: Option<&image::PartitionImage>,
    file: Option<&LogFile>,
) -> PartitionLogStatus {
    let mut s = PartitionLogStatus::default();
    if let Some(i) = image {
        s.applied_through = i.applied_through;
        s.image_log = i.log_id.map(|l| format!("{l:016x}"));
        s.points = i.points;
        s.last_point_unix = i.last_point_unix;
    }
    if let Some(f) = file {
        let applied = image
            .filter(|i| i.log_id == Some(f.source_log_id()))
            .map_or(0, |i| i.applied_through);
        s.unapplied_records = f.next_seq().saturating_sub(f.first_seq().max(applied + 1));
        s.unapplied_bytes = f.len().saturating_sub(64);
    }
    s
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marker that stands for a wrap the source skipped (it posts none): the file's seqs
/// stay contiguous.
fn wrap_marker(log_id: u64, partition: u32, seq: u64) -> RecordHeader {
    RecordHeader {
        kind: RecordKind::Wrap,
        flags: 0,
        log_id,
        seq,
        lun: 0,
        partition,
        offset: 0,
        len: 0,
        data_len: 0,
        acked_through: 0,
        data_crc: rdma_link::checksum::crc32c(&[]),
    }
}

/// The segment of `partition` and `log_id` with the highest first seq in `dir`, opened (see
/// `LogFile::open_synced_through`). A newest file too short to hold its header was being
/// created when the destination stopped (no record was ever confirmed from it): removed,
/// and the one before it continued.
fn open_newest_segment(
    dir: &Path,
    partition: u32,
    log_id: u64,
    synced_through: u64,
) -> Result<Option<super::log_file::Opened>, LogFileError> {
    let prefix = format!("p{partition}-{log_id:016x}-");
    let entries = std::fs::read_dir(dir).map_err(|e| LogFileError::Io {
        path: dir.to_owned(),
        source: e,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".log"))
        .collect();
    names.sort();
    while let Some(name) = names.pop() {
        let path = dir.join(name);
        match LogFile::open_synced_through(&path, synced_through) {
            Ok(opened) => return Ok(Some(opened)),
            Err(LogFileError::NotALogFile { .. })
                if std::fs::metadata(&path).is_ok_and(|m| m.len() < 64) =>
            {
                tracing::warn!(file = %path.display(), "removing a log file whose creation a stop interrupted (no header)");
                std::fs::remove_file(&path).map_err(|e| LogFileError::Io {
                    path: path.clone(),
                    source: e,
                })?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::ShipLogged;
    use crate::nvram::memory::MemoryNvram;
    use crate::nvram::NvramRegion;
    use crate::shipping::area::open_areas;
    use crate::shipping::log_file::summarize;
    use rdma_link::SecondStore;

    const LOG: u64 = 0xabc;
    const MIB: u64 = 1 << 20;

    struct Fixture {
        area: Arc<SecondStoreArea>,
        part_size: u64,
        /// Where partition 0's next record lands.
        pos: u64,
        dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let nv = Arc::new(NvramRegion::in_memory(Arc::new(MemoryNvram::new(
            "dest",
            (8 * MIB) as usize,
        ))));
        let areas = open_areas(&nv, 2, &[("src1".to_string(), 8 * MIB)]).expect("area");
        let area = areas[0].held.clone();
        area.keep_until_logged();
        Fixture {
            part_size: areas[0].geometry.part_size,
            area,
            pos: 0,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    impl Fixture {
        /// Record `seq` of partition 0 lands (as a post would put it) and is held.
        fn land(&mut self, seq: u64) {
            self.land_of(LOG, seq)
        }

        /// The same, of source log `log`.
        fn land_of(&mut self, log: u64, seq: u64) {
            let data = vec![seq as u8; 4096];
            let h = RecordHeader::test_data(log, 0, seq, seq * 4096, &data);
            let region = self.area.region();
            assert!(region.write_bytes(self.pos, &h.encode()));
            assert!(region.write_bytes(self.pos + 64, &data));
            self.area
                .hold_record(0, seq, self.pos, h.slot() as u32)
                .expect("held");
            self.pos += h.slot();
            assert!(self.pos < self.part_size);
        }

        fn logs(&self) -> Arc<SourceLogs> {
            SourceLogs::open(self.dir.path(), "src1", self.area.clone(), 2).expect("open")
        }

        fn files(&self) -> Vec<crate::shipping::log_file::LogFileSummary> {
            let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("src1"))
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            names.sort();
            names
                .iter()
                .map(|p| summarize(p).expect("intact"))
                .collect()
        }
    }

    fn ask(
        logs: &SourceLogs,
        first_seq: u64,
        through_seq: u64,
        wraps: Vec<u64>,
    ) -> Result<(), String> {
        ask_within(logs, first_seq, through_seq, wraps, Duration::from_secs(5))
    }

    fn ask_within(
        logs: &SourceLogs,
        first_seq: u64,
        through_seq: u64,
        wraps: Vec<u64>,
        patience: Duration,
    ) -> Result<(), String> {
        let asked = ShipLogged {
            partition: 0,
            through_seq,
            log_id: LOG,
            first_seq,
            wraps,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(logs.wait_logged(&asked, patience))
    }

    #[test]
    fn records_go_to_the_file_in_order_once_and_then_leave_the_nvram() {
        let mut f = fixture();
        // Out of order: 2 waits in the NVRAM until 1 is there.
        f.pos = 4160;
        f.land(2);
        f.pos = 0;
        let logs = f.logs();
        assert!(!logs.pass());
        f.land(1);
        f.pos = 2 * 4160;
        assert!(logs.pass());
        assert_eq!(f.area.status().records, 0);
        // A copy that comes again (a resend after a reconnect) is not held, so not logged.
        f.pos = 0;
        f.land(1);
        assert_eq!(f.area.status().records, 0);
        f.pos = 2 * 4160;
        // 3 is a wrap marker the source never posts: it says so when it asks.
        f.land(4);
        assert!(!logs.pass());
        let writer = logs.start().expect("thread");
        ask(&logs, 1, 4, vec![3]).expect("logged through 4");
        // The wrap marker (the source went round its partition) makes a consistency point:
        // the file is applied to the image and removed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while logs.status().0[0].points == 0 {
            assert!(
                Instant::now() < deadline,
                "no consistency point after a wrap"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(logs.status().0[0].applied_through, 4);
        assert!(f.files().is_empty(), "{:?}", f.files());
        let image = std::fs::read(f.dir.path().join("src1/lun0.img")).expect("image");
        for seq in [1u64, 2, 4] {
            let at = seq as usize * 4096;
            assert_eq!(image[at..at + 4096], vec![seq as u8; 4096][..], "seq {seq}");
        }
        // 5 and 6 never come: the source's next question starts at 7.
        f.land(7);
        ask(&logs, 7, 7, vec![]).expect("logged through 7");
        let files = f.files();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!((files[0].first_seq, files[0].next_seq), (7, 8));
        assert_eq!(logs.status().0[0].gaps, 1);
        // An explicit checkpoint applies it, and the images record the gap.
        let points = logs
            .checkpoint(Vec::new(), Duration::from_secs(5))
            .expect("checkpoint");
        assert_eq!((points[0].records, points[0].applied_through), (1, 7));
        let missing = logs.image_state().missing();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].contains("seqs 5..6"), "{missing:?}");
        assert!(f.files().is_empty());
        // Not yet there: "not yet", not a wait for ever.
        let e = ask_within(&logs, 7, 8, vec![], Duration::from_millis(200))
            .expect_err("seq 8 was never posted");
        assert!(e.contains("does not hold seq 8 yet"), "{e}");
        logs.stop();
        writer.join().expect("writer");
        // After a restart a new file starts after the point.
        f.land(8);
        let again = f.logs();
        assert!(again.pass());
        let files = f.files();
        assert_eq!((files[0].first_seq, files[0].next_seq), (8, 9));
        assert_eq!(f.area.status().records, 0);
        assert_eq!(again.status().0[0].applied_through, 7);
    }

    #[test]
    fn an_exported_source_is_not_logged_until_it_takes_its_volume_back() {
        use crate::cluster::wire::{ShipReturned, ShipState};
        let mut f = fixture();
        let logs = f.logs();
        f.land(1);
        assert!(logs.pass());
        assert_eq!(logs.ship_state(), ShipState::Shipping);
        logs.mark_exported().expect("export recorded");
        assert!(matches!(logs.ship_state(), ShipState::Exported(_)));
        // What the source still sends (a resend at a reconnect) is dropped, not logged.
        f.land(2);
        assert!(!logs.pass());
        assert_eq!(f.area.status().records, 0);
        assert_eq!(f.files().len(), 1);
        let writer = logs.start().expect("thread");
        let back = || ShipReturned {
            log_id: LOG,
            through: vec![5, 0],
        };
        let e = logs
            .returned(back(), Duration::from_secs(5))
            .expect_err("a return nobody allowed");
        assert!(e.contains("no return was allowed"), "{e}");
        let at = logs.allow_return().expect("allowed");
        assert_eq!(logs.ship_state(), ShipState::Returning(at));
        assert_eq!(
            logs.allow_return(),
            Ok(at),
            "allowing it again changes nothing"
        );
        // The images are the source's to take now: no export again, even forced.
        assert_eq!(logs.not_being_returned(), Err(at));
        let e = logs
            .returned(
                ShipReturned {
                    log_id: LOG,
                    through: vec![5],
                },
                Duration::from_secs(5),
            )
            .expect_err("one partition named of two");
        assert!(e.contains("names 1 partition(s)"), "{e}");
        logs.returned(back(), Duration::from_secs(5))
            .expect("the return recorded");
        assert_eq!(logs.ship_state(), ShipState::Shipping);
        let state = ImageState::load(&f.dir.path().join("src1")).expect("saved");
        assert_eq!(state.partitions[&0].applied_through, 5);
        assert_eq!(state.partitions[&0].log_id, Some(LOG));
        assert_eq!((state.exported_unix, state.returning_unix), (None, None));
        // The old files are gone; the source's next record is logged with no gap.
        f.land(6);
        ask(&logs, 6, 6, vec![]).expect("logged through 6");
        let files = f.files();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!((files[0].first_seq, files[0].next_seq), (6, 7));
        assert_eq!(logs.status().0[0].gaps, 0);
        logs.stop();
        writer.join().expect("writer");
    }

    #[test]
    fn records_of_an_old_log_dropped_before_they_were_logged_are_missing_from_the_images() {
        let mut f = fixture();
        let logs = f.logs();
        f.land(1);
        assert!(logs.pass());
        // 3 waits for 2, then the source formats its NVRAM: a new log's record drops it.
        f.land(3);
        assert!(!logs.pass());
        f.pos = 0;
        f.land_of(LOG + 1, 1);
        let points = (0..2)
            .map(|p| logs.point(p, &[]).expect("point"))
            .collect::<Vec<_>>();
        assert_eq!(points[0].applied_through, 1);
        let missing = logs.image_state().missing();
        assert!(
            missing
                .iter()
                .any(|m| m.contains("seqs 3..3") && m.contains("dropped")),
            "{missing:?}"
        );
    }

    #[test]
    fn a_held_copy_the_source_overwrote_is_forgotten_not_waited_on() {
        let mut f = fixture();
        f.land(1);
        let logs = f.logs();
        assert!(logs.pass());
        // 3 is held, 2 never came; then the source, gone on without us, reuses 3's space
        // for seq 9 (its post of 9 lost), and says its log starts at 10.
        let at = f.pos + 4160;
        f.pos = at;
        f.land(3);
        f.pos = at;
        let h = RecordHeader::test_data(LOG, 0, 9, 0, &[9u8; 4096]);
        assert!(f.area.region().write_bytes(at, &h.encode()));
        f.pos = at + 2 * 4160;
        f.land(10);
        let writer = logs.start().expect("thread");
        ask(&logs, 10, 10, vec![]).expect("logged through 10");
        let files = f.files();
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!((files[1].first_seq, files[1].next_seq), (10, 11));
        assert_eq!(f.area.status().records, 0);
        assert_eq!(logs.status().0[0].gaps, 1);
        logs.stop();
        writer.join().expect("writer");
    }

    /// A small simulation of the destination's side of log shipping: one seed draws a
    /// source's stream of writes (overlapping, of 4 to 16 KiB), the order in which its
    /// records land in the NVRAM area (overtaken, resent after they were logged), and when
    /// the writer passes and when the destination restarts (its areas opened again from the
    /// NVRAM, its logs from the files). Whatever the seed, the files hold every record once
    /// and in order, nothing is counted as a gap, and after a consistency point the image
    /// equals a model of the volume (the records applied in seq order).
    #[test]
    fn seeded_deliveries_with_overtaking_resends_and_restarts_end_in_the_model() {
        let (mut restarts, mut resends, mut losses) = (0, 0, 0);
        for seed in 0..48u64 {
            let (r, d, l) = simulate_delivery(seed);
            restarts += r;
            resends += d;
            losses += usize::from(l);
        }
        // The seeds do reach what they are for.
        assert!(
            restarts > 20 && resends > 20 && losses > 5,
            "{restarts} restart(s), {resends} resend(s), {losses} loss(es)"
        );
    }

    /// One seed; returns the restarts and resends it made, and whether it lost a record.
    fn simulate_delivery(seed: u64) -> (usize, usize, bool) {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
        let mut draw = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let nv = Arc::new(NvramRegion::in_memory(Arc::new(MemoryNvram::new(
            "dest",
            (8 * MIB) as usize,
        ))));
        let sources = [("src1".to_string(), 8 * MIB)];
        let part_size = open_areas(&nv, 2, &sources).expect("area")[0]
            .geometry
            .part_size;
        let open_area = || {
            let areas = open_areas(&nv, 2, &sources).expect("area");
            areas[0].held.keep_until_logged();
            areas[0].held.clone()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut area = open_area();
        let mut logs = SourceLogs::open(dir.path(), "src1", area.clone(), 2).expect("open");

        // The source's stream: record seq at byte `pos` of partition 0, as its log lays
        // them out one after another.
        const LUN_BLOCKS: u64 = 96;
        let records = 40 + draw(40);
        let mut stream = Vec::new();
        let mut pos = 0u64;
        for seq in 1..=records {
            let blocks = 1 + draw(4);
            let offset = draw(LUN_BLOCKS - blocks) * 4096;
            let data: Vec<u8> = (0..blocks * 4096)
                .map(|i| (seq as u8).wrapping_mul(31) ^ (i / 512) as u8)
                .collect();
            let h = RecordHeader::test_data(LOG, 0, seq, offset, &data);
            stream.push((h, pos, data));
            pos += h.slot();
        }
        assert!(
            pos < part_size,
            "seed {seed}: the stream fits in the partition"
        );
        // Landing order: each record may be overtaken by up to 3 later ones; some land
        // again later (a resend after a reconnect).
        let mut order: Vec<usize> = (0..stream.len()).collect();
        for i in 0..order.len() {
            let j = (i + draw(4) as usize).min(order.len() - 1);
            order.swap(i, j);
        }
        // A third of the seeds lose one record on the way (its batch then leaves the
        // source's log without the destination: the source's next question starts after it).
        let lost = (draw(3) == 0).then(|| 2 + draw(records - 2));
        let mut landings = Vec::new();
        let mut resends = 0;
        for &i in order.iter().filter(|&&i| Some(stream[i].0.seq) != lost) {
            landings.push(i);
            let again = order[draw(order.len() as u64) as usize];
            if draw(6) == 0 && Some(stream[again].0.seq) != lost {
                landings.push(again);
                resends += 1;
            }
        }
        let mut restarts = 0;
        let land = |area: &SecondStoreArea, (h, pos, data): &(RecordHeader, u64, Vec<u8>)| {
            let region = area.region();
            assert!(region.write_bytes(*pos, &h.encode()));
            assert!(region.write_bytes(pos + 64, data));
            area.hold_record(0, h.seq, *pos, h.slot() as u32)
                .expect("held");
        };
        for i in landings {
            land(&area, &stream[i]);
            match draw(8) {
                0..=3 => {
                    logs.pass();
                }
                4 => {
                    // The destination restarts: its NVRAM and files are all it keeps.
                    drop(logs);
                    restarts += 1;
                    area = open_area();
                    logs = SourceLogs::open(dir.path(), "src1", area.clone(), 2).expect("reopen");
                }
                _ => {}
            }
        }
        while logs.pass() {}
        let writer = logs.start().expect("thread");
        if let Some(lost) = lost {
            // Records after the lost one wait in the NVRAM until the source says the
            // lost one left its log: its question about the next batch starts after it.
            assert!(
                area.status().records > 0,
                "seed {seed}: nothing waits for seq {lost}"
            );
            ask(&logs, lost + 1, records, vec![]).expect("logged after the gap");
        }
        assert_eq!(
            area.status().records,
            0,
            "seed {seed}: records left in the NVRAM"
        );
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir.path().join("src1"))
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        let mut next = 1;
        for name in &names {
            let s = summarize(name).expect("intact");
            if Some(next) == lost {
                next += 1;
            }
            assert_eq!(
                s.first_seq, next,
                "seed {seed}: {name:?} does not go on where the last file ended"
            );
            next = s.next_seq;
        }
        assert_eq!(
            next,
            records + 1,
            "seed {seed}: the files do not hold every record"
        );
        assert_eq!(
            logs.status().0[0].gaps,
            u64::from(lost.is_some()),
            "seed {seed}: gaps counted (lost: {lost:?})"
        );
        logs.checkpoint(Vec::new(), Duration::from_secs(10))
            .expect("checkpoint");
        logs.stop();
        writer.join().expect("writer");
        let mut model = vec![0u8; (LUN_BLOCKS * 4096) as usize];
        for (h, _, data) in stream.iter().filter(|(h, _, _)| Some(h.seq) != lost) {
            model[h.offset as usize..(h.offset + u64::from(h.len)) as usize].copy_from_slice(data);
        }
        let mut image = std::fs::read(dir.path().join("src1/lun0.img")).expect("image");
        assert!(
            image.len() <= model.len(),
            "seed {seed}: the image is longer than any write"
        );
        image.resize(model.len(), 0);
        assert!(
            image == model,
            "seed {seed}: the image differs from the model"
        );
        let missing = logs.image_state().missing();
        match lost {
            None => assert!(missing.is_empty(), "seed {seed}: {missing:?}"),
            Some(lost) => assert!(
                missing.len() == 1 && missing[0].contains(&format!("seqs {lost}..{lost}")),
                "seed {seed}: the images do not say they lack seq {lost}: {missing:?}"
            ),
        }
        (restarts, resends, lost.is_some())
    }
}
