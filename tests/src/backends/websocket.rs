//! The websocket echo backend (Knative's "wsserver" test image): answers each text message with the
//! message, a space and the backend's name, so a client behind a split can tell which backend it reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::ServerTask;

/// A running websocket echo backend; stops on Drop.
pub struct WebsocketEchoServer {
    name: String,
    connections: Arc<AtomicU64>,
    server: ServerTask,
}

impl WebsocketEchoServer {
    pub async fn start(name: &str) -> Result<WebsocketEchoServer> {
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        let reply_suffix = name.to_string();
        let server = ServerTask::start(move |stream| {
            let suffix = reply_suffix.clone();
            let counter = counter.clone();
            async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(text) => Message::text(format!("{} {suffix}", text.as_str())),
                        Message::Binary(data) => Message::Binary(data),
                        Message::Close(_) => break,
                        // tungstenite answers pings itself.
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            }
        })
        .await?;
        Ok(WebsocketEchoServer {
            name: name.to_string(),
            connections,
            server,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// How many websocket handshakes completed here.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A websocket client connected through `addr` (the gateway) with the given Host.
pub struct WebsocketClient {
    ws: WebSocketStream<TcpStream>,
    timeout: Duration,
}

impl WebsocketClient {
    /// Opens a TCP connection to `addr` and upgrades `ws://host/path` on it.
    pub async fn connect(addr: SocketAddr, host: &str, path: &str) -> Result<WebsocketClient> {
        let timeout = Duration::from_secs(20);
        let attempt = async {
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let request = format!("ws://{host}{path}")
                .into_client_request()
                .context("websocket request")?;
            let (ws, response) = tokio_tungstenite::client_async(request, stream)
                .await
                .with_context(|| {
                    format!("websocket upgrade of ws://{host}{path} through {addr}")
                })?;
            anyhow::ensure!(
                response.status() == http::StatusCode::SWITCHING_PROTOCOLS,
                "websocket upgrade answered {}",
                response.status()
            );
            Ok(ws)
        };
        let ws = tokio::time::timeout(timeout, attempt)
            .await
            .with_context(|| {
                format!("websocket to {host} through {addr}: no upgrade within {timeout:?}")
            })??;
        Ok(WebsocketClient { ws, timeout })
    }

    /// Sends `text` and returns the next text message.
    pub async fn round_trip(&mut self, text: &str) -> Result<String> {
        let exchange = async {
            self.ws
                .send(Message::text(text))
                .await
                .context("websocket send")?;
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(reply))) => return Ok(reply.as_str().to_string()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(other)) => bail!("websocket: unexpected message {other:?}"),
                    Some(Err(e)) => return Err(e).context("websocket receive"),
                    None => bail!("websocket closed before answering {text:?}"),
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .with_context(|| {
                format!("websocket: no answer to {text:?} within {:?}", self.timeout)
            })?
    }

    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await.context("websocket close")
    }
}
