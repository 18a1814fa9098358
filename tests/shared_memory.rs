//! Shared-memory payloads: sealing, refusals, size limit, fd hygiene, and
//! real workers mapping what the master sends (one of them dying with the
//! mapping open).

mod util;

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Reactor, SharedMemory, SharedMemoryMut};
use util::{alone, deadline, poll_until, serve, shared, spawn_ready, LIMIT};

const BIG: usize = 16 << 20;

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |acc, (i, &b)| acc.wrapping_mul(31).wrapping_add(b as u64 ^ i as u64))
}

/// Maps what comes in `sum` (at most 32 MiB) and answers its checksum.
fn sum_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.on("sum", |_r, mut m: Message<()>| {
        let fd = m.fd.take().expect("an fd");
        match SharedMemory::from_fd(fd, 32 << 20) {
            Ok(shm) => {
                let _ = m.reply.ok(&(shm.len() as u64, checksum(&shm)));
            }
            Err(e) => m.reply.err(e),
        }
    })
    .unwrap();
    serve(&mut r);
}

/// Maps what comes in `hold`, keeps the mapping, answers, and waits to be killed.
fn hold_worker() {
    let mut r = Reactor::attach().expect("attach");
    let kept: Rc<RefCell<Vec<SharedMemory>>> = Rc::default();
    let k = kept.clone();
    r.on("hold", move |_r, mut m: Message<()>| {
        let shm = SharedMemory::from_fd(m.fd.take().expect("an fd"), usize::MAX).expect("sealed");
        let _ = m.reply.ok(&shm[0]);
        k.borrow_mut().push(shm);
    })
    .unwrap();
    serve(&mut r);
}

fn pattern(len: usize) -> SharedMemory {
    let mut buf = SharedMemoryMut::new(len).unwrap();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    buf.freeze().unwrap()
}

#[test]
fn frozen_memory_cannot_be_changed_by_its_sender() {
    let _lock = shared();
    let shm = pattern(1 << 20);
    let fd = shm.as_fd().as_raw_fd();
    // SAFETY: plain system calls on an fd borrowed from `shm`; the buffers are ours.
    unsafe {
        let byte = [0u8; 1];
        assert_eq!(libc::pwrite(fd, byte.as_ptr().cast(), 1, 0), -1, "write through the fd");
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        let p = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert_eq!(p, libc::MAP_FAILED, "a writable shared mapping");
        assert_eq!(libc::ftruncate(fd, 10), -1, "shrinking");
        assert_eq!(libc::ftruncate(fd, 2 << 20), -1, "growing");
        assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, 0), -1, "the seals are sealed too");
    }
    assert_eq!(shm[12345], (12345 % 251) as u8);
}

#[test]
fn only_a_sealed_memfd_within_the_limit_is_mapped() {
    let _fds = alone();
    let base = util::open_fds();
    // Not a memfd at all.
    let file = OwnedFd::from(File::open("/dev/null").unwrap());
    assert!(matches!(SharedMemory::from_fd(file, 1 << 20), Err(Error::BadSharedMemory(_))));
    // A memfd that its sender could still write.
    // SAFETY: memfd_create with a valid name; the fd is fresh and ours.
    let unsealed = unsafe {
        let fd = libc::memfd_create(c"open".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, 4096), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let e = SharedMemory::from_fd(unsealed, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::BadSharedMemory(why) if why.contains("sealed")), "{e:?}");
    // Sealed, but larger than the receiver takes.
    let shm = pattern(1 << 20);
    let e = SharedMemory::from_fd(shm.to_fd().unwrap(), (1 << 20) - 1).unwrap_err();
    assert!(matches!(e, Error::BadSharedMemory(why) if why.contains("limit")), "{e:?}");
    let ok = SharedMemory::from_fd(shm.to_fd().unwrap(), 1 << 20).unwrap();
    assert_eq!(&ok[..], &shm[..]);
    drop((ok, shm));
    assert_eq!(util::open_fds(), base, "every refused fd was closed");
    // Empty memory is fine.
    assert_eq!(SharedMemory::copy_from(&[]).unwrap().len(), 0);
}

#[test]
fn a_worker_maps_what_the_master_sends_without_leaking_fds() {
    util::child("sum", sum_worker);
    let _fds = alone();
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "sum");
    let base = util::open_fds();
    let shm = pattern(BIG);
    let want = (BIG as u64, checksum(&shm));
    for _ in 0..3 {
        let got: (u64, u64) = r.send_to(w, "sum", &(), Some(shm.to_fd().unwrap())).within(LIMIT).wait().unwrap();
        assert_eq!(got, want);
    }
    // Over the worker's limit: refused there, with an error reply.
    let huge = SharedMemoryMut::new(33 << 20).unwrap().freeze().unwrap();
    let e = r.send_to(w, "sum", &(), Some(huge.to_fd().unwrap())).within(LIMIT).wait::<(u64, u64)>().unwrap_err();
    assert!(matches!(e, Error::Ack(AckError::Remote(ref why)) if why.contains("limit")), "{e:?}");
    drop((shm, huge));
    assert_eq!(util::open_fds(), base, "the master keeps no fd of what it sent");
    r.shutdown(LIMIT).unwrap();
}

#[test]
fn a_receiver_that_dies_holding_a_mapping_leaves_the_sender_unharmed() {
    util::child("hold", hold_worker);
    let _lock = shared();
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let w = spawn_ready(&mut r, "hold");
    let shm = pattern(BIG);
    let first: u8 = r.send_to(w, "hold", &(), Some(shm.to_fd().unwrap())).within(LIMIT).wait().unwrap();
    assert_eq!(first, 0);
    r.kill(w).unwrap();
    poll_until(&mut r, LIMIT, |r| r.workers().is_empty());
    // The memory is the sender's as before: readable, unchanged, and sendable again.
    assert_eq!(checksum(&shm), checksum(&pattern(BIG)));
    let again = SharedMemory::from_fd(shm.to_fd().unwrap(), BIG).unwrap();
    assert_eq!(again[BIG - 1], ((BIG - 1) % 251) as u8);
}
