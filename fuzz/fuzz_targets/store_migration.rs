#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| talon_coordinator::fuzzing::store_migration(data));
