//! Starting workers (master side) and attaching to the master (worker side).
//!
//! The master creates an AF_UNIX stream socketpair, keeps one end, and lets
//! the child inherit the other; the child finds its fd number in the
//! `CLUSTERPHONE_FD` environment variable, as Node's children find
//! `NODE_CHANNEL_FD`.

use std::env;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

use mio::net::UnixStream;

use crate::codec::Decoder;
use crate::conn::Conn;
use crate::reactor::{Link, Role};
use crate::{sys, Config, Error, Reactor, WorkerId};

/// Environment variable carrying the channel's fd number to a worker.
pub const ENV_FD: &str = "CLUSTERPHONE_FD";
/// Environment variable carrying the worker's id.
pub const ENV_ID: &str = "CLUSTERPHONE_WORKER_ID";

/// Whether this process was spawned by a clusterphone master (and has not attached yet).
///
/// ```
/// if clusterphone::is_worker() {
///     // run the worker role
/// }
/// ```
pub fn is_worker() -> bool {
    env::var_os(ENV_FD).is_some()
}

fn new_conn(stream: UnixStream, config: &Config) -> Conn {
    Conn::new(stream, Decoder::new(config.max_frame, config.max_received_fds))
}

impl Reactor {
    /// A reactor for the master role, with default settings.
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
    /// while reactor.poll(None).is_ok() {}
    /// # Ok::<(), clusterphone::Error>(())
    /// ```
    pub fn attach() -> Result<Reactor, Error> {
        Self::attach_with(Config::default())
    }

    /// Attaches this worker process to its master.
    ///
    /// Checks that the inherited fd is a Unix stream socket, makes it
    /// close-on-exec again, and removes the environment variables, so that
    /// processes this worker spawns do not adopt the channel.
    pub fn attach_with(config: Config) -> Result<Reactor, Error> {
        let value = env::var(ENV_FD).map_err(|_| Error::NotAWorker(format!("{ENV_FD} is not set")))?;
        let id = env::var(ENV_ID).ok().and_then(|s| WorkerId::parse(&s));
        // Remove first, so a second attach (or a grandchild) can never adopt the fd.
        env::remove_var(ENV_FD);
        env::remove_var(ENV_ID);
        let raw = value.trim().parse().map_err(|_| Error::NotAWorker(format!("{ENV_FD}={value:?} is not a number")))?;
        let fd = sys::adopt_channel_fd(raw).map_err(|e| Error::NotAWorker(format!("fd {raw}: {e}")))?;
        sys::set_cloexec(fd.as_fd())?;
        sys::set_nonblocking(fd.as_fd(), true)?;
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd));
        let mut reactor = Reactor::new(Role::Worker, config)?;
        reactor.my_id = id;
        let conn = new_conn(stream, &reactor.config);
        let link_id = WorkerId { key: 0, generation: 0 };
        reactor.add_link(Link::new(link_id, conn, true))?;
        Ok(reactor)
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
    pub fn spawn(&mut self, mut command: Command) -> Result<WorkerId, Error> {
        if self.role != Role::Master {
            return Err(Error::WrongRole);
        }
        let (ours, theirs) = sys::socketpair()?;
        sys::set_nonblocking(ours.as_fd(), true)?;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let id = WorkerId { key: self.links.vacant_key() as u32, generation: self.next_generation };
        command.env(ENV_FD, theirs.as_raw_fd().to_string());
        command.env(ENV_ID, id.to_string());
        sys::inherit_in_child(&mut command, theirs.as_raw_fd());
        let child = command.spawn()?;
        drop(theirs);
        // Without pidfd_open (Linux < 5.3), exits are found by a periodic check.
        let pidfd = if self.config.exit_polling { None } else { sys::pidfd_open(child.id()).ok() };
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(ours));
        let mut link = Link::new(id, new_conn(stream, &self.config), false);
        link.child = Some(child);
        link.pidfd = pidfd;
        match self.add_link(link) {
            Ok(_) => Ok(id),
            Err(e) => Err(e),
        }
    }
}
