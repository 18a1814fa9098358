//! Flushing, the master's view of its workers, exits, shutdown and drop.

use super::*;
use crate::timer::after;

impl Reactor {
    // ----- lifecycle ------------------------------------------------------

    /// Drives `poll` until every write queue is empty, or fails with
    /// [`Error::FlushTimeout`]. Handlers keep running meanwhile. A worker
    /// should flush before it exits, or queued frames are lost with the process.
    ///
    /// # Errors
    /// [`Error::FlushTimeout`] with frames still queued after `timeout`,
    /// [`Error::Reentrant`] inside a callback, or an error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback run meanwhile.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), Error> {
        if self.depth > 0 {
            return Err(Error::Reentrant);
        }
        if self.role == Role::Worker {
            self.ensure_hello();
        }
        let deadline = after(timeout);
        loop {
            self.drain_outbox();
            for key in 0..self.links.capacity() {
                if self.links.contains(key) {
                    self.flush_link(key);
                }
            }
            let queued =
                self.links.iter().any(|(_, l)| l.ready && l.conn.as_ref().is_some_and(|c| c.queued_frames() > 0));
            if !queued {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::FlushTimeout);
            }
            self.turn(Some(deadline - now))?;
            if let Some(p) = self.panic.take() {
                panic::resume_unwind(p);
            }
        }
    }

    /// A worker's main loop: polls until the master asks this worker to
    /// exit or goes away — the two normal ends, told apart in the `Ok` — and
    /// then writes what is still queued (for at most `linger`). A failure
    /// (a protocol error, a version mismatch, an I/O error) is the `Err`, so
    /// it cannot pass for a normal end.
    ///
    /// ```no_run
    /// use clusterphone::{Message, Reactor, WorkerEnd};
    /// let mut reactor = Reactor::attach()?;
    /// reactor.on("ping", |_r, msg: Message<u32>| {
    ///     let _ = msg.reply.ok(&(msg.payload + 1));
    /// })?;
    /// match reactor.run(std::time::Duration::from_secs(1))? {
    ///     WorkerEnd::ExitRequested => println!("asked to exit"),
    ///     WorkerEnd::MasterGone => println!("the master went away"),
    /// }
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongRole`] on a master; any failure of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback.
    pub fn run(&mut self, linger: Duration) -> Result<WorkerEnd, Error> {
        if self.role != Role::Worker {
            return Err(Error::WrongRole);
        }
        let end = loop {
            match self.poll(None) {
                Ok(()) => {}
                Err(Error::ExitRequested) => break WorkerEnd::ExitRequested,
                Err(Error::Disconnected) => return Ok(WorkerEnd::MasterGone),
                Err(e) => return Err(e),
            }
        };
        match self.flush(linger) {
            Ok(()) | Err(Error::FlushTimeout) | Err(Error::Disconnected) => Ok(end),
            Err(e) => Err(e),
        }
    }

    /// Counters since this reactor was made.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Acks still waiting for an outcome.
    pub fn pending_acks(&self) -> usize {
        self.acks.len()
    }

    // ----- master side ----------------------------------------------------

    /// The workers this master knows of: running, starting, disconnected
    /// but not yet reaped, or exited with their last frames still being read
    /// (not ready: sends to them are refused). A worker leaves this list
    /// before its pending acks fail and its `Exited` event is reported.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.links.iter().map(|(_, l)| l.id).collect()
    }

    pub(super) fn link(&self, id: WorkerId) -> Option<&Link> {
        self.link_of(id).filter(|_| self.role == Role::Master)
    }

    /// Whether `worker` takes new work: it has said hello (messages to it
    /// are written, not held), is connected and running, and has not been
    /// asked to exit ([`request_exit`](Reactor::request_exit), [`kill`](Reactor::kill)).
    /// A worker asked to exit still gets what is sent to it.
    pub fn is_ready(&self, worker: WorkerId) -> bool {
        self.link(worker).is_some_and(|l| l.ready && l.conn.is_some() && l.exit.is_none() && !l.exit_requested)
    }

    /// The worker's process id.
    pub fn worker_pid(&self, worker: WorkerId) -> Option<u32> {
        self.link(worker).and_then(|l| l.child.as_ref()).map(|c| c.id())
    }

    /// Namespaces the worker has handlers in, as it announced them.
    pub fn worker_namespaces(&self, worker: WorkerId) -> Vec<String> {
        self.link(worker).map(|l| l.namespaces.iter().cloned().collect()).unwrap_or_default()
    }

    /// Frames and bytes waiting in the write queue to `worker`.
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let worker: clusterphone::WorkerId = todo!();
    /// if let Some((frames, bytes)) = reactor.queue_depth(worker) {
    ///     println!("{frames} frames ({bytes} bytes) waiting for {worker}");
    /// }
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn queue_depth(&self, worker: WorkerId) -> Option<(usize, usize)> {
        self.link(worker).and_then(|l| l.conn.as_ref()).map(|c| (c.queued_frames(), c.queued_bytes()))
    }

    /// One worker's figures: pending acks, queue, frames and bytes each way.
    ///
    /// ```no_run
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let worker: clusterphone::WorkerId = todo!();
    /// if let Some(s) = reactor.worker_stats(worker) {
    ///     println!("{worker}: {} in flight, {} frames queued", s.pending_acks, s.queued_frames);
    /// }
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn worker_stats(&self, worker: WorkerId) -> Option<LinkStats> {
        self.link(worker).map(link_stats)
    }

    /// The channel to the master's figures (worker side).
    pub fn master_stats(&self) -> Option<LinkStats> {
        if self.role != Role::Worker {
            return None;
        }
        self.links.get(0).map(link_stats)
    }

    /// Frames and bytes waiting in the write queue to the master (worker side).
    pub fn master_queue_depth(&self) -> Option<(usize, usize)> {
        if self.role != Role::Worker {
            return None;
        }
        self.links.get(0).and_then(|l| l.conn.as_ref()).map(|c| (c.queued_frames(), c.queued_bytes()))
    }

    /// Sends SIGKILL to `worker`. Its exit is reported by a later `poll`,
    /// as a requested one ([`Exit::requested`](crate::Exit::requested)).
    ///
    /// The signal goes through the worker's pidfd, so it can never reach
    /// another process that reused the pid of a worker reaped elsewhere.
    ///
    /// # Errors
    /// [`Error::UnknownWorker`] for an id that is not a live worker with a process,
    /// [`Error::Io`] if the signal cannot be sent.
    ///
    /// A worker with no process (from [`Reactor::pair`]) is cut off instead:
    /// its channel closes and it is reported `Disconnected` by a later `poll`.
    pub fn kill(&mut self, worker: WorkerId) -> Result<(), Error> {
        let link = self.link_of_mut(worker).filter(|l| l.conn.is_some() || l.child.is_some());
        let link = link.ok_or(Error::UnknownWorker(worker))?;
        link.exit_requested = true;
        if link.child.is_none() {
            self.cut_off(worker);
            return Ok(());
        }
        link.kill_child()?;
        Ok(())
    }

    /// Closes the channel of a worker that has no process, as a kill would end one.
    pub(super) fn cut_off(&mut self, worker: WorkerId) {
        if let Some(link) = self.link_of_mut(worker) {
            if let Some(conn) = link.conn.as_mut() {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Asks `worker` to exit (its `poll` returns [`Error::ExitRequested`]),
    /// and kills it if it has not exited after `grace`.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// # let worker: clusterphone::WorkerId = todo!();
    /// reactor.request_exit(worker, Duration::from_millis(500))?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownWorker`] for an id that is not a live worker.
    pub fn request_exit(&mut self, worker: WorkerId, grace: Duration) -> Result<(), Error> {
        let key = worker.index();
        if self.link(worker).is_none() {
            return Err(Error::UnknownWorker(worker));
        }
        self.push_control(key, Kind::Exit, "", &());
        let link = &mut self.links[key];
        link.exit_requested = true;
        if link.kill_timer.is_none() {
            link.kill_timer = Some(self.timers.insert(after(grace), Timer::Kill(worker)));
        }
        Ok(())
    }

    /// Asks every worker to exit, polls until all have exited (killing those
    /// still running after `grace`), and reaps them all. Their exits are
    /// reported as requested ones; `spawn` is refused meanwhile
    /// ([`Error::ShuttingDown`]), so a hook that respawns crashed workers
    /// neither prolongs nor undoes a shutdown.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// // ... at the end: ask every worker to exit, kill stragglers after 2 s, reap all.
    /// reactor.shutdown(Duration::from_secs(2))?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongRole`] on a worker, [`Error::Reentrant`] inside a callback, or an
    /// error of `poll`.
    ///
    /// # Panics
    /// Resumes a panic of a callback run meanwhile (the reactor stays usable).
    pub fn shutdown(&mut self, grace: Duration) -> Result<(), Error> {
        if self.depth > 0 {
            return Err(Error::Reentrant);
        }
        if self.role != Role::Master {
            return Err(Error::WrongRole);
        }
        self.shutting_down = true;
        self.shutdowns += 1;
        // Reset even if a callback panics out of the polls inside.
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.shut_down(grace)));
        self.shutting_down = false;
        result.unwrap_or_else(|p| panic::resume_unwind(p))
    }

    fn shut_down(&mut self, grace: Duration) -> Result<(), Error> {
        for id in self.workers() {
            self.request_exit(id, grace)?;
        }
        let deadline = after(grace.saturating_add(Duration::from_secs(2)));
        while !self.links.is_empty() && Instant::now() < deadline {
            self.poll(Some(Duration::from_millis(20)))?;
        }
        self.reap_all();
        Ok(())
    }

    /// Kills and reaps every child still known (used by `shutdown` and `Drop`).
    pub(super) fn reap_all(&mut self) {
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for &key in &keys {
            self.close_conn(key);
            let link = &mut self.links[key];
            link.exit_requested = true;
            let _ = link.kill_child();
            if let Some(child) = link.child.as_mut() {
                // ECHILD (reaped elsewhere) returns at once.
                let _ = child.wait();
            }
        }
        for key in keys {
            let link = self.links.remove(key);
            let mut pending: Vec<(u64, usize)> = link.pending.into_iter().collect();
            pending.sort_unstable();
            for (_, ack) in pending {
                self.settle(ack, Err(AckError::Disconnected));
            }
        }
    }
}

impl Drop for Reactor {
    /// Dropping a master closes every channel, gives the workers
    /// `hangup_grace` to exit by themselves, then kills and reaps the rest:
    /// no zombies. Frames still queued are discarded and their fds closed.
    fn drop(&mut self) {
        self.close_remote();
        if self.role != Role::Master || self.links.is_empty() {
            return;
        }
        for (_, link) in self.links.iter_mut() {
            link.conn = None;
        }
        let deadline = after(self.config.hangup_grace);
        loop {
            let mut running = 0;
            for (_, link) in self.links.iter_mut() {
                if link.exit.is_none() {
                    match link.child.as_mut().map(exit_status) {
                        Some(Some(status)) => link.exit = Some(Exit { status, requested: true }),
                        Some(None) => running += 1,
                        None => {}
                    }
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Callbacks must not run during drop; outcomes are discarded.
        for (_, link) in self.links.iter_mut() {
            if link.exit.is_none() {
                let _ = link.kill_child();
                if let Some(child) = link.child.as_mut() {
                    let _ = child.wait();
                }
            }
        }
    }
}

fn link_stats(link: &Link) -> LinkStats {
    let mut s =
        LinkStats { pending_acks: link.pending.len(), frames_received: link.frames_read, ..LinkStats::default() };
    if let Some(conn) = &link.conn {
        s.queued_frames = conn.queued_frames();
        s.queued_bytes = conn.queued_bytes();
        s.frames_sent = conn.frames_written;
        s.bytes_sent = conn.bytes_written;
        s.bytes_received = conn.bytes_read;
        s.read_paused = link.paused;
    }
    s
}
