#![no_main]

// A pipeline stage's step message, as the next agent receives it over
// `POST /v1/stages/<id>/forward`: decoded against a model of width 64 and
// a 4096-position context; a message that decodes must encode back to the
// same bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(step) = talon_runtime::stage::StepMsg::decode(data, 64, 4096) {
        assert_eq!(step.encode(), data, "a decoded step encodes differently");
    }
});
