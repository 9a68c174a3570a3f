//! The queue-proxy wasm filter in a real Envoy (two worker threads, so two wasm VMs) in front of a
//! loopback backend: the breaker, the autoscaler metrics, the probes, and configuration errors.
//! Timing: bounds are generous (a busy 2-core machine), and a limit is checked by what the backend saw,
//! never by how fast something went.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_e2e::Req;
use sluice_e2e::queue_proxy::{EnvoySpec, Form, QueueProxyEnvoy, SlowBackend, validate};

/// The metric names the autoscaler scrapes (wasm-filters/README.md), for namespace
/// "default", revision "hello-00001", instance "hello-00001-a".
const INSTANCE: &str = "sluice_qp__default__hello_00001__hello_00001_a__";
const REVISION: &str = "sluice_qp__default__hello_00001__";

fn plugin_config(container_concurrency: u32) -> Value {
    json!({
        "namespace": "default",
        "revision": "hello-00001",
        "service": "hello",
        "instance": "hello-00001-a",
        "containerConcurrency": container_concurrency,
    })
}

fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

fn instance(stat: &str) -> String {
    format!("{INSTANCE}{stat}")
}

fn revision(stat: &str) -> String {
    format!("{REVISION}{stat}")
}

async fn start(form: Form, config: Value) -> Result<(SlowBackend, QueueProxyEnvoy)> {
    let backend = SlowBackend::start().await?;
    let envoy = QueueProxyEnvoy::start(&EnvoySpec::new(config, backend.addr()).form(form)).await?;
    Ok((backend, envoy))
}

fn get(path: &str) -> Req {
    Req::get("hello.default.localhost", path).timeout(Duration::from_secs(60))
}

/// Polls `check` until it holds, failing after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => eprintln!("{what}: {e:#}"),
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_metric(envoy: &QueueProxyEnvoy, name: &str, want: i64) {
    eventually(
        &format!("{name} == {want}"),
        Duration::from_secs(20),
        || async { Ok(envoy.metric(name).await? == Some(want)) },
    )
    .await;
}

async fn breaker_holds_container_concurrency_1_across_two_workers(form: Form) {
    // Knative's default depth (10 x 1) holds 11 pending requests; 12 need a deeper queue.
    let config = with(plugin_config(1), "queueDepth", json!(12));
    let (backend, envoy) = start(form, config).await.unwrap();
    let started = Instant::now();
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let addr = envoy.addr();
            // Each on its own connection, so the kernel spreads them over both workers.
            tokio::spawn(async move { get("/?sleep=300").send(addr).await })
        })
        .collect();
    for request in requests {
        let resp = request.await.unwrap().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert_eq!(resp.text(), "ok 0\n");
    }
    assert_eq!(backend.requests(), 12);
    assert_eq!(
        backend.max_in_flight(),
        1,
        "the backend saw two requests at once"
    );
    // One at a time: at least 12 x 300 ms (only a lower bound; slowness cannot break it).
    assert!(started.elapsed() >= Duration::from_millis(3500));

    let port = envoy.addr().port();
    let mut per_worker = Vec::new();
    for worker in 0..2 {
        let stat = format!("listener.127.0.0.1_{port}.worker_{worker}.downstream_cx_total");
        per_worker.push(envoy.stat(&stat).await.unwrap().unwrap_or(0));
    }
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "both workers should have had connections: {per_worker:?}"
    );
    // Counters and gauges are written on the filter's 100 ms tick.
    wait_metric(&envoy, &instance("in_flight"), 0).await;
    wait_metric(&envoy, &instance("queued"), 0).await;
    wait_metric(&envoy, &instance("requests_total"), 12).await;
}

async fn breaker_holds_container_concurrency_3_under_a_burst(form: Form) {
    let (backend, envoy) = start(form, plugin_config(3)).await.unwrap();
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let addr = envoy.addr();
            let req = if i % 2 == 0 {
                get("/?sleep=100")
            } else {
                Req::new(Method::POST, "hello.default.localhost", "/?sleep=100")
                    .body(vec![b'x'; 1000])
                    .timeout(Duration::from_secs(60))
            };
            tokio::spawn(async move { req.send(addr).await })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let resp = request.await.unwrap().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        let want = if i % 2 == 0 { "ok 0\n" } else { "ok 1000\n" };
        assert_eq!(resp.text(), want, "queued bodies arrive whole");
    }
    assert_eq!(backend.requests(), 30);
    assert!(
        (1..=3).contains(&backend.max_in_flight()),
        "max in flight {}",
        backend.max_in_flight()
    );
}

async fn lending_workers_hold_container_concurrency_16_and_give_every_slot_back(form: Form) {
    // containerConcurrency 16: each worker leases slots in batches of 2 and admits from them without
    // shared data while nobody waits; a burst of 64 makes requests queue, which calls the idle slots
    // back from the other worker.
    let (backend, envoy) = start(form, plugin_config(16)).await.unwrap();
    let burst = |n: usize, sleep_ms: u64| -> Vec<_> {
        (0..n)
            .map(|_| {
                let addr = envoy.addr();
                tokio::spawn(async move { get(&format!("/?sleep={sleep_ms}")).send(addr).await })
            })
            .collect()
    };
    for request in burst(64, 100) {
        let resp = request.await.unwrap().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    }
    assert_eq!(backend.requests(), 64);
    assert!(
        backend.max_in_flight() <= 16,
        "max in flight {}",
        backend.max_in_flight()
    );
    wait_metric(&envoy, &instance("in_flight"), 0).await;
    wait_metric(&envoy, &instance("queued"), 0).await;

    // Every slot came back, whichever worker leased it: 16 long requests all run at once.
    let long = burst(16, 2000);
    wait_metric(&envoy, &instance("in_flight"), 16).await;
    assert_eq!(envoy.metric(&instance("queued")).await.unwrap(), Some(0));
    for request in long {
        let resp = request.await.unwrap().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    }
    assert!(backend.max_in_flight() <= 16);
    let port = envoy.addr().port();
    for worker in 0..2 {
        let stat = format!("listener.127.0.0.1_{port}.worker_{worker}.downstream_cx_total");
        let connections = envoy.stat(&stat).await.unwrap().unwrap_or(0);
        assert!(connections > 0, "worker {worker} had no connection");
    }
}

/// A request whose body is larger than Envoy's buffer limit (1 MiB) waits in the queue like any
/// other and reaches the instance whole, with no 413.
async fn a_queued_request_with_a_large_body_is_served_whole(form: Form) {
    let (backend, envoy) = start(form, plugin_config(1)).await.unwrap();
    let addr = envoy.addr();
    let holder = tokio::spawn(async move { get("/?sleep=800").send(addr).await });
    eventually("the slot is held", Duration::from_secs(20), || async {
        Ok(backend.requests() == 1)
    })
    .await;
    let body = vec![b'x'; 3_000_000];
    let resp = Req::new(Method::POST, "hello.default.localhost", "/")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send(addr)
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.text(), "ok 3000000\n");
    assert_eq!(holder.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(backend.max_in_flight(), 1);
}

async fn queued_requests_are_served_in_arrival_order(form: Form) {
    let (_backend, envoy) = start(form, plugin_config(1)).await.unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let addr = envoy.addr();
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let resp = get("/?sleep=300").send(addr).await.unwrap();
            assert_eq!(resp.status, StatusCode::OK);
            done.send(i).unwrap();
        }));
        // Wait until Envoy has it (held or queued) before sending the next: arrival order is known.
        wait_metric(&envoy, &instance("requests_total"), i + 1).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    drop(done_tx);
    let mut order = Vec::new();
    while let Some(i) = done_rx.recv().await {
        order.push(i);
    }
    assert_eq!(order, [0, 1, 2, 3, 4, 5], "FIFO across workers");
}

async fn a_full_queue_answers_503_at_once(form: Form) {
    let config = with(plugin_config(1), "queueDepth", json!(1));
    let (backend, envoy) = start(form, config).await.unwrap();
    let addr = envoy.addr();
    let held = tokio::spawn(async move { get("/?sleep=3000").send(addr).await });
    wait_metric(&envoy, &instance("in_flight"), 1).await;
    let queued = tokio::spawn(async move { get("/?sleep=10").send(addr).await });
    wait_metric(&envoy, &instance("queued"), 1).await;

    let sent = Instant::now();
    let refused = get("/").send(addr).await.unwrap();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.text(), "pending request queue full\n");
    assert!(
        sent.elapsed() < Duration::from_millis(2500),
        "answered at once, not after a slot freed ({:?})",
        sent.elapsed()
    );
    assert!(!held.is_finished(), "the held request is still running");

    assert_eq!(held.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(queued.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(backend.requests(), 2);
    assert_eq!(
        envoy.metric(&instance("overflow_total")).await.unwrap(),
        Some(1)
    );
}

async fn a_queued_request_past_its_queue_timeout_gets_503(form: Form) {
    let config = with(plugin_config(1), "queueTimeoutMs", json!(500));
    let (backend, envoy) = start(form, config).await.unwrap();
    let addr = envoy.addr();
    let held = tokio::spawn(async move { get("/?sleep=4000").send(addr).await });
    wait_metric(&envoy, &instance("in_flight"), 1).await;

    let timed_out = get("/").send(addr).await.unwrap();
    assert_eq!(timed_out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(timed_out.text(), "context deadline exceeded\n");
    assert!(!held.is_finished(), "it timed out in the queue, not after");
    assert_eq!(
        envoy
            .metric(&instance("queue_timeout_total"))
            .await
            .unwrap(),
        Some(1)
    );
    wait_metric(&envoy, &instance("queued"), 0).await;

    assert_eq!(held.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(backend.requests(), 1);
    // The slot came back: the next request goes straight through.
    assert_eq!(get("/").send(addr).await.unwrap().status, StatusCode::OK);
}

async fn a_client_gone_while_queued_gives_its_place_back(form: Form) {
    let config = with(plugin_config(1), "queueDepth", json!(1));
    let (backend, envoy) = start(form, config).await.unwrap();
    let addr = envoy.addr();
    let held = tokio::spawn(async move { get("/?sleep=3000").send(addr).await });
    wait_metric(&envoy, &instance("in_flight"), 1).await;

    // Queued, then the client gives up and closes its connection.
    let gone = get("/")
        .timeout(Duration::from_millis(300))
        .send(addr)
        .await;
    assert!(gone.is_err(), "the client timed out: {gone:?}");
    wait_metric(&envoy, &instance("queued"), 0).await;

    // Its place in the queue of depth 1 is free again: this one waits instead of being refused.
    let next = tokio::spawn(async move { get("/").send(addr).await });
    assert_eq!(held.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(next.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(
        backend.requests(),
        2,
        "the abandoned request never reached the backend"
    );
    assert_eq!(
        envoy.metric(&instance("overflow_total")).await.unwrap(),
        Some(0)
    );
    wait_metric(&envoy, &instance("in_flight"), 0).await;
}

/// Four clients, each sending one 200 ms request after another for 6 s, two of them as the activator:
/// concurrency about 4 (2 proxied), about 20 requests a second (10 proxied). Probes are not counted.
async fn metrics_report_concurrency_and_request_counts_per_second(form: Form) {
    // containerConcurrency 10: the breaker runs but never queues this load.
    let (_backend, envoy) = start(form, plugin_config(10)).await.unwrap();
    let addr = envoy.addr();
    let load_for = Duration::from_secs(6);
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let mut sent = 0i64;
                while started.elapsed() < load_for {
                    let mut req = get("/?sleep=200");
                    if i < 2 {
                        req = req.header("K-Proxy-Request", "activator");
                    }
                    let resp = req.send(addr).await.unwrap();
                    assert_eq!(resp.status, StatusCode::OK);
                    sent += 1;
                }
                (i < 2, sent)
            })
        })
        .collect();

    // Probes during the load: answered or proxied, never counted.
    let probes = [
        get("/").header("K-Network-Probe", "queue"),
        get("/")
            .header("K-Network-Probe", "probe")
            .header("K-Network-Hash", "h"),
        get("/healthz").header("User-Agent", "kube-probe/1.30"),
    ];
    for probe in probes {
        assert_eq!(probe.send(addr).await.unwrap().status, StatusCode::OK);
    }

    // Three samples while the load runs, each of the last complete 1 s window.
    let mut samples = Vec::new();
    for at in [2500, 3500, 4500] {
        let due = started + Duration::from_millis(at);
        tokio::time::sleep_until(due.into()).await;
        let text = envoy.prometheus().await.unwrap();
        let value = |name: String| {
            sluice_e2e::queue_proxy::prometheus_value(&text, &form.prometheus_name(&name))
        };
        samples.push([
            value(instance("average_concurrency_milli")),
            value(instance("average_proxied_concurrency_milli")),
            value(instance("request_count")),
            value(instance("proxied_request_count")),
            value(revision("average_concurrency_milli")),
            value(revision("request_count")),
        ]);
    }
    let (mut sent, mut sent_proxied) = (0, 0);
    for client in clients {
        let (proxied, n) = client.await.unwrap();
        sent += n;
        if proxied {
            sent_proxied += n;
        }
    }
    eprintln!(
        "samples (concurrency, proxied, count, proxied count, revision concurrency, revision count): {samples:?}"
    );
    let median = |i: usize| {
        let mut v: Vec<i64> = samples
            .iter()
            .map(|s| s[i].expect("metric present"))
            .collect();
        v.sort_unstable();
        v[1]
    };
    let within = |what: &str, got: i64, low: i64, high: i64| {
        assert!(
            (low..=high).contains(&got),
            "{what}: {got}, want {low}..={high} (samples {samples:?})"
        );
    };
    within("average concurrency (milli)", median(0), 3000, 4400);
    within("average proxied concurrency (milli)", median(1), 1400, 2200);
    within("request count per second", median(2), 8, 22);
    within("proxied request count per second", median(3), 4, 11);
    // One instance: the revision's series equal the instance's.
    within("revision concurrency (milli)", median(4), 3000, 4400);
    within("revision request count per second", median(5), 8, 22);

    // Counters are exact: every user request, no probe.
    wait_metric(&envoy, &instance("requests_total"), sent).await;
    wait_metric(&envoy, &revision("requests_total"), sent).await;
    wait_metric(&envoy, &instance("proxied_requests_total"), sent_proxied).await;
    wait_metric(&envoy, &revision("proxied_requests_total"), sent_proxied).await;

    // Idle again: the next windows report nothing.
    wait_metric(&envoy, &instance("average_concurrency_milli"), 0).await;
    wait_metric(&envoy, &instance("request_count"), 0).await;
    wait_metric(&envoy, &revision("average_proxied_concurrency_milli"), 0).await;
}

async fn hash_probe_echoes_the_hash_and_bad_probes_get_400(form: Form) {
    let (backend, envoy) = start(form, plugin_config(1)).await.unwrap();
    let addr = envoy.addr();
    let resp = get("/")
        .header("K-Network-Probe", "probe")
        .header("K-Network-Hash", "d2a4c1")
        .send(addr)
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("k-network-hash"), Some("d2a4c1"));

    let resp = get("/")
        .header("K-Network-Probe", "probe")
        .send(addr)
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(resp.text().contains("K-Network-Hash"), "{}", resp.text());

    let resp = get("/")
        .header("K-Network-Probe", "activator")
        .send(addr)
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.text(),
        "unexpected probe header value: \"activator\"\n"
    );

    assert_eq!(backend.requests(), 0, "probes are answered by the filter");
    assert_eq!(
        envoy.metric(&instance("requests_total")).await.unwrap(),
        Some(0)
    );
}

async fn queue_probe_follows_static_readiness(form: Form) {
    let (_backend, envoy) = start(form, plugin_config(0)).await.unwrap();
    let resp = get("/")
        .header("K-Network-Probe", "queue")
        .send(envoy.addr())
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), "queue");
    drop(envoy);

    let (_backend, envoy) = start(form, with(plugin_config(0), "ready", json!(false)))
        .await
        .unwrap();
    let resp = get("/")
        .header("K-Network-Probe", "queue")
        .send(envoy.addr())
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(envoy.metric(&instance("ready")).await.unwrap(), Some(0));
}

async fn queue_probe_follows_the_readiness_probe_of_the_instance(form: Form) {
    let config = with(
        plugin_config(2),
        "readinessProbe",
        json!({"cluster": "instance", "path": "/healthz", "periodMs": 100, "failureThreshold": 1}),
    );
    let (backend, envoy) = start(form, config).await.unwrap();
    let addr = envoy.addr();
    let probe = || async move {
        let resp = get("/")
            .header("K-Network-Probe", "queue")
            .send(addr)
            .await?;
        Ok::<_, anyhow::Error>(resp)
    };
    eventually("ready", Duration::from_secs(20), || async {
        let resp = probe().await?;
        Ok(resp.status == StatusCode::OK && resp.text() == "queue")
    })
    .await;
    assert_eq!(envoy.metric(&instance("ready")).await.unwrap(), Some(1));

    backend.set_healthy(false);
    eventually("not ready", Duration::from_secs(20), || async {
        Ok(probe().await?.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(envoy.metric(&instance("ready")).await.unwrap(), Some(0));

    backend.set_healthy(true);
    eventually("ready again", Duration::from_secs(20), || async {
        Ok(probe().await?.status == StatusCode::OK)
    })
    .await;
    assert_eq!(
        backend.requests(),
        0,
        "health checks and probes are not user requests"
    );
}

async fn container_concurrency_0_runs_no_breaker(form: Form) {
    let (backend, envoy) = start(form, plugin_config(0)).await.unwrap();
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let addr = envoy.addr();
            tokio::spawn(async move { get("/?sleep=1500").send(addr).await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status, StatusCode::OK);
    }
    assert!(
        backend.max_in_flight() > 1,
        "without a breaker requests run side by side (max {})",
        backend.max_in_flight()
    );
    assert_eq!(
        envoy.metric(&instance("requests_total")).await.unwrap(),
        Some(8)
    );
}

async fn a_bad_configuration_fails_the_start_with_a_clear_log_line(form: Form) {
    let upstream = sluice_e2e::ports::loopback(sluice_e2e::free_port());
    let good = tokio::task::spawn_blocking(move || {
        validate(&EnvoySpec::new(plugin_config(1), upstream).form(form))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(good.ok, "a good config validates:\n{}", good.log);

    let cases = [
        (
            with(plugin_config(1), "containerConcurency", json!(1)),
            "sluice queue-proxy: bad plugin configuration: not valid JSON for the queue-proxy: unknown field `containerConcurency`",
        ),
        (
            with(plugin_config(0), "queueDepth", json!(5)),
            "sluice queue-proxy: bad plugin configuration: queueDepth: set without containerConcurrency",
        ),
        (
            with(plugin_config(1), "revision", json!("Hello_1")),
            "sluice queue-proxy: bad plugin configuration: revision: \"Hello_1\" has 'H'",
        ),
    ];
    for (config, want) in cases {
        let spec = EnvoySpec::new(config.clone(), upstream).form(form);
        let outcome = tokio::task::spawn_blocking(move || validate(&spec))
            .await
            .unwrap()
            .unwrap();
        assert!(!outcome.ok, "{config} should fail validation");
        assert!(
            outcome.log.contains(want),
            "{config}: want a log line containing {want:?}, got:\n{}",
            outcome.log
        );
    }
}

// Every behaviour on both builds of the filter: the proxy-wasm module (V8) and the native dynamic
// module.
mod wasm {
    use super::Form;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_request_with_a_large_body_is_served_whole() {
        super::a_queued_request_with_a_large_body_is_served_whole(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_holds_container_concurrency_1_across_two_workers() {
        super::breaker_holds_container_concurrency_1_across_two_workers(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_holds_container_concurrency_3_under_a_burst() {
        super::breaker_holds_container_concurrency_3_under_a_burst(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lending_workers_hold_container_concurrency_16_and_give_every_slot_back() {
        super::lending_workers_hold_container_concurrency_16_and_give_every_slot_back(Form::Wasm)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_are_served_in_arrival_order() {
        super::queued_requests_are_served_in_arrival_order(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_503_at_once() {
        super::a_full_queue_answers_503_at_once(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_request_past_its_queue_timeout_gets_503() {
        super::a_queued_request_past_its_queue_timeout_gets_503(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gone_while_queued_gives_its_place_back() {
        super::a_client_gone_while_queued_gives_its_place_back(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_report_concurrency_and_request_counts_per_second() {
        super::metrics_report_concurrency_and_request_counts_per_second(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hash_probe_echoes_the_hash_and_bad_probes_get_400() {
        super::hash_probe_echoes_the_hash_and_bad_probes_get_400(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_probe_follows_static_readiness() {
        super::queue_probe_follows_static_readiness(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_probe_follows_the_readiness_probe_of_the_instance() {
        super::queue_probe_follows_the_readiness_probe_of_the_instance(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_concurrency_0_runs_no_breaker() {
        super::container_concurrency_0_runs_no_breaker(Form::Wasm).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_configuration_fails_the_start_with_a_clear_log_line() {
        super::a_bad_configuration_fails_the_start_with_a_clear_log_line(Form::Wasm).await
    }
}

mod native {
    use super::Form;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_request_with_a_large_body_is_served_whole() {
        super::a_queued_request_with_a_large_body_is_served_whole(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_holds_container_concurrency_1_across_two_workers() {
        super::breaker_holds_container_concurrency_1_across_two_workers(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_holds_container_concurrency_3_under_a_burst() {
        super::breaker_holds_container_concurrency_3_under_a_burst(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lending_workers_hold_container_concurrency_16_and_give_every_slot_back() {
        super::lending_workers_hold_container_concurrency_16_and_give_every_slot_back(Form::Native)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_are_served_in_arrival_order() {
        super::queued_requests_are_served_in_arrival_order(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_503_at_once() {
        super::a_full_queue_answers_503_at_once(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_request_past_its_queue_timeout_gets_503() {
        super::a_queued_request_past_its_queue_timeout_gets_503(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gone_while_queued_gives_its_place_back() {
        super::a_client_gone_while_queued_gives_its_place_back(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_report_concurrency_and_request_counts_per_second() {
        super::metrics_report_concurrency_and_request_counts_per_second(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hash_probe_echoes_the_hash_and_bad_probes_get_400() {
        super::hash_probe_echoes_the_hash_and_bad_probes_get_400(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_probe_follows_static_readiness() {
        super::queue_probe_follows_static_readiness(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_probe_follows_the_readiness_probe_of_the_instance() {
        super::queue_probe_follows_the_readiness_probe_of_the_instance(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_concurrency_0_runs_no_breaker() {
        super::container_concurrency_0_runs_no_breaker(Form::Native).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_configuration_fails_the_start_with_a_clear_log_line() {
        super::a_bad_configuration_fails_the_start_with_a_clear_log_line(Form::Native).await
    }
}
