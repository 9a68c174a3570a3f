//! The observed objects translation works from, keyed by (namespace, name). Plain data: sources fill
//! it, [`crate::translate`] reads it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use sluice_api::Ingress;
use sluice_api::core::{EndpointSlice, Endpoints, Secret, Service};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

///
/// Objects are shared (`Arc`): sources, the serving plane and the controller each hold a copy of the
/// state, and with thousands of objects a change must cost what changed, not a deep copy and a deep
/// comparison of everything (`Arc<T: Eq>` compares by pointer first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub ingresses: BTreeMap<ObjectKey, Arc<Ingress>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoints: BTreeMap<ObjectKey, Arc<Endpoints>>,
    /// Keyed by the slice's own name; the Service is its `kubernetes.io/service-name` label.
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub secrets: BTreeMap<ObjectKey, Arc<Secret>>,
    /// Keyed by (namespace, instance name).
    pub sidecars: BTreeMap<ObjectKey, Arc<InstanceSidecar>>,
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
