//! Knative Serving's controller logic for one machine, as pure functions: Service -> Configuration ->
//! Revisions and Route -> KIngress, with Knative's names, labels, conditions and config maps.
//!
//! Public API (stable; the `sluice` binary wires it to the process runtime and the xds-server):
//! - [`ServingConfig::from_config_maps`]: `config-network`, `config-domain`, `config-defaults` from
//!   namespace `knative-serving` (Knative's keys and defaults; Sluice's default domain is `localhost`).
//! - [`reconcile`]`(&ReconcileInput, &mut ServingState) -> ReconcileOutput`: the user's Services,
//!   Configurations and Routes plus observed facts (per revision: [`RevisionFacts`]; per KIngress: its
//!   status) in; every Knative object with its status, the KIngresses and one core/v1 Service per
//!   revision out. [`ServingState`] is the controller's memory (generations, created revisions); the
//!   same input and state always give the same output, and revisions are never duplicated.
//! - [`stamp_transition_times`]`(previous, &mut output, now)`: conditions' lastTransitionTime (the
//!   reconciler reads no clock).
//! - [`Template`]: the Go-template subset of `domain-template` / `tag-template`.

pub mod config;
pub mod reconcile;
pub mod template;

pub use config::{
    CONFIG_DEFAULTS, CONFIG_DOMAIN, CONFIG_NETWORK, ConfigError, DomainConfig, HttpProtocol,
    KNATIVE_SERVING_NAMESPACE, NetworkConfig, SLUICE_DEFAULT_DOMAIN, ServingConfig,
};
pub use reconcile::{
    ReconcileInput, ReconcileOutput, RevisionFacts, RevisionHealth, ServingState, reconcile,
    stamp_transition_times,
};
pub use template::{Template, TemplateError, TemplateValues};
