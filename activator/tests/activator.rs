//! The activator against real sockets: real hyper backends on 127.0.0.1 that answer
//! `K-Network-Probe: queue` themselves (as the queue-proxy filter does), a real hyper client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_activator::{
    Activator, ActivatorOptions, ActivatorTasks, Capacity, RevisionConfig, RevisionFailure,
};
use sluice_api::autoscaling::{RevisionKey, Stat};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Generous: waits for conditions, never asserts speed.
const WAIT: Duration = Duration::from_secs(20);

/// Aborts a task when the test ends, pass or fail.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct BackendState {
    ready: AtomicBool,
    connections: AtomicUsize,
    probes: AtomicUsize,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Headers of each forwarded request: (K-Proxy-Request, Knative-Serving-Revision present).
    seen: Mutex<Vec<(Option<String>, bool)>>,
    /// When set, each request waits for a permit before answering.
    gate: Mutex<Option<Arc<Semaphore>>>,
}

/// A revision instance: answers the queue probe when ready, counts concurrency, echoes bodies.
struct Backend {
    addr: SocketAddr,
    state: Arc<BackendState>,
    task: AbortOnDrop<()>,
}

impl Backend {
    async fn start(ready: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        state.ready.store(ready, Ordering::SeqCst);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(a) => a,
                    Err(_) => continue,
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(backend_handle(st, addr, req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            state,
            task: AbortOnDrop(task),
        }
    }

    fn gate(&self) -> Arc<Semaphore> {
        let sem = Arc::new(Semaphore::new(0));
        *self.state.gate.lock().unwrap() = Some(sem.clone());
        sem
    }
}

async fn backend_handle(
    st: Arc<BackendState>,
    addr: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req
        .headers()
        .get("K-Network-Probe")
        .is_some_and(|v| v == "queue")
    {
        st.probes.fetch_add(1, Ordering::SeqCst);
        return if st.ready.load(Ordering::SeqCst) {
            Response::new(Full::new(Bytes::from_static(b"queue")))
        } else {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not ready")));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        };
    }
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        // An "echo" protocol after 101, like a websocket would: bytes in, same bytes out.
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    st.seen.lock().unwrap().push((
        req.headers()
            .get("K-Proxy-Request")
            .map(|v| v.to_str().unwrap().to_owned()),
        req.headers().contains_key("Knative-Serving-Revision"),
    ));
    let gate = st.gate.lock().unwrap().clone();
    if let Some(gate) = gate {
        gate.acquire().await.unwrap().forget();
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut text = format!("hello from {addr}").into_bytes();
    if !body.is_empty() {
        text.extend_from_slice(b" echo ");
        text.extend_from_slice(&body);
    }
    Response::new(Full::new(Bytes::from(text)))
}

struct Fixture {
    activator: Activator,
    addr: SocketAddr,
    pokes: mpsc::UnboundedReceiver<RevisionKey>,
    stats: mpsc::UnboundedReceiver<(RevisionKey, Stat)>,
    client: Client<HttpConnector, Full<Bytes>>,
    _server: AbortOnDrop<std::io::Result<()>>,
    _tasks: ActivatorTasks,
}

impl Fixture {
    async fn start() -> Fixture {
        let (poke_tx, pokes) = mpsc::unbounded_channel();
        let (stat_tx, stats) = mpsc::unbounded_channel();
        let mut options = ActivatorOptions::new(poke_tx, stat_tx);
        options.report_interval = Duration::from_millis(100);
        options.probe_interval = Duration::from_millis(50);
        // Generous so a busy machine does not fail probes; a failure only means another round.
        options.probe_timeout = Duration::from_secs(5);
        let (activator, tasks) = Activator::new(options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let a = activator.clone();
        let server = tokio::spawn(async move { a.serve(listener).await });
        Fixture {
            activator,
            addr,
            pokes,
            stats,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _server: AbortOnDrop(server),
            _tasks: tasks,
        }
    }

    fn request(
        &self,
        key: &RevisionKey,
        body: &'static str,
    ) -> impl Future<Output = (StatusCode, String)> + Send + 'static {
        let req = Request::post(format!("http://{}/some/path?x=1", self.addr))
            .header("Host", "hello.default.example.com")
            .header("Knative-Serving-Namespace", key.namespace.as_str())
            .header("Knative-Serving-Revision", key.name.as_str())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let client = self.client.clone();
        async move {
            let resp = client.request(req).await.expect("activator answers");
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    }

    async fn raw(&self, req: Request<Full<Bytes>>) -> (StatusCode, String) {
        let resp = self.client.request(req).await.expect("activator answers");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A request held for `key()`, a revision with no instance: sent, and waiting in the queue.
    async fn held_request(&self) -> AbortOnDrop<(StatusCode, String)> {
        let pending = AbortOnDrop(tokio::spawn(self.request(&key(), "")));
        self.wait_for("one waiting", |act| {
            act.revision_snapshot(&key()).unwrap().waiting == 1
        })
        .await;
        pending
    }

    async fn wait_for(&self, what: &str, mut cond: impl FnMut(&Activator) -> bool) {
        let start = tokio::time::Instant::now();
        while !cond(&self.activator) {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The answer to a request spawned earlier, within the wait.
async fn answer(pending: &mut AbortOnDrop<(StatusCode, String)>) -> (StatusCode, String) {
    tokio::time::timeout(WAIT, &mut pending.0)
        .await
        .expect("answered within the wait")
        .expect("the request task")
}

fn key() -> RevisionKey {
    RevisionKey::new("default", "hello-00001")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_waits_pokes_then_forwards_with_the_proxy_header() {
    let mut f = Fixture::start().await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![]));

    let mut pending = AbortOnDrop(tokio::spawn(f.request(&key(), "")));
    let poked = tokio::time::timeout(WAIT, f.pokes.recv())
        .await
        .expect("a poke")
        .unwrap();
    assert_eq!(poked, key());
    // The concurrency reporter's immediate report is Knative's own poke.
    let (stat_key, stat) = tokio::time::timeout(WAIT, f.stats.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stat_key, key());
    assert_eq!(stat.pod_name, "activator");
    assert_eq!(stat.average_concurrent_requests, 1.0);
    assert!(
        !pending.0.is_finished(),
        "no instance yet: the request waits"
    );

    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![backend.addr]));
    let (status, body) = answer(&mut pending).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, format!("hello from {}", backend.addr));
    assert!(
        backend.state.probes.load(Ordering::SeqCst) >= 1,
        "probed before traffic"
    );
    let seen = backend.state.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(Some("activator".to_owned()), false)],
        "K-Proxy-Request set, revision header pruned"
    );
    // One waiting episode, one poke.
    assert!(f.pokes.try_recv().is_err());
    drop(backend.task);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_concurrency_one_never_sends_two_requests_to_one_instance() {
    let f = Fixture::start().await;
    let a = Backend::start(true).await;
    let b = Backend::start(true).await;
    let gates = [a.gate(), b.gate()];
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![a.addr, b.addr]));
    f.wait_for("both instances probed", |act| {
        act.revision_snapshot(&key()).unwrap().capacity == Capacity::Limited(2)
    })
    .await;

    let requests: Vec<_> = (0..6)
        .map(|_| AbortOnDrop(tokio::spawn(f.request(&key(), "x"))))
        .collect();
    // Two forwarded (one per instance), four waiting in the activator.
    f.wait_for("two in flight and four waiting", |act| {
        let s = act.revision_snapshot(&key()).unwrap();
        s.in_flight == 2 && s.waiting == 4
    })
    .await;
    wait_until("both instances busy", || {
        a.state.in_flight.load(Ordering::SeqCst) == 1
            && b.state.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    for g in &gates {
        g.add_permits(100);
    }
    for mut r in requests {
        let (status, body) = tokio::time::timeout(WAIT, &mut r.0).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(a.state.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(b.state.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(
        a.state.requests.load(Ordering::SeqCst) + b.state.requests.load(Ordering::SeqCst),
        6
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_with_knatives_message() {
    let f = Fixture::start().await;
    let mut config = RevisionConfig::new(1, vec![]);
    config.max_queue = 1;
    f.activator.update_revision(key(), config);
    let _waiting = AbortOnDrop(tokio::spawn(f.request(&key(), "")));
    f.wait_for("one waiting", |act| {
        act.revision_snapshot(&key()).unwrap().waiting == 1
    })
    .await;
    let (status, body) = f.request(&key(), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body.trim(), "pending request queue full");
}

#[tokio::test]
async fn waiting_past_the_revision_timeout_answers_504_with_knatives_message() {
    let f = Fixture::start().await;
    let mut config = RevisionConfig::new(1, vec![]);
    config.timeout = Duration::from_millis(300);
    f.activator.update_revision(key(), config);
    let (status, body) = f.request(&key(), "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body.trim(), "activator request timeout");
    // The timed-out request left the queue.
    assert_eq!(f.activator.revision_snapshot(&key()).unwrap().waiting, 0);
}

#[tokio::test]
async fn an_instance_failing_the_probe_gets_no_traffic_until_it_passes() {
    let f = Fixture::start().await;
    let backend = Backend::start(false).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(0, vec![backend.addr]));
    let mut pending = AbortOnDrop(tokio::spawn(f.request(&key(), "")));
    wait_until("probed several times", || {
        backend.state.probes.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 0);
    assert!(!pending.0.is_finished());

    backend.state.ready.store(true, Ordering::SeqCst);
    let (status, body) = answer(&mut pending).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend.state.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stats_are_reported_per_revision_every_interval() {
    let mut f = Fixture::start().await;
    let backend = Backend::start(true).await;
    let gate = backend.gate();
    f.activator
        .update_revision(key(), RevisionConfig::new(0, vec![backend.addr]));
    let mut r = AbortOnDrop(tokio::spawn(f.request(&key(), "")));
    // Immediate report, then periodic ones while the request is in flight.
    let mut got = Vec::new();
    while got.len() < 3 {
        let (k, s) = tokio::time::timeout(WAIT, f.stats.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(k, key());
        assert_eq!(s.pod_name, "activator");
        got.push(s);
    }
    assert_eq!(
        got[0].request_count, 1.0,
        "immediate report counts the first request"
    );
    // While the request is held, a full window reports concurrency 1 and no new request.
    let last = got.last().unwrap();
    assert!(
        (last.average_concurrent_requests - 1.0).abs() < 1e-6,
        "{got:?}"
    );
    assert_eq!(last.request_count, 0.0);
    gate.add_permits(1);
    let (status, _) = tokio::time::timeout(WAIT, &mut r.0).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    // Then idle: concurrency drops to zero and reports stop.
    loop {
        let (_, s) = tokio::time::timeout(WAIT, f.stats.recv())
            .await
            .unwrap()
            .unwrap();
        if s.average_concurrent_requests == 0.0 {
            break;
        }
    }
}

#[tokio::test]
async fn unknown_revisions_missing_headers_and_probes_are_answered_like_knative() {
    let f = Fixture::start().await;
    let (status, body) = f.request(&RevisionKey::new("default", "nope"), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("revision default/nope not found"), "{body}");

    let req = Request::get(format!("http://{}/", f.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, body) = f.raw(req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("Knative-Serving-Revision"), "{body}");

    let req = Request::get(format!("http://{}/", f.addr))
        .header("K-Network-Probe", "activator")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, body) = f.raw(req).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "activator"));
}

#[tokio::test]
async fn request_bodies_are_forwarded_and_responses_streamed_back() {
    let f = Fixture::start().await;
    let backend = Backend::start(true).await;
    // Revisions can be updated from a thread outside the runtime (a watcher, a controller).
    let (act, addr) = (f.activator.clone(), backend.addr);
    std::thread::spawn(move || act.update_revision(key(), RevisionConfig::new(10, vec![addr])))
        .join()
        .unwrap();
    let (status, body) = f.request(&key(), "ping").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("hello from {} echo ping", backend.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_skipped_and_the_request_retried_on_another() {
    let f = Fixture::start().await;
    let a = Backend::start(true).await;
    let b = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![a.addr, b.addr]));
    f.wait_for("both instances probed", |act| {
        act.revision_snapshot(&key()).unwrap().healthy == 2
    })
    .await;
    // First available takes instances in address order: kill the first so it is tried.
    let (dead, alive) = if a.addr < b.addr { (a, b) } else { (b, a) };
    let dead_addr = dead.addr;
    drop(dead); // its listener closes: connecting is refused
    let start = tokio::time::Instant::now();
    while tokio::net::TcpStream::connect(dead_addr).await.is_ok() {
        assert!(
            start.elapsed() < WAIT,
            "the dead backend's listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        let (status, body) = f.request(&key(), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, format!("hello from {}", alive.addr));
    }
    let snap = f.activator.revision_snapshot(&key()).unwrap();
    assert_eq!(
        snap.healthy, 1,
        "{dead_addr} is out until a probe passes again"
    );
}

#[tokio::test]
async fn removing_a_revision_releases_its_waiters() {
    let f = Fixture::start().await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![]));
    let mut pending = f.held_request().await;
    assert!(f.activator.remove_revision(&key()));
    let (status, body) = answer(&mut pending).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("removed"), "{body}");
}

/// A revision whose instances cannot start answers 503 naming its reason at once: the request held
/// when it fails and a new one (which still pokes, so the runtime keeps trying); once it recovers,
/// requests are held and served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_revision_answers_503_with_its_reason_at_once_and_recovers() {
    let mut f = Fixture::start().await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![]));
    let mut held = f.held_request().await;
    tokio::time::timeout(WAIT, f.pokes.recv())
        .await
        .expect("the held request pokes")
        .unwrap();
    let failed = RevisionConfig {
        failure: Some(RevisionFailure {
            reason: "ContainerMissing".into(),
            message: "Unable to fetch image \"app:v1\": No such image".into(),
        }),
        ..RevisionConfig::new(1, vec![])
    };
    f.activator.update_revision(key(), failed.clone());
    let (status, body) = answer(&mut held).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body,
        "revision default/hello-00001 cannot serve: ContainerMissing: Unable to fetch image \"app:v1\": No such image\n"
    );
    // The revision's timeout is 300 s: an answer within the test's wait is an answer at once.
    let (status, body) = tokio::time::timeout(WAIT, f.request(&key(), ""))
        .await
        .expect("a new request is answered at once");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("ContainerMissing"), "{body}");
    tokio::time::timeout(WAIT, f.pokes.recv())
        .await
        .expect("a refused request pokes")
        .unwrap();
    let snap = f.activator.revision_snapshot(&key()).unwrap();
    assert!(snap.failed && snap.waiting == 0, "{snap:?}");

    // Recovered: held until an instance is probed, then served.
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![]));
    let mut pending = f.held_request().await;
    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![backend.addr]));
    let (status, body) = answer(&mut pending).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn upgrades_are_tunnelled_to_the_instance() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![backend.addr]));
    let mut conn = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nHost: hello.default.example.com\r\n\
          Knative-Serving-Namespace: default\r\nKnative-Serving-Revision: hello-00001\r\n\
          Connection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, conn.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    conn.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(WAIT, conn.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
    // The tunnel holds the instance's only slot (cc 1) while it is open.
    assert_eq!(f.activator.revision_snapshot(&key()).unwrap().in_flight, 1);
    drop(conn);
    f.wait_for("the slot is released when the tunnel closes", |act| {
        act.revision_snapshot(&key()).unwrap().in_flight == 0
    })
    .await;
}

#[tokio::test]
async fn h2c_requests_are_forwarded_over_h2c() {
    let f = Fixture::start().await;
    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(0, vec![backend.addr]));
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(format!("http://{}/grpc-ish", f.addr))
        .header("Knative-Serving-Namespace", "default")
        .header("Knative-Serving-Revision", "hello-00001")
        .body(Full::new(Bytes::from_static(b"h2")))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, format!("hello from {} echo h2", backend.addr));
}

#[tokio::test]
async fn the_revision_timeout_also_covers_waiting_for_the_response_to_start() {
    let f = Fixture::start().await;
    let backend = Backend::start(true).await;
    let _gate = backend.gate(); // never opened: the instance never answers
    let mut config = RevisionConfig::new(1, vec![backend.addr]);
    config.timeout = Duration::from_millis(500);
    f.activator.update_revision(key(), config);
    let (status, body) = f.request(&key(), "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body.trim(), "activator request timeout");
    assert_eq!(f.activator.revision_snapshot(&key()).unwrap().in_flight, 0);
}

#[tokio::test]
async fn connections_to_an_instance_are_kept_alive_and_reused() {
    let f = Fixture::start().await;
    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![backend.addr]));
    for _ in 0..5 {
        let (status, body) = f.request(&key(), "again").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The slot is released after the connection went back to the pool.
        f.wait_for("the request to finish in the activator", |act| {
            act.revision_snapshot(&key()).unwrap().in_flight == 0
        })
        .await;
    }
    // Each probe uses its own connection; the five requests share one.
    let st = &backend.state;
    let data_connections = st.connections.load(Ordering::SeqCst) - st.probes.load(Ordering::SeqCst);
    assert_eq!(data_connections, 1);
    assert_eq!(st.requests.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn metrics_count_requests_by_code_time_them_and_show_the_queue() {
    use sluice_activator::metrics::{RequestLabels, ThrottleLabels};
    let f = Fixture::start().await;
    let mut registry = prometheus_client::registry::Registry::default();
    f.activator
        .register_metrics(registry.sub_registry_with_prefix("activator"));
    let mut config = RevisionConfig::new(1, vec![]);
    config.max_queue = 1;
    f.activator.update_revision(key(), config);
    let mut waiting = f.held_request().await;
    let (status, _) = f.request(&key(), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let revision = r#"namespace_name="default",revision_name="hello-00001""#;
    assert!(
        text.contains(&format!("activator_queue_depth{{{revision}}} 1\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("activator_request_concurrency{{{revision}}} 0\n")),
        "{text}"
    );
    let labels = |code: &str| RequestLabels {
        namespace_name: "default".into(),
        revision_name: "hello-00001".into(),
        response_code: code.into(),
        response_code_class: format!("{}xx", &code[..1]),
    };
    let throttled = |reason: &str| {
        f.activator
            .metrics()
            .throttled_requests
            .get_or_create(&ThrottleLabels {
                namespace_name: "default".into(),
                revision_name: "hello-00001".into(),
                reason: reason.into(),
            })
            .get()
    };
    let metrics = f.activator.metrics();
    assert_eq!(metrics.request_count.get_or_create(&labels("503")).get(), 1);
    assert_eq!(throttled("queue_full"), 1);
    assert_eq!(throttled("queued"), 1);

    // The held request is forwarded once an instance comes: a 200, timed with its wait.
    let backend = Backend::start(true).await;
    f.activator
        .update_revision(key(), RevisionConfig::new(1, vec![backend.addr]));
    let (status, body) = answer(&mut waiting).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(metrics.request_count.get_or_create(&labels("200")).get(), 1);
    assert_eq!(
        metrics
            .request_latencies
            .get_or_create(&labels("200"))
            .count(),
        1
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!("activator_queue_depth{{{revision}}} 0\n")),
        "{text}"
    );
    drop(backend.task);
}
