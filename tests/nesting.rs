//! Nesting the reactor in someone else's event loop (issue 10, points 15 and 16).
//!
//! The recipe: wait on the reactor's fd (`AsRawFd`) in your own poller until
//! it is readable or until `next_deadline()`, then call
//! `reactor.poll(Some(Duration::ZERO))`. The loops here follow it to the
//! letter: the reactor is polled only after the outer wait said its fd is
//! readable or its deadline has passed, never blindly. Two outer pollers are
//! tried: poll(2), which is level-triggered, and a `mio::Poll`, which is
//! edge-triggered (as tokio's `AsyncFd` is).
//!
//! Every process here is real: workers are this test binary re-executed.

mod util;

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{Error, Message, Peer, Reactor, WorkerId};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use util::events::Ev;
use util::{alone, deadline, poll_until, serve, worker_command, Reaped};

/// Workers in the burst tests: more than one `poll` takes events at a time (256).
const BURST_WORKERS: usize = 300;

// ----- the outer loops --------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// poll(2) on the reactor's fd: level-triggered.
    Level,
    /// A `mio::Poll` with the reactor's fd registered READABLE: edge-triggered.
    Edge,
}

/// An event loop the reactor is nested in.
enum Outer {
    Level,
    Edge { poll: Poll, events: Events },
}

impl Outer {
    fn new(kind: Kind, r: &Reactor) -> Outer {
        match kind {
            Kind::Level => Outer::Level,
            Kind::Edge => {
                let poll = Poll::new().expect("mio poll");
                let fd = r.as_raw_fd();
                poll.registry().register(&mut SourceFd(&fd), Token(0), Interest::READABLE).expect("register");
                Outer::Edge { poll, events: Events::with_capacity(8) }
            }
        }
    }

    /// Waits up to `timeout` (`None`: for ever) for the reactor's fd `fd`;
    /// whether it was reported readable. A signal counts as "not readable".
    fn wait(&mut self, fd: RawFd, timeout: Option<Duration>) -> bool {
        match self {
            Outer::Level => {
                // Round up, so a wait that times out has reached the deadline.
                let ms = timeout.map_or(-1, |t| t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32);
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, ms) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll(2): {e}");
                    return false;
                }
                n > 0 && pfd.revents != 0
            }
            Outer::Edge { poll, events } => match poll.poll(events, timeout) {
                Ok(()) => events.iter().any(|e| e.token() == Token(0)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(e) => panic!("mio poll: {e}"),
            },
        }
    }
}

/// One turn of a loop that nests `r` in `outer`: waits for the reactor's fd
/// until `next_deadline()` (or at most `cap`), then lets the reactor work with
/// `poll(Some(ZERO))`, but only if the fd was readable or the deadline has
/// passed. Returns whether the reactor was polled.
fn nested_turn(r: &mut Reactor, outer: &mut Outer, cap: Option<Duration>) -> Result<bool, Error> {
    let due = r.next_deadline();
    let until_due = due.map(|d| d.saturating_duration_since(Instant::now()));
    let timeout = match (until_due, cap) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let readable = outer.wait(r.as_raw_fd(), timeout);
    let passed = due.is_some_and(|d| Instant::now() >= d);
    if readable || passed {
        r.poll(Some(Duration::ZERO))?;
        return Ok(true);
    }
    Ok(false)
}

/// Runs the nested loop until `done()` or `limit`; whether `done()` held.
#[track_caller]
fn drive_until(r: &mut Reactor, outer: &mut Outer, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !done() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        nested_turn(r, outer, Some(left)).expect("nested master poll");
    }
    true
}

// ----- D15: a nested worker says hello ----------------------------------------

/// A worker that never calls `poll` except from inside its own outer loop.
/// It answers `ping` with the payload plus one.
fn nested_worker(kind: Kind) {
    let mut r = Reactor::attach().expect("attach");
    r.on("ping", |_r, m: Message<u64>| {
        let _ = m.reply.ok(&(m.payload + 1));
    })
    .expect("handler");
    let mut outer = Outer::new(kind, &r);
    loop {
        // No cap on the wait: the reactor alone says when it has work. When
        // the master goes, the channel's hangup makes the fd readable.
        match nested_turn(&mut r, &mut outer, None) {
            Ok(_) => {}
            Err(Error::Disconnected) | Err(Error::ExitRequested) => break,
            Err(e) => panic!("nested worker poll failed: {e}"),
        }
    }
}

/// A master sends a request to a worker before it is ready; the worker runs
/// only the nesting recipe, so it must say hello without ever being polled
/// blindly, and the request must be answered.
fn nested_worker_answers_a_request_queued_before_its_hello(kind: Kind) {
    util::child("nested", || nested_worker(kind));
    let _d = deadline(Duration::from_secs(90));
    let mut r = Reactor::master().expect("master");
    let w = r.spawn(worker_command("nested")).expect("spawn");
    assert!(!r.is_ready(w), "not ready before its hello");
    let reply = r
        .send_to(w, "ping", &41u64, None)
        .within(Duration::from_secs(30))
        .handle::<u64>()
        .expect("queued until the worker is ready");
    poll_until(&mut r, Duration::from_secs(40), |_| reply.is_done());
    let outcome = reply.take().expect("outcome");
    assert!(
        matches!(outcome, Ok(42)),
        "a nested worker ({kind:?}-triggered loop) must say hello and answer: {outcome:?} (ready: {})",
        r.is_ready(w)
    );
    assert!(r.is_ready(w));
    // Dropping the master closes the channel, then kills and reaps the worker.
}

#[test]
fn a_worker_nested_in_a_level_triggered_loop_says_hello_and_answers() {
    nested_worker_answers_a_request_queued_before_its_hello(Kind::Level);
}

#[test]
fn a_worker_nested_in_an_edge_triggered_loop_says_hello_and_answers() {
    nested_worker_answers_a_request_queued_before_its_hello(Kind::Edge);
}

/// The master (here: the test itself, holding the raw channel) goes away
/// after the nested worker's hello: the worker's loop must learn of it and
/// end, so the process exits by itself. Its fd is readable once, for the
/// hangup; after that only `next_deadline()` can tell the loop to poll again.
fn nested_worker_exits_by_itself_when_its_master_goes(kind: Kind) {
    util::child("nested", || nested_worker(kind));
    let _d = deadline(Duration::from_secs(90));
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let fd = theirs.as_raw_fd();
    let mut cmd = worker_command("nested");
    cmd.env(clusterphone::ENV_FD, fd.to_string());
    // SAFETY: only fcntl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Inherited by this child alone, not by children other tests spawn meanwhile.
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().expect("spawn"));
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut hello = [0u8; 512];
    let got = (&ours).read(&mut hello);
    assert!(matches!(got, Ok(n) if n > 0), "{kind:?}: the nested worker said no hello: {got:?}");
    drop(ours);
    let status = child.exit_within(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{kind:?}: a nested worker whose master went must leave its loop and exit by itself: {status:?}"
    );
}

#[test]
fn a_worker_nested_in_a_level_triggered_loop_exits_when_its_master_goes() {
    nested_worker_exits_by_itself_when_its_master_goes(Kind::Level);
}

#[test]
fn a_worker_nested_in_an_edge_triggered_loop_exits_when_its_master_goes() {
    nested_worker_exits_by_itself_when_its_master_goes(Kind::Edge);
}

// ----- D16: more ready channels than one poll takes ---------------------------

/// A light worker: on `go`, tells the master `done` (with its serial), then
/// idles until the master goes.
fn burst_worker() {
    let mut r = Reactor::attach().expect("attach");
    let serial = r.worker_id().expect("worker id").serial();
    r.on("go", move |r, _m: Message<()>| {
        r.send_to_master("done", &serial, None).send().expect("done");
    })
    .expect("handler");
    serve(&mut r);
}

/// Raises the soft fd limit to the hard one if `want` fds might not fit:
/// each worker costs the master a socket and a pidfd.
#[track_caller]
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid rlimit out-parameter.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur >= want || lim.rlim_cur == lim.rlim_max {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: a valid rlimit; raising the soft limit up to the hard one is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// A master nested in `kind` of outer loop starts [`BURST_WORKERS`] workers,
/// tells them all to go at once, and must receive every worker's `done`,
/// though more channels are readable at once than one `poll` takes.
fn every_message_of_a_burst_arrives(kind: Kind) {
    util::child("burst", burst_worker);
    // Hundreds of processes: one burst test at a time.
    let _alone = alone();
    let _d = deadline(Duration::from_secs(200));
    raise_fd_limit(BURST_WORKERS as u64 * 2 + 256);
    let mut r = Reactor::master().expect("master");
    let events = util::events::Events::record(&mut r);
    let ready = || events.workers_with(|e| matches!(e, Ev::Ready)).len();
    let lost =
        || -> Vec<(WorkerId, Ev)> { events.all().into_iter().filter(|(_, e)| !matches!(e, Ev::Ready)).collect() };
    let done: Rc<RefCell<HashSet<WorkerId>>> = Rc::default();
    let dn = done.clone();
    r.on("done", move |_r, m: Message<u32>| {
        let Peer::Worker(id) = m.from else { panic!("done from {:?}", m.from) };
        assert_eq!(m.payload, id.serial(), "each worker reports its own serial");
        assert!(dn.borrow_mut().insert(id), "{id} reported twice");
    })
    .expect("handler");
    let mut outer = Outer::new(kind, &r);

    // Start the workers, taking their hellos as they come (never blindly).
    let mut ids = Vec::with_capacity(BURST_WORKERS);
    for _ in 0..BURST_WORKERS {
        ids.push(r.spawn(worker_command("burst")).expect("spawn"));
        nested_turn(&mut r, &mut outer, Some(Duration::ZERO)).expect("nested master poll");
    }
    let all_ready = drive_until(&mut r, &mut outer, Duration::from_secs(90), || ready() == BURST_WORKERS);
    assert!(all_ready, "{kind:?}: only {} of {BURST_WORKERS} workers became ready; lost: {:?}", ready(), lost());

    // Everyone goes at once (one coalesced write per worker). Let them all
    // answer before the master looks, so that far more than 256 channels
    // are readable together, as after any pause in a busy master.
    r.batch(|r| {
        for &w in &ids {
            r.send_to(w, "go", &(), None).send().expect("go");
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let all_done = drive_until(&mut r, &mut outer, Duration::from_secs(60), || done.borrow().len() == BURST_WORKERS);
    assert!(
        all_done,
        "{kind:?}: the nested master received {} of {BURST_WORKERS} messages, then its outer loop saw nothing \
         more; lost: {:?}",
        done.borrow().len(),
        lost()
    );
    assert!(lost().is_empty(), "no worker went away: {:?}", lost());
    // Dropping the master closes every channel; the workers exit, the rest are killed, all are reaped.
}

#[test]
fn a_master_nested_in_a_level_triggered_loop_receives_a_burst_from_300_workers() {
    every_message_of_a_burst_arrives(Kind::Level);
}

#[test]
fn a_master_nested_in_an_edge_triggered_loop_receives_a_burst_from_300_workers() {
    every_message_of_a_burst_arrives(Kind::Edge);
}
