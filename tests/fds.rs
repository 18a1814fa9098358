//! fd passing (SCM_RIGHTS) between real processes: a TCP connection handed
//! from the master to a worker, a socket end handed from a worker to the
//! master, and the not-ready rule (refusal hands the fd back; `force_queue`
//! queues it until the worker says hello).

mod util;

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Peer, Reactor};
use util::events::Events;

const REQ: Duration = Duration::from_secs(10);
/// How long a reader waits for EOF: EOF comes only once every copy of the
/// other end is closed, so a leaked copy turns into a read timeout.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// Whether `fd` is open and close-on-exec.
#[track_caller]
fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(flags >= 0, "fd {fd} is not open: {}", std::io::Error::last_os_error());
    flags & libc::FD_CLOEXEC != 0
}

/// Whether descriptor number `fd` is open in this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries; it fails with EBADF on a closed fd.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Reads until EOF, failing after `READ_LIMIT`.
#[track_caller]
fn read_to_eof(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(READ_LIMIT)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("EOF within the limit: every other copy of the socket must be closed");
    text
}

fn greeting(pid: u32, what: &str) -> String {
    format!("hello from worker {pid}: {what}\n")
}

// ----- the workers and the tests --------------------------------------------

/// The worker most tests here talk to: greets through an fd it is given,
/// hands the master a socket end, and reads back what came through it.
fn fd_worker() {
    let mut r = Reactor::attach().expect("attach");
    let pid = std::process::id();
    // Writes a greeting through the fd that came with the message, then
    // closes it; replies with (pid, whether the fd arrived close-on-exec).
    r.on("greet", move |_r, msg: Message<String>| {
        assert_eq!(msg.from, Peer::Master);
        let Some(fd) = msg.fd else { return msg.reply.err("no fd came with the message") };
        let cloexec = cloexec(fd.as_raw_fd());
        let mut f = File::from(fd);
        match f.write_all(greeting(pid, &msg.payload).as_bytes()) {
            Ok(()) => {
                drop(f);
                let _ = msg.reply.ok(&(pid, cloexec));
            }
            Err(e) => msg.reply.err(format!("write through the fd failed: {e}")),
        }
    })
    .unwrap();

    // Makes a socket pair, writes into one end, sends the other to the
    // master and keeps ours for "read-back".
    let kept: Rc<RefCell<Option<UnixStream>>> = Rc::default();
    let k = kept.clone();
    r.on("give-end", move |r, msg: Message<()>| {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        ours.write_all(format!("ping from worker {pid}\n").as_bytes()).unwrap();
        if let Err(e) = r.send_to_master("end", &pid, Some(OwnedFd::from(theirs))).send() {
            return msg.reply.err(format!("send_to_master refused: {e}"));
        }
        *k.borrow_mut() = Some(ours);
        let _ = msg.reply.ok(&pid);
    })
    .unwrap();
    // Reads what the master wrote into the end it got, up to EOF: that EOF
    // needs the master's copy closed *and* the copy this worker sent closed.
    r.on("read-back", move |_r, msg: Message<()>| {
        let Some(mut ours) = kept.borrow_mut().take() else { return msg.reply.err("no end kept") };
        ours.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut text = String::new();
        match ours.read_to_string(&mut text) {
            Ok(_) => {
                let _ = msg.reply.ok(&text);
            }
            Err(e) => msg.reply.err(format!("no EOF on the kept end ({e}); read so far {text:?}")),
        }
    })
    .unwrap();
    util::serve(&mut r);
}

/// (sender, payload, fd) of a message the master received.
type Received = (Peer, u32, Option<OwnedFd>);

/// The classic use: the master accepts a TCP connection and hands it to a
/// worker, which answers the client directly.
#[test]
fn tcp_connection_handed_to_worker() {
    util::child("fdworker", fd_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "fdworker");
    let worker_pid = r.worker_pid(w).expect("pid");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(READ_LIMIT)).unwrap();
        let mut text = String::new();
        // EOF only once the worker's and the master's copies are both closed.
        let res = s.read_to_string(&mut text);
        (res.map_err(|e| e.to_string()), text)
    });
    let (conn, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), addr.ip());

    let (pid, cloexec): (u32, bool) =
        r.send_to(w, "greet", "tcp client", Some(OwnedFd::from(conn))).within(REQ).wait().expect("greet");
    assert_eq!(pid, worker_pid, "the worker reports its own pid");
    assert!(cloexec, "an fd received by the worker must be close-on-exec");

    let (res, text) = client.join().expect("client thread");
    assert_eq!(res, Ok(text.len()), "client read failed; got {text:?}");
    assert_eq!(text, greeting(worker_pid, "tcp client"));
    r.shutdown(Duration::from_secs(2)).unwrap();
}

/// A worker sends a socket end to the master; the master reads and writes
/// through it and closes it; the worker then sees the master's bytes and EOF.
#[test]
fn socket_end_sent_from_worker_to_master() {
    util::child("fdworker", fd_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let got: Rc<RefCell<Vec<Received>>> = Rc::default();
    let g = got.clone();
    r.on("end", move |_r, msg: Message<u32>| g.borrow_mut().push((msg.from, msg.payload, msg.fd))).unwrap();
    let w = util::spawn_ready(&mut r, "fdworker");
    let worker_pid = r.worker_pid(w).expect("pid");

    // The worker queues "end" before its reply, so it is handled first.
    let pid: u32 = r.request(w, "give-end", &(), REQ).expect("give-end");
    assert_eq!(pid, worker_pid);
    let (from, payload, fd) = got.borrow_mut().pop().expect("the end arrived before the reply");
    assert!(got.borrow().is_empty());
    assert_eq!(from, Peer::Worker(w));
    assert_eq!(payload, worker_pid);
    let fd = fd.expect("the message carried an fd");
    assert!(cloexec(fd.as_raw_fd()), "an fd received by the master must be close-on-exec");

    let mut end = UnixStream::from(fd);
    end.set_read_timeout(Some(READ_LIMIT)).unwrap();
    let expected = format!("ping from worker {worker_pid}\n");
    let mut buf = vec![0u8; expected.len()];
    end.read_exact(&mut buf).expect("read the worker's bytes through the received fd");
    assert_eq!(String::from_utf8(buf).unwrap(), expected);
    end.write_all(b"pong from master\n").unwrap();
    drop(end);

    let text: String = r.request(w, "read-back", &(), REQ).expect("read-back");
    assert_eq!(text, "pong from master\n");
    r.shutdown(Duration::from_secs(2)).unwrap();
}

/// An fd for a worker that has not said hello is refused with `NotReady`
/// and handed back open; `force_queue` queues it until the worker is ready.
#[test]
fn fd_to_unready_worker_is_refused_unless_forced() {
    util::child("fdworker", fd_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let w = r.spawn(util::worker_command("fdworker")).expect("spawn");
    // No poll yet: the worker's hello cannot have been read.
    assert!(!r.is_ready(w));

    // Refused by every terminal, the fd handed back each time.
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    let err = r.send_to(w, "greet", "refused", Some(OwnedFd::from(theirs))).send().unwrap_err();
    assert!(matches!(err.error, Error::NotReady(id) if id == w), "{err:?}");
    let back = err.fd.expect("the fd is handed back");
    assert_eq!(back.as_raw_fd(), raw, "the very same descriptor comes back");
    let err = r.send_to(w, "greet", "refused", Some(back)).within(REQ).handle::<(u32, bool)>().err().unwrap();
    assert!(matches!(err.error, Error::NotReady(id) if id == w), "{err:?}");
    let called = Rc::new(RefCell::new(false));
    let c = called.clone();
    let err = r
        .send_to(w, "greet", "refused", err.into_fd())
        .ackd(move |_r, _res: Result<(u32, bool), AckError>| *c.borrow_mut() = true)
        .unwrap_err();
    assert!(matches!(err.error, Error::NotReady(id) if id == w), "{err:?}");
    let back = err.into_fd().expect("the fd is handed back");
    assert_eq!(back.as_raw_fd(), raw);
    assert_eq!(r.queue_depth(w), Some((0, 0)), "nothing was queued");
    assert_eq!(r.stats().messages_sent, 0);
    assert_eq!(r.pending_acks(), 0);

    // Still open and usable: write through it, read at the other end.
    let mut back = UnixStream::from(back);
    back.write_all(b"still mine\n").unwrap();
    ours.set_read_timeout(Some(READ_LIMIT)).unwrap();
    let mut buf = [0u8; 11];
    ours.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still mine\n");

    // Forced: queued now, written once the worker says hello.
    let (mut ours2, theirs2) = UnixStream::pair().unwrap();
    let raw2 = theirs2.as_raw_fd();
    let handle = r
        .send_to(w, "greet", "forced", Some(OwnedFd::from(theirs2)))
        .force_queue()
        .within(REQ)
        .handle::<(u32, bool)>()
        .expect("force_queue accepts an fd for an unready worker");
    assert!(!r.is_ready(w));
    assert_eq!(r.queue_depth(w).map(|(frames, _)| frames), Some(1));
    assert!(is_open(raw2), "the queued fd stays open in the master until sent");
    util::poll_until(&mut r, REQ, |_| handle.is_done());
    let (pid, cloexec) = handle.take().unwrap().expect("forced greet acknowledged");
    assert_eq!(Some(pid), r.worker_pid(w));
    assert!(cloexec, "an fd received by the worker must be close-on-exec");
    assert!(r.is_ready(w));
    assert_eq!(read_to_eof(&mut ours2), greeting(pid, "forced"));

    // The handed-back fd still works as a message's fd, now without forcing.
    let (pid2, _): (u32, bool) =
        r.send_to(w, "greet", "handed back", Some(OwnedFd::from(back))).within(REQ).wait().expect("greet");
    assert_eq!(pid2, pid);
    assert_eq!(read_to_eof(&mut ours), greeting(pid, "handed back"));
    assert!(!*called.borrow(), "a refused send's callback is never called");
    r.shutdown(Duration::from_secs(2)).unwrap();
}

/// A socket end that yields `label` when read.
fn labelled_fd(label: &str) -> OwnedFd {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.write_all(label.as_bytes()).unwrap();
    OwnedFd::from(theirs)
}

static RESUME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_resume(_sig: libc::c_int) {
    RESUME.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Reports each `label` message's payload with the text read from its fd,
/// after reading nothing until the master sends SIGUSR1 (so its writes back up).
fn slow_label_worker() {
    let mut r = Reactor::attach().expect("attach");
    // SAFETY: installs an async-signal-safe handler (one atomic store) for SIGUSR1.
    unsafe { libc::signal(libc::SIGUSR1, on_resume as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    r.on("big", |_r, _m: Message<clusterphone::Bytes>| {}).unwrap();
    r.on("label", |r, m: Message<String>| {
        let mut got = String::new();
        if let Some(fd) = m.fd {
            let _ = UnixStream::from(fd).read_to_string(&mut got);
        }
        r.send_to_master("labelled", &(m.payload.clone(), got), None).send().unwrap();
    })
    .unwrap();
    r.flush(REQ).unwrap();
    let end = std::time::Instant::now() + REQ;
    while !RESUME.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    util::serve(&mut r);
}

#[test]
fn a_message_cancelled_after_its_fd_left_never_shifts_fds_onto_later_messages() {
    util::child("slow-labels", slow_label_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let reports: Rc<RefCell<Vec<(String, String)>>> = Rc::default();
    let rp = reports.clone();
    r.on("labelled", move |_r, m: Message<(String, String)>| rp.borrow_mut().push(m.payload)).unwrap();
    let w = util::spawn_ready(&mut r, "slow-labels");
    // A frame larger than the socket buffer, then an fd-carrying frame in the
    // same sendmsg: the partial write hands A's fd to the kernel before A's bytes.
    let outcome: Rc<RefCell<Option<Result<(), AckError>>>> = Rc::default();
    let o = outcome.clone();
    r.batch(|r| {
        r.send_to(w, "big", &clusterphone::Bytes(vec![7u8; 600_000]), None).send().unwrap();
        r.send_to(w, "label", &"A".to_string(), Some(labelled_fd("A")))
            .within(Duration::from_millis(50))
            .ackd(move |_r, res: Result<(), AckError>| *o.borrow_mut() = Some(res))
            .unwrap();
    });
    util::poll_until(&mut r, REQ, |_| outcome.borrow().is_some());
    assert!(matches!(*outcome.borrow(), Some(Err(AckError::Timeout))), "{:?}", outcome.borrow());
    // Only now may the worker read on.
    let pid = r.worker_pid(w).unwrap();
    // SAFETY: kill(2) on our own worker's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    r.send_to(w, "label", &"B".to_string(), Some(labelled_fd("B"))).send().unwrap();
    util::poll_until(&mut r, REQ, |_| reports.borrow().iter().any(|(p, _)| p == "B"));
    for (payload, label) in reports.borrow().iter() {
        assert_eq!(payload, label, "message {payload:?} carried the fd of {label:?}");
    }
    // A's fd left with the partial write, so A itself had to follow (its ack still a timeout);
    // if it did not, the socket never filled and this run tested nothing.
    let labels: Vec<String> = reports.borrow().iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(labels, ["A", "B"], "A was not delivered: the setup did not split its fd from its bytes");
    r.shutdown(REQ).unwrap();
}

/// Lowers its own fd limit just above what it uses, then receives a burst of
/// fds: the kernel drops those it cannot install (MSG_CTRUNC, how EMFILE shows
/// on receive). Exits 0 if that was a protocol error for the connection and
/// every fd that did arrive was closed.
fn emfile_worker() {
    let mut r = Reactor::attach().expect("attach");
    // No frame of a read whose fds the kernel truncated may reach a handler:
    // the fds that did arrive could belong to other frames than the decoder thinks.
    let calls = Rc::new(std::cell::Cell::new(0u32));
    let c = calls.clone();
    // Keep the fds, so that they pile up to the limit.
    let kept: Rc<RefCell<Vec<OwnedFd>>> = Rc::default();
    let k = kept.clone();
    r.on("fd", move |_r, m: Message<()>| {
        c.set(c.get() + 1);
        k.borrow_mut().extend(m.fd);
    })
    .unwrap();
    r.flush(REQ).unwrap();
    let base = util::open_fds();
    let limit = libc::rlimit { rlim_cur: base as libc::rlim_t + 4, rlim_max: libc::RLIM_INFINITY };
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the rlimit structs we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
        let limit = libc::rlimit { rlim_max: old.rlim_max, ..limit };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    r.send_to_master("limited", &(), None).send().unwrap();
    let end = loop {
        match r.poll(Some(Duration::from_millis(100))) {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    // Every frame handled came with its fd: none was paired with a wrong one.
    let all_with_fds = kept.borrow().len() == calls.get() as usize;
    kept.borrow_mut().clear();
    let after = util::open_fds();
    let missing = matches!(end, Error::Protocol(clusterphone::ProtocolError::MissingFds));
    // Fds travel one per write: the frames whose fds fit under the limit are
    // handled; the first truncated read ends the connection.
    let ok = missing && after < base && all_with_fds && calls.get() < 32;
    if !ok {
        eprintln!("emfile worker: ended with {end:?}, fds {base} -> {after}, {} frames handled", calls.get());
    }
    std::process::exit(if ok { 0 } else { 1 });
}

#[test]
fn fds_dropped_at_the_receivers_fd_limit_are_a_protocol_error_without_leaks() {
    util::child("emfile", emfile_worker);
    let _d = util::deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let limited = Rc::new(RefCell::new(false));
    let l = limited.clone();
    r.on("limited", move |_r, _m: Message<()>| *l.borrow_mut() = true).unwrap();
    let events = Events::record(&mut r);
    let w = util::spawn_ready(&mut r, "emfile");
    util::poll_until(&mut r, REQ, |_| *limited.borrow());
    // 32 fds in one batch: far more than the worker may open.
    r.batch(|r| {
        for _ in 0..32 {
            let (a, _b) = UnixStream::pair().unwrap();
            r.send_to(w, "fd", &(), Some(OwnedFd::from(a))).send().unwrap();
        }
    });
    util::poll_until(&mut r, REQ, |r| r.workers().is_empty());
    let exit = events.exits().last().map(|(_, x)| x.status.and_then(|s| s.code()));
    assert_eq!(exit, Some(Some(0)), "the worker saw no protocol error, or leaked fds");
}

/// Drops root (so the kernel's in-flight fd limit applies), lowers its fd
/// limit to 32, then sends 200 fds to a master that is not reading yet: the
/// kernel answers ETOOMANYREFS, which must hold frames back, not fail them.
fn fd_flood_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.flush(REQ).unwrap();
    // SAFETY: plain syscalls on integers and structs we own.
    unsafe {
        if libc::geteuid() == 0 {
            // Root is exempt from the in-flight limit (CAP_SYS_RESOURCE): become nobody.
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
        }
        let limit = libc::rlimit { rlim_cur: 32, rlim_max: 32 };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    for i in 0..200u32 {
        // Queued frames hold their fds: at our own limit, let the reactor work first.
        let file = loop {
            match File::open("/dev/null") {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => r.poll(Some(Duration::from_millis(5))).unwrap(),
                Err(e) => panic!("open: {e}"),
            }
        };
        r.send_to_master("flood", &i, Some(OwnedFd::from(file))).send().unwrap();
    }
    r.flush(Duration::from_secs(20)).unwrap();
    let pushed_back = r.stats().fd_backpressure;
    r.send_to_master("flooded", &pushed_back, None).send().unwrap();
    r.flush(REQ).unwrap();
    std::process::exit(0);
}

#[test]
fn too_many_fds_in_flight_is_backpressure_not_an_error() {
    util::child("fd-flood", fd_flood_worker);
    let _d = util::deadline(Duration::from_secs(40));
    let mut r = Reactor::master().unwrap();
    let got: Rc<RefCell<Vec<(u32, bool)>>> = Rc::default();
    let g = got.clone();
    r.on("flood", move |_r, m: Message<u32>| g.borrow_mut().push((m.payload, m.fd.is_some()))).unwrap();
    let pushed_back = Rc::new(RefCell::new(None));
    let p = pushed_back.clone();
    r.on("flooded", move |_r, m: Message<u64>| *p.borrow_mut() = Some(m.payload)).unwrap();
    let _w = util::spawn_ready(&mut r, "fd-flood");
    // Read nothing for a while: the worker's fds pile up in flight.
    std::thread::sleep(Duration::from_millis(500));
    util::poll_until(&mut r, Duration::from_secs(20), |_| pushed_back.borrow().is_some());
    let got = got.borrow();
    assert_eq!(got.len(), 200);
    assert!(got.iter().enumerate().all(|(i, &(n, fd))| n == i as u32 && fd), "every message, in order, with its fd");
    assert!(pushed_back.borrow().unwrap() > 0, "the kernel never pushed back (ETOOMANYREFS)");
}
