//! The real `sluice broker` binary under a crash: a producer sends events while the broker is killed
//! with SIGKILL, the broker is started again on the same data folder, and every event that was
//! answered 202 must reach the subscriber at least once (a 202 is only sent once the event is durable).

use std::collections::HashSet;
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_e2e::ports::loopback;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::sluice::sluice_bin;
use sluice_e2e::{Req, free_port};
use tokio::net::TcpListener;

/// Events the producers must have had accepted before the kill.
const BEFORE_KILL: usize = 300;
/// Producers sending at once.
const PRODUCERS: usize = 4;

/// Records the ce-id of every event delivered to it.
struct Recorder {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ids: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = ids.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let id = req
                                .headers()
                                .get("ce-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let _ = req.into_body().collect().await;
                            seen.lock().unwrap().push(id);
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { addr, ids, task }
    }

    fn ids(&self) -> HashSet<String> {
        self.ids.lock().unwrap().iter().cloned().collect()
    }
}

fn start_broker(bin: &Path, config: &Path, data: &Path, port: u16, log: &Path) -> ProcessGuard {
    let log = File::options().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("broker")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(
            "SLUICE_LOG",
            std::env::var("SLUICE_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    ProcessGuard::spawn(cmd, Duration::from_secs(5)).unwrap()
}

async fn post_event(addr: SocketAddr, id: &str) -> Option<StatusCode> {
    Req::new(Method::POST, &addr.to_string(), "/crash/default")
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-type", "crash.test")
        .header("ce-source", "/producer")
        .header("content-type", "application/json")
        .body(format!("{{\"id\":\"{id}\"}}"))
        .timeout(Duration::from_secs(5))
        .send(addr)
        .await
        .ok()
        .map(|r| r.status)
}

/// Waits until the broker accepts an event (the folder has been read), failing if it exits.
async fn wait_accepting(broker: &mut ProcessGuard, addr: SocketAddr, log: &Path, probe: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = broker.try_wait() {
            panic!(
                "sluice broker exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if post_event(addr, probe).await == Some(StatusCode::ACCEPTED) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sluice broker did not accept events within 60 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_delivered_after_a_kill_9() {
    let bin = tokio::task::spawn_blocking(sluice_bin)
        .await
        .unwrap()
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("sluice-broker-crash-")
        .tempdir()
        .unwrap();
    let config = root.path().join("config");
    let data = root.path().join("data");
    let log = root.path().join("broker.log");
    std::fs::create_dir(&config).unwrap();
    let recorder = Recorder::start().await;
    std::fs::write(
        config.join("broker.yaml"),
        format!(
            r#"apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: crash}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: all, namespace: crash}}
spec:
  broker: default
  subscriber: {{uri: "http://{}/"}}
"#,
            recorder.addr
        ),
    )
    .unwrap();
    let port = free_port();
    let addr = loopback(port);
    let mut broker = start_broker(&bin, &config, &data, port, &log);
    wait_accepting(&mut broker, addr, &log, "probe-1").await;

    // Producers send until told to stop, remembering what was accepted.
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let accepted = accepted.clone();
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("p{p}-{n}");
                n += 1;
                if post_event(addr, &id).await == Some(StatusCode::ACCEPTED) {
                    accepted.lock().unwrap().insert(id);
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < BEFORE_KILL {
        assert!(Instant::now() < deadline, "producers got too few 202s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // kill -9 while the producers are sending.
    let killed = broker.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    assert!(killed.is_some(), "the broker did not die on SIGKILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    drop(broker);

    let mut broker = start_broker(&bin, &config, &data, port, &log);
    wait_accepting(&mut broker, addr, &log, "probe-2").await;

    let mut want = accepted.lock().unwrap().clone();
    want.insert("probe-1".into());
    want.insert("probe-2".into());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = recorder.ids();
        let missing: Vec<&String> = want.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {} accepted events never delivered, e.g. {:?}\nbroker log:\n{}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(10)],
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = broker.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
}
