//! Knative's KPA as a pure library, metric scraping from Envoy, and the scaler trait.
//!
//! Public API (stable; the serving wiring and the activator use it):
//!
//! - [`AutoscalerConfig::from_config_map`]: `config-autoscaler` with Knative's defaults and checks.
//! - [`RevisionScaling::new`]: one revision's settings from the config, its `autoscaling.knative.dev/*`
//!   annotations and its containerConcurrency.
//! - [`AutoscalerService`]: the tokio runner. `start(ServiceOptions, Arc<dyn Scaler>)`, then per revision
//!   `upsert_revision` (returns a `watch::Receiver<RevisionDecision>`), `set_instances`,
//!   `set_ready_instances`, `record_activator_stat`, `poke`, `confirm_mode`, `remove_revision`;
//!   `decisions()` watches all revisions at once.
//! - [`AutoscalerMetrics`]: Knative's autoscaler gauges per revision (`AutoscalerService::metrics`).
//! - [`Scaler`]: what the service drives (the runtime implements it).
//! - [`RevisionDecision`]: desired scale, [`Mode`] (serve or proxy through the activator), activity,
//!   ready count; `routes_to_activator()` is proxy mode or no ready instance (Knative's SKS rule).
//! - Pure parts for tests and other edges: [`kpa::Autoscaler`] (the decider),
//!   [`reconciler::scale_decision`] (scale to zero, serve/proxy mode), [`collector::Collector`]
//!   (windows), [`scrape::parse_prometheus`] and [`scrape::EnvoyScraper`].

pub mod aggregation;
pub mod collector;
pub mod config;
pub mod kpa;
pub mod metrics;
pub mod reconciler;
pub mod scaler;
pub mod scrape;
pub mod service;

#[cfg(test)]
mod test_support;

pub use config::{
    AggregationAlgorithm, AnnotationError, AnnotationErrors, AutoscalerConfig, ConfigError,
    Reachability, RevisionScaling, ScalingMetric,
};
pub use kpa::{DeciderSpec, DeciderStatus, ScaleResult};
pub use metrics::AutoscalerMetrics;
pub use reconciler::{Activity, Decision, Mode, PaStatus, scale_decision};
pub use scaler::{ScaleError, Scaler};
pub use scrape::{EnvoyScraper, InstanceStat, ScrapeError};
pub use service::{AutoscalerService, RevisionDecision, ServiceOptions};
pub use sluice_api::autoscaling::{RevisionKey, Stat};
