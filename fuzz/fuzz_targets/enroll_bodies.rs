#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| revproxy::fuzzing::enroll_bodies(data));
