//! The rest of `sluice up`'s contract, beyond the conformance cases: `sluice status` (table and JSON),
//! file errors reported with their origin, deletes applied while running, and a clean stop (Envoy too)
//! on SIGTERM and SIGINT.

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use sluice_e2e::yaml::{Ingress, Path, Rule, SERVICE_PORT, Split};
use sluice_e2e::{EchoServer, Req, Sluice};

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
