//! One readiness probe attempt against an instance (the I/O edge of [`crate::readiness`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::spec::ProbeAction;

/// Knative's probes identify themselves as kubelet's do (`kube-probe/<major>.<minor>`), and Knative's
/// own components skip request logging and metrics for that user agent.
const PROBE_USER_AGENT: &str = "kube-probe/sluice";

/// Runs one attempt; `Err` says why it failed (written to the instance's log only when readiness
/// changes, to keep fast startup probing quiet).
pub(crate) async fn probe_once(
    action: &ProbeAction,
    addr: SocketAddr,
    timeout: Duration,
    exec: &impl ExecProbe,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(action, addr, exec)).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

/// Runs an exec probe's command where the instance runs (a local process, or inside its container).
pub trait ExecProbe: Send + Sync {
    /// Exit status 0 is success; `Err` says what happened otherwise.
    fn exec(&self, command: &[String]) -> impl Future<Output = Result<(), String>> + Send;
}

/// Exec probes of the process runtime: a local command with the instance's env and working dir.
#[derive(Debug, Clone)]
pub struct LocalExec {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<std::path::PathBuf>,
}

impl ExecProbe for LocalExec {
    async fn exec(&self, command: &[String]) -> Result<(), String> {
        exec(command, &self.env, self.working_dir.as_deref()).await
    }
}

async fn attempt(
    action: &ProbeAction,
    addr: SocketAddr,
    exec_probe: &impl ExecProbe,
) -> Result<(), String> {
    match action {
        ProbeAction::Tcp => TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("tcp connect {addr}: {e}")),
        ProbeAction::Http { path, headers } => http_get(addr, path, headers).await,
        ProbeAction::Exec { command } => exec_probe.exec(command).await,
        ProbeAction::Grpc { service } => grpc_health(addr, service.as_deref().unwrap_or("")).await,
    }
}

async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let path = if path.is_empty() { "/" } else { path };
    let mut req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, PROBE_USER_AGENT);
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http probe request for {path}: {e}"))?;
    let result = sender.send_request(req).await;
    conn.abort();
    let status = result
        .map_err(|e| format!("http GET {path}: {e}"))?
        .status();
    // Kubernetes and Knative (health/probe.go isHTTPProbeReady): 200..=399 is ready.
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("http GET {path}: status {status}"))
    }
}

async fn exec(
    command: &[String],
    env: &[(String, String)],
    working_dir: Option<&Path>,
) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("exec probe has no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A probe that times out is dropped; do not leave it running.
        .kill_on_drop(true);
    if let Some(dir) = working_dir {
        cmd.current_dir(dir);
    }
    let status = cmd
        .status()
        .await
        .map_err(|e| format!("exec probe {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("exec probe {program}: {status}"))
    }
}

/// gRPC health checking (`grpc.health.v1.Health/Check`) over h2c, as the kubelet's grpc probe: the
/// response's `status` must be SERVING (1). The two messages are one string field and one enum field,
/// so they are encoded by hand rather than pulling in generated code.
async fn grpc_health(addr: SocketAddr, service: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("grpc connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("grpc handshake {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(http::header::USER_AGENT, PROBE_USER_AGENT)
        .body(Full::new(Bytes::from(grpc_health_request(service))))
        .map_err(|e| format!("grpc request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("grpc Health/Check: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("grpc Health/Check: http status {}", resp.status()));
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("grpc Health/Check body: {e}"))?;
        let grpc_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_string();
        if grpc_status != "0" {
            return Err(format!("grpc Health/Check: grpc-status {grpc_status}"));
        }
        match grpc_health_status(&collected.to_bytes()) {
            Some(1) => Ok(()),
            Some(s) => Err(format!("grpc Health/Check: status {s}, want SERVING (1)")),
            None => Err("grpc Health/Check: malformed response".to_string()),
        }
    }
    .await;
    conn.abort();
    result
}

/// A length-prefixed `HealthCheckRequest { service = 1 }`.
fn grpc_health_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out
}

/// The `status` (field 1, varint) of a length-prefixed `HealthCheckResponse`; 0 (UNKNOWN) when absent.
fn grpc_health_status(frame: &[u8]) -> Option<u64> {
    let len = u32::from_be_bytes(frame.get(1..5)?.try_into().ok()?) as usize;
    let mut msg = frame.get(5..5 + len)?;
    let mut status = 0;
    while let Some((&tag, rest)) = msg.split_first() {
        let (value, rest) = varint(rest)?;
        match tag & 7 {
            0 => {
                if tag >> 3 == 1 {
                    status = value;
                }
                msg = rest;
            }
            2 => msg = rest.get(value as usize..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages_encode_and_decode() {
        assert_eq!(grpc_health_request(""), vec![0, 0, 0, 0, 0]);
        assert_eq!(
            grpc_health_request("ab"),
            vec![0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(grpc_health_status(&[0, 0, 0]), None);
    }

    /// A real h2c server answering Health/Check with `status` (and `grpc-status` 0 in trailers).
    async fn health_server(status: u8) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let path_ok = req.uri().path() == "/grpc.health.v1.Health/Check";
                        let frame = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
                        let mut trailers = http::HeaderMap::new();
                        let code = if path_ok { "0" } else { "12" };
                        trailers.insert("grpc-status", code.parse().unwrap());
                        let body =
                            Full::new(frame).with_trailers(async move { Some(Ok(trailers)) });
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn grpc_probe_wants_serving() {
        let (serving, a) = health_server(1).await;
        assert_eq!(grpc_health(serving, "").await, Ok(()));
        assert_eq!(grpc_health(serving, "my.Service").await, Ok(()));
        let (not_serving, b) = health_server(2).await;
        let err = grpc_health(not_serving, "").await.unwrap_err();
        assert!(err.contains("status 2"), "{err}");
        a.abort();
        b.abort();
    }

    #[tokio::test]
    async fn grpc_probe_fails_without_a_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(grpc_health(addr, "").await.is_err());
    }
}
