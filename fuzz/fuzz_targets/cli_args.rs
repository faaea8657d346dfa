#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| talon_client::fuzzing::cli_args(data));
