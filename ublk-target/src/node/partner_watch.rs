//! Watching the partner: when its mirror link comes up, mirroring resumes; when it goes
//! down, this node runs degraded and, with `takeover = "auto"`, takes over the partner's
//! ranges (claim, grace, replay, serve).

use crate::cluster::NodeId;
use crate::config::TakeoverPolicy;
use crate::engine::Engine;
use rdma_link::{Link, LinkState};
use std::sync::Arc;
use std::time::Duration;

pub struct PartnerWatch {
    pub engine: Arc<Engine>,
    pub link: Link,
    pub policy: TakeoverPolicy,
    /// How long a takeover waits between claiming the ranges and replaying them.
    pub grace: Duration,
    /// The node whose mirror we hold (the one we take over from).
    pub partner: NodeId,
}

impl PartnerWatch {
    /// Follows the link's state until the link is closed.
    pub async fn run(self) {
        let mut states = self.link.subscribe();
        let name = self
            .engine
            .cluster()
            .map(|c| c.node_name(self.partner).to_owned())
            .unwrap_or_default();
        let mut was_up = false;
        loop {
            let state = states.borrow_and_update().clone();
            match (&state, was_up) {
                (LinkState::Up(_), false) => {
                    tracing::info!("partner {name} connected: mirroring every write");
                    was_up = true;
                    self.engine
                        .partner_connected(self.policy == TakeoverPolicy::Auto);
                }
                (LinkState::Closed, _) => return,
                (LinkState::Up(_), true) => {}
                (_, true) => {
                    was_up = false;
                    tracing::warn!("partner {name} is down ({state:?}): running degraded");
                    self.partner_down(&name).await;
                }
                (_, false) => {}
            }
            if states.changed().await.is_err() {
                return;
            }
        }
    }

    async fn partner_down(&self, name: &str) {
        let owns = self
            .engine
            .cluster()
            .is_some_and(|c| !c.ranges_of(self.partner).is_empty());
        if self.policy == TakeoverPolicy::Auto && owns {
            if let Err(e) = self.engine.take_over(self.partner, self.grace).await {
                tracing::error!("automatic takeover from {name} failed: {e}");
            }
        }
    }
}
