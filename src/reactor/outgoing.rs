//! Sending: the message builder, and waiting for an acknowledgement.

use super::*;
use crate::ack::{decode_outcome, AckHandle};

/// Delivers an ack's outcome, exactly once: a user callback, or a handle's slot.
pub(crate) type Completion = Box<dyn FnOnce(&mut Reactor, Outcome<'_>)>;

impl<R: DeserializeOwned + 'static> AckHandle<R> {
    /// A handle and the completion that fills it (decoding the reply as it arrives).
    pub(crate) fn new() -> (AckHandle<R>, Completion) {
        let slot = Rc::new(RefCell::new(None));
        let fill = slot.clone();
        let done: Completion = Box::new(move |_r, o| *fill.borrow_mut() = Some(decode_outcome(o)));
        (AckHandle { slot }, done)
    }

    /// Drives `reactor.poll` until the outcome is in. The ack timeout bounds the wait.
    ///
    /// # Errors
    /// [`Error::Ack`] with the ack's failure, or an error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback run meanwhile.
    pub fn wait(self, reactor: &mut Reactor) -> Result<R, Error> {
        loop {
            if let Some(o) = self.take() {
                return o.map_err(Error::Ack);
            }
            reactor.poll(None)?;
        }
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Worker(WorkerId),
    Master,
}

/// Per-message options gathered by the builder.
pub(crate) struct SendOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) force_queue: bool,
}

/// A message about to be sent. Nothing is encoded or queued until one of
/// [`send`](Outgoing::send), [`ackd`](Outgoing::ackd),
/// [`handle`](Outgoing::handle) or [`wait`](Outgoing::wait) is called.
///
/// ```no_run
/// # use clusterphone::{Reactor, AckError};
/// # use std::time::Duration;
/// # fn demo(reactor: &mut Reactor, worker: clusterphone::WorkerId) -> Result<(), clusterphone::Error> {
/// // Fire and forget: no ack frame ever comes back.
/// reactor.send_to(worker, "log", &"hello", None).send()?;
/// // Ask for an ack within 500 ms, answered from `poll`.
/// reactor
///     .send_to(worker, "hello", &(), None)
///     .within(Duration::from_millis(500))
///     .ackd(|_reactor, reply: Result<String, AckError>| println!("{reply:?}"))?;
/// # Ok(()) }
/// ```
#[must_use = "a message is sent only by .send(), .ackd(), .handle() or .wait()"]
pub struct Outgoing<'a, P> {
    pub(crate) reactor: &'a mut Reactor,
    pub(crate) target: Target,
    pub(crate) ns: &'a str,
    pub(crate) cmd: &'a str,
    pub(crate) payload: P,
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) options: SendOptions,
}

impl<P: Payload> Outgoing<'_, P> {
    /// Sets this message's ack timeout (default: the reactor's, 10 s).
    pub fn within(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Queues an fd for a worker that has not said hello yet, instead of
    /// refusing it. The fd is closed if the worker dies before it is sent.
    pub fn force_queue(mut self) -> Self {
        self.options.force_queue = true;
        self
    }

    /// Sends without asking for an acknowledgement.
    ///
    /// # Errors
    /// A [`SendError`] that hands the fd back: [`Error::UnknownWorker`] (no such live
    /// worker), [`Error::Disconnected`] (worker: the master is gone), [`Error::NotReady`]
    /// (an fd before the worker's hello, without `force_queue`), [`Error::QueueFull`],
    /// [`Error::FrameTooLarge`], [`Error::Encode`], [`Error::EmptyCommand`],
    /// [`Error::InvalidTimeout`] or [`Error::WrongRole`]. A refused send never calls a callback.
    pub fn send(self) -> Result<(), SendError> {
        let Outgoing { reactor, target, ns, cmd, payload, fd, options } = self;
        reactor.submit(target, ns, cmd, payload, fd, options, None)
    }

    /// Sends and calls `f` from `poll` with the reply or the failure, exactly once.
    ///
    /// # Errors
    /// As [`send`](Outgoing::send); `f` is then never called.
    pub fn ackd<R, F>(self, f: F) -> Result<(), SendError>
    where
        R: DeserializeOwned,
        F: FnOnce(&mut Reactor, Result<R, AckError>) + 'static,
    {
        let Outgoing { reactor, target, ns, cmd, payload, fd, options } = self;
        let done: Completion = Box::new(move |r, o| f(r, decode_outcome(o)));
        reactor.submit(target, ns, cmd, payload, fd, options, Some(done))
    }

    /// As [`ackd`](Outgoing::ackd), and hands back the message's fd with a
    /// failed outcome if it never left: the message timed out while queued,
    /// or its worker went before it was written. A prefork master can pass
    /// the connection to another worker instead of losing it.
    ///
    /// ```no_run
    /// # use std::os::fd::OwnedFd;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let (worker, conn): (clusterphone::WorkerId, OwnedFd) = todo!();
    /// reactor.send_to(worker, "conn", &(), Some(conn)).ackd_fd(|reactor, outcome: Result<(), _>, fd| {
    ///     if let (Err(_), Some(conn)) = (outcome, fd) {
    ///         // Never reached that worker: hand it to another one.
    ///         # let other: clusterphone::WorkerId = todo!();
    ///         let _ = reactor.send_to(other, "conn", &(), Some(conn)).send();
    ///     }
    /// })?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`send`](Outgoing::send); `f` is then never called (the fd is in the error).
    pub fn ackd_fd<R, F>(self, f: F) -> Result<(), SendError>
    where
        R: DeserializeOwned,
        F: FnOnce(&mut Reactor, Result<R, AckError>, Option<OwnedFd>) + 'static,
    {
        let Outgoing { reactor, target, ns, cmd, payload, fd, options } = self;
        let done: Completion = Box::new(move |r, o| {
            let fd = r.fd_back.take();
            f(r, decode_outcome(o), fd)
        });
        reactor.submit(target, ns, cmd, payload, fd, options, Some(done))
    }

    /// Sends and returns a handle to check for the outcome later.
    ///
    /// # Errors
    /// As [`send`](Outgoing::send).
    pub fn handle<R: DeserializeOwned + 'static>(self) -> Result<AckHandle<R>, SendError> {
        let Outgoing { reactor, target, ns, cmd, payload, fd, options } = self;
        let (handle, done) = AckHandle::new();
        reactor.submit(target, ns, cmd, payload, fd, options, Some(done))?;
        Ok(handle)
    }

    /// Sends and drives `poll` until the reply or the failure (blocking).
    /// Not allowed inside a handler ([`Error::Reentrant`]).
    /// If the send is refused, the fd (if any) is closed: use `.handle()` or
    /// `.send()` to get it back in [`SendError::fd`].
    ///
    /// # Errors
    /// As [`send`](Outgoing::send) (the fd is closed), [`Error::Ack`] with the ack's
    /// failure, [`Error::Reentrant`] inside a callback, or an error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback run meanwhile.
    pub fn wait<R: DeserializeOwned + 'static>(self) -> Result<R, Error> {
        if self.reactor.in_callback() {
            return Err(Error::Reentrant);
        }
        let Outgoing { reactor, target, ns, cmd, payload, fd, options } = self;
        let (handle, done) = AckHandle::<R>::new();
        reactor.submit(target, ns, cmd, payload, fd, options, Some(done))?;
        handle.wait(reactor)
    }
}
