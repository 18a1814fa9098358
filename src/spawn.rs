//! Starting workers (master side) and attaching to the master (worker side).
//!
//! The master creates an AF_UNIX stream socketpair, keeps one end, and lets
//! the child inherit the other; the child finds its fd number in the
//! `CLUSTERPHONE_FD` environment variable, as Node's children find
//! `NODE_CHANNEL_FD`.

use std::env;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};

use mio::net::UnixStream;

use crate::codec::Decoder;
use crate::config::Config;
use crate::conn::Conn;
use crate::error::Error;
use crate::id::WorkerId;
use crate::reactor::Reactor;
use crate::reactor::{hello_frame_limit, reap_now, Link, Role};
use crate::sys;

/// Environment variable carrying the channel's fd number to a worker.
pub const ENV_FD: &str = "CLUSTERPHONE_FD";
/// Environment variable carrying the worker's id.
pub const ENV_ID: &str = "CLUSTERPHONE_WORKER_ID";

/// Whether this process was spawned by a clusterphone master (and has not attached yet):
/// the environment names a channel fd, and that fd is a Unix socket that
/// another process made. (The variables stay in the environment, which this
/// crate never modifies; processes a worker spawns see them, but not the
/// channel, which is close-on-exec, so they are not workers.) A worker
/// started through a wrapper that does not `exec` (a shell, `timeout`) is a
/// worker here, and [`Reactor::attach`] tells it why it cannot attach.
///
/// ```
/// if clusterphone::is_worker() {
///     // run the worker role
/// }
/// ```
pub fn is_worker() -> bool {
    !sys::channel_adopted() && channel_fd().is_ok_and(|fd| sys::check_channel_fd(fd, false).is_ok())
}

/// The channel fd number named by the environment.
fn channel_fd() -> Result<RawFd, Error> {
    let value = env::var(ENV_FD).map_err(|_| Error::NotAWorker(format!("{ENV_FD} is not set")))?;
    value.trim().parse().map_err(|_| Error::NotAWorker(format!("{ENV_FD}={value:?} is not a number")))
}

/// The worker end of [`Reactor::pair`]: attach it, on any thread.
#[derive(Debug)]
pub struct PairedWorker {
    fd: OwnedFd,
    id: WorkerId,
}

impl PairedWorker {
    /// The worker's reactor, with default settings.
    ///
    /// # Errors
    /// [`Error::Io`] if the reactor cannot be made.
    ///
    /// # Errors
    /// As [`attach_with`](Reactor::attach_with).
    pub fn attach(self) -> Result<Reactor, Error> {
        self.attach_with(Config::default())
    }

    /// The worker's reactor.
    ///
    /// # Errors
    /// [`Error::Io`] if the reactor cannot be made, [`Error::InvalidConfig`] for a bad `config`.
    pub fn attach_with(self, config: Config) -> Result<Reactor, Error> {
        Reactor::worker_on(self.fd, Some(self.id), config)
    }
}

/// The pipes of a worker spawned with piped stdio, from [`Reactor::spawn_piped`].
/// Read them (or close them): a worker blocks once a pipe it writes to is full.
#[derive(Debug)]
#[non_exhaustive]
pub struct WorkerPipes {
    /// The worker's stdin, if piped.
    pub stdin: Option<ChildStdin>,
    /// The worker's stdout, if piped.
    pub stdout: Option<ChildStdout>,
    /// The worker's stderr, if piped.
    pub stderr: Option<ChildStderr>,
}

fn new_conn(stream: UnixStream, max_frame: usize, config: &Config) -> Conn {
    Conn::new(stream, Decoder::new(max_frame, config.max_received_fds))
}

impl Reactor {
    /// A reactor for the master role, with default settings.
    ///
    /// # Errors
    /// [`Error::Io`] if the epoll instance cannot be made.
    pub fn master() -> Result<Reactor, Error> {
        Self::master_with(Config::default())
    }

    /// A reactor for the master role.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let mut config = clusterphone::Config::default();
    /// config.ack_timeout = Duration::from_secs(2);
    /// config.max_queue_bytes = 8 << 20;
    /// let reactor = clusterphone::Reactor::master_with(config)?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad `config`, [`Error::Io`] if the epoll instance
    /// cannot be made.
    pub fn master_with(config: Config) -> Result<Reactor, Error> {
        Reactor::new(Role::Master, config)
    }

    /// Attaches this worker process to the master that spawned it, with
    /// default settings. Fails with [`Error::NotAWorker`] in a process that
    /// no master spawned (or that attached already).
    ///
    /// ```no_run
    /// let mut reactor = clusterphone::Reactor::attach()?;
    /// reactor.on("ping", |_r, msg: clusterphone::Message<u32>| {
    ///     let _ = msg.reply.ok(&(msg.payload + 1));
    /// })?;
    /// reactor.run(std::time::Duration::from_secs(1))?; // until asked to exit or the master goes
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`attach_with`](Reactor::attach_with).
    pub fn attach() -> Result<Reactor, Error> {
        Self::attach_with(Config::default())
    }

    /// Attaches this worker process to its master.
    ///
    /// Adopts the fd named by `CLUSTERPHONE_FD` only if it is a Unix stream
    /// socket whose peer is this process's parent (so it must be the master's
    /// direct child: spawn through a shell only with `exec`), and only once
    /// per process; then makes it close-on-exec again, so that processes this
    /// worker spawns do not inherit the channel. The environment is read,
    /// never modified (so this is safe to call with other threads running).
    ///
    /// # Errors
    /// [`Error::NotAWorker`] if there is no such channel or it was adopted
    /// already; [`Error::InvalidConfig`] for a bad `config`.
    pub fn attach_with(config: Config) -> Result<Reactor, Error> {
        config.validate()?;
        let raw = channel_fd()?;
        let id = env::var(ENV_ID).ok().and_then(|s| WorkerId::parse(&s));
        let fd = sys::adopt_channel_fd(raw).map_err(|e| Error::NotAWorker(format!("fd {raw}: {e}")))?;
        sys::set_cloexec(fd.as_fd())?;
        sys::set_nonblocking(fd.as_fd(), true)?;
        Reactor::worker_on(fd, id, config)
    }

    /// A worker reactor on channel `fd` (non-blocking, close-on-exec).
    fn worker_on(fd: OwnedFd, id: Option<WorkerId>, config: Config) -> Result<Reactor, Error> {
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd));
        let mut reactor = Reactor::new(Role::Worker, config)?;
        reactor.my_id = id;
        let conn = new_conn(stream, reactor.config.max_frame, &reactor.config);
        let link_id = WorkerId { key: 0, generation: 0 };
        reactor.add_link(Link::new(link_id, conn, true))?;
        Ok(reactor)
    }

    /// A master with one worker in this same process, over a socketpair: no
    /// child process. For tests, examples and programs that want the
    /// messaging without the processes. The worker end is `Send`: attach it
    /// on another thread (a reactor itself stays on the thread that made it).
    /// The worker has no process, so [`kill`](Reactor::kill) does not apply;
    /// it ends when its reactor is dropped (the master sees `Disconnected`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use clusterphone::{Message, Reactor};
    ///
    /// let (mut master, worker, end) = Reactor::pair()?;
    /// let thread = std::thread::spawn(move || -> Result<(), clusterphone::Error> {
    ///     let mut reactor = end.attach()?;
    ///     reactor.on("double", |_r, msg: Message<u64>| {
    ///         let _ = msg.reply.ok(&(msg.payload * 2));
    ///     })?;
    ///     reactor.run(Duration::from_secs(1))?;
    ///     Ok(())
    /// });
    /// let answer: u64 = master.request(worker, "double", &21u64, Duration::from_secs(5))?;
    /// assert_eq!(answer, 42);
    /// master.shutdown(Duration::from_secs(1))?;
    /// thread.join().unwrap()?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] if the socketpair or the reactor cannot be made.
    pub fn pair() -> Result<(Reactor, WorkerId, PairedWorker), Error> {
        Self::pair_with(Config::default())
    }

    /// [`pair`](Reactor::pair), with this config for the master.
    ///
    /// # Errors
    /// As [`pair`](Reactor::pair), and [`Error::InvalidConfig`] for a bad `config`.
    pub fn pair_with(config: Config) -> Result<(Reactor, WorkerId, PairedWorker), Error> {
        let mut master = Reactor::master_with(config)?;
        let (ours, theirs) = sys::socketpair()?;
        sys::set_nonblocking(ours.as_fd(), true)?;
        sys::set_nonblocking(theirs.as_fd(), true)?;
        master.next_generation = master.next_generation.wrapping_add(1).max(1);
        let id = WorkerId { key: master.links.vacant_key() as u32, generation: master.next_generation };
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(ours));
        let conn = new_conn(stream, hello_frame_limit(&master.config), &master.config);
        master.add_link(Link::new(id, conn, false))?;
        Ok((master, id, PairedWorker { fd: theirs, id }))
    }

    /// On a worker: the id the master knows it by.
    pub fn worker_id(&self) -> Option<WorkerId> {
        self.my_id
    }

    /// Spawns a worker process from `command` (typically this executable
    /// with a role argument) and returns its id. Messages sent to it are
    /// queued until it attaches and says hello.
    ///
    /// ```no_run
    /// let mut reactor = clusterphone::Reactor::master()?;
    /// let exe = std::env::current_exe()?;
    /// let mut cmd = std::process::Command::new(exe);
    /// cmd.arg("worker");
    /// let worker = reactor.spawn(cmd)?;
    /// reactor.send_to(worker, "hello", &"queued until the worker is up", None).send()?;
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// The worker starts with no blocked signals and every signal at its
    /// default disposition, whatever the master's own signal state (this is
    /// done last before `exec`, after any `pre_exec` of the command's own, so
    /// a disposition set there does not survive; set it in the worker).
    ///
    /// # Errors
    /// [`Error::WrongRole`] on a worker, [`Error::ShuttingDown`] during
    /// [`shutdown`](Reactor::shutdown), [`Error::PipedStdio`] if `command`
    /// pipes any stdio (use [`spawn_piped`](Reactor::spawn_piped)), and
    /// [`Error::Io`] if the process cannot be started.
    pub fn spawn(&mut self, command: Command) -> Result<WorkerId, Error> {
        let (id, pipes) = self.spawn_piped(command)?;
        if pipes.stdin.is_some() || pipes.stdout.is_some() || pipes.stderr.is_some() {
            // Nobody would read them: the worker would block on a full pipe.
            let key = id.index();
            self.close_conn(key);
            let mut link = self.links.remove(key);
            reap_now(&mut link);
            return Err(Error::PipedStdio);
        }
        Ok(id)
    }

    /// Spawns a worker like [`spawn`](Reactor::spawn), and hands over the
    /// pipes of any stdio that `command` sets to [`Stdio::piped`](std::process::Stdio::piped).
    ///
    /// ```no_run
    /// use std::io::{BufRead, BufReader};
    /// use std::process::{Command, Stdio};
    /// let mut reactor = clusterphone::Reactor::master()?;
    /// let mut cmd = Command::new("my-worker-binary");
    /// cmd.stderr(Stdio::piped());
    /// let (_worker, pipes) = reactor.spawn_piped(cmd)?;
    /// let stderr = pipes.stderr.expect("piped");
    /// // Read it on a thread (or register it with your own loop).
    /// std::thread::spawn(move || {
    ///     for line in BufReader::new(stderr).lines().map_while(Result::ok) {
    ///         eprintln!("worker: {line}");
    ///     }
    /// });
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`spawn`](Reactor::spawn), without [`Error::PipedStdio`].
    pub fn spawn_piped(&mut self, mut command: Command) -> Result<(WorkerId, WorkerPipes), Error> {
        if self.role != Role::Master {
            return Err(Error::WrongRole);
        }
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let (ours, theirs) = sys::socketpair()?;
        sys::set_nonblocking(ours.as_fd(), true)?;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let id = WorkerId { key: self.links.vacant_key() as u32, generation: self.next_generation };
        command.env(ENV_FD, theirs.as_raw_fd().to_string());
        command.env(ENV_ID, id.to_string());
        sys::inherit_in_child(&mut command, theirs.as_raw_fd());
        let mut child = command.spawn()?;
        drop(theirs);
        let pipes = WorkerPipes { stdin: child.stdin.take(), stdout: child.stdout.take(), stderr: child.stderr.take() };
        // Signals go through the pidfd. Without pidfd_open (Linux < 5.3),
        // exits are found by a periodic check, as with `exit_polling`.
        let pidfd = sys::pidfd_open(child.id()).ok();
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(ours));
        // Until it says hello, a worker may send nothing but a hello: refuse
        // anything larger at its length field, before buffering it.
        let conn = new_conn(stream, hello_frame_limit(&self.config), &self.config);
        let mut link = Link::new(id, conn, false);
        link.child = Some(child);
        link.pidfd = pidfd;
        self.add_link(link)?;
        cp_log!(Debug, "spawned worker {id}");
        Ok((id, pipes))
    }
}
