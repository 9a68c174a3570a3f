//! The observed objects translation works from, keyed by (namespace, name). Plain data: sources fill
//! it, [`crate::translate`] reads it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sluice_api::Ingress;
use sluice_api::core::{EndpointSlice, Endpoints, Secret, Service};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub ingresses: BTreeMap<ObjectKey, Ingress>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoints: BTreeMap<ObjectKey, Endpoints>,
    /// Keyed by the slice's own name; the Service is its `kubernetes.io/service-name` label.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub secrets: BTreeMap<ObjectKey, Secret>,
    /// Keyed by (namespace, instance name).
    pub sidecars: BTreeMap<ObjectKey, InstanceSidecar>,
}

/// A revision instance's sidecar: an instance-side Envoy listener carrying the queue-proxy wasm filter in
/// front of a local process. Sluice's stand-in for the queue-proxy container Knative puts in each pod;
/// the serving controller fills these in, no Knative object describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSidecar {
    pub namespace: String,
    pub revision: String,
    /// The Knative Service, when the revision belongs to one.
    pub service: String,
    /// The instance name (unique within the namespace).
    pub instance: String,
    /// Where Envoy listens for this instance (what the revision's endpoints point at).
    pub listen: SocketAddr,
    /// Where the instance's process listens (its PORT).
    pub app: SocketAddr,
    /// Knative's containerConcurrency: 0 is unlimited (no breaker).
    pub container_concurrency: u32,
    /// The revision's timeoutSeconds.
    pub timeout_seconds: u64,
    /// The app speaks h2c (its port is named h2c).
    pub http2: bool,
}
