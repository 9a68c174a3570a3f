//! The HTTP echo backend (Knative's "runtime" test image): answers every request with a JSON description
//! of what it received, on HTTP/1.1 and h2c alike.
//!
//! Knobs, as query parameters (Knative's timeout image uses the same names):
//! - `initialTimeout=<ms>`: wait that long before sending the response headers;
//! - `timeout=<ms>`: send the headers and half the body, wait that long, then send the rest.
//!
//! [`EchoOptions::fail_first`] makes the first N requests fail with 503 (Knative's retry image).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode, Version};
use serde::{Deserialize, Serialize};

use super::{ServerTask, serve_http};
use crate::body::{ChannelBody, ResponseBody, channel, full};

/// What the echo backend answers: the request it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The backend's name.
    pub name: String,
    pub method: String,
    /// Path and query, as received.
    pub url: String,
    pub path: String,
    /// The Host header (HTTP/1.1) or :authority (HTTP/2).
    pub host: String,
    /// Request headers, names lowercased; repeated headers joined with ",".
    pub headers: BTreeMap<String, String>,
    /// "HTTP/1.1" or "HTTP/2.0", as Go's `Request.Proto` says it.
    pub proto: String,
}

impl Echo {
    /// A request header the backend saw (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Default)]
pub struct EchoOptions {
    /// Answer the first N requests with 503.
    pub fail_first: usize,
}

struct Shared {
    name: String,
    requests: AtomicU64,
    fail_remaining: AtomicUsize,
}

/// A running echo backend; stops on Drop.
pub struct EchoServer {
    shared: Arc<Shared>,
    server: ServerTask,
}

impl EchoServer {
    pub async fn start(name: &str) -> Result<EchoServer> {
        Self::start_with(name, EchoOptions::default()).await
    }

    pub async fn start_with(name: &str, options: EchoOptions) -> Result<EchoServer> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            fail_remaining: AtomicUsize::new(options.fail_first),
        });
        let for_server = shared.clone();
        let server = ServerTask::start(move |stream| {
            let shared = for_server.clone();
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            serve_http(stream, service)
        })
        .await?;
        Ok(EchoServer { shared, server })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// How many requests reached this backend.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let failing = shared
        .fail_remaining
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full(format!(
                "{}: failing this request on purpose\n",
                shared.name
            )))
            .expect("static response"));
    }

    let query = parse_query(req.uri().query().unwrap_or_default());
    let initial_delay = query_millis(&query, "initialTimeout");
    let mid_body_delay = query_millis(&query, "timeout");

    let echo = describe(&shared.name, &req);
    let json = serde_json::to_vec(&echo).expect("an Echo serializes");

    if let Some(delay) = initial_delay {
        tokio::time::sleep(delay).await;
    }
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    let body = match mid_body_delay {
        None => full(json),
        Some(delay) => {
            let (tx, body) = ChannelBody::new(2);
            let json = Bytes::from(json);
            let half = json.len() / 2;
            tokio::spawn(async move {
                if tx.send(Frame::data(json.slice(..half))).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                let _ = tx.send(Frame::data(json.slice(half..))).await;
            });
            channel(body)
        }
    };
    Ok(builder.body(body).expect("valid response parts"))
}

fn describe<B>(name: &str, req: &Request<B>) -> Echo {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|existing| {
                existing.push(',');
                existing.push_str(&v);
            })
            .or_insert(v);
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| headers.get("host").cloned())
        .unwrap_or_default();
    Echo {
        name: name.to_string(),
        method: req.method().to_string(),
        url: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".to_string()),
        path: req.uri().path().to_string(),
        host,
        headers,
        proto: proto_name(req.version()).to_string(),
    }
}

/// Go's names for protocol versions (`Request.Proto`).
pub fn proto_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

fn query_millis(query: &BTreeMap<String, String>, key: &str) -> Option<Duration> {
    query
        .get(key)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_knobs_parse_milliseconds() {
        let q = parse_query("initialTimeout=1500&timeout=&x");
        assert_eq!(
            query_millis(&q, "initialTimeout"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(query_millis(&q, "timeout"), None);
        assert_eq!(query_millis(&q, "x"), None);
    }

    #[test]
    fn describe_joins_repeated_headers_and_reads_authority() {
        let req = Request::get("http://svc.example.com/a/b?c=d")
            .header("X-One", "1")
            .header("X-One", "2")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let echo = describe("blue", &req);
        assert_eq!(echo.header("x-one"), Some("1,2"));
        assert_eq!(echo.host, "svc.example.com");
        assert_eq!(echo.url, "/a/b?c=d");
        assert_eq!(echo.path, "/a/b");
        assert_eq!(echo.proto, "HTTP/2.0");
    }
}
