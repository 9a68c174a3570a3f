//! `sluice broker`: runs only the eventing broker (ingress, log, triggers, delivery, PingSource) from a
//! folder of Knative Eventing YAML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sluice_broker::{BrokerOptions, BrokerService, EventingObjects};

#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Folder of Knative Eventing YAML (Broker, Trigger, PingSource).
    pub dir: PathBuf,
    /// Where the brokers' logs (events and consumer offsets) are kept.
    #[arg(long, default_value = ".sluice/broker")]
    pub data_dir: PathBuf,
    /// Address of the broker ingress.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Deliveries in flight at once per unordered Trigger.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub delivery_parallelism: u16,
    /// Connections to one subscriber host at most, shared by every Trigger that delivers there.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub connections_per_host: u16,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// How often the folder is read again for changes.
const RESCAN: Duration = Duration::from_secs(1);

pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let mut options = BrokerOptions::new(&args.data_dir, args.listen);
    // Standalone: no gateway in front, so Brokers are addressed at the ingress itself.
    options.ingress_url = format!("http://{}", args.listen);
    options.parallelism = args.delivery_parallelism.into();
    options.connections_per_host = args.connections_per_host.into();
    let service = BrokerService::start(options).await?;
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics address {addr}"))?;
            let mut registry = prometheus_client::registry::Registry::default();
            service.register_metrics(&mut registry);
            tracing::info!("metrics on http://{addr}/metrics");
            Some(tokio::spawn(crate::http::serve_metrics(
                listener,
                std::sync::Arc::new(registry),
            )))
        }
        None => None,
    };
    let mut applied = None;
    let mut ticker = tokio::time::interval(RESCAN);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown_signal() => break,
        }
        // Re-read the folder each second and apply only what changed: a poll is simpler than a file
        // watcher and as quick for a folder of a few files.
        match read_folder(&args.dir) {
            Ok(objects) if applied.as_ref() != Some(&objects) => {
                let status = service.apply(objects.clone()).await;
                report(&status);
                applied = Some(objects);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    tracing::info!("stopping the broker");
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    service.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Every Broker, Trigger and PingSource of the folder's YAML files (other kinds are skipped; a
/// document that does not parse is reported and skipped).
fn read_folder(dir: &Path) -> anyhow::Result<EventingObjects> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for result in sluice_api::parse_documents(&text) {
            match result {
                Ok(object) => objects.push(object),
                Err(e) => tracing::warn!("{}: {e}", file.display()),
            }
        }
    }
    Ok(EventingObjects::from_objects(objects))
}

fn report(status: &sluice_broker::EventingStatus) {
    let ready = |s: Option<&sluice_api::meta::Status>| {
        s.and_then(|s| s.condition("Ready"))
            .map(|c| {
                (
                    c.status == sluice_api::ConditionStatus::True,
                    c.message.clone(),
                )
            })
            .unwrap_or((false, String::new()))
    };
    for b in &status.brokers {
        let (ok, message) = ready(b.status.as_ref().map(|s| &s.status));
        let url = b
            .status
            .as_ref()
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.url.clone())
            .unwrap_or_default();
        tracing::info!(broker = %b.metadata.key(), ready = ok, %url, "{message}");
    }
    for t in &status.triggers {
        let (ok, _) = ready(t.status.as_ref().map(|s| &s.status));
        let why: Vec<String> = t
            .status
            .iter()
            .flat_map(|s| s.status.conditions.iter())
            .filter(|c| c.status != sluice_api::ConditionStatus::True)
            .map(|c| format!("{}: {} {}", c.type_, c.reason, c.message))
            .collect();
        tracing::info!(trigger = %t.metadata.key(), ready = ok, "{}", why.join("; "));
    }
    for p in &status.pingsources {
        let (ok, message) = ready(p.status.as_ref().map(|s| &s.status));
        tracing::info!(pingsource = %p.metadata.key(), ready = ok, "{message}");
    }
}
