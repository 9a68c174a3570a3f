//! Serving at scale through a real `sluice up`: N Knative Services (the test app, default scale) in one
//! folder; reports the time until every Service is Ready, whether each answers, the RSS of `sluice up`,
//! of Envoy and of the apps, and the time of one autoscaler scrape of Envoy's stats.
//!
//! Run: `bash scripts/bench-scale 500` (builds, then runs this with the release binaries). The figures
//! depend on the machine: 2 shared cores here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sluice_bench::{SluiceGuard, free_port};

#[derive(Parser)]
struct Args {
    /// The sluice binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// The app every revision runs (listens on $PORT).
    #[arg(long, default_value = "target/release/sluice-test-app")]
    app: PathBuf,
    /// Services to run (one run per value).
    #[arg(long, value_delimiter = ',', default_value = "500")]
    services: Vec<usize>,
    /// Give up on a run after this long.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

// The e2e harness's builder, included by path: the bench does not depend on the harness crate, and
// uses only part of the builder.
#[path = "../../../tests/src/knative.rs"]
#[allow(dead_code)]
mod knative;

fn service_yaml(name: &str, app: &Path) -> String {
    let app = app.display().to_string();
    knative::KnativeService::new(name, &[&app])
        .image("app")
        .yaml()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn get(client: &HttpClient, uri: &str, host: Option<&str>) -> Result<(u16, Bytes)> {
    let mut req = http::Request::get(uri);
    if let Some(host) = host {
        req = req.header(http::header::HOST, host);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(req.body(Empty::new())?),
    )
    .await??;
    let code = resp.status().as_u16();
    Ok((code, resp.into_body().collect().await?.to_bytes()))
}

/// Resident set size of one process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// The direct children of `pid` (every thread's list).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn run(args: &Args, sluice: &Path, app: &Path, n: usize) -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("config");
    std::fs::create_dir(&dir)?;
    let docs: Vec<String> = (0..n)
        .map(|i| service_yaml(&format!("s{i:05}"), app))
        .collect();
    std::fs::write(dir.join("services.yaml"), docs.join("---\n"))?;
    let (external, control, admin) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(root.path().join("sluice.log"))?;
    let started = Instant::now();
    let child = Command::new(sluice)
        .arg("up")
        // Its revisions run from their `command` as local processes (the container runtime has its
        // own benchmark, cold_start_container).
        .args(["--runtime", "process"])
        .arg(&dir)
        .args(["--external-port", &external.to_string()])
        .args(["--internal-port", &free_port().to_string()])
        .args(["--tls-port", &free_port().to_string()])
        .args(["--admin-port", &admin.to_string()])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--control-port", &control.to_string()])
        .args(["--activator-port", &free_port().to_string()])
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting sluice up")?;
    let pid = child.id();
    let _guard = SluiceGuard {
        child,
        grace: Duration::from_secs(60),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let status_uri = format!("http://127.0.0.1:{control}/status");
    let deadline = started + args.timeout;
    let mut last = String::new();
    loop {
        if let Ok((200, body)) = get(&client, &status_uri, None).await
            && let Ok(s) = serde_json::from_slice::<Value>(&body)
        {
            let ready = s["services"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|svc| {
                        svc["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    })
                    .count()
            });
            last = format!("{ready}/{n} Ready, envoy {}", s["envoy"]);
            if ready == n {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{n} services: not all Ready within {:?} ({last}); log in {}",
                args.timeout,
                root.keep().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let to_ready = started.elapsed();

    let gateway: SocketAddr = ([127, 0, 0, 1], external).into();
    let mut failed = 0;
    for i in 0..n {
        let host = format!("s{i:05}.default.localhost");
        match get(&client, &format!("http://{gateway}/"), Some(&host)).await {
            Ok((200, _)) => {}
            _ => failed += 1,
        }
    }
    // The autoscaler's scrape (the same filter sluice's autoscaler uses: the queue-proxy's series of
    // either build), and the whole page (what an operator's Prometheus reads): Envoy walks
    // every stat for either, so both grow with what the stats matcher keeps.
    let scrape = |uri: String| {
        let client = &client;
        async move {
            let mut times = Vec::new();
            let mut bytes = 0;
            for _ in 0..5 {
                let t = Instant::now();
                bytes = get(client, &uri, None).await?.1.len();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            anyhow::Ok((times[2], bytes))
        }
    };
    let (scrape_ms, scrape_bytes) = scrape(format!(
        "http://127.0.0.1:{admin}/stats/prometheus?usedonly&filter=sluice_qp__"
    ))
    .await?;
    let (all_ms, all_bytes) = scrape(format!("http://127.0.0.1:{admin}/stats/prometheus")).await?;

    let (mut envoy_rss, mut apps_rss, mut apps) = (0.0, 0.0, 0);
    for c in children(pid) {
        if comm(c).starts_with("envoy") {
            envoy_rss += rss_mib(c);
        } else {
            apps_rss += rss_mib(c);
            apps += 1;
        }
    }
    println!(
        "{n} services: all Ready in {:.1} s; {} of {n} answered 200; RSS sluice {:.0} MiB, Envoy {:.0} MiB, \
         {apps} apps {:.0} MiB; autoscaler stats scrape {scrape_ms:.0} ms, {:.0} KiB; whole \
         /stats/prometheus {all_ms:.0} ms, {:.0} KiB (medians of 5)",
        to_ready.as_secs_f64(),
        n - failed,
        rss_mib(pid),
        envoy_rss,
        apps_rss,
        scrape_bytes as f64 / 1024.0,
        all_bytes as f64 / 1024.0,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sluice = std::fs::canonicalize(&args.sluice)
        .with_context(|| format!("{}: build it first", args.sluice.display()))?;
    let app = std::fs::canonicalize(&args.app)
        .with_context(|| format!("{}: build it first", args.app.display()))?;
    for &n in &args.services {
        run(&args, &sluice, &app, n).await?;
    }
    Ok(())
}
