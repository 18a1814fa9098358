//! A counting global allocator: live heap bytes, their high-water mark, and
//! the largest single allocation. Every call goes to the system allocator
//! unchanged. A test binary that measures its heap installs it with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: util::alloc::Counting = util::alloc::Counting;
//! ```
//!
//! The figures are process-wide: a test that reads them must not run beside
//! tests that allocate (see [`super::alone`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// The counting allocator.
pub struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// Counts a change of `by` bytes in the live heap, for an allocation of
/// `size` bytes (0 for a release).
fn count(by: isize, size: usize) {
    let now = HEAP.fetch_add(by, Ordering::Relaxed) + by;
    if by > 0 {
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize, layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize, layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize), 0);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize, new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes of this process.
pub fn heap() -> isize {
    HEAP.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at the current heap, and returns the heap.
pub fn reset_peak() -> isize {
    let now = heap();
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The heap's high-water mark since the last [`reset_peak`].
pub fn peak() -> isize {
    PEAK.load(Ordering::Relaxed)
}

/// The largest single allocation (or reallocation) this process ever made:
/// memory reserved for what a peer announced shows here even if it is never
/// touched (the resident size would not show it).
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}
