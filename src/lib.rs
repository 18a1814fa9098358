//! Messaging between a master process and the worker processes it spawns.
//!
//! A port of the Node.js `clusterphone` package to a single-threaded, no-async
//! [`mio`] reactor. The master spawns workers over Unix socketpairs; both
//! sides register handlers by command name (optionally inside a namespace)
//! and send each other any serde payload, carried as CBOR, with an optional
//! file descriptor (SCM_RIGHTS) and an optional acknowledgement. Everything
//! happens inside [`Reactor::poll`]: no threads, no hidden blocking.
//!
//! Linux only (it relies on `pidfd_open`, `MSG_CMSG_CLOEXEC` and SCM_RIGHTS).
//!
//! ```no_run
//! use clusterphone::{Message, Reactor};
//! use std::time::Duration;
//!
//! fn main() -> Result<(), clusterphone::Error> {
//!     if clusterphone::is_worker() {
//!         let mut reactor = Reactor::attach()?;
//!         reactor.on("double", |_r, msg: Message<u64>| {
//!             let _ = msg.reply.ok(&(msg.payload * 2));
//!         })?;
//!         while reactor.poll(None).is_ok() {}
//!         return Ok(());
//!     }
//!     let mut reactor = Reactor::master()?;
//!     let worker = reactor.spawn(std::process::Command::new(std::env::current_exe()?))?;
//!     let answer: u64 = reactor.request(worker, "double", &21u64, Duration::from_secs(5))?;
//!     assert_eq!(answer, 42);
//!     reactor.shutdown(Duration::from_secs(1))
//! }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod ack;
mod bytes;
pub mod codec;
mod config;
mod conn;
mod error;
mod handlers;
mod payload;
mod reactor;
mod spawn;
mod sys;
mod timer;

use std::fmt;
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use ack::{AckHandle, Outgoing, Responder};
pub use bytes::Bytes;
pub use config::{Config, Stats, WritableWakeups, MAX_NAMESPACE_LEN, QUEUE_FRAME_OVERHEAD};
pub use error::{AckError, Error, Exit, ProtocolError, SendError};
pub use handlers::{DEFAULT_NAMESPACE, RESERVED_PREFIX};
pub use payload::Payload;
pub use reactor::{DisconnectReason, Reactor, Unhandled, WorkerEvent};
pub use spawn::{is_worker, WorkerPipes, ENV_FD, ENV_ID};

use ack::Target;

/// Identifies a worker on its master. Ids are never reused by a reactor, so
/// a stale id is an error, never another worker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub(crate) key: u32,
    pub(crate) generation: u32,
}

impl WorkerId {
    pub(crate) fn parse(s: &str) -> Option<WorkerId> {
        let (k, g) = s.split_once('.')?;
        Some(WorkerId { key: k.parse().ok()?, generation: g.parse().ok()? })
    }

    /// A number unique among the workers of one master (1, 2, 3, …).
    pub fn serial(&self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({self})")
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.key, self.generation)
    }
}

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The master (as seen by a worker).
    Master,
    /// A worker (as seen by the master).
    Worker(WorkerId),
}

/// A message as a handler receives it.
///
/// ```no_run
/// # use std::io::Write;
/// # use clusterphone::Message;
/// let mut reactor = clusterphone::Reactor::attach()?;
/// reactor.on("conn", |_r, msg: Message<()>| {
///     if let Some(fd) = msg.fd {
///         let mut stream = std::net::TcpStream::from(fd);
///         let _ = stream.write_all(b"hello from a worker\n");
///     }
///     let _ = msg.reply.ok(&());
/// })?;
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Message<T> {
    /// Who sent it.
    pub from: Peer,
    /// The decoded payload.
    pub payload: T,
    /// The fd that came with it, if any. Closed when dropped, unless taken.
    pub fd: Option<OwnedFd>,
    /// Acknowledges the message; see [`Responder`].
    pub reply: Responder,
}

/// The reactor's API inside one namespace, from [`Reactor::ns`].
///
/// ```no_run
/// # use clusterphone::Message;
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// let mut metrics = reactor.ns("metrics")?;
/// metrics.on("report", |_r, msg: Message<u64>| println!("{}", msg.payload))?;
/// metrics.send_to(worker, "reset", &(), None).send()?;
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct Ns<'r> {
    reactor: &'r mut Reactor,
    name: String,
}

impl Ns<'_> {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The reactor behind this view.
    pub fn reactor(&mut self) -> &mut Reactor {
        self.reactor
    }

    /// Registers a handler in this namespace (see [`Reactor::on`]).
    pub fn on<T, F>(&mut self, cmd: &str, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Reactor, Message<T>) + 'static,
    {
        self.reactor.on_in(&self.name, cmd, handler)
    }

    /// Removes a handler from this namespace.
    pub fn off(&mut self, cmd: &str) -> bool {
        self.reactor.off_in(&self.name, cmd)
    }

    /// Starts a message to `worker` in this namespace (see [`Reactor::send_to`]).
    pub fn send_to<'a, P: Payload + 'a>(
        &'a mut self,
        worker: WorkerId,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.reactor.outgoing(Target::Worker(worker), &self.name, cmd, payload, fd)
    }

    /// Starts a message to the master in this namespace.
    pub fn send_to_master<'a, P: Payload + 'a>(
        &'a mut self,
        cmd: &'a str,
        payload: P,
        fd: Option<OwnedFd>,
    ) -> Outgoing<'a, P> {
        self.reactor.outgoing(Target::Master, &self.name, cmd, payload, fd)
    }

    /// Blocking request to `worker` in this namespace.
    pub fn request<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        worker: WorkerId,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to(worker, cmd, payload, None).within(timeout).wait()
    }

    /// Blocking request to the master in this namespace.
    pub fn request_master<R: DeserializeOwned + 'static, P: Payload>(
        &mut self,
        cmd: &str,
        payload: P,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.send_to_master(cmd, payload, None).within(timeout).wait()
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
