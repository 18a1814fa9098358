//! Side-by-side IPC benchmark: clusterphone against hand-written baselines,
//! over the same two processes and the same CPU placement, in one run.
//!
//! ```text
//! cargo bench --bench ipc -- --placement split   # master on CPU 0, worker on CPU 1 (default)
//! cargo bench --bench ipc -- --placement same    # both on CPU 0
//! cargo bench --bench ipc -- --busy-poll         # busy-polling RTT: clusterphone-busy vs raw-busy
//! cargo bench --bench ipc -- --wakeups never     # Config::writable_wakeups on both sides: never|always|large (default)
//! cargo bench --bench ipc -- --quick             # ~10x smaller counts (CI smoke, well under 30 s)
//! ```
//!
//! Other flags: `--only rtt,oneway,window,big,fd,ack,allocs,mem` (phases to run),
//! `--impl clusterphone,raw-blocking,raw-mio` (implementations to run),
//! `--rounds N` (each phase runs N times per implementation, interleaved, each
//! round starting with another implementation; the table shows medians and
//! the range; default 3, or 1 with `--quick`),
//! `--watchdog SECS` (abort a stuck run; default 300 per round, or 60 with `--quick`),
//! `--cap-ms MS` (wall-clock cap of one timed phase; default 4000, or 700 with
//! `--quick`; raise it for runs under valgrind). The experimental baseline
//! `raw-mio-lazyw` (mio, registered for WRITABLE only while a write is
//! pending) runs only when named in `--impl`.
//! Unknown arguments (such as the `--bench` cargo adds) are ignored.
//!
//! One binary plays both roles: the master re-executes itself as the worker
//! (`CP_BENCH_ROLE=worker`). The worker is a clusterphone worker. For a raw
//! baseline the master hands it one end of a fresh socketpair (through
//! clusterphone, as an fd), and the worker serves that socket with plain
//! blocking, mio or busy-polling code until the master closes it, then goes
//! back to clusterphone. Raw frames are a 4-byte little-endian length and the
//! CBOR (ciborium) of the same payload; each frame is one `write`.
//!
//! Output: a human table, then one JSON line per figure:
//! `{"impl": .., "metric": .., "value": .., "unit": .., "n": .., "placement": .., "rounds": .., "min": .., "max": ..}`
//! (`value` is the median over rounds, `n` the samples of all rounds).
//!
//! Figures (payload `{key: "value", n}`; `n` in JSON is the sample count):
//! - `rtt_p50_us`, `rtt_p99_us`: request → ack round trips, one at a time, after warm-up.
//! - `oneway_msgs_per_s`: messages without ack, until the worker confirms the count.
//! - `window_msgs_per_s`: acked requests with 64 outstanding.
//! - `big_MBps`, `big_rtt_p50_us`: 64 KiB `Bytes` echo; MB/s = 10^6 payload bytes
//!   echoed per second (each payload crosses twice). clusterphone sends the
//!   buffers owned (`Payload for Bytes`: no copy into the frame), the echo
//!   handler returns the buffer it received, and the master sends the echo
//!   on as its next request; the raw baselines copy into their frame buffer.
//! - `fd_per_s`: one fresh fd per message (dup of a pipe end), closed by both sides.
//! - `ack_cpu_ns_1k`, `ack_cpu_ns_100k`: master CPU time (CLOCK_PROCESS_CPUTIME_ID)
//!   per ack, sending 1,000 (repeatedly) or 100,000 acked requests, then polling
//!   until every reply is in. No raw-blocking figure: blocking both ways deadlocks.
//! - `rtt_allocs_per_op`, `oneway_allocs_per_msg`: heap allocations per operation,
//!   master and worker together (the counting allocator is on only for these).
//! - `mem_per_worker_bytes`: master heap growth per connected idle worker (8 of them).
//! - `mem_per_pending_ack_bytes`: master heap growth per pending ack, 100,000 pending.
//!
//! Layout (imports point down the list): this file (role dispatch, the
//! master's schedule of rounds and phases); `phases` (`Bench` and its
//! measurements); `worker` (the worker process) and `baselines` (the raw
//! implementations, `RawIo` and the worker's `raw_serve`); `options`, `protocol`
//! (what master and worker exchange besides clusterphone's own frames), `sys`
//! and `alloc` (the counting allocator). `report` (figures and output) stands
//! apart: `phases` files figures into it and this file prints them.

mod alloc;
mod baselines;
mod options;
mod phases;
mod protocol;
mod report;
mod sys;
mod worker;

use std::time::{Duration, Instant};

use clusterphone::{Config, Reactor};

use crate::options::{show_stats, wakeups_from_env, Impl, Opts, Sizes, BUSY_WINDOW};
use crate::phases::{Bench, Res};
use crate::protocol::HUGE_FRAME;
use crate::report::{print_report, summarize};
use crate::sys::{pin_to, start_watchdog};
use crate::worker::{worker_command, worker_main, ROLE_VAR};

/// `impls` rotated left by `round`, so each round starts with another one.
fn rotated(impls: &[Impl], round: usize) -> Vec<Impl> {
    let mut v = impls.to_vec();
    if !v.is_empty() {
        let k = round % v.len();
        v.rotate_left(k);
    }
    v
}

fn master_main() -> Res<()> {
    let opts = Opts::parse();
    let started = Instant::now();
    let mut notes = Vec::new();
    if let Err(e) = pin_to(0) {
        notes.push(format!("could not pin the master to CPU 0: {e}"));
    }
    start_watchdog(Duration::from_secs(opts.watchdog), 3);
    let mut s = Sizes::new(opts.quick);
    if let Some(ms) = opts.cap_ms {
        s.cap = Duration::from_millis(ms);
    }
    let mut config = Config::default();
    if opts.busy {
        config.busy_poll = Some(BUSY_WINDOW);
    }
    config.writable_wakeups = wakeups_from_env();
    config.max_frame = HUGE_FRAME;
    let mut r = Reactor::master_with(config)?;
    let busy = opts.busy;
    let w = r.spawn(worker_command(&opts, busy)?)?;
    let mut b = Bench { r, w, opts, s, figs: Vec::new(), notes };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.r.is_ready(b.w) {
        assert!(Instant::now() < deadline, "worker did not come up");
        b.r.poll(Some(Duration::from_millis(5)))?;
    }
    let placement = b.opts.placement.name();
    eprintln!(
        "ipc bench: placement {placement} (master CPU 0, worker CPU {}), {}{}; load average {}",
        b.opts.placement.worker_cpu(),
        if b.opts.quick { "quick" } else { "full" },
        if busy { ", busy-poll" } else { "" },
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );

    let rounds = b.opts.rounds;
    if b.opts.threads {
        for round in 0..rounds {
            for imp in rotated(&[Impl::CpRemote, Impl::MpscWaker], round) {
                eprintln!("  threads {} (round {})", imp.name(), round + 1);
                b.threads(imp)?;
            }
        }
    } else if b.opts.broadcast {
        let extra = b.spawn_many(255)?;
        for n in [1usize, 16, 256] {
            for round in 0..rounds {
                for imp in rotated(&[Impl::CpBroadcast, Impl::Sequential], round) {
                    eprintln!("  gather to {n}: {} (round {})", imp.name(), round + 1);
                    b.gather(imp, n, &extra)?;
                }
            }
        }
    } else if b.opts.shm {
        for round in 0..rounds {
            for imp in rotated(&[Impl::CpShm, Impl::CpSocket, Impl::Memcpy], round) {
                eprintln!("  huge {} (round {})", imp.name(), round + 1);
                b.huge(imp)?;
            }
        }
        let median = |imp: Impl| summarize(&b.figs, imp.name(), "huge_rtt_p50_ms").map(|s| s.median);
        if let (Some(shm), Some(socket)) = (median(Impl::CpShm), median(Impl::CpSocket)) {
            b.notes.push(format!("16 MiB round trip: shared memory {:.1}x faster than the socket", socket / shm));
        }
    } else if busy {
        for round in 0..rounds {
            for imp in rotated(&[Impl::CpBusy, Impl::RawBusy], round) {
                eprintln!("  rtt {} (round {})", imp.name(), round + 1);
                b.rtt(imp)?;
            }
        }
    } else {
        // raw-mio-lazyw is an experiment: run only when named in --impl.
        let lazy = b.opts.impls.as_ref().is_some_and(|l| l.iter().any(|x| x == Impl::RawMioLazy.name()));
        let impls: Vec<Impl> = [Impl::Cp, Impl::RawBlocking, Impl::RawMio, Impl::RawMioLazy]
            .into_iter()
            .filter(|&i| b.opts.runs(i) && (i != Impl::RawMioLazy || lazy))
            .collect();
        type Phase = fn(&mut Bench, Impl) -> Res<()>;
        let phases: [(&str, Phase); 5] = [
            ("rtt", Bench::rtt),
            ("oneway", Bench::oneway),
            ("window", Bench::window),
            ("big", Bench::big),
            ("fd", Bench::fd),
        ];
        for (name, phase) in phases {
            if !b.opts.phase(name) {
                continue;
            }
            // Interleaved rounds, each starting with another implementation:
            // whoever runs first in a phase measurably pays for it here (the
            // vCPUs' idle state), and the machine drifts between phases.
            for round in 0..rounds {
                for imp in rotated(&impls, round) {
                    eprintln!("  {name} {} (round {})", imp.name(), round + 1);
                    let before = b.r.stats();
                    phase(&mut b, imp)?;
                    if show_stats() && imp == Impl::Cp {
                        let s = b.r.stats();
                        eprintln!(
                            "    master: {} frames written in {} calls, {} frames read",
                            s.frames_written - before.frames_written,
                            s.write_calls - before.write_calls,
                            s.frames_read - before.frames_read
                        );
                    }
                }
            }
        }
        if b.opts.phase("ack") {
            // With thousands outstanding both blocking sides would fill their
            // sockets and wait for each other forever.
            let ack_impls: Vec<Impl> = impls.iter().copied().filter(|&i| i != Impl::RawBlocking).collect();
            for round in 0..rounds {
                for imp in rotated(&ack_impls, round) {
                    eprintln!("  ack {} (round {})", imp.name(), round + 1);
                    let (small, total, big) = (b.s.ack_small, b.s.ack_small_total, b.s.ack_big);
                    b.ack_cpu(imp, small, total, "ack_cpu_ns_1k")?;
                    b.ack_cpu(imp, big, big, "ack_cpu_ns_100k")?;
                }
            }
            b.notes.push("ack_cpu: raw-blocking has no figure (blocking both ways deadlocks with 1k+ outstanding); raw-mio keeps a HashSet of outstanding ids".into());
        }
        if b.opts.phase("allocs") {
            for &imp in &impls {
                eprintln!("  allocs {}", imp.name());
                b.allocs(imp)?;
            }
        }
        if b.opts.phase("mem") && b.opts.runs(Impl::Cp) {
            eprintln!("  mem clusterphone");
            b.memory()?;
        }
    }
    b.r.shutdown(Duration::from_secs(2))?;
    let wall = started.elapsed();
    b.notes.push(format!("wall time {:.1} s", wall.as_secs_f64()));
    print_report(&b.figs, &b.notes, placement);
    Ok(())
}

fn main() {
    if std::env::var(ROLE_VAR).is_ok_and(|r| r == "worker") {
        if let Err(e) = worker_main() {
            eprintln!("worker failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = master_main() {
        eprintln!("ipc bench failed: {e}");
        std::process::exit(1);
    }
}
