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
        Self::start_slow(Duration::ZERO).await
    }

    /// A recorder that takes `delay` to answer each event.
    async fn start_slow(delay: Duration) -> Recorder {
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
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
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

// ---- RabbitMQ: replicas of `sluice broker` sharing one RabbitMQ ----

#[path = "../../eventing/broker/tests/support/rabbitmq.rs"]
#[allow(dead_code)]
mod rabbitmq;

/// Sends events to whichever replicas are listed in `targets` (round robin) until stopped,
/// remembering what was accepted.
fn produce(
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    accepted: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..PRODUCERS)
        .map(|p| {
            let (targets, accepted, stop) = (targets.clone(), accepted.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("p{p}-{n}");
                    let addr = {
                        let t = targets.lock().unwrap();
                        t[n % t.len()]
                    };
                    n += 1;
                    if post_event(addr, &id).await == Some(StatusCode::ACCEPTED) {
                        accepted.lock().unwrap().insert(id);
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

/// The Broker `NAMESPACE/default` of class RabbitMQBroker with its RabbitmqBrokerConfig (quorum) and
/// connection Secret for a node on `amqp_port`: YAML documents from `kind: Broker` on (the caller
/// writes the Broker's apiVersion line before it).
fn rabbitmq_broker_yaml(namespace: &str, amqp_port: u16) -> String {
    format!(
        r#"kind: Broker
metadata:
  name: default
  namespace: {namespace}
  annotations: {{eventing.knative.dev/broker.class: RabbitMQBroker}}
spec:
  config: {{apiVersion: eventing.knative.dev/v1alpha1, kind: RabbitmqBrokerConfig, name: rabbitmq}}
---
apiVersion: eventing.knative.dev/v1alpha1
kind: RabbitmqBrokerConfig
metadata: {{name: rabbitmq, namespace: {namespace}}}
spec:
  rabbitmqClusterReference: {{connectionSecret: {{name: rabbitmq}}}}
  queueType: quorum
---
apiVersion: v1
kind: Secret
metadata: {{name: rabbitmq, namespace: {namespace}}}
stringData: {{uri: "amqp://127.0.0.1:{amqp_port}", username: guest, password: guest}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replicas_come_and_go_and_a_kill_9_loses_no_accepted_event() {
    let bin = tokio::task::spawn_blocking(sluice_bin)
        .await
        .unwrap()
        .unwrap();
    let node = tokio::task::spawn_blocking(|| rabbitmq::RabbitNode::start("replicas"))
        .await
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("sluice-broker-rabbitmq-")
        .tempdir()
        .unwrap();
    let config = root.path().join("config");
    std::fs::create_dir(&config).unwrap();
    // Slow enough that the killed replica holds unacked events when it dies.
    let recorder = Recorder::start_slow(Duration::from_millis(20)).await;
    std::fs::write(
        config.join("broker.yaml"),
        format!(
            r#"apiVersion: eventing.knative.dev/v1
{}---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: all, namespace: crash}}
spec:
  broker: default
  subscriber: {{uri: "http://{}/"}}
"#,
            rabbitmq_broker_yaml("crash", node.amqp_port()),
            recorder.addr
        ),
    )
    .unwrap();
    let replica = |name: &str| {
        let port = free_port();
        let data = root.path().join(name);
        let log = root.path().join(format!("{name}.log"));
        let guard = start_broker(&bin, &config, &data, port, &log);
        (guard, loopback(port), log)
    };
    let (mut a, a_addr, a_log) = replica("a");
    let (mut b, b_addr, b_log) = replica("b");
    wait_accepting(&mut a, a_addr, &a_log, "probe-a").await;
    wait_accepting(&mut b, b_addr, &b_log, "probe-b").await;

    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(Mutex::new(vec![a_addr, b_addr]));
    let producers = produce(targets.clone(), accepted.clone(), stop.clone());
    let until = |n: usize| {
        let accepted = accepted.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while accepted.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "producers got too few 202s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    until(BEFORE_KILL).await;

    // kill -9 of one replica while events flow; the producers go on with the other.
    let killed = a.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    assert!(killed.is_some(), "replica a did not die on SIGKILL");
    *targets.lock().unwrap() = vec![b_addr];
    until(2 * BEFORE_KILL).await;
    // A replica joins while events flow.
    let (mut c, c_addr, c_log) = replica("c");
    wait_accepting(&mut c, c_addr, &c_log, "probe-c").await;
    *targets.lock().unwrap() = vec![b_addr, c_addr];
    until(3 * BEFORE_KILL).await;
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }

    let mut want = accepted.lock().unwrap().clone();
    want.extend(["probe-a", "probe-b", "probe-c"].map(String::from));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = recorder.ids();
        let missing: Vec<&String> = want.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {} accepted events never delivered, e.g. {:?}\nreplica b log:\n{}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(10)],
                std::fs::read_to_string(&b_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliveries = recorder.ids.lock().unwrap().len();
    eprintln!(
        "{} accepted, {} deliveries, {} duplicates (redelivered after the kill)",
        want.len(),
        deliveries,
        deliveries - recorder.ids().len()
    );
    for mut r in [b, c] {
        let _ = r.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    }
}

// ---- `sluice up`: the broker behind the real gateway ----

use sluice_e2e::Sluice;

const APP: &str = env!("CARGO_BIN_EXE_sluice-test-app");
const READY: Duration = Duration::from_secs(90);

/// The broker ingress's host on the gateway.
fn ingress_host(sluice: &Sluice) -> String {
    format!(
        "broker-ingress.knative-eventing.localhost:{}",
        sluice.ports.external
    )
}

/// Waits until `pred` holds on `sluice status`, failing with the status and the log.
async fn wait_status(
    sluice: &mut Sluice,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + READY;
    loop {
        sluice.check_alive().expect("sluice up is running");
        if let Ok(status) = sluice.status().await {
            if pred(&status) {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status:\n{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_in(status: &serde_json::Value, list: &str, namespace: &str, name: &str) -> bool {
    status[list].as_array().is_some_and(|objects| {
        objects.iter().any(|o| {
            o["metadata"]["name"] == name
                && o["metadata"]["namespace"] == namespace
                && sluice_e2e::sluice::is_ready(o)
        })
    })
}

/// A Broker `default/default` whose Trigger (no `delivery`) goes to the Knative Service `sink`,
/// which takes `sleep_ms` per event and appends each ce-id it answers to `record`.
fn broker_to_service(record: &Path, sleep_ms: u64) -> String {
    format!(
        r#"apiVersion: serving.knative.dev/v1
kind: Service
metadata: {{name: sink, namespace: default}}
spec:
  template:
    spec:
      containers:
      - image: sluice-test-app
        command: ["{APP}"]
        env:
        - {{name: APP_SLEEP_MS, value: "{sleep_ms}"}}
        - {{name: APP_RECORD_FILE, value: "{record}"}}
---
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: default}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: to-sink, namespace: default}}
spec:
  broker: default
  subscriber:
    ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: sink}}
"#,
        record = record.display()
    )
}

fn recorded(record: &Path) -> HashSet<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn post_through_gateway(
    sluice: &Sluice,
    id: &str,
    body: Bytes,
) -> anyhow::Result<sluice_e2e::Resp> {
    Req::new(Method::POST, &ingress_host(sluice), "/default/default")
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-type", "restart.test")
        .header("ce-source", "/producer")
        .header("content-type", "application/octet-stream")
        .body(body)
        .timeout(Duration::from_secs(20))
        .send(sluice.external())
        .await
}

/// Events accepted (202) before `sluice up` is stopped with `signal`, for a slow Service subscriber
/// whose Trigger has no `delivery`: after a restart on the same state folder, every one of them is
/// delivered (at least once).
async fn every_accepted_event_is_delivered_across_a_restart(signal: libc::c_int) {
    const EVENTS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("delivered.txt");
    let mut sluice = Sluice::start().await.unwrap();
    sluice
        .write("eventing.yaml", &broker_to_service(&record, 1000))
        .unwrap();
    wait_status(
        &mut sluice,
        "the sink Service, the Broker and the Trigger ready",
        |s| {
            ready_in(s, "services", "default", "sink")
                && ready_in(s, "brokers", "default", "default")
                && ready_in(s, "triggers", "default", "to-sink")
        },
    )
    .await;
    sluice
        .wait_ready("knative-eventing", "broker-ingress", READY)
        .await
        .unwrap();

    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sluice = Arc::new(tokio::sync::Mutex::new(sluice));
    let mut producers = Vec::new();
    for p in 0..4 {
        let (accepted, sluice) = (accepted.clone(), sluice.clone());
        producers.push(tokio::spawn(async move {
            let sluice = sluice.lock().await;
            for n in (p..EVENTS).step_by(4) {
                let id = format!("e{n}");
                let resp = post_through_gateway(&sluice, &id, Bytes::from_static(b"x"))
                    .await
                    .unwrap();
                assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
                accepted.lock().unwrap().insert(id);
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut sluice = Arc::try_unwrap(sluice).ok().unwrap().into_inner();
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), EVENTS);

    // The subscriber takes 1 s per event: most are still queued when sluice up stops.
    assert!(
        sluice.terminate(signal, Duration::from_secs(30)).is_some(),
        "sluice up did not stop on signal {signal}"
    );
    let before = recorded(&record).len();
    assert!(
        before < EVENTS,
        "all {EVENTS} events were delivered before the stop: the test proves nothing"
    );
    sluice.restart().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = recorded(&record);
        let missing: Vec<&String> = accepted.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} accepted events never delivered ({before} before the stop), e.g. {:?}\nlog:\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_up_sigterm_restart_delivers_every_accepted_event() {
    every_accepted_event_is_delivered_across_a_restart(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_up_kill_9_restart_delivers_every_accepted_event() {
    every_accepted_event_is_delivered_across_a_restart(libc::SIGKILL).await;
}

/// An event larger than the ingress's limit (4 MiB), sent through the gateway: always 413 with the
/// reason, never a 503 from a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_through_the_gateway_get_413_with_the_reason() {
    let mut sluice = Sluice::start().await.unwrap();
    sluice
        .write(
            "broker.yaml",
            "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {name: default, namespace: default}\n",
        )
        .unwrap();
    wait_status(&mut sluice, "the Broker ready", |s| {
        ready_in(s, "brokers", "default", "default")
    })
    .await;
    sluice
        .wait_ready("knative-eventing", "broker-ingress", READY)
        .await
        .unwrap();
    let body = Bytes::from(vec![b'x'; 5 * 1024 * 1024]);
    let mut answers = Vec::new();
    for i in 0..20 {
        let answer = match post_through_gateway(&sluice, &format!("big-{i}"), body.clone()).await {
            Ok(resp) => format!("{} {}", resp.status.as_u16(), resp.text().trim()),
            Err(e) => format!("error: {e:#}"),
        };
        answers.push(answer);
    }
    let wrong: Vec<&String> = answers
        .iter()
        .filter(|a| !(a.starts_with("413 ") && a.contains("larger than")))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of 20 not 413 with the reason: {wrong:?}",
        wrong.len()
    );
}

/// `sluice up` serves a `RabbitMQBroker` Broker from unchanged Knative YAML (Broker, RabbitmqBrokerConfig,
/// Secret, Trigger to a Knative Service): events posted through the gateway reach the Service; with
/// RabbitMQ stopped the Broker is Ready=False (RabbitMQUnavailable) and the gateway answers 503 with the
/// reason; events still queued in RabbitMQ when `sluice up` stops are delivered after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_up_serves_a_rabbitmq_broker_through_stop_and_restart() {
    const EVENTS: usize = 60;
    let node = Arc::new(
        tokio::task::spawn_blocking(|| rabbitmq::RabbitNode::start("sluice-up"))
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("delivered.txt");
    // The log Broker of broker_to_service, made a RabbitMQ one; an ordered Trigger (parallelism 1:
    // one event at a time) to a sink that takes 200 ms per event, so that most events are still
    // queued in RabbitMQ when sluice up stops.
    let yaml = broker_to_service(&record, 200)
        .replace(
            "metadata: {name: to-sink, namespace: default}",
            "metadata:\n  name: to-sink\n  namespace: default\n  \
             annotations: {rabbitmq.eventing.knative.dev/parallelism: \"1\"}",
        )
        .replace(
            "kind: Broker\nmetadata: {name: default, namespace: default}\n",
            &rabbitmq_broker_yaml("default", node.amqp_port()),
        );
    assert!(
        yaml.contains("RabbitMQBroker") && yaml.contains("parallelism"),
        "the Broker or the Trigger was not replaced"
    );
    let mut sluice = Sluice::start().await.unwrap();
    sluice.write("eventing.yaml", &yaml).unwrap();
    let all_ready = |s: &serde_json::Value| {
        ready_in(s, "services", "default", "sink")
            && ready_in(s, "brokers", "default", "default")
            && ready_in(s, "triggers", "default", "to-sink")
    };
    wait_status(
        &mut sluice,
        "the Service, the RabbitMQ Broker and the Trigger ready",
        all_ready,
    )
    .await;
    sluice
        .wait_ready("knative-eventing", "broker-ingress", READY)
        .await
        .unwrap();

    let mut accepted = HashSet::new();
    for n in 0..EVENTS {
        let id = format!("r{n}");
        let resp = post_through_gateway(&sluice, &id, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
        accepted.insert(id);
    }
    // Stopped while most events wait in RabbitMQ (the sink takes 100 ms each), then started again.
    assert!(
        sluice
            .terminate(libc::SIGTERM, Duration::from_secs(30))
            .is_some(),
        "sluice up did not stop on SIGTERM"
    );
    let before = recorded(&record).len();
    assert!(
        before < EVENTS,
        "all {EVENTS} events were delivered before the stop: the test proves nothing"
    );
    sluice.restart().await.unwrap();
    wait_status(
        &mut sluice,
        "everything ready again after the restart",
        all_ready,
    )
    .await;

    // RabbitMQ down: the Broker says so, and the gateway answers 503 with the reason.
    tokio::task::spawn_blocking({
        let node = node.clone();
        move || node.stop()
    })
    .await
    .unwrap();
    let status = wait_status(
        &mut sluice,
        "the Broker not ready while RabbitMQ is down",
        |s| {
            s["brokers"].as_array().is_some_and(|brokers| {
                brokers.iter().any(|b| {
                    b["metadata"]["name"] == "default"
                        && sluice_e2e::sluice::condition(b, "Ready").is_some_and(|c| {
                            c.status == "False" && c.reason == "RabbitMQUnavailable"
                        })
                })
            })
        },
    )
    .await;
    let broker = status["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["metadata"]["name"] == "default")
        .unwrap();
    let message = sluice_e2e::sluice::condition(broker, "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains("127.0.0.1"),
        "message names the address: {message}"
    );
    let resp = post_through_gateway(&sluice, "while-down", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
    assert!(
        resp.text().to_lowercase().contains("rabbitmq"),
        "the 503 says why: {}",
        resp.text()
    );

    // RabbitMQ back: Ready again by itself, new events accepted, and every accepted event delivered.
    tokio::task::spawn_blocking({
        let node = node.clone();
        move || node.restart()
    })
    .await
    .unwrap();
    wait_status(
        &mut sluice,
        "the Broker ready again after RabbitMQ returned",
        all_ready,
    )
    .await;
    let deadline = Instant::now() + READY;
    loop {
        match post_through_gateway(&sluice, "after", Bytes::from_static(b"x")).await {
            Ok(resp) if resp.status == StatusCode::ACCEPTED => break,
            other => assert!(
                Instant::now() < deadline,
                "no 202 after RabbitMQ returned: {:?}\nlog:\n{}",
                other.map(|r| format!("{} {}", r.status, r.text())),
                sluice.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    accepted.insert("after".to_string());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = recorded(&record);
        let missing: Vec<&String> = accepted.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted events never delivered ({before} before the stop), e.g. {:?}\nlog:\n{}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(10)],
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // sluice up stops before the node (dropped at the end, which stops it).
    drop(sluice);
}
