//! `sluice xds`: the xds-server alone, for a cluster (Envoy runs elsewhere and connects over ADS).
//! The state comes from Kubernetes (`--kube`) or a folder. With `--kube`, several replicas may run:
//! all serve ADS, and the holder of a Lease writes status and probes (see `xds_replicas`). SIGTERM
//! or SIGINT stops it cleanly: status writes stop, the Lease is released, ADS streams close, exit 0.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;

use sluice_api::ingress::LoadBalancerIngressStatus;
use sluice_xds_server::ads::{self, AdsServer};
use sluice_xds_server::controller::{self, ControllerConfig, ProbeTargets, StatusReport};
use sluice_xds_server::lease::LeaderElector;
use sluice_xds_server::snapshot::Snapshot;
use sluice_xds_server::source::StateSource;
use sluice_xds_server::source::folder::FolderSource;
use sluice_xds_server::source::kube::KubeSource;
use sluice_xds_server::status::LoadBalancers;
use sluice_xds_server::tls::{ReloadingServerConfig, TlsFiles};
use sluice_xds_server::translate::GatewayConfig;

#[derive(clap::Args)]
pub struct XdsArgs {
    /// Read Ingresses, Services, Endpoints and Secrets from the Kubernetes API (in-cluster or kubeconfig).
    #[arg(long, conflicts_with = "dir")]
    kube: bool,
    /// Read them from a folder of YAML instead.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// mTLS for ADS: the xds-server's certificate (PEM, chain leaf first). With --tls-key and
    /// --client-ca (all three or none), only gateways presenting a certificate signed by the client
    /// CA get config. The files are re-read when they change (a renewed Secret): new connections use
    /// them without a restart.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) that sign the gateways' client certificates.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Address the xds-server and control API bind to.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    listen: IpAddr,
    #[arg(long, default_value_t = 18000)]
    xds_port: u16,
    #[arg(long, default_value_t = crate::up::DEFAULT_CONTROL_PORT)]
    control_port: u16,
    /// Envoy listener addresses the generated config binds (inside the gateway).
    #[arg(long, default_value = "0.0.0.0:8080")]
    external_listener: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8081")]
    internal_listener: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8443")]
    tls_listener: SocketAddr,
    /// Probe every gateway here instead of at its own address (host:port of the external listener;
    /// give --probe-internal too). By default each gateway is probed at its ADS connection's peer
    /// IP with the ports of --external-listener and --internal-listener, as net-kourier probes each
    /// gateway pod: an Ingress is Ready once every connected gateway serves it.
    #[arg(long, requires = "probe_internal")]
    probe_external: Option<String>,
    /// With --probe-external: where every gateway's cluster-local listener is probed.
    #[arg(long, requires = "probe_external")]
    probe_internal: Option<String>,
    /// DNS names written to status.publicLoadBalancer / privateLoadBalancer (domainInternal).
    #[arg(long, default_value = "sluice-gateway.sluice-system.svc.cluster.local")]
    public_domain: String,
    #[arg(
        long,
        default_value = "sluice-gateway-internal.sluice-system.svc.cluster.local"
    )]
    private_domain: String,
    #[command(flatten)]
    replicas: crate::xds_replicas::ReplicaArgs,
}

async fn resolve(what: &str, addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("{what} {addr}"))?
        .next()
        .with_context(|| format!("{what} {addr}: no address"))
}

pub async fn run(args: XdsArgs) -> Result<()> {
    let (source, client): (Arc<dyn StateSource>, _) = match (&args.dir, args.kube) {
        (Some(dir), false) => (Arc::new(FolderSource::new(dir)), None),
        (None, true) => {
            let client = ::kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
            (Arc::new(KubeSource::new(client.clone())), Some(client))
        }
        _ => bail!("say where the state comes from: --kube or --dir DIR"),
    };
    let election = match &client {
        Some(client) => Some(LeaderElector::new(
            client.clone(),
            args.replicas.lease_config(client)?,
        )),
        None => None,
    };
    let probe = match (&args.probe_external, &args.probe_internal) {
        (Some(external), Some(internal)) => ProbeTargets::Fixed {
            external: resolve("--probe-external", external).await?,
            internal: resolve("--probe-internal", internal).await?,
        },
        _ => ProbeTargets::PerGateway {
            external_port: args.external_listener.port(),
            internal_port: args.internal_listener.port(),
        },
    };
    // Checked before anything binds: a half-configured mTLS is an error, never plain gRPC.
    let tls = TlsFiles::from_options(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.client_ca.clone(),
    )?
    .map(ReloadingServerConfig::load)
    .transpose()
    .context("loading the xds TLS files")?
    .map(Arc::new);
    if tls.is_none() && !args.listen.is_loopback() {
        tracing::warn!(
            "ADS is plain gRPC on {}: anyone who reaches the port gets every gateway's config, TLS \
             keys included; give --tls-cert, --tls-key and --client-ca for mTLS",
            args.listen
        );
    }
    let xds_listener = TcpListener::bind((args.listen, args.xds_port))
        .await
        .with_context(|| format!("xds port {}", args.xds_port))?;
    let control_listener = TcpListener::bind((args.listen, args.control_port))
        .await
        .with_context(|| format!("control port {}", args.control_port))?;
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ads_server, acks) = AdsServer::new(snapshot_rx);
    let (report_tx, report_rx) = watch::channel(StatusReport::default());
    let config = ControllerConfig {
        gateway: GatewayConfig {
            external_address: args.external_listener,
            internal_address: args.internal_listener,
            tls_address: Some(args.tls_listener),
            queue_proxy: None,
        },
        load_balancers: LoadBalancers {
            public: LoadBalancerIngressStatus {
                domain_internal: args.public_domain.clone(),
                ..Default::default()
            },
            private: LoadBalancerIngressStatus {
                domain_internal: args.private_domain.clone(),
                ..Default::default()
            },
        },
        probe,
        ack_timeout: args.replicas.ack_timeout,
        leader: election.as_ref().map(|(_, leading)| leading.clone()),
    };
    tracing::info!(
        mtls = tls.is_some(),
        "xds-server on {}:{}",
        args.listen,
        args.xds_port
    );
    let mut registry = prometheus_client::registry::Registry::default();
    ads_server
        .metrics()
        .register(registry.sub_registry_with_prefix("xds"));
    let control_listener = crate::http::ControlListener::new(control_listener, Arc::new(registry));
    let control = tokio::spawn(crate::http::serve_control(control_listener, move || {
        serde_json::to_value(&*report_rx.borrow()).unwrap_or_default()
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut xds = match tls {
        Some(tls) => tokio::spawn(ads::serve_tls(xds_listener, tls, ads_server, stopped())),
        None => tokio::spawn(ads::serve(xds_listener, ads_server, stopped())),
    };
    let elector = election.map(|(elector, _)| {
        let stop = stopped();
        tokio::spawn(async move { elector.run(stop).await })
    });
    let signal = crate::xds_replicas::shutdown_signal();
    let result = tokio::select! {
        r = controller::run(source, config, snapshot_tx, acks, report_tx) => r.map_err(|e| anyhow::anyhow!("state source failed: {e}")),
        r = &mut xds => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the ADS server stopped")),
            Ok(Err(e)) => Err(anyhow::anyhow!("ADS server: {e}")),
            Err(e) => Err(anyhow::anyhow!("ADS server: {e}")),
        },
        s = signal => {
            tracing::info!("{}: shutting down", s?);
            Ok(())
        }
    };
    // The controller is stopped (no more status writes): release the Lease, so another replica
    // takes over at once, and close the ADS streams, so gateways reconnect to another replica.
    stop_tx.send_replace(true);
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    if !xds.is_finished()
        && tokio::time::timeout(std::time::Duration::from_secs(5), &mut xds)
            .await
            .is_err()
    {
        tracing::warn!("ADS streams did not close within 5 s");
        xds.abort();
    }
    control.abort();
    result
}
