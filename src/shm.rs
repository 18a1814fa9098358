//! Big payloads in shared memory: a sealed memfd travels as a message's fd
//! and is mapped read-only by the receiver, so the bytes never go through
//! the socket.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::error::Error;
use crate::sys::{MemfdWriter, SealedMap};

/// Bytes being written into new shared memory, from [`SharedMemoryMut::new`].
/// Nobody else can see them until [`freeze`](SharedMemoryMut::freeze).
///
/// ```
/// use clusterphone::SharedMemoryMut;
/// let mut buf = SharedMemoryMut::new(4)?;
/// buf.copy_from_slice(b"data");
/// let frozen = buf.freeze()?;
/// assert_eq!(&frozen[..], b"data");
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct SharedMemoryMut {
    writer: MemfdWriter,
}

impl SharedMemoryMut {
    /// `len` zeroed bytes of new shared memory (a memfd, mapped writable).
    ///
    /// # Errors
    /// [`Error::Io`] if the memfd cannot be made or mapped.
    pub fn new(len: usize) -> Result<SharedMemoryMut, Error> {
        Ok(SharedMemoryMut { writer: MemfdWriter::new(len)? })
    }

    /// Seals the memory against every change (writes, growing, shrinking,
    /// further seals) and maps it read-only: from now on it can be sent.
    ///
    /// # Errors
    /// [`Error::Io`] if sealing or mapping fails.
    pub fn freeze(self) -> Result<SharedMemory, Error> {
        let fd = self.writer.seal()?;
        let map = SealedMap::new(fd.as_fd(), usize::MAX)?;
        Ok(SharedMemory { fd, map })
    }
}

impl Deref for SharedMemoryMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.writer.as_slice()
    }
}

impl DerefMut for SharedMemoryMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.writer.as_mut_slice()
    }
}

impl fmt::Debug for SharedMemoryMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemoryMut").field("len", &self.len()).finish()
    }
}

/// Immutable bytes in shared memory: a memfd sealed against every change,
/// mapped read-only. Send it as a message's fd ([`to_fd`](SharedMemory::to_fd));
/// the receiver maps the same pages with [`from_fd`](SharedMemory::from_fd):
/// no copy through the socket, whatever the size.
///
/// ```
/// use clusterphone::{Message, Reactor, SharedMemory};
///
/// let (mut master, worker, end) = Reactor::pair()?;
/// let thread = std::thread::spawn(move || -> Result<usize, clusterphone::Error> {
///     let mut reactor = end.attach()?;
///     reactor.on("image", |_r, mut msg: Message<u32>| {
///         // Checked: a memfd sealed against writes and shrinking, at most 64 MiB.
///         let image = SharedMemory::from_fd(msg.fd.take().expect("an fd"), 64 << 20).expect("sealed");
///         let _ = msg.reply.ok(&image.iter().map(|&b| b as u64).sum::<u64>());
///     })?;
///     reactor.run(std::time::Duration::from_secs(1))?;
///     Ok(0)
/// });
/// // An fd goes only to a worker that said hello.
/// while !master.is_ready(worker) {
///     master.poll(Some(std::time::Duration::from_millis(10)))?;
/// }
/// let image = SharedMemory::copy_from(&vec![1u8; 1 << 20])?;
/// let sum: u64 = master
///     .send_to(worker, "image", &7u32, Some(image.to_fd()?))
///     .within(std::time::Duration::from_secs(5))
///     .wait()?;
/// assert_eq!(sum, 1 << 20);
/// master.shutdown(std::time::Duration::from_secs(1))?;
/// thread.join().unwrap()?;
/// # Ok::<(), clusterphone::Error>(())
/// ```
pub struct SharedMemory {
    fd: OwnedFd,
    map: SealedMap,
}

impl SharedMemory {
    /// New shared memory holding a copy of `bytes`.
    ///
    /// # Errors
    /// [`Error::Io`] if the memfd cannot be made, mapped or sealed.
    pub fn copy_from(bytes: &[u8]) -> Result<SharedMemory, Error> {
        let mut buf = SharedMemoryMut::new(bytes.len())?;
        buf.copy_from_slice(bytes);
        buf.freeze()
    }

    /// Maps shared memory received as an fd, after checking that it is a
    /// memfd sealed against writes and shrinking (so its bytes can no longer
    /// change, and no page can vanish under the reader) of at most `max_len`
    /// bytes. Any other fd is refused, and closed.
    ///
    /// # Errors
    /// [`Error::BadSharedMemory`] for an fd that is not such a memfd, or is
    /// larger than `max_len`; [`Error::Io`] if mapping fails.
    pub fn from_fd(fd: OwnedFd, max_len: usize) -> Result<SharedMemory, Error> {
        let map = SealedMap::new(fd.as_fd(), max_len).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => Error::BadSharedMemory("not sealed against writes and shrinking"),
            Some(libc::EINVAL) => Error::BadSharedMemory("not a memfd"),
            Some(libc::EFBIG) => Error::BadSharedMemory("larger than the limit"),
            _ => Error::Io(e),
        })?;
        Ok(SharedMemory { fd, map })
    }

    /// A new fd for the same memory, to send with a message (the reactor
    /// closes it once sent); this value stays usable.
    ///
    /// # Errors
    /// [`Error::Io`] if the fd cannot be duplicated.
    pub fn to_fd(&self) -> Result<OwnedFd, Error> {
        Ok(self.fd.try_clone()?)
    }

    /// The memfd, unmapping this view.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl Deref for SharedMemory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_slice()
    }
}

impl AsFd for SharedMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory").field("len", &self.len()).finish()
    }
}
