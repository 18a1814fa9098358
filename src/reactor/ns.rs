//! A view of the reactor inside one namespace.

use super::*;

/// The reactor's API inside one namespace, from [`Reactor::ns`].
///
/// ```no_run
/// # use clusterphone::Message;
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// let mut metrics = reactor.ns("metrics")?;
/// metrics.on("report", |_r, msg: Message<u64>| println!("{}", msg.payload))?;
/// metrics.send_to(worker, "reset", &(), None).send()?;
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct Ns<'r> {
    pub(super) reactor: &'r mut Reactor,
    pub(super) name: String,
}

impl Ns<'_> {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The reactor behind this view.
    pub fn reactor(&mut self) -> &mut Reactor {
        self.reactor
    }

    /// Registers a handler in this namespace (see [`Reactor::on`]).
    ///
    /// # Errors
    /// As [`Reactor::on`].
    pub fn on<T, F>(&mut self, cmd: &str, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Reactor, Message<T>) + 'static,
    {
        self.reactor.on_in(&self.name, cmd, handler)
    }

    /// Removes a handler from this namespace.
    pub fn off(&mut self, cmd: &str) -> bool {
        self.reactor.off_in(&self.name, cmd)
    }

    /// Starts a message to `worker` in this namespace (see [`Reactor::send_to`]).
    pub fn send_to<'a, P: Payload + 'a>(
        &'a mut self,
        worker: WorkerId,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.reactor.outgoing(Target::Worker(worker), &self.name, cmd, payload, fd)
    }

    /// Starts a message to the master in this namespace.
    pub fn send_to_master<'a, P: Payload + 'a>(
        &'a mut self,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.reactor.outgoing(Target::Master, &self.name, cmd, payload, fd)
    }

    /// Blocking request to `worker` in this namespace.
    ///
    /// # Errors
    /// As [`Reactor::request`].
    ///
    /// # Panics
    /// As [`Reactor::request`].
    pub fn request<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        worker: WorkerId,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to(worker, cmd, payload, None).within(timeout).wait()
    }

    /// Blocking request to the master in this namespace.
    ///
    /// # Errors
    /// As [`Reactor::request_master`].
    ///
    /// # Panics
    /// As [`Reactor::request`].
    pub fn request_master<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to_master(cmd, payload, None).within(timeout).wait()
    }
}
