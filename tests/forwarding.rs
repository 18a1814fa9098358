//! Forwarding and addressing, with real workers: a payload forwarded as its
//! exact CBOR (`RawPayload`) by a master that does not know its type, and
//! worker ids carried in payloads.

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use clusterphone::{Message, RawPayload, Reactor, WorkerId};
use util::{deadline, serve, spawn_ready, LIMIT};

/// Sends the master a `job` of its own type on `start`; answers a `job` with
/// what it decoded, and `whoami` with its id.
fn relay_worker() {
    let mut r = Reactor::attach().expect("attach");
    r.on("start", |r, m: Message<WorkerId>| {
        // Addressed to a peer the master named, in a type the master never sees.
        r.send_to_master("job", &(m.payload, "resize".to_string(), vec![640u32, 480]), None).send().unwrap();
    })
    .unwrap();
    r.on("job", |_r, m: Message<(WorkerId, String, Vec<u32>)>| {
        let _ = m.reply.ok(&m.payload);
    })
    .unwrap();
    r.on("whoami", |r, m: Message<()>| {
        let _ = m.reply.ok(&r.worker_id());
    })
    .unwrap();
    serve(&mut r);
}

#[test]
fn a_master_forwards_a_payload_it_cannot_read_to_the_worker_named_in_it() {
    util::child("relay", relay_worker);
    let _d = deadline(Duration::from_secs(30));
    let mut r = Reactor::master().unwrap();
    let a = spawn_ready(&mut r, "relay");
    let b = spawn_ready(&mut r, "relay");
    // Ids travel in payloads and come back equal.
    let told: Option<WorkerId> = r.request(b, "whoami", &(), LIMIT).unwrap();
    assert_eq!(told, Some(b));
    // The master looks only at the addressee (the first field) and forwards the
    // payload as it came.
    let got: Rc<RefCell<Option<(WorkerId, RawPayload)>>> = Rc::default();
    let g = got.clone();
    r.on("job", move |_r, m: Message<RawPayload>| {
        let (to, _, _): (WorkerId, clusterphone::RawPayload, clusterphone::RawPayload) =
            m.payload.decode().expect("a job is addressed");
        *g.borrow_mut() = Some((to, m.payload));
    })
    .unwrap();
    r.send_to(a, "start", &b, None).send().unwrap();
    util::poll_until(&mut r, LIMIT, |_| got.borrow().is_some());
    let (to, raw) = got.borrow_mut().take().unwrap();
    assert_eq!(to, b);
    let bytes = raw.as_bytes().to_vec();
    let echoed: (WorkerId, String, Vec<u32>) = r.send_to(to, "job", raw, None).within(LIMIT).wait().unwrap();
    assert_eq!(echoed, (b, "resize".to_string(), vec![640, 480]));
    // What went out is byte for byte what came in.
    assert_eq!(RawPayload::encode(&echoed).unwrap().as_bytes(), &bytes[..]);
    r.shutdown(LIMIT).unwrap();
}
