//! The worker events a master reports, recorded; a master that records them
//! and talks to the echo worker; and the echo worker.
//!
//! Shared by the tests that watch what a master reports about its workers
//! (misbehaving peers, faults, bounds, lifecycles): each worker's events, its
//! exit, its echo.

use std::cell::RefCell;
use std::collections::HashSet;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Config, DisconnectReason, Exit, Message, ProtocolError, Reactor, WorkerEvent, WorkerId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{serve, settle, worker_command, LIMIT};

/// The outcomes an acked send's callback saw, in order.
pub type Outcomes<T> = Rc<RefCell<Vec<Result<T, AckError>>>>;

/// Answers `echo` (a `u64`) with its payload, as [`Master::echo`] expects.
pub fn on_echo(r: &mut Reactor) {
    r.on("echo", |_r, m: Message<u64>| {
        let _ = m.reply.ok(&m.payload);
    })
    .unwrap();
}

/// The well-behaved worker: answers `echo` until its master goes.
pub fn echo_worker() {
    let mut r = Reactor::attach().expect("attach");
    on_echo(&mut r);
    serve(&mut r);
}

/// A worker event, recorded.
#[derive(Debug, Clone)]
#[allow(dead_code)] // The texts are read through `Debug`.
pub enum Ev {
    Ready,
    Protocol(ProtocolError),
    Hangup,
    Io(String),
    Exited(Exit),
    /// Any other event (or disconnection reason), as `Debug` shows it.
    Other(String),
}

impl Ev {
    fn of(e: &WorkerEvent) -> Ev {
        match e {
            WorkerEvent::Ready => Ev::Ready,
            WorkerEvent::Disconnected(DisconnectReason::Protocol(p)) => Ev::Protocol(p.clone()),
            WorkerEvent::Disconnected(DisconnectReason::Hangup) => Ev::Hangup,
            WorkerEvent::Disconnected(DisconnectReason::Io(e)) => Ev::Io(e.to_string()),
            WorkerEvent::Exited(exit) => Ev::Exited(*exit),
            other => Ev::Other(format!("{other:?}")),
        }
    }

    /// Whether this is a `WorkerEvent::Disconnected`, whatever the reason.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Ev::Protocol(_) | Ev::Hangup | Ev::Io(_) => true,
            Ev::Other(text) => text.starts_with("Disconnected"),
            Ev::Ready | Ev::Exited(_) => false,
        }
    }
}

/// Every worker event a master reported, in order. Clones share the record.
#[derive(Clone, Default)]
pub struct Events(Rc<RefCell<Vec<(WorkerId, Ev)>>>);

impl Events {
    /// Records every worker event `r` reports from now on (replacing any
    /// other worker-event hook).
    pub fn record(r: &mut Reactor) -> Events {
        Events::install(r, false)
    }

    /// As [`Events::record`], and fails the test (from inside `poll`) if an
    /// exit comes without its status.
    pub fn record_with_statuses(r: &mut Reactor) -> Events {
        Events::install(r, true)
    }

    fn install(r: &mut Reactor, statuses: bool) -> Events {
        let events = Events::default();
        let log = events.clone();
        r.on_worker_event(move |_r, id, e| {
            if let (true, WorkerEvent::Exited(exit)) = (statuses, e) {
                exit.status.expect("exit status");
            }
            log.0.borrow_mut().push((id, Ev::of(e)));
        });
        events
    }

    /// Every event so far, in order.
    pub fn all(&self) -> Vec<(WorkerId, Ev)> {
        self.0.borrow().clone()
    }

    /// Every event of worker `w` so far, in order.
    pub fn of(&self, w: WorkerId) -> Vec<Ev> {
        self.0.borrow().iter().filter(|(id, _)| *id == w).map(|(_, e)| e.clone()).collect()
    }

    /// Whether worker `w` has an event that satisfies `what`.
    pub fn has(&self, w: WorkerId, what: impl Fn(&Ev) -> bool) -> bool {
        self.0.borrow().iter().any(|(id, e)| *id == w && what(e))
    }

    /// The workers that have an event that satisfies `what`.
    pub fn workers_with(&self, what: impl Fn(&Ev) -> bool) -> HashSet<WorkerId> {
        self.0.borrow().iter().filter(|(_, e)| what(e)).map(|(id, _)| *id).collect()
    }

    /// Whether worker `w`'s exit was reported.
    pub fn exited(&self, w: WorkerId) -> bool {
        self.has(w, |e| matches!(e, Ev::Exited(_)))
    }

    /// Worker `w`'s (first) reported exit.
    pub fn exit_of(&self, w: WorkerId) -> Option<Exit> {
        self.of(w).into_iter().find_map(|e| if let Ev::Exited(exit) = e { Some(exit) } else { None })
    }

    /// Every exit reported so far, in order.
    pub fn exits(&self) -> Vec<(WorkerId, Exit)> {
        self.0
            .borrow()
            .iter()
            .filter_map(|(id, e)| if let Ev::Exited(x) = e { Some((*id, *x)) } else { None })
            .collect()
    }

    /// The protocol errors worker `w` was disconnected for.
    pub fn protocol_errors_of(&self, w: WorkerId) -> Vec<ProtocolError> {
        self.of(w).into_iter().filter_map(|e| if let Ev::Protocol(p) = e { Some(p) } else { None }).collect()
    }

    /// Polls `r` until worker `w` has an event that satisfies `what`, failing
    /// the test after [`LIMIT`].
    #[track_caller]
    pub fn wait_for(&self, r: &mut Reactor, w: WorkerId, what: impl Fn(&Ev) -> bool) {
        let end = Instant::now() + LIMIT;
        while !self.has(w, &what) {
            assert!(
                Instant::now() < end,
                "worker {w}: the awaited event did not come within {LIMIT:?}; its events: {:?}",
                self.of(w)
            );
            r.poll(Some(Duration::from_millis(10))).expect("poll");
        }
    }

    /// Polls `r` until worker `w`'s exit is reported; that exit.
    #[track_caller]
    pub fn wait_exit(&self, r: &mut Reactor, w: WorkerId) -> Exit {
        self.wait_for(r, w, |e| matches!(e, Ev::Exited(_)));
        self.exit_of(w).unwrap()
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.borrow().fmt(f)
    }
}

/// A master reactor with every worker event recorded (every exit with its
/// status).
pub struct Master {
    pub r: Reactor,
    pub events: Events,
}

impl Master {
    pub fn new(config: Config) -> Master {
        let mut r = Reactor::master_with(config).expect("master");
        let events = Events::record_with_statuses(&mut r);
        Master { r, events }
    }

    /// Spawns a worker playing `role` (without waiting for its hello).
    pub fn spawn(&mut self, role: &str) -> WorkerId {
        self.r.spawn(worker_command(role)).expect("spawn")
    }

    /// Every event of worker `w` so far, in order.
    pub fn events_of(&self, w: WorkerId) -> Vec<Ev> {
        self.events.of(w)
    }

    /// The protocol errors worker `w` was disconnected for.
    pub fn protocol_errors_of(&self, w: WorkerId) -> Vec<ProtocolError> {
        self.events.protocol_errors_of(w)
    }

    /// Polls until worker `w` has an event that satisfies `what`.
    #[track_caller]
    pub fn wait_event(&mut self, w: WorkerId, what: impl Fn(&Ev) -> bool) {
        self.events.wait_for(&mut self.r, w, what);
    }

    /// Waits for worker `w` to exit; its exit.
    #[track_caller]
    pub fn exit_of(&mut self, w: WorkerId) -> Exit {
        self.events.wait_exit(&mut self.r, w)
    }

    /// Waits for worker `w` to exit, lets any duplicate event show up, and
    /// checks that it exited exactly once.
    #[track_caller]
    pub fn wait_exit(&mut self, w: WorkerId) -> ExitStatus {
        self.exit_of(w);
        self.settle();
        let exits: Vec<Exit> =
            self.events_of(w).into_iter().filter_map(|e| if let Ev::Exited(x) = e { Some(x) } else { None }).collect();
        assert_eq!(exits.len(), 1, "one exit per worker: {:?}", self.events_of(w));
        exits[0].status.expect("exit status")
    }

    /// A few more turns, to let any duplicate outcome or event show up.
    #[track_caller]
    pub fn settle(&mut self) {
        settle(&mut self.r, 5);
    }

    /// Sends `cmd` to `w` asking for an ack within `within`; the returned
    /// list collects the outcomes.
    pub fn send_acked<P, R>(&mut self, w: WorkerId, cmd: &str, payload: &P, within: Duration) -> Outcomes<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        let outcomes: Outcomes<R> = Rc::default();
        let o = outcomes.clone();
        self.r
            .send_to(w, cmd, payload, None)
            .within(within)
            .ackd(move |_r, res: Result<R, AckError>| o.borrow_mut().push(res))
            .expect("acked send");
        outcomes
    }

    /// Asks the echo worker `w` to echo `n`.
    #[track_caller]
    pub fn echo(&mut self, w: WorkerId, n: u64) {
        let got: u64 = self.r.request(w, "echo", &n, LIMIT).expect("the echo worker answers");
        assert_eq!(got, n);
    }

    /// Worker `w` saw nothing but its own start.
    #[track_caller]
    pub fn assert_untouched(&self, w: WorkerId) {
        let evs = self.events_of(w);
        assert!(evs.iter().all(|e| matches!(e, Ev::Ready)), "a well-behaved worker was disturbed: {evs:?}");
    }

    /// Asks every worker to exit, waits for each, checks that those in
    /// `clean` (raw peers that check their own side) exited with success, and
    /// shuts down.
    #[track_caller]
    pub fn finish(mut self, clean: &[WorkerId]) {
        for id in self.r.workers() {
            let _ = self.r.request_exit(id, Duration::from_secs(2));
        }
        for &id in clean {
            let status = self.exit_of(id).status;
            assert!(status.is_some_and(|s| s.success()), "worker {id}'s own checks failed: {status:?}");
        }
        self.r.shutdown(Duration::from_secs(2)).expect("shutdown");
        assert!(self.r.workers().is_empty());
    }
}
