//! A revision's app for the serving tests and the cold-start benchmarks: an HTTP server on `$PORT`, as a
//! Knative container would run. It answers `hello from <K_REVISION>` and reports on request:
//!
//! - `?sleep_ms=N`: answer after N ms (for concurrency and burst tests);
//! - `/stats`: `{"in_flight", "max_in_flight", "requests", "boot", "healthz_ok", "healthz_failed",
//!   "served_before_healthy"}` as JSON (not counted). `boot` is a random number drawn at start, so a
//!   test can tell a restarted instance (a container's pid is always 1);
//! - `/crash`: exits with status 3 (for the crashing-instance test);
//! - `/env/NAME`: the value of the environment variable NAME;
//! - `/healthz`: 200 while healthy, else 503 (for HTTP readiness and liveness probes); `/sick` makes it
//!   fail from then on.
//!
//! Environment: `APP_STARTUP_MS` delays the listen, to stand for an app's own start-up time.
//! `APP_SLEEP_MS` is a default `sleep_ms` for every request; `APP_RECORD_FILE` names a file to which
//! the `ce-id` header of each answered request is appended, one per line (it outlives the app, for the
//! broker tests). `APP_BIND` is the address to listen on (default 127.0.0.1, as a local process must;
//! the test images set 0.0.0.0, since a container is reached on its own network address).
//! `APP_READY_AFTER_MS`: `/healthz` fails until that long after listening. `APP_HEALTHY_FOR_MS`: it
//! fails from that long after listening. `APP_READY_FILE`: a file created once listening (for exec
//! probes).
//!
//! A scratch image has no shell, so exec probes run this binary with a command instead of serving:
//! `sluice-test-app check-file PATH` (exit 0 if PATH exists) and `sluice-test-app get URL` (exit 0 on
//! a 2xx/3xx answer to a plain-HTTP GET).

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

struct State {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    requests: AtomicU64,
    boot: u64,
    listening_at: Instant,
    ready_after: Option<Duration>,
    healthy_for: Option<Duration>,
    sick: AtomicBool,
    healthz_ok: AtomicU64,
    healthz_failed: AtomicU64,
    /// Requests served before `/healthz` first answered 200: a readiness probe on `/healthz` that
    /// gates traffic keeps this at 0.
    served_before_healthy: AtomicU64,
}

impl State {
    fn healthy(&self) -> bool {
        let up = self.listening_at.elapsed();
        !self.sick.load(Ordering::SeqCst)
            && self.ready_after.is_none_or(|d| up >= d)
            && self.healthy_for.is_none_or(|d| up < d)
    }
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => serve(),
        ["check-file", path] => exit_with(std::path::Path::new(path).exists()),
        ["get", url] => exit_with(http_get_ok(url).unwrap_or(false)),
        _ => anyhow::bail!(
            "usage: sluice-test-app [check-file PATH | get http://HOST:PORT/PATH] (got {args:?})"
        ),
    }
}

fn exit_with(ok: bool) -> ! {
    std::process::exit(if ok { 0 } else { 1 })
}

/// A plain HTTP/1.0 GET with std only (the exec probe of a scratch image): true on 2xx or 3xx.
fn http_get_ok(url: &str) -> anyhow::Result<bool> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr: SocketAddr = authority.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    // "HTTP/1.1 200"
    let code = std::str::from_utf8(&head[9..12])?.parse::<u16>()?;
    Ok((200..400).contains(&code))
}

#[tokio::main(flavor = "current_thread")]
async fn serve() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .map_err(|_| anyhow::anyhow!("PORT is not set"))?
        .parse()?;
    if let Some(startup) = env_ms("APP_STARTUP_MS") {
        tokio::time::sleep(startup).await;
    }
    let revision = std::env::var("K_REVISION").unwrap_or_default();
    let bind: IpAddr = std::env::var("APP_BIND")
        .unwrap_or_else(|_| "127.0.0.1".to_string())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((bind, port))).await?;
    eprintln!("listening on {bind}:{port} as {revision:?}");
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
        ^ u64::from(std::process::id()).rotate_left(32);
    let state = Arc::new(State {
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        boot,
        listening_at: Instant::now(),
        ready_after: env_ms("APP_READY_AFTER_MS"),
        healthy_for: env_ms("APP_HEALTHY_FOR_MS"),
        sick: AtomicBool::new(false),
        healthz_ok: AtomicU64::new(0),
        healthz_failed: AtomicU64::new(0),
        served_before_healthy: AtomicU64::new(0),
    });
    if let Ok(file) = std::env::var("APP_READY_FILE") {
        let path = std::path::Path::new(&file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, b"ready\n")?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        let revision = revision.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone(), revision.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::new(Full::new(body.into()))
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    revision: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/stats" => {
            let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
            let body = serde_json::json!({
                "in_flight": load(&state.in_flight),
                "max_in_flight": load(&state.max_in_flight),
                "requests": load(&state.requests),
                "boot": state.boot,
                "healthz_ok": load(&state.healthz_ok),
                "healthz_failed": load(&state.healthz_failed),
                "served_before_healthy": load(&state.served_before_healthy),
            });
            return Ok(text(body.to_string()));
        }
        // Which process answered, so a test can tell that an instance was kept.
        "/pid" => return Ok(text(std::process::id().to_string())),
        "/crash" => {
            eprintln!("crashing on request");
            std::process::exit(3);
        }
        "/healthz" => {
            if state.healthy() {
                state.healthz_ok.fetch_add(1, Ordering::SeqCst);
                return Ok(text("ok"));
            }
            state.healthz_failed.fetch_add(1, Ordering::SeqCst);
            let mut resp = text("unhealthy");
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return Ok(resp);
        }
        "/sick" => {
            eprintln!("sick on request: /healthz fails from now on");
            state.sick.store(true, Ordering::SeqCst);
            return Ok(text("sick"));
        }
        _ => {}
    }
    if let Some(name) = path.strip_prefix("/env/") {
        let value = std::env::var(name).unwrap_or_default();
        return Ok(text(value));
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state.healthz_ok.load(Ordering::SeqCst) == 0 {
        state.served_before_healthy.fetch_add(1, Ordering::SeqCst);
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let sleep_ms = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")))
        .or(std::env::var("APP_SLEEP_MS").ok().as_deref())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
    if let (Ok(file), Some(id)) = (
        std::env::var("APP_RECORD_FILE"),
        req.headers().get("ce-id").and_then(|v| v.to_str().ok()),
    ) {
        // One write per line with O_APPEND: lines from concurrent requests never interleave.
        let line = format!("{id}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok(text(format!("hello from {revision}\n")))
}
