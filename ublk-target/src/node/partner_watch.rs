//! Watching the partner: when its mirror link comes up, mirroring resumes; while it is down,
//! this node runs degraded and, with `takeover = "auto"`, takes over the partner's ranges
//! only once the partner is provably dead: its heartbeat on the shared medium has stopped
//! (`lease::Verdict::Dead`) and the link has been down a little longer than the partner's
//! own proof that we hear it could last (`engine::serving`). A link cut with both nodes
//! alive moves nothing: each keeps its ranges. A partner whose heartbeat never shows on our
//! medium while it is connected is on another medium: that is reported, and never taken
//! over.

use crate::cluster::NodeId;
use crate::config::TakeoverPolicy;
use crate::engine::Engine;
use crate::lease::Verdict;
use crate::ownership::ArbiterPlace;
use rdma_link::{Link, LinkState};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct PartnerWatch {
    pub engine: Arc<Engine>,
    pub link: Link,
    pub policy: TakeoverPolicy,
    /// Without a disk lease (unit tests): how long a takeover waits between claiming the
    /// ranges and replaying them. With one, the lease already proved the partner stopped.
    pub grace: Duration,
    /// The node whose mirror we hold (the one we take over from).
    pub partner: NodeId,
}

/// How often the watch looks at the partner's heartbeat.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// With `storage = "own"`: how often, while the link is up, the outdated marks are looked
/// at for ranges to resync.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// With `storage = "own"`, until the link closes: while it is up, tries again the partner's
/// releases whose copies were kept because marking our medium failed
/// (`SecondStoreArea::retry_kept_releases`), repairs every range we own that our own medium
/// is outdated for (`engine::repair`), then copies every range we own that the partner's
/// medium is outdated for (`engine::resync`).
pub async fn resync_while_up(engine: Arc<Engine>, link: Link) {
    if !engine.cluster().is_some_and(|c| c.own_storage()) {
        return;
    }
    let host = engine.host().clone();
    let mut last_error = String::new();
    loop {
        host.sleep(RESYNC_EVERY).await;
        match &*link.subscribe().borrow() {
            LinkState::Closed => return,
            LinkState::Up(_) => {}
            _ => continue,
        }
        if let Some(ss) = engine.second_store() {
            // Blocking: marking writes the arbiter, and writing copies our medium.
            crate::host::run_blocking(host.as_ref(), move || ss.retry_kept_releases()).await;
        }
        let ask = |req: Vec<u8>| ask_partner(link.clone(), req);
        let asked = match engine.finish_restart_sync(ask).await {
            Ok(()) => engine.repair_own_medium(ask).await,
            Err(e) => Err(e),
        };
        let asked = match asked {
            Ok(_) => engine.resync_partner(ask).await,
            Err(e) => Err(e),
        };
        match asked {
            Ok(_) => last_error.clear(),
            Err(e) if e != last_error => {
                tracing::error!("resync failed (retried while the link is up): {e}");
                last_error = e;
            }
            Err(_) => {}
        }
    }
}

impl PartnerWatch {
    /// Follows the link's state until the link is closed.
    pub async fn run(self) {
        let mut states = self.link.subscribe();
        let name = self
            .engine
            .cluster()
            .map(|c| c.node_name(self.partner).to_owned())
            // Without a cluster the link goes to a log-shipping destination.
            .unwrap_or_else(|| "(the log-shipping destination)".to_owned());
        let host = self.engine.host().clone();
        let mut was_up = false;
        let mut down_since = host.now();
        let mut up_since = host.now();
        // The partner was connected while its heartbeat stayed absent from our medium.
        let mut not_on_our_medium = false;
        // The last automatic takeover's error while it keeps failing (logged once, not at
        // every look).
        let mut takeover_failed = String::new();
        // The node's link and mirror state as the event stream shows them, raised by a task
        // of its own: this loop can wait out a whole takeover.
        let raising = self.engine.host().spawn(
            "link-events",
            Box::pin(raise_link_changes(self.link.subscribe())),
        );
        if let Err(e) = raising {
            tracing::warn!("no task for the link's state changes ({e}): `nvmirrorctl events` shows them at its polls only");
        }
        loop {
            let state = states.borrow_and_update().clone();
            match (&state, was_up) {
                (LinkState::Closed, _) => return,
                (LinkState::Up(_), false) => {
                    tracing::info!("partner {name} connected: mirroring every write");
                    was_up = true;
                    up_since = host.now();
                    not_on_our_medium = false;
                    takeover_failed.clear();
                    self.engine.set_takeover_note(None);
                    self.engine.partner_connected();
                }
                (LinkState::Up(_), true) => {
                    self.check_same_medium(&name, up_since, &mut not_on_our_medium)
                }
                (_, true) => {
                    was_up = false;
                    down_since = host.now();
                    tracing::warn!("partner {name} is down ({state:?}): running degraded");
                }
                (_, false) => {}
            }
            if !was_up {
                self.consider_takeover(&name, down_since, not_on_our_medium, &mut takeover_failed)
                    .await;
            }
            let changed = std::pin::pin!(states.changed());
            if let futures::future::Either::Left((Err(_), _)) =
                futures::future::select(changed, host.sleep(LOOK_EVERY)).await
            {
                return;
            }
        }
    }

    /// The link is up: the partner holds its disk lease (it connects only once it does), so
    /// its heartbeat must show on our medium within a few renewals. If it never does, the
    /// two configs name different media: the disk lease cannot arbitrate between them (and
    /// a takeover would serve this medium's stale copy of the partner's flushed writes).
    /// Say so loudly; `consider_takeover` then refuses with the same reason.
    fn check_same_medium(&self, name: &str, up_since: Instant, reported: &mut bool) {
        let Some(lease) = self.engine.cluster().and_then(|c| c.lease().cloned()) else {
            return;
        };
        let host = self.engine.host();
        let place = lease.place();
        let heartbeat = place.heartbeat();
        let (seen_on, mismatch) = match place {
            ArbiterPlace::SharedMedium => (
                "this node's medium",
                "the nodes do not see the same medium (check lun.medium on both)",
            ),
            ArbiterPlace::Device => (
                "this node's arbiter device",
                "the nodes do not see the same arbiter device (check cluster.arbiter on both)",
            ),
            ArbiterPlace::Voters => (
                "this node's voters",
                "the nodes do not ask the same voters (check cluster.id and cluster.voters on both: the same tie-breaker and vote port)",
            ),
        };
        let patience = lease.timing().dead_after() * 2;
        let absent = matches!(lease.verdict(self.partner), Verdict::Absent);
        if absent && host.now().saturating_duration_since(up_since) >= patience {
            if !*reported {
                tracing::error!(
                    "partner {name} has been connected over the mirror link for {} ms, but its {heartbeat} never appeared on {seen_on} ({}): the two nodes do not see the same medium. Each node's lun.medium must be the same shared disk, or with storage = \"own\" (each node its own disk) both must name the same cluster.arbiter (with [cluster.voters]: the same tie-breaker and vote port). Until that is fixed this node will not take over {name}'s ranges",
                    patience.as_millis(),
                    self.engine
                        .luns()
                        .iter()
                        .map(|l| format!("{}: {}", l.name, l.medium.describe()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.engine.set_takeover_note(Some(format!(
                    "node {name} is connected but its {heartbeat} never appeared on {seen_on}: {mismatch}"
                )));
                *reported = true;
                self.engine.set_partner_elsewhere(true);
            }
        } else if !absent && *reported {
            tracing::info!("partner {name}'s {heartbeat} now shows on {seen_on}");
            self.engine.set_takeover_note(None);
            *reported = false;
            self.engine.set_partner_elsewhere(false);
        }
    }

    /// The link is down: take over if the partner is provably dead, else say why not.
    /// `failed` holds the last try's error while tries keep failing: a try refused for the
    /// same reason (a range whose only copies are the dead claimer's, retried every look)
    /// is logged once.
    async fn consider_takeover(
        &self,
        name: &str,
        down_since: Instant,
        not_on_our_medium: bool,
        failed: &mut String,
    ) {
        let engine = &self.engine;
        let Some(c) = engine.cluster() else { return };
        if c.ranges_of(self.partner).is_empty() {
            engine.set_takeover_note(None);
            return;
        }
        if self.policy != TakeoverPolicy::Auto {
            engine.set_takeover_note(Some(format!(
                "takeover = manual: node {name}'s ranges wait for it or for `nvmirrorctl takeover` (a cluster manager)"
            )));
            return;
        }
        let grace = match c.lease() {
            None => self.grace,
            Some(lease) => {
                let quiet = engine.host().now().saturating_duration_since(down_since);
                // Longer than the partner's proof that we hear it can last.
                let link_margin = c.link_timeout() / 2;
                let place = lease.place();
                let (on, lease_name, heartbeat) = (place.name(), place.lease(), place.heartbeat());
                let wait = match lease.verdict(self.partner) {
                    Verdict::Alive { ago } => format!(
                        "node {name} is alive on {on} (heartbeat {} ms ago) but unreachable over the mirror link: no takeover, its ranges wait for the link",
                        ago.as_millis()
                    ),
                    Verdict::Unknown => format!("this node does not hold its {lease_name}, so it cannot tell whether the partner is dead: no takeover"),
                    Verdict::Absent if not_on_our_medium => format!(
                        "node {name} was connected but its heartbeat never appeared on {on} as this node sees it: the two nodes do not see the same {}, so no takeover (see the error in the log)",
                        if place == ArbiterPlace::Voters { "voters" } else { "medium" }
                    ),
                    Verdict::Absent => format!("node {name} has never written a heartbeat on {on} (never started): no takeover"),
                    Verdict::Dead { .. } if quiet < link_margin => format!(
                        "node {name} is dead on {on}; taking over once the link has been quiet for {link_margin:?}"
                    ),
                    Verdict::Dead { silent } => {
                        if failed.is_empty() {
                            tracing::warn!(
                            "node {name}'s {heartbeat} has not changed for {} ms and the mirror link is down: taking over its ranges",
                            silent.as_millis()
                        );
                        }
                        String::new()
                    }
                };
                if !wait.is_empty() {
                    engine.set_takeover_note(Some(wait));
                    return;
                }
                Duration::ZERO
            }
        };
        engine.set_takeover_note(Some(format!("taking over node {name}'s ranges")));
        match engine.take_over(self.partner, grace).await {
            Ok(_) => {
                failed.clear();
                engine.set_takeover_note(None);
            }
            Err(e) => {
                let e = e.to_string();
                if e != *failed {
                    tracing::error!(
                        "automatic takeover from {name} failed (retried while it stays down): {e}"
                    );
                }
                engine.set_takeover_note(Some(format!("automatic takeover failed: {e}")));
                *failed = e;
            }
        }
    }
}

/// Raises each state of the link for the event stream until the link is closed.
async fn raise_link_changes(mut states: tokio::sync::watch::Receiver<LinkState>) {
    loop {
        crate::transitions::changed();
        if matches!(*states.borrow_and_update(), LinkState::Closed)
            || states.changed().await.is_err()
        {
            return;
        }
    }
}

/// One request to the partner and its raw answer (the engine's resync and verify ask so).
pub async fn ask_partner(link: Link, req: Vec<u8>) -> Result<Vec<u8>, String> {
    link.request(req)
        .await
        .map(|a| a.to_vec())
        .map_err(|e| e.to_string())
}
