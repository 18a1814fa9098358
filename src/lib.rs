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
#[doc(hidden)]
pub mod codec;
mod config;
mod conn;
mod error;
mod handlers;
mod id;
mod message;
mod payload;
mod reactor;
mod spawn;
mod sys;
mod timer;

pub use ack::{AckHandle, Responder};
pub use bytes::Bytes;
pub use config::{Config, Stats, WritableWakeups, MAX_NAMESPACE_LEN, QUEUE_FRAME_OVERHEAD};
pub use error::{AckError, Error, Exit, ProtocolError, SendError};
pub use handlers::{DEFAULT_NAMESPACE, RESERVED_PREFIX};
pub use id::{Peer, WorkerId};
pub use message::Message;
pub use payload::Payload;
pub use reactor::{DisconnectReason, Ns, Outgoing, Reactor, Unhandled, WorkerEvent};
pub use spawn::{is_worker, WorkerPipes, ENV_FD, ENV_ID};

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
