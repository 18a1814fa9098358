//! The user-facing API: handlers, namespaces, sending, and the worker's hello.

use super::*;

/// Written buffers kept for responders' replies.
const OUTBOX_SPARES: usize = 16;
use crate::raw::RawPayload;
use crate::timer::after;

impl Reactor {
    // ----- handlers -------------------------------------------------------

    /// Registers `handler` for `cmd` in the default namespace, replacing any
    /// handler that was there. The payload is decoded into `T`; a payload that
    /// does not decode is answered with [`AckError::BadPayload`] (or counted
    /// as unhandled if no ack was asked for) and the handler is not called.
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// reactor.on("add", |_reactor, msg: clusterphone::Message<(i64, i64)>| {
    ///     let (a, b) = msg.payload;
    ///     let _ = msg.reply.ok(&(a + b));
    /// })?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyCommand`] or [`Error::NameTooLong`] for a bad command name;
    /// [`Error::TooManyNamespaces`] on a worker past [`Config::max_namespaces`].
    pub fn on<T, F>(&mut self, cmd: &str, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Reactor, Message<T>) + 'static,
    {
        self.on_in(DEFAULT_NAMESPACE, cmd, handler)
    }

    pub(crate) fn on_in<T, F>(&mut self, ns: &str, cmd: &str, mut handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Reactor, Message<T>) + 'static,
    {
        check_command(cmd)?;
        // A master closes a worker that announces more: refuse here, where it
        // is the caller's mistake. The master never forgets a name, so once
        // the hello is out, every name announced counts, removed or not.
        if self.role == Role::Worker {
            let (known, count) = if self.hello_sent {
                (self.announced.contains(ns), self.announced.len())
            } else {
                (self.handlers.has_namespace(ns), self.handlers.namespace_count())
            };
            if !known && count >= self.config.max_namespaces {
                return Err(Error::TooManyNamespaces);
            }
        }
        let wrapped = Box::new(move |r: &mut Reactor, inc: Incoming<'_>| {
            match RawPayload::received_as::<T>(inc.payload)
                .map_or_else(|| crate::codec::decode_cbor::<T>(inc.payload), Ok)
            {
                Ok(payload) => handler(r, Message { from: inc.from, payload, fd: inc.fd, reply: inc.responder }),
                Err(text) => {
                    if inc.responder.wanted() {
                        inc.responder.fail_code(fail::BAD_PAYLOAD, &text);
                    }
                    r.note_unhandled(inc.from, inc.ns, inc.cmd, AckError::BadPayload(text));
                }
            }
        });
        self.handlers.insert(ns, cmd, wrapped);
        if self.role == Role::Worker && self.hello_sent && !self.announced.contains(ns) {
            self.announced.insert(ns.to_owned());
            self.announce_namespace(ns);
        }
        Ok(())
    }

    /// Removes the handler for `cmd` in the default namespace. Returns whether there was one.
    pub fn off(&mut self, cmd: &str) -> bool {
        self.handlers.remove(DEFAULT_NAMESPACE, cmd)
    }

    pub(crate) fn off_in(&mut self, ns: &str, cmd: &str) -> bool {
        self.handlers.remove(ns, cmd)
    }

    /// Whether a handler is registered for `cmd` in namespace `ns`.
    pub fn has_handler(&self, ns: &str, cmd: &str) -> bool {
        self.handlers.contains(ns, cmd)
    }

    /// A view of this reactor inside namespace `name`: the same API, with
    /// handlers and messages kept apart from every other namespace.
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// reactor.ns("myapp")?.on("foo", |_r, _msg: clusterphone::Message<String>| {})?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyNamespace`], [`Error::ReservedNamespace`] or [`Error::NameTooLong`]
    /// (longer than [`MAX_NAMESPACE_LEN`](crate::MAX_NAMESPACE_LEN)).
    pub fn ns(&mut self, name: &str) -> Result<Ns<'_>, Error> {
        check_namespace(name)?;
        Ok(Ns { reactor: self, name: name.to_owned() })
    }

    /// Called for every worker event (ready, disconnected, exited), on the master.
    ///
    /// ```no_run
    /// # use clusterphone::WorkerEvent;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// reactor.on_worker_event(|reactor, id, event| match event {
    ///     WorkerEvent::Ready => println!("{id} is up"),
    ///     WorkerEvent::Disconnected(why) => println!("{id} hung up: {why:?}"),
    ///     WorkerEvent::Exited(status) => {
    ///         println!("{id} exited: {status}; starting another");
    ///         let _ = reactor.spawn(std::process::Command::new("my-worker-binary"));
    ///     }
    ///     _ => {}
    /// });
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn on_worker_event(&mut self, hook: impl FnMut(&mut Reactor, WorkerId, &WorkerEvent) + 'static) {
        self.worker_hook = Some(Box::new(hook));
    }

    /// Called for every message that no handler took (and that asked for no
    /// ack, or whose sender was told why).
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// reactor.on_unhandled(|_reactor, u| eprintln!("nobody handled {}/{} from {:?}: {}", u.namespace, u.command, u.from, u.reason));
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn on_unhandled(&mut self, hook: impl FnMut(&mut Reactor, &Unhandled) + 'static) {
        self.unhandled_hook = Some(Box::new(hook));
    }

    /// Adds a listener for worker events, beside the hook of
    /// [`on_worker_event`](Reactor::on_worker_event) and any other listener:
    /// a library and the application can each keep their own. Listeners run
    /// after the hook, in the order they were added.
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// let key = reactor.add_worker_listener(|_r, id, event| eprintln!("[metrics] {id}: {event:?}"));
    /// // ... later
    /// reactor.remove_listener(key);
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn add_worker_listener(
        &mut self,
        listener: impl FnMut(&mut Reactor, WorkerId, &WorkerEvent) + 'static,
    ) -> ListenerKey {
        self.worker_listeners.add(Box::new(listener))
    }

    /// Adds a listener for unhandled messages, beside the hook of
    /// [`on_unhandled`](Reactor::on_unhandled) and any other listener.
    pub fn add_unhandled_listener(&mut self, listener: impl FnMut(&mut Reactor, &Unhandled) + 'static) -> ListenerKey {
        self.unhandled_listeners.add(Box::new(listener))
    }

    /// Removes a listener (it may be the one running). Returns whether it was there.
    pub fn remove_listener(&mut self, key: ListenerKey) -> bool {
        self.worker_listeners.remove(key) || self.unhandled_listeners.remove(key)
    }

    // ----- sending --------------------------------------------------------

    /// Starts a message to `worker` in the default namespace (master only).
    /// Finish it with `.send()`, `.ackd(..)`, `.handle()` or `.wait()`.
    ///
    /// `fd` travels with the message; the reactor owns it from now on and
    /// closes its copy once sent, or hands it back in the error if the send
    /// is refused.
    ///
    /// ```no_run
    /// # use std::os::fd::OwnedFd;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let worker: clusterphone::WorkerId = todo!();
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let (conn, _) = listener.accept()?;
    /// // Hand the accepted connection to the worker; on refusal the fd comes back.
    /// if let Err(refused) = reactor.send_to(worker, "conn", &(), Some(OwnedFd::from(conn))).send() {
    ///     let _conn_again: Option<OwnedFd> = refused.fd;
    /// }
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn send_to<'a, P: Payload + 'a>(
        &'a mut self,
        worker: WorkerId,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.outgoing(Target::Worker(worker), DEFAULT_NAMESPACE, cmd, payload, fd)
    }

    /// Starts a message to the master in the default namespace (worker only).
    ///
    /// ```no_run
    /// let mut reactor = clusterphone::Reactor::attach()?;
    /// reactor.send_to_master("status", &("up", 42u32), None).send()?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn send_to_master<'a, P: Payload + 'a>(
        &'a mut self,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.outgoing(Target::Master, DEFAULT_NAMESPACE, cmd, payload, fd)
    }

    pub(crate) fn outgoing<'a, P: Payload + 'a>(
        &'a mut self,
        target: Target,
        ns: &'a str,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        let options = SendOptions { timeout: None, force_queue: false };
        Outgoing { reactor: self, target, ns, cmd, payload, fd, options }
    }

    /// Sends a request to `worker` and polls until its reply (blocking).
    /// Not allowed inside a handler.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let worker: clusterphone::WorkerId = todo!();
    /// let sum: u64 = reactor.request(worker, "sum", &[1u64, 2, 3], Duration::from_secs(2))?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// A refused send ([`SendError`]'s error), [`Error::Ack`] with the ack's failure
    /// (including [`AckError::Timeout`]), [`Error::Reentrant`] inside a callback, or
    /// an error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback run meanwhile (see [`poll`](Reactor::poll)).
    pub fn request<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        worker: WorkerId,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to(worker, cmd, payload, None).within(timeout).wait()
    }

    /// Sends a request to the master and polls until its reply (blocking).
    ///
    /// # Errors
    /// As [`request`](Reactor::request); [`Error::WrongRole`] on a master.
    ///
    /// # Panics
    /// As [`request`](Reactor::request).
    pub fn request_master<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to_master(cmd, payload, None).within(timeout).wait()
    }

    /// Runs `f` with writes held back, then writes everything it queued,
    /// coalescing the frames into as few `sendmsg` calls as possible (up to
    /// 64 frames or 1 MiB per call). Use it for bursts of sends: outside a
    /// batch every send is written at once, one system call each. (Sends made
    /// by handlers during `poll` are coalesced the same way automatically.)
    ///
    /// Inside `f`, polling and blocking requests are refused ([`Error::Reentrant`]).
    ///
    /// ```no_run
    /// # fn demo(reactor: &mut clusterphone::Reactor, worker: clusterphone::WorkerId) {
    /// reactor.batch(|r| {
    ///     for i in 0..1000u32 {
    ///         r.send_to(worker, "tick", &i, None).send().unwrap();
    ///     }
    /// });
    /// # }
    /// ```
    ///
    /// # Panics
    /// Resumes a panic of `f`, after writing what it queued.
    pub fn batch<R>(&mut self, f: impl FnOnce(&mut Reactor) -> R) -> R {
        self.depth += 1;
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(&mut *self)));
        self.depth -= 1;
        if self.depth == 0 {
            self.drain_outbox();
            self.flush_dirty();
        }
        match result {
            Ok(r) => r,
            Err(p) => panic::resume_unwind(p),
        }
    }

    /// Sets the default ack timeout. Zero, or more than a day, is refused.
    ///
    /// # Errors
    /// [`Error::InvalidTimeout`] for zero or more than a day.
    pub fn set_ack_timeout(&mut self, timeout: Duration) -> Result<(), Error> {
        self.config.ack_timeout = check_timeout(timeout)?;
        Ok(())
    }

    pub(crate) fn in_callback(&self) -> bool {
        self.depth > 0
    }

    pub(super) fn resolve(&self, target: Target) -> Result<usize, Error> {
        match (self.role, target) {
            (Role::Master, Target::Worker(id)) => match self.link_of(id) {
                Some(l) if l.conn.is_some() && l.exit.is_none() => Ok(id.index()),
                _ => Err(Error::UnknownWorker(id)),
            },
            (Role::Worker, Target::Master) => match self.links.get(0) {
                Some(l) if l.conn.is_some() => Ok(0),
                _ => Err(Error::Disconnected),
            },
            _ => Err(Error::WrongRole),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submit<P: Payload>(
        &mut self,
        target: Target,
        ns: &str,
        cmd: &str,
        payload: P,
        fd: Option<OwnedFd>,
        options: SendOptions,
        done: Option<Completion>,
    ) -> Result<(), SendError> {
        if let Err(e) = check_command(cmd) {
            return Err(SendError::new(e, fd));
        }
        let timeout = match options.timeout.map(check_timeout) {
            None => self.config.ack_timeout,
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(SendError::new(e, fd)),
        };
        self.drain_outbox();
        if self.role == Role::Worker {
            self.ensure_hello();
        }
        let key = match self.resolve(target) {
            Ok(k) => k,
            Err(e) => return Err(SendError::new(e, fd)),
        };
        let (max_frame, max_bytes, max_fds) =
            (self.config.max_frame, self.config.max_queue_bytes, self.config.max_queue_fds);
        let link = &mut self.links[key];
        let id = link.id;
        if fd.is_some() && !link.ready && !options.force_queue {
            return Err(SendError::new(Error::NotReady(id), fd));
        }
        let Some(conn) = link.conn.as_mut() else { return Err(SendError::new(Error::UnknownWorker(id), fd)) };
        if conn.queued_mem() >= max_bytes || (fd.is_some() && conn.queued_fds() >= max_fds) {
            return Err(SendError::new(Error::QueueFull, fd));
        }
        let seq = link.next_seq;
        let flags = if done.is_some() { codec::FLAG_ACK } else { 0 };
        let env = Envelope { kind: Kind::Message, flags, nfds: u8::from(fd.is_some()), seq, ns, cmd };
        let mut buf = conn.buffer();
        let tail = match payload.encode_frame(&mut buf, env) {
            Ok(tail) => tail,
            Err(e) => {
                conn.recycle(buf);
                return Err(SendError::new(e, fd));
            }
        };
        let size = buf.len() + tail.len();
        let charge = Conn::charge_of(&buf, &tail, done.is_some());
        if size > max_frame || charge > max_bytes {
            conn.recycle(buf);
            let max = max_frame.min(max_bytes.saturating_sub(charge - size));
            return Err(SendError::new(Error::FrameTooLarge { size, max }, fd));
        }
        if conn.queued_mem() + charge > max_bytes {
            conn.recycle(buf);
            cp_log!(Debug, "queue to {id:?} full: send of {cmd:?} refused");
            return Err(SendError::new(Error::QueueFull, fd));
        }
        link.next_seq += 1;
        let deadline = done.as_ref().map(|_| after(timeout));
        let qseq = conn.push(buf, tail, fd, deadline);
        if let (Some(done), Some(deadline)) = (done, deadline) {
            let ack = self.acks.vacant_key();
            self.ack_serial += 1;
            let serial = self.ack_serial;
            let timer = self.timers.insert(deadline, Timer::Ack(ack, serial));
            self.acks.insert(PendingAck { serial, link: id, seq, qseq, timer, done });
            link.pending.insert(seq, ack);
        }
        self.stats.messages_sent += 1;
        self.after_push(key);
        Ok(())
    }

    /// Writes a link's queue now if that is allowed (outside callbacks), else
    /// marks it for the flush at the end of the batch.
    pub(super) fn after_push(&mut self, key: usize) {
        self.mark_dirty(key);
        if self.depth == 0 {
            self.flush_dirty();
        }
    }

    /// Marks a link for the next `flush_dirty`, so that frames queued together
    /// leave in one `sendmsg`.
    pub(super) fn mark_dirty(&mut self, key: usize) {
        let Some(link) = self.links.get_mut(key) else { return };
        if !link.ready || link.dirty || link.exit.is_some() || link.conn.as_ref().is_none_or(|c| c.blocked) {
            return;
        }
        link.dirty = true;
        self.dirty.push(key);
    }

    /// Writes what the socket takes. Failures are recorded and handled by
    /// the next `poll`, so user callbacks never run inside a send.
    pub(super) fn flush_link(&mut self, key: usize) {
        let Some(link) = self.links.get_mut(key) else { return };
        link.dirty = false;
        // Nobody reads an exited worker's socket: writing could only fail.
        if !link.ready || link.exit.is_some() {
            return;
        }
        let id = link.id;
        let Some(conn) = link.conn.as_mut() else { return };
        let (before, calls_before) = (conn.frames_written, conn.write_calls);
        let bytes_before = conn.bytes_written;
        let r = conn.flush();
        // Writable edges are needed while the socket is full; otherwise only
        // if the user wants the wake-ups (see `WritableWakeups`).
        let wrote = conn.bytes_written - bytes_before;
        let wanted = match self.config.writable_wakeups {
            WritableWakeups::Never => false,
            WritableWakeups::Always => true,
            // A flush that wrote nothing changes nothing.
            WritableWakeups::AfterWritesOf(_) if wrote == 0 => conn.wakeups_wanted,
            WritableWakeups::AfterWritesOf(min) => wrote >= min as u64,
        };
        conn.wakeups_wanted = wanted;
        let want = wanted || matches!(r, Ok(Flushed::Blocked));
        if want != conn.write_interest {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            match self.poll.registry().reregister(&mut conn.stream, Source::Channel(key).token(), interest) {
                Ok(()) => conn.write_interest = want,
                // Without the writable edge the queue would stall: treat as broken.
                Err(e) => self.broken.push((id, e)),
            }
        }
        self.stats.frames_written += conn.frames_written - before;
        self.stats.write_calls += conn.write_calls - calls_before;
        self.stats.bytes_written += conn.bytes_written - bytes_before;
        match r {
            Ok(Flushed::All) | Ok(Flushed::Blocked) => {}
            Ok(Flushed::TooManyRefs) => {
                self.stats.fd_backpressure += 1;
                if link.retry_timer.is_none() {
                    link.retry_timer = Some(self.timers.insert(Instant::now() + WRITE_RETRY, Timer::WriteRetry(id)));
                }
            }
            Err(e) => self.broken.push((id, e)),
        }
        self.maybe_resume(key);
    }

    pub(super) fn flush_dirty(&mut self) {
        while let Some(key) = self.dirty.pop() {
            self.flush_link(key);
        }
    }

    /// Moves replies queued by responders into their links' queues.
    pub(super) fn drain_outbox(&mut self) {
        if self.outbox.borrow().frames.is_empty() {
            return;
        }
        // Swap with a kept vector, so neither allocates again.
        let mut frames = std::mem::take(&mut self.outbox_scratch);
        std::mem::swap(&mut frames, &mut self.outbox.borrow_mut().frames);
        for (id, buf, tail) in frames.drain(..) {
            let Some(link) = self.link_of_mut(id) else { continue };
            let Some(conn) = link.conn.as_mut() else { continue };
            conn.push(buf, tail, None, None);
            // Hand a written buffer back for the next reply: replies are encoded
            // by responders, outside any connection's pool.
            let spare = conn.spare_buffer();
            self.stats.acks_sent += 1;
            // Every caller flushes after draining: replies to one read batch
            // share a write call.
            self.mark_dirty(id.index());
            if let Some(spare) = spare {
                let mut outbox = self.outbox.borrow_mut();
                if outbox.spare.len() < OUTBOX_SPARES {
                    outbox.spare.push(spare);
                }
            }
        }
        self.outbox_scratch = frames;
    }

    // ----- worker side ----------------------------------------------------

    pub(crate) fn ensure_hello(&mut self) {
        if self.hello_sent {
            return;
        }
        self.hello_sent = true;
        let namespaces = self.handlers.namespaces();
        self.announced = namespaces.iter().cloned().collect();
        self.push_control(0, Kind::Hello, "", &(PROTOCOL_VERSION, namespaces));
    }

    pub(super) fn announce_namespace(&mut self, ns: &str) {
        self.push_control(0, Kind::Namespace, ns, &());
    }

    /// Queues a control frame on link `key` (no ack, no fd).
    pub(super) fn push_control<T: Serialize + ?Sized>(&mut self, key: usize, kind: Kind, ns: &str, body: &T) {
        let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) else { return };
        let mut buf = conn.buffer();
        let env = Envelope { kind, flags: 0, nfds: 0, seq: 0, ns, cmd: "" };
        if codec::encode(&mut buf, env, body).is_ok() {
            conn.push(buf, Vec::new(), None, None);
            self.after_push(key);
        }
    }
}

pub(crate) fn check_timeout(t: Duration) -> Result<Duration, Error> {
    if t.is_zero() || t > MAX_TIMEOUT {
        Err(Error::InvalidTimeout)
    } else {
        Ok(t)
    }
}
