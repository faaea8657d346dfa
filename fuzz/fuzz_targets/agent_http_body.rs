#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| talon_node_agent::fuzzing::agent_http_body(data));
