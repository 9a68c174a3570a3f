//! The xds-server's Prometheus metrics (issue 17): ADS streams, pushes, Envoy's answers, how long a
//! change takes to be ACKed by every gateway, and the size of the snapshot served.
//!
//! The families live here; the binary owns the `Registry` and calls [`AdsMetrics::register`] (under a
//! prefix of its choice, `xds_` in `sluice`), so a test can read a handle without any registry.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::snapshot::Snapshot;

/// A resource type of a push or an answer (the full type URL, as Envoy's own `type_url`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub type_url: String,
}

/// Buckets of the propagation latency, in seconds: from 1 ms (one local hop) to 30 s (a gateway that
/// warms clusters slowly).
const PROPAGATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

fn propagation_histogram() -> Histogram {
    Histogram::new(PROPAGATION_BUCKETS)
}

/// The ADS server's metrics; cheap to clone (every field is a shared handle).
#[derive(Clone, Debug)]
pub struct AdsMetrics {
    /// ADS streams open now.
    pub clients_connected: Gauge,
    /// Responses sent, per type.
    pub pushes: Family<TypeLabels, Counter>,
    /// Responses Envoy accepted, per type.
    pub acks: Family<TypeLabels, Counter>,
    /// Responses Envoy rejected, per type.
    pub nacks: Family<TypeLabels, Counter>,
    /// From a new snapshot's publication to the moment every connected gateway runs it.
    pub propagation_latency: Histogram,
    /// Resources of the newest snapshot, per type.
    pub snapshot_resources: Family<TypeLabels, Gauge>,
    /// Encoded bytes of the newest snapshot's resources.
    pub snapshot_bytes: Gauge,
    /// The newest snapshot's generation.
    pub snapshot_generation: Gauge,
}

impl Default for AdsMetrics {
    fn default() -> Self {
        AdsMetrics {
            clients_connected: Gauge::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            propagation_latency: propagation_histogram(),
            snapshot_resources: Family::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_generation: Gauge::default(),
        }
    }
}

impl AdsMetrics {
    /// Registers every family in `registry` (names without a prefix: `clients_connected`, ...).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ads_clients_connected",
            "ADS streams (Envoy gateways) connected now",
            self.clients_connected.clone(),
        );
        registry.register(
            "pushes",
            "Discovery responses sent to Envoy, per resource type",
            self.pushes.clone(),
        );
        registry.register(
            "acks",
            "Discovery responses Envoy accepted (ACK), per resource type",
            self.acks.clone(),
        );
        registry.register(
            "nacks",
            "Discovery responses Envoy rejected (NACK), per resource type",
            self.nacks.clone(),
        );
        registry.register(
            "propagation_latency_seconds",
            "From a new snapshot (a KIngress or endpoints change) to its ACK by every connected gateway",
            self.propagation_latency.clone(),
        );
        registry.register(
            "snapshot_resources",
            "Resources in the snapshot served, per resource type",
            self.snapshot_resources.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Encoded size of the resources in the snapshot served",
            self.snapshot_bytes.clone(),
        );
        registry.register(
            "snapshot_generation",
            "Generation of the snapshot served",
            self.snapshot_generation.clone(),
        );
    }

    pub(crate) fn pushed(&self, type_url: &str) {
        self.pushes.get_or_create(&labels(type_url)).inc();
    }

    pub(crate) fn answered(&self, type_url: &str, accepted: bool) {
        let family = if accepted { &self.acks } else { &self.nacks };
        family.get_or_create(&labels(type_url)).inc();
    }

    pub(crate) fn propagated(&self, latency: Duration) {
        self.propagation_latency.observe(latency.as_secs_f64());
    }

    /// Sets the snapshot gauges from `snap` (a snapshot is immutable: once per generation is enough).
    pub(crate) fn snapshot(&self, snap: &Snapshot) {
        let mut bytes = 0usize;
        self.snapshot_resources.clear();
        for type_url in snap.type_urls() {
            let resources = snap.resources(type_url);
            bytes += resources
                .values()
                .map(|r| r.resource.value.len())
                .sum::<usize>();
            self.snapshot_resources
                .get_or_create(&labels(type_url))
                .set(resources.len() as i64);
        }
        self.snapshot_bytes.set(bytes as i64);
        self.snapshot_generation.set(snap.generation() as i64);
    }
}

fn labels(type_url: &str) -> TypeLabels {
    TypeLabels {
        type_url: type_url.to_string(),
    }
}
