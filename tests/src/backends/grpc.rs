//! A gRPC-style bidirectional streaming echo over h2c (Knative's "grpc-ping" test image, PingStream):
//! gRPC framing (a 5-byte prefix: compressed flag + big-endian length, then the message), content-type
//! `application/grpc`, and `grpc-status` trailers. Each message is answered at once with the message
//! followed by the backend's suffix. Messages are raw bytes: the gateway never looks inside them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ServerTask, serve_http};
use crate::body::{ChannelBody, ResponseBody, channel, full};

pub const GRPC_CONTENT_TYPE: &str = "application/grpc";
/// Knative's ping service method, used by default.
pub const PING_STREAM_PATH: &str = "/ping.PingService/PingStream";

/// One gRPC length-prefixed message.
pub fn encode_message(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(msg.len()).expect("messages under 4 GiB"));
    out.put_slice(msg);
    out.freeze()
}

/// Takes one complete message off the front of `buf`, if there is one.
pub fn decode_message(buf: &mut BytesMut) -> Result<Option<Bytes>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        bail!(
            "compressed gRPC messages are not supported (flag {})",
            buf[0]
        );
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

struct Shared {
    suffix: String,
    streams: AtomicU64,
}

/// A running gRPC streaming echo backend; stops on Drop.
pub struct GrpcEchoServer {
    shared: Arc<Shared>,
    server: ServerTask,
}

impl GrpcEchoServer {
    /// Answers each message `m` with `m` + `suffix` (Knative's tests use suffixes like "- pong").
    pub async fn start(suffix: &str) -> Result<GrpcEchoServer> {
        let shared = Arc::new(Shared {
            suffix: suffix.to_string(),
            streams: AtomicU64::new(0),
        });
        let for_server = shared.clone();
        let server = ServerTask::start(move |stream| {
            let shared = for_server.clone();
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            serve_http(stream, service)
        })
        .await?;
        Ok(GrpcEchoServer { shared, server })
    }

    pub fn suffix(&self) -> &str {
        &self.shared.suffix
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// How many streams (calls) reached this backend.
    pub fn streams(&self) -> u64 {
        self.shared.streams.load(Ordering::SeqCst)
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(GRPC_CONTENT_TYPE));
    if !is_grpc {
        return Ok(Response::builder()
            .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .body(full("want content-type application/grpc\n"))
            .expect("static response"));
    }
    shared.streams.fetch_add(1, Ordering::SeqCst);
    let (tx, body) = ChannelBody::new(16);
    let mut incoming = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let (status, message) = loop {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // request trailers carry nothing for us
                    };
                    buf.extend_from_slice(&data);
                    loop {
                        match decode_message(&mut buf) {
                            Ok(Some(msg)) => {
                                let mut reply = msg.to_vec();
                                reply.extend_from_slice(shared.suffix.as_bytes());
                                if tx.send(Frame::data(encode_message(&reply))).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                send_trailers(&tx, "12", &e.to_string()).await;
                                return;
                            }
                        }
                    }
                }
                Some(Err(e)) => break ("13", e.to_string()),
                None => break ("0", String::new()),
            }
        };
        send_trailers(&tx, status, &message).await;
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE)
        .body(channel(body))
        .expect("valid response parts"))
}

async fn send_trailers(tx: &mpsc::Sender<Frame<Bytes>>, status: &str, message: &str) {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "grpc-status",
        HeaderValue::from_str(status).expect("digits"),
    );
    if !message.is_empty()
        && let Ok(v) = HeaderValue::from_str(message)
    {
        trailers.insert("grpc-message", v);
    }
    let _ = tx.send(Frame::trailers(trailers)).await;
}

/// An h2c (prior knowledge) connection for gRPC-style streams.
pub struct GrpcClient {
    sender: hyper::client::conn::http2::SendRequest<ChannelBody>,
    conn: JoinHandle<()>,
    timeout: Duration,
}

impl GrpcClient {
    /// Connects to `addr` (the gateway, or a backend directly).
    pub async fn connect(addr: SocketAddr) -> Result<GrpcClient> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .with_context(|| format!("h2c handshake with {addr}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(GrpcClient {
            sender,
            conn,
            timeout: Duration::from_secs(20),
        })
    }

    /// Opens a bidirectional stream to `path` with `:authority` `authority`.
    pub async fn stream(&mut self, authority: &str, path: &str) -> Result<GrpcStream> {
        let open = async {
            self.sender.ready().await.context("h2c connection closed")?;
            let (tx, body) = ChannelBody::new(16);
            let req = Request::post(format!("http://{authority}{path}"))
                .header(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE)
                .header(http::header::TE, "trailers")
                .body(body)
                .context("gRPC request")?;
            let resp = self.sender.send_request(req).await.context("gRPC call")?;
            let (parts, body) = resp.into_parts();
            if parts.status != StatusCode::OK {
                let text = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                bail!(
                    "gRPC call to {authority}{path} answered {}: {}",
                    parts.status,
                    String::from_utf8_lossy(&text)
                );
            }
            Ok(GrpcStream {
                tx: Some(tx),
                body,
                buf: BytesMut::new(),
                trailers: None,
                timeout: self.timeout,
            })
        };
        tokio::time::timeout(self.timeout, open)
            .await
            .with_context(|| {
                format!(
                    "gRPC call to {authority}{path}: no response headers within {:?}",
                    self.timeout
                )
            })?
    }
}

impl Drop for GrpcClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// One bidirectional gRPC-style stream.
pub struct GrpcStream {
    tx: Option<mpsc::Sender<Frame<Bytes>>>,
    body: Incoming,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    timeout: Duration,
}

impl GrpcStream {
    pub async fn send(&mut self, msg: &[u8]) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .context("the request side is already closed")?;
        tx.send(Frame::data(encode_message(msg)))
            .await
            .map_err(|_| anyhow::anyhow!("gRPC stream: the request body is gone (stream reset?)"))
    }

    /// The next message, or None once the server ended the stream (trailers read).
    pub async fn recv(&mut self) -> Result<Option<Bytes>> {
        let next = async {
            loop {
                if let Some(msg) = decode_message(&mut self.buf)? {
                    return Ok(Some(msg));
                }
                if self.trailers.is_some() {
                    return Ok(None);
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => self.buf.extend_from_slice(&data),
                        Err(frame) => {
                            self.trailers = Some(frame.into_trailers().unwrap_or_default());
                        }
                    },
                    Some(Err(e)) => return Err(e).context("gRPC stream receive"),
                    None => {
                        self.trailers.get_or_insert_with(HeaderMap::new);
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout, next)
            .await
            .with_context(|| format!("gRPC stream: no message within {:?}", self.timeout))?
    }

    /// Sends `msg` and returns the answer as text.
    pub async fn round_trip(&mut self, msg: &str) -> Result<String> {
        self.send(msg.as_bytes()).await?;
        let reply = self
            .recv()
            .await?
            .with_context(|| format!("gRPC stream ended before answering {msg:?}"))?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Half-closes the request side and returns the server's `grpc-status`.
    pub async fn finish(mut self) -> Result<String> {
        self.tx = None;
        while self.recv().await?.is_some() {}
        let trailers = self.trailers.unwrap_or_default();
        trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .context("gRPC stream ended without a grpc-status trailer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_waits_for_whole_messages() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode_message(b"hello"));
        let second = encode_message(b"world!");
        buf.extend_from_slice(&second[..4]);
        assert_eq!(
            decode_message(&mut buf).unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(decode_message(&mut buf).unwrap(), None);
        buf.extend_from_slice(&second[4..]);
        assert_eq!(
            decode_message(&mut buf).unwrap().as_deref(),
            Some(&b"world!"[..])
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn compressed_messages_are_refused() {
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 1, b'x'][..]);
        assert!(decode_message(&mut buf).is_err());
    }
}
