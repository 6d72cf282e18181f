//! When the partner (re)connects: it learns what it may release (our records already on
//! the medium), and it gets a copy of every unflushed record it lacks (those staged while it
//! was away, single-copy until now) before the pair counts as mirrored again: until then,
//! flushes keep leaving flush marks on the medium.

use super::core::Engine;
use super::datapath::mirror_post;
use std::sync::Arc;

impl Engine {
    /// The mirror link to the partner came up: mirroring resumes for every new write, and
    /// losing the partner from now on is ridden out by I/O to its ranges (see
    /// [`Engine::set_takeover_expected`]). Whatever is already on the medium may go from the
    /// partner's second store: after our restart it still holds copies of records that our
    /// start-up replay flushed, and replaying those later would write old data over new.
    /// Then the records it lacks are copied to it, in the background.
    pub fn partner_connected(self: &Arc<Self>) {
        self.set_takeover_expected(true);
        let Some(m) = self.mirror.current() else {
            return;
        };
        // (Records our restart skipped because the partner took their ranges over are among
        // them: its second store keeps those while its takeover is under way, see
        // `SecondStoreArea::pin`.)
        for p in &self.parts {
            // Not records a start keeps until the partner's medium has them (`restart_sync`).
            let flushed = p.partner_release_through();
            if flushed > 0 {
                m.release(p.id, flushed);
            }
        }
        let engine = self.clone();
        let resync = async move { engine.remirror().await };
        if let Err(e) = self.host.spawn("remirror", Box::pin(resync)) {
            tracing::error!("cannot start copying the unmirrored records to the partner: {e}");
        }
    }

    /// Copies every unflushed record to the partner until a pass ends with no write having
    /// gone unmirrored since it began; then the pair counts as mirrored again.
    async fn remirror(&self) {
        loop {
            let (unmirrored, events) = self.mirror.unmirrored();
            if !unmirrored {
                return;
            }
            let Some(m) = self.mirror.current() else {
                return;
            };
            // A partition that stopped (fenced: its node lost a range while it could not
            // hear about it) holds records the range's new owner has superseded, or writes
            // that were refused and never acknowledged: handing them on would let a later
            // takeover by the partner replay them over newer data (simulator seed 100306).
            let posts: Vec<rdma_link::Post> = self
                .parts
                .iter()
                .filter(|p| !p.is_failed())
                .flat_map(|p| {
                    // Nor dead records (of a range this node lost, `lost_ranges`): the
                    // partner might hold them without the void record that kills them.
                    p.unflushed()
                        .into_iter()
                        .filter(|r| !p.is_dead(r.lun, r.offset, r.len, r.seq))
                        .map(|r| mirror_post(p, &r))
                })
                .collect();
            if !posts.is_empty() {
                tracing::info!(
                    "copying {} record(s) staged while the partner was away to its second store",
                    posts.len()
                );
            }
            self.mirror.set_resync_left(posts.len() as u64);
            let copies = posts.into_iter().map(|post| {
                let sent = m.post(post);
                async move {
                    let r = sent.await;
                    self.mirror.resync_done_one();
                    r
                }
            });
            let results = futures::future::join_all(copies).await;
            self.mirror.set_resync_left(0);
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                tracing::warn!("copying staged records to the partner stopped: {e}; the next connection tries again");
                return;
            }
            if self.mirror.partner_resynced_if(events) {
                tracing::info!(
                    "the partner holds a copy of every unflushed record: mirrored again"
                );
                return;
            }
        }
    }
}
