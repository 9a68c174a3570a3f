//! The container runtime against the real engine (DOCKER_HOST or the default socket), with images the
//! tests build: a static std-only app (tests/support/test_app.rs, compiled here with rustc for musl)
//! in a `FROM scratch` image. Nothing is pulled. Every image, container and network carries
//! `sluice.test=1` and a unique id, and guards remove them even when a test fails. With no engine,
//! every test prints why and passes without running.
//!
//! Waits are generous waits on conditions (60 s), never on "it was fast".

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sluice_runtime::{
    ContainerOptions, ContainerRuntime, ImageSpec, LaunchSpec, LogQuery, Mount, MountSource, Probe,
    PullPolicy, RevisionFailure, RevisionKey, RuntimeOptions, RuntimeSnapshot, SecurityContext,
    SidecarSpec, reap_leftover_containers,
};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running the docker CLI")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The test app, compiled once per test binary.
fn app_binary() -> &'static Path {
    static APP: OnceLock<PathBuf> = OnceLock::new();
    APP.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sluice-rt-test-app");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/test_app.rs");
        let status = Command::new("rustc")
            .args(["--edition", "2021", "--target", "x86_64-unknown-linux-musl"])
            .args(["-C", "opt-level=1", "-C", "strip=symbols", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("running rustc");
        assert!(
            status.success(),
            "building the test app (needs `rustup target add x86_64-unknown-linux-musl`)"
        );
        out
    })
}

/// A locally built image, removed on drop.
struct TestImage {
    tag: String,
    id: String,
}

impl TestImage {
    fn build(tag: &str, message: &str, user: Option<&str>) -> TestImage {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(app_binary(), ctx.path().join("app")).unwrap();
        std::fs::create_dir(ctx.path().join("tmp")).unwrap();
        std::fs::write(ctx.path().join("tmp/.keep"), "").unwrap();
        let user = user.map(|u| format!("USER {u}\n")).unwrap_or_default();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!(
                "FROM scratch\nCOPY app /app\nCOPY tmp /tmp\nENV APP_MESSAGE={message}\n{user}\
                 LABEL sluice.test=1 sluice.test.id={tag}\nENTRYPOINT [\"/app\"]\nCMD [\"serve\"]\n"
            ),
        )
        .unwrap();
        // Concurrent legacy builds of the same layers can trip over each other on this engine:
        // a failed build is retried (its error printed), a third failure fails the test.
        let context = ctx.path().display().to_string();
        for attempt in 1.. {
            let out = docker(&["build", "-q", "-t", tag, &context]);
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(attempt < 3, "docker build {tag}: {err}");
            eprintln!("docker build {tag} failed (attempt {attempt}), retrying: {err}");
        }
        let id = docker_ok(&["image", "inspect", "-f", "{{.Id}}", tag]);
        TestImage {
            tag: tag.to_string(),
            id,
        }
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.tag]);
        let _ = docker(&["rmi", "-f", &self.id]);
    }
}

/// Removes whatever carries this owner's label, even after a failed test.
struct OwnerGuard(String);

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        let filter = format!("label=sluice.owner={}", self.0);
        let out = docker(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        let out = docker(&["network", "ls", "-q", "--filter", &filter]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = docker(&["network", "rm", id]);
        }
    }
}

/// The test's [`Fixture`] on the default engine (or on `$engine`); with no engine answering, the test
/// prints why and returns.
macro_rules! fixture {
    () => {
        fixture!(None)
    };
    ($engine:expr) => {
        match Fixture::new_with($engine).await {
            Some(f) => f,
            None => return,
        }
    };
}

fn key(revision: &str) -> RevisionKey {
    RevisionKey::new("default", revision)
}

/// One test's runtime, image and guards, dropped in this order.
struct Fixture {
    rt: ContainerRuntime,
    _owner: OwnerGuard,
    image: TestImage,
    id: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// On the engine at `engine` (`None`: DOCKER_HOST or the default socket); `None` (with the reason
    /// printed) when no engine answers.
    async fn new_with(engine: Option<String>) -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        let id = unique();
        let options = ContainerOptions {
            extra_labels: vec![
                ("sluice.test".into(), "1".into()),
                ("sluice.test.id".into(), id.clone()),
            ],
            engine,
        };
        let rt = match ContainerRuntime::connect_with(
            RuntimeOptions::new(dir.path().join("state")),
            options,
        )
        .await
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("skipped: no container engine answers ({e})");
                return None;
            }
        };
        let owner = OwnerGuard(rt.owner().to_string());
        let image = TestImage::build(&format!("sluice-rt-test-{id}:v1"), "one", None);
        Some(Fixture {
            rt,
            _owner: owner,
            image,
            id,
            _dir: dir,
        })
    }

    fn spec(&self, revision: &str) -> LaunchSpec {
        let mut spec = LaunchSpec::new(vec![], "svc", "svc", revision);
        spec.image = Some(ImageSpec {
            reference: self.image.tag.clone(),
            pull_policy: PullPolicy::IfNotPresent,
            pinned: None,
        });
        // The app is PID 1 without a SIGTERM handler, which the kernel then does not deliver (as on
        // Kubernetes): stops end with the SIGKILL after the grace period.
        spec.grace_period = Duration::from_secs(2);
        spec
    }

    /// Registers `spec` (under `default/<spec.revision>`), scales it to `n` and waits until all `n`
    /// are ready.
    async fn start(&self, spec: LaunchSpec, n: u32) -> RuntimeSnapshot {
        let key = key(&spec.revision);
        self.rt.set_revision(key.clone(), spec).unwrap();
        self.rt.scale(&key, n).unwrap();
        let mut rx = self.rt.subscribe();
        wait_for(&mut rx, &format!("{n} ready"), ready(&key, n)).await
    }

    /// [`Fixture::start`] with one instance: its address.
    async fn one_ready(&self, spec: LaunchSpec) -> SocketAddr {
        let key = key(&spec.revision);
        self.start(spec, 1).await.revision(&key).unwrap().instances[0].address
    }

    /// Registers `spec`, scales it to 1 and waits until the revision reports why it cannot run.
    async fn failure(&self, spec: LaunchSpec) -> RevisionFailure {
        let key = key(&spec.revision);
        self.rt.set_revision(key.clone(), spec).unwrap();
        self.rt.scale(&key, 1).unwrap();
        let mut rx = self.rt.subscribe();
        let s = wait_for(&mut rx, "a revision failure", |s| {
            s.revision(&key).is_some_and(|r| r.failure.is_some())
        })
        .await;
        s.revision(&key).unwrap().failure.clone().unwrap()
    }

    /// Waits until exactly `n` of this runtime's containers exist (replaced ones are removed).
    async fn wait_containers(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.containers().len() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "want {n} containers: {:?}",
                self.containers()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn containers(&self) -> Vec<String> {
        let filter = format!("label=sluice.owner={}", self.rt.owner());
        docker_ok(&["ps", "-aq", "--filter", &filter])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<RuntimeSnapshot>,
    what: &str,
    pred: impl FnMut(&RuntimeSnapshot) -> bool,
) -> RuntimeSnapshot {
    let found = match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            *rx.borrow()
        )
    })
}

fn ready(key: &RevisionKey, n: u32) -> impl FnMut(&RuntimeSnapshot) -> bool + '_ {
    move |s| {
        s.revision(key)
            .is_some_and(|r| r.ready_count() == n && r.instances.len() == n as usize)
    }
}

/// GET `path` from `addr` with a plain HTTP/1.1 request: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect timeout")
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut buf))
        .await
        .expect("read timeout")
        .unwrap();
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn an_image_only_revision_answers_at_its_container_ip_with_labels_and_logs() {
    let f = fixture!();
    let key = key("img-00001");
    let addr = f.one_ready(f.spec("img-00001")).await;
    assert_eq!(addr.port(), 8080);
    assert!(
        !addr.ip().is_loopback() && !addr.ip().is_unspecified(),
        "{addr}"
    );
    let (status, body) = get(addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "hello img-00001 one"));
    assert_eq!(get(addr, "/env/PORT").await.1, "8080");
    assert_eq!(get(addr, "/env/K_SERVICE").await.1, "svc");

    let snap = f.rt.snapshot();
    let rev = snap.revision(&key).unwrap();
    assert_eq!(rev.image_digest.as_deref(), Some(f.image.id.as_str()));
    let inst = &rev.instances[0];
    let cid = inst.container_id.clone().expect("container id");
    let labels = docker_ok(&["inspect", "-f", "{{json .Config.Labels}}", &cid]);
    for want in [
        format!("\"sluice.owner\":\"{}\"", f.rt.owner()),
        "\"sluice.namespace\":\"default\"".into(),
        "\"sluice.service\":\"svc\"".into(),
        "\"sluice.revision\":\"img-00001\"".into(),
        format!("\"sluice.instance\":\"{}\"", inst.name),
        "\"sluice.container\":\"user-container\"".into(),
        "\"sluice.test\":\"1\"".into(),
    ] {
        assert!(labels.contains(&want), "{labels} lacks {want}");
    }
    // Nothing published on the host.
    assert_eq!(docker_ok(&["port", &cid]), "");

    let query = LogQuery::service("default", "svc");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = f.rt.logs(&query).unwrap();
        let has = |s: &str| lines.iter().any(|l| l.contains(s));
        if has(" stdout listening on 8080")
            && has(" stderr stderr works too")
            && has(" sluice started container")
            && has(" sluice ready")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.rt.shutdown().await;
    assert!(f.containers().is_empty());
    assert!(
        !docker(&["network", "inspect", f.rt.network()])
            .status
            .success(),
        "the network is removed on shutdown"
    );
}

#[tokio::test]
async fn kill_now_ends_a_shutdown_waiting_on_the_grace_period() {
    let f = fixture!();
    let key = key("kill-00001");
    let mut spec = f.spec("kill-00001");
    // The app ignores SIGTERM (PID 1 without a handler): only the SIGKILL after this would stop it.
    spec.grace_period = Duration::from_secs(3600);
    f.start(spec, 2).await;
    let mut rx = f.rt.subscribe();
    let shutdown = f.rt.shutdown();
    tokio::pin!(shutdown);
    // Once both are Terminating, kill_now ends the wait.
    tokio::select! {
        _ = &mut shutdown => panic!("shutdown returned before kill_now"),
        _ = rx.wait_for(|s| s.revision(&key).is_some_and(|r| {
            r.instances.iter().all(|i| i.state == sluice_runtime::InstanceState::Terminating)
        })) => {}
    }
    f.rt.kill_now();
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown after kill_now");
    assert!(f.containers().is_empty());
}

#[tokio::test]
async fn dropping_the_runtime_removes_every_container_and_the_network() {
    let f = fixture!();
    f.start(f.spec("drop-00001"), 2).await;
    assert_eq!(f.containers().len(), 2);
    let network = f.rt.network().to_string();
    let Fixture {
        rt,
        _owner: owner,
        image: _image,
        ..
    } = f;
    drop(rt);
    let filter = format!("label=sluice.owner={}", owner.0);
    assert_eq!(docker_ok(&["ps", "-aq", "--filter", &filter]), "");
    assert!(!docker(&["network", "inspect", &network]).status.success());
}

#[tokio::test]
async fn container_port_env_command_and_args_are_honoured() {
    let f = fixture!();
    let key = key("args-00001");
    let mut spec = f.spec("args-00001");
    spec.container_port = Some(9090);
    spec.env = vec![
        ("GREETING".into(), "hi".into()),
        ("DERIVED".into(), "port-$(PORT)".into()),
    ];
    spec.command = strings(&["/app"]);
    spec.args = strings(&["serve", "--message=$(GREETING)"]);
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(cfg.path().join("greeting"), "from a config map").unwrap();
    spec.mounts = vec![Mount {
        source: MountSource::Dir(cfg.path().to_path_buf()),
        target: "/cfg".into(),
        read_only: true,
    }];
    spec.resources = sluice_runtime::Resources {
        cpu_millis: Some(500),
        memory_bytes: Some(64 << 20),
    };
    let addr = f.one_ready(spec).await;
    assert_eq!(addr.port(), 9090);
    assert_eq!(get(addr, "/file/cfg/greeting").await.1, "from a config map");
    assert_eq!(get(addr, "/touch/cfg/x").await.0, 500, "read-only mount");
    let cid = f.rt.snapshot().revision(&key).unwrap().instances[0]
        .container_id
        .clone()
        .unwrap();
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            &cid
        ]),
        format!("500000000 {}", 64 << 20)
    );
    assert_eq!(get(addr, "/").await.1, "hello args-00001 hi");
    assert_eq!(get(addr, "/env/PORT").await.1, "9090");
    assert_eq!(get(addr, "/env/DERIVED").await.1, "port-9090");
    // The image's ENV stays underneath.
    assert_eq!(get(addr, "/env/APP_MESSAGE").await.1, "one");
}

#[tokio::test]
async fn an_exec_readiness_probe_runs_in_the_container() {
    let f = fixture!();
    let key = key("exec-00001");
    let mut spec = f.spec("exec-00001");
    spec.readiness = Probe::exec(strings(&["/app", "check-file", "/tmp/ready"]));
    f.rt.set_revision(key.clone(), spec).unwrap();
    f.rt.scale(&key, 1).unwrap();
    let mut rx = f.rt.subscribe();
    let s = wait_for(&mut rx, "a started container", |s| {
        s.revision(&key)
            .is_some_and(|r| r.instances.iter().any(|i| i.container_id.is_some()))
    })
    .await;
    let addr = s.revision(&key).unwrap().instances[0].address;
    // The app answers, but the probe's file is not there: not ready.
    assert_eq!(get(addr, "/").await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.rt.snapshot().revision(&key).unwrap().ready_count(), 0);
    assert_eq!(get(addr, "/touch/tmp/ready").await.0, 200);
    wait_for(&mut rx, "ready once the file exists", ready(&key, 1)).await;
}

#[tokio::test]
async fn liveness_failure_and_crashes_restart_with_counts() {
    let f = fixture!();
    let key = key("live-00001");
    let mut spec = f.spec("live-00001");
    spec.liveness = Some(Probe {
        period: Some(Duration::from_millis(200)),
        failure_threshold: 2,
        ..Probe::http("/healthz")
    });
    let addr = f.one_ready(spec).await;
    let mut rx = f.rt.subscribe();
    let first = f.rt.snapshot().revision(&key).unwrap().instances[0].clone();
    assert_eq!(get(addr, "/sick").await.0, 200);
    let s = wait_for(&mut rx, "a liveness restart", |s| {
        s.revision(&key).is_some_and(|r| r.restarts == 1)
    })
    .await;
    let last = s.revision(&key).unwrap().last_exit.clone().unwrap();
    assert!(last.starts_with("liveness probe failed"), "{last}");
    let s = wait_for(&mut rx, "a replacement", |s| {
        s.revision(&key).is_some_and(|r| {
            r.ready_count() == 1 && r.instances.iter().all(|i| i.name != first.name)
        })
    })
    .await;
    let addr = s.revision(&key).unwrap().instances[0].address;
    // Crash: the container exits on its own with code 3.
    let _ = get(addr, "/crash").await;
    let s = wait_for(&mut rx, "a crash restart", |s| {
        s.revision(&key).is_some_and(|r| r.restarts == 2)
    })
    .await;
    assert_eq!(
        s.revision(&key).unwrap().last_exit.as_deref(),
        Some("exit code 3")
    );
    wait_for(&mut rx, "ready again", ready(&key, 1)).await;
    // Replaced containers are removed: only the live one is left.
    f.wait_containers(1).await;
}

#[tokio::test]
async fn a_startup_probe_gates_readiness() {
    let f = fixture!();
    let mut spec = f.spec("startup-00001");
    spec.env = vec![("APP_STARTUP_MS".into(), "500".into())];
    spec.startup = Some(Probe {
        period: Some(Duration::from_millis(100)),
        failure_threshold: 600,
        ..Probe::http("/healthz")
    });
    f.one_ready(spec).await;
    let lines =
        f.rt.logs(&LogQuery::revision("default", "startup-00001"))
            .unwrap();
    let pos = |s: &str| lines.iter().position(|l| l.ends_with(s));
    let (started, ready) = (pos("startup probe succeeded"), pos(" sluice ready"));
    assert!(started.is_some() && started < ready, "{lines:#?}");
}

#[tokio::test]
async fn scale_zero_to_two_to_zero_removes_the_containers() {
    let f = fixture!();
    let key = key("scale-00001");
    let s = f.start(f.spec("scale-00001"), 2).await;
    let mut rx = f.rt.subscribe();
    let addrs = s.revision(&key).unwrap().ready_addresses();
    assert_ne!(addrs[0], addrs[1]);
    assert_eq!(f.containers().len(), 2);
    f.rt.scale(&key, 0).unwrap();
    wait_for(&mut rx, "none", |s| {
        s.revision(&key).is_some_and(|r| r.instances.is_empty())
    })
    .await;
    assert!(f.containers().is_empty(), "{:?}", f.containers());
    let logs =
        f.rt.logs(&LogQuery::revision("default", "scale-00001"))
            .unwrap();
    assert!(
        logs.iter().any(|l| l.contains(" sluice stopping: SIGTERM")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn image_resolution_never_missing_retag_and_pinned() {
    let f = fixture!();
    let mut rx = f.rt.subscribe();

    // Never with a missing image: ContainerMissing with the engine's words.
    let mut spec = f.spec("missing-00001");
    spec.image = Some(ImageSpec {
        reference: format!("sluice-rt-test-missing-{}:v1", f.id),
        pull_policy: PullPolicy::Never,
        pinned: None,
    });
    let failure = f.failure(spec).await;
    assert_eq!(failure.reason, "ContainerMissing");
    assert!(
        failure
            .message
            .starts_with("Unable to fetch image \"sluice-rt-test-missing-")
            && failure.message.contains("imagePullPolicy is Never"),
        "{}",
        failure.message
    );
    let snap = f.rt.snapshot();
    assert!(
        snap.revision(&key("missing-00001"))
            .unwrap()
            .instances
            .is_empty()
    );

    // Re-tagging after set_revision does not change what the revision runs.
    let tagged = key("tag-00001");
    f.rt.set_revision(tagged.clone(), f.spec("tag-00001"))
        .unwrap();
    wait_for(&mut rx, "resolved", |s| {
        s.revision(&tagged)
            .is_some_and(|r| r.image_digest.is_some())
    })
    .await;
    let two = TestImage::build(&format!("sluice-rt-test-{}-two:v1", f.id), "two", None);
    docker_ok(&["tag", &two.id, &f.image.tag]);
    f.rt.scale(&tagged, 1).unwrap();
    let s = wait_for(&mut rx, "ready", ready(&tagged, 1)).await;
    let rev = s.revision(&tagged).unwrap();
    assert_eq!(rev.image_digest.as_deref(), Some(f.image.id.as_str()));
    assert_eq!(
        get(rev.instances[0].address, "/").await.1,
        "hello tag-00001 one"
    );

    // A pinned image ID wins over the tag and is never resolved again.
    let mut spec = f.spec("pin-00001");
    spec.image.as_mut().unwrap().pinned = Some(f.image.id.clone());
    let addr = f.one_ready(spec).await;
    assert_eq!(get(addr, "/").await.1, "hello pin-00001 one");
    // The tag now names image two: a new revision takes it.
    let new = key("tag-00002");
    let addr = f.one_ready(f.spec("tag-00002")).await;
    assert_eq!(get(addr, "/").await.1, "hello tag-00002 two");
    assert_eq!(
        f.rt.snapshot()
            .revision(&new)
            .unwrap()
            .image_digest
            .as_deref(),
        Some(two.id.as_str())
    );
    f.rt.shutdown().await;
    drop(two);
}

/// An image removed under a revision at zero (`docker rmi -f`): the next start fails with
/// ContainerMissing; once the tag names an image again (a rebuild), the revision resolves it anew and
/// runs it.
#[tokio::test]
async fn an_image_removed_under_a_revision_is_resolved_again_once_rebuilt() {
    let f = fixture!();
    let key = key("gone-00001");
    f.start(f.spec("gone-00001"), 1).await;
    let mut rx = f.rt.subscribe();
    f.rt.scale(&key, 0).unwrap();
    f.wait_containers(0).await;
    docker_ok(&["rmi", "-f", &f.image.tag]);

    f.rt.scale(&key, 1).unwrap();
    let s = wait_for(&mut rx, "ContainerMissing", |s| {
        s.revision(&key)
            .and_then(|r| r.failure.as_ref())
            .is_some_and(|f| f.reason == "ContainerMissing")
    })
    .await;
    let failure = s.revision(&key).unwrap().failure.clone().unwrap();
    assert!(failure.message.contains(&f.image.tag), "{failure:?}");

    let rebuilt = TestImage::build(&f.image.tag, "rebuilt", None);
    let s = wait_for(&mut rx, "ready from the rebuilt image", ready(&key, 1)).await;
    let rev = s.revision(&key).unwrap();
    assert_eq!(rev.failure, None);
    assert_eq!(rev.image_digest.as_deref(), Some(rebuilt.id.as_str()));
    assert_eq!(
        get(rev.instances[0].address, "/").await.1,
        "hello gone-00001 rebuilt"
    );
    // Its container gone first, the rebuilt image can be removed.
    f.rt.shutdown().await;
}

#[tokio::test]
async fn run_as_non_root_with_a_root_image_is_refused() {
    let f = fixture!();
    let mut spec = f.spec("root-00001");
    spec.security = SecurityContext {
        run_as_non_root: true,
        ..Default::default()
    };
    let failure = f.failure(spec.clone()).await;
    assert_eq!(failure.reason, "CreateContainerConfigError");
    assert!(
        failure.message.contains("run as root"),
        "{}",
        failure.message
    );
    assert!(f.containers().is_empty());
    // With a non-root runAsUser it runs.
    spec.revision = "root-00002".into();
    spec.security.run_as_user = Some(1000);
    let addr = f.one_ready(spec).await;
    assert_eq!(get(addr, "/").await.0, 200);
}

#[tokio::test]
async fn a_sidecar_shares_localhost_and_an_empty_dir() {
    let f = fixture!();
    let key = key("side-00001");
    let mut spec = f.spec("side-00001");
    let shared = Mount {
        source: MountSource::EmptyDir {
            name: "shared".into(),
            memory: false,
        },
        target: "/shared".into(),
        read_only: false,
    };
    spec.mounts = vec![shared.clone()];
    spec.sidecars = vec![SidecarSpec {
        name: "helper".into(),
        image: spec.image.clone().unwrap(),
        command: vec![],
        args: strings(&["serve", "--message=from-sidecar"]),
        env: vec![("LISTEN_PORT".into(), "9000".into())],
        working_dir: None,
        readiness: None,
        liveness: None,
        startup: None,
        resources: Default::default(),
        mounts: vec![shared],
        security: Default::default(),
    }];
    // Ready only once the sidecar answers on the shared localhost too.
    spec.readiness = Probe {
        port: Some(9000),
        ..Probe::default()
    };
    let addr = f.one_ready(spec).await;
    let (status, body) = get(addr, "/fetch/9000").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello side-00001 from-sidecar")
    );
    assert_eq!(f.containers().len(), 2);
    // The emptyDir is shared: a file one container writes, the other sees.
    assert_eq!(get(addr, "/touch/shared/x").await.0, 200);
    let sidecar = SocketAddr::new(addr.ip(), 9000);
    assert_eq!(get(sidecar, "/env/K_REVISION").await.1, "side-00001");
    let snap = f.rt.snapshot();
    let cid = snap.revision(&key).unwrap().instances[0]
        .container_id
        .clone()
        .unwrap();
    let helper = f
        .containers()
        .into_iter()
        .find(|c| !cid.starts_with(c.as_str()))
        .unwrap();
    docker_ok(&["exec", &helper, "/app", "check-file", "/shared/x"]);
    f.rt.shutdown().await;
    assert!(f.containers().is_empty());
}

#[tokio::test]
async fn reap_leftover_containers_removes_the_owners_containers() {
    let f = fixture!();
    // A leftover of an earlier run: a container labelled with our owner, not known to the runtime.
    let owner_label = format!("sluice.owner={}", f.rt.owner());
    docker_ok(&[
        "create",
        "--label",
        &owner_label,
        "--label",
        "sluice.test=1",
        "--label",
        &format!("sluice.test.id={}", f.id),
        &f.image.id,
    ]);
    // A bystander with another owner stays.
    let other = format!("sluice.owner=/elsewhere/{}", f.id);
    let bystander = docker_ok(&[
        "create",
        "--label",
        &other,
        "--label",
        "sluice.test=1",
        &f.image.id,
    ]);
    let _bystander = OwnerGuard(format!("/elsewhere/{}", f.id));
    assert_eq!(f.containers().len(), 1);
    let removed = reap_leftover_containers(f.rt.owner()).await.unwrap();
    assert_eq!(removed, 1);
    assert!(f.containers().is_empty());
    assert!(docker(&["inspect", &bystander]).status.success());
    // The reap took the runtime's network too (it carries the owner): instances still start.
    assert!(
        !docker(&["network", "inspect", f.rt.network()])
            .status
            .success()
    );
    let addr = f.one_ready(f.spec("after-reap-00001")).await;
    assert_eq!(get(addr, "/").await.0, 200);
}

/// A unix-socket proxy in front of the engine's socket that a test takes down and brings back: the
/// engine going away, without stopping the machine's daemon that others share.
struct EngineProxy {
    path: PathBuf,
    target: PathBuf,
    running: Option<(tokio::task::JoinHandle<()>, Connections)>,
}

type Connections = std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>;

impl EngineProxy {
    /// The engine's unix socket, when that is how it is reached.
    fn target() -> Option<PathBuf> {
        match std::env::var("DOCKER_HOST") {
            Ok(h) => h.strip_prefix("unix://").map(PathBuf::from),
            Err(_) => Some(PathBuf::from("/var/run/docker.sock")),
        }
    }

    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (target, tasks) = (self.target.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.running = Some((accept, conns));
    }

    fn down(&mut self) {
        if let Some((accept, conns)) = self.running.take() {
            accept.abort();
            for conn in conns.lock().unwrap().drain(..) {
                conn.abort();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test]
async fn the_engine_going_away_is_reported_and_the_runtime_recovers() {
    let Some(target) = EngineProxy::target() else {
        eprintln!("skipped: DOCKER_HOST is not a unix socket");
        return;
    };
    let sock_dir = tempfile::tempdir().unwrap();
    let mut proxy = EngineProxy {
        path: sock_dir.path().join("engine.sock"),
        target,
        running: None,
    };
    proxy.up();
    let engine = format!("unix://{}", proxy.path.display());
    let f = fixture!(Some(engine));
    let key = key("engine-00001");
    f.one_ready(f.spec("engine-00001")).await;
    let first = f.rt.snapshot().revision(&key).unwrap().instances[0]
        .name
        .clone();
    let mut rx = f.rt.subscribe();

    proxy.down();
    let s = wait_for(&mut rx, "ContainerEngineUnavailable", |s| {
        s.revision(&key).is_some_and(|r| {
            r.ready_count() == 0
                && r.failure
                    .as_ref()
                    .is_some_and(|f| f.reason == "ContainerEngineUnavailable")
        })
    })
    .await;
    let message = &s.revision(&key).unwrap().failure.as_ref().unwrap().message;
    assert!(message.contains("does not answer"), "{message}");

    proxy.up();
    let s = wait_for(&mut rx, "recovered", |s| {
        s.revision(&key).is_some_and(|r| {
            r.failure.is_none() && r.ready_count() == 1 && r.instances[0].name != first
        })
    })
    .await;
    assert_eq!(s.revision(&key).unwrap().restarts, 0);
    // The container of the lost instance is removed once the engine answers again.
    f.wait_containers(1).await;
    f.rt.shutdown().await;
}

/// Prints cold start figures (not an assertion): `scale(1)` to Ready through the runtime, beside the
/// engine's own create + start + inspect to the app accepting TCP, for the same image, and `docker run`
/// to ready. Run: `cargo test -p sluice-runtime --test containers cold_start -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn cold_start_overhead_report() {
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{
        CreateContainerOptions, InspectContainerOptions, RemoveContainerOptions,
        StartContainerOptions,
    };
    use std::time::Instant;
    let f = fixture!();
    let docker = bollard::Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let key = key("cold-00001");
    f.rt.set_revision(key.clone(), f.spec("cold-00001"))
        .unwrap();
    let mut rx = f.rt.subscribe();
    wait_for(&mut rx, "resolved", |s| {
        s.revision(&key).is_some_and(|r| r.image_digest.is_some())
    })
    .await;
    let accepting = |addr: SocketAddr| async move {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let (mut sluice, mut engine, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..10 {
        // Through the runtime.
        let t0 = Instant::now();
        f.rt.scale(&key, 1).unwrap();
        wait_for(&mut rx, "ready", ready(&key, 1)).await;
        sluice.push(t0.elapsed());
        f.rt.scale(&key, 0).unwrap();
        wait_for(&mut rx, "none", |s| {
            s.revision(&key).is_some_and(|r| r.instances.is_empty())
        })
        .await;
        // The engine alone: create, start, inspect for the IP, then poll until the app accepts.
        let labels = [
            ("sluice.test".to_string(), "1".to_string()),
            ("sluice.owner".to_string(), f.rt.owner().to_string()),
        ];
        let t0 = Instant::now();
        let id = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(format!("sluice-rt-cold-{}-{round}", f.id)),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(f.image.id.clone()),
                    labels: Some(labels.into_iter().collect()),
                    host_config: Some(HostConfig {
                        network_mode: Some(f.rt.network().to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .id;
        docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .unwrap();
        let ip = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .unwrap()
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(f.rt.network()))
            .and_then(|e| e.ip_address)
            .unwrap();
        accepting(SocketAddr::new(ip.parse().unwrap(), 8080)).await;
        engine.push(t0.elapsed());
        docker
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        // `docker run -d` to the app accepting.
        let t0 = Instant::now();
        let name = format!("sluice-rt-cli-{}-{round}", f.id);
        let owner_label = format!("sluice.owner={}", f.rt.owner());
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "sluice.test=1",
            "--label",
            &owner_label,
            "--network",
            f.rt.network(),
            &f.image.id,
        ]);
        let ip = docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &name,
        ]);
        accepting(SocketAddr::new(ip.parse().unwrap(), 8080)).await;
        cli.push(t0.elapsed());
        docker_ok(&["rm", "-f", &name]);
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (s, e, c) = (p50(&mut sluice), p50(&mut engine), p50(&mut cli));
    println!(
        "cold start p50 over 10: runtime scale->Ready {s:?}; engine create+start+inspect->accepting {e:?}; \
         overhead {:.1} ms; docker run -> accepting {c:?}",
        (s.as_secs_f64() - e.as_secs_f64()) * 1000.0
    );
}

#[tokio::test]
async fn connect_fails_with_an_engine_error_when_nothing_answers() {
    let dir = tempfile::tempdir().unwrap();
    let err = ContainerRuntime::connect_with(
        RuntimeOptions::new(dir.path().join("state")),
        ContainerOptions {
            extra_labels: vec![],
            engine: Some(format!(
                "unix://{}",
                dir.path().join("no-engine.sock").display()
            )),
        },
    )
    .await
    .err()
    .expect("no engine there");
    assert!(
        matches!(err, sluice_runtime::RuntimeError::Engine { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn specs_the_container_runtime_cannot_run_are_refused_with_what_to_fix() {
    let f = fixture!();
    let key = key("bad-00001");
    let mut no_image = f.spec("bad-00001");
    no_image.image = None;
    no_image.command = strings(&["/app"]);
    let err = f.rt.set_revision(key.clone(), no_image).unwrap_err();
    assert!(
        err.to_string().contains("needs the container's `image`"),
        "{err}"
    );
    let mut relative = f.spec("bad-00001");
    relative.mounts = vec![Mount {
        source: MountSource::Dir("relative/dir".into()),
        target: "/cfg".into(),
        read_only: true,
    }];
    let err = f.rt.set_revision(key, relative).unwrap_err();
    assert!(
        err.to_string().contains("must be an absolute path"),
        "{err}"
    );
}
