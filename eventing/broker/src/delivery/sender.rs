//! The HTTP side of delivery: one attempt with a timeout over a [`Transport`], and the retry loop
//! that applies a [`RetryPolicy`]. Two transports: a [`Connection`] that one delivery worker owns
//! (the hot path: a Trigger's subscriber), and the shared pooled [`Sender`] for everything else
//! (dead letters, PingSource sinks).

use std::future::Future;
use std::pin::Pin;
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

use super::{Attempt, RetryPolicy, parse_retry_after};

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
    /// A 2xx.
    Delivered(Response),
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

/// Carries one attempt of a delivery.
pub trait Transport {
    /// One POST; Err is a text saying why there was no (complete) response.
    fn attempt(
        &mut self,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Response, String>> + Send;

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
    ) -> impl Future<Output = Result<Response, String>> + Send {
        self.sender.attempt(self.endpoint, headers, body, timeout)
    }

    fn endpoint(&self) -> &Endpoint {
        self.endpoint
    }
}

type Http1 = http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

struct Open {
    send: http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<Http1>>,
}

/// Why an exchange on a [`Connection`] failed.
enum Failure {
    /// The request was never written (the connection had closed): safe to send on a new one.
    Unsent(Box<Request<Full<Bytes>>>, String),
    Other(String),
}

/// A keep-alive HTTP/1.1 connection to one endpoint, owned by one delivery worker, (re)opened when
/// needed. Unlike the pooled client, hyper's connection state machine runs inside the worker's own
/// task while an exchange is in flight: no pool lock, no hand-over to a connection task and back,
/// which cut the broker's CPU per delivered event by about a quarter (`bash scripts/bench-eventing`).
pub struct Connection {
    endpoint: Endpoint,
    open: Option<Open>,
}

impl Connection {
    pub fn new(endpoint: Endpoint) -> Connection {
        Connection {
            endpoint,
            open: None,
        }
    }

    async fn open(&mut self) -> Result<&mut Open, String> {
        if let Some(open) = &mut self.open {
            // Lets the connection notice a close by the subscriber while it sat idle.
            if open.conn.as_mut().now_or_never().is_some() || open.send.is_closed() {
                self.open = None;
            }
        }
        if self.open.is_none() {
            let stream = tokio::net::TcpStream::connect(self.endpoint.address())
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.endpoint.uri))?;
            let _ = stream.set_nodelay(true);
            let (send, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("{e:?}"))?;
            self.open = Some(Open {
                send,
                conn: Box::pin(conn),
            });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    async fn exchange(&mut self, mut request: Request<Full<Bytes>>) -> Result<Response, String> {
        let mut reconnected = false;
        loop {
            let result = {
                let Open { send, conn } = self.open().await?;
                let exchange = async {
                    if let Err(e) = futures::future::poll_fn(|cx| send.poll_ready(cx)).await {
                        return Err(Failure::Unsent(Box::new(request), format!("{e:?}")));
                    }
                    let response = match send.try_send_request(request).await {
                        Ok(r) => r,
                        Err(mut e) => {
                            return Err(match e.take_message() {
                                Some(request) => Failure::Unsent(
                                    Box::new(request),
                                    format!("{:?}", e.into_error()),
                                ),
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
            };
            match result {
                Ok(response) => return Ok(response),
                Err(Failure::Unsent(unsent, _)) if !reconnected => {
                    self.open = None;
                    request = *unsent;
                    reconnected = true;
                }
                // `attempt` drops the connection.
                Err(Failure::Unsent(_, why) | Failure::Other(why)) => return Err(why),
            }
        }
    }
}

impl Transport for Connection {
    async fn attempt(
        &mut self,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Response, String> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.target.clone();
        *request.headers_mut() = headers;
        request
            .headers_mut()
            .insert(HOST, self.endpoint.host.clone());
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, self.exchange(request))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {t:?}"))),
            None => self.exchange(request).await,
        };
        if result.is_err() {
            // A failed or timed-out exchange leaves the connection in an unknown state.
            self.open = None;
        }
        result
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// Sends with Knative's retry policy: retries retryable failures up to `policy.retry` times,
/// waiting the policy's backoff (and Retry-After when allowed) between attempts.
pub async fn send<T: Transport>(
    transport: &mut T,
    mut headers: HeaderMap,
    body: Bytes,
    policy: &RetryPolicy,
) -> Outcome {
    let mut attempts = 0;
    loop {
        attempts += 1;
        // The headers are copied only while another attempt may follow.
        let attempt_headers = if attempts <= policy.retry {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };
        let result = transport
            .attempt(attempt_headers, body.clone(), policy.timeout)
            .await;
        let (attempt, retry_after, failed_body) = match result {
            Ok(response) if (200..300).contains(&response.status) => {
                return Outcome::Delivered(response);
            }
            Ok(response) => {
                let retry_after = response
                    .headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                (Attempt::Status(response.status), retry_after, response.body)
            }
            Err(why) => (
                Attempt::NoResponse,
                None,
                Bytes::from(format!("dispatch error: {why}")),
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

/// Sends events over a shared connection pool.
#[derive(Clone)]
pub struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Sender {
    fn default() -> Self {
        Self::new()
    }
}

impl Sender {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Knative's dispatcher keeps up to 100 idle connections per host.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(100)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Sender { client }
    }

    /// One POST; Err is a text saying why there was no (complete) response.
    pub async fn attempt(
        &self,
        endpoint: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Response, String> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(endpoint.uri.clone())
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        *request.headers_mut() = headers;
        request.headers_mut().insert(HOST, endpoint.host.clone());
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the response body: {e}"))?
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
                .unwrap_or_else(|_| Err(format!("timed out after {t:?}"))),
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
    ) -> Outcome {
        send(
            &mut Pooled {
                sender: self,
                endpoint,
            },
            headers,
            body,
            policy,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
