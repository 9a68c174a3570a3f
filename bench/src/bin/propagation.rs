//! Config propagation through the real `sluice up`: the time from a changed YAML file to Envoy serving
//! the new route, with N Ingresses loaded, plus the sluice process's CPU time and memory.
//!
//! Each change adds a new host to one Ingress's file; the clock stops at the first request for that host
//! that Envoy routes (200 from the upstream instead of Envoy's 404 for an unknown host).

use sluice_bench::{free_port, ingress_yaml};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// The sluice binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Ingresses loaded before measuring.
    #[arg(long, default_value_t = 1000)]
    ingresses: usize,
    /// Changes measured.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// xDS flavour: delta or sotw.
    #[arg(long, default_value = "delta")]
    xds_protocol: String,
}

fn backend_yaml(port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: upstream, namespace: bench}}
spec:
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: upstream, namespace: bench}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{name: http, port: {port}}}]
"
    )
}

/// Writes through a temporary file and a rename, as editors and `kubectl`-style tools do, so the
/// watcher never reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct Killer(std::process::Child);
impl Drop for Killer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// (ready, total) of the benchmark's Ingresses (namespace `bench`) in `sluice status`; `sluice up`
/// adds Ingresses of its own (the broker's).
async fn ready_count(control: SocketAddr) -> Result<(usize, usize)> {
    let (_, body) = get(control, "localhost", "/status").await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let ingresses: Vec<&serde_json::Value> = v["ingresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["metadata"]["namespace"] == "bench")
        .collect();
    let ready = ingresses
        .iter()
        .filter(|i| {
            i["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count();
    Ok((ready, ingresses.len()))
}

/// (CPU seconds, resident MiB, peak resident MiB) of a process.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (ticks / hz, kb("VmRSS:"), kb("VmHWM:"))
}

/// The child processes of `pid` (Envoy, started by `sluice up`).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let upstream_port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", upstream_port)).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_r: Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    std::fs::write(
        dir.path().join("upstream.yaml"),
        backend_yaml(upstream_port),
    )?;
    for i in 0..args.ingresses {
        std::fs::write(
            dir.path().join(format!("ing-{i}.yaml")),
            ingress_yaml(i, &[]),
        )?;
    }

    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let (external, control) = (ports[0], ports[5]);
    let started = Instant::now();
    let child = std::process::Command::new(&args.sluice)
        .arg("up")
        // Its revisions run from their `command` as local processes (the container runtime has its
        // own benchmark, cold_start_container).
        .args(["--runtime", "process"])
        .arg(dir.path())
        .args(["--external-port", &ports[0].to_string()])
        .args(["--internal-port", &ports[1].to_string()])
        .args(["--tls-port", &ports[2].to_string()])
        .args(["--admin-port", &ports[3].to_string()])
        .args(["--xds-port", &ports[4].to_string()])
        .args(["--control-port", &control.to_string()])
        .args(["--xds-protocol", &args.xds_protocol])
        .env(
            "SLUICE_LOG",
            std::env::var("SLUICE_LOG").unwrap_or_else(|_| "warn".to_string()),
        )
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", args.sluice.display()))?;
    let pid = child.id();
    let _guard = Killer(child);
    let control = SocketAddr::from(([127, 0, 0, 1], control));
    let external = SocketAddr::from(([127, 0, 0, 1], external));

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok((ready, total)) = ready_count(control).await
            && total == args.ingresses
            && ready == total
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the Ingresses were not all Ready within 10 minutes");
        }
        // Not faster: each poll has sluice serialize thousands of statuses, which would slow the
        // very start-up it measures.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_ready = started.elapsed();
    eprintln!(
        "{} Ingresses Ready after {:.2} s; measuring {} changes",
        args.ingresses,
        all_ready.as_secs_f64(),
        args.changes
    );
    let (cpu_start, rss_start, _) = usage(pid);
    let envoy = children(pid);
    let envoy_cpu_start: f64 = envoy.iter().map(|p| usage(*p).0).sum();

    let mut latencies = Vec::with_capacity(args.changes);
    for k in 0..args.changes {
        let i = (k * 7919) % args.ingresses;
        let host = format!("new-{k}.bench.localhost");
        let path = dir.path().join(format!("ing-{i}.yaml"));
        let t0 = Instant::now();
        write_atomically(&path, &ingress_yaml(i, std::slice::from_ref(&host)))?;
        loop {
            if let Ok((200, _)) = get(external, &host, "/").await {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {k} (host {host}) was not served within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(t0.elapsed());
        // Let the status settle so one change's probe does not overlap the next change.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu_end, rss_end, rss_peak) = usage(pid);
    let envoy_cpu_end: f64 = envoy.iter().map(|p| usage(*p).0).sum();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "propagation ingresses={} changes={} xds={}: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; all Ready after {:.2} s; sluice CPU {:.2} s during changes ({:.1} ms/change), RSS {:.0} MiB (start {:.0}, peak {:.0}); Envoy CPU {:.1} ms/change",
        args.ingresses,
        args.changes,
        args.xds_protocol,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        all_ready.as_secs_f64(),
        cpu_end - cpu_start,
        (cpu_end - cpu_start) * 1000.0 / args.changes as f64,
        rss_end,
        rss_start,
        rss_peak,
        (envoy_cpu_end - envoy_cpu_start) * 1000.0 / args.changes as f64,
    );
    Ok(())
}
