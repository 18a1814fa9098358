//! The fd comes back: an acked message whose fd never left (it timed out in
//! the queue, or its worker died first) hands the fd to its outcome, usable,
//! so the sender can pass it on; one whose fd did leave hands back nothing.

mod util;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Bytes, Message, Reactor, Responder, WorkerId};
use util::{deadline, poll_until, serve, spawn_ready, LIMIT};

type Back = Rc<RefCell<Option<(Result<(), AckError>, Option<OwnedFd>)>>>;

/// Fills the worker's socket (it never reads), then sends `fd` acked, with
/// `within`; the outcome lands in the returned cell.
fn send_behind_a_full_socket(r: &mut Reactor, w: WorkerId, fd: OwnedFd, within: Duration) -> Back {
    while r.queue_depth(w).is_some_and(|(frames, _)| frames == 0) {
        r.send_to(w, "fill", Bytes(vec![0u8; 64 << 10]), None).send().unwrap();
    }
    let back: Back = Rc::default();
    let b = back.clone();
    r.send_to(w, "conn", &(), Some(fd))
        .within(within)
        .ackd_fd(move |_r, outcome: Result<(), AckError>, fd| *b.borrow_mut() = Some((outcome, fd)))
        .unwrap();
    back
}

/// The fd that came back still works: write through it, read the other end.
fn assert_usable(fd: OwnedFd, keep: &UnixStream) {
    let mut s = UnixStream::from(fd);
    s.write_all(b"still open").unwrap();
    let mut buf = [0u8; 10];
    (&*keep).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still open");
}

#[test]
fn an_fd_that_timed_out_in_the_queue_comes_back() {
    util::child("never-reads", util::raw::never_reads);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "never-reads");
    let (keep, give) = UnixStream::pair().unwrap();
    let back = send_behind_a_full_socket(&mut r, w, give.into(), Duration::from_millis(200));
    poll_until(&mut r, LIMIT, |_| back.borrow().is_some());
    let (outcome, fd) = back.borrow_mut().take().unwrap();
    assert_eq!(outcome, Err(AckError::Timeout));
    assert_usable(fd.expect("the fd comes back"), &keep);
    // It never reads the request to exit: killed after the grace.
    r.shutdown(Duration::from_millis(200)).unwrap();
}

#[test]
fn an_fd_queued_for_a_worker_that_died_comes_back() {
    util::child("never-reads", util::raw::never_reads);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "never-reads");
    let (keep, give) = UnixStream::pair().unwrap();
    let back = send_behind_a_full_socket(&mut r, w, give.into(), LIMIT);
    r.kill(w).unwrap();
    poll_until(&mut r, LIMIT, |_| back.borrow().is_some());
    let (outcome, fd) = back.borrow_mut().take().unwrap();
    assert!(matches!(outcome, Err(AckError::Exited(_)) | Err(AckError::Disconnected)), "{outcome:?}");
    assert_usable(fd.expect("the fd comes back"), &keep);
    // It never reads the request to exit: killed after the grace.
    r.shutdown(Duration::from_millis(200)).unwrap();
}

/// A message kept unanswered, with its fd.
type Held = (Responder, Option<OwnedFd>);

/// Takes `conn` messages and never answers them.
fn holding_worker() {
    let mut r = Reactor::attach().expect("attach");
    let held: Rc<RefCell<Vec<Held>>> = Rc::default();
    let h = held.clone();
    r.on("conn", move |_r, m: Message<()>| h.borrow_mut().push((m.reply, m.fd))).unwrap();
    serve(&mut r);
}

#[test]
fn an_fd_that_left_does_not_come_back() {
    util::child("hold", holding_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "hold");
    let (_keep, give) = UnixStream::pair().unwrap();
    let back: Back = Rc::default();
    let b = back.clone();
    r.send_to(w, "conn", &(), Some(give.into()))
        .within(Duration::from_millis(200))
        .ackd_fd(move |_r, outcome: Result<(), AckError>, fd| *b.borrow_mut() = Some((outcome, fd)))
        .unwrap();
    poll_until(&mut r, LIMIT, |_| back.borrow().is_some());
    let (outcome, fd) = back.borrow_mut().take().unwrap();
    assert_eq!(outcome, Err(AckError::Timeout));
    assert!(fd.is_none(), "the worker has it");
    r.shutdown(LIMIT).unwrap();
}
