//! What a message or a reply carries: a serde value, or an owned byte buffer
//! that is written as it is.

use serde::Serialize;

use crate::bytes::Bytes;
use crate::codec::{self, Envelope};
use crate::error::Error;
use crate::raw::RawPayload;

/// Below this size an owned [`Bytes`] is copied into the frame: a buffer of
/// its own costs more than the copy.
const INLINE_BYTES: usize = 1024;

/// A message or reply payload: any serde value by reference, encoded as CBOR
/// into the frame, or an owned [`Bytes`], whose buffer is queued as it is and
/// written right after the frame header, in the same `sendmsg`: no copy. Both
/// arrive the same way, as a CBOR byte string that decodes into `Bytes`.
///
/// A refused send ([`SendError`](crate::SendError): queue full, worker gone,
/// frame too large) hands back the fd but drops an owned payload: keep a clone,
/// or send by reference, if you mean to retry.
///
/// ```no_run
/// use clusterphone::{Bytes, Message};
/// # let mut reactor = clusterphone::Reactor::master()?;
/// # let worker: clusterphone::WorkerId = todo!();
/// let image = Bytes::from(vec![0u8; 1 << 20]);
/// reactor.send_to(worker, "blit", &image, None).send()?; // encoded: one copy
/// reactor.send_to(worker, "blit", image, None).send()?; // moved: no copy
/// // An echo handler can hand the received buffer straight back.
/// reactor.on("echo", |_r, msg: Message<Bytes>| {
///     let _ = msg.reply.ok(msg.payload);
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Payload: sealed::Sealed {}

impl<T: Serialize + ?Sized> Payload for &T {}
impl Payload for Bytes {}
impl Payload for RawPayload {}

pub(crate) mod sealed {
    use super::*;

    pub trait Sealed {
        /// Appends the frame to `out` and returns the buffer that follows it
        /// on the wire (empty if the payload went into `out`). On error `out`
        /// is left as it was.
        fn encode_frame(self, out: &mut Vec<u8>, env: Envelope<'_>) -> Result<Vec<u8>, Error>;
    }

    impl<T: Serialize + ?Sized> Sealed for &T {
        fn encode_frame(self, out: &mut Vec<u8>, env: Envelope<'_>) -> Result<Vec<u8>, Error> {
            codec::encode(out, env, self)?;
            Ok(Vec::new())
        }
    }

    impl Sealed for RawPayload {
        fn encode_frame(self, out: &mut Vec<u8>, env: Envelope<'_>) -> Result<Vec<u8>, Error> {
            codec::encode_raw(out, env, &self.0)?;
            Ok(Vec::new())
        }
    }

    impl Sealed for Bytes {
        fn encode_frame(self, out: &mut Vec<u8>, env: Envelope<'_>) -> Result<Vec<u8>, Error> {
            if self.0.len() < INLINE_BYTES {
                codec::encode(out, env, &self)?;
                return Ok(Vec::new());
            }
            codec::encode_bytes_prefix(out, env, self.0.len())?;
            Ok(self.0)
        }
    }
}
