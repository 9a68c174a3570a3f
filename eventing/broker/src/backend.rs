//! Which store a Broker's events live in (pure): the embedded log, or RabbitMQ for a Broker of class
//! `RabbitMQBroker` whose `spec.config` names a `RabbitmqBrokerConfig`, as Knative's RabbitMQ broker
//! reads them (knative-extensions/eventing-rabbitmq).

use base64::Engine;
use sluice_api::core::Secret;
use sluice_api::eventing::{
    BROKER_CLASS_ANNOTATION, Broker, RABBITMQ_API_VERSION, RABBITMQ_BROKER_CLASS,
    RABBITMQ_BROKER_CONFIG_KIND,
};

use crate::config::EventingObjects;

/// Where a Broker keeps its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Log,
    RabbitMq(RabbitTarget),
}

/// A RabbitMQ to keep a Broker's events in.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitTarget {
    /// The AMQP URI with credentials (`amqp://user:pass@host:5672/%2f`).
    pub uri: String,
    /// The same without the password, for status and logs.
    pub display: String,
    pub queue_type: QueueType,
}

impl std::fmt::Debug for RabbitTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTarget")
            .field("uri", &self.display)
            .field("queue_type", &self.queue_type)
            .finish()
    }
}

/// `spec.queueType` of a RabbitmqBrokerConfig.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, durable (Knative's default).
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Why a Broker's backend cannot be used: the Ready=False reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub reason: &'static str,
    pub message: String,
}

fn fail(reason: &'static str, message: impl Into<String>) -> BackendError {
    BackendError {
        reason,
        message: message.into(),
    }
}

/// The backend of `b`, resolving its RabbitmqBrokerConfig and Secret among `objects`.
pub fn backend(b: &Broker, objects: &EventingObjects) -> Result<Backend, BackendError> {
    if b.metadata
        .annotations
        .get(BROKER_CLASS_ANNOTATION)
        .is_none_or(|c| c != RABBITMQ_BROKER_CLASS)
    {
        return Ok(Backend::Log);
    }
    let ns = &b.metadata.namespace;
    let Some(reference) = &b.spec.config else {
        return Err(fail(
            "RabbitmqBrokerConfigMissing",
            format!(
                "spec.config: a {RABBITMQ_BROKER_CLASS} Broker needs spec.config to name a \
                 {RABBITMQ_BROKER_CONFIG_KIND} ({RABBITMQ_API_VERSION})"
            ),
        ));
    };
    if reference.kind != RABBITMQ_BROKER_CONFIG_KIND
        || (!reference.api_version.is_empty() && reference.api_version != RABBITMQ_API_VERSION)
    {
        return Err(fail(
            "RabbitmqBrokerConfigMissing",
            format!(
                "spec.config: names {} {:?}, want kind {RABBITMQ_BROKER_CONFIG_KIND} of {RABBITMQ_API_VERSION}",
                if reference.kind.is_empty() {
                    "no kind"
                } else {
                    &reference.kind
                },
                reference.api_version
            ),
        ));
    }
    let config_ns = if reference.namespace.is_empty() {
        ns
    } else {
        &reference.namespace
    };
    let Some(config) = objects
        .rabbitmq_configs
        .iter()
        .find(|c| c.metadata.namespace == *config_ns && c.metadata.name == reference.name)
    else {
        return Err(fail(
            "RabbitmqBrokerConfigNotFound",
            format!(
                "{RABBITMQ_BROKER_CONFIG_KIND} {config_ns}/{} not found",
                reference.name
            ),
        ));
    };
    let queue_type = match config.spec.queue_type.as_str() {
        "" | "quorum" => QueueType::Quorum,
        "classic" => QueueType::Classic,
        other => {
            return Err(fail(
                "InvalidRabbitmqBrokerConfig",
                format!(
                    "{RABBITMQ_BROKER_CONFIG_KIND} {config_ns}/{}: spec.queueType: invalid value {other:?}, want quorum or classic",
                    reference.name
                ),
            ));
        }
    };
    let cluster = &config.spec.rabbitmq_cluster_reference;
    let Some(secret_ref) = &cluster.connection_secret else {
        return Err(fail(
            "InvalidRabbitmqBrokerConfig",
            format!(
                "{RABBITMQ_BROKER_CONFIG_KIND} {config_ns}/{}: spec.rabbitmqClusterReference.connectionSecret is needed \
                 (a RabbitmqCluster of the cluster operator, {:?}, needs Kubernetes)",
                reference.name, cluster.name
            ),
        ));
    };
    let secret_ns = if cluster.namespace.is_empty() {
        config_ns
    } else {
        &cluster.namespace
    };
    let Some(secret) = objects
        .secrets
        .iter()
        .find(|s| s.metadata.namespace == *secret_ns && s.metadata.name == secret_ref.name)
    else {
        return Err(fail(
            "SecretNotFound",
            format!("Secret {secret_ns}/{} not found", secret_ref.name),
        ));
    };
    let (uri, display) = amqp_uri(secret).map_err(|m| {
        fail(
            "InvalidSecret",
            format!("Secret {secret_ns}/{}: {m}", secret_ref.name),
        )
    })?;
    Ok(Backend::RabbitMq(RabbitTarget {
        uri,
        display,
        queue_type,
    }))
}

/// A Secret's value of `key`: `stringData` wins over base64 `data`, as the API server merges them.
fn secret_value(secret: &Secret, key: &str) -> Result<Option<String>, String> {
    if let Some(v) = secret.string_data.get(key) {
        return Ok(Some(v.clone()));
    }
    let Some(v) = secret.data.get(key) else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|e| format!("data.{key} is not base64 ({e}); use stringData for plain text"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("data.{key} is not UTF-8 text"))
}

/// The AMQP URI (and its display form without the password) from a connection Secret: `uri` of
/// amqp(s):// is the AMQP address; an http(s) `uri` is the management API, whose host serves AMQP on
/// `port` (default 5672). `username`/`password` fill in what the URI lacks.
pub fn amqp_uri(secret: &Secret) -> Result<(String, String), String> {
    let raw = secret_value(secret, "uri")?.ok_or("missing key uri")?;
    let mut url = url::Url::parse(raw.trim()).map_err(|e| format!("uri {raw:?}: {e}"))?;
    match url.scheme() {
        "amqp" | "amqps" => {}
        scheme @ ("http" | "https") => {
            let port = match secret_value(secret, "port")? {
                None => 5672,
                Some(p) => p
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| format!("port {p:?} is not a port number"))?,
            };
            let amqp = if scheme == "https" { "amqps" } else { "amqp" };
            let host = url.host_str().ok_or(format!("uri {raw:?} has no host"))?;
            url = url::Url::parse(&format!("{amqp}://{host}:{port}/"))
                .map_err(|e| format!("uri {raw:?}: {e}"))?;
        }
        other => {
            return Err(format!(
                "uri {raw:?}: scheme {other:?}, want amqp, amqps, http or https"
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("uri {raw:?} has no host"));
    }
    if url.username().is_empty()
        && let Some(user) = secret_value(secret, "username")?
    {
        url.set_username(&user)
            .map_err(|_| format!("uri {raw:?} cannot carry a username"))?;
        if let Some(password) = secret_value(secret, "password")? {
            url.set_password(Some(&password))
                .map_err(|_| format!("uri {raw:?} cannot carry a password"))?;
        }
    }
    // The default vhost "/" is "%2f" in an AMQP URI; an empty path means the same to lapin.
    let uri = url.to_string();
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("xxxxx"));
    }
    Ok((uri, shown.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> (Broker, EventingObjects) {
        let parsed: Vec<sluice_api::Object> = sluice_api::parse_documents(yaml)
            .into_iter()
            .map(|r| r.expect("parses"))
            .collect();
        let objects = EventingObjects::from_objects(parsed);
        (objects.brokers[0].clone(), objects)
    }

    const BROKER: &str = "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: b
  namespace: ns
  annotations: {eventing.knative.dev/broker.class: RabbitMQBroker}
spec:
  config: {apiVersion: eventing.knative.dev/v1alpha1, kind: RabbitmqBrokerConfig, name: rmq}
";

    fn with(config: &str, secret: &str) -> String {
        format!(
            "{BROKER}---
apiVersion: eventing.knative.dev/v1alpha1
kind: RabbitmqBrokerConfig
metadata: {{name: rmq, namespace: ns}}
spec:
{config}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: ns}}
{secret}
"
        )
    }

    const REF: &str = "  rabbitmqClusterReference: {connectionSecret: {name: creds}}\n";

    #[test]
    fn a_broker_without_the_rabbitmq_class_uses_the_log() {
        let (b, o) =
            objects("apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {name: b}\n");
        assert_eq!(backend(&b, &o), Ok(Backend::Log));
    }

    #[test]
    fn an_amqp_uri_gets_the_secrets_credentials() {
        let (b, o) = objects(&with(
            REF,
            "stringData: {uri: 'amqp://127.0.0.1:5673', username: u, password: p}",
        ));
        let Ok(Backend::RabbitMq(t)) = backend(&b, &o) else {
            panic!("{:?}", backend(&b, &o))
        };
        assert_eq!(t.uri, "amqp://u:p@127.0.0.1:5673");
        assert_eq!(t.display, "amqp://u:xxxxx@127.0.0.1:5673");
        assert_eq!(t.queue_type, QueueType::Quorum);
    }

    #[test]
    fn a_management_uri_takes_the_amqp_port_from_the_secret() {
        // data is base64: uri http://rabbit.ns.svc:15672, username guest, password guest, port 5671.
        let secret = "data: {uri: aHR0cDovL3JhYmJpdC5ucy5zdmM6MTU2NzI=, username: Z3Vlc3Q=, password: Z3Vlc3Q=, port: NTY3MQ==}";
        let (b, o) = objects(&with(&format!("{REF}  queueType: classic\n"), secret));
        let Ok(Backend::RabbitMq(t)) = backend(&b, &o) else {
            panic!("{:?}", backend(&b, &o))
        };
        assert_eq!(t.uri, "amqp://guest:guest@rabbit.ns.svc:5671/");
        assert_eq!(t.queue_type, QueueType::Classic);
        let (b, o) = objects(&with(
            REF,
            "stringData: {uri: 'https://rabbit:15671', username: u, password: p}",
        ));
        let Ok(Backend::RabbitMq(t)) = backend(&b, &o) else {
            panic!()
        };
        assert_eq!(t.uri, "amqps://u:p@rabbit:5672/");
    }

    #[test]
    fn what_is_missing_or_wrong_is_the_reason() {
        let cases = [
            (BROKER.replace("spec:\n  config: {apiVersion: eventing.knative.dev/v1alpha1, kind: RabbitmqBrokerConfig, name: rmq}\n", ""), "RabbitmqBrokerConfigMissing"),
            (BROKER.to_string(), "RabbitmqBrokerConfigNotFound"),
            (with("  rabbitmqClusterReference: {name: cluster}\n", "stringData: {uri: 'amqp://h'}"), "InvalidRabbitmqBrokerConfig"),
            (with(&format!("{REF}  queueType: stream\n"), "stringData: {uri: 'amqp://h'}"), "InvalidRabbitmqBrokerConfig"),
            (with("  rabbitmqClusterReference: {connectionSecret: {name: other}}\n", "stringData: {uri: 'amqp://h'}"), "SecretNotFound"),
            (with(REF, "stringData: {username: u}"), "InvalidSecret"),
            (with(REF, "stringData: {uri: 'ftp://h'}"), "InvalidSecret"),
            (with(REF, "stringData: {uri: 'http://h', port: x}"), "InvalidSecret"),
            (with(REF, "data: {uri: '%%%'}"), "InvalidSecret"),
        ];
        for (yaml, reason) in cases {
            let (b, o) = objects(&yaml);
            let err = backend(&b, &o).expect_err(&yaml);
            assert_eq!(err.reason, reason, "{yaml}\n{}", err.message);
            assert!(!err.message.is_empty());
        }
    }
}
