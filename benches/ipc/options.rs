//! Command-line options, the settings the master passes on to the worker in
//! the environment, the implementations under test, and the workload sizes.

use std::time::Duration;

use clusterphone::{Config, WritableWakeups};

use crate::protocol::Mode;

const WAKEUPS_VAR: &str = "CP_BENCH_WAKEUPS";

/// `--wakeups never|always|large`: `Config::writable_wakeups` of both
/// reactors (`--lean` is `never`). The master passes it on in the environment.
fn wakeups_name() -> String {
    std::env::var(WAKEUPS_VAR).unwrap_or_else(|_| "large".to_owned())
}

pub(crate) fn wakeups_from_env() -> WritableWakeups {
    match wakeups_name().as_str() {
        "never" => WritableWakeups::Never,
        "always" => WritableWakeups::Always,
        _ => Config::default().writable_wakeups,
    }
}
pub(crate) const BUSY_WINDOW: Duration = Duration::from_micros(200);

/// `IPC_BENCH_STATS=1`: print the reactors' counters (frames per write call, ...).
pub(crate) fn show_stats() -> bool {
    std::env::var("IPC_BENCH_STATS").is_ok_and(|v| v == "1")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Impl {
    Cp,
    RawBlocking,
    RawMio,
    RawMioLazy,
    CpBusy,
    RawBusy,
    /// 16 MiB through the socket (owned `Bytes` both ways).
    CpSocket,
    /// 16 MiB as a sealed memfd both ways.
    CpShm,
    /// One memcpy of 16 MiB: the floor.
    Memcpy,
    /// Sends from another thread through `Remote`.
    CpRemote,
    /// The same, hand-rolled: an mpsc channel and a mio `Waker`.
    MpscWaker,
    /// One broadcast, every outcome gathered.
    CpBroadcast,
    /// As many request/replies, one after the other.
    Sequential,
}

impl Impl {
    pub(crate) fn name(self) -> &'static str {
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
            Impl::CpSocket => "clusterphone-socket",
            Impl::CpShm => "clusterphone-shm",
            Impl::Memcpy => "memcpy",
            Impl::CpRemote => "clusterphone-remote",
            Impl::MpscWaker => "mpsc-waker",
            Impl::CpBroadcast => "clusterphone-broadcast",
            Impl::Sequential => "sequential",
        }
    }

    pub(crate) fn raw_mode(self) -> Option<Mode> {
        match self {
            Impl::Cp
            | Impl::CpBusy
            | Impl::CpSocket
            | Impl::CpShm
            | Impl::Memcpy
            | Impl::CpRemote
            | Impl::MpscWaker
            | Impl::CpBroadcast
            | Impl::Sequential => None,
            Impl::RawBlocking => Some(Mode::Blocking),
            Impl::RawMio => Some(Mode::Mio),
            Impl::RawMioLazy => Some(Mode::MioLazy),
            Impl::RawBusy => Some(Mode::Busy),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    Same,
    Split,
}

impl Placement {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Split => "split",
        }
    }

    pub(crate) fn worker_cpu(self) -> usize {
        match self {
            Placement::Same => 0,
            Placement::Split => 1,
        }
    }
}

pub(crate) struct Opts {
    pub(crate) placement: Placement,
    pub(crate) busy: bool,
    /// `--shm`: the 16 MiB round trip, shared memory vs the socket vs one memcpy.
    pub(crate) shm: bool,
    /// `--threads`: sends from another thread, `Remote` vs mpsc + a mio `Waker`.
    pub(crate) threads: bool,
    /// `--broadcast`: broadcast-and-gather to 1, 16 and 256 workers vs as many
    /// sequential request/replies.
    pub(crate) broadcast: bool,
    pub(crate) quick: bool,
    pub(crate) only: Option<Vec<String>>,
    pub(crate) impls: Option<Vec<String>>,
    pub(crate) watchdog: u64,
    pub(crate) cap_ms: Option<u64>,
    /// Times each phase runs per implementation, interleaved.
    pub(crate) rounds: usize,
}

impl Opts {
    pub(crate) fn parse() -> Opts {
        let mut o = Opts {
            placement: Placement::Split,
            busy: false,
            shm: false,
            threads: false,
            broadcast: false,
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
                "--shm" => o.shm = true,
                "--threads" => o.threads = true,
                "--broadcast" => o.broadcast = true,
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

    pub(crate) fn phase(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|l| l.iter().any(|x| x == name))
    }

    pub(crate) fn runs(&self, imp: Impl) -> bool {
        self.impls
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == imp.name() || (imp == Impl::Cp && x == "clusterphone")))
    }
}

pub(crate) struct Sizes {
    pub(crate) warm: u64,
    pub(crate) rtt: u64,
    pub(crate) oneway: u64,
    pub(crate) window: u64,
    pub(crate) big_warm: u64,
    pub(crate) big: u64,
    pub(crate) fd: u64,
    pub(crate) ack_small: u64,
    pub(crate) ack_small_total: u64,
    pub(crate) ack_big: u64,
    pub(crate) alloc_ops: u64,
    pub(crate) mem_workers: usize,
    pub(crate) mem_acks: u64,
    /// Wall-clock cap of one timed phase.
    pub(crate) cap: Duration,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Sizes {
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
