//! The filter's plugin configuration: JSON (given to Envoy as a `google.protobuf.StringValue`), parsed with
//! serde and validated into a [`Config`] that cannot hold an invalid state.
//!
//! ```json
//! {"namespace": "default", "revision": "hello-00001", "service": "hello", "instance": "hello-00001-1",
//!  "containerConcurrency": 1, "queueDepth": 10, "timeoutSeconds": 300, "queueTimeoutMs": 300000,
//!  "ready": true,
//!  "readinessProbe": {"cluster": "instance_hello-00001-1", "path": "/healthz", "periodMs": 1000}}
//! ```

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Knative's default revision timeout (`timeoutSeconds`).
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
/// Knative: the queue depth is 10 x containerConcurrency.
pub const QUEUE_DEPTH_PER_SLOT: u32 = 10;

/// A configuration the filter refuses to start with; the text names the key to fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no plugin configuration: want a JSON object with namespace, revision and instance")]
    Missing,
    #[error("not valid JSON for the queue-proxy: {0}")]
    Json(String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The JSON as written; `deny_unknown_fields` so a misspelt key fails the start instead of being ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    namespace: String,
    revision: String,
    #[serde(default)]
    service: String,
    instance: String,
    #[serde(default)]
    container_concurrency: u32,
    queue_depth: Option<u32>,
    timeout_seconds: Option<u64>,
    queue_timeout_ms: Option<u64>,
    ready: Option<bool>,
    readiness_probe: Option<RawProbe>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProbe {
    cluster: String,
    path: Option<String>,
    authority: Option<String>,
    period_ms: Option<u64>,
    timeout_ms: Option<u64>,
    failure_threshold: Option<u32>,
}

/// Which revision instance this filter stands in front of. Names are Kubernetes names (lowercase
/// alphanumerics, '-' and '.'), so they can go into metric names unambiguously (see [`crate::names`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub revision: String,
    pub service: String,
    pub instance: String,
}

/// The breaker's limits; only present when containerConcurrency > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// containerConcurrency: requests in flight to the instance at most.
    pub capacity: u32,
    /// Requests that may wait for a slot; more are answered 503 at once.
    pub queue_depth: u32,
}

/// How the filter knows the instance is ready (for `K-Network-Probe: queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Given by configuration: the control plane checked the instance itself.
    Static(bool),
    /// An HTTP GET to the instance through an Envoy cluster on every period; ready after one answer in
    /// 200..400 (Kubernetes httpGet), not ready after `failure_threshold` failures in a row.
    Probe(ProbeConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub identity: Identity,
    /// None when containerConcurrency is 0: Knative runs no breaker then.
    pub limits: Option<Limits>,
    /// The revision's timeoutSeconds (documented; the route enforces it on proxied requests).
    pub timeout: Duration,
    /// How long a request may wait for a slot before it is answered 503.
    pub queue_timeout: Duration,
    pub readiness: Readiness,
}

/// Whether the plugin configuration is `{"vmKeeper": true}`: the instance Sluice loads at Envoy's
/// start only so that the VM (and its compiled module) outlives the instance listeners. It serves no
/// revision.
pub fn is_vm_keeper(raw: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Keeper {
        #[serde(rename = "vmKeeper")]
        vm_keeper: bool,
    }
    serde_json::from_slice::<Keeper>(raw).is_ok_and(|k| k.vm_keeper)
}

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(raw: &[u8]) -> Result<Config, ConfigError> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Missing);
        }
        let raw: RawConfig =
            serde_json::from_slice(raw).map_err(|e| ConfigError::Json(e.to_string()))?;
        raw.validate()
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        check_name("namespace", &self.namespace, true)?;
        check_name("revision", &self.revision, true)?;
        check_name("service", &self.service, false)?;
        check_name("instance", &self.instance, true)?;

        let limits = match (self.container_concurrency, self.queue_depth) {
            (0, Some(_)) => {
                return Err(invalid(
                    "queueDepth",
                    "set without containerConcurrency: with containerConcurrency 0 there is no breaker",
                ));
            }
            (0, None) => None,
            (capacity, depth) => Some(Limits {
                capacity,
                queue_depth: depth.unwrap_or_else(|| capacity.saturating_mul(QUEUE_DEPTH_PER_SLOT)),
            }),
        };

        let timeout_seconds = self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        if timeout_seconds == 0 {
            return Err(invalid("timeoutSeconds", "must be at least 1"));
        }
        let timeout = Duration::from_secs(timeout_seconds);
        let queue_timeout = match self.queue_timeout_ms {
            Some(0) => return Err(invalid("queueTimeoutMs", "must be at least 1")),
            Some(ms) => Duration::from_millis(ms),
            // Knative: a queued request waits at most for the revision's timeout.
            None => timeout,
        };

        let readiness = match (self.readiness_probe, self.ready) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "ready",
                    "set together with readinessProbe: give one or the other",
                ));
            }
            (Some(probe), None) => Readiness::Probe(probe.validate()?),
            (None, ready) => Readiness::Static(ready.unwrap_or(true)),
        };

        Ok(Config {
            identity: Identity {
                namespace: self.namespace,
                revision: self.revision,
                service: self.service,
                instance: self.instance,
            },
            limits,
            timeout,
            queue_timeout,
            readiness,
        })
    }
}

impl RawProbe {
    fn validate(self) -> Result<ProbeConfig, ConfigError> {
        if self.cluster.is_empty() {
            return Err(invalid(
                "readinessProbe.cluster",
                "must name the Envoy cluster of the instance",
            ));
        }
        let path = self.path.unwrap_or_else(|| "/".to_string());
        if !path.starts_with('/') {
            return Err(invalid(
                "readinessProbe.path",
                format!("{path:?} must start with '/'"),
            ));
        }
        let period_ms = self.period_ms.unwrap_or(1000);
        if period_ms < 100 {
            return Err(invalid(
                "readinessProbe.periodMs",
                format!("{period_ms} is below the minimum of 100"),
            ));
        }
        let timeout_ms = self.timeout_ms.unwrap_or(1000);
        if timeout_ms == 0 {
            return Err(invalid("readinessProbe.timeoutMs", "must be at least 1"));
        }
        let failure_threshold = self.failure_threshold.unwrap_or(3);
        if failure_threshold == 0 {
            return Err(invalid(
                "readinessProbe.failureThreshold",
                "must be at least 1",
            ));
        }
        Ok(ProbeConfig {
            authority: self.authority.unwrap_or_else(|| self.cluster.clone()),
            cluster: self.cluster,
            path,
            period: Duration::from_millis(period_ms),
            timeout: Duration::from_millis(timeout_ms),
            failure_threshold,
        })
    }
}

/// Kubernetes names: lowercase alphanumerics, '-' and '.', starting and ending with an alphanumeric, at
/// most 253 characters. Two non-alphanumerics in a row are refused too: metric names turn both into '_'
/// and join the parts with "__", which must stay unambiguous (see [`crate::names`]).
fn check_name(key: &'static str, value: &str, required: bool) -> Result<(), ConfigError> {
    if value.is_empty() {
        return if required {
            Err(invalid(key, "is required"))
        } else {
            Ok(())
        };
    }
    if value.len() > 253 {
        return Err(invalid(
            key,
            format!("{} characters, at most 253", value.len()),
        ));
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if let Some(bad) = value
        .bytes()
        .find(|&c| !(alnum(c) || c == b'-' || c == b'.'))
    {
        return Err(invalid(
            key,
            format!(
                "{value:?} has {:?}: want lowercase letters, digits, '-' and '.'",
                bad as char
            ),
        ));
    }
    let bytes = value.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(invalid(
            key,
            format!("{value:?} must start and end with a letter or digit"),
        ));
    }
    if bytes.windows(2).any(|w| !alnum(w[0]) && !alnum(w[1])) {
        return Err(invalid(
            key,
            format!(
                "{value:?} has two non-alphanumerics in a row, which would make its metric names ambiguous"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes())
    }

    const MINIMAL: &str =
        r#"{"namespace": "default", "revision": "hello-00001", "instance": "hello-00001-1"}"#;

    #[test]
    fn minimal_config_has_no_breaker_and_knative_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.identity.namespace, "default");
        assert_eq!(config.identity.revision, "hello-00001");
        assert_eq!(config.identity.instance, "hello-00001-1");
        assert_eq!(config.identity.service, "");
        assert_eq!(config.limits, None);
        assert_eq!(config.timeout, Duration::from_secs(300));
        assert_eq!(config.queue_timeout, Duration::from_secs(300));
        assert_eq!(config.readiness, Readiness::Static(true));
    }

    #[test]
    fn queue_depth_defaults_to_ten_times_container_concurrency() {
        let config = parse(
            r#"{"namespace": "n", "revision": "r", "instance": "i", "containerConcurrency": 4}"#,
        )
        .unwrap();
        assert_eq!(
            config.limits,
            Some(Limits {
                capacity: 4,
                queue_depth: 40
            })
        );
    }

    #[test]
    fn explicit_queue_depth_and_timeouts_are_kept() {
        let config = parse(
            r#"{"namespace": "n", "revision": "r", "service": "s", "instance": "i",
                "containerConcurrency": 2, "queueDepth": 0, "timeoutSeconds": 30, "queueTimeoutMs": 250}"#,
        )
        .unwrap();
        assert_eq!(
            config.limits,
            Some(Limits {
                capacity: 2,
                queue_depth: 0
            })
        );
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert_eq!(config.queue_timeout, Duration::from_millis(250));
        assert_eq!(config.identity.service, "s");
    }

    #[test]
    fn queue_timeout_defaults_to_the_revision_timeout() {
        let config =
            parse(r#"{"namespace": "n", "revision": "r", "instance": "i", "timeoutSeconds": 7}"#)
                .unwrap();
        assert_eq!(config.queue_timeout, Duration::from_secs(7));
    }

    #[test]
    fn readiness_probe_defaults() {
        let config = parse(
            r#"{"namespace": "n", "revision": "r", "instance": "i", "readinessProbe": {"cluster": "c"}}"#,
        )
        .unwrap();
        assert_eq!(
            config.readiness,
            Readiness::Probe(ProbeConfig {
                cluster: "c".into(),
                path: "/".into(),
                authority: "c".into(),
                period: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                failure_threshold: 3,
            })
        );
    }

    #[test]
    fn bad_configs_name_the_key_to_fix() {
        let cases: &[(&str, &str)] = &[
            ("", "no plugin configuration"),
            ("  \n", "no plugin configuration"),
            ("{", "not valid JSON"),
            (
                r#"{"namespace": "n", "revision": "r"}"#,
                "missing field `instance`",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "containerConcurency": 1}"#,
                "unknown field `containerConcurency`",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "containerConcurrency": -1}"#,
                "invalid value: integer `-1`",
            ),
            (
                r#"{"namespace": "", "revision": "r", "instance": "i"}"#,
                "namespace: is required",
            ),
            (
                r#"{"namespace": "N", "revision": "r", "instance": "i"}"#,
                "namespace: \"N\" has 'N'",
            ),
            (
                r#"{"namespace": "n", "revision": "r_1", "instance": "i"}"#,
                "revision: \"r_1\" has '_'",
            ),
            (
                r#"{"namespace": "n", "revision": "-r", "instance": "i"}"#,
                "revision: \"-r\" must start and end",
            ),
            (
                r#"{"namespace": "n", "revision": "a--b", "instance": "i"}"#,
                "two non-alphanumerics in a row",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "queueDepth": 3}"#,
                "queueDepth: set without containerConcurrency",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "timeoutSeconds": 0}"#,
                "timeoutSeconds: must be at least 1",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "queueTimeoutMs": 0}"#,
                "queueTimeoutMs: must be at least 1",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "ready": true, "readinessProbe": {"cluster": "c"}}"#,
                "ready: set together with readinessProbe",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "readinessProbe": {"cluster": ""}}"#,
                "readinessProbe.cluster",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "readinessProbe": {"cluster": "c", "path": "x"}}"#,
                "readinessProbe.path: \"x\" must start with '/'",
            ),
            (
                r#"{"namespace": "n", "revision": "r", "instance": "i", "readinessProbe": {"cluster": "c", "periodMs": 10}}"#,
                "readinessProbe.periodMs: 10 is below the minimum of 100",
            ),
        ];
        for (json, want) in cases {
            let err = parse(json).expect_err(json).to_string();
            assert!(
                err.contains(want),
                "{json}: got {err:?}, want it to contain {want:?}"
            );
        }
    }

    #[test]
    fn only_the_exact_keeper_configuration_is_a_vm_keeper() {
        assert!(is_vm_keeper(br#"{"vmKeeper": true}"#));
        assert!(is_vm_keeper(br#" {"vmKeeper":true} "#));
        for other in [
            &br#"{"vmKeeper": false}"#[..],
            br#"{"vmKeeper": true, "revision": "r"}"#,
            br#"{"namespace": "n", "revision": "r", "instance": "i"}"#,
            b"",
            b"vmKeeper",
        ] {
            assert!(!is_vm_keeper(other), "{}", String::from_utf8_lossy(other));
        }
        // A keeper is not a revision's configuration.
        assert!(Config::parse(br#"{"vmKeeper": true}"#).is_err());
    }
}
