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
    /// Bytes that may wait in one connection's write queue (default 64 MiB).
    pub max_queue_bytes: usize,
    /// fds that may wait in one connection's write queue (default 1024).
    pub max_queue_fds: usize,
    /// Received fds that may wait for their frame on one connection (default
    /// 256: a well-behaved peer never has more than 64 ahead of their frames).
    pub max_received_fds: usize,
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
            max_received_fds: 256,
            frames_per_poll: 1024,
            hangup_grace: Duration::from_millis(50),
            exit_polling: false,
            writable_wakeups: WritableWakeups::AfterWritesOf(16 * 1024),
            busy_poll: None,
        }
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
}
