//! Other threads: a `Send + Clone` handle that sends, broadcasts and
//! replies through the reactor, waking it with mio's `Waker`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;

use super::*;
use crate::raw::RawPayload;

/// Commands a [`Remote`] queues at once, before [`RemoteError::Full`].
pub const REMOTE_QUEUE: usize = 4096;

/// What the reactor runs for another thread.
enum Command {
    Send {
        target: Target,
        ns: String,
        cmd: String,
        payload: RawPayload,
        fd: Option<OwnedFd>,
    },
    Broadcast {
        ns: String,
        cmd: String,
        payload: RawPayload,
    },
    /// A whole reply or failure frame for `link`, encoded on the other thread.
    Frame {
        link: WorkerId,
        frame: Vec<u8>,
    },
}

pub(crate) struct Shared {
    queue: Mutex<VecDeque<Command>>,
    waker: Waker,
    /// The reactor is gone: nothing more is run.
    closed: AtomicBool,
    max_frame: usize,
}

impl Shared {
    fn push(&self, command: Command) -> Result<(), (RemoteError, Command)> {
        if self.closed.load(Ordering::Acquire) {
            return Err((RemoteError::Closed, command));
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // Again under the lock: the reactor clears the queue under it when it goes.
        if self.closed.load(Ordering::Acquire) {
            return Err((RemoteError::Closed, command));
        }
        if queue.len() >= REMOTE_QUEUE {
            return Err((RemoteError::Full, command));
        }
        let was_empty = queue.is_empty();
        queue.push_back(command);
        drop(queue);
        // One wake-up per batch: the reactor drains the whole queue.
        if was_empty {
            let _ = self.waker.wake();
        }
        Ok(())
    }
}

/// Why a [`Remote`] could not queue a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteError {
    /// [`REMOTE_QUEUE`] commands are waiting for the reactor: try again later.
    Full,
    /// The reactor is gone.
    Closed,
    /// The payload could not be encoded, or is larger than `max_frame`.
    Encode,
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemoteError::Full => "the reactor's queue for other threads is full",
            RemoteError::Closed => "the reactor is gone",
            RemoteError::Encode => "the payload cannot be encoded, or is too large",
        })
    }
}

impl std::error::Error for RemoteError {}

/// A send refused by a [`Remote`], with its fd handed back.
#[derive(Debug)]
pub struct RemoteSendError {
    /// Why.
    pub error: RemoteError,
    /// The fd that was to go with the message.
    pub fd: Option<OwnedFd>,
}

/// A handle to a reactor for other threads (`Send + Sync + Clone`): what it
/// queues, the reactor runs in its own thread at its next turn, in the order
/// queued (from all handles together). Sends it makes are plain (no ack);
/// one the reactor then refuses (worker gone, queue full) is counted in
/// [`Stats::remote_refused`] and its fd closed.
///
/// ```no_run
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// let remote = reactor.remote()?;
/// std::thread::spawn(move || {
///     let _ = remote.send_to(worker, "result", &42u64, None);
/// });
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Clone)]
pub struct Remote {
    shared: Arc<Shared>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

impl Remote {
    fn encode<T: Serialize + ?Sized>(&self, payload: &T) -> Result<RawPayload, RemoteError> {
        let raw = RawPayload::encode(payload).map_err(|_| RemoteError::Encode)?;
        if raw.as_bytes().len() > self.shared.max_frame {
            return Err(RemoteError::Encode);
        }
        Ok(raw)
    }

    fn send(
        &self,
        target: Target,
        cmd: &str,
        payload: &(impl Serialize + ?Sized),
        fd: Option<OwnedFd>,
    ) -> Result<(), RemoteSendError> {
        let payload = match self.encode(payload) {
            Ok(p) => p,
            Err(error) => return Err(RemoteSendError { error, fd }),
        };
        let command = Command::Send { target, ns: DEFAULT_NAMESPACE.to_owned(), cmd: cmd.to_owned(), payload, fd };
        self.shared.push(command).map_err(|(error, command)| {
            let fd = match command {
                Command::Send { fd, .. } => fd,
                _ => None,
            };
            RemoteSendError { error, fd }
        })
    }

    /// Queues a message to `worker` (on a master's handle).
    ///
    /// # Errors
    /// [`RemoteError::Full`], [`RemoteError::Closed`] or [`RemoteError::Encode`],
    /// with the fd handed back.
    pub fn send_to(
        &self,
        worker: WorkerId,
        cmd: &str,
        payload: &(impl Serialize + ?Sized),
        fd: Option<OwnedFd>,
    ) -> Result<(), RemoteSendError> {
        self.send(Target::Worker(worker), cmd, payload, fd)
    }

    /// Queues a message to the master (on a worker's handle).
    ///
    /// # Errors
    /// As [`send_to`](Remote::send_to).
    pub fn send_to_master(
        &self,
        cmd: &str,
        payload: &(impl Serialize + ?Sized),
        fd: Option<OwnedFd>,
    ) -> Result<(), RemoteSendError> {
        self.send(Target::Master, cmd, payload, fd)
    }

    /// Queues a message to every worker ready when the reactor runs it.
    ///
    /// # Errors
    /// [`RemoteError::Full`], [`RemoteError::Closed`] or [`RemoteError::Encode`].
    pub fn broadcast(&self, cmd: &str, payload: &(impl Serialize + ?Sized)) -> Result<(), RemoteError> {
        let payload = self.encode(payload)?;
        let command = Command::Broadcast { ns: DEFAULT_NAMESPACE.to_owned(), cmd: cmd.to_owned(), payload };
        self.shared.push(command).map_err(|(e, _)| e)
    }
}

/// A [`Responder`] that can be answered from any thread, from
/// [`Responder::detach`]: the reply is encoded there and written by the
/// reactor at its next turn. Dropped unanswered, it answers
/// [`AckError::Dropped`], as a responder does.
pub struct SendResponder {
    inner: Option<(WorkerId, u64)>,
    shared: Arc<Shared>,
}

impl fmt::Debug for SendResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendResponder").field("wanted", &self.inner.is_some()).finish()
    }
}

impl SendResponder {
    fn push(&self, link: WorkerId, frame: Vec<u8>) -> Result<(), RemoteError> {
        self.shared.push(Command::Frame { link, frame }).map_err(|(e, _)| e)
    }

    /// Acknowledges with a reply.
    ///
    /// # Errors
    /// [`RemoteError::Encode`] if the reply cannot be encoded or is too large
    /// (the sender then gets an error ack), [`RemoteError::Full`] (the sender
    /// then gets [`AckError::Dropped`] if room is made, else its timeout) or
    /// [`RemoteError::Closed`].
    pub fn ok<T: Serialize + ?Sized>(mut self, reply: &T) -> Result<(), RemoteError> {
        let Some((link, seq)) = self.inner.take() else { return Ok(()) };
        let mut frame = Vec::new();
        let env = Envelope { kind: Kind::Reply, flags: 0, nfds: 0, seq, ns: "", cmd: "" };
        match codec::encode(&mut frame, env, reply) {
            Ok(()) if frame.len() <= self.shared.max_frame => self.push(link, frame),
            _ => {
                let _ = self.push(link, fail_frame(seq, fail::REMOTE, "reply not sent: cannot encode it"));
                Err(RemoteError::Encode)
            }
        }
    }

    /// Acknowledges with an error ([`AckError::Remote`] with this text).
    ///
    /// # Errors
    /// [`RemoteError::Full`] or [`RemoteError::Closed`].
    pub fn err(mut self, error: impl fmt::Display) -> Result<(), RemoteError> {
        let Some((link, seq)) = self.inner.take() else { return Ok(()) };
        self.push(link, fail_frame(seq, fail::REMOTE, &error.to_string()))
    }
}

impl Drop for SendResponder {
    fn drop(&mut self) {
        if let Some((link, seq)) = self.inner.take() {
            let _ = self.push(link, fail_frame(seq, fail::DROPPED, "dropped without a reply"));
        }
    }
}

fn fail_frame(seq: u64, code: u8, text: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    let env = Envelope { kind: Kind::Fail, flags: 0, nfds: 0, seq, ns: "", cmd: "" };
    let mut end = text.len().min(4096);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let _ = codec::encode(&mut frame, env, &(code, &text[..end]));
    frame
}

impl Responder {
    /// This responder, answerable from any thread through `remote` (of the
    /// reactor that received the message).
    ///
    /// ```no_run
    /// # use clusterphone::Message;
    /// # let mut reactor = clusterphone::Reactor::attach()?;
    /// let remote = reactor.remote()?;
    /// reactor.on("hash", move |_r, msg: Message<clusterphone::Bytes>| {
    ///     let reply = msg.reply.detach(&remote);
    ///     std::thread::spawn(move || {
    ///         let sum: u64 = msg.payload.iter().map(|&b| b as u64).sum();
    ///         let _ = reply.ok(&sum);
    ///     });
    /// })?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn detach(mut self, remote: &Remote) -> SendResponder {
        SendResponder { inner: self.take_inner(), shared: remote.shared.clone() }
    }
}

impl Reactor {
    /// A handle for other threads (made once; every call returns a clone).
    ///
    /// # Errors
    /// [`Error::Io`] if the waker cannot be registered.
    pub fn remote(&mut self) -> Result<Remote, Error> {
        if let Some(shared) = &self.remote {
            return Ok(Remote { shared: shared.clone() });
        }
        let waker = Waker::new(self.poll.registry(), Source::Waker.token())?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            waker,
            closed: AtomicBool::new(false),
            max_frame: self.config.max_frame,
        });
        self.remote = Some(shared.clone());
        Ok(Remote { shared })
    }

    /// Runs what other threads queued, at most one queue's worth per turn.
    pub(super) fn run_remote(&mut self) {
        let Some(shared) = self.remote.clone() else { return };
        let commands: Vec<Command> = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.drain(..).collect()
        };
        // Written together, as a batch is: one `sendmsg` for many frames.
        self.depth += 1;
        for command in commands {
            match command {
                Command::Send { target, ns, cmd, payload, fd } => {
                    let options = SendOptions { timeout: None, force_queue: false };
                    if let Err(refused) = self.submit(target, &ns, &cmd, payload, fd, options, None) {
                        self.stats.remote_refused += 1;
                        cp_log!(Debug, "a send from another thread was refused: {}", refused.error);
                    }
                }
                Command::Broadcast { ns, cmd, payload } => {
                    let ready: Vec<WorkerId> = self.workers().into_iter().filter(|&w| self.is_ready(w)).collect();
                    for w in ready {
                        let options = SendOptions { timeout: None, force_queue: false };
                        let sent = self.submit(Target::Worker(w), &ns, &cmd, payload.clone(), None, options, None);
                        if sent.is_err() {
                            self.stats.remote_refused += 1;
                        }
                    }
                }
                Command::Frame { link, frame } => {
                    self.outbox.borrow_mut().frames.push((link, frame, Vec::new()));
                }
            }
        }
        self.depth -= 1;
        if self.depth == 0 {
            self.drain_outbox();
            self.flush_dirty();
        }
    }

    /// Tells other threads' handles that nothing more will run.
    pub(super) fn close_remote(&mut self) {
        if let Some(shared) = &self.remote {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            shared.closed.store(true, Ordering::Release);
            queue.clear();
        }
    }
}
