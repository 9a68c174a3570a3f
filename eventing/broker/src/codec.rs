//! CloudEvents in and out: reading HTTP messages (binary, structured, batch) with the `cloudevents-sdk`,
//! the checks the ingress makes, log records (structured JSON), binary-mode requests to subscribers,
//! and Knative's TTL extension.

use bytes::Bytes;
use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Data, Event};
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};

/// Knative: the Broker's TTL extension (pkg/broker/ttl.go).
pub const TTL_EXTENSION: &str = "knativebrokerttl";
/// Knative: broker.EventArrivalTime, set by the ingress on every event it accepts.
pub const ARRIVAL_TIME_EXTENSION: &str = "knativearrivaltime";
/// Knative: the TTL the ingress sets on an event without one.
pub const DEFAULT_TTL: i64 = 255;

pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Why a message is not a valid CloudEvent: the ingress answers 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error(
        "not a CloudEvent: send ce-specversion/ce-id/ce-source/ce-type headers (binary mode) or \
         Content-Type application/cloudevents+json (structured) or application/cloudevents-batch+json"
    )]
    NotAnEvent,
    #[error("invalid CloudEvent: {0}")]
    Invalid(String),
    #[error("invalid CloudEvent: attribute {0} is missing or empty")]
    Missing(&'static str),
    #[error("invalid CloudEvent: specversion must be 1.0 (or 0.3), got {0:?}")]
    SpecVersion(String),
    #[error(
        "invalid CloudEvent: extension name {0:?} must be lowercase letters a-z and digits 0-9 only"
    )]
    ExtensionName(String),
    #[error("invalid CloudEvent batch: {0}")]
    Batch(String),
    #[error("the event batch is empty")]
    EmptyBatch,
}

/// Reads the events of one HTTP request: a batch (JSON array of structured events), one structured
/// event, or one binary-mode event. Every event is validated (see [`validate`]).
pub fn events_from_http(headers: &HeaderMap, body: Bytes) -> Result<Vec<Event>, EventError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with(BATCH_CONTENT_TYPE) {
        let values: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| EventError::Batch(e.to_string()))?;
        if values.is_empty() {
            return Err(EventError::EmptyBatch);
        }
        return values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                check_structured(&v).map_err(|e| EventError::Batch(format!("event [{i}]: {e}")))?;
                let event: Event = serde_json::from_value(v)
                    .map_err(|e| EventError::Batch(format!("event [{i}]: {e}")))?;
                validate(&event).map_err(|e| EventError::Batch(format!("event [{i}]: {e}")))?;
                Ok(event)
            })
            .collect();
    }
    if content_type.starts_with(STRUCTURED_CONTENT_TYPE) {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| EventError::Invalid(format!("structured event is not JSON: {e}")))?;
        check_structured(&v)?;
        let event: Event =
            serde_json::from_value(v).map_err(|e| EventError::Invalid(e.to_string()))?;
        validate(&event)?;
        return Ok(vec![event]);
    }
    if !headers.contains_key("ce-specversion") {
        return Err(EventError::NotAnEvent);
    }
    for required in ["id", "source", "type"] {
        let present = headers
            .get(format!("ce-{required}"))
            .is_some_and(|v| !v.is_empty());
        if !present {
            return Err(EventError::Missing(static_name(required)));
        }
    }
    let version = headers
        .get("ce-specversion")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if version != "1.0" && version != "0.3" {
        return Err(EventError::SpecVersion(version.to_string()));
    }
    let event = cloudevents::binding::http::to_event(headers, body.to_vec())
        .map_err(|e| EventError::Invalid(e.to_string()))?;
    validate(&event)?;
    Ok(vec![event])
}

fn static_name(name: &str) -> &'static str {
    match name {
        "id" => "id",
        "source" => "source",
        "type" => "type",
        _ => "specversion",
    }
}

/// Structured-mode checks that deserialization alone would report less clearly.
fn check_structured(v: &serde_json::Value) -> Result<(), EventError> {
    let obj = v
        .as_object()
        .ok_or_else(|| EventError::Invalid("a structured event must be a JSON object".into()))?;
    match obj.get("specversion").and_then(|s| s.as_str()) {
        None => return Err(EventError::Missing("specversion")),
        Some("1.0" | "0.3") => {}
        Some(other) => return Err(EventError::SpecVersion(other.to_string())),
    }
    for required in ["id", "source", "type"] {
        match obj.get(required) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {}
            _ => return Err(EventError::Missing(static_name(required))),
        }
    }
    for name in obj.keys() {
        if !is_valid_extension_name(name) && name != "data_base64" {
            return Err(EventError::ExtensionName(name.clone()));
        }
    }
    Ok(())
}

/// CloudEvents 1.0: attribute names consist of lowercase letters and digits.
pub fn is_valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The CloudEvents rules the sdk does not enforce itself: non-empty id, source and type, and
/// extension names of lowercase letters and digits.
pub fn validate(event: &Event) -> Result<(), EventError> {
    if event.id().is_empty() {
        return Err(EventError::Missing("id"));
    }
    if event.source().is_empty() {
        return Err(EventError::Missing("source"));
    }
    if event.ty().is_empty() {
        return Err(EventError::Missing("type"));
    }
    for (name, _) in event.iter_extensions() {
        if !is_valid_extension_name(name) {
            return Err(EventError::ExtensionName(name.to_string()));
        }
    }
    Ok(())
}

/// The TTL an event carries, if it carries one that reads as an integer.
pub fn ttl(event: &Event) -> Option<i64> {
    match event.extension(TTL_EXTENSION)? {
        ExtensionValue::Integer(i) => Some(*i),
        ExtensionValue::String(s) => s.trim().parse().ok(),
        ExtensionValue::Boolean(_) => None,
    }
}

/// The event went round the broker too often (its TTL reached 0): Knative's ingress drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event's {TTL_EXTENSION} extension is exhausted")]
pub struct TtlExhausted;

/// Knative's TTLDefaulter plus the ingress check: an event without a (readable) TTL gets `default`;
/// one with a TTL has it decremented (not below 0); Err when the result is 0 or less, i.e. the
/// event has gone round the broker too often and must be dropped.
pub fn apply_ttl(event: &mut Event, default: i64) -> Result<i64, TtlExhausted> {
    let next = match ttl(event) {
        None => default,
        Some(t) => (t - 1).max(0),
    };
    event.set_extension(TTL_EXTENSION, ExtensionValue::Integer(next));
    if next <= 0 {
        Err(TtlExhausted)
    } else {
        Ok(next)
    }
}

/// A log record: the event in structured JSON.
pub fn encode(event: &Event) -> Bytes {
    Bytes::from(serde_json::to_vec(event).expect("a CloudEvent always serializes to JSON"))
}

/// Reads back a record written by [`encode`].
pub fn decode(record: &[u8]) -> Result<Event, serde_json::Error> {
    serde_json::from_slice(record)
}

/// The headers and body of a binary-mode HTTP request or response carrying `event`. Attributes go
/// into `ce-` headers (CloudEvents HTTP binding 3.1.3: percent-encoding of values outside printable
/// ASCII), datacontenttype into Content-Type, data into the body.
pub fn to_binary(event: &Event) -> (HeaderMap, Bytes) {
    // Room for the usual attributes, the arrival time and the headers the sender adds, without regrowing.
    let mut headers = HeaderMap::with_capacity(16);
    for (name, value) in event.iter() {
        if name == "datacontenttype" {
            continue;
        }
        let text = value.to_string();
        let header = match binary_header_name(name) {
            Some(h) => h,
            None => match HeaderName::from_bytes(format!("ce-{name}").as_bytes()) {
                Ok(h) => h,
                Err(_) => continue,
            },
        };
        headers.insert(header, header_value(&text));
    }
    if let Some(ct) = event.datacontenttype() {
        headers.insert(CONTENT_TYPE, header_value(ct));
    }
    let body = match event.data() {
        None => Bytes::new(),
        Some(Data::Binary(b)) => Bytes::from(b.clone()),
        Some(Data::String(s)) => Bytes::from(s.clone()),
        Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    };
    (headers, body)
}

/// The `ce-` header of a context attribute every event carries, without formatting and parsing a
/// name per delivery; None for the others.
fn binary_header_name(attribute: &str) -> Option<HeaderName> {
    Some(HeaderName::from_static(match attribute {
        "specversion" => "ce-specversion",
        "id" => "ce-id",
        "source" => "ce-source",
        "type" => "ce-type",
        "time" => "ce-time",
        "subject" => "ce-subject",
        "dataschema" => "ce-dataschema",
        ARRIVAL_TIME_EXTENSION => "ce-knativearrivaltime",
        _ => return None,
    }))
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let mut encoded = String::with_capacity(text.len() * 3);
        for b in text.bytes() {
            if (0x20..0x7f).contains(&b) && b != b'%' && b != b'"' {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
    })
}

/// Whether a response is a CloudEvent (Knative: binding encoding not "unknown"): structured
/// Content-Type or a ce-specversion header.
pub fn is_cloudevent_message(headers: &HeaderMap) -> bool {
    let structured = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with(STRUCTURED_CONTENT_TYPE));
    structured || headers.contains_key("ce-specversion")
}

/// The spec version of an event (for logs).
pub fn spec_version(event: &Event) -> SpecVersion {
    event.specversion()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const MINIMAL: [(&str, &str); 4] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ];

    #[test]
    fn binary_mode_event_is_read_with_data_and_extensions() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ce-myext", "v"));
        pairs.push(("content-type", "application/json"));
        let events = events_from_http(&binary_headers(&pairs), Bytes::from("{\"a\":1}")).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].ty(), "t");
        assert_eq!(
            events[0].extension("myext"),
            Some(&ExtensionValue::from("v"))
        );
        assert_eq!(events[0].datacontenttype(), Some("application/json"));
    }

    #[test]
    fn invalid_events_are_refused_with_what_is_wrong() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![
                    ("ce-specversion", "1.0"),
                    ("ce-source", "/s"),
                    ("ce-type", "t"),
                ],
                "",
                "id",
            ),
            (
                vec![("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")],
                "",
                "source",
            ),
            (
                vec![
                    ("ce-specversion", "1.0"),
                    ("ce-id", "1"),
                    ("ce-source", "/s"),
                ],
                "",
                "type",
            ),
            (vec![("ce-id", "1")], "", "not a CloudEvent"),
            (
                [MINIMAL.to_vec(), vec![("ce-time", "yesterday")]].concat(),
                "",
                "time",
            ),
            (
                [MINIMAL.to_vec(), vec![("ce-specversion", "2.0")]].concat(),
                "",
                "specversion",
            ),
            (
                vec![("content-type", STRUCTURED_CONTENT_TYPE)],
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad_Ext":"x"}"#,
                "Bad_Ext",
            ),
            (
                vec![("content-type", STRUCTURED_CONTENT_TYPE)],
                r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
                "id",
            ),
            (
                vec![("content-type", STRUCTURED_CONTENT_TYPE)],
                r#"{"id":"1","source":"/s","type":"t"}"#,
                "specversion",
            ),
            (
                vec![("content-type", STRUCTURED_CONTENT_TYPE)],
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"noon"}"#,
                "",
            ),
            (vec![("content-type", BATCH_CONTENT_TYPE)], "[]", "empty"),
            (
                vec![("content-type", BATCH_CONTENT_TYPE)],
                r#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0"}]"#,
                "event [1]",
            ),
        ];
        for (headers, body, want) in cases {
            let mut map = HeaderMap::new();
            for (k, v) in &headers {
                map.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let err = events_from_http(&map, Bytes::from(body.to_string()))
                .expect_err(&format!("{headers:?} {body}"));
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
    }

    #[test]
    fn structured_and_batch_events_are_read() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, STRUCTURED_CONTENT_TYPE.parse().unwrap());
        let one = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"x":1},"datacontenttype":"application/json"}"#;
        let events = events_from_http(&h, Bytes::from(one)).unwrap();
        assert_eq!(events[0].id(), "1");
        h.insert(CONTENT_TYPE, BATCH_CONTENT_TYPE.parse().unwrap());
        let events = events_from_http(&h, Bytes::from(format!("[{one},{one}]"))).unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn ttl_is_defaulted_then_decremented_and_expires_at_zero() {
        let mut e = events_from_http(&binary_headers(&MINIMAL), Bytes::new())
            .unwrap()
            .remove(0);
        assert_eq!(apply_ttl(&mut e, DEFAULT_TTL), Ok(255));
        assert_eq!(apply_ttl(&mut e, DEFAULT_TTL), Ok(254));
        e.set_extension(TTL_EXTENSION, ExtensionValue::from("2"));
        assert_eq!(apply_ttl(&mut e, DEFAULT_TTL), Ok(1));
        assert_eq!(apply_ttl(&mut e, DEFAULT_TTL), Err(TtlExhausted));
        assert_eq!(ttl(&e), Some(0));
        e.set_extension(TTL_EXTENSION, ExtensionValue::from("many"));
        assert_eq!(apply_ttl(&mut e, DEFAULT_TTL), Ok(255));
    }

    #[test]
    fn log_record_round_trips_every_attribute_and_data() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ce-time", "2024-01-02T03:04:05Z"));
        pairs.push(("ce-subject", "sub"));
        pairs.push(("ce-ext1", "x"));
        pairs.push(("content-type", "application/octet-stream"));
        let e = events_from_http(&binary_headers(&pairs), Bytes::from_static(&[0, 159, 255]))
            .unwrap()
            .remove(0);
        assert_eq!(decode(&encode(&e)).unwrap(), e);
    }

    #[test]
    fn binary_request_carries_attributes_in_headers_and_data_in_body() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ce-ext1", "x"));
        pairs.push(("content-type", "text/plain"));
        let e = events_from_http(&binary_headers(&pairs), Bytes::from("hello"))
            .unwrap()
            .remove(0);
        let (headers, body) = to_binary(&e);
        assert_eq!(headers["ce-id"], "1");
        assert_eq!(headers["ce-specversion"], "1.0");
        assert_eq!(headers["ce-ext1"], "x");
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(body, "hello");
        assert!(is_cloudevent_message(&headers));
        let back = events_from_http(&headers, body).unwrap().remove(0);
        assert_eq!(back, e);
    }
}
