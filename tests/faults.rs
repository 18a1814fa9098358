//! Faults, with real processes over real sockets: peers dying mid-frame, a
//! master vanishing under its workers, signals (EINTR, SIGPIPE), full socket
//! buffers (EAGAIN, partial writes), resets, and descriptors leaking.
//!
//! Every test here takes one global lock: the descriptor count test must not
//! see other tests open and close fds, and this process becomes a child
//! subreaper so it can reap workers orphaned on purpose.
//!
//! Each worker's code stands just above the test that spawns it.

mod util;

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clusterphone::codec::{Kind, FLAG_ACK};
use clusterphone::{AckError, Bytes, Config, Error, Message, ProtocolError, Reactor, Responder, SendError, WorkerId};
use util::events::{echo_worker, on_echo, Ev, Master, Outcomes};
use util::raw::{assert_probe_closed, env, frame, probe, RawPeer};
use util::{alone, deadline, open_fds, poll_until, serve, worker_command, LIMIT};

const REPORT_VAR: &str = "CP_REPORT";
const GRANDCHILD_VAR: &str = "CP_GC_ROLE";
const CHUNK: usize = 64 * 1024;
const CHUNKS: u64 = 128;

fn raw_half_frame_then_sigkill() {
    let mut p = RawPeer::connect();
    p.handshake();
    let f = frame(env(Kind::Message, FLAG_ACK, 0, 1, "_", "echo"), &"half of this frame never arrives");
    p.write(&f[..f.len() / 2]);
    // SAFETY: kill(2) on our own pid; nothing after it runs.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL is not survivable");
}

#[test]
fn half_frame_then_sigkill_fails_the_ack_exactly_once() {
    util::child("echo", echo_worker);
    util::child("raw", raw_half_frame_then_sigkill);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(20));
    let mut m = Master::new(Config::default());
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    let outcomes = m.send_acked::<_, u32>(raw, "ping", &1u32, Duration::from_secs(20));
    m.echo(normal, 1);
    let status = m.wait_exit(raw);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let got = outcomes.borrow().clone();
    assert_eq!(got.len(), 1, "exactly one outcome: {got:?}");
    assert!(
        matches!(&got[0], Err(AckError::Exited(s)) if s.status.and_then(|s| s.signal()) == Some(libc::SIGKILL))
            || got[0] == Err(AckError::Disconnected),
        "{got:?}"
    );
    assert_eq!(m.r.pending_acks(), 0);
    let evs = m.events_of(raw);
    assert!(evs.iter().filter(|e| !matches!(e, Ev::Exited(_))).count() <= 2, "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, Ev::Io(_) | Ev::Other(_))), "{evs:?}");
    // Still serving the other worker; the dead one is gone for good.
    for i in 0..3 {
        m.echo(normal, 10 + i);
    }
    let refused = m.r.send_to(raw, "ping", &2u32, None).send();
    assert!(matches!(refused, Err(SendError { error: Error::UnknownWorker(_), .. })), "{refused:?}");
    m.assert_untouched(normal);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

/// What an orphaned grandchild tells the test: its pid first, then "ok".
struct Report {
    path: PathBuf,
}

impl Report {
    fn start() -> Report {
        let path = PathBuf::from(std::env::var(REPORT_VAR).expect("report path"));
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, std::process::id().to_string()).unwrap();
        std::fs::rename(&tmp, path.with_extension("pid")).unwrap();
        Report { path }
    }

    /// Created by the sigpipe worker once it no longer polls its channel.
    fn armed_path() -> PathBuf {
        PathBuf::from(std::env::var(REPORT_VAR).expect("report path")).with_extension("armed")
    }

    fn ok(self) {
        std::fs::write(&self.path, "ok").unwrap();
    }
}

/// An intermediate master: spawns its own worker, lets it queue acked
/// requests (never answered), then vanishes without any cleanup.
fn intermediate_master() {
    let gc_role = std::env::var(GRANDCHILD_VAR).expect("grandchild role");
    let mut r = Reactor::master().unwrap();
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let h = held.clone();
    r.on("hold", move |_r, m: Message<u32>| h.borrow_mut().push(m.reply)).unwrap();
    let readies = Rc::new(std::cell::Cell::new(0));
    let c = readies.clone();
    r.on("ready", move |_r, m: Message<()>| {
        c.set(c.get() + 1);
        let _ = m.reply.ok(&());
    })
    .unwrap();
    r.spawn(worker_command(&gc_role)).unwrap();
    match gc_role.as_str() {
        "holdreq" => poll_until(&mut r, LIMIT, |_| held.borrow().len() == 3),
        "sigpipe" => {
            poll_until(&mut r, LIMIT, |_| readies.get() == 1);
            r.flush(LIMIT).unwrap();
            // Die only once the worker has stopped polling: were it still in
            // its request, it could read our EOF along with the reply.
            let armed = Report::armed_path();
            let end = Instant::now() + LIMIT;
            while !armed.exists() {
                assert!(Instant::now() < end, "the worker never armed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        other => panic!("no plan for grandchild {other}"),
    }
    // Vanish: no Drop, no dropped responders, no goodbye.
    // SAFETY: kill(2) on our own pid; nothing after it runs.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL is not survivable");
}

/// Makes this process the reaper of orphaned descendants, so a worker whose
/// master vanished is handed to us and can be waited for.
#[track_caller]
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers and only sets a flag.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl: {}", io::Error::last_os_error());
}

/// Waits for an orphaned descendant handed to us; kills it if it outstays `limit`.
#[track_caller]
fn reap(pid: libc::pid_t, limit: Duration) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on one pid with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return ExitStatus::from_raw(status);
        }
        assert!(r == 0, "waitpid({pid}): {} (was the orphan not handed to us?)", io::Error::last_os_error());
        if Instant::now() >= end {
            // SAFETY: as above; the pid is our (adopted) child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the orphaned worker {pid} did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scratch directory, removed when dropped (on panics too).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cp-faults-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs an intermediate master that spawns `gc_role` and then dies by
/// SIGKILL; returns the orphaned grandchild's exit status and report.
#[track_caller]
fn orphaned(gc_role: &str) -> (ExitStatus, String) {
    become_subreaper();
    let dir = TempDir::new(gc_role);
    let report = dir.0.join("report");
    let mut mid =
        worker_command("mid").env(GRANDCHILD_VAR, gc_role).env(REPORT_VAR, &report).spawn().expect("spawn mid");
    let mid_status = mid.wait().unwrap();
    let pid = std::fs::read_to_string(report.with_extension("pid")).ok().and_then(|s| s.trim().parse().ok());
    let Some(pid) = pid else { panic!("the grandchild never started (intermediate master: {mid_status})") };
    let status = reap(pid, LIMIT);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    assert_eq!(mid_status.signal(), Some(libc::SIGKILL), "the intermediate master was to vanish: {mid_status}");
    (status, text)
}

fn held_requests_worker() {
    let report = Report::start();
    let mut r = Reactor::attach().unwrap();
    let results: Rc<RefCell<Vec<Result<(), AckError>>>> = Rc::default();
    for i in 0..3u32 {
        let res = results.clone();
        r.send_to_master("hold", &i, None)
            .within(Duration::from_secs(60))
            .ackd(move |_r, o: Result<(), AckError>| res.borrow_mut().push(o))
            .unwrap();
    }
    let end = Instant::now() + LIMIT;
    let err = loop {
        match r.poll(Some(Duration::from_millis(100))) {
            Ok(()) => assert!(Instant::now() < end, "poll never noticed that the master is gone"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Disconnected), "{err:?}");
    assert_eq!(*results.borrow(), vec![Err(AckError::Disconnected); 3], "each request fails once, as disconnected");
    assert_eq!(r.pending_acks(), 0);
    assert!(matches!(r.poll(Some(Duration::ZERO)), Err(Error::Disconnected)), "the disconnection is sticky");
    let refused = r.send_to_master("hold", &9u32, None).send();
    assert!(matches!(refused, Err(SendError { error: Error::Disconnected, .. })), "{refused:?}");
    report.ok();
}

#[test]
fn master_exit_fails_pending_requests_and_ends_the_workers_poll() {
    util::child("mid", intermediate_master);
    util::child("holdreq", held_requests_worker);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let (status, report) = orphaned("holdreq");
    assert!(status.success(), "the orphaned worker's checks failed: {status}");
    assert_eq!(report, "ok");
}

fn sigpipe_worker() {
    // SAFETY: restoring a signal's default disposition has no memory effects;
    // SIGPIPE's default is to kill the process, which is what must not happen.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let report = Report::start();
    let raw: RawFd = std::env::var(clusterphone::ENV_FD).unwrap().trim().parse().unwrap();
    let mut r = Reactor::attach().unwrap();
    r.request_master::<(), _>("ready", &(), LIMIT).expect("the master answers while it lives");
    std::fs::write(Report::armed_path(), "").unwrap();
    // Wait for the master to vanish without reading the channel, so that the
    // next send really writes into a socket whose peer is gone.
    let end = Instant::now() + LIMIT;
    loop {
        let mut pfd = libc::pollfd { fd: raw, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        assert!(pfd.revents & libc::POLLNVAL == 0, "the channel was closed before the master went away");
        if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
            break;
        }
        assert!(Instant::now() < end, "the master did not go away");
    }
    let err = r.request_master::<(), _>("after", &Bytes(vec![7; 256 * 1024]), LIMIT).unwrap_err();
    assert!(matches!(err, Error::Disconnected | Error::Ack(AckError::Disconnected)), "{err:?}");
    assert!(matches!(r.poll(Some(Duration::ZERO)), Err(Error::Disconnected)));
    report.ok();
}

#[test]
fn sigpipe_is_an_error_not_a_death() {
    util::child("mid", intermediate_master);
    util::child("sigpipe", sigpipe_worker);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let (status, report) = orphaned("sigpipe");
    assert_ne!(status.signal(), Some(libc::SIGPIPE), "the worker died of SIGPIPE");
    assert!(status.success(), "the orphaned worker's checks failed: {status}");
    assert_eq!(report, "ok");
}

static POLL_TID: AtomicI32 = AtomicI32::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_alarm(_sig: libc::c_int) {
    // Async-signal-safe only: raw system calls and atomics; errno preserved.
    // SAFETY: __errno_location returns this thread's errno slot; the calls are
    // plain system calls with integer arguments.
    unsafe {
        let errno = *libc::__errno_location();
        let me = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        let target = POLL_TID.load(Ordering::Relaxed);
        if target != 0 && me != target {
            // A process-directed signal landed on another thread (libtest's
            // main thread, say): pass it on to the thread that polls.
            libc::syscall(libc::SYS_tgkill, libc::getpid(), target, libc::SIGALRM);
        } else {
            HITS.fetch_add(1, Ordering::Relaxed);
        }
        *libc::__errno_location() = errno;
    }
}

fn set_itimer(every: Duration) {
    let tv = libc::timeval { tv_sec: 0, tv_usec: every.as_micros() as libc::suseconds_t };
    let it = libc::itimerval { it_interval: tv, it_value: tv };
    // SAFETY: `it` is a valid itimerval; the old value is not asked for.
    assert_eq!(unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) }, 0);
}

fn eintr_master() {
    // SAFETY: gettid is a plain system call.
    POLL_TID.store(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with an empty mask and our handler is valid;
    // flags are 0 on purpose: no SA_RESTART, so blocking calls fail with EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()), 0);
    }
    let mut r = Reactor::master().unwrap();
    set_itimer(Duration::from_millis(5));
    for _ in 0..3 {
        let hits = HITS.load(Ordering::Relaxed);
        let start = Instant::now();
        let res = r.poll(Some(Duration::from_millis(200)));
        let took = start.elapsed();
        assert!(res.is_ok(), "poll failed under signals: {res:?}");
        assert!(took >= Duration::from_millis(200), "poll returned before its timeout, after {took:?}");
        let got = HITS.load(Ordering::Relaxed) - hits;
        assert!(got >= 5, "only {got} signals reached the polling thread");
    }
    // Real traffic under the same rain of signals.
    let w = r.spawn(worker_command("echo")).unwrap();
    for i in 0..20u64 {
        assert_eq!(r.request::<u64, _>(w, "echo", &i, LIMIT).unwrap(), i);
    }
    r.shutdown(Duration::from_secs(2)).unwrap();
    set_itimer(Duration::ZERO);
}

#[test]
fn poll_retries_eintr_until_its_timeout() {
    util::child("eintr", eintr_master);
    util::child("echo", echo_worker);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    // In a child process, so the signals disturb no other test.
    let status = worker_command("eintr").status().expect("spawn");
    assert!(status.success(), "the EINTR checks failed: {status}");
}

/// 64 KiB of bytes that depend on `i` (xorshift64).
fn pattern(i: u64) -> Vec<u8> {
    let mut s = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(CHUNK);
    while v.len() < CHUNK {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

/// Reads two frames per poll and sleeps between polls.
fn slow_reader() {
    let mut config = Config::default();
    config.frames_per_poll = 2;
    let mut r = Reactor::attach_with(config).unwrap();
    let state = Rc::new(RefCell::new((0u64, 0u64))); // (received, bad)
    let s = state.clone();
    r.on("chunk", move |_r, m: Message<(u64, Bytes)>| {
        let (i, data) = m.payload;
        let mut s = s.borrow_mut();
        if i != s.0 || data.0 != pattern(i) {
            s.1 += 1;
        }
        s.0 += 1;
    })
    .unwrap();
    let s = state.clone();
    r.on("done", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&*s.borrow());
    })
    .unwrap();
    on_echo(&mut r);
    loop {
        match r.poll(Some(Duration::ZERO)) {
            Ok(()) => std::thread::sleep(Duration::from_millis(2)),
            Err(Error::Disconnected) | Err(Error::ExitRequested) => break,
            Err(e) => panic!("slow reader: {e}"),
        }
    }
    let _ = r.flush(Duration::from_secs(2));
}

#[test]
fn slow_reader_gets_every_byte_in_order() {
    util::child("slow", slow_reader);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let w = m.spawn("slow");
    m.echo(w, 1);
    for i in 0..CHUNKS {
        m.r.send_to(w, "chunk", &(i, Bytes(pattern(i))), None).send().unwrap();
    }
    let (frames, bytes) = m.r.queue_depth(w).unwrap();
    assert!(frames > 0 && bytes > 0, "8 MiB went into the socket at once?");
    let (received, bad): (u64, u64) = m.r.request(w, "done", &(), Duration::from_secs(20)).unwrap();
    assert_eq!((received, bad), (CHUNKS, 0), "chunks lost, reordered or corrupted");
    assert!(m.r.stats().bytes_written >= CHUNKS * CHUNK as u64);
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
    assert!(m.events_of(w).iter().all(|e| matches!(e, Ev::Ready | Ev::Exited(_))), "{:?}", m.events_of(w));
}

/// Exits on "die", leaving whatever was sent after it unread.
fn quitter() {
    let mut r = Reactor::attach().unwrap();
    r.on("die", |_r, _m: Message<()>| std::process::exit(0)).unwrap();
    on_echo(&mut r);
    serve(&mut r);
}

#[test]
fn worker_exit_with_data_in_flight_is_a_disconnection() {
    util::child("echo", echo_worker);
    util::child("quitter", quitter);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let normal = m.spawn("echo");
    let w = m.spawn("quitter");
    m.echo(w, 1);
    m.r.send_to(w, "die", &(), None).send().unwrap();
    // Data it will never read: the master's writes hit EPIPE, its reads ECONNRESET.
    let outcomes: Outcomes<()> = Rc::default();
    for i in 0..32u64 {
        let o = outcomes.clone();
        m.r.send_to(w, "chunk", &(i, Bytes(vec![i as u8; CHUNK])), None)
            .within(Duration::from_secs(20))
            .ackd(move |_r, res: Result<(), AckError>| o.borrow_mut().push(res))
            .unwrap();
    }
    let status = m.wait_exit(w);
    assert!(status.success(), "{status}");
    let got = outcomes.borrow().clone();
    assert_eq!(got.len(), 32, "every ack gets exactly one outcome: {got:?}");
    assert!(got.iter().all(|o| matches!(o, Err(AckError::Exited(_)) | Err(AckError::Disconnected))), "{got:?}");
    assert_eq!(m.r.pending_acks(), 0);
    let evs = m.events_of(w);
    assert!(
        !evs.iter().any(|e| matches!(e, Ev::Io(_) | Ev::Protocol(_) | Ev::Other(_))),
        "EPIPE/ECONNRESET must be a plain hangup: {evs:?}"
    );
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.echo(normal, 2);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

fn raw_fds_with_garbage() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    let probes: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| probe()).collect();
    // One fd with a valid message, two with garbage.
    p.send_with_fds(&frame(env(Kind::Message, 0, 1, 0, "_", "take"), &()), &[probes[0].1.as_raw_fd()]);
    p.send_with_fds(b"\x10\0\0\0garbage, not a frame", &[probes[1].1.as_raw_fd(), probes[2].1.as_raw_fd()]);
    let mut keep = Vec::new();
    for (k, give) in probes {
        drop(give);
        keep.push(k);
    }
    p.until_eof();
    // Every copy of the fds we sent is closed, the master's included.
    for k in keep {
        assert_probe_closed(k);
    }
}

#[test]
fn fds_that_came_with_bad_data_are_closed() {
    util::child("raw", raw_fds_with_garbage);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let before = open_fds();
    {
        let mut m = Master::new(Config::default());
        let taken = Rc::new(std::cell::Cell::new(0));
        let t = taken.clone();
        m.r.on("take", move |_r, msg: Message<()>| t.set(t.get() + usize::from(msg.fd.is_some()))).unwrap();
        let raw = m.spawn("raw");
        let status = m.wait_exit(raw);
        assert!(status.success(), "the raw peer's own checks failed: {status}");
        assert_eq!(taken.get(), 1, "the valid message's fd arrived");
        assert_eq!(m.r.stats().protocol_errors, 1);
        assert!(m.events_of(raw).iter().any(|e| matches!(e, Ev::Protocol(ProtocolError::BadMagic(_)))));
        m.r.shutdown(Duration::from_secs(2)).unwrap();
    }
    assert_eq!(open_fds(), before, "the master leaked descriptors");
}

/// Waits for the disconnection of a peer that stays alive, checks it is a
/// plain hangup, then kills the peer.
#[track_caller]
fn expect_hangup_of_live_peer(m: &mut Master, raw: WorkerId, outcomes: &Outcomes<()>) {
    m.wait_event(raw, |e| !matches!(e, Ev::Ready));
    let evs = m.events_of(raw);
    assert!(matches!(&evs[..], [Ev::Ready, Ev::Hangup]), "a peer gone away is a hangup: {evs:?}");
    assert_eq!(*outcomes.borrow(), vec![Err(AckError::Disconnected)], "the pending ack fails exactly once");
    assert_eq!(m.r.pending_acks(), 0);
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.r.kill(raw).unwrap();
    assert_eq!(m.wait_exit(raw).signal(), Some(libc::SIGKILL));
    assert_eq!(*outcomes.borrow(), vec![Err(AckError::Disconnected)]);
}

/// Closes the channel with the master's data still unread (so the master's
/// next read is ECONNRESET), and stays alive until killed.
fn raw_resetter() {
    let mut p = RawPeer::connect();
    p.handshake();
    drop(p);
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn connection_reset_by_a_live_peer_is_a_hangup() {
    util::child("echo", echo_worker);
    util::child("raw", raw_resetter);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    let outcomes = m.send_acked::<_, ()>(raw, "ping", &1u32, Duration::from_secs(20));
    // More than the peer reads before it closes: it leaves data unread.
    for i in 0..32u64 {
        m.r.send_to(raw, "chunk", &(i, Bytes(vec![i as u8; CHUNK])), None).send().unwrap();
    }
    expect_hangup_of_live_peer(&mut m, raw, &outcomes);
    m.echo(normal, 1);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

/// Shuts down its reading side (so the master's next write is EPIPE) while
/// it stays alive and connected for writing.
fn raw_shut_read() {
    let mut p = RawPeer::connect();
    p.exchange_hellos();
    p.sock.shutdown(std::net::Shutdown::Read).unwrap();
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "armed"), &()));
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn broken_pipe_to_a_live_peer_is_a_hangup() {
    util::child("echo", echo_worker);
    util::child("raw", raw_shut_read);
    let _alone = alone();
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let armed = Rc::new(std::cell::Cell::new(false));
    let a = armed.clone();
    m.r.on("armed", move |_r, _m: Message<()>| a.set(true)).unwrap();
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    poll_until(&mut m.r, LIMIT, |_| armed.get());
    // The peer no longer reads: this write fails with EPIPE.
    let outcomes = m.send_acked::<_, ()>(raw, "after", &Bytes(vec![1; 4096]), Duration::from_secs(20));
    expect_hangup_of_live_peer(&mut m, raw, &outcomes);
    m.echo(normal, 1);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}
