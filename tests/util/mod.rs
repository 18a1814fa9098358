//! The shared harness of the multi-process tests.
//!
//! As in ipc-channel's tests, a worker is the test that spawns it, run again:
//! [`worker_command`] re-executes this test binary to run only the current
//! test, with `CP_TEST_ROLE` naming the role to play, and the test declares
//! the code of each role it spawns with [`child`], first thing:
//!
//! ```ignore
//! #[test]
//! fn a_test() {
//!     util::child("echo", echo_worker); // in the worker: runs it, and exits
//!     let mut r = Reactor::master().unwrap(); // in the test: the master
//!     let w = util::spawn_ready(&mut r, "echo");
//!     ...
//! }
//! ```
#![allow(dead_code)]

pub mod alloc;
pub mod events;
pub mod raw;

use std::io::Write;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use clusterphone::{Error, Reactor, WorkerId};

/// How long any one step (a reply, an event, an exit, a worker's hello) may take.
pub const LIMIT: Duration = Duration::from_secs(10);

/// The environment variable naming a worker's role.
pub const ROLE_VAR: &str = "CP_TEST_ROLE";

/// Set once this process, a worker, has found the role it was started for.
static PLAYING: AtomicBool = AtomicBool::new(false);

/// Declares a role the running test spawns: in a worker started for this
/// test to play `role`, runs `code` (under a watchdog, so a stray worker never
/// outlives its test) and ends the process; anywhere else, returns at once.
///
/// A test declares every role it spawns (its workers' own workers too)
/// before anything else, its deadline and locks included: a worker must not
/// run the test's own code.
pub fn child(role: &str, code: impl FnOnce()) {
    if self::role().as_deref() != Some(role) {
        return;
    }
    PLAYING.store(true, Ordering::Relaxed);
    worker_watchdog();
    code();
    std::process::exit(0);
}

/// The name of the running test: libtest names each test's thread after it.
fn this_test() -> String {
    let name = std::thread::current().name().map(str::to_owned);
    match name {
        Some(name) if name != "main" => name,
        _ => panic!("workers are spawned from a test's own thread, which bears the test's name"),
    }
}

/// A command that re-runs the running test, alone, as a worker playing
/// `role` (which the test declares with [`child`]).
#[track_caller]
pub fn worker_command(role: &str) -> Command {
    let test = this_test();
    if let Some(mine) = self::role() {
        assert!(
            PLAYING.load(Ordering::Relaxed),
            "test {test} does not declare the role {mine:?} it was run for: it ran on as a master"
        );
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", &test, "--nocapture", "--test-threads", "1", "-q"]).env(ROLE_VAR, role).stdout(Stdio::null());
    cmd
}

/// The role this process plays, if it is a worker.
fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// Spawns a worker playing `role` and polls until it has said hello.
#[track_caller]
pub fn spawn_ready(r: &mut Reactor, role: &str) -> WorkerId {
    let w = r.spawn(worker_command(role)).expect("spawn");
    poll_until(r, LIMIT, |r| r.is_ready(w));
    w
}

/// Fails the whole test process if the returned guard lives past `limit`:
/// a regression must fail, never hang. Workers see their channel close and exit.
pub fn deadline(limit: Duration) -> Deadline {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    std::thread::spawn(move || {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Straight to stderr: libtest's output capture would swallow eprintln! here.
        let _ = writeln!(std::io::stderr(), "{name}: exceeded its deadline of {limit:?}; aborting");
        std::process::exit(101);
    });
    Deadline { done }
}

/// Guard returned by [`deadline`].
pub struct Deadline {
    done: Arc<AtomicBool>,
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Polls until `cond` holds, failing the test after `limit`.
#[track_caller]
pub fn poll_until(r: &mut Reactor, limit: Duration, mut cond: impl FnMut(&mut Reactor) -> bool) {
    let end = Instant::now() + limit;
    while !cond(r) {
        assert!(Instant::now() < end, "condition not met within {limit:?}");
        r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
}

/// Polls `r` `turns` times, 10 ms at most each: lets late reads, events and
/// outcomes show up.
#[track_caller]
pub fn settle(r: &mut Reactor, turns: usize) {
    for _ in 0..turns {
        r.poll(Some(Duration::from_millis(10))).expect("poll");
    }
}

/// The usual worker main loop: poll until the master goes or asks us to exit.
pub fn serve(r: &mut Reactor) {
    loop {
        match r.poll(Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(Error::Disconnected) | Err(Error::ExitRequested) => break,
            Err(e) => panic!("worker poll failed: {e}"),
        }
    }
    let _ = r.flush(Duration::from_secs(2));
}

/// Starts a worker-side watchdog so a stray worker never outlives its test.
fn worker_watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(102);
    });
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// One lock per test binary, for the tests that measure something
/// process-wide (the heap, open fds) or load the machine.
static PROCESS_WIDE: RwLock<()> = RwLock::new(());

/// Held by a test that must run alone in its binary (among those that take
/// this lock): nobody else allocates, opens fds or starts processes meanwhile.
pub fn alone() -> RwLockWriteGuard<'static, ()> {
    PROCESS_WIDE.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held by tests that may run beside each other, but never beside one that
/// holds [`alone`].
pub fn shared() -> RwLockReadGuard<'static, ()> {
    PROCESS_WIDE.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child process that is killed (if still running) and reaped however the
/// test ends.
pub struct Reaped(pub Child);

impl Reaped {
    /// Its exit status, if it exits within `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
