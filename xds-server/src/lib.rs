//! Sluice's xds-server: KIngress (plus Services, Endpoints and Secrets) to Envoy resources, versioned per
//! resource, served over ADS (state of the world and delta).
//!
//! - [`state`]: the observed Kubernetes objects, as plain data.
//! - [`translate`]: pure translation from [`state::ClusterState`] to [`resources::Resources`].
//! - [`snapshot`]: per-resource content versions, so an unchanged resource is never pushed again.
//! - [`ads`]: the gRPC AggregatedDiscoveryService (SotW and delta), ACK/NACK tracking.
//! - [`tls`]: mTLS for the ADS server, with certificates re-read from disk when they are renewed.
//! - [`metrics`]: the Prometheus families of the ADS server (the binary registers them).
//! - [`source`]: where state comes from (a watched folder of YAML, or Kubernetes).

pub mod ads;
pub mod controller;
pub mod gateways;
pub mod lease;
pub mod metrics;
pub mod prober;
pub mod resources;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod status;
pub mod tls;
pub mod translate;
