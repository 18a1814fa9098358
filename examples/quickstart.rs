//! Spawns three workers of this very executable, then talks to them both ways,
//! in two namespaces, with acknowledgements and a file descriptor.
//!
//! Run it with `cargo run --example quickstart`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Reactor, WorkerEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    key: String,
    n: u32,
}

fn main() -> Result<(), Error> {
    if clusterphone::is_worker() {
        worker()
    } else {
        master()
    }
}

fn master() -> Result<(), Error> {
    let mut reactor = Reactor::master()?;

    // Workers report to us in the default namespace...
    reactor.on("hello", |_r, msg: Message<String>| {
        println!("master: {:?} says {:?}", msg.from, msg.payload);
    })?;
    // ...and in a namespace of their own, expecting a reply.
    reactor.ns("metrics")?.on("report", |_r, msg: Message<u64>| {
        println!("master: {:?} reports {} handled", msg.from, msg.payload);
        let _ = msg.reply.ok("thanks");
    })?;
    reactor.on_worker_event(|_r, id, event| {
        if let WorkerEvent::Exited(exit) = event {
            println!("master: worker {id} exited ({exit})");
        }
    });

    let exe = std::env::current_exe()?;
    let workers: Vec<_> = (0..3).map(|_| reactor.spawn(Command::new(&exe))).collect::<Result<_, _>>()?;

    // Sent at once, although the workers are still starting: queued until they say hello.
    for (i, &w) in workers.iter().enumerate() {
        let greeting = Greeting { key: "value".into(), n: i as u32 };
        reactor.send_to(w, "greet", &greeting, None).send()?;
        // Ask for an acknowledgement, delivered to a callback from `poll`.
        reactor
            .send_to(w, "square", &(i as u64 + 2), None)
            .within(Duration::from_secs(5))
            .ackd(move |_r, reply: Result<u64, AckError>| println!("master: square from worker #{i} -> {reply:?}"))?;
    }

    // A blocking request: polls until the reply arrives.
    let sum: u64 = reactor.request(workers[0], "sum", &vec![1u64, 2, 3, 4], Duration::from_secs(5))?;
    println!("master: worker 0 summed to {sum}");

    // Hand worker 1 one end of a socket: it writes through it, we read the other end.
    // An fd goes only to a worker that has said hello (or with `.force_queue()`).
    while !reactor.is_ready(workers[1]) {
        reactor.poll(Some(Duration::from_millis(10)))?;
    }
    let (mut ours, theirs) = UnixStream::pair()?;
    reactor.send_to(workers[1], "take-socket", &(), Some(OwnedFd::from(theirs))).wait::<()>()?;
    let mut line = String::new();
    ours.read_to_string(&mut line)?;
    println!("master: read through the passed fd: {:?}", line.trim());

    // Unknown command: the ack says so.
    let err = reactor.request::<(), _>(workers[2], "nope", &(), Duration::from_secs(5)).unwrap_err();
    println!("master: unknown command -> {err}");

    // Let the workers report (they each send two messages), then shut down.
    for _ in 0..20 {
        reactor.poll(Some(Duration::from_millis(10)))?;
    }
    reactor.shutdown(Duration::from_secs(2))?;
    println!("master: all workers reaped; stats {:?}", reactor.stats());
    Ok(())
}

fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    let me = reactor.worker_id().map(|id| id.to_string()).unwrap_or_default();
    reactor.on("greet", move |r, msg: Message<Greeting>| {
        let text = format!("got greeting {:?}", msg.payload);
        let _ = r.send_to_master("hello", &text, None).send();
        // Re-entrant use is fine: send in another namespace, with an ack, from inside a handler.
        if let Ok(mut metrics) = r.ns("metrics") {
            let _ = metrics.send_to_master("report", &1u64, None).ackd(|_r, reply: Result<String, AckError>| {
                println!("worker: master answered {reply:?}");
            });
        }
    })?;
    reactor.on("square", |_r, msg: Message<u64>| {
        let _ = msg.reply.ok(&(msg.payload * msg.payload));
    })?;
    reactor.on("sum", |_r, msg: Message<Vec<u64>>| {
        let _ = msg.reply.ok(&msg.payload.iter().sum::<u64>());
    })?;
    reactor.on("take-socket", move |_r, msg: Message<()>| match msg.fd {
        Some(fd) => {
            let mut s = UnixStream::from(fd);
            let _ = writeln!(s, "hello from worker {me} via SCM_RIGHTS");
            let _ = msg.reply.ok(&());
        }
        None => msg.reply.err("no fd came with the message"),
    })?;

    loop {
        match reactor.poll(Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(Error::ExitRequested) | Err(Error::Disconnected) => break,
            Err(e) => return Err(e),
        }
    }
    let _ = reactor.flush(Duration::from_secs(1));
    Ok(())
}
