//! Knative Services run from their container images (issue 13), end to end: the release `sluice up
//! --runtime container`, the real Envoy, the machine's engine, and `FROM scratch` images of the test
//! app built by the test (never pulled). Every test removes its images and its run's containers and
//! networks, even when it fails (`images::TestImage`, `containers::Stack`).
//!
//! Not tested here: the engine stopped under a running stack (it would stop the machine's shared
//! daemon, under every other test and user).

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use sluice_e2e::containers::{
    ImageService, Stack, WAIT, config_map, find, image_digest, ready_instances, restarts, revision,
    secret,
};
use sluice_e2e::images::{self, APP_IN_IMAGE, ImageOptions, TestImage};
use sluice_e2e::sluice::condition;

fn image() -> TestImage {
    TestImage::app().unwrap_or_else(|e| panic!("building the test image: {e:#}"))
}

async fn stack() -> Stack {
    Stack::start(&[])
        .await
        .unwrap_or_else(|e| panic!("sluice up --runtime container: {e:#}"))
}

/// Fails the test with the error's whole chain.
trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for anyhow::Result<T> {
    fn or_panic(self) -> T {
        self.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A Service with only `image` answers through the gateway and records the image's ID as its digest;
/// containerPort sets PORT (8888: Knative reserves 9090 and 9091 for its queue-proxy); env comes from a ConfigMap and a Secret (valueFrom and envFrom); a missing
/// image with `imagePullPolicy: Never` fails its revision with ContainerMissing, the rest serving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_only_service_answers_and_container_fields_are_honoured() {
    let image = image();
    let missing = images::unique_tag("sluice-test/missing");
    let mut stack = stack().await;
    stack
        .write_objects(
            "config.yaml",
            &[
                config_map("app-config", &[("greeting", "hi"), ("color", "blue")]),
                secret("app-secret", &[("token", "s3cret"), ("user", "admin")]),
            ],
        )
        .or_panic();
    stack
        .apply(&ImageService::new("hello", image.tag()))
        .or_panic();
    stack
        .apply(
            &ImageService::new("port", image.tag())
                .container("ports", json!([{"containerPort": 8888}])),
        )
        .or_panic();
    stack
        .apply(
            &ImageService::new("envs", image.tag())
                .env_entry(json!({"name": "GREETING", "valueFrom": {
                    "configMapKeyRef": {"name": "app-config", "key": "greeting"}}}))
                .env_entry(json!({"name": "TOKEN", "valueFrom": {
                    "secretKeyRef": {"name": "app-secret", "key": "token"}}}))
                .container(
                    "envFrom",
                    json!([
                        {"configMapRef": {"name": "app-config"}},
                        {"secretRef": {"name": "app-secret"}, "prefix": "S_"},
                    ]),
                ),
        )
        .or_panic();
    stack
        .apply(&ImageService::new("missing", &missing).container("imagePullPolicy", json!("Never")))
        .or_panic();

    let status = stack.wait_service("hello", "hello-00001").await.or_panic();
    assert_eq!(
        stack.get_ok("hello", "/").await.or_panic(),
        "hello from hello-00001\n"
    );
    assert_eq!(
        stack.get_ok("hello", "/env/K_SERVICE").await.or_panic(),
        "hello"
    );
    let rev = revision(&status, "hello-00001").expect("revision listed");
    assert_eq!(image_digest(rev), Some(image.id()), "{rev}");
    let running = stack.running_containers_of("hello-00001").or_panic();
    assert_eq!(running.len(), 1, "one container for one instance");
    let labels = images::docker(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        &running[0],
    ])
    .or_panic();
    for label in [
        "\"sluice.namespace\":\"default\"",
        "\"sluice.service\":\"hello\"",
        "\"sluice.revision\":\"hello-00001\"",
    ] {
        assert!(labels.contains(label), "{label} in {labels}");
    }

    stack.wait_service("port", "port-00001").await.or_panic();
    assert_eq!(stack.get_ok("port", "/env/PORT").await.or_panic(), "8888");
    assert_eq!(
        stack.get_ok("port", "/").await.or_panic(),
        "hello from port-00001\n"
    );

    stack.wait_service("envs", "envs-00001").await.or_panic();
    for (name, want) in [
        ("GREETING", "hi"),
        ("TOKEN", "s3cret"),
        ("color", "blue"),
        ("greeting", "hi"),
        ("S_user", "admin"),
        ("S_token", "s3cret"),
    ] {
        let got = stack
            .get_ok("envs", &format!("/env/{name}"))
            .await
            .or_panic();
        assert_eq!(got, want, "env {name}");
    }

    let status = stack
        .wait_status("missing-00001 Ready=False", WAIT, |s| {
            revision(s, "missing-00001")
                .and_then(|r| condition(r, "Ready"))
                .is_some_and(|c| c.status == "False")
        })
        .await
        .or_panic();
    let ready = condition(revision(&status, "missing-00001").unwrap(), "Ready").unwrap();
    assert_eq!(ready.reason, "ContainerMissing", "{ready:?}");
    assert!(
        ready.message.contains(&missing),
        "names the image: {ready:?}"
    );
    let svc = find(&status, "services", "missing").expect("service listed");
    assert_eq!(
        condition(svc, "Ready").map(|c| c.status),
        Some("False".to_string()),
        "{svc}"
    );
    // The others kept serving.
    assert_eq!(
        stack.get_ok("hello", "/").await.or_panic(),
        "hello from hello-00001\n"
    );
}

/// HTTP and exec readiness probes (and a startup probe) gate an instance: the ones whose probe
/// passes become Ready, the ones whose probe never passes stay not Ready while their container runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_exec_and_startup_probes_gate_instances() {
    let image = image();
    let mut stack = stack().await;
    let healthz = json!({"httpGet": {"path": "/healthz"}});
    let check_file = |path: &str| json!({"exec": {"command": [APP_IN_IMAGE, "check-file", path]}});
    stack
        .apply(
            &ImageService::new("http-ready", image.tag())
                .env("APP_READY_AFTER_MS", "1000")
                .container("readinessProbe", healthz.clone()),
        )
        .or_panic();
    stack
        .apply(
            &ImageService::new("http-never", image.tag())
                .env("APP_READY_AFTER_MS", "3600000")
                .container("readinessProbe", healthz.clone()),
        )
        .or_panic();
    stack
        .apply(
            &ImageService::new("exec-ready", image.tag())
                .env("APP_READY_FILE", "/tmp/ready")
                .container("readinessProbe", check_file("/tmp/ready")),
        )
        .or_panic();
    stack
        .apply(
            &ImageService::new("exec-never", image.tag())
                .env("APP_READY_FILE", "/tmp/ready")
                .container("readinessProbe", check_file("/tmp/never")),
        )
        .or_panic();
    stack
        .apply(
            &ImageService::new("startup", image.tag())
                .env("APP_READY_AFTER_MS", "1000")
                .container(
                    "startupProbe",
                    json!({"httpGet": {"path": "/healthz"}, "periodSeconds": 1,
                           "failureThreshold": 30}),
                ),
        )
        .or_panic();

    for name in ["http-ready", "exec-ready", "startup"] {
        stack
            .wait_service(name, &format!("{name}-00001"))
            .await
            .or_panic();
        assert_eq!(
            stack.get_ok(name, "/").await.or_panic(),
            format!("hello from {name}-00001\n")
        );
    }
    // The HTTP probe saw the app unhealthy first, and no request reached it before it was healthy.
    let stats = stack.stats("http-ready").await.or_panic();
    assert!(stats["healthz_failed"].as_u64() > Some(0), "{stats}");
    assert!(stats["healthz_ok"].as_u64() > Some(0), "{stats}");
    assert_eq!(stats["served_before_healthy"], 0, "{stats}");
    let stats = stack.stats("startup").await.or_panic();
    assert!(stats["healthz_failed"].as_u64() > Some(0), "{stats}");

    // The never-ready ones have a running container, and no Ready instance.
    let status = stack
        .wait_status("the never-ready containers running", WAIT, |s| {
            ["http-never-00001", "exec-never-00001"].iter().all(|r| {
                revision(s, r).is_some_and(|r| !r["instances"].as_array().is_none_or(Vec::is_empty))
            })
        })
        .await
        .or_panic();
    for name in ["http-never-00001", "exec-never-00001"] {
        let rev = revision(&status, name).unwrap();
        assert!(ready_instances(rev).is_empty(), "{rev}");
        assert_ne!(
            condition(rev, "Ready").map(|c| c.status),
            Some("True".to_string()),
            "{rev}"
        );
        assert_eq!(
            stack.running_containers_of(name).or_panic().len(),
            1,
            "{name}: its container runs, only the probe fails"
        );
    }
}

/// A container that stops answering its liveness probe is restarted; the restart is counted in
/// `sluice status`, and the new container serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_failing_liveness_is_restarted_and_counted() {
    let image = image();
    let mut stack = stack().await;
    stack
        .apply(
            &ImageService::new("live", image.tag())
                .scale(1, Some(1))
                .container(
                    "livenessProbe",
                    json!({"httpGet": {"path": "/healthz"}, "periodSeconds": 1,
                           "failureThreshold": 2}),
                ),
        )
        .or_panic();
    stack.wait_service("live", "live-00001").await.or_panic();
    let boot = stack.stats("live").await.or_panic()["boot"].clone();
    assert_eq!(stack.get_ok("live", "/sick").await.or_panic(), "sick");

    stack
        .wait_status("live-00001 restarted", WAIT, |s| {
            revision(s, "live-00001")
                .and_then(restarts)
                .is_some_and(|n| n >= 1)
        })
        .await
        .or_panic();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(stats) = stack.stats("live").await
            && stats["boot"] != boot
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted container never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The table shows it too, in its RESTARTS column.
    let table = stack.status_cli(&[]).or_panic();
    let header = table
        .lines()
        .find(|l| l.contains("RESTARTS"))
        .unwrap_or_else(|| panic!("no RESTARTS column:\n{table}"));
    let column = header.find("RESTARTS").unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("default/live-00001 "))
        .unwrap_or_else(|| panic!("no row for live-00001:\n{table}"));
    let shown: u64 = row
        .get(column..)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count under RESTARTS:\n{table}"));
    assert!(shown >= 1, "{table}");
}

/// containerConcurrency 1 holds with a container: concurrent requests reach the app one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_concurrency_1_holds() {
    let image = image();
    let mut stack = stack().await;
    stack
        .apply(
            &ImageService::new("cc", image.tag())
                .scale(1, Some(1))
                .template_spec("containerConcurrency", json!(1)),
        )
        .or_panic();
    stack.wait_service("cc", "cc-00001").await.or_panic();
    let stack = &stack;
    let answers = futures::future::join_all(
        (0..6).map(|_| async move { stack.get("cc", "/?sleep_ms=300").await }),
    )
    .await;
    for answer in answers {
        let (code, body) = answer.or_panic();
        assert_eq!(code, StatusCode::OK, "{body}");
    }
    let stats = stack.stats("cc").await.or_panic();
    assert_eq!(stats["max_in_flight"], 1, "{stats}");
    assert!(stats["requests"].as_u64() >= Some(6), "{stats}");
}

/// Scale to zero removes the container (not just stops it); a cold request starts one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_to_zero_removes_the_container_and_a_cold_request_brings_it_back() {
    let image = image();
    let mut stack = stack().await;
    stack
        .serve_scaling_to_zero("cold", image.tag())
        .await
        .or_panic();
    let first = stack.containers_of("cold-00001").or_panic();
    assert_eq!(first.len(), 1, "{first:?}");

    stack.wait_at_zero("cold-00001").await.or_panic();

    assert_eq!(
        stack.get_ok("cold", "/").await.or_panic(),
        "hello from cold-00001\n"
    );
    let again = stack.running_containers_of("cold-00001").or_panic();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again, first, "a new container");
}

/// A Service at zero whose image is removed (`docker rmi -f`): a request gets 503 at once, not after the
/// revision's 300 s timeout, naming the revision and its Ready=False reason, and so does the next one;
/// once the image is rebuilt under the same tag, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_whose_image_is_removed_fails_fast_then_recovers_when_it_is_rebuilt() {
    // Far below the 300 s a held request would wait, far above a loaded machine's cold start.
    const FAST: Duration = Duration::from_secs(30);
    let mut image = image();
    let mut stack = stack().await;
    stack
        .serve_scaling_to_zero("gone", image.tag())
        .await
        .or_panic();
    // A container still there would keep the image (rmi -f would only untag it).
    stack.wait_at_zero("gone-00001").await.or_panic();
    image.remove().or_panic();

    for attempt in ["the cold request", "a request while failed"] {
        let started = std::time::Instant::now();
        let (code, body) = stack.get("gone", "/").await.or_panic();
        let took = started.elapsed();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{attempt}: {body}");
        assert!(
            body.contains("default/gone-00001") && body.contains("ContainerMissing"),
            "{attempt}: {body}"
        );
        assert!(
            took < FAST,
            "{attempt} answered after {took:?}: held, not failed"
        );
    }
    let status = stack
        .wait_status("gone-00001 Ready=False with ContainerMissing", WAIT, |s| {
            revision(s, "gone-00001")
                .and_then(|r| condition(r, "Ready"))
                .is_some_and(|c| c.status == "False" && c.reason == "ContainerMissing")
        })
        .await
        .or_panic();
    let ready = condition(revision(&status, "gone-00001").unwrap(), "Ready").unwrap();
    assert!(ready.message.contains(image.tag()), "{ready:?}");

    image.rebuild().or_panic();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        stack.sluice.check_alive().or_panic();
        let (code, body) = stack.get("gone", "/").await.or_panic();
        if code == StatusCode::OK {
            assert_eq!(body, "hello from gone-00001\n");
            break;
        }
        // Until the runtime's next try finds the rebuilt image, the failure stands.
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "not served again after the rebuild: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = stack.wait_service("gone", "gone-00001").await.or_panic();
    assert_eq!(
        revision(&status, "gone-00001")
            .and_then(|r| condition(r, "Ready"))
            .map(|c| c.status),
        Some("True".to_string())
    );
}

/// Two revisions of an image with an 80/20 split: answers counted by K_REVISION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_revisions_split_80_20() {
    let image = image();
    let mut stack = stack().await;
    let v1 = ImageService::new("split", image.tag())
        .scale(1, None)
        .env("APP_VERSION", "1");
    stack.apply(&v1).or_panic();
    stack.wait_service("split", "split-00001").await.or_panic();
    let v2 = ImageService::new("split", image.tag())
        .scale(1, None)
        .env("APP_VERSION", "2")
        .traffic(json!([
            {"revisionName": "split-00001", "percent": 80},
            {"latestRevision": true, "percent": 20},
        ]));
    stack.apply(&v2).or_panic();
    stack.wait_service("split", "split-00002").await.or_panic();

    let (mut first, mut second) = (0, 0);
    for _ in 0..200 {
        match stack.get_ok("split", "/").await.or_panic().as_str() {
            "hello from split-00001\n" => first += 1,
            "hello from split-00002\n" => second += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 80/20 of 200: binomial standard deviation ~5.7; 6 sigmas either way.
    assert!((126..=194).contains(&first), "{first} vs {second}");
    for rev in ["split-00001", "split-00002"] {
        assert!(
            !stack.running_containers_of(rev).or_panic().is_empty(),
            "{rev} runs in a container"
        );
    }
}

/// Tag to digest: re-pointing the tag under a running revision changes nothing (a replaced container
/// runs the pinned image, the digest stays); a restart of `sluice up` keeps the revision's name and
/// digest; a new revision takes the image the tag names now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retagged_image_does_not_change_a_running_revision_nor_a_restart_its_name() {
    let a = image();
    let mut b = TestImage::app_with(
        "sluice-test/app",
        ImageOptions {
            env: vec![("APP_VARIANT".into(), "b".into())],
            ..Default::default()
        },
    )
    .or_panic();
    let mut stack = stack().await;
    let svc = ImageService::new("pin", a.tag()).scale(1, Some(1));
    stack.apply(&svc).or_panic();
    let status = stack.wait_service("pin", "pin-00001").await.or_panic();
    assert_eq!(
        image_digest(revision(&status, "pin-00001").unwrap()),
        Some(a.id())
    );
    assert_eq!(stack.get_ok("pin", "/env/APP_VARIANT").await.or_panic(), "");

    b.tag_as(&a).or_panic();
    // A crash replaces the container: the new one must still run image a.
    let boot = stack.stats("pin").await.or_panic()["boot"].clone();
    let _ = stack.get("pin", "/crash").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(stats) = stack.stats("pin").await
            && stats["boot"] != boot
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no replacement container served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stack.get_ok("pin", "/env/APP_VARIANT").await.or_panic(),
        "",
        "the replacement runs the pinned image, not the re-tagged one"
    );
    let status = stack.sluice.status().await.or_panic();
    assert_eq!(
        image_digest(revision(&status, "pin-00001").unwrap()),
        Some(a.id())
    );

    // Restart sluice up on the same state dir: same revision, same digest, same code.
    stack.sluice.restart().await.or_panic();
    let status = stack.wait_service("pin", "pin-00001").await.or_panic();
    let names: BTreeSet<&str> = status["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["pin-00001"]), "no new revision");
    assert_eq!(
        image_digest(revision(&status, "pin-00001").unwrap()),
        Some(a.id())
    );
    assert_eq!(stack.get_ok("pin", "/env/APP_VARIANT").await.or_panic(), "");

    // A template change makes a new revision, which resolves the tag again.
    stack.apply(&svc.clone().env("APP_VERSION", "2")).or_panic();
    let status = stack.wait_service("pin", "pin-00002").await.or_panic();
    assert_eq!(
        image_digest(revision(&status, "pin-00002").unwrap()),
        Some(b.id())
    );
    assert_eq!(
        stack.get_ok("pin", "/env/APP_VARIANT").await.or_panic(),
        "b"
    );
}

/// kill -9 of `sluice up` leaves its containers running; the next `sluice up` on the same state dir
/// removes them and runs the revision afresh, and stopping it (SIGTERM) removes every container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_next_run_leaves_no_stray_container() {
    let image = image();
    let mut stack = stack().await;
    stack
        .apply(&ImageService::new("orphan", image.tag()).scale(1, Some(1)))
        .or_panic();
    stack
        .wait_service("orphan", "orphan-00001")
        .await
        .or_panic();
    let old: BTreeSet<String> = images::owned_containers(stack.owner())
        .or_panic()
        .into_iter()
        .collect();
    assert_eq!(old.len(), 1, "{old:?}");

    let status = stack
        .sluice
        .terminate(libc::SIGKILL, Duration::from_secs(15))
        .expect("sluice up is gone after SIGKILL");
    assert!(!status.success());

    stack.sluice.restart().await.or_panic();
    stack
        .wait_service("orphan", "orphan-00001")
        .await
        .or_panic();
    stack.wait_served("orphan").await.or_panic();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now: BTreeSet<String> = images::owned_containers(stack.owner())
            .or_panic()
            .into_iter()
            .collect();
        if now.is_disjoint(&old) && now.len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stray containers: old {old:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let status = stack
        .sluice
        .terminate(libc::SIGTERM, Duration::from_secs(60))
        .expect("sluice up stops on SIGTERM");
    assert!(status.success(), "{status}");
    let left = images::owned_containers(stack.owner()).or_panic();
    assert!(left.is_empty(), "a stopped sluice up left {left:?}");
}
