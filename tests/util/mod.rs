//! Shared helpers for the multi-process tests.
//!
//! Workers are this very test binary, re-executed to run only its
//! `worker_entry` test with `CP_TEST_ROLE` naming the role to play.
#![allow(dead_code)]

pub mod events;
pub mod raw;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterphone::{Error, Reactor};

/// The environment variable naming a worker's role.
pub const ROLE_VAR: &str = "CP_TEST_ROLE";

/// A command that re-runs this test binary as a worker playing `role`.
pub fn worker_command(role: &str) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "worker_entry", "--nocapture", "--test-threads", "1", "-q"])
        .env(ROLE_VAR, role)
        .stdout(Stdio::null());
    cmd
}

/// The role this process plays, if it is a worker.
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
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
pub fn poll_until(r: &mut Reactor, limit: Duration, mut cond: impl FnMut(&mut Reactor) -> bool) {
    let end = Instant::now() + limit;
    while !cond(r) {
        assert!(Instant::now() < end, "condition not met within {limit:?}");
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
pub fn worker_watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(102);
    });
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}
