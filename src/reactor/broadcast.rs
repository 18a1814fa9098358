//! One command to many workers, with every worker's outcome gathered into
//! one callback.

use super::*;
use crate::ack::decode_outcome;

/// Every worker's outcome of a broadcast, in the order of the targets.
pub type Gathered<R> = Vec<(WorkerId, Result<R, AckError>)>;

/// Who gets every outcome at once.
type Gatherer<R> = Box<dyn FnOnce(&mut Reactor, Gathered<R>)>;

/// The outcomes still coming in, and who to call once they are all in.
struct Gather<R> {
    outcomes: Vec<(WorkerId, Option<Result<R, AckError>>)>,
    left: usize,
    done: Option<Gatherer<R>>,
}

impl<R> Gather<R> {
    /// Files outcome `i`; once all are in, hands them over with the callback.
    fn file(&mut self, i: usize, outcome: Result<R, AckError>) -> Option<(Gatherer<R>, Gathered<R>)> {
        self.outcomes[i].1 = Some(outcome);
        self.left -= 1;
        if self.left > 0 {
            return None;
        }
        let done = self.done.take()?;
        let all = self
            .outcomes
            .drain(..)
            .map(|(id, o)| (id, o.unwrap_or_else(|| Err(AckError::NotSent("no outcome".into())))))
            .collect();
        Some((done, all))
    }
}

/// A command about to go to many workers, from [`Reactor::broadcast`].
#[must_use = "a broadcast is sent only by .gather() or .wait()"]
pub struct Broadcast<'a, P> {
    reactor: &'a mut Reactor,
    ns: String,
    cmd: &'a str,
    payload: P,
    to: Option<Vec<WorkerId>>,
    timeout: Option<Duration>,
}

impl Reactor {
    /// Starts one command to every ready worker (or the chosen set, with
    /// [`to`](Broadcast::to)), each asking for an ack, with one deadline for
    /// all and one callback for every outcome: replies, failures, and sends
    /// refused at the call ([`AckError::NotSent`]) alike.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// // Reload every worker's config, and learn who did.
    /// reactor.broadcast("reload", &"config-v2").within(Duration::from_secs(2)).gather(|_r, outcomes| {
    ///     for (worker, outcome) in outcomes {
    ///         let outcome: Result<(), _> = outcome;
    ///         println!("{worker}: {outcome:?}");
    ///     }
    /// })?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn broadcast<'a, P: Payload + Clone>(&'a mut self, cmd: &'a str, payload: P) -> Broadcast<'a, P> {
        Broadcast { reactor: self, ns: DEFAULT_NAMESPACE.to_owned(), cmd, payload, to: None, timeout: None }
    }
}

impl<'a, P: Payload + Clone> Broadcast<'a, P> {
    /// Sends to these workers instead of every ready one (an unknown or
    /// exited one gets [`AckError::NotSent`]).
    pub fn to(mut self, workers: impl IntoIterator<Item = WorkerId>) -> Self {
        self.to = Some(workers.into_iter().collect());
        self
    }

    /// The deadline of every ack (default: the reactor's ack timeout).
    pub fn within(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// In namespace `ns` instead of the default one.
    pub fn in_namespace(mut self, ns: &str) -> Self {
        self.ns = ns.to_owned();
        self
    }

    /// Sends, and calls `f` once with every outcome, in the order of the
    /// targets: from `poll` when the last one comes in, or before this
    /// returns if none of the sends went out. Returns how many went out.
    ///
    /// # Errors
    /// [`Error::WrongRole`] on a worker; [`Error::EmptyCommand`],
    /// [`Error::EmptyNamespace`], [`Error::ReservedNamespace`] or
    /// [`Error::NameTooLong`] for a bad name (nothing is sent then).
    pub fn gather<R, F>(self, f: F) -> Result<usize, Error>
    where
        R: DeserializeOwned + 'static,
        F: FnOnce(&mut Reactor, Gathered<R>) + 'static,
    {
        let Broadcast { reactor, ns, cmd, payload, to, timeout } = self;
        if reactor.role != Role::Master {
            return Err(Error::WrongRole);
        }
        check_command(cmd)?;
        check_namespace(&ns)?;
        let targets = to.unwrap_or_else(|| reactor.workers().into_iter().filter(|&w| reactor.is_ready(w)).collect());
        let gather = Rc::new(RefCell::new(Gather::<R> {
            outcomes: targets.iter().map(|&id| (id, None)).collect(),
            left: targets.len(),
            done: Some(Box::new(f)),
        }));
        let mut sent = 0;
        let mut finished = None;
        // Written together, as a batch of sends is.
        reactor.depth += 1;
        for (i, &id) in targets.iter().enumerate() {
            let g = gather.clone();
            let done: Completion = Box::new(move |r, o| {
                let finished = g.borrow_mut().file(i, decode_outcome(o));
                if let Some((f, all)) = finished {
                    f(r, all);
                }
            });
            let options = SendOptions { timeout, force_queue: false };
            match reactor.submit(Target::Worker(id), &ns, cmd, payload.clone(), None, options, Some(done)) {
                Ok(()) => sent += 1,
                Err(refused) => {
                    if let Some(all) = gather.borrow_mut().file(i, Err(AckError::NotSent(refused.error.to_string()))) {
                        finished = Some(all);
                    }
                }
            }
        }
        reactor.depth -= 1;
        if reactor.depth == 0 {
            reactor.drain_outbox();
            reactor.flush_dirty();
        }
        if targets.is_empty() {
            finished = gather.borrow_mut().done.take().map(|f| (f, Vec::new()));
        }
        if let Some((f, all)) = finished {
            f(reactor, all);
        }
        Ok(sent)
    }

    /// Sends, and drives `poll` until every outcome is in (blocking).
    ///
    /// # Errors
    /// As [`gather`](Broadcast::gather), [`Error::Reentrant`] inside a
    /// callback, or an error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback run meanwhile.
    pub fn wait<R: DeserializeOwned + 'static>(self) -> Result<Gathered<R>, Error> {
        if self.reactor.in_callback() {
            return Err(Error::Reentrant);
        }
        let slot: Rc<RefCell<Option<Gathered<R>>>> = Rc::default();
        let s = slot.clone();
        let Broadcast { reactor, ns, cmd, payload, to, timeout } = self;
        Broadcast { reactor: &mut *reactor, ns, cmd, payload, to, timeout }
            .gather(move |_r, all| *s.borrow_mut() = Some(all))?;
        loop {
            if let Some(all) = slot.borrow_mut().take() {
                return Ok(all);
            }
            reactor.poll(None)?;
        }
    }
}
