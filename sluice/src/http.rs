//! Small HTTP/1.1 helpers over loopback: a GET client (Envoy's admin, the control API) and the control
//! API server of `sluice up`.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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

/// Serves `GET /status` (the JSON `render` returns) and `GET /healthz` until the task is dropped.
pub async fn serve_control<F>(listener: TcpListener, render: F) -> Result<()>
where
    F: Fn() -> serde_json::Value + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let (status, body) = match (req.method(), req.uri().path()) {
                        (&hyper::Method::GET, "/status") => (
                            StatusCode::OK,
                            serde_json::to_vec_pretty(&render()).unwrap_or_default(),
                        ),
                        (&hyper::Method::GET, "/healthz") => (StatusCode::OK, b"ok\n".to_vec()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            b"not found: the control API serves GET /status and GET /healthz\n"
                                .to_vec(),
                        ),
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header(hyper::header::CONTENT_TYPE, "application/json")
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
