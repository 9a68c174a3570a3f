//! The rest of `sluice up`'s contract, beyond the conformance cases: `sluice status` (table and JSON),
//! file errors reported with their origin, a broken file that keeps its objects serving, deletes
//! applied while running, a clean stop (Envoy too) on SIGTERM and SIGINT, and its process lifecycle:
//! nothing outlives a killed `sluice up` (or the next run reaps it), one run per state dir, a
//! supervised Envoy, and a second Ctrl-C that kills at once.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use sluice_e2e::knative::KnativeService;
use sluice_e2e::process::{alive, children_named};
use sluice_e2e::yaml::{Ingress, Path, Rule, SERVICE_PORT, Split};
use sluice_e2e::{EchoServer, Req, Sluice, StartOptions};

const NS: &str = "serving-tests";
const READY: Duration = Duration::from_secs(60);

async fn serve(sluice: &mut Sluice, name: &str) -> EchoServer {
    let echo = EchoServer::start(name).await.expect("echo backend");
    sluice
        .apply_backend(NS, name, "http", echo.port())
        .expect("backend objects");
    let host = format!("{name}.example.com");
    let ingress = Ingress::new(NS, name)
        .rule(Rule::external(&[&host]).path(Path::any().split(Split::to(name, SERVICE_PORT))));
    sluice.apply_ingress(&ingress).expect("writing the Ingress");
    sluice
        .wait_ready(NS, name, READY)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    echo
}

fn sluice_status(sluice: &Sluice, args: &[&str]) -> String {
    let bin = sluice_e2e::sluice::sluice_bin().expect("sluice binary");
    let out = Command::new(bin)
        .arg("status")
        .args(["--control-port", &sluice.ports.control.to_string()])
        .args(args)
        .output()
        .expect("running sluice status");
    assert!(
        out.status.success(),
        "sluice status {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `sluice status` shows the Ingresses with their Ready condition (table and `-o json`), and a broken
/// file is reported in `errors` with the file as its origin while the rest keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_ingresses_and_file_errors() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    let _echo = serve(&mut sluice, "status-cli").await;
    sluice
        .write("broken.yaml", "apiVersion: v1\nkind: [unclosed\n")
        .expect("writing a broken file");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = sluice.status().await.expect("GET /status");
        let reported = status["errors"].as_array().into_iter().flatten().any(|e| {
            e["origin"]
                .as_str()
                .is_some_and(|o| o.contains("broken.yaml"))
                && e["message"].is_string()
        });
        if reported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broken.yaml is not reported: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let echo = Req::get("status-cli.example.com", "")
        .send(sluice.external())
        .await
        .expect("request");
    assert_eq!(echo.echo().expect("still served").name, "status-cli");

    let json: Value =
        serde_json::from_str(&sluice_status(&sluice, &["-o", "json"])).expect("JSON output");
    let ing = sluice_e2e::sluice::find_ingress(&json, NS, "status-cli").expect("listed");
    assert!(sluice_e2e::sluice::is_ready(ing), "{ing}");
    assert!(json["envoy"].is_object(), "{json}");
    let table = sluice_status(&sluice, &[]);
    let row = table
        .lines()
        .find(|l| l.contains("status-cli"))
        .unwrap_or_else(|| panic!("no row in:\n{table}"));
    assert!(row.contains("True"), "Ready column: {row}");
}

/// Deleting an Ingress's file while running stops serving its host and drops it from the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_ingress_file_stops_serving_it() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    let echo = serve(&mut sluice, "deleted").await;
    sluice
        .remove(&format!("ingress-{NS}-deleted.yaml"))
        .expect("removing the Ingress file");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = Req::get("deleted.example.com", "")
            .send(sluice.external())
            .await
            .expect("request");
        let listed = sluice
            .ingress(NS, "deleted")
            .await
            .expect("GET /status")
            .is_some();
        if resp.status == StatusCode::NOT_FOUND && !listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still served ({}) or listed ({listed}) after the delete",
            resp.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = echo.requests();
    Req::get("deleted.example.com", "")
        .send(sluice.external())
        .await
        .expect("request");
    assert_eq!(echo.requests(), before, "the backend is no longer reached");
}

/// SIGTERM and SIGINT stop `sluice up` with exit code 0, and its Envoy with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_cleanly_with_its_envoy() {
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut sluice = Sluice::start().await.expect("sluice up");
        let _echo = serve(&mut sluice, "stopping").await;
        let admin = sluice.admin();
        assert!(
            std::net::TcpStream::connect(admin).is_ok(),
            "Envoy's admin port answers while running"
        );

        let status = sluice
            .terminate(signal, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("sluice up still running 15 s after {name}"));
        assert!(status.success(), "exit after {name}: {status}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::net::TcpStream::connect(admin).is_ok() {
            assert!(
                Instant::now() < deadline,
                "Envoy still answers after sluice up exited on {name}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const APP: &str = env!("CARGO_BIN_EXE_sluice-test-app");

/// A Knative Service running the test app.
fn knative_service(name: &str) -> String {
    KnativeService::new(name, &[APP])
        .image("sluice-test-app")
        .env("APP_VERSION", "1")
        .yaml()
}

/// GET on a Knative Service's host; (status, body).
async fn knative_get(
    sluice: &Sluice,
    host: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, String)> {
    let resp = Req::get(host, path)
        .timeout(Duration::from_secs(30))
        .send(sluice.external())
        .await?;
    Ok((resp.status, resp.text()))
}

/// Waits until `sluice status -o json` lists a file error whose origin satisfies `pred`
/// (`want = true`), or none does (`want = false`); returns the errors seen last.
async fn wait_file_error(
    sluice: &Sluice,
    what: &str,
    want: bool,
    pred: impl Fn(&str) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let json: Value =
            serde_json::from_str(&sluice_status(sluice, &["-o", "json"])).expect("JSON output");
        let errors = json["errors"].as_array().cloned().unwrap_or_default();
        let found = errors
            .iter()
            .any(|e| e["origin"].as_str().is_some_and(&pred));
        if found == want {
            return errors;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {errors:?}\nlog:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `pred` holds on `sluice status -o json`.
async fn wait_service_condition(sluice: &Sluice, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let json: Value =
            serde_json::from_str(&sluice_status(sluice, &["-o", "json"])).expect("JSON output");
        if pred(&json) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {json}\nlog:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 12, item 2: with requests flowing, a running Service's file gets a bad line appended, then
/// is truncated half-way (both in place, as an editor saves): every request keeps succeeding from the
/// same app process, `sluice status` names the file and line, and fixing the file clears the error.
/// Then a spec that parses but is invalid: the last valid version keeps serving and the Service's
/// Ready condition says why (Knative's webhook would have refused the update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_its_service_serving() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    let name = "keep";
    let host = "keep.default.localhost";
    let good = knative_service(name);
    sluice
        .write("svc.yaml", &good)
        .expect("writing the Service");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        sluice.check_alive().expect("sluice up is running");
        if let Ok((StatusCode::OK, _)) = knative_get(&sluice, host, "/").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Service never answered; log:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, pid) = knative_get(&sluice, host, "/pid").await.expect("GET /pid");

    // Requests flow for the whole test; every answer must be the app's 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let external = sluice.external();
    let traffic = tokio::spawn({
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let resp = Req::get(host, "/")
                    .timeout(Duration::from_secs(30))
                    .send(external)
                    .await;
                match resp {
                    Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        failures.push(format!("{:?}", other.map(|r| r.status)));
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
            failures
        }
    });
    let path = sluice.config_dir().join("svc.yaml");
    let svc_yaml = |origin: &str| origin.contains("svc.yaml:");

    // 1. A bad line appended in place.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"  bad: [\n"))
        .expect("appending a bad line");
    let errors = wait_file_error(&sluice, "the appended line reported", true, svc_yaml).await;
    let lines = good.lines().count();
    let reported = errors
        .iter()
        .filter_map(|e| e["origin"].as_str()?.rsplit_once("svc.yaml:"))
        .filter_map(|(_, line)| line.parse::<usize>().ok())
        .collect::<Vec<_>>();
    assert!(
        reported.iter().any(|l| *l > lines),
        "the error names a line past the good part ({lines}): {errors:?}"
    );
    let table = sluice_status(&sluice, &[]);
    assert!(
        table.contains("svc.yaml:"),
        "table names the file:\n{table}"
    );
    sluice.write("svc.yaml", &good).expect("fixing the file");
    wait_file_error(&sluice, "the error cleared", false, svc_yaml).await;

    // 2. Truncated half-way (inside the command's quoted path), in place.
    let cut = good.find("command: [").expect("command line") + "command: [\"".len() + 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(cut as u64))
        .expect("truncating the file");
    wait_file_error(&sluice, "the truncated file reported", true, svc_yaml).await;
    let table = sluice_status(&sluice, &[]);
    assert!(
        table.contains("svc.yaml:"),
        "table names the file:\n{table}"
    );
    sluice.write("svc.yaml", &good).expect("fixing the file");
    wait_file_error(&sluice, "the error cleared", false, svc_yaml).await;

    // 3. Parses, but fails validation: the last valid version keeps serving, the Service says why.
    let invalid = good.replace(
        "    spec:\n      containers:",
        "    spec:\n      containerConcurrency: 5000\n      containers:",
    );
    assert_ne!(invalid, good);
    sluice
        .write("svc.yaml", &invalid)
        .expect("writing an invalid spec");
    let ready_message = |json: &Value| {
        json["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["metadata"]["name"] == name)
            .and_then(|s| sluice_e2e::sluice::condition(s, "Ready"))
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    wait_service_condition(&sluice, "the invalid spec reported", |json| {
        ready_message(json).is_some_and(|(_, m)| m.contains("containerConcurrency"))
    })
    .await;
    sluice.write("svc.yaml", &good).expect("fixing the file");
    wait_service_condition(&sluice, "the Service Ready again", |json| {
        ready_message(json).is_some_and(|(s, _)| s == "True")
    })
    .await;

    // A little more traffic after the fix, then count.
    let after = ok.load(Ordering::SeqCst) + 20;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok.load(Ordering::SeqCst) < after && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let failures = traffic.await.expect("traffic task");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failed.load(Ordering::SeqCst),
        ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst)
    );
    assert!(ok.load(Ordering::SeqCst) >= 20, "requests kept flowing");
    let (_, pid_after) = knative_get(&sluice, host, "/pid").await.expect("GET /pid");
    assert_eq!(pid_after, pid, "the same app process kept serving");
}

/// Issue 12, item 11: a second file defining a running Service's name does not replace it; the
/// newcomer is reported with its file and line, naming the file that holds the Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_with_a_running_services_name_does_not_replace_it() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    let host = "dup.default.localhost";
    let first = knative_service("dup");
    sluice.write("b.yaml", &first).expect("writing the Service");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        sluice.check_alive().expect("sluice up is running");
        if let Ok((StatusCode::OK, _)) = knative_get(&sluice, host, "/").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Service never answered; log:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, pid) = knative_get(&sluice, host, "/pid").await.expect("GET /pid");
    // a.yaml sorts first: before the fix it took the Service over.
    let newcomer = first.replace("value: \"1\"", "value: \"2\"");
    assert_ne!(newcomer, first);
    sluice
        .write("a.yaml", &newcomer)
        .expect("writing the newcomer");
    let errors = wait_file_error(&sluice, "the newcomer reported", true, |o| {
        o.contains("a.yaml:1")
    })
    .await;
    assert!(
        errors.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("already defined in") && m.contains("b.yaml:1"))),
        "{errors:?}"
    );
    for _ in 0..20 {
        let (code, body) = knative_get(&sluice, host, "/").await.expect("GET");
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body, "hello from dup-00001\n");
    }
    let json: Value =
        serde_json::from_str(&sluice_status(&sluice, &["-o", "json"])).expect("JSON output");
    let revisions: Vec<&str> = json["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    assert_eq!(revisions, ["dup-00001"], "no revision from the newcomer");
    let (_, pid_after) = knative_get(&sluice, host, "/pid").await.expect("GET /pid");
    assert_eq!(pid_after, pid, "the same app process kept serving");
}

/// Generous: these tests run beside other engineers' builds on two cores.
const WAIT: Duration = Duration::from_secs(90);

/// A Knative Service kept at one instance (min-scale 1) running `command`; `spec` is extra YAML under
/// `spec.template.spec` (indented by 6), `container` extra YAML under the container (indented by 8).
fn kservice(name: &str, command: &[&str], spec: &str, container: &str) -> String {
    KnativeService::new(name, command)
        .annotation("autoscaling.knative.dev/min-scale", "1")
        .spec(spec)
        .container(container)
        .yaml()
}

/// Polls `check` until it returns Some, failing with `what` and the sluice log after `timeout`.
async fn wait_until<T>(
    sluice: &Sluice,
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; sluice log:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid of the single instance of `revision`, once it is Ready.
async fn ready_instance_pid(sluice: &mut Sluice, revision: &str) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        sluice.check_alive().expect("sluice up is running");
        let status = sluice.status().await.unwrap_or_default();
        let pid = status["revisions"].as_array().and_then(|revs| {
            let rev = revs.iter().find(|r| r["metadata"]["name"] == revision)?;
            let inst = rev["instances"].as_array()?.first()?;
            (inst["state"] == "Ready").then(|| inst["pid"].as_u64())?
        });
        if let Some(pid) = pid {
            return pid as u32;
        }
        assert!(
            Instant::now() < deadline,
            "revision {revision} has no ready instance; status: {status}\nlog:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `host` through the gateway until it answers 200.
async fn wait_served(sluice: &Sluice, host: &str) {
    wait_until(sluice, &format!("{host} answering 200"), WAIT, async || {
        let resp = Req::get(host, "/")
            .timeout(Duration::from_secs(5))
            .send(sluice.external())
            .await
            .ok()?;
        (resp.status == StatusCode::OK).then_some(())
    })
    .await
}

/// Envoy, the one child of `sluice up` named so.
fn envoy_pid(sluice: &Sluice) -> u32 {
    let found = children_named(sluice.pid(), "envoy");
    assert_eq!(found.len(), 1, "Envoy children of sluice up: {found:?}");
    found[0]
}

async fn wait_dead(sluice: &Sluice, what: &str, pid: u32) {
    wait_until(
        sluice,
        &format!("{what} (pid {pid}) to be gone"),
        WAIT,
        async || (!alive(pid)).then_some(()),
    )
    .await
}

/// kill -9 of `sluice up` takes its app processes and its Envoy with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_no_app_nor_envoy_behind() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    sluice
        .write("orphan.yaml", &kservice("orphan", &[APP], "", ""))
        .expect("writing the Service");
    let app = ready_instance_pid(&mut sluice, "orphan-00001").await;
    wait_served(&sluice, "orphan.default.localhost").await;
    let envoy = envoy_pid(&sluice);

    let status = sluice
        .terminate(libc::SIGKILL, Duration::from_secs(15))
        .expect("sluice up is gone after SIGKILL");
    assert!(!status.success());
    wait_dead(&sluice, "the app", app).await;
    wait_dead(&sluice, "Envoy", envoy).await;
}

/// What a killed run left (here a grandchild of an instance, which the parent-death signal does not
/// reach, and its run folder) is reaped by the next `sluice up` on the same state dir; a second
/// `sluice up` on a state dir in use is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_run_reaps_what_a_killed_run_left_and_runs_are_exclusive() {
    let shared = tempfile::tempdir().expect("temp dir");
    let state_dir = std::fs::canonicalize(shared.path())
        .expect("canonical temp dir")
        .join("state");
    let options = StartOptions {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    };
    let orphan_file = shared.path().join("orphan.pid");
    let script = format!(
        "sleep 1000 & echo $! > {}; exec {APP}",
        orphan_file.display()
    );

    let mut first = Sluice::start_with(options.clone())
        .await
        .expect("first sluice up");
    first
        .write(
            "left.yaml",
            &kservice("left", &["sh", "-c", &script], "", ""),
        )
        .expect("writing the Service");
    let app = ready_instance_pid(&mut first, "left-00001").await;
    let orphan: u32 = std::fs::read_to_string(&orphan_file)
        .expect("the app wrote its child's pid")
        .trim()
        .parse()
        .expect("a pid");
    let first_run_dir = state_dir.join("run").join(first.pid().to_string());
    assert!(first_run_dir.is_dir(), "{}", first_run_dir.display());
    first
        .terminate(libc::SIGKILL, Duration::from_secs(15))
        .expect("the first sluice up is gone after SIGKILL");
    wait_dead(&first, "the first run's app", app).await;
    assert!(
        alive(orphan),
        "precondition: the grandchild outlived its run"
    );

    let mut second = Sluice::start_with(options.clone())
        .await
        .expect("second sluice up on the same state dir");
    wait_dead(&second, "the earlier run's leftover", orphan).await;
    assert!(
        !first_run_dir.exists(),
        "the earlier run's folder {} is still there",
        first_run_dir.display()
    );
    assert!(
        second
            .logs()
            .contains("earlier `sluice up` on this state dir"),
        "the reaping is reported:\n{}",
        second.logs()
    );

    let (status, out) = Sluice::run_to_exit(options, WAIT)
        .await
        .expect("third sluice up");
    let status = status.expect("a second run on a state dir in use exits by itself");
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("is in use by another `sluice up`")
            && out.contains(&format!("pid {}", second.pid())),
        "{out}"
    );
    second
        .check_alive()
        .expect("the running sluice up is untouched");
}

/// Envoy killed under a running Service comes back by itself: the same app process keeps running, the
/// Service answers again (over delta and SotW xDS alike), and `sluice up` keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_envoy_is_restarted_and_serves_again_with_the_same_apps() {
    for protocol in ["delta", "sotw"] {
        let mut sluice = Sluice::start_with(StartOptions {
            args: vec!["--xds-protocol".into(), protocol.into()],
            ..Default::default()
        })
        .await
        .expect("sluice up");
        sluice
            .write("phoenix.yaml", &kservice("phoenix", &[APP], "", ""))
            .expect("writing the Service");
        let app = ready_instance_pid(&mut sluice, "phoenix-00001").await;
        wait_served(&sluice, "phoenix.default.localhost").await;
        let envoy = envoy_pid(&sluice);

        // SAFETY: kill(2) on the Envoy child we just found; no memory is involved.
        unsafe {
            libc::kill(envoy as i32, libc::SIGKILL);
        }
        wait_dead(&sluice, "the killed Envoy", envoy).await;
        wait_until(&sluice, "a new Envoy", WAIT, async || {
            let found = children_named(sluice.pid(), "envoy");
            (found.len() == 1 && found[0] != envoy).then_some(())
        })
        .await;
        wait_served(&sluice, "phoenix.default.localhost").await;
        sluice.check_alive().expect("sluice up keeps running");
        assert!(alive(app), "{protocol}: the app was not touched");
        assert_eq!(
            ready_instance_pid(&mut sluice, "phoenix-00001").await,
            app,
            "{protocol}: the same instance serves"
        );
        let status = sluice.status().await.expect("GET /status");
        assert_eq!(status["gatewayLive"], true, "{protocol}: {status}");
    }
}

/// An Envoy that cannot stay up ends `sluice up` with an error quoting its output and naming its log,
/// which is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_that_cannot_stay_up_ends_sluice_with_its_last_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path = std::fs::canonicalize(dir.path()).expect("canonical temp dir");
    let fake = dir_path.join("envoy");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"fake envoy: cannot start (on purpose)\"\nexit 1\n",
    )
    .expect("writing the fake Envoy");
    let mut perms = std::fs::metadata(&fake).expect("metadata").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&fake, perms).expect("chmod");
    let state_dir = dir_path.join("state");

    let (status, out) = Sluice::run_to_exit(
        StartOptions {
            state_dir: Some(state_dir.clone()),
            envoy: Some(fake),
            ..Default::default()
        },
        WAIT,
    )
    .await
    .expect("sluice up");
    let status = status.unwrap_or_else(|| panic!("sluice up still running:\n{out}"));
    assert!(!status.success(), "{out}");
    let log = state_dir.join("envoy.log");
    let error = out
        .lines()
        .skip_while(|l| !l.starts_with("Error:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        error.contains("fake envoy: cannot start (on purpose)")
            && error.contains(&log.display().to_string()),
        "the error quotes Envoy and names its log:\n{out}"
    );
    let kept = std::fs::read_to_string(&log).expect("the named log exists");
    assert!(
        kept.contains("fake envoy: cannot start (on purpose)"),
        "{kept}"
    );
}

/// Shutdown says what it waits on (an app that ignores SIGTERM, a 30 s grace period), and a second
/// SIGINT kills it and exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_kills_what_shutdown_waits_on() {
    let mut sluice = Sluice::start().await.expect("sluice up");
    let armed = sluice.state_dir().with_file_name("armed");
    let script = format!(
        "trap 'echo TERM ignored' TERM; touch {}; while true; do sleep 0.1; done",
        armed.display()
    );
    let probe = format!(
        "        readinessProbe:\n          exec:\n            command: [\"test\", \"-f\", \"{}\"]\n",
        armed.display()
    );
    sluice
        .write(
            "deaf.yaml",
            &kservice(
                "deaf",
                &["sh", "-c", &script],
                "      timeoutSeconds: 30\n",
                &probe,
            ),
        )
        .expect("writing the Service");
    let app = ready_instance_pid(&mut sluice, "deaf-00001").await;

    let first = Instant::now();
    sluice.signal(libc::SIGINT);
    wait_until(
        &sluice,
        "a log line naming what shutdown waits on",
        WAIT,
        async || {
            let logs = sluice.logs();
            let line = logs
                .lines()
                .find(|l| l.contains("waiting up to") && l.contains("deaf-00001"))?;
            Some(line.to_string())
        },
    )
    .await;
    assert!(alive(app), "the app ignores SIGTERM");
    sluice.signal(libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sluice.check_alive().is_ok() {
        assert!(
            Instant::now() < deadline,
            "sluice up still running 10 s after a second SIGINT; log:\n{}",
            sluice.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        first.elapsed() < Duration::from_secs(25),
        "exited {:?} after the first SIGINT, not well before the 30 s grace period",
        first.elapsed()
    );
    wait_dead(&sluice, "the app", app).await;
}
