//! See `gearhouse::fuzzing::admin_lines`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gearhouse::fuzzing::admin_lines(data));
