//! A real HTTP server on 127.0.0.1:0 serving a Prometheus text page that tests change at will, stopped
//! when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub struct MetricsServer {
    pub addr: SocketAddr,
    page: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    pub async fn start(initial: String) -> MetricsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let page = Arc::new(Mutex::new(initial));
        let served = page.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let page = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let body = page.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MetricsServer { addr, page, task }
    }

    pub fn url(&self) -> http::Uri {
        format!("http://{}/stats/prometheus", self.addr)
            .parse()
            .unwrap()
    }

    pub fn set(&self, page: String) {
        *self.page.lock().unwrap() = page;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
