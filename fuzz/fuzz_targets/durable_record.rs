//! See `gearhouse::fuzzing::durable_record`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gearhouse::fuzzing::durable_record(data));
