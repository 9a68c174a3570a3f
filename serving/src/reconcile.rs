//! The serving controller as one pure function: Knative's Service, Configuration and Route reconcilers
//! (knative/serving pkg/reconciler/{service,configuration,route}) folded into [`reconcile`].
//!
//! In: the user's objects as written, the config maps, and observed facts (revision health and scale
//! from the runtime, KIngress status from the xds-server). Out: every Knative object with its status,
//! one KIngress per Route, one core/v1 Service per Revision. [`ServingState`] is what Knative keeps in
//! the API server: object generations, the Revisions created so far (immutable, never deleted while
//! their Configuration lives; Knative's revision GC is not reproduced), each Configuration's latest
//! created and latest ready revision, and the last KIngress of each Route.
//!
//! The API server's webhook would refuse an invalid object; with files there is nothing to refuse,
//! so an invalid object gets `Ready=False, reason InvalidSpec` naming the fields, and its last valid
//! spec (if any) keeps serving, as a refused update would leave the stored object in place.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sluice_api::autoscaling::{NAMESPACE_HEADER, REVISION_HEADER, RevisionKey};
use sluice_api::core::{Service as CoreService, ServicePort, ServiceSpec as CoreServiceSpec};
use sluice_api::ingress::{
    HTTP_OPTION_ENABLED, HttpIngressPath, HttpIngressRuleValue, INGRESS_CLASS_ANNOTATION, Ingress,
    IngressBackendSplit, IngressRule, IngressStatus, IntOrString, VISIBILITY_CLUSTER_LOCAL,
    VISIBILITY_EXTERNAL_IP,
};
use sluice_api::meta::{Condition, ConditionStatus, ObjectMeta, Status};
use sluice_api::serving::{
    self as kn, Addressable, CONDITION_READY, CONFIGURATION_GENERATION_LABEL, CONFIGURATION_LABEL,
    Configuration, Defaults, Protocol, REVISION_ACTIVE, REVISION_CONTAINER_HEALTHY, REVISION_LABEL,
    REVISION_RESOURCES_AVAILABLE, ROUTE_ALL_TRAFFIC_ASSIGNED, ROUTE_CERTIFICATE_PROVISIONED,
    ROUTE_INGRESS_READY, ROUTE_LABEL, ROUTE_NAMESPACE_LABEL, Revision, RevisionStatus, Route,
    RouteStatus, SERVICE_CONFIGURATIONS_READY, SERVICE_LABEL, SERVICE_ROUTES_READY, Service,
    TrafficTarget, VISIBILITY_LABEL,
};

use crate::config::{CLUSTER_DOMAIN, ServingConfig};
use crate::template::TemplateValues;

/// Knative networking: a revision's Service port, by protocol (`ServiceHTTPPort`, `ServiceHTTP2Port`).
pub const SERVICE_HTTP_PORT: i32 = 80;
pub const SERVICE_H2C_PORT: i32 = 81;
/// Knative networking: the backend (queue-proxy) ports a revision's Service targets. For Sluice the
/// real instance ports come from the Endpoints the runtime writes; these stay as Knative's.
pub const BACKEND_HTTP_PORT: i32 = 8012;
pub const BACKEND_H2C_PORT: i32 = 8013;
/// Knative networking: `ServicePortNameHTTP1` and `ServicePortNameH2C`.
pub const SERVICE_PORT_NAME_HTTP: &str = "http";
pub const SERVICE_PORT_NAME_H2C: &str = "http2";
/// The reason Sluice gives an object whose spec Knative's webhook would have refused.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Everything one reconcile reads.
#[derive(Debug, Clone, Default)]
pub struct ReconcileInput {
    /// serving.knative.dev/v1 Services as written (namespace already defaulted).
    pub services: Vec<Service>,
    /// Configurations written on their own (not those derived from Services).
    pub configurations: Vec<Configuration>,
    /// Routes written on their own.
    pub routes: Vec<Route>,
    pub config: ServingConfig,
    /// Per revision, what the runtime observed; a revision without facts is still deploying.
    pub revision_facts: BTreeMap<RevisionKey, RevisionFacts>,
    /// Per KIngress `namespace/name` (= the Route's), the status the xds-server reported.
    pub ingress_statuses: BTreeMap<String, IngressStatus>,
}

/// What the runtime observed of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevisionFacts {
    pub health: RevisionHealth,
    /// Instances running and ready (Knative's actualReplicas).
    pub actual_replicas: Option<i32>,
    /// Instances the autoscaler wants (Knative's desiredReplicas).
    pub desired_replicas: Option<i32>,
    /// The image ID the runtime resolved the serving container's image to (`sha256:...`). The first
    /// one seen is kept in [`ServingState::image_digests`] and shown as
    /// `status.containerStatuses[].imageDigest` (Knative resolves tag to digest once, at creation).
    pub image_digest: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RevisionHealth {
    /// No instance has passed its readiness probe yet.
    #[default]
    Deploying,
    /// Reached its initial scale once. Knative keeps a Revision Ready when it later scales to zero
    /// (Active=False, NoTraffic), so this stays Ready then.
    Ready,
    /// Cannot run. `reason` is CamelCase as Knative's (`ExitCode1`, `ProgressDeadlineExceeded`).
    Failed { reason: String, message: String },
}

/// Everything one reconcile produces, each list sorted by namespace then name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconcileOutput {
    pub services: Vec<Service>,
    pub configurations: Vec<Configuration>,
    pub revisions: Vec<Revision>,
    pub routes: Vec<Route>,
    /// One KIngress per Route whose traffic resolved at least once; class from the Route's
    /// annotation or config-network `ingress-class`.
    pub ingresses: Vec<Ingress>,
    /// One core/v1 Service per Revision, named after it, for the KIngress splits to resolve; the
    /// caller pairs each with Endpoints (the instances, or the activator).
    pub revision_services: Vec<CoreService>,
    /// Things skipped, for the user (duplicate objects).
    pub warnings: Vec<String>,
}

impl ReconcileOutput {
    pub fn revision(&self, namespace: &str, name: &str) -> Option<&Revision> {
        self.revisions
            .iter()
            .find(|r| r.metadata.namespace == namespace && r.metadata.name == name)
    }
}

/// The controller's memory between reconciles (what Knative keeps in the API server). Serializable
/// so a restart can resume revision numbering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingState {
    /// Per `Kind/namespace/name`: the last accepted spec and its generation (bumped when it changes).
    pub objects: BTreeMap<String, Accepted>,
    /// Per Configuration `namespace/name`.
    pub configurations: BTreeMap<String, ConfigurationMemory>,
    /// Per Route `namespace/name`: the KIngress last produced.
    pub ingresses: BTreeMap<String, IngressMemory>,
    /// Per Revision `namespace/name`: the image ID its serving container was resolved to, once. Kept
    /// so that after a restart the revision runs that same image, even if its tag moved since.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image_digests: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub generation: i64,
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationMemory {
    /// Every Revision created for the Configuration, by name; immutable once created.
    pub revisions: BTreeMap<String, Revision>,
    pub latest_created: String,
    pub latest_ready: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressMemory {
    pub generation: i64,
    pub ingress: Ingress,
    pub traffic: Vec<TrafficTarget>,
}

impl ServingState {
    /// Records `spec` as accepted when valid (bumping the generation if it changed) and returns the
    /// spec to act on: this one, or the last valid one when this one is invalid.
    fn accept(
        &mut self,
        kind: &str,
        meta: &ObjectMeta,
        spec: serde_json::Value,
        valid: bool,
        seen: &mut BTreeSet<String>,
    ) -> Option<(i64, serde_json::Value)> {
        let key = format!("{kind}/{}", meta.key());
        seen.insert(key.clone());
        let previous = self.objects.get(&key);
        if !valid {
            return previous.map(|a| (a.generation, a.spec.clone()));
        }
        if let Some(a) = previous
            && a.spec == spec
        {
            return Some((a.generation, spec));
        }
        let generation = previous.map_or(1, |a| a.generation + 1);
        self.objects.insert(
            key,
            Accepted {
                generation,
                spec: spec.clone(),
            },
        );
        Some((generation, spec))
    }
}

struct ConfigWork {
    cfg: Configuration,
    invalid: Option<String>,
}

struct RouteWork {
    route: Route,
    invalid: Option<String>,
}

struct ServiceWork {
    svc: Service,
    invalid: Option<String>,
    owns_configuration: bool,
    owns_route: bool,
}

/// One pass of Knative's Service, Configuration, Revision and Route reconcilers. Deterministic: the
/// same input and state give the same output and leave the state as it was.
pub fn reconcile(input: &ReconcileInput, state: &mut ServingState) -> ReconcileOutput {
    let config = &input.config;
    let d = &config.defaults;
    let mut out = ReconcileOutput::default();
    let mut seen = BTreeSet::new();

    let services = unique(
        &input.services,
        "Service",
        |s| &s.metadata,
        &mut out.warnings,
    );
    let standalone_configs = unique(
        &input.configurations,
        "Configuration",
        |c| &c.metadata,
        &mut out.warnings,
    );
    let standalone_routes = unique(&input.routes, "Route", |r| &r.metadata, &mut out.warnings);

    let mut configs: BTreeMap<String, ConfigWork> = BTreeMap::new();
    let mut routes: BTreeMap<String, RouteWork> = BTreeMap::new();
    let mut service_work = Vec::new();

    // Services: validate, then derive their Configuration and Route (Knative's MakeConfiguration,
    // MakeRoute) unless an object of that name exists that the Service does not own.
    for svc in services {
        let key = svc.metadata.key();
        let invalid = svc.validate(d).err().map(|e| e.to_string());
        let mut eff = svc.clone();
        eff.status = Default::default();
        let spec = serde_json::to_value(&svc.spec).unwrap_or_default();
        let Some((generation, spec)) =
            state.accept("Service", &svc.metadata, spec, invalid.is_none(), &mut seen)
        else {
            mark_invalid(
                &mut eff.status.status,
                &[SERVICE_CONFIGURATIONS_READY, SERVICE_ROUTES_READY],
                invalid.as_deref().unwrap_or_default(),
            );
            out.services.push(eff);
            continue;
        };
        eff.spec = serde_json::from_value(spec).unwrap_or_default();
        eff.metadata.generation = generation;
        let owns_configuration = !standalone_configs.iter().any(|c| c.metadata.key() == key);
        if owns_configuration {
            let mut cfg = make_configuration(&eff);
            let spec = serde_json::to_value(&cfg.spec).unwrap_or_default();
            if let Some((g, _)) =
                state.accept("Configuration", &cfg.metadata, spec, true, &mut seen)
            {
                cfg.metadata.generation = g;
            }
            configs.insert(key.clone(), ConfigWork { cfg, invalid: None });
        }
        let owns_route = !standalone_routes.iter().any(|r| r.metadata.key() == key);
        if owns_route {
            let mut route = make_route(&eff);
            let spec = serde_json::to_value(&route.spec).unwrap_or_default();
            if let Some((g, _)) = state.accept("Route", &route.metadata, spec, true, &mut seen) {
                route.metadata.generation = g;
            }
            routes.insert(
                key.clone(),
                RouteWork {
                    route,
                    invalid: None,
                },
            );
        }
        service_work.push(ServiceWork {
            svc: eff,
            invalid,
            owns_configuration,
            owns_route,
        });
    }

    for c in standalone_configs {
        let invalid = c.validate(d).err().map(|e| e.to_string());
        let mut eff = c.clone();
        eff.status = Default::default();
        let spec = serde_json::to_value(&c.spec).unwrap_or_default();
        match state.accept(
            "Configuration",
            &c.metadata,
            spec,
            invalid.is_none(),
            &mut seen,
        ) {
            None => {
                mark_invalid(
                    &mut eff.status.status,
                    &[],
                    invalid.as_deref().unwrap_or_default(),
                );
                out.configurations.push(eff);
            }
            Some((generation, spec)) => {
                eff.spec = serde_json::from_value(spec).unwrap_or_default();
                eff.metadata.generation = generation;
                configs.insert(c.metadata.key(), ConfigWork { cfg: eff, invalid });
            }
        }
    }

    for r in standalone_routes {
        let invalid = r.validate().err().map(|e| e.to_string());
        let mut eff = r.clone();
        eff.status = Default::default();
        let spec = serde_json::to_value(&r.spec).unwrap_or_default();
        match state.accept("Route", &r.metadata, spec, invalid.is_none(), &mut seen) {
            None => {
                mark_invalid(
                    &mut eff.status.status,
                    &[],
                    invalid.as_deref().unwrap_or_default(),
                );
                out.routes.push(eff);
            }
            Some((generation, spec)) => {
                eff.spec = serde_json::from_value(spec).unwrap_or_default();
                eff.spec.set_defaults(None);
                eff.metadata.generation = generation;
                routes.insert(
                    r.metadata.key(),
                    RouteWork {
                        route: eff,
                        invalid,
                    },
                );
            }
        }
    }

    // Configurations: create the Revision of each new generation, then status.
    state.configurations.retain(|k, _| configs.contains_key(k));
    let mut names_taken: BTreeMap<String, String> = BTreeMap::new();
    for (key, work) in &mut configs {
        if let Some(taken) = reconcile_configuration(&mut work.cfg, state, input, d) {
            names_taken.insert(key.clone(), taken);
        }
        if let Some(msg) = &work.invalid {
            mark_still_serving(&mut work.cfg.status.status, msg);
        }
    }

    // Revisions, and the namespace-wide index the Routes resolve revisionName through.
    let mut revisions: BTreeMap<(String, String), Revision> = BTreeMap::new();
    let mut digests = std::mem::take(&mut state.image_digests);
    let mut live_digests = BTreeMap::new();
    for mem in state.configurations.values() {
        for rev in mem.revisions.values() {
            let mut rev = rev.clone();
            let facts = input.revision_facts.get(&RevisionKey::new(
                rev.metadata.namespace.clone(),
                rev.metadata.name.clone(),
            ));
            rev.status = revision_status(facts);
            let key = rev.metadata.key();
            let digest = digests
                .remove(&key)
                .or_else(|| facts.and_then(|f| f.image_digest.clone()));
            if let Some(digest) = digest {
                rev.status.container_statuses = vec![kn::ContainerStatus {
                    name: serving_container_name(&rev),
                    image_digest: digest.clone(),
                }];
                live_digests.insert(key, digest);
            }
            revisions.insert(
                (rev.metadata.namespace.clone(), rev.metadata.name.clone()),
                rev,
            );
        }
    }
    // Digests of revisions that are gone go with them.
    state.image_digests = live_digests;

    // Routes.
    state.ingresses.retain(|k, _| routes.contains_key(k));
    for work in routes.values_mut() {
        if let Some(ing) = reconcile_route(&mut work.route, &configs, &revisions, state, input) {
            out.ingresses.push(ing);
        }
        if let Some(msg) = &work.invalid {
            mark_still_serving(&mut work.route.status.status, msg);
        }
    }

    // Services: propagate their Configuration's and Route's status (Knative's
    // PropagateConfigurationStatus / PropagateRouteStatus).
    for mut w in service_work {
        let key = w.svc.metadata.key();
        let name = w.svc.metadata.name.clone();
        let st = &mut w.svc.status;
        st.status.observed_generation = w.svc.metadata.generation;
        if !w.owns_configuration {
            set(
                &mut st.status,
                SERVICE_CONFIGURATIONS_READY,
                ConditionStatus::False,
                "NotOwned",
                &format!("There is an existing Configuration {name:?} that we do not own."),
            );
        } else if let Some(c) = configs.get(&key) {
            st.latest_created_revision_name = c.cfg.status.latest_created_revision_name.clone();
            st.latest_ready_revision_name = c.cfg.status.latest_ready_revision_name.clone();
            propagate(
                &mut st.status,
                SERVICE_CONFIGURATIONS_READY,
                c.cfg.status.status.condition(CONDITION_READY),
            );
        }
        if !w.owns_route {
            set(
                &mut st.status,
                SERVICE_ROUTES_READY,
                ConditionStatus::False,
                "NotOwned",
                &format!("There is an existing Route {name:?} that we do not own."),
            );
        } else if let Some(r) = routes.get(&key) {
            st.url = r.route.status.url.clone();
            st.address = r.route.status.address.clone();
            st.traffic = r.route.status.traffic.clone();
            propagate(
                &mut st.status,
                SERVICE_ROUTES_READY,
                r.route.status.status.condition(CONDITION_READY),
            );
        }
        if let Some(taken) = names_taken.get(&key) {
            set(
                &mut st.status,
                SERVICE_ROUTES_READY,
                ConditionStatus::False,
                "RevisionNameTaken",
                &format!(
                    "The revision name {taken:?} is taken by a conflicting Revision, so traffic will not be migrated"
                ),
            );
        }
        ready_from(
            &mut st.status,
            &[SERVICE_CONFIGURATIONS_READY, SERVICE_ROUTES_READY],
        );
        if let Some(msg) = &w.invalid {
            mark_still_serving(&mut st.status, msg);
        }
        out.services.push(w.svc);
    }

    state.objects.retain(|k, _| seen.contains(k));

    out.configurations
        .extend(configs.into_values().map(|w| w.cfg));
    out.routes.extend(routes.into_values().map(|w| w.route));
    out.revision_services = revisions.values().map(revision_service).collect();
    out.revisions = revisions.into_values().collect();
    let by_key = |m: &ObjectMeta| (m.namespace.clone(), m.name.clone());
    out.services.sort_by_key(|s| by_key(&s.metadata));
    out.configurations.sort_by_key(|c| by_key(&c.metadata));
    out.routes.sort_by_key(|r| by_key(&r.metadata));
    out.ingresses.sort_by_key(|i| by_key(&i.metadata));
    out
}

/// Gives every condition of `out` a lastTransitionTime: the one in `previous` when that condition's
/// status did not change, else `now` (RFC 3339, e.g. "2026-11-26T15:00:00Z"). [`reconcile`] reads no
/// clock, so the caller stamps its output with this, passing its previous output.
pub fn stamp_transition_times(
    previous: Option<&ReconcileOutput>,
    out: &mut ReconcileOutput,
    now: &str,
) {
    fn stamp(prev: Option<&Status>, st: &mut Status, now: &str) {
        for c in &mut st.conditions {
            let kept = prev
                .and_then(|p| p.condition(&c.type_))
                .filter(|p| p.status == c.status)
                .and_then(|p| p.last_transition_time.clone());
            c.last_transition_time = Some(kept.unwrap_or_else(|| now.to_string()));
        }
    }
    fn find<'a, T>(
        list: &'a [T],
        meta: impl Fn(&T) -> &ObjectMeta,
        key: &ObjectMeta,
    ) -> Option<&'a T> {
        list.iter()
            .find(|o| meta(o).namespace == key.namespace && meta(o).name == key.name)
    }
    let prev = previous.cloned().unwrap_or_default();
    for o in &mut out.services {
        let p = find(&prev.services, |x| &x.metadata, &o.metadata).map(|x| &x.status.status);
        stamp(p, &mut o.status.status, now);
    }
    for o in &mut out.configurations {
        let p = find(&prev.configurations, |x| &x.metadata, &o.metadata).map(|x| &x.status.status);
        stamp(p, &mut o.status.status, now);
    }
    for o in &mut out.revisions {
        let p = find(&prev.revisions, |x| &x.metadata, &o.metadata).map(|x| &x.status.status);
        stamp(p, &mut o.status.status, now);
    }
    for o in &mut out.routes {
        let p = find(&prev.routes, |x| &x.metadata, &o.metadata).map(|x| &x.status.status);
        stamp(p, &mut o.status.status, now);
    }
}

fn unique<'a, T>(
    items: &'a [T],
    kind: &str,
    meta: impl Fn(&T) -> &ObjectMeta,
    warnings: &mut Vec<String>,
) -> Vec<&'a T> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for item in items {
        let key = meta(item).key();
        if seen.insert(key.clone()) {
            out.push(item);
        } else {
            warnings.push(format!(
                "{kind} {key} is defined more than once; the first definition is used"
            ));
        }
    }
    out
}

fn owner_reference(kind: &str, meta: &ObjectMeta) -> serde_json::Value {
    let mut r = serde_json::json!({
        "apiVersion": kn::API_VERSION,
        "kind": kind,
        "name": meta.name,
        "controller": true,
        "blockOwnerDeletion": true,
    });
    if !meta.uid.is_empty() {
        r["uid"] = serde_json::Value::String(meta.uid.clone());
    }
    r
}

/// The metadata Knative gives a child of a Service: its labels plus the service label, its
/// annotations without kubectl's bookkeeping, and an owner reference.
fn child_meta(svc: &Service) -> ObjectMeta {
    let mut labels = svc.metadata.labels.clone();
    labels.insert(SERVICE_LABEL.to_string(), svc.metadata.name.clone());
    let mut annotations = svc.metadata.annotations.clone();
    annotations.remove(LAST_APPLIED);
    ObjectMeta {
        name: svc.metadata.name.clone(),
        namespace: svc.metadata.namespace.clone(),
        labels,
        annotations,
        owner_references: vec![owner_reference("Service", &svc.metadata)],
        ..Default::default()
    }
}

/// Knative's service/resources MakeConfiguration.
fn make_configuration(svc: &Service) -> Configuration {
    Configuration {
        metadata: child_meta(svc),
        spec: svc.spec.configuration_spec(),
        ..Default::default()
    }
}

/// Knative's service/resources MakeRoute: the Service's traffic, defaulted, with the implied
/// configurationName filled in.
fn make_route(svc: &Service) -> Route {
    let mut spec = svc.spec.route_spec();
    spec.set_defaults(Some(&svc.metadata.name));
    for t in &mut spec.traffic {
        if t.revision_name.is_empty() {
            t.configuration_name = svc.metadata.name.clone();
        }
    }
    Route {
        metadata: child_meta(svc),
        spec,
        ..Default::default()
    }
}

/// Knative's configuration/resources names.go: `kmeta.ChildName(config, "-%05d")`. Knative hashes
/// an over-long parent; Sluice truncates it (names stay unique per configuration generation).
fn revision_name(config: &str, generation: i64) -> String {
    let suffix = format!("-{generation:05}");
    let keep = 63usize.saturating_sub(suffix.len()).min(config.len());
    format!("{}{suffix}", &config[..keep])
}

fn generation_of(rev: &Revision) -> i64 {
    rev.metadata
        .labels
        .get(CONFIGURATION_GENERATION_LABEL)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// Knative's configuration/resources MakeRevision.
fn make_revision(cfg: &Configuration, name: &str, generation: i64, d: &Defaults) -> Revision {
    let template = &cfg.spec.template;
    let mut spec = template.spec.clone();
    spec.set_defaults(d);
    let mut labels = template.metadata.labels.clone();
    labels.insert(CONFIGURATION_LABEL.to_string(), cfg.metadata.name.clone());
    labels.insert(
        CONFIGURATION_GENERATION_LABEL.to_string(),
        generation.to_string(),
    );
    if let Some(svc) = cfg.metadata.labels.get(SERVICE_LABEL) {
        labels.insert(SERVICE_LABEL.to_string(), svc.clone());
    }
    Revision {
        metadata: ObjectMeta {
            name: name.to_string(),
            namespace: cfg.metadata.namespace.clone(),
            generation: 1,
            labels,
            annotations: template.metadata.annotations.clone(),
            owner_references: vec![owner_reference("Configuration", &cfg.metadata)],
            ..Default::default()
        },
        spec,
        ..Default::default()
    }
}

fn is_ready(input: &ReconcileInput, namespace: &str, name: &str) -> bool {
    input
        .revision_facts
        .get(&RevisionKey::new(namespace, name))
        .is_some_and(|f| f.health == RevisionHealth::Ready)
}

/// Knative's configuration reconciler. Returns the brought-your-own revision name when it is taken
/// by a conflicting Revision.
fn reconcile_configuration(
    cfg: &mut Configuration,
    state: &mut ServingState,
    input: &ReconcileInput,
    d: &Defaults,
) -> Option<String> {
    let key = cfg.metadata.key();
    let ns = cfg.metadata.namespace.clone();
    let generation = cfg.metadata.generation;
    let byo = &cfg.spec.template.metadata.name;
    let name = if byo.is_empty() {
        revision_name(&cfg.metadata.name, generation)
    } else {
        byo.clone()
    };
    let owner = state
        .configurations
        .iter()
        .find(|(k, m)| k.split('/').next() == Some(ns.as_str()) && m.revisions.contains_key(&name))
        .map(|(k, m)| (k.clone(), generation_of(&m.revisions[&name])));
    let creation_error = match owner {
        Some((other, _)) if other != key => Some(format!(
            "revision {name:?} already exists and belongs to Configuration {:?}",
            other.split('/').nth(1).unwrap_or_default()
        )),
        // Knative: a changed template must come with a new name (VerifyNameChange).
        Some((_, g)) if g != generation => Some(format!(
            "revision {name:?} already exists with a different template; give \
             spec.template.metadata.name a new value with each template change"
        )),
        Some(_) => None,
        None => {
            let rev = make_revision(cfg, &name, generation, d);
            tracing::info!(revision = %format!("{ns}/{name}"), "creating revision");
            state
                .configurations
                .entry(key.clone())
                .or_default()
                .revisions
                .insert(name.clone(), rev);
            None
        }
    };
    let mem = state.configurations.entry(key).or_default();
    if creation_error.is_none() {
        mem.latest_created = name.clone();
    }
    // Knative's findAndSetLatestReadyRevision: the newest ready revision not older than the current
    // latest ready one and not newer than the latest created; it never moves backwards.
    let created_gen = mem
        .revisions
        .get(&mem.latest_created)
        .map_or(0, generation_of);
    let ready_gen = mem
        .revisions
        .get(&mem.latest_ready)
        .map_or(0, generation_of);
    let newest_ready = mem
        .revisions
        .values()
        .filter(|r| {
            let g = generation_of(r);
            g <= created_gen && g > ready_gen && is_ready(input, &ns, &r.metadata.name)
        })
        .max_by_key(|r| generation_of(r));
    if let Some(r) = newest_ready {
        mem.latest_ready = r.metadata.name.clone();
    }

    let st = &mut cfg.status;
    st.status.observed_generation = generation;
    st.latest_created_revision_name = mem.latest_created.clone();
    st.latest_ready_revision_name = mem.latest_ready.clone();
    let facts = input
        .revision_facts
        .get(&RevisionKey::new(ns.as_str(), mem.latest_created.as_str()));
    let (status, reason, message) = match (&creation_error, facts.map(|f| &f.health)) {
        (Some(e), _) => (
            ConditionStatus::False,
            "RevisionFailed",
            format!("Revision creation failed with message: {e}."),
        ),
        (None, Some(RevisionHealth::Ready)) => (ConditionStatus::True, "", String::new()),
        (None, Some(RevisionHealth::Failed { message, .. })) => (
            ConditionStatus::False,
            "RevisionFailed",
            format!(
                "Revision {:?} failed with message: {message}.",
                mem.latest_created
            ),
        ),
        (None, _) => (ConditionStatus::Unknown, "", String::new()),
    };
    set(&mut st.status, CONDITION_READY, status, reason, &message);
    creation_error.map(|_| name)
}

/// The name of the container that serves: the one with a port, else the only one.
fn serving_container_name(rev: &Revision) -> String {
    let containers = &rev.spec.containers;
    containers
        .iter()
        .find(|c| !c.ports.is_empty())
        .or(containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

/// Knative's revision lifecycle, from the runtime's facts.
fn revision_status(facts: Option<&RevisionFacts>) -> RevisionStatus {
    let f = facts.cloned().unwrap_or_default();
    let mut st = RevisionStatus {
        actual_replicas: f.actual_replicas,
        desired_replicas: f.desired_replicas,
        ..Default::default()
    };
    st.status.observed_generation = 1;
    use ConditionStatus::{False, True, Unknown};
    let s = &mut st.status;
    match &f.health {
        RevisionHealth::Deploying => {
            set(s, REVISION_RESOURCES_AVAILABLE, Unknown, "Deploying", "");
            set(s, REVISION_CONTAINER_HEALTHY, Unknown, "", "");
            set(s, REVISION_ACTIVE, Unknown, "Deploying", "");
        }
        RevisionHealth::Ready | RevisionHealth::Failed { .. } => {
            if let RevisionHealth::Failed { reason, message } = &f.health {
                set(s, REVISION_RESOURCES_AVAILABLE, False, reason, message);
                set(s, REVISION_CONTAINER_HEALTHY, False, reason, message);
            } else {
                set(s, REVISION_RESOURCES_AVAILABLE, True, "", "");
                set(s, REVISION_CONTAINER_HEALTHY, True, "", "");
            }
            // Knative: Active mirrors the PodAutoscaler; at zero it is False with NoTraffic.
            match f.actual_replicas {
                Some(0) => set(
                    s,
                    REVISION_ACTIVE,
                    False,
                    "NoTraffic",
                    "The target is not receiving traffic.",
                ),
                Some(_) => set(s, REVISION_ACTIVE, True, "", ""),
                None => set(s, REVISION_ACTIVE, Unknown, "Deploying", ""),
            }
        }
    }
    // Knative: Active is not a dependent of Ready (an inactive revision is still Ready).
    ready_from(
        s,
        &[REVISION_RESOURCES_AVAILABLE, REVISION_CONTAINER_HEALTHY],
    );
    st
}

/// Knative: a revision's Service ports by protocol (networking ServicePort / ServicePortName).
fn revision_service(rev: &Revision) -> CoreService {
    let (port, name, target, app_protocol) = match rev.spec.protocol() {
        Protocol::Http1 => (
            SERVICE_HTTP_PORT,
            SERVICE_PORT_NAME_HTTP,
            BACKEND_HTTP_PORT,
            None,
        ),
        Protocol::H2c => (
            SERVICE_H2C_PORT,
            SERVICE_PORT_NAME_H2C,
            BACKEND_H2C_PORT,
            Some("kubernetes.io/h2c".to_string()),
        ),
    };
    let mut labels = BTreeMap::from([(REVISION_LABEL.to_string(), rev.metadata.name.clone())]);
    for key in [CONFIGURATION_LABEL, SERVICE_LABEL] {
        if let Some(v) = rev.metadata.labels.get(key) {
            labels.insert(key.to_string(), v.clone());
        }
    }
    CoreService {
        metadata: ObjectMeta {
            name: rev.metadata.name.clone(),
            namespace: rev.metadata.namespace.clone(),
            labels,
            owner_references: vec![owner_reference("Revision", &rev.metadata)],
            ..Default::default()
        },
        spec: CoreServiceSpec {
            ports: vec![ServicePort {
                name: name.to_string(),
                protocol: "TCP".to_string(),
                app_protocol,
                port,
                target_port: Some(IntOrString::Int(target)),
            }],
            ..Default::default()
        },
    }
}

/// A traffic target flattened to a revision (Knative's traffic.RevisionTarget).
#[derive(Debug, Clone)]
struct Flat {
    tag: String,
    revision_name: String,
    latest: bool,
    percent: Option<i64>,
    protocol: Protocol,
}

/// Knative's traffic.TargetError.
enum TargetError {
    Missing { kind: &'static str, name: String },
    ConfigurationNotReady { name: String, failed: bool },
    RevisionNotReady { name: String, failed: bool },
}

impl TargetError {
    fn is_failure(&self) -> bool {
        match self {
            TargetError::Missing { .. } => true,
            TargetError::ConfigurationNotReady { failed, .. }
            | TargetError::RevisionNotReady { failed, .. } => *failed,
        }
    }

    /// Knative's RouteStatus Mark* functions for a bad target.
    fn mark(&self, st: &mut Status) {
        use ConditionStatus::{False, Unknown};
        let (status, reason, message) = match self {
            TargetError::Missing { kind, name } => (
                False,
                format!("{kind}Missing"),
                format!("{kind} {name:?} referenced in traffic not found."),
            ),
            TargetError::ConfigurationNotReady { name, failed: true } => (
                False,
                "RevisionMissing".to_string(),
                format!("Configuration {name:?} does not have any ready Revision."),
            ),
            TargetError::ConfigurationNotReady {
                name,
                failed: false,
            } => (
                Unknown,
                "RevisionMissing".to_string(),
                format!("Configuration {name:?} is waiting for a Revision to become ready."),
            ),
            TargetError::RevisionNotReady { name, failed: true } => (
                False,
                "RevisionMissing".to_string(),
                format!("Revision {name:?} failed to become ready."),
            ),
            TargetError::RevisionNotReady {
                name,
                failed: false,
            } => (
                Unknown,
                "RevisionMissing".to_string(),
                format!("Revision {name:?} is not yet ready."),
            ),
        };
        set(st, ROUTE_ALL_TRAFFIC_ASSIGNED, status, &reason, &message);
    }
}

/// Knative's BuildTrafficConfiguration: every target flattened to a revision, or the error to
/// report (a failure overrides an earlier not-yet-ready).
fn resolve_traffic(
    route: &Route,
    configs: &BTreeMap<String, ConfigWork>,
    revisions: &BTreeMap<(String, String), Revision>,
    input: &ReconcileInput,
) -> Result<Vec<Flat>, TargetError> {
    let ns = &route.metadata.namespace;
    let mut flats = Vec::new();
    let mut deferred: Option<TargetError> = None;
    for t in &route.spec.traffic {
        let resolved = if !t.revision_name.is_empty() {
            match revisions.get(&(ns.clone(), t.revision_name.clone())) {
                None => Err(TargetError::Missing {
                    kind: "Revision",
                    name: t.revision_name.clone(),
                }),
                Some(rev) if !is_ready(input, ns, &rev.metadata.name) => {
                    Err(TargetError::RevisionNotReady {
                        name: rev.metadata.name.clone(),
                        failed: rev
                            .status
                            .status
                            .condition(CONDITION_READY)
                            .is_some_and(|c| c.status == ConditionStatus::False),
                    })
                }
                Some(rev) => Ok((rev.metadata.name.clone(), rev.spec.protocol())),
            }
        } else {
            match configs.get(&format!("{ns}/{}", t.configuration_name)) {
                None => Err(TargetError::Missing {
                    kind: "Configuration",
                    name: t.configuration_name.clone(),
                }),
                Some(c) if c.cfg.status.latest_ready_revision_name.is_empty() => {
                    Err(TargetError::ConfigurationNotReady {
                        name: t.configuration_name.clone(),
                        failed: c
                            .cfg
                            .status
                            .status
                            .condition(CONDITION_READY)
                            .is_some_and(|c| c.status == ConditionStatus::False),
                    })
                }
                Some(c) => {
                    let name = c.cfg.status.latest_ready_revision_name.clone();
                    let protocol = revisions
                        .get(&(ns.clone(), name.clone()))
                        .map_or(Protocol::Http1, |r| r.spec.protocol());
                    Ok((name, protocol))
                }
            }
        };
        match resolved {
            Ok((revision_name, protocol)) => flats.push(Flat {
                tag: t.tag.clone(),
                revision_name,
                latest: t.is_latest(),
                percent: t.percent,
                protocol,
            }),
            Err(e) => {
                if deferred.is_none() || e.is_failure() {
                    deferred = Some(e);
                }
            }
        }
    }
    match deferred {
        Some(e) => Err(e),
        None => Ok(flats),
    }
}

/// Knative's consolidate: one entry per revision with percents summed; a lone entry gets 100.
fn consolidate(flats: &[&Flat]) -> Vec<Flat> {
    let mut out: Vec<Flat> = Vec::new();
    for f in flats {
        match out.iter_mut().find(|o| o.revision_name == f.revision_name) {
            Some(o) => {
                if let Some(p) = f.percent {
                    o.percent = Some(o.percent.unwrap_or(0) + p);
                }
            }
            None => out.push((*f).clone()),
        }
    }
    if let [only] = out.as_mut_slice() {
        only.percent = Some(100);
    }
    out
}

fn url(scheme: &str, host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }
}

/// Knative's domains.HostnameFromTemplate: the route name, or the tag template's rendering.
fn hostname(config: &ServingConfig, route: &str, tag: &str) -> String {
    if tag.is_empty() {
        return route.to_string();
    }
    config.network.tag_template.render(&TemplateValues {
        name: route,
        tag,
        ..Default::default()
    })
}

/// Knative's domains.DomainNameFromTemplate for the external visibility.
fn external_domain(config: &ServingConfig, route: &Route, hostname: &str) -> String {
    let domain = config.domain.lookup(&route.metadata.labels);
    config.network.domain_template.render(&TemplateValues {
        name: hostname,
        namespace: &route.metadata.namespace,
        domain: &domain,
        tag: "",
        annotations: Some(&route.metadata.annotations),
        labels: Some(&route.metadata.labels),
    })
}

fn cluster_local_domain(ns: &str, hostname: &str) -> String {
    format!("{hostname}.{ns}.svc.{CLUSTER_DOMAIN}")
}

/// The URL a target name ("" for the route itself) answers at.
fn target_url(config: &ServingConfig, route: &Route, cluster_local: bool, tag: &str) -> String {
    let host = hostname(config, &route.metadata.name, tag);
    if cluster_local {
        url(
            "http",
            &cluster_local_domain(&route.metadata.namespace, &host),
            None,
        )
    } else {
        url(
            &config.network.default_external_scheme,
            &external_domain(config, route, &host),
            config.external_url_port,
        )
    }
}

/// Knative's route reconciler. Returns the Route's KIngress, if it has one.
fn reconcile_route(
    route: &mut Route,
    configs: &BTreeMap<String, ConfigWork>,
    revisions: &BTreeMap<(String, String), Revision>,
    state: &mut ServingState,
    input: &ReconcileInput,
) -> Option<Ingress> {
    let config = &input.config;
    let key = route.metadata.key();
    let ns = route.metadata.namespace.clone();
    let cluster_local = route
        .metadata
        .labels
        .get(VISIBILITY_LABEL)
        .map(String::as_str)
        == Some(kn::VISIBILITY_CLUSTER_LOCAL);
    let mut status = RouteStatus {
        url: Some(target_url(config, route, cluster_local, "")),
        address: Some(Addressable {
            url: Some(url(
                "http",
                &cluster_local_domain(&ns, &route.metadata.name),
                None,
            )),
        }),
        ..Default::default()
    };
    status.status.observed_generation = route.metadata.generation;

    let emitted = match resolve_traffic(route, configs, revisions, input) {
        Err(e) => {
            e.mark(&mut status.status);
            // Knative stops here and leaves the KIngress as it was: keep serving the last traffic.
            state.ingresses.get(&key).map(|m| {
                status.traffic = m.traffic.clone();
                (m.generation, m.ingress.clone())
            })
        }
        Ok(flats) => {
            set(
                &mut status.status,
                ROUTE_ALL_TRAFFIC_ASSIGNED,
                ConditionStatus::True,
                "",
                "",
            );
            status.traffic = status_traffic(config, route, cluster_local, &flats);
            let ingress = make_ingress(config, route, cluster_local, &flats);
            let generation = match state.ingresses.get(&key) {
                Some(m) if m.ingress.spec == ingress.spec => m.generation,
                Some(m) => m.generation + 1,
                None => 1,
            };
            let mut ingress = ingress;
            ingress.metadata.generation = generation;
            state.ingresses.insert(
                key.clone(),
                IngressMemory {
                    generation,
                    ingress: ingress.clone(),
                    traffic: status.traffic.clone(),
                },
            );
            Some((generation, ingress))
        }
    };

    if let Some((generation, _)) = &emitted {
        // Knative's PropagateIngressStatus, once the KIngress has observed this generation (an
        // observedGeneration of 0 means the reporter does not track generations).
        let observed = input.ingress_statuses.get(&key).filter(|s| {
            s.status.observed_generation == 0 || s.status.observed_generation == *generation
        });
        match observed.and_then(|s| s.status.condition(CONDITION_READY)) {
            Some(c) => propagate(&mut status.status, ROUTE_INGRESS_READY, Some(c)),
            None => set(
                &mut status.status,
                ROUTE_INGRESS_READY,
                ConditionStatus::Unknown,
                "IngressNotConfigured",
                "Ingress has not yet been reconciled.",
            ),
        }
        // Knative's MarkTLSNotEnabled: Sluice provisions no certificates.
        let message = if cluster_local {
            "TLS is not enabled for cluster-local"
        } else {
            "external-domain-tls is not enabled"
        };
        set(
            &mut status.status,
            ROUTE_CERTIFICATE_PROVISIONED,
            ConditionStatus::True,
            "TLSNotEnabled",
            message,
        );
    } else {
        for c in [ROUTE_INGRESS_READY, ROUTE_CERTIFICATE_PROVISIONED] {
            set(&mut status.status, c, ConditionStatus::Unknown, "", "");
        }
    }
    ready_from(
        &mut status.status,
        &[
            ROUTE_ALL_TRAFFIC_ASSIGNED,
            ROUTE_INGRESS_READY,
            ROUTE_CERTIFICATE_PROVISIONED,
        ],
    );
    route.status = status;
    emitted.map(|(_, ing)| ing)
}

/// Knative's GetRevisionTrafficTargets: the spec's targets at revision level, equal (tag, revision,
/// latestRevision) merged, configurationName cleared, tags given their URL.
fn status_traffic(
    config: &ServingConfig,
    route: &Route,
    cluster_local: bool,
    flats: &[Flat],
) -> Vec<TrafficTarget> {
    let mut merged: Vec<Flat> = Vec::new();
    for f in flats {
        match merged
            .iter_mut()
            .find(|m| m.tag == f.tag && m.revision_name == f.revision_name && m.latest == f.latest)
        {
            Some(m) => {
                if let Some(p) = f.percent {
                    m.percent = Some(m.percent.unwrap_or(0) + p);
                }
            }
            None => merged.push(f.clone()),
        }
    }
    merged
        .into_iter()
        .map(|f| TrafficTarget {
            url: (!f.tag.is_empty()).then(|| target_url(config, route, cluster_local, &f.tag)),
            tag: f.tag,
            revision_name: f.revision_name,
            configuration_name: String::new(),
            latest_revision: Some(f.latest),
            percent: f.percent,
        })
        .collect()
}

/// Knative's route/resources MakeIngress: per target name ("" then tags, sorted), a cluster-local
/// rule (`<host>.<ns>`, `<host>.<ns>.svc`, `<host>.<ns>.svc.cluster.local`) and, unless the Route is
/// cluster-local, an external rule (`domain-template`); each splits by percent to revision Services.
fn make_ingress(
    config: &ServingConfig,
    route: &Route,
    cluster_local: bool,
    flats: &[Flat],
) -> Ingress {
    let ns = &route.metadata.namespace;
    let mut targets: BTreeMap<&str, Vec<&Flat>> = BTreeMap::new();
    for f in flats {
        targets.entry("").or_default().push(f);
        if !f.tag.is_empty() {
            targets.entry(f.tag.as_str()).or_default().push(f);
        }
    }
    let mut rules = Vec::new();
    for (name, group) in &targets {
        let group = consolidate(group);
        let host = hostname(config, &route.metadata.name, name);
        let splits: Vec<IngressBackendSplit> = group
            .iter()
            .filter(|f| f.percent.unwrap_or(0) > 0)
            .map(|f| IngressBackendSplit {
                service_namespace: ns.clone(),
                service_name: f.revision_name.clone(),
                service_port: IntOrString::Int(match f.protocol {
                    Protocol::Http1 => SERVICE_HTTP_PORT,
                    Protocol::H2c => SERVICE_H2C_PORT,
                }),
                percent: f.percent.unwrap_or(0),
                append_headers: BTreeMap::from([
                    (REVISION_HEADER.to_string(), f.revision_name.clone()),
                    (NAMESPACE_HEADER.to_string(), ns.clone()),
                ]),
            })
            .collect();
        let mut visibilities = vec![VISIBILITY_CLUSTER_LOCAL];
        if !cluster_local {
            visibilities.push(VISIBILITY_EXTERNAL_IP);
        }
        for visibility in visibilities {
            let hosts = if visibility == VISIBILITY_CLUSTER_LOCAL {
                vec![
                    format!("{host}.{ns}"),
                    format!("{host}.{ns}.svc"),
                    cluster_local_domain(ns, &host),
                ]
            } else {
                vec![external_domain(config, route, &host)]
            };
            rules.push(IngressRule {
                hosts,
                visibility: visibility.to_string(),
                http: Some(HttpIngressRuleValue {
                    paths: vec![HttpIngressPath {
                        splits: splits.clone(),
                        ..Default::default()
                    }],
                }),
            });
        }
    }
    let mut labels = route.metadata.labels.clone();
    labels.insert(ROUTE_LABEL.to_string(), route.metadata.name.clone());
    labels.insert(ROUTE_NAMESPACE_LABEL.to_string(), ns.clone());
    // Knative: UnionMaps(class, route annotations), so the Route's own class annotation wins.
    let mut annotations = BTreeMap::from([(
        INGRESS_CLASS_ANNOTATION.to_string(),
        config.network.ingress_class.clone(),
    )]);
    annotations.extend(route.metadata.annotations.clone());
    annotations.remove(LAST_APPLIED);
    let mut ingress = Ingress::default();
    ingress.api_version = sluice_api::ingress::API_VERSION.to_string();
    ingress.kind = sluice_api::ingress::KIND.to_string();
    ingress.metadata = ObjectMeta {
        name: route.metadata.name.clone(),
        namespace: ns.clone(),
        labels,
        annotations,
        owner_references: vec![owner_reference("Route", &route.metadata)],
        ..Default::default()
    };
    ingress.spec.rules = rules;
    ingress.spec.http_option = HTTP_OPTION_ENABLED.to_string();
    ingress
}

fn set(st: &mut Status, type_: &str, status: ConditionStatus, reason: &str, message: &str) {
    st.set_condition(Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.to_string(),
        ..Default::default()
    });
}

/// Copies a child's Ready condition into `type_` (Unknown when the child has none yet).
fn propagate(st: &mut Status, type_: &str, child: Option<&Condition>) {
    match child {
        Some(c) => set(st, type_, c.status, &c.reason, &c.message),
        None => set(st, type_, ConditionStatus::Unknown, "", ""),
    }
}

/// Knative's living ConditionSet: Ready is False with the first False dependent's reason, else
/// Unknown with the first non-True one's, else True.
fn ready_from(st: &mut Status, dependents: &[&str]) {
    let conds: Vec<Condition> = dependents
        .iter()
        .map(|d| {
            st.condition(d).cloned().unwrap_or(Condition {
                type_: d.to_string(),
                ..Default::default()
            })
        })
        .collect();
    let pick = conds
        .iter()
        .find(|c| c.status == ConditionStatus::False)
        .or_else(|| conds.iter().find(|c| c.status != ConditionStatus::True));
    match pick {
        Some(c) => set(st, CONDITION_READY, c.status, &c.reason, &c.message),
        None => set(st, CONDITION_READY, ConditionStatus::True, "", ""),
    }
}

/// An object never valid: every condition False with the validation errors.
fn mark_invalid(st: &mut Status, dependents: &[&str], message: &str) {
    for d in dependents.iter().chain([&CONDITION_READY]) {
        set(st, d, ConditionStatus::False, REASON_INVALID_SPEC, message);
    }
}

/// An object whose latest spec is invalid while its last valid one keeps serving.
fn mark_still_serving(st: &mut Status, message: &str) {
    let message = format!(
        "{message} (still serving the last valid spec, generation {})",
        st.observed_generation
    );
    set(
        st,
        CONDITION_READY,
        ConditionStatus::False,
        REASON_INVALID_SPEC,
        &message,
    );
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
