#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| revproxy::fuzzing::proxy_header(data));
