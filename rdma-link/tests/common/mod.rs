#![allow(dead_code)]
//! Helpers shared by the TCP integration tests.

use rdma_link::{
    Link, LinkConfig, LinkState, PartitionSeq, Region, ResyncPoint, Role, SecondStore, Transport,
};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub const SECRET: &[u8] = b"test-cluster-secret-0123456789";
pub const CLUSTER: u64 = 0xc0ffee;

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn cfg(role: Role, node: u32, peer: u32) -> LinkConfig {
    let mut c = LinkConfig::new(Transport::Tcp, role, CLUSTER, node, peer, SECRET);
    c.heartbeat_interval = Duration::from_millis(50);
    c.heartbeat_timeout = Duration::from_millis(500);
    c.ack_timeout = Duration::from_secs(3);
    c.handshake_timeout = Duration::from_secs(2);
    c.reconnect_delay = Duration::from_millis(50);
    c.window = 16;
    c
}

#[derive(Default)]
pub struct StoreLog {
    /// (offset, len, crc32c of the region bytes at persist time)
    pub persisted: Vec<(u64, u64, u32)>,
    /// (partition, seq) in arrival order
    pub records: Vec<(u32, u64)>,
    pub releases: Vec<(u32, u64)>,
}

/// An in-memory second store that records every call.
pub struct MemStore {
    pub region: Region,
    pub log: Mutex<StoreLog>,
    pub resync: Mutex<ResyncPoint>,
    /// persist fails for this offset
    pub fail_offset: Mutex<Option<u64>>,
    /// persist blocks while this is true
    pub gate: (Mutex<bool>, Condvar),
    /// persist sleeps this long
    pub delay: Mutex<Duration>,
    /// records of this partition are refused (as a store of another layout would)
    pub refuse_partition: Mutex<Option<u32>>,
}

impl MemStore {
    pub fn new(len: usize) -> Arc<MemStore> {
        Arc::new(MemStore {
            region: Region::leaked(len),
            log: Mutex::new(StoreLog::default()),
            resync: Mutex::new(ResyncPoint::default()),
            fail_offset: Mutex::new(None),
            gate: (Mutex::new(false), Condvar::new()),
            delay: Mutex::new(Duration::ZERO),
            refuse_partition: Mutex::new(None),
        })
    }
    pub fn close_gate(&self) {
        *self.gate.0.lock().unwrap() = true;
    }
    pub fn open_gate(&self) {
        *self.gate.0.lock().unwrap() = false;
        self.gate.1.notify_all();
    }
    pub fn set_resync(&self, partition: u32, seq: u64) {
        *self.resync.lock().unwrap() = ResyncPoint {
            first_store: vec![PartitionSeq {
                partition,
                seq: seq + 1000,
            }],
            second_store: vec![PartitionSeq { partition, seq }],
        };
    }
}

impl SecondStore for MemStore {
    fn region(&self) -> Region {
        self.region
    }
    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()> {
        {
            let mut g = self.gate.0.lock().unwrap();
            while *g {
                g = self.gate.1.wait(g).unwrap();
            }
        }
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        if *self.fail_offset.lock().unwrap() == Some(offset) {
            return Err(std::io::Error::other("injected persist failure"));
        }
        let bytes = self.region.read_bytes(offset, len as usize).unwrap();
        self.log
            .lock()
            .unwrap()
            .persisted
            .push((offset, len, crc32c::crc32c(&bytes)));
        Ok(())
    }
    fn hold_record(&self, partition: u32, seq: u64, _offset: u64, _len: u32) -> Result<(), String> {
        if *self.refuse_partition.lock().unwrap() == Some(partition) {
            return Err(format!(
                "partition {partition} is not in this node's layout"
            ));
        }
        self.log.lock().unwrap().records.push((partition, seq));
        Ok(())
    }
    fn on_release(&self, partition: u32, through_seq: u64) {
        self.log
            .lock()
            .unwrap()
            .releases
            .push((partition, through_seq));
    }
    fn resync_point(&self) -> ResyncPoint {
        self.resync.lock().unwrap().clone()
    }
}

pub const REGION: usize = 4 << 20;

/// A listening node 2 with a second store, and a connecting node 1 with a local region.
pub struct Pair {
    pub server: Link,
    pub client: Link,
    pub store: Arc<MemStore>,
    pub local: Region,
    pub addr: SocketAddr,
}

pub fn server(addr: SocketAddr, store: &Arc<MemStore>, f: impl FnOnce(&mut LinkConfig)) -> Link {
    let mut c = cfg(Role::Listen(addr), 2, 1);
    f(&mut c);
    Link::start(c, None, Some(store.clone() as Arc<dyn SecondStore>)).unwrap()
}

pub fn client(addr: SocketAddr, local: Region, f: impl FnOnce(&mut LinkConfig)) -> Link {
    let mut c = cfg(Role::Connect(addr), 1, 2);
    f(&mut c);
    Link::start(c, Some(local), None).unwrap()
}

pub async fn pair() -> Pair {
    pair_with(|_| {}, |_| {}).await
}

pub async fn pair_with(fs: impl FnOnce(&mut LinkConfig), fc: impl FnOnce(&mut LinkConfig)) -> Pair {
    let addr = free_addr();
    let store = MemStore::new(REGION);
    let server = server(addr, &store, fs);
    let local = Region::leaked(REGION);
    let client = client(addr, local, fc);
    within(5, client.wait_up()).await.unwrap();
    within(5, server.wait_up()).await.unwrap();
    Pair {
        server,
        client,
        store,
        local,
        addr,
    }
}

/// Fill `[off, off+len)` of `r` with a pattern derived from `seed`.
pub fn fill(r: &Region, off: u64, len: usize, seed: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect();
    assert!(r.write_bytes(off, &data));
    data
}

pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("operation hung (test timeout)")
}

pub fn down_reason(s: &LinkState) -> String {
    match s {
        LinkState::Down(e) => e.to_string(),
        other => format!("{other:?}"),
    }
}

/// Wait until `link`'s state is Down with a reason containing `needle`.
pub async fn wait_down_with(link: &Link, needle: &str) -> String {
    let mut rx = link.subscribe();
    let fut = async {
        loop {
            let s = rx.borrow_and_update().clone();
            if let LinkState::Down(e) = &s {
                let t = e.to_string();
                if t.contains(needle) {
                    return t;
                }
            }
            if rx.changed().await.is_err() {
                return format!("closed: {:?}", link.state());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(t) => t,
        Err(_) => panic!(
            "link never went down with {needle:?}; state {:?}",
            link.state()
        ),
    }
}
