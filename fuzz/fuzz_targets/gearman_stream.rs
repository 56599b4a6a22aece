//! The Gearman codec and request parser, fed in pieces: the first byte picks the piece sizes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cuts, rest) = data.split_at(data.len().min(4));
    gearhouse::fuzzing::gearman_stream(rest, if cuts.is_empty() { &[1] } else { cuts });
});
