//! Acknowledgements: outcomes, handles, and the responders that answer messages.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use serde::de::DeserializeOwned;

use crate::codec::{self, fail, Envelope, Kind};
use crate::error::{AckError, Error};
use crate::id::WorkerId;
use crate::payload::Payload;

/// An ack's outcome as it arrives: the reply's CBOR bytes, still in the
/// receive buffer, or the failure. Completions decode straight from it.
pub(crate) type Outcome<'a> = Result<&'a [u8], AckError>;

pub(crate) fn decode_outcome<R: DeserializeOwned>(o: Outcome<'_>) -> Result<R, AckError> {
    o.and_then(|bytes| codec::decode_cbor(bytes).map_err(AckError::BadReply))
}

/// The caller's side of an acknowledged message: check it after polling.
///
/// ```no_run
/// # use clusterphone::Reactor;
/// # fn demo(reactor: &mut Reactor, worker: clusterphone::WorkerId) -> Result<(), clusterphone::Error> {
/// let handle = reactor.send_to(worker, "sum", &[1, 2, 3], None).handle::<i32>()?;
/// while !handle.is_done() {
///     reactor.poll(None)?;
/// }
/// assert_eq!(handle.take().unwrap()?, 6);
/// # Ok(()) }
/// ```
#[must_use = "an ack handle does nothing unless checked"]
pub struct AckHandle<R> {
    pub(crate) slot: Rc<RefCell<Option<Result<R, AckError>>>>,
}

impl<R> AckHandle<R> {
    /// Whether the outcome is in.
    pub fn is_done(&self) -> bool {
        self.slot.borrow().is_some()
    }

    /// Takes the outcome if it is in (only once).
    pub fn take(&self) -> Option<Result<R, AckError>> {
        self.slot.borrow_mut().take()
    }
}

/// Replies queued by responders, picked up by the reactor after each handler.
#[derive(Default)]
pub(crate) struct Outbox {
    /// (link, frame, the frame's tail: an owned payload, usually empty).
    pub(crate) frames: Vec<(WorkerId, Vec<u8>, Vec<u8>)>,
    pub(crate) max_frame: usize,
    /// Written frame buffers handed back by the reactor, for the next replies.
    pub(crate) spare: Vec<Vec<u8>>,
}

impl Outbox {
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }
}

/// The receiving side's means to acknowledge one message: reply with a value
/// or an error, now or from a later callback. It is consumed by replying, so
/// a message is acknowledged at most once; dropping it unanswered sends
/// [`AckError::Dropped`] at once, so the sender never waits out its timeout.
///
/// Replies are queued and written by the reactor after the running handler
/// returns, or at the next `poll` when answered from elsewhere.
///
/// ```no_run
/// # use std::{cell::RefCell, rc::Rc};
/// # use clusterphone::{Message, Responder};
/// # let mut reactor = clusterphone::Reactor::master()?;
/// // Answer later: keep the responder, reply from another callback.
/// let waiting: Rc<RefCell<Vec<Responder>>> = Rc::default();
/// let w = waiting.clone();
/// reactor.on("job", move |_r, msg: Message<String>| w.borrow_mut().push(msg.reply))?;
/// reactor.on("done", move |_r, _msg: Message<()>| {
///     for responder in waiting.borrow_mut().drain(..) {
///         let _ = responder.ok(&"finished");
///     }
/// })?;
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct Responder {
    inner: Option<ResponderInner>,
}

struct ResponderInner {
    link: WorkerId,
    seq: u64,
    outbox: Rc<RefCell<Outbox>>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder").field("wanted", &self.wanted()).finish()
    }
}

impl Responder {
    pub(crate) fn none() -> Responder {
        Responder { inner: None }
    }

    pub(crate) fn new(link: WorkerId, seq: u64, outbox: Rc<RefCell<Outbox>>) -> Responder {
        Responder { inner: Some(ResponderInner { link, seq, outbox }) }
    }

    /// The link and sequence number to answer, leaving this responder inert.
    pub(crate) fn take_inner(&mut self) -> Option<(WorkerId, u64)> {
        self.inner.take().map(|i| (i.link, i.seq))
    }

    /// Whether the sender asked for an acknowledgement. If not, replying is a no-op.
    pub fn wanted(&self) -> bool {
        self.inner.is_some()
    }

    /// Acknowledges with a reply: a value by reference, or an owned
    /// [`Bytes`](crate::Bytes), sent without copying (see [`Payload`]). If the
    /// reply cannot be encoded (or is too large), the sender gets an error ack
    /// instead and this returns the error.
    ///
    /// # Errors
    /// [`Error::Encode`] if the reply cannot be encoded, [`Error::FrameTooLarge`] if it
    /// exceeds `max_frame`; the sender then gets an error ack instead.
    pub fn ok<P: Payload>(mut self, reply: P) -> Result<(), Error> {
        let Some(inner) = self.inner.take() else { return Ok(()) };
        let (mut buf, max) = {
            let mut outbox = inner.outbox.borrow_mut();
            (outbox.buffer(), outbox.max_frame)
        };
        let env = Envelope { kind: Kind::Reply, flags: 0, nfds: 0, seq: inner.seq, ns: "", cmd: "" };
        let result = match reply.encode_frame(&mut buf, env) {
            Ok(tail) if buf.len() + tail.len() > max => Err(Error::FrameTooLarge { size: buf.len() + tail.len(), max }),
            other => other,
        };
        match result {
            Ok(tail) => {
                inner.outbox.borrow_mut().frames.push((inner.link, buf, tail));
                Ok(())
            }
            Err(e) => {
                inner.send_fail(fail::REMOTE, &format!("reply not sent: {e}"));
                Err(e)
            }
        }
    }

    /// Acknowledges with an error; the sender gets [`AckError::Remote`] with this text.
    pub fn err(mut self, error: impl fmt::Display) {
        if let Some(inner) = self.inner.take() {
            inner.send_fail(fail::REMOTE, &error.to_string());
        }
    }

    pub(crate) fn fail_code(mut self, code: u8, text: &str) {
        if let Some(inner) = self.inner.take() {
            inner.send_fail(code, text);
        }
    }
}

impl ResponderInner {
    fn send_fail(&self, code: u8, text: &str) {
        let mut buf = self.outbox.borrow_mut().buffer();
        let env = Envelope { kind: Kind::Fail, flags: 0, nfds: 0, seq: self.seq, ns: "", cmd: "" };
        // Bound the text so the frame always fits.
        let text = if text.len() > 4096 { &text[..text.floor_char_boundary_compat(4096)] } else { text };
        if codec::encode(&mut buf, env, &(code, text)).is_ok() {
            self.outbox.borrow_mut().frames.push((self.link, buf, Vec::new()));
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.send_fail(fail::DROPPED, "dropped without a reply");
        }
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, at: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut at: usize) -> usize {
        while at > 0 && !self.is_char_boundary(at) {
            at -= 1;
        }
        at
    }
}

/// Decodes a `Fail` frame's payload into the sender's error.
pub(crate) fn fail_to_error(payload: &[u8]) -> AckError {
    match ciborium::from_reader::<(u8, String), _>(payload) {
        Ok((fail::REMOTE, text)) => AckError::Remote(text),
        Ok((fail::NO_HANDLER, _)) => AckError::NoHandler,
        Ok((fail::UNKNOWN_NAMESPACE, _)) => AckError::UnknownNamespace,
        Ok((fail::BAD_PAYLOAD, text)) => AckError::BadPayload(text),
        Ok((fail::DROPPED, _)) => AckError::Dropped,
        Ok((code, text)) => AckError::Remote(format!("unknown failure code {code}: {text}")),
        Err(e) => AckError::Remote(format!("undecodable failure: {e}")),
    }
}
