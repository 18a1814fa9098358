//! A master that records every worker event, and the echo worker it talks to.
//!
//! Shared by the tests that watch what a master reports about its workers
//! (misbehaving peers, faults): each worker's events, its exit, its echo.
#![allow(dead_code)]

use std::cell::RefCell;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Config, DisconnectReason, Message, ProtocolError, Reactor, WorkerEvent, WorkerId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{poll_until, serve};

/// How long any one step (a reply, an event, an exit) may take.
pub const LIMIT: Duration = Duration::from_secs(10);

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
    Exited(ExitStatus),
    Other(String),
}

/// A master reactor with every worker event logged.
pub struct Master {
    pub r: Reactor,
    pub events: Rc<RefCell<Vec<(WorkerId, Ev)>>>,
}

impl Master {
    pub fn new(config: Config) -> Master {
        let mut r = Reactor::master_with(config).expect("master");
        let events: Rc<RefCell<Vec<(WorkerId, Ev)>>> = Rc::default();
        let log = events.clone();
        r.on_worker_event(move |_r, id, e| {
            let ev = match e {
                WorkerEvent::Ready => Ev::Ready,
                WorkerEvent::Disconnected(DisconnectReason::Protocol(p)) => Ev::Protocol(p.clone()),
                WorkerEvent::Disconnected(DisconnectReason::Hangup) => Ev::Hangup,
                WorkerEvent::Disconnected(DisconnectReason::Io(e)) => Ev::Io(e.to_string()),
                WorkerEvent::Exited(s) => Ev::Exited(s.status.expect("exit status")),
                other => Ev::Other(format!("{other:?}")),
            };
            log.borrow_mut().push((id, ev));
        });
        Master { r, events }
    }

    /// Every event of worker `w` so far, in order.
    pub fn events_of(&self, w: WorkerId) -> Vec<Ev> {
        self.events.borrow().iter().filter(|(id, _)| *id == w).map(|(_, e)| e.clone()).collect()
    }

    /// The protocol errors worker `w` was disconnected for.
    pub fn protocol_errors_of(&self, w: WorkerId) -> Vec<ProtocolError> {
        self.events_of(w).into_iter().filter_map(|e| if let Ev::Protocol(p) = e { Some(p) } else { None }).collect()
    }

    /// Polls until worker `w` has an event that satisfies `what`.
    pub fn wait_event(&mut self, w: WorkerId, what: impl Fn(&Ev) -> bool) {
        let events = self.events.clone();
        poll_until(&mut self.r, LIMIT, move |_| events.borrow().iter().any(|(id, e)| *id == w && what(e)));
    }

    /// Waits for worker `w` to exit, lets any duplicate event show up, and
    /// checks that it exited exactly once.
    pub fn wait_exit(&mut self, w: WorkerId) -> ExitStatus {
        self.wait_event(w, |e| matches!(e, Ev::Exited(_)));
        self.settle();
        let exits: Vec<ExitStatus> =
            self.events_of(w).into_iter().filter_map(|e| if let Ev::Exited(s) = e { Some(s) } else { None }).collect();
        assert_eq!(exits.len(), 1, "one exit per worker: {:?}", self.events_of(w));
        exits[0]
    }

    /// A few more turns, to let any duplicate outcome or event show up.
    pub fn settle(&mut self) {
        for _ in 0..5 {
            self.r.poll(Some(Duration::from_millis(10))).expect("poll");
        }
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
    pub fn echo(&mut self, w: WorkerId, n: u64) {
        let got: u64 = self.r.request(w, "echo", &n, LIMIT).expect("the worker answers");
        assert_eq!(got, n);
    }

    /// The normal worker saw nothing but its own start.
    pub fn assert_untouched(&self, w: WorkerId) {
        let evs = self.events_of(w);
        assert!(evs.iter().all(|e| matches!(e, Ev::Ready)), "the normal worker was disturbed: {evs:?}");
    }
}
