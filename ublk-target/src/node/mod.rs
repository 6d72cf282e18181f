//! The daemon's behaviour, as a library so that tests and the simulator run the same code:
//! starting the mirror link a config describes and wiring it into the engine (`link`),
//! watching the partner and taking over when it dies (`partner_watch`), answering
//! `nvmirrorctl` (`control_handler`), the OpenMetrics endpoint (`metrics`), and the daemon's life from start-up to a drained
//! stop (`daemon`), or a log-shipping destination's (`destination`); a log-shipping source asks its destination about its volume before it serves (`ship_return`). `nvmirrord`'s `main` only parses its arguments and calls
//! [`daemon::run`].

pub mod control_handler;
pub mod daemon;
pub mod destination;
pub mod link;
pub mod metrics;
pub mod partner_watch;
pub mod ship_faults;
pub mod ship_return;
pub mod signals;
pub mod tiebreaker;
