//! Observability: several listeners for worker events and unhandled messages
//! (a library's and the application's side by side), per-worker figures,
//! and log lines (with the `log` feature).

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{Message, Reactor, WorkerEvent};
use util::events::echo_worker;
use util::{deadline, poll_until, serve, spawn_ready, LIMIT};

/// Holds every `hold` responder; sends the master an unhandled `stray`.
fn holding_worker() {
    let mut r = Reactor::attach().expect("attach");
    let held: Rc<RefCell<Vec<clusterphone::Responder>>> = Rc::default();
    let h = held.clone();
    r.on("hold", move |_r, m: Message<u32>| h.borrow_mut().push(m.reply)).unwrap();
    r.on("stray", |r, _m: Message<()>| r.send_to_master("nobody-handles-this", &(), None).send().unwrap()).unwrap();
    serve(&mut r);
}

#[test]
fn every_listener_hears_every_event_until_removed() {
    util::child("echo", echo_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let heard: Rc<RefCell<Vec<String>>> = Rc::default();
    let h = heard.clone();
    r.on_worker_event(move |_r, _id, e| h.borrow_mut().push(format!("hook {}", kind(e))));
    let h = heard.clone();
    let a = r.add_worker_listener(move |_r, _id, e| h.borrow_mut().push(format!("a {}", kind(e))));
    let h = heard.clone();
    // This one removes itself on its first event, while it runs.
    let me: Rc<RefCell<Option<clusterphone::ListenerKey>>> = Rc::default();
    let m = me.clone();
    let b = r.add_worker_listener(move |r, _id, e| {
        h.borrow_mut().push(format!("b {}", kind(e)));
        assert!(r.remove_listener(m.borrow().expect("set")));
    });
    *me.borrow_mut() = Some(b);
    let w = spawn_ready(&mut r, "echo");
    assert_eq!(*heard.borrow(), ["hook ready", "a ready", "b ready"]);
    heard.borrow_mut().clear();
    assert!(!r.remove_listener(b), "removed already");
    assert!(r.remove_listener(a));
    r.kill(w).unwrap();
    poll_until(&mut r, LIMIT, |r| r.workers().is_empty());
    assert_eq!(*heard.borrow(), ["hook exited"]);
}

fn kind(e: &WorkerEvent) -> &'static str {
    match e {
        WorkerEvent::Ready => "ready",
        WorkerEvent::Disconnected(_) => "disconnected",
        WorkerEvent::Exited(_) => "exited",
        _ => "other",
    }
}

#[test]
fn unhandled_listeners_and_per_worker_figures() {
    util::child("hold", holding_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let seen: Rc<RefCell<Vec<String>>> = Rc::default();
    let s = seen.clone();
    r.on_unhandled(move |_r, u| s.borrow_mut().push(format!("hook {}", u.command)));
    let s = seen.clone();
    r.add_unhandled_listener(move |_r, u| s.borrow_mut().push(format!("listener {}", u.command)));
    let w = spawn_ready(&mut r, "hold");
    let fresh = r.worker_stats(w).unwrap();
    assert_eq!((fresh.pending_acks, fresh.frames_received), (0, 1), "{fresh:?}"); // its hello
    for i in 0..5u32 {
        r.send_to(w, "hold", &i, None).within(LIMIT).ackd(|_r, _res: Result<(), clusterphone::AckError>| {}).unwrap();
    }
    r.send_to(w, "stray", &(), None).send().unwrap();
    poll_until(&mut r, LIMIT, |_| seen.borrow().len() == 2);
    assert_eq!(*seen.borrow(), ["hook nobody-handles-this", "listener nobody-handles-this"]);
    let s = r.worker_stats(w).unwrap();
    assert_eq!(s.pending_acks, 5, "{s:?}");
    assert_eq!(s.frames_sent, 1 + 6, "our hello, then six messages: {s:?}");
    assert_eq!(s.frames_received, 2, "its hello and its stray message: {s:?}");
    assert!(s.bytes_sent > s.bytes_received && s.bytes_received > 0, "{s:?}");
    assert_eq!((s.queued_frames, s.queued_bytes, s.read_paused), (0, 0, false));
    assert!(r.master_stats().is_none(), "a master has no master");
    r.shutdown(LIMIT).unwrap();
}

#[cfg(feature = "log")]
mod logging {
    use super::*;
    use std::sync::Mutex;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Collect;
    impl log::Log for Collect {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.target() == "clusterphone"
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                LINES.lock().unwrap().push(format!("{} {}", r.level(), r.args()));
            }
        }
        fn flush(&self) {}
    }

    #[test]
    fn lifecycle_and_protocol_errors_are_logged_naming_the_worker() {
        util::child("echo", echo_worker);
        util::child("garbage", || {
            let mut p = util::raw::RawPeer::connect();
            p.exchange_hellos();
            p.write(b"GET / HTTP/1.1\r\n\r\n");
            let _ = p.until_eof();
        });
        let _d = deadline(Duration::from_secs(30));
        log::set_logger(&Collect).unwrap();
        log::set_max_level(log::LevelFilter::Debug);
        let mut r = Reactor::master().unwrap();
        let w = spawn_ready(&mut r, "echo");
        let g = spawn_ready(&mut r, "garbage");
        r.kill(w).unwrap();
        poll_until(&mut r, LIMIT, |r| !r.workers().contains(&w) && !r.is_ready(g));
        r.shutdown(LIMIT).unwrap();
        let lines = LINES.lock().unwrap().join("\n");
        for want in [format!("spawned worker {w}"), format!("worker {w} ready"), format!("worker {w} exited")] {
            assert!(lines.contains(&want), "no {want:?} in:\n{lines}");
        }
        assert!(lines.contains(&format!("WARN worker {g}: protocol error")), "{lines}");
    }
}
