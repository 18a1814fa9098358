//! Supervision: a crash loop respawned with backoff until the supervisor
//! gives up, a shutdown during a pending respawn, and a rolling restart
//! under a steady request load with no failed request.

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Reactor, RestartPolicy, SupervisorEvent, WorkerId};
use util::events::echo_worker;
use util::{deadline, poll_until, LIMIT};

/// Says hello, then exits with 1: a worker that crashes at start.
fn crasher() {
    let mut r = Reactor::attach().expect("attach");
    // (A shutdown may ask it to exit meanwhile: it crashes all the same.)
    let _ = r.poll(Some(Duration::ZERO));
    let _ = r.flush(LIMIT);
    std::process::exit(1);
}

fn policy(backoff_ms: u64) -> RestartPolicy {
    let mut p = RestartPolicy::default();
    p.backoff = Duration::from_millis(backoff_ms);
    p.max_backoff = Duration::from_millis(backoff_ms * 8);
    p.max_crashes = 4;
    p.window = Duration::from_secs(30);
    p
}

type Log = Rc<RefCell<Vec<(Instant, String)>>>;

fn observe(sup: &clusterphone::Supervisor) -> Log {
    let log: Log = Rc::default();
    let l = log.clone();
    sup.on_event(move |_r, e| {
        let text = match e {
            SupervisorEvent::Spawned(_) => "spawned".to_string(),
            SupervisorEvent::Crashed { after, .. } => format!("crashed, respawn after {}ms", after.as_millis()),
            SupervisorEvent::GaveUp { crashes } => format!("gave up after {crashes}"),
            SupervisorEvent::RestartDone => "restart done".to_string(),
            other => format!("{other:?}"),
        };
        l.borrow_mut().push((Instant::now(), text));
    });
    log
}

#[test]
fn a_crash_loop_backs_off_then_the_supervisor_gives_up() {
    util::child("crasher", crasher);
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let sup = r.supervise(|| util::worker_command("crasher"), 1, policy(40)).unwrap();
    let log = observe(&sup);
    poll_until(&mut r, Duration::from_secs(30), |_| sup.gave_up());
    for _ in 0..30 {
        r.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let texts: Vec<String> = log.borrow().iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(
        texts,
        [
            "crashed, respawn after 40ms",
            "spawned",
            "crashed, respawn after 80ms",
            "spawned",
            "crashed, respawn after 160ms",
            "spawned",
            "crashed, respawn after 320ms",
            "spawned",
            "gave up after 5",
        ],
        "the first spawn came before the observer; then backoff doubling, then giving up"
    );
    // The respawns waited their backoff.
    let times: Vec<Instant> = log.borrow().iter().map(|(t, _)| *t).collect();
    assert!(times[1] - times[0] >= Duration::from_millis(40));
    assert!(times[7] - times[6] >= Duration::from_millis(320));
    assert!(sup.workers().is_empty() && r.workers().is_empty(), "nothing respawned after giving up");
}

#[test]
fn a_shutdown_during_a_pending_respawn_spawns_nothing() {
    util::child("crasher", crasher);
    let _d = deadline(Duration::from_secs(60));
    let mut r = Reactor::master().unwrap();
    let sup = r.supervise(|| util::worker_command("crasher"), 2, policy(300)).unwrap();
    let log = observe(&sup);
    poll_until(&mut r, LIMIT, |_| log.borrow().iter().any(|(_, t)| t.starts_with("crashed")));
    let start = Instant::now();
    r.shutdown(Duration::from_secs(2)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    let before = log.borrow().len();
    let end = Instant::now() + Duration::from_millis(800);
    while Instant::now() < end {
        r.poll(Some(Duration::from_millis(20))).unwrap();
    }
    let after: Vec<String> = log.borrow()[before..].iter().map(|(_, t)| t.clone()).collect();
    assert!(after.iter().all(|t| t != "spawned"), "respawned after the shutdown: {after:?}");
    assert!(r.workers().is_empty());
}

#[test]
fn a_rolling_restart_under_load_fails_no_request() {
    util::child("echo", echo_worker);
    let _d = deadline(Duration::from_secs(90));
    let mut r = Reactor::master().unwrap();
    let sup = r.supervise(|| util::worker_command("echo"), 3, RestartPolicy::default()).unwrap();
    let log = observe(&sup);
    poll_until(&mut r, LIMIT, |r| sup.workers().iter().all(|&w| r.is_ready(w)));
    let old: Vec<WorkerId> = sup.workers();
    let failures: Rc<RefCell<Vec<AckError>>> = Rc::default();
    let answered = Rc::new(std::cell::Cell::new(0u64));
    let mut sent = 0u64;
    let mut next = 0usize;
    let send_some = |r: &mut Reactor, sent: &mut u64, next: &mut usize| {
        let ready: Vec<WorkerId> = sup.workers().into_iter().filter(|&w| r.is_ready(w)).collect();
        for _ in 0..5 {
            if ready.is_empty() {
                return;
            }
            let w = ready[*next % ready.len()];
            *next += 1;
            let (f, a) = (failures.clone(), answered.clone());
            let n = *sent;
            r.send_to(w, "echo", &n, None)
                .within(LIMIT)
                .ackd(move |_r, res: Result<u64, AckError>| match res {
                    Ok(m) if m == n => a.set(a.get() + 1),
                    Ok(m) => panic!("echo {n} came back as {m}"),
                    Err(e) => f.borrow_mut().push(e),
                })
                .unwrap();
            *sent += 1;
        }
    };
    // Steady load before, during and after the restart.
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        send_some(&mut r, &mut sent, &mut next);
        r.poll(Some(Duration::from_millis(2))).unwrap();
    }
    sup.rolling_restart(&mut r, Duration::from_secs(5));
    let limit = Instant::now() + Duration::from_secs(60);
    while !log.borrow().iter().any(|(_, t)| t == "restart done") {
        assert!(Instant::now() < limit, "{:?}", log.borrow());
        send_some(&mut r, &mut sent, &mut next);
        r.poll(Some(Duration::from_millis(2))).unwrap();
    }
    poll_until(&mut r, LIMIT, |_| answered.get() + failures.borrow().len() as u64 == sent);
    assert_eq!(*failures.borrow(), [], "{sent} requests");
    let new = sup.workers();
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|w| !old.contains(w)), "every worker replaced");
    assert!(old.iter().all(|w| !r.workers().contains(w)), "the old ones are gone");
    r.shutdown(LIMIT).unwrap();
}
