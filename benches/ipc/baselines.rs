//! The raw baselines: length-prefixed CBOR frames on a socket, served with
//! plain blocking, mio or busy-polling code.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use clusterphone::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{Job, Mode, Payload, Work, SENTINEL};
use crate::sys::{interrupted, recv_with_fds, send_with_fd, would_block};

/// Bytes that may wait in user space before a non-blocking sender waits for the socket.
const OUT_HIGH: usize = 256 * 1024;

/// One end of a raw channel, in blocking, mio (edge-triggered, read-first)
/// or busy-polling (non-blocking, spinning on `WouldBlock`) mode.
pub(crate) struct RawIo {
    sock: UnixStream,
    mode: Mode,
    fd_mode: bool,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    out_pos: usize,
    fds_received: u64,
    poller: Option<(Poll, Events)>,
    /// MioLazy: WRITABLE is currently part of the registration.
    want_writable: bool,
    scratch: Vec<u8>,
}

fn frame_into<T: Serialize + ?Sized>(scratch: &mut Vec<u8>, value: &T) {
    scratch.clear();
    scratch.extend_from_slice(&[0; 4]);
    ciborium::into_writer(value, &mut *scratch).expect("cbor encode");
    let len = (scratch.len() - 4) as u32;
    scratch[..4].copy_from_slice(&len.to_le_bytes());
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    ciborium::from_reader(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

impl RawIo {
    pub(crate) fn new(sock: UnixStream, mode: Mode, fd_mode: bool) -> io::Result<RawIo> {
        sock.set_nonblocking(mode != Mode::Blocking)?;
        let poller = if matches!(mode, Mode::Mio | Mode::MioLazy) {
            let poll = Poll::new()?;
            let raw = sock.as_raw_fd();
            let interest = if mode == Mode::Mio { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            poll.registry().register(&mut SourceFd(&raw), Token(0), interest)?;
            Some((poll, Events::with_capacity(8)))
        } else {
            None
        };
        Ok(RawIo {
            sock,
            mode,
            fd_mode,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            out: Vec::new(),
            out_pos: 0,
            fds_received: 0,
            poller,
            want_writable: false,
            scratch: Vec::with_capacity(256),
        })
    }

    /// One read (or `recvmsg`) into the buffer; `Ok(0)` is EOF.
    fn read_once(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let pending = self.end - self.start;
        let mut want = 16 * 1024;
        if pending >= 4 {
            let len = u32::from_le_bytes(self.buf[self.start..self.start + 4].try_into().expect("4 bytes")) as usize;
            want = want.max((len + 4).saturating_sub(pending));
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
        loop {
            let r = if self.fd_mode {
                recv_with_fds(self.sock.as_raw_fd(), &mut self.buf[self.end..], &mut self.fds_received)
            } else {
                (&self.sock).read(&mut self.buf[self.end..])
            };
            match r {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole frame's body, as a range of `buf` (valid until the next read).
    fn next_frame(&mut self) -> Option<Range<usize>> {
        let avail = self.end - self.start;
        if avail < 4 {
            return None;
        }
        let len = u32::from_le_bytes(self.buf[self.start..self.start + 4].try_into().expect("4 bytes")) as usize;
        if avail < 4 + len {
            return None;
        }
        let body = self.start + 4..self.start + 4 + len;
        self.start += 4 + len;
        Some(body)
    }

    /// Waits until more bytes arrived; false at EOF.
    fn fill_wait(&mut self) -> io::Result<bool> {
        loop {
            if self.mode != Mode::Blocking {
                self.flush_out()?;
            }
            match self.read_once() {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if would_block(&e) => self.idle()?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Nothing to do right now: wait for an event (mio) or spin (busy).
    fn idle(&mut self) -> io::Result<()> {
        match &mut self.poller {
            Some((poll, events)) => match poll.poll(events, None) {
                Err(e) if !interrupted(&e) => Err(e),
                _ => Ok(()),
            },
            None => {
                std::hint::spin_loop();
                Ok(())
            }
        }
    }

    /// Writes queued bytes until done or `WouldBlock` (non-blocking modes).
    fn flush_out(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match (&self.sock).write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if would_block(&e) => return self.set_writable_interest(true),
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        self.set_writable_interest(false)
    }

    /// MioLazy only: ask for writable events exactly while bytes wait.
    fn set_writable_interest(&mut self, on: bool) -> io::Result<()> {
        if self.mode != Mode::MioLazy || self.want_writable == on {
            return Ok(());
        }
        let Some((poll, _)) = &self.poller else { return Ok(()) };
        let interest = if on { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        let raw = self.sock.as_raw_fd();
        poll.registry().reregister(&mut SourceFd(&raw), Token(0), interest)?;
        self.want_writable = on;
        Ok(())
    }

    /// The socket is full: take in what the peer sent (so it can make
    /// progress too), then wait for an event.
    fn wait_progress(&mut self) -> io::Result<()> {
        loop {
            match self.read_once() {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => continue,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        self.idle()
    }

    fn drain_out(&mut self) -> io::Result<()> {
        loop {
            self.flush_out()?;
            if self.out_pos == self.out.len() {
                return Ok(());
            }
            self.wait_progress()?;
        }
    }

    /// Sends one whole frame (one write, or one `sendmsg` with `fd`).
    fn send_frame(&mut self, frame: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let sock = self.sock.as_raw_fd();
        if self.mode == Mode::Blocking {
            let mut sent = 0;
            if let Some(fd) = fd {
                sent = loop {
                    match send_with_fd(sock, frame, fd) {
                        Ok(n) => break n,
                        Err(e) if interrupted(&e) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS) => std::thread::yield_now(),
                        Err(e) => return Err(e),
                    }
                };
            }
            return (&self.sock).write_all(&frame[sent..]);
        }
        // Frames stay in order: while bytes are queued, new frames queue behind them.
        if self.out.len() - self.out_pos > OUT_HIGH || (fd.is_some() && self.out_pos < self.out.len()) {
            self.drain_out()?;
        }
        if self.out_pos < self.out.len() {
            self.out.extend_from_slice(frame);
            return Ok(());
        }
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = loop {
                match send_with_fd(sock, frame, fd) {
                    Ok(n) => break n,
                    Err(e) if interrupted(&e) => continue,
                    Err(e) if would_block(&e) || e.raw_os_error() == Some(libc::ETOOMANYREFS) => {
                        self.set_writable_interest(true)?;
                        self.wait_progress()?
                    }
                    Err(e) => return Err(e),
                }
            };
        }
        while sent < frame.len() {
            match (&self.sock).write(&frame[sent..]) {
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => {
                    self.out.extend_from_slice(&frame[sent..]);
                    return self.set_writable_interest(true);
                }
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(crate) fn send<T: Serialize + ?Sized>(&mut self, value: &T, fd: Option<RawFd>) -> io::Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        frame_into(&mut scratch, value);
        let r = self.send_frame(&scratch, fd);
        self.scratch = scratch;
        r
    }

    pub(crate) fn recv<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        loop {
            if let Some(body) = self.next_frame() {
                return decode(&self.buf[body]);
            }
            if !self.fill_wait()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The worker's side of a raw job: serve until the master closes the socket.
pub(crate) fn raw_serve(sock: UnixStream, job: Job) -> io::Result<()> {
    let mut io = RawIo::new(sock, job.mode, job.work == Work::Fd)?;
    let mut count = 0u64;
    loop {
        while let Some(body) = io.next_frame() {
            match job.work {
                Work::Echo => {
                    let p: Payload = decode(&io.buf[body])?;
                    io.send(&p.n, None)?;
                }
                Work::Count | Work::Fd => {
                    let p: Payload = decode(&io.buf[body])?;
                    if p.n != SENTINEL {
                        count += 1;
                    } else if job.work == Work::Count {
                        io.send(&std::mem::take(&mut count), None)?;
                    } else {
                        let fds = std::mem::take(&mut io.fds_received);
                        io.send(&(std::mem::take(&mut count), fds), None)?;
                    }
                }
                Work::Big => {
                    let b: Bytes = decode(&io.buf[body])?;
                    io.send(&b, None)?;
                }
            }
        }
        if !io.fill_wait()? {
            return Ok(());
        }
    }
}
