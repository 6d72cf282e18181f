//! The per-connection protocol state machine, the same for every transport: posts in flight
//! and their acknowledgements, records received (persisted, then acknowledged, within our
//! window), heartbeats and the three timeouts (silent peer, unacknowledged post, unanswered
//! request), releases, and the bookkeeping of requests both ways.
//!
//! Pure logic: it is fed commands from the handle, messages from the peer, handler answers and
//! timer ticks, and queues what to send (`outbox` for control messages, `records`, `data_out`
//! for requests and responses) and the peer's requests to serve (`take_jobs`). The connection
//! loop (`driver`) and the transports do the I/O and run the jobs.

use crate::api::{Post, RequestHandler};
use crate::error::{LinkError, Result};
use crate::proto::{
    status_text, AckStatus, Msg, RecordHdr, STATUS_NO_HANDLER, STATUS_OK, STATUS_TOO_LARGE,
};
use crate::shared::{Answer, Cmd, Shared, Stats};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

struct PendingPost {
    post: Post,
    reply: oneshot::Sender<Result<()>>,
    _permit: OwnedSemaphorePermit,
    sent: Instant,
}

struct PendingRequest {
    reply: oneshot::Sender<Result<Bytes>>,
    _permit: OwnedSemaphorePermit,
    sent: Instant,
}

/// A record to send: its wire header and where its bytes are in our (first-store) region.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutRecord {
    pub(crate) hdr: RecordHdr,
    pub(crate) local_offset: u64,
}

/// A request of the peer for our handler, to be run in a task of its own.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) payload: Bytes,
    pub(crate) handler: Arc<dyn RequestHandler>,
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    /// Records we accept unacknowledged (our configured window).
    window: u32,
    /// Largest answer the peer accepts.
    peer_max_request: u32,
    /// Our posts awaiting an acknowledgement, by tag. Ordered: tags grow, so the first entry is
    /// the oldest, and failing them all goes in post order.
    inflight: BTreeMap<u64, PendingPost>,
    /// Our requests awaiting an answer, by id (ids grow, as tags do).
    requests: BTreeMap<u64, PendingRequest>,
    next_request: u64,
    /// Ids of the peer's requests our handler is serving.
    serving: BTreeSet<u64>,
    last_rx: Instant,
    last_ping: Instant,
    /// When `on_tick` last ran. A tick long after the previous one means this loop was not
    /// running (its thread unscheduled): the peer's messages of that time may still wait in
    /// the transport, so silence is not judged on that tick (see `on_tick`).
    last_tick: Instant,
    /// A tick after a stall of ours already passed over the silence; the next one judges it.
    stall_excused: bool,
    /// Control messages to send, in order.
    outbox: VecDeque<Msg>,
    /// Acks in `outbox`: records received and not acknowledged on the wire yet. A peer that
    /// keeps to the window never has more of them than our window.
    acks_queued: u32,
    /// Posted records to send (after the control messages).
    pub(crate) records: VecDeque<OutRecord>,
    /// Requests and answers to send, after the control messages and records.
    pub(crate) data_out: VecDeque<Msg>,
    jobs: Vec<Job>,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, peer_max_request: u32) -> Session {
        let now = Instant::now();
        Session {
            window: shared.cfg.window,
            shared,
            peer_max_request,
            inflight: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 0,
            serving: BTreeSet::new(),
            last_rx: now,
            last_ping: now,
            last_tick: now,
            stall_excused: false,
            outbox: VecDeque::new(),
            acks_queued: 0,
            records: VecDeque::new(),
            data_out: VecDeque::new(),
            jobs: Vec::new(),
        }
    }

    /// Something arrived from the peer (also counts for chunks the transport reassembles).
    pub(crate) fn touch(&mut self) {
        self.last_rx = Instant::now();
    }

    /// The next control message to send, left queued (a transport without room for it now
    /// sends it later).
    pub(crate) fn next_control(&self) -> Option<&Msg> {
        self.outbox.front()
    }

    /// Take the next control message to send: it is on its way.
    pub(crate) fn pop_control(&mut self) -> Option<Msg> {
        let m = self.outbox.pop_front()?;
        if matches!(m, Msg::Ack { .. }) {
            self.acks_queued -= 1;
        }
        Some(m)
    }

    /// Anything queued to send.
    pub(crate) fn has_output(&self) -> bool {
        !(self.outbox.is_empty() && self.records.is_empty() && self.data_out.is_empty())
    }

    /// The link is shutting down: tell the peer.
    pub(crate) fn queue_goodbye(&mut self) {
        self.outbox.push_back(Msg::Bye {
            reason: "link shut down".into(),
        });
    }

    /// The peer's requests to start serving (each in a task, see `driver`).
    pub(crate) fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    /// Handle one command of the handle.
    pub(crate) fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Post {
                post,
                permit,
                reply,
            } => self.start_post(post, permit, reply),
            Cmd::Release {
                partition,
                through_seq,
            } => self.outbox.push_back(Msg::Release {
                partition,
                through_seq,
            }),
            Cmd::Request {
                payload,
                permit,
                reply,
            } => self.start_request(payload, permit, reply),
        }
    }

    /// Fail a command this connection will never handle (it ended first).
    pub(crate) fn refuse(&self, cmd: Cmd, err: &LinkError) {
        let stats = &self.shared.stats;
        match cmd {
            Cmd::Post { reply, .. } => {
                Stats::count(&stats.failed);
                let _ = reply.send(Err(err.clone()));
            }
            Cmd::Request { reply, .. } => {
                Stats::count(&stats.requests_failed);
                let _ = reply.send(Err(err.clone()));
            }
            Cmd::Release { .. } => {}
        }
    }

    /// Register a post and queue its record.
    fn start_post(
        &mut self,
        post: Post,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let tag = self.shared.next_tag();
        let hdr = RecordHdr {
            tag,
            partition: post.partition,
            seq: post.seq,
            offset: post.remote_offset,
            len: post.len,
        };
        let prev = self.inflight.insert(
            tag,
            PendingPost {
                post,
                reply,
                _permit: permit,
                sent: Instant::now(),
            },
        );
        assert!(prev.is_none(), "post tags are unique");
        self.records.push_back(OutRecord {
            hdr,
            local_offset: post.local_offset,
        });
    }

    /// Queue one of our requests.
    fn start_request(
        &mut self,
        payload: Bytes,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<Bytes>>,
    ) {
        self.next_request += 1;
        let id = self.next_request;
        self.requests.insert(
            id,
            PendingRequest {
                reply,
                _permit: permit,
                sent: Instant::now(),
            },
        );
        self.data_out.push_back(Msg::Request { id, payload });
    }

    /// A handler finished: queue its answer (if the request belongs to this connection).
    pub(crate) fn on_answer(&mut self, a: Answer) {
        if !self.serving.remove(&a.id) {
            return;
        }
        let limit = self.peer_max_request.min(self.shared.cfg.max_request);
        let (status, payload) = if a.status == STATUS_OK && a.payload.len() > limit as usize {
            tracing::error!(
                peer = self.shared.peer(),
                id = a.id,
                len = a.payload.len(),
                limit,
                "request handler answered more than the response limit; failing the request"
            );
            (STATUS_TOO_LARGE, Bytes::new())
        } else {
            (a.status, a.payload)
        };
        self.data_out.push_back(Msg::Response {
            id: a.id,
            status,
            payload,
        });
    }

    fn on_request(&mut self, id: u64, payload: Bytes) -> Result<()> {
        if payload.len() > self.shared.cfg.max_request as usize {
            return Err(self.protocol(format!(
                "request of {} bytes exceeds our limit of {}",
                payload.len(),
                self.shared.cfg.max_request
            )));
        }
        if self.serving.len() >= self.shared.cfg.request_window as usize {
            return Err(self.protocol(format!(
                "peer exceeded the request window of {}",
                self.shared.cfg.request_window
            )));
        }
        if !self.serving.insert(id) {
            return Err(self.protocol(format!("request id {id} reused while in service")));
        }
        let Some(handler) = self.shared.handler() else {
            self.on_answer(Answer {
                id,
                status: STATUS_NO_HANDLER,
                payload: Bytes::new(),
            });
            return Ok(());
        };
        Stats::count(&self.shared.stats.served);
        self.jobs.push(Job {
            id,
            payload,
            handler,
        });
        Ok(())
    }

    fn on_response(&mut self, id: u64, status: u8, payload: Bytes) -> Result<()> {
        let Some(p) = self.requests.remove(&id) else {
            return Err(self.protocol(format!("response to unknown request id {id}")));
        };
        let stats = &self.shared.stats;
        if status == STATUS_OK {
            if payload.len() > self.shared.cfg.max_request as usize {
                let e = self.protocol(format!(
                    "response of {} bytes exceeds our limit of {}",
                    payload.len(),
                    self.shared.cfg.max_request
                ));
                Stats::count(&stats.requests_failed);
                let _ = p.reply.send(Err(e.clone()));
                return Err(e);
            }
            Stats::count(&stats.answered);
            let _ = p.reply.send(Ok(payload));
        } else {
            Stats::count(&stats.requests_failed);
            let _ = p.reply.send(Err(LinkError::RequestFailed {
                peer: self.shared.peer(),
                reason: status_text(status).into(),
            }));
        }
        Ok(())
    }

    fn on_ack(&mut self, tag: u64, partition: u32, seq: u64, status: AckStatus) -> Result<()> {
        let Some(p) = self.inflight.remove(&tag) else {
            return Err(self.protocol(format!("acknowledgement for unknown post tag {tag}")));
        };
        if p.post.partition != partition || p.post.seq != seq {
            let e = self.protocol(format!(
                "acknowledgement for tag {tag} names partition {partition} seq {seq}, the post was partition {} seq {}",
                p.post.partition, p.post.seq
            ));
            let _ = p.reply.send(Err(e.clone()));
            return Err(e);
        }
        let peer = self.shared.peer();
        let result = match status {
            AckStatus::Held => {
                Stats::count(&self.shared.stats.acked);
                Ok(())
            }
            AckStatus::PersistFailed(why) => {
                Stats::count(&self.shared.stats.failed);
                Err(LinkError::PersistFailed {
                    peer,
                    partition,
                    seq,
                    message: format!("the partner's persist (flush/msync) failed: {why}"),
                })
            }
            AckStatus::Refused(reason) => {
                Stats::count(&self.shared.stats.failed);
                tracing::error!(peer, partition, seq, %reason, "the partner refused to hold a mirrored record");
                Err(LinkError::RecordRefused {
                    peer,
                    partition,
                    seq,
                    reason,
                })
            }
        };
        let _ = p.reply.send(result);
        Ok(())
    }

    /// Handle one received message (record bytes already landed in the region for `Record`).
    pub(crate) fn on_msg(&mut self, msg: Msg) -> Result<()> {
        self.last_rx = Instant::now();
        match msg {
            Msg::Record(h) => self.on_record(h),
            Msg::Ack {
                tag,
                partition,
                seq,
                status,
            } => self.on_ack(tag, partition, seq, status),
            Msg::Release {
                partition,
                through_seq,
            } => {
                if let Some(s) = &self.shared.store {
                    s.on_release(partition, through_seq);
                }
                Ok(())
            }
            Msg::Ping { stamp } => {
                self.outbox.push_back(Msg::Pong { stamp });
                Ok(())
            }
            Msg::Pong { stamp } => {
                self.shared.set_rtt(self.shared.stamp_age(stamp));
                self.shared.set_heard(stamp);
                Ok(())
            }
            Msg::Request { id, payload } => self.on_request(id, payload),
            Msg::Response {
                id,
                status,
                payload,
            } => self.on_response(id, status, payload),
            Msg::Bye { reason } => Err(self.shared.down_err(format!(
                "node {} closed the link: {reason}",
                self.shared.peer()
            ))),
            other => Err(self.protocol(format!(
                "unexpected {} message on an established link",
                other.name()
            ))),
        }
    }

    fn on_record(&mut self, h: RecordHdr) -> Result<()> {
        if self.acks_queued >= self.window {
            return Err(self.protocol(format!(
                "peer exceeded the window of {} records",
                self.window
            )));
        }
        let Some(store) = &self.shared.store else {
            return Err(
                self.protocol("peer sent a record but this node has no second store".into())
            );
        };
        let status = match store.persist(h.offset, u64::from(h.len)) {
            Ok(()) => match store.hold_record(h.partition, h.seq, h.offset, h.len) {
                Ok(()) => AckStatus::Held,
                Err(reason) => {
                    tracing::error!(partition = h.partition, seq = h.seq, offset = h.offset, len = h.len, %reason, "refusing a mirrored record");
                    AckStatus::Refused(reason)
                }
            },
            Err(e) => {
                tracing::error!(partition = h.partition, seq = h.seq, offset = h.offset, len = h.len, error = %e, "persisting a mirrored record failed");
                AckStatus::PersistFailed(e.to_string())
            }
        };
        Stats::count(&self.shared.stats.records_in);
        self.acks_queued += 1;
        self.outbox.push_back(Msg::Ack {
            tag: h.tag,
            partition: h.partition,
            seq: h.seq,
            status,
        });
        Ok(())
    }

    /// Check that a received record header fits in our second store (transports whose peer
    /// writes the bytes itself, before the header arrives).
    pub(crate) fn check_record(&self, h: &RecordHdr) -> Result<()> {
        let Some(store) = &self.shared.store else {
            return Err(
                self.protocol("peer sent a record but this node has no second store".into())
            );
        };
        if h.len == 0
            || h.len > self.shared.cfg.max_record
            || !store.region().check(h.offset, u64::from(h.len))
        {
            return Err(self.protocol(format!(
                "record [{}, +{}) does not fit the {}-byte second store / {}-byte record limit",
                h.offset,
                h.len,
                store.region().len(),
                self.shared.cfg.max_record
            )));
        }
        Ok(())
    }

    /// Timer: queue a heartbeat when due; fail the link on a silent peer, a stuck post or an
    /// unanswered request.
    pub(crate) fn on_tick(&mut self) -> Result<()> {
        let cfg = &self.shared.cfg;
        let now = Instant::now();
        let since_tick = now.duration_since(self.last_tick);
        self.last_tick = now;
        let stalled = since_tick > cfg.tick_interval() * 2;
        if stalled && since_tick > cfg.heartbeat_timeout / 2 {
            tracing::warn!(
                peer = cfg.peer_node_id,
                "the mirror link's loop checked its timers {since_tick:?} after the previous check (its thread was not scheduled, blocked, or busy)"
            );
        }
        let silent = now.duration_since(self.last_rx);
        if silent > cfg.heartbeat_timeout {
            // After a stall of ours, what the peer sent meanwhile is handled first (the loop
            // takes arrivals before ticks): one tick later, and only once in a row, so a
            // loop that keeps stalling still finds a dead peer.
            if stalled && !self.stall_excused {
                self.stall_excused = true;
                return Ok(());
            }
            return Err(self.shared.down_err(format!(
                "no heartbeat or message from node {} for {:?} (timeout {:?}; this loop's previous check was {:?} before)",
                cfg.peer_node_id, silent, cfg.heartbeat_timeout, since_tick
            )));
        }
        self.stall_excused = false;
        if let Some((_, oldest)) = self.inflight.first_key_value() {
            if now.duration_since(oldest.sent) > cfg.ack_timeout {
                return Err(self.shared.down_err(format!(
                    "node {} did not acknowledge a record within {:?}",
                    cfg.peer_node_id, cfg.ack_timeout
                )));
            }
        }
        if let Some((_, oldest)) = self.requests.first_key_value() {
            if now.duration_since(oldest.sent) > cfg.request_timeout {
                return Err(self.shared.down_err(format!(
                    "node {} did not answer a request within {:?}",
                    cfg.peer_node_id, cfg.request_timeout
                )));
            }
        }
        if now.duration_since(self.last_ping) >= cfg.heartbeat_interval {
            self.last_ping = now;
            self.outbox.push_back(Msg::Ping {
                stamp: self.shared.now_stamp(),
            });
        }
        Ok(())
    }

    pub(crate) fn protocol(&self, what: String) -> LinkError {
        self.shared.down_err(format!("protocol error: {what}"))
    }

    /// The connection ended: fail everything still pending with `err`, each exactly once.
    pub(crate) fn fail_all(&mut self, err: &LinkError) {
        let stats = &self.shared.stats;
        for (_, p) in std::mem::take(&mut self.inflight) {
            Stats::count(&stats.failed);
            let _ = p.reply.send(Err(err.clone()));
        }
        for (_, p) in std::mem::take(&mut self.requests) {
            Stats::count(&stats.requests_failed);
            let _ = p.reply.send(Err(err.clone()));
        }
        self.records.clear();
        self.data_out.clear();
        self.serving.clear();
        self.jobs.clear();
    }
}

#[cfg(test)]
mod tests;
