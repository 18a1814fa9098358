//! A zero-downtime reload: a supervised pool serves a steady stream of
//! requests while a rolling restart replaces every worker, each new one
//! ready before the old one is asked to exit. No request fails.
//!
//! Run it with `cargo run --example rolling_restart`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Reactor, RestartPolicy, SupervisorEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let mut reactor = Reactor::master()?;
    let exe = std::env::current_exe()?;
    let pool = reactor.supervise(move || std::process::Command::new(&exe), 3, RestartPolicy::default())?;
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    pool.on_event(move |_r, e| match e {
        SupervisorEvent::Spawned(w) => println!("master: started {w}"),
        SupervisorEvent::RestartDone => d.set(true),
        _ => {}
    });
    let (ok, failed) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    let mut sent = 0u64;
    let mut restarted = false;
    let mut turn = 0u64;
    while !done.get() || ok.get() + failed.get() < sent {
        turn += 1;
        if turn == 50 && !restarted {
            println!("master: rolling restart of {:?}", pool.workers());
            pool.rolling_restart(&mut reactor, Duration::from_secs(2));
            restarted = true;
        }
        let ready: Vec<_> = pool.workers().into_iter().filter(|&w| reactor.is_ready(w)).collect();
        if !done.get() && !ready.is_empty() {
            let w = ready[(sent as usize) % ready.len()];
            let (o, f) = (ok.clone(), failed.clone());
            reactor.send_to(w, "work", &sent, None).within(Duration::from_secs(5)).ackd(
                move |_r, res: Result<u64, AckError>| match res {
                    Ok(_) => o.set(o.get() + 1),
                    Err(e) => {
                        println!("master: a request failed: {e}");
                        f.set(f.get() + 1)
                    }
                },
            )?;
            sent += 1;
        }
        reactor.poll(Some(Duration::from_millis(5)))?;
    }
    println!("master: {sent} requests, {} answered, {} failed; now {:?}", ok.get(), failed.get(), pool.workers());
    reactor.shutdown(Duration::from_secs(2))?;
    assert_eq!(failed.get(), 0);
    Ok(())
}

fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    reactor.on("work", |_r, msg: Message<u64>| {
        let _ = msg.reply.ok(&(msg.payload + 1));
    })?;
    // Until asked to exit (then what was asked before is answered first).
    reactor.run(Duration::from_secs(2))?;
    Ok(())
}
