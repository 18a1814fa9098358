//! No fd leaks, counted in /proc/self/fd on both sides. This binary holds a
//! single test, so no other test opens or closes fds while it counts.

mod util;

use std::cell::Cell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Bytes, Error, Message, Reactor, SendError, WorkerId};

const REQ: Duration = Duration::from_secs(10);
/// Messages carrying fds, in each direction.
const N: u32 = 10_000;
/// Of which worker-to-master, per "blast" request (below `max_queue_fds`,
/// as a handler cannot poll to drain its queue).
const BLAST: u32 = 500;
/// Extra fd-carrying messages, per direction, that no handler takes.
const UNHANDLED: u32 = 100;

fn devnull() -> File {
    File::open("/dev/null").expect("open /dev/null")
}

/// A fresh descriptor (a dup of `f`) to send.
fn fresh(f: &File) -> OwnedFd {
    OwnedFd::from(f.try_clone().expect("dup"))
}

// ----- the workers ------------------------------------------------------

/// Says hello, then never reads again.
fn stuck_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.flush(Duration::from_secs(5)).expect("hello written");
    idle_until_orphaned();
}

fn sink_worker() {
    let mut r = Reactor::attach().expect("attach");
    sink(&mut r);
    util::serve(&mut r);
}

/// Sleeps until the master is gone (it normally kills us first), at most 30 s.
fn idle_until_orphaned() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            return;
        }
    }
}

/// Registers an "fd" handler that counts (messages, of which with an fd) and
/// leaves the fd in the message, so dropping the message must close it.
fn count_fd_messages(r: &mut Reactor) -> Rc<Cell<(u64, u64)>> {
    let count = Rc::new(Cell::new((0u64, 0u64)));
    let c = count.clone();
    r.on("fd", move |_r, msg: Message<u32>| {
        let (n, with) = c.get();
        c.set((n + 1, with + u64::from(msg.fd.is_some())));
    })
    .unwrap();
    count
}

fn sink(r: &mut Reactor) {
    let devnull = devnull();
    let count = count_fd_messages(r);
    r.on("count", move |_r, msg: Message<()>| {
        let _ = msg.reply.ok(&count.get());
    })
    .unwrap();
    r.on("open-fds", |_r, msg: Message<()>| {
        let _ = msg.reply.ok(&util::open_fds());
    })
    .unwrap();
    // Sends `n` fd-carrying messages named `cmd` to the master, then replies
    // (the reply is queued after them, so it arrives after them).
    r.on("blast", move |r, msg: Message<(u32, String)>| {
        let (n, cmd) = msg.payload;
        for i in 0..n {
            if let Err(e) = r.send_to_master(&cmd, &i, Some(fresh(&devnull))).send() {
                return msg.reply.err(format!("send {i} of {n} refused: {e}"));
            }
        }
        let _ = msg.reply.ok(&n);
    })
    .unwrap();
}

// ----- the master -------------------------------------------------------

/// Sends one fd-carrying message, polling while the write queue is full.
#[track_caller]
fn send_fd(r: &mut Reactor, w: WorkerId, cmd: &str, i: u32, mut fd: OwnedFd) {
    loop {
        match r.send_to(w, cmd, &i, Some(fd)).send() {
            Ok(()) => return,
            Err(SendError { error: Error::QueueFull, fd: back }) => {
                fd = back.expect("a refused fd is handed back");
                r.poll(Some(Duration::from_millis(1))).expect("poll");
            }
            Err(e) => panic!("send {i} refused: {e}"),
        }
    }
}

/// Polls until `w` has exited and been reaped.
#[track_caller]
fn wait_gone(r: &mut Reactor, w: WorkerId) {
    util::poll_until(r, Duration::from_secs(10), |r| !r.workers().contains(&w));
}

#[test]
fn no_fd_leaks() {
    util::child("sink", sink_worker);
    // Never attaches, so never says hello.
    util::child("sleepy", idle_until_orphaned);
    util::child("stuck", stuck_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    both_directions(&mut r);
    killed_before_hello(&mut r);
    killed_with_full_socket(&mut r);
    r.shutdown(Duration::from_secs(2)).unwrap();
}

/// 10,000 fds each way, each dropped by the receiving handler (plus some
/// that no handler takes): both sides end with the fds they started with.
fn both_directions(r: &mut Reactor) {
    let devnull = devnull();
    let count = count_fd_messages(r);
    let unhandled = Rc::new(Cell::new(0u32));
    let u = unhandled.clone();
    r.on_unhandled(move |_r, info| {
        assert_eq!((info.command.as_str(), &info.reason), ("nobody", &AckError::NoHandler));
        u.set(u.get() + 1);
    });
    let w = util::spawn_ready(r, "sink");
    // One exchange each way before counting, so nothing is opened lazily later.
    send_fd(r, w, "fd", 0, fresh(&devnull));
    let _: u32 = r.request(w, "blast", &(1u32, "fd"), REQ).expect("warm-up blast");
    let sent_before: (u64, u64) = r.request(w, "count", &(), REQ).expect("count");
    assert_eq!(sent_before, (1, 1));
    assert_eq!(count.get(), (1, 1));

    let worker_before: usize = r.request(w, "open-fds", &(), REQ).expect("open-fds");
    let master_before = util::open_fds();

    // Master to worker.
    for i in 0..N {
        send_fd(r, w, "fd", i, fresh(&devnull));
    }
    for i in 0..UNHANDLED {
        send_fd(r, w, "nobody", i, fresh(&devnull));
    }
    let got: (u64, u64) = r.request(w, "count", &(), REQ).expect("count");
    assert_eq!(got, (1 + u64::from(N), 1 + u64::from(N)), "(messages, with an fd) the worker handled");

    // Worker to master.
    for _ in 0..N / BLAST {
        let n: u32 = r.request(w, "blast", &(BLAST, "fd"), REQ).expect("blast");
        assert_eq!(n, BLAST);
    }
    let _: u32 = r.request(w, "blast", &(UNHANDLED, "nobody"), REQ).expect("blast");
    assert_eq!(count.get(), (1 + u64::from(N), 1 + u64::from(N)), "(messages, with an fd) the master handled");
    assert_eq!(unhandled.get(), UNHANDLED);

    let worker_after: usize = r.request(w, "open-fds", &(), REQ).expect("open-fds");
    let master_after = util::open_fds();
    assert_eq!(
        (master_after, worker_after),
        (master_before, worker_before),
        "open fds (master, worker) after vs before: a leak on either side"
    );

    r.request_exit(w, Duration::from_secs(2)).unwrap();
    wait_gone(r, w);
    r.off("fd");
}

/// fds queued (forced) for a worker that never says hello are closed when
/// their ack times out, and when the worker is killed.
fn killed_before_hello(r: &mut Reactor) {
    let devnull = devnull();
    let base = util::open_fds();
    let w = r.spawn(util::worker_command("sleepy")).expect("spawn");
    let spawned = util::open_fds();

    let handle = r
        .send_to(w, "fd", &0u32, Some(fresh(&devnull)))
        .force_queue()
        .within(Duration::from_millis(200))
        .handle::<()>()
        .expect("forced");
    assert_eq!(util::open_fds(), spawned + 1, "the queued fd is held until sent");
    util::poll_until(r, REQ, |_| handle.is_done());
    assert_eq!(handle.take().unwrap(), Err(AckError::Timeout));
    assert!(!r.is_ready(w));
    assert_eq!(util::open_fds(), spawned, "a message that timed out in the queue must close its fd");

    for i in 0..50 {
        r.send_to(w, "fd", &i, Some(fresh(&devnull))).force_queue().send().expect("forced");
    }
    assert_eq!(util::open_fds(), spawned + 50);
    assert!(r.queue_depth(w).is_some_and(|(frames, _)| frames >= 50));
    r.kill(w).unwrap();
    wait_gone(r, w);
    assert_eq!(util::open_fds(), base, "fds queued for a killed worker must be closed");
}

/// fds queued behind a full socket (the worker stopped reading) are closed
/// when the worker is killed.
fn killed_with_full_socket(r: &mut Reactor) {
    let devnull = devnull();
    let base = util::open_fds();
    let w = util::spawn_ready(r, "stuck");
    let spawned = util::open_fds();

    let big = Bytes(vec![7u8; 64 * 1024]);
    let mut sent = 0;
    while r.queue_depth(w).is_none_or(|(frames, _)| frames < 8) {
        assert!(sent < 1000, "the socket never filled up");
        r.send_to(w, "fd", &big, Some(fresh(&devnull))).send().expect("send");
        sent += 1;
    }
    let (queued, _) = r.queue_depth(w).unwrap();
    assert!(queued < sent, "some were written");
    // The front frame may be partly written, its fd already the kernel's.
    let held = util::open_fds() - spawned;
    assert!(held == queued || held + 1 == queued, "{held} fds held for {queued} queued frames");
    r.kill(w).unwrap();
    wait_gone(r, w);
    assert_eq!(util::open_fds(), base, "fds queued for a killed worker must be closed");
}
