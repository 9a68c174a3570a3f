//! The topology a cluster has, on one Docker host: a private network with the xds-server container
//! (`sluice xds --dir`, a read-only folder of KIngress YAML), two external gateway containers, one
//! cluster-local gateway container and a backend container, all from images built by the Dockerfiles
//! users build (docker/), with bases made here. The test reaches the gateways through ports published
//! on loopback.
//!
//! One test, in phases, on one topology: images and containers cost most of the time, and the phases
//! build on each other (the gateway started later must get the state the others have, the cut-off
//! and the restart must leave every gateway converged). Its last phase deploys mTLS as the mtls
//! overlay does, on a second topology from the same images.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http::StatusCode;
use serde_json::{Value, json};

use sluice_e2e::Req;
use sluice_e2e::cluster::{self, ClusterImages, Run, Topology, XDS_SERVICE_NAME};
use sluice_e2e::images::{TestImage, docker, engine_answers};
use sluice_e2e::tls::TlsMaterial;
use sluice_e2e::yaml::{self, Ingress, Path as IngressPath, Rule, Split};

/// Generous: containers on two shared cores.
const WAIT: Duration = Duration::from_secs(120);
/// The names the gateways answer to on the network: the manifests' Service names.
const EXTERNAL_GATEWAY: &str = "sluice-gateway.sluice-system.svc.cluster.local";
const LOCAL_GATEWAY: &str = "sluice-gateway-internal.sluice-system.svc.cluster.local";
const HOST: &str = "hello.example.com";
const LOCAL_HOST: &str = "hello.default.svc.cluster.local";
const ADDED_HOST: &str = "added.example.com";
const LATER_HOST: &str = "later.example.com";
const REVISION: &str = "hello-00001";
/// Longer than the bootstrap's HTTP/2 keepalive (5 s interval + 5 s timeout): by then every gateway
/// has noticed its ADS stream is dead.
const CUT_OFF_FOR: Duration = Duration::from_secs(12);

/// The folder the xds-server reads: one Ingress (external `HOST` and each host of `more`, cluster-local
/// `LOCAL_HOST`) and the backend's Service and Endpoints.
fn write_config(dir: &Path, backend_ip: &str, more: &[&str]) -> Result<()> {
    let split = || Split::to("hello", yaml::SERVICE_PORT);
    let mut external = vec![HOST];
    external.extend(more);
    let ingress = Ingress::new("default", "hello")
        .rule(Rule::external(&external).path(IngressPath::any().split(split())))
        .rule(Rule::cluster_local(&[LOCAL_HOST]).path(IngressPath::any().split(split())));
    let service = yaml::service("default", "hello", "http", yaml::SERVICE_PORT, 8080);
    let endpoints = json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "hello", "namespace": "default"},
        "subsets": [{
            "addresses": [{"ip": backend_ip}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }],
    });
    let text = yaml::documents(&[ingress.to_value(), service, endpoints]);
    // Written whole then renamed: the xds-server never reads half a file.
    let tmp = dir.join(".ingress.yaml.tmp");
    std::fs::write(&tmp, text)?;
    set_mode(&tmp, 0o644)?;
    std::fs::rename(&tmp, dir.join("ingress.yaml"))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// What `host` answers through `addr`: the status, or an error when nothing answered.
async fn get(addr: SocketAddr, host: &str) -> Result<(StatusCode, String)> {
    let resp = Req::get(host, "/")
        .timeout(Duration::from_secs(10))
        .send(addr)
        .await?;
    Ok((resp.status, resp.text()))
}

/// Waits until `host` answers `want` through every gateway in `gateways` (name, address).
async fn wait_served(
    gateways: &[(String, SocketAddr)],
    host: &str,
    want: StatusCode,
    topology: &Topology,
) -> Result<()> {
    for (name, addr) in gateways {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = get(*addr, host).await;
            match &last {
                Ok((status, body)) if *status == want => {
                    if want == StatusCode::OK {
                        anyhow::ensure!(
                            body.contains(&format!("hello from {REVISION}")),
                            "{host} via {name}: {body:?}"
                        );
                    }
                    break;
                }
                _ if Instant::now() > deadline => bail!(
                    "{host} via {name} ({addr}): want {want}, last {last:?}\n--- {name}:\n{}",
                    topology.logs(name)
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// The gateway container's arguments: the image's command with this gateway's node id.
fn gateway_args(node: &str, cluster: &str) -> Vec<String> {
    [
        "-c",
        "/etc/envoy/envoy.json",
        "--disable-hot-restart",
        "--drain-time-s",
        "5",
        "--service-node",
        node,
        "--service-cluster",
        cluster,
    ]
    .map(str::to_string)
    .to_vec()
}

fn external_gateway(image: &str, node: &str) -> Run {
    Run {
        image: image.to_string(),
        aliases: vec![EXTERNAL_GATEWAY.to_string()],
        publish: vec![8080],
        args: gateway_args(node, "sluice-gateway"),
        ..Run::default()
    }
}

/// Waits until the xds-server's control API (`GET /status`) reports Ingress default/hello Ready:
/// ACKed by every connected gateway and probed on each (its container IP).
async fn wait_ingress_ready(control: SocketAddr, topology: &Topology, xds: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = async {
            let resp = Req::get("localhost", "/status").send(control).await?;
            let report: Value = serde_json::from_slice(&resp.body)?;
            let ingress = report["ingresses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["metadata"]["name"] == "hello")
                .cloned()
                .context("no Ingress hello in /status")?;
            let ready = ingress["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            anyhow::Ok((ready, ingress["status"].clone()))
        }
        .await;
        match last {
            Ok((true, _)) => return Ok(()),
            _ if Instant::now() > deadline => bail!(
                "Ingress hello not Ready: {last:?}\n--- xds-server:\n{}",
                topology.logs(xds)
            ),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn running(container: &str) -> Result<bool> {
    Ok(docker(&["inspect", "--format", "{{.State.Running}}", container])? == "true")
}

/// Sends requests for `HOST` through every gateway, one after another, until told to stop; counts
/// answers and failures (anything but a 200 from the backend).
fn hammer(
    gateways: Vec<(String, SocketAddr)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let ok = AtomicU64::new(0);
        let mut failures = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            for (name, addr) in &gateways {
                match get(*addr, HOST).await {
                    Ok((StatusCode::OK, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{name}: {other:?}")),
                }
            }
        }
        (ok.load(Ordering::Relaxed), failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_containers_share_state_survive_outages_and_mtls_refuses_strangers()
-> Result<()> {
    assert!(
        engine_answers(),
        "no container engine answers (`docker info`); bash scripts/setup starts one"
    );
    let started = Instant::now();
    let images = ClusterImages::build()?;
    let app = TestImage::app()?;
    eprintln!("images built in {:?}", started.elapsed());
    let topology = Topology::create("sluice-cluster")?;

    let backend_ip = topology.run_backend(app.tag(), REVISION)?.1.to_string();

    // The KIngress folder, readable by the xds-server's non-root user.
    let config = tempfile::Builder::new()
        .prefix("sluice-cluster-config-")
        .tempdir()?;
    set_mode(config.path(), 0o755)?;
    write_config(config.path(), &backend_ip, &[])?;

    // Gateways first: the Ingress is Ready once each of them serves it.
    let gateway = images.gateway.tag();
    let ext1 = topology.run("gw-ext-1", &external_gateway(gateway, "gw-ext-1"))?;
    let ext2 = topology.run("gw-ext-2", &external_gateway(gateway, "gw-ext-2"))?;
    let local = topology.run(
        "gw-local",
        &Run {
            image: gateway.to_string(),
            aliases: vec![LOCAL_GATEWAY.to_string()],
            publish: vec![8081],
            args: gateway_args("gw-local", "sluice-gateway-internal"),
            ..Run::default()
        },
    )?;
    let xds_aliases = vec![XDS_SERVICE_NAME.to_string()];
    let xds = topology.run(
        "xds",
        &Run {
            image: images.sluice.tag().to_string(),
            aliases: xds_aliases.clone(),
            publish: vec![9900],
            mounts: vec![(config.path().to_path_buf(), "/config".into())],
            // No --probe-*: as the manifests, readiness is probed on each connected gateway (its
            // container IP, the ADS stream's peer), not through a shared name.
            args: ["xds", "--dir", "/config", "--listen", "0.0.0.0"]
                .map(str::to_string)
                .to_vec(),
            ..Run::default()
        },
    )?;

    let mut external = vec![
        (ext1.clone(), topology.published(&ext1, 8080)?),
        (ext2.clone(), topology.published(&ext2, 8080)?),
    ];
    let local_gateway = vec![(local.clone(), topology.published(&local, 8081)?)];

    // 1. Every gateway serves the same routes; the cluster-local host only on the cluster-local
    //    listener, never through the external gateways.
    let check = async {
        wait_served(&external, HOST, StatusCode::OK, &topology).await?;
        wait_served(&local_gateway, LOCAL_HOST, StatusCode::OK, &topology).await?;
        wait_served(&local_gateway, HOST, StatusCode::OK, &topology).await?;
        wait_served(&external, LOCAL_HOST, StatusCode::NOT_FOUND, &topology).await
    };
    check
        .await
        .with_context(|| format!("--- xds-server:\n{}", topology.logs(&xds)))?;
    let control = topology.published(&xds, 9900)?;
    wait_ingress_ready(control, &topology, &xds).await?;
    // Each gateway is its own node, known by its container IP: the address its probes went to.
    let report: Value =
        serde_json::from_slice(&Req::get("localhost", "/status").send(control).await?.body)?;
    let mut seen: Vec<(String, String)> = report["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["node"].as_str().unwrap_or_default().to_string(),
                g["peer"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut want = Vec::new();
    for (node, container) in [
        ("gw-ext-1", &ext1),
        ("gw-ext-2", &ext2),
        ("gw-local", &local),
    ] {
        want.push((node.to_string(), topology.ip(container)?.to_string()));
    }
    anyhow::ensure!(
        seen.len() == want.len()
            && seen
                .iter()
                .zip(&want)
                .all(|((node, peer), (n, ip))| node == n && peer.starts_with(&format!("{ip}:"))),
        "gateways in /status: {seen:?}, want {want:?}"
    );
    eprintln!(
        "phase 1 (all gateways serve, Ingress Ready) at {:?}",
        started.elapsed()
    );

    // 2. A gateway started later gets the whole state.
    let ext3 = topology.run("gw-ext-3", &external_gateway(gateway, "gw-ext-3"))?;
    let third = vec![(ext3.clone(), topology.published(&ext3, 8080)?)];
    wait_served(&third, HOST, StatusCode::OK, &topology).await?;
    wait_served(&third, LOCAL_HOST, StatusCode::NOT_FOUND, &topology).await?;
    external.extend(third);
    eprintln!("phase 2 (late gateway) at {:?}", started.elapsed());

    // 3. The xds-server cut off: the gateways keep serving their last config while the KIngress
    //    changes; after it comes back, every gateway converges on the change.
    topology.disconnect(&xds)?;
    write_config(config.path(), &backend_ip, &[ADDED_HOST])?;
    let until = Instant::now() + CUT_OFF_FOR;
    while Instant::now() < until {
        for (name, addr) in external.iter().chain(&local_gateway) {
            let (status, _) = get(*addr, HOST)
                .await
                .with_context(|| format!("{name}, cut off"))?;
            assert_eq!(
                status,
                StatusCode::OK,
                "{HOST} via {name} while the xds-server is cut off"
            );
        }
        for (name, addr) in &external {
            let (status, _) = get(*addr, ADDED_HOST).await?;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{ADDED_HOST} via {name}: the change reached a gateway while the xds-server was cut off"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    topology.connect(&xds, &xds_aliases)?;
    wait_served(&external, ADDED_HOST, StatusCode::OK, &topology)
        .await
        .with_context(|| {
            format!(
                "after the reconnect\n--- xds-server:\n{}",
                topology.logs(&xds)
            )
        })?;
    wait_served(&local_gateway, ADDED_HOST, StatusCode::OK, &topology).await?;
    eprintln!("phase 3 (cut off, converged) at {:?}", started.elapsed());

    // 4. The xds-server killed and started again: not one request fails meanwhile, and the gateways
    //    take changes from the new process.
    let stop = Arc::new(AtomicBool::new(false));
    let all: Vec<_> = external.iter().chain(&local_gateway).cloned().collect();
    let load = hammer(all, stop.clone());
    docker(&["kill", &xds])?;
    let deadline = Instant::now() + WAIT;
    while running(&xds)? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{xds} still runs after docker kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Served while there is no xds-server at all.
    wait_served(&external, ADDED_HOST, StatusCode::OK, &topology).await?;
    docker(&["start", &xds])?;
    write_config(config.path(), &backend_ip, &[ADDED_HOST, LATER_HOST])?;
    let converged = async {
        wait_served(&external, LATER_HOST, StatusCode::OK, &topology).await?;
        wait_served(&local_gateway, LATER_HOST, StatusCode::OK, &topology).await?;
        wait_served(&external, LOCAL_HOST, StatusCode::NOT_FOUND, &topology).await
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failures) = load.await?;
    converged.with_context(|| {
        format!(
            "after the restart\n--- xds-server:\n{}",
            topology.logs(&xds)
        )
    })?;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed while the xds-server restarted, first: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        failures.first()
    );
    assert!(ok > 0, "no request went through during the restart");
    eprintln!(
        "phase 4 (xds-server restarted, {ok} requests, none failed) at {:?}",
        started.elapsed()
    );
    drop(topology);

    // 5. mTLS, on a topology of its own from the same images.
    mtls_phase(&images, &app).await?;
    eprintln!("phase 5 (mTLS) at {:?}", started.elapsed());
    Ok(())
}

/// The gateway image's bootstrap is the one `sluice bootstrap` writes for the xds-server's Service
/// name, and the image runs as a non-root user.
#[test]
fn gateway_image_holds_the_bootstrap_for_the_xds_service() -> Result<()> {
    assert!(
        engine_answers(),
        "no container engine answers (`docker info`)"
    );
    let images = ClusterImages::build()?;
    let user = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        images.gateway.tag(),
    ])?;
    assert_eq!(user, "65532:65532");
    let user = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        images.sluice.tag(),
    ])?;
    assert_eq!(user, "65532:65532");
    // A scratch-based image has no cat: copy the file out.
    let container = docker(&["create", images.gateway.tag()])?;
    let out = tempfile::tempdir()?;
    let copied = docker(&[
        "cp",
        &format!("{container}:/etc/envoy/envoy.json"),
        &out.path().display().to_string(),
    ]);
    docker(&["rm", &container])?;
    copied?;
    let bootstrap: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("envoy.json"))?)?;
    let cluster = &bootstrap["static_resources"]["clusters"][0];
    assert_eq!(cluster["name"], "xds");
    assert_eq!(cluster["type"], "STRICT_DNS");
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(address["address"], XDS_SERVICE_NAME);
    assert_eq!(address["port_value"], 18000);
    assert_eq!(
        bootstrap["dynamic_resources"]["ads_config"]["api_type"],
        "DELTA_GRPC"
    );
    // And the image's Envoy accepts it.
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "--rm",
            "--label",
            sluice_e2e::images::TEST_LABEL,
            "--read-only",
            images.gateway.tag(),
            "--mode",
            "validate",
            "-c",
            "/etc/envoy/envoy.json",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "envoy --mode validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const SECURE_HOST: &str = "secure.example.com";
/// Where the mtls overlay mounts a certificate Secret, and where its init container writes the
/// gateway's bootstrap.
const CERTS_IN_POD: &str = "/etc/sluice/tls";
const BOOTSTRAP_IN_POD: &str = "/etc/envoy/mtls";

/// A folder as a mounted `kubernetes.io/tls` Secret with `ca.crt`, readable by the images' non-root
/// users (a test key: its mode does not matter).
fn secret_dir(root: &Path, name: &str, leaf: &TlsMaterial, ca_pem: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir(&dir)?;
    for (file, content) in [
        ("tls.crt", &leaf.cert_pem),
        ("tls.key", &leaf.key_pem),
        ("ca.crt", &ca_pem.to_string()),
    ] {
        std::fs::write(dir.join(file), content)?;
        set_mode(&dir.join(file), 0o644)?;
    }
    set_mode(&dir, 0o755)?;
    Ok(dir)
}

/// What the mtls overlay's init container does: `sluice bootstrap` (the binary the sluice image
/// holds) writes envoy.json and its SDS files for a gateway that mounts `certs` at CERTS_IN_POD.
fn mtls_bootstrap(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    let status = std::process::Command::new(cluster::sluice_musl()?)
        .args([
            "bootstrap",
            &format!("--xds={XDS_SERVICE_NAME}:18000"),
            &format!("--xds-client-cert={CERTS_IN_POD}/tls.crt"),
            &format!("--xds-client-key={CERTS_IN_POD}/tls.key"),
            &format!("--xds-ca={CERTS_IN_POD}/ca.crt"),
            &format!("--xds-server-name={XDS_SERVICE_NAME}"),
            &format!("--sds-dir={BOOTSTRAP_IN_POD}"),
        ])
        .arg("--output-dir")
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "sluice bootstrap --output-dir: {status}");
    set_mode(&dir, 0o755)?;
    for entry in std::fs::read_dir(&dir)? {
        set_mode(&entry?.path(), 0o644)?;
    }
    Ok(dir)
}

fn mtls_gateway(image: &str, node: &str, certs: &Path, bootstrap: &Path) -> Run {
    let mut args = gateway_args(node, "sluice-gateway");
    args[1] = format!("{BOOTSTRAP_IN_POD}/envoy.json");
    Run {
        image: image.to_string(),
        publish: vec![8080, 8443],
        mounts: vec![
            (certs.to_path_buf(), CERTS_IN_POD.into()),
            (bootstrap.to_path_buf(), BOOTSTRAP_IN_POD.into()),
        ],
        args,
        ..Run::default()
    }
}

/// mTLS on the cluster's topology, as the mtls overlay deploys it: the xds-server container serves
/// ADS only to gateways with a certificate from the client CA; two such gateways serve a plain and a
/// TLS Ingress (the key came over SDS: the Listener names it, the gateway never saw a file of it);
/// a gateway whose certificate another CA signed, and one with the image's plain bootstrap, get no
/// configuration at all and are not among the gateways the Ingress waits for. Phase 5 of the test
/// above (the images are built once).
async fn mtls_phase(images: &ClusterImages, app: &TestImage) -> Result<()> {
    let topology = Topology::create("sluice-mtls")?;
    let backend_ip = topology.run_backend(app.tag(), REVISION)?.1.to_string();

    let root = tempfile::Builder::new().prefix("sluice-mtls-").tempdir()?;
    let config = root.path().join("config");
    std::fs::create_dir(&config)?;
    set_mode(&config, 0o755)?;
    write_config(&config, &backend_ip, &[])?;
    let site = TlsMaterial::issue(&[SECURE_HOST])?;
    let secure = Ingress::new("default", "secure")
        .rule(
            Rule::external(&[SECURE_HOST])
                .path(IngressPath::any().split(Split::to("hello", yaml::SERVICE_PORT))),
        )
        .tls(&[SECURE_HOST], "secure-cert");
    let text = yaml::documents(&[
        yaml::tls_secret("default", "secure-cert", &site),
        secure.to_value(),
    ]);
    std::fs::write(config.join("secure.yaml"), text)?;
    set_mode(&config.join("secure.yaml"), 0o644)?;

    // The server's certificate names the Service the gateways dial; the gateways' come from the
    // client CA.
    let server = TlsMaterial::issue(&[XDS_SERVICE_NAME])?;
    let member = TlsMaterial::issue(&["sluice-gateway"])?;
    let stranger = TlsMaterial::issue(&["sluice-gateway"])?;
    let xds_certs = secret_dir(root.path(), "xds-tls", &server, &member.ca_cert_pem)?;
    let member_certs = secret_dir(root.path(), "gateway-tls", &member, &server.ca_cert_pem)?;
    let stranger_certs = secret_dir(root.path(), "stranger-tls", &stranger, &server.ca_cert_pem)?;
    let member_boot = mtls_bootstrap(root.path(), "bootstrap")?;

    let gateway = images.gateway.tag();
    let members = [
        topology.run(
            "gw-1",
            &mtls_gateway(gateway, "gw-1", &member_certs, &member_boot),
        )?,
        topology.run(
            "gw-2",
            &mtls_gateway(gateway, "gw-2", &member_certs, &member_boot),
        )?,
    ];
    let xds = topology.run(
        "xds",
        &Run {
            image: images.sluice.tag().to_string(),
            aliases: vec![XDS_SERVICE_NAME.to_string()],
            publish: vec![9900],
            mounts: vec![
                (config.clone(), "/config".into()),
                (xds_certs, CERTS_IN_POD.into()),
            ],
            args: [
                "xds",
                "--dir",
                "/config",
                "--listen",
                "0.0.0.0",
                &format!("--tls-cert={CERTS_IN_POD}/tls.crt"),
                &format!("--tls-key={CERTS_IN_POD}/tls.key"),
                &format!("--client-ca={CERTS_IN_POD}/ca.crt"),
            ]
            .map(str::to_string)
            .to_vec(),
            ..Run::default()
        },
    )?;
    let mut served = Vec::new();
    for gw in &members {
        served.push((gw.clone(), topology.published(gw, 8080)?));
    }
    wait_served(&served, HOST, StatusCode::OK, &topology)
        .await
        .with_context(|| format!("--- xds-server:\n{}", topology.logs(&xds)))?;
    for gw in &members {
        let addr = topology.published(gw, 8443)?;
        let deadline = Instant::now() + WAIT;
        loop {
            match Req::get(SECURE_HOST, "/").send_tls(addr, &site).await {
                Ok(resp) if resp.status == StatusCode::OK => break,
                other if Instant::now() > deadline => bail!(
                    "{SECURE_HOST} over TLS via {gw}: {other:?}\n--- {gw}:\n{}",
                    topology.logs(gw)
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let control = topology.published(&xds, 9900)?;
    wait_ingress_ready(control, &topology, &xds).await?;

    // Strangers: another CA's certificate (with the mTLS bootstrap), and no certificate at all (the
    // gateway image's own bootstrap, plain gRPC).
    let stranger_boot = mtls_bootstrap(root.path(), "stranger-bootstrap")?;
    let strangers = [
        topology.run(
            "gw-wrong-ca",
            &mtls_gateway(gateway, "gw-wrong-ca", &stranger_certs, &stranger_boot),
        )?,
        topology.run("gw-plain", &external_gateway(gateway, "gw-plain"))?,
    ];
    // Refused at the handshake, each more than once (Envoy retries with backoff).
    let deadline = Instant::now() + WAIT;
    loop {
        let logs = topology.logs(&xds);
        let refusals = logs.matches("refused an ADS client").count();
        if refusals >= 4 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the xds-server refused {refusals} clients, want 4 (two strangers, twice):\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for gw in &strangers {
        let addr = topology.published(gw, 8080)?;
        let answer = get(addr, HOST).await;
        anyhow::ensure!(
            answer.is_err(),
            "{gw} has a listener though it was refused: {answer:?}"
        );
    }
    let report: Value =
        serde_json::from_slice(&Req::get("localhost", "/status").send(control).await?.body)?;
    let mut nodes: Vec<&str> = report["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["node"].as_str())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["gw-1", "gw-2"], "{}", report["gateways"]);
    // The members still serve.
    wait_served(&served, HOST, StatusCode::OK, &topology).await?;
    Ok(())
}
