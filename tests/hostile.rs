//! Misbehaving peers, with real processes over real sockets.
//!
//! A "raw" worker never calls `Reactor::attach`: it takes the channel fd from
//! `CLUSTERPHONE_FD` itself and writes bytes our encoder would never produce.
//! The master must survive every violation, close only that channel, fail
//! only that worker's acks, count the error, close the fds that came with the
//! bad data, and keep serving a second, well-behaved worker.
//!
//! The raw peer checks its own side (frames it reads back, the master closing
//! the channel, fds being closed) and reports by its exit status: a panic in
//! the raw role makes the re-executed test binary exit with 101.

mod util;

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::codec::{self, fail, Decoder, Envelope, Kind, FLAG_ACK, MAGIC, PROTOCOL_VERSION};
use clusterphone::{
    AckError, Bytes, Config, DisconnectReason, Error, Message, ProtocolError, Reactor, SendError, WorkerEvent, WorkerId,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use util::{deadline, poll_until, role, serve, worker_command};

const LIMIT: Duration = Duration::from_secs(10);

// ----- roles (run in re-executed children) ----------------------------------

#[test]
fn worker_entry() {
    let Some(role) = role() else { return };
    util::worker_watchdog();
    match role.as_str() {
        "echo" => echo_worker(),
        "garbage" => raw_garbage(),
        "truncated" => raw_truncated(),
        "version" => raw_version(),
        "badhello" => raw_bad_hello(),
        "beforehello" => raw_before_hello(),
        "badpayload" => raw_bad_payload(),
        "hugelen" => raw_huge_length(),
        "missingfd" => raw_missing_fd(),
        "badseq" => raw_bad_seq(),
        "nohandler" => raw_no_handler(),
        "noread" => raw_never_reads(),
        "flood" => raw_flood(),
        other => panic!("unknown role {other}"),
    }
}

/// The well-behaved worker.
fn echo_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.on("echo", |_r, m: Message<u64>| {
        let _ = m.reply.ok(&m.payload);
    })
    .unwrap();
    serve(&mut r);
}

/// A frame as the raw peer reads it.
#[derive(Debug)]
struct RawFrame {
    kind: Kind,
    flags: u8,
    seq: u64,
    ns: String,
    cmd: String,
    payload: Vec<u8>,
}

impl RawFrame {
    fn decode<T: DeserializeOwned>(&self) -> T {
        ciborium::from_reader(&self.payload[..]).expect("payload decodes")
    }
}

fn env(kind: Kind, flags: u8, nfds: u8, seq: u64, ns: &'static str, cmd: &'static str) -> Envelope<'static> {
    Envelope { kind, flags, nfds, seq, ns, cmd }
}

/// A well-formed frame with a CBOR payload.
fn frame<T: Serialize + ?Sized>(e: Envelope<'_>, payload: &T) -> Vec<u8> {
    let mut v = Vec::new();
    codec::encode(&mut v, e, payload).expect("encode");
    v
}

/// A frame whose payload bytes are taken as they are (not necessarily CBOR).
fn raw_frame(e: Envelope<'_>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    codec::encode_raw(&mut v, e, payload).expect("encode");
    v
}

/// `sendmsg` with `fds` attached as SCM_RIGHTS.
fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) {
    let mut cmsg = [0u64; 8];
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
    assert_eq!(n, data.len() as isize, "sendmsg: {}", io::Error::last_os_error());
}

/// One end of a fresh socketpair to hand to the master, and the end we keep
/// to find out whether every copy of the other was closed.
fn probe() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socketpair")
}

/// Asserts that every copy of the probe's other end has been closed (the
/// master's included): reading our end then sees EOF rather than timing out.
fn assert_probe_closed(keep: UnixStream) {
    keep.set_read_timeout(Some(LIMIT)).unwrap();
    let mut b = [0u8; 1];
    match (&keep).read(&mut b) {
        Ok(0) => {}
        other => panic!("the fd sent with the bad data is still open in the master: {other:?}"),
    }
}

/// The raw peer: the channel socket, without any of the library on top.
struct RawPeer {
    sock: UnixStream,
    decoder: Decoder,
}

impl RawPeer {
    fn connect() -> RawPeer {
        let value = std::env::var(clusterphone::ENV_FD).expect("CLUSTERPHONE_FD is set");
        let raw: RawFd = value.trim().parse().expect("CLUSTERPHONE_FD is a number");
        // SAFETY: the master handed this fd to this process for the channel
        // alone, and this role never calls `Reactor::attach`, so this is its
        // only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(LIMIT)).unwrap();
        RawPeer { sock, decoder: Decoder::new(1 << 24, 16) }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("raw write");
    }

    fn hello(&mut self, version: u32) {
        let hello = frame(env(Kind::Hello, 0, 0, 0, "", ""), &(version, Vec::<String>::new()));
        self.write(&hello);
    }

    /// The next frame; `Ok(None)` at EOF (or reset); `Err` on read timeout.
    fn try_next(&mut self) -> io::Result<Option<RawFrame>> {
        loop {
            if let Some(f) = self.decoder.next_frame().expect("the master sent a bad frame") {
                return Ok(Some(RawFrame {
                    kind: f.kind,
                    flags: f.flags,
                    seq: f.seq,
                    ns: f.ns.to_owned(),
                    cmd: f.cmd.to_owned(),
                    payload: f.payload.to_vec(),
                }));
            }
            let buf = self.decoder.read_buf();
            match self.sock.read(buf) {
                Ok(0) => {
                    assert!(!self.decoder.is_mid_frame(), "the master's stream ended inside a frame");
                    return Ok(None);
                }
                Ok(n) => self.decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn next(&mut self) -> Option<RawFrame> {
        self.try_next().expect("no frame from the master in time")
    }

    fn expect(&mut self, kind: Kind, seq: u64) -> RawFrame {
        let f = self.next().expect("the master closed the channel");
        assert_eq!((f.kind, f.seq), (kind, seq), "unexpected frame {f:?}");
        f
    }

    /// Says hello, reads the master's hello and the acked `ping` it queued
    /// for us; returns the ping's sequence number.
    fn handshake(&mut self) -> u64 {
        self.hello(PROTOCOL_VERSION);
        let h = self.expect(Kind::Hello, 0);
        let (version, _): (u32, Vec<String>) = h.decode();
        assert_eq!(version, PROTOCOL_VERSION);
        let ping = self.next().expect("ping");
        assert_eq!((ping.kind, ping.ns.as_str(), ping.cmd.as_str()), (Kind::Message, "_", "ping"), "{ping:?}");
        assert_eq!(ping.flags & FLAG_ACK, FLAG_ACK);
        assert_eq!(ping.decode::<u32>(), 1);
        ping.seq
    }

    /// Reads until the master closes the channel; returns what came meanwhile.
    fn until_eof(&mut self) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next() {
            frames.push(f);
        }
        frames
    }

    /// Asserts that nothing arrives for `quiet`.
    fn expect_silence(&mut self, quiet: Duration) {
        self.sock.set_read_timeout(Some(quiet)).unwrap();
        match self.try_next() {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("expected silence from the master, got {other:?}"),
        }
        self.sock.set_read_timeout(Some(LIMIT)).unwrap();
    }
}

fn raw_garbage() {
    let mut p = RawPeer::connect();
    p.handshake();
    let (keep, give) = probe();
    send_with_fds(p.sock.as_raw_fd(), b"GET / HTTP/1.1\r\nHost: clusterphone\r\n\r\n", &[give.as_raw_fd()]);
    drop(give);
    p.until_eof();
    assert_probe_closed(keep);
}

fn raw_truncated() {
    let mut p = RawPeer::connect();
    p.handshake();
    let f = frame(env(Kind::Message, FLAG_ACK, 0, 1, "_", "echo"), &"a payload that is cut in two");
    p.write(&f[..f.len() / 2]);
    drop(p);
    // Stay alive with the channel closed: the master must report the
    // disconnection itself (it kills us afterwards).
    std::thread::sleep(Duration::from_secs(30));
}

fn raw_version() {
    let mut p = RawPeer::connect();
    p.hello(99);
    let frames = p.until_eof();
    let first = frames.first().expect("the master answers with its own hello before closing");
    assert_eq!(first.kind, Kind::Hello);
    let (version, _): (u32, Vec<String>) = first.decode();
    assert_eq!(version, PROTOCOL_VERSION);
    let user: Vec<_> = frames.iter().filter(|f| f.kind == Kind::Message).collect();
    assert!(user.is_empty(), "the master sent user messages to a peer of another protocol version: {user:?}");
}

fn raw_bad_hello() {
    let mut p = RawPeer::connect();
    p.write(&raw_frame(env(Kind::Hello, 0, 0, 0, "", ""), &[0xff, 0x1c, 0x00]));
    let frames = p.until_eof();
    assert!(frames.is_empty(), "the master answered a broken hello: {frames:?}");
}

fn raw_before_hello() {
    let mut p = RawPeer::connect();
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "echo"), &5u64));
    let frames = p.until_eof();
    assert!(frames.is_empty(), "the master answered a message sent before hello: {frames:?}");
}

fn raw_bad_payload() {
    let mut p = RawPeer::connect();
    let ping = p.handshake();
    p.write(&frame(env(Kind::Reply, 0, 0, ping, "", ""), &41u32));
    // Not CBOR at all, then CBOR cut short: the typed handler cannot decode either.
    for (seq, bytes) in [(1u64, &[0xffu8][..]), (2, &[0x1a, 0x00][..])] {
        p.write(&raw_frame(env(Kind::Message, FLAG_ACK, 0, seq, "_", "typed"), bytes));
        let f = p.expect(Kind::Fail, seq);
        let (code, text): (u8, String) = f.decode();
        assert_eq!(code, fail::BAD_PAYLOAD, "{text}");
    }
    // The channel is still up: a good message to the same handler is answered.
    p.write(&frame(env(Kind::Message, FLAG_ACK, 0, 3, "_", "typed"), &7u64));
    let f = p.expect(Kind::Reply, 3);
    assert_eq!(f.decode::<u64>(), 8);
}

fn raw_huge_length() {
    let mut p = RawPeer::connect();
    p.handshake();
    let mut bytes = vec![0xff, 0xff, 0xff, 0x7f, MAGIC, Kind::Message as u8, 0, 0];
    bytes.extend_from_slice(&[0; 12]);
    bytes.extend_from_slice(&[0x5a; 4096]);
    p.write(&bytes);
    p.until_eof();
}

fn raw_missing_fd() {
    let mut p = RawPeer::connect();
    p.handshake();
    // The header announces an fd, but a plain write carries none.
    p.write(&frame(env(Kind::Message, 0, 1, 0, "_", "echo"), &5u64));
    p.until_eof();
}

fn raw_bad_seq() {
    let mut p = RawPeer::connect();
    p.handshake();
    let (keep, give) = probe();
    let f = frame(env(Kind::Reply, 0, 1, 999, "", ""), &5u32);
    send_with_fds(p.sock.as_raw_fd(), &f, &[give.as_raw_fd()]);
    drop(give);
    p.until_eof();
    assert_probe_closed(keep);
}

fn raw_no_handler() {
    let mut p = RawPeer::connect();
    let ping = p.handshake();
    p.write(&frame(env(Kind::Reply, 0, 0, ping, "", ""), &41u32));
    // No ack asked: no reply of any kind may come back.
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "nope"), &()));
    p.write(&frame(env(Kind::Message, 0, 0, 0, "zz", "nope"), &()));
    p.write(&raw_frame(env(Kind::Message, 0, 0, 0, "_", "typed"), &[0xff]));
    p.expect_silence(Duration::from_millis(300));
    // Ack asked (even with sequence 0): exactly one failure each, nothing more.
    p.write(&frame(env(Kind::Message, FLAG_ACK, 0, 0, "_", "nope"), &()));
    let (code, _): (u8, String) = p.expect(Kind::Fail, 0).decode();
    assert_eq!(code, fail::NO_HANDLER);
    p.write(&frame(env(Kind::Message, FLAG_ACK, 0, 9, "zz", "nope"), &()));
    let (code, _): (u8, String) = p.expect(Kind::Fail, 9).decode();
    assert_eq!(code, fail::UNKNOWN_NAMESPACE);
    p.expect_silence(Duration::from_millis(300));
}

fn raw_never_reads() {
    let p = RawPeer::connect();
    let mut sock = &p.sock;
    sock.write_all(&frame(env(Kind::Hello, 0, 0, 0, "", ""), &(PROTOCOL_VERSION, Vec::<String>::new()))).unwrap();
    // Never read; just wait (without consuming anything) for the master to go.
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

fn raw_flood() {
    let mut p = RawPeer::connect();
    p.hello(PROTOCOL_VERSION);
    let mut batch = Vec::new();
    for i in 0..256u64 {
        batch.extend(frame(env(Kind::Message, 0, 0, 0, "_", "flood"), &i));
    }
    // Valid frames, without end, never reading; stops when the master goes.
    while p.sock.write_all(&batch).is_ok() {}
}

// ----- the master's side -----------------------------------------------------

/// A worker event, recorded.
#[derive(Debug, Clone)]
#[allow(dead_code)] // The texts are read through `Debug`.
enum Ev {
    Ready,
    Protocol(ProtocolError),
    Hangup,
    Io(String),
    Exited(ExitStatus),
    Other(String),
}

struct Master {
    r: Reactor,
    events: Rc<RefCell<Vec<(WorkerId, Ev)>>>,
}

impl Master {
    fn new(config: Config) -> Master {
        let mut r = Reactor::master_with(config).expect("master");
        let events: Rc<RefCell<Vec<(WorkerId, Ev)>>> = Rc::default();
        let log = events.clone();
        r.on_worker_event(move |_r, id, e| {
            let ev = match e {
                WorkerEvent::Ready => Ev::Ready,
                WorkerEvent::Disconnected(DisconnectReason::Protocol(p)) => Ev::Protocol(p.clone()),
                WorkerEvent::Disconnected(DisconnectReason::Hangup) => Ev::Hangup,
                WorkerEvent::Disconnected(DisconnectReason::Io(e)) => Ev::Io(e.to_string()),
                WorkerEvent::Exited(s) => Ev::Exited(*s),
                other => Ev::Other(format!("{other:?}")),
            };
            log.borrow_mut().push((id, ev));
        });
        Master { r, events }
    }

    fn events_of(&self, w: WorkerId) -> Vec<Ev> {
        self.events.borrow().iter().filter(|(id, _)| *id == w).map(|(_, e)| e.clone()).collect()
    }

    fn wait_event(&mut self, w: WorkerId, what: impl Fn(&Ev) -> bool) {
        let events = self.events.clone();
        poll_until(&mut self.r, LIMIT, move |_| events.borrow().iter().any(|(id, e)| *id == w && what(e)));
    }

    fn wait_exit(&mut self, w: WorkerId) -> ExitStatus {
        self.wait_event(w, |e| matches!(e, Ev::Exited(_)));
        let exits: Vec<ExitStatus> =
            self.events_of(w).into_iter().filter_map(|e| if let Ev::Exited(s) = e { Some(s) } else { None }).collect();
        assert_eq!(exits.len(), 1, "one exit per worker");
        exits[0]
    }

    /// A few more turns, to let any duplicate outcome or event show up.
    fn settle(&mut self) {
        for _ in 0..5 {
            self.r.poll(Some(Duration::from_millis(10))).expect("poll");
        }
    }

    fn echo(&mut self, w: WorkerId, n: u64) {
        let got: u64 = self.r.request(w, "echo", &n, LIMIT).expect("the normal worker answers");
        assert_eq!(got, n);
    }

    /// The normal worker saw nothing but its own start.
    fn assert_untouched(&self, w: WorkerId) {
        let evs = self.events_of(w);
        assert!(evs.iter().all(|e| matches!(e, Ev::Ready)), "the normal worker was disturbed: {evs:?}");
    }
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM value")
}

type Outcomes<T> = Rc<RefCell<Vec<Result<T, AckError>>>>;

/// Runs one protocol violation by raw role `role` against a master that also
/// serves a normal worker, and checks everything the master must do.
fn violation(role: &str, kill_raw: bool, expected: impl Fn(&ProtocolError) -> bool) {
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let normal = m.r.spawn(worker_command("echo")).unwrap();
    let raw = m.r.spawn(worker_command(role)).unwrap();
    // An ack pending on the raw worker (queued until its hello).
    let outcomes: Outcomes<u32> = Rc::default();
    let o = outcomes.clone();
    m.r.send_to(raw, "ping", &1u32, None)
        .within(Duration::from_secs(20))
        .ackd(move |_r, res: Result<u32, AckError>| o.borrow_mut().push(res))
        .unwrap();
    m.echo(normal, 1);

    m.wait_event(raw, |e| matches!(e, Ev::Protocol(_)));
    m.settle();
    assert_eq!(*outcomes.borrow(), vec![Err(AckError::Disconnected)], "the pending ack fails exactly once");
    assert_eq!(m.r.stats().protocol_errors, 1);
    let violations: Vec<ProtocolError> =
        m.events_of(raw).into_iter().filter_map(|e| if let Ev::Protocol(p) = e { Some(p) } else { None }).collect();
    assert_eq!(violations.len(), 1, "{:?}", m.events_of(raw));
    assert!(expected(&violations[0]), "unexpected protocol error {:?}", violations[0]);
    assert!(!m.r.is_ready(raw));
    let refused = m.r.send_to(raw, "ping", &2u32, None).send();
    assert!(matches!(refused, Err(SendError { error: Error::UnknownWorker(_), .. })), "{refused:?}");

    // The other worker is unaffected.
    for i in 0..3 {
        m.echo(normal, 10 + i);
    }
    m.assert_untouched(normal);

    if kill_raw {
        m.r.kill(raw).unwrap();
    }
    let status = m.wait_exit(raw);
    if kill_raw {
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    } else {
        assert!(status.success(), "the raw peer's own checks failed: {status}");
    }
    assert_eq!(m.r.pending_acks(), 0);
    assert_eq!(m.r.stats().protocol_errors, 1);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

#[test]
fn garbage_bytes_close_only_that_channel_and_its_fds() {
    violation("garbage", false, |e| matches!(e, ProtocolError::BadMagic(_)));
}

#[test]
fn truncated_frame_then_close_is_reported_as_truncated() {
    violation("truncated", true, |e| matches!(e, ProtocolError::Truncated));
}

#[test]
fn unknown_protocol_version_in_hello() {
    violation("version", false, |e| matches!(e, ProtocolError::Version(99)));
}

#[test]
fn invalid_cbor_in_hello() {
    violation("badhello", false, |e| matches!(e, ProtocolError::BadControl(_)));
}

#[test]
fn message_before_hello() {
    violation("beforehello", false, |e| matches!(e, ProtocolError::UnexpectedFrame(_)));
}

#[test]
fn huge_length_is_refused_without_allocating_it() {
    violation("hugelen", false, |e| matches!(e, ProtocolError::TooLarge { size, .. } if *size == 0x7fff_ffff + 4));
    // Had the master allocated (and zeroed) the announced 2 GiB, its peak
    // resident size would show it.
    let peak = peak_rss_kib();
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn fd_count_without_an_fd_is_missing_fds() {
    violation("missingfd", false, |e| matches!(e, ProtocolError::MissingFds));
}

#[test]
fn ack_for_a_sequence_never_issued_closes_the_channel_and_its_fd() {
    violation("badseq", false, |e| matches!(e, ProtocolError::UnknownSequence(999)));
}

#[test]
fn undecodable_payload_to_typed_handler_is_bad_payload_not_a_protocol_error() {
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let calls: Rc<RefCell<Vec<u64>>> = Rc::default();
    let c = calls.clone();
    m.r.on("typed", move |_r, msg: Message<u64>| {
        c.borrow_mut().push(msg.payload);
        let _ = msg.reply.ok(&(msg.payload + 1));
    })
    .unwrap();
    let unhandled: Rc<RefCell<Vec<AckError>>> = Rc::default();
    let u = unhandled.clone();
    m.r.on_unhandled(move |_r, info| u.borrow_mut().push(info.reason.clone()));
    let normal = m.r.spawn(worker_command("echo")).unwrap();
    let raw = m.r.spawn(worker_command("badpayload")).unwrap();
    let outcomes: Outcomes<u32> = Rc::default();
    let o = outcomes.clone();
    m.r.send_to(raw, "ping", &1u32, None).ackd(move |_r, res: Result<u32, AckError>| o.borrow_mut().push(res)).unwrap();

    let status = m.wait_exit(raw);
    assert!(status.success(), "the raw peer's own checks failed: {status}");
    assert_eq!(*outcomes.borrow(), vec![Ok(41)]);
    assert_eq!(*calls.borrow(), vec![7], "the handler runs only for the payload that decodes");
    let reasons = unhandled.borrow().clone();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().all(|r| matches!(r, AckError::BadPayload(_))), "{reasons:?}");
    assert_eq!(m.r.stats().protocol_errors, 0);
    let evs = m.events_of(raw);
    assert!(!evs.iter().any(|e| matches!(e, Ev::Protocol(_) | Ev::Io(_) | Ev::Other(_))), "{evs:?}");
    m.echo(normal, 3);
    m.assert_untouched(normal);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

#[test]
fn unknown_command_without_ack_gets_no_reply_at_all() {
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    m.r.on("typed", |_r, msg: Message<u64>| {
        let _ = msg.reply.ok(&msg.payload);
    })
    .unwrap();
    let unhandled: Rc<RefCell<Vec<AckError>>> = Rc::default();
    let u = unhandled.clone();
    m.r.on_unhandled(move |_r, info| u.borrow_mut().push(info.reason.clone()));
    let normal = m.r.spawn(worker_command("echo")).unwrap();
    let raw = m.r.spawn(worker_command("nohandler")).unwrap();
    let outcomes: Outcomes<u32> = Rc::default();
    let o = outcomes.clone();
    m.r.send_to(raw, "ping", &1u32, None).ackd(move |_r, res: Result<u32, AckError>| o.borrow_mut().push(res)).unwrap();

    let status = m.wait_exit(raw);
    assert!(status.success(), "the raw peer's own checks failed: {status}");
    assert_eq!(*outcomes.borrow(), vec![Ok(41)]);
    let reasons = unhandled.borrow().clone();
    assert!(
        matches!(
            &reasons[..],
            [
                AckError::NoHandler,
                AckError::UnknownNamespace,
                AckError::BadPayload(_),
                AckError::NoHandler,
                AckError::UnknownNamespace
            ]
        ),
        "{reasons:?}"
    );
    let stats = m.r.stats();
    assert_eq!(stats.unhandled, 5);
    assert_eq!(stats.acks_sent, 2, "only the two messages that asked for an ack are answered");
    assert_eq!(stats.protocol_errors, 0);
    m.echo(normal, 4);
    m.assert_untouched(normal);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

#[test]
fn peer_that_never_reads_fills_the_queue_not_the_master() {
    let _guard = deadline(Duration::from_secs(25));
    let mut config = Config::default();
    config.max_queue_bytes = 256 * 1024;
    let max_queue = config.max_queue_bytes;
    let mut m = Master::new(config);
    let normal = m.r.spawn(worker_command("echo")).unwrap();
    let raw = m.r.spawn(worker_command("noread")).unwrap();
    m.wait_event(raw, |e| matches!(e, Ev::Ready));

    let blob = Bytes(vec![0xa5; 16 * 1024]);
    let mut sent = 0;
    let full = loop {
        assert!(sent < 2000, "{} KiB accepted for a peer that never reads", sent * 16);
        match m.r.send_to(raw, "blob", &blob, None).send() {
            Ok(()) => sent += 1,
            Err(SendError { error: Error::QueueFull, fd: None }) => break true,
            Err(e) => panic!("unexpected refusal: {e:?}"),
        }
        m.r.poll(Some(Duration::ZERO)).unwrap();
    };
    assert!(full);
    let (frames, bytes) = m.r.queue_depth(raw).expect("still connected");
    assert!(frames > 0 && bytes >= max_queue && bytes < max_queue + 2 * blob.len(), "{frames} frames, {bytes} bytes");

    // A refused fd comes back intact.
    let (keep, give) = UnixStream::pair().unwrap();
    let raw_give = give.as_raw_fd();
    let err = m.r.send_to(raw, "blob", &(), Some(OwnedFd::from(give))).send().unwrap_err();
    assert!(matches!(err.error, Error::QueueFull), "{err:?}");
    let back = UnixStream::from(err.into_fd().expect("the fd is handed back"));
    assert_eq!(back.as_raw_fd(), raw_give);
    (&back).write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    (&keep).read_exact(&mut b).unwrap();
    // A refused acked send never calls its callback.
    let called = Rc::new(Cell::new(0));
    let c = called.clone();
    let refused = m.r.send_to(raw, "blob", &blob, None).ackd(move |_r, _res: Result<(), AckError>| c.set(c.get() + 1));
    assert!(matches!(refused, Err(SendError { error: Error::QueueFull, .. })));

    // The master stays responsive to the other worker.
    for i in 0..5 {
        m.echo(normal, i);
    }
    assert!(m.r.is_ready(raw));
    assert_eq!(called.get(), 0);
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.assert_untouched(normal);

    m.r.kill(raw).unwrap();
    let status = m.wait_exit(raw);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(m.r.queue_depth(raw), None);
    assert_eq!(called.get(), 0);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}

#[test]
fn flooding_peer_does_not_starve_the_others() {
    let _guard = deadline(Duration::from_secs(25));
    let mut config = Config::default();
    config.frames_per_poll = 16;
    let mut m = Master::new(config);
    let flooded = Rc::new(Cell::new(0u64));
    let f = flooded.clone();
    // Slower to handle than the peer is to write: the flood never runs dry,
    // so only the per-poll frame budget lets anything else through.
    m.r.on("flood", move |_r, _msg: Message<u64>| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        f.set(f.get() + 1);
    })
    .unwrap();
    let normal = m.r.spawn(worker_command("echo")).unwrap();
    let raw = m.r.spawn(worker_command("flood")).unwrap();
    m.echo(normal, 0);
    let counter = flooded.clone();
    poll_until(&mut m.r, LIMIT, move |_| counter.get() >= 2000);

    // Requests to the normal worker complete while the flood goes on.
    let before = flooded.get();
    for i in 0..20u64 {
        let got: u64 = m.r.request(normal, "echo", &i, Duration::from_secs(5)).expect("starved by the flood");
        assert_eq!(got, i);
    }
    let during = flooded.get() - before;
    assert!(during > 0, "the flood stopped being read");
    assert!(m.r.is_ready(raw), "the flooding peer was dropped: {:?}", m.events_of(raw));
    assert!(!m.events_of(raw).iter().any(|e| matches!(e, Ev::Exited(_))), "the flood ended early");
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.assert_untouched(normal);
    let peak = peak_rss_kib();
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB under a flood");

    m.r.kill(raw).unwrap();
    m.wait_exit(raw);
    m.echo(normal, 99);
    m.r.shutdown(Duration::from_secs(2)).unwrap();
}
