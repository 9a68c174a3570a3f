//! CESQL: any text a Trigger's `cesql` filter may hold. Parsing never panics; a parsed expression
//! evaluates without panicking against events with and without the attributes it names, and its
//! source round-trips.
#![no_main]

use cloudevents::{EventBuilder, EventBuilderV10};
use libfuzzer_sys::fuzz_target;
use sluice_event_filter::cesql;

fuzz_target!(|source: &str| {
    let Ok(expression) = cesql::parse(source) else {
        return;
    };
    assert_eq!(expression.source(), source);
    let _ = expression.static_problems();
    let bare = EventBuilderV10::new()
        .id("1")
        .source("/fuzz")
        .ty("t")
        .build()
        .expect("a minimal event builds");
    let full = EventBuilderV10::new()
        .id("0")
        .source("http://example.com/x?y=1")
        .ty("com.example.Created")
        .subject("TRUE")
        .time("2026-01-02T03:04:05.123456789Z")
        .extension("count", 42i64)
        .extension("flag", true)
        .extension("name", "-17")
        .data("application/json", serde_json::json!({"a": 1}))
        .build()
        .expect("a full event builds");
    for event in [&bare, &full] {
        let evaluation = expression.evaluate(event);
        // The predicate is a pure function of the evaluation.
        assert_eq!(expression.matches(event), evaluation.is_true());
    }
});
