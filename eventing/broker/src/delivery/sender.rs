//! The HTTP side of delivery: one pooled hyper client (connections to subscribers are reused), one
//! attempt with a timeout, and the retry loop that applies a [`RetryPolicy`].

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HOST, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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
        Endpoint {
            uri: uri.clone(),
            host,
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

    /// Sends with Knative's retry policy: retries retryable failures up to `policy.retry` times,
    /// waiting the policy's backoff (and Retry-After when allowed) between attempts.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
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
            let result = self
                .attempt(endpoint, attempt_headers, body.clone(), policy.timeout)
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
                tracing::debug!(uri = %endpoint.uri, ?attempt, attempts, "delivery failed");
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
            tracing::debug!(uri = %endpoint.uri, ?attempt, ?wait, "retrying delivery");
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
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
