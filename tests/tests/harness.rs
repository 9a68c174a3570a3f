//! Self-tests of the e2e helpers, without sluice: the backends, the clients, TLS material, the process
//! guard and the YAML builders.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sluice_e2e::backends::echo::EchoOptions;
use sluice_e2e::process::ProcessGuard;
use sluice_e2e::tls::TlsMaterial;
use sluice_e2e::yaml::{self, Class, Ingress, Path, Rule, Split};
use sluice_e2e::{
    Conn, EchoServer, GrpcClient, GrpcEchoServer, Proto, Req, WebsocketClient, WebsocketEchoServer,
};

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..20).map(|_| sluice_e2e::free_port()).collect();
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ports.len(),
        "free_port handed out a port twice: {ports:?}"
    );
    for port in ports {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("a free port binds");
    }
}

#[test]
fn process_guard_kills_the_whole_group_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let mut cmd = std::process::Command::new("sh");
    // The shell ignores SIGTERM and its background child would outlive it: only a group kill ends both.
    cmd.arg("-c").arg(format!(
        "trap '' TERM; sleep 300 & echo $! > {}; wait",
        pid_file.display()
    ));
    let guard = ProcessGuard::spawn(cmd, Duration::from_millis(300)).unwrap();
    let leader = guard.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let grandchild: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the shell never wrote its child's pid"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(alive(grandchild), "the grandchild should be running");
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(grandchild) {
        assert!(
            Instant::now() < deadline,
            "grandchild {grandchild} of group {leader} survived the guard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Running (a zombie waiting for its reaper counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn echo_answers_http1_and_h2c_with_what_it_saw() {
    let echo = EchoServer::start("blue").await.unwrap();

    let resp = Req::get("svc.example.com", "/a/b?c=d")
        .header("X-Test", "one")
        .send(echo.addr())
        .await
        .unwrap();
    let seen = resp.echo().unwrap();
    assert_eq!(seen.name, "blue");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.host, "svc.example.com");
    assert_eq!(seen.path, "/a/b");
    assert_eq!(seen.url, "/a/b?c=d");
    assert_eq!(seen.proto, "HTTP/1.1");
    assert_eq!(seen.header("x-test"), Some("one"));

    let resp = Req::get("svc.example.com", "")
        .h2c()
        .send(echo.addr())
        .await
        .unwrap();
    assert_eq!(resp.version, http::Version::HTTP_2);
    let seen = resp.echo().unwrap();
    assert_eq!(seen.proto, "HTTP/2.0");
    assert_eq!(seen.host, "svc.example.com");
    assert_eq!(seen.path, "/");

    // Keep-alive connections, both protocols.
    for proto in [Proto::Http1, Proto::H2c] {
        let mut conn = Conn::connect(echo.addr(), proto).await.unwrap();
        for i in 0..3 {
            let seen = conn
                .send(&Req::get("k.example.com", &format!("/{i}")))
                .await
                .unwrap()
                .echo()
                .unwrap();
            assert_eq!(seen.path, format!("/{i}"));
        }
    }
    assert_eq!(echo.requests(), 8);
}

#[tokio::test]
async fn echo_delays_headers_and_body_on_request() {
    let echo = EchoServer::start("slow").await.unwrap();
    let started = Instant::now();
    let resp = Req::get("slow.example.com", "/?initialTimeout=300")
        .send(echo.addr())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "headers came after {:?}",
        started.elapsed()
    );
    resp.echo().unwrap();

    let started = Instant::now();
    let resp = Req::get("slow.example.com", "/?timeout=300")
        .h2c()
        .send(echo.addr())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "body ended after {:?}",
        started.elapsed()
    );
    assert_eq!(
        resp.echo().unwrap().url,
        "/?timeout=300",
        "the whole body arrives, in two parts"
    );

    // The client's own bound holds.
    let err = Req::get("slow.example.com", "/?initialTimeout=2000")
        .timeout(Duration::from_millis(200))
        .send(echo.addr())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no answer within"), "{err:#}");
}

#[tokio::test]
async fn echo_fails_the_first_requests_when_asked() {
    let echo = EchoServer::start_with("flaky", EchoOptions { fail_first: 1 })
        .await
        .unwrap();
    let first = Req::get("flaky.example.com", "/")
        .send(echo.addr())
        .await
        .unwrap();
    assert_eq!(first.status, http::StatusCode::SERVICE_UNAVAILABLE);
    let second = Req::get("flaky.example.com", "/")
        .send(echo.addr())
        .await
        .unwrap();
    assert_eq!(second.echo().unwrap().name, "flaky");
    assert_eq!(echo.requests(), 2);
}

#[tokio::test]
async fn stopped_backends_refuse_connections() {
    let mut echo = EchoServer::start("gone").await.unwrap();
    let addr = echo.addr();
    Req::get("gone.example.com", "/")
        .send(addr)
        .await
        .unwrap()
        .echo()
        .unwrap();
    let mut conn = Conn::connect(addr, Proto::Http1).await.unwrap();
    echo.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        Req::get("gone.example.com", "/").send(addr).await.is_err(),
        "the listener is closed"
    );
    assert!(
        conn.send(&Req::get("gone.example.com", "/")).await.is_err(),
        "open connections are closed"
    );
}

#[tokio::test]
async fn websocket_echo_round_trips_with_its_name() {
    let server = WebsocketEchoServer::start("- pong").await.unwrap();
    let mut client = WebsocketClient::connect(server.addr(), "ws.example.com", "/")
        .await
        .unwrap();
    for i in 0..20 {
        let msg = format!("ping - {i}");
        assert_eq!(
            client.round_trip(&msg).await.unwrap(),
            format!("{msg} - pong")
        );
    }
    client.close().await.unwrap();
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn grpc_echo_streams_both_ways() {
    let server = GrpcEchoServer::start("- pong").await.unwrap();
    let mut client = GrpcClient::connect(server.addr()).await.unwrap();
    let mut first = client
        .stream(
            "grpc.example.com",
            sluice_e2e::backends::grpc::PING_STREAM_PATH,
        )
        .await
        .unwrap();
    let mut second = client
        .stream(
            "grpc.example.com",
            sluice_e2e::backends::grpc::PING_STREAM_PATH,
        )
        .await
        .unwrap();
    for i in 0..50 {
        let msg = format!("ping -{i}");
        assert_eq!(
            first.round_trip(&msg).await.unwrap(),
            format!("{msg}- pong")
        );
        assert_eq!(
            second.round_trip(&msg).await.unwrap(),
            format!("{msg}- pong")
        );
    }
    assert_eq!(first.finish().await.unwrap(), "0");
    assert_eq!(second.finish().await.unwrap(), "0");
    assert_eq!(server.streams(), 2);

    // Not gRPC: refused.
    let resp = Req::new(http::Method::POST, "grpc.example.com", "/x")
        .h2c()
        .send(server.addr())
        .await
        .unwrap();
    assert_eq!(resp.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn tls_client_checks_the_certificate_against_the_sni_name() {
    let material = TlsMaterial::issue(&["secure.example.com"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(material.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls
                    .get_ref()
                    .1
                    .server_name()
                    .unwrap_or_default()
                    .to_string();
                let service = hyper::service::service_fn(move |_req| {
                    let body = format!("sni={sni}");
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });

    let resp = Req::get("secure.example.com", "/")
        .send_tls(addr, &material)
        .await
        .unwrap();
    assert_eq!(resp.status, http::StatusCode::OK);
    assert_eq!(resp.text(), "sni=secure.example.com");

    let wrong_name = Req::get("other.example.com", "/")
        .send_tls(addr, &material)
        .await;
    assert!(
        wrong_name.is_err(),
        "a certificate for another name must be refused"
    );

    let other_ca = TlsMaterial::issue(&["secure.example.com"]).unwrap();
    let wrong_ca = Req::get("secure.example.com", "/")
        .send_tls(addr, &other_ca)
        .await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from an untrusted CA must be refused"
    );
    server.abort();

    assert!(material.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(material.key_pem.contains("PRIVATE KEY"));
    let _unused: Arc<rustls::ClientConfig> = material.client_config(&[b"h2"]).unwrap();
}

#[test]
fn yaml_builders_make_objects_sluice_accepts() {
    let tls = TlsMaterial::issue(&["a.example.com"]).unwrap();
    let ingress = Ingress::new("serving-tests", "everything")
        .generation(3)
        .annotation("e2e/version", "7")
        .tls(&["a.example.com"], "a-cert")
        .http_option("Redirected")
        .rule(
            Rule::external(&["a.example.com", "b.example.com"])
                .path(
                    Path::prefix("/foo")
                        .header_exact("Knative-Serving-Tag", "the-tag")
                        .append_header("Which-Backend", "tag")
                        .rewrite_host("x.serving-tests.svc.cluster.local")
                        .split(
                            Split::to("blue", 80)
                                .percent(40)
                                .append_header("Foo-Bar-Baz", "blue"),
                        )
                        .split(Split::to("green", "http").percent(60)),
                )
                .path(Path::any().split(Split::to("main", 80).percent(0))),
        )
        .rule(
            Rule::cluster_local(&["x.serving-tests.svc.cluster.local"])
                .path(Path::any().split(Split::to("main", 80))),
        );
    let mut objects = vec![
        ingress.to_value(),
        yaml::tls_secret("serving-tests", "a-cert", &tls),
    ];
    objects.extend(yaml::backend("serving-tests", "main", "h2c", 12345));
    let text = yaml::documents(&objects);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 4);

    let parsed: sluice_api::Ingress = serde_yaml::from_value(docs[0].clone()).unwrap();
    assert!(parsed.is_sluice_class());
    assert_eq!(parsed.metadata.generation, 3);
    assert_eq!(parsed.metadata.annotations["e2e/version"], "7");
    assert_eq!(parsed.spec.http_option, "Redirected");
    assert_eq!(parsed.spec.tls[0].secret_namespace, "serving-tests");
    let rule = &parsed.spec.rules[0];
    assert_eq!(rule.visibility, "ExternalIP");
    let path = &rule.http.as_ref().unwrap().paths[0];
    assert_eq!(path.path, "/foo");
    assert_eq!(path.headers["Knative-Serving-Tag"].exact, "the-tag");
    assert_eq!(path.append_headers["Which-Backend"], "tag");
    assert_eq!(path.splits[0].service_namespace, "serving-tests");
    assert_eq!(path.splits[0].percent, 40);
    assert_eq!(path.splits[0].append_headers["Foo-Bar-Baz"], "blue");
    assert_eq!(
        path.splits[1].service_port,
        sluice_api::ingress::IntOrString::String("http".into())
    );
    assert_eq!(parsed.spec.rules[1].visibility, "ClusterLocal");

    let secret: sluice_api::core::Secret = serde_yaml::from_value(docs[1].clone()).unwrap();
    assert_eq!(secret.type_, "kubernetes.io/tls");
    assert!(secret.data.contains_key("tls.crt") && secret.data.contains_key("tls.key"));
    let service: sluice_api::core::Service = serde_yaml::from_value(docs[2].clone()).unwrap();
    assert_eq!(service.spec.ports[0].name, "h2c");
    assert_eq!(service.spec.ports[0].port, 80);
    let endpoints: sluice_api::core::Endpoints = serde_yaml::from_value(docs[3].clone()).unwrap();
    assert_eq!(endpoints.subsets[0].addresses[0].ip, "127.0.0.1");
    assert_eq!(endpoints.subsets[0].ports[0].port, 12345);

    // The class annotation variants of the ingressclass case.
    let bare = || {
        Ingress::new("ns", "n")
            .rule(Rule::external(&["n.example.com"]).path(Path::any().split(Split::to("s", 80))))
    };
    assert!(
        bare().class(Class::NoAnnotations).to_value()["metadata"]
            .get("annotations")
            .is_none()
    );
    assert_eq!(
        bare().class(Class::EmptyAnnotations).to_value()["metadata"]["annotations"],
        serde_json::json!({})
    );
    let empty: sluice_api::Ingress =
        serde_json::from_value(bare().class(Class::Other(String::new())).to_value()).unwrap();
    assert_eq!(empty.ingress_class(), None);
    let other: sluice_api::Ingress =
        serde_json::from_value(bare().class(Class::Other("istio".into())).to_value()).unwrap();
    assert!(!other.is_sluice_class());
}

#[test]
fn envoy_is_available_to_sluice() {
    // scripts/setup installs Envoy into .venv/; without it every conformance case would fail, so say so.
    sluice_e2e::sluice::envoy_for_sluice().expect("Envoy for sluice up");
}

#[test]
fn process_guard_also_kills_children_that_left_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("escaped.pid");
    let mut cmd = std::process::Command::new("sh");
    // `setsid` puts the child in a session (and group) of its own, as sluice does with Envoy; the shell
    // then waits for it, ignoring SIGTERM.
    cmd.arg("-c").arg(format!(
        "trap '' TERM; setsid sh -c 'echo $$ > {}; exec sleep 300' & wait",
        pid_file.display()
    ));
    let guard = ProcessGuard::spawn(cmd, Duration::from_millis(300)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let escaped: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the escaped child never wrote its pid"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Give `exec sleep` a moment so the pid is the sleeping process.
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(escaped));
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(escaped) {
        assert!(
            Instant::now() < deadline,
            "the child in its own group survived the guard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
