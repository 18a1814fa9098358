#![doc = include_str!("../README.md")]
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
mod listeners;
#[macro_use]
mod logging;
mod message;
mod payload;
mod raw;
mod reactor;
mod shm;
mod spawn;
mod sys;
mod timer;

pub use ack::{AckHandle, Responder};
pub use bytes::Bytes;
pub use config::{Config, LinkStats, Stats, WritableWakeups, MAX_NAMESPACE_LEN, QUEUE_FRAME_OVERHEAD};
pub use error::{AckError, Error, Exit, ProtocolError, SendError};
pub use handlers::{DEFAULT_NAMESPACE, RESERVED_PREFIX};
pub use id::{ParseWorkerIdError, Peer, WorkerId};
pub use listeners::ListenerKey;
pub use message::Message;
/// Interest in readability or writability, for [`Reactor::add_source`].
pub use mio::Interest;
pub use payload::Payload;
pub use raw::RawPayload;
pub use reactor::{
    Broadcast, DisconnectReason, Gathered, Ns, Outgoing, Reactor, Readiness, Remote, RemoteError, RemoteSendError,
    RestartPolicy, SendResponder, SourceKey, Supervisor, SupervisorEvent, Unhandled, UserTimerKey, WorkerEnd,
    WorkerEvent, REMOTE_QUEUE,
};
pub use shm::{SharedMemory, SharedMemoryMut};
pub use spawn::{is_worker, PairedWorker, WorkerPipes, ENV_FD, ENV_ID};
