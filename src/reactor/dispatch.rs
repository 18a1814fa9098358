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
    ///
    /// On the master, reading stops while our queue to the worker is over its
    /// limit (it resumes from `flush_link` once the queue drains), unless
    /// `closed`: a peer that hung up is read to its end. An exited worker's
    /// socket is read only as far as it held bytes when the exit was seen;
    /// then the exit is reported.
    pub(super) fn read_link(&mut self, key: usize, stop_when_drained: bool, closed: bool) {
        let mut budget = self.config.frames_per_poll;
        let mut dispatched = false;
        let mut stop_after_dispatch = false;
        loop {
            if self.panic.is_some() {
                self.push_backlog(key);
                return;
            }
            let Some(link) = self.links.get_mut(key) else { return };
            let id = link.id;
            if link.paused && link.exit.is_none() && !closed {
                return;
            }
            let Some(conn) = link.conn.as_mut() else { return };
            let mut decoder = std::mem::replace(&mut conn.decoder, codec::Decoder::new(0, 0));
            let mut failure = None;
            let mut over_limit = false;
            loop {
                if budget == 0 || self.panic.is_some() {
                    break;
                }
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        budget -= 1;
                        dispatched = true;
                        self.stats.frames_read += 1;
                        self.links[key].frames_read += 1;
                        let hello = frame.kind == Kind::Hello;
                        if let Err(e) = self.dispatch(key, id, frame) {
                            failure = Some(e);
                            break;
                        }
                        if !self.link_alive(key, id) {
                            return;
                        }
                        if hello {
                            // Past the hello: frames of any allowed size.
                            decoder.set_max_frame(self.config.max_frame);
                        }
                        if !closed && self.over_limit(key) {
                            over_limit = true;
                            break;
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
            self.sync_fds(key);
            if over_limit {
                self.pause(key);
            }
            if budget == 0 || self.panic.is_some() {
                self.push_backlog(key);
                return;
            }
            if dispatched {
                // Send the replies to this batch before the next read (usually
                // EAGAIN): the peer is waiting for them.
                self.drain_outbox();
                self.flush_dirty();
                dispatched = false;
            }
            if over_limit || stop_after_dispatch || !self.link_alive(key, id) {
                return;
            }
            let draining = self.links[key].exit.is_some();
            if draining && self.links[key].drain_left == 0 {
                self.finish_exit(key);
                return;
            }
            let fd_room = self.fd_room(key);
            if !self.link_alive(key, id) {
                return;
            }
            let link = &mut self.links[key];
            let max_bytes = if draining { link.drain_left } else { usize::MAX };
            let Some(conn) = link.conn.as_mut() else { return };
            let bytes_before = conn.bytes_read;
            let r = conn.read(max_bytes, fd_room);
            let got = (conn.bytes_read - bytes_before) as usize;
            self.stats.bytes_read += got as u64;
            link.drain_left = link.drain_left.saturating_sub(got);
            if got > 0 && link.fds_held > 0 {
                // Progress on a frame whose fd is held: it is in transit, not parked.
                link.last_read = Some(Instant::now());
            }
            self.sync_fds(key);
            match r {
                Ok(Read::Data { drained }) => {
                    if drained && stop_when_drained && !draining {
                        stop_after_dispatch = true;
                    }
                    continue;
                }
                Ok(Read::WouldBlock) if draining => self.finish_exit(key),
                Ok(Read::WouldBlock) => {}
                Ok(Read::Eof) => {
                    let mid = self.links[key].conn.as_ref().is_some_and(|c| c.decoder.is_mid_frame());
                    if mid {
                        self.stats.protocol_errors += 1;
                        self.hangup(key, DisconnectReason::Protocol(ProtocolError::Truncated));
                    } else {
                        self.hangup(key, DisconnectReason::Hangup);
                    }
                }
                Ok(Read::FdsLost) => self.protocol_error(key, ProtocolError::MissingFds),
                Ok(Read::TooManyFds) => self.protocol_error(key, ProtocolError::TooManyFdsInFlight),
                Err(e) => {
                    let reason = if e.kind() == io::ErrorKind::ConnectionReset {
                        DisconnectReason::Hangup
                    } else {
                        DisconnectReason::Io(e)
                    };
                    self.hangup(key, reason);
                }
            }
            return;
        }
    }

    /// Queues `key` to be read by the next turn, once.
    pub(super) fn push_backlog(&mut self, key: usize) {
        if !self.backlog.contains(&key) {
            self.backlog.push(key);
        }
    }

    /// Our queue to this live worker holds more than `max_queue_bytes`.
    ///
    /// Only a master stops reading: a worker always reads its master (which
    /// it trusts), so two peers that send each other requests faster than
    /// they are answered can never both stop reading and stall for good.
    pub(super) fn over_limit(&self, key: usize) -> bool {
        self.role == Role::Master
            && self.links.get(key).is_some_and(|l| {
                l.exit.is_none() && l.conn.as_ref().is_some_and(|c| c.queued_mem() > self.config.max_queue_bytes)
            })
    }

    /// Stops reading from a peer whose queue is over its limit: it blocks on
    /// its own writes until it reads what we queued for it.
    fn pause(&mut self, key: usize) {
        if let Some(link) = self.links.get_mut(key) {
            if !link.paused {
                link.paused = true;
                self.stats.read_pauses += 1;
                cp_log!(Info, "worker {}: queue over max_queue_bytes, reading paused until it drains", link.id);
            }
        }
    }

    /// Resumes reading from a paused peer once its queue is back under the limit.
    pub(super) fn maybe_resume(&mut self, key: usize) {
        if self.links.get(key).is_some_and(|l| l.paused) && !self.over_limit(key) {
            self.links[key].paused = false;
            // What it wrote meanwhile raised no new edge: read it next turn.
            self.push_backlog(key);
        }
    }

    /// Brings the count of fds held by `key`'s decoder (and the total) up to date.
    pub(super) fn sync_fds(&mut self, key: usize) {
        let Some(link) = self.links.get_mut(key) else { return };
        let held = link.conn.as_ref().map_or(0, |c| c.decoder.waiting_fds());
        self.fds_held = self.fds_held - link.fds_held + held;
        link.fds_held = held;
        if held == 0 {
            link.fds_held_since = None;
        } else if link.fds_held_since.is_none() {
            link.fds_held_since = Some(Instant::now());
        }
    }

    /// How many fds the next read on `key` may take: its own room. When
    /// that could take the total past `max_received_fds_total`, room is made
    /// first by closing parkers: links holding more unclaimed fds than a peer
    /// of this library ever does (`LEGIT_FDS_HELD`), or holding any for
    /// longer than `FD_PARK_GRACE`; the most fds first, the longest-held
    /// among equals (maybe `key` itself). Fds in transit on well-behaved
    /// links are never a reason to close one.
    fn fd_room(&mut self, key: usize) -> usize {
        let own = self.config.max_received_fds.saturating_sub(self.links[key].fds_held);
        let total = self.config.max_received_fds_total;
        if self.fds_held < total {
            // A peer of this library brings at most one fd per read: the
            // rest of the room is for peers that break the rule, who are
            // disconnected when they bring more than there is.
            return own.min(total - self.fds_held);
        }
        // Full: make room by closing parkers, never a link whose fds are in
        // transit (two at most, with bytes still arriving or paused by us).
        let parked_before = Instant::now().checked_sub(FD_PARK_GRACE);
        while self.fds_held >= total {
            let parker = self
                .links
                .iter()
                .filter(|(_, l)| {
                    let idle_since = l.fds_held_since.max(l.last_read);
                    l.fds_held > LEGIT_FDS_HELD
                        || (l.fds_held > 0
                            && !l.paused
                            && idle_since.zip(parked_before).is_some_and(|(since, before)| since <= before))
                })
                .max_by_key(|(_, l)| (l.fds_held, std::cmp::Reverse(l.fds_held_since)))
                .map(|(k, _)| k);
            let Some(parker) = parker else { break };
            self.protocol_error(parker, ProtocolError::TooManyFdsInFlight);
            if parker == key || self.links.get(parker).is_some_and(|l| l.fds_held > 0) {
                return 0;
            }
        }
        // Only fds in transit left: one more, as a well-behaved read needs.
        own.min(total.saturating_sub(self.fds_held).max(1))
    }

    pub(super) fn link_alive(&self, key: usize, id: WorkerId) -> bool {
        self.links.get(key).is_some_and(|l| l.id == id && l.conn.is_some())
    }

    /// How a log line names the peer of link `id`.
    pub(super) fn peer_name(&self, id: WorkerId) -> String {
        match self.role {
            Role::Master => format!("worker {id}"),
            Role::Worker => "master".to_owned(),
        }
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
                check_peer_namespace(frame.ns)?;
                let max = self.config.max_namespaces;
                let link = &mut self.links[key];
                if !link.namespaces.contains(frame.ns) {
                    if link.namespaces.len() >= max {
                        return Err(ProtocolError::TooManyNamespaces);
                    }
                    link.namespaces.insert(frame.ns.to_owned());
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
        if self.unhandled_hook.is_none() && self.unhandled_listeners.is_empty() {
            return;
        }
        let info = Unhandled { from, namespace: ns.to_owned(), command: cmd.to_owned(), reason };
        if let Some(mut hook) = self.unhandled_hook.take() {
            self.guarded(|r| hook(r, &info));
            if self.unhandled_hook.is_none() {
                self.unhandled_hook = Some(hook);
            }
        }
        for key in self.unhandled_listeners.keys() {
            if let Some(mut listener) = self.unhandled_listeners.take(key) {
                self.guarded(|r| listener(r, &info));
                self.unhandled_listeners.restore(key, listener);
            }
        }
    }

    pub(super) fn dispatch_hello(&mut self, key: usize, frame: Frame<'_>) -> Result<(), ProtocolError> {
        // Bounded before decoding: a hello of empty strings would otherwise
        // cost 24 bytes of heap per byte of frame.
        let max = self.config.max_namespaces;
        if frame.payload.len() > hello_payload_limit(max) {
            return Err(ProtocolError::TooManyNamespaces);
        }
        let (version, names): (u32, Vec<String>) =
            ciborium::from_reader(frame.payload).map_err(|e| ProtocolError::BadControl(e.to_string()))?;
        if names.len() > max {
            return Err(ProtocolError::TooManyNamespaces);
        }
        let mut namespaces = BTreeSet::new();
        for name in names {
            check_peer_namespace(&name)?;
            namespaces.insert(name);
        }
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
                link.ready = true;
                link.namespaces = namespaces;
                if link.exit.is_some() {
                    // Dead already: its frames are read, but it is never ready.
                    conn.recycle(buf);
                    return Ok(());
                }
                conn.push_front(buf);
                let id = link.id;
                self.after_push(key);
                cp_log!(Debug, "worker {id} ready");
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
        // The message's fd, if it never left: for a completion that takes it
        // (`ackd_fd`); closed here otherwise.
        let outer = std::mem::replace(&mut self.fd_back, self.fds_back.remove(&ack));
        self.guarded(|r| done(r, outcome));
        self.fd_back = outer;
    }

    pub(super) fn worker_event(&mut self, id: WorkerId, event: WorkerEvent) {
        if let Some(mut hook) = self.worker_hook.take() {
            self.guarded(|r| hook(r, id, &event));
            if self.worker_hook.is_none() {
                self.worker_hook = Some(hook);
            }
        }
        for key in self.worker_listeners.keys() {
            if let Some(mut listener) = self.worker_listeners.take(key) {
                self.guarded(|r| listener(r, id, &event));
                self.worker_listeners.restore(key, listener);
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
                    if let Some(link) = self.link_of_mut(link_id) {
                        link.pending.remove(&seq);
                        // Expiry is final: a message still queued is never sent (unless its
                        // fd already left with an earlier write: the peer pairs fds by order).
                        if let Some(conn) = link.conn.as_mut() {
                            conn.cancel(qseq);
                            if let Some(fd) = conn.take_fd(qseq) {
                                self.fds_back.insert(ack, fd);
                            }
                        }
                        self.maybe_resume(link_id.index());
                    }
                    self.settle(ack, Err(AckError::Timeout));
                }
                Timer::Hangup(id) => {
                    if let Some(link) = self.link_of_mut(id) {
                        let reason = link.hangup_reason.take().unwrap_or(DisconnectReason::Hangup);
                        if !self.check_exit(id.index()) {
                            self.link_down(id.index(), Down::Closed(reason));
                        }
                    }
                }
                Timer::Kill(id) => {
                    if let Some(link) = self.link_of_mut(id) {
                        link.kill_timer = None;
                        if link.child.is_none() {
                            self.cut_off(id);
                        } else {
                            let _ = link.kill_child();
                        }
                    }
                }
                Timer::Reap(id) => {
                    if self.link_of(id).is_some() && !self.check_exit(id.index()) {
                        self.timers.insert(after(REAP_INTERVAL), Timer::Reap(id));
                    }
                }
                Timer::User(slot, generation) => self.fire_user_timer(slot, generation),
                Timer::WriteRetry(id) => {
                    if let Some(link) = self.link_of_mut(id) {
                        link.retry_timer = None;
                        self.flush_link(id.index());
                    }
                }
            }
        }
        self.fired = fired;
    }
}

/// Unclaimed fds a peer of this library can hold: it sends one fd per write,
/// and the kernel hands over one write's fds per read, so at most the fd of
/// a frame still arriving and the one a read brought.
const LEGIT_FDS_HELD: usize = 2;
/// Unclaimed fds held longer than this are parked, not in transit.
const FD_PARK_GRACE: Duration = Duration::from_secs(1);

/// A namespace name as a peer announces it: not empty, not too long.
fn check_peer_namespace(name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() || name.len() > MAX_NAMESPACE_LEN {
        return Err(ProtocolError::BadName);
    }
    Ok(())
}

/// Largest hello payload a peer announcing `max_namespaces` names can need:
/// the version, an array header, and per name a 2-byte string header.
pub(crate) fn hello_payload_limit(max_namespaces: usize) -> usize {
    16 + max_namespaces * (MAX_NAMESPACE_LEN + 2)
}

/// Largest frame a master accepts from a worker before its hello.
pub(crate) fn hello_frame_limit(config: &Config) -> usize {
    codec::HEADER_LEN + hello_payload_limit(config.max_namespaces)
}
