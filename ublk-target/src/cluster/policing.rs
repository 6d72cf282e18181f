//! The policing protocol of shared-nothing mode (issue #17, claim set B): which node has write
//! priority for a portion of the LUN, so that both nodes' media apply overlapping writes in
//! one order. Not wired into the engine yet (see docs/shared-nothing.md); the simulator in
//! `sim/src/policing.rs` tries to break it.
//!
//! Per portion one node holds write priority, with an epoch. Writes to a portion run only on
//! its holder (its staging log then fixes their order for both media). A write arriving at a
//! node without priority is queued, in arrival order, and the node asks the holder for the
//! priority. The holder, once it has held the portion for `min_hold` (so that two writers
//! do not bounce it back and forth on every write), stops starting new writes to it, waits
//! for its writes in flight to complete, and hands the priority over with the epoch bumped.
//! The new holder starts its queued writes in their order. A node asked for a portion it no
//! longer holds says who it gave it to, and the asker asks there.
//!
//! Messages between two nodes arrive in the order they were sent (the mirror link is one
//! ordered connection); they may take any time. Node failures are not this protocol's
//! business: the arbiter (`quorum`) and the takeover move a dead node's portions.
//!
//! Times are nanoseconds of the node's own clock, passed in by the caller.

use std::collections::{BTreeMap, VecDeque};

pub type NodeId = u32;
pub type Portion = u64;
/// The caller's handle of one write.
pub type WriteId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicingMessage {
    /// `from` asks for write priority on `portion`; `epoch` is the newest it knows.
    Ask {
        from: NodeId,
        portion: Portion,
        epoch: u64,
    },
    /// The priority on `portion` is `to`'s from `epoch` on.
    Grant {
        to: NodeId,
        portion: Portion,
        epoch: u64,
    },
    /// The sender does not hold `portion`: as far as it knows, `holder` does, since `epoch`.
    NotHere {
        portion: Portion,
        holder: NodeId,
        epoch: u64,
    },
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this write now (stage it; its order in the portion is fixed here).
    Start(WriteId),
    Send(NodeId, PolicingMessage),
}

/// Deliberate mistakes, for the simulator's own tests. The daemon never sets any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flaws {
    /// Hand over without waiting for the writes in flight.
    pub grant_before_drained: bool,
    /// Start queued writes in the reverse of their arrival order.
    pub lifo_queue: bool,
}

#[derive(Clone, Debug)]
enum Priority {
    Mine {
        epoch: u64,
        since: u64,
        in_flight: u32,
        /// Asked for by these nodes (first come, first served).
        asked_by: VecDeque<NodeId>,
    },
    Theirs {
        holder: NodeId,
        epoch: u64,
        /// We asked (and wait for a grant or a redirection).
        asked: bool,
    },
}

#[derive(Clone, Debug)]
struct PortionState {
    priority: Priority,
    queued: VecDeque<WriteId>,
}

pub struct Policing {
    me: NodeId,
    min_hold_ns: u64,
    /// Who holds a portion nobody has asked about yet (the configured owner).
    initial_holder: Box<dyn Fn(Portion) -> NodeId + Send + Sync>,
    portions: BTreeMap<Portion, PortionState>,
    flaws: Flaws,
    /// Handovers this node made (for the contention benchmark).
    pub handed_over: u64,
}

impl Policing {
    pub fn new(
        me: NodeId,
        min_hold_ns: u64,
        initial_holder: Box<dyn Fn(Portion) -> NodeId + Send + Sync>,
        flaws: Flaws,
    ) -> Policing {
        Policing {
            me,
            min_hold_ns,
            initial_holder,
            portions: BTreeMap::new(),
            flaws,
            handed_over: 0,
        }
    }

    fn state(&mut self, portion: Portion) -> &mut PortionState {
        let me = self.me;
        let holder = (self.initial_holder)(portion);
        self.portions
            .entry(portion)
            .or_insert_with(|| PortionState {
                priority: if holder == me {
                    Priority::Mine {
                        epoch: 1,
                        since: 0,
                        in_flight: 0,
                        asked_by: VecDeque::new(),
                    }
                } else {
                    Priority::Theirs {
                        holder,
                        epoch: 1,
                        asked: false,
                    }
                },
                queued: VecDeque::new(),
            })
    }

    /// Whether this node holds `portion` (and may start writes in it, unless it is handing
    /// it over).
    pub fn holds(&self, portion: Portion) -> Option<u64> {
        match self.portions.get(&portion).map(|s| &s.priority) {
            Some(Priority::Mine { epoch, .. }) => Some(*epoch),
            Some(Priority::Theirs { .. }) => None,
            None => ((self.initial_holder)(portion) == self.me).then_some(1),
        }
    }

    /// Writes waiting for the priority on `portion`.
    pub fn queued(&self, portion: Portion) -> usize {
        self.portions.get(&portion).map_or(0, |s| s.queued.len())
    }

    /// A write to `portion` arrived.
    pub fn submit(&mut self, now: u64, portion: Portion, write: WriteId) -> Vec<Action> {
        let st = self.state(portion);
        st.queued.push_back(write);
        self.progress(now, portion)
    }

    /// A write started here has completed (durable in both stores).
    pub fn completed(&mut self, now: u64, portion: Portion) -> Vec<Action> {
        if let Priority::Mine { in_flight, .. } = &mut self.state(portion).priority {
            *in_flight = in_flight.saturating_sub(1);
        }
        self.progress(now, portion)
    }

    /// Time passes: a holder whose minimum hold ran out hands over to a waiting asker.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let waiting: Vec<Portion> = self
            .portions
            .iter()
            .filter(|(_, s)| matches!(&s.priority, Priority::Mine { asked_by, .. } if !asked_by.is_empty()))
            .map(|(&p, _)| p)
            .collect();
        waiting
            .into_iter()
            .flat_map(|p| self.progress(now, p))
            .collect()
    }

    pub fn receive(&mut self, now: u64, msg: PolicingMessage) -> Vec<Action> {
        match msg {
            PolicingMessage::Ask {
                from,
                portion,
                epoch: _,
            } => {
                let me = self.me;
                let st = self.state(portion);
                match &mut st.priority {
                    Priority::Mine { asked_by, .. } => {
                        if !asked_by.contains(&from) && from != me {
                            asked_by.push_back(from);
                        }
                        self.progress(now, portion)
                    }
                    Priority::Theirs { holder, epoch, .. } => vec![Action::Send(
                        from,
                        PolicingMessage::NotHere {
                            portion,
                            holder: *holder,
                            epoch: *epoch,
                        },
                    )],
                }
            }
            PolicingMessage::Grant { to, portion, epoch } => {
                let me = self.me;
                let st = self.state(portion);
                if to == me {
                    st.priority = Priority::Mine {
                        epoch,
                        since: now,
                        in_flight: 0,
                        asked_by: VecDeque::new(),
                    };
                } else if let Priority::Theirs { epoch: known, .. } = st.priority {
                    if epoch > known {
                        st.priority = Priority::Theirs {
                            holder: to,
                            epoch,
                            asked: false,
                        };
                    }
                }
                self.progress(now, portion)
            }
            PolicingMessage::NotHere {
                portion,
                holder,
                epoch,
            } => {
                let me = self.me;
                let st = self.state(portion);
                if let Priority::Theirs {
                    holder: h,
                    epoch: e,
                    asked,
                } = &mut st.priority
                {
                    // Ask again where the priority went (or where we last heard it is).
                    if epoch >= *e && holder != me {
                        *h = holder;
                        *e = epoch;
                    }
                    *asked = false;
                }
                self.progress(now, portion)
            }
        }
    }

    /// Starts what may start, asks for what is missing, hands over what is due.
    fn progress(&mut self, now: u64, portion: Portion) -> Vec<Action> {
        let (me, min_hold, flaws) = (self.me, self.min_hold_ns, self.flaws);
        let st = self.state(portion);
        let mut out = Vec::new();
        let mut handed = false;
        match &mut st.priority {
            Priority::Mine {
                epoch,
                since,
                in_flight,
                asked_by,
            } => {
                let yielding = !asked_by.is_empty() && now >= *since + min_hold;
                if !yielding {
                    // Writes that arrived while nobody waits (or within the minimum hold).
                    while let Some(w) = pop(&mut st.queued, flaws) {
                        *in_flight += 1;
                        out.push(Action::Start(w));
                    }
                } else if *in_flight == 0 || flaws.grant_before_drained {
                    let to = asked_by.pop_front().unwrap_or(me);
                    let next = *epoch + 1;
                    // Tell the others where it went, so that their asks go there.
                    let others: Vec<NodeId> = asked_by.drain(..).collect();
                    out.push(Action::Send(
                        to,
                        PolicingMessage::Grant {
                            to,
                            portion,
                            epoch: next,
                        },
                    ));
                    for o in others {
                        out.push(Action::Send(
                            o,
                            PolicingMessage::NotHere {
                                portion,
                                holder: to,
                                epoch: next,
                            },
                        ));
                    }
                    st.priority = Priority::Theirs {
                        holder: to,
                        epoch: next,
                        asked: false,
                    };
                    handed = true;
                }
            }
            Priority::Theirs { .. } => {}
        }
        if let Priority::Theirs {
            holder,
            epoch,
            asked,
        } = &mut st.priority
        {
            if !st.queued.is_empty() && !*asked {
                *asked = true;
                out.push(Action::Send(
                    *holder,
                    PolicingMessage::Ask {
                        from: me,
                        portion,
                        epoch: *epoch,
                    },
                ));
            }
        }
        if handed {
            self.handed_over += 1;
        }
        out
    }
}

fn pop(q: &mut VecDeque<WriteId>, flaws: Flaws) -> Option<WriteId> {
    if flaws.lifo_queue {
        q.pop_back()
    } else {
        q.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Policing, Policing) {
        let owner = |_: Portion| 0;
        (
            Policing::new(0, 100, Box::new(owner), Flaws::default()),
            Policing::new(1, 100, Box::new(owner), Flaws::default()),
        )
    }

    fn sends(actions: &[Action]) -> Vec<PolicingMessage> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(_, m) => Some(m.clone()),
                Action::Start(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_write_without_priority_waits_for_the_holders_writes_then_runs_after_the_grant() {
        let (mut a, mut b) = pair();
        assert_eq!(a.submit(0, 7, 1), vec![Action::Start(1)]);
        // b's write queues and b asks.
        let asks = sends(&b.submit(0, 7, 2));
        assert_eq!(b.queued(7), 1);
        assert_eq!(asks.len(), 1);
        // a is within its minimum hold and has a write in flight: no grant yet.
        assert!(sends(&a.receive(10, asks[0].clone())).is_empty());
        // a's new write still queues behind the waiting asker once the hold ran out...
        assert!(a.submit(200, 7, 3).is_empty());
        // ...and a grants only when its write in flight completed.
        let grant = a.completed(210, 7);
        assert_eq!(a.holds(7), None);
        let msgs = sends(&grant);
        assert!(
            matches!(
                msgs[..],
                [
                    PolicingMessage::Grant {
                        to: 1,
                        epoch: 2,
                        ..
                    },
                    PolicingMessage::Ask { from: 0, .. }
                ]
            ),
            "{msgs:?}"
        );
        // b runs its queued write under epoch 2, then a's ask brings the priority back.
        assert_eq!(b.receive(215, msgs[0].clone()), vec![Action::Start(2)]);
        assert_eq!(b.holds(7), Some(2));
        assert!(sends(&b.receive(216, msgs[1].clone())).is_empty());
        let back = sends(&b.completed(400, 7));
        assert!(
            matches!(
                back[..],
                [PolicingMessage::Grant {
                    to: 0,
                    epoch: 3,
                    ..
                }]
            ),
            "{back:?}"
        );
        assert_eq!(a.receive(401, back[0].clone()), vec![Action::Start(3)]);
        assert_eq!((a.handed_over, b.handed_over), (1, 1));
    }
}
