//! Other threads: eight threads sending through `Remote` handles at once
//! (order per handle kept), replies answered from a thread pool, and the
//! typed errors of a full queue and of a reactor that is gone.

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use clusterphone::{Message, Reactor, RemoteError, SendResponder, WorkerId};
use util::{deadline, poll_until, serve, spawn_ready, LIMIT};

/// Records every `from-thread` (thread, n) and answers `dump` with them;
/// `work` is answered from a pool of threads.
fn thread_worker() {
    let mut r = Reactor::attach().expect("attach");
    let remote = r.remote().unwrap();
    let got: Rc<RefCell<Vec<(u32, u32)>>> = Rc::default();
    let g = got.clone();
    r.on("from-thread", move |_r, m: Message<(u32, u32)>| g.borrow_mut().push(m.payload)).unwrap();
    r.on("dump", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&*got.borrow());
    })
    .unwrap();
    // Four pool threads answer `work`: squares, out of order.
    let (tx, rx) = mpsc::channel::<(SendResponder, u64)>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    for _ in 0..4 {
        let rx = rx.clone();
        std::thread::spawn(move || loop {
            let Ok((reply, n)) = rx.lock().unwrap().recv() else { return };
            std::thread::sleep(Duration::from_micros(100 * (n % 7)));
            let _ = reply.ok(&(n * n));
        });
    }
    r.on("work", move |_r, m: Message<u64>| {
        tx.send((m.reply.detach(&remote), m.payload)).unwrap();
    })
    .unwrap();
    serve(&mut r);
}

#[test]
fn eight_threads_send_and_a_pool_replies_through_the_reactor() {
    util::child("threads", thread_worker);
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let w: WorkerId = spawn_ready(&mut r, "threads");
    let remote = r.remote().unwrap();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let remote = remote.clone();
            std::thread::spawn(move || {
                let mut n = 0u32;
                while n < 500 {
                    match remote.send_to(w, "from-thread", &(t, n), None) {
                        Ok(()) => n += 1,
                        Err(e) if e.error == RemoteError::Full => std::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    while !threads.iter().all(|t| t.is_finished()) {
        r.poll(Some(Duration::from_millis(5))).unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    // What the threads queued last runs at the reactor's next turns.
    poll_until(&mut r, LIMIT, |r| r.stats().messages_sent + r.stats().remote_refused == 4000);
    r.flush(LIMIT).unwrap();
    let got: Vec<(u32, u32)> = r.request(w, "dump", &(), LIMIT).unwrap();
    assert_eq!(got.len(), 8 * 500, "every send arrived");
    for t in 0..8 {
        let mine: Vec<u32> = got.iter().filter(|(th, _)| *th == t).map(|&(_, n)| n).collect();
        assert_eq!(mine, (0..500).collect::<Vec<_>>(), "thread {t}'s sends in its order");
    }
    // Replies from the worker's pool, each to its own request.
    let outcomes: Rc<RefCell<Vec<(u64, u64)>>> = Rc::default();
    for n in 0..200u64 {
        let o = outcomes.clone();
        r.send_to(w, "work", &n, None)
            .within(LIMIT)
            .ackd(move |_r, res: Result<u64, _>| o.borrow_mut().push((n, res.unwrap())))
            .unwrap();
    }
    poll_until(&mut r, LIMIT, |_| outcomes.borrow().len() == 200);
    assert!(outcomes.borrow().iter().all(|&(n, sq)| sq == n * n));
    assert_eq!(r.stats().remote_refused, 0);
    r.shutdown(LIMIT).unwrap();
}

#[test]
fn a_full_queue_and_a_dropped_reactor_are_typed_errors_that_hand_the_fd_back() {
    let (mut master, worker, _end) = Reactor::pair().unwrap();
    let remote = master.remote().unwrap();
    // Nobody polls: the queue fills.
    let mut queued = 0;
    let full = loop {
        match remote.send_to(worker, "x", &queued, None) {
            Ok(()) => queued += 1,
            Err(e) => break e,
        }
    };
    assert_eq!((full.error, queued), (RemoteError::Full, clusterphone::REMOTE_QUEUE));
    master.poll(Some(Duration::ZERO)).unwrap();
    // Run, and refused by the reactor (the worker never said hello: not ready
    // for an fd) — counted, not lost silently.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    remote.send_to(worker, "fd", &(), Some(a.into())).unwrap();
    master.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(master.stats().remote_refused, 1);
    drop(master);
    let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
    let gone = remote.send_to(worker, "x", &(), Some(c.into())).unwrap_err();
    assert_eq!(gone.error, RemoteError::Closed);
    assert!(gone.fd.is_some(), "the fd comes back");
}
