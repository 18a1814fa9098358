//! A worker that answers from a thread pool: each request's responder is
//! detached and moved to a pool thread, which replies through the reactor's
//! handle for other threads. The reactor's own thread never blocks on work.
//!
//! Run it with `cargo run --example thread_pool`.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusterphone::{Error, Message, Reactor, SendResponder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let mut reactor = Reactor::master()?;
    let w = reactor.spawn(std::process::Command::new(std::env::current_exe()?))?;
    let start = Instant::now();
    let handles: Vec<_> =
        (1..=32u64).map(|n| reactor.send_to(w, "slow-square", &n, None).handle::<u64>()).collect::<Result<_, _>>()?;
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.wait(&mut reactor)?);
    }
    // 32 jobs of 50 ms on 8 threads: about 200 ms, not 1.6 s.
    println!("master: {answers:?} in {:?}", start.elapsed());
    assert_eq!(answers, (1..=32u64).map(|n| n * n).collect::<Vec<_>>());
    reactor.shutdown(Duration::from_secs(2))?;
    Ok(())
}

fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    let remote = reactor.remote()?;
    let (tx, rx) = mpsc::channel::<(SendResponder, u64)>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..8 {
        let rx = rx.clone();
        std::thread::spawn(move || loop {
            let job = rx.lock().map(|rx| rx.recv());
            let Ok(Ok((reply, n))) = job else { return };
            std::thread::sleep(Duration::from_millis(50)); // the work
            let _ = reply.ok(&(n * n));
        });
    }
    reactor.on("slow-square", move |_r, msg: Message<u64>| {
        let _ = tx.send((msg.reply.detach(&remote), msg.payload));
    })?;
    reactor.run(Duration::from_secs(1))?;
    Ok(())
}
