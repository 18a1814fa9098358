//! The crate's only `unsafe` code: thin wrappers over the Linux system calls
//! that std and mio do not offer (SCM_RIGHTS, pidfd, timerfd, socket checks).
//!
//! Every function here returns owned, safe types; every `unsafe` block says
//! why it is sound.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// The kernel's SCM_MAX_FD: the most descriptors one `sendmsg` may carry.
pub(crate) const MAX_FDS_PER_CALL: usize = 253;

/// Control buffer for 253 fds: CMSG_SPACE(253 * 4) = 16 + 1012 rounded to 8.
/// Kept as `u64`s so it is aligned for `cmsghdr`.
const CMSG_WORDS: usize = (16 + MAX_FDS_PER_CALL * 4).div_ceil(8) + 1;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A connected AF_UNIX stream pair, both ends close-on-exec.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid, writable array of two ints, as socketpair(2) requires.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(a)?, above_stdio(b)?))
}

/// Moves an fd that landed on 0, 1 or 2 (a master that closed its stdio) to
/// 3 or above: the child's stdio setup would overwrite it, and writes meant
/// for stdout or stderr would go into the channel.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open fd we own only creates a new descriptor.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fcntl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn fcntl_flags(fd: BorrowedFd<'_>, get: libc::c_int, set: libc::c_int, bit: libc::c_int, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_GETFL on a borrowed, open fd have no memory effects.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), get) })?;
    let new = if on { flags | bit } else { flags & !bit };
    if new != flags {
        // SAFETY: as above; only the descriptor's flags change.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), set, new) })?;
    }
    Ok(())
}

pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl_flags(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC, true)
}

pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    fcntl_flags(fd, libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK, on)
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes and `len` holds `val`'s size.
    cvt(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut val as *mut libc::c_int).cast(), &mut len) })?;
    Ok(val)
}

/// Set by the first adoption: two threads attaching at once must not both own the fd.
static ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Checks that `raw` is a channel handed down from another process: an open
/// AF_UNIX stream socket whose peer (the process that created the
/// socketpair) is not this one, and with `from_parent`, is our parent. A
/// socket this process made itself, or any other fd the environment may
/// name, fails the check, so it is never adopted.
pub(crate) fn check_channel_fd(raw: RawFd, from_parent: bool) -> io::Result<()> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only queries; it fails with EBADF if `raw` is not open.
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    let domain = sockopt_int(raw, libc::SO_DOMAIN)?;
    let kind = sockopt_int(raw, libc::SO_TYPE)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "channel fd is not a Unix stream socket"));
    }
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds `cred`'s size.
    cvt(unsafe {
        libc::getsockopt(raw, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    })?;
    // SAFETY: getppid and getpid cannot fail and touch no memory.
    let (parent, me) = unsafe { (libc::getppid(), libc::getpid()) };
    if cred.pid == me || (from_parent && cred.pid != parent) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "channel fd does not lead to the parent process (a worker must be its master's direct child: spawn through a wrapper only with exec)"));
    }
    Ok(())
}

/// Whether this process has adopted its channel already.
pub(crate) fn channel_adopted() -> bool {
    ADOPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Takes ownership of the descriptor a master handed down to this process,
/// after `check_channel_fd`, once per process.
pub(crate) fn adopt_channel_fd(raw: RawFd) -> io::Result<OwnedFd> {
    check_channel_fd(raw, true)?;
    if ADOPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the channel fd was adopted already"));
    }
    // SAFETY: the fd is open and is a socket whose peer is our parent (checked
    // above): the channel inherited across exec, which nothing in this process
    // created, so nothing else owns it unless user code took it with an
    // `unsafe` from_raw_fd; ADOPTED makes this the only adoption in the process.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Arranges for `fd` to survive `exec` in the child only (the parent's copy
/// keeps close-on-exec, so a spawn on another thread can never inherit it),
/// and for the child to start with a clean signal state, as libuv does: no
/// blocked signals, every disposition the default (a master that blocks
/// SIGTERM for a signalfd, or ignores SIGCHLD, must not pass that on).
pub(crate) fn inherit_in_child(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs between fork and exec and calls only fcntl,
    // sigemptyset, sigprocmask and sigaction, which are async-signal-safe; it
    // writes only to its own stack.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut set: libc::sigset_t = mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut dfl: libc::sigaction = mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            for sig in 1..NSIG {
                // SIGKILL, SIGSTOP and the C library's own signals refuse; that is fine.
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
            Ok(())
        });
    }
}

/// One past the highest signal number on Linux.
const NSIG: libc::c_int = 65;

/// Sends `signal` through a pidfd: it reaches the process the pidfd was
/// opened for, or nobody (ESRCH) once that one is gone, never a process that
/// reused its pid.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: the syscall takes an fd we borrow, a signal number, a null
    // siginfo pointer (allowed) and zero flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes waiting in a socket's receive queue (SIOCINQ).
pub(crate) fn bytes_readable(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int through the pointer, which is
    // valid for writes; the fd is borrowed for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}

/// `pidfd_open(2)`: an fd that becomes readable when process `pid` exits.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = ret as RawFd;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(std::os::fd::AsFd::as_fd(&owned))?;
    Ok(owned)
}

/// Sends `bufs` in one `sendmsg` with `fds` attached as SCM_RIGHTS.
///
/// Always non-blocking and with MSG_NOSIGNAL, so a closed peer is EPIPE, never
/// a SIGPIPE. If any byte is written, the kernel has taken every fd.
pub(crate) fn send_with_fds(sock: RawFd, bufs: &[IoSlice<'_>], fds: &[RawFd]) -> io::Result<usize> {
    debug_assert!(fds.len() <= MAX_FDS_PER_CALL);
    // Left uninitialised: only the prefix a call uses is zeroed (most sends carry no fd).
    let mut cmsg = mem::MaybeUninit::<[u64; CMSG_WORDS]>::uninit();
    // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec; // IoSlice is ABI-compatible with iovec.
    msg.msg_iovlen = bufs.len() as _;
    if !fds.is_empty() {
        let data_len = mem::size_of_val(fds) as libc::c_uint;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        assert!(space <= mem::size_of_val(&cmsg));
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` aligned bytes we own (checked
        // above); we zero them first, so CMSG_FIRSTHDR is non-null and the
        // header plus `data_len` bytes fit in it.
        unsafe {
            std::ptr::write_bytes(cmsg.as_mut_ptr().cast::<u8>(), 0, space);
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(hdr).cast::<RawFd>(), fds.len());
        }
    }
    // SAFETY: msg points at live iovecs and a control buffer for the whole call.
    cvt_size(unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// What one `recvmsg` brought.
pub(crate) struct Received {
    pub bytes: usize,
    /// The kernel dropped control data (MSG_CTRUNC): fds were lost.
    pub truncated: bool,
}

/// Receives into `buf`, appending any fds (close-on-exec) to `fds` in order.
/// At most `max_fds` fds are taken: the kernel closes any beyond them and
/// reports `truncated`.
pub(crate) fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<Received> {
    // The kernel fills it; we read only the headers within the msg_controllen it reports.
    let mut cmsg = mem::MaybeUninit::<[u64; CMSG_WORDS]>::uninit();
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid; we fill in the buffers below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // CMSG_LEN, not CMSG_SPACE: the kernel fits as many fds as the length
    // allows, and the padding of CMSG_SPACE could hold one more.
    let max_fds = max_fds.min(MAX_FDS_PER_CALL) as libc::c_uint;
    // SAFETY: CMSG_LEN is a pure size computation.
    let control = unsafe { libc::CMSG_LEN(max_fds * mem::size_of::<RawFd>() as libc::c_uint) } as usize;
    debug_assert!(control <= mem::size_of_val(&cmsg));
    msg.msg_controllen = control as _;
    // SAFETY: iov covers `buf`, which we borrow mutably; the control buffer is
    // ours and at least `control` bytes long.
    let n = cvt_size(unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) })?;
    // SAFETY: after a successful recvmsg the kernel has written well-formed
    // cmsg headers within msg_controllen (which it set to what it wrote);
    // CMSG_FIRSTHDR/CMSG_NXTHDR read only inside that initialised range.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(hdr);
                let payload = ((*hdr).cmsg_len as usize).saturating_sub(data as usize - hdr as usize);
                let count = payload / mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel installed this fd for us: we are its only owner.
                    fds.push_back(OwnedFd::from_raw_fd(raw));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    Ok(Received { bytes: n, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

/// A non-blocking, close-on-exec CLOCK_MONOTONIC timerfd, disarmed.
pub(crate) fn timer_fd() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers; constant flags.
    let fd = cvt(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) })?;
    // SAFETY: timerfd_create succeeded, so `fd` is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms a timerfd to expire once, `delay` from now (at least 1 ns: zero would
/// disarm it), or disarms it with `None` (dropping an expiry not yet read).
pub(crate) fn set_timer(fd: BorrowedFd<'_>, delay: Option<Duration>) -> io::Result<()> {
    // SAFETY: itimerspec is plain integers (plus padding on some targets), so
    // all-zero is valid; it means "disarmed".
    let mut spec: libc::itimerspec = unsafe { mem::zeroed() };
    if let Some(delay) = delay {
        let delay = delay.max(Duration::from_nanos(1));
        spec.it_value.tv_sec = libc::time_t::try_from(delay.as_secs()).unwrap_or(libc::time_t::MAX);
        // Below 10^9: fits whatever width tv_nsec has on this target.
        spec.it_value.tv_nsec = delay.subsec_nanos() as _;
    }
    // SAFETY: `fd` is a live timerfd (borrowed for the call), `spec` is a valid
    // itimerspec, and a null old-value pointer is allowed.
    cvt(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
    Ok(())
}

/// Consumes a timerfd's expirations, so that the next one raises a new edge.
pub(crate) fn clear_timer(fd: BorrowedFd<'_>) {
    let mut count = [0u8; 8];
    // SAFETY: reads at most 8 bytes into an 8-byte local buffer from a live fd.
    // EAGAIN (nothing expired) is fine to ignore.
    let _ = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
}

/// Seals that make a memfd's bytes immutable and its size final.
const SEALS_FROZEN: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
/// Seals a receiver requires: no writer left (no writable mapping can exist
/// or be made) and no shrinking (no SIGBUS on a mapped page).
const SEALS_REQUIRED: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE;

/// A shared mapping, unmapped when dropped. Private to this module: only the
/// two owners below make one, each of which guarantees that the bytes
/// behind it change only through it and never vanish.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this value, tied to no thread.
unsafe impl Send for Mapping {}
// SAFETY: shared access only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping { ptr: std::ptr::NonNull::dangling(), len });
        }
        // The writer shares its pages with the memfd. A reader maps a sealed
        // memfd privately: nothing can change its pages (F_SEAL_WRITE), a
        // read-only private mapping never copies them, and kernels before 6.7
        // refuse a shared mapping of a write-sealed memfd even read-only.
        let (prot, share) = if writable {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        } else {
            (libc::PROT_READ, libc::MAP_PRIVATE)
        };
        // SAFETY: a fresh mapping placed by the kernel (null hint), of an fd
        // borrowed for the call; the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, share | libc::MAP_POPULATE, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        if writable {
            // A child forked meanwhile (any spawn, on any thread) must not
            // inherit the writable mapping: it would keep `seal` from working.
            // SAFETY: advice on exactly the region just mapped; no memory is touched.
            unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTFORK) };
        }
        Ok(Mapping { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes while `self` lives (or is
        // dangling with len 0), which its owner keeps unchanging behind a
        // shared borrow and never truncated.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the region `new` mapped; no slice outlives
            // `self`, since they all borrow it.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// A new memfd and a writable mapping of it. The fd never leaves this value
/// while the mapping exists (`seal` unmaps first), so nothing else writes the
/// bytes the mutable slice covers.
pub(crate) struct MemfdWriter {
    fd: OwnedFd,
    map: Mapping,
}

impl MemfdWriter {
    pub(crate) fn new(len: usize) -> io::Result<MemfdWriter> {
        let name = c"clusterphone";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are constants.
        let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: ftruncate on an fd we own; no memory is touched.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
        let map = Mapping::new(fd.as_fd(), len, true)?;
        Ok(MemfdWriter { fd, map })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is writable, covers `len` bytes while `self`
        // lives, is borrowed exclusively here, and nothing else can write the
        // memfd (its fd has not left this value).
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Unmaps, then seals the memfd against every change; returns it.
    pub(crate) fn seal(self) -> io::Result<OwnedFd> {
        let MemfdWriter { fd, map } = self;
        // A writable mapping would make F_SEAL_WRITE fail (EBUSY).
        drop(map);
        // SAFETY: F_ADD_SEALS takes an int; no memory is touched.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS_FROZEN) })?;
        Ok(fd)
    }
}

/// A read-only mapping of a memfd sealed against writes and shrinking: its
/// bytes can no longer change, and no page can vanish under a reader.
pub(crate) struct SealedMap {
    map: Mapping,
}

impl SealedMap {
    /// Maps `fd` whole after checking that it is a memfd with the seals
    /// above, of at most `max_len` bytes. Fails with EPERM for an fd without
    /// those seals, EINVAL for a file that cannot be sealed, EFBIG when too large.
    pub(crate) fn new(fd: BorrowedFd<'_>, max_len: usize) -> io::Result<SealedMap> {
        // SAFETY: F_GET_SEALS only queries (EINVAL for a file that is not sealable).
        let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
        if seals & SEALS_REQUIRED != SEALS_REQUIRED {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { mem::zeroed() };
        // SAFETY: `st` is valid for writes; the fd is borrowed for the call.
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        let len = usize::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len > max_len {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        // Sealed against shrinking: `len` bytes stay backed for the mapping's life.
        Ok(SealedMap { map: Mapping::new(fd, len, false)? })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }
}
