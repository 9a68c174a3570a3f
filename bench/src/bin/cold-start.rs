//! Serving benchmark through a real `sluice up` (real Envoy, queue-proxy filter, activator, autoscaler, a
//! real process per instance):
//!
//! - cold start: time to first byte of a request to a scaled-to-zero Service, minus the app's own
//!   start-up time (spawn to ready, as the runtime measured it for that very instance); repeated `--runs`
//!   times, each after the revision went back to zero;
//! - steady state: wrk through the gateway and the instance's filter versus the app direct.
//!
//! Run: `bash scripts/bench-serving` (builds, then runs this with the release binaries).

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
    /// Cold starts to measure.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of wrk per steady-state measurement (0 skips it).
    #[arg(long, default_value_t = 5)]
    wrk_seconds: u32,
}

fn service_yaml(name: &str, app: &Path, annotations: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  template:
    metadata:
      annotations:
{annotations}
    spec:
      containers:
      - image: app
        command: [\"{}\"]
",
        app.display()
    )
}

const AUTOSCALER: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  stable-window: 6s
  scale-to-zero-grace-period: 6s
";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn status(client: &HttpClient, control: u16) -> Result<Value> {
    let uri: http::Uri = format!("http://127.0.0.1:{control}/status").parse()?;
    let resp = client.get(uri).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn revision<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["revisions"]
        .as_array()?
        .iter()
        .find(|r| r["metadata"]["name"] == name)
}

async fn wait_for(
    client: &HttpClient,
    control: u16,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = status(client, control).await
            && pred(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Time to the response headers of one fresh-connection GET through the gateway.
async fn ttfb(external: SocketAddr, host: &str) -> Result<(Duration, u16)> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{external}/"))
        .header("host", host)
        .body(Empty::new())?;
    let start = Instant::now();
    let resp = client.request(req).await?;
    let elapsed = start.elapsed();
    let code = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok((elapsed, code))
}

fn wrk(url: &str, host: Option<&str>, seconds: u32) -> Result<(f64, String)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c50", &format!("-d{seconds}s"), "--latency"]);
    if let Some(host) = host {
        cmd.args(["-H", &format!("Host: {host}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .map(|l| l.trim().trim_start_matches("99%").trim().to_string())
        .unwrap_or_default();
    Ok((rps, p99))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sluice = std::fs::canonicalize(&args.sluice)
        .with_context(|| format!("{}: build it first", args.sluice.display()))?;
    let app = std::fs::canonicalize(&args.app)
        .with_context(|| format!("{}: build it first", args.app.display()))?;
    let root = tempfile::tempdir()?;
    let dir = root.path().join("config");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("config-autoscaler.yaml"), AUTOSCALER)?;
    std::fs::write(
        dir.join("cold.yaml"),
        service_yaml(
            "cold",
            &app,
            "        autoscaling.knative.dev/initial-scale: \"1\"",
        ),
    )?;
    let (external, control) = (free_port(), free_port());
    let log = std::fs::File::create(root.path().join("sluice.log"))?;
    let child = Command::new(&sluice)
        .arg("up")
        // Its revisions run from their `command` as local processes (the container runtime has its
        // own benchmark, cold_start_container).
        .args(["--runtime", "process"])
        .arg(&dir)
        .args(["--external-port", &external.to_string()])
        .args(["--internal-port", &free_port().to_string()])
        .args(["--tls-port", &free_port().to_string()])
        .args(["--admin-port", &free_port().to_string()])
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
    let _guard = SluiceGuard {
        child,
        grace: Duration::from_secs(15),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let external_addr: SocketAddr = ([127, 0, 0, 1], external).into();

    let all_ready = |n: usize| {
        move |s: &Value| {
            s["services"].as_array().is_some_and(|a| {
                a.len() == n
                    && a.iter().all(|svc| {
                        svc["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    })
            })
        }
    };
    // Only the cold Service: when it is at zero, no instance listener is left in Envoy, so each cold
    // start also makes Envoy load the queue-proxy filter for a first listener (the worst case).
    wait_for(
        &client,
        control,
        "services ready",
        Duration::from_secs(120),
        all_ready(1),
    )
    .await?;

    println!("cold start (TTFB of a request to a revision at zero, minus the app's own start-up)");
    let mut overheads = Vec::new();
    for run in 1..=args.runs {
        wait_for(
            &client,
            control,
            "cold-00001 at zero",
            Duration::from_secs(120),
            |s| {
                revision(s, "cold-00001").is_some_and(|r| {
                    r["desiredInstances"] == 0
                        && r["instances"].as_array().is_some_and(Vec::is_empty)
                })
            },
        )
        .await?;
        // Let Envoy settle on the activator endpoint.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (took, code) = ttfb(external_addr, "cold.default.localhost").await?;
        if code != 200 {
            bail!("cold request answered {code}");
        }
        let s = status(&client, control).await?;
        let startup = revision(&s, "cold-00001")
            .and_then(|r| r["instances"].as_array()?.first()?["startupMs"].as_f64())
            .unwrap_or(f64::NAN);
        let ttfb_ms = took.as_secs_f64() * 1e3;
        let overhead = ttfb_ms - startup;
        println!(
            "  run {run}: ttfb {ttfb_ms:.1} ms, app start-up {startup:.1} ms, sluice overhead {overhead:.1} ms"
        );
        overheads.push(overhead);
    }
    overheads.sort_by(f64::total_cmp);
    println!(
        "  sluice overhead: p50 {:.1} ms, max {:.1} ms (target < 20 ms)",
        percentile(&overheads, 0.5),
        percentile(&overheads, 1.0)
    );

    if args.wrk_seconds > 0 {
        // Always one instance, in the path without the activator (target burst capacity 0).
        std::fs::write(
            dir.join("steady.yaml"),
            service_yaml(
                "steady",
                &app,
                "        autoscaling.knative.dev/min-scale: \"1\"\n        autoscaling.knative.dev/target-burst-capacity: \"0\"",
            ),
        )?;
        wait_for(
            &client,
            control,
            "steady ready",
            Duration::from_secs(120),
            all_ready(2),
        )
        .await?;
        let s = status(&client, control).await?;
        let port = revision(&s, "steady-00001")
            .and_then(|r| r["instances"].as_array()?.first()?["port"].as_u64())
            .context("steady-00001 has no instance")?;
        let (direct_rps, direct_p99) =
            wrk(&format!("http://127.0.0.1:{port}/"), None, args.wrk_seconds)?;
        let (gw_rps, gw_p99) = wrk(
            &format!("http://127.0.0.1:{external}/"),
            Some("steady.default.localhost"),
            args.wrk_seconds,
        )?;
        println!("steady state (wrk -t2 -c50 -d{}s)", args.wrk_seconds);
        println!("  app direct:              {direct_rps:>10.0} req/s, p99 {direct_p99}");
        println!("  gateway + queue-proxy:   {gw_rps:>10.0} req/s, p99 {gw_p99}");
        println!("  ratio: {:.2}", gw_rps / direct_rps.max(1.0));
    }
    Ok(())
}
