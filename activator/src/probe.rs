//! Probing a revision's instances before they get traffic (Knative's `revisionWatcher.probePodIPs` in
//! `pkg/activator/net/revision_backends.go`): `GET /healthz` with `K-Network-Probe: queue`, healthy
//! only on 200 with body "queue" (the queue-proxy answers so when the user container is ready).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::revision::Revision;

/// Knative's `netheader.ProbeKey`.
pub(crate) const PROBE_HEADER: &str = "K-Network-Probe";
/// Knative: the queue-proxy's name, the probe header value and the expected body.
pub(crate) const QUEUE_PROBE_VALUE: &str = "queue";
/// Knative's `netheader.ActivatorUserAgent`.
const ACTIVATOR_USER_AGENT: &str = "Knative-Activator-Probe";
/// Knative's `nethttp.HealthCheckPath`.
const HEALTH_CHECK_PATH: &str = "/healthz";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("probe of {0} timed out")]
    Timeout(SocketAddr),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP error probing {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} answered the probe with {status}, want 200 \"queue\" (instance not ready)")]
    NotReady {
        addr: SocketAddr,
        status: StatusCode,
    },
    #[error(
        "{addr} answered the probe with body {body:?}, want \"queue\" (is the queue-proxy filter in front of it?)"
    )]
    WrongBody { addr: SocketAddr, body: String },
}

/// Probes one instance once.
pub(crate) async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout, probe_once(addr))
        .await
        .map_err(|_| ProbeError::Timeout(addr))?
}

async fn probe_once(addr: SocketAddr) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Http { addr, source })?;
    // Drive the connection while we wait; dropping this future drops the connection.
    let conn = async move {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    let exchange = async {
        let req = Request::get(HEALTH_CHECK_PATH)
            .header(header::HOST, addr.to_string())
            .header(PROBE_HEADER, QUEUE_PROBE_VALUE)
            .header(header::USER_AGENT, ACTIVATOR_USER_AGENT)
            .body(Empty::<Bytes>::new())
            .expect("static probe request is valid");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| ProbeError::Http { addr, source })?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(ProbeError::NotReady { addr, status });
        }
        let body = Limited::new(resp.into_body(), 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        if body.as_ref() != QUEUE_PROBE_VALUE.as_bytes() {
            return Err(ProbeError::WrongBody {
                addr,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(())
    };
    tokio::select! {
        r = exchange => r,
        _ = conn => unreachable!("the connection future never completes"),
    }
}

/// Probes a revision's unhealthy instances every `interval` until they pass; sleeps while there is
/// nothing to probe. Runs until aborted.
pub(crate) async fn run_prober(rev: Arc<Revision>, interval: Duration, timeout: Duration) {
    loop {
        let targets = rev.unhealthy();
        if targets.is_empty() {
            rev.probe_wake.notified().await;
            continue;
        }
        let mut probes = JoinSet::new();
        for addr in targets {
            probes.spawn(async move { (addr, probe(addr, timeout).await) });
        }
        let mut failed = false;
        while let Some(done) = probes.join_next().await {
            match done {
                Ok((addr, Ok(()))) => {
                    tracing::info!(revision = %rev.key, %addr, "instance passed the probe");
                    rev.mark_healthy(addr);
                }
                Ok((addr, Err(e))) => {
                    failed = true;
                    tracing::debug!(revision = %rev.key, %addr, error = %e, "instance not ready yet");
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(revision = %rev.key, error = %e, "probe task failed");
                }
            }
        }
        if failed {
            // Knative: probe again on the next tick; new instances wake us earlier.
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = rev.probe_wake.notified() => {}
            }
        }
    }
}
