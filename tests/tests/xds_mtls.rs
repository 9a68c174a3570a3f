//! Secured xDS, as in a cluster: `sluice xds --tls-cert --tls-key --client-ca` and gateways bootstrapped
//! by `sluice bootstrap --xds-client-cert --xds-client-key --xds-ca --output-dir`, all real processes
//! on loopback with certificates made here. A gateway with a certificate from the client CA gets
//! config and serves (a TLS Ingress too, its key over SDS and never in a Listener); one with another
//! CA's certificate, or none, is refused and gets nothing; a renewed server certificate serves new
//! connections without restarting `sluice xds`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use sluice_e2e::ports::loopback;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::sluice::{envoy_for_sluice, sluice_bin};
use sluice_e2e::tls::TlsMaterial;
use sluice_e2e::yaml::{self, Ingress, Path as IngressPath, Rule, SERVICE_PORT, Split};
use sluice_e2e::{EchoServer, Req, free_port};

const NS: &str = "serving-tests";
const XDS_NAME: &str = "xds.sluice.test";
const PLAIN_HOST: &str = "plain.example.com";
const SECURE_HOST: &str = "secure.example.com";
const PATIENCE: Duration = Duration::from_secs(60);

struct Ports {
    xds: u16,
    control: u16,
    external: u16,
    internal: u16,
    tls: u16,
}

/// Writes `content` at `path` as a Secret volume renews a file: complete at once.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A folder with tls.crt, tls.key and ca.crt, as a mounted Secret.
fn cert_dir(dir: &Path, leaf: &TlsMaterial, ca_pem: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    replace(&dir.join("tls.crt"), &leaf.cert_pem);
    replace(&dir.join("tls.key"), &leaf.key_pem);
    replace(&dir.join("ca.crt"), ca_pem);
    dir.to_path_buf()
}

fn start_xds(bin: &Path, objects: &Path, certs: &Path, p: &Ports, log: &Path) -> ProcessGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("xds")
        .arg("--dir")
        .arg(objects)
        .arg("--tls-cert")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key")
        .arg(certs.join("tls.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.crt"))
        .args(["--xds-port", &p.xds.to_string()])
        .args(["--control-port", &p.control.to_string()])
        .args(["--external-listener", &format!("127.0.0.1:{}", p.external)])
        .args(["--internal-listener", &format!("127.0.0.1:{}", p.internal)])
        .args(["--tls-listener", &format!("127.0.0.1:{}", p.tls)])
        .args(["--probe-external", &format!("127.0.0.1:{}", p.external)])
        .args(["--probe-internal", &format!("127.0.0.1:{}", p.internal)])
        .env("SLUICE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("xds log"));
    ProcessGuard::spawn(cmd, Duration::from_secs(3)).expect("starting sluice xds")
}

/// A gateway Envoy: `sluice bootstrap` into `dir` (mTLS with the files in `certs`, or plain gRPC),
/// then Envoy from it.
struct Gateway {
    admin: SocketAddr,
    log: PathBuf,
    _envoy: ProcessGuard,
}

fn start_gateway(
    bin: &Path,
    envoy: &Path,
    xds_port: u16,
    dir: &Path,
    certs: Option<&Path>,
    protocol: &str,
) -> Gateway {
    let admin_port = free_port();
    let mut boot = Command::new(bin);
    boot.arg("bootstrap")
        .args(["--xds", &format!("127.0.0.1:{xds_port}")])
        .args(["--xds-protocol", protocol])
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .arg("--output-dir")
        .arg(dir);
    if let Some(certs) = certs {
        boot.arg("--xds-client-cert")
            .arg(certs.join("tls.crt"))
            .arg("--xds-client-key")
            .arg(certs.join("tls.key"))
            .arg("--xds-ca")
            .arg(certs.join("ca.crt"))
            .args(["--xds-server-name", XDS_NAME]);
    }
    let out = boot.output().expect("sluice bootstrap");
    assert!(out.status.success(), "sluice bootstrap: {out:?}");
    let log = dir.join("envoy.log");
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(dir.join("envoy.json"))
        .args(["--base-id", &admin_port.to_string()])
        .args(["--concurrency", "1", "-l", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    Gateway {
        admin: loopback(admin_port),
        log,
        _envoy: ProcessGuard::spawn(cmd, Duration::from_secs(3)).expect("starting Envoy"),
    }
}

impl Gateway {
    async fn admin_get(&self, path: &str) -> Option<String> {
        let resp = Req::get("localhost", path)
            .timeout(Duration::from_secs(10))
            .send(self.admin)
            .await
            .ok()?;
        (resp.status == StatusCode::OK).then(|| resp.text())
    }

    async fn config_dump(&self) -> Value {
        let text = self
            .admin_get("/config_dump")
            .await
            .expect("Envoy's config_dump");
        serde_json::from_str(&text).expect("config_dump is JSON")
    }

    /// `name`'s value in /stats, once Envoy answers.
    async fn stat(&self, name: &str) -> Option<u64> {
        let text = self.admin_get(&format!("/stats?filter=^{name}$")).await?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The dump section of `@type` ending in `kind` (e.g. "ListenersConfigDump").
fn section<'a>(dump: &'a Value, kind: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
        .unwrap_or_else(|| panic!("{kind} in config_dump"))
}

async fn wait_served(addr: SocketAddr, host: &str, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(resp) = Req::get(host, "").send(addr).await
            && resp.status == StatusCode::OK
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {host} not served within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_served_tls(addr: SocketAddr, host: &str, cert: &TlsMaterial) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match Req::get(host, "").send_tls(addr, cert).await {
            Ok(resp) if resp.status == StatusCode::OK => return,
            other => assert!(
                Instant::now() < deadline,
                "{host} not served over TLS within {PATIENCE:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the refused gateway has tried the xds-server `attempts` times, then checks it never
/// got any config.
async fn assert_refused(gw: &Gateway, what: &str, attempts: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let tried = gw.stat("cluster.xds.upstream_cx_total").await.unwrap_or(0);
        if tried >= attempts {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: Envoy made {tried} connections to the xds-server in {PATIENCE:?}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gw.stat("control_plane.connected_state").await,
        Some(0),
        "{what}: connected to the xds-server"
    );
    let dump = gw.config_dump().await;
    let listeners = section(&dump, "ListenersConfigDump");
    assert!(
        listeners["dynamic_listeners"]
            .as_array()
            .is_none_or(|l| l.is_empty()),
        "{what}: got listeners: {listeners}"
    );
    let clusters = section(&dump, "ClustersConfigDump");
    assert!(
        clusters["dynamic_active_clusters"]
            .as_array()
            .is_none_or(|c| c.is_empty()),
        "{what}: got clusters: {clusters}"
    );
}

fn ingresses() -> Vec<Value> {
    let split = || IngressPath::any().split(Split::to("mtls", SERVICE_PORT));
    vec![
        Ingress::new(NS, "plain")
            .rule(Rule::external(&[PLAIN_HOST]).path(split()))
            .to_value(),
        Ingress::new(NS, "secure")
            .rule(Rule::external(&[SECURE_HOST]).path(split()))
            .tls(&[SECURE_HOST], "secure-cert")
            .to_value(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_gateways_get_config_others_are_refused_and_keys_come_over_sds() {
    let bin = tokio::task::spawn_blocking(sluice_bin)
        .await
        .unwrap()
        .expect("sluice binary");
    let envoy = envoy_for_sluice()
        .expect("finding Envoy")
        .expect("Envoy is installed (bash scripts/setup)");
    let root = tempfile::tempdir().unwrap();
    let objects = root.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    let p = Ports {
        xds: free_port(),
        control: free_port(),
        external: free_port(),
        internal: free_port(),
        tls: free_port(),
    };

    let backend = EchoServer::start("mtls").await.expect("echo backend");
    let site = TlsMaterial::issue(&[SECURE_HOST]).unwrap();
    let mut docs = yaml::backend(NS, "mtls", "http", backend.port());
    docs.push(yaml::tls_secret(NS, "secure-cert", &site));
    docs.extend(ingresses());
    std::fs::write(objects.join("objects.yaml"), yaml::documents(&docs)).unwrap();

    // The xds-server's certificate (its own CA) and the CA of the gateways' certificates.
    let server = TlsMaterial::issue(&[XDS_NAME]).unwrap();
    let gateway_cert = TlsMaterial::issue(&["gateway.sluice.test"]).unwrap();
    let xds_certs = cert_dir(
        &root.path().join("xds-tls"),
        &server,
        &gateway_cert.ca_cert_pem,
    );
    let _xds = start_xds(&bin, &objects, &xds_certs, &p, &root.path().join("xds.log"));

    // A gateway with a certificate from the client CA, trusting the server's CA.
    let good_certs = cert_dir(
        &root.path().join("good-certs"),
        &gateway_cert,
        &server.ca_cert_pem,
    );
    let good = start_gateway(
        &bin,
        &envoy,
        p.xds,
        &root.path().join("good"),
        Some(&good_certs),
        "delta",
    );
    wait_served(loopback(p.external), PLAIN_HOST, "the mTLS gateway").await;
    wait_served_tls(loopback(p.tls), SECURE_HOST, &site).await;
    assert_eq!(good.stat("control_plane.connected_state").await, Some(1));

    // The TLS Ingress's key reached Envoy over SDS (ADS) and is in no Listener.
    let dump = good.config_dump().await;
    let listeners = section(&dump, "ListenersConfigDump").to_string();
    assert!(listeners.contains("external-tls"), "{listeners}");
    assert!(
        listeners.contains("tls_certificate_sds_secret_configs"),
        "the TLS listener refers to its certificate by name: {listeners}"
    );
    assert!(
        !listeners.contains("private_key"),
        "a Listener holds a private key: {listeners}"
    );
    let key_body: String = site
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!dump.to_string().contains(&key_body[..40]));
    let secrets = section(&dump, "SecretsConfigDump");
    let names: Vec<&str> = secrets["dynamic_active_secrets"]
        .as_array()
        .expect("dynamic secrets")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"serving-tests/secure-cert"),
        "SDS secrets: {secrets}"
    );

    // A gateway whose certificate another CA signed, and one without any: refused, no config.
    let stranger = TlsMaterial::issue(&["gateway.sluice.test"]).unwrap();
    let bad_certs = cert_dir(
        &root.path().join("bad-certs"),
        &stranger,
        &server.ca_cert_pem,
    );
    let wrong_ca = start_gateway(
        &bin,
        &envoy,
        p.xds,
        &root.path().join("wrong-ca"),
        Some(&bad_certs),
        "delta",
    );
    let no_cert = start_gateway(
        &bin,
        &envoy,
        p.xds,
        &root.path().join("no-cert"),
        None,
        "sotw",
    );
    assert_refused(&wrong_ca, "a certificate from another CA", 2).await;
    assert_refused(&no_cert, "no client certificate", 2).await;
    let xds_log = std::fs::read_to_string(root.path().join("xds.log")).unwrap();
    assert!(
        xds_log.contains("refused an ADS client"),
        "the xds-server says whom it refused: {xds_log}"
    );
    // The good gateway still serves.
    wait_served(loopback(p.external), PLAIN_HOST, "after the refusals").await;

    // Renewal: a new server certificate from a new CA, on disk while `sluice xds` runs. A gateway
    // that trusts only the new CA connects (so the new connection got the new certificate). It speaks
    // state of the world: the TLS key comes over SotW SDS as well.
    drop(good);
    let renewed = TlsMaterial::issue(&[XDS_NAME]).unwrap();
    replace(&xds_certs.join("tls.crt"), &renewed.cert_pem);
    replace(&xds_certs.join("tls.key"), &renewed.key_pem);
    let renewed_certs = cert_dir(
        &root.path().join("renewed-certs"),
        &gateway_cert,
        &renewed.ca_cert_pem,
    );
    let after = start_gateway(
        &bin,
        &envoy,
        p.xds,
        &root.path().join("after-renewal"),
        Some(&renewed_certs),
        "sotw",
    );
    wait_served(loopback(p.external), PLAIN_HOST, "after the renewal").await;
    wait_served_tls(loopback(p.tls), SECURE_HOST, &site).await;
    assert_eq!(after.stat("control_plane.connected_state").await, Some(1));
    drop(backend);
}

#[test]
fn xds_tls_options_go_together() {
    let bin = sluice_bin().expect("sluice binary");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&bin)
        .arg("xds")
        .arg("--dir")
        .arg(dir.path())
        .args(["--tls-cert", "/nonexistent/tls.crt"])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--control-port", &free_port().to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("running sluice xds");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("go together") && stderr.contains("--tls-key"),
        "{stderr}"
    );
}
