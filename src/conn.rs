//! One end of a channel: the socket, its receive decoder, and its write queue
//! of whole frames with their fds.
//!
//! Writes gather up to `MAX_IOV` queued frames into one `sendmsg`, with up to
//! 253 fds riding along; once any byte of a call is written the kernel owns
//! every fd of that call, so our copies are closed and never sent again.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use mio::net::UnixStream;

use crate::codec::Decoder;
use crate::config::QUEUE_FRAME_OVERHEAD;
use crate::sys;

/// Slices gathered into one `sendmsg` (a frame takes one, or two with a tail).
const MAX_IOV: usize = 64;
/// Fds sent in one `sendmsg`: one. The kernel hands a reader one write's
/// fds per `recvmsg`, so the peer never holds more than two ahead of their
/// frames, and its limits on unclaimed fds can be tight.
pub(crate) const FDS_PER_WRITE: usize = 1;
const _: () = assert!(FDS_PER_WRITE <= sys::MAX_FDS_PER_CALL);
/// Bytes gathered into one `sendmsg` (beyond the first frame).
const MAX_GATHER: usize = 1 << 20;
/// Queue entries kept allocated once the queue drains.
const QUEUE_KEEP: usize = 64;
/// Recycled frame buffers kept per connection, and the largest kept (at
/// most 256 KiB per connection: small frames are the ones worth recycling,
/// and a burst of 64 of them then allocates nothing).
const POOL_MAX: usize = 64;
const POOL_BUF_MAX: usize = 4 * 1024;

#[derive(Debug)]
struct OutFrame {
    /// The encoded frame (or its head); empty once cancelled.
    buf: Vec<u8>,
    /// The rest of the frame, written after `buf`: an owned payload queued
    /// without copying it (usually empty).
    tail: Vec<u8>,
    /// The fd to attach; `None` once handed to the kernel (or none at all).
    fd: Option<OwnedFd>,
    /// The fd went out with an earlier `sendmsg`, ahead of this frame's bytes:
    /// the peer pairs it with this frame, so the frame can no longer be cancelled.
    fd_sent: bool,
    /// The frame's ack deadline: once it has passed, the frame is never
    /// written (its sender is told `Timeout`, so no handler may see it).
    expires: Option<Instant>,
}

/// What one flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// The queue is empty.
    All,
    /// The socket is full; wait for a writable event.
    Blocked,
    /// Too many fds in flight to a slow reader (ETOOMANYREFS): retry later.
    TooManyRefs,
}

/// What one read brought.
#[derive(Debug)]
pub(crate) enum Read {
    /// Bytes (and maybe fds) were added to the decoder. `drained`: the read
    /// filled less than its buffer and brought no fd, so the socket was empty.
    Data {
        /// The receive queue was empty after this read.
        drained: bool,
    },
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed its end.
    Eof,
    /// The kernel dropped fds (MSG_CTRUNC): we could not take them.
    FdsLost,
    /// The peer sent more fds than this read had room for (the kernel
    /// closed the excess).
    TooManyFds,
}

impl OutFrame {
    fn len(&self) -> usize {
        self.buf.len() + self.tail.len()
    }

    /// The heap this frame holds, as `Config::max_queue_bytes` counts it.
    fn charge(&self) -> usize {
        self.buf.capacity() + self.tail.capacity() + self.overhead()
    }

    /// The queue entry, and for a frame that asked for an ack its ack record.
    fn overhead(&self) -> usize {
        QUEUE_FRAME_OVERHEAD * (1 + usize::from(self.expires.is_some()))
    }

    /// The parts of the frame from byte `skip` on (empty parts left out).
    fn unwritten(&self, skip: usize) -> impl Iterator<Item = &[u8]> {
        let (head, tail) = if skip < self.buf.len() {
            (&self.buf[skip..], &self.tail[..])
        } else {
            (&[][..], &self.tail[skip - self.buf.len()..])
        };
        [head, tail].into_iter().filter(|p| !p.is_empty())
    }
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    pub(crate) decoder: Decoder,
    queue: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// Queue sequence of `queue[0]`; frames are numbered as they are pushed.
    front_qseq: u64,
    queued_bytes: usize,
    /// Heap held by the queue (see `OutFrame::charge`).
    queued_mem: usize,
    queued_fds: usize,
    /// Queued frames whose fd went out ahead of their last byte. While there
    /// is one, no other fd is sent: the peer then never holds more than two
    /// fds ahead of their frames (one whose frame is still arriving, one
    /// that a read brought), however a big frame is split across writes.
    fds_in_transit: usize,
    /// Fds of cancelled frames, by queue sequence, until their acks' outcomes
    /// take them (at most one per queued fd).
    returned: Vec<(u64, OwnedFd)>,
    /// A write failed for good (the peer is gone): later frames are dropped.
    write_failed: bool,
    /// A write hit EAGAIN; wait for the writable edge.
    pub(crate) blocked: bool,
    /// WRITABLE is part of the socket's registration.
    pub(crate) write_interest: bool,
    /// `Config::writable_wakeups` asked for WRITABLE after the last write.
    pub(crate) wakeups_wanted: bool,
    pool: Vec<Vec<u8>>,
    fd_scratch: VecDeque<OwnedFd>,
    /// Raw fds gathered for one `sendmsg` (kept to avoid reallocating).
    fd_list: Vec<RawFd>,
    pub(crate) frames_written: u64,
    pub(crate) write_calls: u64,
    pub(crate) bytes_written: u64,
    pub(crate) bytes_read: u64,
}

impl Conn {
    pub(crate) fn new(stream: UnixStream, decoder: Decoder) -> Conn {
        Conn {
            stream,
            decoder,
            queue: VecDeque::new(),
            front_written: 0,
            front_qseq: 1,
            queued_bytes: 0,
            queued_mem: 0,
            queued_fds: 0,
            fds_in_transit: 0,
            write_failed: false,
            returned: Vec::new(),
            blocked: false,
            write_interest: false,
            wakeups_wanted: false,
            pool: Vec::new(),
            fd_scratch: VecDeque::new(),
            fd_list: Vec::new(),
            frames_written: 0,
            write_calls: 0,
            bytes_written: 0,
            bytes_read: 0,
        }
    }

    /// A cleared buffer to encode a frame into.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    /// A recycled buffer, if the pool has one (never allocates).
    pub(crate) fn spare_buffer(&mut self) -> Option<Vec<u8>> {
        self.pool.pop()
    }

    /// Returns a buffer that was not queued after all.
    pub(crate) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX && buf.capacity() <= POOL_BUF_MAX {
            buf.clear();
            self.pool.push(buf);
        }
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Heap held by the queue: buffers' capacity plus a fixed cost per frame.
    pub(crate) fn queued_mem(&self) -> usize {
        self.queued_mem
    }

    /// What queueing `buf` and `tail` (with an ack if `acked`) would add to `queued_mem`.
    pub(crate) fn charge_of(buf: &Vec<u8>, tail: &Vec<u8>, acked: bool) -> usize {
        buf.capacity() + tail.capacity() + QUEUE_FRAME_OVERHEAD * (1 + usize::from(acked))
    }

    pub(crate) fn has_returned_fds(&self) -> bool {
        !self.returned.is_empty()
    }

    pub(crate) fn queued_fds(&self) -> usize {
        self.queued_fds
    }

    pub(crate) fn queued_frames(&self) -> usize {
        self.queue.len()
    }

    /// Appends a frame (`buf`, then `tail`), never to be written after
    /// `expires`; returns its queue sequence (for `cancel`).
    pub(crate) fn push(&mut self, buf: Vec<u8>, tail: Vec<u8>, fd: Option<OwnedFd>, expires: Option<Instant>) -> u64 {
        let frame = OutFrame { buf, tail, fd, fd_sent: false, expires };
        self.queued_bytes += frame.len();
        self.queued_mem += frame.charge();
        self.queued_fds += usize::from(frame.fd.is_some());
        self.queue.push_back(frame);
        self.front_qseq + self.queue.len() as u64 - 1
    }

    /// Puts a frame before everything queued. Only valid before any byte of
    /// the queue has been written (the master's hello reply).
    pub(crate) fn push_front(&mut self, buf: Vec<u8>) {
        debug_assert_eq!(self.front_written, 0);
        let frame = OutFrame { buf, tail: Vec::new(), fd: None, fd_sent: false, expires: None };
        self.queued_bytes += frame.len();
        self.queued_mem += frame.charge();
        self.front_qseq -= 1;
        self.queue.push_front(frame);
    }

    /// Removes a queued frame that has not started to be written, closing its
    /// fd. Returns false if it was written (or started) already.
    pub(crate) fn cancel(&mut self, qseq: u64) -> bool {
        let Some(idx) = qseq.checked_sub(self.front_qseq) else { return false };
        self.cancel_at(idx as usize)
    }

    /// Cancels `queue[idx]` if none of it has gone out (the front frame's
    /// bytes, or its fd with an earlier call).
    fn cancel_at(&mut self, idx: usize) -> bool {
        if idx == 0 && self.front_written > 0 {
            return false;
        }
        let Some(f) = self.queue.get_mut(idx) else { return false };
        if f.buf.is_empty() || f.fd_sent {
            return false;
        }
        self.queued_bytes -= f.len();
        // The entry stays (empty) until it reaches the front: only its overhead is still held.
        self.queued_mem -= f.charge() - f.overhead();
        drop(std::mem::take(&mut f.tail));
        let buf = std::mem::take(&mut f.buf);
        let f_fd = f.fd.take();
        if f_fd.is_some() {
            self.queued_fds -= 1;
        }
        self.recycle(buf);
        if let Some(fd) = f_fd {
            // Kept for the ack's outcome, which hands it back (`take_fd`).
            self.returned.push((self.front_qseq + idx as u64, fd));
        }
        true
    }

    /// The fd of frame `qseq` if it never left: from a cancelled frame, or
    /// taken off a queued one (whose link is going down).
    pub(crate) fn take_fd(&mut self, qseq: u64) -> Option<OwnedFd> {
        if let Some(i) = self.returned.iter().position(|(q, _)| *q == qseq) {
            return Some(self.returned.swap_remove(i).1);
        }
        let idx = usize::try_from(qseq.checked_sub(self.front_qseq)?).ok()?;
        if idx == 0 && self.front_written > 0 {
            return None;
        }
        let fd = self.queue.get_mut(idx)?.fd.take()?;
        self.queued_fds -= 1;
        Some(fd)
    }

    /// Cancels the frames among the first `MAX_IOV` whose deadline has
    /// passed, before a write could send them.
    fn drop_expired(&mut self) {
        let mut now = None;
        for idx in 0..self.queue.len().min(MAX_IOV) {
            let Some(expires) = self.queue[idx].expires else { continue };
            let now = *now.get_or_insert_with(Instant::now);
            if expires <= now {
                self.cancel_at(idx);
            }
        }
    }

    /// Drops every queued frame (closing their fds): the peer can no longer
    /// read them. Frames queued later are dropped the same way at their flush.
    pub(crate) fn discard_queue(&mut self) {
        // Fds that never left stay for their acks' outcomes (`take_fd`).
        for (i, f) in self.queue.iter_mut().enumerate() {
            if let Some(fd) = f.fd.take() {
                self.returned.push((self.front_qseq + i as u64, fd));
            }
        }
        // Queue sequences stay unique: a pending ack must never cancel a later frame.
        self.front_qseq += self.queue.len() as u64;
        self.queue.clear();
        self.front_written = 0;
        self.queued_bytes = 0;
        self.queued_mem = 0;
        self.queued_fds = 0;
        self.fds_in_transit = 0;
        self.write_failed = true;
    }

    /// One best-effort write of `buf` outside the queue (a parting message
    /// on a connection about to close).
    pub(crate) fn write_alone(&mut self, buf: &[u8]) {
        let _ = sys::send_with_fds(self.stream.as_raw_fd(), &[IoSlice::new(buf)], &[]);
    }

    /// Writes as much of the queue as the socket takes.
    pub(crate) fn flush(&mut self) -> io::Result<Flushed> {
        let sock = self.stream.as_raw_fd();
        // Whatever an earlier write met, this one finds out afresh: a stale
        // `blocked` would keep later sends from being written at all.
        self.blocked = false;
        if self.write_failed {
            self.discard_queue();
            return Ok(Flushed::All);
        }
        loop {
            self.drop_expired();
            self.pop_finished();
            if self.queue.is_empty() {
                // A burst's entry array is not kept: an idle connection stays small.
                if self.queue.capacity() > QUEUE_KEEP {
                    self.queue = VecDeque::new();
                }
                return Ok(Flushed::All);
            }
            let mut fds = std::mem::take(&mut self.fd_list);
            fds.clear();
            let one;
            let mut many;
            let (iov, nframes): (&[IoSlice<'_>], usize) = if self.queue.len() == 1 && self.queue[0].tail.is_empty() {
                // The common case (request/reply): no gather array to set up.
                let f = &self.queue[0];
                fds.extend(f.fd.as_ref().map(|fd| fd.as_raw_fd()));
                one = [IoSlice::new(&f.buf[self.front_written..])];
                (&one, 1)
            } else {
                many = [IoSlice::new(&[]); MAX_IOV];
                let (mut niov, mut nframes, mut gathered) = (0, 0, 0);
                for (i, f) in self.queue.iter().enumerate() {
                    // A frame takes one slice, or two with a tail.
                    let need = 1 + usize::from(!f.tail.is_empty());
                    if niov + need > MAX_IOV || (niov > 0 && gathered >= MAX_GATHER) {
                        break;
                    }
                    if let Some(fd) = &f.fd {
                        if fds.len() == FDS_PER_WRITE || self.fds_in_transit > 0 {
                            break;
                        }
                        fds.push(fd.as_raw_fd());
                    }
                    let skip = if i == 0 { self.front_written } else { 0 };
                    for part in f.unwritten(skip) {
                        many[niov] = IoSlice::new(part);
                        niov += 1;
                        gathered += part.len();
                    }
                    nframes += 1;
                }
                (&many[..niov], nframes)
            };
            let nfds = fds.len();
            let sent = sys::send_with_fds(sock, iov, &fds);
            self.fd_list = fds;
            match sent {
                Ok(n) => {
                    self.write_calls += 1;
                    if nfds > 0 && n > 0 {
                        // The kernel took every fd of this call: close ours.
                        for f in self.queue.iter_mut().take(nframes) {
                            if f.fd.take().is_some() {
                                f.fd_sent = true;
                                self.fds_in_transit += 1;
                                self.queued_fds -= 1;
                            }
                        }
                    }
                    self.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(Flushed::Blocked);
                }
                Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS) => return Ok(Flushed::TooManyRefs),
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, mut n: usize) {
        self.bytes_written += n as u64;
        self.queued_bytes -= n;
        while n > 0 {
            let Some(front) = self.queue.front() else { break };
            let left = front.len() - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            self.front_written = front.len();
            self.pop_finished();
        }
    }

    /// Pops written and cancelled frames off the front.
    fn pop_finished(&mut self) {
        while let Some(front) = self.queue.front() {
            if self.front_written < front.len() {
                return;
            }
            let Some(f) = self.queue.pop_front() else { return };
            self.queued_mem -= f.charge();
            self.fds_in_transit -= usize::from(f.fd_sent);
            if !f.buf.is_empty() {
                self.frames_written += 1;
            }
            self.front_written = 0;
            self.front_qseq += 1;
            if let Some(fd) = f.fd {
                // Cannot happen (fds go with the frame's first byte), but never leak.
                self.queued_fds -= 1;
                drop(fd);
            }
            self.recycle(f.buf);
        }
    }

    /// One `recvmsg` into the decoder, of at most `max_bytes` bytes and
    /// `max_fds` fds (more fds than that arrive as `FdsLost`: the kernel
    /// closes the excess, so we never hold them).
    pub(crate) fn read(&mut self, max_bytes: usize, max_fds: usize) -> io::Result<Read> {
        let sock = self.stream.as_raw_fd();
        loop {
            let buf = self.decoder.read_buf();
            let len = max_bytes.min(buf.len());
            let buf = &mut buf[..len];
            let offered = buf.len();
            match sys::recv_with_fds(sock, buf, max_fds, &mut self.fd_scratch) {
                Ok(r) => {
                    let drained = r.bytes < offered && self.fd_scratch.is_empty();
                    // Truncated with the room full: the peer sent more than
                    // we take; with room left: we could not install them (EMFILE).
                    let mut too_many = r.truncated && self.fd_scratch.len() >= max_fds;
                    let lost = r.truncated;
                    for fd in self.fd_scratch.drain(..) {
                        if self.decoder.push_fd(fd).is_err() {
                            too_many = true;
                        }
                    }
                    if too_many {
                        return Ok(Read::TooManyFds);
                    }
                    if lost {
                        return Ok(Read::FdsLost);
                    }
                    if r.bytes == 0 {
                        return Ok(Read::Eof);
                    }
                    self.decoder.filled(r.bytes);
                    self.bytes_read += r.bytes as u64;
                    return Ok(Read::Data { drained });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::WouldBlock),
                Err(e) => return Err(e),
            }
        }
    }
}
