//! A raw peer: a worker that never calls `Reactor::attach`, takes the channel
//! fd from `CLUSTERPHONE_FD` itself and reads and writes frames by hand, so it
//! can send what our encoder never would and check what the master sends.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::codec::{self, Decoder, Envelope, Kind, FLAG_ACK, PROTOCOL_VERSION};
use clusterphone::{Message, Reactor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::LIMIT;

/// A frame as the raw peer reads it.
#[derive(Debug)]
pub struct RawFrame {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u64,
    pub ns: String,
    pub cmd: String,
    pub payload: Vec<u8>,
}

impl RawFrame {
    #[track_caller]
    pub fn decode<T: DeserializeOwned>(&self) -> T {
        ciborium::from_reader(&self.payload[..]).expect("payload decodes")
    }
}

/// A frame header, fields in wire order.
pub fn env(kind: Kind, flags: u8, nfds: u8, seq: u64, ns: &'static str, cmd: &'static str) -> Envelope<'static> {
    Envelope { kind, flags, nfds, seq, ns, cmd }
}

/// A well-formed frame with a CBOR payload.
pub fn frame<T: Serialize + ?Sized>(e: Envelope<'_>, payload: &T) -> Vec<u8> {
    let mut v = Vec::new();
    codec::encode(&mut v, e, payload).expect("encode");
    v
}

/// A frame whose payload bytes are taken as they are (not necessarily CBOR).
pub fn raw_frame(e: Envelope<'_>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    codec::encode_raw(&mut v, e, payload).expect("encode");
    v
}

/// `sendmsg` of `data` on `sock` with `fds` attached as SCM_RIGHTS (at most
/// 28). An error of the call is returned; a partial write fails the test.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut cmsg = [0u64; 16];
    let data_len = std::mem::size_of_val(fds) as libc::c_uint;
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    assert!(space <= std::mem::size_of_val(&cmsg));
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes we own, so the
    // first header is non-null and the header plus the fds fit in it.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(hdr).cast::<RawFd>(), fds.len());
    }
    // SAFETY: msg points at a live iovec over `data` and at our control buffer.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == data.len() => Ok(()),
        n => panic!("sendmsg wrote {n} of {} bytes", data.len()),
    }
}

/// 256 valid, unacked `flood` messages (of `0..256u64`) back to back: what a
/// flooding peer writes over and over.
pub fn flood_batch() -> Vec<u8> {
    let mut batch = Vec::new();
    for i in 0..256u64 {
        batch.extend(frame(env(Kind::Message, 0, 0, 0, "_", "flood"), &i));
    }
    batch
}

/// The master's side of a flood: a `flood` handler slower than the peer
/// writes (so its socket never runs dry) that counts the messages.
pub fn count_slow_floods(r: &mut Reactor) -> Rc<Cell<u64>> {
    let flooded = Rc::new(Cell::new(0u64));
    let f = flooded.clone();
    r.on("flood", move |_r, _msg: Message<u64>| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        f.set(f.get() + 1);
    })
    .unwrap();
    flooded
}

/// A raw role: says hello, then never reads; waits (without reading) for the
/// master to go, at most 30 s.
pub fn never_reads() {
    let mut p = RawPeer::connect();
    p.hello(PROTOCOL_VERSION);
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let mut pfd = libc::pollfd { fd: p.sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
            return;
        }
    }
}

/// One end of a fresh socketpair to hand to the master, and the end we keep
/// to find out whether every copy of the other was closed.
pub fn probe() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socketpair")
}

/// Asserts that every copy of the probe's other end has been closed (the
/// master's included): reading our end then sees EOF rather than timing out.
#[track_caller]
pub fn assert_probe_closed(keep: UnixStream) {
    keep.set_read_timeout(Some(LIMIT)).unwrap();
    let mut b = [0u8; 1];
    match (&keep).read(&mut b) {
        Ok(0) => {}
        other => panic!("the fd sent with the bad data is still open in the master: {other:?}"),
    }
}

/// The raw peer: the channel socket, without any of the library on top.
pub struct RawPeer {
    pub sock: UnixStream,
    decoder: Decoder,
}

impl RawPeer {
    /// Takes the channel fd the master handed to this process.
    pub fn connect() -> RawPeer {
        let value = std::env::var(clusterphone::ENV_FD).expect("CLUSTERPHONE_FD is set");
        let raw: RawFd = value.trim().parse().expect("CLUSTERPHONE_FD is a number");
        // SAFETY: the master handed this fd to this process for the channel
        // alone, and raw roles never call `Reactor::attach`, so this is its
        // only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(LIMIT)).unwrap();
        RawPeer { sock, decoder: Decoder::new(1 << 24, 16) }
    }

    #[track_caller]
    pub fn write(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("raw write");
    }

    /// Writes `data` in one `sendmsg` with `fds` attached; fails the test if
    /// the call fails.
    #[track_caller]
    pub fn send_with_fds(&self, data: &[u8], fds: &[RawFd]) {
        if let Err(e) = self.try_send_with_fds(data, fds) {
            panic!("sendmsg: {e}");
        }
    }

    /// Writes `data` in one `sendmsg` with `fds` attached.
    pub fn try_send_with_fds(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        send_with_fds(self.sock.as_raw_fd(), data, fds)
    }

    pub fn hello(&mut self, version: u32) {
        let hello = frame(env(Kind::Hello, 0, 0, 0, "", ""), &(version, Vec::<String>::new()));
        self.write(&hello);
    }

    /// The next frame; `Ok(None)` at EOF (or reset); `Err` on read timeout.
    #[track_caller]
    pub fn try_next(&mut self) -> io::Result<Option<RawFrame>> {
        loop {
            if let Some(f) = self.decoder.next_frame().expect("the master sent a bad frame") {
                return Ok(Some(RawFrame {
                    kind: f.kind,
                    flags: f.flags,
                    seq: f.seq,
                    ns: f.ns.to_owned(),
                    cmd: f.cmd.to_owned(),
                    payload: f.payload.to_vec(),
                }));
            }
            let buf = self.decoder.read_buf();
            match self.sock.read(buf) {
                Ok(0) => {
                    assert!(!self.decoder.is_mid_frame(), "the master's stream ended inside a frame");
                    return Ok(None);
                }
                Ok(n) => self.decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    #[track_caller]
    pub fn next(&mut self) -> Option<RawFrame> {
        self.try_next().expect("no frame from the master in time")
    }

    #[track_caller]
    pub fn expect(&mut self, kind: Kind, seq: u64) -> RawFrame {
        let f = self.next().expect("the master closed the channel");
        assert_eq!((f.kind, f.seq), (kind, seq), "unexpected frame {f:?}");
        f
    }

    /// Says hello and reads the master's hello.
    #[track_caller]
    pub fn exchange_hellos(&mut self) {
        self.hello(PROTOCOL_VERSION);
        let h = self.expect(Kind::Hello, 0);
        let (version, _): (u32, Vec<String>) = h.decode();
        assert_eq!(version, PROTOCOL_VERSION);
    }

    /// Says hello, reads the master's hello and the acked `ping` (of 1u32)
    /// it queued for us; returns the ping's sequence number.
    #[track_caller]
    pub fn handshake(&mut self) -> u64 {
        self.exchange_hellos();
        let ping = self.next().expect("ping");
        assert_eq!((ping.kind, ping.ns.as_str(), ping.cmd.as_str()), (Kind::Message, "_", "ping"), "{ping:?}");
        assert_eq!(ping.flags & FLAG_ACK, FLAG_ACK);
        assert_eq!(ping.decode::<u32>(), 1);
        ping.seq
    }

    /// Reads until the master closes the channel; returns what came meanwhile.
    #[track_caller]
    pub fn until_eof(&mut self) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next() {
            frames.push(f);
        }
        frames
    }

    /// Asserts that nothing arrives for `quiet`.
    #[track_caller]
    pub fn expect_silence(&mut self, quiet: Duration) {
        self.sock.set_read_timeout(Some(quiet)).unwrap();
        match self.try_next() {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("expected silence from the master, got {other:?}"),
        }
        self.sock.set_read_timeout(Some(LIMIT)).unwrap();
    }
}
