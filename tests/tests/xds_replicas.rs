//! `sluice xds --kube` as several replicas, the real binary against the in-process fake API server:
//! one holds the Lease and writes KIngress status; on SIGTERM it stops cleanly (exit 0) and releases
//! the Lease, so the other replica takes over at once (well within the lease duration) and writes the
//! status of a new Ingress.

#[path = "../../xds-server/tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use sluice_e2e::free_port;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::sluice::sluice_bin;

const NAMESPACE: &str = "sluice-system";
/// Long, so that a takeover well within it can only come from the release.
const LEASE_DURATION: &str = "30s";
/// Generous: a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(60);

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

fn kubeconfig(dir: &Path, server: &FakeApiServer) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test, namespace: {NAMESPACE}}}\ncurrent-context: fake\n",
            server.url()
        ),
    )
    .unwrap();
    path
}

fn start_xds(bin: &Path, kubeconfig: &Path, name: &str, log: &Path) -> ProcessGuard {
    let mut cmd = Command::new(bin);
    cmd.args(["xds", "--kube"])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--control-port", &free_port().to_string()])
        .args(["--lease-duration", LEASE_DURATION])
        .args(["--renew-deadline", "20s", "--retry-period", "300ms"])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", NAMESPACE)
        .env("SLUICE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    ProcessGuard::spawn(cmd, Duration::from_secs(5)).expect("starting sluice xds")
}

fn holder(server: &FakeApiServer) -> Option<String> {
    server
        .get("coordination.k8s.io/v1", "Lease", NAMESPACE, "sluice-xds")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

fn status_written(server: &FakeApiServer, name: &str) -> bool {
    let path = format!("/namespaces/default/ingresses/{name}/status");
    server
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.ends_with(&path))
}

async fn wait_for(what: &str, logs: &Path, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        if Instant::now() > deadline {
            let mut text = String::new();
            for log in ["xds-a.log", "xds-b.log"] {
                text += &format!(
                    "--- {log}\n{}\n",
                    std::fs::read_to_string(logs.join(log)).unwrap_or_default()
                );
            }
            panic!("{what}: not within {WAIT:?}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_the_other_replica_takes_over_at_once() {
    let bin = tokio::task::spawn_blocking(sluice_bin)
        .await
        .unwrap()
        .expect("sluice binary");
    let server = FakeApiServer::start().await;
    server.apply(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "namespace": "default", "name": "web" },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }));
    server.apply(ingress("first"));
    let root = tempfile::tempdir().unwrap();
    let logs = root.path();
    let config = kubeconfig(logs, &server);

    let mut a = start_xds(&bin, &config, "xds-a", &logs.join("xds-a.log"));
    wait_for("xds-a holds the Lease", logs, || {
        holder(&server).as_deref() == Some("xds-a")
    })
    .await;
    wait_for("xds-a writes first's status", logs, || {
        status_written(&server, "first")
    })
    .await;
    let mut b = start_xds(&bin, &config, "xds-b", &logs.join("xds-b.log"));
    // b is up once it has asked for the Lease at least once beyond a's own requests.
    let lease_gets = |server: &FakeApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/leases/sluice-xds"))
            .count()
    };
    let before = lease_gets(&server);
    wait_for("xds-b tries the Lease", logs, || {
        lease_gets(&server) >= before + 4
    })
    .await;
    assert_eq!(holder(&server).as_deref(), Some("xds-a"), "a keeps it");

    let stopped = Instant::now();
    let exit = tokio::task::block_in_place(|| a.signal_and_wait(libc::SIGTERM, WAIT));
    let exit = exit.expect("sluice xds exits on SIGTERM");
    assert!(exit.success(), "exit status {exit:?}");
    let log_a = std::fs::read_to_string(logs.join("xds-a.log")).unwrap();
    assert!(log_a.contains("released the lease"), "{log_a}");

    wait_for("xds-b takes over", logs, || {
        holder(&server).as_deref() == Some("xds-b")
    })
    .await;
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "took over after {took:?}: the Lease was released, not left to expire ({LEASE_DURATION})"
    );

    server.apply(ingress("second"));
    wait_for("xds-b writes second's status", logs, || {
        status_written(&server, "second")
    })
    .await;

    let exit = tokio::task::block_in_place(|| b.signal_and_wait(libc::SIGTERM, WAIT));
    assert!(exit.is_some_and(|e| e.success()), "exit status {exit:?}");
    assert_eq!(
        holder(&server).as_deref(),
        Some(""),
        "released on the way out"
    );
}
