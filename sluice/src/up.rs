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
use sluice_xds_server::translate::GatewayConfig;

use crate::envoy::{self, EnvoyOptions, EnvoyProcess, XdsProtocol};
use crate::eventing::EventingPlane;
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
    let run_dir = std::env::temp_dir().join(format!("sluice-{}", std::process::id()));

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
    let (queue_proxy_wasm, wasm_missing) = match envoy::find_queue_proxy_wasm() {
        Ok(path) => (Some(path), None),
        Err(e) => {
            tracing::warn!("{e:#}; Knative Services cannot run until it is built");
            (None, Some(format!("{e:#}")))
        }
    };

    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ads_server, acks) = AdsServer::new(snapshot_rx);
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

    let keeper_wasm = queue_proxy_wasm.clone();
    let (report_tx, report_rx) = watch::channel(StatusReport::default());
    let controller_config = ControllerConfig {
        gateway: GatewayConfig {
            external_address: addr(args.external_port),
            internal_address: addr(args.internal_port),
            tls_address: Some(addr(args.tls_port)),
            queue_proxy_wasm: queue_proxy_wasm.clone(),
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
        probe_external: addr(args.external_port),
        probe_internal: addr(args.internal_port),
    };
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("{}: cannot resolve the folder", args.dir.display()))?;
    let (plane, serving_report) = ServingPlane::start(ServingOptions {
        dir: dir.clone(),
        state_dir: args.state_dir.clone(),
        activator: activator_listener,
        envoy_admin: addr(args.admin_port),
        address: args.address,
        wasm_missing,
        external_port: args.external_port,
    })?;
    let eventing = EventingPlane::start(
        args.state_dir.join("broker"),
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
        }
        report
    }));

    let mut envoy = EnvoyProcess::start(&EnvoyOptions {
        binary: envoy_bin.clone(),
        run_dir: run_dir.clone(),
        admin: addr(args.admin_port),
        xds: addr(args.xds_port),
        protocol: args.xds_protocol,
        concurrency: args.envoy_concurrency,
        log_level: args.envoy_log_level.clone(),
        queue_proxy_wasm: keeper_wasm,
    })?;
    tracing::info!(
        envoy = %envoy_bin.display(),
        log = %envoy.log_path.display(),
        "gateway: external http://{}, cluster-local http://{}, tls https://{}; admin http://{}; `sluice status --control-port {}`",
        addr(args.external_port),
        addr(args.internal_port),
        addr(args.tls_port),
        addr(args.admin_port),
        args.control_port,
    );

    // Say when the gateway is up (listeners come over ADS right after); a stuck Envoy is only logged,
    // since the select below already reports an Envoy that exits.
    let admin = addr(args.admin_port);
    tokio::spawn(async move {
        match envoy::wait_admin_ready(admin, Duration::from_secs(60)).await {
            Ok(()) => tracing::info!("Envoy is live"),
            Err(e) => tracing::warn!("{e:#}"),
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome: Result<()> = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = sigterm.recv() => Ok(()),
        status = envoy.wait() => {
            let log = std::fs::read_to_string(&envoy.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(anyhow::anyhow!("Envoy exited ({:?}); last lines of {}:\n{}", status, envoy.log_path.display(), tail.join("\n")))
        }
        res = &mut controller_task => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("state source failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("controller panicked: {e}")),
        },
    };
    tracing::info!("stopping");
    controller_task.abort();
    // Deliveries stop before their subscribers do: the reverse fails them on the way out.
    eventing.shutdown().await;
    plane.shutdown().await;
    envoy.stop(Duration::from_secs(3)).await;
    let _ = shutdown_tx.send(true);
    controller_task.abort();
    control_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), xds_task).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    outcome
}
