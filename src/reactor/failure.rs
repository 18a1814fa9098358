//! When a channel or a process goes: hang-ups, protocol errors, exits.

use super::*;
use crate::timer::after;

impl Reactor {
    // ----- failures -------------------------------------------------------

    pub(super) fn handle_broken(&mut self) {
        while let Some((id, e)) = self.broken.pop() {
            if self.links.get(id.key as usize).is_some_and(|l| l.id == id && l.conn.is_some()) {
                let reason = match e.kind() {
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => DisconnectReason::Hangup,
                    _ => DisconnectReason::Io(e),
                };
                self.hangup(id.key as usize, reason);
            }
        }
    }

    pub(super) fn protocol_error(&mut self, key: usize, e: ProtocolError) {
        self.stats.protocol_errors += 1;
        if self.role == Role::Worker && self.worker_error.is_none() {
            self.worker_error = Some(Error::Protocol(e.clone()));
        }
        self.link_down(key, Down::Closed(DisconnectReason::Protocol(e)));
    }

    /// The channel closed. On the master, an exit status is preferred over a
    /// plain disconnection: the socket often closes a moment before the
    /// process can be reaped, so wait `hangup_grace` for it.
    pub(super) fn hangup(&mut self, key: usize, reason: DisconnectReason) {
        if self.role == Role::Master {
            // The end of the stream of a process whose exit is being reported: check_exit closes it.
            if self.links.get(key).is_some_and(|l| l.draining) || self.check_exit(key) {
                return;
            }
        }
        let grace = self.config.hangup_grace;
        let Some(link) = self.links.get_mut(key) else { return };
        let peer_gone =
            matches!(reason, DisconnectReason::Hangup | DisconnectReason::Protocol(ProtocolError::Truncated));
        if self.role == Role::Master && link.child.is_some() && peer_gone {
            link.hangup_reason = Some(reason);
            if let Some(mut conn) = link.conn.take() {
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
            if link.hangup_timer.is_none() {
                link.hangup_timer = Some(self.timers.insert(after(grace), Timer::Hangup(link.id)));
            }
            return;
        }
        self.link_down(key, Down::Closed(reason));
    }

    /// Reaps the child of link `key` if it has exited; returns whether it had.
    pub(crate) fn check_exit(&mut self, key: usize) -> bool {
        let Some(link) = self.links.get_mut(key) else { return false };
        let Some(child) = link.child.as_mut() else { return false };
        match child.try_wait() {
            Ok(Some(status)) => {
                let id = link.id;
                if link.conn.is_some() && !link.draining {
                    link.draining = true;
                    self.read_what_the_dead_wrote(key, id);
                }
                // A handler run meanwhile may have spawned a worker into a freed key.
                if self.links.get(key).is_some_and(|l| l.id == id) {
                    self.link_down(key, Down::Exited(status));
                }
                true
            }
            _ => false,
        }
    }

    /// The process is gone, so everything it wrote is already in the socket
    /// (a grandchild holding the channel aside): dispatch it all, past the
    /// fairness budget, before the exit fails the acks and drops the channel.
    fn read_what_the_dead_wrote(&mut self, key: usize, id: WorkerId) {
        loop {
            let progress = |r: &Reactor| (r.stats.frames_read, r.stats.bytes_read);
            let before = progress(self);
            self.read_link(key, false);
            self.backlog.retain(|&k| k != key);
            if self.panic.is_some() || !self.link_alive(key, id) || progress(self) == before {
                return;
            }
        }
    }

    /// Takes a link down: closes its channel, fails its pending acks exactly
    /// once, and tells the user. An exited link is removed altogether.
    pub(super) fn link_down(&mut self, key: usize, down: Down) {
        let Some(link) = self.links.get_mut(key) else { return };
        let id = link.id;
        let was_connected = link.conn.is_some() || link.hangup_timer.is_some();
        if let Some(mut conn) = link.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            // Dropping the conn closes every queued and received fd.
        }
        for t in [link.hangup_timer.take(), link.retry_timer.take()].into_iter().flatten() {
            self.timers.cancel(t);
        }
        let mut pending: Vec<(u64, usize)> = link.pending.drain().collect();
        pending.sort_unstable();
        let outcome = match &down {
            Down::Exited(status) => AckError::Exited(*status),
            Down::Closed(_) => AckError::Disconnected,
        };
        if let Down::Exited(_) = down {
            if let Some(kill) = link.kill_timer.take() {
                self.timers.cancel(kill);
            }
            if let Some(pidfd) = link.pidfd.take() {
                let raw = pidfd.as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            }
            self.links.remove(key);
        }
        if self.role == Role::Worker {
            self.master_gone = true;
        }
        for (_, ack) in pending {
            self.settle(ack, Err(outcome.clone()));
        }
        if self.role == Role::Master {
            match down {
                Down::Exited(status) => self.worker_event(id, WorkerEvent::Exited(status)),
                Down::Closed(reason) if was_connected => self.worker_event(id, WorkerEvent::Disconnected(reason)),
                Down::Closed(_) => {}
            }
        }
    }
}
