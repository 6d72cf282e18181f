//! Faults injected on a log-shipping source's way to its destination, for tests only
//! (`NVMIRROR_TEST_SHIP_FAULTS`, a comma-separated list; unset in production): they show
//! that the destination logs every record once and in sequence order whatever the delivery
//! (claim set C, step 2), and names a gap that does not fill.
//!
//! * `duplicate`: every 5th record is posted twice.
//! * `reorder`: every 7th record is held back 20 ms, so later ones overtake it.
//! * `drop-once`: the 50th record is not posted at all, and its post reports success (the
//!   source then believes the destination holds it): the destination holds the records
//!   after it and names the missing seq until the source's flusher re-posts the batch.

use crate::host::Host;
use crate::mirror::{Mirror, PostFuture};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const ENV: &str = "NVMIRROR_TEST_SHIP_FAULTS";

const DUPLICATE_EVERY: u64 = 5;
const REORDER_EVERY: u64 = 7;
const REORDER_DELAY: Duration = Duration::from_millis(20);
const DROP_AT: u64 = 50;

#[derive(Debug, Default)]
pub struct ShipFaults {
    duplicate: bool,
    reorder: bool,
    drop_once: bool,
    posts: AtomicU64,
}

impl ShipFaults {
    /// The faults `NVMIRROR_TEST_SHIP_FAULTS` asks for (None if it is unset or empty); an
    /// unknown word is an error naming the ones there are.
    pub fn from_env() -> anyhow::Result<Option<ShipFaults>> {
        match std::env::var(ENV) {
            Ok(list) => Self::parse(&list),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => anyhow::bail!("{ENV}: {e}"),
        }
    }

    fn parse(list: &str) -> anyhow::Result<Option<ShipFaults>> {
        let mut faults = ShipFaults::default();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "duplicate" => faults.duplicate = true,
                "reorder" => faults.reorder = true,
                "drop-once" => faults.drop_once = true,
                other => anyhow::bail!(
                    "{ENV}: unknown fault {other:?} (test only: duplicate, reorder, drop-once)"
                ),
            }
        }
        Ok((faults.duplicate || faults.reorder || faults.drop_once).then_some(faults))
    }

    /// Posts `post` on `link` with the faults applied.
    pub fn post(
        &self,
        link: &rdma_link::Link,
        host: &Arc<dyn Host>,
        post: rdma_link::Post,
    ) -> PostFuture {
        let n = self.posts.fetch_add(1, Ordering::Relaxed) + 1;
        if self.drop_once && n == DROP_AT {
            tracing::warn!(
                partition = post.partition,
                seq = post.seq,
                "test fault: dropped (never posted, reported as posted)"
            );
            return Box::pin(async { Ok(()) });
        }
        if self.duplicate && n.is_multiple_of(DUPLICATE_EVERY) {
            tracing::info!(
                partition = post.partition,
                seq = post.seq,
                "test fault: duplicated"
            );
            // Both are awaited, so the copy surely goes out (with the window full a post
            // waits for a slot inside its future); the first one's answer counts.
            let (first, copy) = (Mirror::post(link, post), Mirror::post(link, post));
            return Box::pin(async move {
                let answer = first.await;
                let _ = copy.await;
                answer
            });
        }
        if self.reorder && n.is_multiple_of(REORDER_EVERY) {
            tracing::info!(
                partition = post.partition,
                seq = post.seq,
                "test fault: held back {REORDER_DELAY:?}"
            );
            let (link, host) = (link.clone(), host.clone());
            return Box::pin(async move {
                host.sleep(REORDER_DELAY).await;
                Mirror::post(&link, post).await
            });
        }
        Mirror::post(link, post)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_parsed_and_an_unknown_fault_named() {
        assert!(ShipFaults::parse("").expect("empty").is_none());
        let f = ShipFaults::parse("duplicate, reorder,drop-once")
            .expect("valid")
            .expect("some");
        assert!(f.duplicate && f.reorder && f.drop_once);
        let e = ShipFaults::parse("duplicate,lose").expect_err("unknown");
        assert!(e.to_string().contains("\"lose\""), "{e}");
    }
}
