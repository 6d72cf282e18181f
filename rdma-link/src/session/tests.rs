//! Unit tests of the session state machine: no sockets, time driven by tokio's paused clock.

use super::*;
use crate::api::SecondStore;
use crate::config::{LinkConfig, Role, Transport};
use crate::proto::STATUS_HANDLER_FAILED;
use crate::region::Region;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const REGION: usize = 1 << 20;

#[derive(Default)]
struct Calls {
    persisted: Vec<(u64, u64)>,
    records: Vec<(u32, u64)>,
    releases: Vec<(u32, u64)>,
}

struct Store {
    region: Region,
    calls: Mutex<Calls>,
    fail_offset: Mutex<Option<u64>>,
    /// Records of this partition are refused (as a store of another layout would).
    refuse_partition: Mutex<Option<u32>>,
}

impl SecondStore for Store {
    fn region(&self) -> Region {
        self.region
    }
    fn persist(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if *self.fail_offset.lock().unwrap() == Some(offset) {
            return Err(std::io::Error::other("injected"));
        }
        self.calls.lock().unwrap().persisted.push((offset, len));
        Ok(())
    }
    fn hold_record(&self, partition: u32, seq: u64, _offset: u64, _len: u32) -> Result<(), String> {
        if *self.refuse_partition.lock().unwrap() == Some(partition) {
            return Err(format!("partition {partition} does not exist here"));
        }
        self.calls.lock().unwrap().records.push((partition, seq));
        Ok(())
    }
    fn on_release(&self, partition: u32, through_seq: u64) {
        self.calls
            .lock()
            .unwrap()
            .releases
            .push((partition, through_seq));
    }
}

fn cfg() -> LinkConfig {
    let addr = "127.0.0.1:1".parse().unwrap();
    let mut c = LinkConfig::new(
        Transport::Tcp,
        Role::Listen(addr),
        7,
        1,
        2,
        b"0123456789abcdef",
    );
    c.window = 4;
    c.max_record = 64 << 10;
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_secs(1);
    c.ack_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(3);
    c.request_window = 2;
    c.max_request = 1000;
    c
}

struct Fixture {
    session: Session,
    shared: Arc<Shared>,
    store: Arc<Store>,
}

fn fixture_with(
    store: bool,
    handler: Option<Arc<dyn RequestHandler>>,
    peer_max_request: u32,
) -> Fixture {
    let st = Arc::new(Store {
        region: Region::leaked(REGION),
        calls: Mutex::default(),
        fail_offset: Mutex::default(),
        refuse_partition: Mutex::default(),
    });
    let shared = Arc::new(Shared::new(
        cfg(),
        Some(Region::leaked(REGION)),
        store.then(|| st.clone() as Arc<dyn SecondStore>),
        handler,
        Arc::new(tokio::runtime::Handle::current()),
    ));
    Fixture {
        session: Session::new(shared.clone(), peer_max_request),
        shared,
        store: st,
    }
}

fn fixture() -> Fixture {
    fixture_with(true, None, 1000)
}

fn permit() -> OwnedSemaphorePermit {
    Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
}

/// Post record `seq` of partition 0; returns its tag and its completion.
fn post(s: &mut Session, seq: u64) -> (u64, oneshot::Receiver<Result<()>>) {
    let (reply, rx) = oneshot::channel();
    let post = Post {
        partition: 0,
        seq,
        local_offset: seq * 4096,
        remote_offset: seq * 4096,
        len: 4096,
    };
    s.on_cmd(Cmd::Post {
        post,
        permit: permit(),
        reply,
    });
    let r = s.records.back().unwrap();
    assert_eq!((r.hdr.seq, r.local_offset), (seq, seq * 4096));
    (r.hdr.tag, rx)
}

fn request(s: &mut Session, payload: &'static [u8]) -> oneshot::Receiver<Result<Bytes>> {
    let (reply, rx) = oneshot::channel();
    s.on_cmd(Cmd::Request {
        payload: Bytes::from_static(payload),
        permit: permit(),
        reply,
    });
    rx
}

fn ack(tag: u64, seq: u64, ok: bool) -> Msg {
    Msg::Ack {
        tag,
        partition: 0,
        seq,
        status: if ok {
            AckStatus::Held
        } else {
            AckStatus::PersistFailed("injected".into())
        },
    }
}

fn record(tag: u64, seq: u64) -> Msg {
    Msg::Record(RecordHdr {
        tag,
        partition: 1,
        seq,
        offset: seq * 512,
        len: 512,
    })
}

fn controls(s: &mut Session) -> Vec<Msg> {
    std::iter::from_fn(|| s.pop_control()).collect()
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn error_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[tokio::test]
async fn an_ack_completes_its_post_and_only_that_one() {
    let Fixture {
        mut session,
        shared,
        ..
    } = fixture();
    let (t1, mut rx1) = post(&mut session, 1);
    let (t2, mut rx2) = post(&mut session, 2);
    assert!(t2 > t1);
    session.on_msg(ack(t2, 2, true)).unwrap();
    assert!(matches!(rx2.try_recv(), Ok(Ok(()))));
    assert!(rx1.try_recv().is_err(), "post 1 is still in flight");
    session.on_msg(ack(t1, 1, false)).unwrap();
    assert!(matches!(
        rx1.try_recv(),
        Ok(Err(LinkError::PersistFailed { seq: 1, .. }))
    ));
    assert_eq!(
        (load(&shared.stats.acked), load(&shared.stats.failed)),
        (1, 1)
    );
}

#[tokio::test]
async fn an_ack_for_an_unknown_tag_or_another_record_is_a_protocol_error() {
    let mut f = fixture();
    let e = error_text(f.session.on_msg(ack(99, 1, true)));
    assert!(
        e.contains("protocol error") && e.contains("unknown post tag 99"),
        "{e}"
    );
    let (tag, mut rx) = post(&mut f.session, 5);
    let e = error_text(f.session.on_msg(ack(tag, 6, true)));
    assert!(e.contains("names partition 0 seq 6"), "{e}");
    // The post learns the same reason.
    assert!(matches!(rx.try_recv(), Ok(Err(LinkError::Down { .. }))));
    let e = error_text(f.session.on_msg(Msg::Ack {
        tag: 77,
        partition: 3,
        seq: 5,
        status: AckStatus::Held,
    }));
    assert!(e.contains("unknown post tag 77"), "{e}");
}

#[tokio::test]
async fn records_are_persisted_then_acknowledged_within_the_window() {
    let mut f = fixture();
    *f.store.fail_offset.lock().unwrap() = Some(3 * 512);
    for seq in 1..=4 {
        f.session.on_msg(record(100 + seq, seq)).unwrap();
    }
    {
        let calls = f.store.calls.lock().unwrap();
        assert_eq!(calls.persisted, vec![(512, 512), (1024, 512), (2048, 512)]);
        assert_eq!(calls.records, vec![(1, 1), (1, 2), (1, 4)]);
    }
    // A fifth record while four acks have not left: the peer broke the window of 4.
    let e = error_text(f.session.on_msg(record(105, 5)));
    assert!(e.contains("exceeded the window of 4"), "{e}");
    // The acks leave in order, the failed persist reported as such; then there is room again.
    let acks = controls(&mut f.session);
    let oks: Vec<(u64, bool)> = acks
        .iter()
        .map(|m| match m {
            Msg::Ack { tag, status, .. } => (*tag, *status == AckStatus::Held),
            other => panic!("expected an ack, got {other:?}"),
        })
        .collect();
    assert_eq!(
        oks,
        vec![(101, true), (102, true), (103, false), (104, true)]
    );
    f.session.on_msg(record(105, 5)).unwrap();
    assert_eq!(load(&f.shared.stats.records_in), 5);
}

#[tokio::test]
async fn a_record_the_store_refuses_is_acknowledged_as_refused_and_fails_its_post() {
    // Receiving side: persisted, refused by the store, acknowledged with the store's reason.
    let mut f = fixture();
    *f.store.refuse_partition.lock().unwrap() = Some(1);
    f.session.on_msg(record(7, 1)).unwrap();
    assert!(f.store.calls.lock().unwrap().records.is_empty());
    match controls(&mut f.session).as_slice() {
        [Msg::Ack {
            tag: 7,
            status: AckStatus::Refused(why),
            ..
        }] => assert!(why.contains("partition 1 does not exist"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Sending side: the post fails with the reason; the link stays up.
    let (tag, mut rx) = post(&mut f.session, 3);
    f.session
        .on_msg(Msg::Ack {
            tag,
            partition: 0,
            seq: 3,
            status: AckStatus::Refused("outside partition 0".into()),
        })
        .unwrap();
    match rx.try_recv() {
        Ok(Err(e @ LinkError::RecordRefused { seq: 3, .. })) => {
            let t = e.to_string();
            assert!(
                t.contains("outside partition 0") && t.contains("layouts"),
                "{t}"
            );
        }
        other => panic!("expected RecordRefused, got {other:?}"),
    }
    assert_eq!(load(&f.shared.stats.failed), 1);
}

#[tokio::test]
async fn a_record_needs_a_second_store_that_holds_it() {
    let mut f = fixture_with(false, None, 1000);
    let e = error_text(f.session.on_msg(record(1, 1)));
    assert!(e.contains("no second store"), "{e}");
    let f = fixture();
    let hdr = |offset: u64, len: u32| RecordHdr {
        tag: 1,
        partition: 0,
        seq: 1,
        offset,
        len,
    };
    f.session.check_record(&hdr(0, 512)).unwrap();
    for bad in [
        hdr(0, 0),
        hdr(0, (64 << 10) + 1),
        hdr(REGION as u64 - 100, 512),
    ] {
        let e = error_text(f.session.check_record(&bad));
        assert!(e.contains("does not fit"), "{e}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_ping_gets_a_pong_and_a_pong_measures_the_round_trip() {
    let mut f = fixture();
    f.session.on_msg(Msg::Ping { stamp: 42 }).unwrap();
    assert_eq!(controls(&mut f.session), vec![Msg::Pong { stamp: 42 }]);
    let stamp = f.shared.now_stamp();
    tokio::time::advance(Duration::from_millis(30)).await;
    f.session.on_msg(Msg::Pong { stamp }).unwrap();
    assert_eq!(load(&f.shared.stats.rtt_ns), 30_000_000);
    // The pong proves the peer heard the ping when it was sent, not later.
    let heard = f.shared.heard_at().expect("heard");
    assert_eq!(Instant::now() - heard, Duration::from_millis(30));
    // A stamp from the future is not believed.
    let future = f.shared.now_stamp() + 1_000_000_000;
    f.session.on_msg(Msg::Pong { stamp: future }).unwrap();
    assert_eq!(f.shared.heard_at(), Some(heard));
}

#[tokio::test]
async fn releases_reach_the_second_store_and_ours_are_sent() {
    let mut f = fixture();
    f.session
        .on_msg(Msg::Release {
            partition: 3,
            through_seq: 42,
        })
        .unwrap();
    assert_eq!(f.store.calls.lock().unwrap().releases, vec![(3, 42)]);
    f.session.on_cmd(Cmd::Release {
        partition: 1,
        through_seq: 7,
    });
    assert_eq!(
        controls(&mut f.session),
        vec![Msg::Release {
            partition: 1,
            through_seq: 7
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_sent_when_due_and_a_silent_peer_times_out() {
    let mut f = fixture();
    f.session.on_tick().unwrap();
    assert!(
        controls(&mut f.session).is_empty(),
        "no ping before the interval"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    f.session.on_tick().unwrap();
    assert!(matches!(controls(&mut f.session)[..], [Msg::Ping { .. }]));
    // Anything from the peer resets the silence clock.
    tokio::time::advance(Duration::from_millis(900)).await;
    f.session.on_msg(Msg::Pong { stamp: 0 }).unwrap();
    tokio::time::advance(Duration::from_millis(1000)).await;
    f.session.on_tick().unwrap();
    tokio::time::advance(Duration::from_millis(1)).await;
    let e = error_text(f.session.on_tick());
    assert!(
        e.contains("no heartbeat or message from node 2 for 1.001s"),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_stall_of_our_loop_the_peers_queued_messages_count_before_silence_does() {
    let mut f = fixture();
    f.session.on_tick().unwrap();
    // Our loop did not run for 3 s (tick interval 100 ms, timeout 1 s): the first tick after
    // it passes over the silence, and the peer's queued heartbeat is handled next.
    tokio::time::advance(Duration::from_secs(3)).await;
    f.session.on_tick().unwrap();
    f.session.on_msg(Msg::Pong { stamp: 0 }).unwrap();
    tokio::time::advance(Duration::from_millis(100)).await;
    f.session.on_tick().unwrap();
    // A loop that keeps stalling still finds a silent peer: excused once in a row only.
    tokio::time::advance(Duration::from_secs(3)).await;
    f.session.on_tick().unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    let e = error_text(f.session.on_tick());
    assert!(
        e.contains("no heartbeat or message from node 2 for 6.1s")
            && e.contains("previous check was 3s before"),
        "{e}"
    );
    // Without a stall of ours the silence is judged on time.
    let mut f = fixture();
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
        f.session.on_tick().unwrap();
    }
    tokio::time::advance(Duration::from_millis(100)).await;
    let e = error_text(f.session.on_tick());
    assert!(e.contains("for 1.1s"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn an_unacknowledged_post_times_out_after_the_ack_timeout() {
    let mut f = fixture();
    let (_, mut rx) = post(&mut f.session, 1);
    tokio::time::advance(Duration::from_millis(500)).await;
    post(&mut f.session, 2);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(500)).await;
        f.session.touch(); // the peer is alive, only the ack is missing
        f.session.on_tick().unwrap();
    }
    tokio::time::advance(Duration::from_millis(1)).await;
    let e = error_text(f.session.on_tick());
    assert!(e.contains("did not acknowledge a record within 2s"), "{e}");
    assert!(
        rx.try_recv().is_err(),
        "the driver fails the posts, not the tick"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_request_times_out_after_the_request_timeout() {
    let mut f = fixture();
    let _rx = request(&mut f.session, b"hello");
    for _ in 0..6 {
        tokio::time::advance(Duration::from_millis(500)).await;
        f.session.touch();
        f.session.on_tick().unwrap();
    }
    tokio::time::advance(Duration::from_millis(1)).await;
    let e = error_text(f.session.on_tick());
    assert!(e.contains("did not answer a request within 3s"), "{e}");
}

#[tokio::test]
async fn our_requests_are_matched_to_their_responses() {
    let mut f = fixture();
    let mut rx1 = request(&mut f.session, b"one");
    let mut rx2 = request(&mut f.session, b"two");
    let mut rx3 = request(&mut f.session, b"three");
    let ids: Vec<u64> = f
        .session
        .data_out
        .iter()
        .map(|m| match m {
            Msg::Request { id, .. } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    let ok = |id, payload: &'static [u8]| Msg::Response {
        id,
        status: STATUS_OK,
        payload: Bytes::from_static(payload),
    };
    f.session.on_msg(ok(2, b"answer two")).unwrap();
    assert_eq!(&rx2.try_recv().unwrap().unwrap()[..], b"answer two");
    f.session
        .on_msg(Msg::Response {
            id: 1,
            status: STATUS_HANDLER_FAILED,
            payload: Bytes::new(),
        })
        .unwrap();
    assert!(matches!(
        rx1.try_recv(),
        Ok(Err(LinkError::RequestFailed { .. }))
    ));
    let e = error_text(f.session.on_msg(ok(2, b"again")));
    assert!(e.contains("response to unknown request id 2"), "{e}");
    let big = Msg::Response {
        id: 3,
        status: STATUS_OK,
        payload: vec![0u8; 1001].into(),
    };
    let e = error_text(f.session.on_msg(big));
    assert!(e.contains("exceeds our limit of 1000"), "{e}");
    assert!(matches!(rx3.try_recv(), Ok(Err(LinkError::Down { .. }))));
    let s = &f.shared.stats;
    assert_eq!((load(&s.answered), load(&s.requests_failed)), (1, 2));
}

#[tokio::test]
async fn the_peers_requests_are_held_to_the_window_and_limits() {
    let handler: Arc<dyn RequestHandler> = Arc::new(|p: Bytes| async move { p });
    let mut f = fixture_with(true, Some(handler), 1000);
    let req = |id, n: usize| Msg::Request {
        id,
        payload: vec![1u8; n].into(),
    };
    f.session.on_msg(req(10, 5)).unwrap();
    f.session.on_msg(req(11, 1000)).unwrap();
    let jobs = f.session.take_jobs();
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![10, 11]);
    assert_eq!(load(&f.shared.stats.served), 2);
    let e = error_text(f.session.on_msg(req(12, 1)));
    assert!(e.contains("exceeded the request window of 2"), "{e}");
    // Answered: a slot is free again, but an id in service may not be reused.
    f.session.on_answer(Answer {
        id: 10,
        status: STATUS_OK,
        payload: Bytes::from_static(b"done"),
    });
    let e = error_text(f.session.on_msg(req(11, 1)));
    assert!(e.contains("request id 11 reused while in service"), "{e}");
    let e = error_text(f.session.on_msg(req(13, 1001)));
    assert!(
        e.contains("request of 1001 bytes exceeds our limit of 1000"),
        "{e}"
    );
    f.session.on_msg(req(10, 1)).unwrap();
}

#[tokio::test]
async fn answers_go_out_once_and_within_the_peers_limit() {
    let handler: Arc<dyn RequestHandler> = Arc::new(|p: Bytes| async move { p });
    // The peer accepts answers of 100 bytes at most.
    let mut f = fixture_with(true, Some(handler), 100);
    for id in 1..=2 {
        f.session
            .on_msg(Msg::Request {
                id,
                payload: Bytes::new(),
            })
            .unwrap();
    }
    let answer = |id, n: usize| Answer {
        id,
        status: STATUS_OK,
        payload: vec![2u8; n].into(),
    };
    f.session.on_answer(answer(1, 100));
    f.session.on_answer(answer(2, 101));
    f.session.on_answer(answer(1, 1)); // not in service any more: dropped
    f.session.on_answer(answer(9, 1)); // never asked
    let out: Vec<(u64, u8, usize)> = f
        .session
        .data_out
        .iter()
        .map(|m| match m {
            Msg::Response {
                id,
                status,
                payload,
            } => (*id, *status, payload.len()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(out, vec![(1, STATUS_OK, 100), (2, STATUS_TOO_LARGE, 0)]);
}

#[tokio::test]
async fn without_a_handler_requests_are_answered_no_handler() {
    let mut f = fixture();
    f.session
        .on_msg(Msg::Request {
            id: 4,
            payload: Bytes::from_static(b"x"),
        })
        .unwrap();
    assert!(f.session.take_jobs().is_empty());
    assert!(matches!(
        f.session.data_out.front(),
        Some(Msg::Response { id: 4, status: STATUS_NO_HANDLER, payload }) if payload.is_empty()
    ));
}

#[tokio::test]
async fn fail_all_fails_every_post_and_request_exactly_once() {
    let mut f = fixture();
    let mut posts: Vec<_> = (1..=3).map(|seq| post(&mut f.session, seq).1).collect();
    let mut reqs = vec![request(&mut f.session, b"a"), request(&mut f.session, b"b")];
    let err = f.shared.down_err("gone");
    f.session.fail_all(&err);
    f.session.fail_all(&err);
    for rx in &mut posts {
        assert!(matches!(rx.try_recv(), Ok(Err(LinkError::Down { .. }))));
    }
    for rx in &mut reqs {
        assert!(matches!(rx.try_recv(), Ok(Err(LinkError::Down { .. }))));
    }
    let s = &f.shared.stats;
    assert_eq!((load(&s.failed), load(&s.requests_failed)), (3, 2));
    assert!(f.session.records.is_empty() && f.session.data_out.is_empty());
    // Commands that never reached the session fail too, and are counted.
    let (reply, mut rx) = oneshot::channel();
    let cmd = Cmd::Post {
        post: Post {
            partition: 0,
            seq: 9,
            local_offset: 0,
            remote_offset: 0,
            len: 1,
        },
        permit: permit(),
        reply,
    };
    f.session.refuse(cmd, &err);
    assert!(matches!(rx.try_recv(), Ok(Err(LinkError::Down { .. }))));
    assert_eq!(load(&s.failed), 4);
}

#[tokio::test]
async fn a_goodbye_or_a_handshake_message_ends_the_connection() {
    let mut f = fixture();
    let e = error_text(f.session.on_msg(Msg::Bye {
        reason: "link shut down".into(),
    }));
    assert!(e.contains("node 2 closed the link: link shut down"), "{e}");
    let e = error_text(f.session.on_msg(Msg::Reject {
        reason: "no".into(),
    }));
    assert!(
        e.contains("unexpected reject message on an established link"),
        "{e}"
    );
    f.session.queue_goodbye();
    assert!(matches!(controls(&mut f.session)[..], [Msg::Bye { .. }]));
}
