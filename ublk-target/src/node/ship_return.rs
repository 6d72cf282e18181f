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
//! export is what keeps it from serving a volume served elsewhere). So the source asks
//! again at every reconnect (`watch_volume`): a source cut off while the destination
//! exported its volume hears "exported" (or "returning") when the link comes back and stops
//! serving at once (every partition stops: EIO), keeping what it wrote meanwhile in its
//! NVRAM for the next start. Its writes while it was cut off are not in the images: an
//! export without fencing can lose them (docs/log-shipping.md).

use crate::cluster::wire;
use crate::engine::Engine;
use anyhow::{bail, Context};
use rdma_link::{Link, LinkState};
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
        .block_on(volume_state(link, false))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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

/// Asks the destination over `link` what its copy of our volume is; `serving`: we serve
/// already (so a "returning" answer is not ours to act on now: the destination must not
/// treat this connection as the one taking the volume back).
async fn volume_state(link: &Link, serving: bool) -> Result<wire::ShipState, String> {
    let asker = if serving {
        wire::SHIP_STATE_WHILE_SERVING
    } else {
        wire::SHIP_STATE_BEFORE_SERVING
    };
    let answer = link
        .request(wire::encode(wire::OP_SHIP_STATE, 0, asker, 0, &[]))
        .await
        .map_err(|e| format!("asking the destination about our volume: {e}"))?;
    wire::answer(&answer)
        .map_err(|e| format!("the destination did not say what became of our volume: {e}"))
        .and_then(|a| {
            wire::ShipState::decode(a)
                .ok_or_else(|| "the destination's answer about our volume is malformed".into())
        })
}

/// While this node serves: asks the destination about our volume on every connection of
/// `link` (each new generation) and every [`ASK_EVERY`] while it stays up (an export that
/// began just before a reconnect, or a question that failed), and stops serving it
/// (`Engine::stop_serving_volume`) once the destination says it exported it. Runs on a
/// thread of its own until the link closes.
pub fn watch_volume(
    engine: Arc<Engine>,
    link: Link,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the volume watch")?;
    std::thread::Builder::new()
        .name("volume-watch".into())
        .spawn(move || rt.block_on(keep_asking(engine, link)))
        .context("spawning the volume watch")
}

/// How often a serving source asks again while its link stays up.
const ASK_EVERY: Duration = Duration::from_secs(5);

async fn keep_asking(engine: Arc<Engine>, link: Link) {
    let mut states = link.subscribe();
    let mut asked: Option<(u64, Instant)> = None;
    let mut warned_on = None;
    loop {
        let up = match &*states.borrow_and_update() {
            LinkState::Closed => return,
            LinkState::Up(info) => Some(info.generation),
            _ => None,
        };
        let due = |g: u64| asked.is_none_or(|(on, at)| on != g || at.elapsed() >= ASK_EVERY);
        if let Some(generation) = up.filter(|&g| due(g)) {
            asked = Some((generation, Instant::now()));
            match volume_state(&link, true).await {
                Ok(wire::ShipState::Shipping) => {}
                Ok(state @ (wire::ShipState::Exported(at) | wire::ShipState::Returning(at))) => {
                    let then = if matches!(state, wire::ShipState::Returning(_)) {
                        "it was given back since (return-image): stop this node and start it again, and it takes the volume back"
                    } else {
                        "stop this node; it takes the volume back when started after `nvmirrorctl return-image --source NAME` on the destination"
                    };
                    let why = format!(
                        "the destination says it exported our volume (Unix time {at}) while this node was cut off from it, and serves it from its images: this node stopped serving it. Writes acknowledged here since the cut are not in the images; {}",
                        then.replace("NAME", engine.node_name())
                    );
                    tracing::error!("{why}");
                    engine.stop_serving_volume(&why);
                    return;
                }
                // The link went down under the question: the next connection asks again.
                Err(e) if !link.state().is_up() => tracing::debug!("{e}"),
                // A destination that cannot answer is no proof of an export: keep serving,
                // and ask again in a while.
                Err(e) if warned_on != Some(generation) => {
                    tracing::warn!("{e}; asking again every {ASK_EVERY:?}");
                    warned_on = Some(generation);
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
        let changed = std::pin::pin!(states.changed());
        let tick = std::pin::pin!(tokio::time::sleep(ASK_EVERY));
        if let futures::future::Either::Left((Err(_), _)) =
            futures::future::select(changed, tick).await
        {
            return;
        }
    }
}
