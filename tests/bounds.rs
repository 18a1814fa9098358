//! Resource bounds and liveness against workers that misbehave (issue 10,
//! points A1–A5 and B7), each with a real master and real worker processes.
//!
//! Most misbehaving workers are "raw": they never call `Reactor::attach` and
//! write the wire format by hand (see `util::raw`). The master's heap is
//! measured with a counting allocator that also keeps a high-water mark, and
//! its fds in /proc/self/fd. Both are process-wide, so the tests of this
//! binary take turns (`util::alone`): no other test allocates or opens fds
//! while one measures. Each section holds its workers' code, then its tests.

mod util;

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::codec::{Envelope, Kind, FLAG_ACK, PROTOCOL_VERSION};
use clusterphone::{
    AckError, Bytes, Config, Error, Message, Peer, ProtocolError, Reactor, Responder, SendError, WorkerId,
};
use util::alloc::{heap, peak, reset_peak};
use util::events::{echo_worker, on_echo, Ev, Master};
use util::raw::{count_slow_floods, env, flood_batch, frame, never_reads, raw_frame, RawPeer};
use util::{alone, deadline, serve, LIMIT};

// ----- measuring ---------------------------------------------------------------

#[global_allocator]
static ALLOC: util::alloc::Counting = util::alloc::Counting;

const MIB: usize = 1 << 20;

// ----- the raw peers' common end --------------------------------------------

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

// ----- A1: queue memory --------------------------------------------------------

#[test]
fn queue_to_a_worker_that_never_reads_holds_at_most_twice_its_limit_in_heap() {
    util::child("noread", never_reads);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    const QUEUE_LIMIT: usize = 4 * MIB;
    let mut config = Config::default();
    config.max_queue_bytes = QUEUE_LIMIT;
    let mut m = Master::new(config);
    let raw = m.spawn("noread");
    m.wait_event(raw, |s| matches!(s, Ev::Ready));

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
    assert!(m.r.is_ready(raw), "{:?}", m.events_of(raw));

    // The memory goes with the link.
    m.r.kill(raw).unwrap();
    m.exit_of(raw);
    let left = heap() - base;
    assert!(left < MIB as isize, "{left} bytes still held after the worker is gone");
    m.finish(&[]);
}

// ----- A2: replies obey the limit by read backpressure ------------------------

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

#[test]
fn replies_to_a_worker_that_does_not_read_pause_its_reads_and_none_is_lost() {
    util::child("requests", raw_requests_without_reading);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut config = Config::default();
    config.max_queue_bytes = 64 * 1024;
    let mut m = Master::new(config);
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
    m.wait_event(raw, |s| matches!(s, Ev::Ready));

    // The worker writes requests for 2.5 s without reading, then reads.
    let base = reset_peak();
    let mut deepest = 0usize;
    let end = Instant::now() + 3 * LIMIT;
    while !m.events.exited(raw) {
        assert!(Instant::now() < end, "the worker did not finish: {:?}", m.events_of(raw));
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
    let status = m.exit_of(raw).status;
    assert!(status.is_some_and(|s| s.success()), "the worker missed replies (its own checks): {status:?}");
    assert_eq!(done.get(), Some(handled.get()), "every request was handled once");
    assert!(handled.get() >= 1000, "only {} requests: the test did not push hard", handled.get());
    assert!(deepest < 8 * MIB, "{deepest} bytes queued for a limit of 64 KiB");
    let seen = m.events_of(raw);
    assert!(seen.iter().all(|s| matches!(s, Ev::Ready | Ev::Exited(_))), "{seen:?}");
    assert_eq!(m.r.stats().protocol_errors, 0);
    m.finish(&[]);
}

// ----- A3: namespace frames capped --------------------------------------------

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

#[test]
fn namespace_frames_past_the_cap_disconnect_while_repeats_cost_nothing() {
    util::child("echo", echo_worker);
    util::child("same-ns", raw_same_namespace_again_and_again);
    util::child("many-ns", raw_many_namespaces);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut config = Config::default();
    config.max_namespaces = NAMESPACE_CAP;
    let mut m = Master::new(config);
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
        assert!(start.elapsed() < 3 * LIMIT, "the repeats were not all read: {:?}", m.events_of(same));
        echoes += 1;
        m.echo(normal, echoes);
    }
    let grown = peak() - base;
    eprintln!("A3: {REPEATS} repeats read in {:?}, heap +{grown} B at peak, {echoes} echoes", start.elapsed());
    assert!(grown < MIB as isize, "the heap grew by {grown} bytes for one namespace repeated");
    assert!(m.r.is_ready(same), "{:?}", m.events_of(same));
    assert_eq!(m.r.worker_namespaces(same), vec!["same".to_string()]);

    // Distinct names past the cap: a protocol error.
    let many = m.spawn("many-ns");
    m.wait_event(many, |s| matches!(s, Ev::Protocol(_) | Ev::Exited(_)));
    assert_eq!(m.protocol_errors_of(many), vec![ProtocolError::TooManyNamespaces], "{:?}", m.events_of(many));
    assert!(!m.r.is_ready(many));
    m.echo(normal, 0);
    m.assert_untouched(normal);
    assert_eq!(m.protocol_errors_of(same), vec![]);
    m.finish(&[same, many]);
}

// ----- A4: the hello obeys the caps -------------------------------------------

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

#[test]
fn hello_of_sixteen_mib_of_empty_names_is_refused_without_the_memory() {
    util::child("echo", echo_worker);
    util::child("big-hello", raw_big_hello);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Master::new(Config::default());
    let normal = m.spawn("echo");
    m.echo(normal, 0);
    let base = reset_peak();
    let raw = m.spawn("big-hello");
    m.wait_event(raw, |s| matches!(s, Ev::Protocol(_) | Ev::Ready | Ev::Exited(_)));
    let (grown, held) = (peak() - base, heap() - base);
    eprintln!("A4: heap +{grown} B at peak, +{held} B after; events {:?}", m.events_of(raw));
    assert!(held < MIB as isize, "the refused hello still holds {held} bytes");
    // Refused at its length field (only a hello-sized frame is taken before
    // the hello), or by the hello's own cap.
    let errors = m.protocol_errors_of(raw);
    assert!(
        matches!(errors[..], [ProtocolError::TooLarge { .. }] | [ProtocolError::TooManyNamespaces]),
        "{:?}",
        m.events_of(raw)
    );
    assert!(!m.r.is_ready(raw));
    assert!(grown < 8 * MIB as isize, "a 16 MiB hello grew the heap by {grown} bytes at peak");
    m.echo(normal, 1);
    m.assert_untouched(normal);
    m.finish(&[raw]);
}

// ----- A5: unclaimed fds bounded ----------------------------------------------

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

/// A5: the master's side of the parkers: the workers that said `parked`.
fn on_parked(m: &mut Master) -> Rc<RefCell<Vec<WorkerId>>> {
    let parked: Rc<RefCell<Vec<WorkerId>>> = Rc::default();
    let p = parked.clone();
    m.r.on("parked", move |_r, msg: Message<()>| {
        if let Peer::Worker(id) = msg.from {
            p.borrow_mut().push(id);
        }
        msg.reply.ok(&()).unwrap();
    })
    .unwrap();
    parked
}

/// A5: spawns a parker and polls until it said `parked` or something else
/// happened to it, calling `each_turn` after every poll.
#[track_caller]
fn spawn_parker(m: &mut Master, parked: &Rc<RefCell<Vec<WorkerId>>>, mut each_turn: impl FnMut(&Master)) -> WorkerId {
    let id = m.spawn("fd-parker");
    let end = Instant::now() + LIMIT;
    while !parked.borrow().contains(&id) && !m.events.has(id, |s| !matches!(s, Ev::Ready)) {
        assert!(Instant::now() < end, "parker {id}: {:?}", m.events_of(id));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
        each_turn(m);
    }
    id
}

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
        if p.try_send_with_fds(&nop, &fds).is_err() {
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
        if p.try_send_with_fds(piece, &fds).is_err() {
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
    if p.try_send_with_fds(&f[..64], &[null.as_raw_fd()]).is_err() {
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

#[test]
fn unclaimed_fds_are_bounded_per_link_and_across_links() {
    util::child("echo", echo_worker);
    util::child("fd-sender", fd_sender_worker);
    util::child("fd-over-cap", raw_fds_over_the_link_cap);
    util::child("fd-parker", raw_fd_parker);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let config = parking_config();
    let total_cap = config.max_received_fds_total;
    assert!(PARKERS * PARKED_EACH > total_cap && PARKED_EACH <= config.max_received_fds);
    let mut m = Master::new(config);
    let fds_with_messages: Rc<RefCell<Vec<bool>>> = Rc::default();
    let f = fds_with_messages.clone();
    m.r.on("withfd", move |_r, msg: Message<()>| f.borrow_mut().push(msg.fd.is_some())).unwrap();
    let parked = on_parked(&mut m);
    let base = util::open_fds();
    // Beyond the fds parked, each worker costs the master its channel and its pidfd.
    let over = |m: &Master| util::open_fds() as isize - base as isize - 2 * m.r.workers().len() as isize;
    let innocent = m.spawn("fd-sender");
    m.echo(innocent, 0);

    // Per link: 40 fds waiting for a frame.
    let greedy = m.spawn("fd-over-cap");
    m.wait_event(greedy, |s| matches!(s, Ev::Protocol(_) | Ev::Exited(_)));
    assert_eq!(m.protocol_errors_of(greedy), vec![ProtocolError::TooManyFdsInFlight], "{:?}", m.events_of(greedy));
    let status = m.exit_of(greedy).status;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // Across links: parkers, one after the other, each under the per-link cap.
    let mut parkers = Vec::new();
    let mut most = over(&m);
    for _ in 0..PARKERS {
        parkers.push(spawn_parker(&mut m, &parked, |m| most = most.max(over(m))));
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
        assert_eq!(
            m.protocol_errors_of(id),
            vec![ProtocolError::TooManyFdsInFlight],
            "parker {id}: {:?}",
            m.events_of(id)
        );
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
    util::child("slow-fd-frame", raw_slow_fd_frame);
    util::child("fd-parker", raw_fd_parker);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Master::new(parking_config());
    let started = Rc::new(Cell::new(false));
    let s = started.clone();
    m.r.on("started", move |_r, _msg: Message<()>| s.set(true)).unwrap();
    let arrived: Rc<RefCell<Vec<bool>>> = Rc::default();
    let a = arrived.clone();
    m.r.on("bigfd", move |_r, msg: Message<Bytes>| a.borrow_mut().push(msg.fd.is_some())).unwrap();
    let parked = on_parked(&mut m);
    // The slow frame's fd is the oldest held: parkers come after it.
    let slow = m.spawn("slow-fd-frame");
    let end = Instant::now() + LIMIT;
    while !started.get() {
        assert!(Instant::now() < end, "the slow sender never started: {:?}", m.events_of(slow));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
    m.settle();
    let mut parkers = Vec::new();
    for _ in 0..5 {
        parkers.push(spawn_parker(&mut m, &parked, |_| {}));
    }
    m.r.send_to(slow, "finish", &(), None).send().expect("finish");
    let end = Instant::now() + LIMIT;
    while arrived.borrow().is_empty() && !m.events.has(slow, |s| !matches!(s, Ev::Ready)) {
        assert!(Instant::now() < end, "the slow frame never completed: {:?}", m.events_of(slow));
        m.r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
    assert_eq!(*arrived.borrow(), vec![true], "the slow frame and its fd: {:?}", m.events_of(slow));
    m.assert_untouched(slow);
    let evicted = parkers.iter().filter(|&&id| !m.r.is_ready(id)).count();
    assert!(evicted > 0, "5 parkers of {PARKED_EACH} fds each, and none was disconnected");
    parkers.push(slow);
    m.finish(&parkers);
}

// ----- B7: poll stays bounded after an exit ------------------------------------

/// Answers `echo`; takes `sink` messages and never answers them.
fn echo_sink_worker() {
    let mut r = Reactor::attach().expect("attach");
    on_echo(&mut r);
    let kept: Rc<RefCell<Vec<Responder>>> = Rc::default();
    r.on("sink", move |_r, msg: Message<()>| kept.borrow_mut().push(msg.reply)).unwrap();
    serve(&mut r);
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
    let flood = flood_batch();
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
    util::child("echo-sink", echo_sink_worker);
    util::child("forker", raw_forker);
    let _alone = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut m = Master::new(Config::default());
    // Slower than the grandchild writes: the socket never runs dry.
    let flooded = count_slow_floods(&mut m.r);
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
            m.events_of(dead)
        );
        assert!(start.elapsed() < LIMIT, "the dead worker's exit was not reported: {:?}", m.events_of(dead));
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
        if exit_seen_at.is_none() && m.events.exited(dead) {
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
    assert!(m.protocol_errors_of(dead).is_empty(), "{:?}", m.events_of(dead));
    assert_eq!(*sunk.borrow(), vec![Err(AckError::Timeout)]);
    let status = m.exit_of(dead).status;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    m.assert_untouched(normal);
    drop(kill_grandchild);
    m.finish(&[]);
}
