//! networking.internal.knative.dev/v1alpha1 Ingress (KIngress): every field of Knative's spec and status.
//!
//! Field order and omitempty follow Knative's Go structs (knative.dev/networking ingress_types.go),
//! because the probe hash is computed over Go's JSON encoding of the spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, Status};

pub use crate::probe::{
    HASH_HEADER, HASH_VALUE_OVERRIDE, PROBE_HEADER, PROBE_VALUE, TAG_HEADER, compute_hash,
    insert_probe, marshal_spec,
};

pub const API_VERSION: &str = "networking.internal.knative.dev/v1alpha1";
pub const KIND: &str = "Ingress";
/// Knative: the annotation that names the networking layer that owns an Ingress.
pub const INGRESS_CLASS_ANNOTATION: &str = "networking.knative.dev/ingress.class";
/// The ingress class Sluice serves.
pub const SLUICE_INGRESS_CLASS: &str = "sluice.ingress.networking.knative.dev";

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_NETWORK_CONFIGURED: &str = "NetworkConfigured";
pub const CONDITION_LOAD_BALANCER_READY: &str = "LoadBalancerReady";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingress {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: IngressSpec,
    #[serde(default)]
    pub status: IngressStatus,
}

fn default_api_version() -> String {
    API_VERSION.to_string()
}
fn default_kind() -> String {
    KIND.to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressSpec {
    /// TLS configuration; hosts are multiplexed on one port by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<IngressTls>,
    /// Host rules; the first matching rule wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<IngressRule>,
    /// Whether plain HTTP is served ("Enabled", the default) or redirected to HTTPS ("Redirected").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub http_option: String,
}

pub const HTTP_OPTION_ENABLED: &str = "Enabled";
pub const HTTP_OPTION_REDIRECTED: &str = "Redirected";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressTls {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_namespace: String,
}

pub const VISIBILITY_EXTERNAL_IP: &str = "ExternalIP";
pub const VISIBILITY_CLUSTER_LOCAL: &str = "ClusterLocal";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// "ExternalIP" (default) or "ClusterLocal".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub visibility: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpIngressRuleValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpIngressRuleValue {
    #[serde(default)]
    pub paths: Vec<HttpIngressPath>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpIngressPath {
    /// A literal path prefix starting with '/'; empty is the catch-all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Rewrites the Host/authority before forwarding.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rewrite_host: String,
    /// Exact header matches; all must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderMatch>,
    #[serde(default)]
    pub splits: Vec<IngressBackendSplit>,
    /// Headers set (not appended) on the request before the split.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub append_headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(default)]
    pub exact: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressBackendSplit {
    pub service_namespace: String,
    pub service_name: String,
    pub service_port: IntOrString,
    /// 0..=100; a single split with 0 means 100.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub percent: i64,
    /// Headers set on the request after the split chose this backend.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub append_headers: BTreeMap<String, String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Kubernetes' intstr.IntOrString.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i32),
    String(String),
}

// By hand rather than `untagged`: an untagged enum buffers the value, so a bad port would be reported
// as "did not match any variant" at the enclosing mapping instead of at the port itself.
impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IntOrString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v).map(IntOrString::Int).map_err(|_| {
                    E::invalid_value(serde::de::Unexpected::Signed(v), &"a 32-bit integer")
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v).map(IntOrString::Int).map_err(|_| {
                    E::invalid_value(serde::de::Unexpected::Unsigned(v), &"a 32-bit integer")
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for IntOrString {
    fn default() -> Self {
        IntOrString::Int(0)
    }
}

impl std::fmt::Display for IntOrString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_load_balancer: Option<LoadBalancerStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<LoadBalancerIngressStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngressStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain_internal: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mesh_only: bool,
}

impl Ingress {
    /// The ingress class this Ingress asks for, if any (the annotation, empty counts as none).
    pub fn ingress_class(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(INGRESS_CLASS_ANNOTATION)
            .map(String::as_str)
            .filter(|c| !c.is_empty())
    }

    /// Whether Sluice owns this Ingress (Knative: other classes are left untouched).
    pub fn is_sluice_class(&self) -> bool {
        self.ingress_class() == Some(SLUICE_INGRESS_CLASS)
    }
}
