//! The sans-I/O receive path driven by a script of chunks, fds, drains,
//! clears and end of stream (see `clusterphone_fuzz::ScriptBuilder`).
//! Run: `cargo +nightly fuzz run receive fuzz/corpus/receive fuzz/seeds/receive`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    clusterphone_fuzz::receive_one(data);
    clusterphone_fuzz::periodic_fd_check(1024);
});
