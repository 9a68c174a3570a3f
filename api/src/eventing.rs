//! eventing.knative.dev/v1 Broker and Trigger, and sources.knative.dev/v1 PingSource, as serde types
//! (knative.dev/eventing pkg/apis/eventing/v1 and pkg/apis/sources/v1, and duck/v1 DeliverySpec).
//!
//! Only the shapes live here; the broker (eventing/broker) validates them into its own domain types.
//! Every `spec` level rejects unknown fields, as Knative's webhook does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::filters::{SubscriptionsApiFilter, TriggerFilter};
use crate::meta::{ObjectMeta, Status};

pub const API_VERSION: &str = "eventing.knative.dev/v1";
pub const SOURCES_API_VERSION: &str = "sources.knative.dev/v1";

/// Knative: the annotation that selects a Broker implementation (`eventing.knative.dev/broker.class`).
pub const BROKER_CLASS_ANNOTATION: &str = "eventing.knative.dev/broker.class";
/// Knative Kafka broker's per-trigger delivery order annotation; values `ordered` or `unordered`.
pub const DELIVERY_ORDER_ANNOTATION: &str = "kafka.eventing.knative.dev/delivery.order";
/// Knative's RabbitMQ broker: the Broker class whose events live in RabbitMQ.
pub const RABBITMQ_BROKER_CLASS: &str = "RabbitMQBroker";
/// Knative's RabbitMQ broker: `RabbitmqBrokerConfig` is in this group and version.
pub const RABBITMQ_API_VERSION: &str = "eventing.knative.dev/v1alpha1";
pub const RABBITMQ_BROKER_CONFIG_KIND: &str = "RabbitmqBrokerConfig";
/// Knative's RabbitMQ broker: a Trigger's prefetch count (deliveries in flight); 1 is ordered.
pub const RABBITMQ_PARALLELISM_ANNOTATION: &str = "rabbitmq.eventing.knative.dev/parallelism";

/// A Broker: an addressable event mesh whose events Triggers select and deliver.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Broker {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BrokerSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<BrokerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerSpec {
    /// A reference to a configuration object for the broker class (kept, not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<KReference>,
    /// Delivery defaults for every Trigger of this Broker that does not set its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink_uri: Option<String>,
}

/// duckv1.Addressable: where an object receives events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Addressable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A Trigger: a filter on a Broker's events and the subscriber they are delivered to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TriggerSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TriggerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerSpec {
    /// The Broker's name, in the Trigger's namespace.
    #[serde(default)]
    pub broker: String,
    /// The legacy exact-match attributes filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<TriggerFilter>,
    /// The SubscriptionsAPI filters; when non-empty they win over `filter` (Knative).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<SubscriptionsApiFilter>,
    #[serde(default)]
    pub subscriber: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink_uri: Option<String>,
}

/// duckv1.Destination: a `ref` to an addressable object, a `uri`, or both (the uri is then resolved
/// relative to the ref's address).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub ref_: Option<KReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, rename = "CACerts", skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// duckv1.KReference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub api_version: String,
}

/// duckv1.DeliverySpec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliverySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<Destination>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<i32>,
    /// ISO-8601 duration of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `linear` or `exponential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_policy: Option<String>,
    /// ISO-8601 duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_delay: Option<String>,
    /// ISO-8601 duration: the longest wait a Retry-After header may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_max: Option<String>,
}

/// A PingSource: sends an event on a cron schedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingSource {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PingSourceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PingSourceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PingSourceSpec {
    /// Cron schedule (5 fields); Knative's default is every minute.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schedule: String,
    /// IANA time zone name; empty means the system's (Sluice: UTC).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timezone: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_base64: String,
    #[serde(default)]
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// duckv1.CloudEventOverrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudEventOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingSourceStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_uri: Option<String>,
}

/// eventing.knative.dev/v1alpha1 RabbitmqBrokerConfig (knative-extensions/eventing-rabbitmq): where a
/// `RabbitMQBroker` Broker keeps its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqBrokerConfig {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RabbitmqBrokerConfigSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitmqBrokerConfigSpec {
    #[serde(default)]
    pub rabbitmq_cluster_reference: RabbitmqClusterReference,
    /// `quorum` (Knative's default) or `classic`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub queue_type: String,
    /// Names of existing exchange and queue to use (kept, not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq_resources_config: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitmqClusterReference {
    /// A RabbitmqCluster of the RabbitMQ cluster operator (needs Kubernetes; Sluice reads
    /// `connectionSecret`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// A Secret with keys `uri`, `username`, `password` (and `port` when `uri` is the management API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<LocalObjectReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    #[serde(default)]
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Object, parse_documents};

    #[test]
    fn trigger_yaml_reads_filters_subscriber_and_delivery() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: t
  annotations:
    kafka.eventing.knative.dev/delivery.order: ordered
spec:
  broker: default
  filter:
    attributes:
      type: dev.example
  filters:
    - cesql: "source LIKE '%x%'"
    - any:
        - exact: {type: a}
        - prefix: {source: /b}
  subscriber:
    ref:
      apiVersion: serving.knative.dev/v1
      kind: Service
      name: display
  delivery:
    retry: 3
    backoffPolicy: exponential
    backoffDelay: PT0.2S
    deadLetterSink:
      uri: http://127.0.0.1:9/dls
"#;
        let objects = parse_documents(yaml);
        let Ok(Object::Trigger(t)) = &objects[0] else {
            panic!("{objects:?}")
        };
        assert_eq!(t.metadata.namespace, "default");
        assert_eq!(t.spec.broker, "default");
        assert_eq!(t.spec.filters.len(), 2);
        assert_eq!(t.spec.subscriber.ref_.as_ref().unwrap().name, "display");
        let delivery = t.spec.delivery.as_ref().unwrap();
        assert_eq!(delivery.retry, Some(3));
        assert_eq!(
            delivery.dead_letter_sink.as_ref().unwrap().uri.as_deref(),
            Some("http://127.0.0.1:9/dls")
        );
    }

    #[test]
    fn pingsource_yaml_reads_schedule_data_and_sink() {
        let yaml = r#"
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {name: p, namespace: ns}
spec:
  schedule: "*/1 * * * *"
  timezone: Europe/Paris
  contentType: application/json
  data: '{"a": 1}'
  sink:
    ref: {apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}
  ceOverrides:
    extensions: {extra: yes}
"#;
        let objects = parse_documents(yaml);
        let Ok(Object::PingSource(p)) = &objects[0] else {
            panic!("{objects:?}")
        };
        assert_eq!(p.spec.timezone, "Europe/Paris");
        assert_eq!(p.spec.sink.ref_.as_ref().unwrap().kind, "Broker");
        assert_eq!(
            p.spec.ce_overrides.as_ref().unwrap().extensions["extra"],
            "yes"
        );
    }

    #[test]
    fn broker_status_serializes_address_and_conditions_inline() {
        let b = Broker {
            status: Some(BrokerStatus {
                address: Some(Addressable {
                    name: None,
                    url: Some("http://x/ns/b".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["status"]["address"]["url"], "http://x/ns/b");
    }
}
