//! One bad gateway cannot hold Ingresses back: a real Envoy and a second ADS client that connects,
//! takes the configuration and never ACKs (a stuck gateway). Ingresses wait for both at first, then,
//! once the stuck one has been behind for longer than the bound, become Ready through the real Envoy
//! (ACK plus a probe of that gateway at its own address), and the stuck gateway is reported with its
//! node id and peer address, until it disconnects.
//! Skipped, with a message, when no Envoy binary is found (`bash scripts/setup` installs one).

#[path = "support/ads.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_api::ConditionStatus;
use sluice_api::ingress::CONDITION_READY;
use sluice_xds_server::ads::{self, AdsServer};
use sluice_xds_server::controller::{self, ControllerConfig, ProbeTargets, StatusReport};
use sluice_xds_server::snapshot::Snapshot;
use sluice_xds_server::source::folder::FolderSource;
use sluice_xds_server::status::LoadBalancers;
use sluice_xds_server::translate::GatewayConfig;
use support::{CDS, Sotw};
use tokio::sync::watch;

const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Generous: a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn find_envoy() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    std::fs::read_dir(workspace.join(".venv/lib"))
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy in its own process group, killed when dropped (also when the test fails).
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    fn start(binary: &Path, dir: &Path, node: &str, ads_port: u16) -> Envoy {
        let admin_port = free_port();
        let bootstrap = serde_json::json!({
            "node": {"id": node, "cluster": "sluice"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "DELTA_GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]
                },
                "cds_config": {"resource_api_version": "V3", "ads": {}},
                "lds_config": {"resource_api_version": "V3", "ads": {}}
            },
            "static_resources": {"clusters": [{
                "name": "xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}}}]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }}
            }]}
        });
        let config = dir.join(format!("{node}.json"));
        std::fs::write(&config, bootstrap.to_string()).unwrap();
        let log = dir.join(format!("{node}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(binary)
                .arg("-c")
                .arg(&config)
                .args(["--base-id", &admin_port.to_string()])
                .args(["--concurrency", "1", "-l", "warning", "--drain-time-s", "1"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            0,
        )
        .spawn()
        .expect("starting envoy");
        Envoy { child, log }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn objects(names: &[&str]) -> String {
    let mut docs = vec![
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n".to_string(),
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: ns}\nsubsets:\n- addresses: [{ip: 127.0.0.1}]\n  ports: [{name: http, port: 9}]\n".to_string(),
    ];
    for name in names {
        docs.push(format!(
            "apiVersion: networking.internal.knative.dev/v1alpha1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: ns\n  annotations:\n    networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev\nspec:\n  rules:\n  - hosts: [{name}.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - {{serviceNamespace: ns, serviceName: web, servicePort: 80, percent: 100}}\n"
        ));
    }
    docs.join("---\n")
}

fn ready(report: &StatusReport, name: &str) -> bool {
    report.ingresses.iter().any(|i| {
        i.metadata.name == name
            && i.status
                .status
                .condition(CONDITION_READY)
                .is_some_and(|c| c.status == ConditionStatus::True)
    })
}

async fn wait_report(
    report: &mut watch::Receiver<StatusReport>,
    envoy: &Envoy,
    what: &str,
    ok: impl Fn(&StatusReport) -> bool,
) -> StatusReport {
    let found = tokio::time::timeout(PATIENCE, report.wait_for(|r| ok(r)))
        .await
        .map(|r| r.map(|r| r.clone()));
    match found {
        Ok(Ok(r)) => r,
        _ => panic!(
            "{what}: not within {PATIENCE:?}; report {:#?}\nEnvoy log:\n{}",
            serde_json::to_value(&*report.borrow()).unwrap(),
            envoy.log_tail()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_acks_is_reported_and_does_not_hold_ingresses_back() {
    let Some(binary) = find_envoy() else {
        eprintln!(
            "SKIPPED: no Envoy binary (set ENVOY_BIN or run `bash scripts/setup` to install Envoy 1.40 into .venv/)"
        );
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("objects");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("objects.yaml"), objects(&["first"])).unwrap();
    let (external, internal) = (free_port(), free_port());

    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (server, acks) = AdsServer::new(snapshot_rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ads_addr = listener.local_addr().unwrap();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let ads_task = tokio::spawn(ads::serve(listener, server, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let (report_tx, mut report) = watch::channel(StatusReport::default());
    let config = ControllerConfig {
        gateway: GatewayConfig {
            external_address: format!("127.0.0.1:{external}").parse().unwrap(),
            internal_address: format!("127.0.0.1:{internal}").parse().unwrap(),
            tls_address: None,
            queue_proxy: None,
        },
        load_balancers: LoadBalancers {
            public: Default::default(),
            private: Default::default(),
        },
        // Each gateway at its own address (its ADS peer IP) with the listeners' ports.
        probe: ProbeTargets::PerGateway {
            external_port: external,
            internal_port: internal,
        },
        ack_timeout: ACK_TIMEOUT,
        leader: None,
    };
    let controller = tokio::spawn(controller::run(
        Arc::new(FolderSource::new(&dir)),
        config,
        snapshot_tx,
        acks,
        report_tx,
    ));

    // The stuck gateway: subscribes, receives the clusters, never answers.
    let mut stuck = Sotw::open(ads_addr, "stuck-gateway").await;
    stuck.subscribe(CDS, &[]);
    let _clusters = stuck.recv().await;
    let stuck_since = Instant::now();

    let envoy = Envoy::start(&binary, root.path(), "good-gateway", ads_addr.port());
    let rep = wait_report(&mut report, &envoy, "both gateways connected", |r| {
        r.gateways.len() == 2 && r.gateways.iter().any(|g| g.node == "good-gateway")
    })
    .await;
    assert!(!ready(&rep, "first"));

    let rep = wait_report(&mut report, &envoy, "first Ready", |r| ready(r, "first")).await;
    let waited = stuck_since.elapsed();
    assert!(
        waited >= ACK_TIMEOUT,
        "Ready after {waited:?}: the stuck gateway was waited for until the bound"
    );
    let stuck_report = rep
        .gateways
        .iter()
        .find(|g| g.node == "stuck-gateway")
        .expect("the stuck gateway is reported");
    assert_eq!(stuck_report.state, "NotAcking", "{stuck_report:?}");
    assert!(!stuck_report.counted);
    assert!(
        stuck_report.peer.starts_with("127.0.0.1:"),
        "{stuck_report:?}"
    );
    let good = rep
        .gateways
        .iter()
        .find(|g| g.node == "good-gateway")
        .unwrap();
    assert_eq!((good.state.as_str(), good.counted), ("Serving", true));

    // A new Ingress does not wait for the stuck gateway again.
    let added = Instant::now();
    std::fs::write(dir.join("objects.yaml"), objects(&["first", "second"])).unwrap();
    wait_report(&mut report, &envoy, "second Ready", |r| ready(r, "second")).await;
    assert!(
        added.elapsed() < PATIENCE,
        "second became Ready after {:?}",
        added.elapsed()
    );

    // The stuck gateway goes away: it is no longer reported.
    drop(stuck);
    wait_report(&mut report, &envoy, "the stuck gateway gone", |r| {
        r.gateways.len() == 1
    })
    .await;

    stop_tx.send_replace(true);
    controller.abort();
    let _ = tokio::time::timeout(Duration::from_secs(10), ads_task).await;
}
