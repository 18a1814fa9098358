//! Soak: 16 workers, ~200,000 acked messages both ways, payloads up to 64 KiB,
//! random fds, random kills and respawns. Checks exactly-once ack outcomes,
//! per-connection order, fd hygiene and the master's heap.

mod util;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Bytes, Message, Peer, Reactor, WorkerId};
use util::alloc::heap;

/// Counts live heap bytes, so the master's heap can be compared before and after.
#[global_allocator]
static ALLOC: util::alloc::Counting = util::alloc::Counting;

const WORKERS: usize = 16;
const TO_WORKERS: usize = 100_000;
const WINDOW: usize = 24;

/// xorshift64*: deterministic randomness, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn payload(rng: &mut Rng) -> Bytes {
    let len = match rng.below(1000) {
        0..=4 => 64 * 1024,
        5..=49 => rng.below(8192) as usize,
        _ => rng.below(64) as usize,
    };
    Bytes(vec![(len % 251) as u8; len])
}

fn maybe_fd(rng: &mut Rng) -> Option<OwnedFd> {
    (rng.below(16) == 0).then(|| OwnedFd::from(File::open("/dev/null").unwrap()))
}

/// Answers each `m` (checking its order and content) after sending the master
/// an acked `w` of its own; `report` tells what it sent and how that went.
fn soak_worker() {
    let mut r = Reactor::attach().unwrap();
    let state = Rc::new(RefCell::new((0u64, 0u64, 0u64, 0u64))); // expected, sent, ok, failed
    let mut rng = Rng(std::process::id() as u64 | 1);
    let st = state.clone();
    r.on("m", move |r, msg: Message<(u64, Bytes)>| {
        let (seq, body) = msg.payload;
        let expected = st.borrow().0;
        let intact = body.iter().all(|&b| b == (body.len() % 251) as u8);
        if seq != expected || !intact {
            msg.reply.err(format!("order or content: expected {expected}, got {seq}"));
            return;
        }
        st.borrow_mut().0 += 1;
        // One acked message back per message received, sent before our reply.
        let my_seq = st.borrow().1;
        let st2 = st.clone();
        let sent = r
            .send_to_master("w", &(my_seq, payload(&mut rng)), maybe_fd(&mut rng))
            .within(Duration::from_secs(30))
            .ackd(move |_r, res: Result<u64, AckError>| match res {
                Ok(n) if n == my_seq => st2.borrow_mut().2 += 1,
                _ => st2.borrow_mut().3 += 1,
            });
        if sent.is_ok() {
            st.borrow_mut().1 += 1;
        }
        msg.reply.ok(&seq).unwrap();
    })
    .unwrap();
    let st = state.clone();
    r.on("report", move |_r, msg: Message<()>| {
        let s = *st.borrow();
        msg.reply.ok(&(s.1, s.2, s.3)).unwrap();
    })
    .unwrap();
    util::serve(&mut r);
}

struct Live {
    next_seq: u64,
    outstanding: usize,
    from_worker_expected: u64,
}

#[test]
fn soak_sixteen_workers_with_kills_and_fds() {
    util::child("soak", soak_worker);
    let _d = util::deadline(Duration::from_secs(150));
    let fds_before = util::open_fds();
    let heap_before = heap();
    {
        let mut r = Reactor::master().unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // outcome per message: 0 pending, 1 ok, 2 exited/disconnected, 3 other; count of resolutions.
        let outcomes: Rc<RefCell<Vec<(u8, u8)>>> = Rc::new(RefCell::new(vec![(0, 0); TO_WORKERS]));
        let live: Rc<RefCell<HashMap<WorkerId, Live>>> = Rc::default();
        let killed: Rc<RefCell<Vec<WorkerId>>> = Rc::default();
        let order_errors: Rc<RefCell<Vec<String>>> = Rc::default();
        let from_workers = Rc::new(RefCell::new(0u64));

        let (lv, oe, fw) = (live.clone(), order_errors.clone(), from_workers.clone());
        r.on("w", move |_r, msg: Message<(u64, Bytes)>| {
            let Peer::Worker(id) = msg.from else { return };
            let (seq, body) = msg.payload;
            if let Some(l) = lv.borrow_mut().get_mut(&id) {
                if seq != l.from_worker_expected || body.iter().any(|&b| b != (body.len() % 251) as u8) {
                    oe.borrow_mut().push(format!("{id}: expected {}, got {seq}", l.from_worker_expected));
                }
                l.from_worker_expected = seq + 1;
            }
            *fw.borrow_mut() += 1;
            msg.reply.ok(&seq).unwrap();
        })
        .unwrap();

        let spawn = |r: &mut Reactor, live: &Rc<RefCell<HashMap<WorkerId, Live>>>| {
            let id = r.spawn(util::worker_command("soak")).unwrap();
            live.borrow_mut().insert(id, Live { next_seq: 0, outstanding: 0, from_worker_expected: 0 });
        };
        let heap_start = heap();
        for _ in 0..WORKERS {
            spawn(&mut r, &live);
        }
        let mut sent = 0usize;
        // The worker each message went to, by index.
        let mut target: Vec<WorkerId> = Vec::with_capacity(TO_WORKERS);
        let mut kills = 0;
        let mut next_kill = 3000;
        while outcomes.borrow().iter().any(|o| o.1 == 0) {
            let ids: Vec<WorkerId> = live.borrow().keys().copied().collect();
            for id in ids {
                // fds only once the worker is ready: the not-ready rule refuses them before.
                while sent < TO_WORKERS && live.borrow()[&id].outstanding < WINDOW {
                    let index = sent;
                    let seq = live.borrow()[&id].next_seq;
                    let fd = if r.is_ready(id) { maybe_fd(&mut rng) } else { None };
                    let (o, lv) = (outcomes.clone(), live.clone());
                    let result = r
                        .send_to(id, "m", &(seq, payload(&mut rng)), fd)
                        .within(Duration::from_secs(30))
                        .ackd(move |_r, res: Result<u64, AckError>| {
                            let mut o = o.borrow_mut();
                            o[index].1 += 1;
                            o[index].0 = match res {
                                Ok(n) if n == seq => 1,
                                Err(AckError::Exited(_)) | Err(AckError::Disconnected) => 2,
                                other => {
                                    eprintln!("message {index} to {id}: {other:?}");
                                    3
                                }
                            };
                            if let Some(l) = lv.borrow_mut().get_mut(&id) {
                                l.outstanding -= 1;
                            }
                        });
                    result.unwrap();
                    target.push(id);
                    let mut lv = live.borrow_mut();
                    let l = lv.get_mut(&id).unwrap();
                    l.next_seq += 1;
                    l.outstanding += 1;
                    sent += 1;
                }
            }
            // Now and then (with messages in flight), kill a random worker and start another.
            if sent < TO_WORKERS * 9 / 10 && sent >= next_kill {
                next_kill = sent + 4000 + rng.below(8000) as usize;
                let ids: Vec<WorkerId> = live.borrow().keys().copied().collect();
                let victim = ids[rng.below(ids.len() as u64) as usize];
                r.kill(victim).unwrap();
                live.borrow_mut().remove(&victim);
                killed.borrow_mut().push(victim);
                kills += 1;
                spawn(&mut r, &live);
            }
            r.poll(Some(Duration::from_millis(5))).unwrap();
        }
        // Every message resolved exactly once; messages to surviving workers all succeeded.
        let outcomes = outcomes.borrow();
        assert!(outcomes.iter().all(|o| o.1 == 1), "an ack resolved twice or never");
        assert_eq!(outcomes.iter().filter(|o| o.0 == 3).count(), 0, "unexpected outcomes");
        assert!(order_errors.borrow().is_empty(), "{:?}", order_errors.borrow());
        let lost = outcomes.iter().filter(|o| o.0 == 2).count();
        assert!(kills > 0, "the soak killed no worker");
        let killed = killed.borrow();
        for (i, (o, id)) in outcomes.iter().zip(&target).enumerate() {
            assert!(o.0 == 1 || killed.contains(id), "message {i} to {id}, never killed, failed: outcome {}", o.0);
        }
        // Each surviving worker: all its acked messages to us resolved OK.
        let mut from_live = 0;
        for id in live.borrow().keys().copied().collect::<Vec<_>>() {
            let (wsent, ok, failed): (u64, u64, u64) = r.request(id, "report", &(), Duration::from_secs(10)).unwrap();
            assert_eq!((ok, failed), (wsent, 0), "worker {id}");
            from_live += wsent;
        }
        let total = TO_WORKERS as u64 + *from_workers.borrow();
        eprintln!(
            "soak: {total} acked messages, {kills} kills, {lost} lost to kills, {from_live} from live workers, {} MB",
            r.stats().bytes_written / 1_000_000 + r.stats().bytes_read / 1_000_000
        );
        assert!(total >= TO_WORKERS as u64 * 19 / 10);
        r.shutdown(Duration::from_secs(5)).unwrap();
        assert!(r.workers().is_empty());
        drop(outcomes);
        live.borrow_mut().clear();
        live.borrow_mut().shrink_to_fit();
        // The reactor is still alive: its heap is back near where it started
        // (slab and timer-wheel capacity may stay; buffers and links must go).
        let heap_end = heap();
        eprintln!("soak: live master heap at start {heap_start} B, at end {heap_end} B");
        assert!(heap_end - heap_start < 1 << 20, "live master heap grew by {} bytes", heap_end - heap_start);
    }
    assert_eq!(util::open_fds(), fds_before, "fd leak in the master");
    let heap_after = heap();
    let grown = heap_after - heap_before;
    eprintln!("soak: master heap before {heap_before} B, after {heap_after} B");
    assert!(grown < 256 * 1024, "master heap grew by {grown} bytes");
}
