//! Knative's delivery policy (duckv1.DeliverySpec), as pure functions: ISO-8601 durations, which
//! responses are retried, how long to wait before each retry, and the dead-letter error extensions.
//! The HTTP sender that applies it lives in [`sender`].

use std::time::{Duration, SystemTime};

use base64::Engine;

pub mod sender;

/// Knative: `knativeerrordest`, `knativeerrorcode`, `knativeerrordata` (pkg/kncloudevents/attributes).
pub const ERROR_DEST_EXTENSION: &str = "knativeerrordest";
pub const ERROR_CODE_EXTENSION: &str = "knativeerrorcode";
pub const ERROR_DATA_EXTENSION: &str = "knativeerrordata";
/// Knative: KnativeErrorDataExtensionMaxLength.
pub const ERROR_DATA_MAX_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffPolicy {
    Linear,
    Exponential,
}

/// A validated DeliverySpec (without the dead-letter sink, which is a destination).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retry: u32,
    /// Knative: the backoff applies only when both backoffPolicy and backoffDelay are set; otherwise
    /// retries follow each other at once.
    pub backoff: Option<(BackoffPolicy, Duration)>,
    /// Per attempt; None waits as long as the subscriber takes.
    pub timeout: Option<Duration>,
    /// Knative (delivery-retryafter): None ignores Retry-After; Some(0) too; Some(max) honours it up to max.
    pub retry_after_max: Option<Duration>,
}

/// How one attempt ended, as far as the retry decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The subscriber answered with this status.
    Status(u16),
    /// No response: connection refused or reset, timeout, malformed response.
    NoResponse,
}

impl RetryPolicy {
    /// Knative's SelectiveRetry: retry network errors, 5xx, 404, 408, 409 and 429; not 3xx nor other
    /// 4xx (and never a 2xx, which is success).
    pub fn is_retryable(attempt: Attempt) -> bool {
        match attempt {
            Attempt::NoResponse => true,
            Attempt::Status(code) => {
                code >= 500 || matches!(code, 404 | 408 | 409 | 429) || code < 100
            }
        }
    }

    /// The wait before retry number `retry` (1 for the first retry).
    ///
    /// Knative computes `delay x retryIndex` (linear) or `delay x 2^retryIndex` (exponential), where
    /// go-retryablehttp passes the 0-based index of the attempt that failed: the first retry of a
    /// linear policy therefore follows at once and an exponential one waits `delay`. When the failed
    /// attempt was a 429 or 503 with a Retry-After and `retryAfterMax` is set, the wait is the larger of
    /// the backoff and Retry-After capped at retryAfterMax.
    pub fn backoff(&self, retry: u32, failed: Attempt, retry_after: Option<Duration>) -> Duration {
        let index = retry.saturating_sub(1);
        let backoff = match self.backoff {
            None => Duration::ZERO,
            Some((BackoffPolicy::Linear, delay)) => delay.saturating_mul(index),
            Some((BackoffPolicy::Exponential, delay)) => {
                delay.saturating_mul(2u32.saturating_pow(index.min(31)))
            }
        };
        let honoured = match (self.retry_after_max, failed, retry_after) {
            (Some(max), Attempt::Status(429 | 503), Some(wait)) if !max.is_zero() => wait.min(max),
            _ => Duration::ZERO,
        };
        backoff.max(honoured)
    }
}

/// A Retry-After header value: delay-seconds or an HTTP-date (RFC 9110 10.2.3), relative to `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an ISO-8601 duration as Knative's DeliverySpec uses them (`PT0.5S`, `PT1M`, `P1DT2H`).
///
/// Hand-written (30 lines) rather than a crate: only the day/week and time parts have a fixed length;
/// years and months are refused since they have none (Knative's period library approximates them).
pub fn parse_iso8601_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{text:?} is not an ISO-8601 duration such as PT0.5S: {why}");
    let rest = text
        .strip_prefix('P')
        .ok_or_else(|| bad("it must start with P"))?;
    if rest.is_empty() || rest == "T" {
        return Err(bad("it has no value"));
    }
    let mut total = 0f64;
    let mut in_time = false;
    let mut number = String::new();
    for c in rest.chars() {
        match c {
            'T' if !in_time && number.is_empty() => in_time = true,
            '0'..='9' | '.' | ',' => number.push(if c == ',' { '.' } else { c }),
            unit => {
                let n: f64 = number
                    .parse()
                    .map_err(|_| bad(&format!("no number before {unit}")))?;
                number.clear();
                let seconds = match (in_time, unit) {
                    (false, 'W') => 7.0 * 86400.0,
                    (false, 'D') => 86400.0,
                    (true, 'H') => 3600.0,
                    (true, 'M') => 60.0,
                    (true, 'S') => 1.0,
                    (false, 'Y' | 'M') => {
                        return Err(bad("years and months have no fixed length; use days"));
                    }
                    _ => return Err(bad(&format!("unexpected {unit:?}"))),
                };
                total += n * seconds;
            }
        }
    }
    if !number.is_empty() {
        return Err(bad("a number has no unit"));
    }
    Duration::try_from_secs_f64(total).map_err(|e| bad(&e.to_string()))
}

/// The three Knative error extensions added to an event sent to the dead-letter sink: the URL that
/// failed, the last status (500 when there was no response, as Knative's dispatcher reports) and the
/// last response body base64-encoded, cut to 1024 characters.
pub fn error_extensions(
    destination: &str,
    code: Option<u16>,
    body: &[u8],
) -> [(String, String); 3] {
    let mut data = base64::engine::general_purpose::STANDARD.encode(body);
    data.truncate(ERROR_DATA_MAX_LEN);
    [
        (ERROR_DEST_EXTENSION.to_string(), destination.to_string()),
        (
            ERROR_CODE_EXTENSION.to_string(),
            code.unwrap_or(500).to_string(),
        ),
        (ERROR_DATA_EXTENSION.to_string(), data),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn retried_statuses_are_knatives_selective_retry() {
        for (attempt, retried) in [
            (Attempt::NoResponse, true),
            (Attempt::Status(500), true),
            (Attempt::Status(503), true),
            (Attempt::Status(404), true),
            (Attempt::Status(408), true),
            (Attempt::Status(409), true),
            (Attempt::Status(429), true),
            (Attempt::Status(400), false),
            (Attempt::Status(401), false),
            (Attempt::Status(410), false),
            (Attempt::Status(302), false),
            (Attempt::Status(200), false),
        ] {
            assert_eq!(RetryPolicy::is_retryable(attempt), retried, "{attempt:?}");
        }
    }

    #[test]
    fn backoff_follows_knative_formulas_with_zero_based_index() {
        let linear = RetryPolicy {
            retry: 5,
            backoff: Some((BackoffPolicy::Linear, ms(100))),
            ..Default::default()
        };
        let exponential = RetryPolicy {
            retry: 5,
            backoff: Some((BackoffPolicy::Exponential, ms(100))),
            ..Default::default()
        };
        let failed = Attempt::Status(500);
        let table = [(1, 0, 100), (2, 100, 200), (3, 200, 400), (4, 300, 800)];
        for (retry, lin, exp) in table {
            assert_eq!(
                linear.backoff(retry, failed, None),
                ms(lin),
                "linear {retry}"
            );
            assert_eq!(
                exponential.backoff(retry, failed, None),
                ms(exp),
                "exp {retry}"
            );
        }
        assert_eq!(RetryPolicy::default().backoff(3, failed, None), ms(0));
    }

    #[test]
    fn retry_after_is_honoured_only_with_retry_after_max_and_capped() {
        let mut policy = RetryPolicy {
            retry: 3,
            backoff: Some((BackoffPolicy::Linear, ms(100))),
            ..Default::default()
        };
        let wait = Some(Duration::from_secs(5));
        assert_eq!(policy.backoff(2, Attempt::Status(429), wait), ms(100));
        policy.retry_after_max = Some(Duration::from_secs(2));
        assert_eq!(
            policy.backoff(2, Attempt::Status(429), wait),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy.backoff(2, Attempt::Status(503), Some(ms(300))),
            ms(300)
        );
        // Only 429 and 503 carry a Retry-After that counts.
        assert_eq!(policy.backoff(2, Attempt::Status(500), wait), ms(100));
        policy.retry_after_max = Some(Duration::ZERO);
        assert_eq!(policy.backoff(2, Attempt::Status(429), wait), ms(100));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn iso8601_durations_parse_time_and_day_parts() {
        for (text, want) in [
            ("PT0.2S", ms(200)),
            ("PT1S", ms(1000)),
            ("PT1M30S", ms(90_000)),
            ("PT2H", ms(7_200_000)),
            ("P1D", ms(86_400_000)),
            ("P1DT1S", ms(86_401_000)),
            ("P1W", ms(604_800_000)),
            ("PT0,5S", ms(500)),
        ] {
            assert_eq!(parse_iso8601_duration(text), Ok(want), "{text}");
        }
        for text in [
            "", "P", "PT", "1S", "PT1", "P1M", "P1Y", "PTS", "PT1X", "P1H",
        ] {
            assert!(parse_iso8601_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn error_extensions_encode_body_base64_and_cut_at_1024() {
        let [dest, code, data] = error_extensions("http://sub/", Some(503), b"busy");
        assert_eq!(dest.1, "http://sub/");
        assert_eq!(code.1, "503");
        assert_eq!(data.1, "YnVzeQ==");
        let [_, code, data] = error_extensions("http://sub/", None, &[b'x'; 4000]);
        assert_eq!(code.1, "500");
        assert_eq!(data.1.len(), ERROR_DATA_MAX_LEN);
    }
}
