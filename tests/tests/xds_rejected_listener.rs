//! One listener Envoy cannot bind must not freeze the rest (issue 12, item 5): Envoy NACKs that
//! listener, applies the others, and the xds-server serves the next configuration without it, which
//! Envoy ACKs; the Ingresses become Ready and answer, and the rejection is reported by name, and on
//! the Ingress it concerns (a cluster-local one, served through the internal listener): Ready=False
//! `EnvoyRejected` with Envoy's message. Runs the split deployment (`sluice xds --dir` and an Envoy
//! from `sluice bootstrap`) with the internal listener's port held by the test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use sluice_e2e::ports::loopback;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::sluice::{condition, envoy_for_sluice, find_ingress, is_ready, sluice_bin};
use sluice_e2e::yaml::{self, Ingress, Path as IngressPath, Rule, SERVICE_PORT, Split};
use sluice_e2e::{EchoServer, Req, free_port};

const NS: &str = "serving-tests";
const PATIENCE: Duration = Duration::from_secs(60);

async fn status(control: u16) -> Option<Value> {
    let resp = Req::get(&format!("127.0.0.1:{control}"), "/status")
        .timeout(Duration::from_secs(5))
        .send(loopback(control))
        .await
        .ok()?;
    serde_json::from_slice(&resp.body).ok()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_envoy_cannot_bind_does_not_hold_back_the_others() {
    let bin = tokio::task::spawn_blocking(sluice_bin)
        .await
        .unwrap()
        .expect("sluice binary");
    let envoy_bin = envoy_for_sluice()
        .expect("finding Envoy")
        .expect("Envoy is installed (bash scripts/setup)");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("objects");
    std::fs::create_dir(&dir).unwrap();
    // The internal listener's port is taken: Envoy cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let (xds, control, external, tls, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );

    let backend = EchoServer::start("web").await.expect("echo backend");
    let mut objects = yaml::backend(NS, "web", "http", backend.port());
    let names = ["one", "two", "three"];
    for name in names {
        objects.push(
            Ingress::new(NS, name)
                .rule(
                    Rule::external(&[&format!("{name}.example.com")])
                        .path(IngressPath::any().split(Split::to("web", SERVICE_PORT))),
                )
                .to_value(),
        );
    }
    objects.push(
        Ingress::new(NS, "local")
            .rule(
                Rule::cluster_local(&["local.serving-tests.svc.cluster.local"])
                    .path(IngressPath::any().split(Split::to("web", SERVICE_PORT))),
            )
            .to_value(),
    );
    std::fs::write(dir.join("objects.yaml"), yaml::documents(&objects)).unwrap();

    let xds_log = root.path().join("xds.log");
    let mut cmd = Command::new(&bin);
    cmd.arg("xds")
        .arg("--dir")
        .arg(&dir)
        .args(["--xds-port", &xds.to_string()])
        .args(["--control-port", &control.to_string()])
        .args(["--external-listener", &format!("127.0.0.1:{external}")])
        .args(["--internal-listener", &format!("127.0.0.1:{held_port}")])
        .args(["--tls-listener", &format!("127.0.0.1:{tls}")])
        .args(["--probe-external", &format!("127.0.0.1:{external}")])
        .args(["--probe-internal", &format!("127.0.0.1:{held_port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&xds_log).unwrap());
    let _xds = ProcessGuard::spawn(cmd, Duration::from_secs(3)).expect("starting sluice xds");
    let bootstrap = Command::new(&bin)
        .arg("bootstrap")
        .args(["--xds", &format!("127.0.0.1:{xds}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .expect("sluice bootstrap");
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let bootstrap_path = root.path().join("envoy.json");
    std::fs::write(&bootstrap_path, &bootstrap.stdout).unwrap();
    let mut envoy_cmd = Command::new(&envoy_bin);
    envoy_cmd
        .arg("-c")
        .arg(&bootstrap_path)
        .args(["--base-id", &admin.to_string()])
        .args(["--concurrency", "1", "-l", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("envoy.log")).unwrap());
    let _envoy = ProcessGuard::spawn(envoy_cmd, Duration::from_secs(3)).expect("starting Envoy");

    // Every Ingress becomes Ready but the cluster-local one, which says why; Envoy ACKs the newest
    // generation, and the rejection names the listener with Envoy's message.
    let rejected_on_local = |s: &Value| {
        find_ingress(s, NS, "local")
            .and_then(|i| condition(i, "Ready"))
            .is_some_and(|c| {
                c.status == "False"
                    && c.reason == "EnvoyRejected"
                    && c.message.contains("Listener internal")
                    && c.message.contains(&held_port.to_string())
            })
    };
    let deadline = Instant::now() + PATIENCE;
    let last = loop {
        let s = status(control).await;
        let done = s.as_ref().is_some_and(|s| {
            names
                .iter()
                .all(|n| find_ingress(s, NS, n).is_some_and(is_ready))
                && rejected_on_local(s)
                && s.pointer("/envoy/ackedGeneration") == s.pointer("/envoy/generation")
                && s["rejected"].as_array().is_some_and(|r| {
                    r.iter().any(|r| {
                        r["kind"] == "Listener"
                            && r["message"]
                                .as_str()
                                .is_some_and(|m| m.contains(&held_port.to_string()))
                    })
                })
        });
        if done {
            break s.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "not every Ingress Ready with the rejection reported within {PATIENCE:?}; last status:\n{}\n\
             xds log:\n{}",
            serde_json::to_string_pretty(&s).unwrap_or_default(),
            tail(&xds_log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        last["envoy"]["lastNack"].is_null(),
        "a NACK that names its listener is reported on it alone: {}",
        last["envoy"]
    );
    for name in names {
        let resp = Req::get(&format!("{name}.example.com"), "")
            .send(loopback(external))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{name}: {}", resp.text());
    }
    drop(held);
    drop(backend);
}
