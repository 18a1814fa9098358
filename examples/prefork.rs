//! A prefork TCP server: the master accepts connections and hands each one
//! to a worker (round robin over the ready ones), which serves it with its
//! reactor alone. Workers are supervised: one is killed halfway, respawned,
//! and no connection is lost (a connection whose hand-off failed comes back
//! and goes to another worker).
//!
//! Run it with `cargo run --example prefork`.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Error, Interest, Message, Reactor, RestartPolicy, SourceKey, SupervisorEvent};

const CLIENTS: usize = 40;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let mut reactor = Reactor::master()?;
    let exe = std::env::current_exe()?;
    let pool = reactor.supervise(move || std::process::Command::new(&exe), 3, RestartPolicy::default())?;
    pool.on_event(|_r, e| {
        if let SupervisorEvent::Crashed { worker, .. } = e {
            println!("master: worker {worker} crashed; respawning");
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;

    // The clients: threads of this process, each sending one line.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || -> std::io::Result<String> {
                std::thread::sleep(Duration::from_millis(10 * i as u64));
                let mut s = TcpStream::connect(addr)?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                writeln!(s, "hello from client {i}")?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            })
        })
        .collect();

    // Connections waiting for a worker (new ones, and ones that came back).
    let waiting: Rc<RefCell<Vec<OwnedFd>>> = Rc::default();
    let w = waiting.clone();
    reactor.add_source(listener, Interest::READABLE, move |_r, l: &mut TcpListener, _| {
        while let Ok((conn, _)) = l.accept() {
            w.borrow_mut().push(conn.into());
        }
    })?;
    let next = Rc::new(Cell::new(0usize));
    let killed = Cell::new(false);
    let start = Instant::now();
    while !clients.iter().all(|c| c.is_finished()) {
        reactor.poll(Some(Duration::from_millis(5)))?;
        let ready: Vec<_> = pool.workers().into_iter().filter(|&w| reactor.is_ready(w)).collect();
        while !ready.is_empty() {
            let Some(conn) = waiting.borrow_mut().pop() else { break };
            let worker = ready[next.get() % ready.len()];
            next.set(next.get() + 1);
            let w = waiting.clone();
            let sent = reactor.send_to(worker, "conn", &(), Some(conn)).within(Duration::from_secs(2)).ackd_fd(
                move |_r, outcome: Result<(), AckError>, fd| {
                    if let (Err(e), Some(conn)) = (outcome, fd) {
                        println!("master: a hand-off failed ({e}); the connection goes to another worker");
                        w.borrow_mut().push(conn);
                    }
                },
            );
            if let Err(refused) = sent {
                waiting.borrow_mut().extend(refused.fd);
            }
        }
        // Halfway through, a worker dies with connections in flight.
        if !killed.get() && start.elapsed() > Duration::from_millis(CLIENTS as u64 * 5) {
            killed.set(true);
            if let Some(&victim) = pool.workers().first() {
                if let Some(pid) = reactor.worker_pid(victim) {
                    println!("master: killing worker {victim} (pid {pid})");
                    // SAFETY: kill(2) on our own child: a crash, as the supervisor sees it.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
    let mut served = 0;
    for c in clients {
        let line = c.join().expect("client thread")?;
        if line.starts_with("HELLO FROM CLIENT") {
            served += 1;
        }
    }
    println!("master: {served} of {CLIENTS} clients served");
    reactor.shutdown(Duration::from_secs(2))?;
    assert_eq!(served, CLIENTS, "a connection was lost");
    Ok(())
}

/// Serves each connection it is handed: reads a line, answers it in
/// capitals with its worker id, and closes.
fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    let me = reactor.worker_id().map(|id| id.to_string()).unwrap_or_default();
    reactor.on("conn", move |r, mut msg: Message<()>| {
        let Some(fd) = msg.fd.take() else { return };
        let conn = TcpStream::from(fd);
        let _ = conn.set_nonblocking(true);
        let me = me.clone();
        let key: Rc<Cell<Option<SourceKey>>> = Rc::default();
        let k = key.clone();
        let mut got = Vec::new();
        let added = r.add_source(conn, Interest::READABLE, move |r, conn: &mut TcpStream, _| {
            let mut buf = [0u8; 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => return, // WouldBlock: more later
                }
                if got.ends_with(b"\n") {
                    let text = String::from_utf8_lossy(&got).trim().to_uppercase();
                    let _ = writeln!(conn, "{text} (worker {me})");
                    break;
                }
            }
            if let Some(key) = k.get() {
                let _: Option<TcpStream> = r.remove_source(key); // lent to us: closed on return
            }
        });
        match added {
            Ok(k) => key.set(Some(k)),
            Err(_) => return,
        }
        let _ = msg.reply.ok(&());
    })?;
    reactor.run(Duration::from_secs(1))?;
    Ok(())
}
