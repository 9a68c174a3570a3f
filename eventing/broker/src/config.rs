//! Knative Broker, Trigger and PingSource objects validated into the broker's own types, with errors
//! that name the field to fix (`trigger default/t: spec.delivery.backoffDelay: ...`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use sluice_api::eventing::{
    Broker, DELIVERY_ORDER_ANNOTATION, DeliverySpec, Destination, PingSource,
    RABBITMQ_PARALLELISM_ANNOTATION, Trigger,
};
use sluice_api::filters::{SubscriptionsApiFilter, TriggerFilter};
use sluice_api::validation::FieldError;

use crate::delivery::{BackoffPolicy, RetryPolicy, parse_iso8601_duration};

/// The objects the broker runs, as read from YAML or the API server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventingObjects {
    pub brokers: Vec<Broker>,
    pub triggers: Vec<Trigger>,
    pub pingsources: Vec<PingSource>,
    /// `config-br-defaults` in knative-eventing, when the folder has one (else Knative's shipped
    /// defaults apply, see [`crate::defaults`]).
    pub br_defaults: Option<sluice_api::core::ConfigMap>,
    /// What `RabbitMQBroker` Brokers name in `spec.config`, and the Secrets those name.
    pub rabbitmq_configs: Vec<sluice_api::eventing::RabbitmqBrokerConfig>,
    pub secrets: Vec<sluice_api::core::Secret>,
}

impl EventingObjects {
    /// Keeps the eventing objects of a parsed folder, skipping every other kind.
    pub fn from_objects(objects: impl IntoIterator<Item = sluice_api::Object>) -> Self {
        let mut out = EventingObjects::default();
        for object in objects {
            match object {
                sluice_api::Object::Broker(b) => out.brokers.push(b),
                sluice_api::Object::Trigger(t) => out.triggers.push(t),
                sluice_api::Object::PingSource(p) => out.pingsources.push(p),
                sluice_api::Object::RabbitmqBrokerConfig(c) => out.rabbitmq_configs.push(c),
                sluice_api::Object::Secret(s) => out.secrets.push(s),
                sluice_api::Object::ConfigMap(cm)
                    if cm.metadata.namespace == crate::defaults::NAMESPACE
                        && cm.metadata.name == crate::defaults::CONFIG_MAP =>
                {
                    out.br_defaults = Some(cm)
                }
                _ => {}
            }
        }
        out
    }
}

/// `namespace/name` of a Broker (or of any namespaced object).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerKey {
    pub namespace: String,
    pub name: String,
}

impl BrokerKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        BrokerKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for BrokerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object that cannot run, and every field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {key}: {}", render(.errors))]
pub struct ConfigError {
    pub kind: &'static str,
    pub key: String,
    pub errors: Vec<FieldError>,
}

fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the broker reaches things a Destination names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Where the gateway listens: Knative Services are reached through it.
    pub gateway: SocketAddr,
    /// The domain of Service hosts: `<name>.<namespace>.<domain>`.
    pub domain: String,
    /// The port in Service URLs (the gateway's public port, 8080 for `sluice up`).
    pub public_port: u16,
}

/// Where a delivery goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An HTTP endpoint: connect to `uri` with Host `host` (when set; Knative Services through the
    /// gateway). `display` is the URL shown in status and in `knativeerrordest`.
    Http {
        uri: http::Uri,
        host: Option<String>,
        display: String,
    },
    /// One of this process's brokers: appended to its log directly.
    Broker(BrokerKey),
}

impl Target {
    pub fn display(&self, broker_url: &dyn Fn(&BrokerKey) -> String) -> String {
        match self {
            Target::Http { display, .. } => display.clone(),
            Target::Broker(key) => broker_url(key),
        }
    }
}

/// Why a destination cannot be resolved (Knative: SubscriberResolved / SinkProvided False).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

impl Resolver {
    /// Resolves a Destination in `namespace`: a uri as is; a ref to a Knative Service through the
    /// gateway; a ref to a Broker to that broker. Knative's ref+uri (uri relative to the ref's address)
    /// appends the uri's path.
    pub fn resolve(&self, namespace: &str, dest: &Destination) -> Result<Target, Unresolved> {
        let Some(reference) = &dest.ref_ else {
            let Some(uri) = dest.uri.as_deref().filter(|u| !u.is_empty()) else {
                return Err(Unresolved {
                    reason: "NoDestination",
                    message: "neither ref nor uri is set".into(),
                });
            };
            let parsed: http::Uri = uri.parse().map_err(|e| Unresolved {
                reason: "InvalidURI",
                message: format!("uri {uri:?}: {e}"),
            })?;
            if parsed.scheme_str() != Some("http") || parsed.authority().is_none() {
                return Err(Unresolved {
                    reason: "InvalidURI",
                    message: format!("uri {uri:?}: want an absolute http:// URL"),
                });
            }
            return Ok(Target::Http {
                uri: parsed,
                host: None,
                display: uri.to_string(),
            });
        };
        let ns = if reference.namespace.is_empty() {
            namespace
        } else {
            &reference.namespace
        };
        let path = dest
            .uri
            .as_deref()
            .filter(|u| u.starts_with('/'))
            .unwrap_or("/");
        match (reference.api_version.as_str(), reference.kind.as_str()) {
            (v, "Service") if v.starts_with("serving.knative.dev/") => {
                let host = format!("{}.{ns}.{}", reference.name, self.domain);
                let authority = if self.public_port == 80 {
                    host.clone()
                } else {
                    format!("{host}:{}", self.public_port)
                };
                let uri = format!("http://{}{path}", self.gateway)
                    .parse()
                    .map_err(|e| Unresolved {
                        reason: "InvalidURI",
                        message: format!("{e}"),
                    })?;
                Ok(Target::Http {
                    uri,
                    display: format!("http://{authority}{path}"),
                    host: Some(authority),
                })
            }
            (v, "Broker") if v.starts_with("eventing.knative.dev/") => {
                Ok(Target::Broker(BrokerKey::new(ns, &reference.name)))
            }
            (v, k) => Err(Unresolved {
                reason: "NotAddressable",
                message: format!(
                    "ref to {k} {ns}/{} ({v}): Sluice resolves only serving.knative.dev Services \
                     and eventing.knative.dev Brokers; use a uri",
                    reference.name
                ),
            }),
        }
    }
}

/// A validated DeliverySpec: retry policy and an optional dead-letter sink (still to resolve).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    pub retry: RetryPolicy,
    pub dead_letter_sink: Option<Destination>,
}

/// Validates a DeliverySpec found at `path` (e.g. `spec.delivery`).
pub fn delivery(path: &str, spec: &DeliverySpec, errors: &mut Vec<FieldError>) -> Delivery {
    let mut field = |name: &str, message: String| {
        errors.push(FieldError {
            field: format!("{path}.{name}"),
            message,
        })
    };
    let mut out = Delivery {
        dead_letter_sink: spec.dead_letter_sink.clone(),
        ..Default::default()
    };
    match spec.retry {
        Some(r) if r < 0 => field("retry", format!("must be >= 0, got {r}")),
        Some(r) => out.retry.retry = r as u32,
        None => {}
    }
    let mut duration = |name: &str, value: &Option<String>| -> Option<Duration> {
        let text = value.as_deref()?;
        match parse_iso8601_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                field(name, e);
                None
            }
        }
    };
    let delay = duration("backoffDelay", &spec.backoff_delay);
    out.retry.timeout = duration("timeout", &spec.timeout).filter(|d| !d.is_zero());
    out.retry.retry_after_max = duration("retryAfterMax", &spec.retry_after_max);
    let policy = match spec.backoff_policy.as_deref() {
        None => None,
        Some("linear") => Some(BackoffPolicy::Linear),
        Some("exponential") => Some(BackoffPolicy::Exponential),
        Some(other) => {
            errors.push(FieldError {
                field: format!("{path}.backoffPolicy"),
                message: format!("invalid value {other:?}, want linear or exponential"),
            });
            None
        }
    };
    // Knative: the backoff applies only when both policy and delay are set.
    out.retry.backoff = policy.zip(delay);
    if let Some(dls) = &spec.dead_letter_sink
        && dls.ref_.is_none()
        && dls.uri.as_deref().unwrap_or("").is_empty()
    {
        errors.push(FieldError {
            field: format!("{path}.deadLetterSink"),
            message: "expected at least one, got none: ref, uri".into(),
        });
    }
    out
}

/// A validated Trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerConfig {
    pub key: BrokerKey,
    pub broker: BrokerKey,
    pub filter: TriggerFilter,
    pub filters: Vec<SubscriptionsApiFilter>,
    pub subscriber: Destination,
    /// The Trigger's own delivery; None falls back to the Broker's.
    pub delivery: Option<Delivery>,
    /// `kafka.eventing.knative.dev/delivery.order: ordered`, or RabbitMQ's parallelism 1.
    pub ordered: bool,
    /// `rabbitmq.eventing.knative.dev/parallelism`: deliveries in flight (else the broker's default).
    pub parallelism: Option<usize>,
}

/// Validates a Trigger (Knative's webhook checks that matter at run time).
pub fn trigger(t: &Trigger) -> Result<TriggerConfig, ConfigError> {
    let mut errors = Vec::new();
    let ns = &t.metadata.namespace;
    if t.spec.broker.is_empty() {
        errors.push(FieldError {
            field: "spec.broker".into(),
            message: "missing field(s)".into(),
        });
    }
    let s = &t.spec.subscriber;
    if s.ref_.is_none() && s.uri.as_deref().unwrap_or("").is_empty() {
        errors.push(FieldError {
            field: "spec.subscriber".into(),
            message: "expected at least one, got none: ref, uri".into(),
        });
    }
    let delivery = t
        .spec
        .delivery
        .as_ref()
        .map(|d| delivery("spec.delivery", d, &mut errors));
    let ordered = match t.metadata.annotations.get(DELIVERY_ORDER_ANNOTATION) {
        None => false,
        Some(v) if v == "ordered" => true,
        Some(v) if v == "unordered" => false,
        Some(v) => {
            errors.push(FieldError {
                field: format!("metadata.annotations[{DELIVERY_ORDER_ANNOTATION}]"),
                message: format!("invalid value {v:?}, want ordered or unordered"),
            });
            false
        }
    };
    let parallelism = match t.metadata.annotations.get(RABBITMQ_PARALLELISM_ANNOTATION) {
        None => None,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Some(n),
            _ => {
                errors.push(FieldError {
                    field: format!("metadata.annotations[{RABBITMQ_PARALLELISM_ANNOTATION}]"),
                    message: format!("invalid value {v:?}, want a whole number from 1 to 1000"),
                });
                None
            }
        },
    };
    // Knative's RabbitMQ broker: a parallelism of 1 delivers one event at a time, in order.
    let ordered = ordered || parallelism == Some(1);
    let filter = t.spec.filter.clone().unwrap_or_default();
    for name in filter.attributes.keys() {
        if name.is_empty() {
            errors.push(FieldError {
                field: "spec.filter.attributes".into(),
                message: "attribute names must not be empty".into(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError {
            kind: "trigger",
            key: t.metadata.key(),
            errors,
        });
    }
    Ok(TriggerConfig {
        key: BrokerKey::new(ns, &t.metadata.name),
        broker: BrokerKey::new(ns, &t.spec.broker),
        filter,
        filters: t.spec.filters.clone(),
        subscriber: s.clone(),
        delivery,
        ordered,
        parallelism,
    })
}

/// A validated Broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    pub key: BrokerKey,
    pub delivery: Option<Delivery>,
}

///
/// Knative: a Broker without `spec.delivery` gets the delivery of `config-br-defaults` for its
/// namespace (the webhook's SetDefaults); an error there is reported with the ConfigMap's path.
pub fn broker(
    b: &Broker,
    defaults: &crate::defaults::BrokerDefaults,
) -> Result<BrokerConfig, ConfigError> {
    let mut errors = Vec::new();
    let delivery = match &b.spec.delivery {
        Some(d) => Some(delivery("spec.delivery", d, &mut errors)),
        None => defaults.delivery(&b.metadata.namespace).map(|d| {
            delivery(
                &format!(
                    "{}/{}: data.{}: delivery",
                    crate::defaults::NAMESPACE,
                    crate::defaults::CONFIG_MAP,
                    crate::defaults::KEY
                ),
                d,
                &mut errors,
            )
        }),
    };
    if !errors.is_empty() {
        return Err(ConfigError {
            kind: "broker",
            key: b.metadata.key(),
            errors,
        });
    }
    Ok(BrokerConfig {
        key: BrokerKey::new(&b.metadata.namespace, &b.metadata.name),
        delivery,
    })
}

/// A validated PingSource.
#[derive(Debug, Clone, PartialEq)]
pub struct PingConfig {
    pub key: BrokerKey,
    pub schedule: crate::ping::Schedule,
    pub content_type: Option<String>,
    pub data: Option<Vec<u8>>,
    pub sink: Destination,
    pub extensions: BTreeMap<String, String>,
}

pub fn pingsource(p: &PingSource) -> Result<PingConfig, ConfigError> {
    let mut errors = Vec::new();
    let spec = &p.spec;
    let mut push = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.into(),
            message,
        })
    };
    // Knative: PingSource defaults the schedule to every minute.
    let cron = if spec.schedule.is_empty() {
        "* * * * *"
    } else {
        &spec.schedule
    };
    let schedule = match crate::ping::Schedule::parse(cron, &spec.timezone) {
        Ok(s) => Some(s),
        Err(crate::ping::ScheduleError::Timezone(m)) => {
            push("spec.timezone", m);
            None
        }
        Err(crate::ping::ScheduleError::Cron(m)) => {
            push("spec.schedule", m);
            None
        }
    };
    if !spec.data.is_empty() && !spec.data_base64.is_empty() {
        push(
            "spec.data, spec.dataBase64",
            "expected exactly one, got both".into(),
        );
    }
    let mut data = None;
    if !spec.data_base64.is_empty() {
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(spec.data_base64.trim()) {
            Ok(d) => data = Some(d),
            Err(e) => push("spec.dataBase64", format!("not base64: {e}")),
        }
    } else if !spec.data.is_empty() {
        if spec.content_type == "application/json"
            && serde_json::from_str::<serde_json::Value>(&spec.data).is_err()
        {
            push(
                "spec.data",
                "contentType is application/json but data is not JSON".into(),
            );
        }
        data = Some(spec.data.clone().into_bytes());
    }
    let sink = &spec.sink;
    if sink.ref_.is_none() && sink.uri.as_deref().unwrap_or("").is_empty() {
        push(
            "spec.sink",
            "expected at least one, got none: ref, uri".into(),
        );
    }
    let mut extensions = BTreeMap::new();
    if let Some(o) = &spec.ce_overrides {
        for (k, v) in &o.extensions {
            if !crate::codec::is_valid_extension_name(k) {
                push(
                    &format!("spec.ceOverrides.extensions[{k}]"),
                    "extension names are lowercase letters and digits".into(),
                );
            }
            extensions.insert(k.clone(), v.clone());
        }
    }
    match schedule {
        Some(schedule) if errors.is_empty() => Ok(PingConfig {
            key: BrokerKey::new(&p.metadata.namespace, &p.metadata.name),
            schedule,
            content_type: (!spec.content_type.is_empty()).then(|| spec.content_type.clone()),
            data,
            sink: sink.clone(),
            extensions,
        }),
        _ => Err(ConfigError {
            kind: "pingsource",
            key: p.metadata.key(),
            errors,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::eventing::KReference;

    fn parse_one(yaml: &str) -> sluice_api::Object {
        sluice_api::parse_documents(yaml).remove(0).unwrap()
    }

    fn resolver() -> Resolver {
        Resolver {
            gateway: "127.0.0.1:8080".parse().unwrap(),
            domain: "localhost".into(),
            public_port: 8080,
        }
    }

    #[test]
    fn service_ref_resolves_through_the_gateway_with_its_host() {
        let dest = Destination {
            ref_: Some(KReference {
                api_version: "serving.knative.dev/v1".into(),
                kind: "Service".into(),
                name: "display".into(),
                namespace: String::new(),
            }),
            ..Default::default()
        };
        let Target::Http { uri, host, display } = resolver().resolve("ns", &dest).unwrap() else {
            panic!()
        };
        assert_eq!(uri, "http://127.0.0.1:8080/");
        assert_eq!(host.as_deref(), Some("display.ns.localhost:8080"));
        assert_eq!(display, "http://display.ns.localhost:8080/");
    }

    #[test]
    fn uri_is_used_as_is_and_broker_ref_stays_internal() {
        let dest = Destination {
            uri: Some("http://127.0.0.1:9/x".into()),
            ..Default::default()
        };
        assert!(matches!(
            resolver().resolve("ns", &dest),
            Ok(Target::Http { host: None, .. })
        ));
        let broker = Destination {
            ref_: Some(KReference {
                api_version: "eventing.knative.dev/v1".into(),
                kind: "Broker".into(),
                name: "default".into(),
                namespace: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(
            resolver().resolve("ns", &broker),
            Ok(Target::Broker(BrokerKey::new("ns", "default")))
        );
        let other = Destination {
            ref_: Some(KReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: "x".into(),
                namespace: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(
            resolver().resolve("ns", &other).unwrap_err().reason,
            "NotAddressable"
        );
        let relative = Destination {
            uri: Some("/x".into()),
            ..Default::default()
        };
        assert!(resolver().resolve("ns", &relative).is_err());
    }

    #[test]
    fn trigger_errors_name_each_field() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: t
  annotations: {kafka.eventing.knative.dev/delivery.order: sometimes}
spec:
  subscriber: {}
  delivery: {retry: -1, backoffPolicy: cubic, backoffDelay: PT1, timeout: P1M}
"#;
        let sluice_api::Object::Trigger(t) = parse_one(yaml) else {
            panic!()
        };
        let err = trigger(&t).unwrap_err().to_string();
        for want in [
            "trigger default/t",
            "spec.broker: missing",
            "spec.subscriber: expected at least one",
            "spec.delivery.retry: must be >= 0",
            "spec.delivery.backoffPolicy: invalid value \"cubic\"",
            "spec.delivery.backoffDelay",
            "spec.delivery.timeout",
            "delivery.order]: invalid value \"sometimes\"",
        ] {
            assert!(err.contains(want), "{err}\n  should contain {want}");
        }
    }

    #[test]
    fn trigger_delivery_and_order_are_read() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: t
  annotations: {kafka.eventing.knative.dev/delivery.order: ordered}
spec:
  broker: b
  subscriber: {uri: "http://127.0.0.1:1/"}
  delivery: {retry: 2, backoffPolicy: linear, backoffDelay: PT0.1S, timeout: PT2S, retryAfterMax: PT5S}
"#;
        let sluice_api::Object::Trigger(t) = parse_one(yaml) else {
            panic!()
        };
        let c = trigger(&t).unwrap();
        assert!(c.ordered);
        assert_eq!(c.broker, BrokerKey::new("default", "b"));
        let d = c.delivery.unwrap().retry;
        assert_eq!(d.retry, 2);
        assert_eq!(
            d.backoff,
            Some((BackoffPolicy::Linear, Duration::from_millis(100)))
        );
        assert_eq!(d.timeout, Some(Duration::from_secs(2)));
        assert_eq!(d.retry_after_max, Some(Duration::from_secs(5)));
    }

    #[test]
    fn pingsource_errors_name_each_field() {
        let yaml = r#"
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {name: p}
spec:
  schedule: "not a cron"
  timezone: Mars/Olympus
  data: x
  dataBase64: eA==
  sink: {}
"#;
        let sluice_api::Object::PingSource(p) = parse_one(yaml) else {
            panic!()
        };
        let err = pingsource(&p).unwrap_err().to_string();
        for want in [
            "spec.timezone",
            "spec.data, spec.dataBase64: expected exactly one",
            "spec.sink: expected at least one",
        ] {
            assert!(err.contains(want), "{err}\n  should contain {want}");
        }
    }
}
