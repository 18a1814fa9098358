//! Typed errors: what a call can fail with, what an acknowledgement can end
//! with, and what a peer can do wrong on the wire.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;

use crate::id::WorkerId;

/// Everything a clusterphone call can fail with.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    Io(io::Error),
    /// `attach` was called in a process that no clusterphone master spawned.
    NotAWorker(String),
    /// The call is for the other role (e.g. `spawn` on a worker).
    WrongRole,
    /// A command name was empty.
    EmptyCommand,
    /// A namespace name was empty.
    EmptyNamespace,
    /// The namespace name is reserved for the library.
    ReservedNamespace,
    /// The command name is longer than 65535 bytes, or the namespace name
    /// longer than [`MAX_NAMESPACE_LEN`](crate::MAX_NAMESPACE_LEN).
    NameTooLong,
    /// No such worker, or it has exited or been disconnected.
    UnknownWorker(WorkerId),
    /// The payload could not be encoded as CBOR.
    Encode(String),
    /// A payload or reply could not be decoded into the requested type.
    Decode(String),
    /// The encoded frame exceeds the configured maximum.
    FrameTooLarge {
        /// Size of the frame that was refused.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The connection's write queue is at its byte or fd limit.
    QueueFull,
    /// An fd was sent to a worker that has not said hello yet, without `force_queue`.
    NotReady(WorkerId),
    /// A timeout of zero, or of more than a day.
    InvalidTimeout,
    /// The peer broke the protocol; its connection was closed.
    Protocol(ProtocolError),
    /// The peers speak different protocol versions.
    VersionMismatch {
        /// Our protocol version.
        ours: u32,
        /// The peer's protocol version.
        theirs: u32,
    },
    /// On a worker: the channel to the master is closed.
    Disconnected,
    /// On a worker: the master asked this worker to exit.
    ExitRequested,
    /// `poll`, `flush` or a blocking request was called from inside a handler.
    Reentrant,
    /// The acknowledgement of a blocking request ended in an error.
    Ack(AckError),
    /// `flush` ran out of time with frames still queued.
    FlushTimeout,
    /// A [`Config`](crate::Config) setting is out of range (the text says which and why).
    InvalidConfig(&'static str),
    /// `spawn` was called while [`Reactor::shutdown`](crate::Reactor::shutdown) runs.
    ShuttingDown,
    /// `spawn` was given a command with piped stdio, which nobody would read (the
    /// worker would block once a pipe fills): the child was killed and reaped.
    /// Use [`Reactor::spawn_piped`](crate::Reactor::spawn_piped) to get the pipes.
    PipedStdio,
    /// A worker tried to register more namespaces than [`Config::max_namespaces`](crate::Config::max_namespaces).
    TooManyNamespaces,
    /// An fd given to [`SharedMemory::from_fd`](crate::SharedMemory::from_fd) is not a
    /// memfd sealed against writes and shrinking, or is too large (the text says which).
    BadSharedMemory(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::NotAWorker(why) => write!(f, "not a clusterphone worker: {why}"),
            Error::WrongRole => f.write_str("this call is for the other role (master/worker)"),
            Error::EmptyCommand => f.write_str("command name is empty"),
            Error::EmptyNamespace => f.write_str("namespace name is empty"),
            Error::ReservedNamespace => f.write_str("namespace name is reserved"),
            Error::NameTooLong => f.write_str("command or namespace name is too long"),
            Error::UnknownWorker(w) => write!(f, "no such worker: {w}"),
            Error::Encode(e) => write!(f, "cannot encode payload: {e}"),
            Error::Decode(e) => write!(f, "cannot decode payload: {e}"),
            Error::FrameTooLarge { size, max } => write!(f, "frame of {size} bytes exceeds the limit of {max}"),
            Error::QueueFull => f.write_str("write queue is full"),
            Error::NotReady(w) => write!(f, "worker {w} is not ready; refusing to queue an fd"),
            Error::InvalidTimeout => f.write_str("timeout must be above zero and at most a day"),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::VersionMismatch { ours, theirs } => {
                write!(f, "protocol version mismatch: ours {ours}, peer's {theirs}")
            }
            Error::Disconnected => f.write_str("disconnected from master"),
            Error::ExitRequested => f.write_str("the master asked this worker to exit"),
            Error::Reentrant => f.write_str("cannot poll from inside a handler"),
            Error::Ack(e) => write!(f, "request failed: {e}"),
            Error::FlushTimeout => f.write_str("flush timed out with frames still queued"),
            Error::InvalidConfig(why) => write!(f, "invalid config: {why}"),
            Error::ShuttingDown => f.write_str("the reactor is shutting down"),
            Error::PipedStdio => f.write_str("piped stdio needs spawn_piped (nobody would read the pipes)"),
            Error::TooManyNamespaces => f.write_str("too many namespaces"),
            Error::BadSharedMemory(why) => write!(f, "refused shared memory: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Protocol(e) => Some(e),
            Error::Ack(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<AckError> for Error {
    fn from(e: AckError) -> Self {
        Error::Ack(e)
    }
}

/// A send refused at the call. Nothing was queued; the fd, if any, is handed
/// back so the caller's descriptor is not lost.
///
/// ```no_run
/// # use std::os::fd::OwnedFd;
/// # use clusterphone::Error;
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// # let fd: OwnedFd = todo!();
/// match reactor.send_to(worker, "conn", &(), Some(fd)).send() {
///     Ok(()) => {}
///     Err(refused) if matches!(refused.error, Error::NotReady(_)) => {
///         // Not ready yet: keep the fd, try again after WorkerEvent::Ready.
///         let _fd = refused.into_fd();
///     }
///     Err(refused) => return Err(refused.into()),
/// }
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Debug)]
pub struct SendError {
    /// Why the send was refused.
    pub error: Error,
    /// The fd that was to travel with the message, returned unharmed.
    pub fd: Option<OwnedFd>,
}

impl SendError {
    pub(crate) fn new(error: Error, fd: Option<OwnedFd>) -> Self {
        SendError { error, fd }
    }

    /// Takes the handed-back fd.
    pub fn into_fd(self) -> Option<OwnedFd> {
        self.fd
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send refused: {}", self.error)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Self {
        e.error
    }
}

/// How an acknowledged message can end, other than with a reply.
/// Every message that asked for an ack gets exactly one outcome.
///
/// ```no_run
/// # use clusterphone::{AckError, Error};
/// # use std::time::Duration;
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// match reactor.request::<String, _>(worker, "hello", &(), Duration::from_secs(1)) {
///     Ok(reply) => println!("{reply}"),
///     Err(Error::Ack(AckError::Timeout)) => println!("too slow"),
///     Err(Error::Ack(AckError::Exited(exit))) => println!("died: {exit}"),
///     Err(e) => println!("{e}"),
/// }
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckError {
    /// The remote handler answered with an error (its text).
    Remote(String),
    /// The remote has handlers in that namespace, but none for the command.
    NoHandler,
    /// The remote has no handler at all in that namespace.
    UnknownNamespace,
    /// The remote could not decode the payload into its handler's type.
    BadPayload(String),
    /// The remote handler dropped its responder without answering (or panicked).
    Dropped,
    /// No answer arrived in time.
    Timeout,
    /// The channel closed (on a worker: the master went away).
    Disconnected,
    /// The worker process ended.
    Exited(Exit),
    /// The reply arrived but did not decode into the requested type.
    BadReply(String),
    /// The message was never sent: its send was refused at the call (the
    /// text says why). Only a broadcast reports this as an outcome; a
    /// single send returns the refusal instead.
    NotSent(String),
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckError::Remote(e) => write!(f, "remote handler failed: {e}"),
            AckError::NoHandler => f.write_str("no handler for that command"),
            AckError::UnknownNamespace => f.write_str("unknown namespace"),
            AckError::BadPayload(e) => write!(f, "remote could not decode the payload: {e}"),
            AckError::Dropped => f.write_str("remote handler dropped the message without replying"),
            AckError::Timeout => f.write_str("timed out waiting for the acknowledgement"),
            AckError::Disconnected => f.write_str("channel closed before the acknowledgement"),
            AckError::Exited(e) => write!(f, "worker exited before acknowledging ({e})"),
            AckError::BadReply(e) => write!(f, "cannot decode reply: {e}"),
            AckError::NotSent(e) => write!(f, "not sent: {e}"),
        }
    }
}

impl std::error::Error for AckError {}

/// How a worker process ended, as reported by [`WorkerEvent::Exited`](crate::WorkerEvent::Exited)
/// and [`AckError::Exited`].
///
/// ```no_run
/// # use clusterphone::WorkerEvent;
/// # let mut reactor = clusterphone::Reactor::master()?;
/// reactor.on_worker_event(|reactor, _id, event| {
///     if let WorkerEvent::Exited(exit) = event {
///         // Requested exits (request_exit, kill, shutdown) are not crashes: no respawn.
///         if exit.is_crash() {
///             let _ = reactor.spawn(std::process::Command::new("my-worker-binary"));
///         }
///     }
/// });
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exit {
    /// The exit status; `None` if it could not be had: the process was reaped
    /// by someone else (SIGCHLD set to `SIG_IGN`, or a `waitpid(-1)` elsewhere
    /// in the program).
    pub status: Option<ExitStatus>,
    /// This master asked for the exit ([`request_exit`](crate::Reactor::request_exit),
    /// [`kill`](crate::Reactor::kill) or [`shutdown`](crate::Reactor::shutdown)).
    pub requested: bool,
}

impl Exit {
    /// Whether the worker ended without being asked to: a crash, or an exit of its own.
    pub fn is_crash(&self) -> bool {
        !self.requested
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{s}")?,
            None => f.write_str("status unknown")?,
        }
        if self.requested {
            f.write_str(", as requested")?;
        }
        Ok(())
    }
}

/// A peer broke the wire protocol. The connection it came on is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame's magic byte is wrong: garbage on the wire.
    BadMagic(u8),
    /// An unknown frame kind.
    UnknownKind(u8),
    /// The length field cannot hold the frame's own header.
    BadLength(u32),
    /// The announced frame exceeds the receive limit.
    TooLarge {
        /// The announced size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// A name is not UTF-8.
    BadName,
    /// The frame announces more fds than arrived, or the kernel dropped fds.
    MissingFds,
    /// More than one fd on one frame.
    TooManyFds(u8),
    /// A hello or control frame whose body does not decode.
    BadControl(String),
    /// An acknowledgement for a sequence number never issued on this connection.
    UnknownSequence(u64),
    /// A hello from a peer that already said hello, or a message before hello.
    UnexpectedFrame(&'static str),
    /// The peer speaks another protocol version.
    Version(u32),
    /// The stream ended in the middle of a frame.
    Truncated,
    /// The peer sent more fds ahead of their frames than
    /// [`Config::max_received_fds`](crate::Config::max_received_fds) allows, or held
    /// unclaimed fds the longest when all links together reached
    /// [`Config::max_received_fds_total`](crate::Config::max_received_fds_total).
    TooManyFdsInFlight,
    /// The peer announced more namespaces than
    /// [`Config::max_namespaces`](crate::Config::max_namespaces) allows.
    TooManyNamespaces,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic(b) => write!(f, "bad magic byte {b:#04x}"),
            ProtocolError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            ProtocolError::BadLength(l) => write!(f, "bad frame length {l}"),
            ProtocolError::TooLarge { size, max } => write!(f, "frame of {size} bytes exceeds the limit of {max}"),
            ProtocolError::BadName => f.write_str("name is not UTF-8"),
            ProtocolError::MissingFds => f.write_str("frame announces fds that did not arrive"),
            ProtocolError::TooManyFds(n) => write!(f, "{n} fds on one frame"),
            ProtocolError::BadControl(e) => write!(f, "bad control frame: {e}"),
            ProtocolError::UnknownSequence(s) => write!(f, "ack for sequence {s}, never issued"),
            ProtocolError::UnexpectedFrame(what) => write!(f, "unexpected frame: {what}"),
            ProtocolError::Version(v) => write!(f, "unsupported protocol version {v}"),
            ProtocolError::Truncated => f.write_str("stream ended inside a frame"),
            ProtocolError::TooManyFdsInFlight => f.write_str("too many fds received"),
            ProtocolError::TooManyNamespaces => f.write_str("too many namespaces announced"),
        }
    }
}

impl std::error::Error for ProtocolError {}
