//! The runtime against real processes (`sh`, `sleep`, `python3` one-liners listening on $PORT).
//! Every test waits on conditions with generous timeouts, never on "it was fast". The runtime kills
//! every process group it started when dropped, so a failing test leaks nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_runtime::{
    InstanceState, LaunchSpec, LogQuery, Probe, ProcessRuntime, RevisionKey, RuntimeError,
    RuntimeOptions, RuntimeSnapshot,
};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

/// An HTTP server on 127.0.0.1:$PORT answering 200 on / and /healthz, 404 elsewhere; prints a line to
/// stdout and one to stderr once listening.
const PY_SERVER: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/", "/healthz") else 404)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
s = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
print("hello from " + os.environ["K_REVISION"], flush=True)
print("warming up on stderr", file=sys.stderr, flush=True)
s.serve_forever()
"#;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn py_server_spec(service: &str, revision: &str) -> LaunchSpec {
    LaunchSpec::new(
        strings(&["python3", "-c", PY_SERVER]),
        service,
        service,
        revision,
    )
}

/// A shell script instance that does not listen: readiness by exec probe `true`.
fn sh_spec(revision: &str, script: &str) -> LaunchSpec {
    let mut spec = LaunchSpec::new(strings(&["sh", "-c", script]), "svc", "svc", revision);
    spec.readiness = Probe::exec(strings(&["true"]));
    spec
}

/// Ready only once the script has installed its TERM trap: a stop that races the shell's start-up
/// would otherwise end it with the default SIGTERM action.
fn trapping_spec(revision: &str, script: &str, armed: &Path) -> LaunchSpec {
    let mut spec = sh_spec(revision, script);
    spec.readiness = Probe::exec(strings(&["test", "-f", &armed.display().to_string()]));
    spec
}

fn runtime(dir: &Path) -> ProcessRuntime {
    ProcessRuntime::new(RuntimeOptions::new(dir.join("state"))).expect("runtime")
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

fn no_instances(key: &RevisionKey) -> impl FnMut(&RuntimeSnapshot) -> bool + '_ {
    move |s| s.revision(key).is_none_or(|r| r.instances.is_empty())
}

async fn wait_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            // Let a writer finish its line.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return std::fs::read_to_string(path).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

async fn wait_dead(pid: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_log(rt: &ProcessRuntime, query: &LogQuery, needle: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = rt.logs(query).unwrap();
        if lines.iter().any(|l| l.contains(needle)) {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needle:?} in {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tcp_probe_makes_an_instance_ready_with_knative_env() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let env_file = dir.path().join("env.txt");
    let key = RevisionKey::new("default", "hello-00001");
    let mut spec = py_server_spec("hello", "hello-00001");
    spec.command = strings(&[
        "sh",
        "-c",
        "env > \"$ENV_FILE\"; exec python3 -c \"$0\"",
        PY_SERVER,
    ]);
    spec.configuration = "hello-config".into();
    spec.env = vec![
        ("ENV_FILE".into(), env_file.display().to_string()),
        ("GREETING".into(), "hi".into()),
    ];
    spec.working_dir = Some(dir.path().to_path_buf());
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();

    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "one ready instance", ready(&key, 1)).await;
    let inst = &snap.revision(&key).unwrap().instances[0];
    assert!(inst.name.starts_with("hello-00001-"), "{}", inst.name);
    assert_eq!(inst.address.to_string(), format!("127.0.0.1:{}", inst.port));
    assert!(inst.ready_at.unwrap() >= inst.spawned_at);
    assert!(inst.pid.is_some());
    // It really serves on that address.
    tokio::net::TcpStream::connect(inst.address)
        .await
        .expect("instance listens on PORT");

    let env = wait_file(&env_file).await;
    for want in [
        format!("PORT={}", inst.port),
        "K_SERVICE=hello".into(),
        "K_CONFIGURATION=hello-config".into(),
        "K_REVISION=hello-00001".into(),
        "GREETING=hi".into(),
        format!("PWD={}", dir.path().display()),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in env:\n{env}");
    }
    rt.shutdown().await;
    assert_eq!(rt.snapshot().instance_count(), 0);
}

#[tokio::test]
async fn http_probe_uses_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let good = RevisionKey::new("default", "good-00001");
    let bad = RevisionKey::new("default", "bad-00001");
    let mut good_spec = py_server_spec("good", "good-00001");
    good_spec.readiness = Probe::http("/healthz");
    let mut bad_spec = py_server_spec("bad", "bad-00001");
    bad_spec.readiness = Probe::http("/missing");
    rt.set_revision(good.clone(), good_spec).unwrap();
    rt.set_revision(bad.clone(), bad_spec).unwrap();
    rt.scale(&bad, 1).unwrap();
    rt.scale(&good, 1).unwrap();

    let mut rx = rt.subscribe();
    wait_for(&mut rx, "the /healthz instance ready", ready(&good, 1)).await;
    // The 404 instance listens too (its log shows it), but a 404 is not ready.
    wait_log(
        &rt,
        &LogQuery::revision("default", "bad-00001"),
        "hello from bad-00001",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = rt.snapshot();
    let bad_status = snap.revision(&bad).unwrap();
    assert_eq!(bad_status.ready_count(), 0);
    assert_eq!(bad_status.instances[0].state, InstanceState::Starting);
}

#[tokio::test]
async fn exec_probe_decides_readiness_with_the_instance_env() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let flag = dir.path().join("ready-flag");
    let key = RevisionKey::new("default", "exec-00001");
    let mut spec = sh_spec("exec-00001", "exec sleep 600");
    spec.env = vec![("READY_FILE".into(), flag.display().to_string())];
    spec.readiness = Probe::exec(strings(&["sh", "-c", "test -f \"$READY_FILE\""]));
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();

    let mut rx = rt.subscribe();
    wait_for(&mut rx, "an instance", |s| {
        s.revision(&key).is_some_and(|r| r.instances.len() == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rt.snapshot().revision(&key).unwrap().ready_count(), 0);
    std::fs::write(&flag, "").unwrap();
    wait_for(&mut rx, "ready after the flag file appears", ready(&key, 1)).await;
}

#[tokio::test]
async fn scales_zero_to_two_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "web-00001");
    rt.set_revision(key.clone(), py_server_spec("web", "web-00001"))
        .unwrap();
    let mut rx = rt.subscribe();
    assert_eq!(rt.snapshot().revision(&key).unwrap().instances.len(), 0);

    rt.scale(&key, 2).unwrap();
    let snap = wait_for(&mut rx, "two ready instances", ready(&key, 2)).await;
    let rev = snap.revision(&key).unwrap();
    assert_eq!(rev.desired, 2);
    assert_ne!(rev.instances[0].port, rev.instances[1].port);
    assert_ne!(rev.instances[0].name, rev.instances[1].name);
    assert_eq!(rev.ready_addresses().len(), 2);
    let pids: Vec<u32> = rev.instances.iter().map(|i| i.pid.unwrap()).collect();

    rt.scale(&key, 0).unwrap();
    wait_for(&mut rx, "no instances", no_instances(&key)).await;
    for pid in pids {
        wait_dead(pid).await;
    }
    assert_eq!(
        rt.snapshot().revision(&key).unwrap().restarts,
        0,
        "a stop is not a crash"
    );
}

#[tokio::test]
async fn scale_down_keeps_the_oldest_ready_instance() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "keep-00001");
    rt.set_revision(key.clone(), py_server_spec("keep", "keep-00001"))
        .unwrap();
    let mut rx = rt.subscribe();
    rt.scale(&key, 1).unwrap();
    let first = wait_for(&mut rx, "one ready", ready(&key, 1))
        .await
        .revision(&key)
        .unwrap()
        .instances[0]
        .name
        .clone();
    rt.scale(&key, 2).unwrap();
    wait_for(&mut rx, "two ready", ready(&key, 2)).await;
    rt.scale(&key, 1).unwrap();
    let snap = wait_for(&mut rx, "back to one", ready(&key, 1)).await;
    assert_eq!(snap.revision(&key).unwrap().instances[0].name, first);
}

#[tokio::test]
async fn sigterm_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let out = dir.path().join("term.txt");
    let key = RevisionKey::new("default", "term-00001");
    let armed = dir.path().join("armed");
    let script = format!(
        "trap 'echo got TERM > {}; exit 0' TERM; touch {}; while true; do sleep 0.05; done",
        out.display(),
        armed.display()
    );
    let mut spec = trapping_spec("term-00001", &script, &armed);
    // Long grace: the test would stall if SIGTERM were ignored, and the log tells which signal ended it.
    spec.grace_period = Duration::from_secs(120);
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "ready", ready(&key, 1)).await;
    rt.scale(&key, 0).unwrap();
    let snap = wait_for(&mut rx, "stopped", no_instances(&key)).await;
    assert_eq!(snap.revision(&key).unwrap().restarts, 0);
    assert_eq!(wait_file(&out).await.trim(), "got TERM");
    let lines = rt
        .logs(&LogQuery::revision("default", "term-00001"))
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sluice stopped: exit status: 0")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("killed after")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn sigkill_follows_the_grace_period_when_sigterm_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "stubborn-00001");
    let armed = dir.path().join("armed");
    let script = format!(
        "trap '' TERM; touch {}; while true; do sleep 0.05; done",
        armed.display()
    );
    let mut spec = trapping_spec("stubborn-00001", &script, &armed);
    spec.grace_period = Duration::from_millis(300);
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "ready", ready(&key, 1)).await;
    let pid = snap.revision(&key).unwrap().instances[0].pid.unwrap();
    rt.scale(&key, 0).unwrap();
    wait_for(&mut rx, "killed", no_instances(&key)).await;
    wait_dead(pid).await;
    let lines = rt
        .logs(&LogQuery::revision("default", "stubborn-00001"))
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("killed after the grace period") && l.contains("SIGKILL")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn a_crashed_instance_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let mark = dir.path().join("crashed-once");
    let key = RevisionKey::new("default", "crash-00001");
    // Crashes the first time, runs the second.
    let script = format!(
        "if [ -f {m} ]; then exec sleep 600; else touch {m}; echo crashing >&2; exit 3; fi",
        m = mark.display()
    );
    rt.set_revision(key.clone(), sh_spec("crash-00001", &script))
        .unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "a ready replacement", |s| {
        s.revision(&key)
            .is_some_and(|r| r.restarts == 1 && r.ready_count() == 1)
    })
    .await;
    let rev = snap.revision(&key).unwrap();
    assert_eq!(rev.last_exit.as_deref(), Some("exit status: 3"));
    assert_eq!(rev.instances.len(), 1);
    let lines = rt.logs(&LogQuery::service("default", "svc")).unwrap();
    assert!(
        lines.iter().any(|l| l.contains("stderr crashing")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("exited on its own: exit status: 3")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn repeated_crashes_back_off_but_keep_the_desired_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = RuntimeOptions::new(dir.path().join("state"));
    options.backoff.initial = Duration::from_millis(50);
    options.backoff.max = Duration::from_millis(100);
    let rt = ProcessRuntime::new(options).unwrap();
    let key = RevisionKey::new("default", "flaky-00001");
    rt.set_revision(key.clone(), sh_spec("flaky-00001", "exit 1"))
        .unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "several restarts", |s| {
        s.revision(&key).is_some_and(|r| r.restarts >= 4)
    })
    .await;
    assert_eq!(rt.snapshot().revision(&key).unwrap().desired, 1);
    rt.scale(&key, 0).unwrap();
    wait_for(&mut rx, "no instances", no_instances(&key)).await;
}

#[tokio::test]
async fn logs_of_a_service_hold_stdout_and_stderr_of_its_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    for rev in ["blog-00001", "blog-00002"] {
        let key = RevisionKey::new("default", rev);
        rt.set_revision(key.clone(), py_server_spec("blog", rev))
            .unwrap();
        rt.scale(&key, 1).unwrap();
    }
    let query = LogQuery::service("default", "blog");
    wait_log(&rt, &query, "stdout hello from blog-00001").await;
    wait_log(&rt, &query, "stdout hello from blog-00002").await;
    let lines = wait_log(&rt, &query, "stderr warming up on stderr").await;
    assert!(
        lines.iter().any(|l| l.contains("sluice started pid")),
        "{lines:#?}"
    );
    // The same files are readable without the runtime, by convention.
    let files = sluice_runtime::log_files(rt.state_dir(), &query).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let blog1_dir = sluice_runtime::revision_log_dir(rt.state_dir(), "default", "blog-00001");
    assert!(files[0].starts_with(&blog1_dir), "{files:?}");
}

/// A shell that forks a `sleep` and waits: returns the spec and where the child's pid is written.
fn forking_spec(dir: &Path, revision: &str) -> (LaunchSpec, PathBuf) {
    let child_pid = dir.join(format!("{revision}.child"));
    let script = format!("sleep 600 & echo $! > {}; wait", child_pid.display());
    let mut spec = sh_spec(revision, &script);
    spec.grace_period = Duration::from_secs(60);
    (spec, child_pid)
}

#[tokio::test]
async fn stopping_an_instance_stops_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "fork-00001");
    let (spec, child_pid_file) = forking_spec(dir.path(), "fork-00001");
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "ready", ready(&key, 1)).await;
    let child: u32 = wait_file(&child_pid_file).await.trim().parse().unwrap();
    assert!(alive(child));
    rt.scale(&key, 0).unwrap();
    wait_for(&mut rx, "stopped", no_instances(&key)).await;
    wait_dead(child).await;
}

#[tokio::test]
async fn dropping_the_runtime_kills_every_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "leak-00001");
    let (spec, child_pid_file) = forking_spec(dir.path(), "leak-00001");
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 2).unwrap();
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "ready", ready(&key, 2)).await;
    let mut pids: Vec<u32> = snap
        .revision(&key)
        .unwrap()
        .instances
        .iter()
        .map(|i| i.pid.unwrap())
        .collect();
    pids.push(wait_file(&child_pid_file).await.trim().parse().unwrap());
    drop(rt);
    for pid in pids {
        wait_dead(pid).await;
    }
}

#[tokio::test]
async fn revisions_are_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "imm-00001");
    let spec = sh_spec("imm-00001", "exec sleep 600");
    rt.set_revision(key.clone(), spec.clone()).unwrap();
    rt.set_revision(key.clone(), spec.clone())
        .expect("same spec again is a no-op");
    let mut changed = spec.clone();
    changed.args = strings(&["x"]);
    assert!(matches!(
        rt.set_revision(key.clone(), changed.clone()),
        Err(RuntimeError::SpecChanged { .. })
    ));
    assert!(matches!(
        rt.scale(&RevisionKey::new("default", "nope"), 1),
        Err(RuntimeError::UnknownRevision { .. })
    ));
    // After removal the key may be registered again.
    rt.remove_revision(&key).unwrap();
    rt.set_revision(key.clone(), changed).unwrap();
}

#[tokio::test]
async fn remove_revision_stops_its_instances_and_forgets_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "gone-00001");
    rt.set_revision(key.clone(), sh_spec("gone-00001", "exec sleep 600"))
        .unwrap();
    rt.scale(&key, 2).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "ready", ready(&key, 2)).await;
    rt.remove_revision(&key).unwrap();
    wait_for(&mut rx, "forgotten", |s| s.revision(&key).is_none()).await;
}

#[tokio::test]
async fn a_missing_program_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "missing-00001");
    let spec = LaunchSpec::new(
        strings(&["/nonexistent/program"]),
        "missing",
        "missing",
        "missing-00001",
    );
    rt.set_revision(key.clone(), spec).unwrap();
    let err = rt.scale(&key, 1).unwrap_err();
    assert!(matches!(err, RuntimeError::Spawn { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    rt.scale(&key, 0).unwrap();
}

#[tokio::test]
async fn failing_probes_turn_a_ready_instance_not_ready_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let flag = dir.path().join("healthy");
    std::fs::write(&flag, "").unwrap();
    let key = RevisionKey::new("default", "flap-00001");
    let mut spec = sh_spec("flap-00001", "exec sleep 600");
    spec.readiness = Probe {
        period: Some(Duration::from_millis(50)),
        failure_threshold: 2,
        ..Probe::exec(strings(&["test", "-f", &flag.display().to_string()]))
    };
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "ready", ready(&key, 1)).await;
    std::fs::remove_file(&flag).unwrap();
    let snap = wait_for(&mut rx, "not ready", |s| {
        s.revision(&key).is_some_and(|r| {
            r.instances
                .first()
                .is_some_and(|i| i.state == InstanceState::NotReady)
        })
    })
    .await;
    let rev = snap.revision(&key).unwrap();
    assert_eq!(rev.ready_count(), 0);
    assert!(
        rev.instances[0].ready_at.is_some(),
        "ready_at keeps the first readiness"
    );
    std::fs::write(&flag, "").unwrap();
    wait_for(&mut rx, "ready again", ready(&key, 1)).await;
    let lines = rt
        .logs(&LogQuery::revision("default", "flap-00001"))
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sluice not ready: exec probe test")),
        "{lines:#?}"
    );
}

/// Not an assertion (timings flake on a shared machine): prints how long after the app started
/// listening the runtime marked it ready. Run with
/// `cargo test -p sluice-runtime --test processes cold_start -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn cold_start_overhead_report() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let listen_py = "import socket, os, time\n\
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(16)\n\
        open(os.environ['OUT'], 'w').write(repr(time.time()))\n\
        time.sleep(600)\n";
    for round in 0..10 {
        let rev = format!("cold-{round:05}");
        let key = RevisionKey::new("default", rev.as_str());
        let out = dir.path().join(format!("{rev}.t"));
        let mut spec = LaunchSpec::new(
            strings(&["python3", "-c", listen_py]),
            "cold",
            "cold",
            rev.as_str(),
        );
        spec.env = vec![("OUT".into(), out.display().to_string())];
        rt.set_revision(key.clone(), spec).unwrap();
        let called = std::time::SystemTime::now();
        rt.scale(&key, 1).unwrap();
        let mut rx = rt.subscribe();
        let snap = wait_for(&mut rx, "ready", ready(&key, 1)).await;
        let inst = &snap.revision(&key).unwrap().instances[0];
        let ready_wall = inst.spawned_at_wall + (inst.ready_at.unwrap() - inst.spawned_at);
        let listened: f64 = wait_file(&out).await.parse().unwrap();
        let ready_s = ready_wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let spawn_s = inst
            .spawned_at_wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let called_s = called
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        println!(
            "scale->spawn {:.2} ms, spawn->listen (app) {:.2} ms, listen->ready (probe) {:.2} ms",
            (spawn_s - called_s) * 1e3,
            (listened - spawn_s) * 1e3,
            (ready_s - listened) * 1e3
        );
        rt.remove_revision(&key).unwrap();
    }
}

/// A second Ctrl-C: `kill_now` ends a shutdown that waits on an instance ignoring SIGTERM, long before
/// its grace period, and the snapshot said when SIGKILL was due.
#[tokio::test]
async fn kill_now_ends_a_shutdown_waiting_on_an_ignored_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let rt = std::sync::Arc::new(runtime(dir.path()));
    let key = RevisionKey::new("default", "deaf-00001");
    let armed = dir.path().join("armed");
    let script = format!(
        "trap '' TERM; touch {}; while true; do sleep 0.05; done",
        armed.display()
    );
    let mut spec = trapping_spec("deaf-00001", &script, &armed);
    spec.grace_period = Duration::from_secs(600);
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "ready", ready(&key, 1)).await;
    let pid = snap.revision(&key).unwrap().instances[0].pid.unwrap();
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn({
        let rt = rt.clone();
        async move { rt.shutdown().await }
    });
    let snap = wait_for(&mut rx, "terminating", |s| {
        s.revision(&key).is_some_and(|r| {
            r.instances
                .iter()
                .any(|i| i.state == InstanceState::Terminating)
        })
    })
    .await;
    let kill_at = snap.revision(&key).unwrap().instances[0]
        .kill_at
        .expect("a terminating instance says when SIGKILL is due");
    assert!(kill_at > started + Duration::from_secs(500), "{kill_at:?}");
    rt.kill_now();
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown returns once the instance is killed")
        .unwrap();
    wait_dead(pid).await;
}

/// Every instance carries its state dir as owner; `reap_leftovers` kills the processes marked with an
/// owner and the members of their groups (even one that cleared its environment), and nothing else.
#[tokio::test]
async fn leftovers_of_a_state_dir_are_reaped_with_their_groups() {
    use sluice_runtime::leftovers::{OWNER_ENV, reap_leftovers};
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "owned-00001");
    rt.set_revision(key.clone(), sh_spec("owned-00001", "sleep 1000"))
        .unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "ready", ready(&key, 1)).await;
    let pid = snap.revision(&key).unwrap().instances[0].pid.unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let owner = std::fs::canonicalize(dir.path().join("state")).unwrap();
    let expected = format!("{OWNER_ENV}={}", owner.display());
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == expected.as_bytes()),
        "instance env lacks {expected}"
    );

    // "Left by an earlier run": a marked process in a group of its own, with a child that cleared its
    // environment, and an unmarked process beside them.
    let left_owner = dir.path().join("earlier-state").display().to_string();
    let pids = dir.path().join("pids");
    let mut leftover = std::process::Command::new("sh");
    leftover
        .arg("-c")
        .arg(format!(
            "env -i sleep 1000 & echo $! > {}; touch {}.done; wait",
            pids.display(),
            pids.display()
        ))
        .env(OWNER_ENV, &left_owner)
        .stdin(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut leftover, 0);
    let mut leftover = leftover.spawn().unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let done = std::path::PathBuf::from(format!("{}.done", pids.display()));
    wait_file_exists(&done).await;
    let child: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let reaped = tokio::task::spawn_blocking(move || reap_leftovers(&left_owner, WAIT))
        .await
        .unwrap()
        .unwrap();
    let mut reaped: Vec<u32> = reaped.iter().map(|p| p.pid as u32).collect();
    reaped.sort();
    let mut want = vec![leftover.id(), child];
    want.sort();
    assert_eq!(reaped, want);
    leftover.wait().unwrap();
    wait_dead(child).await;
    assert!(alive(pid), "this runtime's own instance is not a leftover");
    assert!(bystander.try_wait().unwrap().is_none(), "bystander killed");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

async fn wait_file_exists(path: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let alive_flag = dir.path().join("alive");
    std::fs::write(&alive_flag, "").unwrap();
    let key = RevisionKey::new("default", "live-00001");
    let mut spec = sh_spec("live-00001", "exec sleep 600");
    spec.liveness = Some(Probe {
        period: Some(Duration::from_millis(100)),
        failure_threshold: 2,
        ..Probe::exec(strings(&["test", "-f", &alive_flag.display().to_string()]))
    });
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let first = wait_for(&mut rx, "ready", ready(&key, 1)).await;
    let first_pid = first.revision(&key).unwrap().instances[0].pid;
    std::fs::remove_file(&alive_flag).unwrap();
    let after = wait_for(&mut rx, "a restart counted", |s| {
        s.revision(&key).is_some_and(|r| r.restarts >= 1)
    })
    .await;
    let rev = after.revision(&key).unwrap();
    assert!(
        rev.last_exit
            .as_deref()
            .is_some_and(|e| e.starts_with("liveness probe failed")),
        "{:?}",
        rev.last_exit
    );
    std::fs::write(&alive_flag, "").unwrap();
    let back = wait_for(&mut rx, "a replacement ready", ready(&key, 1)).await;
    assert_ne!(back.revision(&key).unwrap().instances[0].pid, first_pid);
}

#[tokio::test]
async fn a_startup_probe_holds_readiness_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let started = dir.path().join("started");
    let key = RevisionKey::new("default", "startup-00001");
    let mut spec = sh_spec("startup-00001", "exec sleep 600");
    spec.startup = Some(Probe {
        period: Some(Duration::from_millis(50)),
        failure_threshold: 10_000,
        ..Probe::exec(strings(&["test", "-f", &started.display().to_string()]))
    });
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    wait_for(&mut rx, "an instance", |s| {
        s.revision(&key).is_some_and(|r| r.instances.len() == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rt.snapshot().revision(&key).unwrap().ready_count(), 0);
    std::fs::write(&started, "").unwrap();
    wait_for(&mut rx, "ready once started", ready(&key, 1)).await;
    let logs = rt
        .logs(&LogQuery::revision("default", "startup-00001"))
        .unwrap();
    assert!(
        logs.iter().any(|l| l.ends_with("startup probe succeeded")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_startup_probe_that_keeps_failing_restarts_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "nostart-00001");
    let mut spec = sh_spec("nostart-00001", "exec sleep 600");
    spec.startup = Some(Probe {
        period: Some(Duration::from_millis(20)),
        failure_threshold: 3,
        ..Probe::exec(strings(&["false"]))
    });
    rt.set_revision(key.clone(), spec).unwrap();
    rt.scale(&key, 1).unwrap();
    let mut rx = rt.subscribe();
    let s = wait_for(&mut rx, "a restart", |s| {
        s.revision(&key).is_some_and(|r| r.restarts >= 1)
    })
    .await;
    let last = s.revision(&key).unwrap().last_exit.clone().unwrap();
    assert!(last.starts_with("startup probe failed"), "{last}");
}

#[tokio::test]
async fn an_image_only_revision_needs_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let key = RevisionKey::new("default", "img-00001");
    let mut spec = LaunchSpec::new(vec![], "img", "img", "img-00001");
    spec.image = Some(sluice_runtime::ImageSpec {
        reference: "example/app:v1".into(),
        pull_policy: sluice_runtime::PullPolicy::IfNotPresent,
        pinned: None,
    });
    let err = rt.set_revision(key.clone(), spec.clone()).unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidSpec { .. }), "{err}");
    assert!(
        err.to_string().contains("start a container engine"),
        "{err}"
    );
    // With a command it runs as a local process (the image is ignored).
    spec.command = strings(&["sleep", "600"]);
    spec.readiness = Probe::exec(strings(&["true"]));
    rt.set_revision(key.clone(), spec.clone()).unwrap();
    // Sidecars need an engine.
    let key2 = RevisionKey::new("default", "img-00002");
    spec.revision = "img-00002".into();
    spec.sidecars = vec![sluice_runtime::SidecarSpec {
        name: "side".into(),
        image: spec.image.clone().unwrap(),
        command: vec![],
        args: vec![],
        env: vec![],
        working_dir: None,
        readiness: None,
        liveness: None,
        startup: None,
        resources: Default::default(),
        mounts: vec![],
        security: Default::default(),
    }];
    let err = rt.set_revision(key2, spec).unwrap_err();
    assert!(err.to_string().contains("sidecars"), "{err}");
}
