//! The observed objects translation works from, keyed by (namespace, name). Plain data: sources fill
//! it, [`crate::translate`] reads it.

use std::collections::BTreeMap;

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
}
