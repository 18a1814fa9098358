//! Reading frames, dispatching them to handlers, settling acks, firing timers.

use super::*;
use crate::timer::after;

impl Reactor {
    /// Reads and dispatches frames from one link, within the fairness budget.
    ///
    /// With `stop_when_drained`, a read that fills less than its buffer and
    /// brings no fd ends the loop: on a Unix stream socket (no SO_PASSCRED)
    /// such a short read means the receive queue was empty, and any later data
    /// raises a new epoll edge, so the usual extra `recvmsg` (EAGAIN) would be
    /// wasted. A read that brought fds may have stopped early, so it reads on.
    pub(super) fn read_link(&mut self, key: usize, stop_when_drained: bool) {
        let mut budget = self.config.frames_per_poll.max(1);
        let mut dispatched = false;
        let mut stop_after_dispatch = false;
        loop {
            if self.panic.is_some() {
                self.backlog.push(key);
                return;
            }
            let Some(link) = self.links.get_mut(key) else { return };
            let id = link.id;
            let Some(conn) = link.conn.as_mut() else { return };
            let mut decoder = std::mem::replace(&mut conn.decoder, codec::Decoder::new(0, 0));
            let mut failure = None;
            loop {
                if budget == 0 || self.panic.is_some() {
                    break;
                }
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        budget -= 1;
                        dispatched = true;
                        self.stats.frames_read += 1;
                        if let Err(e) = self.dispatch(key, id, frame) {
                            failure = Some(e);
                            break;
                        }
                        if !self.link_alive(key, id) {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failure {
                drop(decoder);
                self.protocol_error(key, e);
                return;
            }
            let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) else { return };
            conn.decoder = decoder;
            if budget == 0 || self.panic.is_some() {
                self.backlog.push(key);
                return;
            }
            if dispatched {
                // Send the replies to this batch before the next read (usually
                // EAGAIN): the peer is waiting for them.
                self.drain_outbox();
                self.flush_dirty();
                dispatched = false;
            }
            if stop_after_dispatch {
                return;
            }
            let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) else { return };
            let bytes_before = conn.bytes_read;
            let r = conn.read();
            self.stats.bytes_read += conn.bytes_read - bytes_before;
            match r {
                Ok(Read::Data { drained }) => {
                    if drained && stop_when_drained {
                        stop_after_dispatch = true;
                    }
                    continue;
                }
                Ok(Read::WouldBlock) => return,
                Ok(Read::Eof) => {
                    let mid = conn.decoder.is_mid_frame();
                    if mid {
                        self.stats.protocol_errors += 1;
                        self.hangup(key, DisconnectReason::Protocol(ProtocolError::Truncated));
                    } else {
                        self.hangup(key, DisconnectReason::Hangup);
                    }
                    return;
                }
                Ok(Read::FdsLost) => {
                    self.protocol_error(key, ProtocolError::MissingFds);
                    return;
                }
                Err(e) => {
                    let reason = if e.kind() == io::ErrorKind::ConnectionReset {
                        DisconnectReason::Hangup
                    } else {
                        DisconnectReason::Io(e)
                    };
                    self.hangup(key, reason);
                    return;
                }
            }
        }
    }

    pub(super) fn link_alive(&self, key: usize, id: WorkerId) -> bool {
        self.links.get(key).is_some_and(|l| l.id == id && l.conn.is_some())
    }

    pub(super) fn peer_of(&self, id: WorkerId) -> Peer {
        match self.role {
            Role::Master => Peer::Worker(id),
            Role::Worker => Peer::Master,
        }
    }

    pub(super) fn dispatch(&mut self, key: usize, id: WorkerId, frame: Frame<'_>) -> Result<(), ProtocolError> {
        match frame.kind {
            Kind::Message => self.dispatch_message(key, id, frame),
            Kind::Reply | Kind::Fail => {
                self.stats.acks_received += 1;
                let link = &mut self.links[key];
                match link.pending.remove(&frame.seq) {
                    Some(ack) => {
                        let outcome = if frame.kind == Kind::Reply {
                            Ok(frame.payload)
                        } else {
                            Err(fail_to_error(frame.payload))
                        };
                        self.settle(ack, outcome);
                        Ok(())
                    }
                    None if frame.seq > 0 && frame.seq < link.next_seq => {
                        self.stats.late_acks += 1;
                        Ok(())
                    }
                    None => Err(ProtocolError::UnknownSequence(frame.seq)),
                }
            }
            Kind::Hello => self.dispatch_hello(key, frame),
            Kind::Namespace => {
                if self.role != Role::Master || !self.links[key].ready {
                    return Err(ProtocolError::UnexpectedFrame("namespace"));
                }
                let link = &mut self.links[key];
                if !link.namespaces.iter().any(|n| n == frame.ns) {
                    link.namespaces.push(frame.ns.to_owned());
                }
                Ok(())
            }
            Kind::Exit => {
                if self.role != Role::Worker {
                    return Err(ProtocolError::UnexpectedFrame("exit request to master"));
                }
                if self.worker_error.is_none() {
                    self.worker_error = Some(Error::ExitRequested);
                }
                Ok(())
            }
        }
    }

    pub(super) fn dispatch_message(&mut self, key: usize, id: WorkerId, frame: Frame<'_>) -> Result<(), ProtocolError> {
        if !self.links[key].ready {
            return Err(ProtocolError::UnexpectedFrame("message before hello"));
        }
        self.stats.messages_received += 1;
        let from = self.peer_of(id);
        let responder =
            if frame.wants_ack() { Responder::new(id, frame.seq, self.outbox.clone()) } else { Responder::none() };
        let Frame { ns, cmd, payload, fd, .. } = frame;
        match self.handlers.take(ns, cmd) {
            Lookup::Found(mut handler, key) => {
                let incoming = Incoming { from, ns, cmd, payload, fd, responder };
                self.guarded(|r| handler(r, incoming));
                self.handlers.restore(key, handler);
            }
            miss => {
                let (code, reason) = match miss {
                    Lookup::UnknownNamespace => (fail::UNKNOWN_NAMESPACE, AckError::UnknownNamespace),
                    _ => (fail::NO_HANDLER, AckError::NoHandler),
                };
                responder.fail_code(code, "");
                drop(fd);
                self.note_unhandled(from, ns, cmd, reason);
            }
        }
        self.drain_outbox();
        Ok(())
    }

    pub(crate) fn note_unhandled(&mut self, from: Peer, ns: &str, cmd: &str, reason: AckError) {
        self.stats.unhandled += 1;
        if let Some(mut hook) = self.unhandled_hook.take() {
            let info = Unhandled { from, namespace: ns.to_owned(), command: cmd.to_owned(), reason };
            self.guarded(|r| hook(r, &info));
            if self.unhandled_hook.is_none() {
                self.unhandled_hook = Some(hook);
            }
        }
    }

    pub(super) fn dispatch_hello(&mut self, key: usize, frame: Frame<'_>) -> Result<(), ProtocolError> {
        let (version, namespaces): (u32, Vec<String>) =
            ciborium::from_reader(frame.payload).map_err(|e| ProtocolError::BadControl(e.to_string()))?;
        match self.role {
            Role::Master => {
                let link = &mut self.links[key];
                if link.ready {
                    return Err(ProtocolError::UnexpectedFrame("second hello"));
                }
                let Some(conn) = link.conn.as_mut() else { return Ok(()) };
                let mut buf = conn.buffer();
                let env = Envelope { kind: Kind::Hello, flags: 0, nfds: 0, seq: 0, ns: "", cmd: "" };
                let _ = codec::encode(&mut buf, env, &(PROTOCOL_VERSION, Vec::<String>::new()));
                if version != PROTOCOL_VERSION {
                    // Tell the worker our version, then close: both sides see the
                    // mismatch. The hello alone: queued messages (and their fds)
                    // must never reach a peer that speaks another protocol.
                    conn.write_alone(&buf);
                    return Err(ProtocolError::Version(version));
                }
                conn.push_front(buf);
                link.ready = true;
                link.namespaces = namespaces;
                let id = link.id;
                self.after_push(key);
                self.worker_event(id, WorkerEvent::Ready);
                Ok(())
            }
            Role::Worker => {
                if version != PROTOCOL_VERSION {
                    self.worker_error = Some(Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
                    return Err(ProtocolError::Version(version));
                }
                Ok(())
            }
        }
    }

    /// Runs user code with the reactor marked busy; a panic is kept and
    /// resumed at the end of `poll`, once the reactor's state is consistent.
    pub(super) fn guarded(&mut self, f: impl FnOnce(&mut Reactor)) {
        self.depth += 1;
        let r = panic::catch_unwind(AssertUnwindSafe(|| f(&mut *self)));
        self.depth -= 1;
        if let Err(p) = r {
            if self.panic.is_none() {
                self.panic = Some(p);
            }
        }
    }

    pub(super) fn settle(&mut self, ack: usize, outcome: Outcome<'_>) {
        let Some(pending) = self.acks.try_remove(ack) else { return };
        self.timers.cancel(pending.timer);
        let done = pending.done;
        self.guarded(|r| done(r, outcome));
    }

    pub(super) fn worker_event(&mut self, id: WorkerId, event: WorkerEvent) {
        if let Some(mut hook) = self.worker_hook.take() {
            self.guarded(|r| hook(r, id, &event));
            if self.worker_hook.is_none() {
                self.worker_hook = Some(hook);
            }
        }
    }

    // ----- timers ---------------------------------------------------------

    pub(super) fn fire_timers(&mut self) {
        if self.timers.len() == 0 || self.panic.is_some() {
            return;
        }
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.expire(Instant::now(), &mut fired);
        for t in fired.drain(..) {
            match t {
                Timer::Ack(ack, serial) => {
                    let Some(p) = self.acks.get(ack).filter(|p| p.serial == serial) else { continue };
                    let (link_id, seq, qseq) = (p.link, p.seq, p.qseq);
                    if let Some(link) = self.links.get_mut(link_id.key as usize).filter(|l| l.id == link_id) {
                        link.pending.remove(&seq);
                        // Expiry is final: a message still queued is never sent (unless its
                        // fd already left with an earlier write: the peer pairs fds by order).
                        if let Some(conn) = link.conn.as_mut() {
                            conn.cancel(qseq);
                        }
                    }
                    self.settle(ack, Err(AckError::Timeout));
                }
                Timer::Hangup(id) => {
                    if let Some(link) = self.links.get_mut(id.key as usize).filter(|l| l.id == id) {
                        let reason = link.hangup_reason.take().unwrap_or(DisconnectReason::Hangup);
                        if !self.check_exit(id.key as usize) {
                            self.link_down(id.key as usize, Down::Closed(reason));
                        }
                    }
                }
                Timer::Kill(id) => {
                    if let Some(link) = self.links.get_mut(id.key as usize).filter(|l| l.id == id) {
                        link.kill_timer = None;
                        if let Some(child) = link.child.as_mut() {
                            let _ = child.kill();
                        }
                    }
                }
                Timer::Reap(id) => {
                    if self.links.get(id.key as usize).is_some_and(|l| l.id == id) && !self.check_exit(id.key as usize)
                    {
                        self.timers.insert(after(REAP_INTERVAL), Timer::Reap(id));
                    }
                }
                Timer::WriteRetry(id) => {
                    if let Some(link) = self.links.get_mut(id.key as usize).filter(|l| l.id == id) {
                        link.retry_timer = None;
                        self.flush_link(id.key as usize);
                    }
                }
            }
        }
        self.fired = fired;
    }
}
