//! Propagation to several gateways (issue 14): the time from a changed KIngress file to the new host
//! being served by *every* gateway, with N Ingresses loaded and 1, 4, 16... gateways connected, plus
//! the xds-server's memory per connected gateway.
//!
//! The cluster's topology on the local engine, from the images users build (docker/): the xds-server
//! container (`sluice xds --dir`, the folder bind-mounted), gateway containers from the gateway image
//! (each its own network namespace, so every one binds the same listener ports, as pods do) and the
//! test app as the backend. The driver reaches each gateway at its container IP (the engine's bridge is
//! routed on this host). Gateways are added between phases (1, then up to 4, then up to 16): each
//! phase measures how long the new ones take to get the whole state, then `--changes` changes, each
//! timed until the last gateway answers 200 for the new host (polled every millisecond per gateway).
//!
//! `cargo run --release -p sluice-bench --bin propagation-gateways -- --ingresses 5000 --gateways 1,4,16`

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use sluice_bench::ingress_yaml;
use sluice_e2e::Req;
use sluice_e2e::cluster::{ClusterImages, Run, Topology};
use sluice_e2e::images::{TestImage, docker};

#[derive(Parser)]
struct Args {
    /// Ingresses loaded before measuring.
    #[arg(long, default_value_t = 5000)]
    ingresses: usize,
    /// Changes measured per phase.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Gateways connected in each phase, ascending (comma-separated).
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    gateways: Vec<usize>,
    /// Milliseconds between two polls of one gateway that does not serve the new host yet. Each poll
    /// is a request into a gateway that shares the machine: at 1 ms, 16 gateways take 16,000
    /// requests/s while a change propagates.
    #[arg(long, default_value_t = 1)]
    poll_ms: u64,
}

fn backend_yaml(ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: upstream, namespace: bench}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: upstream, namespace: bench}}
subsets:
- addresses: [{{ip: {ip}}}]
  ports: [{{name: http, port: 8080}}]
"
    )
}

/// Through a temporary file and a rename: the watcher never reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    set_mode(&tmp, 0o644)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

async fn status(addr: SocketAddr, host: &str) -> Option<http::StatusCode> {
    Req::get(host, "/")
        .timeout(Duration::from_secs(5))
        .send(addr)
        .await
        .ok()
        .map(|r| r.status)
}

/// Waits until `host` answers 200 on every gateway, polling each every `poll`; returns when the last
/// one did (from `t0`) and which gateway (its index) that was.
async fn served_everywhere(
    gateways: &[SocketAddr],
    host: &str,
    t0: Instant,
    limit: Duration,
    poll: Duration,
) -> Result<(Duration, usize)> {
    let polls = gateways.iter().map(|addr| {
        let host = host.to_string();
        let addr = *addr;
        async move {
            loop {
                if status(addr, &host).await == Some(http::StatusCode::OK) {
                    return Ok(t0.elapsed());
                }
                if t0.elapsed() > limit {
                    bail!("{host} not served by the gateway at {addr} within {limit:?}");
                }
                tokio::time::sleep(poll).await;
            }
        }
    });
    let times = futures::future::try_join_all(polls).await?;
    Ok(times
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i))
        .max()
        .unwrap_or_default())
}

/// The xds-server container's resident memory (MiB): its process seen from this host, else the
/// engine's figure.
fn xds_rss_mib(container: &str) -> Result<f64> {
    let pid = docker(&["inspect", "--format", "{{.State.Pid}}", container])?;
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(kb) = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    {
        return Ok(kb / 1024.0);
    }
    bail!("cannot read the memory of {container}'s process {pid} from this host")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn gateway_run(image: &str, node: &str) -> Run {
    Run {
        image: image.to_string(),
        args: [
            "-c",
            "/etc/envoy/envoy.json",
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--service-node",
            node,
            "--service-cluster",
            "sluice-gateway",
        ]
        .map(str::to_string)
        .to_vec(),
        ..Run::default()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.gateways.is_empty() && args.gateways.windows(2).all(|w| w[0] < w[1]),
        "--gateways: ascending counts, e.g. 1,4,16"
    );
    let started = Instant::now();
    let images = ClusterImages::build()?;
    let app = TestImage::app()?;
    eprintln!("images built in {:.1} s", started.elapsed().as_secs_f64());
    let topology = Topology::create("sluice-bench-gw")?;
    let backend_ip = topology.run_backend(app.tag(), "upstream")?.1.to_string();

    let config = tempfile::Builder::new()
        .prefix("sluice-bench-gw-")
        .tempdir()?;
    set_mode(config.path(), 0o755)?;
    write_atomically(
        &config.path().join("upstream.yaml"),
        &backend_yaml(&backend_ip),
    )?;
    for i in 0..args.ingresses {
        write_atomically(
            &config.path().join(format!("ing-{i}.yaml")),
            &ingress_yaml(i, &[]),
        )?;
    }
    let xds = topology.run(
        "xds",
        &Run {
            image: images.sluice.tag().to_string(),
            aliases: vec![sluice_e2e::cluster::XDS_SERVICE_NAME.to_string()],
            mounts: vec![(config.path().to_path_buf(), "/config".into())],
            env: vec![("SLUICE_LOG".into(), "warn".into())],
            args: ["xds", "--dir", "/config", "--listen", "0.0.0.0"]
                .map(str::to_string)
                .to_vec(),
            ..Run::default()
        },
    )?;
    // The folder read and translated, before any gateway: the baseline memory.
    let xds_ip = topology.ip(&xds)?;
    let control = SocketAddr::new(xds_ip, 9900);
    let deadline = Instant::now() + Duration::from_secs(300);
    while Req::get("localhost", "/healthz")
        .send(control)
        .await
        .map(|r| r.status != http::StatusCode::OK)
        .unwrap_or(true)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the xds-server did not come up:\n{}",
            topology.logs(&xds)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_none = xds_rss_mib(&xds)?;
    eprintln!(
        "xds-server up with {} Ingresses: RSS {rss_none:.0} MiB",
        args.ingresses
    );

    let mut gateways: Vec<SocketAddr> = Vec::new();
    let mut previous_rss = rss_none;
    let mut previous_count = 0;
    let mut round = 0;
    let mut lines = Vec::new();
    for &count in &args.gateways {
        // New gateways: time until each serves the first and the last Ingress.
        let t0 = Instant::now();
        let mut added = Vec::new();
        for n in gateways.len()..count {
            let name = format!("gw-{n}");
            let c = topology.run(&name, &gateway_run(images.gateway.tag(), &name))?;
            added.push(SocketAddr::new(topology.ip(&c)?, 8080));
        }
        let limit = Duration::from_secs(600);
        let poll = Duration::from_millis(args.poll_ms);
        served_everywhere(&added, "svc-0.bench.localhost", t0, limit, poll).await?;
        let (synced, _) = served_everywhere(
            &added,
            &format!("svc-{}.bench.localhost", args.ingresses - 1),
            t0,
            limit,
            poll,
        )
        .await?;
        gateways.extend(added);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = xds_rss_mib(&xds)?;

        let mut latencies = Vec::with_capacity(args.changes);
        // The slowest change: how long, and which gateway served it last.
        let mut slowest = (Duration::ZERO, 0usize);
        for k in 0..args.changes {
            round += 1;
            let i = (round * 7919) % args.ingresses;
            let host = format!("new-{round}.bench.localhost");
            let path = config.path().join(format!("ing-{i}.yaml"));
            let t0 = Instant::now();
            write_atomically(&path, &ingress_yaml(i, std::slice::from_ref(&host)))?;
            let (took, last) =
                served_everywhere(&gateways, &host, t0, Duration::from_secs(30), poll)
                    .await
                    .with_context(|| format!("change {k} with {count} gateways"))?;
            slowest = slowest.max((took, last));
            latencies.push(took);
            // One change at a time: the next starts once the last one's probes are done.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let line = format!(
            "gateways={count} ingresses={} changes={} poll={} ms: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (last served by gw-{}); the {} new gateways had the whole state in {:.1} s; xds-server RSS {rss:.0} MiB ({rss_none:.0} MiB with none; {:+.1} MiB per gateway added in this phase)",
            args.ingresses,
            args.changes,
            args.poll_ms,
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.9)),
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
            slowest.1,
            count - previous_count,
            synced.as_secs_f64(),
            (rss - previous_rss) / (count - previous_count) as f64,
        );
        previous_rss = rss;
        previous_count = count;
        eprintln!("{line}");
        lines.push(line);
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
