//! Broadcast with gathered acks, to 64 real workers: some answer, some are
//! slow past the deadline, some refuse, some are dead, and sends refused at
//! the call count as outcomes too.

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clusterphone::{AckError, Gathered, Message, Reactor, WorkerId};
use util::{deadline, poll_until, serve, LIMIT};

/// Answers `reload` by its kind: at once, too late, or with an error.
fn reloader(kind: &'static str) {
    let mut r = Reactor::attach().expect("attach");
    let held: Rc<RefCell<Vec<clusterphone::Responder>>> = Rc::default();
    let h = held.clone();
    r.on("reload", move |_r, m: Message<String>| match kind {
        "ok" => {
            let _ = m.reply.ok(&format!("loaded {}", m.payload));
        }
        "slow" => h.borrow_mut().push(m.reply),
        _ => m.reply.err("refusing"),
    })
    .unwrap();
    serve(&mut r);
}

#[test]
fn a_broadcast_to_64_workers_gathers_every_outcome_once() {
    util::child("ok", || reloader("ok"));
    util::child("slow", || reloader("slow"));
    util::child("refuse", || reloader("refuse"));
    let _d = deadline(Duration::from_secs(90));
    let mut r = Reactor::master().unwrap();
    let mut kinds: Vec<(WorkerId, &str)> = Vec::new();
    for i in 0..64 {
        let kind = match i % 8 {
            0 => "slow",
            1 => "refuse",
            2 => "dead",
            _ => "ok",
        };
        let role = if kind == "dead" { "ok" } else { kind };
        kinds.push((r.spawn(util::worker_command(role)).unwrap(), kind));
    }
    poll_until(&mut r, Duration::from_secs(60), |r| kinds.iter().all(|&(w, _)| r.is_ready(w)));
    // The dead: killed, and their exits seen.
    for &(w, kind) in &kinds {
        if kind == "dead" {
            r.kill(w).unwrap();
        }
    }
    poll_until(&mut r, LIMIT, |r| r.workers().len() == 56);
    let unknown = kinds.iter().find(|k| k.1 == "dead").unwrap().0;

    // To every ready worker, plus one that is gone: 56 + 1 outcomes, once.
    let targets: Vec<WorkerId> = r.workers().into_iter().chain([unknown]).collect();
    let got: Rc<RefCell<Vec<Gathered<String>>>> = Rc::default();
    let g = got.clone();
    let start = Instant::now();
    let sent = r
        .broadcast("reload", &"v2")
        .to(targets.clone())
        .within(Duration::from_millis(500))
        .gather(move |_r, all: Gathered<String>| g.borrow_mut().push(all))
        .unwrap();
    assert_eq!(sent, 56);
    poll_until(&mut r, LIMIT, |_| !got.borrow().is_empty());
    let took = start.elapsed();
    for _ in 0..20 {
        r.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let got = got.borrow();
    assert_eq!(got.len(), 1, "one callback");
    let all = &got[0];
    assert_eq!(all.iter().map(|(w, _)| *w).collect::<Vec<_>>(), targets, "every target, in order");
    for (w, outcome) in all {
        let kind = kinds.iter().find(|k| k.0 == *w).unwrap().1;
        match (kind, outcome) {
            ("ok", Ok(text)) => assert_eq!(text, "loaded v2"),
            ("slow", Err(AckError::Timeout)) => {}
            ("refuse", Err(AckError::Remote(why))) => assert_eq!(why, "refusing"),
            ("dead", Err(AckError::NotSent(_))) => {}
            other => panic!("{w}: unexpected {other:?}"),
        }
    }
    assert!(took < Duration::from_secs(5), "one deadline for all: {took:?}");

    // The blocking form, to the 7 that answer at once.
    let ok: Vec<WorkerId> = kinds.iter().filter(|k| k.1 == "ok").map(|k| k.0).take(7).collect();
    let all: Gathered<String> = r.broadcast("reload", &"v3").to(ok.clone()).within(LIMIT).wait().unwrap();
    assert_eq!(all.len(), 7);
    assert!(all.iter().all(|(_, o)| o.as_deref() == Ok("loaded v3")), "{all:?}");
    // Nobody to send to: the callback runs at once, with nothing.
    let empty = Rc::new(RefCell::new(None));
    let e = empty.clone();
    let sent = r
        .broadcast("reload", &"v4")
        .to([])
        .gather(move |_r, all: Gathered<String>| *e.borrow_mut() = Some(all.len()))
        .unwrap();
    assert_eq!((sent, *empty.borrow()), (0, Some(0)));
    r.shutdown(Duration::from_secs(5)).unwrap();
}
