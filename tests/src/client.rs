//! Requests to the gateway: HTTP/1.1 or h2c (prior knowledge) over TCP, or HTTP/1.1 over TLS with SNI,
//! always to a given address with a given Host (no DNS: the gateway routes by Host).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::backends::echo::Echo;
use crate::tls::TlsMaterial;

/// The protocol spoken to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
}

/// A request to send to the gateway.
#[derive(Debug, Clone)]
pub struct Req {
    method: Method,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    proto: Proto,
    timeout: Duration,
}

impl Req {
    /// GET `path` (with query; "" means "/") with Host `host`.
    pub fn get(host: &str, path: &str) -> Req {
        Req::new(Method::GET, host, path)
    }

    pub fn new(method: Method, host: &str, path: &str) -> Req {
        Req {
            method,
            host: host.to_string(),
            path: if path.is_empty() {
                "/".to_string()
            } else {
                path.to_string()
            },
            headers: Vec::new(),
            body: Bytes::new(),
            proto: Proto::Http1,
            timeout: Duration::from_secs(15),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }

    pub fn proto(mut self, proto: Proto) -> Req {
        self.proto = proto;
        self
    }

    pub fn h2c(self) -> Req {
        self.proto(Proto::H2c)
    }

    /// Bounds the whole exchange, body included (default 15 s).
    pub fn timeout(mut self, timeout: Duration) -> Req {
        self.timeout = timeout;
        self
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn to_request(&self, proto: Proto) -> Result<Request<Full<Bytes>>> {
        let mut builder = match proto {
            // HTTP/1.1: origin-form target and a Host header.
            Proto::Http1 => Request::builder()
                .method(self.method.clone())
                .uri(&self.path)
                .header(http::header::HOST, &self.host),
            // HTTP/2: the host travels as :authority.
            Proto::H2c => Request::builder()
                .method(self.method.clone())
                .version(Version::HTTP_2)
                .uri(format!("http://{}{}", self.host, self.path)),
        };
        for (k, v) in &self.headers {
            builder = builder.header(k, v);
        }
        builder
            .body(Full::new(self.body.clone()))
            .with_context(|| format!("building the request for {}{}", self.host, self.path))
    }

    /// Sends on a fresh TCP connection to `addr`.
    pub async fn send(&self, addr: SocketAddr) -> Result<Resp> {
        let mut conn = Conn::connect(addr, self.proto).await?;
        conn.send(self).await
    }

    /// Sends over TLS to `addr` with SNI = this request's Host, trusting `tls`'s CA (HTTP/1.1).
    pub async fn send_tls(&self, addr: SocketAddr, tls: &TlsMaterial) -> Result<Resp> {
        let exchange = async {
            let config = tls.client_config(&[b"http/1.1"])?;
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let name = ServerName::try_from(self.host.clone())
                .with_context(|| format!("{:?} is not a valid SNI name", self.host))?;
            let tls_stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .with_context(|| format!("TLS handshake with {addr} for SNI {}", self.host))?;
            let (mut sender, task) = handshake(TokioIo::new(tls_stream), Proto::Http1).await?;
            let resp = sender.send(self.to_request(Proto::Http1)?).await;
            task.abort();
            resp
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .with_context(|| {
                format!(
                    "https://{}{} via {addr}: no answer within {:?}",
                    self.host, self.path, self.timeout
                )
            })?
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echo backend's description of the request, from a 200 answer.
    pub fn echo(&self) -> Result<Echo> {
        if self.status != StatusCode::OK {
            bail!(
                "want 200 from the echo backend, got {}: {}",
                self.status,
                self.text()
            );
        }
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not an echo answer ({}): {}", self.status, self.text()))
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Resp> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.context("connection closed")?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.context("connection closed")?;
                s.send_request(req).await
            }
        }
        .context("sending the request")?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

async fn handshake<I>(io: I, proto: Proto) -> Result<(Sender, JoinHandle<()>)>
where
    I: Read + Write + Unpin + Send + 'static,
{
    Ok(match proto {
        Proto::Http1 => {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 handshake")?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Sender::H1(sender), task)
        }
        Proto::H2c => {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .context("h2c handshake")?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Sender::H2(sender), task)
        }
    })
}

/// A kept-alive connection to one address; reconnects when the peer closed it between requests.
pub struct Conn {
    addr: SocketAddr,
    proto: Proto,
    sender: Option<(Sender, JoinHandle<()>)>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, proto: Proto) -> Result<Conn> {
        let mut conn = Conn {
            addr,
            proto,
            sender: None,
        };
        conn.reconnect().await?;
        Ok(conn)
    }

    async fn reconnect(&mut self) -> Result<()> {
        if let Some((_, task)) = self.sender.take() {
            task.abort();
        }
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        self.sender = Some(handshake(TokioIo::new(stream), self.proto).await?);
        Ok(())
    }

    /// Sends `req` (its protocol is this connection's) within the request's timeout.
    pub async fn send(&mut self, req: &Req) -> Result<Resp> {
        let exchange = async {
            if self.sender.as_ref().is_none_or(|(s, _)| s.is_closed()) {
                self.reconnect().await?;
            }
            let (sender, _) = self.sender.as_mut().expect("connected above");
            sender.send(req.to_request(self.proto)?).await
        };
        let result = tokio::time::timeout(req.timeout, exchange)
            .await
            .with_context(|| {
                format!(
                    "{}{} via {}: no answer within {:?}",
                    req.host, req.path, self.addr, req.timeout
                )
            })
            .and_then(|r| {
                r.with_context(|| {
                    format!("{} {}{} via {}", req.method, req.host, req.path, self.addr)
                })
            });
        if result.is_err() {
            // Never reuse a connection in an unknown state.
            if let Some((_, task)) = self.sender.take() {
                task.abort();
            }
        }
        result
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some((_, task)) = self.sender.take() {
            task.abort();
        }
    }
}
