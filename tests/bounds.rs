//! Resource bounds and liveness against workers that misbehave (issue 10,
//! points A1–A5 and B7), each with a real master and real worker processes.
//!
//! Most misbehaving workers are "raw": they never call `Reactor::attach` and
//! write the wire format by hand (see `util::raw`). The master's heap is
//! measured with a counting allocator that also keeps a high-water mark, and
//! its fds in /proc/self/fd. Both are process-wide, so the tests of this
//! binary take turns (`one_at_a_time`): no other test allocates or opens fds
//! while one measures.

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::rc::Rc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clusterphone::codec::{Envelope, Kind, FLAG_ACK, PROTOCOL_VERSION};
use clusterphone::{
    AckError, Bytes, Config, DisconnectReason, Error, Message, Peer, ProtocolError, Reactor, Responder, SendError,
    WorkerEvent, WorkerId,
};
use util::events::{echo_worker, on_echo, LIMIT};
use util::raw::{env, frame, raw_frame, RawPeer};
use util::{deadline, role, serve, worker_command};

// ----- measuring ---------------------------------------------------------------

/// Counts live heap bytes and keeps their high-water mark.
struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = HEAP.fetch_add(by, Ordering::Relaxed) + by;
    if by > 0 {
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        grew(-(layout.size() as isize));
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes of this process.
fn heap() -> isize {
    HEAP.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at the current heap, and returns the heap.
fn reset_peak() -> isize {
    let now = heap();
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The heap's high-water mark since the last `reset_peak`.
fn peak() -> isize {
    PEAK.load(Ordering::Relaxed)
}

const MIB: usize = 1 << 20;

/// The tests of this binary measure process-wide quantities: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ----- the master's view of its workers ---------------------------------------

/// A worker event, recorded.
#[derive(Debug, Clone)]
#[allow(dead_code)] // The texts are read through `Debug`.
enum Seen {
    Ready,
    Protocol(ProtocolError),
    Closed(String),
    Exited(Option<ExitStatus>),
}

/// A master reactor that records every worker event.
struct Watch {
    r: Reactor,
    seen: Rc<RefCell<Vec<(WorkerId, Seen)>>>,
}

impl Watch {
    fn new(config: Config) -> Watch {
        let mut r = Reactor::master_with(config).expect("master");
        let seen: Rc<RefCell<Vec<(WorkerId, Seen)>>> = Rc::default();
        let log = seen.clone();
        r.on_worker_event(move |_r, id, e| {
            let s = match e {
                WorkerEvent::Ready => Seen::Ready,
                WorkerEvent::Disconnected(DisconnectReason::Protocol(p)) => Seen::Protocol(p.clone()),
                WorkerEvent::Disconnected(other) => Seen::Closed(format!("{other:?}")),
                WorkerEvent::Exited(exit) => Seen::Exited(exit.status),
                other => Seen::Closed(format!("{other:?}")),
            };
            log.borrow_mut().push((id, s));
        });
        Watch { r, seen }
    }

    fn spawn(&mut self, role: &str) -> WorkerId {
        self.r.spawn(worker_command(role)).expect("spawn")
    }

    /// Every event of worker `w` so far, in order.
    fn of(&self, w: WorkerId) -> Vec<Seen> {
        self.seen.borrow().iter().filter(|(id, _)| *id == w).map(|(_, s)| s.clone()).collect()
    }

    fn has(&self, w: WorkerId, what: impl Fn(&Seen) -> bool) -> bool {
        self.seen.borrow().iter().any(|(id, s)| *id == w && what(s))
    }

    fn exited(&self, w: WorkerId) -> bool {
        self.has(w, |s| matches!(s, Seen::Exited(_)))
    }

    /// Polls until worker `w` has an event that satisfies `what`.
    fn wait(&mut self, w: WorkerId, what: impl Fn(&Seen) -> bool, waiting_for: &str) {
        let end = Instant::now() + LIMIT;
        while !self.has(w, &what) {
            assert!(Instant::now() < end, "{waiting_for}: not within {LIMIT:?}; events of {w}: {:?}", self.of(w));
            self.r.poll(Some(Duration::from_millis(10))).expect("poll");
        }
    }

    /// Waits for worker `w` to exit; its exit status.
    fn exit_of(&mut self, w: WorkerId) -> Option<ExitStatus> {
        self.wait(w, |s| matches!(s, Seen::Exited(_)), "the worker's exit");
        self.of(w).into_iter().find_map(|s| if let Seen::Exited(status) = s { Some(status) } else { None }).unwrap()
    }

    /// The protocol errors worker `w` was disconnected for.
    fn protocol_errors(&self, w: WorkerId) -> Vec<ProtocolError> {
        self.of(w).into_iter().filter_map(|s| if let Seen::Protocol(p) = s { Some(p) } else { None }).collect()
    }

    /// Asks the echo worker `w` to echo `n`.
    fn echo(&mut self, w: WorkerId, n: u64) {
        let got: u64 = self.r.request(w, "echo", &n, LIMIT).expect("the echo worker answers");
        assert_eq!(got, n);
    }

    /// Worker `w` saw nothing but its own start.
    fn assert_untouched(&self, w: WorkerId) {
        let seen = self.of(w);
        assert!(seen.iter().all(|s| matches!(s, Seen::Ready)), "a well-behaved worker was disturbed: {seen:?}");
    }

    /// Asks every worker to exit, waits for each, checks that those in
    /// `clean` (raw peers that check their own side) exited with success, and
    /// shuts down.
    fn finish(mut self, clean: &[WorkerId]) {
        for id in self.r.workers() {
            let _ = self.r.request_exit(id, Duration::from_secs(2));
        }
        for &id in clean {
            let status = self.exit_of(id);
            assert!(status.is_some_and(|s| s.success()), "worker {id}'s own checks failed: {status:?}");
        }
        self.r.shutdown(Duration::from_secs(2)).expect("shutdown");
        assert!(self.r.workers().is_empty());
    }
}

// ----- roles (run in re-executed children) ------------------------------------

#[test]
fn worker_entry() {
    let Some(role) = role() else { return };
    util::worker_watchdog();
    match role.as_str() {
        "echo" => echo_worker(),
        "echo-sink" => echo_sink_worker(),
        "fd-sender" => fd_sender_worker(),
        "noread" => raw_never_reads(),
        "requests" => raw_requests_without_reading(),
        "many-ns" => raw_many_namespaces(),
        "same-ns" => raw_same_namespace_again_and_again(),
        "big-hello" => raw_big_hello(),
        "fd-parker" => raw_fd_parker(),
        "fd-over-cap" => raw_fds_over_the_link_cap(),
        "slow-fd-frame" => raw_slow_fd_frame(),
        "forker" => raw_forker(),
        other => panic!("unknown role {other}"),
    }
}

/// Answers `echo`; takes `sink` messages and never answers them.
fn echo_sink_worker() {
    let mut r = Reactor::attach().expect("attach");
    on_echo(&mut r);
    let kept: Rc<RefCell<Vec<Responder>>> = Rc::default();
    r.on("sink", move |_r, msg: Message<()>| kept.borrow_mut().push(msg.reply)).unwrap();
    serve(&mut r);
}

/// Answers `echo`; on `sendfd`, sends the master a message with an fd
/// (ahead of its reply, on the same stream).
fn fd_sender_worker() {
    let mut r = Reactor::attach().expect("attach");
    on_echo(&mut r);
    r.on("sendfd", |r, msg: Message<()>| {
        let fd = OwnedFd::from(File::open("/dev/null").expect("open /dev/null"));
        r.send_to_master("withfd", &(), Some(fd)).send().expect("send an fd to the master");
        let _ = msg.reply.ok(&());
    })
    .unwrap();
    serve(&mut r);
}

/// Reads until the master closes the channel or asks us to exit (a read
/// timeout just waits on: the master of the old code never closes).
fn until_eof_or_exit(p: &mut RawPeer) {
    loop {
        match p.try_next() {
            Ok(None) => return,
            Ok(Some(f)) if f.kind == Kind::Exit => return,
            Ok(Some(_)) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("raw read: {e}"),
        }
    }
}

/// A1: says hello, then never reads; waits (without reading) for the master to go.
fn raw_never_reads() {
    let mut p = RawPeer::connect();
    p.hello(PROTOCOL_VERSION);
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let mut pfd = libc::pollfd { fd: p.sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
            return;
        }
    }
}

/// A2: the size of each reply's filler.
const REPLY_FILL: usize = 256;
/// A2: at most this many requests, written for at most `WRITE_FOR`.
const MAX_REQUESTS: u64 = 200_000;
const WRITE_FOR: Duration = Duration::from_millis(2500);

/// A2: an acked request; all are the same length.
fn request(seq: u64) -> Vec<u8> {
    frame(env(Kind::Message, FLAG_ACK, 0, seq, "_", "req"), &Bytes(seq.to_le_bytes().to_vec()))
}

/// A2: writes acked requests for `WRITE_FOR` without reading a byte (its
/// writes block once the master stops reading), then reads: it must get a
/// reply for every request it wrote, in order, then the reply to `done`.
fn raw_requests_without_reading() {
    let mut p = RawPeer::connect();
    p.hello(PROTOCOL_VERSION);
    let len = request(1).len();
    let mut sock = p.sock.try_clone().unwrap();
    sock.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let (mut written, mut next) = (0usize, 1u64);
    let (mut batch, mut at) = (Vec::new(), 0usize);
    while start.elapsed() < WRITE_FOR {
        if at == batch.len() {
            if next > MAX_REQUESTS {
                break;
            }
            batch.clear();
            at = 0;
            while next <= MAX_REQUESTS && batch.len() < 1024 * len {
                batch.extend(request(next));
                next += 1;
            }
        }
        match sock.write(&batch[at..]) {
            Ok(n) => {
                at += n;
                written += n;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("raw write: {e}"),
        }
    }
    // The request cut short by the end of the time is finished and counted.
    let sent = written.div_ceil(len) as u64;
    let mut rest = batch[at..at + (sent as usize * len - written)].to_vec();
    rest.extend(frame(env(Kind::Message, FLAG_ACK, 0, sent + 1, "_", "done"), &sent));
    // Written from a thread: the master may read again only once we read.
    sock.set_write_timeout(None).unwrap();
    let writer = std::thread::spawn(move || sock.write_all(&rest).expect("raw write of the rest"));
    p.expect(Kind::Hello, 0);
    for seq in 1..=sent {
        let f = p.next().unwrap_or_else(|| panic!("the master closed the channel before reply {seq} of {sent}"));
        assert_eq!((f.kind, f.seq), (Kind::Reply, seq), "reply {seq} of {sent}");
        let (echoed, fill): (u64, Bytes) = f.decode();
        assert_eq!((echoed, fill.len()), (seq, REPLY_FILL));
    }
    let f = p.expect(Kind::Reply, sent + 1);
    assert_eq!(f.decode::<u64>(), sent);
    writer.join().unwrap();
}

/// A3: namespaces announced after hello, well past the master's cap.
const MANY_NAMESPACES: usize = 40;
const NAMESPACE_CAP: usize = 16;
/// A3: how many times the same namespace is announced.
const REPEATS: usize = 200_000;

/// A3: announces `MANY_NAMESPACES` distinct namespaces, then reads to EOF.
fn raw_many_namespaces() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    for i in 0..MANY_NAMESPACES {
        let name = format!("ns{i}");
        let e = Envelope { kind: Kind::Namespace, flags: 0, nfds: 0, seq: 0, ns: &name, cmd: "" };
        if p.sock.write_all(&frame(e, &())).is_err() {
            break; // Closed by the master already.
        }
    }
    until_eof_or_exit(&mut p);
}

/// A3: announces the same namespace `REPEATS` times, then checks the
/// channel is still up with an acked `check`.
fn raw_same_namespace_again_and_again() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    let batch = frame(env(Kind::Namespace, 0, 0, 0, "same", ""), &()).repeat(1000);
    for _ in 0..REPEATS / 1000 {
        p.write(&batch);
    }
    p.write(&frame(env(Kind::Message, FLAG_ACK, 0, 1, "_", "check"), &()));
    p.expect(Kind::Reply, 1);
    until_eof_or_exit(&mut p);
}

/// A4: a hello as large as the default `max_frame`, its namespace list made
/// of empty strings (one byte each on the wire).
fn raw_big_hello() {
    let mut p = RawPeer::connect();
    let max_frame = Config::default().max_frame;
    // Header (20), then (1, [""; n]): 0x82, 0x01, an array of u32 length, n × 0x60.
    let n = max_frame - 20 - 2 - 5;
    let mut payload = Vec::with_capacity(max_frame);
    payload.extend_from_slice(&[0x82, 0x01, 0x9a]);
    payload.extend_from_slice(&(n as u32).to_be_bytes());
    payload.resize(payload.len() + n, 0x60);
    let hello = raw_frame(env(Kind::Hello, 0, 0, 0, "", ""), &payload);
    assert_eq!(hello.len(), max_frame);
    // The master may close the channel before it has read it all.
    let _ = p.sock.write_all(&hello);
    drop((payload, hello));
    until_eof_or_exit(&mut p);
}

/// `sendmsg` of `data` with `fds` attached as SCM_RIGHTS (at most 16).
fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut cmsg = [0u64; 16];
    let data_len = std::mem::size_of_val(fds) as libc::c_uint;
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    assert!(space <= std::mem::size_of_val(&cmsg));
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes we own, so the
    // first header is non-null and the header plus the fds fit in it.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(hdr).cast::<RawFd>(), fds.len());
    }
    // SAFETY: msg points at a live iovec over `data` and at our control buffer.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == data.len() => Ok(()),
        n => panic!("sendmsg wrote {n} of {} bytes", data.len()),
    }
}

/// A5: the default total cap, with a per-link cap of 32 (default 8), so
/// that a few parkers can take the total past its cap, each under its own.
fn parking_config() -> Config {
    let mut config = Config::default();
    config.max_received_fds = 32;
    config
}

/// A5: fds each parker leaves unclaimed (under the per-link cap of 32).
const PARKED_EACH: usize = 30;
/// A5: parkers, together well past the total cap of 128.
const PARKERS: usize = 6;

/// A5: sends `PARKED_EACH` fds on complete frames that claim none, says
/// `parked` (acked), then stays connected until the master closes the
/// channel or asks us to exit.
fn raw_fd_parker() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    let null = File::open("/dev/null").expect("open /dev/null");
    let fds = [null.as_raw_fd(); 6];
    let nop = frame(env(Kind::Message, 0, 0, 0, "_", "nop"), &());
    for _ in 0..PARKED_EACH / fds.len() {
        if send_fds(p.sock.as_raw_fd(), &nop, &fds).is_err() {
            return until_eof_or_exit(&mut p); // Closed by the master already.
        }
    }
    if p.sock.write_all(&frame(env(Kind::Message, FLAG_ACK, 0, 1, "_", "parked"), &())).is_ok() {
        until_eof_or_exit(&mut p);
    }
}

/// A5: one frame cut in one-byte pieces, each sent with 8 fds: 40 fds wait
/// for a frame that never completes (the per-link cap is 32).
fn raw_fds_over_the_link_cap() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    let null = File::open("/dev/null").expect("open /dev/null");
    let fds = [null.as_raw_fd(); 8];
    let f = frame(env(Kind::Message, 0, 0, 0, "_", "nop"), &Bytes(vec![0; 64]));
    for piece in f.chunks(1).take(5) {
        if send_fds(p.sock.as_raw_fd(), piece, &fds).is_err() {
            break; // Closed by the master already.
        }
    }
    until_eof_or_exit(&mut p);
}

/// A5: says `started`, then sends the first 64 bytes of a 64 KiB frame with
/// its fd, and the rest only once the master says `finish`: a large frame in
/// transit, holding one fd meanwhile.
fn raw_slow_fd_frame() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "started"), &()));
    let null = File::open("/dev/null").expect("open /dev/null");
    let f = frame(env(Kind::Message, 0, 1, 0, "_", "bigfd"), &Bytes(vec![0; 64 * 1024]));
    if send_fds(p.sock.as_raw_fd(), &f[..64], &[null.as_raw_fd()]).is_err() {
        return until_eof_or_exit(&mut p);
    }
    loop {
        match p.try_next() {
            Ok(Some(fr)) if fr.cmd == "finish" => break,
            Ok(Some(_)) => {}
            _ => return,
        }
    }
    if p.sock.write_all(&f[64..]).is_ok() {
        until_eof_or_exit(&mut p);
    }
}

/// B7: how long the grandchild writes at most, in ns.
const GRANDCHILD_WRITES_FOR_NS: i64 = 3_000_000_000;
/// B7: the worker exits once its grandchild has written this much (more
/// than the socket holds: the channel is full when the worker exits).
const FLOOD_BEFORE_EXIT: usize = 512 * 1024;

/// B7: says hello, forks a grandchild that inherits the channel, tells the
/// master its pid, lets it write valid frames without end, and exits once
/// the grandchild has filled the channel.
fn raw_forker() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    let mut flood = Vec::new();
    for i in 0..256u64 {
        flood.extend(frame(env(Kind::Message, 0, 0, 0, "_", "flood"), &i));
    }
    let (mut go, mut started) = ([0 as libc::c_int; 2], [0 as libc::c_int; 2]);
    // SAFETY: pipe fills the two ints we own.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::pipe(started.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes async-signal-safe calls on memory that
    // exists before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above; the slice lives in this copy of the address space.
        unsafe { grandchild(p.sock.as_raw_fd(), go[0], started[1], &flood) }
    }
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "grandchild"), &(pid as u32)));
    let mut b = 0u8;
    // SAFETY: one byte to and from live buffers, on our pipes.
    unsafe {
        assert_eq!(libc::write(go[1], b"g".as_ptr().cast(), 1), 1);
        assert_eq!(libc::read(started[0], (&mut b as *mut u8).cast(), 1), 1);
    }
}

/// The grandchild: waits for the go, writes `flood` on `sock` over and over
/// for at most `GRANDCHILD_WRITES_FOR_NS` or until the channel closes (saying
/// so on `started` after `FLOOD_BEFORE_EXIT` bytes), then waits to be killed
/// (so its pid stays ours to kill), at most 60 s.
///
/// # Safety
/// Runs in a child forked from a multithreaded process: async-signal-safe calls only.
unsafe fn grandchild(sock: RawFd, go: RawFd, started: RawFd, flood: &[u8]) -> ! {
    unsafe {
        libc::alarm(60);
        let mut b = 0u8;
        libc::read(go, (&mut b as *mut u8).cast(), 1);
        let now = || {
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
            ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
        };
        let end = now() + GRANDCHILD_WRITES_FOR_NS;
        let (mut at, mut total) = (0usize, 0usize);
        while now() < end {
            let n = libc::send(sock, flood.as_ptr().add(at).cast(), flood.len() - at, libc::MSG_NOSIGNAL);
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            at += n as usize;
            if at == flood.len() {
                at = 0;
            }
            let before = total;
            total += n as usize;
            if before < FLOOD_BEFORE_EXIT && total >= FLOOD_BEFORE_EXIT {
                libc::write(started, b"s".as_ptr().cast(), 1);
            }
        }
        // Let the worker go in any case.
        libc::write(started, b"s".as_ptr().cast(), 1);
        loop {
            libc::pause();
        }
    }
}

// ----- A1: queue memory --------------------------------------------------------

#[test]
fn queue_to_a_worker_that_never_reads_holds_at_most_twice_its_limit_in_heap() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    const QUEUE_LIMIT: usize = 4 * MIB;
    let mut config = Config::default();
    config.max_queue_bytes = QUEUE_LIMIT;
    let mut m = Watch::new(config);
    let raw = m.spawn("noread");
    m.wait(raw, |s| matches!(s, Seen::Ready), "hello");

    // Small messages (23 bytes on the wire) until the queue is full.
    let base = reset_peak();
    let mut accepted = 0usize;
    loop {
        match m.r.send_to(raw, "m", &0u8, None).send() {
            Ok(()) => accepted += 1,
            Err(SendError { error: Error::QueueFull, .. }) => break,
            Err(e) => panic!("unexpected refusal after {accepted} sends: {e:?}"),
        }
        if accepted % 4096 == 0 {
            let held = peak() - base;
            assert!(
                held <= 2 * QUEUE_LIMIT as isize,
                "{accepted} small messages accepted and still no QueueFull: the heap grew by {held} bytes \
                 for a queue limit of {QUEUE_LIMIT}; queue_depth {:?}",
                m.r.queue_depth(raw)
            );
            m.r.poll(Some(Duration::ZERO)).expect("poll");
        }
    }
    let held = peak() - base;
    eprintln!(
        "A1: {accepted} messages accepted, heap +{held} B at peak for a {QUEUE_LIMIT} B limit; queue_depth {:?}",
        m.r.queue_depth(raw)
    );
    assert!(held <= 2 * QUEUE_LIMIT as isize, "the heap grew by {held} bytes for a queue limit of {QUEUE_LIMIT}");
    assert!(accepted >= QUEUE_LIMIT / 1024, "only {accepted} small messages fit in {QUEUE_LIMIT} bytes");
    assert!(m.r.is_ready(raw), "{:?}", m.of(raw));

    // The memory goes with the link.
    m.r.kill(raw).unwrap();
    m.exit_of(raw);
    let left = heap() - base;
    assert!(left < MIB as isize, "{left} bytes still held after the worker is gone");
    m.finish(&[]);
}

// ----- A2: replies obey the limit by read backpressure ------------------------

#[test]
fn replies_to_a_worker_that_does_not_read_pause_its_reads_and_none_is_lost() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let mut config = Config::default();
    config.max_queue_bytes = 64 * 1024;
    let mut m = Watch::new(config);
    let handled = Rc::new(Cell::new(0u64));
    let h = handled.clone();
    m.r.on("req", move |_r, msg: Message<Bytes>| {
        let seq = u64::from_le_bytes(msg.payload[..].try_into().expect("an 8-byte payload"));
        h.set(h.get() + 1);
        msg.reply.ok(&(seq, Bytes(vec![0x5a; REPLY_FILL]))).expect("a reply is never refused");
    })
    .unwrap();
    let done = Rc::new(Cell::new(None));
    let d = done.clone();
    m.r.on("done", move |_r, msg: Message<u64>| {
        d.set(Some(msg.payload));
        msg.reply.ok(&msg.payload).unwrap();
    })
    .unwrap();
    let raw = m.spawn("requests");
    m.wait(raw, |s| matches!(s, Seen::Ready), "hello");

    // The worker writes requests for 2.5 s without reading, then reads.
    let base = reset_peak();
    let mut deepest = 0usize;
    let end = Instant::now() + 3 * LIMIT;
    while !m.exited(raw) {
        assert!(Instant::now() < end, "the worker did not finish: {:?}", m.of(raw));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
        if let Some((_, bytes)) = m.r.queue_depth(raw) {
            deepest = deepest.max(bytes);
        }
        let grown = peak() - base;
        assert!(
            grown < 16 * MIB as isize,
            "the heap grew by {grown} bytes for a worker that does not read ({} requests handled, \
             {deepest} bytes queued at most)",
            handled.get()
        );
    }
    let grown = peak() - base;
    eprintln!("A2: {} requests, heap +{grown} B at peak, queue {deepest} B at most", handled.get());
    let status = m.exit_of(raw);
    assert!(status.is_some_and(|s| s.success()), "the worker missed replies (its own checks): {status:?}");
    assert_eq!(done.get(), Some(handled.get()), "every request was handled once");
    assert!(handled.get() >= 1000, "only {} requests: the test did not push hard", handled.get());
    assert!(deepest < 8 * MIB, "{deepest} bytes queued for a limit of 64 KiB");
    let seen = m.of(raw);
    assert!(seen.iter().all(|s| matches!(s, Seen::Ready | Seen::Exited(_))), "{seen:?}");
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.finish(&[]);
}

// ----- A3: namespace frames capped --------------------------------------------

#[test]
fn namespace_frames_past_the_cap_disconnect_while_repeats_cost_nothing() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let mut config = Config::default();
    config.max_namespaces = NAMESPACE_CAP;
    let mut m = Watch::new(config);
    let checked = Rc::new(Cell::new(false));
    let c = checked.clone();
    m.r.on("check", move |_r, msg: Message<()>| {
        c.set(true);
        msg.reply.ok(&()).unwrap();
    })
    .unwrap();
    let normal = m.spawn("echo");
    m.echo(normal, 0);

    // The same name 200,000 times: kept once, no memory, no disconnection,
    // and the echo worker answers all along.
    let base = reset_peak();
    let same = m.spawn("same-ns");
    let start = Instant::now();
    let mut echoes = 0;
    while !checked.get() {
        assert!(start.elapsed() < 3 * LIMIT, "the repeats were not all read: {:?}", m.of(same));
        echoes += 1;
        m.echo(normal, echoes);
    }
    let grown = peak() - base;
    eprintln!("A3: {REPEATS} repeats read in {:?}, heap +{grown} B at peak, {echoes} echoes", start.elapsed());
    assert!(grown < MIB as isize, "the heap grew by {grown} bytes for one namespace repeated");
    assert!(m.r.is_ready(same), "{:?}", m.of(same));
    assert_eq!(m.r.worker_namespaces(same), vec!["same".to_string()]);

    // Distinct names past the cap: a protocol error.
    let many = m.spawn("many-ns");
    m.wait(many, |s| matches!(s, Seen::Protocol(_) | Seen::Exited(_)), "the disconnection");
    assert_eq!(m.protocol_errors(many), vec![ProtocolError::TooManyNamespaces], "{:?}", m.of(many));
    assert!(!m.r.is_ready(many));
    m.echo(normal, 0);
    m.assert_untouched(normal);
    assert_eq!(m.protocol_errors(same), vec![]);
    m.finish(&[same, many]);
}

// ----- A4: the hello obeys the caps -------------------------------------------

#[test]
fn hello_of_sixteen_mib_of_empty_names_is_refused_without_the_memory() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Watch::new(Config::default());
    let normal = m.spawn("echo");
    m.echo(normal, 0);
    let base = reset_peak();
    let raw = m.spawn("big-hello");
    m.wait(raw, |s| matches!(s, Seen::Protocol(_) | Seen::Ready | Seen::Exited(_)), "the hello's fate");
    let (grown, held) = (peak() - base, heap() - base);
    eprintln!("A4: heap +{grown} B at peak, +{held} B after; events {:?}", m.of(raw));
    assert!(held < MIB as isize, "the refused hello still holds {held} bytes");
    // Refused at its length field (only a hello-sized frame is taken before
    // the hello), or by the hello's own cap.
    let errors = m.protocol_errors(raw);
    assert!(
        matches!(errors[..], [ProtocolError::TooLarge { .. }] | [ProtocolError::TooManyNamespaces]),
        "{:?}",
        m.of(raw)
    );
    assert!(!m.r.is_ready(raw));
    assert!(grown < 8 * MIB as isize, "a 16 MiB hello grew the heap by {grown} bytes at peak");
    m.echo(normal, 1);
    m.assert_untouched(normal);
    m.finish(&[raw]);
}

// ----- A5: unclaimed fds bounded ----------------------------------------------

#[test]
fn unclaimed_fds_are_bounded_per_link_and_across_links() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let config = parking_config();
    let total_cap = config.max_received_fds_total;
    assert!(PARKERS * PARKED_EACH > total_cap && PARKED_EACH <= config.max_received_fds);
    let mut m = Watch::new(config);
    let fds_with_messages: Rc<RefCell<Vec<bool>>> = Rc::default();
    let f = fds_with_messages.clone();
    m.r.on("withfd", move |_r, msg: Message<()>| f.borrow_mut().push(msg.fd.is_some())).unwrap();
    let parked: Rc<RefCell<Vec<WorkerId>>> = Rc::default();
    let p = parked.clone();
    m.r.on("parked", move |_r, msg: Message<()>| {
        if let Peer::Worker(id) = msg.from {
            p.borrow_mut().push(id);
        }
        msg.reply.ok(&()).unwrap();
    })
    .unwrap();
    let base = util::open_fds();
    // Beyond the fds parked, each worker costs the master its channel and its pidfd.
    let over = |m: &Watch| util::open_fds() as isize - base as isize - 2 * m.r.workers().len() as isize;
    let innocent = m.spawn("fd-sender");
    m.echo(innocent, 0);

    // Per link: 40 fds waiting for a frame.
    let greedy = m.spawn("fd-over-cap");
    m.wait(greedy, |s| matches!(s, Seen::Protocol(_) | Seen::Exited(_)), "the disconnection");
    assert_eq!(m.protocol_errors(greedy), vec![ProtocolError::TooManyFdsInFlight], "{:?}", m.of(greedy));
    let status = m.exit_of(greedy);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // Across links: parkers, one after the other, each under the per-link cap.
    let mut parkers = Vec::new();
    let mut most = over(&m);
    for _ in 0..PARKERS {
        let id = m.spawn("fd-parker");
        parkers.push(id);
        let end = Instant::now() + LIMIT;
        while !parked.borrow().contains(&id) && !m.has(id, |s| !matches!(s, Seen::Ready)) {
            assert!(Instant::now() < end, "parker {id}: {:?}", m.of(id));
            m.r.poll(Some(Duration::from_millis(10))).expect("poll");
            most = most.max(over(&m));
        }
        // Let any later reads (and evictions) happen.
        for _ in 0..5 {
            m.r.poll(Some(Duration::from_millis(10))).expect("poll");
            most = most.max(over(&m));
        }
    }
    let evicted: Vec<WorkerId> = parkers.iter().copied().filter(|&id| !m.r.is_ready(id)).collect();
    eprintln!("A5: at most {most} fds over the channels, {} of {PARKERS} parkers disconnected", evicted.len());
    assert!(
        most <= total_cap as isize + 8,
        "{most} fds open beyond the channels, for a total cap of {total_cap} unclaimed fds"
    );
    assert!(!evicted.is_empty(), "{} fds parked, and no parker disconnected", PARKERS * PARKED_EACH);
    for &id in &evicted {
        assert_eq!(m.protocol_errors(id), vec![ProtocolError::TooManyFdsInFlight], "parker {id}: {:?}", m.of(id));
    }

    // An innocent worker's fd message still arrives, and a new worker still starts.
    let () = m.r.request(innocent, "sendfd", &(), LIMIT).expect("sendfd");
    assert_eq!(*fds_with_messages.borrow(), vec![true], "the innocent worker's fd");
    m.assert_untouched(innocent);
    let late = m.spawn("echo");
    m.echo(late, 7);
    m.echo(innocent, 8);
    assert!(over(&m) <= total_cap as isize + 8);
    parkers.push(greedy);
    m.finish(&parkers);
}

#[test]
fn parkers_past_the_total_cap_do_not_evict_a_frame_in_transit() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Watch::new(parking_config());
    let started = Rc::new(Cell::new(false));
    let s = started.clone();
    m.r.on("started", move |_r, _msg: Message<()>| s.set(true)).unwrap();
    let arrived: Rc<RefCell<Vec<bool>>> = Rc::default();
    let a = arrived.clone();
    m.r.on("bigfd", move |_r, msg: Message<Bytes>| a.borrow_mut().push(msg.fd.is_some())).unwrap();
    let parked: Rc<RefCell<Vec<WorkerId>>> = Rc::default();
    let p = parked.clone();
    m.r.on("parked", move |_r, msg: Message<()>| {
        if let Peer::Worker(id) = msg.from {
            p.borrow_mut().push(id);
        }
        msg.reply.ok(&()).unwrap();
    })
    .unwrap();
    // The slow frame's fd is the oldest held: parkers come after it.
    let slow = m.spawn("slow-fd-frame");
    let end = Instant::now() + LIMIT;
    while !started.get() {
        assert!(Instant::now() < end, "the slow sender never started: {:?}", m.of(slow));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
    for _ in 0..5 {
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
    let mut parkers = Vec::new();
    for _ in 0..5 {
        let id = m.spawn("fd-parker");
        parkers.push(id);
        let end = Instant::now() + LIMIT;
        while !parked.borrow().contains(&id) && !m.has(id, |s| !matches!(s, Seen::Ready)) {
            assert!(Instant::now() < end, "parker {id}: {:?}", m.of(id));
            m.r.poll(Some(Duration::from_millis(10))).expect("poll");
        }
    }
    m.r.send_to(slow, "finish", &(), None).send().expect("finish");
    let end = Instant::now() + LIMIT;
    while arrived.borrow().is_empty() && !m.has(slow, |s| !matches!(s, Seen::Ready)) {
        assert!(Instant::now() < end, "the slow frame never completed: {:?}", m.of(slow));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
    assert_eq!(*arrived.borrow(), vec![true], "the slow frame and its fd: {:?}", m.of(slow));
    m.assert_untouched(slow);
    let evicted = parkers.iter().filter(|&&id| !m.r.is_ready(id)).count();
    assert!(evicted > 0, "5 parkers of {PARKED_EACH} fds each, and none was disconnected");
    parkers.push(slow);
    m.finish(&parkers);
}

// ----- B7: poll stays bounded after an exit ------------------------------------

/// Kills the grandchild (by pid, as it is not our child) when dropped.
struct KillGrandchild(Rc<Cell<Option<i32>>>);

impl Drop for KillGrandchild {
    fn drop(&mut self) {
        if let Some(pid) = self.0.get() {
            // SAFETY: kill has no memory effects. The grandchild waits to be
            // killed and never exits by itself within the test's time, so the
            // pid is still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn poll_returns_in_time_while_a_grandchild_writes_on_a_dead_workers_channel() {
    let _serial = one_at_a_time();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Watch::new(Config::default());
    let flooded = Rc::new(Cell::new(0u64));
    let f = flooded.clone();
    // Slower than the grandchild writes: the socket never runs dry.
    m.r.on("flood", move |_r, _msg: Message<u64>| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        f.set(f.get() + 1);
    })
    .unwrap();
    let pid = Rc::new(Cell::new(None));
    let kill_grandchild = KillGrandchild(pid.clone());
    let p = pid.clone();
    m.r.on("grandchild", move |_r, msg: Message<u32>| p.set(Some(msg.payload as i32))).unwrap();
    let normal = m.spawn("echo-sink");
    m.echo(normal, 0);
    let dead = m.spawn("forker");

    let echoes: Rc<RefCell<Vec<Result<u64, AckError>>>> = Rc::default();
    let (mut echoes_sent, mut echo_sent_at) = (0u64, Instant::now());
    let sunk: Rc<RefCell<Vec<Result<(), AckError>>>> = Rc::default();
    let mut sink_sent_at = None;
    let mut exit_seen_at = None;
    let mut flood_from = None;
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    loop {
        let t = Instant::now();
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_millis(200),
            "poll(Some(10 ms)) took {took:?}; {} flood frames handled so far; events of the dead worker: {:?}",
            flooded.get(),
            m.of(dead)
        );
        assert!(start.elapsed() < LIMIT, "the dead worker's exit was not reported: {:?}", m.of(dead));
        if pid.get().is_none() {
            continue;
        }
        flood_from.get_or_insert_with(Instant::now);
        // The grandchild writes: keep one echo in flight to the other worker,
        // and one message that is never answered, to time out.
        let answered = echoes.borrow().len() as u64;
        if answered == echoes_sent {
            if let Some(last) = echoes.borrow().last() {
                assert_eq!(*last, Ok(echoes_sent), "echo {echoes_sent}");
            }
            echoes_sent += 1;
            echo_sent_at = Instant::now();
            let e = echoes.clone();
            m.r.send_to(normal, "echo", &echoes_sent, None)
                .within(LIMIT)
                .ackd(move |_r, res: Result<u64, AckError>| e.borrow_mut().push(res))
                .expect("echo sent");
        } else {
            let waited = echo_sent_at.elapsed();
            assert!(waited < Duration::from_secs(2), "echo {echoes_sent} unanswered for {waited:?}");
        }
        if sink_sent_at.is_none() {
            sink_sent_at = Some(Instant::now());
            let s = sunk.clone();
            m.r.send_to(normal, "sink", &(), None)
                .within(Duration::from_millis(300))
                .ackd(move |_r, res: Result<(), AckError>| s.borrow_mut().push(res))
                .expect("sink sent");
        }
        if sunk.borrow().is_empty() {
            let waited = sink_sent_at.map_or(Duration::ZERO, |t| t.elapsed());
            assert!(waited < Duration::from_millis(1500), "a 300 ms ack timeout has not fired after {waited:?}");
        }
        if exit_seen_at.is_none() && m.exited(dead) {
            exit_seen_at = Some(Instant::now());
        }
        let settled = exit_seen_at.is_some_and(|t| t.elapsed() > Duration::from_millis(300));
        if settled && !sunk.borrow().is_empty() && echoes_sent >= 3 {
            break;
        }
    }
    eprintln!(
        "B7: exit reported after {:?}; {} flood frames; slowest poll {slowest:?}; {echoes_sent} echoes",
        exit_seen_at.unwrap() - start,
        flooded.get()
    );
    assert!(flooded.get() > 0, "the grandchild's frames never arrived");
    // Reported while the grandchild still wrote (it writes for 3 s).
    let reported = exit_seen_at.unwrap().saturating_duration_since(flood_from.unwrap());
    assert!(reported < Duration::from_secs(2), "the exit was reported {reported:?} into the flood");
    assert!(m.protocol_errors(dead).is_empty(), "{:?}", m.of(dead));
    assert_eq!(*sunk.borrow(), vec![Err(AckError::Timeout)]);
    let status = m.exit_of(dead);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    m.assert_untouched(normal);
    drop(kill_grandchild);
    m.finish(&[]);
}
