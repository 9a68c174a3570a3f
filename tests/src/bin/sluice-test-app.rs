//! A revision's app for the serving tests and the cold-start benchmark: an HTTP server on `$PORT`, as a
//! Knative container would run. It answers `hello from <K_REVISION>` and reports on request:
//!
//! - `?sleep_ms=N`: answer after N ms (for concurrency and burst tests);
//! - `/stats`: `{"in_flight": n, "max_in_flight": m, "requests": r}` as JSON (not counted);
//! - `/crash`: exits with status 3 (for the crashing-instance test);
//! - `/env/NAME`: the value of the environment variable NAME.
//!
//! `APP_STARTUP_MS` delays the listen, to stand for an app's own start-up time. `APP_SLEEP_MS` is a
//! default `sleep_ms` for every request; `APP_RECORD_FILE` names a file to which the `ce-id` header
//! of each answered request is appended, one per line (it outlives the app, for the broker tests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Default)]
struct Counters {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    requests: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .map_err(|_| anyhow::anyhow!("PORT is not set"))?
        .parse()?;
    if let Some(ms) = std::env::var("APP_STARTUP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let revision = std::env::var("K_REVISION").unwrap_or_default();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    eprintln!("listening on 127.0.0.1:{port} as {revision:?}");
    let counters = Arc::new(Counters::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let counters = counters.clone();
        let revision = revision.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, counters.clone(), revision.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    counters: Arc<Counters>,
    revision: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/stats" {
        let body = serde_json::json!({
            "in_flight": counters.in_flight.load(Ordering::SeqCst),
            "max_in_flight": counters.max_in_flight.load(Ordering::SeqCst),
            "requests": counters.requests.load(Ordering::SeqCst),
        });
        return Ok(Response::new(Full::new(Bytes::from(body.to_string()))));
    }
    // Which process answered, so a test can tell that an instance was kept.
    if path == "/pid" {
        return Ok(Response::new(Full::new(Bytes::from(
            std::process::id().to_string(),
        ))));
    }
    if path == "/crash" {
        eprintln!("crashing on request");
        std::process::exit(3);
    }
    if let Some(name) = path.strip_prefix("/env/") {
        let value = std::env::var(name).unwrap_or_default();
        return Ok(Response::new(Full::new(Bytes::from(value))));
    }
    counters.requests.fetch_add(1, Ordering::SeqCst);
    let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
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
        use std::io::Write;
        // One write per line with O_APPEND: lines from concurrent requests never interleave.
        let line = format!("{id}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello from {revision}\n"
    )))))
}
