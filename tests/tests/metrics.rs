//! Issue 17, metrics: `sluice up` serves Prometheus text at `GET /metrics` on its control port, with
//! the xds-server's, the autoscaler's, the activator's and the broker's families under Knative's
//! names. A Service whose requests all go through the activator (target-burst-capacity -1) gets
//! requests, and a Broker gets events for a Trigger to it; the counters move by exactly what was sent
//! and the latency histograms count every request.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use prometheus_parse::{Sample, Scrape, Value};
use sluice_e2e::ports::loopback;
use sluice_e2e::{Req, Sluice};

const APP: &str = env!("CARGO_BIN_EXE_sluice-test-app");
const READY: Duration = Duration::from_secs(90);
const COUNTED: Duration = Duration::from_secs(60);

/// Requests sent to the Service, and events to the Broker.
const REQUESTS: usize = 5;
const EVENTS: usize = 3;

/// A Service always behind the activator (Knative: target-burst-capacity -1 keeps it in the path),
/// and a Broker whose Trigger delivers to that Service.
fn yaml() -> String {
    format!(
        r#"apiVersion: serving.knative.dev/v1
kind: Service
metadata: {{name: hello, namespace: default}}
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/target-burst-capacity: "-1"
    spec:
      containers:
      - image: sluice-test-app
        command: ["{APP}"]
---
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: default}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: to-hello, namespace: default}}
spec:
  broker: default
  filter: {{attributes: {{type: metrics.test}}}}
  subscriber:
    ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: hello}}
"#
    )
}

fn ready_in(status: &serde_json::Value, list: &str, name: &str) -> bool {
    status[list].as_array().is_some_and(|objects| {
        objects.iter().any(|o| {
            o["metadata"]["name"] == name
                && o["metadata"]["namespace"] == "default"
                && sluice_e2e::sluice::is_ready(o)
        })
    })
}

/// GET /metrics from the control port: its content type, and the parsed text.
async fn scrape(sluice: &Sluice) -> (String, Scrape) {
    let resp = Req::get("127.0.0.1", "/metrics")
        .timeout(Duration::from_secs(10))
        .send(loopback(sluice.ports.control))
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let content_type = resp.header("content-type").unwrap_or_default().to_string();
    let text = resp.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = Scrape::parse(lines).expect("Prometheus text parses");
    (content_type, parsed)
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// The sum of the counter or gauge samples `name` with these labels (0 when there are none).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name}: not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// The observation count (the +Inf bucket) of the histograms `name` with these labels.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .map_or(0.0, |b| b.count),
            other => panic!("{name}: not a histogram: {other:?}"),
        })
        .sum()
}

fn has(scrape: &Scrape, name: &str) -> bool {
    scrape.samples.iter().any(|s| s.metric == name)
}

/// Scrapes until `done` holds, failing with the last scrape's figures and the log.
async fn wait_metrics(sluice: &mut Sluice, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + COUNTED;
    loop {
        sluice.check_alive().expect("sluice up is running");
        let (_, scrape) = scrape(sluice).await;
        if done(&scrape) {
            return scrape;
        }
        if Instant::now() > deadline {
            let figures: Vec<String> = scrape
                .samples
                .iter()
                .filter(|s| !s.metric.starts_with("xds_"))
                .map(|s| format!("{} {:?} {:?}", s.metric, s.labels, s.value))
                .collect();
            panic!(
                "timed out waiting for {what}; metrics:\n{}\nlog:\n{}",
                figures.join("\n"),
                sluice.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const REVISION: [(&str, &str); 2] = [
    ("namespace_name", "default"),
    ("revision_name", "hello-00001"),
];
const OK: [(&str, &str); 3] = [
    ("namespace_name", "default"),
    ("revision_name", "hello-00001"),
    ("response_code", "200"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_every_part_move_with_the_traffic_sent() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    sluice.write("app.yaml", &yaml()).expect("writing the YAML");
    let deadline = Instant::now() + READY;
    loop {
        sluice.check_alive().expect("sluice up is running");
        if let Ok(status) = sluice.status().await
            && ready_in(&status, "services", "hello")
            && ready_in(&status, "brokers", "default")
            && ready_in(&status, "triggers", "to-hello")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready in time; log:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The gateway is connected and runs the config: ADS figures are there before any traffic.
    let (content_type, _) = scrape(&sluice).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    // The autoscaler reports at its decisions (every 2 s): wait for the first after the initial scale.
    let before = wait_metrics(&mut sluice, "the autoscaler's first decision", |s| {
        has(s, "autoscaler_panic_mode")
    })
    .await;
    assert_eq!(value(&before, "xds_ads_clients_connected", &[]), 1.0);
    assert!(value(&before, "xds_pushes_total", &[]) > 0.0);
    assert!(value(&before, "xds_acks_total", &[]) > 0.0);
    assert!(histogram_count(&before, "xds_propagation_latency_seconds", &[]) >= 1.0);
    assert!(value(&before, "xds_snapshot_bytes", &[]) > 0.0);
    // The autoscaler's view of the revision, under Knative's names: TBC -1 means the activator
    // stays in the path (excess burst capacity -1).
    assert!(value(&before, "autoscaler_desired_pods", &REVISION) >= 1.0);
    assert_eq!(
        value(&before, "autoscaler_excess_burst_capacity", &REVISION),
        -1.0
    );
    assert!(has(&before, "autoscaler_panic_mode"));
    assert!(has(&before, "broker_log_records"));

    // Requests through the gateway to the activator: counted and timed, each one.
    let requests_before = value(&before, "activator_request_count_total", &OK);
    let timed_before = histogram_count(&before, "activator_request_latencies", &OK);
    for i in 0..REQUESTS {
        let resp = Req::get("hello.default.localhost", "/")
            .timeout(Duration::from_secs(30))
            .send(sluice.external())
            .await
            .expect("GET hello");
        assert_eq!(resp.status, StatusCode::OK, "request {i}: {}", resp.text());
    }
    let after = wait_metrics(&mut sluice, "the requests counted", |s| {
        value(s, "activator_request_count_total", &OK) - requests_before >= REQUESTS as f64
    })
    .await;
    assert_eq!(
        value(&after, "activator_request_count_total", &OK) - requests_before,
        REQUESTS as f64,
        "one count per request"
    );
    assert_eq!(
        histogram_count(&after, "activator_request_latencies", &OK) - timed_before,
        REQUESTS as f64,
        "one latency observation per request"
    );
    assert_eq!(
        value(&after, "activator_queue_depth", &REVISION),
        0.0,
        "nothing waits once answered"
    );

    // Events through the gateway to the Broker: accepted, stored, delivered to the Trigger.
    let broker = [("namespace_name", "default"), ("broker_name", "default")];
    let accepted = [
        ("namespace_name", "default"),
        ("broker_name", "default"),
        ("event_type", "metrics.test"),
        ("response_code", "202"),
    ];
    let delivered = [
        ("namespace_name", "default"),
        ("broker_name", "default"),
        ("trigger_name", "to-hello"),
        ("filter_type", "metrics.test"),
        ("response_code", "200"),
    ];
    let trigger = [
        ("namespace_name", "default"),
        ("broker_name", "default"),
        ("trigger_name", "to-hello"),
    ];
    let ingress_host = format!(
        "broker-ingress.knative-eventing.localhost:{}",
        sluice.ports.external
    );
    for i in 0..EVENTS {
        let resp = Req::new(Method::POST, &ingress_host, "/default/default")
            .header("ce-specversion", "1.0")
            .header("ce-id", &format!("metrics-{i}"))
            .header("ce-type", "metrics.test")
            .header("ce-source", "/metrics-test")
            .header("content-type", "application/json")
            .body("{}")
            .timeout(Duration::from_secs(30))
            .send(sluice.external())
            .await
            .expect("POST an event");
        assert_eq!(
            resp.status,
            StatusCode::ACCEPTED,
            "event {i}: {}",
            resp.text()
        );
    }
    let events = wait_metrics(&mut sluice, "the events delivered", |s| {
        value(s, "mt_broker_filter_event_count_total", &delivered) >= EVENTS as f64
            && value(s, "broker_trigger_consumer_lag", &trigger) == 0.0
    })
    .await;
    assert_eq!(
        value(&events, "mt_broker_ingress_event_count_total", &accepted),
        EVENTS as f64
    );
    assert_eq!(
        histogram_count(
            &events,
            "mt_broker_ingress_event_dispatch_latencies",
            &accepted
        ),
        EVENTS as f64
    );
    assert_eq!(
        value(&events, "mt_broker_filter_event_count_total", &delivered),
        EVENTS as f64
    );
    assert_eq!(
        histogram_count(
            &events,
            "mt_broker_filter_event_dispatch_latencies",
            &delivered
        ),
        EVENTS as f64
    );
    assert_eq!(
        value(&events, "broker_delivery_attempts_total", &trigger),
        EVENTS as f64,
        "each delivered at the first attempt"
    );
    assert_eq!(value(&events, "broker_log_records", &broker), EVENTS as f64);
    assert!(value(&events, "broker_log_bytes", &broker) > 0.0);
    // The deliveries reached the Service through the activator too.
    assert_eq!(
        value(&events, "activator_request_count_total", &OK) - requests_before,
        (REQUESTS + EVENTS) as f64
    );
}

/// GET /metrics at `addr` (a standalone process), parsed; None until it answers.
async fn scrape_at(addr: std::net::SocketAddr) -> Option<Scrape> {
    let resp = Req::get("127.0.0.1", "/metrics")
        .timeout(Duration::from_secs(5))
        .send(addr)
        .await
        .ok()?;
    if resp.status != StatusCode::OK {
        return None;
    }
    let text = resp.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()
}

/// Starts `sluice ARGS`, its output in `log`, killed (group and all) when the guard drops.
fn spawn_sluice(
    bin: &std::path::Path,
    args: &[String],
    log: &std::path::Path,
) -> sluice_e2e::process::ProcessGuard {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    sluice_e2e::process::ProcessGuard::spawn(cmd, Duration::from_secs(5)).unwrap()
}

/// `sluice broker --metrics-listen` and `sluice xds` serve their own `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_broker_and_xds_serve_their_own_metrics() {
    // Built (or found) off the runtime's threads: it may run cargo.
    let bin = tokio::task::spawn_blocking(sluice_e2e::sluice::sluice_bin)
        .await
        .unwrap()
        .expect("the sluice binary");
    let root = tempfile::Builder::new()
        .prefix("sluice-metrics-")
        .tempdir()
        .unwrap();
    let config = root.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("broker.yaml"),
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {name: default, namespace: m}\n",
    )
    .unwrap();
    let (ingress, metrics) = (
        loopback(sluice_e2e::free_port()),
        loopback(sluice_e2e::free_port()),
    );
    let log = root.path().join("broker.log");
    let mut broker = spawn_sluice(
        &bin,
        &[
            "broker".into(),
            config.display().to_string(),
            "--data-dir".into(),
            root.path().join("data").display().to_string(),
            "--listen".into(),
            ingress.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ],
        &log,
    );
    // Sent until accepted (the folder is read within a second of the start).
    let mut accepted = 0;
    let deadline = Instant::now() + COUNTED;
    while accepted < EVENTS {
        assert!(
            broker.try_wait().is_none(),
            "sluice broker exited:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let resp = Req::new(Method::POST, &ingress.to_string(), "/m/default")
            .header("ce-specversion", "1.0")
            .header("ce-id", &format!("standalone-{accepted}"))
            .header("ce-type", "standalone.test")
            .header("ce-source", "/metrics-test")
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send(ingress)
            .await;
        match resp {
            Ok(r) if r.status == StatusCode::ACCEPTED => accepted += 1,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "events not accepted:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let scrape = scrape_at(metrics).await.expect("the broker's /metrics");
    let labels = [
        ("namespace_name", "m"),
        ("broker_name", "default"),
        ("event_type", "standalone.test"),
        ("response_code", "202"),
    ];
    assert_eq!(
        value(&scrape, "mt_broker_ingress_event_count_total", &labels),
        EVENTS as f64
    );
    assert_eq!(
        histogram_count(
            &scrape,
            "mt_broker_ingress_event_dispatch_latencies",
            &labels
        ),
        EVENTS as f64
    );
    broker.stop();

    // `sluice xds` on a folder: its control port has the ADS families (no gateway connected).
    let (xds_port, control) = (sluice_e2e::free_port(), sluice_e2e::free_port());
    let mut xds = spawn_sluice(
        &bin,
        &[
            "xds".into(),
            "--dir".into(),
            config.display().to_string(),
            "--xds-port".into(),
            xds_port.to_string(),
            "--control-port".into(),
            control.to_string(),
        ],
        &root.path().join("xds.log"),
    );
    let deadline = Instant::now() + COUNTED;
    let scrape = loop {
        assert!(xds.try_wait().is_none(), "sluice xds exited");
        if let Some(scrape) = scrape_at(loopback(control)).await {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "sluice xds /metrics never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(has(&scrape, "xds_ads_clients_connected"));
    assert_eq!(value(&scrape, "xds_ads_clients_connected", &[]), 0.0);
    xds.stop();
}
