//! Knative's Broker defaults: the `config-br-defaults` ConfigMap (namespace knative-eventing, key
//! `default-br-config`), whose `delivery` a Broker without `spec.delivery` gets (Knative's Broker
//! webhook, SetDefaults). With no such ConfigMap, Knative's shipped one applies, whose delivery is
//! `retry: 10, backoffPolicy: exponential, backoffDelay: PT0.2S`: a Trigger that says nothing about
//! delivery is retried, not dropped at the first transient error.
//!
//! Precedence, as in Knative: the Trigger's `delivery`, else its Broker's `spec.delivery`, else these
//! defaults (the namespace's entry when `namespaceDefaults` has one, else `clusterDefault`).

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_api::core::ConfigMap;
use sluice_api::eventing::DeliverySpec;

/// The ConfigMap's name, namespace and key.
pub const CONFIG_MAP: &str = "config-br-defaults";
pub const NAMESPACE: &str = "knative-eventing";
pub const KEY: &str = "default-br-config";

/// The delivery part of `default-br-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDefaults {
    cluster: Option<DeliverySpec>,
    namespaces: BTreeMap<String, Option<DeliverySpec>>,
}

/// One entry of `default-br-config` (`clusterDefault` or a `namespaceDefaults` value). Its other
/// fields (brokerClass, the channel config reference) do not concern delivery and are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    delivery: Option<DeliverySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultBrConfig {
    #[serde(default)]
    cluster_default: Option<Entry>,
    #[serde(default)]
    namespace_defaults: BTreeMap<String, Entry>,
}

/// `config-br-defaults` that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ConfigMap {NAMESPACE}/{CONFIG_MAP}: data.{KEY}: {0}")]
pub struct DefaultsError(String);

impl Default for BrokerDefaults {
    fn default() -> Self {
        Self::shipped()
    }
}

impl BrokerDefaults {
    /// Knative's shipped `config-br-defaults` (config/core/configmaps/default-broker.yaml).
    pub fn shipped() -> Self {
        BrokerDefaults {
            cluster: Some(DeliverySpec {
                retry: Some(10),
                backoff_policy: Some("exponential".into()),
                backoff_delay: Some("PT0.2S".into()),
                ..Default::default()
            }),
            namespaces: BTreeMap::new(),
        }
    }

    /// Reads a user's `config-br-defaults`. Knative: a ConfigMap without the key has no defaults.
    pub fn from_config_map(config_map: &ConfigMap) -> Result<Self, DefaultsError> {
        let Some(text) = config_map.data.get(KEY) else {
            return Ok(BrokerDefaults {
                cluster: None,
                namespaces: BTreeMap::new(),
            });
        };
        let parsed: DefaultBrConfig =
            serde_yaml::from_str(text).map_err(|e| DefaultsError(e.to_string()))?;
        Ok(BrokerDefaults {
            cluster: parsed.cluster_default.and_then(|e| e.delivery),
            namespaces: parsed
                .namespace_defaults
                .into_iter()
                .map(|(ns, e)| (ns, e.delivery))
                .collect(),
        })
    }

    /// The delivery a Broker in `namespace` without `spec.delivery` gets.
    pub fn delivery(&self, namespace: &str) -> Option<&DeliverySpec> {
        match self.namespaces.get(namespace) {
            Some(entry) => entry.as_ref(),
            None => self.cluster.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_map(text: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = CONFIG_MAP.into();
        cm.metadata.namespace = NAMESPACE.into();
        cm.data.insert(KEY.into(), text.into());
        cm
    }

    #[test]
    fn shipped_defaults_retry_ten_times_exponentially_from_200ms() {
        let d = BrokerDefaults::shipped();
        let spec = d.delivery("any").expect("a delivery");
        assert_eq!(spec.retry, Some(10));
        assert_eq!(spec.backoff_policy.as_deref(), Some("exponential"));
        assert_eq!(spec.backoff_delay.as_deref(), Some("PT0.2S"));
    }

    #[test]
    fn a_namespace_entry_replaces_the_cluster_default() {
        let d = BrokerDefaults::from_config_map(&config_map(
            "clusterDefault:
  brokerClass: MTChannelBasedBroker
  apiVersion: v1
  kind: ConfigMap
  name: config-br-default-channel
  namespace: knative-eventing
  delivery: {retry: 3, backoffPolicy: linear, backoffDelay: PT1S}
namespaceDefaults:
  quiet:
    brokerClass: MTChannelBasedBroker
  loud:
    delivery: {retry: 7, deadLetterSink: {uri: 'http://dls.example/'}}
",
        ))
        .unwrap();
        assert_eq!(d.delivery("other").and_then(|s| s.retry), Some(3));
        assert_eq!(d.delivery("quiet"), None, "its entry has no delivery");
        let loud = d.delivery("loud").unwrap();
        assert_eq!(loud.retry, Some(7));
        assert!(loud.dead_letter_sink.is_some());
    }

    #[test]
    fn a_config_map_without_the_key_has_no_delivery_and_bad_yaml_is_an_error() {
        let d = BrokerDefaults::from_config_map(&ConfigMap::default()).unwrap();
        assert_eq!(d.delivery("ns"), None);
        let e = BrokerDefaults::from_config_map(&config_map("clusterDefault: [")).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "ConfigMap knative-eventing/config-br-defaults: data.default-br-config:"
            ),
            "{e}"
        );
    }
}
