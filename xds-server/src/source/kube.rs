//! Kubernetes as the state source: watches KIngresses (networking.internal.knative.dev/v1alpha1, only
//! Sluice's ingress class), Services, Endpoints, EndpointSlices and TLS Secrets in all namespaces, and
//! writes KIngress status back through the status subresource.
//!
//! Every kind is watched as a [`DynamicObject`] and converted to the `sluice_api` type one object at a
//! time, so an object that does not deserialize is reported (`Kind namespace/name` and the field) and
//! left out while everything else keeps flowing. kube's watcher lists, watches, re-watches from the last
//! resourceVersion when a stream ends and re-lists when the server says 410 Gone; this module only keeps
//! the converted objects ([`KubeState`]) and publishes a full snapshot after each burst of changes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, SelectAll};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{
    Endpoints as K8sEndpoints, Secret as K8sSecret, Service as K8sService,
};
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sEndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use sluice_api::Ingress;
use sluice_api::core::{EndpointSlice, Endpoints, Secret, Service};
use sluice_api::ingress::{INGRESS_CLASS_ANNOTATION, SLUICE_INGRESS_CLASS};

use super::{SourceError, SourceSnapshot, StateSource};
use crate::state::{ClusterState, ObjectKey};

/// How long to wait after a change for more before publishing: a relist or a Knative rollout is a
/// burst of events, and one snapshot for the burst saves a translation per event.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(5);

/// Only TLS secrets are needed (KIngress `spec.tls[].secretName`); the API server filters by type.
const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
const FIELD_MANAGER: &str = "sluice-xds-server";

/// The kinds this source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ingress,
    Service,
    Endpoints,
    EndpointSlice,
    Secret,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Ingress,
        Kind::Service,
        Kind::Endpoints,
        Kind::EndpointSlice,
        Kind::Secret,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Ingress => "Ingress",
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
        }
    }

    fn api_resource(self) -> ApiResource {
        match self {
            Kind::Ingress => ingress_api_resource(),
            Kind::Service => ApiResource::erase::<K8sService>(&()),
            Kind::Endpoints => ApiResource::erase::<K8sEndpoints>(&()),
            Kind::EndpointSlice => ApiResource::erase::<K8sEndpointSlice>(&()),
            Kind::Secret => ApiResource::erase::<K8sSecret>(&()),
        }
    }

    fn watcher_config(self) -> watcher::Config {
        match self {
            Kind::Secret => watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}")),
            _ => watcher::Config::default(),
        }
    }

    /// Whether an object of this kind is one Sluice serves. Decided on metadata and plain fields
    /// before conversion, so a broken object of another ingress class is not reported.
    fn keeps(self, obj: &DynamicObject) -> bool {
        match self {
            // Knative: an Ingress belongs to the networking layer its class annotation names.
            Kind::Ingress => obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INGRESS_CLASS_ANNOTATION))
                .is_some_and(|c| c == SLUICE_INGRESS_CLASS),
            // Also checked here: the field selector is a request, and a server may ignore it.
            Kind::Secret => obj.data.get("type").and_then(Value::as_str) == Some(TLS_SECRET_TYPE),
            Kind::Service | Kind::Endpoints | Kind::EndpointSlice => true,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn ingress_api_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("networking.internal.knative.dev", "v1alpha1", "Ingress");
    ApiResource::from_gvk_with_plural(&gvk, "ingresses")
}

/// Reads the cluster through a [`kube::Client`]: `Client::try_default()` in a cluster, or a client
/// pointed at any API server (tests use an in-process fake).
pub struct KubeSource {
    client: kube::Client,
    debounce: Duration,
}

impl KubeSource {
    pub fn new(client: kube::Client) -> Self {
        KubeSource {
            client,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// How long to gather changes before publishing a snapshot.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    fn watch_all(&self) -> SelectAll<BoxStream<'static, KindEvent>> {
        stream::select_all(Kind::ALL.map(|kind| {
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &kind.api_resource());
            watcher::watcher(api, kind.watcher_config())
                // Without a backoff the watcher retries a failing list or watch in a busy loop.
                .default_backoff()
                .map(move |result| (kind, result))
                .boxed()
        }))
    }

    async fn run_loop(&self, tx: watch::Sender<SourceSnapshot>) -> Result<(), SourceError> {
        let mut events = self.watch_all();
        let mut state = KubeState::default();
        // Set while changes wait to be published: when the burst's quiet period ends.
        let mut publish_at: Option<Instant> = None;
        let mut listed_once = false;
        loop {
            let next = match publish_at {
                Some(at) => tokio::select! {
                    next = events.next() => next,
                    () = tokio::time::sleep_until(at) => {
                        publish_at = None;
                        let snapshot = state.snapshot();
                        tracing::debug!(
                            ingresses = snapshot.state.ingresses.len(),
                            errors = snapshot.errors.len(),
                            "publishing Kubernetes snapshot"
                        );
                        // The first snapshot is always sent, even if empty: it tells the
                        // controller the cluster has been listed.
                        let first = !std::mem::replace(&mut listed_once, true);
                        tx.send_if_modified(|current| {
                            let changed = first || *current != snapshot;
                            if changed {
                                *current = snapshot;
                            }
                            changed
                        });
                        continue;
                    }
                },
                None => events.next().await,
            };
            let Some((kind, result)) = next else {
                // kube's watchers retry forever, so their streams never end on their own.
                return Err(SourceError {
                    origin: "kubernetes".to_string(),
                    message: "every watch stream ended".to_string(),
                });
            };
            match result {
                Ok(event) => {
                    // The first snapshot waits until every kind is listed, so translation never sees
                    // KIngresses without the Services and Endpoints they name.
                    if state.apply(kind, event) && state.all_listed() && publish_at.is_none() {
                        publish_at = Some(Instant::now() + self.debounce);
                    }
                }
                Err(e) => log_watch_error(kind, &e),
            }
        }
    }

    async fn patch_status(&self, ingress: &Ingress) -> Result<(), SourceError> {
        let meta = &ingress.metadata;
        let origin = format!("Ingress {}/{}", meta.namespace, meta.name);
        let body = status_patch(ingress).map_err(|e| SourceError {
            origin: origin.clone(),
            message: format!("cannot encode status: {e}"),
        })?;
        let api = Api::<DynamicObject>::namespaced_with(
            self.client.clone(),
            &meta.namespace,
            &ingress_api_resource(),
        );
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        api.patch_status(&meta.name, &params, &Patch::Merge(&body))
            .await
            .map(|_| ())
            .map_err(|e| SourceError {
                origin,
                message: format!("writing status: {e}"),
            })
    }
}

type KindEvent = (Kind, Result<Event<DynamicObject>, watcher::Error>);

fn log_watch_error(kind: Kind, error: &watcher::Error) {
    // 410 Gone is routine (the server compacted past our resourceVersion): the watcher re-lists.
    if let watcher::Error::WatchError(status) = error
        && status.code == 410
    {
        tracing::info!(kind = %kind, error = %error, "watch expired; re-listing");
    } else {
        tracing::warn!(kind = %kind, error = %error, "Kubernetes watch failed; retrying with backoff");
    }
}

/// The merge patch that replaces an Ingress's status: `{"status": ...}` with every top-level status
/// field present, as null when unset, so a field Sluice cleared is removed rather than kept.
fn status_patch(ingress: &Ingress) -> Result<Value, serde_json::Error> {
    let mut status = serde_json::to_value(&ingress.status)?;
    if let Value::Object(fields) = &mut status {
        for key in [
            "observedGeneration",
            "conditions",
            "annotations",
            "publicLoadBalancer",
            "privateLoadBalancer",
        ] {
            fields.entry(key).or_insert(Value::Null);
        }
    }
    Ok(serde_json::json!({ "status": status }))
}

impl StateSource for KubeSource {
    fn run(&self, tx: watch::Sender<SourceSnapshot>) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(self.run_loop(tx))
    }

    fn write_ingress_status<'a>(
        &'a self,
        ingress: &'a Ingress,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(self.patch_status(ingress))
    }
}

/// One kind's objects, converted; an object that failed to convert is kept as its error.
#[derive(Debug)]
struct Store<T> {
    live: BTreeMap<ObjectKey, Result<Arc<T>, SourceError>>,
    /// Filled between a (re)list's `Init` and `InitDone`, then swapped in whole, so objects deleted
    /// while the watch was down disappear.
    relist: Option<BTreeMap<ObjectKey, Result<Arc<T>, SourceError>>>,
    listed: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            live: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<T: DeserializeOwned> Store<T> {
    /// Applies one watcher event; returns whether the published state may have changed.
    fn apply(&mut self, kind: Kind, event: Event<DynamicObject>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                if kind.keeps(&obj) {
                    let key = object_key(&obj);
                    let converted = convert(kind, &key, &obj).map(Arc::new);
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, converted);
                }
                false
            }
            Event::InitDone => {
                self.live = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(obj) => {
                let key = object_key(&obj);
                if kind.keeps(&obj) {
                    let converted = convert(kind, &key, &obj).map(Arc::new);
                    self.live.insert(key, converted);
                    true
                } else {
                    // It may have been ours before (an Ingress whose class annotation changed).
                    self.live.remove(&key).is_some()
                }
            }
            Event::Delete(obj) => self.live.remove(&object_key(&obj)).is_some(),
        }
    }

    fn collect(&self, into: &mut BTreeMap<ObjectKey, Arc<T>>, errors: &mut Vec<SourceError>) {
        for (key, entry) in &self.live {
            match entry {
                Ok(obj) => {
                    into.insert(key.clone(), obj.clone());
                }
                Err(e) => errors.push(e.clone()),
            }
        }
    }
}

fn object_key(obj: &DynamicObject) -> ObjectKey {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// kube's object to Sluice's type through JSON, naming the field that does not fit.
fn convert<T: DeserializeOwned>(
    kind: Kind,
    key: &ObjectKey,
    obj: &DynamicObject,
) -> Result<T, SourceError> {
    let error = |message: String| SourceError {
        origin: format!("{kind} {}/{}", key.0, key.1),
        message,
    };
    let value = serde_json::to_value(obj).map_err(|e| error(format!("cannot re-encode: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|e| error(e.to_string()))
}

/// Everything the watchers have delivered, per kind. Plain data: the run loop feeds it events.
#[derive(Debug, Default)]
struct KubeState {
    ingresses: Store<Ingress>,
    services: Store<Service>,
    endpoints: Store<Endpoints>,
    endpoint_slices: Store<EndpointSlice>,
    secrets: Store<Secret>,
}

impl KubeState {
    fn apply(&mut self, kind: Kind, event: Event<DynamicObject>) -> bool {
        match kind {
            Kind::Ingress => self.ingresses.apply(kind, event),
            Kind::Service => self.services.apply(kind, event),
            Kind::Endpoints => self.endpoints.apply(kind, event),
            Kind::EndpointSlice => self.endpoint_slices.apply(kind, event),
            Kind::Secret => self.secrets.apply(kind, event),
        }
    }

    fn all_listed(&self) -> bool {
        self.ingresses.listed
            && self.services.listed
            && self.endpoints.listed
            && self.endpoint_slices.listed
            && self.secrets.listed
    }

    fn snapshot(&self) -> SourceSnapshot {
        let mut state = ClusterState::default();
        let mut errors = Vec::new();
        self.ingresses.collect(&mut state.ingresses, &mut errors);
        self.services.collect(&mut state.services, &mut errors);
        self.endpoints.collect(&mut state.endpoints, &mut errors);
        self.endpoint_slices
            .collect(&mut state.endpoint_slices, &mut errors);
        self.secrets.collect(&mut state.secrets, &mut errors);
        SourceSnapshot {
            state,
            errors,
            objects: Vec::new(),
            origins: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use sluice_api::ingress::IntOrString;

    fn dynamic(value: Value) -> DynamicObject {
        serde_json::from_value(value).expect("valid DynamicObject")
    }

    fn ingress(name: &str, class: &str, spec: Value) -> DynamicObject {
        dynamic(json!({
            "apiVersion": "networking.internal.knative.dev/v1alpha1",
            "kind": "Ingress",
            "metadata": {
                "namespace": "default",
                "name": name,
                "resourceVersion": "7",
                "annotations": { INGRESS_CLASS_ANNOTATION: class },
            },
            "spec": spec,
        }))
    }

    fn web_spec() -> Value {
        json!({ "rules": [{ "hosts": ["web.default.example.com"], "http": { "paths": [
            { "splits": [{ "serviceNamespace": "default", "serviceName": "web", "servicePort": 80 }] }
        ]}}]})
    }

    fn key(name: &str) -> ObjectKey {
        ("default".to_string(), name.to_string())
    }

    fn listed_state() -> KubeState {
        let mut state = KubeState::default();
        for kind in Kind::ALL {
            state.apply(kind, Event::Init);
            state.apply(kind, Event::InitDone);
        }
        state
    }

    #[test]
    fn nothing_is_ready_until_every_kind_is_listed() {
        let mut state = KubeState::default();
        for kind in &Kind::ALL[..4] {
            state.apply(*kind, Event::Init);
            assert!(state.apply(*kind, Event::InitDone));
            assert!(!state.all_listed());
        }
        state.apply(Kind::Secret, Event::Init);
        state.apply(Kind::Secret, Event::InitDone);
        assert!(state.all_listed());
    }

    #[test]
    fn sluice_class_ingress_is_converted_with_its_spec() {
        let mut state = listed_state();
        assert!(state.apply(
            Kind::Ingress,
            Event::Apply(ingress("web", SLUICE_INGRESS_CLASS, web_spec()))
        ));
        let snapshot = state.snapshot();
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let web = &snapshot.state.ingresses[&key("web")];
        assert_eq!(web.metadata.resource_version, "7");
        let split = &web.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0];
        assert_eq!(split.service_name, "web");
        assert_eq!(split.service_port, IntOrString::Int(80));
    }

    #[test]
    fn other_class_ingress_is_ignored_and_a_class_change_removes_it() {
        let mut state = listed_state();
        assert!(!state.apply(
            Kind::Ingress,
            Event::Apply(ingress(
                "istio",
                "istio.ingress.networking.knative.dev",
                web_spec()
            ))
        ));
        // Broken, but not ours: not reported either.
        assert!(!state.apply(
            Kind::Ingress,
            Event::Apply(ingress(
                "other",
                "kourier.ingress.networking.knative.dev",
                json!("x")
            ))
        ));
        state.apply(
            Kind::Ingress,
            Event::Apply(ingress("web", SLUICE_INGRESS_CLASS, web_spec())),
        );
        assert!(state.apply(
            Kind::Ingress,
            Event::Apply(ingress(
                "web",
                "kourier.ingress.networking.knative.dev",
                web_spec()
            ))
        ));
        let snapshot = state.snapshot();
        assert!(snapshot.state.ingresses.is_empty());
        assert!(snapshot.errors.is_empty());
    }

    #[test]
    fn malformed_object_becomes_an_error_naming_kind_object_and_field() {
        let mut state = listed_state();
        state.apply(
            Kind::Ingress,
            Event::Apply(ingress(
                "broken",
                SLUICE_INGRESS_CLASS,
                json!({ "rules": "oops" }),
            )),
        );
        state.apply(
            Kind::Ingress,
            Event::Apply(ingress("web", SLUICE_INGRESS_CLASS, web_spec())),
        );
        let snapshot = state.snapshot();
        assert_eq!(snapshot.errors.len(), 1);
        let error = &snapshot.errors[0];
        assert_eq!(error.origin, "Ingress default/broken");
        assert!(
            error.message.starts_with("spec.rules: invalid type"),
            "{}",
            error.message
        );
        assert_eq!(
            snapshot.state.ingresses.keys().collect::<Vec<_>>(),
            [&key("web")]
        );

        // Fixed in place: the error goes, the object arrives.
        state.apply(
            Kind::Ingress,
            Event::Apply(ingress("broken", SLUICE_INGRESS_CLASS, web_spec())),
        );
        let snapshot = state.snapshot();
        assert!(snapshot.errors.is_empty());
        assert_eq!(snapshot.state.ingresses.len(), 2);
    }

    #[test]
    fn relist_replaces_the_store_dropping_objects_deleted_meanwhile() {
        let mut state = listed_state();
        let service = |name: &str| {
            dynamic(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "namespace": "default", "name": name },
                "spec": { "ports": [{ "port": 80 }] },
            }))
        };
        state.apply(Kind::Service, Event::Apply(service("gone")));
        state.apply(Kind::Service, Event::Apply(service("kept")));
        // During the relist the old contents stay published.
        assert!(!state.apply(Kind::Service, Event::Init));
        assert!(!state.apply(Kind::Service, Event::InitApply(service("kept"))));
        assert!(!state.apply(Kind::Service, Event::InitApply(service("new"))));
        assert_eq!(state.snapshot().state.services.len(), 2);
        assert!(state.apply(Kind::Service, Event::InitDone));
        let names: Vec<_> = state
            .snapshot()
            .state
            .services
            .into_keys()
            .map(|k| k.1)
            .collect();
        assert_eq!(names, ["kept", "new"]);
    }

    #[test]
    fn only_tls_secrets_are_kept() {
        let mut state = listed_state();
        let secret = |name: &str, type_: &str| {
            dynamic(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "namespace": "default", "name": name },
                "type": type_,
                "data": { "tls.crt": "Y2VydA==", "tls.key": "a2V5" },
            }))
        };
        assert!(!state.apply(Kind::Secret, Event::Apply(secret("opaque", "Opaque"))));
        assert!(state.apply(Kind::Secret, Event::Apply(secret("cert", TLS_SECRET_TYPE))));
        let secrets = state.snapshot().state.secrets;
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[&key("cert")].data["tls.crt"], "Y2VydA==");
    }

    #[test]
    fn delete_of_an_unknown_object_changes_nothing() {
        let mut state = listed_state();
        let obj = ingress("web", SLUICE_INGRESS_CLASS, web_spec());
        assert!(!state.apply(Kind::Ingress, Event::Delete(obj.clone())));
        state.apply(Kind::Ingress, Event::Apply(obj.clone()));
        assert!(state.apply(Kind::Ingress, Event::Delete(obj)));
        assert!(state.snapshot().state.ingresses.is_empty());
    }

    #[test]
    fn status_patch_sets_unset_fields_to_null() {
        let mut ing = Ingress::default();
        ing.status.status.observed_generation = 3;
        let patch = status_patch(&ing).unwrap();
        assert_eq!(
            patch,
            json!({ "status": {
                "observedGeneration": 3,
                "conditions": null,
                "annotations": null,
                "publicLoadBalancer": null,
                "privateLoadBalancer": null,
            }})
        );
    }
}
