//! One readiness probe attempt against an instance (the I/O edge of [`crate::readiness`]).

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
    env: &[(String, String)],
    working_dir: Option<&Path>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(action, addr, env, working_dir)).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

async fn attempt(
    action: &ProbeAction,
    addr: SocketAddr,
    env: &[(String, String)],
    working_dir: Option<&Path>,
) -> Result<(), String> {
    match action {
        ProbeAction::Tcp => TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("tcp connect {addr}: {e}")),
        ProbeAction::Http { path, headers } => http_get(addr, path, headers).await,
        ProbeAction::Exec { command } => exec(command, env, working_dir).await,
        ProbeAction::Grpc { .. } => Err("grpc probes are not supported yet".to_string()),
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
