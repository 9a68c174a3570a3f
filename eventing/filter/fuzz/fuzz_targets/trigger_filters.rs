//! A Trigger's `spec` as JSON (`filter.attributes` and the `filters` dialects): compiling never
//! panics, and a compiled filter evaluates any event without panicking.
#![no_main]

use cloudevents::{EventBuilder, EventBuilderV10};
use libfuzzer_sys::fuzz_target;
use sluice_event_filter::{Filter, FilterResult};

fuzz_target!(|spec: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(spec) else {
        return;
    };
    let Ok(filter) = Filter::compile_trigger_spec(&spec) else {
        return;
    };
    let event = EventBuilderV10::new()
        .id("1")
        .source("/fuzz")
        .ty("com.example.Created")
        .subject("s")
        .extension("ext", "v")
        .build()
        .expect("a minimal event builds");
    let result = filter.evaluate(&event);
    assert_eq!(filter.matches(&event), result != FilterResult::Fail);
    if filter.passes_everything() {
        assert_eq!(result, FilterResult::NoFilter);
    }
});
