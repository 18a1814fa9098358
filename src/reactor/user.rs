//! The user's own fds and timers in the reactor: one event loop for the
//! whole program.

use std::any::Any;

use super::*;

/// Names a source added with [`Reactor::add_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey {
    slot: usize,
    generation: u64,
}

/// Names a timer added with [`Reactor::add_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserTimerKey {
    slot: usize,
    generation: u64,
}

/// What a source is ready for, as its callback is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Readiness {
    /// Readable (or at its end: read to find out).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// The peer hung up, or the fd is in error.
    pub closed: bool,
}

type SourceCallback = Box<dyn FnMut(&mut Reactor, &mut dyn Any, Readiness)>;
type TimerCallback = Box<dyn FnMut(&mut Reactor)>;

struct UserSource {
    generation: u64,
    raw: RawFd,
    /// The source and its callback; `None` while the callback runs.
    parts: Option<(Box<dyn Any>, SourceCallback)>,
}

struct UserTimer {
    generation: u64,
    period: Option<Duration>,
    at: Instant,
    wheel: TimerKey,
    /// `None` while it runs.
    callback: Option<TimerCallback>,
}

#[derive(Default)]
pub(crate) struct UserSources {
    sources: Slab<UserSource>,
    timers: Slab<UserTimer>,
    next_generation: u64,
}

impl UserSources {
    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

impl Reactor {
    /// Watches `source` (anything with an fd: a `TcpStream`, a
    /// `mio::net::UnixStream`, a timerfd, a signalfd …) for `interest`, and
    /// calls `f` from `poll` with it whenever it becomes ready. The reactor
    /// owns it until [`remove_source`](Reactor::remove_source) hands it back.
    ///
    /// Readiness is edge-triggered, as in mio: on each call, read (or
    /// write) until `WouldBlock`, or no new call comes. The source must be
    /// non-blocking.
    ///
    /// ```no_run
    /// use std::io::{Read, Write};
    /// use clusterphone::Interest;
    /// # let mut reactor = clusterphone::Reactor::attach()?;
    /// # let fd: std::os::fd::OwnedFd = todo!();
    /// // A connection handed over by the master, served by the reactor alone.
    /// let conn = std::net::TcpStream::from(fd);
    /// conn.set_nonblocking(true)?;
    /// reactor.add_source(conn, Interest::READABLE, |reactor, conn: &mut std::net::TcpStream, _ready| {
    ///     let mut buf = [0u8; 4096];
    ///     loop {
    ///         match conn.read(&mut buf) {
    ///             Ok(0) => break, // closed: remove_source(key) to drop it
    ///             Ok(n) => { let _ = conn.write_all(&buf[..n]); }
    ///             Err(_) => break, // WouldBlock: wait for the next call
    ///         }
    ///     }
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] if the fd cannot be registered (the source is dropped).
    pub fn add_source<S, F>(&mut self, source: S, interest: Interest, mut f: F) -> Result<SourceKey, Error>
    where
        S: AsRawFd + 'static,
        F: FnMut(&mut Reactor, &mut S, Readiness) + 'static,
    {
        let raw = source.as_raw_fd();
        let slot = self.user.sources.vacant_key();
        self.poll.registry().register(&mut SourceFd(&raw), Source::User(slot).token(), interest)?;
        let generation = self.user.generation();
        let callback: SourceCallback = Box::new(move |r, any, ready| {
            if let Some(s) = any.downcast_mut::<S>() {
                f(r, s, ready);
            }
        });
        self.user.sources.insert(UserSource { generation, raw, parts: Some((Box::new(source), callback)) });
        Ok(SourceKey { slot, generation })
    }

    /// Stops watching a source and hands it back (`None` if the key is
    /// stale, or names a source of another type, which is then dropped).
    /// A callback may remove its own source: it gets `None` (the source is
    /// lent to it), and the source is dropped, so closed, once it returns.
    pub fn remove_source<S: 'static>(&mut self, key: SourceKey) -> Option<S> {
        let entry = self.user.sources.get(key.slot).filter(|s| s.generation == key.generation)?;
        let raw = entry.raw;
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        let entry = self.user.sources.remove(key.slot);
        let (source, _) = entry.parts?;
        source.downcast::<S>().ok().map(|b| *b)
    }

    pub(super) fn user_generation(&self, slot: usize) -> Option<u64> {
        self.user.sources.get(slot).map(|s| s.generation)
    }

    /// Delivers an event to the source it was for (not to one that took its slot since).
    pub(super) fn user_event(&mut self, slot: usize, generation: u64, ready: Readiness) {
        let Some(entry) = self.user.sources.get_mut(slot).filter(|e| e.generation == generation) else { return };
        let Some((mut source, mut callback)) = entry.parts.take() else { return };
        self.guarded(|r| callback(r, source.as_mut(), ready));
        // Back in its slot, unless it was removed meanwhile (then both drop here).
        if let Some(entry) = self.user.sources.get_mut(slot).filter(|e| e.generation == generation) {
            entry.parts = Some((source, callback));
        }
    }

    /// Calls `f` from `poll` after `delay`, and then every `period` if one
    /// is given, until [`cancel_timer`](Reactor::cancel_timer). Timers share
    /// the reactor's wheel: [`next_deadline`](Reactor::next_deadline) counts
    /// them, and a nested loop is woken for them.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// let tick = reactor.add_timer(Duration::from_secs(1), Some(Duration::from_secs(1)), |reactor| {
    ///     println!("{} workers", reactor.workers().len());
    /// });
    /// // ... later
    /// reactor.cancel_timer(tick);
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn add_timer(
        &mut self,
        delay: Duration,
        period: Option<Duration>,
        f: impl FnMut(&mut Reactor) + 'static,
    ) -> UserTimerKey {
        let generation = self.user.generation();
        let slot = self.user.timers.vacant_key();
        let at = after(delay);
        let wheel = self.timers.insert(at, Timer::User(slot, generation));
        let period = period.filter(|p| !p.is_zero());
        self.user.timers.insert(UserTimer { generation, period, at, wheel, callback: Some(Box::new(f)) });
        UserTimerKey { slot, generation }
    }

    /// Cancels a timer (it may be the one running). Returns whether it was there.
    pub fn cancel_timer(&mut self, key: UserTimerKey) -> bool {
        let found = self.user.timers.get(key.slot).is_some_and(|t| t.generation == key.generation);
        if found {
            let timer = self.user.timers.remove(key.slot);
            self.timers.cancel(timer.wheel);
        }
        found
    }

    pub(super) fn fire_user_timer(&mut self, slot: usize, generation: u64) {
        let Some(timer) = self.user.timers.get_mut(slot).filter(|t| t.generation == generation) else { return };
        let Some(mut callback) = timer.callback.take() else { return };
        let period = timer.period;
        self.guarded(|r| callback(r));
        let Some(timer) = self.user.timers.get_mut(slot).filter(|t| t.generation == generation) else { return };
        match period {
            Some(period) => {
                // The next tick from the last one's time, not from now: no drift,
                // and a late tick does not run twice (never earlier than now).
                let now = Instant::now();
                let mut next = timer.at.checked_add(period).unwrap_or(now);
                if next < now {
                    next = now.checked_add(period).unwrap_or(now);
                }
                timer.at = next;
                timer.callback = Some(callback);
                timer.wheel = self.timers.insert(next, Timer::User(slot, generation));
            }
            None => {
                self.user.timers.remove(slot);
            }
        }
    }
}
