//! KubeSource against an in-process fake API server speaking real list/watch HTTP JSON, through the
//! real kube client.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use fake_apiserver::FakeApiServer;
use sluice_api::ingress::{CONDITION_READY, LoadBalancerIngressStatus, LoadBalancerStatus};
use sluice_api::{Condition, ConditionStatus, Ingress};
use sluice_xds_server::source::kube::KubeSource;
use sluice_xds_server::source::{SourceSnapshot, StateSource};

const SLUICE_CLASS: &str = "sluice.ingress.networking.knative.dev";
const KINGRESS_API: &str = "networking.internal.knative.dev/v1alpha1";
const INGRESSES_PATH: &str = "/apis/networking.internal.knative.dev/v1alpha1/ingresses";
const WAIT: Duration = Duration::from_secs(15);

fn ingress(name: &str, class: &str, host: &str) -> Value {
    json!({
        "apiVersion": KINGRESS_API,
        "kind": "Ingress",
        "metadata": {
            "namespace": "default",
            "name": name,
            "annotations": { "networking.knative.dev/ingress.class": class },
        },
        "spec": {
            "rules": [{
                "hosts": [host],
                "visibility": "ExternalIP",
                "http": { "paths": [{ "splits": [{
                    "serviceNamespace": "default",
                    "serviceName": name,
                    "servicePort": 80,
                    "percent": 100,
                }]}]},
            }],
        },
    })
}

fn service(name: &str, port: i32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "namespace": "default", "name": name },
        "spec": { "type": "ClusterIP", "clusterIP": "10.0.0.7", "ports": [{ "name": "http", "port": port, "targetPort": 8080 }] },
    })
}

fn endpoints(name: &str, ips: &[&str]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": { "namespace": "default", "name": name },
        "subsets": [{
            "addresses": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>(),
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        }],
    })
}

fn endpoint_slice(name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    })
}

fn secret(name: &str, type_: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "namespace": "default", "name": name },
        "type": type_,
        "data": { "tls.crt": "Y2VydA==", "tls.key": "a2V5" },
    })
}

fn key(name: &str) -> (String, String) {
    ("default".to_string(), name.to_string())
}

fn names<V>(map: &std::collections::BTreeMap<(String, String), V>) -> Vec<&str> {
    map.keys().map(|(_, n)| n.as_str()).collect()
}

/// A running KubeSource; aborted on drop so a failing test leaves nothing behind.
struct Running {
    source: Arc<KubeSource>,
    snapshots: watch::Receiver<SourceSnapshot>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// Waits until the published snapshot satisfies `ok`, and returns it.
    async fn until(&mut self, what: &str, ok: impl Fn(&SourceSnapshot) -> bool) -> SourceSnapshot {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let current = self.snapshots.borrow_and_update();
                if ok(&current) {
                    return current.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.snapshots.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; last snapshot: {:#?}",
                    *self.snapshots.borrow()
                ),
            }
        }
    }
}

fn client_for(server: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("url"));
    kube::Client::try_from(config).expect("kube client")
}

fn start(server: &FakeApiServer) -> Running {
    let source = Arc::new(KubeSource::new(client_for(server)));
    let (tx, snapshots) = watch::channel(SourceSnapshot::default());
    let running = source.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = running.run(tx).await {
            panic!("KubeSource::run ended: {e}");
        }
    });
    Running {
        source,
        snapshots,
        task,
    }
}

#[tokio::test]
async fn initial_list_builds_the_whole_state_in_the_first_snapshot() {
    let server = FakeApiServer::start().await;
    server.apply(ingress("web", SLUICE_CLASS, "web.default.example.com"));
    server.apply(ingress(
        "istio-owned",
        "istio.ingress.networking.knative.dev",
        "x.example.com",
    ));
    server.apply(service("web", 80));
    server.apply(endpoints("web", &["10.1.0.1", "10.1.0.2"]));
    server.apply(endpoint_slice("web-abcde", "web", "10.1.0.1"));
    server.apply(secret("web-cert", "kubernetes.io/tls"));
    server.apply(secret("opaque", "Opaque"));

    let mut running = start(&server);
    // The first snapshot published is complete: it waits for every kind's list.
    let snapshot = running
        .until("first snapshot", |s| *s != SourceSnapshot::default())
        .await;
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
    let state = &snapshot.state;
    assert_eq!(names(&state.ingresses), ["web"]);
    assert_eq!(names(&state.services), ["web"]);
    assert_eq!(names(&state.endpoints), ["web"]);
    assert_eq!(names(&state.endpoint_slices), ["web-abcde"]);
    assert_eq!(names(&state.secrets), ["web-cert"]);

    let web = &state.ingresses[&key("web")];
    assert_eq!(web.spec.rules[0].hosts, ["web.default.example.com"]);
    assert_eq!(web.metadata.generation, 1);
    assert!(!web.metadata.resource_version.is_empty());
    assert_eq!(state.services[&key("web")].spec.ports[0].port, 80);
    let ips: Vec<_> = state.endpoints[&key("web")].subsets[0]
        .addresses
        .iter()
        .map(|a| a.ip.as_str())
        .collect();
    assert_eq!(ips, ["10.1.0.1", "10.1.0.2"]);
    let slice = &state.endpoint_slices[&key("web-abcde")];
    assert_eq!(slice.metadata.labels["kubernetes.io/service-name"], "web");
    assert_eq!(slice.endpoints[0].conditions.ready, Some(true));
    assert_eq!(state.secrets[&key("web-cert")].data["tls.key"], "a2V5");

    // Every kind was listed once and then watched, Secrets with the TLS field selector.
    for path in [
        INGRESSES_PATH,
        "/api/v1/services",
        "/api/v1/endpoints",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/secrets",
    ] {
        assert_eq!(server.list_count(path), 1, "lists of {path}");
    }
    let secret_list = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v1/secrets")
        .unwrap();
    assert!(
        secret_list
            .query
            .contains("fieldSelector=type%3Dkubernetes.io%2Ftls"),
        "{}",
        secret_list.query
    );
}

#[tokio::test]
async fn ingress_added_modified_and_deleted_update_the_snapshot() {
    let server = FakeApiServer::start().await;
    let mut running = start(&server);
    server.apply(ingress("web", SLUICE_CLASS, "web.default.example.com"));
    running
        .until("ADDED ingress", |s| {
            s.state.ingresses.contains_key(&key("web"))
        })
        .await;

    server.apply(ingress("web", SLUICE_CLASS, "www.default.example.com"));
    let snapshot = running
        .until("MODIFIED ingress", |s| {
            s.state
                .ingresses
                .get(&key("web"))
                .is_some_and(|i| i.spec.rules[0].hosts == ["www.default.example.com"])
        })
        .await;
    assert_eq!(snapshot.state.ingresses[&key("web")].metadata.generation, 2);

    assert!(server.delete(KINGRESS_API, "Ingress", "default", "web"));
    running
        .until("DELETED ingress", |s| s.state.ingresses.is_empty())
        .await;
}

#[tokio::test]
async fn other_class_ingress_is_ignored_and_leaves_when_its_class_changes() {
    let server = FakeApiServer::start().await;
    let mut running = start(&server);

    // Same watch stream, in order: when "web" arrives, "kourier" has been seen and dropped.
    server.apply(ingress(
        "kourier",
        "kourier.ingress.networking.knative.dev",
        "k.example.com",
    ));
    server.apply(ingress("web", SLUICE_CLASS, "web.example.com"));
    let snapshot = running
        .until("sluice ingress", |s| {
            s.state.ingresses.contains_key(&key("web"))
        })
        .await;
    assert_eq!(names(&snapshot.state.ingresses), ["web"]);

    server.apply(ingress(
        "web",
        "kourier.ingress.networking.knative.dev",
        "web.example.com",
    ));
    running
        .until("re-classed ingress gone", |s| s.state.ingresses.is_empty())
        .await;
}

#[tokio::test]
async fn services_endpoints_slices_and_tls_secrets_flow_through() {
    let server = FakeApiServer::start().await;
    let mut running = start(&server);

    server.apply(service("web", 80));
    server.apply(endpoints("web", &["10.1.0.1"]));
    server.apply(endpoint_slice("web-1", "web", "10.1.0.1"));
    server.apply(secret("opaque", "Opaque"));
    server.apply(secret("cert", "kubernetes.io/tls"));
    let snapshot = running
        .until("all kinds", |s| {
            !s.state.services.is_empty()
                && !s.state.endpoints.is_empty()
                && !s.state.endpoint_slices.is_empty()
                && !s.state.secrets.is_empty()
        })
        .await;
    assert_eq!(names(&snapshot.state.secrets), ["cert"]);

    server.apply(endpoints("web", &["10.1.0.1", "10.1.0.9"]));
    server.apply(service("web", 8081));
    running
        .until("scaled endpoints and new port", |s| {
            s.state.endpoints[&key("web")].subsets[0].addresses.len() == 2
                && s.state.services[&key("web")].spec.ports[0].port == 8081
        })
        .await;

    server.delete("discovery.k8s.io/v1", "EndpointSlice", "default", "web-1");
    server.delete("v1", "Secret", "default", "cert");
    let snapshot = running
        .until("slice and secret deleted", |s| {
            s.state.endpoint_slices.is_empty() && s.state.secrets.is_empty()
        })
        .await;
    assert_eq!(names(&snapshot.state.services), ["web"]);
}

#[tokio::test]
async fn malformed_ingress_is_reported_and_the_rest_still_flows() {
    let server = FakeApiServer::start().await;
    let mut broken = ingress("broken", SLUICE_CLASS, "b.example.com");
    broken["spec"]["rules"][0]["hosts"] = json!("b.example.com"); // a string where a list belongs
    server.apply(broken);
    server.apply(ingress("web", SLUICE_CLASS, "web.example.com"));
    let mut bad_service = service("bad", 80);
    bad_service["spec"]["ports"][0]["port"] = json!("eighty");
    server.apply(bad_service);

    let mut running = start(&server);
    let snapshot = running
        .until("first snapshot", |s| *s != SourceSnapshot::default())
        .await;
    assert_eq!(names(&snapshot.state.ingresses), ["web"]);
    assert!(snapshot.state.services.is_empty());
    let errors: Vec<_> = snapshot
        .errors
        .iter()
        .map(|e| (e.origin.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].0, "Ingress default/broken");
    assert!(
        errors[0].1.starts_with("spec.rules[0].hosts: invalid type"),
        "{}",
        errors[0].1
    );
    assert_eq!(errors[1].0, "Service default/bad");
    assert!(
        errors[1].1.starts_with("spec.ports[0].port: invalid type"),
        "{}",
        errors[1].1
    );

    // Later changes still flow, and fixing the object clears its error.
    server.apply(ingress("broken", SLUICE_CLASS, "b.example.com"));
    server.apply(ingress("more", SLUICE_CLASS, "more.example.com"));
    let snapshot = running
        .until("fixed ingress", |s| s.state.ingresses.len() == 3)
        .await;
    assert_eq!(snapshot.errors.len(), 1);
    assert_eq!(snapshot.errors[0].origin, "Service default/bad");
}

#[tokio::test]
async fn status_write_is_a_merge_patch_of_the_status_subresource() {
    let server = FakeApiServer::start().await;
    server.apply(ingress("web", SLUICE_CLASS, "web.example.com"));
    let mut running = start(&server);
    let snapshot = running
        .until("ingress", |s| s.state.ingresses.contains_key(&key("web")))
        .await;

    let mut web: Ingress = Ingress::clone(&snapshot.state.ingresses[&key("web")]);
    web.status.status.observed_generation = 1;
    web.status.status.set_condition(Condition {
        type_: CONDITION_READY.to_string(),
        status: ConditionStatus::True,
        ..Condition::default()
    });
    web.status.public_load_balancer = Some(LoadBalancerStatus {
        ingress: vec![LoadBalancerIngressStatus {
            domain_internal: "sluice-gateway.sluice-system.svc.cluster.local".to_string(),
            ..LoadBalancerIngressStatus::default()
        }],
    });
    running
        .source
        .write_ingress_status(&web)
        .await
        .expect("status written");

    let patches = server.patches();
    assert_eq!(patches.len(), 1);
    let patch = &patches[0];
    assert_eq!(
        patch.path,
        "/apis/networking.internal.knative.dev/v1alpha1/namespaces/default/ingresses/web/status"
    );
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        patch.body,
        json!({ "status": {
            "observedGeneration": 1,
            "conditions": [{ "type": "Ready", "status": "True" }],
            "annotations": null,
            "publicLoadBalancer": { "ingress": [{
                "domainInternal": "sluice-gateway.sluice-system.svc.cluster.local",
            }]},
            "privateLoadBalancer": null,
        }})
    );
    let stored = server
        .get(KINGRESS_API, "Ingress", "default", "web")
        .unwrap();
    assert_eq!(stored["status"]["conditions"][0]["type"], "Ready");
    assert!(stored["status"].get("privateLoadBalancer").is_none());
    // The spec is untouched (generation stays), and the new status comes back through the watch.
    assert_eq!(stored["metadata"]["generation"], 1);
    running
        .until("status in snapshot", |s| {
            s.state.ingresses[&key("web")]
                .status
                .status
                .condition(CONDITION_READY)
                .is_some_and(|c| c.status == ConditionStatus::True)
        })
        .await;

    // A status for an Ingress that is gone is an error naming it.
    let mut gone = web.clone();
    gone.metadata.name = "gone".to_string();
    let err = running
        .source
        .write_ingress_status(&gone)
        .await
        .unwrap_err();
    assert_eq!(err.origin, "Ingress default/gone");
    assert!(err.message.contains("not found"), "{}", err.message);
}

#[tokio::test]
async fn closed_watch_is_reopened_from_the_last_resource_version() {
    let server = FakeApiServer::start().await;
    server.apply(ingress("web", SLUICE_CLASS, "web.example.com"));
    let mut running = start(&server);
    running
        .until("ingress", |s| s.state.ingresses.contains_key(&key("web")))
        .await;
    let lists_before = server.list_count(INGRESSES_PATH);
    let watches_before = server.watch_count(INGRESSES_PATH);

    server.close_watches();
    server.apply(ingress("after", SLUICE_CLASS, "after.example.com"));
    server.apply(service("after", 80));
    running
        .until("changes after the close", |s| {
            s.state.ingresses.contains_key(&key("after"))
                && s.state.services.contains_key(&key("after"))
        })
        .await;
    assert!(server.watch_count(INGRESSES_PATH) > watches_before);
    // Resumed, not re-listed: the server still had the history.
    assert_eq!(server.list_count(INGRESSES_PATH), lists_before);
    let rewatch = server
        .requests()
        .into_iter()
        .filter(|r| r.path == INGRESSES_PATH && r.is_watch())
        .nth(watches_before)
        .unwrap();
    let resumed_from: u64 = rewatch.param("resourceVersion").unwrap().parse().unwrap();
    assert!(resumed_from > 0, "{}", rewatch.query);
}

#[tokio::test]
async fn expired_watch_relists_and_drops_objects_deleted_meanwhile() {
    let server = FakeApiServer::start().await;
    server.apply(ingress("old", SLUICE_CLASS, "old.example.com"));
    server.apply(service("old", 80));
    let mut running = start(&server);
    running
        .until("initial objects", |s| {
            s.state.ingresses.contains_key(&key("old"))
                && s.state.services.contains_key(&key("old"))
        })
        .await;
    let lists_before = server.list_count(INGRESSES_PATH);

    // The client misses these changes, then finds its resourceVersion compacted away (410).
    server.hold_watches(true);
    server.delete(KINGRESS_API, "Ingress", "default", "old");
    server.delete("v1", "Service", "default", "old");
    server.apply(ingress("new", SLUICE_CLASS, "new.example.com"));
    server.compact();
    server.close_watches();
    server.hold_watches(false);

    let snapshot = running
        .until("relisted state", |s| {
            s.state.ingresses.contains_key(&key("new")) && s.state.services.is_empty()
        })
        .await;
    assert_eq!(names(&snapshot.state.ingresses), ["new"]);
    assert!(server.list_count(INGRESSES_PATH) > lists_before);

    // And it keeps watching after the relist.
    server.apply(ingress("later", SLUICE_CLASS, "later.example.com"));
    running
        .until("change after relist", |s| {
            s.state.ingresses.contains_key(&key("later"))
        })
        .await;
}
