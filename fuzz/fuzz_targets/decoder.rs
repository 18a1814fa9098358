//! Arbitrary bytes fed whole to `clusterphone::codec::Decoder`; frames taken
//! until `None` or an error; payloads decoded as `ciborium::Value`.
//! Run: `cargo +nightly fuzz run decoder fuzz/corpus/decoder fuzz/seeds/decoder`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    clusterphone_fuzz::decoder_one(data);
});
