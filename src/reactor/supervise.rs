//! Supervision, opt-in: keep a pool of workers alive (respawning crashed
//! ones with backoff, giving up on a crash loop), and replace them one at a
//! time (rolling restart).

use std::collections::VecDeque;
use std::fmt;
use std::process::Command;

use super::*;

/// How a [`Supervisor`] respawns crashed workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// The delay before the first respawn after a crash; it doubles with
    /// each crash counted, up to `max_backoff`.
    pub backoff: Duration,
    /// The longest delay before a respawn.
    pub max_backoff: Duration,
    /// Give up after this many crashes within `window`.
    pub max_crashes: usize,
    /// See `max_crashes`.
    pub window: Duration,
}

impl Default for RestartPolicy {
    /// 100 ms doubling to 10 s; give up after 5 crashes within a minute.
    fn default() -> Self {
        RestartPolicy {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_crashes: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What a supervisor tells its observer, from [`Supervisor::on_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SupervisorEvent {
    /// A worker was started (at first, after a crash, or by a rolling restart).
    Spawned(WorkerId),
    /// A worker crashed (an exit nobody asked for); a respawn follows after `after`.
    Crashed {
        /// The worker.
        worker: WorkerId,
        /// How it ended.
        exit: Exit,
        /// When the respawn comes.
        after: Duration,
    },
    /// Too many crashes within the window: no more respawns.
    GaveUp {
        /// Crashes counted within the window.
        crashes: usize,
    },
    /// A spawn failed (the error, as text); it is retried like a crash.
    SpawnFailed(String),
    /// A rolling restart replaced every worker.
    RestartDone,
    /// A rolling restart stopped before the end: a shutdown began, or the
    /// supervisor gave up on successors that kept crashing.
    RestartAborted,
}

type Factory = Box<dyn FnMut() -> Command>;
/// A rolling restart: the workers still to replace, and the one being
/// replaced with its successor.
type Rolling = (VecDeque<WorkerId>, Option<(WorkerId, WorkerId)>);
type Observer = Box<dyn FnMut(&mut Reactor, &SupervisorEvent)>;

struct State {
    factory: Factory,
    policy: RestartPolicy,
    workers: Vec<WorkerId>,
    crashes: VecDeque<Instant>,
    gave_up: bool,
    rolling: Option<Rolling>,
    /// How long an old worker of a rolling restart may take to exit.
    grace: Duration,
    observer: Option<Observer>,
    /// Events raised while the observer runs, told once it returns.
    told_later: Vec<SupervisorEvent>,
    /// The observer is running (taken out of `observer`).
    observing: bool,
    stopped: bool,
}

/// A pool of supervised workers, from [`Reactor::supervise`]. Dropping the
/// handle does not stop it; [`stop`](Supervisor::stop) does.
#[derive(Clone)]
pub struct Supervisor {
    state: Rc<RefCell<State>>,
    listener: ListenerKey,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor").field("workers", &self.state.borrow().workers).finish()
    }
}

impl Reactor {
    /// Starts `count` workers from `factory` and keeps them: a worker that
    /// exits without being asked (a crash) is respawned after a backoff,
    /// until `policy.max_crashes` within `policy.window`, when the
    /// supervisor gives up (and says so). Requested exits (`request_exit`,
    /// `kill`, `shutdown`) are not crashes, and a shutdown ends the
    /// supervision: nothing is respawned during or after it.
    ///
    /// ```no_run
    /// use clusterphone::{RestartPolicy, SupervisorEvent};
    /// let mut reactor = clusterphone::Reactor::master()?;
    /// let exe = std::env::current_exe()?;
    /// let pool = reactor.supervise(move || std::process::Command::new(&exe), 4, RestartPolicy::default())?;
    /// pool.on_event(|_r, event| {
    ///     if let SupervisorEvent::GaveUp { crashes } = event {
    ///         eprintln!("workers keep crashing ({crashes} in a minute): giving up");
    ///     }
    /// });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`spawn`](Reactor::spawn), for the first workers (those already
    /// started stay, supervised).
    pub fn supervise(
        &mut self,
        factory: impl FnMut() -> Command + 'static,
        count: usize,
        policy: RestartPolicy,
    ) -> Result<Supervisor, Error> {
        let state = Rc::new(RefCell::new(State {
            factory: Box::new(factory),
            policy,
            workers: Vec::new(),
            crashes: VecDeque::new(),
            gave_up: false,
            rolling: None,
            grace: Duration::from_secs(5),
            observer: None,
            told_later: Vec::new(),
            observing: false,
            stopped: false,
        }));
        let s = state.clone();
        let listener = self.add_worker_listener(move |r, id, event| on_worker_event(r, &s, id, event));
        let sup = Supervisor { state, listener };
        for _ in 0..count {
            spawn_one(self, &sup.state)?;
        }
        Ok(sup)
    }
}

impl Supervisor {
    /// The supervised workers now.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.state.borrow().workers.clone()
    }

    /// Calls `f` with each [`SupervisorEvent`] (replacing an earlier observer).
    pub fn on_event(&self, f: impl FnMut(&mut Reactor, &SupervisorEvent) + 'static) {
        self.state.borrow_mut().observer = Some(Box::new(f));
    }

    /// Whether it gave up on a crash loop.
    pub fn gave_up(&self) -> bool {
        self.state.borrow().gave_up
    }

    /// Replaces every worker, one at a time: each new one is ready before the
    /// old one is asked to exit (with `grace` before it is killed), so the
    /// pool never shrinks. A successor that crashes, or is not ready within
    /// `grace` (10 s at least), is replaced with the usual backoff.
    /// [`SupervisorEvent::RestartDone`] when done. Returns false, doing
    /// nothing, while a restart is already running.
    pub fn rolling_restart(&self, reactor: &mut Reactor, grace: Duration) -> bool {
        {
            let mut st = self.state.borrow_mut();
            if st.rolling.is_some() {
                return false;
            }
            let old: VecDeque<WorkerId> = st.workers.iter().copied().collect();
            st.rolling = Some((old, None));
            st.grace = grace;
        }
        next_replacement(reactor, &self.state);
        true
    }

    /// Stops supervising: no more respawns; the workers stay.
    pub fn stop(&self, reactor: &mut Reactor) {
        self.state.borrow_mut().stopped = true;
        reactor.remove_listener(self.listener);
    }
}

fn tell(r: &mut Reactor, state: &Rc<RefCell<State>>, event: SupervisorEvent) {
    let observer = state.borrow_mut().observer.take();
    let Some(mut observer) = observer else {
        // The observer is running (this comes from inside it): after it.
        let mut st = state.borrow_mut();
        if st.observing && st.told_later.len() < 1024 {
            st.told_later.push(event);
        }
        return;
    };
    state.borrow_mut().observing = true;
    observer(r, &event);
    loop {
        let later = std::mem::take(&mut state.borrow_mut().told_later);
        if later.is_empty() {
            break;
        }
        for event in &later {
            observer(r, event);
        }
    }
    let mut s = state.borrow_mut();
    s.observing = false;
    if s.observer.is_none() {
        s.observer = Some(observer);
    }
}

fn spawn_one(r: &mut Reactor, state: &Rc<RefCell<State>>) -> Result<WorkerId, Error> {
    // Out of the state while it runs: a factory may use the supervisor.
    let mut factory: Factory =
        std::mem::replace(&mut state.borrow_mut().factory, Box::new(|| Command::new("/nonexistent")));
    let command = factory();
    state.borrow_mut().factory = factory;
    let id = r.spawn(command)?;
    state.borrow_mut().workers.push(id);
    tell(r, state, SupervisorEvent::Spawned(id));
    Ok(id)
}

/// A respawn after `after`, unless stopped, given up, or a shutdown has
/// begun since (a shutdown ends the supervision too).
fn respawn_later(r: &mut Reactor, state: &Rc<RefCell<State>>, after: Duration) {
    let s = state.clone();
    let shutdowns = r.shutdowns;
    r.add_timer(after, None, move |r| {
        let blocked = {
            let st = s.borrow();
            st.stopped || st.gave_up
        };
        if blocked || r.shutting_down || r.shutdowns != shutdowns {
            s.borrow_mut().stopped |= r.shutdowns != shutdowns;
            return;
        }
        if let Err(e) = spawn_one(r, &s) {
            if matches!(e, Error::ShuttingDown) {
                return;
            }
            tell(r, &s, SupervisorEvent::SpawnFailed(e.to_string()));
            let delay = note_crash(r, &s);
            if let Some(delay) = delay {
                respawn_later(r, &s, delay);
            }
        }
    });
}

/// Counts a crash; the delay before the respawn, or `None` once it gives up.
fn note_crash(r: &mut Reactor, state: &Rc<RefCell<State>>) -> Option<Duration> {
    let now = Instant::now();
    let (give_up, crashes, delay) = {
        let mut st = state.borrow_mut();
        let window = st.policy.window;
        while st.crashes.front().is_some_and(|&t| now.duration_since(t) > window) {
            st.crashes.pop_front();
        }
        st.crashes.push_back(now);
        let n = st.crashes.len();
        let doublings = u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
        let delay = st.policy.backoff.saturating_mul(1 << doublings).min(st.policy.max_backoff);
        let give_up = n > st.policy.max_crashes;
        if give_up {
            st.gave_up = true;
        }
        (give_up, n, delay)
    };
    if give_up {
        tell(r, state, SupervisorEvent::GaveUp { crashes });
        return None;
    }
    Some(delay)
}

fn on_worker_event(r: &mut Reactor, state: &Rc<RefCell<State>>, id: WorkerId, event: &WorkerEvent) {
    if !state.borrow().workers.contains(&id) {
        return;
    }
    match event {
        WorkerEvent::Ready => {
            let successor_ready = matches!(state.borrow().rolling, Some((_, Some((_, new))))  if new == id);
            if successor_ready {
                let old = state.borrow().rolling.as_ref().and_then(|(_, cur)| cur.map(|(old, _)| old));
                if let Some(old) = old {
                    let grace = state.borrow().grace;
                    let _ = r.request_exit(old, grace);
                }
            }
        }
        WorkerEvent::Exited(exit) => {
            state.borrow_mut().workers.retain(|&w| w != id);
            let successor_of = match state.borrow().rolling {
                Some((_, Some((old, new)))) if new == id => Some(old),
                _ => None,
            };
            if let Some(old) = successor_of {
                // The successor died before taking over: another one, after
                // the backoff, for the same old worker.
                if let Some((queue, cur)) = state.borrow_mut().rolling.as_mut() {
                    queue.push_front(old);
                    *cur = None;
                }
                match note_crash(r, state) {
                    Some(after) if !r.shutting_down => {
                        tell(r, state, SupervisorEvent::Crashed { worker: id, exit: *exit, after });
                        let s = state.clone();
                        r.add_timer(after, None, move |r| next_replacement(r, &s));
                    }
                    _ => abort_restart(r, state),
                }
                return;
            }
            let replaced = matches!(state.borrow().rolling, Some((_, Some((old, _)))) if old == id);
            if replaced {
                if let Some((_, cur)) = state.borrow_mut().rolling.as_mut() {
                    *cur = None;
                }
                next_replacement(r, state);
                return;
            }
            let (stopped, gave_up) = {
                let st = state.borrow();
                (st.stopped, st.gave_up)
            };
            if exit.requested || stopped || gave_up || r.shutting_down {
                return;
            }
            if let Some(after) = note_crash(r, state) {
                tell(r, state, SupervisorEvent::Crashed { worker: id, exit: *exit, after });
                respawn_later(r, state, after);
            }
        }
        _ => {}
    }
}

/// Ends a rolling restart before its end, and says so.
fn abort_restart(r: &mut Reactor, state: &Rc<RefCell<State>>) {
    if state.borrow_mut().rolling.take().is_some() {
        tell(r, state, SupervisorEvent::RestartAborted);
    }
}

/// Starts the successor of the next old worker, or finishes the restart.
fn next_replacement(r: &mut Reactor, state: &Rc<RefCell<State>>) {
    if r.shutting_down || state.borrow().stopped || state.borrow().gave_up {
        abort_restart(r, state);
        return;
    }
    loop {
        let next = {
            let mut st = state.borrow_mut();
            let Some((queue, _)) = st.rolling.as_mut() else { return };
            queue.pop_front()
        };
        let Some(old) = next else {
            state.borrow_mut().rolling = None;
            tell(r, state, SupervisorEvent::RestartDone);
            return;
        };
        if !state.borrow().workers.contains(&old) {
            continue; // gone meanwhile
        }
        match spawn_one(r, state) {
            Ok(new) => {
                if let Some((_, cur)) = state.borrow_mut().rolling.as_mut() {
                    *cur = Some((old, new));
                }
                // Not ready in time: killed, so replaced as a crash would be.
                let wait = state.borrow().grace.max(Duration::from_secs(10));
                let s = state.clone();
                r.add_timer(wait, None, move |r| {
                    let still_waiting = matches!(s.borrow().rolling, Some((_, Some((_, n)))) if n == new);
                    if still_waiting && !r.is_ready(new) {
                        let _ = r.kill(new);
                    }
                });
                return;
            }
            Err(e) => {
                tell(r, state, SupervisorEvent::SpawnFailed(e.to_string()));
                state.borrow_mut().rolling = None;
                return;
            }
        }
    }
}
