//! The reactor: one mio `Poll` over every channel (and every child's pidfd),
//! dispatching frames to handlers, settling acks, and firing timers.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::process::Child;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::de::DeserializeOwned;
use serde::Serialize;
use slab::Slab;

use crate::ack::{fail_to_error, Outbox, Outcome, Responder};
use crate::codec::{self, fail, Envelope, Frame, Kind, PROTOCOL_VERSION};
use crate::config::{Config, LinkStats, Stats, WritableWakeups};
use crate::config::{MAX_NAMESPACE_LEN, MAX_TIMEOUT};
use crate::conn::{Conn, Flushed, Read};
use crate::error::{AckError, Error, Exit, ProtocolError, SendError};
use crate::handlers::{check_command, check_namespace, Handlers, Incoming, Lookup, DEFAULT_NAMESPACE};
use crate::id::{Peer, WorkerId};
use crate::listeners::{ListenerKey, ListenerKind, Listeners};
use crate::message::Message;
use crate::payload::Payload;
use crate::sys;
use crate::timer::{after, TimerKey, Wheel};

mod api;
mod broadcast;
mod dispatch;
mod failure;
mod master;
mod ns;
mod outgoing;
mod remote;
mod supervise;
mod user;

pub use broadcast::{Broadcast, Gathered};
pub(crate) use dispatch::hello_frame_limit;
pub use ns::Ns;
pub use outgoing::Outgoing;
pub(crate) use outgoing::{Completion, SendOptions, Target};
pub use remote::{Remote, RemoteError, RemoteSendError, SendResponder, REMOTE_QUEUE};
pub use supervise::{RestartPolicy, Supervisor, SupervisorEvent};
pub use user::{Readiness, SourceKey, UserTimerKey};

/// A stored handler: decodes its payload type, then runs the user's closure.
pub(crate) type Handler = Box<dyn FnMut(&mut Reactor, Incoming<'_>)>;

/// How often children without a pidfd are checked for exit.
const REAP_INTERVAL: Duration = Duration::from_millis(20);
/// Retry delay after ETOOMANYREFS.
const WRITE_RETRY: Duration = Duration::from_millis(1);
/// What an epoll token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The channel of link `key`.
    Channel(usize),
    /// The pidfd of link `key`'s child: readable once it exits.
    Exit(usize),
    /// A source the user registered, at `key` in `user.sources`.
    User(usize),
    /// The waker of the handle for other threads.
    Waker,
    /// The timerfd that ends finite waits.
    Timer,
}

impl Source {
    const TIMER: usize = usize::MAX;
    const WAKER: usize = usize::MAX - 1;

    pub(crate) fn token(self) -> Token {
        Token(match self {
            Source::Channel(key) => key << 2,
            Source::Exit(key) => key << 2 | 1,
            Source::User(key) => key << 2 | 2,
            Source::Timer => Self::TIMER,
            Source::Waker => Self::WAKER,
        })
    }

    pub(crate) fn of(token: Token) -> Source {
        match token.0 {
            Self::TIMER => Source::Timer,
            Self::WAKER => Source::Waker,
            t => match t & 3 {
                0 => Source::Channel(t >> 2),
                1 => Source::Exit(t >> 2),
                _ => Source::User(t >> 2),
            },
        }
    }
}

const TIMER_TOKEN: Token = Token(Source::TIMER);

/// What happened to a worker, as told to [`Reactor::on_worker_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// The worker said hello: queued messages are on their way.
    Ready,
    /// The channel closed while the process may still run. Pending acks
    /// failed with [`AckError::Disconnected`]. `Exited` follows when it ends.
    Disconnected(DisconnectReason),
    /// The process ended and was reaped. Pending acks (if any were left)
    /// failed with [`AckError::Exited`]. The worker id is no longer valid.
    ///
    /// From the moment the exit is seen, the worker is no longer ready and
    /// sends to it are refused; what it wrote before it died is still
    /// dispatched (replies settle their acks), then its pending acks fail,
    /// then this event is reported.
    Exited(Exit),
}

/// How a worker's [`Reactor::run`] ended, when nothing failed: the only two
/// normal ends a worker has (so matching on it needs no catch-all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// The master asked this worker to exit (`request_exit`, `shutdown`).
    ExitRequested,
    /// The master closed the channel, or its process ended.
    MasterGone,
}

/// Why a channel closed.
#[derive(Debug)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The worker closed its end.
    Hangup,
    /// The worker broke the protocol; the master closed the channel.
    Protocol(ProtocolError),
    /// A socket error.
    Io(io::Error),
}

/// A message nobody handled, as told to [`Reactor::on_unhandled`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Unhandled {
    /// Who sent it.
    pub from: Peer,
    /// Its namespace.
    pub namespace: String,
    /// Its command.
    pub command: String,
    /// Why it was not handled.
    pub reason: AckError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Master,
    Worker,
}

/// Sequence numbers are already well spread; hash them by multiplication.
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SeqMap = HashMap<u64, usize, BuildHasherDefault<SeqHasher>>;

/// One channel and, on the master, the child process behind it.
pub(crate) struct Link {
    pub(crate) id: WorkerId,
    /// `None` once the channel is closed.
    pub(crate) conn: Option<Conn>,
    pub(crate) child: Option<Child>,
    pub(crate) pidfd: Option<OwnedFd>,
    /// May frames be written? (Master side: the worker said hello.)
    pub(crate) ready: bool,
    pending: SeqMap,
    next_seq: u64,
    pub(crate) namespaces: BTreeSet<String>,
    dirty: bool,
    hangup_timer: Option<TimerKey>,
    hangup_reason: Option<DisconnectReason>,
    kill_timer: Option<TimerKey>,
    retry_timer: Option<TimerKey>,
    /// The master asked this worker to exit (or killed it).
    exit_requested: bool,
    /// The process has exited: what it wrote (`drain_left` bytes more) is
    /// being read before the exit is reported.
    exit: Option<Exit>,
    drain_left: usize,
    /// Reading is paused: our queue to this peer is over `max_queue_bytes`.
    paused: bool,
    /// Received fds not yet claimed by a frame, as last counted, and since when.
    fds_held: usize,
    fds_held_since: Option<Instant>,
    /// Frames dispatched from this link.
    frames_read: u64,
    /// When bytes last came while unclaimed fds were held.
    last_read: Option<Instant>,
}

impl Link {
    pub(crate) fn new(id: WorkerId, conn: Conn, ready: bool) -> Link {
        Link {
            id,
            conn: Some(conn),
            child: None,
            pidfd: None,
            ready,
            pending: SeqMap::default(),
            next_seq: 1,
            namespaces: BTreeSet::new(),
            dirty: false,
            hangup_timer: None,
            hangup_reason: None,
            kill_timer: None,
            retry_timer: None,
            exit_requested: false,
            exit: None,
            drain_left: 0,
            paused: false,
            fds_held: 0,
            fds_held_since: None,
            frames_read: 0,
            last_read: None,
        }
    }

    /// Sends SIGKILL to the child, through its pidfd where there is one, so
    /// that a process reaped behind our back (SIGCHLD ignored, a `waitpid(-1)`
    /// elsewhere) is never confused with whoever reused its pid.
    pub(crate) fn kill_child(&mut self) -> io::Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        if let Some(pidfd) = &self.pidfd {
            return match sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                other => other,
            };
        }
        // No pidfd (Linux < 5.3): signal only a child that waitpid says is
        // still ours and running. (A reap elsewhere between the two calls
        // cannot be ruled out without a pidfd.)
        match child.try_wait() {
            Ok(None) => child.kill(),
            _ => Ok(()),
        }
    }
}

/// What `waitpid` says of a child: `Some(status)` once it has exited; ECHILD
/// (reaped by someone else) is an exit whose status is unknown.
fn exit_status(child: &mut Child) -> Option<Option<std::process::ExitStatus>> {
    match child.try_wait() {
        Ok(Some(status)) => Some(Some(status)),
        Ok(None) => None,
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Some(None),
        Err(_) => None,
    }
}

struct PendingAck {
    serial: u64,
    link: WorkerId,
    seq: u64,
    qseq: u64,
    timer: TimerKey,
    done: Completion,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Ack(usize, u64),
    Hangup(WorkerId),
    Kill(WorkerId),
    Reap(WorkerId),
    WriteRetry(WorkerId),
    /// A user timer: its slot and generation.
    User(usize, u64),
}

enum Down {
    Exited(Exit),
    Closed(DisconnectReason),
}

type WorkerHook = Box<dyn FnMut(&mut Reactor, WorkerId, &WorkerEvent)>;
type UnhandledHook = Box<dyn FnMut(&mut Reactor, &Unhandled)>;

/// The single-threaded engine behind both roles: it owns the channels, the
/// handlers, the pending acks and the timers, and does all its work inside
/// [`poll`](Reactor::poll).
///
/// Create one with [`Reactor::master`] in the master and [`Reactor::attach`]
/// in a worker. See the crate docs for a complete example.
///
/// ```no_run
/// use std::time::Duration;
/// let mut reactor = clusterphone::Reactor::master()?;
/// let worker = reactor.spawn(std::process::Command::new("my-worker-binary"))?;
/// reactor.send_to(worker, "hello", &"world", None).send()?;
/// loop {
///     reactor.poll(Some(Duration::from_millis(100)))?;
/// }
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct Reactor {
    poll: Poll,
    events: Events,
    pub(crate) role: Role,
    pub(crate) links: Slab<Link>,
    pub(crate) next_generation: u32,
    handlers: Handlers<Handler>,
    acks: Slab<PendingAck>,
    ack_serial: u64,
    timers: Wheel<Timer>,
    fired: Vec<Timer>,
    pub(crate) config: Config,
    outbox: Rc<RefCell<Outbox>>,
    outbox_scratch: Vec<(WorkerId, Vec<u8>, Vec<u8>)>,
    worker_hook: Option<WorkerHook>,
    unhandled_hook: Option<UnhandledHook>,
    user: user::UserSources,
    /// User sources' events of the last poll: (slot, generation, readiness).
    user_ready: Vec<(usize, u64, Readiness)>,
    /// The queue of the handle for other threads, once one was made.
    remote: Option<std::sync::Arc<remote::Shared>>,
    worker_listeners: Listeners<WorkerHook>,
    unhandled_listeners: Listeners<UnhandledHook>,
    stats: Stats,
    depth: u32,
    backlog: Vec<usize>,
    dirty: Vec<usize>,
    broken: Vec<(WorkerId, io::Error)>,
    /// (source, readable, writable, read side closed or in error) of the last poll.
    ready_events: Vec<(Source, bool, bool, bool)>,
    panic: Option<Box<dyn Any + Send>>,
    /// Wakes a finite wait, so that `epoll_wait` itself never needs a timeout:
    /// on a VM, arming and cancelling the kernel timer of a timed `epoll_wait`
    /// costs ~0.5 µs per sleep, while this one is re-armed only when a wait
    /// must end earlier than it is set for. `None` if timerfd is unavailable.
    timer_fd: Option<OwnedFd>,
    /// When `timer_fd` expires (it may wake us early: we then wait on).
    timer_armed: Option<Instant>,
    /// Received fds held by all links' decoders (the sum of `Link::fds_held`).
    fds_held: usize,
    /// The last `epoll_wait` filled `events`: more may be ready.
    more_events: bool,
    /// `shutdown` is running: no spawns.
    pub(crate) shutting_down: bool,
    /// Shutdowns begun so far: work scheduled before one is not resumed after it.
    pub(crate) shutdowns: u64,
    /// Fds of acked messages that never left, by ack, until their outcome.
    fds_back: HashMap<usize, OwnedFd>,
    /// The fd of the outcome being delivered, for an `ackd_fd` completion.
    pub(crate) fd_back: Option<OwnedFd>,
    // Worker side.
    pub(crate) my_id: Option<WorkerId>,
    hello_sent: bool,
    /// Namespaces announced to the master (it keeps every one).
    announced: BTreeSet<String>,
    worker_error: Option<Error>,
    master_gone: bool,
}

impl Reactor {
    pub(crate) fn new(role: Role, config: Config) -> Result<Reactor, Error> {
        config.validate()?;
        let outbox = Outbox { frames: Vec::new(), max_frame: config.max_frame, spare: Vec::new() };
        let poll = Poll::new()?;
        // Without a timerfd (a sandbox may refuse it), waits pass their timeout to epoll.
        let timer_fd = sys::timer_fd().ok().filter(|fd| {
            poll.registry().register(&mut SourceFd(&fd.as_raw_fd()), TIMER_TOKEN, Interest::READABLE).is_ok()
        });
        Ok(Reactor {
            poll,
            events: Events::with_capacity(256),
            role,
            links: Slab::new(),
            next_generation: 0,
            handlers: Handlers::default(),
            acks: Slab::new(),
            ack_serial: 0,
            timers: Wheel::new(),
            fired: Vec::new(),
            config,
            outbox: Rc::new(RefCell::new(outbox)),
            outbox_scratch: Vec::new(),
            worker_hook: None,
            unhandled_hook: None,
            user: user::UserSources::default(),
            user_ready: Vec::new(),
            remote: None,
            worker_listeners: Listeners::new(ListenerKind::Worker),
            unhandled_listeners: Listeners::new(ListenerKind::Unhandled),
            stats: Stats::default(),
            depth: 0,
            backlog: Vec::new(),
            dirty: Vec::new(),
            broken: Vec::new(),
            ready_events: Vec::new(),
            panic: None,
            timer_fd,
            timer_armed: None,
            fds_held: 0,
            more_events: false,
            shutting_down: false,
            shutdowns: 0,
            fds_back: HashMap::new(),
            fd_back: None,
            my_id: None,
            hello_sent: false,
            announced: BTreeSet::new(),
            worker_error: None,
            master_gone: false,
        })
    }

    /// The link of a live worker id (a stale id, whose slot was reused, finds nothing).
    pub(crate) fn link_of(&self, id: WorkerId) -> Option<&Link> {
        self.links.get(id.index()).filter(|l| l.id == id)
    }

    /// [`link_of`](Self::link_of), mutably.
    pub(crate) fn link_of_mut(&mut self, id: WorkerId) -> Option<&mut Link> {
        self.links.get_mut(id.index()).filter(|l| l.id == id)
    }

    /// Registers a new link's socket (and pidfd) and stores it.
    pub(crate) fn add_link(&mut self, mut link: Link) -> Result<usize, Error> {
        let key = self.links.vacant_key();
        if let Some(conn) = link.conn.as_mut() {
            let token = Source::Channel(key).token();
            let always = self.config.writable_wakeups == WritableWakeups::Always;
            let interest = if always { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            conn.write_interest = always;
            if let Err(e) = self.poll.registry().register(&mut conn.stream, token, interest) {
                reap_now(&mut link);
                return Err(e.into());
            }
        }
        if let (Some(pidfd), false) = (&link.pidfd, self.config.exit_polling) {
            let raw = pidfd.as_raw_fd();
            if let Err(e) =
                self.poll.registry().register(&mut SourceFd(&raw), Source::Exit(key).token(), Interest::READABLE)
            {
                if let Some(conn) = link.conn.as_mut() {
                    let _ = self.poll.registry().deregister(&mut conn.stream);
                }
                reap_now(&mut link);
                return Err(e.into());
            }
        } else if link.child.is_some() {
            self.timers.insert(after(REAP_INTERVAL), Timer::Reap(link.id));
        }
        let k = self.links.insert(link);
        debug_assert_eq!(k, key);
        Ok(key)
    }

    // ----- polling --------------------------------------------------------

    /// Waits for I/O or the next timer (at most `timeout`; `None` waits as
    /// long as needed), dispatches what arrived to handlers and ack
    /// callbacks, fires due timers, writes what is queued, and returns.
    ///
    /// `Some(Duration::ZERO)` never blocks. A signal (EINTR) is retried with
    /// the time that remains. At most [`Config::frames_per_poll`] frames are
    /// taken from one channel per call; if more are waiting,
    /// [`next_deadline`](Reactor::next_deadline) says "now".
    ///
    /// On a worker, `Err(Error::Disconnected)` means the master is gone and
    /// `Err(Error::ExitRequested)` (returned once) that it asked us to exit.
    /// Calling `poll` from inside a handler is refused with [`Error::Reentrant`].
    ///
    /// If a handler or callback panics, the reactor first puts its state
    /// back in order (unread frames stay buffered; a dropped responder fails
    /// its ack), then the panic resumes out of `poll`.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use clusterphone::Error;
    /// let mut reactor = clusterphone::Reactor::attach()?;
    /// loop {
    ///     match reactor.poll(Some(Duration::from_secs(1))) {
    ///         Ok(()) => {}
    ///         Err(Error::ExitRequested) | Err(Error::Disconnected) => break,
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// reactor.flush(Duration::from_secs(1))?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// On a worker: [`Error::ExitRequested`] (once) and [`Error::Disconnected`] are the
    /// normal ends; [`Error::Protocol`] or [`Error::VersionMismatch`] if the master broke
    /// the protocol. On both roles: [`Error::Reentrant`] inside a callback, [`Error::Io`] if
    /// `epoll_wait` fails.
    ///
    /// # Panics
    /// Resumes a panic of a handler or callback, once the reactor's state is in order.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        if self.depth > 0 {
            return Err(Error::Reentrant);
        }
        if self.role == Role::Worker {
            if let Some(e) = self.worker_error.take() {
                return Err(e);
            }
            if self.master_gone {
                return Err(Error::Disconnected);
            }
            self.ensure_hello();
        }
        self.turn(timeout)?;
        if let Some(p) = self.panic.take() {
            panic::resume_unwind(p);
        }
        if self.role == Role::Worker {
            if let Some(e) = self.worker_error.take() {
                return Err(e);
            }
            // Said by the turn that saw it: a nested loop gets no other wake-up.
            if self.master_gone {
                return Err(Error::Disconnected);
            }
        }
        Ok(())
    }

    /// Work `poll` can do without waiting: frames buffered past the budget,
    /// failures to report, replies or frames not yet written, events the last
    /// wait could not take, a worker's hello not yet sent.
    fn pending_work(&self) -> bool {
        !self.backlog.is_empty()
            || !self.broken.is_empty()
            || !self.dirty.is_empty()
            || self.more_events
            || !self.outbox.borrow().frames.is_empty()
            || (self.role == Role::Worker && ((!self.hello_sent && !self.master_gone) || self.worker_error.is_some()))
    }

    /// When `poll` next has something to do without new I/O: now, if it has
    /// work it has not done (frames buffered past the per-poll budget, more
    /// ready channels than one poll takes, frames not yet written, a worker's
    /// hello not yet sent); else the next timer; `None` if only I/O can wake
    /// it. With [`AsRawFd`], this lets a caller nest the reactor in its own
    /// loop, level- or edge-triggered: call `poll(Some(Duration::ZERO))` when
    /// the fd is readable or this deadline has come, and ask again after.
    /// It also disarms the timer a blocking `poll` may have left set, so the
    /// fd then becomes readable only for I/O.
    ///
    /// ```no_run
    /// # use std::os::fd::AsRawFd;
    /// # use std::time::{Duration, Instant};
    /// # let mut reactor = clusterphone::Reactor::master()?;
    /// // Wait on the reactor's fd in your own loop (here: poll(2)), then let it work.
    /// let timeout_ms = match reactor.next_deadline() {
    ///     Some(t) => t.saturating_duration_since(Instant::now()).as_millis() as i32,
    ///     None => -1,
    /// };
    /// let mut pfd = libc::pollfd { fd: reactor.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    /// unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    /// reactor.poll(Some(Duration::ZERO))?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn next_deadline(&mut self) -> Option<Instant> {
        // A caller that asks nests us in its own loop: the timer of an earlier
        // timed wait must not make our fd readable later with nothing to do.
        if self.timer_armed.take().is_some() {
            if let Some(fd) = &self.timer_fd {
                let _ = sys::set_timer(fd.as_fd(), None);
            }
        }
        if self.pending_work() {
            return Some(Instant::now());
        }
        self.timers.next_deadline()
    }

    fn wait_time(&mut self, deadline: Option<Instant>) -> Option<Duration> {
        if self.pending_work() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let wake = match (deadline, self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        wake.map(|w| w.saturating_duration_since(now))
    }

    fn turn(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.drain_outbox();
        self.flush_dirty();
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut wait = self.wait_time(deadline);
        if let (Some(window), true) = (self.config.busy_poll, wait != Some(Duration::ZERO)) {
            // Spin no longer than the caller's deadline or the next timer allow.
            let spin_until = after(wait.map_or(window, |w| w.min(window)));
            let mut due = false;
            loop {
                match self.poll_io(Some(Duration::ZERO)) {
                    Ok(()) => {}
                    // A signal while spinning: nothing happened, spin on.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
                    Err(e) => return Err(e.into()),
                }
                if self.only_timer_event() {
                    // Consumed here, not again below: spin on unless something is due.
                    self.timer_expired();
                    self.events.clear();
                    due = self.wait_time(deadline) == Some(Duration::ZERO);
                }
                if due || !self.events.is_empty() || Instant::now() >= spin_until {
                    break;
                }
            }
            if self.events.is_empty() && !due {
                wait = self.wait_time(deadline);
                self.sleep(wait, deadline)?;
            }
        } else {
            self.sleep(wait, deadline)?;
        }
        self.ready_events.clear();
        let mut timer = false;
        for ev in self.events.iter() {
            let source = Source::of(ev.token());
            if source == Source::Timer {
                timer = true;
                continue;
            }
            let closed = ev.is_read_closed() || ev.is_error();
            let readable = ev.is_readable() || closed;
            let writable = ev.is_writable() || ev.is_write_closed();
            if let Source::User(slot) = source {
                // With the source's generation now: a callback may remove it
                // and another take its slot before this event is delivered.
                if let Some(generation) = self.user_generation(slot) {
                    self.user_ready.push((slot, generation, Readiness { readable, writable, closed }));
                }
                continue;
            }
            self.ready_events.push((source, readable, writable, closed));
        }
        if timer {
            self.timer_expired();
        }
        let backlog = std::mem::take(&mut self.backlog);
        let events = std::mem::take(&mut self.ready_events);
        // Exits first: a worker seen dead in this turn is not ready (and
        // refuses sends) before any handler of its last frames runs.
        for &(source, ..) in &events {
            if let Source::Exit(key) = source {
                self.check_exit(key);
            }
        }
        for &(source, readable, writable, closed) in &events {
            if source == Source::Waker {
                self.run_remote();
                continue;
            }
            let Source::Channel(key) = source else { continue };
            if writable {
                if let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) {
                    conn.blocked = false;
                    // (A hang-up also reports the write side closed: not a wake-up we asked for.)
                    if conn.queued_frames() == 0 && !closed {
                        self.stats.idle_writable_events += 1;
                    }
                }
                self.flush_link(key);
            }
            if readable {
                // After a hang-up, read on to the end of the stream.
                self.read_link(key, !closed, closed);
            }
        }
        self.ready_events = events;
        let user_ready = std::mem::take(&mut self.user_ready);
        for &(slot, generation, ready) in &user_ready {
            self.user_event(slot, generation, ready);
        }
        self.user_ready = user_ready;
        self.user_ready.clear();
        for key in backlog {
            if !self.backlog.contains(&key) {
                self.read_link(key, false, false);
            }
        }
        self.fire_timers();
        self.handle_broken();
        self.drain_outbox();
        self.flush_dirty();
        debug_assert_eq!(self.fds_held, self.links.iter().map(|(_, l)| l.fds_held).sum::<usize>());
        Ok(())
    }

    /// Waits up to `wait` for events. A finite wait is left to the timerfd,
    /// armed only if it is set later than this wait must end.
    fn sleep(&mut self, mut wait: Option<Duration>, deadline: Option<Instant>) -> Result<(), Error> {
        loop {
            let epoll_wait = match wait {
                Some(w) if !w.is_zero() && self.arm_timer(w) => None,
                other => other,
            };
            self.poll_io_retrying(epoll_wait, deadline)?;
            if !self.only_timer_event() {
                return Ok(());
            }
            // Our timer alone (consumed here, so the caller sees no event):
            // return if this wait is over, else it was set for an earlier
            // wait; wait on.
            self.timer_expired();
            self.events.clear();
            wait = self.wait_time(deadline);
            if wait.is_some_and(|w| w.is_zero()) {
                return Ok(());
            }
        }
    }

    /// Makes sure the timerfd expires no later than `wait` from now. False if
    /// there is no timerfd (or it failed): then epoll must time the wait.
    fn arm_timer(&mut self, wait: Duration) -> bool {
        let Some(fd) = &self.timer_fd else { return false };
        let Some(end) = Instant::now().checked_add(wait) else { return false };
        if self.timer_armed.is_some_and(|armed| armed <= end) {
            return true;
        }
        match sys::set_timer(fd.as_fd(), Some(wait)) {
            Ok(()) => {
                // Taken after arming, so never earlier than the real expiry.
                self.timer_armed = Instant::now().checked_add(wait);
                true
            }
            Err(_) => false,
        }
    }

    /// The last poll brought our timerfd's expiry and nothing else.
    fn only_timer_event(&self) -> bool {
        !self.events.is_empty() && self.events.iter().all(|e| e.token() == TIMER_TOKEN)
    }

    fn timer_expired(&mut self) {
        if let Some(fd) = &self.timer_fd {
            sys::clear_timer(fd.as_fd());
        }
        self.timer_armed = None;
    }

    fn poll_io(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let r = self.poll.poll(&mut self.events, wait);
        // A full batch may leave events behind, which raise no new edge.
        self.more_events = r.is_ok() && self.events.iter().count() >= self.events.capacity();
        r
    }

    fn poll_io_retrying(&mut self, mut wait: Option<Duration>, deadline: Option<Instant>) -> Result<(), Error> {
        loop {
            match self.poll_io(wait) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // Retry with what remains of the caller's wait.
                    wait = self.wait_time(deadline);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsRawFd for Reactor {
    /// The epoll fd: readable when `poll` has work. Nest it in another poller.
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

impl AsFd for Reactor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.poll.registry().as_fd()
    }
}

/// Kills and reaps a child whose link could not be set up: no orphan, no zombie.
pub(crate) fn reap_now(link: &mut Link) {
    let _ = link.kill_child();
    if let Some(mut child) = link.child.take() {
        let _ = child.wait();
    }
}
