//! Waiting for rdma_cm and completion-channel events from tokio (the channels' fds are
//! non-blocking and registered with `AsyncFd`), and verbs errors in the link's terms.

use super::verbs::{ChannelFd, CmEvent, EventChannel, VerbsError};
use crate::error::{LinkError, Result};
use crate::shared::Shared;
use rdma_sys::rdma_cm_event_type as ev;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;

pub(super) fn verr(shared: &Shared, e: VerbsError) -> LinkError {
    shared.down_err(format!("RDMA {e}"))
}

/// Wait until a channel fd is readable (cancel-safe: nothing is taken from the channel).
pub(super) async fn readable(fd: &AsyncFd<ChannelFd>) -> std::io::Result<()> {
    let mut g = fd.readable().await?;
    g.clear_ready();
    Ok(())
}

/// Register an rdma_cm event channel with tokio.
pub(super) fn cm_afd(shared: &Shared, ch: &Arc<EventChannel>) -> Result<AsyncFd<ChannelFd>> {
    ChannelFd::Cm(ch.clone())
        .register()
        .map_err(|e| shared.down_err(format!("registering the rdma_cm channel with tokio: {e}")))
}

/// Wait for the next rdma_cm event on `ch`.
pub(super) async fn next_event(
    ch: &EventChannel,
    afd: &AsyncFd<ChannelFd>,
) -> std::result::Result<CmEvent, VerbsError> {
    loop {
        if let Some(e) = ch.get()? {
            return Ok(e);
        }
        readable(afd).await.map_err(|err| VerbsError {
            op: "waiting for an rdma_cm event",
            err,
        })?;
    }
}

/// Wait for the next rdma_cm event and require it to be `want`; `what` says what we were doing.
pub(super) async fn expect_event(
    shared: &Shared,
    ch: &EventChannel,
    afd: &AsyncFd<ChannelFd>,
    want: u32,
    what: &str,
) -> Result<()> {
    let e = next_event(ch, afd).await.map_err(|e| verr(shared, e))?;
    if e.kind() != want {
        let extra = match e.kind() {
            ev::RDMA_CM_EVENT_REJECTED => {
                " (connection refused: is the peer's nvmirror listening on that address?)"
            }
            ev::RDMA_CM_EVENT_ADDR_ERROR | ev::RDMA_CM_EVENT_ROUTE_ERROR => {
                " (no RDMA device routes to that address)"
            }
            ev::RDMA_CM_EVENT_UNREACHABLE => " (peer unreachable)",
            _ => "",
        };
        return Err(shared.down_err(format!(
            "{what}: got rdma_cm event {} (status {}){extra}",
            e.name(),
            e.status()
        )));
    }
    Ok(())
}
