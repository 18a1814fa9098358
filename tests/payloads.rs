//! Owned `Bytes` payloads, queued and written without being copied: every
//! size, both directions, mixed with encoded messages and fds while the
//! socket pushes back, and cancelled by a timeout while queued.

mod util;

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Bytes, Config, Error, Message, Reactor};

const SECS: Duration = Duration::from_secs(10);

/// Deterministic content for message `i` of `len` bytes.
fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k as u64).wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) as u8).collect()
}

/// FNV-1a, to compare contents without shipping them back.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The worker the tests here talk to: echoes owned buffers, digests them,
/// sleeps, makes buffers of a size asked for, and sends some back.
fn bytes_worker() {
    let mut r = Reactor::attach().unwrap();
    // Hands the received buffer straight back: no copy on the way out.
    r.on("echo", |_r, m: Message<Bytes>| m.reply.ok(m.payload).unwrap()).unwrap();
    let seen: Rc<RefCell<Vec<(usize, u64)>>> = Rc::default();
    let s = seen.clone();
    r.on("digest", move |_r, m: Message<Bytes>| s.borrow_mut().push((m.payload.len(), digest(&m.payload)))).unwrap();
    r.on("digests", move |_r, m: Message<()>| m.reply.ok(&*seen.borrow()).unwrap()).unwrap();
    // Stops reading for a while.
    r.on("sleep", |_r, m: Message<u64>| std::thread::sleep(Duration::from_millis(m.payload))).unwrap();
    // Replies with an owned buffer of the asked size (maybe over the frame limit).
    r.on("make", |_r, m: Message<usize>| {
        let _ = m.reply.ok(Bytes(vec![1u8; m.payload]));
    })
    .unwrap();
    // Sends `count` owned buffers of `len` bytes from inside a handler (queued, written after it).
    r.on("send-back", |r, m: Message<(u64, usize)>| {
        let (count, len) = m.payload;
        for i in 0..count {
            r.send_to_master("back", Bytes(pattern(i, len)), None).send().unwrap();
        }
        m.reply.ok(&count).unwrap();
    })
    .unwrap();
    util::serve(&mut r);
}

#[test]
fn owned_bytes_arrive_whole_at_every_size() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    // Around the inline threshold (1 KiB) and the CBOR length-header steps.
    for (i, len) in
        [0usize, 1, 23, 24, 255, 256, 1023, 1024, 1025, 65535, 65536, 65537, 1 << 20, 3 << 20].into_iter().enumerate()
    {
        let data = pattern(i as u64, len);
        let back: Bytes = r.request(w, "echo", Bytes(data.clone()), SECS).unwrap();
        assert!(back.0 == data, "owned, {len} bytes");
        // The borrowed form (encoded, not moved) is the same on the wire.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let back: Bytes = r.request(w, "echo", &Bytes(data.clone()), SECS).unwrap();
        assert!(back.0 == data, "borrowed, {len} bytes");
    }
    r.shutdown(SECS).unwrap();
}

#[test]
fn owned_bytes_keep_order_with_encoded_messages_and_fds_when_the_socket_is_full() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    let null = File::open("/dev/null").unwrap();
    let mut expected = Vec::new();
    // ~30 MB queued in one batch: written in many partial sendmsg calls that
    // stop inside frame heads and inside owned tails alike.
    r.batch(|r| {
        for i in 0..200u64 {
            let data = pattern(i, (i as usize * 7919) % 300_000);
            expected.push((data.len(), digest(&data)));
            let fd = (i % 17 == 0).then(|| OwnedFd::from(null.try_clone().unwrap()));
            if i % 10 == 0 {
                r.send_to(w, "digest", &Bytes(data), fd).force_queue().send().unwrap();
            } else {
                r.send_to(w, "digest", Bytes(data), fd).force_queue().send().unwrap();
            }
        }
    });
    let seen: Vec<(usize, u64)> = r.request(w, "digests", &(), SECS).unwrap();
    assert_eq!(seen.len(), expected.len());
    assert!(seen == expected, "contents or order differ");

    // The other way: owned buffers queued by a worker's handler.
    let back: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let b = back.clone();
    r.on("back", move |_r, m: Message<Bytes>| b.borrow_mut().push(m.payload.into_vec())).unwrap();
    let n: u64 = r.request(w, "send-back", &(40u64, 100_000usize), SECS).unwrap();
    util::poll_until(&mut r, SECS, |_| back.borrow().len() == n as usize);
    for (i, got) in back.borrow().iter().enumerate() {
        assert!(*got == pattern(i as u64, 100_000), "message {i} from the worker differs");
    }
    r.shutdown(SECS).unwrap();
}

/// Stays "starting" long enough for a queued message to time out.
fn late_bytes_worker() {
    std::thread::sleep(Duration::from_millis(300));
    bytes_worker();
}

#[test]
fn an_owned_payload_that_times_out_in_the_queue_is_dropped_and_uncounted() {
    util::child("bytes-late", late_bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = r.spawn(util::worker_command("bytes-late")).unwrap();
    let h = r
        .send_to(w, "digest", Bytes(pattern(1, 200_000)), None)
        .within(Duration::from_millis(50))
        .handle::<()>()
        .unwrap();
    let kept = pattern(2, 5000);
    r.send_to(w, "digest", Bytes(kept.clone()), None).send().unwrap();
    let (frames, bytes) = r.queue_depth(w).unwrap();
    assert_eq!(frames, 2);
    assert!(bytes > 205_000, "{bytes} bytes queued");
    util::poll_until(&mut r, SECS, |_| h.is_done());
    assert_eq!(h.take().unwrap().unwrap_err(), AckError::Timeout);
    assert!(!r.is_ready(w), "the worker should still be starting");
    let (_, bytes) = r.queue_depth(w).unwrap();
    assert!(bytes > 5000 && bytes < 6000, "{bytes} bytes still queued");
    util::poll_until(&mut r, SECS, |r| r.is_ready(w));
    let seen: Vec<(usize, u64)> = r.request(w, "digests", &(), SECS).unwrap();
    assert_eq!(seen, vec![(kept.len(), digest(&kept))]);
    r.shutdown(SECS).unwrap();
}

#[test]
fn an_owned_payload_over_the_frame_limit_is_refused() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut config = Config::default();
    config.max_frame = 1 << 20;
    let mut r = Reactor::master_with(config).unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    let e = r.send_to(w, "digest", Bytes(vec![0; 1 << 20]), None).send().unwrap_err();
    assert!(matches!(e.error, Error::FrameTooLarge { .. }), "{:?}", e.error);
    assert_eq!(r.queue_depth(w).unwrap(), (0, 0));
    // Just under the limit goes through.
    let data = pattern(3, (1 << 20) - 64);
    let back: Bytes = r.request(w, "echo", Bytes(data.clone()), SECS).unwrap();
    assert!(back.0 == data);
    r.shutdown(SECS).unwrap();
}

#[test]
fn a_gather_full_of_owned_tails_never_overruns_the_iovec() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    let mut expected = Vec::new();
    // One frame of one slice, then owned frames of two slices each (head and
    // tail), all small: one gather fills 63 slices and must stop before the
    // next frame, which needs two.
    r.batch(|r| {
        for i in 0..100u64 {
            let data = pattern(i, if i == 0 { 100 } else { 1500 });
            expected.push((data.len(), digest(&data)));
            r.send_to(w, "digest", Bytes(data), None).send().unwrap();
        }
    });
    let seen: Vec<(usize, u64)> = r.request(w, "digests", &(), SECS).unwrap();
    assert!(seen == expected, "contents or order differ");
    r.shutdown(SECS).unwrap();
}

#[test]
fn an_owned_payload_that_times_out_half_written_is_finished_not_cut() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    // The worker stops reading: the 8 MiB frame is written in part (the
    // socket holds far less) when its ack times out.
    r.send_to(w, "sleep", &1000u64, None).send().unwrap();
    let data = pattern(5, 8 << 20);
    let h =
        r.send_to(w, "digest", Bytes(data.clone()), None).within(Duration::from_millis(100)).handle::<()>().unwrap();
    util::poll_until(&mut r, SECS, |_| h.is_done());
    assert_eq!(h.take().unwrap().unwrap_err(), AckError::Timeout);
    let (frames, bytes) = r.queue_depth(w).unwrap();
    assert_eq!(frames, 1, "the started frame stays queued");
    assert!(bytes > 0 && bytes < data.len(), "{bytes} bytes still queued");
    // It is finished, whole, and the stream stays in step.
    let seen: Vec<(usize, u64)> = r.request(w, "digests", &(), SECS).unwrap();
    assert_eq!(seen, vec![(data.len(), digest(&data))]);
    assert_eq!(r.queue_depth(w).unwrap(), (0, 0));
    r.shutdown(SECS).unwrap();
}

#[test]
fn an_owned_reply_over_the_frame_limit_becomes_an_error_ack() {
    util::child("bytes", bytes_worker);
    let _d = util::deadline(SECS * 3);
    let mut r = Reactor::master().unwrap();
    let w = util::spawn_ready(&mut r, "bytes");
    // The worker's limit is the default 16 MiB, which the reply's header tips over.
    let max = Config::default().max_frame;
    let e = r.request::<Bytes, _>(w, "make", &max, SECS).unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Remote(ref t)) if t.contains("reply not sent")), "{e:?}");
    // The link is still up and in step.
    let back: Bytes = r.request(w, "make", &(max - 64), SECS).unwrap();
    assert_eq!(back.len(), max - 64);
    r.shutdown(SECS).unwrap();
}
