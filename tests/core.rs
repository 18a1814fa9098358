//! Core behaviour with real worker processes: both directions, namespaces,
//! queue-until-ready ordering, unknown commands, exits, volume, re-entrancy.

mod util;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Config, Error, Message, Peer, Reactor, WorkerId, WritableWakeups};
use util::events::{Ev, Events};

const SECS: Duration = Duration::from_secs(10);
/// Frames the burst-exit worker sends just before it exits.
const BURST: u64 = 20_000;

/// The worker most tests here talk to: pings back, counts and reports, sends
/// on request, registers and removes handlers, and spawns a grandchild.
fn general_worker() {
    let channel: i32 = std::env::var(clusterphone::ENV_FD).unwrap().parse().unwrap();
    let mut r = Reactor::attach().unwrap();
    let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
    r.on("ping", |r, msg: Message<u64>| {
        r.send_to_master("pong", &(msg.payload + 1), None).send().unwrap();
    })
    .unwrap();
    let s = seen.clone();
    r.on("num", move |_r, msg: Message<u64>| s.borrow_mut().push(msg.payload)).unwrap();
    let s = seen.clone();
    r.on("report", move |_r, msg: Message<()>| {
        msg.reply.ok(&*s.borrow()).unwrap();
    })
    .unwrap();
    r.on("dual", |_r, msg: Message<()>| msg.reply.ok("default").unwrap()).unwrap();
    r.ns("a").unwrap().on("dual", |_r, msg: Message<()>| msg.reply.ok("ns-a").unwrap()).unwrap();
    r.on("stats", |r, msg: Message<()>| {
        let st = r.stats();
        msg.reply.ok(&(st.unhandled, st.acks_sent, st.messages_received)).unwrap();
    })
    .unwrap();
    r.on("bytes-len", |_r, msg: Message<clusterphone::Bytes>| msg.reply.ok(&msg.payload.0.len()).unwrap()).unwrap();
    r.on("writes", |r, msg: Message<()>| {
        let st = r.stats();
        msg.reply.ok(&(st.frames_written, st.write_calls)).unwrap();
    })
    .unwrap();
    r.on("go", |r, msg: Message<u64>| {
        for i in 0..msg.payload {
            r.send_to_master("from-worker", &i, None).send().unwrap();
        }
    })
    .unwrap();
    r.on("echo-back", |r, msg: Message<u64>| {
        r.send_to_master("echoed", &msg.payload, None).send().unwrap();
    })
    .unwrap();
    r.on("setup", |r, msg: Message<()>| {
        // Re-entrant: register, remove ourselves, send, all from inside a handler.
        r.on("later", |_r, m: Message<()>| m.reply.ok("later-ok").unwrap()).unwrap();
        assert!(r.off("setup"));
        r.ns("late-ns").unwrap().on("x", |_r, m: Message<()>| m.reply.ok("x-ok").unwrap()).unwrap();
        r.send_to_master("setup-done", &(), None).send().unwrap();
        msg.reply.ok(&()).unwrap();
    })
    .unwrap();
    r.on("spawn-grandchild", |_r, msg: Message<i32>| {
        let mut cmd = util::worker_command("grandchild");
        cmd.arg(msg.payload.to_string());
        let status = cmd.status().unwrap();
        msg.reply.ok(&status.success()).unwrap();
    })
    .unwrap();
    r.on("channel-fd", move |_r, msg: Message<()>| msg.reply.ok(&channel).unwrap()).unwrap();
    let sunk = Rc::new(RefCell::new((0u64, 0u64)));
    let s = sunk.clone();
    r.on("sink", move |_r, msg: Message<clusterphone::Bytes>| {
        let mut s = s.borrow_mut();
        s.0 += 1;
        s.1 += msg.payload.len() as u64;
    })
    .unwrap();
    r.on("sunk", move |_r, msg: Message<()>| msg.reply.ok(&*sunk.borrow()).unwrap()).unwrap();
    util::serve(&mut r);
}

#[test]
fn messages_flow_both_ways_with_sender_identity() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let got: Rc<RefCell<Vec<(Peer, u64)>>> = Rc::default();
    let g = got.clone();
    r.on("pong", move |_r, msg: Message<u64>| g.borrow_mut().push((msg.from, msg.payload))).unwrap();
    let a = util::spawn_ready(&mut r, "general");
    let b = util::spawn_ready(&mut r, "general");
    r.send_to(a, "ping", &10u64, None).send().unwrap();
    r.send_to(b, "ping", &20u64, None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| got.borrow().len() == 2);
    let mut v = got.borrow().clone();
    v.sort_by_key(|x| x.1);
    assert_eq!(v, vec![(Peer::Worker(a), 11), (Peer::Worker(b), 21)]);
    r.shutdown(SECS).unwrap();
}

#[test]
fn namespaces_keep_handlers_apart() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let d: String = r.request(w, "dual", &(), SECS).unwrap();
    let a: String = r.ns("a").unwrap().request(w, "dual", &(), SECS).unwrap();
    assert_eq!((d.as_str(), a.as_str()), ("default", "ns-a"));
    let mut names = r.worker_namespaces(w);
    names.sort();
    assert_eq!(names, vec!["_", "a"]);
    // Names are checked.
    assert!(matches!(r.ns(""), Err(Error::EmptyNamespace)));
    assert!(matches!(r.ns("__clusterphone"), Err(Error::ReservedNamespace)));
    let e = r.send_to(w, "", &(), None).send().unwrap_err();
    assert!(matches!(e.error, Error::EmptyCommand));
    r.shutdown(SECS).unwrap();
}

#[test]
fn messages_queued_before_hello_keep_their_order() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(util::worker_command("general")).unwrap();
    assert!(!r.is_ready(w));
    for i in 0..300u64 {
        r.send_to(w, "num", &i, None).send().unwrap();
    }
    let (frames, bytes) = r.queue_depth(w).unwrap();
    assert_eq!(frames, 300, "held until hello");
    assert!(bytes > 0);
    util::poll_until(&mut r, SECS, |r| r.is_ready(w));
    let readies: Vec<WorkerId> =
        events.all().into_iter().filter(|(_, e)| matches!(e, Ev::Ready)).map(|(id, _)| id).collect();
    assert_eq!(readies, vec![w]);
    for i in 300..600u64 {
        r.send_to(w, "num", &i, None).send().unwrap();
    }
    let seen: Vec<u64> = r.request(w, "report", &(), SECS).unwrap();
    assert_eq!(seen, (0..600).collect::<Vec<_>>());
    r.shutdown(SECS).unwrap();
}

#[test]
fn unknown_command_and_namespace_are_reported_not_lost() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let e = r.request::<(), _>(w, "nope", &(), SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::NoHandler)), "{e:?}");
    let e = r.ns("zzz").unwrap().request::<(), _>(w, "dual", &(), SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::UnknownNamespace)), "{e:?}");
    // Unacked: the receiver counts it.
    r.send_to(w, "nope", &(), None).send().unwrap();
    r.ns("zzz").unwrap().send_to(w, "x", &(), None).send().unwrap();
    let (unhandled, _, _): (u64, u64, u64) = r.request(w, "stats", &(), SECS).unwrap();
    assert_eq!(unhandled, 4);
    // And on the master: a hook hears of it.
    let heard: Rc<RefCell<Vec<(String, String)>>> = Rc::default();
    let h = heard.clone();
    r.on_unhandled(move |_r, u| h.borrow_mut().push((u.namespace.clone(), u.command.clone())));
    // Ask the worker to send us a command we have no handler for.
    r.send_to(w, "echo-back", &5u64, None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| !heard.borrow().is_empty());
    assert_eq!(heard.borrow()[0], ("_".to_string(), "echoed".to_string()));
    assert_eq!(r.stats().unhandled, 1);
    r.shutdown(SECS).unwrap();
}

/// Attaches (says hello) and exits with 7.
fn exit_now_worker() {
    let _r = Reactor::attach().unwrap();
    std::process::exit(7);
}

#[test]
fn sending_to_an_exited_worker_is_an_error() {
    util::child("exit-now", exit_now_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(util::worker_command("exit-now")).unwrap();
    util::poll_until(&mut r, SECS, |_| events.all().iter().any(|(_, e)| matches!(e, Ev::Exited(_))));
    assert!(matches!(events.all().last(), Some((_, Ev::Exited(_)))), "{events:?}");
    assert!(r.workers().is_empty());
    let e = r.send_to(w, "x", &1, None).send().unwrap_err();
    assert!(matches!(e.error, Error::UnknownWorker(id) if id == w));
    // An fd is handed back, still open.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let raw = a.as_raw_fd();
    let e = r.send_to(w, "x", &1, Some(OwnedFd::from(a))).send().unwrap_err();
    assert_eq!(e.fd.as_ref().map(|f| f.as_raw_fd()), Some(raw));
    assert!(r.kill(w).is_err());
}

#[test]
fn ten_thousand_messages_each_way_in_order() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 6);
    let mut r = Reactor::master().unwrap();
    let got: Rc<RefCell<Vec<u64>>> = Rc::default();
    let g = got.clone();
    r.on("from-worker", move |_r, msg: Message<u64>| g.borrow_mut().push(msg.payload)).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    for i in 0..10_000u64 {
        r.send_to(w, "num", &i, None).send().unwrap();
    }
    let seen: Vec<u64> = r.request(w, "report", &(), SECS).unwrap();
    assert_eq!(seen, (0..10_000).collect::<Vec<_>>());
    r.send_to(w, "go", &10_000u64, None).send().unwrap();
    util::poll_until(&mut r, SECS * 2, |_| got.borrow().len() >= 10_000);
    assert_eq!(*got.borrow(), (0..10_000).collect::<Vec<_>>());
    r.shutdown(SECS).unwrap();
}

#[test]
fn zero_timeout_poll_never_blocks() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    assert!(r.next_deadline().is_none(), "no timer armed: a blocking poll would wait forever");
    for _ in 0..1000 {
        r.poll(Some(Duration::ZERO)).unwrap();
    }
    assert!(r.is_ready(w));
    r.shutdown(SECS).unwrap();
}

#[test]
fn poll_timeouts_hold_whatever_waits_came_before() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 6);
    let mut r = Reactor::master().unwrap();
    let pongs = Rc::new(RefCell::new(0));
    let p = pongs.clone();
    r.on("pong", move |_r, _m: Message<u64>| *p.borrow_mut() += 1).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    // Each poll below returns early, on the pong, leaving its own (long or
    // short) wait set in the reactor.
    let until_pong = |r: &mut Reactor, timeout: Duration| {
        let n = *pongs.borrow();
        r.send_to(w, "ping", &1u64, None).send().unwrap();
        while *pongs.borrow() == n {
            r.poll(Some(timeout)).unwrap();
        }
    };
    // A short wait after a long one ends on time, not when the long one would have.
    r.poll(Some(Duration::from_millis(50))).unwrap(); // outlives the waits of spawn_ready
    until_pong(&mut r, Duration::from_secs(20));
    let start = Instant::now();
    r.poll(Some(Duration::from_millis(30))).unwrap();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(30) && took < Duration::from_secs(10), "{took:?}");
    // A long wait after a short one does not end when the short one would have
    // (a lower bound only: load can make a poll longer, never shorter).
    until_pong(&mut r, Duration::from_millis(40));
    let start = Instant::now();
    r.poll(Some(Duration::from_millis(300))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());
    r.shutdown(SECS).unwrap();
}

fn readable_now(r: &Reactor) -> bool {
    let mut pfd = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

#[test]
fn a_nesting_loop_is_not_woken_by_an_earlier_polls_timer() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let pongs = Rc::new(RefCell::new(0u32));
    let p = pongs.clone();
    r.on("pong", move |_r, _m: Message<u64>| *p.borrow_mut() += 1).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    r.poll(Some(Duration::from_millis(50))).unwrap(); // outlives the waits of spawn_ready
                                                      // One ordinary timed poll that returns early, on the pong.
    r.send_to(w, "ping", &1u64, None).send().unwrap();
    while *pongs.borrow() == 0 {
        r.poll(Some(Duration::from_millis(200))).unwrap();
    }
    // From here on the reactor is nested as the README says: wait on its fd
    // until next_deadline(), then poll(Some(ZERO)).
    let t0 = Instant::now();
    let span = Duration::from_millis(500);
    let mut wakes = Vec::new();
    while t0.elapsed() < span {
        assert!(r.next_deadline().is_none(), "nothing is due, ever");
        let left = span.saturating_sub(t0.elapsed());
        let mut pfd = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32 + 1) };
        if n > 0 {
            wakes.push(t0.elapsed());
        }
        r.poll(Some(Duration::ZERO)).unwrap();
        assert!(!readable_now(&r), "the epoll fd stays readable after a zero poll");
    }
    assert!(wakes.is_empty(), "outer loop woken with nothing to do at {wakes:?}");
    r.shutdown(SECS).unwrap();
}

/// How long a 5 ms ack timeout takes to fire, for a message queued to a
/// child that never says hello.
#[track_caller]
fn ack_timeout_lateness(busy: Option<Duration>) -> Duration {
    let mut config = Config::default();
    config.busy_poll = busy;
    let mut r = Reactor::master_with(config).unwrap();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("3");
    let c = r.spawn(cmd).unwrap();
    r.poll(Some(Duration::from_millis(30))).unwrap();
    let fired: Rc<RefCell<Option<Duration>>> = Rc::default();
    let f = fired.clone();
    let start = Instant::now();
    r.send_to(c, "x", &(), None)
        .within(Duration::from_millis(5))
        .ackd(move |_r, res: Result<(), AckError>| {
            assert!(matches!(res, Err(AckError::Timeout)), "{res:?}");
            *f.borrow_mut() = Some(start.elapsed());
        })
        .unwrap();
    while fired.borrow().is_none() {
        r.poll(Some(Duration::from_secs(2))).unwrap();
    }
    let took = fired.borrow().unwrap();
    r.kill(c).unwrap();
    util::poll_until(&mut r, SECS, |r| r.workers().is_empty());
    took
}

#[test]
fn busy_polling_does_not_hold_back_timers() {
    let _d = util::deadline(SECS * 3);
    let busy = ack_timeout_lateness(Some(Duration::from_millis(300)));
    // The spin window is 300 ms; the timer is due after 5.
    assert!(busy < Duration::from_millis(150), "busy-polling held a 5 ms ack timeout for {busy:?}");
}

#[test]
fn poll_none_sleeps_through_an_earlier_polls_timer() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let pongs = Rc::new(RefCell::new(0u32));
    let p = pongs.clone();
    r.on("pong", move |_r, _m: Message<u64>| *p.borrow_mut() += 1).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    r.poll(Some(Duration::from_millis(50))).unwrap();
    // A child that never says hello and exits in 700 ms: the only event to come.
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("0.7");
    let born = Instant::now();
    let _c = r.spawn(cmd).unwrap();
    r.send_to(w, "ping", &1u64, None).send().unwrap();
    while *pongs.borrow() == 0 {
        r.poll(Some(Duration::from_millis(150))).unwrap();
    }
    // (No next_deadline() here: it would disarm the earlier poll's timer.)
    r.poll(None).unwrap();
    let took = born.elapsed();
    assert!(took >= Duration::from_millis(650), "poll(None) returned after {took:?} with nothing to do");
    r.shutdown(SECS).unwrap();
}

#[test]
fn handlers_can_register_remove_and_send_reentrantly() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let done = Rc::new(RefCell::new(0));
    let d = done.clone();
    r.on("setup-done", move |_r, _m: Message<()>| *d.borrow_mut() += 1).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    r.request::<(), _>(w, "setup", &(), SECS).unwrap();
    util::poll_until(&mut r, SECS, |_| *done.borrow() == 1);
    assert_eq!(r.request::<String, _>(w, "later", &(), SECS).unwrap(), "later-ok");
    assert_eq!(r.ns("late-ns").unwrap().request::<String, _>(w, "x", &(), SECS).unwrap(), "x-ok");
    let e = r.request::<(), _>(w, "setup", &(), SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::NoHandler)), "{e:?}");
    // The late namespace was announced to the master.
    util::poll_until(&mut r, SECS, |r| r.worker_namespaces(w).iter().any(|n| n == "late-ns"));

    // Master side: a handler spawns a worker and messages it, from inside the handler.
    let spawned: Rc<RefCell<Option<WorkerId>>> = Rc::default();
    let s = spawned.clone();
    r.on("from-worker", move |r, _m: Message<u64>| {
        if s.borrow().is_none() {
            let nw = r.spawn(util::worker_command("general")).unwrap();
            r.send_to(nw, "num", &42u64, None).send().unwrap();
            assert!(matches!(r.poll(None), Err(Error::Reentrant)));
            *s.borrow_mut() = Some(nw);
        }
    })
    .unwrap();
    r.send_to(w, "go", &1u64, None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| spawned.borrow().is_some());
    let nw = spawned.borrow().unwrap();
    assert_eq!(r.request::<Vec<u64>, _>(nw, "report", &(), SECS).unwrap(), vec![42]);
    r.shutdown(SECS).unwrap();
}

/// Sends `BURST` frames, flushes and exits at once.
fn burst_then_exit_worker() {
    let mut r = Reactor::attach().unwrap();
    for i in 0..BURST {
        r.send_to_master("burst", &i, None).send().unwrap();
    }
    r.flush(SECS).unwrap();
    std::process::exit(0);
}

#[test]
fn a_worker_that_sends_and_exits_at_once_loses_nothing() {
    util::child("burst-exit", burst_then_exit_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    // Far below the burst: frames are still buffered (or unread) when the exit shows.
    config.frames_per_poll = 16;
    let mut r = Reactor::master_with(config).unwrap();
    let got: Rc<RefCell<Vec<u64>>> = Rc::default();
    let g = got.clone();
    r.on("burst", move |_r, msg: Message<u64>| g.borrow_mut().push(msg.payload)).unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(util::worker_command("burst-exit")).unwrap();
    assert_eq!(events.wait_exit(&mut r, w).status.unwrap().code(), Some(0));
    let got = got.borrow();
    assert_eq!(got.len() as u64, BURST, "frames lost at the exit");
    assert!(got.iter().copied().eq(0..BURST), "frames out of order");
}

/// `CLUSTERPHONE_FD` names stdin, which is not a socket: exits 0 if attach
/// says so, twice.
fn attach_bad() {
    let ok = matches!(Reactor::attach(), Err(Error::NotAWorker(_)));
    let again = matches!(Reactor::attach(), Err(Error::NotAWorker(_)));
    std::process::exit(if ok && again { 0 } else { 1 });
}

#[test]
fn attach_outside_a_worker_is_a_clear_error() {
    util::child("attach-bad", attach_bad);
    let _d = util::deadline(SECS);
    // This test process was not spawned by a master.
    if !clusterphone::is_worker() {
        assert!(matches!(Reactor::attach(), Err(Error::NotAWorker(_))));
    }
    // A variable that names something other than a Unix stream socket.
    let status =
        util::worker_command("attach-bad").env(clusterphone::ENV_FD, "0").stdin(Stdio::null()).status().unwrap();
    assert!(status.success());
}

/// A worker's child: exits 0 if it has not inherited the channel (no
/// variable, and the parent's fd number, its last argument, closed).
fn grandchild() {
    let fd: i32 = std::env::args().next_back().unwrap().parse().unwrap();
    // SAFETY: F_GETFD on an arbitrary number only queries; EBADF if not open.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    std::process::exit(if !clusterphone::is_worker() && !open { 0 } else { 1 });
}

#[test]
fn the_channel_is_not_inherited_by_grandchildren() {
    util::child("general", general_worker);
    util::child("grandchild", grandchild);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let fd: i32 = r.request(w, "channel-fd", &(), SECS).unwrap();
    assert!(fd >= 0);
    let clean: bool = r.request(w, "spawn-grandchild", &fd, SECS).unwrap();
    assert!(clean, "grandchild saw the channel");
    r.shutdown(SECS).unwrap();
}

#[test]
fn master_fds_are_close_on_exec() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    // Every fd the master holds for the reactor (epoll, socket, pidfd) is close-on-exec.
    let mut checked = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default().to_string_lossy().into_owned();
        if target.starts_with("socket:") || target.contains("pidfd") || target.contains("eventpoll") {
            let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap();
            // SAFETY: F_GETFD only queries the descriptor's flags.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags >= 0 {
                assert!(flags & libc::FD_CLOEXEC != 0, "fd {fd} ({target}) is inheritable");
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "found only {checked} reactor fds");
    r.kill(w).unwrap();
    util::poll_until(&mut r, SECS, |r| r.workers().is_empty());
}

/// Ignores the master's request to exit; leaves only when the channel closes.
fn ignore_exit_worker() {
    let mut r = Reactor::attach().unwrap();
    loop {
        match r.poll(Some(Duration::from_millis(50))) {
            Err(Error::Disconnected) => break,
            _ => continue,
        }
    }
}

#[test]
fn request_exit_kills_a_worker_that_ignores_it() {
    util::child("general", general_worker);
    util::child("ignore-exit", ignore_exit_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let polite = util::spawn_ready(&mut r, "general");
    let stubborn = util::spawn_ready(&mut r, "ignore-exit");
    r.request_exit(polite, SECS).unwrap();
    assert_eq!(events.wait_exit(&mut r, polite).status.unwrap().code(), Some(0));
    r.request_exit(stubborn, Duration::from_millis(100)).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(events.wait_exit(&mut r, stubborn).status.unwrap().signal(), Some(libc::SIGKILL));
    assert!(r.workers().is_empty());
}

#[test]
fn a_panicking_handler_leaves_the_reactor_consistent() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let handled: Rc<RefCell<Vec<u64>>> = Rc::default();
    let h = handled.clone();
    r.on("from-worker", move |_r, msg: Message<u64>| {
        if msg.payload == 1 {
            panic!("handler panic on purpose");
        }
        h.borrow_mut().push(msg.payload);
    })
    .unwrap();
    let count = Rc::new(RefCell::new(0));
    let c = count.clone();
    r.on("echoed", move |_r, _m: Message<u64>| *c.borrow_mut() += 1).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    r.send_to(w, "go", &3u64, None).send().unwrap();
    r.send_to(w, "echo-back", &1u64, None).send().unwrap();
    let mut panics = 0;
    while *count.borrow() == 0 {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.poll(Some(Duration::from_millis(10)))));
        if res.is_err() {
            panics += 1;
        }
    }
    assert_eq!(panics, 1);
    // The handler is still registered and the frames after the panic were not lost.
    assert!(r.has_handler("_", "from-worker"));
    assert_eq!(*handled.borrow(), vec![0, 2], "the frame after the panicking one was lost");
    // And it keeps serving.
    r.send_to(w, "go", &1u64, None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| handled.borrow().len() == 3);
    r.shutdown(SECS).unwrap();
}

#[test]
fn nests_in_a_foreign_poller_without_stalling() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    config.frames_per_poll = 1; // force the fairness budget to bite
    let mut r = Reactor::master_with(config).unwrap();
    let got: Rc<RefCell<VecDeque<u64>>> = Rc::default();
    let g = got.clone();
    r.on("from-worker", move |_r, msg: Message<u64>| g.borrow_mut().push_back(msg.payload)).unwrap();
    let w = r.spawn(util::worker_command("general")).unwrap();
    r.send_to(w, "go", &200u64, None).send().unwrap();
    // A hand-rolled outer loop: wait on the reactor's fd with libc::poll, honouring next_deadline.
    while got.borrow().len() < 200 {
        let timeout_ms = match r.next_deadline() {
            Some(t) => t.saturating_duration_since(std::time::Instant::now()).as_millis() as i32,
            None => -1,
        };
        let mut pfd = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        assert!(n >= 0);
        r.poll(Some(Duration::ZERO)).unwrap();
    }
    assert_eq!(got.borrow().iter().copied().collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
    r.shutdown(SECS).unwrap();
}

/// Exits 0 if a worker can neither spawn nor `send_to`.
fn roles_worker() {
    let mut r = Reactor::attach().unwrap();
    let spawn = matches!(r.spawn(util::worker_command("general")), Err(Error::WrongRole));
    let me = r.worker_id().expect("the master told us our id");
    let send = r.send_to(me, "x", &(), None).send();
    let send = matches!(send, Err(e) if matches!(e.error, Error::WrongRole));
    std::process::exit(if spawn && send { 0 } else { 1 });
}

#[test]
fn spawn_and_send_are_role_checked() {
    util::child("roles", roles_worker);
    let _d = util::deadline(SECS);
    let mut r = Reactor::master().unwrap();
    let e = r.send_to_master("x", &(), None).send().unwrap_err();
    assert!(matches!(e.error, Error::WrongRole));
    // And on a worker: no spawn, no send_to.
    let events = Events::record(&mut r);
    let w = r.spawn(util::worker_command("roles")).unwrap();
    assert!(events.wait_exit(&mut r, w).status.unwrap().success(), "a worker could spawn or send_to");
}

#[test]
fn a_batch_coalesces_sends_into_few_writes() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let before = r.stats();
    for i in 0..1000u64 {
        r.send_to(w, "num", &i, None).send().unwrap();
    }
    r.flush(SECS).unwrap();
    // Outside a batch each send is written at once (until the socket pushes back).
    let calls = r.stats().write_calls - before.write_calls;
    assert!(calls > 200, "{calls} calls");
    // Let the worker empty the socket, so the batch below cannot meet a full one.
    assert_eq!(r.request::<Vec<u64>, _>(w, "report", &(), SECS).unwrap().len(), 1000);
    let mid = r.stats();
    r.batch(|r| {
        for i in 1000..2000u64 {
            r.send_to(w, "num", &i, None).send().unwrap();
        }
        assert!(matches!(r.poll(Some(Duration::ZERO)), Err(Error::Reentrant)));
    });
    let after = r.stats();
    assert_eq!(after.frames_written - mid.frames_written, 1000);
    assert!(after.write_calls - mid.write_calls <= 1000 / 64 + 2, "{} calls", after.write_calls - mid.write_calls);
    let seen: Vec<u64> = r.request(w, "report", &(), SECS).unwrap();
    assert_eq!(seen, (0..2000).collect::<Vec<_>>());
    r.shutdown(SECS).unwrap();
}

#[test]
fn replies_to_one_read_share_a_write() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let (frames0, calls0): (u64, u64) = r.request(w, "writes", &(), SECS).unwrap();
    let answers: Rc<RefCell<Vec<String>>> = Rc::default();
    r.batch(|r| {
        for _ in 0..500 {
            let a = answers.clone();
            r.send_to(w, "dual", &(), None)
                .ackd(move |_r, res: Result<String, AckError>| a.borrow_mut().push(res.unwrap()))
                .unwrap();
        }
    });
    util::poll_until(&mut r, SECS, |_| answers.borrow().len() == 500);
    assert!(answers.borrow().iter().all(|a| a == "default"));
    let (frames1, calls1): (u64, u64) = r.request(w, "writes", &(), SECS).unwrap();
    // 500 requests leave in about 8 gathered writes, so the worker reads them
    // in a handful of reads; the replies to each read go out together.
    assert_eq!(frames1 - frames0, 501, "the 500 replies and the first stats reply");
    let calls = calls1 - calls0;
    assert!(calls <= 25, "500 replies took {calls} write calls");
    r.shutdown(SECS).unwrap();
}

/// Leaves a grandchild holding a copy of the channel, so our death closes no
/// socket: only a check of our own exit status can tell the master we are gone.
fn grandchild_holds_channel_worker() {
    let raw: i32 = std::env::var(clusterphone::ENV_FD).unwrap().parse().unwrap();
    // SAFETY: dup of the inherited channel fd; the copy has no close-on-exec flag.
    assert!(unsafe { libc::dup(raw) } >= 0);
    let mut r = Reactor::attach().unwrap();
    // Reaped by init once the test kills it.
    #[allow(clippy::zombie_processes)]
    let gc = std::process::Command::new("sleep").arg("20").spawn().unwrap();
    r.on("grandchild", move |_r, m: Message<()>| m.reply.ok(&gc.id()).unwrap()).unwrap();
    // Never answered: its ack can only end with our exit.
    let held: Rc<RefCell<Vec<clusterphone::Responder>>> = Rc::default();
    r.on("hold", move |_r, m: Message<()>| held.borrow_mut().push(m.reply)).unwrap();
    util::serve(&mut r);
}

#[test]
fn exits_are_found_without_a_pidfd_too() {
    util::child("grandchild-holds-channel", grandchild_holds_channel_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    config.exit_polling = true;
    // A hang-up grace far beyond the wait below: only the waitpid checks can find the exit in time.
    config.hangup_grace = Duration::from_secs(60);
    let mut r = Reactor::master_with(config).unwrap();
    let events = Events::record(&mut r);
    // Its grandchild keeps the channel open: no hang-up, only the waitpid checks see the exit.
    let w = util::spawn_ready(&mut r, "grandchild-holds-channel");
    let gc: u32 = r.request(w, "grandchild", &(), SECS).unwrap();
    let pending = r.send_to(w, "hold", &(), None).handle::<()>().unwrap();
    r.kill(w).unwrap();
    util::poll_until(&mut r, Duration::from_secs(5), |_| events.exit_of(w).is_some_and(|x| x.status.is_some()));
    // SAFETY: kill(2) on the pid our worker reported; it is our grandchild.
    unsafe { libc::kill(gc as i32, libc::SIGKILL) };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(events.exit_of(w).unwrap().status.unwrap().signal(), Some(libc::SIGKILL));
    assert!(matches!(pending.take(), Some(Err(AckError::Exited(_)))));
    assert!(r.workers().is_empty(), "reaped");
}

#[test]
fn without_writable_wakeups_a_full_socket_still_drains() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    config.writable_wakeups = WritableWakeups::Never; // writable interest only while blocked
    let mut r = Reactor::master_with(config).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    let chunk = clusterphone::Bytes(vec![5u8; 64 * 1024]);
    let mut blocked = 0;
    for _ in 0..200 {
        r.send_to(w, "sink", &chunk, None).send().unwrap();
        if r.queue_depth(w).unwrap().0 > 1 {
            blocked += 1;
        }
    }
    assert!(blocked > 0, "the socket never filled up");
    // Only writable edges, registered when the socket filled, can drain this queue.
    let (count, bytes): (u64, u64) = r.request(w, "sunk", &(), SECS).unwrap();
    assert_eq!((count, bytes), (200, 200 * 64 * 1024));
    r.shutdown(SECS).unwrap();
}

#[test]
fn writable_wakeups_follow_the_policy() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 6);
    let big = clusterphone::Bytes(vec![7u8; 64 * 1024]);
    // (policy, idle writable wake-ups expected after small requests, after large ones)
    let policies = [
        (WritableWakeups::Never, false, false),
        (Config::default().writable_wakeups, false, true),
        (WritableWakeups::Always, true, true),
    ];
    for (policy, after_small, after_large) in policies {
        let mut config = Config::default();
        config.writable_wakeups = policy;
        let mut r = Reactor::master_with(config).unwrap();
        let w = util::spawn_ready(&mut r, "general");
        let before = r.stats().idle_writable_events;
        for _ in 0..20 {
            let _: String = r.request(w, "dual", &(), SECS).unwrap();
        }
        let small = r.stats().idle_writable_events - before;
        // The worker takes each 64 KiB frame off the socket before it answers,
        // so the writable edge comes no later than the reply.
        let before = r.stats().idle_writable_events;
        for _ in 0..20 {
            let n: usize = r.request(w, "bytes-len", &big, SECS).unwrap();
            assert_eq!(n, big.0.len());
        }
        let large = r.stats().idle_writable_events - before;
        assert_eq!((small > 0, large > 0), (after_small, after_large), "{policy:?}: {small} and {large} idle wake-ups");
        r.shutdown(SECS).unwrap();
    }
}

#[test]
fn busy_polling_works_and_still_honours_timeouts() {
    util::child("general", general_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    config.busy_poll = Some(Duration::from_micros(300));
    let mut r = Reactor::master_with(config).unwrap();
    let w = util::spawn_ready(&mut r, "general");
    for i in 0..100u64 {
        r.send_to(w, "num", &i, None).send().unwrap();
    }
    let seen: Vec<u64> = r.request(w, "report", &(), SECS).unwrap();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
    // Nothing to do: spins for the window, then sleeps out the timeout, and returns.
    // (A lower bound only: load can make the poll longer, never shorter.)
    let start = std::time::Instant::now();
    r.poll(Some(Duration::from_millis(20))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(20), "returned before its timeout: {:?}", start.elapsed());
    r.poll(Some(Duration::ZERO)).unwrap();
    r.shutdown(SECS).unwrap();
}
