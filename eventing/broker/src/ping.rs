//! PingSource: a cron schedule in a time zone, and the `dev.knative.sources.ping` event it emits
//! (Knative pkg/adapter/mtping/runner.go makeEvent).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use cloudevents::event::ExtensionValue;
use cloudevents::{Event, EventBuilder, EventBuilderV10};

use crate::config::PingConfig;

/// Knative: v1.PingSourceEventType.
pub const PING_EVENT_TYPE: &str = "dev.knative.sources.ping";

/// Knative: v1.PingSourceSource.
pub fn ping_source_uri(namespace: &str, name: &str) -> String {
    format!("/apis/v1/namespaces/{namespace}/pingsources/{name}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Cron(String),
    #[error("{0}")]
    Timezone(String),
}

/// A parsed cron schedule and its time zone (UTC when none is given).
#[derive(Debug, Clone)]
pub struct Schedule {
    source: String,
    cron: cron::Schedule,
    tz: Tz,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.tz == other.tz
    }
}

impl Schedule {
    /// Reads a standard 5-field cron (minute hour day-of-month month day-of-week, days of week 0-7
    /// with 0 and 7 Sunday, as Knative's robfig/cron) or a 6-field one whose first field is seconds;
    /// also `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    pub fn parse(schedule: &str, timezone: &str) -> Result<Schedule, ScheduleError> {
        let tz = if timezone.is_empty() {
            Tz::UTC
        } else {
            Tz::from_str(timezone).map_err(|_| {
                ScheduleError::Timezone(format!(
                    "unknown time zone {timezone:?}: use an IANA name such as Europe/Paris"
                ))
            })?
        };
        let fields: Vec<&str> = schedule.split_whitespace().collect();
        let expression = match fields.as_slice() {
            [one] if one.starts_with('@') => one.to_string(),
            [m, h, dom, mon, dow] => format!("0 {m} {h} {dom} {mon} {}", convert_dow(dow)?),
            [s, m, h, dom, mon, dow] => format!("{s} {m} {h} {dom} {mon} {}", convert_dow(dow)?),
            _ => {
                return Err(ScheduleError::Cron(format!(
                    "{schedule:?} is not a cron schedule: want 5 fields (minute hour day month weekday)"
                )));
            }
        };
        let cron = cron::Schedule::from_str(&expression).map_err(|e| {
            ScheduleError::Cron(format!("{schedule:?} is not a valid cron schedule: {e}"))
        })?;
        Ok(Schedule {
            source: schedule.to_string(),
            cron,
            tz,
        })
    }

    /// The first firing strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.tz);
        self.cron
            .after(&local)
            .next()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Standard cron numbers days of week 0-6 from Sunday (7 also Sunday); the `cron` crate 1-7 from
/// Sunday. Numeric lists, ranges and steps are expanded and renumbered; names pass unchanged.
fn convert_dow(field: &str) -> Result<String, ScheduleError> {
    if field == "*" || field == "?" || field.chars().any(|c| c.is_ascii_alphabetic()) {
        return Ok(field.to_string());
    }
    let bad = || ScheduleError::Cron(format!("day-of-week field {field:?} is not valid"));
    let mut days = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| bad())?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(bad());
        }
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                a.parse::<u32>().map_err(|_| bad())?,
                b.parse::<u32>().map_err(|_| bad())?,
            )
        } else {
            let a = range.parse::<u32>().map_err(|_| bad())?;
            (a, if part.contains('/') { 6 } else { a })
        };
        if lo > 7 || hi > 7 || lo > hi {
            return Err(bad());
        }
        let mut d = lo;
        while d <= hi {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    let list: Vec<String> = (0..7)
        .filter(|d| days[*d])
        .map(|d| (d + 1).to_string())
        .collect();
    Ok(list.join(","))
}

/// The event one firing sends: type `dev.knative.sources.ping`, Knative's source URI, a new id, the
/// firing time, ceOverrides extensions, and data (JSON kept as JSON when contentType says so, so
/// structured receivers see `data` rather than `data_base64`, as Knative does).
pub fn make_event(config: &PingConfig, id: String, now: DateTime<Utc>) -> Event {
    let mut builder = EventBuilderV10::new()
        .id(id)
        .ty(PING_EVENT_TYPE)
        .source(ping_source_uri(&config.key.namespace, &config.key.name))
        .time(now);
    if let Some(data) = &config.data {
        let content_type = config.content_type.clone().unwrap_or_default();
        let json = (content_type == "application/json")
            .then(|| serde_json::from_slice::<serde_json::Value>(data).ok())
            .flatten();
        builder = match json {
            Some(value) => builder.data(content_type, value),
            None => builder.data(content_type, data.clone()),
        };
    }
    let mut event = builder.build().expect("id, type and source are always set");
    for (k, v) in &config.extensions {
        event.set_extension(k, ExtensionValue::from(v.clone()));
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use cloudevents::{AttributesReader, Data};

    #[test]
    fn five_field_schedule_fires_on_the_minute_in_its_time_zone() {
        let s = Schedule::parse("30 9 * * *", "Europe/Paris").unwrap();
        let now = Utc.with_ymd_and_hms(2024, 1, 15, 12, 0, 0).unwrap();
        // 09:30 in Paris in winter is 08:30 UTC, the next day.
        assert_eq!(
            s.next_after(now),
            Some(Utc.with_ymd_and_hms(2024, 1, 16, 8, 30, 0).unwrap())
        );
    }

    #[test]
    fn six_field_schedule_has_seconds() {
        let s = Schedule::parse("* * * * * *", "").unwrap();
        let now = Utc.with_ymd_and_hms(2024, 1, 15, 12, 0, 0).unwrap();
        assert_eq!(
            s.next_after(now),
            Some(Utc.with_ymd_and_hms(2024, 1, 15, 12, 0, 1).unwrap())
        );
    }

    #[test]
    fn days_of_week_use_standard_cron_numbering() {
        // 2024-01-15 is a Monday. "1-5" is Monday to Friday in standard cron.
        let monday = Utc.with_ymd_and_hms(2024, 1, 15, 12, 0, 0).unwrap();
        let weekdays = Schedule::parse("0 12 * * 1-5", "").unwrap();
        assert_eq!(
            weekdays.next_after(monday),
            Some(Utc.with_ymd_and_hms(2024, 1, 16, 12, 0, 0).unwrap())
        );
        for sunday in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN"] {
            let s = Schedule::parse(sunday, "").unwrap();
            assert_eq!(
                s.next_after(monday),
                Some(Utc.with_ymd_and_hms(2024, 1, 21, 0, 0, 0).unwrap()),
                "{sunday}"
            );
        }
        assert_eq!(convert_dow("*/2").unwrap(), "1,3,5,7");
        assert_eq!(convert_dow("5-7").unwrap(), "1,6,7");
        assert!(convert_dow("3-1").is_err());
    }

    #[test]
    fn bad_schedules_and_zones_are_refused() {
        assert!(matches!(
            Schedule::parse("* * *", ""),
            Err(ScheduleError::Cron(_))
        ));
        assert!(matches!(
            Schedule::parse("61 * * * *", ""),
            Err(ScheduleError::Cron(_))
        ));
        assert!(matches!(
            Schedule::parse("* * * * *", "Nowhere/Land"),
            Err(ScheduleError::Timezone(_))
        ));
        assert!(Schedule::parse("@hourly", "").is_ok());
    }

    #[test]
    fn ping_event_has_knative_type_source_data_and_overrides() {
        let config = PingConfig {
            key: crate::config::BrokerKey::new("ns", "p"),
            schedule: Schedule::parse("* * * * *", "").unwrap(),
            content_type: Some("application/json".into()),
            data: Some(br#"{"msg":"hi"}"#.to_vec()),
            sink: Default::default(),
            extensions: [("team".to_string(), "a".to_string())].into(),
        };
        let now = Utc.with_ymd_and_hms(2024, 1, 15, 12, 0, 0).unwrap();
        let e = make_event(&config, "id-1".into(), now);
        assert_eq!(e.ty(), PING_EVENT_TYPE);
        assert_eq!(e.source(), "/apis/v1/namespaces/ns/pingsources/p");
        assert_eq!(e.id(), "id-1");
        assert_eq!(e.time(), Some(&now));
        assert_eq!(e.extension("team"), Some(&ExtensionValue::from("a")));
        assert_eq!(
            e.data(),
            Some(&Data::Json(serde_json::json!({"msg": "hi"})))
        );
    }
}
