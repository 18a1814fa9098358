//! What the master and the worker agree on beyond clusterphone itself: the
//! payload of the small-message workloads and the raw jobs.

use serde::{Deserialize, Serialize};

/// `max_frame` on both sides: room for the 16 MiB round trip through the socket.
pub(crate) const HUGE_FRAME: usize = 32 << 20;

/// `n` of the raw frame that ends a one-way or fd run ("tell me your count").
pub(crate) const SENTINEL: u64 = u64::MAX;

/// The message payload of every small-message workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Payload {
    pub(crate) key: String,
    pub(crate) n: u64,
}

pub(crate) fn payload() -> Payload {
    Payload { key: "value".to_owned(), n: 0 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mode {
    Blocking,
    Mio,
    /// Mio, but interested in WRITABLE only while a write is pending (experiment).
    MioLazy,
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Work {
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
pub(crate) struct Job {
    pub(crate) mode: Mode,
    pub(crate) work: Work,
}
