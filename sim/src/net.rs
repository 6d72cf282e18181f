//! The simulated network between the nodes: connections that carry whole messages in order
//! (what `rdma_link::Network` asks for), with a latency per message, and the faults the
//! world injects: a direction cut (silently: nothing is delivered, nothing is refused, as a
//! pulled cable or a firewall drop), a connection reset, a duplicated message, latency
//! bursts, and a node whose power is cut (nothing it sent before arrives any more, and
//! connecting to it hangs) or whose process died (its sockets close: the peer sees the end
//! of the stream, and connecting is refused).

use bytes::Bytes;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rdma_link::{Connection, Listener, MessageReceiver, MessageSender, NetFuture, Network};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a message takes, one way.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub min: Duration,
    pub max: Duration,
}

struct NetState {
    rng: ChaCha8Rng,
    latency: Latency,
    /// During a burst every message takes this long (a congested or flapping path).
    burst: Option<(Instant, Duration)>,
    listeners: BTreeMap<SocketAddr, Arc<Accepts>>,
    /// Directions (from, to) that deliver nothing.
    cut: BTreeSet<(usize, usize)>,
    powered_off: BTreeSet<usize>,
    node_of: BTreeMap<IpAddr, usize>,
    pipes: Vec<Weak<Pipe>>,
    next_port: u16,
}

/// The network all nodes share.
pub struct SimNet {
    state: Mutex<NetState>,
}

struct Accepts {
    node: usize,
    queue: Mutex<VecDeque<(Connection, SocketAddr)>>,
    ready: Notify,
}

enum Item {
    Msg(Bytes),
    End,
}

/// One direction of a connection.
struct Pipe {
    from: usize,
    to: usize,
    net: Weak<SimNet>,
    state: Mutex<PipeState>,
    changed: Notify,
}

#[derive(Default)]
struct PipeState {
    queue: VecDeque<(Instant, Item)>,
    last_at: Option<Instant>,
    receiver_gone: bool,
    reset: bool,
    /// Sent by a node whose power was cut: never delivered.
    dead: bool,
    /// The other direction of the same connection.
    reverse: Weak<Pipe>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimNet {
    pub fn new(rng: ChaCha8Rng, latency: Latency, nodes: &[IpAddr]) -> Arc<SimNet> {
        Arc::new(SimNet {
            state: Mutex::new(NetState {
                rng,
                latency,
                burst: None,
                listeners: BTreeMap::new(),
                cut: BTreeSet::new(),
                powered_off: BTreeSet::new(),
                node_of: nodes.iter().enumerate().map(|(i, ip)| (*ip, i)).collect(),
                pipes: Vec::new(),
                next_port: 40000,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, NetState> {
        lock(&self.state)
    }

    /// The network as node `node` sees it.
    pub fn for_node(self: &Arc<Self>, node: usize) -> Arc<dyn Network> {
        Arc::new(NodeNet {
            net: self.clone(),
            node,
        })
    }

    fn live_pipes(&self) -> Vec<Arc<Pipe>> {
        let mut st = self.state();
        st.pipes.retain(|p| p.strong_count() > 0);
        st.pipes.iter().filter_map(Weak::upgrade).collect()
    }

    fn wake_all(&self) {
        for p in self.live_pipes() {
            p.changed.notify_waiters();
        }
    }

    /// Stops (or restarts) delivery from `from` to `to`.
    pub fn set_cut(&self, from: usize, to: usize, cut: bool) {
        {
            let mut st = self.state();
            if cut {
                st.cut.insert((from, to));
            } else {
                st.cut.remove(&(from, to));
            }
        }
        self.wake_all();
    }

    /// Whether delivery from `from` to `to` is stopped now.
    pub fn is_cut(&self, from: usize, to: usize) -> bool {
        self.state().cut.contains(&(from, to))
    }

    pub fn heal_all(&self) {
        self.state().cut.clear();
        self.wake_all();
    }

    /// Every message takes `latency` until `until`.
    pub fn latency_burst(&self, until: Instant, latency: Duration) {
        self.state().burst = Some((until, latency));
    }

    /// The node's power is cut: whatever it sent and was not delivered is lost.
    pub fn power_off(&self, node: usize) {
        self.state().powered_off.insert(node);
        for p in self.live_pipes() {
            if p.from == node {
                lock(&p.state).dead = true;
            }
            p.changed.notify_waiters();
        }
    }

    pub fn power_on(&self, node: usize) {
        self.state().powered_off.remove(&node);
    }

    /// Resets one open connection (both directions fail), picked with `pick` from the open
    /// ones in creation order. Returns whether there was one.
    pub fn reset_one(&self, pick: impl FnOnce(usize) -> usize) -> bool {
        let pipes: Vec<Arc<Pipe>> = self
            .live_pipes()
            .into_iter()
            .filter(|p| !lock(&p.state).receiver_gone)
            .collect();
        if pipes.is_empty() {
            return false;
        }
        let p = &pipes[pick(pipes.len()) % pipes.len()];
        let reverse = lock(&p.state).reverse.upgrade();
        for q in std::iter::once(p.clone()).chain(reverse) {
            lock(&q.state).reset = true;
            q.changed.notify_waiters();
        }
        true
    }

    /// Duplicates the next undelivered message of one open direction (a broken middlebox):
    /// the receiver must reject the stream, not act twice.
    pub fn duplicate_one(&self, pick: impl FnOnce(usize) -> usize) -> bool {
        let pipes: Vec<Arc<Pipe>> = self
            .live_pipes()
            .into_iter()
            .filter(|p| {
                let st = lock(&p.state);
                matches!(st.queue.front(), Some((_, Item::Msg(_))))
            })
            .collect();
        if pipes.is_empty() {
            return false;
        }
        let p = &pipes[pick(pipes.len()) % pipes.len()];
        let mut st = lock(&p.state);
        if let Some((at, Item::Msg(m))) = st.queue.front() {
            let copy = (*at, Item::Msg(m.clone()));
            st.queue.insert(1, copy);
        }
        drop(st);
        p.changed.notify_waiters();
        true
    }

    fn latency(&self) -> Duration {
        let mut st = self.state();
        let now = Instant::now();
        if let Some((until, d)) = st.burst {
            if now < until {
                return d;
            }
            st.burst = None;
        }
        let Latency { min, max } = st.latency;
        let span = max.saturating_sub(min).as_micros() as u64;
        min + Duration::from_micros(st.rng.gen_range(0..=span))
    }

    fn delivers(&self, from: usize, to: usize) -> bool {
        let st = self.state();
        !st.cut.contains(&(from, to)) && !st.powered_off.contains(&from)
    }
}

struct NodeNet {
    net: Arc<SimNet>,
    node: usize,
}

impl Network for NodeNet {
    fn connect(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Connection>> {
        let net = self.net.clone();
        let me = self.node;
        Box::pin(async move {
            tokio::time::sleep(net.latency()).await;
            let (accepts, target, reachable, my_ip, port) = {
                let mut st = net.state();
                let target = st.node_of.get(&addr.ip()).copied();
                let accepts = st.listeners.get(&addr).cloned();
                let reachable = target.is_some_and(|t| {
                    !st.cut.contains(&(me, t))
                        && !st.cut.contains(&(t, me))
                        && !st.powered_off.contains(&t)
                });
                let my_ip = st
                    .node_of
                    .iter()
                    .find(|(_, n)| **n == me)
                    .map(|(ip, _)| *ip);
                st.next_port = st.next_port.wrapping_add(1).max(40000);
                (accepts, target, reachable, my_ip, st.next_port)
            };
            if !reachable || target.is_none() {
                // The SYN is lost (a cut, or a powered-off host): the caller's timeout ends it.
                return std::future::pending().await;
            }
            let Some(accepts) = accepts else {
                // The host is up but nothing listens: refused at once.
                return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
            };
            let peer = accepts.node;
            let outbound = Pipe::new(&net, me, peer);
            let inbound = Pipe::new(&net, peer, me);
            lock(&outbound.state).reverse = Arc::downgrade(&inbound);
            lock(&inbound.state).reverse = Arc::downgrade(&outbound);
            let theirs = Connection {
                sender: Box::new(Sender(inbound.clone())),
                receiver: Box::new(Receiver(outbound.clone())),
            };
            let from = SocketAddr::new(my_ip.unwrap_or(addr.ip()), port);
            lock(&accepts.queue).push_back((theirs, from));
            accepts.ready.notify_waiters();
            Ok(Connection {
                sender: Box::new(Sender(outbound)),
                receiver: Box::new(Receiver(inbound)),
            })
        })
    }

    fn listen(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Box<dyn Listener>>> {
        let net = self.net.clone();
        let node = self.node;
        Box::pin(async move {
            let accepts = Arc::new(Accepts {
                node,
                queue: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
            });
            let mut st = net.state();
            if st.listeners.contains_key(&addr) {
                return Err(io::Error::from(io::ErrorKind::AddrInUse));
            }
            st.listeners.insert(addr, accepts.clone());
            drop(st);
            Ok(Box::new(SimListener {
                net: net.clone(),
                addr,
                accepts,
            }) as Box<dyn Listener>)
        })
    }
}

struct SimListener {
    net: Arc<SimNet>,
    addr: SocketAddr,
    accepts: Arc<Accepts>,
}

impl Listener for SimListener {
    fn accept(&mut self) -> NetFuture<'_, io::Result<(Connection, SocketAddr)>> {
        Box::pin(async move {
            loop {
                let ready = self.accepts.ready.notified();
                tokio::pin!(ready);
                ready.as_mut().enable();
                if let Some(c) = lock(&self.accepts.queue).pop_front() {
                    return Ok(c);
                }
                ready.await;
            }
        })
    }
}

impl Drop for SimListener {
    fn drop(&mut self) {
        let mut st = self.net.state();
        if st
            .listeners
            .get(&self.addr)
            .is_some_and(|a| Arc::ptr_eq(a, &self.accepts))
        {
            st.listeners.remove(&self.addr);
        }
    }
}

impl Pipe {
    fn new(net: &Arc<SimNet>, from: usize, to: usize) -> Arc<Pipe> {
        let p = Arc::new(Pipe {
            from,
            to,
            net: Arc::downgrade(net),
            state: Mutex::new(PipeState::default()),
            changed: Notify::new(),
        });
        net.state().pipes.push(Arc::downgrade(&p));
        p
    }

    /// Queues an item behind everything sent before it.
    fn push(&self, item: Item) {
        let latency = self.net.upgrade().map(|n| n.latency()).unwrap_or_default();
        let mut st = lock(&self.state);
        let at = (Instant::now() + latency).max(st.last_at.unwrap_or_else(Instant::now));
        st.last_at = Some(at);
        st.queue.push_back((at, item));
        drop(st);
        self.changed.notify_waiters();
    }
}

struct Sender(Arc<Pipe>);

impl MessageSender for Sender {
    fn send(&mut self, message: Bytes) -> NetFuture<'_, io::Result<()>> {
        Box::pin(async move {
            // A host without power sends no reset: its peer's data just goes nowhere.
            let peer_off = self
                .0
                .net
                .upgrade()
                .is_some_and(|n| n.state().powered_off.contains(&self.0.to));
            {
                let st = lock(&self.0.state);
                if st.reset {
                    return Err(io::Error::from(io::ErrorKind::ConnectionReset));
                }
                if st.receiver_gone && !peer_off {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                }
            }
            self.0.push(Item::Msg(message));
            Ok(())
        })
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.push(Item::End);
    }
}

struct Receiver(Arc<Pipe>);

impl MessageReceiver for Receiver {
    fn recv(&mut self) -> NetFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let pipe = &self.0;
            loop {
                let changed = pipe.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let wait_until = {
                    let delivers = pipe
                        .net
                        .upgrade()
                        .is_some_and(|n| n.delivers(pipe.from, pipe.to));
                    let mut st = lock(&pipe.state);
                    if st.reset {
                        return Err(io::Error::from(io::ErrorKind::ConnectionReset));
                    }
                    match st.queue.front() {
                        Some((at, _)) if delivers && !st.dead => {
                            if *at <= Instant::now() {
                                return Ok(match st.queue.pop_front() {
                                    Some((_, Item::Msg(m))) => Some(m),
                                    _ => None,
                                });
                            }
                            Some(*at)
                        }
                        _ => None,
                    }
                };
                match wait_until {
                    Some(at) => {
                        tokio::select! {
                            biased;
                            _ = &mut changed => {}
                            _ = tokio::time::sleep_until(at) => {}
                        }
                    }
                    None => changed.await,
                }
            }
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        lock(&self.0.state).receiver_gone = true;
    }
}
