//! The reactor: one mio `Poll` over every channel (and every child's pidfd),
//! dispatching frames to handlers, settling acks, and firing timers.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::process::{Child, ExitStatus};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::de::DeserializeOwned;
use serde::Serialize;
use slab::Slab;

use crate::ack::{fail_to_error, Completion, Outbox, Outcome, Outgoing, Reply, Responder, SendOptions, Target};
use crate::codec::{self, fail, Envelope, Frame, Kind, PROTOCOL_VERSION};
use crate::conn::{Conn, Flushed, Read};
use crate::error::{AckError, Error, ProtocolError, SendError};
use crate::handlers::{check_command, check_namespace, Handlers, Incoming, Lookup, DEFAULT_NAMESPACE};
use crate::timer::{TimerKey, Wheel};
use crate::{sys, Config, Message, Ns, Peer, Stats, WorkerId};

/// Longest ack timeout accepted; anything longer is surely a unit mistake.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often children without a pidfd are checked for exit.
const REAP_INTERVAL: Duration = Duration::from_millis(20);
/// Retry delay after ETOOMANYREFS.
const WRITE_RETRY: Duration = Duration::from_millis(1);

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
    Exited(ExitStatus),
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
    pub(crate) namespaces: Vec<String>,
    dirty: bool,
    hangup_timer: Option<TimerKey>,
    hangup_reason: Option<DisconnectReason>,
    kill_timer: Option<TimerKey>,
    retry_timer: Option<TimerKey>,
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
            namespaces: Vec::new(),
            dirty: false,
            hangup_timer: None,
            hangup_reason: None,
            kill_timer: None,
            retry_timer: None,
        }
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
}

enum Down {
    Exited(ExitStatus),
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
pub struct Reactor {
    poll: Poll,
    events: Events,
    pub(crate) role: Role,
    pub(crate) links: Slab<Link>,
    pub(crate) next_generation: u32,
    handlers: Handlers,
    acks: Slab<PendingAck>,
    ack_serial: u64,
    timers: Wheel<Timer>,
    fired: Vec<Timer>,
    pub(crate) config: Config,
    outbox: Rc<RefCell<Outbox>>,
    worker_hook: Option<WorkerHook>,
    unhandled_hook: Option<UnhandledHook>,
    stats: Stats,
    depth: u32,
    backlog: Vec<usize>,
    dirty: Vec<usize>,
    broken: Vec<(WorkerId, io::Error)>,
    ready_events: Vec<(usize, bool, bool)>,
    panic: Option<Box<dyn Any + Send>>,
    // Worker side.
    pub(crate) my_id: Option<WorkerId>,
    hello_sent: bool,
    worker_error: Option<Error>,
    master_gone: bool,
}

impl Reactor {
    pub(crate) fn new(role: Role, config: Config) -> Result<Reactor, Error> {
        let outbox = Outbox { frames: Vec::new(), max_frame: config.max_frame };
        Ok(Reactor {
            poll: Poll::new()?,
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
            worker_hook: None,
            unhandled_hook: None,
            stats: Stats::default(),
            depth: 0,
            backlog: Vec::new(),
            dirty: Vec::new(),
            broken: Vec::new(),
            ready_events: Vec::new(),
            panic: None,
            my_id: None,
            hello_sent: false,
            worker_error: None,
            master_gone: false,
        })
    }

    pub(crate) fn socket_token(key: usize) -> Token {
        Token(key << 1)
    }

    /// Registers a new link's socket (and pidfd) and stores it.
    pub(crate) fn add_link(&mut self, mut link: Link) -> Result<usize, Error> {
        let key = self.links.vacant_key();
        if let Some(conn) = link.conn.as_mut() {
            self.poll.registry().register(
                &mut conn.stream,
                Self::socket_token(key),
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        if let Some(pidfd) = &link.pidfd {
            let raw = pidfd.as_raw_fd();
            if let Err(e) = self.poll.registry().register(&mut SourceFd(&raw), Token(key << 1 | 1), Interest::READABLE)
            {
                if let Some(conn) = link.conn.as_mut() {
                    let _ = self.poll.registry().deregister(&mut conn.stream);
                }
                return Err(e.into());
            }
        } else if link.child.is_some() {
            self.timers.insert(Instant::now() + REAP_INTERVAL, Timer::Reap(link.id));
        }
        let k = self.links.insert(link);
        debug_assert_eq!(k, key);
        Ok(key)
    }

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
        let wrapped =
            Box::new(move |r: &mut Reactor, inc: Incoming<'_>| match ciborium::from_reader::<T, _>(inc.payload) {
                Ok(payload) => handler(r, Message { from: inc.from, payload, fd: inc.fd, reply: inc.responder }),
                Err(e) => {
                    let text = e.to_string();
                    if inc.responder.wanted() {
                        inc.responder.fail_code(fail::BAD_PAYLOAD, &text);
                    }
                    r.note_unhandled(inc.from, inc.ns, inc.cmd, AckError::BadPayload(text));
                }
            });
        let new_space = self.handlers.insert(ns, cmd, wrapped);
        if new_space && self.role == Role::Worker && self.hello_sent {
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
    pub fn ns(&mut self, name: &str) -> Result<Ns<'_>, Error> {
        check_namespace(name)?;
        Ok(Ns { reactor: self, name: name.to_owned() })
    }

    /// Called for every worker event (ready, disconnected, exited), on the master.
    pub fn on_worker_event(&mut self, hook: impl FnMut(&mut Reactor, WorkerId, &WorkerEvent) + 'static) {
        self.worker_hook = Some(Box::new(hook));
    }

    /// Called for every message that no handler took (and that asked for no
    /// ack, or whose sender was told why).
    pub fn on_unhandled(&mut self, hook: impl FnMut(&mut Reactor, &Unhandled) + 'static) {
        self.unhandled_hook = Some(Box::new(hook));
    }

    // ----- sending --------------------------------------------------------

    /// Starts a message to `worker` in the default namespace (master only).
    /// Finish it with `.send()`, `.ackd(..)`, `.handle()` or `.wait()`.
    ///
    /// `fd` travels with the message; the reactor owns it from now on and
    /// closes its copy once sent, or hands it back in the error if the send
    /// is refused.
    pub fn send_to<'a, T: Serialize + ?Sized>(
        &'a mut self,
        worker: WorkerId,
        cmd: &'a str,
        payload: &'a T,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, T> {
        self.outgoing(Target::Worker(worker), DEFAULT_NAMESPACE, cmd, payload, fd)
    }

    /// Starts a message to the master in the default namespace (worker only).
    pub fn send_to_master<'a, T: Serialize + ?Sized>(
        &'a mut self,
        cmd: &'a str,
        payload: &'a T,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, T> {
        self.outgoing(Target::Master, DEFAULT_NAMESPACE, cmd, payload, fd)
    }

    pub(crate) fn outgoing<'a, T: Serialize + ?Sized>(
        &'a mut self,
        target: Target,
        ns: &'a str,
        cmd: &'a str,
        payload: &'a T,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, T> {
        let options = SendOptions { timeout: None, force_queue: false };
        Outgoing { reactor: self, target, ns, cmd, payload, fd, options }
    }

    /// Sends a request to `worker` and polls until its reply (blocking).
    /// Not allowed inside a handler.
    pub fn request<R: DeserializeOwned, T: Serialize + ?Sized>(
        &mut self,
        worker: WorkerId,
        cmd: &str,
        payload: &T,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to(worker, cmd, payload, None).within(timeout).wait()
    }

    /// Sends a request to the master and polls until its reply (blocking).
    pub fn request_master<R: DeserializeOwned, T: Serialize + ?Sized>(
        &mut self,
        cmd: &str,
        payload: &T,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to_master(cmd, payload, None).within(timeout).wait()
    }

    /// Sets the default ack timeout. Zero, or more than a day, is refused.
    pub fn set_ack_timeout(&mut self, timeout: Duration) -> Result<(), Error> {
        self.config.ack_timeout = check_timeout(timeout)?;
        Ok(())
    }

    pub(crate) fn in_callback(&self) -> bool {
        self.depth > 0
    }

    fn resolve(&self, target: Target) -> Result<usize, Error> {
        match (self.role, target) {
            (Role::Master, Target::Worker(id)) => match self.links.get(id.key as usize) {
                Some(l) if l.id == id && l.conn.is_some() => Ok(id.key as usize),
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
    pub(crate) fn submit<T: Serialize + ?Sized>(
        &mut self,
        target: Target,
        ns: &str,
        cmd: &str,
        payload: &T,
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
        if conn.queued_bytes() >= max_bytes || (fd.is_some() && conn.queued_fds() >= max_fds) {
            return Err(SendError::new(Error::QueueFull, fd));
        }
        let seq = link.next_seq;
        let flags = if done.is_some() { codec::FLAG_ACK } else { 0 };
        let env = Envelope { kind: Kind::Message, flags, nfds: u8::from(fd.is_some()), seq, ns, cmd };
        let mut buf = conn.buffer();
        if let Err(e) = codec::encode(&mut buf, env, payload) {
            conn.recycle(buf);
            return Err(SendError::new(e, fd));
        }
        if buf.len() > max_frame || buf.len() > max_bytes {
            let size = buf.len();
            conn.recycle(buf);
            return Err(SendError::new(Error::FrameTooLarge { size, max: max_frame.min(max_bytes) }, fd));
        }
        link.next_seq += 1;
        let qseq = conn.push(buf, fd);
        if let Some(done) = done {
            let ack = self.acks.vacant_key();
            self.ack_serial += 1;
            let serial = self.ack_serial;
            let timer = self.timers.insert(Instant::now() + timeout, Timer::Ack(ack, serial));
            self.acks.insert(PendingAck { serial, link: id, seq, qseq, timer, done });
            link.pending.insert(seq, ack);
        }
        self.stats.messages_sent += 1;
        self.after_push(key);
        Ok(())
    }

    /// Writes a link's queue now if that is allowed, else marks it for later.
    fn after_push(&mut self, key: usize) {
        let link = &mut self.links[key];
        if !link.ready || link.conn.as_ref().is_none_or(|c| c.blocked) {
            return;
        }
        if self.depth > 0 {
            if !link.dirty {
                link.dirty = true;
                self.dirty.push(key);
            }
            return;
        }
        self.flush_link(key);
    }

    /// Writes what the socket takes. Failures are recorded and handled by
    /// the next `poll`, so user callbacks never run inside a send.
    fn flush_link(&mut self, key: usize) {
        let Some(link) = self.links.get_mut(key) else { return };
        link.dirty = false;
        if !link.ready {
            return;
        }
        let id = link.id;
        let Some(conn) = link.conn.as_mut() else { return };
        let before = conn.frames_written;
        let bytes_before = conn.bytes_written;
        let r = conn.flush();
        self.stats.frames_written += conn.frames_written - before;
        self.stats.bytes_written += conn.bytes_written - bytes_before;
        match r {
            Ok(Flushed::All) | Ok(Flushed::Blocked) => {}
            Ok(Flushed::TooManyRefs) => {
                if link.retry_timer.is_none() {
                    link.retry_timer = Some(self.timers.insert(Instant::now() + WRITE_RETRY, Timer::WriteRetry(id)));
                }
            }
            Err(e) => self.broken.push((id, e)),
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(key) = self.dirty.pop() {
            self.flush_link(key);
        }
    }

    /// Moves replies queued by responders into their links' queues.
    fn drain_outbox(&mut self) {
        if self.outbox.borrow().frames.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.outbox.borrow_mut().frames);
        for (id, buf) in frames {
            let Some(link) = self.links.get_mut(id.key as usize) else { continue };
            if link.id != id {
                continue;
            }
            let Some(conn) = link.conn.as_mut() else { continue };
            conn.push(buf, None);
            self.stats.acks_sent += 1;
            self.after_push(id.key as usize);
        }
    }

    // ----- worker side ----------------------------------------------------

    pub(crate) fn ensure_hello(&mut self) {
        if self.hello_sent {
            return;
        }
        self.hello_sent = true;
        let namespaces = self.handlers.namespaces();
        self.push_control(0, Kind::Hello, "", &(PROTOCOL_VERSION, namespaces));
    }

    fn announce_namespace(&mut self, ns: &str) {
        self.push_control(0, Kind::Namespace, ns, &());
    }

    /// Queues a control frame on link `key` (no ack, no fd).
    fn push_control<T: Serialize + ?Sized>(&mut self, key: usize, kind: Kind, ns: &str, body: &T) {
        let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) else { return };
        let mut buf = conn.buffer();
        let env = Envelope { kind, flags: 0, nfds: 0, seq: 0, ns, cmd: "" };
        if codec::encode(&mut buf, env, body).is_ok() {
            conn.push(buf, None);
            self.after_push(key);
        }
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
        }
        Ok(())
    }

    fn pending_work(&self) -> bool {
        !self.backlog.is_empty() || !self.broken.is_empty() || !self.outbox.borrow().frames.is_empty()
    }

    /// When `poll` next has something to do without new I/O: now, if frames
    /// are buffered; else the next timer; `None` if only I/O can wake it.
    /// With [`AsRawFd`], this lets a caller nest the reactor in its own loop.
    pub fn next_deadline(&mut self) -> Option<Instant> {
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
            let spin_until = Instant::now() + window;
            loop {
                self.poll_io(Some(Duration::ZERO))?;
                if !self.events.is_empty() || Instant::now() >= spin_until {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            if self.events.is_empty() {
                wait = self.wait_time(deadline);
                self.poll_io_retrying(wait, deadline)?;
            }
        } else {
            self.poll_io_retrying(wait, deadline)?;
        }
        self.ready_events.clear();
        for ev in self.events.iter() {
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            let writable = ev.is_writable() || ev.is_write_closed();
            self.ready_events.push((ev.token().0, readable, writable));
        }
        let backlog = std::mem::take(&mut self.backlog);
        let events = std::mem::take(&mut self.ready_events);
        for &(token, readable, writable) in &events {
            let key = token >> 1;
            if token & 1 == 1 {
                self.check_exit(key);
                continue;
            }
            if writable {
                if let Some(conn) = self.links.get_mut(key).and_then(|l| l.conn.as_mut()) {
                    conn.blocked = false;
                }
                self.flush_link(key);
            }
            if readable {
                self.read_link(key);
            }
        }
        self.ready_events = events;
        for key in backlog {
            if !self.backlog.contains(&key) {
                self.read_link(key);
            }
        }
        self.fire_timers();
        self.handle_broken();
        self.drain_outbox();
        self.flush_dirty();
        Ok(())
    }

    fn poll_io(&mut self, wait: Option<Duration>) -> io::Result<()> {
        self.poll.poll(&mut self.events, wait)
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

    /// Reads and dispatches frames from one link, within the fairness budget.
    fn read_link(&mut self, key: usize) {
        let mut budget = self.config.frames_per_poll.max(1);
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
            let bytes_before = conn.bytes_read;
            let r = conn.read();
            self.stats.bytes_read += conn.bytes_read - bytes_before;
            match r {
                Ok(Read::Data) => continue,
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

    fn link_alive(&self, key: usize, id: WorkerId) -> bool {
        self.links.get(key).is_some_and(|l| l.id == id && l.conn.is_some())
    }

    fn peer_of(&self, id: WorkerId) -> Peer {
        match self.role {
            Role::Master => Peer::Worker(id),
            Role::Worker => Peer::Master,
        }
    }

    fn dispatch(&mut self, key: usize, id: WorkerId, frame: Frame<'_>) -> Result<(), ProtocolError> {
        match frame.kind {
            Kind::Message => self.dispatch_message(key, id, frame),
            Kind::Reply | Kind::Fail => {
                self.stats.acks_received += 1;
                let link = &mut self.links[key];
                match link.pending.remove(&frame.seq) {
                    Some(ack) => {
                        let outcome = if frame.kind == Kind::Reply {
                            Ok(Reply(frame.payload.to_vec()))
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

    fn dispatch_message(&mut self, key: usize, id: WorkerId, frame: Frame<'_>) -> Result<(), ProtocolError> {
        if !self.links[key].ready {
            return Err(ProtocolError::UnexpectedFrame("message before hello"));
        }
        self.stats.messages_received += 1;
        let from = self.peer_of(id);
        let responder =
            if frame.wants_ack() { Responder::new(id, frame.seq, self.outbox.clone()) } else { Responder::none() };
        let Frame { ns, cmd, payload, fd, .. } = frame;
        match self.handlers.take(ns, cmd) {
            Lookup::Found(mut handler, generation) => {
                let incoming = Incoming { from, ns, cmd, payload, fd, responder };
                self.guarded(|r| handler(r, incoming));
                self.handlers.restore(ns, cmd, generation, handler);
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

    fn dispatch_hello(&mut self, key: usize, frame: Frame<'_>) -> Result<(), ProtocolError> {
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
                conn.push_front(buf);
                link.ready = true;
                if version != PROTOCOL_VERSION {
                    // Tell the worker our version, then close: both sides see the mismatch.
                    let _ = conn.flush();
                    return Err(ProtocolError::Version(version));
                }
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
    fn guarded(&mut self, f: impl FnOnce(&mut Reactor)) {
        self.depth += 1;
        let r = panic::catch_unwind(AssertUnwindSafe(|| f(&mut *self)));
        self.depth -= 1;
        if let Err(p) = r {
            if self.panic.is_none() {
                self.panic = Some(p);
            }
        }
    }

    fn settle(&mut self, ack: usize, outcome: Outcome) {
        let Some(pending) = self.acks.try_remove(ack) else { return };
        self.timers.cancel(pending.timer);
        match pending.done {
            Completion::Callback(cb) => self.guarded(|r| cb(r, outcome)),
            Completion::Handle(slot) => *slot.borrow_mut() = Some(outcome),
        }
    }

    fn worker_event(&mut self, id: WorkerId, event: WorkerEvent) {
        if let Some(mut hook) = self.worker_hook.take() {
            self.guarded(|r| hook(r, id, &event));
            if self.worker_hook.is_none() {
                self.worker_hook = Some(hook);
            }
        }
    }

    // ----- timers ---------------------------------------------------------

    fn fire_timers(&mut self) {
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
                        // Expiry is final: a message still queued is never sent.
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
                        self.timers.insert(Instant::now() + REAP_INTERVAL, Timer::Reap(id));
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

    // ----- failures -------------------------------------------------------

    fn handle_broken(&mut self) {
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

    fn protocol_error(&mut self, key: usize, e: ProtocolError) {
        self.stats.protocol_errors += 1;
        if self.role == Role::Worker && self.worker_error.is_none() {
            self.worker_error = Some(Error::Protocol(e.clone()));
        }
        self.link_down(key, Down::Closed(DisconnectReason::Protocol(e)));
    }

    /// The channel closed. On the master, an exit status is preferred over a
    /// plain disconnection: the socket often closes a moment before the
    /// process can be reaped, so wait `hangup_grace` for it.
    fn hangup(&mut self, key: usize, reason: DisconnectReason) {
        if self.role == Role::Master && self.check_exit(key) {
            return;
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
                link.hangup_timer = Some(self.timers.insert(Instant::now() + grace, Timer::Hangup(link.id)));
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
                self.link_down(key, Down::Exited(status));
                true
            }
            _ => false,
        }
    }

    /// Takes a link down: closes its channel, fails its pending acks exactly
    /// once, and tells the user. An exited link is removed altogether.
    fn link_down(&mut self, key: usize, down: Down) {
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

    // ----- lifecycle ------------------------------------------------------

    /// Drives `poll` until every write queue is empty, or fails with
    /// [`Error::FlushTimeout`]. Handlers keep running meanwhile. A worker
    /// should flush before it exits, or queued frames are lost with the process.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), Error> {
        if self.depth > 0 {
            return Err(Error::Reentrant);
        }
        if self.role == Role::Worker {
            self.ensure_hello();
        }
        let deadline = Instant::now() + timeout;
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

    /// Counters since this reactor was made.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Acks still waiting for an outcome.
    pub fn pending_acks(&self) -> usize {
        self.acks.len()
    }

    // ----- master side ----------------------------------------------------

    /// The workers this master knows of: running, starting, or disconnected
    /// but not yet reaped.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.links.iter().map(|(_, l)| l.id).collect()
    }

    fn link(&self, id: WorkerId) -> Option<&Link> {
        self.links.get(id.key as usize).filter(|l| l.id == id && self.role == Role::Master)
    }

    /// Whether `worker` has said hello (messages to it are written, not held).
    pub fn is_ready(&self, worker: WorkerId) -> bool {
        self.link(worker).is_some_and(|l| l.ready && l.conn.is_some())
    }

    /// The worker's process id.
    pub fn worker_pid(&self, worker: WorkerId) -> Option<u32> {
        self.link(worker).and_then(|l| l.child.as_ref()).map(|c| c.id())
    }

    /// Namespaces the worker has handlers in, as it announced them.
    pub fn worker_namespaces(&self, worker: WorkerId) -> Vec<String> {
        self.link(worker).map(|l| l.namespaces.clone()).unwrap_or_default()
    }

    /// Frames and bytes waiting in the write queue to `worker`.
    pub fn queue_depth(&self, worker: WorkerId) -> Option<(usize, usize)> {
        self.link(worker).and_then(|l| l.conn.as_ref()).map(|c| (c.queued_frames(), c.queued_bytes()))
    }

    /// Frames and bytes waiting in the write queue to the master (worker side).
    pub fn master_queue_depth(&self) -> Option<(usize, usize)> {
        if self.role != Role::Worker {
            return None;
        }
        self.links.get(0).and_then(|l| l.conn.as_ref()).map(|c| (c.queued_frames(), c.queued_bytes()))
    }

    /// Sends SIGKILL to `worker`. Its exit is reported by a later `poll`.
    pub fn kill(&mut self, worker: WorkerId) -> Result<(), Error> {
        let link = self.links.get_mut(worker.key as usize).filter(|l| l.id == worker);
        let child = link.and_then(|l| l.child.as_mut()).ok_or(Error::UnknownWorker(worker))?;
        child.kill()?;
        Ok(())
    }

    /// Asks `worker` to exit (its `poll` returns [`Error::ExitRequested`]),
    /// and kills it if it has not exited after `grace`.
    pub fn request_exit(&mut self, worker: WorkerId, grace: Duration) -> Result<(), Error> {
        let key = worker.key as usize;
        if self.link(worker).is_none() {
            return Err(Error::UnknownWorker(worker));
        }
        self.push_control(key, Kind::Exit, "", &());
        let link = &mut self.links[key];
        if link.kill_timer.is_none() {
            link.kill_timer = Some(self.timers.insert(Instant::now() + grace, Timer::Kill(worker)));
        }
        Ok(())
    }

    /// Asks every worker to exit, polls until all have exited (killing those
    /// still running after `grace`), and reaps them all.
    pub fn shutdown(&mut self, grace: Duration) -> Result<(), Error> {
        if self.depth > 0 {
            return Err(Error::Reentrant);
        }
        if self.role != Role::Master {
            return Err(Error::WrongRole);
        }
        for id in self.workers() {
            self.request_exit(id, grace)?;
        }
        let deadline = Instant::now() + grace + Duration::from_secs(2);
        while !self.links.is_empty() && Instant::now() < deadline {
            self.poll(Some(Duration::from_millis(20)))?;
        }
        self.reap_all();
        Ok(())
    }

    /// Kills and reaps every child still known (used by `shutdown` and `Drop`).
    fn reap_all(&mut self) {
        for (_, link) in self.links.iter_mut() {
            link.conn = None;
            if let Some(child) = link.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
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

fn check_timeout(t: Duration) -> Result<Duration, Error> {
    if t.is_zero() || t > MAX_TIMEOUT {
        Err(Error::InvalidTimeout)
    } else {
        Ok(t)
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
        sys::borrow_raw(self.poll.as_raw_fd())
    }
}

impl Drop for Reactor {
    /// Dropping a master closes every channel, gives the workers
    /// `hangup_grace` to exit by themselves, then kills and reaps the rest:
    /// no zombies. Frames still queued are discarded and their fds closed.
    fn drop(&mut self) {
        if self.role != Role::Master || self.links.is_empty() {
            return;
        }
        for (_, link) in self.links.iter_mut() {
            link.conn = None;
        }
        let deadline = Instant::now() + self.config.hangup_grace;
        loop {
            let running = self
                .links
                .iter_mut()
                .filter_map(|(_, l)| l.child.as_mut())
                .map(|c| !matches!(c.try_wait(), Ok(Some(_))))
                .filter(|&running| running)
                .count();
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Callbacks must not run during drop; outcomes are discarded.
        for (_, link) in self.links.iter_mut() {
            if let Some(child) = link.child.as_mut() {
                if !matches!(child.try_wait(), Ok(Some(_))) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}
