//! The right to serve: whether this node may serve its ranges (acknowledge writes, return
//! reads) and write the medium right now.
//!
//! The disk lease (`lease`) is the arbiter. One more proof is accepted for serving: the
//! partner answered one of our heartbeats over the mirror link less than `VOUCH` x its
//! heartbeat timeout ago, on the connection that was up when we last held our lease. The
//! partner takes over only after calling the link down (no message from us for its
//! heartbeat timeout) AND our heartbeat dead on the disk, so while it still hears us it
//! takes nothing, whatever the disk says; this keeps a node whose path to the medium failed
//! serving while the partner writes its batches for it. A connection that dropped in
//! between proves nothing (the partner may have taken over meanwhile), until the lease is
//! held again and the ownership table re-read.
//!
//! The lease alone is not enough either: a node that held it, lost it (paused, medium path
//! down) and gained it again may have lost ranges in between, so it serves by the lease
//! only once it has re-read the ownership table since (`Cluster::table_is_current`).

use crate::cluster::Cluster;
use crate::host::Host;
use crate::mirror::MirrorSlot;
use crate::ownership::ArbiterPlace;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The share of the partner's heartbeat timeout a heard heartbeat vouches for (below 1 by
/// more than the clock drift the leases allow, and the partner waits a little longer).
pub const VOUCH: f64 = 0.8;

pub(super) struct ServingRight {
    pub(super) host: Arc<dyn Host>,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) mirror: Arc<MirrorSlot>,
    /// 1 + the link generation that was up when the lease was last seen held (0: none).
    trusted_connection: AtomicU64,
}

impl ServingRight {
    pub(super) fn new(
        host: Arc<dyn Host>,
        cluster: Option<Arc<Cluster>>,
        mirror: Arc<MirrorSlot>,
    ) -> ServingRight {
        ServingRight {
            host,
            cluster,
            mirror,
            trusted_connection: AtomicU64::new(0),
        }
    }

    /// Notes the connection that is up while the lease is held (called every renewal
    /// interval; a connection that came up after the lease was lost is never trusted).
    pub(super) fn refresh(&self) {
        let Some(lease) = self.cluster.as_ref().and_then(|c| c.lease()) else {
            return;
        };
        if lease.holds() && self.cluster.as_ref().is_some_and(|c| c.table_is_current()) {
            let generation = self
                .mirror
                .current()
                .and_then(|m| m.heard_by_partner())
                .map_or(0, |(g, _)| g + 1);
            self.trusted_connection.store(generation, Ordering::SeqCst);
        }
    }

    /// May this node serve its ranges now?
    pub(super) fn may_serve(&self) -> bool {
        let Some(c) = &self.cluster else {
            return true;
        };
        let Some(lease) = c.lease() else {
            return true;
        };
        (lease.holds() && c.table_is_current()) || self.partner_hears_us(c)
    }

    fn partner_hears_us(&self, c: &Cluster) -> bool {
        let Some((generation, heard)) = self.mirror.current().and_then(|m| m.heard_by_partner())
        else {
            return false;
        };
        generation + 1 == self.trusted_connection.load(Ordering::SeqCst)
            && self.host.now() < self.host.link_instant(heard) + c.link_timeout().mul_f64(VOUCH)
    }

    /// May this node write the medium now (the write must land before the lease runs out)?
    /// Ok, or why not: `Err(true)` when the partner still hears us (it may write for us).
    pub(super) fn may_write_medium(&self) -> Result<(), (bool, String)> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let Some(lease) = c.lease() else {
            return Ok(());
        };
        let io = lease.timing().io_timeout;
        if lease.holds_for(io) && c.table_is_current() {
            return Ok(());
        }
        let heard = self.partner_hears_us(c);
        Err((
            heard,
            format!(
                "this node's {} does not hold for another {io:?} (its heartbeat on {} is not renewed){}",
                lease.place().lease(),
                lease.place().name(),
                // With each node its own medium nobody can write ours for us
                // (`NodeFlushContext::arbiter_failed`).
                if heard && !c.own_storage() {
                    "; the partner, which still hears us, writes for us"
                } else {
                    "; no medium writes until it holds again"
                }
            ),
        ))
    }

    /// Why I/O is refused when `may_serve` says no.
    pub(super) fn refusal(&self) -> String {
        let place = (self.cluster.as_ref())
            .and_then(|c| c.lease())
            .map_or(ArbiterPlace::SharedMedium, |l| l.place());
        format!(
            "this node does not hold its {} (its heartbeat on {} could not be renewed, or it was paused) and the partner does not vouch for it: it serves nothing until it holds the lease again",
            place.lease(),
            place.name()
        )
    }
}
