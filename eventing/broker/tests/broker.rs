//! The broker service end to end in one process: real HTTP producers and subscribers on 127.0.0.1,
//! real segment logs in a temp folder. The behaviours listed in `on_both_backends!` run twice: on
//! the embedded log and on a real RabbitMQ node (one per test binary, a vhost per test).

#[path = "support/rabbitmq.rs"]
mod rabbitmq;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_broker::{BrokerOptions, BrokerService, EventingObjects};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// Where the Brokers of a test keep their events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Log,
    RabbitMq,
}

tokio::task_local! {
    static BACKEND: Backend;
}

fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Log)
}

/// Runs each named test (an `async fn()`) on both backends: `on_log::name` and `on_rabbitmq::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_log {
            $(
                #[tokio::test]
                async fn $name() {
                    super::BACKEND.scope(super::Backend::Log, super::$name()).await
                }
            )*
        }
        mod on_rabbitmq {
            $(
                #[tokio::test]
                async fn $name() {
                    super::BACKEND.scope(super::Backend::RabbitMq, super::$name()).await
                }
            )*
        }
    };
}

on_both_backends!(
    ingress_answers_as_knative_does,
    filters_of_every_dialect_select_events,
    failed_deliveries_are_retried_until_success,
    exhausted_retries_go_to_the_dead_letter_sink_with_error_extensions,
    client_errors_are_not_retried,
    replies_go_back_into_the_broker,
    ttl_stops_a_reply_loop,
    ordered_trigger_delivers_in_log_order_one_at_a_time,
    unordered_trigger_delivers_everything,
    removed_trigger_stops_receiving,
    pingsource_fires_on_schedule_to_a_uri_and_to_a_broker,
    a_trigger_without_delivery_gets_config_br_defaults_retry,
);

static VHOSTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A vhost of its own on the shared node, so tests that reuse names do not share queues.
fn rabbitmq_vhost() -> String {
    let node = rabbitmq::RabbitNode::shared();
    let n = VHOSTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let vhost = format!("test-{}-{n}", std::process::id());
    node.rabbitmqctl(&["add_vhost", &vhost]);
    node.rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", node.amqp_port())
}

/// Makes every Broker of `objects` a RabbitMQ Broker on `uri` (its RabbitmqBrokerConfig and
/// connection Secret added beside it).
fn into_rabbitmq(objects: &mut EventingObjects, uri: &str) {
    use sluice_api::eventing::*;
    let mut namespaces = std::collections::BTreeSet::new();
    for b in &mut objects.brokers {
        b.metadata.annotations.insert(
            BROKER_CLASS_ANNOTATION.to_string(),
            RABBITMQ_BROKER_CLASS.to_string(),
        );
        b.spec.config = Some(KReference {
            kind: RABBITMQ_BROKER_CONFIG_KIND.into(),
            name: "rabbitmq".into(),
            api_version: RABBITMQ_API_VERSION.into(),
            namespace: String::new(),
        });
        namespaces.insert(b.metadata.namespace.clone());
    }
    for ns in namespaces {
        let yaml = format!(
            "apiVersion: {RABBITMQ_API_VERSION}\nkind: {RABBITMQ_BROKER_CONFIG_KIND}\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nspec:\n  rabbitmqClusterReference: {{connectionSecret: {{name: rabbitmq}}}}\n  queueType: quorum\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\nstringData: {{uri: '{uri}'}}\n"
        );
        let more = EventingObjects::from_objects(
            sluice_api::parse_documents(&yaml)
                .into_iter()
                .map(|r| r.unwrap()),
        );
        objects.rabbitmq_configs.extend(more.rabbitmq_configs);
        objects.secrets.extend(more.secrets);
    }
}

/// One request a subscriber received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

type Behaviour = Arc<dyn Fn(usize, &Received) -> Response<Full<Bytes>> + Send + Sync>;

/// A recording HTTP subscriber; `behaviour(n, request)` answers the n-th request (0-based) of a path.
struct Subscriber {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ok() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::new()))
}

fn status(code: u16, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

impl Subscriber {
    async fn start(behaviour: Behaviour) -> Subscriber {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let behaviour = behaviour.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        let behaviour = behaviour.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let r = Received {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                            };
                            let n = {
                                let mut log = log.lock().unwrap();
                                let n = log.iter().filter(|x| x.path == r.path).count();
                                log.push(r.clone());
                                n
                            };
                            Ok::<_, Infallible>(behaviour(n, &r))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Subscriber {
            addr,
            received,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn at(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` received at least `n` requests.
    async fn wait(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.at(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n} requests within {WAIT:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Harness {
    service: Arc<BrokerService>,
    _dir: tempfile::TempDir,
    /// The AMQP URI of this test's vhost, on the RabbitMQ backend.
    rabbitmq: Option<String>,
}

impl Harness {
    async fn start(yaml: &str) -> Harness {
        Self::start_with(yaml, |_| {}).await
    }

    async fn start_with(yaml: &str, tweak: impl FnOnce(&mut BrokerOptions)) -> Harness {
        let rabbitmq = match backend() {
            Backend::Log => None,
            Backend::RabbitMq => Some(tokio::task::spawn_blocking(rabbitmq_vhost).await.unwrap()),
        };
        Self::start_on(yaml, tweak, rabbitmq).await
    }

    /// Another replica of this harness's RabbitMQ Brokers: same vhost, its own ingress.
    async fn replica(&self, yaml: &str) -> Harness {
        Self::start_on(yaml, |_| {}, self.rabbitmq.clone()).await
    }

    async fn start_on(
        yaml: &str,
        tweak: impl FnOnce(&mut BrokerOptions),
        rabbitmq: Option<String>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut options = BrokerOptions::new(dir.path(), "127.0.0.1:0".parse().unwrap());
        tweak(&mut options);
        let service = BrokerService::start(options).await.unwrap();
        let h = Harness {
            service,
            _dir: dir,
            rabbitmq,
        };
        h.apply(yaml).await;
        h
    }

    async fn apply(&self, yaml: &str) -> sluice_broker::EventingStatus {
        let status = self.apply_unchecked(yaml).await;
        for t in &status.triggers {
            let s = &t.status.as_ref().unwrap().status;
            assert!(
                s.condition("Ready").unwrap().status == sluice_api::ConditionStatus::True,
                "trigger {} not ready: {:?}",
                t.metadata.key(),
                s.conditions
            );
        }
        status
    }

    /// Applies `yaml` (on RabbitMQ: once its Brokers are connected) and returns the statuses.
    async fn apply_unchecked(&self, yaml: &str) -> sluice_broker::EventingStatus {
        let objects = sluice_api::parse_documents(yaml)
            .into_iter()
            .map(|r| r.unwrap());
        let mut objects = EventingObjects::from_objects(objects);
        if let Some(uri) = &self.rabbitmq {
            into_rabbitmq(&mut objects, uri);
        }
        let status = self.service.apply(objects).await;
        if self.rabbitmq.is_some() {
            // A RabbitMQ Broker accepts events once connected and its queues are declared.
            let deadline = Instant::now() + WAIT;
            loop {
                let now = self.service.status();
                let waiting: Vec<_> = now
                    .brokers
                    .iter()
                    .filter_map(|b| b.status.as_ref()?.status.condition("Ready"))
                    .filter(|c| c.reason == "RabbitMQUnavailable")
                    .collect();
                if waiting.is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "brokers not ready: {waiting:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        status
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> (StatusCode, String) {
        post(self.service.local_addr(), Method::POST, path, headers, body).await
    }

    /// Sends a binary-mode event and expects 202.
    async fn send(&self, id: &str, ty: &str, source: &str, extra: &[(&str, &str)]) {
        let mut headers = vec![
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-type", ty),
            ("ce-source", source),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        let (status, body) = self.post("/ns/default", &headers, "{\"n\":1}").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let service = self.service.clone();
        // Stop the service's tasks; the runtime of the test is still alive here.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { service.shutdown().await });
        }
    }
}

async fn post(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const BROKER: &str = r#"
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: default, namespace: ns}
"#;

fn trigger(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  broker: default\n{spec}\n"
    )
}

fn ids(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.header("ce-id").to_string())
        .collect()
}

async fn ingress_answers_as_knative_does() {
    let h = Harness::start_with(BROKER, |o| o.max_body_bytes = 1000).await;
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-type", "t"),
        ("ce-source", "/s"),
    ];
    assert_eq!(
        h.post("/ns/default", &binary, "").await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        h.post("/ns/default/", &binary, "").await.0,
        StatusCode::ACCEPTED
    );
    let structured = [("content-type", "application/cloudevents+json")];
    let one = r#"{"specversion":"1.0","id":"2","type":"t","source":"/s","data":{"a":1}}"#;
    assert_eq!(
        h.post("/ns/default", &structured, one).await.0,
        StatusCode::ACCEPTED
    );
    let batch = [("content-type", "application/cloudevents-batch+json")];
    assert_eq!(
        h.post("/ns/default", &batch, &format!("[{one},{one}]"))
            .await
            .0,
        StatusCode::ACCEPTED
    );

    let (code, message) = h.post("/ns/default", &binary[..3], "").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(message.contains("source"), "{message}");
    let bad_time = [binary.as_slice(), &[("ce-time", "noon")]].concat();
    assert_eq!(
        h.post("/ns/default", &bad_time, "").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.post("/ns/other", &binary, "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.post("/", &binary, "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.post("/ns", &binary, "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.post("/ns/default", &binary, &"x".repeat(2000)).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let addr = h.service.local_addr();
    assert_eq!(
        post(addr, Method::GET, "/ns/default", &[], "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        post(addr, Method::OPTIONS, "/ns/default", &[], "").await.0,
        StatusCode::OK
    );

    // Brokers come and go live.
    h.apply(&format!(
        "{BROKER}---\n{}",
        BROKER.replace("default", "second")
    ))
    .await;
    assert_eq!(
        h.post("/ns/second", &binary, "").await.0,
        StatusCode::ACCEPTED
    );
    let status = h.apply(BROKER).await;
    assert_eq!(
        h.post("/ns/second", &binary, "").await.0,
        StatusCode::NOT_FOUND
    );
    let url = status.brokers[0]
        .status
        .as_ref()
        .unwrap()
        .address
        .as_ref()
        .unwrap();
    assert_eq!(
        url.url.as_deref(),
        Some("http://broker-ingress.knative-eventing.localhost:8080/ns/default")
    );
}

async fn filters_of_every_dialect_select_events() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let mut yaml = BROKER.to_string();
    let cases = [
        ("all-events", ""),
        (
            "attributes",
            "  filter: {attributes: {type: order.created}}",
        ),
        ("exact", "  filters: [{exact: {type: order.created}}]"),
        ("prefix", "  filters: [{prefix: {type: order.}}]"),
        ("suffix", "  filters: [{suffix: {source: /eu}}]"),
        (
            "all",
            "  filters: [{all: [{prefix: {type: order.}}, {suffix: {source: /eu}}]}]",
        ),
        (
            "any",
            "  filters: [{any: [{exact: {type: order.created}}, {exact: {type: user.deleted}}]}]",
        ),
        ("not", "  filters: [{not: {prefix: {type: order.}}}]"),
        (
            "cesql",
            "  filters: [{cesql: \"region = 'eu' AND type LIKE 'order.%'\"}]",
        ),
    ];
    for (name, spec) in cases {
        yaml.push_str(&trigger(
            name,
            &format!(
                "{spec}\n  subscriber: {{uri: \"{}\"}}",
                sub.url(&format!("/{name}"))
            ),
        ));
    }
    let h = Harness::start(&yaml).await;
    h.send("1", "order.created", "/shop/eu", &[("ce-region", "eu")])
        .await;
    h.send("2", "order.paid", "/shop/us", &[("ce-region", "us")])
        .await;
    h.send("3", "user.deleted", "/users/eu", &[]).await;

    let want: [(&str, &[&str]); 9] = [
        ("all-events", &["1", "2", "3"]),
        ("attributes", &["1"]),
        ("exact", &["1"]),
        ("prefix", &["1", "2"]),
        ("suffix", &["1", "3"]),
        ("all", &["1"]),
        ("any", &["1", "3"]),
        ("not", &["3"]),
        ("cesql", &["1"]),
    ];
    // Every trigger sees every event; wait for the one that gets all three, then the rest is done
    // once each has its count.
    for (name, expected) in want {
        let got = sub.wait(&format!("/{name}"), expected.len()).await;
        let mut got = ids(&got);
        got.sort();
        assert_eq!(got, expected, "trigger {name}");
    }
    // The subscriber sees binary mode, no TTL, and Prefer: reply.
    let r = &sub.at("/exact")[0];
    assert_eq!(r.header("ce-type"), "order.created");
    assert_eq!(r.header("ce-region"), "eu");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("prefer"), "reply");
    assert!(r.headers.get("ce-knativebrokerttl").is_none());
    assert!(!r.header("ce-knativearrivaltime").is_empty());
    assert_eq!(r.body, "{\"n\":1}");
}

async fn failed_deliveries_are_retried_until_success() {
    let sub = Subscriber::start(Arc::new(
        |n, _| {
            if n < 2 { status(503, "busy") } else { ok() }
        },
    ))
    .await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 3, backoffPolicy: linear, backoffDelay: PT0.05S, deadLetterSink: {{uri: \"{}\"}}}}",
                sub.url("/sub"),
                sub.url("/dls")
            )
        )
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "t", "/s", &[]).await;
    let got = sub.wait("/sub", 3).await;
    assert_eq!(ids(&got), ["1", "1", "1"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sub.at("/dls").is_empty(), "delivered on the third attempt");
    assert_eq!(sub.at("/sub").len(), 3);
}

async fn exhausted_retries_go_to_the_dead_letter_sink_with_error_extensions() {
    let sub = Subscriber::start(Arc::new(|_, r| {
        if r.path == "/sub" {
            status(500, "boom")
        } else {
            ok()
        }
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}{}",
        trigger(
            "t",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 2, deadLetterSink: {{uri: \"{}\"}}}}",
                sub.url("/sub"),
                sub.url("/dls")
            )
        ),
        // No response at all (connection refused): retried, then dead-lettered.
        trigger(
            "refused",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 5, deadLetterSink: {{uri: \"{}\"}}}}",
                "http://127.0.0.1:1/nowhere",
                sub.url("/dls-unreachable")
            )
        ),
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "t", "/s", &[]).await;
    let dead = sub.wait("/dls", 1).await;
    assert_eq!(sub.at("/sub").len(), 3, "first attempt and 2 retries");
    let d = &dead[0];
    assert_eq!(d.header("ce-id"), "1");
    assert_eq!(d.header("ce-knativeerrordest"), sub.url("/sub"));
    assert_eq!(d.header("ce-knativeerrorcode"), "500");
    assert_eq!(d.header("ce-knativeerrordata"), "Ym9vbQ==");
    // No response at all (connection refused): code 500 and Knative's "dispatch error" data.
    let unreachable = sub.wait("/dls-unreachable", 1).await;
    assert_eq!(unreachable[0].header("ce-knativeerrorcode"), "500");
    assert_eq!(
        unreachable[0].header("ce-knativeerrordest"),
        "http://127.0.0.1:1/nowhere"
    );
}

async fn client_errors_are_not_retried() {
    let sub = Subscriber::start(Arc::new(|_, r| {
        if r.path == "/sub" {
            status(400, "no")
        } else {
            ok()
        }
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 4, deadLetterSink: {{uri: \"{}\"}}}}",
                sub.url("/sub"),
                sub.url("/dls")
            )
        )
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "t", "/s", &[]).await;
    let dead = sub.wait("/dls", 1).await;
    assert_eq!(dead[0].header("ce-knativeerrorcode"), "400");
    assert_eq!(sub.at("/sub").len(), 1);
}

fn reply_event(ty: &str, id: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{\"reply\":true}")));
    let h = r.headers_mut();
    h.insert("ce-specversion", "1.0".parse().unwrap());
    h.insert("ce-id", id.parse().unwrap());
    h.insert("ce-type", ty.parse().unwrap());
    h.insert("ce-source", "/replier".parse().unwrap());
    h.insert("content-type", "application/json".parse().unwrap());
    r
}

async fn replies_go_back_into_the_broker() {
    let sub = Subscriber::start(Arc::new(|_, r| {
        if r.path == "/replier" {
            reply_event("greeting.reply", "r-1")
        } else {
            ok()
        }
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}{}",
        trigger(
            "replier",
            &format!(
                "  filter: {{attributes: {{type: greeting}}}}\n  subscriber: {{uri: \"{}\"}}",
                sub.url("/replier")
            )
        ),
        trigger(
            "replies",
            &format!(
                "  filter: {{attributes: {{type: greeting.reply}}}}\n  subscriber: {{uri: \"{}\"}}",
                sub.url("/replies")
            )
        ),
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "greeting", "/s", &[]).await;
    let got = sub.wait("/replies", 1).await;
    assert_eq!(got[0].header("ce-id"), "r-1");
    assert_eq!(got[0].header("ce-source"), "/replier");
    assert_eq!(got[0].body, "{\"reply\":true}");
}

async fn ttl_stops_a_reply_loop() {
    // Every event is answered with a new event of the same type: without the TTL it would loop forever.
    let sub = Subscriber::start(Arc::new(|n, _| reply_event("loop", &format!("r-{n}")))).await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/loop"))
        )
    );
    let h = Harness::start_with(&yaml, |o| o.default_ttl = 5).await;
    h.send("1", "loop", "/s", &[]).await;
    // TTL 5 at the ingress, then 4, 3, 2, 1 for the replies; the reply at 0 is dropped.
    sub.wait("/loop", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sub.at("/loop").len(), 5);
}

async fn ordered_trigger_delivers_in_log_order_one_at_a_time() {
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let overlap = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (f, o) = (in_flight.clone(), overlap.clone());
    let sub = Subscriber::start(Arc::new(move |n, _| {
        use std::sync::atomic::Ordering::SeqCst;
        if f.fetch_add(1, SeqCst) > 0 {
            o.store(true, SeqCst);
        }
        // Uneven service times would reorder an unordered trigger.
        std::thread::sleep(Duration::from_millis(if n % 3 == 0 { 15 } else { 1 }));
        f.fetch_sub(1, SeqCst);
        ok()
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/o"))
        )
        .replace(
            "namespace: ns}",
            "namespace: ns, annotations: {kafka.eventing.knative.dev/delivery.order: ordered}}"
        )
    );
    let h = Harness::start(&yaml).await;
    let sent: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
    for id in &sent {
        h.send(id, "t", "/s", &[]).await;
    }
    let got = sub.wait("/o", sent.len()).await;
    assert_eq!(ids(&got), sent);
    assert!(!overlap.load(std::sync::atomic::Ordering::SeqCst));
}

async fn unordered_trigger_delivers_everything() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/u"))
        )
    );
    let h = Harness::start(&yaml).await;
    let mut sent: Vec<String> = (0..200).map(|i| format!("e{i:03}")).collect();
    let batch: Vec<String> = sent
        .iter()
        .map(|id| format!(r#"{{"specversion":"1.0","id":"{id}","type":"t","source":"/s"}}"#))
        .collect();
    let (code, body) = h
        .post(
            "/ns/default",
            &[("content-type", "application/cloudevents-batch+json")],
            &format!("[{}]", batch.join(",")),
        )
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let mut got = ids(&sub.wait("/u", sent.len()).await);
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
}

async fn removed_trigger_stops_receiving() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let t = trigger(
        "t",
        &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/r")),
    );
    let h = Harness::start(&format!("{BROKER}{t}")).await;
    h.send("1", "t", "/s", &[]).await;
    sub.wait("/r", 1).await;
    h.apply(BROKER).await;
    h.send("2", "t", "/s", &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ids(&sub.at("/r")), ["1"]);
}

async fn pingsource_fires_on_schedule_to_a_uri_and_to_a_broker() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let yaml = format!(
        r#"{BROKER}{}---
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {{name: direct, namespace: ns}}
spec:
  schedule: "* * * * * *"
  contentType: application/json
  data: '{{"message": "hello"}}'
  ceOverrides: {{extensions: {{team: blue}}}}
  sink: {{uri: "{}"}}
---
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {{name: via-broker, namespace: ns}}
spec:
  schedule: "* * * * * *"
  timezone: Europe/Paris
  sink:
    ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}
"#,
        trigger(
            "pings",
            &format!(
                "  filter: {{attributes: {{type: dev.knative.sources.ping}}}}\n  subscriber: {{uri: \"{}\"}}",
                sub.url("/from-broker")
            )
        ),
        sub.url("/direct"),
    );
    let h = Harness::start(&yaml).await;
    let direct = sub.wait("/direct", 2).await;
    let p = &direct[0];
    assert_eq!(p.header("ce-type"), "dev.knative.sources.ping");
    assert_eq!(
        p.header("ce-source"),
        "/apis/v1/namespaces/ns/pingsources/direct"
    );
    assert_eq!(p.header("ce-team"), "blue");
    assert_eq!(p.header("content-type"), "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&p.body).unwrap(),
        serde_json::json!({"message": "hello"})
    );
    assert_ne!(direct[0].header("ce-id"), direct[1].header("ce-id"));
    let via = sub.wait("/from-broker", 1).await;
    assert_eq!(
        via[0].header("ce-source"),
        "/apis/v1/namespaces/ns/pingsources/via-broker"
    );
    let status = h.service.status();
    let ping = status
        .pingsources
        .iter()
        .find(|p| p.metadata.name == "direct")
        .unwrap();
    assert_eq!(
        ping.status.as_ref().unwrap().sink_uri.as_deref(),
        Some(sub.url("/direct").as_str())
    );
}

#[tokio::test]
async fn events_survive_a_restart_and_resume_from_the_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/p"))
        )
    );
    let objects = || {
        EventingObjects::from_objects(
            sluice_api::parse_documents(&yaml)
                .into_iter()
                .map(|r| r.unwrap()),
        )
    };
    let options = BrokerOptions::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    let first = BrokerService::start(options.clone()).await.unwrap();
    first.apply(objects()).await;
    let binary = |id: &'static str| {
        [
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-type", "t"),
            ("ce-source", "/s"),
        ]
    };
    let addr = first.local_addr();
    assert_eq!(
        post(addr, Method::POST, "/ns/default", &binary("1"), "")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    sub.wait("/p", 1).await;
    first.shutdown().await;
    drop(first);

    let second = BrokerService::start(options).await.unwrap();
    second.apply(objects()).await;
    assert_eq!(
        post(
            second.local_addr(),
            Method::POST,
            "/ns/default",
            &binary("2"),
            ""
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    let got = sub.wait("/p", 2).await;
    assert_eq!(
        ids(&got),
        ["1", "2"],
        "event 1 was committed before the restart"
    );
    second.shutdown().await;
}

/// A subscriber that accepts connections and never answers: what it is sent stays in flight.
async fn silent_subscriber() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// Copies the folder `from` into `to`, as a `kill -9` would leave it: a killed process loses only
/// what it kept in memory, never what it had written to its files.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn accepted_events_are_delivered_after_a_crash_before_any_offsets_flush() {
    let data = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let (silent, silent_task) = silent_subscriber().await;
    let objects = |uri: &str| {
        let yaml = format!(
            "{BROKER}{}",
            trigger("t", &format!("  subscriber: {{uri: \"{uri}\"}}"))
        );
        EventingObjects::from_objects(
            sluice_api::parse_documents(&yaml)
                .into_iter()
                .map(|r| r.unwrap()),
        )
    };
    let options = |dir: &std::path::Path| {
        let mut o = BrokerOptions::new(dir, "127.0.0.1:0".parse().unwrap());
        // The crash comes before the first periodic write of the consumer offsets.
        o.log.offsets_flush_interval = Duration::from_secs(3600);
        o
    };
    let first = BrokerService::start(options(data.path())).await.unwrap();
    first.apply(objects(&format!("http://{silent}/"))).await;
    for id in ["1", "2", "3"] {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-type", "t"),
            ("ce-source", "/s"),
        ];
        let (status, body) = post(
            first.local_addr(),
            Method::POST,
            "/ns/default",
            &headers,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    // kill -9 now: the 202s were sent, the deliveries are in flight.
    copy_tree(data.path(), image.path());

    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let second = BrokerService::start(options(image.path())).await.unwrap();
    second.apply(objects(&sub.url("/after"))).await;
    let mut got = ids(&sub.wait("/after", 3).await);
    got.sort();
    assert_eq!(got, ["1", "2", "3"]);
    second.shutdown().await;
    first.shutdown().await;
    silent_task.abort();
}

#[tokio::test]
async fn trigger_that_is_not_ready_for_a_while_resumes_where_it_was() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let good = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/r"))
        )
    );
    let h = Harness::start(&good).await;
    h.send("1", "t", "/s", &[]).await;
    sub.wait("/r", 1).await;
    // The subscriber cannot be resolved: the Trigger is not ready and nothing is delivered...
    let unresolvable = format!(
        "{BROKER}{}",
        trigger(
            "t",
            "  subscriber: {ref: {apiVersion: v1, kind: Service, name: plain}}"
        )
    );
    let objects = sluice_api::parse_documents(&unresolvable)
        .into_iter()
        .map(|r| r.unwrap());
    let status = h
        .service
        .apply(EventingObjects::from_objects(objects))
        .await;
    let c = status.triggers[0].status.as_ref().unwrap();
    let resolved = c.status.condition("SubscriberResolved").unwrap();
    assert_eq!(resolved.status, sluice_api::ConditionStatus::False);
    assert_eq!(resolved.reason, "NotAddressable");
    h.send("2", "t", "/s", &[]).await;
    // ...but once it is fixed, what was sent meanwhile is delivered.
    h.apply(&good).await;
    let got = sub.wait("/r", 2).await;
    assert_eq!(ids(&got), ["1", "2"]);
}

/// A subscriber that answers one request per connection and then closes it, without saying so
/// (no `Connection: close`), as a server whose keep-alive timeout is shorter than the gaps between
/// events does. Returns the ce-ids it received and the number of connections it accepted.
async fn one_shot_subscriber() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<Mutex<usize>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let connections: Arc<Mutex<usize>> = Arc::default();
    let (ids2, connections2) = (ids.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            *connections2.lock().unwrap() += 1;
            let ids = ids2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then a body of content-length bytes.
                let (head_end, length) = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                if let Some(id) = head.lines().find_map(|l| {
                    l.to_lowercase()
                        .starts_with("ce-id:")
                        .then(|| l[6..].trim().to_string())
                }) {
                    ids.lock().unwrap().push(id);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                    .await;
                // Dropping the stream closes the connection the broker may keep for the next event.
            });
        }
    });
    (addr, ids, connections)
}

#[tokio::test]
async fn a_connection_the_subscriber_closed_while_idle_is_reopened_without_losing_events() {
    let (addr, ids, connections) = one_shot_subscriber().await;
    // No retries: an event sent on the closed connection would be lost.
    let yaml = format!(
        "{BROKER}{}",
        trigger("t", &format!("  subscriber: {{uri: \"http://{addr}/\"}}"))
    );
    let h = Harness::start(&yaml).await;
    let sent: Vec<String> = (0..10).map(|i| format!("idle-{i}")).collect();
    for id in &sent {
        h.send(id, "t", "/s", &[]).await;
        let deadline = Instant::now() + WAIT;
        while !ids.lock().unwrap().contains(id) {
            assert!(
                Instant::now() < deadline,
                "{id} not delivered: {:?}",
                ids.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Idle long enough for the close to reach the broker.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(*ids.lock().unwrap(), sent);
    assert_eq!(*connections.lock().unwrap(), sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_broker_accepts_events_only_once_its_triggers_receive_them() {
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let h = Harness::start("").await;
    let addr = h.service.local_addr();
    // A producer that keeps posting while the Broker and its Trigger are applied: 404 until the
    // Broker exists, then 202s, every one of which the Trigger must deliver.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || accepted.len() < 20 {
                let id = format!("early-{n}");
                n += 1;
                let headers = [
                    ("ce-specversion", "1.0"),
                    ("ce-id", id.as_str()),
                    ("ce-type", "t"),
                    ("ce-source", "/s"),
                ];
                let (status, _) = post(addr, Method::POST, "/ns/default", &headers, "{}").await;
                if status == StatusCode::ACCEPTED {
                    accepted.push(id);
                }
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.apply(&format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/early"))
        )
    ))
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let accepted = producer.await.unwrap();
    let got = ids(&sub.wait("/early", accepted.len()).await);
    let missing: Vec<&String> = accepted.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "accepted but never delivered: {missing:?}"
    );
}

async fn a_trigger_without_delivery_gets_config_br_defaults_retry() {
    // No config-br-defaults: Knative's shipped one (retry 10, exponential from 200 ms).
    let sub = Subscriber::start(Arc::new(
        |n, _| {
            if n < 2 { status(503, "busy") } else { ok() }
        },
    ))
    .await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/sub"))
        )
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "t", "/s", &[]).await;
    let got = sub.wait("/sub", 3).await;
    assert_eq!(ids(&got), ["1", "1", "1"], "delivered on the third attempt");
}

#[tokio::test]
async fn a_config_br_defaults_config_map_replaces_the_shipped_defaults() {
    let sub = Subscriber::start(Arc::new(|_, r| {
        if r.path == "/sub" {
            status(503, "busy")
        } else {
            ok()
        }
    }))
    .await;
    // The namespace's entry wins over clusterDefault: one attempt, then the dead-letter sink.
    let yaml = format!(
        "{BROKER}{}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: config-br-defaults, namespace: knative-eventing}}
data:
  default-br-config: |
    clusterDefault:
      brokerClass: MTChannelBasedBroker
      delivery: {{retry: 5}}
    namespaceDefaults:
      ns:
        delivery:
          retry: 0
          deadLetterSink: {{uri: \"{}\"}}
",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/sub"))
        ),
        sub.url("/dls"),
    );
    let h = Harness::start(&yaml).await;
    h.send("1", "t", "/s", &[]).await;
    let dead = sub.wait("/dls", 1).await;
    assert_eq!(dead[0].header("ce-knativeerrorcode"), "503");
    assert_eq!(
        sub.at("/sub").len(),
        1,
        "retry: 0 from the namespace's defaults"
    );
}

/// A subscriber as plain as Python's http.server: an accept backlog of 5, an HTTP/1.0 answer and a
/// close after each request. Counts the ce-ids it answered and the most connections it had open
/// (accepted and not yet answered) at once.
struct ClosingSubscriber {
    addr: SocketAddr,
    answered: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    max_open: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for ClosingSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosingSubscriber {
    async fn start() -> ClosingSubscriber {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = socket.listen(5).unwrap();
        let answered: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let max_open = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (seen, max) = (answered.clone(), max_open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                let (seen, open) = (seen.clone(), open.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then as much body as Content-Length says.
                    let complete = |buf: &[u8]| -> Option<String> {
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        (buf.len() >= end + length).then(|| {
                            head.lines()
                                .find_map(|l| l.strip_prefix("ce-id:"))
                                .unwrap_or("")
                                .trim()
                                .to_string()
                        })
                    };
                    let id = loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break None,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        if let Some(id) = complete(&buf) {
                            break Some(id);
                        }
                    };
                    // Counted open until the answer is decided: the broker can only open another
                    // connection once it has read an answer, so a count that went down after the
                    // write would race with the next accept.
                    open.fetch_sub(1, Ordering::SeqCst);
                    if let Some(id) = id {
                        *seen.lock().unwrap().entry(id).or_default() += 1;
                        let _ = stream
                            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = stream.shutdown().await;
                    }
                });
            }
        });
        ClosingSubscriber {
            addr,
            answered,
            max_open,
            task,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_a_closing_subscriber_delivers_everything_over_bounded_connections() {
    const TRIGGERS: usize = 20;
    const EVENTS: usize = 300;
    const PER_HOST: usize = 16;
    let sub = ClosingSubscriber::start().await;
    let mut yaml = BROKER.to_string();
    for t in 0..TRIGGERS {
        yaml.push_str(&trigger(
            &format!("t{t}"),
            &format!("  subscriber: {{uri: \"http://{}/\"}}", sub.addr),
        ));
    }
    let h = Harness::start_with(&yaml, |o| o.connections_per_host = PER_HOST).await;
    for n in 0..EVENTS {
        h.send(&n.to_string(), "t", "/s", &[]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (events, deliveries) = {
            let answered = sub.answered.lock().unwrap();
            let events = (0..EVENTS)
                .filter(|n| answered.get(&n.to_string()).is_some_and(|c| *c >= TRIGGERS))
                .count();
            (events, answered.values().sum::<usize>())
        };
        if events == EVENTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{events} of {EVENTS} events reached all {TRIGGERS} Triggers ({deliveries} deliveries) \
             within 60 s; at most {} connections were open",
            sub.max_open.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let max_open = sub.max_open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max_open <= PER_HOST,
        "{max_open} connections open at once, more than the bound of {PER_HOST}"
    );
}

/// `sluice status -o json` shows what Knative's ConditionSet puts in Ready: the reason and message
/// of the failing condition (`BrokerDoesNotExist`), not a generic word (issue 12, item 13).
#[tokio::test]
async fn a_broker_or_trigger_that_is_not_ready_says_why_in_ready() {
    let h = Harness::start("").await;
    let yaml = format!(
        "{}---\napiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: other, namespace: ns}}\nspec:\n  delivery:\n    deadLetterSink:\n      ref: {{apiVersion: v1, kind: Pod, name: nope}}\n",
        trigger("orphan", "  subscriber: {uri: \"http://127.0.0.1:1/\"}")
            .replace("broker: default", "broker: missing"),
    );
    let objects = sluice_api::parse_documents(&yaml)
        .into_iter()
        .map(|r| r.unwrap());
    let status = h
        .service
        .apply(EventingObjects::from_objects(objects))
        .await;
    let ready = |conds: &sluice_api::meta::Status| {
        let c = conds.condition("Ready").unwrap().clone();
        (c.status, c.reason, c.message)
    };
    let trigger = &status.triggers[0];
    assert_eq!(
        ready(&trigger.status.as_ref().unwrap().status),
        (
            sluice_api::ConditionStatus::False,
            "BrokerDoesNotExist".to_string(),
            "Broker ns/missing does not exist or is not ready".to_string()
        )
    );
    let broker = status
        .brokers
        .iter()
        .find(|b| b.metadata.name == "other")
        .unwrap();
    let (s, reason, message) = ready(&broker.status.as_ref().unwrap().status);
    assert_eq!(
        (s, reason.as_str()),
        (sluice_api::ConditionStatus::False, "NotAddressable")
    );
    assert!(message.contains("Pod ns/nope"), "{message}");
}

// ---- RabbitMQ only -------------------------------------------------------------------------------

fn ordered(trigger_yaml: String) -> String {
    trigger_yaml.replace(
        "namespace: ns}",
        "namespace: ns, annotations: {kafka.eventing.knative.dev/delivery.order: ordered}}",
    )
}

/// How many consumers RabbitMQ counts on a Trigger's queue.
fn consumers(uri: &str, trigger: &str) -> usize {
    let vhost = uri.rsplit('/').next().unwrap().to_string();
    let queue = format!("sluice.trigger.ns.{trigger}");
    rabbitmq::RabbitNode::shared()
        .rabbitmqctl(&["--silent", "list_consumers", "-p", &vhost, "queue_name"])
        .lines()
        .filter(|l| l.trim() == queue)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rabbitmq_replicas_share_ingress_and_delivery() {
    BACKEND
        .scope(Backend::RabbitMq, async {
            let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
            let yaml = format!(
                "{BROKER}{}",
                trigger(
                    "t",
                    &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/sub"))
                )
            );
            let a = Harness::start(&yaml).await;
            let b = a.replica(&yaml).await;
            let uri = a.rabbitmq.clone().unwrap();
            let deadline = Instant::now() + WAIT;
            while tokio::task::spawn_blocking({
                let uri = uri.clone();
                move || consumers(&uri, "t")
            })
            .await
            .unwrap()
                < 2
            {
                assert!(Instant::now() < deadline, "both replicas consume the queue");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let sent: Vec<String> = (0..200).map(|i| format!("e{i}")).collect();
            for (i, id) in sent.iter().enumerate() {
                let h = if i % 2 == 0 { &a } else { &b };
                h.send(id, "t", "/s", &[]).await;
            }
            sub.wait("/sub", sent.len()).await;
            // Anything delivered twice would show up by now.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = ids(&sub.at("/sub"));
            got.sort();
            let mut want = sent.clone();
            want.sort();
            assert_eq!(got, want, "each event once");
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_trigger_keeps_order_across_two_rabbitmq_replicas() {
    BACKEND
        .scope(Backend::RabbitMq, async {
            let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let overlap = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (f, o) = (in_flight.clone(), overlap.clone());
            let sub = Subscriber::start(Arc::new(move |n, _| {
                use std::sync::atomic::Ordering::SeqCst;
                if f.fetch_add(1, SeqCst) > 0 {
                    o.store(true, SeqCst);
                }
                std::thread::sleep(Duration::from_millis(if n % 3 == 0 { 15 } else { 1 }));
                f.fetch_sub(1, SeqCst);
                ok()
            }))
            .await;
            let yaml = format!(
                "{BROKER}{}",
                ordered(trigger(
                    "t",
                    &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/o"))
                ))
            );
            let a = Harness::start(&yaml).await;
            let b = a.replica(&yaml).await;
            let sent: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
            for (i, id) in sent.iter().enumerate() {
                let h = if i % 2 == 0 { &a } else { &b };
                h.send(id, "t", "/s", &[]).await;
            }
            let got = sub.wait("/o", sent.len()).await;
            assert_eq!(ids(&got), sent);
            assert!(!overlap.load(std::sync::atomic::Ordering::SeqCst));
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_answers_503_and_nothing_accepted_is_lost() {
    let node = Arc::new(
        tokio::task::spawn_blocking(|| rabbitmq::RabbitNode::start("restart"))
            .await
            .unwrap(),
    );
    // The subscriber refuses (503) until released, so accepted events wait in RabbitMQ and in the
    // consumer's hands while RabbitMQ goes down.
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = open.clone();
    let sub = Subscriber::start(Arc::new(move |_, _| {
        if gate.load(std::sync::atomic::Ordering::SeqCst) {
            ok()
        } else {
            status(503, "not yet")
        }
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}",
        trigger(
            "t",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 1000, backoffPolicy: linear, backoffDelay: PT0.05S}}",
                sub.url("/sub")
            )
        )
    );
    let h = Harness::start_on(&yaml, |_| {}, Some(node.amqp_url())).await;
    let mut accepted = Vec::new();
    for i in 0..100 {
        let id = format!("before-{i}");
        h.send(&id, "t", "/s", &[]).await;
        accepted.push(id);
    }

    tokio::task::spawn_blocking({
        let node = node.clone();
        move || node.stop()
    })
    .await
    .unwrap();
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "down"),
        ("ce-type", "t"),
        ("ce-source", "/s"),
    ];
    let deadline = Instant::now() + WAIT;
    let (code, body) = loop {
        let (code, body) = h.post("/ns/default", &binary, "").await;
        if code != StatusCode::ACCEPTED {
            break (code, body);
        }
        accepted.push("down".to_string());
        assert!(Instant::now() < deadline, "RabbitMQ stopped, yet 202");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("RabbitMQ"), "{body}");
    let ready = h.service.status().brokers[0]
        .status
        .as_ref()
        .unwrap()
        .status
        .condition("Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready.reason, "RabbitMQUnavailable", "{ready:?}");

    tokio::task::spawn_blocking({
        let node = node.clone();
        move || node.restart()
    })
    .await
    .unwrap();
    // Accepting again by itself (reconnected with backoff).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let id = "after-0".to_string();
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", id.as_str()),
            ("ce-type", "t"),
            ("ce-source", "/s"),
        ];
        if h.post("/ns/default", &headers, "").await.0 == StatusCode::ACCEPTED {
            accepted.push(id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not accepting after RabbitMQ came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: std::collections::HashSet<String> = sub
            .at("/sub")
            .iter()
            .filter(|r| r.headers.get("ce-id").is_some())
            .map(|r| r.header("ce-id").to_string())
            .collect();
        let missing: Vec<&String> = accepted.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted events never delivered: {:?}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unreachable_rabbitmq_makes_only_its_broker_not_ready() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
    let rabbit = |name: &str, uri: &str| {
        format!(
            "---
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: {name}
  namespace: ns
  annotations: {{eventing.knative.dev/broker.class: RabbitMQBroker}}
spec:
  config: {{apiVersion: eventing.knative.dev/v1alpha1, kind: RabbitmqBrokerConfig, name: {name}}}
---
apiVersion: eventing.knative.dev/v1alpha1
kind: RabbitmqBrokerConfig
metadata: {{name: {name}, namespace: ns}}
spec:
  rabbitmqClusterReference: {{connectionSecret: {{name: {name}}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: ns}}
stringData: {{uri: '{uri}', username: guest, password: guest}}
"
        )
    };
    let yaml = format!(
        "{BROKER}{}{}{}",
        trigger(
            "t",
            &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/sub"))
        ),
        rabbit("down", &format!("amqp://127.0.0.1:{port}")),
        rabbit("bad", "amqp//no-scheme"),
    );
    let h = Harness::start(&yaml).await;
    let reason = |name: &str| {
        h.service
            .status()
            .brokers
            .iter()
            .find(|b| b.metadata.name == name)
            .and_then(|b| b.status.as_ref()?.status.condition("Ready").cloned())
            .unwrap()
    };
    let bad = reason("bad");
    assert_eq!(bad.reason, "InvalidSecret", "{bad:?}");
    let down = reason("down");
    assert_eq!(down.reason, "RabbitMQUnavailable", "{down:?}");
    assert!(
        down.message.contains(&format!("127.0.0.1:{port}")),
        "{down:?}"
    );
    assert!(
        !down.message.contains("guest:guest"),
        "no password in status: {down:?}"
    );
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-type", "t"),
        ("ce-source", "/s"),
    ];
    let (code, body) = h.post("/ns/down", &binary, "").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("unavailable"), "{body}");
    assert_eq!(
        h.post("/ns/bad", &binary, "").await.0,
        StatusCode::NOT_FOUND
    );
    h.send("2", "t", "/s", &[]).await;
    sub.wait("/sub", 1).await;
}

#[tokio::test]
async fn a_trigger_whose_delivery_order_changed_on_rabbitmq_says_what_to_do() {
    BACKEND
        .scope(Backend::RabbitMq, async {
            let sub = Subscriber::start(Arc::new(|_, _| ok())).await;
            let t = trigger(
                "t",
                &format!("  subscriber: {{uri: \"{}\"}}", sub.url("/sub")),
            );
            let h = Harness::start(&format!("{BROKER}{t}")).await;
            h.send("1", "t", "/s", &[]).await;
            sub.wait("/sub", 1).await;
            // An ordered queue needs other arguments: RabbitMQ refuses, nothing is deleted.
            let status = h
                .apply_unchecked(&format!("{BROKER}{}", ordered(t.clone())))
                .await;
            let ready = status.triggers[0]
                .status
                .as_ref()
                .unwrap()
                .status
                .condition("Ready")
                .cloned()
                .unwrap();
            assert_eq!(ready.reason, "QueueUnavailable", "{ready:?}");
            assert!(
                ready.message.contains("delete_queue sluice.trigger.ns.t"),
                "{ready:?}"
            );
            // Given back, it delivers again.
            h.apply(&format!("{BROKER}{t}")).await;
            h.send("2", "t", "/s", &[]).await;
            sub.wait("/sub", 2).await;
        })
        .await
}

/// Polls `cond` until it holds, within the wait.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_events_deliveries_retries_dead_letters_and_show_lag() {
    use sluice_broker::metrics::{FilterLabels, IngressLabels, TriggerLabels};
    let sub = Subscriber::start(Arc::new(|n, r| match r.path.as_str() {
        "/sub" if n < 2 => status(503, "busy"),
        "/failing" => status(500, "boom"),
        _ => ok(),
    }))
    .await;
    let yaml = format!(
        "{BROKER}{}{}",
        trigger(
            "t",
            &format!(
                "  filter: {{attributes: {{type: t.a}}}}\n  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 3, backoffPolicy: linear, backoffDelay: PT0.05S}}",
                sub.url("/sub"),
            )
        ),
        trigger(
            "dead",
            &format!(
                "  subscriber: {{uri: \"{}\"}}\n  delivery: {{retry: 1, backoffPolicy: linear, backoffDelay: PT0.05S, deadLetterSink: {{uri: \"{}\"}}}}",
                sub.url("/failing"),
                sub.url("/dls")
            )
        ),
    );
    let h = Harness::start(&yaml).await;
    let mut registry = prometheus_client::registry::Registry::default();
    h.service.register_metrics(&mut registry);
    h.send("1", "t.a", "/s", &[]).await;
    sub.wait("/sub", 3).await;
    sub.wait("/dls", 1).await;

    let metrics = h.service.metrics().clone();
    let ingress = IngressLabels {
        namespace_name: "ns".into(),
        broker_name: "default".into(),
        event_type: "t.a".into(),
        response_code: "202".into(),
        response_code_class: "2xx".into(),
    };
    assert_eq!(metrics.ingress_event_count.get_or_create(&ingress).get(), 1);
    assert_eq!(
        metrics
            .ingress_event_dispatch_latencies
            .get_or_create(&ingress)
            .count(),
        1
    );
    let trigger = |name: &str| TriggerLabels {
        namespace_name: "ns".into(),
        broker_name: "default".into(),
        trigger_name: name.into(),
    };
    let filter = |name: &str, filter_type: &str, code: &str| FilterLabels {
        namespace_name: "ns".into(),
        broker_name: "default".into(),
        trigger_name: name.into(),
        filter_type: filter_type.into(),
        response_code: code.into(),
        response_code_class: format!("{}xx", &code[..1]),
    };
    eventually("both deliveries counted", || {
        metrics
            .filter_event_count
            .get_or_create(&filter("t", "t.a", "200"))
            .get()
            == 1
            && metrics.dead_lettered.get_or_create(&trigger("dead")).get() == 1
    })
    .await;
    assert_eq!(
        metrics
            .filter_event_dispatch_latencies
            .get_or_create(&filter("t", "t.a", "200"))
            .count(),
        1
    );
    assert_eq!(
        metrics
            .filter_event_count
            .get_or_create(&filter("dead", "any", "500"))
            .get(),
        1
    );
    assert_eq!(
        metrics.delivery_attempts.get_or_create(&trigger("t")).get(),
        3
    );
    assert_eq!(
        metrics.delivery_retries.get_or_create(&trigger("t")).get(),
        2
    );
    assert_eq!(
        metrics
            .delivery_attempts
            .get_or_create(&trigger("dead"))
            .get(),
        2
    );
    assert_eq!(
        metrics
            .delivery_retries
            .get_or_create(&trigger("dead"))
            .get(),
        1
    );
    assert_eq!(metrics.dropped.get_or_create(&trigger("dead")).get(), 0);

    // Read at the scrape: the log holds the one event, and neither Trigger is behind.
    let broker = r#"namespace_name="ns",broker_name="default""#;
    let scrape = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    // A delivery is counted before its offset is finished: the lag reaches 0 just after.
    eventually("no lag", || {
        ["t", "dead"].iter().all(|t| {
            scrape().contains(&format!(
                "broker_trigger_consumer_lag{{{broker},trigger_name=\"{t}\"}} 0\n"
            ))
        })
    })
    .await;
    let text = scrape();
    assert!(
        text.contains(&format!("broker_log_records{{{broker}}} 1\n")),
        "{text}"
    );
    assert!(
        text.contains("mt_broker_ingress_event_count_total{"),
        "{text}"
    );
    assert!(
        text.contains("mt_broker_filter_event_dispatch_latencies_bucket{"),
        "{text}"
    );
}
