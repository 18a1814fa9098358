//! Worker lifecycles the OS or the program can make awkward: exits reaped by
//! someone else, piped stdio, inherited signal state, expiry racing a late
//! hello, a panic while a dead worker's frames are read, a worker dying with
//! acks pending, shutdown racing a respawning hook, an attach pointed at the
//! wrong socket, and a config out of range.
//!
//! Tests that change process-wide state (signal dispositions, the signal
//! mask, the environment) run their master in a child process of their own.

mod util;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Config, Error, Message, Reactor, Responder, WorkerEvent, WorkerId};
use util::events::{echo_worker, Events};
use util::{deadline, poll_until, serve, worker_command, Reaped, LIMIT};

/// The whole of a test whose master changes process-wide state: runs
/// `master` in a child process of its own, its workers playing `role` with
/// `worker`, and checks that it succeeded.
#[track_caller]
fn run_master_in_child(master: fn(), role: &str, worker: fn()) {
    util::child("master", master);
    util::child(role, worker);
    let _d = deadline(Duration::from_secs(40));
    let mut child = Reaped(worker_command("master").spawn().expect("spawn the child master"));
    let Some(status) = child.exit_within(Duration::from_secs(30)) else {
        panic!("the child master did not finish in time");
    };
    assert!(status.success(), "the child master failed: {status}");
}

/// Sends `sig` to worker `w`'s process by its pid, behind the reactor's back.
#[track_caller]
fn signal(r: &Reactor, w: WorkerId, sig: libc::c_int) {
    let pid = r.worker_pid(w).expect("a running worker") as libc::pid_t;
    // SAFETY: kill(2) on our own child, still running (it has not been seen
    // to exit), so the pid is still its own.
    unsafe { libc::kill(pid, sig) };
}

/// Spawns an echo worker, lets it answer once, kills it (SIGKILL, by pid) and
/// polls until an exit is reported; the worker's id.
#[track_caller]
fn crash_an_echo_worker(r: &mut Reactor, events: &Events) -> WorkerId {
    let w = r.spawn(worker_command("echo")).unwrap();
    let _: u64 = r.request(w, "echo", &1u64, LIMIT).unwrap();
    signal(r, w, libc::SIGKILL);
    poll_until(r, LIMIT, |_| !events.exits().is_empty());
    w
}

// ----- configuration ---------------------------------------------------------

#[test]
fn a_config_out_of_range_is_refused_by_both_constructors() {
    let _d = deadline(LIMIT);
    for timeout in [Duration::ZERO, Duration::from_secs(2 * 24 * 3600)] {
        let mut config = Config::default();
        config.ack_timeout = timeout;
        assert!(matches!(Reactor::master_with(config.clone()), Err(Error::InvalidConfig(_))), "{timeout:?}");
        // Refused before the environment is even looked at.
        assert!(matches!(Reactor::attach_with(config), Err(Error::InvalidConfig(_))), "{timeout:?}");
    }
    let mut config = Config::default();
    config.frames_per_poll = 0;
    assert!(matches!(Reactor::master_with(config), Err(Error::InvalidConfig(_))));
    let mut config = Config::default();
    config.max_received_fds = config.max_received_fds_total + 1;
    assert!(matches!(Reactor::master_with(config), Err(Error::InvalidConfig(_))));
    assert!(Reactor::master_with(Config::default()).is_ok());
}

// ----- exits the master does not reap itself ---------------------------------

#[test]
fn exits_are_reported_when_sigchld_is_ignored() {
    run_master_in_child(master_with_sigchld_ignored, "echo", echo_worker);
}

/// With SIGCHLD ignored the kernel reaps children itself: `waitpid` says
/// ECHILD. The exit must still be reported (status unknown), and shutdown
/// must not wait out its deadline for a worker that is gone.
fn master_with_sigchld_ignored() {
    // SAFETY: setting a disposition to SIG_IGN installs no handler.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let w = crash_an_echo_worker(&mut r, &events);
    let (id, exit) = events.exits()[0];
    assert_eq!(id, w);
    assert_eq!(exit.status, None, "the status went to the kernel's reaper");
    assert!(!exit.requested);
    assert!(r.workers().is_empty());

    let w2 = r.spawn(worker_command("echo")).unwrap();
    let _: u64 = r.request(w2, "echo", &2u64, LIMIT).unwrap();
    let start = Instant::now();
    r.shutdown(Duration::from_secs(5)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(3), "shutdown waited {:?} for an exited worker", start.elapsed());
    let exits = events.exits();
    assert_eq!(exits.len(), 2);
    assert_eq!(exits[1].0, w2);
    assert!(exits[1].1.requested);
}

#[test]
fn a_worker_reaped_elsewhere_is_reported_and_never_signalled() {
    run_master_in_child(master_whose_workers_are_reaped_elsewhere, "echo", echo_worker);
}

/// Another part of the program reaps the worker (`waitpid` on its pid). The
/// master reports the exit, and a later `kill` signals nobody: it goes
/// through the pidfd, which no reused pid can answer to.
fn master_whose_workers_are_reaped_elsewhere() {
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(worker_command("echo")).unwrap();
    let _: u64 = r.request(w, "echo", &1u64, LIMIT).unwrap();
    let pid = r.worker_pid(w).unwrap() as libc::pid_t;
    // SAFETY: kill and waitpid on our own child; `status` is a valid int to write.
    let reaped = unsafe {
        libc::kill(pid, libc::SIGTERM);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0)
    };
    assert_eq!(reaped, pid);
    // The pid is free now: a kill must not go out by pid (it would reach
    // whichever process gets the pid next).
    r.kill(w).expect("kill of a worker reaped elsewhere is a no-op");
    poll_until(&mut r, LIMIT, |_| !events.exits().is_empty());
    let (id, exit) = events.exits()[0];
    assert_eq!(id, w);
    assert_eq!(exit.status, None);
    assert!(r.workers().is_empty());
    assert!(r.kill(w).is_err(), "the worker is gone");
}

// ----- stdio and signals ------------------------------------------------------

/// Writes 256 KiB to stdout (four times a pipe's buffer), then echoes.
fn chatty_worker() {
    let mut out = std::io::stdout().lock();
    for _ in 0..256 {
        out.write_all(&[b'x'; 1024]).unwrap();
    }
    out.flush().unwrap();
    drop(out);
    echo_worker();
}

#[test]
fn piped_stdio_is_refused_by_spawn_and_handed_over_by_spawn_piped() {
    util::child("chatty", chatty_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let mut cmd = worker_command("chatty");
    cmd.stdout(Stdio::piped());
    let before = children_of_this_process();
    assert!(matches!(r.spawn(cmd), Err(Error::PipedStdio)));
    assert!(r.workers().is_empty());
    assert_eq!(children_of_this_process(), before, "the refused child was killed and reaped");

    let mut cmd = worker_command("chatty");
    cmd.stdout(Stdio::piped());
    let (w, pipes) = r.spawn_piped(cmd).unwrap();
    let mut stdout = pipes.stdout.expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).unwrap();
        all.len()
    });
    // The worker writes four pipe buffers first: only a reader lets it answer.
    let got: u64 = r.request(w, "echo", &9u64, LIMIT).unwrap();
    assert_eq!(got, 9);
    r.shutdown(LIMIT).unwrap();
    assert!(reader.join().unwrap() >= 256 * 1024);
}

/// Pids of this process's children, from /proc.
fn children_of_this_process() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids
}

#[test]
fn workers_start_with_a_clean_signal_state() {
    run_master_in_child(master_with_blocked_signals, "signal-state", signal_state_worker);
}

/// Answers `sigstate` with its blocked and ignored signal masks.
fn signal_state_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.on("sigstate", |_r, m: Message<()>| {
        // This thread's own mask (the process's main thread may be inside a
        // pthread_create, which blocks every signal for a moment).
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        let _ = m.reply.ok(&(field("SigBlk:"), field("SigIgn:")));
    })
    .unwrap();
    serve(&mut r);
}

/// A master that blocks SIGINT and SIGTERM (as for a signalfd) and ignores
/// SIGHUP spawns a worker: the worker blocks nothing, ignores no SIGHUP, and
/// dies of SIGTERM.
fn master_with_blocked_signals() {
    // SAFETY: plain signal-mask and disposition calls on valid local sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(worker_command("signal-state")).unwrap();
    let (blocked, ignored): (u64, u64) = r.request(w, "sigstate", &(), LIMIT).unwrap();
    assert_eq!(blocked, 0, "the worker inherited a blocked-signal mask {blocked:#x}");
    assert_eq!(ignored & (1 << (libc::SIGHUP - 1)), 0, "the worker inherited an ignored SIGHUP ({ignored:#x})");
    signal(&r, w, libc::SIGTERM);
    poll_until(&mut r, LIMIT, |_| !events.exits().is_empty());
    let status = events.exits()[0].1.status.expect("status");
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

// ----- ordering and exactly-once ---------------------------------------------

/// Says hello only after a while: messages sent to it meanwhile expire.
fn late_hello_worker() {
    std::thread::sleep(Duration::from_millis(600));
    let mut r = Reactor::attach().expect("attach");
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    r.on("count-me", move |_r, m: Message<()>| {
        c.set(c.get() + 1);
        let _ = m.reply.ok(&());
    })
    .unwrap();
    r.on("count", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&calls.get());
    })
    .unwrap();
    serve(&mut r);
}

#[test]
fn a_message_whose_deadline_passed_before_the_hello_is_never_delivered() {
    util::child("late-hello", late_hello_worker);
    let _d = deadline(Duration::from_secs(20));
    let mut r = Reactor::master().unwrap();
    let w = r.spawn(worker_command("late-hello")).unwrap();
    let outcome: Rc<RefCell<Option<Result<(), AckError>>>> = Rc::default();
    let o = outcome.clone();
    r.send_to(w, "count-me", &(), None)
        .within(Duration::from_millis(100))
        .ackd(move |_r, res: Result<(), AckError>| *o.borrow_mut() = Some(res))
        .unwrap();
    // Not polling meanwhile: the hello (after ~600 ms) and the passed
    // deadline are handled in the same turn.
    std::thread::sleep(Duration::from_millis(1200));
    poll_until(&mut r, LIMIT, |r| r.is_ready(w) && outcome.borrow().is_some());
    assert_eq!(outcome.borrow_mut().take(), Some(Err(AckError::Timeout)));
    let calls: u32 = r.request(w, "count", &(), LIMIT).unwrap();
    assert_eq!(calls, 0, "the handler ran for a message its sender was told had timed out");
    r.shutdown(LIMIT).unwrap();
}

/// On `work`: sends three `note`s, replies, and exits.
fn notes_then_exit_worker() {
    let mut r = Reactor::attach().expect("attach");
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    r.on("work", move |r, m: Message<()>| {
        for i in 0..3u32 {
            r.send_to_master("note", &i, None).send().unwrap();
        }
        let _ = m.reply.ok(&7u32);
        d.set(true);
    })
    .unwrap();
    while !done.get() {
        r.poll(Some(Duration::from_millis(100))).expect("poll");
    }
    r.flush(LIMIT).expect("flush");
    std::process::exit(0);
}

#[test]
fn a_panic_while_a_dead_workers_frames_are_read_loses_none_of_them() {
    util::child("notes-then-exit", notes_then_exit_worker);
    let _d = deadline(Duration::from_secs(20));
    let mut r = Reactor::master().unwrap();
    let notes = Rc::new(Cell::new(0u32));
    let n = notes.clone();
    r.on("note", move |_r, m: Message<u32>| {
        n.set(n.get() + 1);
        if m.payload == 0 {
            panic!("the first note's handler panics");
        }
    })
    .unwrap();
    let events = Events::record(&mut r);
    let w = r.spawn(worker_command("notes-then-exit")).unwrap();
    poll_until(&mut r, LIMIT, |r| r.is_ready(w));
    let reply = r.send_to(w, "work", &(), None).within(LIMIT).handle::<u32>().unwrap();
    r.flush(LIMIT).unwrap();
    // Let the worker answer and die before we read anything it wrote.
    wait_for_exit_of(r.worker_pid(w).unwrap());
    let mut panics = 0;
    let end = Instant::now() + LIMIT;
    while events.exits().is_empty() {
        assert!(Instant::now() < end, "the exit was never reported");
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.poll(Some(Duration::from_millis(10)))));
        match turn {
            Ok(res) => res.unwrap(),
            Err(_) => panics += 1,
        }
    }
    assert_eq!(panics, 1);
    assert_eq!(notes.get(), 3, "every note the dead worker wrote was dispatched");
    assert_eq!(reply.take(), Some(Ok(7)), "its reply arrived, not an exit");
    assert_eq!(events.exits()[0].1.status.and_then(|s| s.code()), Some(0));
}

/// Waits until process `pid` (our child, which we do not reap here) is a zombie.
#[track_caller]
fn wait_for_exit_of(pid: u32) {
    let end = Instant::now() + LIMIT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name in parentheses.
        if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
            return;
        }
        assert!(Instant::now() < end, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a callback saw of a dead worker: (which callback, it looked alive, a send to it was accepted).
type Sighting = (&'static str, bool, bool);

/// Says hello, sends `bye`, and exits.
fn bye_then_exit_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.send_to_master("bye", &(), None).send().unwrap();
    r.flush(LIMIT).expect("flush");
    std::process::exit(0);
}

/// Keeps every `hold` responder, never answering.
fn holding_worker() {
    let mut r = Reactor::attach().expect("attach");
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let h = held.clone();
    r.on("hold", move |_r, m: Message<u32>| h.borrow_mut().push(m.reply)).unwrap();
    serve(&mut r);
}

#[test]
fn a_dead_worker_is_not_ready_and_refuses_sends_before_its_callbacks_run() {
    util::child("bye-then-exit", bye_then_exit_worker);
    util::child("hold", holding_worker);
    let _d = deadline(Duration::from_secs(20));
    let mut r = Reactor::master().unwrap();
    // What the callbacks saw of the dead worker: (is_ready, a send accepted).
    let seen: Rc<RefCell<Vec<Sighting>>> = Rc::default();

    // Its last message, read after its exit was seen.
    let s = seen.clone();
    r.on("bye", move |r, m: Message<()>| {
        let Some(w) = (match m.from {
            clusterphone::Peer::Worker(w) => Some(w),
            _ => None,
        }) else {
            return;
        };
        let accepted = r.send_to(w, "anything", &(), None).send().is_ok();
        s.borrow_mut().push(("bye", r.is_ready(w), accepted));
    })
    .unwrap();
    let w = r.spawn(worker_command("bye-then-exit")).unwrap();
    wait_for_exit_of(r.worker_pid(w).unwrap());
    poll_until(&mut r, LIMIT, |r| !r.workers().contains(&w));

    // Its pending acks, failing because it was killed.
    let w = r.spawn(worker_command("hold")).unwrap();
    for i in 0..3u32 {
        let s = seen.clone();
        r.send_to(w, "hold", &i, None)
            .ackd(move |r, res: Result<(), AckError>| {
                assert!(matches!(res, Err(AckError::Exited(_))), "{res:?}");
                let accepted = r.send_to(w, "requeued", &(), None).send().is_ok();
                s.borrow_mut().push(("ack", r.is_ready(w) || r.workers().contains(&w), accepted));
            })
            .unwrap();
    }
    poll_until(&mut r, LIMIT, |r| r.is_ready(w));
    r.flush(LIMIT).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    r.kill(w).unwrap();
    poll_until(&mut r, LIMIT, |_| seen.borrow().len() == 4);
    for (what, alive, accepted) in seen.borrow().iter() {
        assert!(!alive, "{what}: the dead worker still looked alive");
        assert!(!accepted, "{what}: a send to the dead worker was accepted");
    }
}

#[test]
fn shutdown_is_neither_prolonged_nor_undone_by_a_respawning_hook() {
    util::child("echo", echo_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let l = log.clone();
    r.on_worker_event(move |r, _id, ev| {
        if let WorkerEvent::Exited(exit) = ev {
            l.borrow_mut().push(format!("exited requested={}", exit.requested));
            // The naive hook: respawn whatever exits.
            match r.spawn(worker_command("echo")) {
                Ok(_) => l.borrow_mut().push("respawned".into()),
                Err(e) => l.borrow_mut().push(format!("refused: {e}")),
            }
        }
    });
    let workers: Vec<WorkerId> = (0..3).map(|_| r.spawn(worker_command("echo")).unwrap()).collect();
    for &w in &workers {
        let _: u64 = r.request(w, "echo", &1u64, LIMIT).unwrap();
    }
    let start = Instant::now();
    r.shutdown(Duration::from_millis(200)).unwrap();
    let took = start.elapsed();
    assert!(r.workers().is_empty(), "shutdown left {:?}", r.workers());
    let log = log.borrow();
    assert_eq!(log.iter().filter(|l| *l == "exited requested=true").count(), 3, "{log:?}");
    assert!(!log.iter().any(|l| l == "respawned"), "{log:?}");
    assert!(log.iter().all(|l| !l.starts_with("refused") || l.contains("shutting down")), "{log:?}");
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    drop(log);
    // Spawning works again once shutdown is over.
    let w = r.spawn(worker_command("echo")).unwrap();
    let _: u64 = r.request(w, "echo", &1u64, LIMIT).unwrap();
    r.shutdown(LIMIT).unwrap();
}

#[test]
fn a_worker_crash_is_reported_as_not_requested() {
    util::child("echo", echo_worker);
    let _d = deadline(Duration::from_secs(20));
    let mut r = Reactor::master().unwrap();
    let events = Events::record(&mut r);
    crash_an_echo_worker(&mut r, &events);
    let exit = events.exits()[0].1;
    assert!(exit.is_crash() && !exit.requested, "{exit:?}");
    let w = r.spawn(worker_command("echo")).unwrap();
    r.kill(w).unwrap();
    poll_until(&mut r, LIMIT, |_| events.exits().len() == 2);
    assert!(events.exits()[1].1.requested, "a kill by the master is a requested exit");
}

// ----- soundness ---------------------------------------------------------------

/// The fd number the child below points `CLUSTERPHONE_FD` at.
const OWN_SOCKET_FD: i32 = 200;

#[test]
fn attach_refuses_a_socket_that_does_not_lead_to_the_parent() {
    util::child("attach-own-socket", attach_pointed_at_own_socket);
    let _d = deadline(Duration::from_secs(30));
    // The child makes a socketpair of its own at fd 200, which the variable
    // names: attach must leave it alone (adopting it would close it twice).
    let status =
        worker_command("attach-own-socket").env(clusterphone::ENV_FD, OWN_SOCKET_FD.to_string()).status().unwrap();
    assert!(status.success(), "{status}");
}

fn attach_pointed_at_own_socket() {
    let (a, b) = UnixStream::pair().unwrap();
    // SAFETY: dup2 onto a number nothing in this process uses; we own the result.
    let a = unsafe {
        assert_eq!(libc::dup2(a.as_raw_fd(), OWN_SOCKET_FD), OWN_SOCKET_FD);
        UnixStream::from(OwnedFd::from_raw_fd(OWN_SOCKET_FD))
    };
    assert!(!clusterphone::is_worker(), "a socket of our own is not a channel from a master");
    match Reactor::attach() {
        Err(Error::NotAWorker(_)) => {}
        Ok(_) => panic!("attach adopted a socket this process owns"),
        Err(e) => panic!("unexpected error {e}"),
    }
    // The socket is still ours and open.
    (&a).write_all(b"still mine").unwrap();
    let mut buf = [0u8; 10];
    (&b).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still mine");
    assert_eq!(std::env::var(clusterphone::ENV_FD).unwrap(), OWN_SOCKET_FD.to_string(), "the environment is untouched");
}
