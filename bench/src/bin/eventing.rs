//! Eventing benchmark (the broker issue): events/s from ingress to delivery with a fast local
//! subscriber, and end-to-end latency at a fixed rate, with durability on (202 only after fsync).
//!
//! Starts the real `sluice broker` on a temp folder holding one Broker and one Trigger whose
//! subscriber is a hyper HTTP/1.1 server inside this process (answers 202 at once and records when
//! each event id arrived). Producers are keep-alive HTTP/1.1 connections POSTing binary-mode
//! CloudEvents whose `ce-id` is `<phase>-<seq>-<send time in ns since the bench started>`.
//!
//! 1. throughput: a closed loop of `--connections` producers for `--duration` seconds: events/s
//!    accepted (202) and delivered, and a check that every accepted event was delivered;
//! 2. latency: an open loop at `--rate` events/s for `--latency-duration` seconds: p50/p99/max from
//!    the intended send time to the subscriber's receipt (so a stalled producer counts against the
//!    broker, no coordinated omission), and the ingress 202 latency;
//! 3. (with `--batch N`) the closed loop again with `application/cloudevents-batch+json` POSTs of N
//!    events each;
//! 4. (with `--relay`) the closed loop of phase 1 through a minimal relay instead of the broker: a
//!    separate process (this binary with `--relay-listen`), with the broker's thread count, that
//!    forwards each POST over its own keep-alive connection to the same subscriber and answers 202
//!    when the subscriber has. No log, no fsync, no CloudEvents parsing: the ceiling of any broker
//!    that takes one HTTP/1.1 request per event and makes one per delivery, on this machine.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// The `sluice` binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Producer connections (closed loop: one event in flight on each).
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Events/s of the latency phase.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10.0)]
    latency_duration: f64,
    /// Events per batch POST in an extra throughput phase (0: skip it).
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Worker threads of this process (producers and subscriber).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Skip the throughput phase.
    #[arg(long)]
    latency_only: bool,
    /// Skip the latency phase.
    #[arg(long)]
    throughput_only: bool,
    /// Keep the data folder (printed) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// The broker's deliveries in flight per Trigger (its default when not given).
    #[arg(long)]
    delivery_parallelism: Option<u16>,
    /// Also measure the relay ceiling (phase 4).
    #[arg(long)]
    relay: bool,
    /// Internal: run as the relay, listening here...
    #[arg(long, hide = true, requires = "relay_to")]
    relay_listen: Option<SocketAddr>,
    /// Internal: ...and forwarding to this subscriber.
    #[arg(long, hide = true)]
    relay_to: Option<SocketAddr>,
}

/// Targets from the issue.
const TARGET_EVENTS_PER_SEC: f64 = 50_000.0;
const TARGET_P99: Duration = Duration::from_millis(10);

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One event seen by the subscriber.
#[derive(Clone, Copy)]
struct Arrival {
    phase: u8,
    seq: u64,
    sent_ns: u64,
    at_ns: u64,
}

struct Subscriber {
    arrivals: Mutex<Vec<Arrival>>,
    /// Arrivals per phase byte, so that waiting for a phase to drain does not scan (and lock) the
    /// whole arrival list every 20 ms while the subscriber is receiving.
    per_phase: Vec<AtomicU64>,
}

impl Default for Subscriber {
    fn default() -> Self {
        Subscriber {
            arrivals: Mutex::new(Vec::new()),
            per_phase: (0..256).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Subscriber {
    fn record(&self, id: &str) {
        let at_ns = now_ns();
        let mut parts = id.splitn(3, '-');
        let (Some(phase), Some(seq), Some(sent)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Ok(seq), Ok(sent_ns)) = (seq.parse(), sent.parse()) else {
            return;
        };
        let phase = phase.as_bytes().first().copied().unwrap_or(b'?');
        self.arrivals.lock().unwrap().push(Arrival {
            phase,
            seq,
            sent_ns,
            at_ns,
        });
        self.per_phase[phase as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn of_phase(&self, phase: u8) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.phase == phase)
            .copied()
            .collect()
    }

    fn count_phase(&self, phase: u8) -> usize {
        self.per_phase[phase as usize].load(Ordering::Relaxed) as usize
    }
}

async fn serve_subscriber(listener: tokio::net::TcpListener, subscriber: Arc<Subscriber>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let subscriber = subscriber.clone();
                async move {
                    if let Some(id) = req.headers().get("ce-id").and_then(|v| v.to_str().ok()) {
                        subscriber.record(id);
                    }
                    // Drain the (small) body so the connection stays reusable.
                    let _ = req.into_body().collect().await;
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::ACCEPTED;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The broker (or the relay) process; killed on Drop, even when the bench fails.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ServerProcess {
    /// User+system CPU seconds used so far (from /proc).
    fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())) else {
            return 0.0;
        };
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }
}

/// User+system CPU seconds this process (producers and subscriber) used so far.
fn own_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn binary_event(addr: SocketAddr, phase: char, seq: u64, sent_ns: u64) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/bench/default"))
        .header("host", addr.to_string())
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("{phase}-{seq}-{sent_ns}"))
        .header("ce-source", "/bench/producer")
        .header("ce-type", "dev.sluice.bench")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            "{{\"seq\":{seq},\"msg\":\"hello\"}}"
        ))))
        .expect("a valid request")
}

fn batch_events(addr: SocketAddr, first: u64, n: usize, sent_ns: u64) -> Request<Full<Bytes>> {
    let events: Vec<serde_json::Value> = (0..n as u64)
        .map(|i| {
            let seq = first + i;
            serde_json::json!({
                "specversion": "1.0",
                "id": format!("b-{seq}-{sent_ns}"),
                "source": "/bench/producer",
                "type": "dev.sluice.bench",
                "datacontenttype": "application/json",
                "data": {"seq": seq, "msg": "hello"},
            })
        })
        .collect();
    Request::post(format!("http://{addr}/bench/default"))
        .header("host", addr.to_string())
        .header("content-type", "application/cloudevents-batch+json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&events).expect("json"),
        )))
        .expect("a valid request")
}

/// Sends one request and reads the whole answer; the status on success.
async fn send(
    conn: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<StatusCode> {
    conn.ready().await?;
    let response = conn.send_request(req).await?;
    let status = response.status();
    let _ = response.into_body().collect().await?;
    Ok(status)
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_nanos(sorted[i])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Waits until the subscriber has `want` arrivals of `phase` (or `timeout`); how long it waited.
async fn drain(subscriber: &Subscriber, phase: u8, want: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    while subscriber.count_phase(phase) < want && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Compares what got a 202 with what arrived: (missing, duplicates).
fn check_delivery(accepted: &[u64], arrivals: &[Arrival]) -> (usize, usize) {
    let mut seen = HashSet::with_capacity(arrivals.len());
    let mut duplicates = 0;
    for a in arrivals {
        if !seen.insert(a.seq) {
            duplicates += 1;
        }
    }
    let missing = accepted.iter().filter(|s| !seen.contains(s)).count();
    (missing, duplicates)
}

struct Closed {
    accepted: Vec<u64>,
    errors: u64,
    elapsed: Duration,
}

/// Closed loop: `connections` producers each keep one POST in flight until `duration` has passed.
async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    batch: usize,
    phase: char,
) -> anyhow::Result<Closed> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let next = next.clone();
        let mut conn = connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let n = batch.max(1) as u64;
                let first = next.fetch_add(n, Ordering::Relaxed);
                let req = if batch == 0 {
                    binary_event(addr, phase, first, now_ns())
                } else {
                    batch_events(addr, first, batch, now_ns())
                };
                match send(&mut conn, req).await {
                    Ok(StatusCode::ACCEPTED) => accepted.extend(first..first + n),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match connect(addr).await {
                            Ok(c) => conn = c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (accepted, errors)
        }));
    }
    let mut out = Closed {
        accepted: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (accepted, errors) = t.await?;
        out.accepted.extend(accepted);
        out.errors += errors;
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// One closed-loop throughput phase (binary events when `batch` is 0, else batch POSTs), drained and
/// checked; prints its line and returns the delivered events/s.
#[allow(clippy::too_many_arguments)]
async fn throughput(
    broker: Option<&ServerProcess>,
    subscriber: &Subscriber,
    addr: SocketAddr,
    connections: usize,
    duration: f64,
    batch: usize,
    phase: u8,
    name: &str,
) -> anyhow::Result<f64> {
    let cpu0 = broker.map_or(0.0, |b| b.cpu_seconds());
    let own0 = own_cpu_seconds();
    let run = closed_loop(
        addr,
        connections,
        Duration::from_secs_f64(duration),
        batch,
        phase as char,
    )
    .await?;
    let waited = drain(
        subscriber,
        phase,
        run.accepted.len(),
        Duration::from_secs(60),
    )
    .await;
    let cpu = broker.map_or(0.0, |b| b.cpu_seconds()) - cpu0;
    let own = own_cpu_seconds() - own0;
    let arrivals = subscriber.of_phase(phase);
    let mode = if batch == 0 {
        "binary".to_string()
    } else {
        format!("batch of {batch}")
    };
    let label = format!(
        "{name} ({mode}, {connections} connections, drained in {:.2} s)",
        waited.as_secs_f64()
    );
    Ok(report_throughput(&label, &run, &arrivals, cpu, own))
}

/// Prints a throughput line; `cpu` and `own` are the CPU seconds of the broker and of this process
/// (producers and subscriber share the machine with the broker, so both are shown).
fn report_throughput(label: &str, run: &Closed, arrivals: &[Arrival], cpu: f64, own: f64) -> f64 {
    let secs = run.elapsed.as_secs_f64();
    let accepted_rate = run.accepted.len() as f64 / secs;
    // Delivered rate: over the span from the first send to the last arrival (includes the drain).
    let first = arrivals.iter().map(|a| a.sent_ns).min().unwrap_or(0);
    let last = arrivals.iter().map(|a| a.at_ns).max().unwrap_or(0);
    let span = Duration::from_nanos(last.saturating_sub(first)).as_secs_f64();
    let delivered_rate = if span > 0.0 {
        arrivals.len() as f64 / span
    } else {
        0.0
    };
    let (missing, duplicates) = check_delivery(&run.accepted, arrivals);
    println!(
        "{label}: accepted {} in {secs:.1} s = {accepted_rate:.0} events/s; delivered {} = {delivered_rate:.0} events/s; \
         missing {missing}, duplicates {duplicates}, non-202 {}; server CPU {:.2} cores, bench CPU {:.2} cores",
        run.accepted.len(),
        arrivals.len(),
        run.errors,
        cpu / span.max(secs),
        own / span.max(secs),
    );
    delivered_rate.min(accepted_rate)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    BASE.get_or_init(Instant::now);
    if let (Some(listen), Some(to)) = (args.relay_listen, args.relay_to) {
        // The broker's runtime: tokio's default of one worker per core.
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(relay(listen, to));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// The relay of phase 4: per producer connection, one upstream connection to the subscriber.
async fn relay(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let Ok(upstream) = connect(to).await else {
                return;
            };
            // HTTP/1.1 serves one request at a time per connection: the lock is never contended.
            let upstream = Arc::new(tokio::sync::Mutex::new(upstream));
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let upstream = upstream.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let mut forward = Request::post("/")
                        .body(Full::new(body))
                        .expect("a valid request");
                    *forward.headers_mut() = parts.headers;
                    let status = match send(&mut *upstream.lock().await, forward).await {
                        Ok(s) if s.is_success() => StatusCode::ACCEPTED,
                        _ => StatusCode::BAD_GATEWAY,
                    };
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = status;
                    Ok::<_, hyper::Error>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Phase 4: the closed loop through the relay; the relay's delivered events/s.
async fn relay_ceiling(
    subscriber: &Subscriber,
    sub_addr: SocketAddr,
    connections: usize,
    duration: f64,
) -> anyhow::Result<f64> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let relay = ServerProcess(
        Command::new(std::env::current_exe()?)
            .arg("--relay-listen")
            .arg(addr.to_string())
            .arg("--relay-to")
            .arg(sub_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the relay")?,
    );
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the relay did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    throughput(
        Some(&relay),
        subscriber,
        addr,
        connections,
        duration,
        0,
        b'r',
        "relay ceiling",
    )
    .await
}

async fn run(args: Args) -> anyhow::Result<()> {
    let subscriber = Arc::new(Subscriber::default());
    let sub_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sub_addr = sub_listener.local_addr()?;
    tokio::spawn(serve_subscriber(sub_listener, subscriber.clone()));

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join("bench.yaml"),
        format!(
            "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: bench}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: fast, namespace: bench}}
spec:
  broker: default
  subscriber: {{uri: 'http://{sub_addr}/'}}
"
        ),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut command = Command::new(&args.sluice);
    command.arg("broker");
    if let Some(p) = args.delivery_parallelism {
        command.arg(format!("--delivery-parallelism={p}"));
    }
    let broker = ServerProcess(
        command
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(addr.to_string())
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.sluice.display()))?,
    );

    // Ready when a probe sent through the broker reaches the subscriber (the Trigger starts at the log
    // head, so probes sent before it exists are never delivered).
    let ready_start = Instant::now();
    let mut probe = 0u64;
    loop {
        if subscriber.count_phase(b'p') > 0 {
            break;
        }
        if ready_start.elapsed() > Duration::from_secs(60) {
            bail!("the broker did not deliver a probe event within 60 s");
        }
        if let Ok(mut c) = connect(addr).await {
            let _ = send(&mut c, binary_event(addr, 'p', probe, now_ns())).await;
            probe += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "broker ready after {:.1} s (ingress {addr}, subscriber {sub_addr}, data {})",
        ready_start.elapsed().as_secs_f64(),
        data.display()
    );

    let mut headline = None;
    if !args.latency_only {
        headline = Some(
            throughput(
                Some(&broker),
                &subscriber,
                addr,
                args.connections,
                args.duration,
                0,
                b't',
                "throughput",
            )
            .await?,
        );
    }

    let mut p99 = None;
    if !args.throughput_only {
        let cpu0 = broker.cpu_seconds();
        let total = (args.rate as f64 * args.latency_duration) as u64;
        let pool: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>> = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..64 {
            let conn = connect(addr).await?;
            pool.lock().unwrap().push(conn);
        }
        let ingress_lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
        let accepted = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
        let errors = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now();
        let start_ns = now_ns();
        let mut tasks = Vec::with_capacity(total as usize);
        for seq in 0..total {
            let offset = Duration::from_secs_f64(seq as f64 / args.rate as f64);
            tokio::time::sleep_until(start + offset).await;
            // The intended send time, not when the task got to run.
            let intended = start_ns + offset.as_nanos() as u64;
            let (pool, ingress_lat, accepted, errors) = (
                pool.clone(),
                ingress_lat.clone(),
                accepted.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let taken = pool.lock().unwrap().pop();
                let mut conn = match taken {
                    Some(c) => c,
                    None => match connect(addr).await {
                        Ok(c) => c,
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                };
                match send(&mut conn, binary_event(addr, 'l', seq, intended)).await {
                    Ok(StatusCode::ACCEPTED) => {
                        ingress_lat
                            .lock()
                            .unwrap()
                            .push(now_ns().saturating_sub(intended));
                        accepted.lock().unwrap().push(seq);
                        pool.lock().unwrap().push(conn);
                    }
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        pool.lock().unwrap().push(conn);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let send_secs = start.elapsed().as_secs_f64();
        let accepted = accepted.lock().unwrap().clone();
        drain(&subscriber, b'l', accepted.len(), Duration::from_secs(60)).await;
        let cpu = broker.cpu_seconds() - cpu0;
        let arrivals = subscriber.of_phase(b'l');
        let (missing, duplicates) = check_delivery(&accepted, &arrivals);
        let mut e2e: Vec<u64> = arrivals
            .iter()
            .map(|a| a.at_ns.saturating_sub(a.sent_ns))
            .collect();
        e2e.sort_unstable();
        let mut ingress = ingress_lat.lock().unwrap().clone();
        ingress.sort_unstable();
        println!(
            "latency at {} events/s for {:.1} s: sent {} in {send_secs:.1} s, accepted {}, delivered {}, missing {missing}, \
             duplicates {duplicates}, errors {}; broker CPU {:.2} cores",
            args.rate,
            args.latency_duration,
            total,
            accepted.len(),
            arrivals.len(),
            errors.load(Ordering::Relaxed),
            cpu / send_secs,
        );
        println!(
            "  end-to-end (send -> subscriber): p50 {}  p99 {}  max {}",
            ms(percentile(&e2e, 0.5)),
            ms(percentile(&e2e, 0.99)),
            ms(percentile(&e2e, 1.0)),
        );
        println!(
            "  ingress (send -> 202):           p50 {}  p99 {}  max {}",
            ms(percentile(&ingress, 0.5)),
            ms(percentile(&ingress, 0.99)),
            ms(percentile(&ingress, 1.0)),
        );
        p99 = Some(percentile(&e2e, 0.99));
    }

    if args.batch > 0 && !args.latency_only {
        let connections = (args.connections / 4).max(1);
        throughput(
            Some(&broker),
            &subscriber,
            addr,
            connections,
            args.duration,
            args.batch,
            b'b',
            "throughput",
        )
        .await?;
    }

    let mut ceiling = None;
    if args.relay && !args.latency_only {
        ceiling =
            Some(relay_ceiling(&subscriber, sub_addr, args.connections, args.duration).await?);
        // One hop: what the subscriber takes straight from the producers, the ceiling of delivery
        // alone (one POST per event) whatever the ingress does.
        let direct = throughput(
            None,
            &subscriber,
            sub_addr,
            args.connections,
            args.duration,
            0,
            b'd',
            "direct to the subscriber",
        )
        .await?;
        println!(
            "ceilings on this machine: two HTTP/1.1 hops per event (relay) {:.0} events/s, one hop {direct:.0} events/s",
            ceiling.unwrap_or(0.0)
        );
    }

    if let Some(rate) = headline {
        println!(
            "throughput vs target: {rate:.0} / {:.0} events/s = {:.2}x",
            TARGET_EVENTS_PER_SEC,
            rate / TARGET_EVENTS_PER_SEC
        );
        if let Some(ceiling) = ceiling {
            println!(
                "throughput vs relay ceiling: {rate:.0} / {ceiling:.0} events/s = {:.2}x; ceiling vs target: {:.2}x",
                rate / ceiling,
                ceiling / TARGET_EVENTS_PER_SEC
            );
        }
    }
    if let Some(p99) = p99 {
        println!(
            "p99 vs target at {}/s: {} / {} = {:.2}x (below 1 meets it)",
            args.rate,
            ms(p99),
            ms(TARGET_P99),
            p99.as_secs_f64() / TARGET_P99.as_secs_f64()
        );
    }
    drop(broker);
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}
