//! A job queue that survives worker crashes: every job is handed to a ready
//! worker with an ack; a worker that dies fails the acks of the jobs it held
//! (exactly once each), and those jobs go back in the queue. One job crashes
//! its worker on the first try; every job is done exactly once in the end.
//!
//! Run it with `cargo run --example job_queue`.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{AckError, Error, Message, Reactor, RestartPolicy};

const JOBS: u32 = 60;
/// This job kills the worker that takes it, the first time.
const POISON: u32 = 17;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if clusterphone::is_worker() {
        return Ok(worker()?);
    }
    let mut reactor = Reactor::master()?;
    let exe = std::env::current_exe()?;
    let pool = reactor.supervise(move || std::process::Command::new(&exe), 3, RestartPolicy::default())?;

    let queue: Rc<RefCell<VecDeque<(u32, u32)>>> = Rc::new(RefCell::new((0..JOBS).map(|j| (j, 0)).collect()));
    let done: Rc<RefCell<BTreeMap<u32, u64>>> = Rc::default();
    let mut in_flight = 0usize;
    let finished = Rc::new(RefCell::new(0usize));
    while done.borrow().len() < JOBS as usize {
        // Hand out work: two jobs at a time per ready worker.
        for w in pool.workers() {
            let busy = reactor.worker_stats(w).map_or(usize::MAX, |s| s.pending_acks);
            if !reactor.is_ready(w) || busy >= 2 {
                continue;
            }
            let Some((job, attempt)) = queue.borrow_mut().pop_front() else { break };
            let (q, d, f) = (queue.clone(), done.clone(), finished.clone());
            reactor.send_to(w, "job", &(job, attempt), None).within(Duration::from_secs(5)).ackd(
                move |_r, outcome: Result<u64, AckError>| {
                    *f.borrow_mut() += 1;
                    match outcome {
                        Ok(result) => {
                            let again = d.borrow_mut().insert(job, result);
                            assert!(again.is_none(), "job {job} done twice");
                        }
                        Err(e) => {
                            println!("master: job {job} failed ({e}); back in the queue");
                            q.borrow_mut().push_back((job, attempt + 1));
                        }
                    }
                },
            )?;
            in_flight += 1;
        }
        reactor.poll(Some(Duration::from_millis(10)))?;
    }
    println!("master: {JOBS} jobs done exactly once ({} hand-outs, {in_flight} sent)", finished.borrow());
    reactor.shutdown(Duration::from_secs(2))?;
    Ok(())
}

/// Squares its job after a little work; the poison job kills it the first time.
fn worker() -> Result<(), Error> {
    let mut reactor = Reactor::attach()?;
    reactor.on("job", |_r, msg: Message<(u32, u32)>| {
        let (job, attempt) = msg.payload;
        if job == POISON && attempt == 0 {
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(2));
        let _ = msg.reply.ok(&(u64::from(job) * u64::from(job)));
    })?;
    reactor.run(Duration::from_secs(1))?;
    Ok(())
}
