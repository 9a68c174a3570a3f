//! What every CloudEvents fuzz target checks of the events the ingress accepted: the log record
//! reads back as the same event, and delivery can always build its request from the record.

use bytes::Bytes;
use http::HeaderMap;
use sluice_broker::codec;

/// Reads one HTTP message as the ingress does; for every event accepted, checks the record round
/// trip and the delivery message.
pub fn check_message(headers: &HeaderMap, body: &[u8]) {
    let Ok(events) = codec::events_from_http(headers, Bytes::copy_from_slice(body)) else {
        return;
    };
    assert!(!events.is_empty(), "an accepted message holds an event");
    for mut event in events {
        let _ = codec::apply_ttl(&mut event, codec::DEFAULT_TTL);
        let record = codec::encode(&event);
        let decoded = codec::decode(&record).expect("a record the broker wrote reads back");
        assert_eq!(decoded, event, "the log record changed the event");
        let message = codec::delivery_message(&record).expect("a record makes a delivery");
        assert!(message.headers.contains_key("ce-specversion"));
        let _ = codec::to_binary(&event);
    }
}
