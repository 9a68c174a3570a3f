//! Cold start of a Knative Service run from its image (issue 13), through a real `sluice up --runtime
//! container` (real Envoy, queue-proxy filter, activator, autoscaler, the machine's engine), beside
//! `docker run` of the same image, in interleaved rounds:
//!
//! - sluice: time to first byte of a request to the scaled-to-zero Service through the gateway; in the
//!   same round, from the engine's own records of that very container: request sent → container created
//!   (Sluice's reaction: activator, autoscaler, runtime), created → started (the engine's create+start),
//!   started → the app listening (the app's own start-up, from the timestamp the engine put on the app's
//!   "listening" log line), and listening → first byte (readiness seen, Envoy told, request forwarded).
//!   Sluice's overhead is the time to first byte minus the engine's create+start and the app's start-up.
//! - docker run: `docker run -d` of the same image, then GETs on the container's address until the
//!   first 200: what a user gets without Sluice.
//!
//! All timestamps come from the one machine's clock (the engine runs here). Run: `bash
//! scripts/bench-cold-start-container` (builds, then runs this).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http::StatusCode;
use sluice_e2e::Req;
use sluice_e2e::containers::{ImageService, Stack, revision};
use sluice_e2e::images::{self, TestImage, docker};

#[derive(Parser)]
struct Args {
    /// Rounds (each: one cold start through sluice, one `docker run`).
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// Knative's minimum stable window and a short grace period: the revision goes back to zero a few
/// seconds after each round.
const AUTOSCALER: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  stable-window: 6s
  scale-to-zero-grace-period: 2s
";

const SERVICE: &str = "cold";
const REVISION: &str = "cold-00001";

/// One round's figures, in ms.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    ttfb: f64,
    to_created: f64,
    engine: f64,
    app: f64,
    after_listen: f64,
    overhead: f64,
    docker_run: f64,
}

/// A timestamp from the engine (RFC 3339 with nanoseconds, UTC).
fn engine_time(text: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(text.trim()).with_context(|| format!("engine timestamp {text:?}"))
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// (Created, State.StartedAt) of a container, as the engine recorded them.
fn created_started(container: &str) -> Result<(SystemTime, SystemTime)> {
    let out = docker(&[
        "inspect",
        "--format",
        "{{.Created}} {{.State.StartedAt}}",
        container,
    ])?;
    let (created, started) = out.split_once(' ').context("two timestamps")?;
    Ok((engine_time(created)?, engine_time(started)?))
}

/// When the app in `container` logged that it listens (the engine's timestamp on the line).
fn listening_at(container: &str) -> Result<SystemTime> {
    let out = std::process::Command::new("docker")
        .args(["logs", "--timestamps", container])
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("listening on"))
        .with_context(|| format!("no \"listening on\" line in the logs of {container}: {text}"))?;
    engine_time(line.split_whitespace().next().unwrap_or_default())
}

/// One cold start through the gateway: the round's sluice figures.
async fn sluice_round(stack: &mut Stack) -> Result<Round> {
    stack
        .wait_status(
            &format!("{REVISION} at zero"),
            Duration::from_secs(120),
            |s| {
                revision(s, REVISION).is_some_and(|r| {
                    r["desiredInstances"] == 0
                        && r["instances"].as_array().is_some_and(Vec::is_empty)
                })
            },
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stack.containers_of(REVISION)?.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the container outlived scale to zero"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let Envoy settle on the activator endpoint.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = SystemTime::now();
    let start = Instant::now();
    let resp = Req::get(&format!("{SERVICE}.default.localhost"), "/")
        .timeout(Duration::from_secs(60))
        .send(stack.sluice.external())
        .await?;
    let ttfb = start.elapsed().as_secs_f64() * 1e3;
    if resp.status != StatusCode::OK {
        bail!("cold request answered {}: {}", resp.status, resp.text());
    }
    let containers = stack.running_containers_of(REVISION)?;
    let [container] = containers.as_slice() else {
        bail!("want one running container of {REVISION}, found {containers:?}");
    };
    let (created, started) = created_started(container)?;
    let listening = listening_at(container)?;
    let done = sent + Duration::from_secs_f64(ttfb / 1e3);
    let engine = ms_between(created, started);
    let app = ms_between(started, listening);
    Ok(Round {
        ttfb,
        to_created: ms_between(sent, created),
        engine,
        app,
        after_listen: ms_between(listening, done),
        overhead: ttfb - engine - app,
        docker_run: f64::NAN,
    })
}

/// Removes the `docker run` container even on error.
struct RunGuard(String);

impl Drop for RunGuard {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", &self.0]);
    }
}

/// `docker run -d` of the image, then GET / on the container's address until 200: ms.
async fn docker_run_to_ready(image: &str) -> Result<f64> {
    let start = Instant::now();
    let id = docker(&[
        "run",
        "--detach",
        "--label",
        images::TEST_LABEL,
        "--label",
        "sluice.bench=cold-start-container",
        "--env",
        "PORT=8080",
        image,
    ])?;
    let _guard = RunGuard(id.clone());
    let ip = docker(&["inspect", "--format", "{{.NetworkSettings.IPAddress}}", &id])?;
    let addr: SocketAddr = format!("{ip}:8080")
        .parse()
        .with_context(|| format!("container address {ip:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = Req::get("app", "/")
            .timeout(Duration::from_secs(2))
            .send(addr)
            .await;
        if answer.is_ok_and(|r| r.status == StatusCode::OK) {
            return Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::ensure!(Instant::now() < deadline, "docker run: no 200 from {addr}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// "median (min..max)" of `values`.
fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return "n/a".to_string();
    }
    format!(
        "{:7.1} ms  ({:.1} .. {:.1})",
        values[values.len() / 2],
        values[0],
        values[values.len() - 1]
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        images::engine_answers(),
        "no container engine answers (`docker info`)"
    );
    let image = tokio::task::spawn_blocking(TestImage::app).await??;
    let mut stack = Stack::start(&[]).await?;
    stack.sluice.write("config-autoscaler.yaml", AUTOSCALER)?;
    stack.apply(&ImageService::new(SERVICE, image.tag()))?;
    stack.wait_service(SERVICE, REVISION).await?;

    let mut rounds = Vec::new();
    for run in 1..=args.runs {
        let mut round = sluice_round(&mut stack).await?;
        round.docker_run = docker_run_to_ready(image.tag()).await?;
        println!(
            "  round {run:2}: ttfb {:6.1} ms = to created {:5.1} + engine create+start {:6.1} + app start-up \
             {:5.1} + after listen {:5.1}; sluice overhead {:5.1} ms; docker run to ready {:6.1} ms",
            round.ttfb,
            round.to_created,
            round.engine,
            round.app,
            round.after_listen,
            round.overhead,
            round.docker_run
        );
        rounds.push(round);
    }
    let column = |f: fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    println!(
        "cold start from zero, image {} ({} rounds, median (min .. max))",
        image.tag(),
        rounds.len()
    );
    println!(
        "  time to first byte via sluice:  {}",
        summary(&mut column(|r| r.ttfb))
    );
    println!(
        "    request -> container created: {}",
        summary(&mut column(|r| r.to_created))
    );
    println!(
        "    engine create -> started:     {}",
        summary(&mut column(|r| r.engine))
    );
    println!(
        "    started -> app listening:     {}",
        summary(&mut column(|r| r.app))
    );
    println!(
        "    app listening -> first byte:  {}",
        summary(&mut column(|r| r.after_listen))
    );
    println!(
        "  sluice overhead (ttfb - engine - app): {}   target <= 20 ms at p50",
        summary(&mut column(|r| r.overhead))
    );
    println!(
        "  docker run to ready (same image): {}",
        summary(&mut column(|r| r.docker_run))
    );
    println!(
        "  anchor: Knative on a cluster, from zero: about 1 to 2 s (median 1.35 s, Rust function, Kourier)"
    );
    drop(stack);
    drop(image);
    Ok(())
}
