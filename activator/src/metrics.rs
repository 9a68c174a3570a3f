//! The activator's Prometheus metrics (issue 17), under Knative's activator names where it has them.
//!
//! Knative's activator reports `request_count` and `request_latencies` (milliseconds) per revision
//! and response code, and `request_concurrency`; Sluice adds the wait queue's depth and the requests
//! the throttler held back. Counters and histograms are updated as requests end; the two gauges are
//! read from the revisions' throttlers when scraped, so they are never stale. The binary registers
//! them (with the `activator` prefix, as Knative's Prometheus exporter names them) through
//! [`crate::Activator::register_metrics`].

use std::sync::Weak;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_api::autoscaling::RevisionKey;

use crate::{Inner, lock};

/// Knative's activator latency buckets (`defaultLatencyDistribution`), in milliseconds.
const LATENCY_BUCKETS_MS: [f64; 22] = [
    5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0,
    500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 2000.0, 5000.0,
];

/// Knative's revision labels (the ones the activator knows: it sees a revision by namespace and name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub namespace_name: String,
    pub revision_name: String,
}

impl RevisionLabels {
    pub fn new(key: &RevisionKey) -> Self {
        RevisionLabels {
            namespace_name: key.namespace.clone(),
            revision_name: key.name.clone(),
        }
    }
}

/// Knative's request labels: the revision and the response code with its class (`2xx`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub namespace_name: String,
    pub revision_name: String,
    pub response_code: String,
    pub response_code_class: String,
}

/// Why the throttler held a request back.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub namespace_name: String,
    pub revision_name: String,
    /// `queued`: it waited for capacity; `queue_full`: it was refused with 503.
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The activator's counters and histograms; cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct ActivatorMetrics {
    pub request_count: Family<RequestLabels, Counter>,
    pub request_latencies: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub throttled_requests: Family<ThrottleLabels, Counter>,
}

impl Default for ActivatorMetrics {
    fn default() -> Self {
        ActivatorMetrics {
            request_count: Family::default(),
            request_latencies: Family::new_with_constructor(latency_histogram),
            throttled_requests: Family::default(),
        }
    }
}

impl ActivatorMetrics {
    /// A request for `key` ended with `status` (its response head) after `elapsed`.
    pub(crate) fn request_done(&self, key: &RevisionKey, status: StatusCode, elapsed: Duration) {
        let labels = RequestLabels {
            namespace_name: key.namespace.clone(),
            revision_name: key.name.clone(),
            response_code: status.as_u16().to_string(),
            response_code_class: format!("{}xx", status.as_u16() / 100),
        };
        self.request_count.get_or_create(&labels).inc();
        self.request_latencies
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
    }

    pub(crate) fn throttled(&self, key: &RevisionKey, reason: &str) {
        self.throttled_requests
            .get_or_create(&ThrottleLabels {
                namespace_name: key.namespace.clone(),
                revision_name: key.name.clone(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry, inner: Weak<Inner>) {
        registry.register(
            "request_count",
            "Requests the activator served, per revision and response code",
            self.request_count.clone(),
        );
        registry.register(
            "request_latencies",
            "Time from a request's arrival to its response head, waiting included, in milliseconds",
            self.request_latencies.clone(),
        );
        registry.register(
            "throttled_requests",
            "Requests the throttler held back: queued for capacity, or refused with a full queue",
            self.throttled_requests.clone(),
        );
        registry.register_collector(Box::new(RevisionGauges { inner }));
    }
}

/// `request_concurrency` and `queue_depth`, read from each revision's throttler at scrape time.
#[derive(Debug)]
struct RevisionGauges {
    inner: Weak<Inner>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activator").finish_non_exhaustive()
    }
}

impl Collector for RevisionGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let concurrency = Family::<RevisionLabels, Gauge>::default();
        let depth = Family::<RevisionLabels, Gauge>::default();
        if let Some(inner) = self.inner.upgrade() {
            let revisions: Vec<_> = lock(&inner.revisions)
                .iter()
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect();
            for (key, rev) in revisions {
                let snapshot = rev.snapshot();
                let labels = RevisionLabels::new(&key);
                concurrency
                    .get_or_create(&labels)
                    .set(snapshot.in_flight as i64);
                depth.get_or_create(&labels).set(snapshot.waiting as i64);
            }
        }
        concurrency.encode(encoder.encode_descriptor(
            "request_concurrency",
            "Requests the activator is forwarding now, per revision",
            None,
            concurrency.metric_type(),
        )?)?;
        depth.encode(encoder.encode_descriptor(
            "queue_depth",
            "Requests waiting in the activator for capacity now, per revision",
            None,
            depth.metric_type(),
        )?)?;
        Ok(())
    }
}
