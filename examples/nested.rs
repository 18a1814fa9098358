//! A master nested in a plain mio loop that also waits on a signalfd: SIGINT
//! or SIGTERM shuts the workers down gracefully. (It sends itself SIGTERM
//! after a moment, to show it; press Ctrl-C to do it yourself earlier. The
//! workers run in their own process group, so Ctrl-C reaches the master only.)
//!
//! Run it with `cargo run --example nested`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use clusterphone::{Error, Message, Reactor};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

const REACTOR: Token = Token(0);
const SIGNALS: Token = Token(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let signals = signalfd_for_shutdown()?;
    let mut reactor = Reactor::master()?;
    reactor.on("pong", |_r, msg: Message<u64>| println!("master: pong {} from {:?}", msg.payload, msg.from))?;
    for _ in 0..2 {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.process_group(0); // Ctrl-C goes to the master alone
        reactor.spawn(cmd)?;
    }

    let mut outer = Poll::new()?;
    let mut events = Events::with_capacity(16);
    outer.registry().register(&mut SourceFd(&reactor.as_raw_fd()), REACTOR, Interest::READABLE)?;
    outer.registry().register(&mut SourceFd(&signals.as_raw_fd()), SIGNALS, Interest::READABLE)?;

    let start = Instant::now();
    let mut n = 0u64;
    let mut last_ping = Instant::now();
    'outer: loop {
        // Wait for the reactor's fd, the signalfd, or the reactor's next deadline.
        let timeout = reactor.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
        let timeout = timeout.unwrap_or(Duration::from_millis(100)).min(Duration::from_millis(100));
        outer.poll(&mut events, Some(timeout))?;
        for event in events.iter() {
            if event.token() == SIGNALS {
                let signal = read_signal(&signals);
                println!("master: signal {signal}: shutting down gracefully");
                break 'outer;
            }
        }
        reactor.poll(Some(Duration::ZERO))?;
        if last_ping.elapsed() > Duration::from_millis(50) {
            last_ping = Instant::now();
            for w in reactor.workers() {
                if reactor.is_ready(w) {
                    n += 1;
                    reactor.send_to(w, "ping", &n, None).send()?;
                }
            }
        }
        if start.elapsed() > Duration::from_millis(400) {
            // SAFETY: kill(2) on this very process, with a signal it blocks
            // (so it lands in the signalfd).
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        }
    }
    reactor.shutdown(Duration::from_secs(2))?;
    println!("master: every worker stopped");
    Ok(())
}

/// Blocks SIGINT and SIGTERM and returns a signalfd that reads them.
fn signalfd_for_shutdown() -> std::io::Result<OwnedFd> {
    // SAFETY: a local, empty-then-filled signal set; pthread_sigmask and
    // signalfd take pointers to it for the call only; the fd is fresh and ours.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: &OwnedFd) -> u32 {
    // SAFETY: an all-zero signalfd_siginfo is valid; read fills at most its size.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size);
        info.ssi_signo
    }
}

/// Answers pings; exits when asked.
fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    reactor.on("ping", |r, msg: Message<u64>| {
        let _ = r.send_to_master("pong", &msg.payload, None).send();
    })?;
    reactor.run(Duration::from_secs(1))?;
    Ok(())
}
