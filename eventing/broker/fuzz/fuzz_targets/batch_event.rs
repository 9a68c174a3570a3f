//! Batch mode: any body under Content-Type `application/cloudevents-batch+json`. The ingress
//! never panics, and what it accepts survives the log and delivery unchanged.
#![no_main]

use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use libfuzzer_sys::fuzz_target;
use sluice_broker::codec::BATCH_CONTENT_TYPE;

fuzz_target!(|body: &[u8]| {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(BATCH_CONTENT_TYPE));
    sluice_broker_fuzz::check_message(&headers, body);
});
