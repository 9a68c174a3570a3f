//! Reading context attributes of a `cloudevents::Event` by name, the way Knative's filters and the
//! CESQL evaluator of sdk-go see them.

use chrono::{DateTime, Timelike, Utc};
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};

/// A context attribute's value with its CloudEvents type kept where CESQL needs it (extensions may be
/// Boolean or Integer; every other attribute is a String, URI, URI-reference or Timestamp, all read
/// as strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttributeValue {
    String(String),
    Boolean(bool),
    Integer(i64),
}

impl AttributeValue {
    /// The string form (Go's `fmt.Sprintf("%v", v)` for the SDK's value types).
    pub(crate) fn into_string(self) -> String {
        match self {
            AttributeValue::String(s) => s,
            AttributeValue::Boolean(b) => b.to_string(),
            AttributeValue::Integer(i) => i.to_string(),
        }
    }
}

/// The context attributes of a CloudEvents 1.0 event and its extensions, by (lowercase) name.
/// `None` when an optional attribute or an extension is absent. `data` is not an attribute.
pub(crate) fn lookup(event: &Event, name: &str) -> Option<AttributeValue> {
    let s = |v: &str| Some(AttributeValue::String(v.to_string()));
    match name {
        "specversion" => s(event.specversion().as_str()),
        "id" => s(event.id()),
        "type" => s(event.ty()),
        "source" => s(event.source().as_str()),
        "subject" => event.subject().and_then(s),
        "datacontenttype" => event.datacontenttype().and_then(s),
        "dataschema" => event.dataschema().and_then(|u| s(u.as_str())),
        "time" => event.time().map(|t| AttributeValue::String(format_time(t))),
        _ => event.extension(name).map(|v| match v {
            ExtensionValue::String(v) => AttributeValue::String(v.clone()),
            ExtensionValue::Boolean(b) => AttributeValue::Boolean(*b),
            ExtensionValue::Integer(i) => AttributeValue::Integer(*i),
        }),
    }
}

/// Knative's attributes filter lookup (eventing pkg/eventfilter/attributes LookupAttribute): the
/// CloudEvents attributes plus the aliases it keeps for older spec versions (`schemaurl` for
/// `dataschema`, `datamediatype` for the media type of `datacontenttype`, `datacontentencoding`,
/// never set on a 1.0 event). Knative reads an unset optional attribute as ""; so does this.
pub(crate) fn lookup_for_filter(event: &Event, name: &str) -> Option<String> {
    match name {
        "schemaurl" => Some(
            event
                .dataschema()
                .map(|u| u.to_string())
                .unwrap_or_default(),
        ),
        "datamediatype" => Some(
            event
                .datacontenttype()
                .map(|ct| ct.split(';').next().unwrap_or_default().trim().to_string())
                .unwrap_or_default(),
        ),
        "datacontentencoding" => Some(String::new()),
        "subject" | "datacontenttype" | "dataschema" | "time" => Some(
            lookup(event, name)
                .map(AttributeValue::into_string)
                .unwrap_or_default(),
        ),
        _ => lookup(event, name).map(AttributeValue::into_string),
    }
}

/// RFC 3339 with the fraction trimmed of trailing zeros and `Z` for UTC: Go's `time.RFC3339Nano`,
/// which is how sdk-go (and so Knative) prints the `time` attribute.
pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.nanosecond() % 1_000_000_000;
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn time_is_printed_like_go_rfc3339nano() {
        let t = Utc.with_ymd_and_hms(2018, 4, 26, 12, 48, 9).unwrap();
        assert_eq!(format_time(&t), "2018-04-26T12:48:09Z");
        let t = t.with_nanosecond(500_000_000).unwrap();
        assert_eq!(format_time(&t), "2018-04-26T12:48:09.5Z");
        let t = t.with_nanosecond(123_456_789).unwrap();
        assert_eq!(format_time(&t), "2018-04-26T12:48:09.123456789Z");
    }
}
