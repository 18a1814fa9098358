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
//! the raw role makes the re-executed test binary exit with 101. Each raw
//! peer's code stands just above the test that spawns it.

mod util;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::codec::{fail, Kind, FLAG_ACK, MAGIC, PROTOCOL_VERSION};
use clusterphone::{AckError, Bytes, Config, Error, Message, ProtocolError, SendError, WorkerId};
use util::events::{echo_worker, Ev, Master};
use util::raw::{
    assert_probe_closed, count_slow_floods, env, flood_batch, frame, never_reads, probe, raw_frame, RawPeer,
};
use util::{deadline, poll_until, LIMIT};

#[global_allocator]
static ALLOC: util::alloc::Counting = util::alloc::Counting;

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM value")
}

/// The whole of a test of one protocol violation: runs raw peer `raw` against
/// a master that also serves a normal worker, and checks everything the
/// master must do.
#[track_caller]
fn violation(raw: fn(), kill_raw: bool, expected: impl Fn(&ProtocolError) -> bool) {
    util::child("echo", echo_worker);
    util::child("raw", raw);
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    // An ack pending on the raw worker (queued until its hello).
    let outcomes = m.send_acked::<_, u32>(raw, "ping", &1u32, Duration::from_secs(20));
    m.echo(normal, 1);

    m.wait_event(raw, |e| matches!(e, Ev::Protocol(_)));
    m.settle();
    assert_eq!(*outcomes.borrow(), vec![Err(AckError::Disconnected)], "the pending ack fails exactly once");
    assert_eq!(m.r.stats().protocol_errors, 1);
    let violations = m.protocol_errors_of(raw);
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

fn raw_garbage() {
    let mut p = RawPeer::connect();
    p.handshake();
    let (keep, give) = probe();
    p.send_with_fds(b"GET / HTTP/1.1\r\nHost: clusterphone\r\n\r\n", &[give.as_raw_fd()]);
    drop(give);
    p.until_eof();
    assert_probe_closed(keep);
}

#[test]
fn garbage_bytes_close_only_that_channel_and_its_fds() {
    violation(raw_garbage, false, |e| matches!(e, ProtocolError::BadMagic(_)));
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

#[test]
fn truncated_frame_then_close_is_reported_as_truncated() {
    violation(raw_truncated, true, |e| matches!(e, ProtocolError::Truncated));
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

#[test]
fn unknown_protocol_version_in_hello() {
    violation(raw_version, false, |e| matches!(e, ProtocolError::Version(99)));
}

fn raw_bad_hello() {
    let mut p = RawPeer::connect();
    p.write(&raw_frame(env(Kind::Hello, 0, 0, 0, "", ""), &[0xff, 0x1c, 0x00]));
    let frames = p.until_eof();
    assert!(frames.is_empty(), "the master answered a broken hello: {frames:?}");
}

#[test]
fn invalid_cbor_in_hello() {
    violation(raw_bad_hello, false, |e| matches!(e, ProtocolError::BadControl(_)));
}

fn raw_before_hello() {
    let mut p = RawPeer::connect();
    p.write(&frame(env(Kind::Message, 0, 0, 0, "_", "echo"), &5u64));
    let frames = p.until_eof();
    assert!(frames.is_empty(), "the master answered a message sent before hello: {frames:?}");
}

#[test]
fn message_before_hello() {
    violation(raw_before_hello, false, |e| matches!(e, ProtocolError::UnexpectedFrame(_)));
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

#[test]
fn huge_length_is_refused_without_allocating_it() {
    violation(
        raw_huge_length,
        false,
        |e| matches!(e, ProtocolError::TooLarge { size, .. } if *size == 0x7fff_ffff + 4),
    );
    // Had the master allocated (and zeroed) the announced 2 GiB, its peak
    // resident size would show it.
    let peak = peak_rss_kib();
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    // Nor reserved it untouched (no test here allocates anything near 64 MiB at once).
    let largest = util::alloc::largest();
    assert!(largest < 64 << 20, "a single allocation of {largest} bytes");
}

fn raw_missing_fd() {
    let mut p = RawPeer::connect();
    p.handshake();
    // The header announces an fd, but a plain write carries none.
    p.write(&frame(env(Kind::Message, 0, 1, 0, "_", "echo"), &5u64));
    p.until_eof();
}

#[test]
fn fd_count_without_an_fd_is_missing_fds() {
    violation(raw_missing_fd, false, |e| matches!(e, ProtocolError::MissingFds));
}

fn raw_bad_seq() {
    let mut p = RawPeer::connect();
    p.handshake();
    let (keep, give) = probe();
    let f = frame(env(Kind::Reply, 0, 1, 999, "", ""), &5u32);
    p.send_with_fds(&f, &[give.as_raw_fd()]);
    drop(give);
    p.until_eof();
    assert_probe_closed(keep);
}

#[test]
fn ack_for_a_sequence_never_issued_closes_the_channel_and_its_fd() {
    violation(raw_bad_seq, false, |e| matches!(e, ProtocolError::UnknownSequence(999)));
}

/// Logs the reason of every message the master could not hand to a handler.
fn record_unhandled(m: &mut Master) -> Rc<RefCell<Vec<AckError>>> {
    let unhandled: Rc<RefCell<Vec<AckError>>> = Rc::default();
    let u = unhandled.clone();
    m.r.on_unhandled(move |_r, info| u.borrow_mut().push(info.reason.clone()));
    unhandled
}

/// Spawns the normal worker ("echo") and the raw peer ("raw"), which answers
/// the ping with 41, runs its own checks and exits; returns (normal, raw).
#[track_caller]
fn run_to_completion(m: &mut Master) -> (WorkerId, WorkerId) {
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    let outcomes = m.send_acked::<_, u32>(raw, "ping", &1u32, LIMIT);
    let status = m.wait_exit(raw);
    assert!(status.success(), "the raw peer's own checks failed: {status}");
    assert_eq!(*outcomes.borrow(), vec![Ok(41)]);
    (normal, raw)
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

#[test]
fn undecodable_payload_to_typed_handler_is_bad_payload_not_a_protocol_error() {
    util::child("echo", echo_worker);
    util::child("raw", raw_bad_payload);
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    let calls: Rc<RefCell<Vec<u64>>> = Rc::default();
    let c = calls.clone();
    m.r.on("typed", move |_r, msg: Message<u64>| {
        c.borrow_mut().push(msg.payload);
        let _ = msg.reply.ok(&(msg.payload + 1));
    })
    .unwrap();
    let unhandled = record_unhandled(&mut m);
    let (normal, raw) = run_to_completion(&mut m);
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

#[test]
fn unknown_command_without_ack_gets_no_reply_at_all() {
    util::child("echo", echo_worker);
    util::child("raw", raw_no_handler);
    let _guard = deadline(Duration::from_secs(25));
    let mut m = Master::new(Config::default());
    m.r.on("typed", |_r, msg: Message<u64>| {
        let _ = msg.reply.ok(&msg.payload);
    })
    .unwrap();
    let unhandled = record_unhandled(&mut m);
    let (normal, _raw) = run_to_completion(&mut m);
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
    util::child("echo", echo_worker);
    util::child("raw", never_reads);
    let _guard = deadline(Duration::from_secs(25));
    let mut config = Config::default();
    config.max_queue_bytes = 256 * 1024;
    let max_queue = config.max_queue_bytes;
    let mut m = Master::new(config);
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
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
    // The limit counts the memory the queue holds (at least the wire bytes).
    assert!(frames > 0 && bytes <= max_queue && bytes >= max_queue / 4, "{frames} frames, {bytes} bytes");

    // A refused fd comes back intact.
    let (keep, give) = UnixStream::pair().unwrap();
    let raw_give = give.as_raw_fd();
    let err = m.r.send_to(raw, "blob", &blob, Some(OwnedFd::from(give))).send().unwrap_err();
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

fn raw_flood() {
    let mut p = RawPeer::connect();
    p.hello(PROTOCOL_VERSION);
    let batch = flood_batch();
    // Valid frames, without end, never reading; stops when the master goes.
    while p.sock.write_all(&batch).is_ok() {}
}

#[test]
fn flooding_peer_does_not_starve_the_others() {
    util::child("echo", echo_worker);
    util::child("raw", raw_flood);
    let _guard = deadline(Duration::from_secs(25));
    let mut config = Config::default();
    config.frames_per_poll = 16;
    let mut m = Master::new(config);
    // Slower to handle than the peer is to write: the flood never runs dry,
    // so only the per-poll frame budget lets anything else through.
    let flooded = count_slow_floods(&mut m.r);
    let normal = m.spawn("echo");
    let raw = m.spawn("raw");
    m.echo(normal, 0);
    let counter = flooded.clone();
    poll_until(&mut m.r, LIMIT, move |_| counter.get() >= 2000);

    // The budget itself: one poll reads a peer at most twice (its event, then its
    // backlog), so it never dispatches more than 2 * frames_per_poll of its frames.
    for _ in 0..200 {
        let before = flooded.get();
        m.r.poll(Some(Duration::ZERO)).unwrap();
        let took = flooded.get() - before;
        assert!(took <= 2 * 16, "one poll dispatched {took} frames from one peer (budget 16)");
    }

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
