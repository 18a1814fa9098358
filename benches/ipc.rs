//! Side-by-side IPC benchmark: clusterphone against hand-written baselines,
//! over the same two processes and the same CPU placement, in one run.
//!
//! ```text
//! cargo bench --bench ipc -- --placement split   # master on CPU 0, worker on CPU 1 (default)
//! cargo bench --bench ipc -- --placement same    # both on CPU 0
//! cargo bench --bench ipc -- --busy-poll         # busy-polling RTT: clusterphone-busy vs raw-busy
//! cargo bench --bench ipc -- --wakeups never     # Config::writable_wakeups on both sides: never|always|large (default)
//! cargo bench --bench ipc -- --quick             # ~10x smaller counts (CI smoke, well under 30 s)
//! ```
//!
//! Other flags: `--only rtt,oneway,window,big,fd,ack,allocs,mem` (phases to run),
//! `--impl clusterphone,raw-blocking,raw-mio` (implementations to run),
//! `--rounds N` (each phase runs N times per implementation, interleaved, each
//! round starting with another implementation; the table shows medians and
//! the range; default 3, or 1 with `--quick`),
//! `--watchdog SECS` (abort a stuck run; default 300 per round, or 60 with `--quick`),
//! `--cap-ms MS` (wall-clock cap of one timed phase; default 4000, or 700 with
//! `--quick`; raise it for runs under valgrind). The experimental baseline
//! `raw-mio-lazyw` (mio, registered for WRITABLE only while a write is
//! pending) runs only when named in `--impl`.
//! Unknown arguments (such as the `--bench` cargo adds) are ignored.
//!
//! One binary plays both roles: the master re-executes itself as the worker
//! (`CP_BENCH_ROLE=worker`). The worker is a clusterphone worker. For a raw
//! baseline the master hands it one end of a fresh socketpair (through
//! clusterphone, as an fd), and the worker serves that socket with plain
//! blocking, mio or busy-polling code until the master closes it, then goes
//! back to clusterphone. Raw frames are a 4-byte little-endian length and the
//! CBOR (ciborium) of the same payload; each frame is one `write`.
//!
//! Output: a human table, then one JSON line per figure:
//! `{"impl": .., "metric": .., "value": .., "unit": .., "n": .., "placement": .., "rounds": .., "min": .., "max": ..}`
//! (`value` is the median over rounds, `n` the samples of all rounds).
//!
//! Figures (payload `{key: "value", n}`; `n` in JSON is the sample count):
//! - `rtt_p50_us`, `rtt_p99_us`: request → ack round trips, one at a time, after warm-up.
//! - `oneway_msgs_per_s`: messages without ack, until the worker confirms the count.
//! - `window_msgs_per_s`: acked requests with 64 outstanding.
//! - `big_MBps`, `big_rtt_p50_us`: 64 KiB `Bytes` echo; MB/s = 10^6 payload bytes
//!   echoed per second (each payload crosses twice). clusterphone sends the
//!   buffers owned (`Payload for Bytes`: no copy into the frame), the echo
//!   handler returns the buffer it received, and the master sends the echo
//!   on as its next request; the raw baselines copy into their frame buffer.
//! - `fd_per_s`: one fresh fd per message (dup of a pipe end), closed by both sides.
//! - `ack_cpu_ns_1k`, `ack_cpu_ns_100k`: master CPU time (CLOCK_PROCESS_CPUTIME_ID)
//!   per ack, sending 1,000 (repeatedly) or 100,000 acked requests, then polling
//!   until every reply is in. No raw-blocking figure: blocking both ways deadlocks.
//! - `rtt_allocs_per_op`, `oneway_allocs_per_msg`: heap allocations per operation,
//!   master and worker together (the counting allocator is on only for these).
//! - `mem_per_worker_bytes`: master heap growth per connected idle worker (8 of them).
//! - `mem_per_pending_ack_bytes`: master heap growth per pending ack, 100,000 pending.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clusterphone::{AckError, Bytes, Config, Error, Message, Reactor, Responder, WorkerId, WritableWakeups};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

// ----- counting allocator ------------------------------------------------------

/// Counts allocations and the net heap delta while `COUNTING` is on. When off
/// it costs one relaxed load per call, so it does not skew the timed phases.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static HEAP_DELTA: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

fn note_alloc(size: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        HEAP_DELTA.fetch_add(size as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

fn note_free(size: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        HEAP_DELTA.fetch_sub(size as isize, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Starts counting from zero.
fn count_start() {
    HEAP_DELTA.store(0, Ordering::Relaxed);
    ALLOCS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
}

/// Stops counting; returns (allocations, net heap bytes) since `count_start`.
fn count_stop() -> (u64, i64) {
    COUNTING.store(false, Ordering::SeqCst);
    (ALLOCS.load(Ordering::Relaxed), HEAP_DELTA.load(Ordering::Relaxed) as i64)
}

// ----- shared types ------------------------------------------------------------

const ROLE_VAR: &str = "CP_BENCH_ROLE";
const CPU_VAR: &str = "CP_BENCH_CPU";
const BUSY_VAR: &str = "CP_BENCH_BUSY";
const WATCHDOG_VAR: &str = "CP_BENCH_WATCHDOG";
const WAKEUPS_VAR: &str = "CP_BENCH_WAKEUPS";

/// `--wakeups never|always|large`: `Config::writable_wakeups` of both
/// reactors (`--lean` is `never`). The master passes it on in the environment.
fn wakeups_name() -> String {
    std::env::var(WAKEUPS_VAR).unwrap_or_else(|_| "large".to_owned())
}

fn wakeups_from_env() -> WritableWakeups {
    match wakeups_name().as_str() {
        "never" => WritableWakeups::Never,
        "always" => WritableWakeups::Always,
        _ => Config::default().writable_wakeups,
    }
}
/// `n` of the raw frame that ends a one-way or fd run ("tell me your count").
const SENTINEL: u64 = u64::MAX;
const BIG: usize = 64 * 1024;
const WINDOW: u64 = 64;
const BUSY_WINDOW: Duration = Duration::from_micros(200);
/// Generous ack timeout for the bench's own requests.
const T: Duration = Duration::from_secs(60);

/// The message payload of every small-message workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    key: String,
    n: u64,
}

fn payload() -> Payload {
    Payload { key: "value".to_owned(), n: 0 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Mode {
    Blocking,
    Mio,
    /// Mio, but interested in WRITABLE only while a write is pending (experiment).
    MioLazy,
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Work {
    /// Reply to each `Payload` with its `n`.
    Echo,
    /// Count `Payload`s; the sentinel is answered with the count.
    Count,
    /// Echo a `Bytes` payload.
    Big,
    /// Count `Payload`s and received fds (closing each); the sentinel is answered with both.
    Fd,
}

/// A raw-socket job handed to the worker with its socket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Job {
    mode: Mode,
    work: Work,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Cp,
    RawBlocking,
    RawMio,
    RawMioLazy,
    CpBusy,
    RawBusy,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Cp => match wakeups_name().as_str() {
                "never" => "clusterphone-never",
                "always" => "clusterphone-always",
                _ => "clusterphone",
            },
            Impl::RawBlocking => "raw-blocking",
            Impl::RawMio => "raw-mio",
            Impl::RawMioLazy => "raw-mio-lazyw",
            Impl::CpBusy => "clusterphone-busy",
            Impl::RawBusy => "raw-busy",
        }
    }

    fn raw_mode(self) -> Option<Mode> {
        match self {
            Impl::Cp | Impl::CpBusy => None,
            Impl::RawBlocking => Some(Mode::Blocking),
            Impl::RawMio => Some(Mode::Mio),
            Impl::RawMioLazy => Some(Mode::MioLazy),
            Impl::RawBusy => Some(Mode::Busy),
        }
    }
}

// ----- small system helpers -----------------------------------------------------

/// Pins the calling thread (and threads it creates later) to `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data, so all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: CPU_SET writes one bit inside `set`, and `cpu` is within its size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time of this whole process, in nanoseconds.
fn cpu_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A pipe; its write end is what the fd workload dups and sends.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2(2) requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One `sendmsg` of `buf` with `fd` attached (SCM_RIGHTS).
fn send_with_fd(sock: RawFd, buf: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut cmsg = [0u64; 4]; // CMSG_SPACE(4) = 24 bytes, 8-aligned.
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: the control buffer is ours, aligned and large enough for one
    // header plus one int, so CMSG_FIRSTHDR is non-null and in bounds.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>(), fd);
    }
    // SAFETY: msg points at a live iovec over `buf` and our control buffer.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recvmsg` into `buf`; received fds are closed at once and counted.
fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds_received: &mut u64) -> io::Result<usize> {
    const MAX: usize = 64;
    let mut cmsg = [0u64; (16 + MAX * 4) / 8 + 1];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: the iovec covers `buf`, which we borrow mutably; the control buffer is ours.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    assert!(msg.msg_flags & libc::MSG_CTRUNC == 0, "raw receiver: fds truncated");
    // SAFETY: after a successful recvmsg the kernel wrote well-formed headers
    // within msg_controllen; each SCM_RIGHTS fd is new and ours alone.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(hdr);
                let count = ((*hdr).cmsg_len as usize - (data as usize - hdr as usize)) / 4;
                for i in 0..count {
                    drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.cast::<RawFd>().add(i))));
                    *fds_received += 1;
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    Ok(n as usize)
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

// ----- the raw baselines: length-prefixed CBOR frames on a socket ------------------

/// Bytes that may wait in user space before a non-blocking sender waits for the socket.
const OUT_HIGH: usize = 256 * 1024;

/// One end of a raw channel, in blocking, mio (edge-triggered, read-first)
/// or busy-polling (non-blocking, spinning on `WouldBlock`) mode.
struct RawIo {
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
    fn new(sock: UnixStream, mode: Mode, fd_mode: bool) -> io::Result<RawIo> {
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

    fn send<T: Serialize + ?Sized>(&mut self, value: &T, fd: Option<RawFd>) -> io::Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        frame_into(&mut scratch, value);
        let r = self.send_frame(&scratch, fd);
        self.scratch = scratch;
        r
    }

    fn recv<T: DeserializeOwned>(&mut self) -> io::Result<T> {
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
fn raw_serve(sock: UnixStream, job: Job) -> io::Result<()> {
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

// ----- the worker process ----------------------------------------------------------

fn start_watchdog(limit: Duration, code: i32) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("ipc bench: watchdog fired after {limit:?}; aborting");
        std::process::exit(code);
    });
}

fn worker_main() -> Result<(), Error> {
    if let Some(cpu) = std::env::var(CPU_VAR).ok().and_then(|s| s.parse().ok()) {
        if let Err(e) = pin_to(cpu) {
            eprintln!("worker: cannot pin to CPU {cpu}: {e}");
        }
    }
    let limit = std::env::var(WATCHDOG_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    start_watchdog(Duration::from_secs(limit + 10), 102);
    let mut config = Config::default();
    if std::env::var(BUSY_VAR).is_ok_and(|v| v == "1") {
        config.busy_poll = Some(BUSY_WINDOW);
    }
    config.writable_wakeups = wakeups_from_env();
    let mut r = Reactor::attach_with(config)?;

    let count = Rc::new(Cell::new(0u64));
    let fds = Rc::new(Cell::new(0u64));
    let held: Rc<RefCell<Vec<Responder>>> = Rc::default();
    let job: Rc<RefCell<Option<(Job, OwnedFd)>>> = Rc::default();

    r.on("rtt", |_r, m: Message<Payload>| {
        let _ = m.reply.ok(&m.payload.n);
    })?;
    let c = count.clone();
    r.on("oneway", move |_r, _m: Message<Payload>| c.set(c.get() + 1))?;
    let c = count.clone();
    r.on("count", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&c.replace(0));
    })?;
    // The received buffer goes straight back, owned: written without a copy.
    r.on("big", |_r, m: Message<Bytes>| {
        let _ = m.reply.ok(m.payload);
    })?;
    let (c, f) = (count.clone(), fds.clone());
    r.on("fd", move |_r, m: Message<Payload>| {
        c.set(c.get() + 1);
        if m.fd.is_some() {
            f.set(f.get() + 1);
        }
        // Dropping the message closes the fd.
    })?;
    let (c, f) = (count.clone(), fds.clone());
    r.on("fdcount", move |_r, m: Message<()>| {
        let _ = m.reply.ok(&(c.replace(0), f.replace(0)));
    })?;
    let h = held.clone();
    r.on("hold", move |_r, m: Message<Payload>| h.borrow_mut().push(m.reply))?;
    let h = held.clone();
    r.on("release", move |_r, m: Message<()>| {
        let all = std::mem::take(&mut *h.borrow_mut());
        let n = all.len() as u64;
        for resp in all {
            let _ = resp.ok(&0u64);
        }
        let _ = m.reply.ok(&n);
    })?;
    r.on("allocs", |_r, m: Message<bool>| {
        if m.payload {
            count_start();
            let _ = m.reply.ok(&(0u64, 0i64));
        } else {
            let counts = count_stop();
            let _ = m.reply.ok(&counts);
        }
    })?;
    let j = job.clone();
    r.on("raw", move |_r, m: Message<Job>| match m.fd {
        Some(fd) => {
            *j.borrow_mut() = Some((m.payload, fd));
            let _ = m.reply.ok(&());
        }
        None => m.reply.err("no socket came with the job"),
    })?;

    loop {
        match r.poll(Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(Error::Disconnected) | Err(Error::ExitRequested) => break,
            Err(e) => return Err(e),
        }
        let next = job.borrow_mut().take();
        if let Some((job, fd)) = next {
            r.flush(Duration::from_secs(5))?;
            if let Err(e) = raw_serve(UnixStream::from(fd), job) {
                eprintln!("worker: raw {job:?} failed: {e}");
            }
        }
    }
    let _ = r.flush(Duration::from_secs(2));
    if show_stats() {
        eprintln!("worker stats: {:?}", r.stats());
    }
    Ok(())
}

/// `IPC_BENCH_STATS=1`: print the reactors' counters (frames per write call, ...).
fn show_stats() -> bool {
    std::env::var("IPC_BENCH_STATS").is_ok_and(|v| v == "1")
}

// ----- options and sizes -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Same,
    Split,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Split => "split",
        }
    }

    fn worker_cpu(self) -> usize {
        match self {
            Placement::Same => 0,
            Placement::Split => 1,
        }
    }
}

struct Opts {
    placement: Placement,
    busy: bool,
    quick: bool,
    only: Option<Vec<String>>,
    impls: Option<Vec<String>>,
    watchdog: u64,
    cap_ms: Option<u64>,
    /// Times each phase runs per implementation, interleaved.
    rounds: usize,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            placement: Placement::Split,
            busy: false,
            quick: false,
            only: None,
            impls: None,
            watchdog: 0,
            cap_ms: None,
            rounds: 0,
        };
        let mut args = std::env::args().skip(1);
        let list = |s: String| -> Vec<String> { s.split(',').map(|x| x.trim().to_owned()).collect() };
        while let Some(a) = args.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (a.clone(), None),
            };
            let value = |args: &mut dyn Iterator<Item = String>| inline.clone().or_else(|| args.next());
            match flag.as_str() {
                "--placement" => match value(&mut args).as_deref() {
                    Some("same") => o.placement = Placement::Same,
                    Some("split") => o.placement = Placement::Split,
                    other => {
                        eprintln!("--placement takes same|split, not {other:?}");
                        std::process::exit(2);
                    }
                },
                "--busy-poll" => o.busy = true,
                // The worker inherits the variable.
                "--lean" => std::env::set_var(WAKEUPS_VAR, "never"),
                "--wakeups" => match value(&mut args).as_deref() {
                    Some(w @ ("never" | "always" | "large")) => std::env::set_var(WAKEUPS_VAR, w),
                    other => {
                        eprintln!("--wakeups takes never|always|large, not {other:?}");
                        std::process::exit(2);
                    }
                },
                "--quick" => o.quick = true,
                "--only" => o.only = value(&mut args).map(list),
                "--impl" => o.impls = value(&mut args).map(list),
                "--cap-ms" => o.cap_ms = value(&mut args).and_then(|v| v.parse().ok()),
                "--rounds" => o.rounds = value(&mut args).and_then(|v| v.parse().ok()).unwrap_or(0),
                "--watchdog" => o.watchdog = value(&mut args).and_then(|v| v.parse().ok()).unwrap_or(0),
                _ => {} // e.g. cargo's --bench
            }
        }
        if o.rounds == 0 {
            o.rounds = if o.quick { 1 } else { 3 };
        }
        if o.watchdog == 0 {
            o.watchdog = if o.quick { 60 } else { 300 } * o.rounds as u64;
        }
        o
    }

    fn phase(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|l| l.iter().any(|x| x == name))
    }

    fn runs(&self, imp: Impl) -> bool {
        self.impls
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == imp.name() || (imp == Impl::Cp && x == "clusterphone")))
    }
}

struct Sizes {
    warm: u64,
    rtt: u64,
    oneway: u64,
    window: u64,
    big_warm: u64,
    big: u64,
    fd: u64,
    ack_small: u64,
    ack_small_total: u64,
    ack_big: u64,
    alloc_ops: u64,
    mem_workers: usize,
    mem_acks: u64,
    /// Wall-clock cap of one timed phase.
    cap: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                warm: 100,
                rtt: 2_000,
                oneway: 20_000,
                window: 20_000,
                big_warm: 10,
                big: 200,
                fd: 10_000,
                ack_small: 1_000,
                ack_small_total: 10_000,
                ack_big: 10_000,
                alloc_ops: 1_000,
                mem_workers: 8,
                mem_acks: 10_000,
                cap: Duration::from_millis(700),
            }
        } else {
            Sizes {
                warm: 1_000,
                rtt: 20_000,
                oneway: 200_000,
                window: 200_000,
                big_warm: 50,
                big: 10_000,
                fd: 100_000,
                ack_small: 1_000,
                ack_small_total: 100_000,
                ack_big: 100_000,
                alloc_ops: 10_000,
                mem_workers: 8,
                mem_acks: 100_000,
                cap: Duration::from_secs(4),
            }
        }
    }
}

// ----- figures -----------------------------------------------------------------------

struct Fig {
    imp: &'static str,
    metric: &'static str,
    value: f64,
    n: u64,
}

/// Metrics in table order, with their unit and whether lower is better.
const METRICS: &[(&str, &str, bool)] = &[
    ("rtt_p50_us", "us", true),
    ("rtt_p99_us", "us", true),
    ("oneway_msgs_per_s", "msg/s", false),
    ("window_msgs_per_s", "msg/s", false),
    ("big_MBps", "MB/s", false),
    ("big_rtt_p50_us", "us", true),
    ("fd_per_s", "fd/s", false),
    ("ack_cpu_ns_1k", "ns", true),
    ("ack_cpu_ns_100k", "ns", true),
    ("rtt_allocs_per_op", "allocs", true),
    ("oneway_allocs_per_msg", "allocs", true),
    ("mem_per_worker_bytes", "bytes", true),
    ("mem_per_pending_ack_bytes", "bytes", true),
];

fn unit_of(metric: &str) -> &'static str {
    METRICS.iter().find(|m| m.0 == metric).map_or("", |m| m.1)
}

struct Bench {
    r: Reactor,
    w: WorkerId,
    opts: Opts,
    s: Sizes,
    figs: Vec<Fig>,
    notes: Vec<String>,
}

fn percentile(sorted: &[u64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)] as f64
}

struct Cap(Instant);

impl Cap {
    fn new(d: Duration) -> Cap {
        Cap(Instant::now() + d)
    }
    fn over(&self) -> bool {
        Instant::now() >= self.0
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// This executable, to run as a worker.
fn worker_command(opts: &Opts, busy: bool) -> Res<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(ROLE_VAR, "worker")
        .env(CPU_VAR, opts.placement.worker_cpu().to_string())
        .env(BUSY_VAR, if busy { "1" } else { "0" })
        .env(WATCHDOG_VAR, opts.watchdog.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(cmd)
}

impl Bench {
    fn fig(&mut self, imp: Impl, metric: &'static str, value: f64, n: u64) {
        self.figs.push(Fig { imp: imp.name(), metric, value, n });
    }

    /// Hands the worker a fresh socketpair end for a raw job; returns our end.
    fn raw(&mut self, mode: Mode, work: Work) -> Res<RawIo> {
        let (ours, theirs) = UnixStream::pair()?;
        let job = Job { mode, work };
        self.r.send_to(self.w, "raw", &job, Some(OwnedFd::from(theirs))).within(T).wait::<()>()?;
        Ok(RawIo::new(ours, mode, false)?)
    }

    // (a) request/ack round trip.
    fn rtt(&mut self, imp: Impl) -> Res<()> {
        let lat = self.rtt_samples(imp, self.s.warm, self.s.rtt)?;
        let n = lat.len() as u64;
        self.fig(imp, "rtt_p50_us", percentile(&lat, 50) / 1e3, n);
        self.fig(imp, "rtt_p99_us", percentile(&lat, 99) / 1e3, n);
        Ok(())
    }

    fn rtt_samples(&mut self, imp: Impl, warm: u64, count: u64) -> Res<Vec<u64>> {
        let mut p = payload();
        let mut lat = Vec::with_capacity(count as usize);
        let cap = self.s.cap;
        match imp.raw_mode() {
            None => {
                for i in 0..warm {
                    p.n = i;
                    let got: u64 = self.r.request(self.w, "rtt", &p, T)?;
                    assert_eq!(got, i);
                }
                let cap = Cap::new(cap);
                for i in 0..count {
                    p.n = i;
                    let t = Instant::now();
                    let got: u64 = self.r.request(self.w, "rtt", &p, T)?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert_eq!(got, i);
                    if i % 256 == 255 && cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                for i in 0..warm {
                    p.n = i;
                    io.send(&p, None)?;
                    assert_eq!(io.recv::<u64>()?, i);
                }
                let cap = Cap::new(cap);
                for i in 0..count {
                    p.n = i;
                    let t = Instant::now();
                    io.send(&p, None)?;
                    let got: u64 = io.recv()?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert_eq!(got, i);
                    if i % 256 == 255 && cap.over() {
                        break;
                    }
                }
            }
        }
        lat.sort_unstable();
        Ok(lat)
    }

    // (b) one-way messages, the worker confirming the count.
    fn oneway(&mut self, imp: Impl) -> Res<()> {
        let (sent, secs) = self.oneway_run(imp, self.s.oneway)?;
        self.fig(imp, "oneway_msgs_per_s", sent as f64 / secs, sent);
        Ok(())
    }

    fn oneway_run(&mut self, imp: Impl, count: u64) -> Res<(u64, f64)> {
        let mut p = payload();
        let cap = self.s.cap;
        let mut sent = 0;
        match imp.raw_mode() {
            None => {
                let t = Instant::now();
                let cap = Cap::new(cap);
                let w = self.w;
                while sent < count {
                    // Bursts of 64 sends in a batch: one sendmsg each (Reactor::batch).
                    let end = (sent + 64).min(count);
                    let (n, full) = self.r.batch(|r| {
                        let mut n = sent;
                        while n < end {
                            p.n = n;
                            match r.send_to(w, "oneway", &p, None).send() {
                                Ok(()) => n += 1,
                                Err(e) if matches!(e.error, Error::QueueFull) => return Ok((n, true)),
                                Err(e) => return Err(e),
                            }
                        }
                        Ok((n, false))
                    })?;
                    if full {
                        self.r.poll(Some(Duration::from_millis(1)))?;
                    }
                    let before = sent;
                    sent = n;
                    if sent / 1024 != before / 1024 && cap.over() {
                        break;
                    }
                }
                let got: u64 = self.r.request(self.w, "count", &(), T)?;
                assert_eq!(got, sent, "worker counted {got} of {sent}");
                Ok((sent, t.elapsed().as_secs_f64()))
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Count)?;
                let t = Instant::now();
                let cap = Cap::new(cap);
                while sent < count {
                    p.n = sent;
                    io.send(&p, None)?;
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                p.n = SENTINEL;
                io.send(&p, None)?;
                let got: u64 = io.recv()?;
                assert_eq!(got, sent, "worker counted {got} of {sent}");
                Ok((sent, t.elapsed().as_secs_f64()))
            }
        }
    }

    // (c) acked requests, 64 outstanding.
    fn window(&mut self, imp: Impl) -> Res<()> {
        let count = self.s.window;
        let cap = Cap::new(self.s.cap);
        let t = Instant::now();
        let done = match imp.raw_mode() {
            None => {
                struct St {
                    w: WorkerId,
                    p: RefCell<Payload>,
                    sent: Cell<u64>,
                    done: Cell<u64>,
                    limit: Cell<u64>,
                }
                fn issue(r: &mut Reactor, st: &Rc<St>) {
                    let i = st.sent.get();
                    st.sent.set(i + 1);
                    st.p.borrow_mut().n = i;
                    let st2 = st.clone();
                    r.send_to(st.w, "rtt", &*st.p.borrow(), None)
                        .within(T)
                        .ackd(move |r, res: Result<u64, AckError>| {
                            assert_eq!(res.expect("window ack"), i);
                            st2.done.set(st2.done.get() + 1);
                            if st2.sent.get() < st2.limit.get() {
                                issue(r, &st2);
                            }
                        })
                        .expect("window send");
                }
                let st = Rc::new(St {
                    w: self.w,
                    p: RefCell::new(payload()),
                    sent: Cell::new(0),
                    done: Cell::new(0),
                    limit: Cell::new(count),
                });
                for _ in 0..WINDOW.min(count) {
                    issue(&mut self.r, &st);
                }
                while st.done.get() < st.sent.get() {
                    self.r.poll(Some(Duration::from_millis(10)))?;
                    if cap.over() {
                        st.limit.set(st.sent.get());
                    }
                }
                st.done.get()
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                let mut p = payload();
                let (mut sent, mut done, mut limit) = (0u64, 0u64, count);
                while sent < WINDOW.min(count) {
                    p.n = sent;
                    io.send(&p, None)?;
                    sent += 1;
                }
                while done < sent {
                    let got: u64 = io.recv()?;
                    assert_eq!(got, done);
                    done += 1;
                    if done % 1024 == 0 && cap.over() {
                        limit = sent;
                    }
                    if sent < limit {
                        p.n = sent;
                        io.send(&p, None)?;
                        sent += 1;
                    }
                }
                done
            }
        };
        let secs = t.elapsed().as_secs_f64();
        self.fig(imp, "window_msgs_per_s", done as f64 / secs, done);
        Ok(())
    }

    // (d) 64 KiB echo.
    fn big(&mut self, imp: Impl) -> Res<()> {
        let data = Bytes::from((0..BIG).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let (warm, count) = (self.s.big_warm, self.s.big);
        let cap = self.s.cap;
        let mut lat = Vec::with_capacity(count as usize);
        let t;
        match imp.raw_mode() {
            None => {
                // Owned payloads both ways (see `clusterphone::Payload`): each
                // echo is sent on as the next request, so no side copies it
                // into a frame.
                let mut data = data;
                for _ in 0..warm {
                    data = self.r.request(self.w, "big", data, T)?;
                    assert_eq!(data.len(), BIG);
                }
                let cap = Cap::new(cap);
                t = Instant::now();
                for _ in 0..count {
                    let t1 = Instant::now();
                    data = self.r.request(self.w, "big", data, T)?;
                    lat.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(data.len(), BIG);
                    if cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Big)?;
                for _ in 0..warm {
                    io.send(&data, None)?;
                    assert_eq!(io.recv::<Bytes>()?.len(), BIG);
                }
                let cap = Cap::new(cap);
                t = Instant::now();
                for _ in 0..count {
                    let t1 = Instant::now();
                    io.send(&data, None)?;
                    let back: Bytes = io.recv()?;
                    lat.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(back.len(), BIG);
                    if cap.over() {
                        break;
                    }
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let n = lat.len() as u64;
        lat.sort_unstable();
        self.fig(imp, "big_MBps", (n as usize * BIG) as f64 / secs / 1e6, n);
        self.fig(imp, "big_rtt_p50_us", percentile(&lat, 50) / 1e3, n);
        Ok(())
    }

    // (e) fd passing: a fresh fd per message, closed by the sender after sending.
    fn fd(&mut self, imp: Impl) -> Res<()> {
        let (_read_end, write_end) = pipe()?;
        let count = self.s.fd;
        let cap = Cap::new(self.s.cap);
        let mut p = payload();
        let t = Instant::now();
        let mut sent = 0u64;
        let (frames, fds) = match imp.raw_mode() {
            None => {
                while sent < count {
                    p.n = sent;
                    let mut fd = Some(write_end.try_clone()?);
                    loop {
                        match self.r.send_to(self.w, "fd", &p, fd.take()).send() {
                            Ok(()) => break,
                            Err(e) if matches!(e.error, Error::QueueFull) => {
                                fd = e.into_fd();
                                self.r.poll(Some(Duration::from_millis(1)))?;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                self.r.request::<(u64, u64), _>(self.w, "fdcount", &(), T)?
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Fd)?;
                while sent < count {
                    p.n = sent;
                    let fd = write_end.try_clone()?;
                    io.send(&p, Some(fd.as_raw_fd()))?;
                    drop(fd);
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                p.n = SENTINEL;
                io.send(&p, None)?;
                io.recv::<(u64, u64)>()?
            }
        };
        let secs = t.elapsed().as_secs_f64();
        assert_eq!((frames, fds), (sent, sent), "worker got {frames} messages and {fds} fds of {sent}");
        self.fig(imp, "fd_per_s", sent as f64 / secs, sent);
        Ok(())
    }

    // (f) master CPU per ack, `batch` outstanding at a time.
    fn ack_cpu(&mut self, imp: Impl, batch: u64, total: u64, metric: &'static str) -> Res<()> {
        let cap = Cap::new(self.s.cap);
        let mut acks = 0u64;
        let mut p = payload();
        let cpu0;
        match imp.raw_mode() {
            None => {
                let done = Rc::new(Cell::new(0u64));
                cpu0 = cpu_ns();
                loop {
                    for i in 0..batch {
                        p.n = i;
                        let d = done.clone();
                        self.r.send_to(self.w, "rtt", &p, None).within(T).ackd(
                            move |_r, res: Result<u64, AckError>| {
                                res.expect("ack");
                                d.set(d.get() + 1);
                            },
                        )?;
                    }
                    while done.get() < acks + batch {
                        self.r.poll(Some(Duration::from_millis(10)))?;
                    }
                    acks += batch;
                    if acks >= total || cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                let mut pending: HashSet<u64> = HashSet::new();
                cpu0 = cpu_ns();
                loop {
                    for i in 0..batch {
                        p.n = i;
                        pending.insert(i);
                        io.send(&p, None)?;
                    }
                    while !pending.is_empty() {
                        let got: u64 = io.recv()?;
                        assert!(pending.remove(&got), "unexpected reply {got}");
                    }
                    acks += batch;
                    if acks >= total || cap.over() {
                        break;
                    }
                }
            }
        }
        let ns = (cpu_ns() - cpu0) as f64 / acks as f64;
        self.fig(imp, metric, ns, acks);
        Ok(())
    }

    /// Allocations per operation, both processes together (counting on only here).
    fn allocs(&mut self, imp: Impl) -> Res<()> {
        let ops = self.s.alloc_ops;
        let per_op = |b: &mut Bench, what: &str, f: &mut dyn FnMut(&mut Bench) -> Res<u64>| -> Res<f64> {
            let _: (u64, i64) = b.r.request(b.w, "allocs", &true, T)?;
            count_start();
            let done = f(b)?;
            let (mine, _) = count_stop();
            let (theirs, _): (u64, i64) = b.r.request(b.w, "allocs", &false, T)?;
            let total = (mine + theirs) as f64 / done as f64;
            b.notes.push(format!(
                "{:<13} {what:<7} allocs/op: master {:.2} + worker {:.2} = {total:.2} (over {done} ops)",
                imp.name(),
                mine as f64 / done as f64,
                theirs as f64 / done as f64
            ));
            Ok(total)
        };
        let rtt = per_op(self, "rtt", &mut |b| Ok(b.rtt_samples(imp, 0, ops)?.len() as u64))?;
        self.fig(imp, "rtt_allocs_per_op", rtt, ops);
        let ow = per_op(self, "oneway", &mut |b| Ok(b.oneway_run(imp, ops * 10)?.0))?;
        self.fig(imp, "oneway_allocs_per_msg", ow, ops * 10);
        Ok(())
    }

    /// Master heap per idle connected worker, and per pending ack.
    fn memory(&mut self) -> Res<()> {
        // Idle workers: a fresh master, so nothing is pre-grown.
        let mut m = Reactor::master()?;
        let k = self.s.mem_workers;
        let cmds: Vec<Command> = (0..k).map(|_| worker_command(&self.opts, false)).collect::<Res<_>>()?;
        m.poll(Some(Duration::ZERO))?;
        count_start();
        let mut ids = Vec::new();
        for cmd in cmds {
            ids.push(m.spawn(cmd)?);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ids.iter().all(|&id| m.is_ready(id)) {
            assert!(Instant::now() < deadline, "idle workers did not come up");
            m.poll(Some(Duration::from_millis(5)))?;
        }
        // Let the hello replies go out, so only steady-state memory remains.
        m.flush(Duration::from_secs(5))?;
        let (_, heap) = count_stop();
        self.fig(Impl::Cp, "mem_per_worker_bytes", heap as f64 / k as f64, k as u64);
        m.shutdown(Duration::from_secs(2))?;
        drop(m);

        // Pending acks: a fresh master and worker; the worker holds every responder.
        let mut m = Reactor::master()?;
        let w = m.spawn(worker_command(&self.opts, false)?)?;
        let _: u64 = m.request(w, "rtt", &payload(), T)?;
        let n = self.s.mem_acks;
        let done = Rc::new(Cell::new(0u64));
        let mut p = payload();
        count_start();
        for i in 0..n {
            p.n = i;
            let d = done.clone();
            m.send_to(w, "hold", &p, None).within(T).ackd(move |_r, res: Result<u64, AckError>| {
                res.expect("held ack");
                d.set(d.get() + 1);
            })?;
        }
        m.flush(Duration::from_secs(30))?;
        let (_, heap) = count_stop();
        assert_eq!(m.pending_acks() as u64, n);
        self.fig(Impl::Cp, "mem_per_pending_ack_bytes", heap as f64 / n as f64, n);
        let released: u64 = m.request(w, "release", &(), T)?;
        assert_eq!(released, n);
        while done.get() < n {
            m.poll(Some(Duration::from_millis(10)))?;
        }
        m.shutdown(Duration::from_secs(2))?;
        Ok(())
    }
}

// ----- output --------------------------------------------------------------------------

fn fmt_value(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `impls` rotated left by `round`, so each round starts with another one.
fn rotated(impls: &[Impl], round: usize) -> Vec<Impl> {
    let mut v = impls.to_vec();
    if !v.is_empty() {
        let k = round % v.len();
        v.rotate_left(k);
    }
    v
}

/// One figure over all rounds: the median, the range, and the samples summed.
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    rounds: usize,
    n: u64,
}

fn summarize(figs: &[Fig], imp: &str, metric: &str) -> Option<Summary> {
    let mut values: Vec<f64> = figs.iter().filter(|f| f.imp == imp && f.metric == metric).map(|f| f.value).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let k = values.len();
    let median = if k % 2 == 1 { values[k / 2] } else { (values[k / 2 - 1] + values[k / 2]) / 2.0 };
    let n = figs.iter().filter(|f| f.imp == imp && f.metric == metric).map(|f| f.n).sum();
    Some(Summary { median, min: values[0], max: values[k - 1], rounds: k, n })
}

fn print_report(figs: &[Fig], notes: &[String], placement: &str) {
    let mut impls: Vec<&str> = Vec::new();
    for f in figs {
        if !impls.contains(&f.imp) {
            impls.push(f.imp);
        }
    }
    impls.sort_by_key(|i| !i.starts_with("clusterphone"));
    let ours: Vec<&str> = impls.iter().copied().filter(|i| i.starts_with("clusterphone")).collect();
    let base: Vec<&str> = impls.iter().copied().filter(|i| !i.starts_with("clusterphone")).collect();
    let get = |imp: &str, metric: &str| summarize(figs, imp, metric).map(|s| s.median);

    println!();
    println!("placement: {placement}");
    let mut header = format!("{:<26} {:<7}", "metric", "unit");
    for i in &impls {
        header += &format!(" {i:>17}");
    }
    for o in &ours {
        for b in &base {
            let short = if o.ends_with("-busy") { "cp-busy" } else { "cp" };
            header += &format!(" {:>17}", format!("{short}/{b}"));
        }
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for &(metric, unit, lower_better) in METRICS {
        if impls.iter().all(|i| get(i, metric).is_none()) {
            continue;
        }
        let mut line = format!("{:<26} {unit:<7}", format!("{metric} ({})", if lower_better { "lo" } else { "hi" }));
        for i in &impls {
            line += &format!(" {:>17}", get(i, metric).map_or("-".to_owned(), fmt_value));
        }
        for o in &ours {
            for b in &base {
                let ratio = match (get(o, metric), get(b, metric)) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
                    _ => "-".to_owned(),
                };
                line += &format!(" {ratio:>17}");
            }
        }
        println!("{line}");
    }
    println!("(lo: lower is better, hi: higher is better; values are medians over rounds; ratios are clusterphone / baseline)");
    let rounds = impls
        .iter()
        .flat_map(|i| METRICS.iter().filter_map(|m| summarize(figs, i, m.0)))
        .map(|s| s.rounds)
        .max()
        .unwrap_or(0);
    if rounds > 1 {
        println!();
        println!("range over {rounds} interleaved rounds (min..max)");
        for &(metric, _, _) in METRICS {
            let mut line = format!("{metric:<26}        ");
            let mut any = false;
            for i in &impls {
                let cell = match summarize(figs, i, metric) {
                    Some(s) if s.rounds > 1 => {
                        any = true;
                        format!("{}..{}", fmt_value(s.min), fmt_value(s.max))
                    }
                    Some(s) => fmt_value(s.median),
                    None => "-".to_owned(),
                };
                line += &format!(" {cell:>17}");
            }
            if any {
                println!("{line}");
            }
        }
    }
    for n in notes {
        println!("note: {n}");
    }
    println!();
    let fmt_json = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "null".to_owned() };
    for i in &impls {
        for &(metric, _, _) in METRICS {
            let Some(s) = summarize(figs, i, metric) else { continue };
            println!(
                "{{\"impl\": \"{i}\", \"metric\": \"{metric}\", \"value\": {}, \"unit\": \"{}\", \"n\": {}, \"placement\": \"{placement}\", \"rounds\": {}, \"min\": {}, \"max\": {}}}",
                fmt_json(s.median),
                unit_of(metric),
                s.n,
                s.rounds,
                fmt_json(s.min),
                fmt_json(s.max),
            );
        }
    }
}

// ----- the master ------------------------------------------------------------------------

fn master_main() -> Res<()> {
    let opts = Opts::parse();
    let started = Instant::now();
    let mut notes = Vec::new();
    if let Err(e) = pin_to(0) {
        notes.push(format!("could not pin the master to CPU 0: {e}"));
    }
    start_watchdog(Duration::from_secs(opts.watchdog), 3);
    let mut s = Sizes::new(opts.quick);
    if let Some(ms) = opts.cap_ms {
        s.cap = Duration::from_millis(ms);
    }
    let mut config = Config::default();
    if opts.busy {
        config.busy_poll = Some(BUSY_WINDOW);
    }
    config.writable_wakeups = wakeups_from_env();
    let mut r = Reactor::master_with(config)?;
    let busy = opts.busy;
    let w = r.spawn(worker_command(&opts, busy)?)?;
    let mut b = Bench { r, w, opts, s, figs: Vec::new(), notes };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.r.is_ready(b.w) {
        assert!(Instant::now() < deadline, "worker did not come up");
        b.r.poll(Some(Duration::from_millis(5)))?;
    }
    let placement = b.opts.placement.name();
    eprintln!(
        "ipc bench: placement {placement} (master CPU 0, worker CPU {}), {}{}; load average {}",
        b.opts.placement.worker_cpu(),
        if b.opts.quick { "quick" } else { "full" },
        if busy { ", busy-poll" } else { "" },
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );

    let rounds = b.opts.rounds;
    if busy {
        for round in 0..rounds {
            for imp in rotated(&[Impl::CpBusy, Impl::RawBusy], round) {
                eprintln!("  rtt {} (round {})", imp.name(), round + 1);
                b.rtt(imp)?;
            }
        }
    } else {
        // raw-mio-lazyw is an experiment: run only when named in --impl.
        let lazy = b.opts.impls.as_ref().is_some_and(|l| l.iter().any(|x| x == Impl::RawMioLazy.name()));
        let impls: Vec<Impl> = [Impl::Cp, Impl::RawBlocking, Impl::RawMio, Impl::RawMioLazy]
            .into_iter()
            .filter(|&i| b.opts.runs(i) && (i != Impl::RawMioLazy || lazy))
            .collect();
        type Phase = fn(&mut Bench, Impl) -> Res<()>;
        let phases: [(&str, Phase); 5] = [
            ("rtt", Bench::rtt),
            ("oneway", Bench::oneway),
            ("window", Bench::window),
            ("big", Bench::big),
            ("fd", Bench::fd),
        ];
        for (name, phase) in phases {
            if !b.opts.phase(name) {
                continue;
            }
            // Interleaved rounds, each starting with another implementation:
            // whoever runs first in a phase measurably pays for it here (the
            // vCPUs' idle state), and the machine drifts between phases.
            for round in 0..rounds {
                for imp in rotated(&impls, round) {
                    eprintln!("  {name} {} (round {})", imp.name(), round + 1);
                    let before = b.r.stats();
                    phase(&mut b, imp)?;
                    if show_stats() && imp == Impl::Cp {
                        let s = b.r.stats();
                        eprintln!(
                            "    master: {} frames written in {} calls, {} frames read",
                            s.frames_written - before.frames_written,
                            s.write_calls - before.write_calls,
                            s.frames_read - before.frames_read
                        );
                    }
                }
            }
        }
        if b.opts.phase("ack") {
            // With thousands outstanding both blocking sides would fill their
            // sockets and wait for each other forever.
            let ack_impls: Vec<Impl> = impls.iter().copied().filter(|&i| i != Impl::RawBlocking).collect();
            for round in 0..rounds {
                for imp in rotated(&ack_impls, round) {
                    eprintln!("  ack {} (round {})", imp.name(), round + 1);
                    let (small, total, big) = (b.s.ack_small, b.s.ack_small_total, b.s.ack_big);
                    b.ack_cpu(imp, small, total, "ack_cpu_ns_1k")?;
                    b.ack_cpu(imp, big, big, "ack_cpu_ns_100k")?;
                }
            }
            b.notes.push("ack_cpu: raw-blocking has no figure (blocking both ways deadlocks with 1k+ outstanding); raw-mio keeps a HashSet of outstanding ids".into());
        }
        if b.opts.phase("allocs") {
            for &imp in &impls {
                eprintln!("  allocs {}", imp.name());
                b.allocs(imp)?;
            }
        }
        if b.opts.phase("mem") && b.opts.runs(Impl::Cp) {
            eprintln!("  mem clusterphone");
            b.memory()?;
        }
    }
    b.r.shutdown(Duration::from_secs(2))?;
    let wall = started.elapsed();
    b.notes.push(format!("wall time {:.1} s", wall.as_secs_f64()));
    print_report(&b.figs, &b.notes, placement);
    Ok(())
}

fn main() {
    if std::env::var(ROLE_VAR).is_ok_and(|r| r == "worker") {
        if let Err(e) = worker_main() {
            eprintln!("worker failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = master_main() {
        eprintln!("ipc bench failed: {e}");
        std::process::exit(1);
    }
}
