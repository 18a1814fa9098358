//! Acknowledgements with real processes: every outcome, exactly once.

mod util;

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Reactor, Responder};
use util::events::{Ev, Events};

const SECS: Duration = Duration::from_secs(10);

/// The worker most tests here talk to: doubles, fails, drops its responder,
/// holds responders and releases them, records, reports its stats, and asks
/// the master back before it replies.
fn answerer() {
    let mut r = Reactor::attach().unwrap();
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    r.on("double", |_r, m: Message<u64>| m.reply.ok(&(m.payload * 2)).unwrap()).unwrap();
    r.on("fail", |_r, m: Message<()>| m.reply.err("no way")).unwrap();
    r.on("drop", |_r, m: Message<()>| drop(m.reply)).unwrap();
    let h = held.clone();
    r.on("hold", move |_r, m: Message<u64>| h.borrow_mut().push(m.reply)).unwrap();
    let h = held.clone();
    r.on("release", move |_r, m: Message<()>| {
        let all: Vec<Responder> = h.borrow_mut().drain(..).collect();
        let n = all.len();
        for (i, resp) in all.into_iter().enumerate() {
            resp.ok(&(i as u64)).unwrap();
        }
        m.reply.ok(&n).unwrap();
    })
    .unwrap();
    let l = log.clone();
    r.on("record", move |_r, m: Message<String>| l.borrow_mut().push(m.payload)).unwrap();
    let l = log.clone();
    r.on("records", move |_r, m: Message<()>| m.reply.ok(&*l.borrow()).unwrap()).unwrap();
    r.on("stats", |r, m: Message<()>| {
        let s = r.stats();
        m.reply.ok(&(s.acks_sent, s.messages_received)).unwrap()
    })
    .unwrap();
    r.on("ask-back", |r, m: Message<u64>| {
        // A deferred reply that depends on a request of our own to the master.
        let n = m.payload;
        let resp = m.reply;
        r.send_to_master("double", &n, None)
            .ackd(move |_r, res: Result<u64, AckError>| match res {
                Ok(v) => resp.ok(&(v + 1)).unwrap(),
                Err(e) => resp.err(e),
            })
            .unwrap();
    })
    .unwrap();
    util::serve(&mut r);
}

fn master_with_double() -> Reactor {
    let mut r = Reactor::master().unwrap();
    r.on("double", |_r, m: Message<u64>| m.reply.ok(&(m.payload * 2)).unwrap()).unwrap();
    r.on("fail", |_r, m: Message<()>| m.reply.err("no way")).unwrap();
    r
}

#[test]
fn replies_travel_both_ways_in_every_form() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    // Blocking.
    assert_eq!(r.request::<u64, _>(w, "double", &4u64, SECS).unwrap(), 8);
    // Handle.
    let h = r.send_to(w, "double", &5u64, None).handle::<u64>().unwrap();
    assert!(!h.is_done());
    util::poll_until(&mut r, SECS, |_| h.is_done());
    assert_eq!(h.take().unwrap().unwrap(), 10);
    assert!(h.take().is_none(), "an outcome is delivered once");
    // Callback.
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    r.send_to(w, "double", &6u64, None).ackd(move |_r, res: Result<u64, AckError>| g.borrow_mut().push(res)).unwrap();
    util::poll_until(&mut r, SECS, |_| !got.borrow().is_empty());
    assert_eq!(*got.borrow(), vec![Ok(12)]);
    // Worker → master, and a worker handler that replies later from its own ack callback.
    assert_eq!(r.request::<u64, _>(w, "ask-back", &10u64, SECS).unwrap(), 21);
    // A reply of the wrong type.
    let e = r.request::<String, _>(w, "double", &1u64, SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::BadReply(_))), "{e:?}");
    // A payload of the wrong type: the remote says so, and keeps serving.
    let e = r.request::<u64, _>(w, "double", &"text", SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::BadPayload(_))), "{e:?}");
    assert_eq!(r.request::<u64, _>(w, "double", &1u64, SECS).unwrap(), 2);
    r.shutdown(SECS).unwrap();
}

#[test]
fn remote_error_no_handler_unknown_namespace_dropped() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    let e = r.request::<(), _>(w, "fail", &(), SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Remote(ref t)) if t == "no way"), "{e:?}");
    let e = r.request::<(), _>(w, "missing", &(), SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::NoHandler)), "{e:?}");
    let e = r.ns("other").unwrap().request::<(), _>(w, "double", &1u64, SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::UnknownNamespace)), "{e:?}");
    // A dropped responder answers at once: with a 60 s timeout, the test deadline
    // (30 s) would fire first if it waited for the timeout.
    let e = r.send_to(w, "drop", &(), None).within(Duration::from_secs(60)).wait::<()>().unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Dropped)), "{e:?}");
    r.shutdown(SECS).unwrap();
}

#[test]
fn deferred_replies_and_the_hundred_thousand() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 6);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    const N: usize = 100_000;
    let outcomes: Rc<RefCell<Vec<u32>>> = Rc::new(RefCell::new(vec![0; N]));
    for i in 0..N {
        let o = outcomes.clone();
        r.send_to(w, "hold", &(i as u64), None)
            .within(Duration::from_secs(60))
            .ackd(move |_r, res: Result<u64, AckError>| {
                assert!(res.is_ok(), "{res:?}");
                o.borrow_mut()[i] += 1;
            })
            .unwrap();
        if i % 1000 == 0 {
            r.poll(Some(Duration::ZERO)).unwrap();
        }
    }
    assert_eq!(r.pending_acks(), N);
    let released: usize = r.request(w, "release", &(), SECS * 2).unwrap();
    assert_eq!(released, N);
    util::poll_until(&mut r, SECS * 2, |r| r.pending_acks() == 0);
    assert!(outcomes.borrow().iter().all(|&n| n == 1), "every ack resolves exactly once");
    r.shutdown(SECS).unwrap();
}

#[test]
fn timeouts_per_message_and_global_and_invalid() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    let e = r.send_to(w, "hold", &1u64, None).within(Duration::from_millis(100)).wait::<u64>().unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Timeout)), "{e:?}");
    r.set_ack_timeout(Duration::from_millis(100)).unwrap();
    let e = r.send_to(w, "hold", &2u64, None).wait::<u64>().unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Timeout)), "{e:?}");
    assert!(matches!(r.set_ack_timeout(Duration::ZERO), Err(Error::InvalidTimeout)));
    assert!(matches!(r.set_ack_timeout(Duration::from_secs(365 * 86400)), Err(Error::InvalidTimeout)));
    let e = r.send_to(w, "double", &1u64, None).within(Duration::ZERO).wait::<u64>().unwrap_err();
    assert!(matches!(e, Error::InvalidTimeout), "{e:?}");
    // The answers that come after the timeouts are ignored and counted, not errors.
    r.set_ack_timeout(SECS).unwrap();
    let n: usize = r.request(w, "release", &(), SECS).unwrap();
    assert_eq!(n, 2);
    util::poll_until(&mut r, SECS, |r| r.stats().late_acks == 2);
    assert_eq!(r.pending_acks(), 0);
    r.shutdown(SECS).unwrap();
}

/// The answerer, attached (so saying hello) only after 400 ms.
fn late_attach() {
    std::thread::sleep(Duration::from_millis(400));
    answerer()
}

#[test]
fn a_message_that_times_out_in_the_queue_is_never_delivered() {
    util::child("late-attach", late_attach);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = r.spawn(util::worker_command("late-attach")).unwrap();
    let h =
        r.send_to(w, "record", &"expired".to_string(), None).within(Duration::from_millis(50)).handle::<()>().unwrap();
    r.send_to(w, "record", &"kept".to_string(), None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| h.is_done());
    assert_eq!(h.take().unwrap().unwrap_err(), AckError::Timeout);
    assert!(!r.is_ready(w), "the worker should still be starting");
    util::poll_until(&mut r, SECS, |r| r.is_ready(w));
    let seen: Vec<String> = r.request(w, "records", &(), SECS).unwrap();
    assert_eq!(seen, vec!["kept".to_string()]);
    r.shutdown(SECS).unwrap();
}

#[test]
fn kill_9_fails_a_thousand_acks_exactly_once_while_another_worker_answers() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let victim = util::spawn_ready(&mut r, "answerer");
    let other = util::spawn_ready(&mut r, "answerer");
    type Outcomes = HashMap<usize, Vec<Result<u64, AckError>>>;
    let outcomes: Rc<RefCell<Outcomes>> = Rc::default();
    for i in 0..1000 {
        let o = outcomes.clone();
        r.send_to(victim, "hold", &(i as u64), None)
            .ackd(move |_r, res: Result<u64, AckError>| o.borrow_mut().entry(i).or_default().push(res))
            .unwrap();
    }
    r.poll(Some(Duration::from_millis(20))).unwrap();
    let events = Events::record(&mut r);
    r.kill(victim).unwrap();
    let mut answers = 0u64;
    while outcomes.borrow().len() < 1000 {
        // The other worker keeps answering meanwhile.
        answers += r.request::<u64, _>(other, "double", &1u64, SECS).unwrap();
    }
    util::settle(&mut r, 5);
    let outcomes = outcomes.borrow();
    assert_eq!(outcomes.len(), 1000);
    for (i, v) in outcomes.iter() {
        assert_eq!(v.len(), 1, "ack {i} resolved {} times", v.len());
        match &v[0] {
            Err(AckError::Exited(s)) => assert_eq!(s.status.and_then(|s| s.signal()), Some(libc::SIGKILL)),
            other => panic!("ack {i}: {other:?}"),
        }
    }
    assert!(answers >= 2);
    assert_eq!(r.request::<u64, _>(other, "double", &2u64, SECS).unwrap(), 4);
    let events = events.all();
    assert!(matches!(events[..], [(_, Ev::Exited(_))]), "{events:?}");
    drop(outcomes);
    r.shutdown(SECS).unwrap();
}

/// Attaches, then closes the channel but keeps running a while.
fn close_channel() {
    let r = Reactor::attach().unwrap();
    drop(r);
    std::thread::sleep(Duration::from_secs(3));
}

#[test]
fn a_worker_that_closes_its_channel_but_runs_on() {
    util::child("close-channel", close_channel);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let events = Events::record(&mut r);
    let w = r.spawn(util::worker_command("close-channel")).unwrap();
    // Queued for a worker that attaches and closes its channel without a hello.
    let h = r.send_to(w, "double", &1u64, None).handle::<u64>().unwrap();
    util::poll_until(&mut r, SECS, |_| h.is_done());
    assert_eq!(h.take().unwrap().unwrap_err(), AckError::Disconnected);
    assert!(events.all()[0].1.is_disconnect(), "{events:?}");
    assert!(r.worker_pid(w).is_some(), "still running, not yet reaped");
    util::poll_until(&mut r, SECS, |r| r.workers().is_empty());
    assert!(matches!(events.all().last(), Some((_, Ev::Exited(_)))), "{events:?}");
}

/// Leaves a grandchild holding a copy of our channel, then dies on `die`.
fn die_with_grandchild() {
    let raw: i32 = std::env::var(clusterphone::ENV_FD).unwrap().parse().unwrap();
    // SAFETY: dup of the inherited channel fd; the copy has no close-on-exec flag.
    let copy = unsafe { libc::dup(raw) };
    assert!(copy >= 0);
    let mut r = Reactor::attach().unwrap();
    // Orphaned on purpose when we die; the test kills it and init reaps it.
    #[allow(clippy::zombie_processes)]
    let gc = std::process::Command::new("sleep").arg("20").spawn().unwrap();
    r.send_to_master("grandchild", &gc.id(), None).send().unwrap();
    r.on("die", |_r, _m: Message<()>| std::process::exit(3)).unwrap();
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    r.on("hold", move |_r, m: Message<u64>| held.borrow_mut().push(m.reply)).unwrap();
    util::serve(&mut r);
}

#[test]
fn a_worker_that_dies_while_a_grandchild_holds_its_socket() {
    util::child("die-with-grandchild", die_with_grandchild);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let grandchild = Rc::new(RefCell::new(None));
    let g = grandchild.clone();
    r.on("grandchild", move |_r, m: Message<u32>| *g.borrow_mut() = Some(m.payload)).unwrap();
    let w = util::spawn_ready(&mut r, "die-with-grandchild");
    util::poll_until(&mut r, SECS, |_| grandchild.borrow().is_some());
    let pending = r.send_to(w, "hold", &1u64, None).handle::<u64>().unwrap();
    r.send_to(w, "die", &(), None).send().unwrap();
    util::poll_until(&mut r, SECS, |_| pending.is_done());
    let e = pending.take().unwrap().unwrap_err();
    assert!(matches!(e, AckError::Exited(s) if s.status.and_then(|s| s.code()) == Some(3)), "{e:?}");
    assert!(r.workers().is_empty());
    let gc = grandchild.borrow().unwrap();
    // SAFETY: kill(2) on the pid our worker reported; it is our grandchild.
    unsafe { libc::kill(gc as i32, libc::SIGKILL) };
}

/// Asks the master, then loses it with acks pending: all fail with
/// Disconnected, and poll says so. Reports by its exit code (and in the
/// file `CP_RESULT` names, if set).
fn ask_master() {
    let mut r = Reactor::attach().unwrap();
    let a: u64 = r.request_master("double", &21u64, SECS).unwrap();
    let e = r.request_master::<u64, _>("fail", &(), SECS).unwrap_err();
    let ok = a == 42 && matches!(e, Error::Ack(AckError::Remote(ref t)) if t == "no way");
    // Then lose the master with acks pending: all fail with Disconnected, poll says so.
    let outcomes: Rc<RefCell<Vec<AckError>>> = Rc::default();
    for _ in 0..5 {
        let o = outcomes.clone();
        r.send_to_master("hold", &(), None)
            .ackd(move |_r, res: Result<(), AckError>| o.borrow_mut().push(res.unwrap_err()))
            .unwrap();
    }
    r.send_to_master("report", &ok, None).send().unwrap();
    let end = loop {
        match r.poll(Some(Duration::from_millis(50))) {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    let all = outcomes.borrow().len() == 5 && outcomes.borrow().iter().all(|e| *e == AckError::Disconnected);
    let code = if ok && all && matches!(end, Error::Disconnected) { 0 } else { 1 };
    if let Ok(path) = std::env::var("CP_RESULT") {
        std::fs::write(path, format!("{code} {:?} {:?}", end, outcomes.borrow())).unwrap();
    }
    std::process::exit(code);
}

#[test]
fn a_worker_loses_its_master_with_acks_pending() {
    util::child("ask-master", ask_master);
    let _d = util::deadline(SECS * 3);
    let dir = std::env::temp_dir().join(format!("cp-ack-{}", std::process::id()));
    // A long grace: dropping the master waits for the worker to exit by itself.
    let mut config = clusterphone::Config::default();
    config.hangup_grace = Duration::from_secs(5);
    let mut r = Reactor::master_with(config).unwrap();
    r.on("double", |_r, m: Message<u64>| m.reply.ok(&(m.payload * 2)).unwrap()).unwrap();
    r.on("fail", |_r, m: Message<()>| m.reply.err("no way")).unwrap();
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let h = held.clone();
    r.on("hold", move |_r, m: Message<()>| h.borrow_mut().push(m.reply)).unwrap();
    let report = Rc::new(RefCell::new(None));
    let rp = report.clone();
    r.on("report", move |_r, m: Message<bool>| *rp.borrow_mut() = Some(m.payload)).unwrap();
    let mut cmd = util::worker_command("ask-master");
    cmd.env("CP_RESULT", &dir);
    let w = r.spawn(cmd).unwrap();
    util::poll_until(&mut r, SECS, |_| report.borrow().is_some() && held.borrow().len() == 5);
    assert_eq!(*report.borrow(), Some(true));
    let pid = r.worker_pid(w).unwrap();
    // The master goes away (its reactor is dropped: channels close; the held
    // responders are dropped after the channel is gone, so no answer can arrive).
    drop(r);
    drop(held);
    let text = std::fs::read_to_string(&dir).unwrap_or_else(|_| panic!("worker {pid} wrote no result"));
    let _ = std::fs::remove_file(&dir);
    assert!(text.starts_with("0 "), "worker saw: {text}");
}

#[test]
fn an_unacked_message_puts_no_ack_frame_on_the_wire() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    for i in 0..100 {
        r.send_to(w, "record", &format!("{i}"), None).send().unwrap();
    }
    let before = r.stats();
    let (acks_sent, received): (u64, u64) = r.request(w, "stats", &(), SECS).unwrap();
    assert_eq!(received, 101, "all 100 messages and the stats request arrived");
    assert_eq!(acks_sent, 0, "the worker sent no ack for unacked messages");
    let after = r.stats();
    assert_eq!(after.acks_received - before.acks_received, 1);
    assert_eq!(before.acks_received, 0);
    // One hello, 100 messages, one request on the wire from us.
    assert_eq!(after.messages_sent, 101);
    r.shutdown(SECS).unwrap();
}

#[test]
fn shutdown_fails_what_is_pending_and_reaps() {
    util::child("answerer", answerer);
    let _d = util::deadline(SECS * 3);
    let mut r = master_with_double();
    let w = util::spawn_ready(&mut r, "answerer");
    let h = r.send_to(w, "hold", &1u64, None).handle::<u64>().unwrap();
    r.shutdown(SECS).unwrap();
    let e = h.take().unwrap().unwrap_err();
    assert!(matches!(e, AckError::Exited(_) | AckError::Disconnected), "{e:?}");
    assert!(r.workers().is_empty());
}
