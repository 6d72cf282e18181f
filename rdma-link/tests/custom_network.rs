//! A real `Link` pair over an in-memory network in one paused-clock, current-thread runtime —
//! the way a deterministic simulator runs the link: every message goes through `SimNet` (a
//! latency, a silent partition, a reset), every task of a node through `NodeSpawner` (freeze,
//! kill). Time is simulated: a scenario of several seconds runs in milliseconds, and the same
//! scenario gives the same event log every time.

use rdma_link::{
    Bytes, Connection, Link, LinkConfig, LinkError, LinkState, Listener, MessageReceiver,
    MessageSender, NetFuture, Network, Post, Region, RequestHandler, Role, SecondStore, Spawn,
    Task, Transport,
};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

// ---- the in-memory network -------------------------------------------------------------------

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    /// Messages with the time they may be delivered.
    queue: VecDeque<(Instant, Bytes)>,
    closed: bool,
    reset: bool,
}

#[derive(Default)]
struct NetState {
    /// While set, nothing is delivered and connection attempts hang (a silent partition).
    partitioned: bool,
    listeners: BTreeMap<SocketAddr, mpsc::UnboundedSender<(Connection, SocketAddr)>>,
    pipes: Vec<Weak<Mutex<Pipe>>>,
    next_port: u16,
    /// Alter one byte of this many of the next record messages sent (an attacker on the path).
    tamper_records: u32,
}

struct NetInner {
    state: Mutex<NetState>,
    /// Bumped on every change; whoever waits for the network watches it.
    changed: watch::Sender<u64>,
    latency: Duration,
}

#[derive(Clone)]
struct SimNet(Arc<NetInner>);

impl SimNet {
    fn new(latency: Duration) -> SimNet {
        SimNet(Arc::new(NetInner {
            state: Mutex::default(),
            changed: watch::Sender::new(0),
            latency,
        }))
    }
    fn bump(&self) {
        self.0.changed.send_modify(|v| *v += 1);
    }
    fn partition(&self, on: bool) {
        self.0.state.lock().unwrap().partitioned = on;
        self.bump();
    }
    /// Reset every open connection (both ends see an error).
    fn reset_all(&self) {
        for p in self
            .0
            .state
            .lock()
            .unwrap()
            .pipes
            .iter()
            .filter_map(Weak::upgrade)
        {
            p.lock().unwrap().reset = true;
        }
        self.bump();
    }
    fn tamper_records(&self, n: u32) {
        self.0.state.lock().unwrap().tamper_records = n;
    }
    fn partitioned(&self) -> bool {
        self.0.state.lock().unwrap().partitioned
    }
    fn pipe(&self) -> (Box<dyn MessageSender>, Box<dyn MessageReceiver>) {
        let pipe = Arc::new(Mutex::new(Pipe::default()));
        self.0
            .state
            .lock()
            .unwrap()
            .pipes
            .push(Arc::downgrade(&pipe));
        let tx = End {
            net: self.clone(),
            pipe: pipe.clone(),
        };
        (
            Box::new(tx),
            Box::new(End {
                net: self.clone(),
                pipe,
            }),
        )
    }
}

struct End {
    net: SimNet,
    pipe: Arc<Mutex<Pipe>>,
}

fn reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection reset by the simulated network",
    )
}

impl MessageSender for End {
    fn send(&mut self, message: Bytes) -> NetFuture<'_, io::Result<()>> {
        let is_record = matches!(
            rdma_link::proto::decode_payload_prefix(&message),
            Ok((rdma_link::proto::Msg::Record(_), _))
        );
        let message = {
            let mut st = self.net.0.state.lock().unwrap();
            if is_record && st.tamper_records > 0 {
                st.tamper_records -= 1;
                let mut m = message.to_vec();
                m[rdma_link::proto::RECORD_HDR_LEN] ^= 0x80; // the record's first byte
                Bytes::from(m)
            } else {
                message
            }
        };
        let r = {
            let mut p = self.pipe.lock().unwrap();
            if p.reset {
                Err(reset())
            } else {
                p.queue
                    .push_back((Instant::now() + self.net.0.latency, message));
                Ok(())
            }
        };
        self.net.bump();
        Box::pin(std::future::ready(r))
    }
}

impl MessageReceiver for End {
    fn recv(&mut self) -> NetFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let mut changed = self.net.0.changed.subscribe();
            loop {
                let held = self.net.partitioned();
                let due = {
                    let mut p = self.pipe.lock().unwrap();
                    if p.reset {
                        return Err(reset());
                    }
                    match p.queue.front() {
                        Some((at, _)) if !held && *at <= Instant::now() => {
                            return Ok(p.queue.pop_front().map(|(_, m)| m));
                        }
                        Some((at, _)) if !held => Some(*at),
                        None if p.closed => return Ok(None),
                        _ => None,
                    }
                };
                match due {
                    Some(at) => tokio::select! {
                        biased;
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    },
                    None => {
                        let _ = changed.changed().await;
                    }
                }
            }
        })
    }
}

impl Drop for End {
    fn drop(&mut self) {
        // Either end going away closes the direction (the process is gone, or closed it).
        self.pipe.lock().unwrap().closed = true;
        self.net.bump();
    }
}

struct SimListener(mpsc::UnboundedReceiver<(Connection, SocketAddr)>);

impl Listener for SimListener {
    fn accept(&mut self) -> NetFuture<'_, io::Result<(Connection, SocketAddr)>> {
        Box::pin(async move {
            self.0
                .recv()
                .await
                .ok_or_else(|| io::Error::other("network gone"))
        })
    }
}

impl Network for SimNet {
    fn connect(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Connection>> {
        let net = self.clone();
        Box::pin(async move {
            let mut changed = net.0.changed.subscribe();
            while net.partitioned() {
                let _ = changed.changed().await; // the SYN is lost; the link's timeout ends this
            }
            tokio::time::sleep(net.0.latency).await;
            let (to_server, server_rx) = net.pipe();
            let (to_client, client_rx) = net.pipe();
            let (listener, from) = {
                let mut st = net.0.state.lock().unwrap();
                st.next_port += 1;
                let from = SocketAddr::from(([10, 0, 0, 1], 40000 + st.next_port));
                (st.listeners.get(&addr).cloned(), from)
            };
            let server = Connection {
                sender: to_client,
                receiver: server_rx,
            };
            match listener {
                Some(l) if l.send((server, from)).is_ok() => Ok(Connection {
                    sender: to_server,
                    receiver: client_rx,
                }),
                _ => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "nobody listens",
                )),
            }
        })
    }

    fn listen(&self, addr: SocketAddr) -> NetFuture<'static, io::Result<Box<dyn Listener>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.0.state.lock().unwrap();
        let r: io::Result<Box<dyn Listener>> = match st.listeners.get(&addr) {
            Some(l) if !l.is_closed() => Err(io::ErrorKind::AddrInUse.into()),
            _ => {
                st.listeners.insert(addr, tx);
                Ok(Box::new(SimListener(rx)))
            }
        };
        Box::pin(std::future::ready(r))
    }
}

// ---- a node's tasks: freeze (SIGSTOP) and kill (kill -9) -------------------------------------

#[derive(Default)]
struct NodeCtl {
    frozen: AtomicBool,
    killed: AtomicBool,
    parked: Mutex<Vec<Waker>>,
}

impl NodeCtl {
    fn set(&self, flag: &AtomicBool, v: bool) {
        flag.store(v, Ordering::Relaxed);
        for w in self.parked.lock().unwrap().drain(..) {
            w.wake();
        }
    }
}

struct NodeSpawner(Arc<NodeCtl>);

impl Spawn for NodeSpawner {
    fn spawn(&self, task: Task) {
        tokio::spawn(NodeTask {
            ctl: self.0.clone(),
            task,
        });
    }
}

struct NodeTask {
    ctl: Arc<NodeCtl>,
    task: Task,
}

impl Future for NodeTask {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ctl.killed.load(Ordering::Relaxed) {
            return Poll::Ready(()); // the task and all it holds are dropped
        }
        if self.ctl.frozen.load(Ordering::Relaxed) {
            self.ctl.parked.lock().unwrap().push(cx.waker().clone());
            return Poll::Pending;
        }
        self.task.as_mut().poll(cx)
    }
}

// ---- the scenario ------------------------------------------------------------------------------

const REGION: usize = 1 << 20;
const HB_INTERVAL: Duration = Duration::from_millis(100);
const HB_TIMEOUT: Duration = Duration::from_secs(1);
const LATENCY: Duration = Duration::from_micros(200);

struct Store(Region);

impl SecondStore for Store {
    fn region(&self) -> Region {
        self.0
    }
    fn persist(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

fn cfg(role: Role, node: u32, peer: u32) -> LinkConfig {
    let mut c = LinkConfig::new(
        Transport::Tcp,
        role,
        0x5eed,
        node,
        peer,
        b"simulated-cluster-secret",
    );
    c.heartbeat_interval = HB_INTERVAL;
    c.heartbeat_timeout = HB_TIMEOUT;
    c.handshake_timeout = Duration::from_millis(500);
    c.reconnect_delay = Duration::from_millis(50);
    c.window = 8;
    c
}

/// The event log of a run: "time-in-µs who: what".
#[derive(Clone)]
struct Log(Arc<Mutex<Vec<String>>>, Instant);

impl Log {
    fn add(&self, who: &str, what: impl std::fmt::Display) {
        let t = self.1.elapsed().as_micros();
        self.0.lock().unwrap().push(format!("{t:>9} {who}: {what}"));
    }
    /// Log every state change of `link`.
    fn watch(&self, link: &Link, who: &'static str) {
        let (log, mut rx) = (self.clone(), link.subscribe());
        tokio::spawn(async move {
            loop {
                let s = match &*rx.borrow_and_update() {
                    LinkState::Up(i) => format!("up, generation {}", i.generation),
                    LinkState::Down(e) => format!("down: {e}"),
                    other => format!("{other:?}"),
                };
                log.add(who, s);
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn until(link: &Link, what: &str, pred: impl Fn(&LinkState) -> bool) {
    let mut rx = link.subscribe();
    let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| pred(s))).await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "never {what}; state {:?}",
        link.state()
    );
}

fn up_at(generation: u64) -> impl Fn(&LinkState) -> bool {
    move |s| matches!(s, LinkState::Up(i) if i.generation >= generation)
}

fn down(s: &LinkState) -> bool {
    matches!(s, LinkState::Down(_))
}

fn server(net: &SimNet, node: &Arc<NodeCtl>, store: &Arc<Store>, addr: SocketAddr) -> Link {
    let echo: Arc<dyn RequestHandler> =
        Arc::new(
            |p: Bytes| async move { Bytes::from(p.iter().rev().copied().collect::<Vec<_>>()) },
        );
    let store = store.clone() as Arc<dyn SecondStore>;
    let spawner = Arc::new(NodeSpawner(node.clone()));
    Link::start_over(
        cfg(Role::Listen(addr), 2, 1),
        None,
        Some(store),
        Some(echo),
        Arc::new(net.clone()),
        spawner,
    )
    .unwrap()
}

/// Post `n` records of 4 KiB from `first` on, each in a task; their results in post order.
fn post_many(
    client: &Link,
    local: Region,
    first: u64,
    n: u64,
) -> Vec<tokio::task::JoinHandle<Result<(), LinkError>>> {
    (first..first + n)
        .map(|seq| {
            let off = (seq % 200) * 4096;
            let bytes: Vec<u8> = (0..4096u64).map(|i| (seq * 131 + i * 7) as u8).collect();
            assert!(local.write_bytes(off, &bytes));
            let p = Post {
                partition: 0,
                seq,
                local_offset: off,
                remote_offset: off,
                len: 4096,
            };
            tokio::spawn(client.post(p))
        })
        .collect()
}

/// The whole scenario; returns the event log.
async fn scenario() -> Vec<String> {
    let log = Log(Arc::default(), Instant::now());
    let net = SimNet::new(LATENCY);
    let addr: SocketAddr = "10.0.0.2:7470".parse().unwrap();
    let (server_node, client_node) = (Arc::new(NodeCtl::default()), Arc::new(NodeCtl::default()));
    let store = Arc::new(Store(Region::leaked(REGION)));
    let local = Region::leaked(REGION);
    let mut srv = server(&net, &server_node, &store, addr);
    let spawner = Arc::new(NodeSpawner(client_node.clone()));
    let client = Link::start_over(
        cfg(Role::Connect(addr), 1, 2),
        Some(local),
        None,
        None,
        Arc::new(net.clone()),
        spawner,
    )
    .unwrap();
    log.watch(&client, "client");
    log.watch(&srv, "server");
    until(&client, "up", up_at(1)).await;
    until(&srv, "up", up_at(1)).await;

    // Records land byte-exact in the partner's second store; a request is answered.
    for (i, r) in post_many(&client, local, 1, 32).into_iter().enumerate() {
        r.await.unwrap().unwrap_or_else(|e| panic!("post {i}: {e}"));
    }
    for seq in 1..=32u64 {
        let off = (seq % 200) * 4096;
        assert_eq!(
            store.0.read_bytes(off, 4096),
            local.read_bytes(off, 4096),
            "record {seq}"
        );
    }
    log.add("client", "32 posts acknowledged, bytes checked");
    let answer = client.request(&b"abc"[..]).await.unwrap();
    assert_eq!(&answer[..], b"cba");
    log.add("client", "request answered");

    // A silent partition: both sides go down within the heartbeat timeout, in simulated time.
    net.partition(true);
    let t = Instant::now();
    let down_after = |link: &Link| {
        let link = link.clone();
        async move {
            until(&link, "down", down).await;
            t.elapsed()
        }
    };
    let (c, s) = tokio::join!(down_after(&client), down_after(&srv));
    for (took, who) in [(c, "client"), (s, "server")] {
        log.add(
            who,
            format!("down {} µs after the partition", took.as_micros()),
        );
        assert!(
            took >= HB_TIMEOUT - HB_INTERVAL && took <= HB_TIMEOUT + 2 * HB_INTERVAL,
            "{who} down after {took:?}"
        );
    }
    // Healed: the connector reconnects.
    tokio::time::sleep(Duration::from_millis(300)).await;
    net.partition(false);
    until(&client, "up again", up_at(2)).await;
    until(&srv, "up again", up_at(2)).await;

    // A reset fails the posts in flight at once (not after a timeout), each exactly once.
    let inflight = post_many(&client, local, 100, 8);
    tokio::time::sleep(LATENCY / 2).await;
    let t = Instant::now();
    net.reset_all();
    for r in inflight {
        let r = r.await.unwrap();
        assert!(matches!(r, Err(LinkError::Down { .. })), "{r:?}");
    }
    log.add(
        "client",
        format!(
            "8 in-flight posts failed {} µs after the reset",
            t.elapsed().as_micros()
        ),
    );
    assert!(
        t.elapsed() < HB_INTERVAL,
        "posts failed only after {:?}",
        t.elapsed()
    );
    let (posts, acked, failed, _) = client.counters();
    assert_eq!((posts, acked, failed), (40, 32, 8));
    until(&client, "up after the reset", up_at(3)).await;

    // The server's process pauses (every task of its node frozen) longer than the heartbeat
    // timeout: the client gives up on it; once it runs again the two reconnect.
    server_node.set(&server_node.frozen, true);
    until(&client, "down with the server frozen", down).await;
    tokio::time::sleep(HB_TIMEOUT).await;
    server_node.set(&server_node.frozen, false);
    until(&client, "up after the freeze", up_at(4)).await;

    // The server's process is killed; it restarts with the same store.
    srv.crash();
    until(&client, "down with the server killed", down).await;
    srv = server(&net, &Arc::new(NodeCtl::default()), &store, addr);
    log.watch(&srv, "server'");
    until(&client, "up with the restarted server", up_at(5)).await;
    for r in post_many(&client, local, 200, 4) {
        r.await.unwrap().unwrap();
    }
    log.add("client", "posts to the restarted server acknowledged");

    client.shutdown().await;
    srv.shutdown().await;
    let events = log.0.lock().unwrap().clone();
    events
}

fn run_scenario() -> (Vec<String>, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let wall = std::time::Instant::now();
    let log = rt.block_on(scenario());
    (log, wall.elapsed())
}

#[test]
fn a_link_over_a_simulated_network_runs_in_simulated_time() {
    let (events, wall) = run_scenario();
    for e in &events {
        println!("{e}");
    }
    let last = events
        .last()
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    let simulated = Duration::from_micros(last.unwrap_or(0));
    println!("simulated {simulated:?} in {wall:?} of wall time");
    assert!(
        simulated > Duration::from_secs(3),
        "the scenario spans seconds of simulated time"
    );
    assert!(
        wall < simulated / 4,
        "a paused clock must not wait for real time ({wall:?})"
    );
}

/// A record altered on the way is refused before its bytes reach the store: its post fails,
/// the connection is closed, and after the reconnect the same post lands intact.
async fn tampered_record_scenario() {
    let net = SimNet::new(LATENCY);
    let addr: SocketAddr = "10.0.0.2:7470".parse().unwrap();
    let store = Arc::new(Store(Region::leaked(REGION)));
    let local = Region::leaked(REGION);
    let srv = server(&net, &Arc::new(NodeCtl::default()), &store, addr);
    let client = Link::start_over(
        cfg(Role::Connect(addr), 1, 2),
        Some(local),
        None,
        None,
        Arc::new(net.clone()),
        Arc::new(NodeSpawner(Arc::new(NodeCtl::default()))),
    )
    .unwrap();
    until(&client, "up", up_at(1)).await;
    for r in post_many(&client, local, 1, 4) {
        r.await.unwrap().unwrap();
    }
    net.tamper_records(1);
    let r = post_many(&client, local, 5, 1)
        .pop()
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(&r, Err(LinkError::Down { reason, .. }) if reason.contains("closed the connection") || reason.contains("lost")),
        "an altered record must not be acknowledged: {r:?}"
    );
    let off = 5 * 4096;
    assert_eq!(
        store.0.read_bytes(off, 4096).unwrap(),
        vec![0u8; 4096],
        "the altered bytes reached the second store"
    );
    until(&srv, "down", down).await;
    until(&client, "up again", up_at(2)).await;
    for r in post_many(&client, local, 5, 1) {
        r.await.unwrap().unwrap();
    }
    assert_eq!(store.0.read_bytes(off, 4096), local.read_bytes(off, 4096));
    client.shutdown().await;
    srv.shutdown().await;
}

#[test]
fn a_record_altered_in_flight_is_refused_and_never_lands() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(tampered_record_scenario());
}

#[test]
fn the_same_scenario_gives_the_same_events() {
    let (first, _) = run_scenario();
    let (second, _) = run_scenario();
    assert_eq!(first, second);
}
