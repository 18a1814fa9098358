//! A message as a handler receives it.

use std::os::fd::OwnedFd;

use crate::ack::Responder;
use crate::id::Peer;

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
