//! Backends as in Knative's conformance suite, served in-process on 127.0.0.1 free ports. Each one stops
//! (listener and every open connection) when its handle is dropped or `stop`ped.

pub mod echo;
pub mod grpc;
pub mod websocket;

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::ports::{free_port, loopback};

/// An accept loop on its own task. Connections run in a JoinSet owned by that task, so aborting it (on
/// Drop) also closes every open connection.
pub struct ServerTask {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl ServerTask {
    /// Binds 127.0.0.1 on a free port and runs `on_connection` for each accepted connection.
    pub async fn start<F, Fut>(on_connection: F) -> Result<ServerTask>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = bind_loopback().await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            connections.spawn(on_connection(stream));
                        }
                        Err(e) => {
                            eprintln!("backend {addr}: accept failed: {e}");
                            return;
                        }
                    },
                    // Reap finished connections so the set does not grow without bound.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(ServerTask {
            addr,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listener and every open connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn bind_loopback() -> Result<TcpListener> {
    // A port from free_port() can be taken by another process in between: try a few.
    let mut last = None;
    for _ in 0..5 {
        let addr = loopback(free_port());
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt")).context("binding a backend on 127.0.0.1")
}

/// Serves HTTP/1.1 and h2c (prior knowledge) on one connection, with upgrades allowed.
pub(crate) async fn serve_http<S>(stream: TcpStream, service: S)
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<crate::body::ResponseBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let _ = builder.serve_connection_with_upgrades(io, service).await;
}
