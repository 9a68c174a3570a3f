//! Eventing benchmark (the broker issue): events/s from ingress to delivery with a fast local
//! subscriber, and end-to-end latency at a fixed rate, for each backend a Broker can keep its events
//! in (`--backends`): the embedded log (202 only after fsync) and RabbitMQ (202 only after RabbitMQ
//! confirmed the publish) with one or more `sluice broker` replicas sharing its queues.
//!
//! For each backend, starts the real `sluice broker` process(es) fresh on a temp folder holding one
//! Broker and one Trigger whose subscriber is a hyper HTTP/1.1 server inside this process (answers
//! 202 at once and records when each event id arrived), waits until a probe event is delivered, runs
//! the phases below and stops the processes. RabbitMQ backends share one private node started by the
//! bench (eventing/broker/tests/support/rabbitmq.rs), each backend in a fresh vhost so its queues
//! start empty. Producers are keep-alive HTTP/1.1 connections POSTing binary-mode CloudEvents whose
//! `ce-id` is `<phase>-<seq>-<send time in ns since the bench started>`, spread over the replicas'
//! ingress addresses.
//!
//! 1. throughput: a closed loop of `--connections` producers for `--duration` seconds: events/s
//!    accepted (202) and delivered, and a check that every accepted event was delivered;
//! 2. latency: an open loop at `--rate` events/s for `--latency-duration` seconds: p50/p99/max from
//!    the intended send time to the subscriber's receipt (so a stalled producer counts against the
//!    broker, no coordinated omission), and the ingress 202 latency; p99 of the first and of the
//!    second half of the run (by intended send time) and per second, to show a growing backlog;
//! 3. (with `--batch N`) the closed loop again with `application/cloudevents-batch+json` POSTs of N
//!    events each;
//! 4. (with `--relay`, once per run, after the backends) the closed loop of phase 1 through a
//!    minimal relay instead of the broker: a separate process (this binary with `--relay-listen`),
//!    with the broker's thread count, that forwards each POST over its own keep-alive connection to
//!    the same subscriber and answers 202 when the subscriber has. No log, no fsync, no CloudEvents
//!    parsing: the ceiling of any broker that takes one HTTP/1.1 request per event and makes one per
//!    delivery, on this machine. Then the one-hop ceiling: producers straight to the subscriber.
//!
//! CPU is shown per phase for the broker (the sum over replicas), RabbitMQ (every process of the
//! node's process group: beam.smp and its helpers) and this process (producers and subscriber), as
//! they all share the machine. The run ends with a summary table of the backends, as ratios of the
//! relay ceiling and of the log, and whether the targets are met.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

// The broker tests' private RabbitMQ node (std only). Neither formatted nor linted from here: it
// belongs to the broker's tests, whose own fmt and clippy runs check it.
#[rustfmt::skip]
#[allow(clippy::all)]
#[path = "../../../eventing/broker/tests/support/rabbitmq.rs"]
mod rabbitmq;

use rabbitmq::RabbitNode;

#[derive(Parser)]
struct Args {
    /// The `sluice` binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Backends to measure, in this order: `log` (the embedded log), `rabbitmq` (a RabbitMQ Broker
    /// served by one `sluice broker`), `rabbitmqN` (N replicas sharing its queues, e.g. `rabbitmq2`).
    #[arg(long, value_delimiter = ',', default_value = "log")]
    backends: Vec<Backend>,
    /// `spec.queueType` of the RabbitmqBrokerConfig: quorum (Knative's default) or classic.
    #[arg(long, default_value = "quorum")]
    queue_type: String,
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
    /// Connections per ingress at most in the latency phase (events wait for a free one when the
    /// broker falls behind, rather than opening thousands).
    #[arg(long, default_value_t = 256)]
    latency_connections: usize,
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

/// Where the Broker under test keeps its events.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Log,
    /// RabbitMQ, with this many `sluice broker` replicas.
    RabbitMq(usize),
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "log" => Ok(Backend::Log),
            "rabbitmq" => Ok(Backend::RabbitMq(1)),
            other => match other.strip_prefix("rabbitmq").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(Backend::RabbitMq(n)),
                _ => Err(format!(
                    "unknown backend {other:?}: want log, rabbitmq or rabbitmqN (N replicas)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Log => f.write_str("log"),
            Backend::RabbitMq(1) => f.write_str("rabbitmq"),
            Backend::RabbitMq(n) => write!(f, "rabbitmq{n}"),
        }
    }
}

impl Backend {
    fn replicas(self) -> usize {
        match self {
            Backend::Log => 1,
            Backend::RabbitMq(n) => n,
        }
    }

    fn describe(self) -> String {
        match self {
            Backend::Log => "embedded log (202 after fsync), 1 sluice broker".into(),
            Backend::RabbitMq(1) => {
                "RabbitMQ (202 after the publish confirm), 1 sluice broker".into()
            }
            Backend::RabbitMq(n) => format!(
                "RabbitMQ (202 after the publish confirm), {n} sluice broker replicas sharing the queues"
            ),
        }
    }
}

/// Targets from the issue.
const TARGET_EVENTS_PER_SEC: f64 = 50_000.0;
const TARGET_P99: Duration = Duration::from_millis(10);
/// RabbitMQ's throughput against the embedded log's.
const TARGET_RABBITMQ_VS_LOG: f64 = 0.5;
/// A backlog grows when the second half's p99 is more than this times the first half's...
const BACKLOG_RATIO: f64 = 2.0;
/// ...and more than this.
const BACKLOG_MIN: Duration = Duration::from_millis(5);
/// A backlog grows too when fewer events/s than this share of the rate are delivered (from the
/// first send to the last arrival).
const KEEP_UP: f64 = 0.95;

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

    /// Forgets every arrival (between backends, once the previous backend's processes are gone).
    fn reset(&self) {
        self.arrivals.lock().unwrap().clear();
        for count in &self.per_phase {
            count.store(0, Ordering::Relaxed);
        }
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
        proc_stat(self.0.id()).map_or(0.0, |s| s.cpu_seconds)
    }
}

/// What /proc/<pid>/stat says about a process.
struct ProcStat {
    pgrp: u32,
    cpu_seconds: f64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: state is the 1st, pgrp the 3rd, utime the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ProcStat {
        pgrp: fields.get(2)?.parse().ok()?,
        cpu_seconds: (ticks(11) + ticks(12)) / hz,
    })
}

/// User+system CPU seconds of the RabbitMQ node so far: every live process of its process group
/// (beam.smp, erl_child_setup, ...), whose id the harness keeps in the node folder's `pgid`.
fn rabbit_cpu_seconds(node: &RabbitNode) -> f64 {
    let Some(pgid) = std::fs::read_to_string(node.dir().join("pgid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .filter(|s| s.pgrp == pgid)
        .map(|s| s.cpu_seconds)
        .sum()
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

/// The processes whose CPU a phase reports: the broker replicas (or the relay), and RabbitMQ.
#[derive(Clone, Copy)]
struct Meters<'a> {
    servers: &'a [ServerProcess],
    rabbit: Option<&'a RabbitNode>,
}

/// CPU seconds used so far.
#[derive(Clone, Copy, Default)]
struct Cpu {
    servers: f64,
    rabbit: f64,
    own: f64,
}

impl Meters<'_> {
    fn sample(&self) -> Cpu {
        Cpu {
            servers: self.servers.iter().map(ServerProcess::cpu_seconds).sum(),
            rabbit: self.rabbit.map_or(0.0, rabbit_cpu_seconds),
            own: own_cpu_seconds(),
        }
    }

    /// Cores used since `before` over `secs` seconds, as text for a phase line.
    fn cores_since(&self, before: Cpu, secs: f64) -> (Cpu, String) {
        let now = self.sample();
        let cores = Cpu {
            servers: (now.servers - before.servers) / secs,
            rabbit: (now.rabbit - before.rabbit) / secs,
            own: (now.own - before.own) / secs,
        };
        let mut text = match self.servers.len() {
            0 => String::new(),
            1 => format!("server CPU {:.2} cores, ", cores.servers),
            n => format!("server CPU {:.2} cores (sum of {n}), ", cores.servers),
        };
        if self.rabbit.is_some() {
            let _ = write!(text, "RabbitMQ CPU {:.2} cores, ", cores.rabbit);
        }
        let _ = write!(text, "bench CPU {:.2} cores", cores.own);
        (cores, text)
    }
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

/// Closed loop: `connections` producers, spread round-robin over `addrs`, each keep one POST in
/// flight until `duration` has passed.
async fn closed_loop(
    addrs: &[SocketAddr],
    connections: usize,
    duration: Duration,
    batch: usize,
    phase: char,
) -> anyhow::Result<Closed> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..connections {
        let addr = addrs[i % addrs.len()];
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

/// What a throughput phase measured.
#[derive(Clone, Copy)]
struct Throughput {
    /// Delivered events/s (at most the accepted rate).
    delivered: f64,
    /// Cores used during the phase.
    cores: Cpu,
    missing: usize,
    duplicates: usize,
}

/// One closed-loop throughput phase (binary events when `batch` is 0, else batch POSTs), drained and
/// checked; prints its line.
#[allow(clippy::too_many_arguments)]
async fn throughput(
    meters: Meters<'_>,
    subscriber: &Subscriber,
    addrs: &[SocketAddr],
    connections: usize,
    duration: f64,
    batch: usize,
    phase: u8,
    name: &str,
) -> anyhow::Result<Throughput> {
    let cpu0 = meters.sample();
    let run = closed_loop(
        addrs,
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
    let arrivals = subscriber.of_phase(phase);
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
    // CPU over the send time and the drain.
    let (cores, cpu_text) = meters.cores_since(cpu0, span.max(secs));
    let (missing, duplicates) = check_delivery(&run.accepted, &arrivals);
    let mode = if batch == 0 {
        "binary".to_string()
    } else {
        format!("batch of {batch}")
    };
    let spread = match addrs.len() {
        1 => String::new(),
        n => format!(" over {n} ingresses"),
    };
    println!(
        "{name} ({mode}, {connections} connections{spread}, drained in {:.2} s): accepted {} in {secs:.1} s = \
         {accepted_rate:.0} events/s; delivered {} = {delivered_rate:.0} events/s; missing {missing}, duplicates \
         {duplicates}, non-202 {}; {cpu_text}",
        waited.as_secs_f64(),
        run.accepted.len(),
        arrivals.len(),
        run.errors,
    );
    Ok(Throughput {
        delivered: delivered_rate.min(accepted_rate),
        cores,
        missing,
        duplicates,
    })
}

/// What the latency phase measured (end to end, send -> subscriber).
#[derive(Clone, Copy)]
struct Latency {
    rate: u64,
    p50: Duration,
    p99: Duration,
    /// p99 of the events whose intended send time is in the first / second half of the run.
    p99_first: Duration,
    p99_second: Duration,
    /// Events delivered per second from the first intended send to the last arrival.
    delivered_rate: f64,
    cores: Cpu,
    missing: usize,
    duplicates: usize,
}

impl Latency {
    /// Why the run shows a growing backlog, if it does: the second half's p99 well above the
    /// first's, or deliveries that did not keep up with the rate at all (then the backlog is there
    /// from the first second, and both halves are already high).
    fn backlog(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.p99_second > BACKLOG_MIN
            && self.p99_second.as_secs_f64() > BACKLOG_RATIO * self.p99_first.as_secs_f64()
        {
            why.push(format!(
                "second half's p99 > {BACKLOG_RATIO}x the first's and > {}",
                ms(BACKLOG_MIN)
            ));
        }
        if self.delivered_rate < KEEP_UP * self.rate as f64 {
            why.push(format!(
                "delivered {:.0} events/s < {KEEP_UP}x the {}/s sent",
                self.delivered_rate, self.rate
            ));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

fn sorted_latencies<'a>(arrivals: impl Iterator<Item = &'a Arrival>) -> Vec<u64> {
    let mut v: Vec<u64> = arrivals
        .map(|a| a.at_ns.saturating_sub(a.sent_ns))
        .collect();
    v.sort_unstable();
    v
}

/// The keep-alive connections to one ingress: idle ones, and a limit on those in use.
struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    in_use: tokio::sync::Semaphore,
}

/// Phase 2: an open loop at `rate` events/s; event `seq` goes to `addrs[seq % addrs.len()]`, each
/// address with its own pool of keep-alive connections, at most `max_connections` of them (an
/// event waiting for one is late from its intended send time, which is what it is measured from).
async fn latency(
    meters: Meters<'_>,
    subscriber: &Subscriber,
    addrs: &[SocketAddr],
    rate: u64,
    duration: f64,
    max_connections: usize,
) -> anyhow::Result<Latency> {
    let cpu0 = meters.sample();
    let total = (rate as f64 * duration) as u64;
    let mut pools = Vec::new();
    let max_connections = max_connections.max(1);
    let opened = 64usize.div_ceil(addrs.len()).clamp(1, max_connections);
    for &addr in addrs {
        let mut idle = Vec::new();
        for _ in 0..opened {
            idle.push(connect(addr).await?);
        }
        pools.push(Arc::new(Pool {
            addr,
            idle: Mutex::new(idle),
            in_use: tokio::sync::Semaphore::new(max_connections),
        }));
    }
    let ingress_lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let accepted = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let start_ns = now_ns();
    let mut tasks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let offset = Duration::from_secs_f64(seq as f64 / rate as f64);
        tokio::time::sleep_until(start + offset).await;
        // The intended send time, not when the task got to run.
        let intended = start_ns + offset.as_nanos() as u64;
        let pool = pools[seq as usize % pools.len()].clone();
        let (ingress_lat, accepted, errors) =
            (ingress_lat.clone(), accepted.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = pool.in_use.acquire().await else {
                return;
            };
            let addr = pool.addr;
            let taken = pool.idle.lock().unwrap().pop();
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
                    pool.idle.lock().unwrap().push(conn);
                }
                Ok(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    pool.idle.lock().unwrap().push(conn);
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let generated_secs = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let accepted = accepted.lock().unwrap().clone();
    let waited = drain(subscriber, b'l', accepted.len(), Duration::from_secs(60)).await;
    let (cores, cpu_text) = meters.cores_since(cpu0, send_secs);
    let arrivals = subscriber.of_phase(b'l');
    let (missing, duplicates) = check_delivery(&accepted, &arrivals);
    let e2e = sorted_latencies(arrivals.iter());
    let half_ns = start_ns + (duration * 0.5 * 1e9) as u64;
    let first = sorted_latencies(arrivals.iter().filter(|a| a.sent_ns < half_ns));
    let second = sorted_latencies(arrivals.iter().filter(|a| a.sent_ns >= half_ns));
    let last_at = arrivals.iter().map(|a| a.at_ns).max().unwrap_or(start_ns);
    let delivered_secs = Duration::from_nanos(last_at.saturating_sub(start_ns)).as_secs_f64();
    let mut ingress = ingress_lat.lock().unwrap().clone();
    ingress.sort_unstable();
    let spread = match addrs.len() {
        1 => String::new(),
        n => format!(" over {n} ingresses"),
    };
    let result = Latency {
        rate,
        p50: percentile(&e2e, 0.5),
        p99: percentile(&e2e, 0.99),
        p99_first: percentile(&first, 0.99),
        p99_second: percentile(&second, 0.99),
        delivered_rate: arrivals.len() as f64 / delivered_secs.max(1e-9),
        cores,
        missing,
        duplicates,
    };
    println!(
        "latency at {rate} events/s for {duration:.1} s{spread} (at most {max_connections} connections per ingress): \
         sent {total} in {generated_secs:.1} s, all answered after {send_secs:.1} s, accepted {}, delivered {} = {:.0} \
         events/s (drained in {:.2} s), missing {missing}, duplicates {duplicates}, errors {}; {cpu_text}",
        accepted.len(),
        arrivals.len(),
        result.delivered_rate,
        waited.as_secs_f64(),
        errors.load(Ordering::Relaxed),
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
    // p99 per second of intended send time: a backlog that grows shows as a rising line.
    let seconds = duration.ceil().max(1.0) as u64;
    let per_second: Vec<String> = (0..seconds)
        .map(|s| {
            let (from, to) = (
                start_ns + s * 1_000_000_000,
                start_ns + (s + 1) * 1_000_000_000,
            );
            let lat = sorted_latencies(
                arrivals
                    .iter()
                    .filter(|a| a.sent_ns >= from && a.sent_ns < to),
            );
            format!("{:.1}", percentile(&lat, 0.99).as_secs_f64() * 1000.0)
        })
        .collect();
    println!(
        "  end-to-end p99 first half {}, second half {}; per second (ms): {}{}",
        ms(result.p99_first),
        ms(result.p99_second),
        per_second.join(" "),
        result
            .backlog()
            .map(|why| format!("  <-- BACKLOG GROWS: {why}"))
            .unwrap_or_default(),
    );
    Ok(result)
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

/// Phase 4: the closed loop through the relay.
async fn relay_ceiling(
    subscriber: &Subscriber,
    sub_addr: SocketAddr,
    connections: usize,
    duration: f64,
) -> anyhow::Result<Throughput> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let relay = [ServerProcess(
        Command::new(std::env::current_exe()?)
            .arg("--relay-listen")
            .arg(addr.to_string())
            .arg("--relay-to")
            .arg(sub_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the relay")?,
    )];
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the relay did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meters = Meters {
        servers: &relay,
        rabbit: None,
    };
    throughput(
        meters,
        subscriber,
        &[addr],
        connections,
        duration,
        0,
        b'r',
        "relay ceiling",
    )
    .await
}

/// What one backend measured.
struct BackendResult {
    backend: Backend,
    binary: Option<Throughput>,
    batch: Option<Throughput>,
    latency: Option<Latency>,
}

impl BackendResult {
    /// Accepted events that never arrived, and duplicates, over every phase.
    fn lost_and_duplicated(&self) -> (usize, usize) {
        let t = [self.binary, self.batch]
            .into_iter()
            .flatten()
            .map(|t| (t.missing, t.duplicates));
        let l = self.latency.map(|l| (l.missing, l.duplicates));
        t.chain(l).fold((0, 0), |(m, d), (m2, d2)| (m + m2, d + d2))
    }
}

/// The YAML of one Broker (`bench/default`) of `backend` with one Trigger to the subscriber.
fn bench_yaml(
    backend: Backend,
    sub_addr: SocketAddr,
    amqp: Option<&str>,
    queue_type: &str,
) -> String {
    let trigger = format!(
        "apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: fast, namespace: bench}}
spec:
  broker: default
  subscriber: {{uri: 'http://{sub_addr}/'}}
"
    );
    match (backend, amqp) {
        (Backend::RabbitMq(_), Some(uri)) => format!(
            "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
  namespace: bench
  annotations: {{eventing.knative.dev/broker.class: RabbitMQBroker}}
spec:
  config: {{apiVersion: eventing.knative.dev/v1alpha1, kind: RabbitmqBrokerConfig, name: rabbitmq}}
---
apiVersion: eventing.knative.dev/v1alpha1
kind: RabbitmqBrokerConfig
metadata: {{name: rabbitmq, namespace: bench}}
spec:
  rabbitmqClusterReference: {{connectionSecret: {{name: rabbitmq}}}}
  queueType: {queue_type}
---
apiVersion: v1
kind: Secret
metadata: {{name: rabbitmq, namespace: bench}}
stringData: {{uri: \"{uri}\", username: guest, password: guest}}
---
{trigger}"
        ),
        _ => format!(
            "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: bench}}
---
{trigger}"
        ),
    }
}

fn spawn_broker(
    args: &Args,
    config: &Path,
    data: &Path,
    addr: SocketAddr,
) -> anyhow::Result<ServerProcess> {
    let mut command = Command::new(&args.sluice);
    command.arg("broker");
    if let Some(p) = args.delivery_parallelism {
        command.arg(format!("--delivery-parallelism={p}"));
    }
    Ok(ServerProcess(
        command
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(addr.to_string())
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.sluice.display()))?,
    ))
}

/// How many consumers the Trigger's queue has in `vhost` (0 while it does not exist).
fn queue_consumers(node: &RabbitNode, vhost: &str) -> usize {
    let out = node.rabbitmqctl(&["--silent", "-p", vhost, "list_queues", "name", "consumers"]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, consumers) = (f.next()?, f.next()?);
            if name != "sluice.trigger.bench.fast" {
                return None;
            }
            consumers.parse::<usize>().ok()
        })
        .sum()
}

/// Starts `backend`'s broker process(es), waits until they deliver, runs the phases, stops them.
async fn measure_backend(
    args: &Args,
    backend: Backend,
    subscriber: &Subscriber,
    sub_addr: SocketAddr,
    root: &Path,
    node: Option<&RabbitNode>,
) -> anyhow::Result<BackendResult> {
    println!("== backend {backend}: {}", backend.describe());
    let folder = root.join(backend.to_string());
    let config = folder.join("config");
    std::fs::create_dir_all(&config)?;
    // RabbitMQ: a fresh vhost, so that the queues start empty.
    let vhost = format!("bench-{backend}");
    let (amqp, node) = match (backend, node) {
        (Backend::RabbitMq(_), Some(node)) => {
            tokio::task::block_in_place(|| {
                node.rabbitmqctl(&["add_vhost", &vhost]);
                node.rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
            });
            (
                Some(format!("amqp://127.0.0.1:{}/{vhost}", node.amqp_port())),
                Some(node),
            )
        }
        (Backend::RabbitMq(_), None) => bail!("no RabbitMQ node for {backend}"),
        (Backend::Log, _) => (None, None),
    };
    std::fs::write(
        config.join("bench.yaml"),
        bench_yaml(backend, sub_addr, amqp.as_deref(), &args.queue_type),
    )?;
    let mut addrs = Vec::new();
    let mut brokers = Vec::new();
    for i in 0..backend.replicas() {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        brokers.push(spawn_broker(
            args,
            &config,
            &folder.join(format!("data-{i}")),
            addr,
        )?);
        addrs.push(addr);
    }

    // Ready when every replica accepted a probe (RabbitMQ: 503 until connected and declared), a
    // probe reached the subscriber (the log's Trigger starts at the log head, so probes sent before
    // it exists are never delivered), and with RabbitMQ every replica consumes the Trigger's queue.
    let ready_start = Instant::now();
    let mut probe = 0u64;
    let mut accepting = vec![false; addrs.len()];
    loop {
        if accepting.iter().all(|a| *a) && subscriber.count_phase(b'p') > 0 {
            let consumers = match node {
                Some(node) => tokio::task::block_in_place(|| queue_consumers(node, &vhost)),
                None => 1,
            };
            if consumers >= brokers.len() {
                break;
            }
        }
        if ready_start.elapsed() > Duration::from_secs(60) {
            bail!("{backend}: the broker did not deliver a probe event within 60 s");
        }
        for (i, &addr) in addrs.iter().enumerate() {
            if let Ok(mut c) = connect(addr).await
                && let Ok(StatusCode::ACCEPTED) =
                    send(&mut c, binary_event(addr, 'p', probe, now_ns())).await
            {
                accepting[i] = true;
            }
            probe += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let addr_list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    println!(
        "broker ready after {:.1} s (ingress {}, subscriber {sub_addr}, data {}{})",
        ready_start.elapsed().as_secs_f64(),
        addr_list.join(" "),
        folder.display(),
        amqp.map(|a| format!(", {a}")).unwrap_or_default(),
    );

    let meters = Meters {
        servers: &brokers,
        rabbit: node,
    };
    let mut result = BackendResult {
        backend,
        binary: None,
        batch: None,
        latency: None,
    };
    if !args.latency_only {
        result.binary = Some(
            throughput(
                meters,
                subscriber,
                &addrs,
                args.connections,
                args.duration,
                0,
                b't',
                "throughput",
            )
            .await?,
        );
    }
    if !args.throughput_only {
        result.latency = Some(
            latency(
                meters,
                subscriber,
                &addrs,
                args.rate,
                args.latency_duration,
                args.latency_connections,
            )
            .await?,
        );
    }
    if args.batch > 0 && !args.latency_only {
        let connections = (args.connections / 4).max(1);
        result.batch = Some(
            throughput(
                meters,
                subscriber,
                &addrs,
                connections,
                args.duration,
                args.batch,
                b'b',
                "throughput",
            )
            .await?,
        );
    }
    drop(brokers);
    Ok(result)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let subscriber = Arc::new(Subscriber::default());
    let sub_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sub_addr = sub_listener.local_addr()?;
    tokio::spawn(serve_subscriber(sub_listener, subscriber.clone()));
    let dir = tempfile::tempdir()?;

    let mut node: Option<RabbitNode> = None;
    let mut results = Vec::new();
    for (i, &backend) in args.backends.iter().enumerate() {
        if matches!(backend, Backend::RabbitMq(_)) && node.is_none() {
            let started = Instant::now();
            let n = tokio::task::block_in_place(|| RabbitNode::start("bench"));
            let version = tokio::task::block_in_place(|| n.rabbitmqctl(&["--silent", "version"]));
            println!(
                "== RabbitMQ {} node {} (AMQP 127.0.0.1:{}) started in {:.1} s",
                version.trim().trim_matches('"'),
                n.node_name(),
                n.amqp_port(),
                started.elapsed().as_secs_f64()
            );
            node = Some(n);
        }
        subscriber.reset();
        results.push(
            measure_backend(
                &args,
                backend,
                &subscriber,
                sub_addr,
                dir.path(),
                node.as_ref(),
            )
            .await?,
        );
        // Stop the node as soon as no later backend needs it: its idle CPU would weigh on the rest.
        if node.is_some()
            && !args.backends[i + 1..]
                .iter()
                .any(|b| matches!(b, Backend::RabbitMq(_)))
        {
            tokio::task::block_in_place(|| drop(node.take()));
        }
    }
    subscriber.reset();

    let mut ceiling = None;
    if args.relay && !args.latency_only {
        println!("== ceilings of this machine (no broker)");
        let relay = relay_ceiling(&subscriber, sub_addr, args.connections, args.duration).await?;
        // One hop: what the subscriber takes straight from the producers, the ceiling of delivery
        // alone (one POST per event) whatever the ingress does.
        let direct = throughput(
            Meters {
                servers: &[],
                rabbit: None,
            },
            &subscriber,
            &[sub_addr],
            args.connections,
            args.duration,
            0,
            b'd',
            "direct to the subscriber",
        )
        .await?;
        println!(
            "ceilings on this machine: two HTTP/1.1 hops per event (relay) {:.0} events/s, one hop {:.0} events/s",
            relay.delivered, direct.delivered
        );
        ceiling = Some(relay.delivered);
    }

    summary(&args, &results, ceiling);
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}

/// The table of the backends and the targets.
fn summary(args: &Args, results: &[BackendResult], ceiling: Option<f64>) {
    let log = results.iter().find(|r| r.backend == Backend::Log);
    let ratio = |x: Option<f64>, of: Option<f64>| match (x, of) {
        (Some(x), Some(of)) if of > 0.0 => format!("{:.2}x", x / of),
        _ => "-".to_string(),
    };
    let rate = |t: Option<Throughput>| t.map_or("-".to_string(), |t| format!("{:.0}", t.delivered));
    let cores = |c: Option<Cpu>, rabbit: bool| {
        c.map_or("-".to_string(), |c| {
            if rabbit {
                format!("{:.2} + {:.2}", c.servers, c.rabbit)
            } else {
                format!("{:.2}", c.servers)
            }
        })
    };
    println!();
    println!(
        "== summary: delivered events/s, closed loop ({} connections; batch of {}), and end-to-end latency at {}/s; \
         relay ceiling {}",
        args.connections,
        args.batch,
        args.rate,
        ceiling.map_or("not measured (--relay)".to_string(), |c| format!(
            "{c:.0} events/s"
        ))
    );
    println!(
        "| backend | binary/s | x relay | x log | batch/s | x relay | x log | p50 | p99 | p99 1st / 2nd half | \
         CPU binary (broker + RabbitMQ) | CPU at {}/s | lost / dup |",
        args.rate
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let rabbit = matches!(r.backend, Backend::RabbitMq(_));
        let binary = r.binary.map(|t| t.delivered);
        let batch = r.batch.map(|t| t.delivered);
        let (lost, dup) = r.lost_and_duplicated();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {lost} / {dup} |",
            r.backend,
            rate(r.binary),
            ratio(binary, ceiling),
            ratio(binary, log.and_then(|l| l.binary.map(|t| t.delivered))),
            rate(r.batch),
            ratio(batch, ceiling),
            ratio(batch, log.and_then(|l| l.batch.map(|t| t.delivered))),
            r.latency.map_or("-".to_string(), |l| ms(l.p50)),
            r.latency.map_or("-".to_string(), |l| ms(l.p99)),
            r.latency.map_or("-".to_string(), |l| format!(
                "{} / {}",
                ms(l.p99_first),
                ms(l.p99_second)
            )),
            cores(r.binary.map(|t| t.cores), rabbit),
            cores(r.latency.map(|l| l.cores), rabbit),
        );
    }
    println!("targets:");
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    for r in results {
        let mut checks = Vec::new();
        if let Some(l) = r.latency {
            checks.push(format!(
                "p99 at {}/s {} < {}: {}",
                args.rate,
                ms(l.p99),
                ms(TARGET_P99),
                verdict(l.p99 < TARGET_P99)
            ));
            checks.push(format!(
                "no backlog growth (p99 halves {} / {}, delivered {:.0}/s): {}",
                ms(l.p99_first),
                ms(l.p99_second),
                l.delivered_rate,
                verdict(l.backlog().is_none())
            ));
        }
        match r.backend {
            Backend::Log => {
                if let Some(t) = r.binary {
                    checks.push(format!(
                        "binary {:.0} / {TARGET_EVENTS_PER_SEC:.0} events/s = {:.2}x (the log's own target): {}",
                        t.delivered,
                        t.delivered / TARGET_EVENTS_PER_SEC,
                        verdict(t.delivered >= TARGET_EVENTS_PER_SEC)
                    ));
                }
            }
            Backend::RabbitMq(_) => {
                let pairs = [
                    ("binary", r.binary, log.and_then(|l| l.binary)),
                    ("batch", r.batch, log.and_then(|l| l.batch)),
                ];
                for (what, mine, logs) in pairs {
                    if let (Some(mine), Some(logs)) = (mine, logs) {
                        let x = mine.delivered / logs.delivered.max(1e-9);
                        checks.push(format!(
                            "{what} {x:.2}x the log's >= {TARGET_RABBITMQ_VS_LOG}x: {}",
                            verdict(x >= TARGET_RABBITMQ_VS_LOG)
                        ));
                    }
                }
            }
        }
        let (lost, dup) = r.lost_and_duplicated();
        checks.push(format!(
            "every accepted event delivered once ({lost} lost, {dup} duplicates): {}",
            verdict(lost == 0 && dup == 0)
        ));
        println!("  {}: {}", r.backend, checks.join("; "));
    }
}
