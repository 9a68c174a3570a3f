//! Small HTTP/1.1 helpers over loopback: a GET client (Envoy's admin, the control API) and the control
//! API server of `sluice up` and `sluice xds` (status and Prometheus metrics).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// GET `path` from `addr`; returns the status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// The control API's listener, with the registry its `GET /metrics` serves.
pub struct ControlListener {
    listener: TcpListener,
    metrics: Arc<Registry>,
}

impl ControlListener {
    pub fn new(listener: TcpListener, metrics: Arc<Registry>) -> Self {
        ControlListener { listener, metrics }
    }
}

/// Serves `GET /status` (the JSON `render` returns), `GET /metrics` (the registry, Prometheus text) and
/// `GET /healthz` until the task is dropped.
pub async fn serve_control<F>(control: ControlListener, render: F) -> Result<()>
where
    F: Fn() -> serde_json::Value + Clone + Send + Sync + 'static,
{
    serve(control.listener, Some(render), control.metrics).await
}

/// Serves only `GET /metrics` and `GET /healthz` (a process without a control API).
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Registry>) -> Result<()> {
    serve(listener, None::<fn() -> serde_json::Value>, metrics).await
}

async fn serve<F>(listener: TcpListener, render: Option<F>, metrics: Arc<Registry>) -> Result<()>
where
    F: Fn() -> serde_json::Value + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let render = render.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                let metrics = metrics.clone();
                async move {
                    let json = "application/json";
                    let (status, content_type, body) = match (req.method(), req.uri().path()) {
                        (&hyper::Method::GET, "/status") if render.is_some() => (
                            StatusCode::OK,
                            json,
                            serde_json::to_vec_pretty(&render.as_ref().map(|r| r()))
                                .unwrap_or_default(),
                        ),
                        (&hyper::Method::GET, "/metrics") => (
                            StatusCode::OK,
                            crate::metrics::CONTENT_TYPE,
                            crate::metrics::render(&metrics).into_bytes(),
                        ),
                        (&hyper::Method::GET, "/healthz") => {
                            (StatusCode::OK, json, b"ok\n".to_vec())
                        }
                        _ => (
                            StatusCode::NOT_FOUND,
                            json,
                            if render.is_some() {
                                b"not found: the control API serves GET /status, GET /metrics and GET /healthz\n"
                                    .to_vec()
                            } else {
                                b"not found: this port serves GET /metrics and GET /healthz\n"
                                    .to_vec()
                            },
                        ),
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header(hyper::header::CONTENT_TYPE, content_type)
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
