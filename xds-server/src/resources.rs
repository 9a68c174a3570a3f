//! The Envoy resources one translation produces: the contract between [`crate::translate`] and
//! [`crate::snapshot`].

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, ScopedRouteConfiguration};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SCOPED_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration";
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A complete set of Envoy resources for one gateway. Names are unique within each kind.
///
/// Resources are shared: translation hands out the same `Arc` for a resource it did not re-render, and
/// the snapshot takes pointer equality as "unchanged" before comparing contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub listeners: Vec<Arc<Listener>>,
    pub route_configurations: Vec<Arc<RouteConfiguration>>,
    /// Scoped RDS: one routing scope per (listener, host), each with its RouteConfiguration inline.
    pub scoped_route_configurations: Vec<Arc<ScopedRouteConfiguration>>,
    pub clusters: Vec<Arc<Cluster>>,
    pub cluster_load_assignments: Vec<Arc<ClusterLoadAssignment>>,
    pub secrets: Vec<Arc<Secret>>,
}
