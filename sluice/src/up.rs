//! `sluice up DIR`: the xds-server, one Envoy gateway and the control API, in one process tree.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;

use sluice_api::ingress::LoadBalancerIngressStatus;
use sluice_xds_server::ads::{self, AdsServer};
use sluice_xds_server::controller::{self, ControllerConfig, StatusReport};
use sluice_xds_server::snapshot::Snapshot;
use sluice_xds_server::source::StateSource;
use sluice_xds_server::source::folder::FolderSource;
use sluice_xds_server::status::LoadBalancers;
use sluice_xds_server::translate::{GatewayConfig, QueueProxyFilter};

use sluice_runtime::leftovers::{reap_leftovers, stale_run_dirs};
use sluice_runtime::{InstanceState, PortPool, RuntimeOptions, RuntimeSnapshot, StateLock};

use crate::envoy::{self, EnvoyOptions, XdsProtocol};
use crate::envoy_supervisor::{CrashPolicy, SupervisedEnvoy};
use crate::eventing::EventingPlane;
use crate::runtime_choice::{self, RuntimeChoice};
use crate::serving::{ServingOptions, ServingPlane, ServingSource};

pub const DEFAULT_CONTROL_PORT: u16 = 9900;

#[derive(clap::Args)]
pub struct UpArgs {
    /// The folder of Knative YAML to serve; changes to it apply while running.
    dir: PathBuf,
    /// Address every listener binds to.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
    /// Envoy's listener for external (ExternalIP) rules.
    #[arg(long, default_value_t = 8080)]
    external_port: u16,
    /// Envoy's listener for cluster-local rules (and external ones).
    #[arg(long, default_value_t = 8081)]
    internal_port: u16,
    /// Envoy's TLS listener (used when an Ingress has spec.tls).
    #[arg(long, default_value_t = 8443)]
    tls_port: u16,
    /// Envoy's admin port (stats, config dump).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// The xds-server's gRPC port.
    #[arg(long, default_value_t = 18000)]
    xds_port: u16,
    /// The control API `sluice status` reads.
    #[arg(long, default_value_t = DEFAULT_CONTROL_PORT, env = "SLUICE_CONTROL_PORT")]
    control_port: u16,
    /// xDS flavour Envoy uses.
    #[arg(long, value_enum, default_value = "delta")]
    xds_protocol: XdsProtocol,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    envoy_concurrency: usize,
    /// The activator's port (Envoy sends a revision's requests there while it has no capacity).
    #[arg(long, default_value_t = 8012)]
    activator_port: u16,
    /// The broker ingress's own port (0: any free one); it is reached through the gateway.
    #[arg(long, default_value_t = 0)]
    broker_port: u16,
    /// Where instance logs and other run-time files go (`sluice logs` reads them there).
    #[arg(long, default_value = crate::logs_cmd::DEFAULT_STATE_DIR, env = "SLUICE_STATE_DIR")]
    state_dir: PathBuf,
    /// Envoy's log level (trace, debug, info, warning, error).
    #[arg(long, default_value = "warning")]
    envoy_log_level: String,
    /// What runs the revisions: containers from their images on the engine at DOCKER_HOST (or the
    /// default socket), local processes from their `command`, or (auto) containers when an engine
    /// answers and processes otherwise.
    #[arg(long, value_enum, default_value = "auto", env = "SLUICE_RUNTIME")]
    runtime: RuntimeChoice,
    /// Which build of the queue-proxy filter the instance listeners run: the Envoy dynamic module
    /// (native) or the proxy-wasm module (wasm, as in an Istio mesh). Same behaviour and metrics.
    #[arg(long, value_enum, default_value = "native", env = "SLUICE_QUEUE_PROXY")]
    queue_proxy: envoy::QueueProxyForm,
}

pub async fn run(args: UpArgs) -> Result<()> {
    if !args.dir.is_dir() {
        bail!(
            "{}: not a folder (sluice up DIR serves a folder of Knative YAML)",
            args.dir.display()
        );
    }
    let envoy_bin = envoy::find_envoy()?;
    let addr = |port| SocketAddr::new(args.address, port);
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    // One `sluice up` per state dir; what an earlier one left (it was killed, or its children
    // outlived it) goes before anything starts, so nothing runs twice and its ports are free.
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state dir {}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)
        .with_context(|| format!("state dir {}", args.state_dir.display()))?;
    let lock = StateLock::acquire(&state_dir)?;
    reap_earlier_run(&state_dir, &lock).await?;
    let owner = state_dir.display().to_string();
    let run_dir = state_dir.join("run").join(std::process::id().to_string());

    // Bind our own ports first, so a port in use fails before anything starts.
    let xds_listener = TcpListener::bind(addr(args.xds_port))
        .await
        .with_context(|| format!("xds port {}", args.xds_port))?;
    let control_listener = TcpListener::bind(addr(args.control_port))
        .await
        .with_context(|| format!("control port {}", args.control_port))?;
    let activator_listener = TcpListener::bind(addr(args.activator_port))
        .await
        .with_context(|| format!("activator port {}", args.activator_port))?;
    let (queue_proxy, wasm_missing) = match envoy::find_queue_proxy(args.queue_proxy) {
        Ok(filter) => (Some(filter), None),
        Err(e) => {
            tracing::warn!("{e:#}; Knative Services cannot run until it is built");
            (None, Some(format!("{e:#}")))
        }
    };

    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ads_server, acks) = AdsServer::new(snapshot_rx);
    let ads_metrics = ads_server.metrics().clone();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let xds_task = tokio::spawn({
        let mut shutdown_rx = shutdown_rx.clone();
        async move {
            ads::serve(xds_listener, ads_server, async move {
                let _ = shutdown_rx.changed().await;
            })
            .await
        }
    });

    // Only the wasm form has a VM to keep loaded (the dynamic module is never unloaded).
    let keeper_wasm = match &queue_proxy {
        Some(QueueProxyFilter::Wasm(wasm)) => Some(wasm.clone()),
        _ => None,
    };
    let queue_proxy_report = match &queue_proxy {
        Some(filter) => serde_json::json!({"form": filter.form(), "path": filter.path()}),
        None => serde_json::json!({"form": null, "missing": wasm_missing}),
    };
    let (report_tx, report_rx) = watch::channel(StatusReport::default());
    let controller_config = ControllerConfig {
        gateway: GatewayConfig {
            external_address: addr(args.external_port),
            internal_address: addr(args.internal_port),
            tls_address: Some(addr(args.tls_port)),
            queue_proxy: queue_proxy.clone(),
        },
        load_balancers: LoadBalancers {
            public: LoadBalancerIngressStatus {
                ip: args.address.to_string(),
                domain_internal: "localhost".to_string(),
                ..Default::default()
            },
            private: LoadBalancerIngressStatus {
                ip: args.address.to_string(),
                domain_internal: "localhost".to_string(),
                ..Default::default()
            },
        },
        // Envoy is local: probe it where it listens.
        probe: controller::ProbeTargets::Fixed {
            external: addr(args.external_port),
            internal: addr(args.internal_port),
        },
        ack_timeout: sluice_xds_server::gateways::DEFAULT_ACK_TIMEOUT,
        leader: None,
    };
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("{}: cannot resolve the folder", args.dir.display()))?;
    let ports = PortPool::for_instances(args.address);
    // The containers a killed run left go before this run's runtime makes its network (the reap
    // removes the owner's networks too).
    if args.runtime != RuntimeChoice::Process {
        match sluice_runtime::reap_leftover_containers(&owner).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "removed {n} container(s) an earlier `sluice up` on this state dir left running"
            ),
            Err(e) => tracing::debug!(error = %e, "no leftover containers removed"),
        }
    }
    let (runtime, decision) = runtime_choice::start(
        args.runtime,
        RuntimeOptions {
            ports: ports.clone(),
            ..RuntimeOptions::new(&state_dir)
        },
    )
    .await?;
    tracing::info!("runtime: {} ({})", decision.kind, decision.why);
    let (plane, serving_report) = ServingPlane::start(ServingOptions {
        dir: dir.clone(),
        state_dir: state_dir.clone(),
        runtime,
        runtime_why: decision.why,
        ports,
        activator: activator_listener,
        envoy_admin: addr(args.admin_port),
        address: args.address,
        wasm_missing,
        external_port: args.external_port,
    })?;
    let eventing = EventingPlane::start(
        state_dir.join("broker"),
        addr(args.broker_port),
        addr(args.external_port),
        report_rx.clone(),
    )
    .await?;
    tracing::info!(
        "broker ingress on http://{} (through the gateway: http://broker-ingress.knative-eventing.localhost:{}/<namespace>/<broker>)",
        eventing.local_addr(),
        args.external_port
    );
    let source: Arc<dyn StateSource> = Arc::new(ServingSource::new(
        FolderSource::new(&dir),
        plane.clone(),
        Some(eventing.clone()),
        report_rx.clone(),
    ));
    let mut controller_task = tokio::spawn(controller::run(
        source,
        controller_config,
        snapshot_tx,
        acks,
        report_tx,
    ));
    let envoy_log = state_dir.join("envoy.log");
    let mut envoy = SupervisedEnvoy::start(
        EnvoyOptions {
            binary: envoy_bin.clone(),
            run_dir: run_dir.clone(),
            log_path: envoy_log.clone(),
            admin: addr(args.admin_port),
            xds: addr(args.xds_port),
            protocol: args.xds_protocol,
            concurrency: args.envoy_concurrency,
            log_level: args.envoy_log_level.clone(),
            queue_proxy_wasm: keeper_wasm,
            owner,
        },
        CrashPolicy::default(),
    )?;
    // True while the gateway answers ready: what a plane waits on before it sends through it.
    let gateway_live = envoy.live();

    // Prometheus metrics of the whole process tree (Envoy's own stay on its admin port).
    let mut registry = prometheus_client::registry::Registry::default();
    ads_metrics.register(registry.sub_registry_with_prefix("xds"));
    plane.register_metrics(&mut registry);
    eventing.register_metrics(&mut registry);
    let control_listener = crate::http::ControlListener::new(control_listener, Arc::new(registry));
    let status_eventing = eventing.clone();
    let control_task = tokio::spawn(crate::http::serve_control(control_listener, move || {
        let mut report = serde_json::to_value(&*report_rx.borrow()).unwrap_or_default();
        let serving = serde_json::to_value(&*serving_report.borrow()).unwrap_or_default();
        let eventing = serde_json::to_value(status_eventing.status()).unwrap_or_default();
        if let Some(report) = report.as_object_mut() {
            for part in [serving, eventing] {
                if let Some(part) = part.as_object() {
                    report.extend(part.clone());
                }
            }
            report.insert("gatewayLive".into(), (*gateway_live.borrow()).into());
            report.insert("queueProxy".into(), queue_proxy_report.clone());
        }
        report
    }));
    tracing::info!(
        envoy = %envoy_bin.display(),
        log = %envoy_log.display(),
        "gateway: external http://{}, cluster-local http://{}, tls https://{}; admin http://{}; `sluice status --control-port {}`",
        addr(args.external_port),
        addr(args.internal_port),
        addr(args.tls_port),
        addr(args.admin_port),
        args.control_port,
    );

    let outcome: Result<()> = tokio::select! {
        _ = sigint.recv() => Ok(()),
        _ = sigterm.recv() => Ok(()),
        e = envoy.failed() => Err(e),
        res = &mut controller_task => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("state source failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("controller panicked: {e}")),
        },
    };
    tracing::info!("stopping");
    controller_task.abort();
    let killer = envoy.killer();
    // Deliveries stop before their subscribers do: the reverse fails them on the way out.
    let stopping = async {
        eventing.shutdown().await;
        plane.shutdown().await;
        envoy.stop(Duration::from_secs(3)).await;
    };
    tokio::pin!(stopping);
    tokio::select! {
        () = &mut stopping => {}
        () = report_stopping(plane.runtime_snapshots()) => {}
        _ = async { tokio::select! { _ = sigint.recv() => {}, _ = sigterm.recv() => {} } } => {
            tracing::warn!("second signal: killing every instance and Envoy now");
            plane.kill_now();
            killer.kill();
            if tokio::time::timeout(Duration::from_secs(10), &mut stopping).await.is_err() {
                tracing::warn!("still stopping 10 s after SIGKILL; exiting anyway");
            }
        }
    }
    let _ = shutdown_tx.send(true);
    controller_task.abort();
    control_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), xds_task).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    outcome
}

/// Kills what an earlier `sluice up` on this state dir left running and removes its run folders.
/// Called with the state dir locked, so no live run owns any of it.
async fn reap_earlier_run(state_dir: &std::path::Path, lock: &StateLock) -> Result<()> {
    let owner = state_dir.display().to_string();
    let killed =
        tokio::task::spawn_blocking(move || reap_leftovers(&owner, Duration::from_secs(10)))
            .await?
            .with_context(|| {
                format!(
                    "reaping what an earlier run on {} left",
                    state_dir.display()
                )
            })?;
    if !killed.is_empty() {
        let pids: Vec<i32> = killed.iter().map(|p| p.pid).collect();
        tracing::warn!(
            earlier_run = ?lock.previous.map(|h| h.pid),
            ?pids,
            "killed {} process(es) an earlier `sluice up` on this state dir left running",
            killed.len()
        );
    }
    for dir in stale_run_dirs(state_dir, None) {
        tracing::info!(dir = %dir.display(), "removing an earlier run's folder");
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// While instances are stopping, says which and until when, every few seconds; never returns. Silent
/// for the first second: instances that honour SIGTERM are gone by then.
async fn report_stopping(snapshots: watch::Receiver<RuntimeSnapshot>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    loop {
        let message = stopping_message(&snapshots.borrow(), std::time::Instant::now());
        if let Some(message) = message {
            tracing::warn!("{message}");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// What a shutdown waits on: the instances still terminating, with their pids and when SIGKILL comes.
fn stopping_message(snapshot: &RuntimeSnapshot, now: std::time::Instant) -> Option<String> {
    let mut longest = Duration::ZERO;
    let waiting: Vec<String> = snapshot
        .revisions
        .iter()
        .flat_map(|(key, rev)| rev.instances.iter().map(move |i| (key, i)))
        .filter(|(_, i)| i.state == InstanceState::Terminating)
        .map(|(key, i)| {
            let left = i.kill_at.map(|t| t.saturating_duration_since(now));
            longest = longest.max(left.unwrap_or_default());
            let pid = i.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
            match left {
                Some(left) => format!(
                    "{}/{} (revision {}, pid {pid}, SIGKILL in {}s)",
                    key.namespace,
                    i.name,
                    key.name,
                    left.as_secs_f64().ceil()
                ),
                None => format!(
                    "{}/{} (revision {}, pid {pid})",
                    key.namespace, i.name, key.name
                ),
            }
        })
        .collect();
    if waiting.is_empty() {
        return None;
    }
    Some(format!(
        "waiting up to {}s for {} instance(s) to exit after SIGTERM: {}; press Ctrl-C again to kill \
         them now",
        longest.as_secs_f64().ceil(),
        waiting.len(),
        waiting.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_runtime::{InstanceStatus, RevisionKey, RevisionStatus};

    fn instance(
        name: &str,
        state: InstanceState,
        kill_at: Option<std::time::Instant>,
    ) -> InstanceStatus {
        InstanceStatus {
            name: name.to_string(),
            port: 4000,
            address: "127.0.0.1:4000".parse().unwrap(),
            state,
            pid: Some(42),
            spawned_at: std::time::Instant::now(),
            spawned_at_wall: std::time::SystemTime::now(),
            ready_at: None,
            kill_at,
            log_path: PathBuf::from("/x.log"),
            container_id: None,
        }
    }

    #[test]
    fn the_stopping_message_names_terminating_instances_and_their_deadline() {
        let now = std::time::Instant::now();
        let mut snapshot = RuntimeSnapshot::default();
        snapshot.revisions.insert(
            RevisionKey::new("default", "deaf-00001"),
            RevisionStatus {
                desired: 0,
                instances: vec![
                    instance(
                        "deaf-00001-abcde",
                        InstanceState::Terminating,
                        Some(now + Duration::from_secs(30)),
                    ),
                    instance("deaf-00001-fghjk", InstanceState::Ready, None),
                ],
                restarts: 0,
                last_exit: None,
                image_digest: None,
                failure: None,
                removed: true,
            },
        );
        let message = stopping_message(&snapshot, now).expect("one instance to wait on");
        assert!(
            message.starts_with("waiting up to 30s for 1 instance(s)")
                && message.contains(
                    "default/deaf-00001-abcde (revision deaf-00001, pid 42, SIGKILL in 30s)"
                )
                && !message.contains("fghjk")
                && message.contains("Ctrl-C again"),
            "{message}"
        );
        snapshot.revisions.clear();
        assert_eq!(stopping_message(&snapshot, now), None);
    }
}
