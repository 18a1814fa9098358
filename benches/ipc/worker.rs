//! The worker process: a clusterphone worker that also serves raw jobs.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{Bytes, Config, Error, Message, Reactor, Responder, SharedMemory};

use crate::alloc::{count_start, count_stop};
use crate::baselines::raw_serve;
use crate::options::{show_stats, wakeups_from_env, Opts, BUSY_WINDOW};
use crate::protocol::{Job, Payload, HUGE_FRAME};
use crate::sys::{pin_to, start_watchdog};

pub(crate) const ROLE_VAR: &str = "CP_BENCH_ROLE";
const CPU_VAR: &str = "CP_BENCH_CPU";
const BUSY_VAR: &str = "CP_BENCH_BUSY";
const WATCHDOG_VAR: &str = "CP_BENCH_WATCHDOG";

/// This executable, to run as a worker.
pub(crate) fn worker_command(opts: &Opts, busy: bool) -> io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(ROLE_VAR, "worker")
        .env(CPU_VAR, opts.placement.worker_cpu().to_string())
        .env(BUSY_VAR, if busy { "1" } else { "0" })
        .env(WATCHDOG_VAR, opts.watchdog.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(cmd)
}

pub(crate) fn worker_main() -> Result<(), Error> {
    if let Some(cpu) = std::env::var(CPU_VAR).ok().and_then(|s| s.parse().ok()) {
        if let Err(e) = pin_to(cpu) {
            eprintln!("worker: cannot pin to CPU {cpu}: {e}");
        }
    }
    let limit = std::env::var(WATCHDOG_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    start_watchdog(Duration::from_secs(limit + 10), 102);
    let mut config = Config::default();
    if std::env::var(BUSY_VAR).is_ok_and(|v| v == "1") {
        config.busy_poll = Some(BUSY_WINDOW);
    }
    config.writable_wakeups = wakeups_from_env();
    config.max_frame = HUGE_FRAME;
    let mut r = Reactor::attach_with(config)?;

    let count = Rc::new(Cell::new(0u64));
    let fds = Rc::new(Cell::new(0u64));
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let job: Rc<RefCell<Option<(Job, OwnedFd)>>> = Rc::default();

    // The shared-memory echo: map what came, send the same memory back.
    r.on("huge_shm", |r, mut m: Message<()>| {
        let Some(fd) = m.fd.take() else { return };
        let shm = SharedMemory::from_fd(fd, HUGE_FRAME).expect("a sealed memfd");
        let back = shm.to_fd().expect("dup");
        r.send_to_master("huge_back", &(), Some(back)).send().expect("send back");
    })?;
    // A message from another thread of the master, sent straight back.
    r.on("bounce", |r, m: Message<u64>| {
        let _ = r.send_to_master("bounced", &m.payload, None).send();
    })?;
    r.on("rtt", |_r, m: Message<Payload>| {
        let _ = m.reply.ok(&m.payload.n);
    })?;
    let c = count.clone();
    r.on("oneway", move |_r, _m: Message<Payload>| c.set(c.get() + 1))?;
    let c = count.clone();
    r.on("count", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&c.replace(0));
    })?;
    // The received buffer goes straight back, owned: written without a copy.
    r.on("big", |_r, m: Message<Bytes>| {
        let _ = m.reply.ok(m.payload);
    })?;
    let (c, f) = (count.clone(), fds.clone());
    r.on("fd", move |_r, m: Message<Payload>| {
        c.set(c.get() + 1);
        if m.fd.is_some() {
            f.set(f.get() + 1);
        }
        // Dropping the message closes the fd.
    })?;
    let (c, f) = (count.clone(), fds.clone());
    r.on("fdcount", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&(c.replace(0), f.replace(0)));
    })?;
    let h = held.clone();
    r.on("hold", move |_r, m: Message<Payload>| h.borrow_mut().push(m.reply))?;
    let h = held.clone();
    r.on("release", move |_r, m: Message<()>| {
        let all = std::mem::take(&mut *h.borrow_mut());
        let n = all.len() as u64;
        for resp in all {
            let _ = resp.ok(&0u64);
        }
        let _ = m.reply.ok(&n);
    })?;
    r.on("allocs", |_r, m: Message<bool>| {
        if m.payload {
            count_start();
            let _ = m.reply.ok(&(0u64, 0i64));
        } else {
            let counts = count_stop();
            let _ = m.reply.ok(&counts);
        }
    })?;
    let j = job.clone();
    r.on("raw", move |_r, m: Message<Job>| match m.fd {
        Some(fd) => {
            *j.borrow_mut() = Some((m.payload, fd));
            let _ = m.reply.ok(&());
        }
        None => m.reply.err("no socket came with the job"),
    })?;

    loop {
        match r.poll(Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(Error::Disconnected) | Err(Error::ExitRequested) => break,
            Err(e) => return Err(e),
        }
        let next = job.borrow_mut().take();
        if let Some((job, fd)) = next {
            r.flush(Duration::from_secs(5))?;
            if let Err(e) = raw_serve(UnixStream::from(fd), job) {
                eprintln!("worker: raw {job:?} failed: {e}");
            }
        }
    }
    let _ = r.flush(Duration::from_secs(2));
    if show_stats() {
        eprintln!("worker stats: {:?}", r.stats());
    }
    Ok(())
}
