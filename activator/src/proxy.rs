//! The HTTP side: accept requests, find the revision, wait for a slot, forward, stream back.
//!
//! Knative: `pkg/activator/handler/handler.go` (throttler errors: 503 on a full queue, the request's
//! deadline; 502 when proxying fails), `context_handler.go` (404 "Error getting active endpoint" for an
//! unknown revision), `probe_handler.go` (`K-Network-Probe: activator`), the activator's timeout
//! handler (504 "activator request timeout" once the revision's timeoutSeconds pass before the response
//! starts), and `pkg/http` header pruning (hop-by-hop and the revision headers are not forwarded).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_api::autoscaling::{
    NAMESPACE_HEADER, PROXY_HEADER, PROXY_HEADER_VALUE, REVISION_HEADER, RevisionKey,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::body::{Guarded, ProxyBody, empty, full};
use crate::probe::PROBE_HEADER;
use crate::revision::{Acquire, Slot};
use crate::{Inner, RevisionFailure, lock};

/// Knative's `activator.Name`: the value of `K-Network-Probe` the activator answers itself.
const ACTIVATOR_PROBE_VALUE: &str = "activator";
/// Knative's `netheader.OriginalHostKey`: the Host the request had before a hop rewrote it.
const ORIGINAL_HOST_HEADER: &str = "K-Original-Host";
/// Knative's timeout handler body.
const TIMEOUT_BODY: &str = "activator request timeout";
/// Knative's `queue.ErrRequestQueueFull`.
const QUEUE_FULL_BODY: &str = "pending request queue full";
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener) -> std::io::Result<()> {
    // Connections live in this set: dropping the serve future closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends pass; do not spin on them.
                        tracing::warn!(error = %e, "activator accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req, peer).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "activator connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<ProxyBody> {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Knative's `LastHeaderValue`.
fn last_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Counts the request in the revision's concurrency until dropped.
struct InFlight {
    inner: Arc<Inner>,
    key: RevisionKey,
}

impl InFlight {
    fn start(inner: &Arc<Inner>, key: &RevisionKey) -> Self {
        let immediate = lock(&inner.reporter).request_in(key, std::time::Instant::now());
        if let Some(stat) = immediate {
            inner.options.stat_sink.record(key, stat);
        }
        InFlight {
            inner: inner.clone(),
            key: key.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.inner.reporter).request_out(&self.key, std::time::Instant::now());
    }
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    // Knative's probe handler: the gateway (or anyone) checks that the activator is up.
    if let Some(v) = req.headers().get(PROBE_HEADER) {
        return if v == ACTIVATOR_PROBE_VALUE {
            // Knative writes the bare name, no newline.
            Response::new(full(ACTIVATOR_PROBE_VALUE))
        } else {
            text(
                StatusCode::BAD_REQUEST,
                format!(
                    "unexpected probe header value: {:?}",
                    String::from_utf8_lossy(v.as_bytes())
                ),
            )
        };
    }
    let (Some(namespace), Some(name)) = (
        last_header(req.headers(), NAMESPACE_HEADER),
        last_header(req.headers(), REVISION_HEADER),
    ) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "Error getting active endpoint: the request has no {NAMESPACE_HEADER} and {REVISION_HEADER} \
                 headers; the gateway adds them to requests for a revision routed to the activator"
            ),
        );
    };
    let key = RevisionKey::new(namespace, name);
    let started = Instant::now();
    let resp = handle_revision(&inner, req, peer, &key).await;
    inner
        .metrics
        .request_done(&key, resp.status(), started.elapsed());
    resp
}

/// A request that names its revision: wait for a slot, forward, answer.
async fn handle_revision(
    inner: &Arc<Inner>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    key: &RevisionKey,
) -> Response<ProxyBody> {
    let key = key.clone();
    let Some(rev) = inner.revision(&key) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("Error getting active endpoint: revision {key} not found"),
        );
    };
    // Knative's timeout handler starts with the request, so time spent waiting counts.
    let deadline = Instant::now() + rev.timeout();
    let in_flight = InFlight::start(inner, &key);

    let h2 = req.version() == Version::HTTP_2;
    let upgrade = if h2 {
        None
    } else {
        upgrade_type(req.headers())
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    prepare_request(&mut req, h2, upgrade.clone(), peer);

    let mut attempts = 0;
    loop {
        let slot = match rev
            .acquire(
                deadline,
                || inner.options.poker.poke(&key),
                || inner.metrics.throttled(&key, "queued"),
            )
            .await
        {
            Acquire::Slot(s) => s,
            Acquire::QueueFull => {
                inner.metrics.throttled(&key, "queue_full");
                return text(StatusCode::SERVICE_UNAVAILABLE, QUEUE_FULL_BODY);
            }
            Acquire::Failed(failure) => {
                return text(StatusCode::SERVICE_UNAVAILABLE, failed_body(&key, &failure));
            }
            Acquire::TimedOut => return text(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY),
            Acquire::Removed => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("Error getting active endpoint: revision {key} was removed"),
                );
            }
        };
        attempts += 1;
        let backend = slot.backend();
        let pooled = if h2 || upgrade.is_some() {
            None
        } else {
            inner.pool.take(backend)
        };
        let outcome = match pooled {
            Some(sender) => match send_http1(sender, req, deadline).await {
                // The kept-alive connection was closed under us before the request went out:
                // a fresh connection to the same instance.
                Sent::Unsent(back, e) => {
                    tracing::debug!(%backend, error = %e, "pooled connection unusable");
                    req = back;
                    send_fresh(backend, req, h2, deadline).await
                }
                other => other,
            },
            None => send_fresh(backend, req, h2, deadline).await,
        };
        match outcome {
            Sent::Response(resp, sender) => {
                return respond(inner, resp, sender, client_upgrade, slot, in_flight);
            }
            Sent::TimedOut => return text(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY),
            Sent::Failed(e) => {
                tracing::info!(revision = %key, %backend, error = %e, "error reverse proxying request");
                return proxy_error(e);
            }
            Sent::Unsent(back, e) => {
                // Nothing was sent: safe to try another instance. This one waits for a new probe.
                tracing::warn!(revision = %key, %backend, error = %e, "cannot reach instance");
                rev.mark_unhealthy(backend);
                drop(slot);
                if attempts >= inner.options.connect_attempts.max(1) {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "activator: cannot connect to an instance of revision {key} after {attempts} attempts: {e}"
                        ),
                    );
                }
                req = back;
            }
        }
    }
}

/// What became of one attempt to send a request to an instance.
enum Sent {
    /// The response head, and the HTTP/1 connection to reuse once its body is read.
    Response(Response<Incoming>, Option<http1::SendRequest<Incoming>>),
    /// The request did not leave: it can go elsewhere.
    Unsent(Request<Incoming>, String),
    /// The request (or part of it) went out and the exchange failed.
    Failed(hyper::Error),
    /// The revision's deadline passed.
    TimedOut,
}

async fn send_http1(
    mut sender: http1::SendRequest<Incoming>,
    req: Request<Incoming>,
    deadline: Instant,
) -> Sent {
    let exchange = async {
        if let Err(e) = sender.ready().await {
            return Sent::Unsent(req, e.to_string());
        }
        match sender.try_send_request(req).await {
            Ok(resp) => Sent::Response(resp, Some(sender)),
            Err(mut e) => match e.take_message() {
                Some(req) => Sent::Unsent(req, e.into_error().to_string()),
                None => Sent::Failed(e.into_error()),
            },
        }
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .unwrap_or(Sent::TimedOut)
}

/// Opens a new connection to `backend` and sends the request on it (h2c for HTTP/2 requests, as
/// Knative's AutoTransport does; HTTP/1.1 otherwise).
async fn send_fresh(
    backend: SocketAddr,
    req: Request<Incoming>,
    h2: bool,
    deadline: Instant,
) -> Sent {
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(backend)).await {
        Err(_) => return Sent::TimedOut,
        Ok(Err(e)) => return Sent::Unsent(req, e.to_string()),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if h2 {
        let handshake =
            tokio::time::timeout_at(deadline, http2::handshake(TokioExecutor::new(), io)).await;
        let mut sender = match handshake {
            Err(_) => return Sent::TimedOut,
            Ok(Err(e)) => return Sent::Unsent(req, e.to_string()),
            Ok(Ok((sender, conn))) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%backend, error = %e, "upstream h2 connection ended");
                    }
                });
                sender
            }
        };
        let exchange = async {
            match sender.try_send_request(req).await {
                Ok(resp) => Sent::Response(resp, None),
                Err(mut e) => match e.take_message() {
                    Some(req) => Sent::Unsent(req, e.into_error().to_string()),
                    None => Sent::Failed(e.into_error()),
                },
            }
        };
        return tokio::time::timeout_at(deadline, exchange)
            .await
            .unwrap_or(Sent::TimedOut);
    }
    let handshake = tokio::time::timeout_at(deadline, http1::handshake(io)).await;
    match handshake {
        Err(_) => Sent::TimedOut,
        Ok(Err(e)) => Sent::Unsent(req, e.to_string()),
        Ok(Ok((sender, conn))) => {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%backend, error = %e, "upstream connection ended");
                }
            });
            send_http1(sender, req, deadline).await
        }
    }
}

/// Rewrites a request for the instance: Knative's header pruning and marking, Go's reverse proxy
/// hop-by-hop removal and X-Forwarded-For, and the request target each upstream protocol wants.
fn prepare_request(
    req: &mut Request<Incoming>,
    h2: bool,
    upgrade: Option<HeaderValue>,
    peer: SocketAddr,
) {
    let headers = req.headers_mut();
    remove_hop_headers(headers, upgrade);
    // Knative: the activator prunes the revision headers and marks what it forwards.
    headers.remove(REVISION_HEADER);
    headers.remove(NAMESPACE_HEADER);
    headers.insert(PROXY_HEADER, HeaderValue::from_static(PROXY_HEADER_VALUE));
    // Knative: `RewriteHostIn`.
    if let Some(host) = headers.remove(ORIGINAL_HOST_HEADER) {
        headers.insert(header::HOST, host);
    }
    let ip = peer.ip().to_string();
    let xff = match headers.get(X_FORWARDED_FOR) {
        Some(prior) => format!("{}, {ip}", String::from_utf8_lossy(prior.as_bytes())),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }

    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    if h2 {
        // h2 needs an absolute target; an h2c request normally has one already.
        if req.uri().authority().is_none() {
            let authority = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
            {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().remove(header::HOST);
    } else {
        // HTTP/1.1 upstream: origin-form target, Host kept (or taken from an absolute-form target).
        if let Some(authority) = req.uri().authority().cloned()
            && !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        if let Ok(uri) = path_and_query.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

/// Turns the instance's response into the client's: hop-by-hop headers removed, body streamed while
/// holding the slot and the concurrency count, or an upgraded connection tunnelled.
fn respond(
    inner: &Arc<Inner>,
    mut resp: Response<Incoming>,
    sender: Option<http1::SendRequest<Incoming>>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    slot: Slot,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let backend = slot.backend();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // The tunnel holds the slot and the concurrency count while it lives.
        tokio::spawn(async move {
            let _held = (slot, in_flight, sender);
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let (mut c, mut u) = (TokioIo::new(client), TokioIo::new(upstream));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(%backend, error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::info!(%backend, error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        let up = upgrade_type(&parts.headers);
        remove_hop_headers(&mut parts.headers, up);
        return Response::from_parts(parts, empty());
    }

    let (mut parts, body) = resp.into_parts();
    remove_hop_headers(&mut parts.headers, None);
    // A connection whose response was read to the end goes back to the pool for the next request.
    let on_end = sender.map(|sender| {
        let inner = inner.clone();
        Box::new(move || inner.pool.put(backend, sender)) as Box<dyn FnOnce() + Send>
    });
    let body = Guarded::new(body, (slot, in_flight), on_end);
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}

/// Go's `httputil` hop-by-hop list (`hopHeaders`).
const HOP_HEADERS: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn upgrade_type(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes hop-by-hop headers (and those named in `Connection`), as Go's reverse proxy does. An
/// upgrade keeps `Connection: Upgrade` and its `Upgrade` header; `TE: trailers` is kept (gRPC).
fn remove_hop_headers(headers: &mut HeaderMap, keep_upgrade: Option<HeaderValue>) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for h in HOP_HEADERS {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(up) = keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, up);
    }
}

/// What a client of a failed revision reads: the revision and its Ready=False reason and message, as
/// `kn revision describe` would show them.
fn failed_body(key: &RevisionKey, failure: &RevisionFailure) -> String {
    format!(
        "revision {key} cannot serve: {}: {}",
        failure.reason, failure.message
    )
}

fn proxy_error(e: impl std::fmt::Display) -> Response<ProxyBody> {
    // Knative's proxy ErrorHandler: 502 with the error.
    text(
        StatusCode::BAD_GATEWAY,
        format!("activator: error reverse proxying request: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_and_upgrades_survive() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        remove_hop_headers(&mut h, None);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("transfer-encoding").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "yes");

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        let up = upgrade_type(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        remove_hop_headers(&mut h, up);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "Upgrade");
    }

    #[test]
    fn the_last_revision_header_wins_like_knative() {
        let mut h = HeaderMap::new();
        h.append(REVISION_HEADER, HeaderValue::from_static("a"));
        h.append(REVISION_HEADER, HeaderValue::from_static("b"));
        assert_eq!(last_header(&h, REVISION_HEADER).as_deref(), Some("b"));
        h.insert(NAMESPACE_HEADER, HeaderValue::from_static("  "));
        assert_eq!(last_header(&h, NAMESPACE_HEADER), None);
    }

    #[test]
    fn a_failed_revision_is_named_with_its_reason_and_message() {
        let body = failed_body(
            &RevisionKey::new("default", "web-00001"),
            &RevisionFailure {
                reason: "ContainerMissing".into(),
                message: "Unable to fetch image \"app:v1\": No such image".into(),
            },
        );
        assert_eq!(
            body,
            "revision default/web-00001 cannot serve: ContainerMissing: Unable to fetch image \"app:v1\": No such image"
        );
    }

    #[test]
    fn knative_error_bodies_are_kept() {
        assert_eq!(TIMEOUT_BODY, "activator request timeout");
        assert_eq!(QUEUE_FULL_BODY, "pending request queue full");
    }
}
