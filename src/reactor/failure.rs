//! When a channel or a process goes: hang-ups, protocol errors, exits.

use super::*;
use crate::timer::after;

impl Reactor {
    // ----- failures -------------------------------------------------------

    /// Write failures: the peer is gone (or the socket broken). What it wrote
    /// before is read first, past any pause; an exited worker is not written
    /// to, and is finished by its reads alone.
    pub(super) fn handle_broken(&mut self) {
        let mut later: Vec<(WorkerId, io::Error)> = Vec::new();
        while let Some((id, e)) = self.broken.pop() {
            if later.iter().any(|(l, _)| *l == id) {
                continue;
            }
            if self.link_of(id).is_some_and(|l| l.conn.is_some() && l.exit.is_none()) {
                self.read_link(id.index(), false, true);
                if !self.link_of(id).is_some_and(|l| l.conn.is_some() && l.exit.is_none()) {
                    continue;
                }
                if self.backlog.contains(&id.index()) {
                    // More than one turn's budget is still buffered: read it
                    // first (its end, EOF, then closes the link); no more writes.
                    if let Some(conn) = self.links[id.index()].conn.as_mut() {
                        conn.discard_queue();
                    }
                    later.push((id, e));
                    continue;
                }
                let reason = match e.kind() {
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => DisconnectReason::Hangup,
                    _ => DisconnectReason::Io(e),
                };
                self.hangup(id.index(), reason);
            }
        }
        self.broken = later;
    }

    pub(super) fn protocol_error(&mut self, key: usize, e: ProtocolError) {
        self.stats.protocol_errors += 1;
        if let Some(link) = self.links.get(key) {
            cp_log!(Warn, "{}: protocol error, closing the channel: {e}", self.peer_name(link.id));
        }
        if self.role == Role::Worker && self.worker_error.is_none() {
            self.worker_error = Some(Error::Protocol(e.clone()));
        }
        if self.links.get(key).is_some_and(|l| l.exit.is_some()) {
            // An exited worker's last bytes: its exit is what gets reported.
            self.finish_exit(key);
            return;
        }
        self.link_down(key, Down::Closed(DisconnectReason::Protocol(e)));
    }

    /// The channel closed. On the master, an exit status is preferred over a
    /// plain disconnection: the socket often closes a moment before the
    /// process can be reaped, so wait `hangup_grace` for it.
    pub(super) fn hangup(&mut self, key: usize, reason: DisconnectReason) {
        if self.links.get(key).is_some_and(|l| l.exit.is_some()) {
            // The end of an exited worker's stream: everything it wrote is read.
            self.finish_exit(key);
            return;
        }
        if self.role == Role::Master && self.check_exit(key) {
            return;
        }
        let grace = self.config.hangup_grace;
        let Some(link) = self.links.get_mut(key) else { return };
        let peer_gone =
            matches!(reason, DisconnectReason::Hangup | DisconnectReason::Protocol(ProtocolError::Truncated));
        if self.role == Role::Master && link.child.is_some() && peer_gone {
            link.hangup_reason = Some(reason);
            let id = link.id;
            if link.hangup_timer.is_none() {
                link.hangup_timer = Some(self.timers.insert(after(grace), Timer::Hangup(id)));
            }
            self.close_conn(key);
            return;
        }
        self.link_down(key, Down::Closed(reason));
    }

    /// Takes a link's channel out of the poll set and drops it (closing every
    /// queued and received fd), keeping the count of held fds exact.
    pub(crate) fn close_conn(&mut self, key: usize) -> bool {
        let Some(link) = self.links.get(key) else { return false };
        let Some(conn) = link.conn.as_ref() else { return false };
        // Fds of acked messages that never left go back with their outcomes.
        if conn.queued_fds() > 0 || conn.has_returned_fds() {
            let acked: Vec<(usize, u64)> =
                link.pending.values().filter_map(|&ack| self.acks.get(ack).map(|p| (ack, p.qseq))).collect();
            let conn = self.links[key].conn.as_mut().expect("checked");
            for (ack, qseq) in acked {
                if let Some(fd) = conn.take_fd(qseq) {
                    self.fds_back.insert(ack, fd);
                }
            }
        }
        let link = &mut self.links[key];
        let Some(mut conn) = link.conn.take() else { return false };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.fds_held -= link.fds_held;
        link.fds_held = 0;
        link.fds_held_since = None;
        link.paused = false;
        true
    }

    /// Checks whether the child of link `key` has exited; returns whether it
    /// had. From then on the worker is not ready and refuses sends; what it
    /// wrote is still read (at most the bytes its socket held then, so a
    /// grandchild writing on an inherited channel cannot keep us reading),
    /// and only then are its acks failed and its exit reported.
    pub(crate) fn check_exit(&mut self, key: usize) -> bool {
        let Some(link) = self.links.get_mut(key) else { return false };
        if link.exit.is_some() {
            return true;
        }
        let Some(child) = link.child.as_mut() else { return false };
        let Some(status) = exit_status(child) else { return false };
        link.exit = Some(Exit { status, requested: link.exit_requested });
        if let Some(pidfd) = link.pidfd.take() {
            let raw = pidfd.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        match link.conn.as_ref() {
            Some(conn) => {
                link.drain_left = sys::bytes_readable(conn.stream.as_fd()).unwrap_or(0);
                self.push_backlog(key);
            }
            None => self.finish_exit(key),
        }
        true
    }

    /// Reports the exit of a worker whose last frames have been read.
    pub(super) fn finish_exit(&mut self, key: usize) {
        let Some(exit) = self.links.get(key).and_then(|l| l.exit) else { return };
        self.link_down(key, Down::Exited(exit));
    }

    /// Takes a link down: closes its channel, fails its pending acks exactly
    /// once, and tells the user. An exited link is removed first, so that
    /// callbacks never see the dead worker as one to send to.
    pub(super) fn link_down(&mut self, key: usize, down: Down) {
        let Some(link) = self.links.get_mut(key) else { return };
        let id = link.id;
        let was_connected = link.conn.is_some() || link.hangup_timer.is_some();
        let timers = [link.hangup_timer.take(), link.retry_timer.take()];
        self.close_conn(key);
        for t in timers.into_iter().flatten() {
            self.timers.cancel(t);
        }
        self.backlog.retain(|&k| k != key);
        let link = &mut self.links[key];
        let mut pending: Vec<(u64, usize)> = link.pending.drain().collect();
        pending.sort_unstable();
        let outcome = match &down {
            Down::Exited(exit) => AckError::Exited(*exit),
            Down::Closed(_) => AckError::Disconnected,
        };
        // A worker without a process (an in-process pair) ends with its channel.
        let ended = matches!(down, Down::Exited(_)) || (self.role == Role::Master && link.child.is_none());
        if ended {
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
            cp_log!(Info, "the channel to the master is closed");
        }
        for (_, ack) in pending {
            self.settle(ack, Err(outcome.clone()));
        }
        if self.role == Role::Master {
            match down {
                Down::Exited(exit) => {
                    cp_log!(Info, "worker {id} exited ({exit})");
                    self.worker_event(id, WorkerEvent::Exited(exit))
                }
                Down::Closed(reason) if was_connected => {
                    cp_log!(Warn, "worker {id} disconnected: {reason:?}");
                    self.worker_event(id, WorkerEvent::Disconnected(reason))
                }
                Down::Closed(_) => {}
            }
        }
    }
}
