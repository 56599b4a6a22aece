//! See `gearhouse::fuzzing::memcached_replies`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gearhouse::fuzzing::memcached_replies(data));
