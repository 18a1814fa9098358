//! A master and a worker in one process (`Reactor::pair`), the worker on a
//! thread of its own: messages and fds both ways, acks, and the end of the
//! worker's reactor seen by the master.

mod util;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use clusterphone::{AckError, Message, Reactor};
use util::events::Events;
use util::LIMIT;

#[test]
fn a_paired_worker_on_a_thread_talks_both_ways_with_fds() {
    let _d = util::deadline(Duration::from_secs(30));
    let (mut master, worker, end) = Reactor::pair().unwrap();
    assert!(!master.is_ready(worker), "ready only once the worker says hello");
    let thread = std::thread::spawn(move || {
        let mut r = end.attach().unwrap();
        r.on("double", |_r, m: Message<u64>| {
            let _ = m.reply.ok(&(m.payload * 2));
        })
        .unwrap();
        // An fd from the master: write into it and hand it back.
        r.on("fd", |r, m: Message<()>| {
            let mut s = UnixStream::from(m.fd.expect("an fd came with the message"));
            s.write_all(b"from the worker").unwrap();
            r.send_to_master("back", &(), Some(OwnedFd::from(s))).send().unwrap();
        })
        .unwrap();
        let id = r.worker_id();
        let tripled = std::rc::Rc::new(std::cell::Cell::new(None));
        let t = tripled.clone();
        r.send_to_master("triple", &5u64, None).ackd(move |_r, res: Result<u64, AckError>| t.set(res.ok())).unwrap();
        while r.poll(None).is_ok() {}
        (id, tripled.get())
    });
    master
        .on("triple", |_r, m: Message<u64>| {
            let _ = m.reply.ok(&(m.payload * 3));
        })
        .unwrap();
    let back = std::rc::Rc::new(std::cell::RefCell::new(None));
    let b = back.clone();
    master.on("back", move |_r, m: Message<()>| *b.borrow_mut() = m.fd).unwrap();
    let doubled: u64 = master.request(worker, "double", &21u64, LIMIT).unwrap();
    assert_eq!(doubled, 42);

    let (mine, theirs) = UnixStream::pair().unwrap();
    master.send_to(worker, "fd", &(), Some(OwnedFd::from(theirs))).send().unwrap();
    util::poll_until(&mut master, LIMIT, |_| back.borrow().is_some());
    let mut got = [0u8; 15];
    (&mine).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the worker");

    // The worker ends with its reactor: the master sees it disconnect, once.
    let events = Events::record(&mut master);
    let pending = master.send_to(worker, "never-answered", &(), None).within(LIMIT).handle::<()>().unwrap();
    master.request_exit(worker, LIMIT).unwrap();
    util::poll_until(&mut master, LIMIT, |r| r.workers().is_empty());
    assert_eq!(thread.join().unwrap(), (Some(worker), Some(15)), "the worker knows its id, and got its answer");
    let events = events.all();
    assert!(matches!(&events[..], [(_, e)] if e.is_disconnect()), "{events:?}");
    let outcome = pending.take().expect("the pending ack ended");
    assert!(matches!(outcome, Err(AckError::NoHandler) | Err(AckError::Disconnected)), "{outcome:?}");
    assert!(master.kill(worker).is_err(), "no process to kill");
}

#[test]
fn a_workers_run_tells_its_two_normal_ends_apart() {
    let _d = util::deadline(Duration::from_secs(30));
    // Asked to exit.
    let (mut master, worker, end) = Reactor::pair().unwrap();
    let thread = std::thread::spawn(move || end.attach().unwrap().run(Duration::from_secs(1)));
    util::poll_until(&mut master, LIMIT, |r| r.is_ready(worker));
    master.request_exit(worker, LIMIT).unwrap();
    util::poll_until(&mut master, LIMIT, |r| r.workers().is_empty());
    assert!(matches!(thread.join().unwrap(), Ok(clusterphone::WorkerEnd::ExitRequested)));
    // The master goes.
    let (mut master, worker, end) = Reactor::pair().unwrap();
    let thread = std::thread::spawn(move || end.attach().unwrap().run(Duration::from_secs(1)));
    util::poll_until(&mut master, LIMIT, |r| r.is_ready(worker));
    drop(master);
    assert!(matches!(thread.join().unwrap(), Ok(clusterphone::WorkerEnd::MasterGone)));
    // Not for a master.
    let (mut master, _worker, _end) = Reactor::pair().unwrap();
    assert!(matches!(master.run(Duration::ZERO), Err(clusterphone::Error::WrongRole)));
}
