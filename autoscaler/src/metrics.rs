//! The autoscaler's Prometheus metrics (issue 17), under Knative's autoscaler names.
//!
//! Knative's autoscaler reports, per revision and at each decision: `desired_pods`, `actual_pods`,
//! `stable_request_concurrency` and `panic_request_concurrency`, `stable_requests_per_second` and
//! `panic_requests_per_second`, `target_concurrency_per_pod`, `target_requests_per_second`,
//! `panic_mode` (0 or 1) and `excess_burst_capacity`. The values are the decider's inputs and results
//! (the pure [`crate::kpa`] code); [`crate::AutoscalerService`] sets them after each decision and drops
//! a revision's series when it is removed. The binary registers them (with the prefix `autoscaler`,
//! as Knative's Prometheus exporter names them) through [`AutoscalerMetrics::register`].

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::collector::Observed;
use sluice_api::autoscaling::RevisionKey;

/// Knative's revision labels (the autoscaler knows a revision by namespace and name).
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

type IntGauges = Family<RevisionLabels, Gauge>;
type FloatGauges = Family<RevisionLabels, Gauge<f64, AtomicU64>>;

/// One revision's figures at a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RevisionFigures {
    /// The instance count asked of the runtime.
    pub desired: u32,
    /// Ready instances.
    pub actual: u32,
    /// Observed concurrency and requests per second (None: no data in the windows yet).
    pub concurrency: Option<Observed>,
    pub rps: Option<Observed>,
    /// The target per instance of the revision's metric, and which metric that is.
    pub target: f64,
    pub target_is_rps: bool,
    pub panicking: bool,
    pub excess_burst_capacity: i32,
}

/// The autoscaler's per-revision gauges; cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct AutoscalerMetrics {
    pub desired_pods: IntGauges,
    pub actual_pods: IntGauges,
    pub stable_request_concurrency: FloatGauges,
    pub panic_request_concurrency: FloatGauges,
    pub stable_requests_per_second: FloatGauges,
    pub panic_requests_per_second: FloatGauges,
    pub target_concurrency_per_pod: FloatGauges,
    pub target_requests_per_second: FloatGauges,
    pub panic_mode: IntGauges,
    pub excess_burst_capacity: IntGauges,
}

impl AutoscalerMetrics {
    /// Registers every family in `registry`, under Knative's names.
    pub fn register(&self, registry: &mut Registry) {
        let ints = [
            (
                "desired_pods",
                "Number of pods autoscaler wants to allocate",
                &self.desired_pods,
            ),
            (
                "actual_pods",
                "Number of pods that are allocated currently (ready)",
                &self.actual_pods,
            ),
            (
                "panic_mode",
                "1 if the autoscaler is in panic mode, 0 otherwise",
                &self.panic_mode,
            ),
            (
                "excess_burst_capacity",
                "Excess burst capacity observed over the panic window (negative: the activator stays in the path)",
                &self.excess_burst_capacity,
            ),
        ];
        for (name, help, family) in ints {
            registry.register(name, help, family.clone());
        }
        let floats = [
            (
                "stable_request_concurrency",
                "Average of requests count over the stable window",
                &self.stable_request_concurrency,
            ),
            (
                "panic_request_concurrency",
                "Average of requests count over the panic window",
                &self.panic_request_concurrency,
            ),
            (
                "stable_requests_per_second",
                "Average requests-per-second over the stable window",
                &self.stable_requests_per_second,
            ),
            (
                "panic_requests_per_second",
                "Average requests-per-second over the panic window",
                &self.panic_requests_per_second,
            ),
            (
                "target_concurrency_per_pod",
                "The desired number of concurrent requests for each pod",
                &self.target_concurrency_per_pod,
            ),
            (
                "target_requests_per_second",
                "The desired requests-per-second for each pod",
                &self.target_requests_per_second,
            ),
        ];
        for (name, help, family) in floats {
            registry.register(name, help, family.clone());
        }
    }

    /// Sets the revision's series from a decision's figures.
    pub fn record(&self, key: &RevisionKey, f: &RevisionFigures) {
        let labels = RevisionLabels::new(key);
        self.desired_pods
            .get_or_create(&labels)
            .set(i64::from(f.desired));
        self.actual_pods
            .get_or_create(&labels)
            .set(i64::from(f.actual));
        self.panic_mode
            .get_or_create(&labels)
            .set(i64::from(f.panicking));
        self.excess_burst_capacity
            .get_or_create(&labels)
            .set(i64::from(f.excess_burst_capacity));
        let pairs = [
            (
                f.concurrency,
                &self.stable_request_concurrency,
                &self.panic_request_concurrency,
            ),
            (
                f.rps,
                &self.stable_requests_per_second,
                &self.panic_requests_per_second,
            ),
        ];
        for (observed, stable, panic) in pairs {
            if let Some(o) = observed {
                stable.get_or_create(&labels).set(o.stable);
                panic.get_or_create(&labels).set(o.panic);
            }
        }
        let (target, other) = if f.target_is_rps {
            (
                &self.target_requests_per_second,
                &self.target_concurrency_per_pod,
            )
        } else {
            (
                &self.target_concurrency_per_pod,
                &self.target_requests_per_second,
            )
        };
        target.get_or_create(&labels).set(f.target);
        other.remove(&labels);
    }

    /// Only the desired scale is known (before the first decision).
    pub fn record_desired(&self, key: &RevisionKey, desired: u32) {
        self.desired_pods
            .get_or_create(&RevisionLabels::new(key))
            .set(i64::from(desired));
    }

    /// Drops every series of the revision (it was removed).
    pub fn remove(&self, key: &RevisionKey) {
        let labels = RevisionLabels::new(key);
        for family in [
            &self.desired_pods,
            &self.actual_pods,
            &self.panic_mode,
            &self.excess_burst_capacity,
        ] {
            family.remove(&labels);
        }
        for family in [
            &self.stable_request_concurrency,
            &self.panic_request_concurrency,
            &self.stable_requests_per_second,
            &self.panic_requests_per_second,
            &self.target_concurrency_per_pod,
            &self.target_requests_per_second,
        ] {
            family.remove(&labels);
        }
    }
}
