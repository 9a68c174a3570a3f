//! An xds-server restart must not disturb traffic: Envoy keeps serving its last configuration while the
//! xds-server is gone, and resyncs when it is back (changes made meanwhile then apply). Runs the split
//! deployment: `sluice xds --dir` plus an Envoy started from `sluice bootstrap`, as in a cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use sluice_e2e::ports::loopback;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::sluice::{envoy_for_sluice, sluice_bin};
use sluice_e2e::yaml::{self, Ingress, Path as IngressPath, Rule, SERVICE_PORT, Split};
use sluice_e2e::{EchoServer, Req, free_port};

const NS: &str = "serving-tests";

struct Ports {
    xds: u16,
    control: u16,
    external: u16,
    internal: u16,
    tls: u16,
    admin: u16,
}

fn start_xds(bin: &Path, dir: &Path, p: &Ports, log: &Path) -> ProcessGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("xds")
        .arg("--dir")
        .arg(dir)
        .args(["--xds-port", &p.xds.to_string()])
        .args(["--control-port", &p.control.to_string()])
        .args(["--external-listener", &format!("127.0.0.1:{}", p.external)])
        .args(["--internal-listener", &format!("127.0.0.1:{}", p.internal)])
        .args(["--tls-listener", &format!("127.0.0.1:{}", p.tls)])
        .args(["--probe-external", &format!("127.0.0.1:{}", p.external)])
        .args(["--probe-internal", &format!("127.0.0.1:{}", p.internal)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("xds log"));
    ProcessGuard::spawn(cmd, Duration::from_secs(3)).expect("starting sluice xds")
}

async fn wait_served(addr: SocketAddr, host: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(resp) = Req::get(host, "").send(addr).await
            && resp.status == StatusCode::OK
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} not served within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ingress(hosts: &[&str]) -> Ingress {
    Ingress::new(NS, "restart").rule(
        Rule::external(hosts).path(IngressPath::any().split(Split::to("restart", SERVICE_PORT))),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_server_restart_keeps_traffic_and_resyncs() {
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
    let p = Ports {
        xds: free_port(),
        control: free_port(),
        external: free_port(),
        internal: free_port(),
        tls: free_port(),
        admin: free_port(),
    };

    let backend = EchoServer::start("restart").await.expect("echo backend");
    std::fs::write(
        dir.join("backend.yaml"),
        yaml::documents(&yaml::backend(NS, "restart", "http", backend.port())),
    )
    .unwrap();
    std::fs::write(
        dir.join("ingress.yaml"),
        yaml::documents(&[ingress(&["before.example.com"]).to_value()]),
    )
    .unwrap();

    let mut xds = start_xds(&bin, &dir, &p, &root.path().join("xds-1.log"));
    let bootstrap = Command::new(&bin)
        .arg("bootstrap")
        .args(["--xds", &format!("127.0.0.1:{}", p.xds)])
        .args(["--admin", &format!("127.0.0.1:{}", p.admin)])
        .output()
        .expect("sluice bootstrap");
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let bootstrap_path = root.path().join("envoy.json");
    std::fs::write(&bootstrap_path, &bootstrap.stdout).unwrap();
    let mut envoy_cmd = Command::new(&envoy_bin);
    envoy_cmd
        .arg("-c")
        .arg(&bootstrap_path)
        .args(["--base-id", &p.admin.to_string()])
        .args(["--concurrency", "1", "-l", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("envoy.log")).unwrap());
    let _envoy = ProcessGuard::spawn(envoy_cmd, Duration::from_secs(3)).expect("starting Envoy");

    let gateway = loopback(p.external);
    wait_served(gateway, "before.example.com", Duration::from_secs(60)).await;

    // Steady traffic on fresh connections for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let traffic = tokio::spawn({
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                match Req::get("before.example.com", "")
                    .timeout(Duration::from_secs(5))
                    .send(gateway)
                    .await
                {
                    Ok(r) if r.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {}", r.status, r.text())),
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
            }
        }
    });

    // The xds-server goes away; a change made while it is gone must wait for it.
    xds.stop();
    let during = ok.load(Ordering::SeqCst);
    std::fs::write(
        dir.join("ingress.yaml"),
        yaml::documents(&[ingress(&["before.example.com", "after.example.com"]).to_value()]),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        ok.load(Ordering::SeqCst) > during,
        "Envoy kept serving while the xds-server was down"
    );
    let resp = Req::get("after.example.com", "")
        .send(gateway)
        .await
        .unwrap();
    assert_eq!(
        resp.status,
        StatusCode::NOT_FOUND,
        "no xds-server, no new config"
    );

    // Back on the same port: Envoy reconnects, resyncs, and serves the change.
    let _xds = start_xds(&bin, &dir, &p, &root.path().join("xds-2.log"));
    wait_served(gateway, "after.example.com", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the restart; first: {:?}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::SeqCst) > 20, "traffic hardly ran");
    drop(backend);
}
