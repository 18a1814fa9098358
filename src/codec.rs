//! The wire format, with no I/O: frame encoding and a sans-I/O decoder that
//! takes bytes and fds in any chunking and yields whole frames.
//!
//! A frame is a 20-byte little-endian header followed by the namespace, the
//! command and the CBOR payload:
//!
//! ```text
//! 0..4   length of everything after this field (u32)
//! 4      magic 0xC7
//! 5      kind (hello, message, reply, fail, namespace, exit)
//! 6      flags (bit 0: ack wanted)
//! 7      number of fds that travel with this frame (0 or 1)
//! 8..16  sequence number (u64)
//! 16..18 namespace length (u16)
//! 18..20 command length (u16)
//! ```

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde::Serialize;

use crate::error::{Error, ProtocolError};

/// Decodes CBOR like `ciborium::from_reader`, but with a reused scratch
/// buffer: `from_reader` zeroes a fresh 4 KiB stack array on every call.
///
/// A payload that is one whole byte string (a [`Bytes`](crate::bytes::Bytes)) is
/// handed to the type as one slice: ciborium would copy it through its 4 KiB
/// scratch into a vector grown by doubling. If the type does not take bytes,
/// ciborium decodes it as usual.
pub(crate) fn decode_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if let Some(body) = whole_byte_string(bytes) {
        let d = serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(body);
        if let Ok(v) = T::deserialize(d) {
            return Ok(v);
        }
    }
    thread_local! {
        static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; 4096 + 1024].into_boxed_slice());
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut scratch) => {
            ciborium::de::from_reader_with_buffer(bytes, &mut scratch[320..320 + 4096]).map_err(|e| e.to_string())
        }
        // A Deserialize impl that itself decodes CBOR: fall back.
        Err(_) => ciborium::from_reader(bytes).map_err(|e| e.to_string()),
    })
}

/// The content of `cbor` if it is exactly one definite-length byte string.
fn whole_byte_string(cbor: &[u8]) -> Option<&[u8]> {
    let first = *cbor.first()?;
    if first >> 5 != 2 {
        return None;
    }
    let info = first & 0x1f;
    let (len, header) = match info {
        0..=23 => (u64::from(info), 1),
        24 => (u64::from(*cbor.get(1)?), 2),
        25 => (u64::from(u16::from_be_bytes(cbor.get(1..3)?.try_into().ok()?)), 3),
        26 => (u64::from(u32::from_be_bytes(cbor.get(1..5)?.try_into().ok()?)), 5),
        27 => (u64::from_be_bytes(cbor.get(1..9)?.try_into().ok()?), 9),
        _ => return None, // indefinite length, or reserved
    };
    let body = &cbor[header..];
    (body.len() as u64 == len).then_some(body)
}

/// Bytes in a frame header, length field included.
pub const HEADER_LEN: usize = 20;
/// Size of the length prefix.
const LEN_FIELD: usize = 4;
/// First byte after the length: catches garbage and desynchronised streams.
pub const MAGIC: u8 = 0xC7;
/// Frame flag: the sender wants an acknowledgement.
pub const FLAG_ACK: u8 = 1;
/// Protocol version carried in hello frames.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes read from the socket at a time when no larger frame is pending: a
/// quiet connection starts small and the chunk doubles while reads fill it.
const READ_CHUNK: usize = 256 * 1024;
const FIRST_READ_CHUNK: usize = 4 * 1024;
/// An idle receive buffer larger than this is given back to the allocator.
const SHRINK_ABOVE: usize = 1024 * 1024;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Worker → master first, then master → worker: version and namespaces.
    Hello = 1,
    /// A user message.
    Message = 2,
    /// A successful acknowledgement, with the reply as payload.
    Reply = 3,
    /// A failed acknowledgement: (code, text).
    Fail = 4,
    /// Worker → master: a namespace created after hello.
    Namespace = 5,
    /// Master → worker: please exit.
    Exit = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Message,
            3 => Kind::Reply,
            4 => Kind::Fail,
            5 => Kind::Namespace,
            6 => Kind::Exit,
            _ => return None,
        })
    }
}

/// Failure codes carried in `Fail` frames.
pub mod fail {
    /// The handler answered with an error.
    pub const REMOTE: u8 = 1;
    /// No handler for the command.
    pub const NO_HANDLER: u8 = 2;
    /// No handler in the namespace.
    pub const UNKNOWN_NAMESPACE: u8 = 3;
    /// The payload did not decode.
    pub const BAD_PAYLOAD: u8 = 4;
    /// The responder was dropped.
    pub const DROPPED: u8 = 5;
}

/// The fixed fields of a frame to encode.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Frame kind.
    pub kind: Kind,
    /// Flags (see `FLAG_ACK`).
    pub flags: u8,
    /// Number of fds sent with the frame.
    pub nfds: u8,
    /// Sequence number.
    pub seq: u64,
    /// Namespace.
    pub ns: &'a str,
    /// Command.
    pub cmd: &'a str,
}

/// Appends a whole frame to `out`, its payload encoded as CBOR. On error,
/// `out` is left as it was.
pub fn encode<T: Serialize + ?Sized>(out: &mut Vec<u8>, env: Envelope<'_>, payload: &T) -> Result<(), Error> {
    let start = out.len();
    let r = encode_inner(out, env, |buf| ciborium::into_writer(payload, buf).map_err(|e| Error::Encode(e.to_string())));
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Appends the head of a frame whose payload is a CBOR byte string of `len`
/// bytes, up to and including the byte string's header: the caller sends the
/// `len` bytes right after it (the frame's length counts them). On error,
/// `out` is left as it was.
pub fn encode_bytes_prefix(out: &mut Vec<u8>, env: Envelope<'_>, len: usize) -> Result<(), Error> {
    let start = out.len();
    encode_inner(out, env, |buf| {
        cbor_bytes_header(buf, len);
        Ok(())
    })?;
    let head = out.len() - start;
    let Some(total) = (head - LEN_FIELD).checked_add(len).and_then(|t| u32::try_from(t).ok()) else {
        out.truncate(start);
        return Err(Error::FrameTooLarge { size: head.saturating_add(len), max: u32::MAX as usize });
    };
    out[start..start + LEN_FIELD].copy_from_slice(&total.to_le_bytes());
    Ok(())
}

/// The CBOR header of a definite-length byte string (major type 2).
fn cbor_bytes_header(out: &mut Vec<u8>, len: usize) {
    const MAJOR: u8 = 2 << 5;
    let len = len as u64;
    if len < 24 {
        out.push(MAJOR | len as u8);
    } else if let Ok(l) = u8::try_from(len) {
        out.extend_from_slice(&[MAJOR | 24, l]);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(MAJOR | 25);
        out.extend_from_slice(&l.to_be_bytes());
    } else if let Ok(l) = u32::try_from(len) {
        out.push(MAJOR | 26);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(MAJOR | 27);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Appends a frame whose payload is already CBOR.
pub fn encode_raw(out: &mut Vec<u8>, env: Envelope<'_>, payload: &[u8]) -> Result<(), Error> {
    encode_inner(out, env, |buf| {
        buf.extend_from_slice(payload);
        Ok(())
    })
}

fn encode_inner(
    out: &mut Vec<u8>,
    env: Envelope<'_>,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), Error>,
) -> Result<(), Error> {
    let ns_len = u16::try_from(env.ns.len()).map_err(|_| Error::NameTooLong)?;
    let cmd_len = u16::try_from(env.cmd.len()).map_err(|_| Error::NameTooLong)?;
    let start = out.len();
    // Header, names and a small payload in one allocation (the payload may still grow it).
    out.reserve(HEADER_LEN + env.ns.len() + env.cmd.len() + 64);
    out.extend_from_slice(&[0; LEN_FIELD]);
    out.extend_from_slice(&[MAGIC, env.kind as u8, env.flags, env.nfds]);
    out.extend_from_slice(&env.seq.to_le_bytes());
    out.extend_from_slice(&ns_len.to_le_bytes());
    out.extend_from_slice(&cmd_len.to_le_bytes());
    out.extend_from_slice(env.ns.as_bytes());
    out.extend_from_slice(env.cmd.as_bytes());
    body(out)?;
    let len = u32::try_from(out.len() - start - LEN_FIELD)
        .map_err(|_| Error::FrameTooLarge { size: out.len() - start, max: u32::MAX as usize })?;
    out[start..start + LEN_FIELD].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// A decoded frame, borrowing the decoder's buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Frame kind.
    pub kind: Kind,
    /// Flags.
    pub flags: u8,
    /// Sequence number.
    pub seq: u64,
    /// Namespace.
    pub ns: &'a str,
    /// Command.
    pub cmd: &'a str,
    /// CBOR payload.
    pub payload: &'a [u8],
    /// The fd that came with this frame.
    pub fd: Option<OwnedFd>,
}

impl Frame<'_> {
    /// Whether the sender asked for an acknowledgement.
    pub fn wants_ack(&self) -> bool {
        self.flags & FLAG_ACK != 0
    }
}

/// Sans-I/O frame decoder: feed it bytes (`read_buf` + `filled`, or `feed`)
/// and fds (`push_fd`) as they arrive, then take frames with `next_frame`.
///
/// It never allocates beyond one frame of the configured maximum plus one
/// read chunk, whatever the peer announces.
///
/// ```
/// use clusterphone::codec::{encode, Decoder, Envelope, Kind};
/// let mut wire = Vec::new();
/// let env = Envelope { kind: Kind::Message, flags: 0, nfds: 0, seq: 1, ns: "_", cmd: "ping" };
/// encode(&mut wire, env, &42u32).unwrap();
/// let mut decoder = Decoder::new(1 << 20, 16);
/// for byte in &wire {
///     decoder.feed(std::slice::from_ref(byte)); // any chunking decodes the same
/// }
/// let frame = decoder.next_frame().unwrap().unwrap();
/// assert_eq!((frame.cmd, frame.seq), ("ping", 1));
/// ```
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    max_frame: usize,
    max_fds: usize,
    /// Current read chunk, from `FIRST_READ_CHUNK` up to `READ_CHUNK`.
    chunk: usize,
    /// Size of the last `read_buf` offered.
    offered: usize,
}

impl Decoder {
    /// A decoder that refuses frames above `max_frame` bytes (header included)
    /// and holds at most `max_fds` received fds not yet claimed by a frame.
    pub fn new(max_frame: usize, max_fds: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            fds: VecDeque::new(),
            max_frame,
            max_fds,
            chunk: FIRST_READ_CHUNK,
            offered: 0,
        }
    }

    /// Changes the largest frame accepted from now on (a master takes only
    /// a hello-sized frame from a worker that has not said hello).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Space to read into: at least one read chunk, or the rest of the frame
    /// that is pending if that is larger (never more than the limit allows).
    pub fn read_buf(&mut self) -> &mut [u8] {
        let pending = self.buffered();
        let mut want = self.chunk;
        if pending >= LEN_FIELD {
            let len = self.frame_len_at(self.start);
            if len <= self.max_frame {
                want = want.max(len.saturating_sub(pending));
            }
        }
        if self.buf.len() - self.end < want {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end = pending;
                self.start = 0;
            }
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        self.offered = self.buf.len() - self.end;
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of `read_buf` as filled.
    pub fn filled(&mut self, n: usize) {
        if n >= self.offered && self.chunk < READ_CHUNK {
            self.chunk *= 2;
        }
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies `bytes` in (for tests and fuzzing; sockets use `read_buf`).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = self.read_buf();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    /// Adds an fd that arrived on the socket. Fails (dropping, and so closing,
    /// the fd) when more fds are waiting than the limit allows.
    pub fn push_fd(&mut self, fd: OwnedFd) -> Result<(), ProtocolError> {
        if self.fds.len() >= self.max_fds {
            return Err(ProtocolError::TooManyFdsInFlight);
        }
        self.fds.push_back(fd);
        Ok(())
    }

    /// Received fds not yet claimed by a frame.
    pub fn waiting_fds(&self) -> usize {
        self.fds.len()
    }

    /// Bytes received but not yet taken as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether the stream stopped in the middle of a frame.
    pub fn is_mid_frame(&self) -> bool {
        self.buffered() > 0
    }

    /// Drops every buffered byte and fd (the fds are closed).
    pub fn clear(&mut self) {
        self.fds.clear();
        self.start = 0;
        self.end = 0;
        self.buf = Vec::new();
    }

    fn frame_len_at(&self, at: usize) -> usize {
        let b = &self.buf[at..at + LEN_FIELD];
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).saturating_add(LEN_FIELD)
    }

    /// The next whole frame, `None` if more bytes are needed, or the first
    /// protocol violation found. After an error the decoder must be dropped.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ProtocolError> {
        let avail = self.buffered();
        if avail == 0 {
            if self.start != 0 {
                self.start = 0;
                self.end = 0;
                if self.buf.len() > SHRINK_ABOVE {
                    self.buf = Vec::new();
                }
            }
            return Ok(None);
        }
        if avail > LEN_FIELD && self.buf[self.start + LEN_FIELD] != MAGIC {
            return Err(ProtocolError::BadMagic(self.buf[self.start + LEN_FIELD]));
        }
        if avail < LEN_FIELD {
            return Ok(None);
        }
        let total = self.frame_len_at(self.start);
        if total > self.max_frame {
            return Err(ProtocolError::TooLarge { size: total, max: self.max_frame });
        }
        if total < HEADER_LEN {
            return Err(ProtocolError::BadLength((total - LEN_FIELD) as u32));
        }
        if avail < HEADER_LEN {
            return Ok(None);
        }
        let h = &self.buf[self.start..self.start + HEADER_LEN];
        let kind = Kind::from_u8(h[5]).ok_or(ProtocolError::UnknownKind(h[5]))?;
        let flags = h[6];
        let nfds = h[7];
        let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let ns_len = u16::from_le_bytes([h[16], h[17]]) as usize;
        let cmd_len = u16::from_le_bytes([h[18], h[19]]) as usize;
        if HEADER_LEN + ns_len + cmd_len > total {
            return Err(ProtocolError::BadLength((total - LEN_FIELD) as u32));
        }
        if nfds > 1 {
            return Err(ProtocolError::TooManyFds(nfds));
        }
        if avail < total {
            return Ok(None);
        }
        // The kernel delivers a sendmsg's fds with its first byte, so by the
        // time a frame is complete its fds must have arrived.
        let fd = if nfds == 1 { Some(self.fds.pop_front().ok_or(ProtocolError::MissingFds)?) } else { None };
        let base = self.start;
        self.start += total;
        let body = &self.buf[base + HEADER_LEN..base + total];
        let ns = std::str::from_utf8(&body[..ns_len]).map_err(|_| ProtocolError::BadName)?;
        let cmd = std::str::from_utf8(&body[ns_len..ns_len + cmd_len]).map_err(|_| ProtocolError::BadName)?;
        let payload = &body[ns_len + cmd_len..];
        Ok(Some(Frame { kind, flags, seq, ns, cmd, payload, fd }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, cmd: &str, n: u32) -> Vec<u8> {
        let mut v = Vec::new();
        let env = Envelope { kind: Kind::Message, flags: FLAG_ACK, nfds: 0, seq, ns: "_", cmd };
        encode(&mut v, env, &n).unwrap();
        v
    }

    #[test]
    fn any_chunking_decodes_the_same() {
        let mut wire = Vec::new();
        for i in 0..50u32 {
            wire.extend(frame(i as u64, &format!("c{i}"), i * 7919));
        }
        for chunk in [1, 2, 3, 7, 19, 20, 21, 64, 1000] {
            let mut d = Decoder::new(1 << 20, 16);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.feed(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    let n: u32 = ciborium::from_reader(f.payload).unwrap();
                    got.push((f.seq, f.cmd.to_string(), n));
                }
            }
            assert_eq!(got.len(), 50, "chunk {chunk}");
            for (i, (seq, cmd, n)) in got.into_iter().enumerate() {
                assert_eq!((seq, cmd, n), (i as u64, format!("c{i}"), i as u32 * 7919));
            }
            assert!(!d.is_mid_frame());
        }
    }

    #[test]
    fn byte_strings_take_the_fast_path_and_everything_else_decodes_as_before() {
        for len in [0usize, 5, 23, 24, 255, 256, 70_000] {
            let b = crate::bytes::Bytes(vec![7u8; len]);
            let mut cbor = Vec::new();
            ciborium::into_writer(&b, &mut cbor).unwrap();
            assert_eq!(whole_byte_string(&cbor).map(|s| s.len()), Some(len));
            assert_eq!(decode_cbor::<crate::bytes::Bytes>(&cbor).unwrap(), b);
            // A type that does not take bytes falls back to ciborium, with its result.
            let plain: Result<Vec<u32>, _> = ciborium::from_reader(&cbor[..]);
            assert_eq!(decode_cbor::<Vec<u32>>(&cbor).ok(), plain.ok());
            // Trailing data or a truncated string is not a whole byte string.
            let mut longer = cbor.clone();
            longer.push(0);
            assert_eq!(whole_byte_string(&longer), None);
            assert_eq!(whole_byte_string(&cbor[..cbor.len().saturating_sub(1).max(1)]).is_some(), len == 0);
        }
        let mut cbor = Vec::new();
        ciborium::into_writer(&(1u32, "x"), &mut cbor).unwrap();
        assert_eq!(whole_byte_string(&cbor), None);
        assert_eq!(decode_cbor::<(u32, String)>(&cbor).unwrap(), (1, "x".to_string()));
    }

    #[test]
    fn a_byte_string_prefix_and_its_bytes_make_the_frame_encode_makes() {
        for len in [0usize, 5, 23, 24, 255, 256, 65535, 65536, 70000] {
            let data = crate::bytes::Bytes((0..len).map(|i| i as u8).collect());
            let env = Envelope { kind: Kind::Reply, flags: 0, nfds: 0, seq: 9, ns: "n", cmd: "c" };
            let mut whole = Vec::new();
            encode(&mut whole, env, &data).unwrap();
            let mut split = Vec::new();
            encode_bytes_prefix(&mut split, env, len).unwrap();
            split.extend_from_slice(&data.0);
            assert_eq!(whole, split, "len {len}");
        }
    }

    #[test]
    fn a_byte_string_prefix_refuses_a_length_the_u32_field_cannot_hold() {
        let env = Envelope { kind: Kind::Reply, flags: 0, nfds: 0, seq: 9, ns: "n", cmd: "c" };
        // After the length field: 16 bytes of header, "n", "c", 5 bytes of CBOR header.
        let after_len_field = 16 + 2 + 5;
        let largest = u32::MAX as usize - after_len_field;
        let mut out = vec![1, 2, 3];
        encode_bytes_prefix(&mut out, env, largest).unwrap();
        assert_eq!(out[3..7], u32::MAX.to_le_bytes());
        assert_eq!(out.len(), 3 + 4 + after_len_field);
        out.truncate(3);
        for len in [largest + 1, u32::MAX as usize, usize::MAX] {
            let e = encode_bytes_prefix(&mut out, env, len).unwrap_err();
            assert!(matches!(e, Error::FrameTooLarge { .. }), "{e:?}");
            assert_eq!(out, [1, 2, 3], "len {len}: out changed");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut d = Decoder::new(1024, 4);
        // 64 MiB announced: far over the limit, small enough that a regression fails fast.
        d.feed(&[0x00, 0x00, 0x00, 0x04, MAGIC]);
        // Room asked for with the length buffered (feed() does so for any longer input).
        let room = d.read_buf().len();
        assert!(room <= READ_CHUNK, "read_buf offered {room} bytes for a frame over the limit");
        assert!(matches!(d.next_frame(), Err(ProtocolError::TooLarge { .. })));
        assert!(d.buf.capacity() <= READ_CHUNK, "{} bytes reserved", d.buf.capacity());
    }

    #[test]
    fn garbage_is_bad_magic() {
        let mut d = Decoder::new(1024, 4);
        d.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn missing_fd_is_an_error() {
        let mut v = Vec::new();
        let env = Envelope { kind: Kind::Message, flags: 0, nfds: 1, seq: 1, ns: "_", cmd: "x" };
        encode(&mut v, env, &()).unwrap();
        let mut d = Decoder::new(1024, 4);
        d.feed(&v);
        assert!(matches!(d.next_frame(), Err(ProtocolError::MissingFds)));
    }
}
