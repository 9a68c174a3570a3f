//! The broker ingress: `POST /<namespace>/<broker>` with CloudEvents (binary, structured or batch),
//! written to the broker's durable log before answering 202 (Knative pkg/broker/ingress).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_event_log::{EventLog, LogError};
use tokio::net::TcpListener;

use crate::codec;
use crate::config::BrokerKey;
use crate::metrics::BrokerMetrics;

/// The running brokers: where each keeps its events, found by `namespace/name`. Shared by the
/// ingress, the dispatchers (replies) and PingSources.
pub struct Brokers {
    logs: RwLock<HashMap<BrokerKey, Store>>,
    default_ttl: i64,
    metrics: BrokerMetrics,
}

/// Where a Broker's events are stored: its embedded log, or RabbitMQ.
#[derive(Clone)]
pub enum Store {
    Log(Arc<dyn EventLog>),
    RabbitMq(Arc<crate::rabbitmq::RabbitBroker>),
}

impl From<Arc<dyn EventLog>> for Store {
    fn from(log: Arc<dyn EventLog>) -> Self {
        Store::Log(log)
    }
}

/// Why events were not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("broker {0} not found")]
    UnknownBroker(BrokerKey),
    #[error(
        "event dropped: its {} extension is exhausted (it went round the broker too often)",
        codec::TTL_EXTENSION
    )]
    TtlExhausted,
    #[error("broker {broker}: could not store the event durably: {source}")]
    Log {
        broker: BrokerKey,
        #[source]
        source: LogError,
    },
    /// The Broker's RabbitMQ is unreachable or did not confirm: nothing was accepted (503).
    #[error("broker {broker}: {source}")]
    RabbitMq {
        broker: BrokerKey,
        #[source]
        source: crate::rabbitmq::RabbitError,
    },
}

impl Brokers {
    pub fn new(default_ttl: i64) -> Self {
        Brokers {
            logs: RwLock::new(HashMap::new()),
            default_ttl,
            metrics: BrokerMetrics::default(),
        }
    }

    /// The broker's metrics (the ingress's, and every Trigger's deliveries).
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    pub fn insert(&self, key: BrokerKey, store: impl Into<Store>) {
        self.logs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, store.into());
    }

    pub fn remove(&self, key: &BrokerKey) -> Option<Store> {
        self.logs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    pub fn get(&self, key: &BrokerKey) -> Option<Store> {
        self.logs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    pub fn keys(&self) -> Vec<BrokerKey> {
        self.logs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Applies the TTL rule to each event (dropping exhausted ones) and appends the rest to the
    /// broker's log; resolves once they are durable, with how many were stored.
    pub async fn ingest(&self, key: &BrokerKey, events: Vec<Event>) -> Result<usize, IngestError> {
        let store = self
            .get(key)
            .ok_or_else(|| IngestError::UnknownBroker(key.clone()))?;
        let mut records = Vec::with_capacity(events.len());
        // Knative: the ingress stamps each event with its arrival time.
        let arrival = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        for mut event in events {
            event.set_extension(
                codec::ARRIVAL_TIME_EXTENSION,
                cloudevents::event::ExtensionValue::from(arrival.clone()),
            );
            match codec::apply_ttl(&mut event, self.default_ttl) {
                Ok(_) => records.push(codec::encode(&event)),
                Err(codec::TtlExhausted) => {
                    tracing::debug!(broker = %key, id = event.id(), "dropping event: TTL exhausted");
                }
            }
        }
        if records.is_empty() {
            return Err(IngestError::TtlExhausted);
        }
        let stored = records.len();
        match store {
            Store::Log(log) => {
                log.append(records)
                    .await
                    .map_err(|source| IngestError::Log {
                        broker: key.clone(),
                        source,
                    })?;
            }
            Store::RabbitMq(broker) => {
                broker
                    .publish(records)
                    .await
                    .map_err(|source| IngestError::RabbitMq {
                        broker: key.clone(),
                        source,
                    })?;
            }
        }
        Ok(stored)
    }
}

/// Ingress settings.
#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// Requests with a larger body are refused with 413.
    pub max_body_bytes: usize,
}

/// Serves the ingress on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, brokers: Arc<Brokers>, options: IngressOptions) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "broker ingress: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let brokers = brokers.clone();
        let options = options.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let brokers = brokers.clone();
                let options = options.clone();
                async move { Ok::<_, Infallible>(handle(req, &brokers, &options).await) }
            });
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "broker ingress connection ended");
            }
        });
    }
}

/// Binds the ingress address (for callers that want the bound port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn reply(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let message = message.into();
    let mut response = Response::new(Full::new(Bytes::from(if message.is_empty() {
        String::new()
    } else {
        format!("{message}\n")
    })));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("allow", HeaderValue::from_static("POST, OPTIONS"));
    if !message.is_empty() {
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

/// The pure part of routing: what a path names (Knative: `/` is 404, not exactly two segments 400).
pub fn parse_path(path: &str) -> Result<BrokerKey, StatusCode> {
    if path == "/" || path.is_empty() {
        return Err(StatusCode::NOT_FOUND);
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let parts: Vec<&str> = trimmed.split('/').collect();
    match parts.as_slice() {
        ["", ns, name] if !ns.is_empty() && !name.is_empty() => Ok(BrokerKey::new(*ns, *name)),
        _ => Err(StatusCode::BAD_REQUEST),
    }
}

async fn handle(
    req: Request<Incoming>,
    brokers: &Brokers,
    options: &IngressOptions,
) -> Response<Full<Bytes>> {
    if req.method() == Method::OPTIONS {
        // CloudEvents webhook validation handshake, as Knative's ingress answers it.
        let mut r = reply(StatusCode::OK, "");
        r.headers_mut()
            .insert("webhook-allowed-origin", HeaderValue::from_static("*"));
        r.headers_mut()
            .insert("webhook-allowed-rate", HeaderValue::from_static("*"));
        return r;
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed: POST CloudEvents", req.method()),
        );
    }
    let key = match parse_path(req.uri().path()) {
        Ok(k) => k,
        Err(StatusCode::NOT_FOUND) => {
            return reply(StatusCode::NOT_FOUND, "POST to /<namespace>/<broker>");
        }
        Err(status) => {
            return reply(
                status,
                format!(
                    "malformed path {:?}: want /<namespace>/<broker>",
                    req.uri().path()
                ),
            );
        }
    };
    if brokers.get(&key).is_none() {
        return reply(StatusCode::NOT_FOUND, format!("broker {key} not found"));
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let (parts, body) = req.into_parts();
    let body = match read_body(body, declared, options.max_body_bytes).await {
        BodyRead::Complete(body) => body,
        BodyRead::TooLarge { drained } => {
            let mut response = too_large(options);
            if !drained {
                // The rest was not read: the connection cannot carry another request.
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
        BodyRead::Failed(e) => {
            return reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
    };
    let events = match codec::events_from_http(&parts.headers, body) {
        Ok(events) => events,
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Knative counts each event by its type, with the answer it got and the time to store it.
    let types: Vec<String> = events.iter().map(|e| e.ty().to_string()).collect();
    let started = std::time::Instant::now();
    let response = ingest_response(brokers.ingest(&key, events).await);
    let stored = response.status() == StatusCode::ACCEPTED;
    brokers.metrics.ingested(
        &key,
        types.iter().map(String::as_str),
        response.status().as_u16(),
        stored.then(|| started.elapsed()),
    );
    response
}

fn ingest_response(result: Result<usize, IngestError>) -> Response<Full<Bytes>> {
    match result {
        Ok(_) => reply(StatusCode::ACCEPTED, ""),
        Err(IngestError::UnknownBroker(key)) => {
            reply(StatusCode::NOT_FOUND, format!("broker {key} not found"))
        }
        Err(e @ IngestError::TtlExhausted) => reply(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ IngestError::Log { .. }) => {
            tracing::error!(error = %e, "broker ingress: append failed");
            reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e @ IngestError::RabbitMq { .. }) => {
            // Nothing was accepted; the producer may send again (Knative answers 5xx too).
            tracing::warn!(error = %e, "broker ingress: RabbitMQ did not take the events");
            reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// How much of an oversized body is read (and dropped) before answering 413. Answering before the
/// body is read makes the server close a connection with unread data, i.e. reset it, and a proxy in
/// front (the gateway) then reports the reset as a 503 instead of our 413 (issue 12).
pub const DRAIN_MAX_BYTES: usize = 64 * 1024 * 1024;

/// A request body as the ingress reads it.
enum BodyRead {
    Complete(Bytes),
    /// Over the limit; `drained` when the rest was read to its end (at most [`DRAIN_MAX_BYTES`]),
    /// so the connection stays usable and the answer is not lost in a reset.
    TooLarge {
        drained: bool,
    },
    Failed(String),
}

async fn read_body(mut body: Incoming, declared: Option<usize>, max: usize) -> BodyRead {
    // Usually one frame: kept as it came, without a copy.
    let mut kept: Vec<Bytes> = Vec::new();
    let mut seen = 0usize;
    // Refused from the start when Content-Length says so: nothing is kept, only drained.
    let mut too_large = declared.is_some_and(|n| n > max);
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) if too_large => {
                tracing::debug!(error = %e, "broker ingress: oversized body ended early");
                return BodyRead::TooLarge { drained: false };
            }
            Some(Err(e)) => return BodyRead::Failed(e.to_string()),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                seen = seen.saturating_add(data.len());
                if too_large {
                    if seen > DRAIN_MAX_BYTES {
                        return BodyRead::TooLarge { drained: false };
                    }
                } else if seen > max {
                    too_large = true;
                    kept = Vec::new();
                } else {
                    kept.push(data);
                }
            }
        }
    }
    if too_large {
        BodyRead::TooLarge { drained: true }
    } else {
        BodyRead::Complete(match kept.len() {
            0 => Bytes::new(),
            1 => kept.pop().unwrap_or_default(),
            _ => Bytes::from(kept.concat()),
        })
    }
}

fn too_large(options: &IngressOptions) -> Response<Full<Bytes>> {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {} bytes", options.max_body_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_routed_as_knatives_ingress_does() {
        for (path, want) in [
            ("/ns/b", Ok(BrokerKey::new("ns", "b"))),
            ("/ns/b/", Ok(BrokerKey::new("ns", "b"))),
            ("/", Err(StatusCode::NOT_FOUND)),
            ("/ns", Err(StatusCode::BAD_REQUEST)),
            ("/ns/b/c", Err(StatusCode::BAD_REQUEST)),
            ("//b", Err(StatusCode::BAD_REQUEST)),
        ] {
            assert_eq!(parse_path(path), want, "{path}");
        }
    }
}
