//! The user's own fds and timers in the reactor: a worker serving the TCP
//! connections its master hands it with the reactor alone (with a periodic
//! timer and messages interleaved), and timers and sources managed from
//! their own callbacks.

mod util;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{Interest, Message, Reactor, Readiness, SourceKey};
use util::{deadline, poll_until, serve, spawn_ready, LIMIT};

/// Serves every connection it is handed: upper-cases what it reads, until
/// the client closes. Counts timer ticks and messages, reported on `report`.
fn prefork_worker() {
    let mut r = Reactor::attach().expect("attach");
    let ticks = Rc::new(Cell::new(0u64));
    let t = ticks.clone();
    r.add_timer(Duration::from_millis(5), Some(Duration::from_millis(5)), move |_r| t.set(t.get() + 1));
    let msgs = Rc::new(Cell::new(0u64));
    let m = msgs.clone();
    r.on("num", move |_r, _msg: Message<u64>| m.set(m.get() + 1)).unwrap();
    r.on("report", move |_r, msg: Message<()>| {
        let _ = msg.reply.ok(&(ticks.get(), msgs.get()));
    })
    .unwrap();
    r.on("conn", |r, mut msg: Message<()>| {
        let conn = TcpStream::from(msg.fd.take().expect("a connection"));
        conn.set_nonblocking(true).unwrap();
        let key: Rc<Cell<Option<SourceKey>>> = Rc::default();
        let k = key.clone();
        let added = r.add_source(conn, Interest::READABLE, move |r, conn: &mut TcpStream, _ready: Readiness| {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => {
                        // Closed: drop it (from inside its own callback, which
                        // has it on loan: it is dropped once this returns).
                        let lent: Option<TcpStream> = r.remove_source(k.get().expect("set"));
                        assert!(lent.is_none());
                        return;
                    }
                    Ok(n) => conn.write_all(&buf[..n].to_ascii_uppercase()).unwrap(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(e) => panic!("read: {e}"),
                }
            }
        });
        key.set(Some(added.expect("add_source")));
        let _ = msg.reply.ok(&());
    })
    .unwrap();
    serve(&mut r);
}

#[test]
fn a_worker_serves_handed_connections_with_the_reactor_alone() {
    util::child("prefork", prefork_worker);
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "prefork");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(LIMIT)).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let () = r.send_to(w, "conn", &(), Some(OwnedFd::from(conn))).within(LIMIT).wait().unwrap();
        clients.push(client);
    }
    // Messages and connection traffic interleaved.
    let start = Instant::now();
    for round in 0..50u64 {
        r.batch(|r| {
            for i in 0..20 {
                r.send_to(w, "num", &(round * 20 + i), None).send().unwrap();
            }
        });
        for (i, c) in clients.iter_mut().enumerate() {
            let text = format!("client {i} round {round};");
            c.write_all(text.as_bytes()).unwrap();
            let mut back = vec![0u8; text.len()];
            // The master keeps its own reactor turning meanwhile.
            r.poll(Some(Duration::ZERO)).unwrap();
            c.read_exact(&mut back).unwrap();
            assert_eq!(back, text.to_ascii_uppercase().into_bytes());
        }
    }
    let (ticks, msgs): (u64, u64) = r.request(w, "report", &(), LIMIT).unwrap();
    assert_eq!(msgs, 1000);
    let elapsed = start.elapsed().as_millis() as u64;
    assert!(ticks >= elapsed / 5 / 4, "{ticks} ticks of 5 ms in {elapsed} ms: the timer starved");
    // A client that closes: its source is dropped by its own callback; the others go on.
    drop(clients.remove(0));
    let c = &mut clients[0];
    c.write_all(b"still there?").unwrap();
    let mut back = [0u8; 12];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"STILL THERE?");
    r.shutdown(LIMIT).unwrap();
}

#[test]
fn timers_fire_on_time_repeat_and_cancel_themselves() {
    let _d = deadline(Duration::from_secs(30));
    let (mut r, _w, _end) = Reactor::pair().unwrap();
    let log: Rc<RefCell<Vec<&'static str>>> = Rc::default();
    let l = log.clone();
    let start = Instant::now();
    let once_at: Rc<Cell<Option<Duration>>> = Rc::default();
    let o = once_at.clone();
    r.add_timer(Duration::from_millis(50), None, move |_r| {
        o.set(Some(start.elapsed()));
        l.borrow_mut().push("once");
    });
    assert!(r.next_deadline().is_some(), "a nested loop is woken for a user timer");
    let count = Rc::new(Cell::new(0));
    let c = count.clone();
    let me: Rc<Cell<Option<clusterphone::UserTimerKey>>> = Rc::default();
    let m = me.clone();
    let every = r.add_timer(Duration::from_millis(10), Some(Duration::from_millis(10)), move |r| {
        c.set(c.get() + 1);
        if c.get() == 5 {
            assert!(r.cancel_timer(m.get().expect("set")), "cancelled from its own callback");
        }
    });
    me.set(Some(every));
    let cancelled = r.add_timer(Duration::from_millis(20), None, |_r| panic!("cancelled timers never fire"));
    assert!(r.cancel_timer(cancelled));
    assert!(!r.cancel_timer(cancelled));
    poll_until(&mut r, LIMIT, |_| count.get() == 5 && once_at.get().is_some());
    let fired = once_at.get().unwrap();
    assert!(fired >= Duration::from_millis(50), "fired early: {fired:?}");
    for _ in 0..5 {
        r.poll(Some(Duration::from_millis(20))).unwrap();
    }
    assert_eq!(count.get(), 5, "a cancelled periodic timer stops");
    assert_eq!(*log.borrow(), ["once"], "a one-shot fires once");
    assert!(!r.cancel_timer(every));
}

#[test]
fn a_source_comes_back_when_removed() {
    let (mut r, _w, _end) = Reactor::pair().unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let got: Rc<RefCell<Vec<u8>>> = Rc::default();
    let g = got.clone();
    let key = r
        .add_source(a, Interest::READABLE, move |_r, s: &mut std::os::unix::net::UnixStream, ready| {
            assert!(ready.readable);
            let mut buf = [0u8; 16];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                g.borrow_mut().extend_from_slice(&buf[..n]);
            }
        })
        .unwrap();
    (&b).write_all(b"ping").unwrap();
    poll_until(&mut r, LIMIT, |_| got.borrow().len() == 4);
    assert!(r.remove_source::<TcpStream>(key).is_none(), "a source of another type is not handed back");
    let (a2, b2) = std::os::unix::net::UnixStream::pair().unwrap();
    let key2 = r.add_source(a2, Interest::READABLE, |_r, _s: &mut std::os::unix::net::UnixStream, _| {}).unwrap();
    let back: Option<std::os::unix::net::UnixStream> = r.remove_source(key2);
    let back = back.expect("handed back");
    (&b2).write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    (&back).read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
    assert!(r.remove_source::<std::os::unix::net::UnixStream>(key2).is_none(), "stale key");
}
