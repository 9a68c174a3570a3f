//! Several xds-server replicas against one API server (the in-process fake, through the real kube
//! client): exactly one, the holder of the coordination.k8s.io/v1 Lease, writes KIngress status; when
//! it dies, another takes the Lease within the lease duration and status writes resume.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use fake_apiserver::{CLIENT_HEADER, FakeApiServer};
use sluice_xds_server::ads::AdsServer;
use sluice_xds_server::controller::{self, ControllerConfig, ProbeTargets, StatusReport};
use sluice_xds_server::lease::{LeaderElector, LeaseConfig};
use sluice_xds_server::snapshot::Snapshot;
use sluice_xds_server::source::kube::KubeSource;
use sluice_xds_server::status::LoadBalancers;
use sluice_xds_server::translate::GatewayConfig;

const NAMESPACE: &str = "sluice-system";
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_PERIOD: Duration = Duration::from_millis(300);
/// Generous: a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

fn ingress(name: &str) -> Value {
    json!({
        "apiVersion": "networking.internal.knative.dev/v1alpha1",
        "kind": "Ingress",
        "metadata": {
            "namespace": "default",
            "name": name,
            "annotations": { "networking.knative.dev/ingress.class": "sluice.ingress.networking.knative.dev" },
        },
        "spec": { "rules": [{
            "hosts": [format!("{name}.example.com")],
            "visibility": "ExternalIP",
            "http": { "paths": [{ "splits": [{
                "serviceNamespace": "default", "serviceName": "web", "servicePort": 80, "percent": 100,
            }]}]},
        }]},
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "namespace": "default", "name": "web" },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    })
}

/// A kube client whose requests the fake server attributes to `name`.
fn client(server: &FakeApiServer, name: &str) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.headers.push((
        CLIENT_HEADER.parse().unwrap(),
        name.parse().expect("header value"),
    ));
    config.default_namespace = NAMESPACE.to_string();
    kube::Client::try_from(config).expect("kube client")
}

/// One xds-server replica: the kube source, the controller, the Lease (no gateway connects).
struct Replica {
    name: String,
    leading: watch::Receiver<bool>,
    report: watch::Receiver<StatusReport>,
    task: JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(server: &FakeApiServer, name: &str) -> Replica {
    let client = client(server, name);
    let source = Arc::new(KubeSource::new(client.clone()));
    let (elector, leading) = LeaderElector::new(
        client,
        LeaseConfig {
            namespace: NAMESPACE.to_string(),
            name: "sluice-xds".to_string(),
            identity: name.to_string(),
            lease_duration: LEASE_DURATION,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
        },
    );
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ads, acks) = AdsServer::new(snapshot_rx);
    let (report_tx, report) = watch::channel(StatusReport::default());
    let addr = "127.0.0.1:8080".parse().unwrap();
    let config = ControllerConfig {
        gateway: GatewayConfig {
            external_address: addr,
            internal_address: addr,
            tls_address: None,
            queue_proxy: None,
        },
        load_balancers: LoadBalancers {
            public: Default::default(),
            private: Default::default(),
        },
        probe: ProbeTargets::PerGateway {
            external_port: 8080,
            internal_port: 8081,
        },
        ack_timeout: Duration::from_secs(30),
        leader: Some(leading.clone()),
    };
    let task = tokio::spawn(async move {
        let _ads = ads; // keeps the ACK channel open
        tokio::select! {
            r = controller::run(source, config, snapshot_tx, acks, report_tx) => {
                panic!("controller ended: {r:?}")
            }
            () = elector.run(std::future::pending()) => {}
        }
    });
    Replica {
        name: name.to_string(),
        leading,
        report,
        task,
    }
}

/// The clients that wrote the status of Ingress `name`.
fn status_writers(server: &FakeApiServer, name: &str) -> Vec<String> {
    let path = format!("/namespaces/default/ingresses/{name}/status");
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&path))
        .map(|r| r.client.unwrap_or_default())
        .collect()
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reported(replica: &Replica, name: &str) -> bool {
    replica
        .report
        .borrow()
        .ingresses
        .iter()
        .any(|i| i.metadata.name == name && !i.status.status.conditions.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_status_and_another_takes_over_when_it_dies() {
    let server = FakeApiServer::start().await;
    server.apply(service());
    server.apply(ingress("first"));
    let a = start(&server, "replica-a");
    let b = start(&server, "replica-b");

    wait_for("a leader", || *a.leading.borrow() || *b.leading.borrow()).await;
    let (leader, follower) = if *a.leading.borrow() { (a, b) } else { (b, a) };
    assert!(!*follower.leading.borrow(), "exactly one leads");
    let lease = server
        .get("coordination.k8s.io/v1", "Lease", NAMESPACE, "sluice-xds")
        .expect("the Lease was created");
    assert_eq!(lease["spec"]["holderIdentity"], json!(leader.name));

    wait_for("first's status written", || {
        !status_writers(&server, "first").is_empty()
    })
    .await;
    server.apply(ingress("second"));
    wait_for("second's status written", || {
        !status_writers(&server, "second").is_empty()
    })
    .await;
    // The follower has computed both statuses too (it would have written them before reporting).
    wait_for("the follower's report", || {
        reported(&follower, "first") && reported(&follower, "second")
    })
    .await;
    for name in ["first", "second"] {
        let writers = status_writers(&server, name);
        assert!(
            writers.iter().all(|w| *w == leader.name),
            "{name}: only the leader writes status, got {writers:?}"
        );
    }
    assert!(!follower.report.borrow().leading);

    // The leader dies without releasing the Lease.
    let died = Instant::now();
    let old = leader.name.clone();
    drop(leader);
    wait_for("the follower takes over", || *follower.leading.borrow()).await;
    let took = died.elapsed();
    // Within the lease duration of the last renewal (plus a retry period and scheduling slack).
    assert!(
        took <= LEASE_DURATION + RETRY_PERIOD * 2 + Duration::from_secs(2),
        "took over after {took:?}"
    );
    let lease = server
        .get("coordination.k8s.io/v1", "Lease", NAMESPACE, "sluice-xds")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], json!(follower.name));
    assert_eq!(lease["spec"]["leaseTransitions"], json!(1), "{lease}");

    server.apply(ingress("third"));
    wait_for("third's status written by the new leader", || {
        status_writers(&server, "third").contains(&follower.name)
    })
    .await;
    assert!(!status_writers(&server, "third").contains(&old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_candidates_racing_for_a_free_lease_get_one_leader() {
    let server = FakeApiServer::start().await;
    let replicas: Vec<Replica> = (0..3)
        .map(|i| start(&server, &format!("replica-{i}")))
        .collect();
    wait_for("a leader", || replicas.iter().any(|r| *r.leading.borrow())).await;
    // Several retry periods with exactly one leader at every look.
    let until = Instant::now() + RETRY_PERIOD * 5;
    while Instant::now() < until {
        let leaders = replicas.iter().filter(|r| *r.leading.borrow()).count();
        assert_eq!(leaders, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Conflicts really happened or one create won: either way the server saw one holder.
    let lease = server
        .get("coordination.k8s.io/v1", "Lease", NAMESPACE, "sluice-xds")
        .unwrap();
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let leader = replicas.iter().find(|r| *r.leading.borrow()).unwrap();
    assert_eq!(holder, leader.name);
}
