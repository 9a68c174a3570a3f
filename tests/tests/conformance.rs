//! Knative's KIngress conformance suite (knative/networking test/conformance/ingress), ported to run
//! against the real `sluice up` with a real Envoy and in-process backends on loopback. One test per
//! case, named after it; each starts its own `sluice up` (at most three run at once).
//!
//! Differences from the Go suite, forced by having no cluster:
//! - "inside the cluster" is Envoy's cluster-local listener, reached directly; the Go suite goes through
//!   a proxy Pod. The ExternalName Service of `host_rewrite` is a Service whose Endpoints are that
//!   listener.
//! - Objects are files in the folder `sluice up` watches; an update rewrites the file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_e2e::backends::echo::EchoOptions;
use sluice_e2e::backends::grpc::PING_STREAM_PATH;
use sluice_e2e::tls::TlsMaterial;
use sluice_e2e::yaml::{self, Class, Ingress, Path, Rule, SERVICE_PORT, Split};
use sluice_e2e::{
    Conn, Echo, EchoServer, GrpcClient, GrpcEchoServer, Proto, Req, Sluice, WebsocketClient,
    WebsocketEchoServer,
};

/// Knative's test.ServingNamespace.
const NS: &str = "serving-tests";
/// How long an Ingress gets to become Ready (generous: two shared cores).
const READY: Duration = Duration::from_secs(60);
/// Knative's network.ProbeHeaderName / HashHeaderName / TagHeaderName.
const PROBE_HEADER: &str = "K-Network-Probe";
const HASH_HEADER: &str = "K-Network-Hash";
const TAG_HEADER: &str = "Knative-Serving-Tag";

// ---------------------------------------------------------------------------------------------------
// Helpers, after the Go suite's util.go.

async fn start_sluice() -> Sluice {
    Sluice::start().await.expect("starting sluice up")
}

/// CreateRuntimeService: an echo backend and its Service (port named `port_name`) + Endpoints.
async fn runtime_service(sluice: &Sluice, name: &str, port_name: &str) -> EchoServer {
    let echo = EchoServer::start(name)
        .await
        .expect("starting an echo backend");
    sluice
        .apply_backend(NS, name, port_name, echo.port())
        .expect("writing the backend's Service and Endpoints");
    echo
}

/// CreateIngressReady: writes the Ingress and waits until it is Ready; returns it as /status shows it.
async fn create_ingress_ready(sluice: &mut Sluice, ingress: &Ingress) -> Value {
    sluice.apply_ingress(ingress).expect("writing the Ingress");
    sluice
        .wait_ready(NS, ingress.name(), READY)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// An Ingress with one ExternalIP rule for `hosts`, all traffic to `service`.
fn simple_ingress(name: &str, hosts: &[&str], service: &str) -> Ingress {
    Ingress::new(NS, name)
        .rule(Rule::external(hosts).path(Path::any().split(Split::to(service, SERVICE_PORT))))
}

/// RuntimeRequest: sends `req` to `addr` and returns what the echo backend saw (panics otherwise).
async fn runtime_request(addr: SocketAddr, req: Req) -> Echo {
    let what = format!("GET {} via {addr}", req.host());
    let resp = req
        .send(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    resp.echo().unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Sends `req` and checks the status code (e.g. 404 for a host the listener must not serve).
async fn expect_status(addr: SocketAddr, req: Req, want: StatusCode) {
    let what = format!("GET {} via {addr}", req.host());
    let resp = req
        .send(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(resp.status, want, "{what}: {}", resp.text());
}

/// Sends `total` GETs for `host``path` over `workers` kept-alive connections and counts the values of
/// `header` the backends saw. Every request must succeed.
async fn tally(
    addr: SocketAddr,
    host: &str,
    path: &str,
    header: &str,
    total: usize,
    workers: usize,
) -> BTreeMap<String, usize> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let n = total / workers + usize::from(w < total % workers);
        let (host, path, header) = (host.to_string(), path.to_string(), header.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr, Proto::Http1).await?;
            let mut seen = Vec::with_capacity(n);
            for _ in 0..n {
                let echo = conn.send(&Req::get(&host, &path)).await?.echo()?;
                seen.push(echo.header(&header).unwrap_or_default().to_string());
            }
            anyhow::Ok(seen)
        }));
    }
    let mut counts = BTreeMap::new();
    for task in tasks {
        let seen = task
            .await
            .expect("tally worker")
            .unwrap_or_else(|e| panic!("{host}{path}: {e:#}"));
        for value in seen {
            *counts.entry(value).or_insert(0) += 1;
        }
    }
    counts
}

/// Knative's percentage case: splits of 1, 2, 4, 8, 16, 32, then the remainder (37), then 0s, ten in all.
fn doubling_percents() -> Vec<i64> {
    let (mut percent, mut total) = (1, 0);
    let mut out = Vec::new();
    for _ in 0..10 {
        out.push(percent);
        total += percent;
        percent *= 2;
        if total + percent > 100 {
            percent = 100 - total;
        }
    }
    out
}

/// Checks a tally over `total` requests against the wanted percents: each within `margin` points,
/// and a 0% backend gets nothing at all.
fn check_distribution(
    seen: &BTreeMap<String, usize>,
    want: &[(String, i64)],
    total: usize,
    margin: f64,
) {
    let mut problems = Vec::new();
    for (name, percent) in want {
        let got = *seen.get(name).unwrap_or(&0) as f64 * 100.0 / total as f64;
        if *percent == 0 && got > 0.0 {
            problems.push(format!(
                "{name} received {got}% of the traffic, wanted none (0% split)"
            ));
        } else if (got - *percent as f64).abs() > margin {
            problems.push(format!(
                "{name} received {got}%, wanted {percent}% +/- {margin}"
            ));
        }
    }
    let unknown: Vec<&String> = seen
        .keys()
        .filter(|k| !want.iter().any(|(n, _)| n == *k))
        .collect();
    if !unknown.is_empty() {
        problems.push(format!("answers from no split: {unknown:?}"));
    }
    assert!(
        problems.is_empty(),
        "{}\n(tally: {seen:?})",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------
// Stable

/// basics: a no-frills Ingress (one ExternalIP rule) serves an HTTP/1 backend through the external
/// listener, with the client's Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basics() {
    let mut sluice = start_sluice().await;
    let backend = runtime_service(&sluice, "basics", "http").await;
    let host = "basics.example.com";
    create_ingress_ready(&mut sluice, &simple_ingress("basics", &[host], "basics")).await;

    let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
    assert_eq!(echo.name, "basics");
    assert_eq!(echo.host, host);
    assert_eq!(echo.proto, "HTTP/1.1");
    assert!(backend.requests() >= 1);
}

/// basics/http2: a backend whose Service port is named h2c gets HTTP/2 (h2c) from the gateway, even
/// from an HTTP/1.1 client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basics_http2() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "basics-http2", "h2c").await;
    let host = "basics-http2.example.com";
    create_ingress_ready(
        &mut sluice,
        &simple_ingress("basics-http2", &[host], "basics-http2"),
    )
    .await;

    let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
    assert_eq!(echo.name, "basics-http2");
    assert_eq!(echo.proto, "HTTP/2.0", "ProtoMajor seen by an h2c backend");
}

/// grpc: a bidirectional gRPC stream through the gateway (h2c both sides), 100 round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc() {
    let mut sluice = start_sluice().await;
    const SUFFIX: &str = "- pong";
    let backend = GrpcEchoServer::start(SUFFIX).await.expect("gRPC backend");
    sluice
        .apply_backend(NS, "grpc", "h2c", backend.port())
        .expect("backend objects");
    let host = "grpc.example.com";
    create_ingress_ready(&mut sluice, &simple_ingress("grpc", &[host], "grpc")).await;

    let mut client = GrpcClient::connect(sluice.external())
        .await
        .expect("h2c to the gateway");
    let mut stream = client
        .stream(host, PING_STREAM_PATH)
        .await
        .expect("PingStream");
    for i in 0..100 {
        let msg = format!("ping -{i}");
        let got = stream
            .round_trip(&msg)
            .await
            .unwrap_or_else(|e| panic!("round trip {i}: {e:#}"));
        assert_eq!(got, format!("{msg}{SUFFIX}"));
    }
    assert_eq!(
        stream.finish().await.expect("end of stream"),
        "0",
        "grpc-status"
    );
    assert_eq!(backend.streams(), 1);
}

/// Reads the suffix that identifies which gRPC backend a stream reached.
async fn grpc_suffix(stream: &mut sluice_e2e::GrpcStream, i: usize) -> String {
    let msg = format!("ping -{i}");
    let got = stream
        .round_trip(&msg)
        .await
        .unwrap_or_else(|e| panic!("stream {i}: {e:#}"));
    let suffix = got
        .strip_prefix(&msg)
        .unwrap_or_else(|| panic!("answer {got:?} does not start with {msg:?}"));
    suffix.trim().to_string()
}

/// Backends `<kind>-blue` and `<kind>-green` (port named `port_name`) behind a Ready 50/50 split on
/// host `<kind>-split.example.com`, which it returns.
async fn blue_green_split(
    sluice: &mut Sluice,
    kind: &str,
    port_name: &str,
    blue_port: u16,
    green_port: u16,
) -> String {
    let (blue, green) = (format!("{kind}-blue"), format!("{kind}-green"));
    for (name, port) in [(&blue, blue_port), (&green, green_port)] {
        sluice
            .apply_backend(NS, name, port_name, port)
            .expect("backend objects");
    }
    let host = format!("{kind}-split.example.com");
    let ingress = Ingress::new(NS, &format!("{kind}-split")).rule(
        Rule::external(&[&host]).path(
            Path::any()
                .split(Split::to(&blue, SERVICE_PORT).percent(50))
                .split(Split::to(&green, SERVICE_PORT).percent(50)),
        ),
    );
    create_ingress_ready(sluice, &ingress).await;
    host
}

/// grpc/split: gRPC streams through a 50/50 split reach both backends; each stream stays on its
/// backend for 10 round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_split() {
    let mut sluice = start_sluice().await;
    let blue = GrpcEchoServer::start("- blue").await.expect("gRPC backend");
    let green = GrpcEchoServer::start("- green")
        .await
        .expect("gRPC backend");
    let host = blue_green_split(&mut sluice, "grpc", "h2c", blue.port(), green.port()).await;
    let want: BTreeSet<String> = ["- blue", "- green"].map(String::from).into();
    let mut got = BTreeSet::new();
    let mut client = GrpcClient::connect(sluice.external())
        .await
        .expect("h2c to the gateway");
    for i in 0..100 {
        let mut stream = client
            .stream(&host, PING_STREAM_PATH)
            .await
            .expect("PingStream");
        let suffix = grpc_suffix(&mut stream, i).await;
        for j in 0..10 {
            let msg = format!("ping -{i}.{j}");
            let reply = stream
                .round_trip(&msg)
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e:#}"));
            assert_eq!(
                reply,
                format!("{msg}{suffix}"),
                "a stream must stay on one backend"
            );
        }
        assert_eq!(stream.finish().await.expect("end of stream"), "0");
        got.insert(suffix);
        if got == want {
            return;
        }
    }
    panic!("over 100 streams saw {got:?}, wanted {want:?}");
}

/// headers/pre-split: path-level appendHeaders are SET on the request: present without a client value,
/// and replacing a value the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_pre_split() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "headers-pre", "http").await;
    const HEADER: &str = "Foo-Bar-Baz";
    let host = "headers-pre.example.com";
    let ingress = Ingress::new(NS, "headers-pre").rule(
        Rule::external(&[host]).path(
            Path::any()
                .append_header(HEADER, "headers-pre")
                .split(Split::to("headers-pre", SERVICE_PORT)),
        ),
    );
    create_ingress_ready(&mut sluice, &ingress).await;

    let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
    assert_eq!(
        echo.header(HEADER),
        Some("headers-pre"),
        "without the header"
    );
    let echo = runtime_request(
        sluice.external(),
        Req::get(host, "").header(HEADER, "bogus"),
    )
    .await;
    assert_eq!(
        echo.header(HEADER),
        Some("headers-pre"),
        "set, not append, over a client value"
    );
}

/// headers/post-split: split-level appendHeaders over 4 x 25% splits, with set semantics; all four
/// backends are seen within 100 requests, and each answer carries its own backend's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_post_split() {
    let mut sluice = start_sluice().await;
    const HEADER: &str = "Foo-Bar-Baz";
    let mut backends = Vec::new();
    let mut path = Path::any();
    for i in 0..4 {
        let name = format!("headers-post-{i}");
        backends.push(runtime_service(&sluice, &name, "http").await);
        path = path.split(
            Split::to(&name, SERVICE_PORT)
                .percent(25)
                .append_header(HEADER, &name),
        );
    }
    let host = "headers-post.example.com";
    create_ingress_ready(
        &mut sluice,
        &Ingress::new(NS, "headers-post").rule(Rule::external(&[host]).path(path)),
    )
    .await;

    let want: BTreeSet<String> = backends.iter().map(|b| b.name().to_string()).collect();
    for client_value in [None, Some("bogus")] {
        let mut seen = BTreeSet::new();
        let mut conn = Conn::connect(sluice.external(), Proto::Http1)
            .await
            .expect("connect");
        for _ in 0..100 {
            let mut req = Req::get(host, "");
            if let Some(v) = client_value {
                req = req.header(HEADER, v);
            }
            let echo = conn
                .send(&req)
                .await
                .expect("request")
                .echo()
                .expect("echo");
            assert_eq!(
                echo.header(HEADER),
                Some(echo.name.as_str()),
                "the split's own header, set"
            );
            seen.insert(echo.name);
            if seen == want {
                break;
            }
        }
        assert_eq!(
            seen, want,
            "over 100 requests (client value {client_value:?})"
        );
    }
}

/// The hash Knative's `ingress.ComputeHash` gives: sha256 of Go's json.Marshal(spec), then namespace
/// and name. `spec_json` is written here as Go would encode the spec (field order, omitempty).
fn knative_hash(spec_json: &str, namespace: &str, name: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(spec_json.as_bytes());
    hasher.update(namespace.as_bytes());
    hasher.update(name.as_bytes());
    hex::encode(hasher.finalize())
}

/// headers/probe: `K-Network-Probe: probe` with `K-Network-Hash: override` reaches the backend with the
/// Ingress's hash; any other hash value passes through to the backend untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_probe() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "probe", "http").await;
    let host = "probe.example.com";
    // percent 100 written out: what Knative's defaulting stores for a single split, so the hash is the
    // same whether or not sluice defaults it first.
    let ingress = Ingress::new(NS, "headers-probe").rule(
        Rule::external(&[host])
            .path(Path::any().split(Split::to("probe", SERVICE_PORT).percent(100))),
    );
    let go_json = format!(
        r#"{{"rules":[{{"hosts":["{host}"],"visibility":"ExternalIP","http":{{"paths":[{{"splits":[{{"serviceNamespace":"{NS}","serviceName":"probe","servicePort":80,"percent":100}}]}}]}}}}]}}"#
    );
    let as_written: Value = serde_json::from_str(&go_json).expect("hand-written spec JSON");
    assert_eq!(
        as_written,
        ingress.spec(),
        "the hashed JSON must be the spec that was written"
    );
    let hash = knative_hash(&go_json, NS, "headers-probe");
    create_ingress_ready(&mut sluice, &ingress).await;

    let probe = |value: &str| {
        Req::get(host, "")
            .header(PROBE_HEADER, "probe")
            .header(HASH_HEADER, value)
    };
    let echo = runtime_request(sluice.external(), probe("override")).await;
    assert_eq!(
        echo.header(HASH_HEADER),
        Some(hash.as_str()),
        "the ingress generates its hash"
    );
    let random = "2701a1b241db6af811992c57a5e11171847148ac3d2e1a8cc992a62f9e4fa111";
    let echo = runtime_request(sluice.external(), probe(random)).await;
    assert_eq!(
        echo.header(HASH_HEADER),
        Some(random),
        "a request's own hash passes through"
    );
}

/// hosts/multiple: one rule with four hosts serves each of them, also with a port in the authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_multiple() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "hosts-multiple", "http").await;
    let hosts = [
        "hosts-multiple.example.com",
        "hosts-multiple.example.org",
        "alt.hosts-multiple.example.com",
        "hosts-multiple.svc.example.net",
    ];
    create_ingress_ready(
        &mut sluice,
        &simple_ingress("hosts-multiple", &hosts, "hosts-multiple"),
    )
    .await;

    for host in hosts {
        let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
        assert_eq!(echo.name, "hosts-multiple", "{host}");
        assert_eq!(echo.host, host);
        let with_port = format!("{host}:{}", sluice.ports.external);
        let echo = runtime_request(sluice.external(), Req::get(&with_port, "")).await;
        assert_eq!(echo.name, "hosts-multiple", "{with_port} (host:*)");
    }
}

/// The path case's Ingress: /foo, /bar, /baz each to their backend, the rest to the main one; every
/// split sets Which-Backend to its backend's name.
fn path_ingress(name: &str, rule: fn(&[&str]) -> Rule, host: &str, prefix: &str) -> Ingress {
    const HEADER: &str = "Which-Backend";
    let split = |backend: &str| {
        Split::to(backend, SERVICE_PORT)
            .percent(100)
            .append_header(HEADER, backend)
    };
    Ingress::new(NS, name).rule(
        rule(&[host])
            .path(Path::prefix("/foo").split(split(&format!("{prefix}-foo"))))
            .path(Path::prefix("/bar").split(split(&format!("{prefix}-bar"))))
            .path(Path::prefix("/baz").split(split(&format!("{prefix}-baz"))))
            .path(Path::any().split(split(&format!("{prefix}-main")))),
    )
}

async fn path_backends(sluice: &Sluice, prefix: &str) -> Vec<EchoServer> {
    let mut out = Vec::new();
    for which in ["foo", "bar", "baz", "main"] {
        out.push(runtime_service(sluice, &format!("{prefix}-{which}"), "http").await);
    }
    out
}

async fn check_paths(addr: SocketAddr, host: &str, prefix: &str) {
    for (path, want) in [
        ("/foo", "foo"),
        ("/bar", "bar"),
        ("/baz", "baz"),
        ("", "main"),
        ("/asdf", "main"),
        ("/foo/sub", "foo"),
    ] {
        let echo = runtime_request(addr, Req::get(host, path)).await;
        let want = format!("{prefix}-{want}");
        assert_eq!(
            echo.header("Which-Backend"),
            Some(want.as_str()),
            "path {path:?}"
        );
        assert_eq!(echo.name, want, "path {path:?}");
    }
}

/// dispatch/path: prefix routing: /foo, /bar and /baz each reach their backend; "" and /asdf reach the
/// catch-all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_path() {
    let mut sluice = start_sluice().await;
    let _backends = path_backends(&sluice, "path").await;
    let host = "dispatch-path.example.com";
    create_ingress_ready(
        &mut sluice,
        &path_ingress("dispatch-path", Rule::external, host, "path"),
    )
    .await;
    check_paths(sluice.external(), host, "path").await;
}

/// The percentage case's backends and Ingress rule (splits 1, 2, 4, 8, 16, 32, 37, 0, 0, 0 %, each
/// setting Foo-Bar-Baz to its backend's name).
async fn percentage_setup(
    sluice: &Sluice,
    prefix: &str,
    rule: Rule,
) -> (Vec<EchoServer>, Vec<(String, i64)>, Rule) {
    let mut backends = Vec::new();
    let mut weights = Vec::new();
    let mut path = Path::any();
    for (i, percent) in doubling_percents().into_iter().enumerate() {
        let name = format!("{prefix}-{i}");
        backends.push(runtime_service(sluice, &name, "http").await);
        path = path.split(
            Split::to(&name, SERVICE_PORT)
                .percent(percent)
                .append_header("Foo-Bar-Baz", &name),
        );
        weights.push((name, percent));
    }
    (backends, weights, rule.path(path))
}

/// dispatch/percentage: ten splits of 1, 2, 4, 8, 16, 32, 37, 0, 0, 0 %: over 1000 requests each gets
/// its share within 10 points, and the 0% splits get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_percentage() {
    let mut sluice = start_sluice().await;
    let host = "dispatch-percentage.example.com";
    let (backends, weights, rule) = percentage_setup(&sluice, "pct", Rule::external(&[host])).await;
    create_ingress_ready(
        &mut sluice,
        &Ingress::new(NS, "dispatch-percentage").rule(rule),
    )
    .await;

    let seen = tally(sluice.external(), host, "", "Foo-Bar-Baz", 1000, 8).await;
    check_distribution(&seen, &weights, 1000, 10.0);
    for (backend, (_, percent)) in backends.iter().zip(&weights) {
        if *percent == 0 {
            assert_eq!(backend.requests(), 0, "{} is a 0% split", backend.name());
        }
    }
}

/// dispatch/path_and_percentage: a 50/50 split on /foo: over 1000 requests each side gets 500 +- 150.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_path_and_percentage() {
    let mut sluice = start_sluice().await;
    let _a = runtime_service(&sluice, "pp-a", "http").await;
    let _b = runtime_service(&sluice, "pp-b", "http").await;
    let host = "dispatch-path-percentage.example.com";
    let ingress = Ingress::new(NS, "dispatch-path-percentage").rule(
        Rule::external(&[host]).path(
            Path::prefix("/foo")
                .split(
                    Split::to("pp-a", SERVICE_PORT)
                        .percent(50)
                        .append_header("Foo-Bar-Baz", "pp-a"),
                )
                .split(
                    Split::to("pp-b", SERVICE_PORT)
                        .percent(50)
                        .append_header("Foo-Bar-Baz", "pp-b"),
                ),
        ),
    );
    create_ingress_ready(&mut sluice, &ingress).await;

    let seen = tally(sluice.external(), host, "/foo", "Foo-Bar-Baz", 1000, 8).await;
    check_distribution(
        &seen,
        &[("pp-a".into(), 50), ("pp-b".into(), 50)],
        1000,
        15.0,
    );
}

/// dispatch/rule: two rules with different hosts reach different backends; an unknown host gets 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_rule() {
    let mut sluice = start_sluice().await;
    let _a = runtime_service(&sluice, "rule-a", "http").await;
    let _b = runtime_service(&sluice, "rule-b", "http").await;
    let ingress = Ingress::new(NS, "dispatch-rule")
        .rule(
            Rule::external(&["rule-a.example.com"])
                .path(Path::any().split(Split::to("rule-a", SERVICE_PORT))),
        )
        .rule(
            Rule::external(&["rule-b.example.com"])
                .path(Path::any().split(Split::to("rule-b", SERVICE_PORT))),
        );
    create_ingress_ready(&mut sluice, &ingress).await;

    for which in ["rule-a", "rule-b"] {
        let echo = runtime_request(
            sluice.external(),
            Req::get(&format!("{which}.example.com"), ""),
        )
        .await;
        assert_eq!(echo.name, which);
    }
    expect_status(
        sluice.external(),
        Req::get("rule-c.example.com", ""),
        StatusCode::NOT_FOUND,
    )
    .await;
}

/// retry: the ingress must not retry: the backend fails its first request with 503, and the client
/// sees that 503 (the backend saw exactly one request); the next request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry() {
    let mut sluice = start_sluice().await;
    let backend = EchoServer::start_with("retry", EchoOptions { fail_first: 1 })
        .await
        .expect("backend");
    sluice
        .apply_backend(NS, "retry", "http", backend.port())
        .expect("backend objects");
    let host = "retry.example.com";
    create_ingress_ready(&mut sluice, &simple_ingress("retry", &[host], "retry")).await;

    let first = Req::get(host, "")
        .send(sluice.external())
        .await
        .expect("first request");
    assert_ne!(
        first.status,
        StatusCode::OK,
        "got OK, expected the backend's failure: {}",
        first.text()
    );
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        first.text()
    );
    assert_eq!(
        backend.requests(),
        1,
        "the gateway retried the failed request"
    );
    let second = runtime_request(sluice.external(), Req::get(host, "")).await;
    assert_eq!(second.name, "retry");
}

/// timeout: the ingress must not time out requests: 16 s before the response headers, and 16 s in the
/// middle of the body, both still give 200 with the whole body. (More than Envoy's default 15 s route
/// timeout, so a route without `timeout: 0s` fails; the two run at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "timeout", "http").await;
    let host = "timeout.example.com";
    create_ingress_ready(&mut sluice, &simple_ingress("timeout", &[host], "timeout")).await;

    const DELAY_MS: u64 = 16_000;
    let client_bound = Duration::from_millis(DELAY_MS) + Duration::from_secs(20);
    let before_headers =
        Req::get(host, &format!("/?initialTimeout={DELAY_MS}")).timeout(client_bound);
    let mid_body = Req::get(host, &format!("/?timeout={DELAY_MS}")).timeout(client_bound);
    let started = Instant::now();
    let (a, b) = tokio::join!(
        before_headers.send(sluice.external()),
        mid_body.send(sluice.external())
    );
    for (what, resp) in [("delay before headers", a), ("delay mid-body", b)] {
        let resp = resp.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(resp.status, StatusCode::OK, "{what}: {}", resp.text());
        resp.echo()
            .unwrap_or_else(|e| panic!("{what}: the whole body must arrive: {e:#}"));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(DELAY_MS),
        "the backend really waited"
    );
}

/// tls: with spec.tls (secretName/secretNamespace), the host is served over http:// on the external
/// listener and over https:// on the TLS listener, where SNI picks the Secret's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "tls", "http").await;
    let host = "tls.example.com";
    let cert = TlsMaterial::issue(&[host]).expect("certificate");
    sluice
        .write_objects(
            "secret-tls.yaml",
            &[yaml::tls_secret(NS, "tls-cert", &cert)],
        )
        .expect("writing the Secret");
    let ingress = simple_ingress("tls", &[host], "tls").tls(&[host], "tls-cert");
    create_ingress_ready(&mut sluice, &ingress).await;

    let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
    assert_eq!(echo.name, "tls", "verify HTTP");
    let resp = Req::get(host, "")
        .send_tls(sluice.tls(), &cert)
        .await
        .unwrap_or_else(|e| panic!("verify HTTPS: {e:#}"));
    assert_eq!(resp.echo().expect("verify HTTPS").name, "tls");
}

/// update: under continuous requests, 10 updates that only change a header and then 10 swaps to fresh
/// backend Services (the previous one torn down after each) cause zero failed requests, and each new
/// version is served as soon as its Ready is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update() {
    const HEADER: &str = "Who-Are-You";
    const VERSION: &str = "e2e.sluice.dev/version";
    let mut sluice = start_sluice().await;
    let host = "update.example.com";
    let version_of = |generation: i64, service: &str, sentinel: &str| {
        Ingress::new(NS, "update")
            .generation(generation)
            .annotation(VERSION, &generation.to_string())
            .rule(Rule::external(&[host]).path(
                Path::any().split(Split::to(service, SERVICE_PORT).append_header(HEADER, sentinel)),
            ))
    };
    let mut previous = (
        "update-first".to_string(),
        runtime_service(&sluice, "update-first", "http").await,
    );
    create_ingress_ready(&mut sluice, &version_of(1, "update-first", "update-first")).await;

    // The prober: fresh connections, one request after another, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let prober = tokio::spawn({
        let (stop, ok, failures, addr) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            sluice.external(),
        );
        async move {
            while !stop.load(Ordering::SeqCst) {
                match Req::get(host, "")
                    .timeout(Duration::from_secs(10))
                    .send(addr)
                    .await
                {
                    Ok(resp) if resp.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{}: {}", resp.status, resp.text()))
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut generation = 1;
    let mut roll_out = async |sluice: &mut Sluice, service: &str, sentinel: &str| {
        generation += 1;
        sluice
            .apply_ingress(&version_of(generation, service, sentinel))
            .expect("updating the Ingress");
        sluice
            .wait_ready_with_annotation(NS, "update", VERSION, &generation.to_string(), READY)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        // Served as soon as Ready says so.
        let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
        assert_eq!(
            echo.header(HEADER),
            Some(sentinel),
            "generation {generation} right after Ready"
        );
        assert_eq!(echo.name, service);
    };

    for i in 0..10 {
        roll_out(
            &mut sluice,
            "update-first",
            &format!("update-first-sentinel-{i}"),
        )
        .await;
    }
    for i in 0..10 {
        let next = format!("update-next-{i}");
        let backend = runtime_service(&sluice, &next, "http").await;
        roll_out(&mut sluice, &next, &format!("{next}-sentinel")).await;
        // Once rolled out, tear the previous version down.
        let (old_name, mut old_backend) = std::mem::replace(&mut previous, (next, backend));
        old_backend.stop();
        sluice
            .delete_backend(NS, &old_name)
            .expect("deleting the previous Service");
    }

    stop.store(true, Ordering::SeqCst);
    prober.await.expect("prober");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} probe requests failed during updates; first ones: {:#?}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::SeqCst) > 20, "the prober hardly ran");
}

/// The three names a ClusterLocal service answers to: name.ns.svc.cluster.local, name.ns.svc, name.ns.
fn cluster_local_hosts(name: &str) -> [String; 3] {
    [
        format!("{name}.{NS}.svc.cluster.local"),
        format!("{name}.{NS}.svc"),
        format!("{name}.{NS}"),
    ]
}

/// visibility: a ClusterLocal rule (hosts name.ns.svc.cluster.local, name.ns.svc, name.ns) gets 404
/// through the external listener and is served through the cluster-local one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility() {
    let mut sluice = start_sluice().await;
    let backend = runtime_service(&sluice, "visibility", "http").await;
    let hosts = cluster_local_hosts("visibility");
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let ingress = Ingress::new(NS, "visibility").rule(
        Rule::cluster_local(&host_refs)
            .path(Path::any().split(Split::to("visibility", SERVICE_PORT))),
    );
    let ready = create_ingress_ready(&mut sluice, &ingress).await;
    assert!(
        ready
            .pointer("/status/privateLoadBalancer/ingress/0/domainInternal")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.is_empty()),
        "status.privateLoadBalancer carries domainInternal: {ready}"
    );

    for host in &hosts {
        expect_status(sluice.external(), Req::get(host, ""), StatusCode::NOT_FOUND).await;
    }
    assert_eq!(
        backend.requests(),
        0,
        "nothing reached the backend from outside"
    );
    for host in &hosts {
        let echo = runtime_request(sluice.internal(), Req::get(host, "")).await;
        assert_eq!(echo.name, "visibility", "{host} from inside");
    }
}

/// visibility/split: the percentage case on a ClusterLocal rule, through the cluster-local listener;
/// the external listener answers 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_split() {
    let mut sluice = start_sluice().await;
    let host = format!("visibility-split.{NS}.svc.cluster.local");
    let (backends, weights, rule) =
        percentage_setup(&sluice, "vsplit", Rule::cluster_local(&[&host])).await;
    create_ingress_ready(
        &mut sluice,
        &Ingress::new(NS, "visibility-split").rule(rule),
    )
    .await;

    expect_status(
        sluice.external(),
        Req::get(&host, ""),
        StatusCode::NOT_FOUND,
    )
    .await;
    let seen = tally(sluice.internal(), &host, "", "Foo-Bar-Baz", 1000, 8).await;
    check_distribution(&seen, &weights, 1000, 10.0);
    for (backend, (_, percent)) in backends.iter().zip(&weights) {
        if *percent == 0 {
            assert_eq!(backend.requests(), 0, "{} is a 0% split", backend.name());
        }
    }
}

/// visibility/path: the path case on a ClusterLocal rule, through the cluster-local listener; every path
/// answers 404 on the external listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_path() {
    let mut sluice = start_sluice().await;
    let backends = path_backends(&sluice, "vpath").await;
    let host = format!("visibility-path.{NS}.svc.cluster.local");
    create_ingress_ready(
        &mut sluice,
        &path_ingress("visibility-path", Rule::cluster_local, &host, "vpath"),
    )
    .await;

    for path in ["", "/foo", "/bar", "/baz"] {
        expect_status(
            sluice.external(),
            Req::get(&host, path),
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    assert!(
        backends.iter().all(|b| b.requests() == 0),
        "nothing reached a backend from outside"
    );
    check_paths(sluice.internal(), &host, "vpath").await;
}

/// ingressclass: Ingresses whose class annotation is missing (no annotations, or an empty map), empty,
/// or another class are left untouched: no status, no routes, files unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingressclass() {
    let mut sluice = start_sluice().await;
    let backend = runtime_service(&sluice, "class-backend", "http").await;
    let _sentinel_backend = runtime_service(&sluice, "class-sentinel", "http").await;
    let cases = [
        ("class-nil", Class::NoAnnotations),
        ("class-omitted", Class::EmptyAnnotations),
        ("class-incorrect", Class::Other("incorrect".into())),
        ("class-empty", Class::Other(String::new())),
    ];
    let mut files = Vec::new();
    for (name, class) in &cases {
        let ingress = simple_ingress(name, &[&format!("{name}.example.com")], "class-backend")
            .class(class.clone());
        sluice.apply_ingress(&ingress).expect("writing the Ingress");
        let file = sluice
            .config_dir()
            .join(format!("ingress-{NS}-{name}.yaml"));
        files.push((file.clone(), std::fs::read(&file).expect("reading back")));
    }
    // Ours, written last: once it is Ready, sluice has seen the others.
    let sentinel_host = "class-sentinel.example.com";
    create_ingress_ready(
        &mut sluice,
        &simple_ingress("class-sentinel", &[sentinel_host], "class-sentinel"),
    )
    .await;
    runtime_request(sluice.external(), Req::get(sentinel_host, "")).await;
    // The Go suite watches for 2 s before checking nothing changed.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let status = sluice.status().await.expect("GET /status");
    for (name, _) in &cases {
        if let Some(ing) = sluice_e2e::sluice::find_ingress(&status, NS, name) {
            let conditions = ing
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            assert_eq!(conditions, 0, "{name} got a status: {ing}");
        }
        let resp = Req::get(&format!("{name}.example.com"), "")
            .send(sluice.external())
            .await
            .expect("request");
        assert_ne!(
            resp.status,
            StatusCode::OK,
            "{name} is served: {}",
            resp.text()
        );
    }
    assert_eq!(
        backend.requests(),
        0,
        "an Ingress of another class routed traffic"
    );
    for (file, before) in files {
        assert_eq!(
            std::fs::read(&file).expect("reading back"),
            before,
            "{} was changed",
            file.display()
        );
    }
}

/// websocket: a websocket upgrade through the gateway, then 100 round trips on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket() {
    let mut sluice = start_sluice().await;
    let backend = WebsocketEchoServer::start("- pong")
        .await
        .expect("websocket backend");
    sluice
        .apply_backend(NS, "websocket", "http", backend.port())
        .expect("backend objects");
    let host = "websocket.example.com";
    create_ingress_ready(
        &mut sluice,
        &simple_ingress("websocket", &[host], "websocket"),
    )
    .await;

    let mut client = WebsocketClient::connect(sluice.external(), host, "/")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    for i in 0..100 {
        let msg = format!("ping -{i}");
        let got = client
            .round_trip(&msg)
            .await
            .unwrap_or_else(|e| panic!("round trip {i}: {e:#}"));
        assert_eq!(got, format!("{msg} - pong"));
    }
    client.close().await.expect("close");
    assert_eq!(backend.connections(), 1);
}

/// websocket/split: websockets through a 50/50 split reach both backends; each connection stays on its
/// backend for 10 round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_split() {
    let mut sluice = start_sluice().await;
    let blue = WebsocketEchoServer::start("- blue")
        .await
        .expect("websocket backend");
    let green = WebsocketEchoServer::start("- green")
        .await
        .expect("websocket backend");
    let host = blue_green_split(&mut sluice, "websocket", "http", blue.port(), green.port()).await;
    let want: BTreeSet<String> = ["- blue", "- green"].map(String::from).into();
    let mut got = BTreeSet::new();
    for i in 0..100 {
        let mut client = WebsocketClient::connect(sluice.external(), &host, "/")
            .await
            .unwrap_or_else(|e| panic!("dial {i}: {e:#}"));
        let msg = format!("ping -{i}");
        let reply = client
            .round_trip(&msg)
            .await
            .unwrap_or_else(|e| panic!("dial {i}: {e:#}"));
        let suffix = reply
            .strip_prefix(&msg)
            .unwrap_or_else(|| panic!("answer {reply:?} does not start with {msg:?}"))
            .trim()
            .to_string();
        for j in 0..10 {
            let msg = format!("ping -{i}.{j}");
            let reply = client
                .round_trip(&msg)
                .await
                .unwrap_or_else(|e| panic!("dial {i}: {e:#}"));
            assert_eq!(
                reply,
                format!("{msg} {suffix}"),
                "a connection must stay on one backend"
            );
        }
        let _ = client.close().await;
        got.insert(suffix);
        if got == want {
            return;
        }
    }
    panic!("over 100 connections saw {got:?}, wanted {want:?}");
}

// ---------------------------------------------------------------------------------------------------
// Beta

/// host-rewrite: an external rule with vanity hosts reaches a cluster-local service through
/// rewriteHost: the request goes to a Service standing for the private load balancer (Knative: an
/// ExternalName Service; here Endpoints on the cluster-local listener) with Host rewritten to the
/// private name, which the ClusterLocal rule then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rewrite() {
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "rewrite-backend", "http").await;
    let private_host = format!("rewrite-private.{NS}.svc.cluster.local");
    let private = Ingress::new(NS, "rewrite-private").rule(
        Rule::cluster_local(&[&private_host])
            .path(Path::any().split(Split::to("rewrite-backend", SERVICE_PORT))),
    );
    let ready = create_ingress_ready(&mut sluice, &private).await;
    let lb = ready
        .pointer("/status/privateLoadBalancer/ingress/0/domainInternal")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        !lb.is_empty(),
        "the private load balancer's domainInternal: {ready}"
    );
    sluice
        .apply_backend(NS, "rewrite-private", "http", sluice.ports.internal)
        .expect("the Service in front of the private load balancer");

    let hosts = ["rewrite.vanity.ismy.name", "rewrite.vanity.isalsomy.number"];
    let public = Ingress::new(NS, "rewrite-public").rule(
        Rule::external(&hosts).path(
            Path::any()
                .rewrite_host(&private_host)
                .split(Split::to("rewrite-private", SERVICE_PORT)),
        ),
    );
    create_ingress_ready(&mut sluice, &public).await;

    for host in hosts {
        let echo = runtime_request(sluice.external(), Req::get(host, "")).await;
        assert_eq!(echo.name, "rewrite-backend", "{host}");
        assert_eq!(echo.host, private_host, "{host}: Host rewritten");
    }
}

/// headers/tags: a path that requires `Knative-Serving-Tag: the-tag` routes to the tagged backend; a
/// missing, empty or other tag falls through to the default path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_tags() {
    const HEADER: &str = "Which-Backend";
    let mut sluice = start_sluice().await;
    let _backend = runtime_service(&sluice, "tags", "http").await;
    let host = "tags.example.com";
    let ingress = Ingress::new(NS, "headers-tags").rule(
        Rule::external(&[host])
            .path(
                Path::any()
                    .header_exact(TAG_HEADER, "the-tag")
                    .append_header(HEADER, "tag")
                    .split(Split::to("tags", SERVICE_PORT)),
            )
            .path(
                Path::any()
                    .append_header(HEADER, "no-tag")
                    .split(Split::to("tags", SERVICE_PORT)),
            ),
    );
    create_ingress_ready(&mut sluice, &ingress).await;

    for (what, tag, want) in [
        ("matching tag header", Some("the-tag"), "tag"),
        ("no tag header", None, "no-tag"),
        ("empty tag header", Some(""), "no-tag"),
        ("non-matching tag header", Some("not-the-tag"), "no-tag"),
    ] {
        let mut req = Req::get(host, "");
        if let Some(tag) = tag {
            req = req.header(TAG_HEADER, tag);
        }
        let echo = runtime_request(sluice.external(), req).await;
        assert_eq!(echo.header(HEADER), Some(want), "{what}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Alpha

/// httpoption: with spec.tls, httpOption Enabled serves plain HTTP (200) and Redirected answers plain
/// HTTP on the external listener with a 301 to https; HTTPS works in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpoption() {
    let mut sluice = start_sluice().await;
    for (option, want) in [
        ("Enabled", StatusCode::OK),
        ("Redirected", StatusCode::MOVED_PERMANENTLY),
    ] {
        let name = format!("httpoption-{}", option.to_ascii_lowercase());
        let _backend = runtime_service(&sluice, &name, "http").await;
        let host = format!("{name}.example.com");
        let cert = TlsMaterial::issue(&[&host]).expect("certificate");
        let secret = format!("{name}-cert");
        sluice
            .write_objects(
                &format!("secret-{name}.yaml"),
                &[yaml::tls_secret(NS, &secret, &cert)],
            )
            .expect("writing the Secret");
        let ingress = simple_ingress(&name, &[&host], &name)
            .tls(&[&host], &secret)
            .http_option(option);
        create_ingress_ready(&mut sluice, &ingress).await;

        let resp = Req::get(&host, "")
            .send_tls(sluice.tls(), &cert)
            .await
            .unwrap_or_else(|e| panic!("{option}: HTTPS: {e:#}"));
        assert_eq!(
            resp.echo()
                .unwrap_or_else(|e| panic!("{option}: HTTPS: {e:#}"))
                .name,
            name
        );

        let resp = Req::get(&host, "")
            .send(sluice.external())
            .await
            .unwrap_or_else(|e| panic!("{option}: HTTP: {e:#}"));
        assert_eq!(resp.status, want, "{option}: plain HTTP: {}", resp.text());
        if want == StatusCode::MOVED_PERMANENTLY {
            let location = resp.header("location").unwrap_or_default();
            assert!(
                location.starts_with(&format!("https://{host}")),
                "{option}: Location {location:?}"
            );
        }
    }
}
