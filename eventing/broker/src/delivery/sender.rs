//! The HTTP side of delivery: one attempt with a timeout over a [`Transport`], and the retry loop
//! that applies a [`RetryPolicy`]. Two transports: a [`Connection`] that one delivery worker owns
//! (the hot path: a Trigger's subscriber), and the shared pooled [`Sender`] for everything else
//! (dead letters, PingSource sinks).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::Either;
use http::header::{HOST, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;

use super::{Attempt, RetryPolicy, parse_retry_after};
use crate::gateway::{Blame, PathGate, blame, gateway_backoff};

/// Largest response body read from a subscriber (a reply event, or error data for the dead letter).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// A subscriber's answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a delivery with retries ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx, after `attempts` attempts (more than one: it was retried).
    Delivered { response: Response, attempts: u32 },
    /// Not delivered: the last attempt's status (None: no response) and body (Knative's
    /// "dispatch error: ..." text when there was no response), after `attempts` attempts.
    Failed {
        status: Option<u16>,
        body: Bytes,
        attempts: u32,
    },
}

/// Where requests go: the URI to connect to and the Host header, worked out once per destination
/// rather than per request (hyper's client would format it from the URI for every request).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: http::Uri,
    host: HeaderValue,
    /// The request target on a connection of its own (origin-form: path and query).
    target: http::Uri,
}

impl Endpoint {
    /// `host` overrides the URI's authority (a Knative Service reached through the gateway). Without
    /// it, or when it is not a valid header value, Host is the URI's host and port unless the port is
    /// the scheme's default, as hyper's client sets it.
    pub fn new(uri: &http::Uri, host: Option<&str>) -> Endpoint {
        let from_uri = || {
            let name = uri.host().unwrap_or("");
            let default_port = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let value = match uri.port_u16() {
                Some(port) if port != default_port => {
                    HeaderValue::from_str(&format!("{name}:{port}"))
                }
                _ => HeaderValue::from_str(name),
            };
            value.unwrap_or_else(|_| HeaderValue::from_static(""))
        };
        let host = host
            .and_then(|h| HeaderValue::from_str(h).ok())
            .unwrap_or_else(from_uri);
        let target = uri
            .path_and_query()
            .map(|pq| http::Uri::from(pq.clone()))
            .unwrap_or_else(|| http::Uri::from_static("/"));
        Endpoint {
            uri: uri.clone(),
            host,
            target,
        }
    }

    /// host:port to connect to (the scheme's default port when the URI has none).
    fn address(&self) -> (String, u16) {
        let host = self.uri.host().unwrap_or("").trim_matches(['[', ']']);
        let port = self.uri.port_u16().unwrap_or(match self.uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        (host.to_string(), port)
    }
}

/// Why an attempt got no (complete) response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoResponse {
    /// The connection was refused: nothing listens at the address.
    pub refused: bool,
    pub why: String,
}

impl NoResponse {
    fn other(why: impl Into<String>) -> NoResponse {
        NoResponse {
            refused: false,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for NoResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Carries one attempt of a delivery.
pub trait Transport {
    /// One POST, or why there was no (complete) response.
    fn attempt(
        &mut self,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Response, NoResponse>> + Send;

    /// Where the requests go (for logs).
    fn endpoint(&self) -> &Endpoint;
}

/// The shared pooled [`Sender`] towards one endpoint.
struct Pooled<'a> {
    sender: &'a Sender,
    endpoint: &'a Endpoint,
}

impl Transport for Pooled<'_> {
    fn attempt(
        &mut self,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Response, NoResponse>> + Send {
        self.sender.attempt(self.endpoint, headers, body, timeout)
    }

    fn endpoint(&self) -> &Endpoint {
        self.endpoint
    }
}

type Http1 = http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

/// An open HTTP/1.1 connection: the request side and hyper's connection state machine, which only
/// makes progress while polled (by the worker that holds it).
struct Open {
    send: http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<Http1>>,
}

/// Why an exchange on an [`Open`] connection failed.
enum Failure {
    /// The request was never written (the connection had closed): safe to send on a new one.
    Unsent(Box<Request<Full<Bytes>>>, String),
    Other(String),
}

impl Open {
    async fn connect(endpoint: &Endpoint, connect_timeout: Duration) -> Result<Open, NoResponse> {
        let connect = tokio::net::TcpStream::connect(endpoint.address());
        let stream = match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(NoResponse {
                    refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
                    why: format!("connecting to {}: {e}", endpoint.uri),
                });
            }
            Err(_) => {
                return Err(NoResponse::other(format!(
                    "connecting to {}: no answer within {connect_timeout:?}",
                    endpoint.uri
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| NoResponse::other(format!("{e:?}")))?;
        Ok(Open {
            send,
            conn: Box::pin(conn),
        })
    }

    /// Whether the connection can carry another request: lets it notice a close by the subscriber
    /// (an HTTP/1.0 answer, or an idle timeout) without waiting.
    fn usable(&mut self) -> bool {
        self.conn.as_mut().now_or_never().is_none() && !self.send.is_closed()
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<Response, Failure> {
        let Open { send, conn } = self;
        let exchange = async {
            if let Err(e) = futures::future::poll_fn(|cx| send.poll_ready(cx)).await {
                return Err(Failure::Unsent(Box::new(request), format!("{e:?}")));
            }
            let response = match send.try_send_request(request).await {
                Ok(r) => r,
                Err(mut e) => {
                    return Err(match e.take_message() {
                        Some(request) => {
                            Failure::Unsent(Box::new(request), format!("{:?}", e.into_error()))
                        }
                        None => Failure::Other(format!("{:?}", e.into_error())),
                    });
                }
            };
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| Failure::Other(format!("reading the response body: {e}")))?
                .to_bytes();
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        let exchange = std::pin::pin!(exchange);
        // The connection makes progress only while it is polled: drive it beside the exchange.
        match futures::future::select(exchange, conn.as_mut()).await {
            Either::Left((result, _)) => result,
            // The connection ended first (closed after its answer, or broken): whatever it
            // delivered before ending is ready now, anything else never comes.
            Either::Right((_, exchange)) => exchange.now_or_never().unwrap_or_else(|| {
                Err(Failure::Other(
                    "connection closed before the response".into(),
                ))
            }),
        }
    }
}

/// How many connections to one subscriber are opened at once, at most: a subscriber that accepts
/// slowly gets a few connects in flight, not a burst of them (its accept backlog may be 5).
const CONNECTING_PER_HOST: usize = 4;

/// The connections to one subscriber host (one address and Host header), shared by every Trigger
/// that delivers there, and bounded: at most `max` exchanges at once, and so at most `max`
/// connections (one is opened only when no idle one is left, by a holder of one of the `max`
/// slots). A worker that finds no free slot waits: a slow subscriber is backpressure, not a reason
/// to open more connections (issue 12, item 7: 20 Triggers x 64 workers opened 1,280).
pub struct HostPool {
    slots: Semaphore,
    connecting: Semaphore,
    idle: std::sync::Mutex<Vec<Open>>,
    connect_timeout: Duration,
}

impl HostPool {
    fn new(max: usize, connect_timeout: Duration) -> HostPool {
        HostPool {
            slots: Semaphore::new(max.max(1)),
            connecting: Semaphore::new(CONNECTING_PER_HOST),
            idle: std::sync::Mutex::new(Vec::new()),
            connect_timeout,
        }
    }

    /// An idle connection that is still open.
    fn take_idle(&self) -> Option<Open> {
        loop {
            let mut open = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if open.usable() {
                return Some(open);
            }
        }
    }

    fn put_idle(&self, mut open: Open) {
        if open.usable() {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(open);
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Open, NoResponse> {
        let _connecting = self.connecting.acquire().await;
        Open::connect(endpoint, self.connect_timeout).await
    }

    /// One exchange on an idle connection or a new one; a request that an idle connection never
    /// wrote (the subscriber had closed it) goes once more on a new connection without counting.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        request: Request<Full<Bytes>>,
    ) -> Result<Response, NoResponse> {
        let (mut open, reused) = match self.take_idle() {
            Some(open) => (open, true),
            None => (self.connect(endpoint).await?, false),
        };
        let result = match open.exchange(request).await {
            Err(Failure::Unsent(request, _)) if reused => {
                open = self.connect(endpoint).await?;
                open.exchange(*request).await
            }
            other => other,
        };
        match result {
            Ok(response) => {
                self.put_idle(open);
                Ok(response)
            }
            // A failed exchange leaves the connection in an unknown state: it is dropped.
            Err(Failure::Unsent(_, why) | Failure::Other(why)) => Err(NoResponse::other(why)),
        }
    }
}

/// Connect timeout when the delivery has no `timeout` of its own (the dial timeout of Go's default
/// HTTP transport).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The [`HostPool`]s of a broker, one per subscriber address and Host header.
pub struct Pools {
    pools: std::sync::Mutex<HashMap<(String, u16, HeaderValue), Weak<HostPool>>>,
    per_host: usize,
    connect_timeout: Duration,
}

impl Pools {
    pub fn new(per_host: usize, connect_timeout: Duration) -> Pools {
        Pools {
            pools: Default::default(),
            per_host,
            connect_timeout,
        }
    }

    /// The pool of `endpoint`'s host, shared while anyone holds it.
    pub fn get(&self, endpoint: &Endpoint) -> Arc<HostPool> {
        let (host, port) = endpoint.address();
        let key = (host, port, endpoint.host.clone());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return pool;
        }
        pools.retain(|_, p| p.strong_count() > 0);
        let pool = Arc::new(HostPool::new(self.per_host, self.connect_timeout));
        pools.insert(key, Arc::downgrade(&pool));
        pool
    }
}

/// A delivery worker's way to its Trigger's subscriber: exchanges over the subscriber host's shared
/// [`HostPool`]. hyper's connection state machine runs inside the worker's own task while an
/// exchange is in flight (no hand-over to a connection task and back, which cut the broker's CPU
/// per delivered event by about a quarter, `bash scripts/bench-eventing`).
pub struct Connection {
    endpoint: Endpoint,
    pool: Arc<HostPool>,
}

impl Connection {
    pub fn new(endpoint: Endpoint, pools: &Pools) -> Connection {
        let pool = pools.get(&endpoint);
        Connection { endpoint, pool }
    }
}

impl Transport for Connection {
    async fn attempt(
        &mut self,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Response, NoResponse> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.target.clone();
        *request.headers_mut() = headers;
        request
            .headers_mut()
            .insert(HOST, self.endpoint.host.clone());
        // Waiting for a slot is the subscriber's backpressure, not part of the attempt; connecting
        // is, and counts against the timeout.
        let _slot = self
            .pool
            .slots
            .acquire()
            .await
            .map_err(|e| NoResponse::other(e.to_string()))?;
        let exchange = self.pool.exchange(&self.endpoint, request);
        match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or_else(|_| Err(NoResponse::other(format!("timed out after {t:?}")))),
            None => exchange.await,
        }
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// Sends with Knative's retry policy: retries retryable failures up to `policy.retry` times,
/// waiting the policy's backoff (and Retry-After when allowed) between attempts.
///
/// With a `gate` (the destination is behind Sluice's gateway), each attempt waits until the gateway
/// serves the destination, and a failure that is the gateway's own ([`blame`]) is tried again after
/// a short pause without counting as an attempt.
pub async fn send<T: Transport>(
    transport: &mut T,
    mut headers: HeaderMap,
    body: Bytes,
    policy: &RetryPolicy,
    mut gate: Option<&mut PathGate>,
) -> Outcome {
    let mut attempts = 0;
    let mut gateway_failures = 0u32;
    loop {
        if let Some(gate) = gate.as_deref_mut() {
            gate.ready().await;
        }
        attempts += 1;
        // The headers are copied only while another attempt may follow.
        let attempt_headers = if attempts <= policy.retry || gate.is_some() {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };
        let result = transport
            .attempt(attempt_headers, body.clone(), policy.timeout)
            .await;
        if let Some(gate) = gate.as_deref()
            && blame(&result) == Blame::Gateway
        {
            attempts -= 1;
            gateway_failures += 1;
            let why = match &result {
                Ok(r) => format!("answered {}", r.status),
                Err(e) => e.why.clone(),
            };
            // Said once, then every 100th time: a gateway that stays down is not silent.
            if gateway_failures % 100 == 1 {
                tracing::warn!(
                    host = gate.host(), %why, gateway_failures,
                    "the gateway cannot reach the subscriber yet; not counted as a delivery attempt"
                );
            }
            tokio::time::sleep(gateway_backoff(gateway_failures)).await;
            continue;
        }
        let (attempt, retry_after, failed_body) = match result {
            Ok(response) if (200..300).contains(&response.status) => {
                return Outcome::Delivered { response, attempts };
            }
            Ok(response) => {
                let retry_after = response
                    .headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                (Attempt::Status(response.status), retry_after, response.body)
            }
            Err(no_response) => (
                Attempt::NoResponse,
                None,
                Bytes::from(format!("dispatch error: {no_response}")),
            ),
        };
        if attempts > policy.retry || !RetryPolicy::is_retryable(attempt) {
            tracing::debug!(uri = %transport.endpoint().uri, ?attempt, attempts, "delivery failed");
            return Outcome::Failed {
                status: match attempt {
                    Attempt::Status(s) => Some(s),
                    Attempt::NoResponse => None,
                },
                body: failed_body,
                attempts,
            };
        }
        let wait = policy.backoff(attempts, attempt, retry_after);
        tracing::debug!(uri = %transport.endpoint().uri, ?attempt, ?wait, "retrying delivery");
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Whether an error's chain holds a refused connection (the client wraps the io::Error).
fn caused_by_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Sends events over a shared connection pool, and holds the per-host pools of the delivery
/// workers ([`Pools`]).
#[derive(Clone)]
pub struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    pools: Arc<Pools>,
}

impl Default for Sender {
    fn default() -> Self {
        Self::new(64, DEFAULT_CONNECT_TIMEOUT)
    }
}

impl Sender {
    /// `per_host`: connections the delivery workers open to one subscriber host at most.
    pub fn new(per_host: usize, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Knative's dispatcher keeps up to 100 idle connections per host.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(100)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Sender {
            client,
            pools: Arc::new(Pools::new(per_host, connect_timeout)),
        }
    }

    /// The delivery workers' per-host pools.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// One POST; Err is a text saying why there was no (complete) response.
    pub async fn attempt(
        &self,
        endpoint: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Response, NoResponse> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(endpoint.uri.clone())
            .body(Full::new(body))
            .map_err(|e| NoResponse::other(e.to_string()))?;
        *request.headers_mut() = headers;
        request.headers_mut().insert(HOST, endpoint.host.clone());
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| NoResponse {
                refused: e.is_connect() && caused_by_refusal(&e),
                why: format!("{e:?}"),
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| NoResponse::other(format!("reading the response body: {e}")))?
                .to_bytes();
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or_else(|_| Err(NoResponse::other(format!("timed out after {t:?}")))),
            None => exchange.await,
        }
    }

    /// [`send`] over the pool.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
        policy: &RetryPolicy,
        gate: Option<&mut PathGate>,
    ) -> Outcome {
        send(
            &mut Pooled {
                sender: self,
                endpoint,
            },
            headers,
            body,
            policy,
            gate,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_told_apart_on_both_transports() {
        // A port nothing listens on: bind, note it, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let endpoint = Endpoint::new(&format!("http://{addr}/").parse().unwrap(), None);
        let sender = Sender::default();
        let pooled = sender
            .attempt(&endpoint, HeaderMap::new(), Bytes::new(), None)
            .await
            .unwrap_err();
        assert!(pooled.refused, "{pooled:?}");
        let mut connection = Connection::new(endpoint, sender.pools());
        let own = connection
            .attempt(HeaderMap::new(), Bytes::new(), None)
            .await
            .unwrap_err();
        assert!(own.refused, "{own:?}");
    }

    #[test]
    fn host_header_is_the_override_or_the_uri_authority_without_default_port() {
        for (uri, host, want) in [
            ("http://127.0.0.1:8080/", None, "127.0.0.1:8080"),
            ("http://example.com/path", None, "example.com"),
            ("http://example.com:80/", None, "example.com"),
            (
                "http://gw:8080/",
                Some("web.default.example.com:8080"),
                "web.default.example.com:8080",
            ),
            ("http://gw:8080/", Some("bad\nhost"), "gw:8080"),
        ] {
            let endpoint = Endpoint::new(&uri.parse().unwrap(), host);
            assert_eq!(endpoint.host, want, "{uri} {host:?}");
        }
    }
}
