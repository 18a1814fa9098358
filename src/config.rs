//! Reactor settings and counters.

use std::time::Duration;

/// Reactor settings. Start from `Config::default()` and change what you need.
///
/// ```
/// use std::time::Duration;
/// let mut config = clusterphone::Config::default();
/// config.ack_timeout = Duration::from_secs(2);
/// config.max_frame = 1 << 20;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Ack timeout for messages that set none (default 10 s, as in the Node original).
    pub ack_timeout: Duration,
    /// Largest frame sent or accepted, header included (default 16 MiB).
    pub max_frame: usize,
    /// Memory one connection's write queue may hold (default 64 MiB). Each
    /// queued frame is charged what it really holds: its buffers' capacity
    /// plus [`QUEUE_FRAME_OVERHEAD`]. A send that would take the queue past
    /// the limit is refused with [`Error::QueueFull`](crate::Error::QueueFull).
    /// Replies and the library's own acks are never refused: while its queue
    /// to a worker is over the limit, a master stops reading from that worker
    /// until it drains, so a worker that sends requests and never reads its
    /// replies blocks on its own writes. (A worker always reads its master,
    /// so two peers flooding each other with requests never both stop.)
    pub max_queue_bytes: usize,
    /// fds that may wait in one connection's write queue (default 1024).
    pub max_queue_fds: usize,
    /// Received fds that may wait for their frame on one connection (default
    /// 8). A peer of this library sends one fd per write, so it never has
    /// more than 2 ahead of their frames; beyond the limit the peer is
    /// disconnected ([`ProtocolError::TooManyFdsInFlight`](crate::ProtocolError::TooManyFdsInFlight)).
    pub max_received_fds: usize,
    /// Received fds that may wait for their frames on all connections
    /// together (default 128). Once it is reached, connections that park fds
    /// (hold more than 2, more than a peer of this library ever does, or any
    /// for over a second with no bytes arriving and reading not paused by
    /// us) are closed, the one holding the most first, so they cannot fill the
    /// process's fd table. Fds in transit on well-behaved connections (at
    /// most 2 each) never close one.
    pub max_received_fds_total: usize,
    /// Namespaces a peer may announce (default 64); a namespace name is at
    /// most [`MAX_NAMESPACE_LEN`] bytes. A peer announcing more is
    /// disconnected ([`ProtocolError::TooManyNamespaces`](crate::ProtocolError::TooManyNamespaces)),
    /// and a worker that registers more is refused locally.
    pub max_namespaces: usize,
    /// Frames dispatched per connection per `poll` before yielding (default 1024).
    pub frames_per_poll: usize,
    /// After a worker's channel hangs up, how long to wait for its exit status
    /// before reporting a plain disconnection (default 50 ms).
    pub hangup_grace: Duration,
    /// Find worker exits by checking `waitpid` every 20 ms instead of through
    /// a pidfd (default off). It is the automatic fallback where
    /// `pidfd_open` is missing (Linux before 5.3, or blocked by a sandbox).
    pub exit_polling: bool,
    /// When to keep a socket registered for writable edges beyond the times a
    /// write waits for room (default: after writes of 16 KiB or more). See
    /// [`WritableWakeups`].
    pub writable_wakeups: WritableWakeups,
    /// Spin on zero-timeout polls for this long before sleeping (default off).
    /// Cuts wake-up latency at the price of a busy CPU while waiting.
    pub busy_poll: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ack_timeout: Duration::from_secs(10),
            max_frame: 16 << 20,
            max_queue_bytes: 64 << 20,
            max_queue_fds: 1024,
            max_received_fds: 8,
            max_received_fds_total: 128,
            max_namespaces: 64,
            frames_per_poll: 1024,
            hangup_grace: Duration::from_millis(50),
            exit_polling: false,
            writable_wakeups: WritableWakeups::AfterWritesOf(16 * 1024),
            busy_poll: None,
        }
    }
}

/// Longest namespace name, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 255;

/// Heap a queued frame holds besides its buffers (its queue entry, its ack
/// record and timer slot if it asked for one): what
/// [`Config::max_queue_bytes`] charges each frame on top of its bytes.
pub const QUEUE_FRAME_OVERHEAD: usize = 128;

/// Longest timeout a setting or a message may have; anything longer is surely a unit mistake.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Smallest `max_frame`: a hello with a few namespaces must fit.
const MIN_FRAME: usize = 1024;

impl Config {
    /// Checks every setting: the reactor constructors refuse a config that
    /// fails this with [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// let mut config = clusterphone::Config::default();
    /// config.ack_timeout = std::time::Duration::ZERO;
    /// assert!(config.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig), naming the first setting out of range.
    pub fn validate(&self) -> Result<(), crate::error::Error> {
        use crate::error::Error::InvalidConfig;
        if self.ack_timeout.is_zero() || self.ack_timeout > MAX_TIMEOUT {
            return Err(InvalidConfig("ack_timeout must be above zero and at most a day"));
        }
        if self.max_frame < MIN_FRAME || self.max_frame > u32::MAX as usize {
            return Err(InvalidConfig("max_frame must be between 1 KiB and 4 GiB"));
        }
        if self.max_queue_bytes < self.max_frame.min(64 << 10) {
            return Err(InvalidConfig("max_queue_bytes must hold a frame of max_frame bytes, or 64 KiB"));
        }
        if self.max_queue_fds == 0 {
            return Err(InvalidConfig("max_queue_fds must be at least 1"));
        }
        if self.max_received_fds > self.max_received_fds_total {
            return Err(InvalidConfig("max_received_fds must not exceed max_received_fds_total"));
        }
        if self.max_received_fds_total > 1 << 16 {
            return Err(InvalidConfig("max_received_fds_total must be at most 65536"));
        }
        if self.max_namespaces > 1 << 16 {
            return Err(InvalidConfig("max_namespaces must be at most 65536"));
        }
        if self.frames_per_poll == 0 {
            return Err(InvalidConfig("frames_per_poll must be at least 1"));
        }
        if self.hangup_grace > MAX_TIMEOUT {
            return Err(InvalidConfig("hangup_grace must be at most a day"));
        }
        if self.busy_poll.is_some_and(|b| b > Duration::from_secs(1)) {
            return Err(InvalidConfig("busy_poll must be at most a second"));
        }
        Ok(())
    }
}

/// When a reactor asks to be woken by writable edges it does not need.
///
/// A registered writable edge wakes `poll` each time the peer drains our
/// socket, for nothing. On a virtual machine that wake-up is not wasted when
/// the two processes run on different CPUs: it arrives while the peer is still
/// working on its answer and warms this process's idle vCPU, whose wake-up
/// otherwise costs ~40 µs. Measured here (2-vCPU VM): a 64 KiB echo across
/// CPUs runs nearly twice as fast with it, while a small round trip on one CPU
/// is ~35% slower (a context switch per message). The default takes the first
/// and avoids the second.
///
/// ```
/// use clusterphone::{Config, WritableWakeups};
/// let mut config = Config::default();
/// config.writable_wakeups = WritableWakeups::Never; // bare metal, or one CPU
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritableWakeups {
    /// Only while a write waits for room in the socket.
    Never,
    /// From a write call of at least this many bytes until a smaller one
    /// (default: 16 KiB): large payloads get the wake-ups, small messages do not.
    AfterWritesOf(usize),
    /// Always.
    Always,
}

/// One connection's figures, from [`Reactor::worker_stats`](crate::Reactor::worker_stats)
/// (or [`Reactor::master_stats`](crate::Reactor::master_stats) on a worker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Acked messages sent on it still waiting for their outcome.
    pub pending_acks: usize,
    /// Frames waiting in its write queue.
    pub queued_frames: usize,
    /// Bytes of those frames.
    pub queued_bytes: usize,
    /// Frames written to it.
    pub frames_sent: u64,
    /// Bytes written to it.
    pub bytes_sent: u64,
    /// Frames read from it.
    pub frames_received: u64,
    /// Bytes read from it.
    pub bytes_received: u64,
    /// Reading from it is paused: its queue is over `max_queue_bytes`.
    pub read_paused: bool,
}

/// Counters kept by a reactor, for tests and monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Frames fully written to sockets.
    pub frames_written: u64,
    /// Successful `sendmsg` calls (frames are coalesced, so usually fewer than frames).
    pub write_calls: u64,
    /// Frames decoded from sockets.
    pub frames_read: u64,
    /// User messages queued for sending.
    pub messages_sent: u64,
    /// User messages received.
    pub messages_received: u64,
    /// Ack frames (replies and failures) queued for sending.
    pub acks_sent: u64,
    /// Ack frames received.
    pub acks_received: u64,
    /// Acks that arrived after their message had timed out or settled.
    pub late_acks: u64,
    /// Messages with no handler, unknown namespace, or undecodable payload.
    pub unhandled: u64,
    /// Writes put off because too many of our fds were in flight (ETOOMANYREFS).
    pub fd_backpressure: u64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: u64,
    /// Bytes written to sockets.
    pub bytes_written: u64,
    /// Bytes read from sockets.
    pub bytes_read: u64,
    /// Writable edges that found nothing to write: the wake-ups asked for by
    /// [`Config::writable_wakeups`].
    pub idle_writable_events: u64,
    /// Times reading from a peer was paused because our queue to it was over
    /// [`Config::max_queue_bytes`] (it sends faster than it reads our replies).
    pub read_pauses: u64,
    /// Sends queued by other threads ([`Remote`](crate::Remote)) that the
    /// reactor refused when it ran them (worker gone, queue full); their fds
    /// were closed.
    pub remote_refused: u64,
}
