//! Reloading a config on every worker with one broadcast: one deadline, one
//! callback with every worker's outcome (the one that refuses the new config
//! says so; none is forgotten).
//!
//! Run it with `cargo run --example reload`.

use std::time::Duration;

use clusterphone::{Error, Gathered, Message, Reactor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let mut reactor = Reactor::master()?;
    let workers: Vec<_> = (0..4)
        .map(|_| reactor.spawn(std::process::Command::new(std::env::current_exe()?)))
        .collect::<Result<_, _>>()?;
    while !workers.iter().all(|&w| reactor.is_ready(w)) {
        reactor.poll(Some(Duration::from_millis(10)))?;
    }
    for version in ["v2", "v3-broken"] {
        let outcomes: Gathered<String> = reactor.broadcast("reload", &version).within(Duration::from_secs(2)).wait()?;
        let ok = outcomes.iter().filter(|(_, o)| o.is_ok()).count();
        println!("master: reload {version}: {ok} of {} workers took it", outcomes.len());
        for (worker, outcome) in &outcomes {
            println!("  {worker}: {outcome:?}");
        }
    }
    reactor.shutdown(Duration::from_secs(2))?;
    Ok(())
}

/// Takes a config, unless it is broken (the worker with serial 2 is picky).
fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    let serial = reactor.worker_id().map_or(0, |id| id.serial());
    let mut current = "v1".to_string();
    reactor.on("reload", move |_r, msg: Message<String>| {
        if msg.payload.contains("broken") && serial == 2 {
            msg.reply.err(format!("keeping {current}: {} does not parse", msg.payload));
        } else {
            current = msg.payload;
            let _ = msg.reply.ok(&format!("running {current}"));
        }
    })?;
    reactor.run(Duration::from_secs(1))?;
    Ok(())
}
