//! Callbacks that reach back into the reactor, and the newest features under
//! stress (found by the third review): rolling restarts whose successors
//! crash or that are asked for twice, a shutdown during one, a source slot
//! reused within a turn, an fd coming back after its queue was discarded,
//! gathers, listeners and timers re-entering, `Remote` around the reactor's
//! end, and no fd leaks or busy loops.

mod util;

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Config, Interest, Reactor, Readiness, RestartPolicy, SourceKey, SupervisorEvent};
use util::events::echo_worker;
use util::{deadline, poll_until, LIMIT};

/// An ack's outcome and the fd it handed back.
type FdOutcome = (Result<(), AckError>, Option<OwnedFd>);

/// Exits at once, before attaching: a successor that never says hello.
fn dies_before_hello() {
    std::process::exit(1);
}

/// P1: a rolling restart whose successor crashes before it is ready stalls
/// for good: the old worker is never replaced, RestartDone never comes.
#[test]
fn a_rolling_restart_replaces_a_successor_that_crashed() {
    util::child("echo", echo_worker);
    util::child("dies", dies_before_hello);
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let n = Rc::new(Cell::new(0u32));
    let n2 = n.clone();
    let mut p = RestartPolicy::default();
    p.backoff = Duration::from_millis(20);
    p.max_backoff = Duration::from_millis(100);
    let sup = r
        .supervise(
            move || {
                n2.set(n2.get() + 1);
                // spawn 1: the pool; spawn 2: the first successor (dies); later: fine.
                if n2.get() == 2 {
                    util::worker_command("dies")
                } else {
                    util::worker_command("echo")
                }
            },
            1,
            p,
        )
        .unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let l = log.clone();
    sup.on_event(move |_r, e| l.borrow_mut().push(format!("{e:?}")));
    let first = sup.workers()[0];
    poll_until(&mut r, LIMIT, |r| r.is_ready(first));
    sup.rolling_restart(&mut r, Duration::from_millis(500));
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !log.borrow().iter().any(|e| e.contains("RestartDone")) {
        r.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let events = log.borrow().clone();
    eprintln!("P1 events: {events:#?}");
    eprintln!("P1 workers now: {:?}, first={first:?} still there: {}", sup.workers(), r.is_ready(first));
    let done = events.iter().any(|e| e.contains("RestartDone"));
    r.shutdown(Duration::from_millis(500)).unwrap();
    assert!(done, "rolling restart never finished after its successor crashed");
}

/// P2: a source callback that removes another ready source and adds a new
/// one (the slab reuses the slot) makes the new source's callback run in
/// the same turn with the removed source's readiness (closed: true).
#[test]
fn a_source_never_gets_an_event_meant_for_the_one_whose_slot_it_took() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut r, _w, _pw) = Reactor::pair().unwrap();
    // Two sources whose peers hung up: both readable + closed in one turn.
    let (a, a_peer) = UnixStream::pair().unwrap();
    let (b, b_peer) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    // A fresh healthy source, nothing to read, peer alive.
    let (c, _c_peer) = UnixStream::pair().unwrap();
    c.set_nonblocking(true).unwrap();
    let c_cell: Rc<RefCell<Option<UnixStream>>> = Rc::new(RefCell::new(Some(c)));
    let c_seen: Rc<RefCell<Vec<Readiness>>> = Rc::default();
    let keys: Rc<RefCell<Vec<SourceKey>>> = Rc::default();
    let swapped = Rc::new(Cell::new(false));
    for (i, s) in [a, b].into_iter().enumerate() {
        let keys2 = keys.clone();
        let swapped2 = swapped.clone();
        let c_cell2 = c_cell.clone();
        let c_seen2 = c_seen.clone();
        let key = r
            .add_source(s, Interest::READABLE, move |r, _me: &mut UnixStream, ready| {
                eprintln!("P2 source {i} called with {ready:?}");
                if swapped2.get() {
                    return;
                }
                swapped2.set(true);
                let other = keys2.borrow()[1 - i];
                let got: Option<UnixStream> = r.remove_source(other);
                assert!(got.is_some());
                let c = c_cell2.borrow_mut().take().unwrap();
                let seen = c_seen2.clone();
                let k = r
                    .add_source(c, Interest::READABLE, move |_r, _c: &mut UnixStream, ready| {
                        seen.borrow_mut().push(ready)
                    })
                    .unwrap();
                eprintln!("P2 new source key {k:?}, removed {other:?}");
            })
            .unwrap();
        keys.borrow_mut().push(key);
    }
    // A becomes ready first, then B (epoll reports in readiness order).
    drop(a_peer);
    std::thread::sleep(Duration::from_millis(5));
    drop(b_peer);
    r.poll(Some(Duration::from_millis(100))).unwrap();
    for _ in 0..5 {
        r.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let seen = c_seen.borrow().clone();
    eprintln!("P2 readiness seen by the new, healthy source: {seen:?}");
    assert!(seen.is_empty(), "the new source got the removed one's event: {seen:?}");
}

/// P3: a write failure with more than a turn's budget of frames buffered
/// discards the queue: an acked message's fd that never left is closed,
/// not handed back with its outcome.
#[test]
fn an_fd_comes_back_even_when_its_queue_was_discarded() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    for frames in [0usize, 10] {
        let mut cfg = Config::default();
        cfg.frames_per_poll = 1;
        let (mut m, wid, pw) = Reactor::pair_with(cfg).unwrap();
        let mut w = pw.attach().unwrap();
        w.on("conn", |_r, _m: clusterphone::Message<()>| {}).unwrap();
        poll_until(&mut m, LIMIT, |m| {
            let _ = w.poll(Some(Duration::ZERO));
            m.is_ready(wid)
        });
        for i in 0..frames {
            w.send_to_master("x", &(i as u64), None).send().unwrap();
        }
        w.flush(LIMIT).unwrap();
        drop(w);
        let (keep, give) = UnixStream::pair().unwrap();
        let back: Rc<RefCell<Option<FdOutcome>>> = Rc::default();
        let b = back.clone();
        m.send_to(wid, "conn", &(), Some(give.into()))
            .within(Duration::from_secs(5))
            .ackd_fd(move |_r, o: Result<(), AckError>, fd| *b.borrow_mut() = Some((o, fd)))
            .unwrap();
        poll_until(&mut m, LIMIT, |_| back.borrow().is_some());
        let (o, fd) = back.borrow_mut().take().unwrap();
        eprintln!("P3 frames buffered by the peer={frames}: outcome {o:?}, fd back: {}", fd.is_some());
        // Is the peer end of `keep` still open anywhere? (closed => fd was closed)
        keep.set_nonblocking(true).unwrap();
        let closed = {
            let mut k = &keep;
            let r = std::io::Read::read(&mut k, &mut [0u8; 1]);
            matches!(r, Ok(0))
        };
        eprintln!("P3 frames={frames}: our other end sees the fd closed: {closed}");
        let _ = (&keep).write_all(b"");
        assert!(fd.is_some(), "frames={frames}: the fd never left, yet it was not handed back (closed: {closed})");
    }
}

/// A master and its in-process worker (same thread), ready; the worker
/// answers "ping" with its payload.
fn ready_pair() -> (Reactor, clusterphone::WorkerId, Reactor) {
    let (mut m, wid, pw) = Reactor::pair().unwrap();
    let mut w = pw.attach().unwrap();
    w.on("ping", |_r, msg: clusterphone::Message<u64>| {
        let _ = msg.reply.ok(&msg.payload);
    })
    .unwrap();
    drive(&mut m, &mut w, |m| m.is_ready(wid));
    (m, wid, w)
}

#[track_caller]
fn drive(m: &mut Reactor, w: &mut Reactor, mut cond: impl FnMut(&mut Reactor) -> bool) {
    let end = Instant::now() + LIMIT;
    while !cond(m) {
        assert!(Instant::now() < end, "condition not met");
        let _ = w.poll(Some(Duration::from_millis(1)));
        m.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

/// P4a: a gather callback that starts another broadcast (and a blocking
/// call refused inside it).
#[test]
fn a_gather_callback_may_start_another_broadcast() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut m, _wid, mut w) = ready_pair();
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    m.broadcast("ping", &1u64)
        .within(Duration::from_secs(2))
        .gather(move |r, all: clusterphone::Gathered<u64>| {
            c.set(c.get() + 1);
            eprintln!("P4a first gather {all:?}");
            assert!(matches!(r.broadcast("ping", &9u64).wait::<u64>(), Err(clusterphone::Error::Reentrant)));
            let c2 = c.clone();
            r.broadcast("ping", &2u64)
                .gather(move |_r, all: clusterphone::Gathered<u64>| {
                    eprintln!("P4a second gather {all:?}");
                    c2.set(c2.get() + 10);
                })
                .unwrap();
        })
        .unwrap();
    drive(&mut m, &mut w, |_| calls.get() >= 11);
    for _ in 0..20 {
        let _ = w.poll(Some(Duration::from_millis(1)));
        m.poll(Some(Duration::from_millis(1))).unwrap();
    }
    assert_eq!(calls.get(), 11);
    // Empty target set: called once, at once.
    let n = Rc::new(Cell::new(0));
    let n2 = n.clone();
    m.broadcast("ping", &1u64)
        .to(Vec::new())
        .gather(move |_r, _all: clusterphone::Gathered<u64>| n2.set(n2.get() + 1))
        .unwrap();
    // All refused (stale id): called once.
    let n3 = n.clone();
    m.broadcast("ping", &1u64)
        .to(vec![_wid, _wid])
        .gather(move |_r, all: clusterphone::Gathered<u64>| {
            eprintln!("P4a dup {all:?}");
            n3.set(n3.get() + 1)
        })
        .unwrap();
    drive(&mut m, &mut w, |_| n.get() >= 2);
    for _ in 0..20 {
        let _ = w.poll(Some(Duration::from_millis(1)));
        m.poll(Some(Duration::from_millis(1))).unwrap();
    }
    assert_eq!(n.get(), 2);
}

/// P4b: worker listeners that add listeners and remove themselves (and
/// others) while running; the hook replaced from inside itself.
#[test]
fn listeners_may_add_and_remove_listeners_while_running() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut m, wid, pw) = Reactor::pair().unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let other: Rc<Cell<Option<clusterphone::ListenerKey>>> = Rc::default();
    let me: Rc<Cell<Option<clusterphone::ListenerKey>>> = Rc::default();
    let (l, o, me2) = (log.clone(), other.clone(), me.clone());
    let k1 = m.add_worker_listener(move |r, id, e| {
        l.borrow_mut().push(format!("L1 {id:?} {e:?}"));
        let l2 = l.clone();
        let k = r.add_worker_listener(move |_r, id, e| l2.borrow_mut().push(format!("L3 {id:?} {e:?}")));
        eprintln!("P4b added {k:?}");
        if let Some(k) = o.get() {
            assert!(r.remove_listener(k));
        }
        assert!(r.remove_listener(me2.get().unwrap()));
        assert!(!r.remove_listener(me2.get().unwrap()));
    });
    me.set(Some(k1));
    let l = log.clone();
    let k2 = m.add_worker_listener(move |_r, id, e| l.borrow_mut().push(format!("L2 {id:?} {e:?}")));
    other.set(Some(k2));
    let l = log.clone();
    m.on_worker_event(move |r, id, e| {
        l.borrow_mut().push(format!("hook {id:?} {e:?}"));
        let l2 = l.clone();
        r.on_worker_event(move |_r, id, e| l2.borrow_mut().push(format!("hook2 {id:?} {e:?}")));
    });
    let mut w = pw.attach().unwrap();
    drive(&mut m, &mut w, |m| m.is_ready(wid));
    drop(w);
    drive(&mut m, &mut w_dummy(), |m| m.workers().is_empty());
    eprintln!("P4b log {:#?}", log.borrow());
}

fn w_dummy() -> Reactor {
    let (_m, _w, pw) = Reactor::pair().unwrap();
    // keep the master alive with the worker: leak it for the probe.
    std::mem::forget(_m);
    pw.attach().unwrap()
}

/// P4c: timers due in one batch: A cancels B and adds C (reusing B's slot,
/// due at once); a periodic timer cancels itself and adds one reusing its slot.
#[test]
fn timers_may_cancel_and_add_timers_while_running() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut r, _w, _pw) = Reactor::pair().unwrap();
    let log: Rc<RefCell<Vec<&'static str>>> = Rc::default();
    let bkey: Rc<Cell<Option<clusterphone::UserTimerKey>>> = Rc::default();
    let (l, bk) = (log.clone(), bkey.clone());
    let d = Duration::from_millis(5);
    r.add_timer(d, None, move |r| {
        l.borrow_mut().push("A");
        if let Some(b) = bk.get() {
            let found = r.cancel_timer(b);
            l.borrow_mut().push(if found { "A cancelled B" } else { "B already gone" });
            let l2 = l.clone();
            let c = r.add_timer(Duration::ZERO, None, move |_r| l2.borrow_mut().push("C"));
            eprintln!("P4c C = {c:?}, B was {b:?}");
        }
    });
    let l = log.clone();
    bkey.set(Some(r.add_timer(d, None, move |_r| l.borrow_mut().push("B"))));
    // Periodic self-cancelling, re-adding in its own slot.
    let pk: Rc<Cell<Option<clusterphone::UserTimerKey>>> = Rc::default();
    let (l, pk2) = (log.clone(), pk.clone());
    let count = Rc::new(Cell::new(0));
    let cnt = count.clone();
    pk.set(Some(r.add_timer(Duration::from_millis(1), Some(Duration::from_millis(1)), move |r| {
        cnt.set(cnt.get() + 1);
        if cnt.get() == 3 {
            assert!(r.cancel_timer(pk2.get().unwrap()));
            let l2 = l.clone();
            r.add_timer(Duration::from_millis(1), None, move |_r| l2.borrow_mut().push("P-next"));
        }
    })));
    std::thread::sleep(Duration::from_millis(10));
    for _ in 0..30 {
        r.poll(Some(Duration::from_millis(2))).unwrap();
    }
    eprintln!("P4c log {:?}, periodic ran {}", log.borrow(), count.get());
    let v = log.borrow().clone();
    let bs = v.iter().filter(|s| **s == "B").count();
    let cs = v.iter().filter(|s| **s == "C").count();
    assert!(cs == 1 || v.contains(&"B already gone"), "{v:?}");
    assert!(bs <= 1 && cs <= 1);
    assert_eq!(count.get(), 3);
}

/// P4d: a Remote used after its reactor is dropped, and one whose queue is
/// full: typed errors, fd handed back (not leaked).
#[test]
fn a_remote_after_its_reactor_is_gone_hands_the_fd_back() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut m, wid, pw) = Reactor::pair().unwrap();
    let remote = m.remote().unwrap();
    drop(pw);
    drop(m);
    let (_keep, give) = UnixStream::pair().unwrap();
    let e = remote.send_to(wid, "x", &1u8, Some(give.into())).unwrap_err();
    eprintln!("P4d after drop: {:?} fd back {}", e.error, e.fd.is_some());
    assert_eq!(e.error, clusterphone::RemoteError::Closed);
    assert!(e.fd.is_some());
    let std_thread = std::thread::spawn(move || remote.broadcast("x", &1u8));
    assert_eq!(std_thread.join().unwrap(), Err(clusterphone::RemoteError::Closed));
}

/// P4e: a Remote send from another thread wakes a reactor blocked in
/// poll(None) at once (no other event needed).
#[test]
fn a_remote_send_wakes_a_blocked_poll() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut m, wid, mut w) = ready_pair();
    let remote = w.remote().unwrap();
    let got = Rc::new(Cell::new(false));
    let g = got.clone();
    m.on("from-thread", move |_r, _m: clusterphone::Message<u64>| g.set(true)).unwrap();
    let _ = wid;
    for round in 0..50 {
        got.set(false);
        let r2 = remote.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            r2.send_to_master("from-thread", &(round as u64), None).unwrap();
        });
        let start = Instant::now();
        w.poll(Some(Duration::from_secs(5))).unwrap(); // must wake for the remote command
        let waited = start.elapsed();
        t.join().unwrap();
        assert!(waited < Duration::from_secs(1), "round {round}: waited {waited:?}");
        drive(&mut m, &mut w, |_| got.get());
    }
}

/// P5a: an observer that starts a new rolling restart from inside a
/// Spawned event of the running one (as "config changed again" would).
#[test]
fn a_rolling_restart_asked_for_during_one_is_refused() {
    util::child("echo", echo_worker);
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let sup = r.supervise(|| util::worker_command("echo"), 2, RestartPolicy::default()).unwrap();
    let original = sup.workers();
    poll_until(&mut r, LIMIT, |r| original.iter().all(|&w| r.is_ready(w)));
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let (l, s2) = (log.clone(), sup.clone());
    let again = Rc::new(Cell::new(false));
    sup.on_event(move |r, e| {
        l.borrow_mut().push(format!("{e:?}"));
        if matches!(e, SupervisorEvent::Spawned(_)) && !again.get() {
            again.set(true);
            s2.rolling_restart(r, Duration::from_millis(500));
        }
    });
    sup.rolling_restart(&mut r, Duration::from_millis(500));
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end && !log.borrow().iter().any(|e| e.contains("RestartDone")) {
        r.poll(Some(Duration::from_millis(10))).unwrap();
    }
    util::settle(&mut r, 50);
    let now = sup.workers();
    eprintln!("P5a events {:#?}", log.borrow());
    eprintln!("P5a original {original:?} now {now:?} live {:?}", r.workers());
    let left: Vec<_> = original.iter().filter(|w| r.workers().contains(w)).collect();
    r.shutdown(Duration::from_millis(500)).unwrap();
    assert!(log.borrow().iter().any(|e| e.contains("RestartDone")), "no RestartDone");
    assert!(left.is_empty(), "original workers left running: {left:?}");
    assert_eq!(now.len(), 2, "pool size changed: {now:?}");
}

/// P5b: a shutdown during a rolling restart reports a spurious SpawnFailed.
#[test]
fn a_shutdown_during_a_rolling_restart_aborts_it() {
    util::child("echo", echo_worker);
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let sup = r.supervise(|| util::worker_command("echo"), 2, RestartPolicy::default()).unwrap();
    let original = sup.workers();
    poll_until(&mut r, LIMIT, |r| original.iter().all(|&w| r.is_ready(w)));
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let l = log.clone();
    sup.on_event(move |_r, e| l.borrow_mut().push(format!("{e:?}")));
    sup.rolling_restart(&mut r, Duration::from_millis(500));
    // Until the first successor is ready (the old one is then asked to exit).
    poll_until(&mut r, LIMIT, |r| !r.is_ready(original[0]));
    r.shutdown(Duration::from_millis(500)).unwrap();
    util::settle(&mut r, 10);
    eprintln!("P5b events {:#?}", log.borrow());
    assert!(!log.borrow().iter().any(|e| e.contains("SpawnFailed")), "spurious SpawnFailed on shutdown");
}

/// P6: fds of acked messages timing out in the queue, with every completion
/// form, and of a link going down with fds queued: none leaks.
#[test]
fn no_fd_leaks_on_timeouts_and_teardown() {
    let _g = util::alone();
    let _d = deadline(Duration::from_secs(30));
    let before = util::open_fds();
    for round in 0..3 {
        let (mut m, wid, pw) = Reactor::pair().unwrap();
        let mut w = pw.attach().unwrap();
        drive(&mut m, &mut w, |m| m.is_ready(wid));
        // The worker stops reading: fill its socket.
        while m.queue_depth(wid).is_some_and(|(f, _)| f == 0) {
            m.send_to(wid, "fill", clusterphone::Bytes(vec![0u8; 64 << 10]), None).send().unwrap();
        }
        let outcomes = Rc::new(Cell::new(0));
        for i in 0..30 {
            let (_a, b) = UnixStream::pair().unwrap();
            let o = outcomes.clone();
            let t = Duration::from_millis(20 + i);
            let s = m.send_to(wid, "conn", &(), Some(b.into())).within(t);
            match i % 3 {
                0 => s.ackd(move |_r, _x: Result<(), AckError>| o.set(o.get() + 1)).unwrap(),
                1 => s
                    .ackd_fd(move |_r, _x: Result<(), AckError>, fd| {
                        drop(fd);
                        o.set(o.get() + 1)
                    })
                    .unwrap(),
                _ => {
                    let _h = s.handle::<()>().unwrap();
                    o.set(o.get() + 1);
                }
            }
        }
        if round == 2 {
            // Some still queued when the link goes down.
            for _ in 0..5 {
                let (_a, b) = UnixStream::pair().unwrap();
                let o = outcomes.clone();
                m.send_to(wid, "conn", &(), Some(b.into()))
                    .within(Duration::from_secs(5))
                    .ackd_fd(move |_r, _x: Result<(), AckError>, _fd| o.set(o.get() + 1))
                    .unwrap();
            }
            drop(w);
            poll_until(&mut m, LIMIT, |_| outcomes.get() == 35);
        } else {
            poll_until(&mut m, LIMIT, |_| outcomes.get() == 30);
            util::settle(&mut m, 5);
            drop(w);
        }
        drop(m);
    }
    let after = util::open_fds();
    eprintln!("P6 fds before {before} after {after}");
    assert_eq!(before, after);
}

/// P7: after a remote command is run, the reactor sleeps again (the waker
/// does not stay ready: no busy loop), and user sources that stay readable
/// (edge-triggered) do not spin either.
#[test]
fn no_busy_loop_after_remote_commands_or_a_readable_source() {
    let _g = util::shared();
    let _d = deadline(Duration::from_secs(20));
    let (mut m, _wid, mut w) = ready_pair();
    let remote = m.remote().unwrap();
    remote.broadcast("ping", &1u64).unwrap();
    m.poll(Some(Duration::from_millis(50))).unwrap();
    let _ = w.poll(Some(Duration::ZERO));
    let _ = m.poll(Some(Duration::ZERO));
    // A source with unread data forever.
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.write_all(b"unread").unwrap();
    let calls = Rc::new(Cell::new(0));
    let c = calls.clone();
    m.add_source(a, Interest::READABLE, move |_r, _a: &mut UnixStream, _ready| c.set(c.get() + 1)).unwrap();
    m.poll(Some(Duration::from_millis(50))).unwrap();
    let mut turns = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        m.poll(Some(Duration::from_millis(100))).unwrap();
        turns += 1;
    }
    eprintln!("P7 turns in 300ms with 100ms polls: {turns}; source calls {}", calls.get());
    assert!(turns <= 4, "busy loop: {turns} turns");
}
