//! The master's measurements: `Bench` and its phases, each run against
//! clusterphone or one raw baseline.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Bytes, Error, Message, Reactor, SharedMemory, WorkerId};

use crate::alloc::{count_start, count_stop};
use crate::baselines::RawIo;
use crate::options::{Impl, Opts, Sizes};
use crate::protocol::{payload, Job, Mode, Payload, Work, SENTINEL};
use crate::report::Fig;
use crate::sys::{cpu_ns, pipe};
use crate::worker::worker_command;

const BIG: usize = 64 * 1024;
/// The payload of the 16 MiB round trip.
const HUGE: usize = 16 << 20;
const WINDOW: u64 = 64;
/// Generous ack timeout for the bench's own requests.
const T: Duration = Duration::from_secs(60);

pub(crate) struct Bench {
    pub(crate) r: Reactor,
    pub(crate) w: WorkerId,
    pub(crate) opts: Opts,
    pub(crate) s: Sizes,
    pub(crate) figs: Vec<Fig>,
    pub(crate) notes: Vec<String>,
}

fn percentile(sorted: &[u64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)] as f64
}

struct Cap(Instant);

impl Cap {
    fn new(d: Duration) -> Cap {
        Cap(Instant::now() + d)
    }
    fn over(&self) -> bool {
        Instant::now() >= self.0
    }
}

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

impl Bench {
    fn fig(&mut self, imp: Impl, metric: &'static str, value: f64, n: u64) {
        self.figs.push(Fig { imp: imp.name(), metric, value, n });
    }

    /// Hands the worker a fresh socketpair end for a raw job; returns our end.
    fn raw(&mut self, mode: Mode, work: Work) -> Res<RawIo> {
        let (ours, theirs) = UnixStream::pair()?;
        let job = Job { mode, work };
        self.r.send_to(self.w, "raw", &job, Some(OwnedFd::from(theirs))).within(T).wait::<()>()?;
        Ok(RawIo::new(ours, mode, false)?)
    }

    // (a) request/ack round trip.
    pub(crate) fn rtt(&mut self, imp: Impl) -> Res<()> {
        let lat = self.rtt_samples(imp, self.s.warm, self.s.rtt)?;
        let n = lat.len() as u64;
        self.fig(imp, "rtt_p50_us", percentile(&lat, 50) / 1e3, n);
        self.fig(imp, "rtt_p99_us", percentile(&lat, 99) / 1e3, n);
        Ok(())
    }

    fn rtt_samples(&mut self, imp: Impl, warm: u64, count: u64) -> Res<Vec<u64>> {
        let mut p = payload();
        let mut lat = Vec::with_capacity(count as usize);
        let cap = self.s.cap;
        match imp.raw_mode() {
            None => {
                for i in 0..warm {
                    p.n = i;
                    let got: u64 = self.r.request(self.w, "rtt", &p, T)?;
                    assert_eq!(got, i);
                }
                let cap = Cap::new(cap);
                for i in 0..count {
                    p.n = i;
                    let t = Instant::now();
                    let got: u64 = self.r.request(self.w, "rtt", &p, T)?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert_eq!(got, i);
                    if i % 256 == 255 && cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                for i in 0..warm {
                    p.n = i;
                    io.send(&p, None)?;
                    assert_eq!(io.recv::<u64>()?, i);
                }
                let cap = Cap::new(cap);
                for i in 0..count {
                    p.n = i;
                    let t = Instant::now();
                    io.send(&p, None)?;
                    let got: u64 = io.recv()?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert_eq!(got, i);
                    if i % 256 == 255 && cap.over() {
                        break;
                    }
                }
            }
        }
        lat.sort_unstable();
        Ok(lat)
    }

    // (b) one-way messages, the worker confirming the count.
    pub(crate) fn oneway(&mut self, imp: Impl) -> Res<()> {
        let (sent, secs) = self.oneway_run(imp, self.s.oneway)?;
        self.fig(imp, "oneway_msgs_per_s", sent as f64 / secs, sent);
        Ok(())
    }

    fn oneway_run(&mut self, imp: Impl, count: u64) -> Res<(u64, f64)> {
        let mut p = payload();
        let cap = self.s.cap;
        let mut sent = 0;
        match imp.raw_mode() {
            None => {
                let t = Instant::now();
                let cap = Cap::new(cap);
                let w = self.w;
                while sent < count {
                    // Bursts of 64 sends in a batch: one sendmsg each (Reactor::batch).
                    let end = (sent + 64).min(count);
                    let (n, full) = self.r.batch(|r| {
                        let mut n = sent;
                        while n < end {
                            p.n = n;
                            match r.send_to(w, "oneway", &p, None).send() {
                                Ok(()) => n += 1,
                                Err(e) if matches!(e.error, Error::QueueFull) => return Ok((n, true)),
                                Err(e) => return Err(e),
                            }
                        }
                        Ok((n, false))
                    })?;
                    if full {
                        self.r.poll(Some(Duration::from_millis(1)))?;
                    }
                    let before = sent;
                    sent = n;
                    if sent / 1024 != before / 1024 && cap.over() {
                        break;
                    }
                }
                let got: u64 = self.r.request(self.w, "count", &(), T)?;
                assert_eq!(got, sent, "worker counted {got} of {sent}");
                Ok((sent, t.elapsed().as_secs_f64()))
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Count)?;
                let t = Instant::now();
                let cap = Cap::new(cap);
                while sent < count {
                    p.n = sent;
                    io.send(&p, None)?;
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                p.n = SENTINEL;
                io.send(&p, None)?;
                let got: u64 = io.recv()?;
                assert_eq!(got, sent, "worker counted {got} of {sent}");
                Ok((sent, t.elapsed().as_secs_f64()))
            }
        }
    }

    // (c) acked requests, 64 outstanding.
    pub(crate) fn window(&mut self, imp: Impl) -> Res<()> {
        let count = self.s.window;
        let cap = Cap::new(self.s.cap);
        let t = Instant::now();
        let done = match imp.raw_mode() {
            None => {
                struct St {
                    w: WorkerId,
                    p: RefCell<Payload>,
                    sent: Cell<u64>,
                    done: Cell<u64>,
                    limit: Cell<u64>,
                }
                fn issue(r: &mut Reactor, st: &Rc<St>) {
                    let i = st.sent.get();
                    st.sent.set(i + 1);
                    st.p.borrow_mut().n = i;
                    let st2 = st.clone();
                    r.send_to(st.w, "rtt", &*st.p.borrow(), None)
                        .within(T)
                        .ackd(move |r, res: Result<u64, AckError>| {
                            assert_eq!(res.expect("window ack"), i);
                            st2.done.set(st2.done.get() + 1);
                            if st2.sent.get() < st2.limit.get() {
                                issue(r, &st2);
                            }
                        })
                        .expect("window send");
                }
                let st = Rc::new(St {
                    w: self.w,
                    p: RefCell::new(payload()),
                    sent: Cell::new(0),
                    done: Cell::new(0),
                    limit: Cell::new(count),
                });
                for _ in 0..WINDOW.min(count) {
                    issue(&mut self.r, &st);
                }
                while st.done.get() < st.sent.get() {
                    self.r.poll(Some(Duration::from_millis(10)))?;
                    if cap.over() {
                        st.limit.set(st.sent.get());
                    }
                }
                st.done.get()
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                let mut p = payload();
                let (mut sent, mut done, mut limit) = (0u64, 0u64, count);
                while sent < WINDOW.min(count) {
                    p.n = sent;
                    io.send(&p, None)?;
                    sent += 1;
                }
                while done < sent {
                    let got: u64 = io.recv()?;
                    assert_eq!(got, done);
                    done += 1;
                    if done % 1024 == 0 && cap.over() {
                        limit = sent;
                    }
                    if sent < limit {
                        p.n = sent;
                        io.send(&p, None)?;
                        sent += 1;
                    }
                }
                done
            }
        };
        let secs = t.elapsed().as_secs_f64();
        self.fig(imp, "window_msgs_per_s", done as f64 / secs, done);
        Ok(())
    }

    // (d) 64 KiB echo.
    pub(crate) fn big(&mut self, imp: Impl) -> Res<()> {
        let data = Bytes::from((0..BIG).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let (warm, count) = (self.s.big_warm, self.s.big);
        let cap = self.s.cap;
        let mut lat = Vec::with_capacity(count as usize);
        let t;
        match imp.raw_mode() {
            None => {
                // Owned payloads both ways (see `clusterphone::Payload`): each
                // echo is sent on as the next request, so no side copies it
                // into a frame.
                let mut data = data;
                for _ in 0..warm {
                    data = self.r.request(self.w, "big", data, T)?;
                    assert_eq!(data.len(), BIG);
                }
                let cap = Cap::new(cap);
                t = Instant::now();
                for _ in 0..count {
                    let t1 = Instant::now();
                    data = self.r.request(self.w, "big", data, T)?;
                    lat.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(data.len(), BIG);
                    if cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Big)?;
                for _ in 0..warm {
                    io.send(&data, None)?;
                    assert_eq!(io.recv::<Bytes>()?.len(), BIG);
                }
                let cap = Cap::new(cap);
                t = Instant::now();
                for _ in 0..count {
                    let t1 = Instant::now();
                    io.send(&data, None)?;
                    let back: Bytes = io.recv()?;
                    lat.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(back.len(), BIG);
                    if cap.over() {
                        break;
                    }
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let n = lat.len() as u64;
        lat.sort_unstable();
        self.fig(imp, "big_MBps", (n as usize * BIG) as f64 / secs / 1e6, n);
        self.fig(imp, "big_rtt_p50_us", percentile(&lat, 50) / 1e3, n);
        Ok(())
    }

    // (h) 16 MiB round trip: shared memory both ways, the socket both ways
    // (owned buffers), and one memcpy of 16 MiB (the floor).
    pub(crate) fn huge(&mut self, imp: Impl) -> Res<()> {
        let count = if self.opts.quick { 3 } else { 30 };
        let mut lat = Vec::with_capacity(count);
        match imp {
            Impl::CpShm => {
                let shm = SharedMemory::copy_from(&vec![7u8; HUGE])?;
                let back: Rc<RefCell<Option<OwnedFd>>> = Rc::default();
                let b = back.clone();
                self.r.on("huge_back", move |_r, mut m: Message<()>| *b.borrow_mut() = m.fd.take())?;
                for _ in 0..count + 1 {
                    let t1 = Instant::now();
                    self.r.send_to(self.w, "huge_shm", &(), Some(shm.to_fd()?)).send()?;
                    while back.borrow().is_none() {
                        self.r.poll(Some(T))?;
                    }
                    let fd = back.borrow_mut().take().expect("checked");
                    let mapped = SharedMemory::from_fd(fd, HUGE)?;
                    assert_eq!(mapped.len(), HUGE);
                    drop(mapped);
                    lat.push(t1.elapsed().as_nanos() as u64);
                }
                lat.remove(0); // warm-up
                self.r.off("huge_back");
            }
            Impl::CpSocket => {
                let mut data = Bytes(vec![7u8; HUGE]);
                for _ in 0..count + 1 {
                    let t1 = Instant::now();
                    data = self.r.request(self.w, "big", data, T)?;
                    lat.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(data.len(), HUGE);
                }
                lat.remove(0);
            }
            _ => {
                let src = vec![7u8; HUGE];
                let mut dst = vec![0u8; HUGE];
                for _ in 0..count + 1 {
                    let t1 = Instant::now();
                    dst.copy_from_slice(std::hint::black_box(&src));
                    std::hint::black_box(&mut dst);
                    lat.push(t1.elapsed().as_nanos() as u64);
                }
                lat.remove(0);
            }
        }
        let n = lat.len() as u64;
        lat.sort_unstable();
        self.fig(imp, "huge_rtt_p50_ms", percentile(&lat, 50) / 1e6, n);
        Ok(())
    }

    // (i) sends from another thread: through `Remote`, or hand-rolled with an
    // mpsc channel and a mio `Waker` waking this thread, which sends them on.
    pub(crate) fn threads(&mut self, imp: Impl) -> Res<()> {
        let count: u64 = if self.opts.quick { 20_000 } else { 200_000 };
        let w = self.w;
        let before = self.r.stats().messages_sent;
        let t = Instant::now();
        match imp {
            Impl::CpRemote => {
                let remote = self.r.remote()?;
                let sender = std::thread::spawn(move || {
                    let p = payload();
                    let mut n = 0;
                    while n < count {
                        match remote.send_to(w, "oneway", &p, None) {
                            Ok(()) => n += 1,
                            Err(_) => std::thread::yield_now(),
                        }
                    }
                });
                while self.r.stats().messages_sent - before < count {
                    self.r.poll(Some(Duration::from_millis(1)))?;
                }
                sender.join().expect("sender");
            }
            _ => {
                let mut outer = mio::Poll::new()?;
                let waker = std::sync::Arc::new(mio::Waker::new(outer.registry(), mio::Token(1))?);
                let (tx, rx) = std::sync::mpsc::sync_channel::<Payload>(clusterphone::REMOTE_QUEUE);
                let wk = waker.clone();
                let sender = std::thread::spawn(move || {
                    for _ in 0..count {
                        if tx.send(payload()).is_err() {
                            return;
                        }
                        let _ = wk.wake();
                    }
                });
                let mut events = mio::Events::with_capacity(8);
                let mut got = 0;
                while got < count {
                    outer.poll(&mut events, Some(Duration::from_millis(1)))?;
                    let batch: Vec<Payload> = rx.try_iter().collect();
                    got += batch.len() as u64;
                    self.r.batch(|r| {
                        for p in &batch {
                            let _ = r.send_to(w, "oneway", p, None).send();
                        }
                    });
                    self.r.poll(Some(Duration::ZERO))?;
                }
                sender.join().expect("sender");
            }
        }
        let got: u64 = self.r.request(w, "count", &(), T)?;
        assert_eq!(got, count, "the worker counted {got} of {count}");
        self.fig(imp, "thread_msgs_per_s", count as f64 / t.elapsed().as_secs_f64(), count);
        self.thread_rtt(imp)
    }

    /// Latency: another thread sends `bounce` to the worker, which sends it
    /// straight back; the reactor hands the answer to that thread. The return
    /// path is the same for both; the way out is `Remote`, or mpsc + `Waker`.
    fn thread_rtt(&mut self, imp: Impl) -> Res<()> {
        let count: usize = if self.opts.quick { 300 } else { 3000 };
        let w = self.w;
        let (back_tx, back_rx) = std::sync::mpsc::channel::<u64>();
        self.r.on("bounced", move |_r, m: Message<u64>| {
            let _ = back_tx.send(m.payload);
        })?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lat = match imp {
            Impl::CpRemote => {
                let remote = self.r.remote()?;
                let d = done.clone();
                let thread = std::thread::spawn(move || {
                    let mut lat = Vec::with_capacity(count);
                    for n in 0..count as u64 {
                        let t = Instant::now();
                        remote.send_to(w, "bounce", &n, None).expect("queued");
                        assert_eq!(back_rx.recv().expect("bounced"), n);
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    d.store(true, std::sync::atomic::Ordering::Release);
                    lat
                });
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    self.r.poll(Some(Duration::from_millis(1)))?;
                }
                thread.join().expect("thread")
            }
            _ => {
                let mut outer = mio::Poll::new()?;
                let waker = std::sync::Arc::new(mio::Waker::new(outer.registry(), mio::Token(1))?);
                let reactor_fd = std::os::fd::AsRawFd::as_raw_fd(&self.r);
                outer.registry().register(
                    &mut mio::unix::SourceFd(&reactor_fd),
                    mio::Token(2),
                    mio::Interest::READABLE,
                )?;
                let (tx, rx) = std::sync::mpsc::channel::<u64>();
                let d = done.clone();
                let thread = std::thread::spawn(move || {
                    let mut lat = Vec::with_capacity(count);
                    for n in 0..count as u64 {
                        let t = Instant::now();
                        tx.send(n).expect("sent");
                        let _ = waker.wake();
                        assert_eq!(back_rx.recv().expect("bounced"), n);
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    d.store(true, std::sync::atomic::Ordering::Release);
                    lat
                });
                let mut events = mio::Events::with_capacity(8);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let wait = self.r.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
                    outer.poll(
                        &mut events,
                        Some(wait.unwrap_or(Duration::from_millis(1)).min(Duration::from_millis(1))),
                    )?;
                    for n in rx.try_iter() {
                        self.r.send_to(w, "bounce", &n, None).send()?;
                    }
                    self.r.poll(Some(Duration::ZERO))?;
                }
                thread.join().expect("thread")
            }
        };
        self.r.off("bounced");
        let mut lat = lat;
        lat.sort_unstable();
        self.fig(imp, "thread_rtt_p50_us", percentile(&lat, 50) / 1e3, count as u64);
        Ok(())
    }

    /// Starts `n` more workers and waits until they are all ready.
    pub(crate) fn spawn_many(&mut self, n: usize) -> Res<Vec<WorkerId>> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(self.r.spawn(worker_command(&self.opts, false)?)?);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ids.iter().all(|&w| self.r.is_ready(w)) {
            assert!(Instant::now() < deadline, "workers did not come up");
            self.r.poll(Some(Duration::from_millis(5)))?;
        }
        Ok(ids)
    }

    // (j) one command to n workers: a broadcast gathering every outcome, or
    // n request/replies one after the other.
    pub(crate) fn gather(&mut self, imp: Impl, n: usize, extra: &[WorkerId]) -> Res<()> {
        let targets: Vec<WorkerId> = std::iter::once(self.w).chain(extra.iter().copied()).take(n).collect();
        let reps = if self.opts.quick { 3 } else { 20 };
        let mut lat = Vec::with_capacity(reps);
        let p = payload();
        for _ in 0..reps {
            let t = Instant::now();
            match imp {
                Impl::CpBroadcast => {
                    let all: clusterphone::Gathered<u64> =
                        self.r.broadcast("rtt", &p).to(targets.clone()).within(T).wait()?;
                    assert!(all.iter().all(|(_, o)| o.is_ok()));
                }
                _ => {
                    for &w in &targets {
                        let _: u64 = self.r.request(w, "rtt", &p, T)?;
                    }
                }
            }
            lat.push(t.elapsed().as_nanos() as u64);
        }
        lat.sort_unstable();
        let metric = match n {
            1 => "gather_1_us",
            16 => "gather_16_us",
            _ => "gather_256_us",
        };
        self.fig(imp, metric, percentile(&lat, 50) / 1e3, reps as u64);
        Ok(())
    }

    // (e) fd passing: a fresh fd per message, closed by the sender after sending.
    pub(crate) fn fd(&mut self, imp: Impl) -> Res<()> {
        let (_read_end, write_end) = pipe()?;
        let count = self.s.fd;
        let cap = Cap::new(self.s.cap);
        let mut p = payload();
        let t = Instant::now();
        let mut sent = 0u64;
        let (frames, fds) = match imp.raw_mode() {
            None => {
                while sent < count {
                    p.n = sent;
                    let mut fd = Some(write_end.try_clone()?);
                    loop {
                        match self.r.send_to(self.w, "fd", &p, fd.take()).send() {
                            Ok(()) => break,
                            Err(e) if matches!(e.error, Error::QueueFull) => {
                                fd = e.into_fd();
                                self.r.poll(Some(Duration::from_millis(1)))?;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                self.r.request::<(u64, u64), _>(self.w, "fdcount", &(), T)?
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Fd)?;
                while sent < count {
                    p.n = sent;
                    let fd = write_end.try_clone()?;
                    io.send(&p, Some(fd.as_raw_fd()))?;
                    drop(fd);
                    sent += 1;
                    if sent % 1024 == 0 && cap.over() {
                        break;
                    }
                }
                p.n = SENTINEL;
                io.send(&p, None)?;
                io.recv::<(u64, u64)>()?
            }
        };
        let secs = t.elapsed().as_secs_f64();
        assert_eq!((frames, fds), (sent, sent), "worker got {frames} messages and {fds} fds of {sent}");
        self.fig(imp, "fd_per_s", sent as f64 / secs, sent);
        Ok(())
    }

    // (f) master CPU per ack, `batch` outstanding at a time.
    pub(crate) fn ack_cpu(&mut self, imp: Impl, batch: u64, total: u64, metric: &'static str) -> Res<()> {
        let cap = Cap::new(self.s.cap);
        let mut acks = 0u64;
        let mut p = payload();
        let cpu0;
        match imp.raw_mode() {
            None => {
                let done = Rc::new(Cell::new(0u64));
                cpu0 = cpu_ns();
                loop {
                    for i in 0..batch {
                        p.n = i;
                        let d = done.clone();
                        self.r.send_to(self.w, "rtt", &p, None).within(T).ackd(
                            move |_r, res: Result<u64, AckError>| {
                                res.expect("ack");
                                d.set(d.get() + 1);
                            },
                        )?;
                    }
                    while done.get() < acks + batch {
                        self.r.poll(Some(Duration::from_millis(10)))?;
                    }
                    acks += batch;
                    if acks >= total || cap.over() {
                        break;
                    }
                }
            }
            Some(mode) => {
                let mut io = self.raw(mode, Work::Echo)?;
                let mut pending: HashSet<u64> = HashSet::new();
                cpu0 = cpu_ns();
                loop {
                    for i in 0..batch {
                        p.n = i;
                        pending.insert(i);
                        io.send(&p, None)?;
                    }
                    while !pending.is_empty() {
                        let got: u64 = io.recv()?;
                        assert!(pending.remove(&got), "unexpected reply {got}");
                    }
                    acks += batch;
                    if acks >= total || cap.over() {
                        break;
                    }
                }
            }
        }
        let ns = (cpu_ns() - cpu0) as f64 / acks as f64;
        self.fig(imp, metric, ns, acks);
        Ok(())
    }

    /// Allocations per operation, both processes together (counting on only here).
    pub(crate) fn allocs(&mut self, imp: Impl) -> Res<()> {
        let ops = self.s.alloc_ops;
        let per_op = |b: &mut Bench, what: &str, f: &mut dyn FnMut(&mut Bench) -> Res<u64>| -> Res<f64> {
            let _: (u64, i64) = b.r.request(b.w, "allocs", &true, T)?;
            count_start();
            let done = f(b)?;
            let (mine, _) = count_stop();
            let (theirs, _): (u64, i64) = b.r.request(b.w, "allocs", &false, T)?;
            let total = (mine + theirs) as f64 / done as f64;
            b.notes.push(format!(
                "{:<13} {what:<7} allocs/op: master {:.2} + worker {:.2} = {total:.2} (over {done} ops)",
                imp.name(),
                mine as f64 / done as f64,
                theirs as f64 / done as f64
            ));
            Ok(total)
        };
        let rtt = per_op(self, "rtt", &mut |b| Ok(b.rtt_samples(imp, 0, ops)?.len() as u64))?;
        self.fig(imp, "rtt_allocs_per_op", rtt, ops);
        let ow = per_op(self, "oneway", &mut |b| Ok(b.oneway_run(imp, ops * 10)?.0))?;
        self.fig(imp, "oneway_allocs_per_msg", ow, ops * 10);
        Ok(())
    }

    /// Master heap per idle connected worker, and per pending ack.
    pub(crate) fn memory(&mut self) -> Res<()> {
        // Idle workers: a fresh master, so nothing is pre-grown.
        let mut m = Reactor::master()?;
        let k = self.s.mem_workers;
        let cmds: Vec<Command> = (0..k).map(|_| worker_command(&self.opts, false)).collect::<io::Result<_>>()?;
        m.poll(Some(Duration::ZERO))?;
        count_start();
        let mut ids = Vec::new();
        for cmd in cmds {
            ids.push(m.spawn(cmd)?);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ids.iter().all(|&id| m.is_ready(id)) {
            assert!(Instant::now() < deadline, "idle workers did not come up");
            m.poll(Some(Duration::from_millis(5)))?;
        }
        // Let the hello replies go out, so only steady-state memory remains.
        m.flush(Duration::from_secs(5))?;
        let (_, heap) = count_stop();
        self.fig(Impl::Cp, "mem_per_worker_bytes", heap as f64 / k as f64, k as u64);
        m.shutdown(Duration::from_secs(2))?;
        drop(m);

        // Pending acks: a fresh master and worker; the worker holds every responder.
        let mut m = Reactor::master()?;
        let w = m.spawn(worker_command(&self.opts, false)?)?;
        let _: u64 = m.request(w, "rtt", &payload(), T)?;
        let n = self.s.mem_acks;
        let done = Rc::new(Cell::new(0u64));
        let mut p = payload();
        count_start();
        for i in 0..n {
            p.n = i;
            let d = done.clone();
            m.send_to(w, "hold", &p, None).within(T).ackd(move |_r, res: Result<u64, AckError>| {
                res.expect("held ack");
                d.set(d.get() + 1);
            })?;
        }
        m.flush(Duration::from_secs(30))?;
        let (_, heap) = count_stop();
        assert_eq!(m.pending_acks() as u64, n);
        self.fig(Impl::Cp, "mem_per_pending_ack_bytes", heap as f64 / n as f64, n);
        let released: u64 = m.request(w, "release", &(), T)?;
        assert_eq!(released, n);
        while done.get() < n {
            m.poll(Some(Duration::from_millis(10)))?;
        }
        m.shutdown(Duration::from_secs(2))?;
        Ok(())
    }
}
