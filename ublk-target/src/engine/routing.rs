//! Routing: which node serves an I/O, and forwarding both ways.
//!
//! * Outgoing: an I/O is split at range boundaries; pieces in ranges another node owns go to
//!   it through the cluster's [`Forwarder`], the rest to our own data path. While a range is
//!   being taken over its I/O waits at the gate. A forward that fails because the owner died
//!   waits (bounded) for the takeover that makes the range ours, then runs here.
//! * Incoming: [`Engine::serve_forwarded`] serves what another node forwarded to us, only
//!   if every piece is ours (a forwarded request is never forwarded again), and the
//!   requests a partner makes of us (re-read the ownership table, write its mirrored records
//!   when its medium path failed).

use super::core::{Engine, IoError};
use super::datapath::{Placement, WriteOp};
use super::medium_reads::{BlockingMediumReads, MediumReads};
use crate::cluster::{wire, Forwarder, RangeState};
use crate::host::run_blocking;
use crate::lease::Verdict;
use crate::lun::Lun;
use crate::nvram::record::RecordKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often I/O waiting so looks again.
const PARTNER_LOSS_POLL: Duration = Duration::from_millis(50);
/// How long a forward refused because its range is moving is tried again: longer than a
/// planned move's drain (`engine::write_priority`'s 10 s).
const MOVE_WAIT: Duration = Duration::from_secs(30);
const MOVE_POLL: Duration = Duration::from_millis(20);

/// Why a routed read failed: the forward (the owner may be gone), or anything else.
enum ReadFailure {
    Forward(String),
    Io(IoError),
}

impl From<IoError> for ReadFailure {
    fn from(e: IoError) -> Self {
        ReadFailure::Io(e)
    }
}

impl Engine {
    /// Splits an I/O into the part we serve and the parts other nodes own, waiting while
    /// a range is being taken over. Returns (all local?, remote pieces as (offset, len)).
    async fn route(
        &self,
        lun_idx: usize,
        lun: &Lun,
        offset: u64,
        len: u64,
    ) -> (bool, Vec<(u64, u64)>) {
        let Some(c) = &self.cluster else {
            return (true, Vec::new());
        };
        let mut all_local = true;
        let mut remote = Vec::new();
        for (at, n, range) in lun.pieces(offset, len) {
            let local_range = range - lun.first_range;
            if let RangeState::Remote(_) = c.route(lun_idx as u32, local_range).await {
                all_local = false;
                remote.push((at, n));
            }
        }
        (all_local, remote)
    }

    fn forwarder(&self) -> Result<Arc<dyn Forwarder>, IoError> {
        self.cluster
            .as_ref()
            .and_then(|c| c.forwarder())
            .ok_or_else(|| {
                IoError::new(
                    libc::EIO,
                    "the range is owned by the partner, which is unreachable (no takeover happened)",
                )
            })
    }

    /// A forward to the owner failed. With the link up, the owner answered and its error
    /// stands: false; likewise when no takeover is expected (the partner never connected).
    /// With the link down (the owner died with the I/O in flight, or before it) and a
    /// takeover expected, waits until the takeover (ours under `takeover = "auto"`, the
    /// operator's or Pacemaker's under `manual`) makes one of the `remote` pieces' ranges
    /// ours or the link is back (the owner restarted in place): true, route the I/O again (a
    /// write's data is the same, so redoing it is harmless; it was never acknowledged). False
    /// once `deadline` (set at the first call to now + `cluster.forward_wait_s`) passes, or
    /// once the owner has stayed alive on the shared medium (its disk heartbeat renews) for
    /// longer than a takeover would need: it is only unreachable, and no takeover will come.
    async fn partner_lost(
        &self,
        lun_idx: usize,
        lun: &Lun,
        remote: &[(u64, u64)],
        deadline: &mut Option<Instant>,
    ) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        if self.mirror.is_up() || !self.takeover.expected() {
            return false;
        }
        let started = self.host.now();
        let deadline = *deadline.get_or_insert_with(|| started + c.forward_wait());
        let alive_wait = c
            .lease()
            .map(|l| l.timing().dead_after() + c.link_timeout() * 2);
        let partner = c.partner();
        let _waiting = self.takeover.waiting_io();
        loop {
            if self.moved_to_us_meanwhile(lun_idx, lun, remote) || self.mirror.is_up() {
                return true;
            }
            let now = self.host.now();
            if now >= deadline || !self.takeover.expected() {
                return false;
            }
            if let (Some(lease), Some(wait)) = (c.lease(), alive_wait) {
                if now.saturating_duration_since(started) > wait
                    && matches!(lease.verdict(partner), Verdict::Alive { .. })
                {
                    return false;
                }
            }
            self.host.sleep(PARTNER_LOSS_POLL).await;
        }
    }

    /// A forward failed, and a range of `pieces` we routed to the partner is no longer
    /// routed there: it moved to us (or is moving) while the forward ran. The owner refuses
    /// a forwarded write whose range moved away before it was staged (a planned move waits
    /// for the range's I/O, then tells us before the refusal reaches us), so route it again.
    fn moved_to_us_meanwhile(&self, lun_idx: usize, lun: &Lun, pieces: &[(u64, u64)]) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        pieces.iter().any(|&(at, n)| {
            lun.pieces(at, n).into_iter().any(|(_, _, range)| {
                !matches!(
                    c.state(lun_idx as u32, range - lun.first_range),
                    RangeState::Remote(_)
                )
            })
        })
    }

    /// The owner refused a forward because the range moved or is moving (a planned move
    /// closes the range's gate, drains, moves it in the table and then tells us), or asked
    /// us to try again (it has not heard us lately): wait a moment and route again, for at
    /// most [`MOVE_WAIT`] after the first such refusal.
    async fn wait_out_a_move(&self, message: &str, deadline: &mut Option<Instant>) -> bool {
        let again = message.contains(wire::OWNERSHIP_MOVED) || message.contains(wire::TRY_AGAIN);
        if !again || !self.mirror.is_up() {
            return false;
        }
        let now = self.host.now();
        if now >= *deadline.get_or_insert(now + MOVE_WAIT) {
            return false;
        }
        self.host.sleep(MOVE_POLL).await;
        true
    }

    /// A forward was refused, or the partner forwarded us I/O we do not serve: if the table
    /// on the medium gives us a range of `pieces` that we route to the partner (a planned
    /// move whose notice was lost with the link), re-read the table. True if we did. Reads
    /// the table on this thread: only on these failure paths.
    async fn notice_moves_to_us(&self, lun_idx: usize, lun: &Lun, pieces: &[(u64, u64)]) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        let moved_here = pieces.iter().any(|&(at, n)| {
            lun.pieces(at, n).into_iter().any(|(_, _, range)| {
                let local = range - lun.first_range;
                matches!(c.state(lun_idx as u32, local), RangeState::Remote(_))
                    && matches!(c.owner_on_medium(lun_idx as u32, local), Ok(Some(o)) if o == c.me)
            })
        });
        if !moved_here {
            return false;
        }
        tracing::warn!(
            "the ownership table gives this node ranges it routed to the partner (a move it was not told of): re-reading it"
        );
        match self.reload_ownership().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "re-reading the ownership table failed");
                false
            }
        }
    }

    /// Why a forward to `partner` failed for good, in words for the operator.
    fn forward_failure(&self, message: &str) -> String {
        let Some(c) = &self.cluster else {
            return message.to_owned();
        };
        let partner = c.partner();
        match c.lease().map(|l| (l.verdict(partner), l.place())) {
            Some((Verdict::Alive { .. }, place)) if !self.mirror.is_up() => format!(
                "the range is served by node {}, which is alive (its {} renews) but unreachable over the mirror link: {message}",
                c.node_name(partner),
                place.heartbeat()
            ),
            _ => message.to_owned(),
        }
    }

    pub(super) async fn route_write(&self, w: WriteOp<'_>) -> Result<(), IoError> {
        let (lun_idx, lun, offset, len) = (w.lun_idx, w.lun, w.offset, w.len);
        // Set at the first failed forward: the common path does not read the clock.
        let mut deadline = None;
        let mut move_deadline = None;
        let mut queue_deadline = None;
        // A write that queued for its range and is forwarded after all counts once, however
        // often it is routed again.
        let mut counted_as_queued_then_forwarded = false;
        let mut table_reread = false;
        loop {
            let (all_local, remote) = self.route(lun_idx, lun, offset, len).await;
            if !all_local
                && self
                    .queue_for_priority(lun_idx, lun, &remote, &mut queue_deadline)
                    .await
            {
                continue;
            }
            if all_local {
                match self.stage_own(w, &[]).await? {
                    Placement::Done => {
                        self.note_local_write(&w, &[]);
                        return Ok(());
                    }
                    Placement::Moved => {
                        tracing::info!(
                            offset,
                            len,
                            "the write's range moved while it was staged: routing it again"
                        );
                        continue;
                    }
                }
            }
            let fwd = self.forwarder()?;
            if queue_deadline.is_some() && !counted_as_queued_then_forwarded {
                counted_as_queued_then_forwarded = true;
                self.write_demand
                    .queued_then_forwarded()
                    .fetch_add(1, Ordering::Relaxed);
            }
            let forwarded = futures::future::join_all(remote.iter().map(|&(at, n)| match w.kind {
                RecordKind::Data => fwd.write(lun_idx as u32, at, w.payload(at, n)),
                _ => fwd.write_zeroes(lun_idx as u32, at, n),
            }));
            let (local, forwarded) =
                futures::future::join(self.stage_own(w, &remote), forwarded).await;
            if local? == Placement::Moved {
                tracing::info!(
                    offset,
                    len,
                    "the write's range moved while it was staged: routing it again"
                );
                continue;
            }
            let Some(message) = forwarded.into_iter().find_map(Result::err) else {
                self.note_local_write(&w, &remote);
                self.note_forwarded(lun_idx, lun, &remote);
                return Ok(());
            };
            if self.moved_to_us_meanwhile(lun_idx, lun, &remote) {
                tracing::info!(offset, len, "the owner refused a forwarded write of a range that moved to us meanwhile: routing it again");
                continue;
            }
            if !table_reread && self.notice_moves_to_us(lun_idx, lun, &remote).await {
                table_reread = true;
                continue;
            }
            if self.wait_out_a_move(&message, &mut move_deadline).await {
                continue;
            }
            if !self
                .partner_lost(lun_idx, lun, &remote, &mut deadline)
                .await
            {
                return Err(IoError::new(
                    libc::EIO,
                    format!("forwarded to the owner: {}", self.forward_failure(&message)),
                ));
            }
            tracing::info!(offset, len, error = %message, "a forwarded write failed with the partner gone: routing it again after the takeover");
        }
    }

    /// Reads, forwarding the parts other nodes own; the medium is read on this thread.
    pub async fn read_routed(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), IoError> {
        self.read_routed_via(lun_idx, offset, out, &BlockingMediumReads)
            .await
    }

    /// Reads, forwarding the parts other nodes own; the medium is read through `reads`.
    pub async fn read_routed_via<R: MediumReads>(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
        reads: &R,
    ) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, out.len() as u64)?;
        // Set at the first failed forward: the common path does not read the clock.
        let mut deadline = None;
        let mut move_deadline = None;
        let mut table_reread = false;
        loop {
            let len = out.len() as u64;
            let (all_local, remote) = self.route(lun_idx, lun, offset, len).await;
            if all_local {
                self.read_via(lun_idx, offset, out, reads).await?;
                if self.still_ours(lun_idx, lun, offset, len, &[]) {
                    return Ok(());
                }
                // The range moved meanwhile (route it again), or its partition stopped,
                // which the next read's `read_staged` refuses.
                continue;
            }
            match self.read_pieces(lun_idx, offset, out, &remote, reads).await {
                Err(ReadFailure::Forward(message)) => {
                    if self.moved_to_us_meanwhile(lun_idx, lun, &remote) {
                        continue;
                    }
                    if !table_reread && self.notice_moves_to_us(lun_idx, lun, &remote).await {
                        table_reread = true;
                        continue;
                    }
                    if self.wait_out_a_move(&message, &mut move_deadline).await {
                        continue;
                    }
                    if !self
                        .partner_lost(lun_idx, lun, &remote, &mut deadline)
                        .await
                    {
                        return Err(IoError::new(
                            libc::EIO,
                            format!("forwarded read: {}", self.forward_failure(&message)),
                        ));
                    }
                    tracing::info!(offset, error = %message, "a forwarded read failed with the partner gone: routing it again after the takeover");
                }
                Err(ReadFailure::Io(e)) => return Err(e),
                Ok(()) if self.still_ours(lun_idx, lun, offset, len, &remote) => return Ok(()),
                Ok(()) => continue,
            }
        }
    }

    /// Reads `out` at `offset`: the `remote` pieces from their owner, the rest here.
    async fn read_pieces<R: MediumReads>(
        &self,
        lun_idx: usize,
        offset: u64,
        out: &mut [u8],
        remote: &[(u64, u64)],
        reads: &R,
    ) -> Result<(), ReadFailure> {
        let fwd = self.forwarder()?;
        let lun = self.lun_for(lun_idx, offset, out.len() as u64)?;
        let mut cursor = offset;
        let end = offset + out.len() as u64;
        for &(at, n) in remote.iter().chain(std::iter::once(&(end, 0))) {
            if cursor < at {
                let dst = &mut out[(cursor - offset) as usize..(at - offset) as usize];
                self.read_via(lun_idx, cursor, dst, reads).await?;
            }
            let here = &mut out[(at - offset) as usize..(at - offset + n) as usize];
            if n > 0 && !self.read_locally(lun_idx, lun, at, here, reads).await {
                let data = fwd
                    .read(lun_idx as u32, at, n as u32)
                    .await
                    .map_err(ReadFailure::Forward)?;
                if data.len() != n as usize {
                    return Err(ReadFailure::Io(IoError::new(
                        libc::EIO,
                        format!("forwarded read returned {} bytes, not {n}", data.len()),
                    )));
                }
                here.copy_from_slice(&data);
            }
            cursor = at + n;
        }
        Ok(())
    }

    /// Whether this node would serve I/O to `range` of LUN `lun` itself right now: the range
    /// is ours and open (no takeover replaying it) and its partition has not stopped
    /// (fenced, or its NVRAM failed) and this node may serve (its disk lease). Never waits.
    pub fn serves(&self, lun: usize, range: u32) -> bool {
        let Some(l) = self.luns.get(lun) else {
            return false;
        };
        let open = match &self.cluster {
            Some(c) => c.state(lun as u32, range) == RangeState::Local,
            None => true,
        };
        open && !self.partition_of(l.first_range + range).is_failed() && self.may_serve()
    }

    /// Whether this node serves every byte of the range itself (waits out a takeover).
    pub async fn serves_locally(&self, lun_idx: usize, offset: u64, len: u64) -> bool {
        match self.lun_for(lun_idx, offset, len) {
            Ok(lun) => self.route(lun_idx, lun, offset, len).await.0,
            Err(_) => false,
        }
    }

    /// [`Engine::serves_locally`] once more after re-reading the table, if it gives us ranges
    /// we route to the partner (the partner forwards us I/O of ranges it moved to us).
    async fn serves_after_reread(&self, lun_idx: usize, offset: u64, len: u64) -> bool {
        let Ok(lun) = self.lun_for(lun_idx, offset, len) else {
            return false;
        };
        self.notice_moves_to_us(lun_idx, lun, &[(offset, len)])
            .await
            && self.serves_locally(lun_idx, offset, len).await
    }

    /// A write another node forwarded to us as the owner: staged here or refused, never
    /// routed on. If the range moves away while it is staged, the sender (which routes it
    /// again itself) hears so; routing it from here too would land it a second time, later,
    /// over newer writes (a ghost write: simulator seed 100589).
    ///
    /// It stages only while the connection that delivered it is still the link's current
    /// one (`delivered_on`, asked just before each piece takes its place in the log), and
    /// the sender answered one of our heartbeats within half the heartbeat timeout (else the
    /// sender, if it lives, is told to try again): after our link's own thread stalled, a
    /// handler may run before the link loop has found the connection dead (simulator seed
    /// 79 with `--storage own --link-stalls --write-priority`: a dead node's write staged
    /// over a newer one of our own client's, in the instant the stall ended). A
    /// handler can run long after its request came (waiting for log space or a gate, or its
    /// thread held up): staged after its connection ended, it could land over a newer write
    /// our own client was acknowledged for meanwhile, from a sender that died (simulator
    /// seeds 827 and 2845 with `--link-stalls`). Refusing it is allowed: its sender never
    /// had an answer.
    async fn write_as_owner(
        &self,
        lun_idx: usize,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        delivered_on: Option<u64>,
    ) -> Result<(), IoError> {
        let lun = self.lun_for(lun_idx, offset, len)?;
        if kind == RecordKind::Data && data.len() as u64 != len {
            return Err(IoError::new(
                libc::EINVAL,
                "forwarded write: its data does not match its length",
            ));
        }
        let (mirror, host) = (&self.mirror, &self.host);
        // How recently the sender must have answered one of our heartbeats (see above).
        let fresh_for = self.cluster.as_ref().map(|c| c.link_timeout() / 2);
        let placeable = move || -> Result<(), String> {
            let current = mirror.current();
            let now = current.as_ref().and_then(|m| m.connection());
            match (delivered_on, now) {
                (Some(came), Some(now)) if came == now => {}
                _ => {
                    return Err(format!(
                        "the connection that delivered this forwarded write ended before it was staged (delivered on {delivered_on:?}, now {now:?})"
                    ))
                }
            }
            let heard = current
                .and_then(|m| m.heard_by_partner())
                .filter(|&(generation, _)| Some(generation) == delivered_on)
                .map(|(_, at)| host.link_instant(at));
            match (heard, fresh_for) {
                (Some(at), Some(fresh)) if host.now() >= at + fresh => Err(format!(
                    "the sender of this forwarded write last answered a heartbeat {} ms ago: not staged until it is heard again {}",
                    host.now().saturating_duration_since(at).as_millis(),
                    wire::TRY_AGAIN
                )),
                _ => Ok(()),
            }
        };
        let w = WriteOp {
            lun_idx,
            lun,
            kind,
            offset,
            len,
            data,
        };
        match self.stage(w, &[], &placeable).await?
        {
            Placement::Done => {
                lun.stats.writes.fetch_add(1, Ordering::Relaxed);
                lun.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Placement::Moved => Err(IoError::new(
                libc::EIO,
                format!(
                    "node {}: the range of {offset}+{len} moved away while the forwarded write was staged {}",
                    self.node,
                    wire::OWNERSHIP_MOVED
                ),
            )),
        }
    }

    /// Serves a request another node sent us: I/O to ranges we own, a request to re-read
    /// the ownership table, or to write its mirrored records. Returns the encoded answer.
    /// Medium reads and writes run through [`crate::host::Host::blocking`]: the caller is the
    /// link's runtime, which also carries the heartbeats.
    pub async fn serve_forwarded(self: Arc<Self>, request: &[u8]) -> Vec<u8> {
        let Some(req) = wire::decode(request) else {
            tracing::warn!(
                "malformed forwarded request ({} bytes) rejected",
                request.len()
            );
            return wire::err("malformed forwarded request");
        };
        let lun = req.lun as usize;
        // The connection this request came on (the handler starts as it arrives).
        let delivered_on = self.mirror.current().and_then(|m| m.connection());
        // Served only if every piece is ours: a forwarded request is never forwarded again.
        let needs_ownership = matches!(req.op, wire::OP_WRITE | wire::OP_ZERO | wire::OP_READ);
        if needs_ownership
            && !self.serves_locally(lun, req.offset, req.len as u64).await
            && !self
                .serves_after_reread(lun, req.offset, req.len as u64)
                .await
        {
            return wire::err(&format!(
                "node {} does not own all of {}+{} on LUN {lun} {}",
                self.node,
                req.offset,
                req.len,
                wire::OWNERSHIP_MOVED
            ));
        }
        let result = match req.op {
            wire::OP_SHIP_LOGGED => {
                return wire::err(&format!(
                    "node {} serves LUNs; only a log-shipping destination keeps log files",
                    self.node
                ));
            }
            wire::OP_RELOAD_OWNERSHIP => {
                if self.cluster.is_none() {
                    return wire::err("not a cluster node");
                }
                // The partner asks before it gives us ranges. A stopped (fenced) partition
                // may hold records of a range we lost that its void record could not kill:
                // given the range back, a restart would replay them over newer data
                // (simulator seed 2627 with --storage own). A restart clears it.
                if let Some((id, why)) = self
                    .parts
                    .iter()
                    .find_map(|p| p.failure().map(|why| (p.id, why)))
                {
                    return wire::err(&format!(
                        "node {}'s NVRAM partition {id} stopped ({why}): it takes no ranges until its daemon restarts",
                        self.node
                    ));
                }
                return match self.reload_ownership().await {
                    Ok(()) => {
                        tracing::info!("the partner changed range ownership: table re-read");
                        wire::ok(&[])
                    }
                    Err(e) => wire::err(&e),
                };
            }
            wire::OP_READ_LEASE => {
                return match self.grant_read_lease().await {
                    Ok(granted) => wire::ok(&granted),
                    Err(e) => wire::err(&e),
                };
            }
            wire::OP_ASK_FOR_RANGE => {
                let Ok(range) = u32::try_from(req.offset) else {
                    return wire::err("malformed ask for a range");
                };
                return match self.hand_over_on_request(req.lun, range).await {
                    Ok(()) => wire::ok(&[]),
                    Err(e) => wire::err(&e),
                };
            }
            wire::OP_WRITE_FOR_PARTNER => {
                let Some(last) = req.data.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) else {
                    return wire::err("malformed write-for-partner request");
                };
                let engine = self.clone();
                let from = self.cluster.as_ref().map(|c| c.partner()).unwrap_or(0);
                let written = run_blocking(self.host.as_ref(), move || {
                    engine.write_for_partner(from, req.lun, req.offset, last, req.len as usize)
                })
                .await;
                return match written {
                    Ok(_) => wire::ok(&[]),
                    Err(e) => wire::err(&e),
                };
            }
            wire::OP_WRITE_HELD_FOR_PARTNER => {
                let engine = self.clone();
                let from = self.cluster.as_ref().map(|c| c.partner()).unwrap_or(0);
                let written = run_blocking(self.host.as_ref(), move || {
                    engine.write_held_for_partner(from, req.lun, req.offset)
                })
                .await;
                return match written {
                    Ok(_) => wire::ok(&[]),
                    Err(e) => {
                        tracing::warn!(
                            "the partner's request to write our copies was refused: {e}"
                        );
                        wire::err(&e)
                    }
                };
            }
            wire::OP_WRITE_RECORDS_FOR_PARTNER => {
                let engine = self.clone();
                let from = self.cluster.as_ref().map(|c| c.partner()).unwrap_or(0);
                let written = run_blocking(self.host.as_ref(), move || {
                    engine.write_shipped_for_partner(from, req.lun, req.offset, req.len, &req.data)
                })
                .await;
                return match written {
                    Ok(_) => wire::ok(&[]),
                    Err(e) => {
                        tracing::warn!("the partner's shipped records were refused: {e}");
                        wire::err(&e)
                    }
                };
            }
            wire::OP_RESYNC_WRITE | wire::OP_RESYNC_DONE | wire::OP_OUT_OF_SYNC => {
                let engine = self.clone();
                let from = self.cluster.as_ref().map(|c| c.partner()).unwrap_or(0);
                let done = run_blocking(self.host.as_ref(), move || {
                    let range = u32::try_from(req.offset).unwrap_or(u32::MAX);
                    match req.op {
                        wire::OP_RESYNC_WRITE => engine
                            .apply_resync_write(from, req.lun, req.offset, &req.data)
                            .map(|()| Vec::new()),
                        wire::OP_OUT_OF_SYNC => engine
                            .out_of_sync_runs(from, req.lun, range)
                            .map(|runs| wire::encode_runs(&runs)),
                        _ => engine
                            .finish_resync(from, req.lun, range)
                            .map(|()| Vec::new()),
                    }
                })
                .await;
                return match done {
                    Ok(answer) => wire::ok(&answer),
                    Err(e) => {
                        tracing::warn!("partner's resync request refused: {e}");
                        wire::err(&e)
                    }
                };
            }
            wire::OP_VERIFY_DIGESTS | wire::OP_SYNC_MEDIUM | wire::OP_READ_MEDIUM => {
                let engine = self.clone();
                let done = run_blocking(self.host.as_ref(), move || match req.op {
                    wire::OP_VERIFY_DIGESTS => engine.medium_digests(req.lun, req.offset, req.len),
                    wire::OP_READ_MEDIUM => {
                        engine.read_medium_for_partner(req.lun, req.offset, req.len)
                    }
                    _ => engine.sync_medium_for_partner(req.lun).map(|_| Vec::new()),
                })
                .await;
                return match done {
                    Ok(data) => wire::ok(&data),
                    Err(e) => {
                        tracing::warn!("partner's medium request (op {}) refused: {e}", req.op);
                        wire::err(&e)
                    }
                };
            }
            wire::OP_WRITE => self
                .write_as_owner(
                    lun,
                    RecordKind::Data,
                    req.offset,
                    req.len as u64,
                    &req.data,
                    delivered_on,
                )
                .await
                .map(|_| Vec::new()),
            wire::OP_ZERO => self
                .write_as_owner(
                    lun,
                    RecordKind::Zero,
                    req.offset,
                    req.len as u64,
                    &[],
                    delivered_on,
                )
                .await
                .map(|_| Vec::new()),
            _ => match self.lun_for(lun, req.offset, req.len as u64) {
                // Our medium is outdated for the range: its unstaged part comes from the
                // partner's medium (asked over the link; no medium read blocks here).
                Ok(l)
                    if self.gap_is_stale_here(lun, l, req.offset, req.offset + req.len as u64) =>
                {
                    let mut buf = vec![0u8; req.len as usize];
                    self.read_via(lun, req.offset, &mut buf, &BlockingMediumReads)
                        .await
                        .map(|()| buf)
                }
                _ => {
                    let engine = self.clone();
                    run_blocking(self.host.as_ref(), move || {
                        engine.read_to_vec(lun, req.offset, req.len as usize)
                    })
                    .await
                }
            },
        };
        match result {
            Ok(data) => wire::ok(&data),
            Err(e) => wire::err(&e.message),
        }
    }
}
