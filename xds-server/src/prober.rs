//! Probes the gateway for one Ingress version: a request carrying the Ingress's hash is answered by the
//! route that translation put first in each of its virtual hosts, so a 200 echoing the hash proves
//! Envoy serves that exact version of the Ingress, without touching any backend.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;

use sluice_api::ingress::{HASH_HEADER, PROBE_HEADER};

/// The `K-Network-Probe` value Sluice's own readiness probe sends (Knative's "probe" value is left to
/// the backends, which must echo the hash themselves).
pub const READINESS_PROBE_VALUE: &str = "sluice-ready";

/// The Host to probe a rule with no hosts (it matches every host).
pub const CATCH_ALL_PROBE_HOST: &str = "sluice-probe.invalid";

/// One probe through the listener at `addr`, for `host`. Ok when Envoy answers 200 with the hash.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    hash: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to the gateway at {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("gateway {addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get("/")
            .header(hyper::header::HOST, host)
            .header(PROBE_HEADER, READINESS_PROBE_VALUE)
            .header(HASH_HEADER, hash)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("probe request for {host}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("gateway {addr}: {e}"))?;
        let got = resp
            .headers()
            .get(HASH_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if resp.status() == hyper::StatusCode::OK && got == hash {
            Ok(())
        } else {
            Err(format!(
                "gateway {addr} answered {} for host {host} (want 200 with {HASH_HEADER}: {hash}, got {got:?})",
                resp.status()
            ))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "gateway {addr}: no answer for host {host} within {timeout:?}"
            ))
        })
}
