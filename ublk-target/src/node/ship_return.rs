//! A log-shipping source before it serves (claim set C, docs/log-shipping.md): it asks its
//! destination what the destination's copy of its volume is (`wire::OP_SHIP_STATE`).
//! * Shipping: serve as usual.
//! * Exported: the volume was exported (the source was taken for dead) and is served from
//!   the destination's images: refuse to serve, naming the command that gives it back.
//! * Returning: the operator gave it back (`nvmirrorctl return-image` on the destination).
//!   Drain our log (the destination no longer logs it: the images are the volume), copy
//!   every block of our media that differs from the images (`Engine::take_back_lun`), then
//!   tell the destination where our log stands (`OP_SHIP_RETURNED`): from our next records
//!   on it logs and applies them again.
//!
//! A destination that cannot be reached within the wait cannot say: the source serves as
//! before (it cannot tell a dead destination from an export; fencing a source before its
//! export is what keeps it from serving a volume served elsewhere).

use crate::cluster::wire;
use crate::engine::Engine;
use anyhow::{bail, Context};
use rdma_link::Link;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the drain before a return may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Asks the destination over `link` (waiting up to `wait` for it to come up) and acts on its
/// answer; Err: this node must not serve.
pub fn before_serving(engine: &Arc<Engine>, link: &Link, wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    while !link.state().is_up() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !link.state().is_up() {
        tracing::warn!(
            "the destination did not answer within {wait:?}: serving without knowing whether it exported our volume (fence a source before exporting it)"
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the destination's questions")?;
    let ask = |req: Vec<u8>| {
        let link = link.clone();
        async move {
            let answer = link.request(req).await.map_err(|e| e.to_string())?;
            Ok::<Vec<u8>, String>(answer.to_vec())
        }
    };
    let state = rt
        .block_on(ask(wire::encode(wire::OP_SHIP_STATE, 0, 0, 0, &[])))
        .map_err(|e| anyhow::anyhow!("asking the destination about our volume: {e}"))?;
    let state = wire::answer(&state)
        .ok()
        .and_then(wire::ShipState::decode)
        .context("the destination's answer about our volume is malformed")?;
    match state {
        wire::ShipState::Shipping => Ok(()),
        wire::ShipState::Exported(at) => bail!(
            "the destination exported our volume at Unix time {at} and it is served from its images now: this node must not serve it. To take it back here, stop the node serving the images and run `nvmirrorctl return-image --source {}` on the destination, then start this node again",
            engine.node_name()
        ),
        wire::ShipState::Returning(at) => {
            tracing::warn!(
                "the destination gave our exported volume back (Unix time {at}): draining our log, then copying what differs from its images"
            );
            if !engine.drain_blocking(DRAIN_TIMEOUT) {
                bail!("our log did not drain within {DRAIN_TIMEOUT:?}: the volume was not taken back (start again to retry)");
            }
            for l in 0..engine.luns().len() as u32 {
                let t = rt
                    .block_on(engine.take_back_lun(l, &ask))
                    .map_err(|e| anyhow::anyhow!("taking LUN {l} back from the images: {e} (start again to retry)"))?;
                tracing::warn!(
                    lun = t.lun,
                    "taken back from the destination's image: {} of {} byte(s) differed and were copied ({} extent(s))",
                    t.copied_bytes,
                    t.compared_bytes,
                    t.copied_extents
                );
            }
            let returned = wire::ShipReturned {
                log_id: engine.log_id(),
                through: engine.log_heads(),
            };
            let answer = rt
                .block_on(ask(returned.encode()))
                .map_err(|e| anyhow::anyhow!("telling the destination the volume is back: {e}"))?;
            wire::answer(&answer).map_err(|e| {
                anyhow::anyhow!("the destination did not take the return: {e} (start again to retry)")
            })?;
            tracing::warn!(
                "our volume is back from the destination's images; shipping resumes after seqs {:?}",
                returned.through
            );
            Ok(())
        }
    }
}
