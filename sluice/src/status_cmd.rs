//! `sluice status`: asks a running `sluice up` (its control API) what it serves.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The control port of the `sluice up` to ask.
    #[arg(long, default_value_t = crate::up::DEFAULT_CONTROL_PORT, env = "SLUICE_CONTROL_PORT")]
    control_port: u16,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.control_port);
    let (code, body) = crate::http::get(addr, "/status").await.with_context(|| {
        format!(
            "no `sluice up` answers on control port {}; is it running?",
            args.control_port
        )
    })?;
    if code != 200 {
        bail!("control API at {addr} answered {code}");
    }
    let report: serde_json::Value = serde_json::from_slice(&body).context("control API answer")?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", render_table(&report)),
    }
    Ok(())
}

fn condition<'a>(ingress: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    ingress["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// `reason: message` of a condition, or just the reason.
fn reason_of(c: Option<&serde_json::Value>) -> String {
    c.map(|c| {
        let r = c["reason"].as_str().unwrap_or_default();
        let m = c["message"].as_str().unwrap_or_default();
        if m.is_empty() {
            r.to_string()
        } else {
            format!("{r}: {m}")
        }
    })
    .unwrap_or_default()
}

/// The REASON column, as `kn` shows it: the Ready condition's reason, or, when Ready only says it is
/// not ready (no reason, or the generic `NotReady`), the reason of the first condition that is not
/// True (a Trigger's `BrokerReady: BrokerDoesNotExist`), so the table says what to fix.
fn ready_reason(object: &serde_json::Value) -> String {
    let ready = condition(object, "Ready");
    let generic = ready.is_none_or(|c| {
        let reason = c["reason"].as_str().unwrap_or_default();
        c["status"] != "True" && (reason.is_empty() || reason == "NotReady")
    });
    if generic && ready.is_some_and(|c| c["status"] != "True") {
        let failing = object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["type"] != "Ready" && c["status"] != "True")
            // False (a definite problem) before Unknown (still in progress).
            .min_by_key(|c| c["status"] != "False");
        if let Some(c) = failing {
            return reason_of(Some(c));
        }
    }
    reason_of(ready)
}

fn ready_of(c: Option<&serde_json::Value>) -> String {
    c.and_then(|c| c["status"].as_str())
        .unwrap_or("Unknown")
        .to_string()
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn render_table(report: &serde_json::Value) -> String {
    let mut out = String::new();
    let services = report["services"].as_array().cloned().unwrap_or_default();
    if !services.is_empty() {
        let mut rows = vec![header(&[
            "SERVICE", "URL", "READY", "REASON", "LATEST", "TRAFFIC",
        ])];
        for svc in &services {
            let ready = condition(svc, "Ready");
            let traffic: Vec<String> = svc["status"]["traffic"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let tag = t["tag"]
                        .as_str()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default();
                    format!("{}%{} {}", t["percent"], tag, str_of(&t["revisionName"]))
                })
                .collect();
            rows.push(vec![
                format!(
                    "{}/{}",
                    str_of(&svc["metadata"]["namespace"]),
                    str_of(&svc["metadata"]["name"])
                ),
                str_of(&svc["status"]["url"]),
                ready_of(ready),
                ready_reason(svc),
                str_of(&svc["status"]["latestReadyRevisionName"]),
                traffic.join(", "),
            ]);
        }
        out.push_str(&table(&rows));
        out.push('\n');
    }
    let revisions = report["revisions"].as_array().cloned().unwrap_or_default();
    if !revisions.is_empty() {
        let mut rows = vec![header(&[
            "REVISION",
            "READY",
            "REASON",
            "DESIRED",
            "READY-INSTANCES",
            "RESTARTS",
            "PATH",
        ])];
        for rev in &revisions {
            let ready = condition(rev, "Ready");
            rows.push(vec![
                format!(
                    "{}/{}",
                    str_of(&rev["metadata"]["namespace"]),
                    str_of(&rev["metadata"]["name"])
                ),
                ready_of(ready),
                ready_reason(rev),
                rev["desiredInstances"].to_string(),
                rev["readyInstances"].to_string(),
                rev["restarts"].as_u64().unwrap_or_default().to_string(),
                if rev["mode"] == "Serve" {
                    "instances".to_string()
                } else {
                    "activator".to_string()
                },
            ]);
        }
        out.push_str(&table(&rows));
        out.push('\n');
    }
    for (list, title) in [
        ("brokers", "BROKER"),
        ("triggers", "TRIGGER"),
        ("pingsources", "PINGSOURCE"),
    ] {
        let objects = report[list].as_array().cloned().unwrap_or_default();
        if objects.is_empty() {
            continue;
        }
        let mut rows = vec![header(&[title, "READY", "REASON", "ADDRESS / SINK"])];
        for o in &objects {
            let ready = condition(o, "Ready");
            let target = [
                &o["status"]["address"]["url"],
                &o["status"]["subscriberUri"],
                &o["status"]["sinkUri"],
            ]
            .into_iter()
            .find_map(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
            rows.push(vec![
                format!(
                    "{}/{}",
                    str_of(&o["metadata"]["namespace"]),
                    str_of(&o["metadata"]["name"])
                ),
                ready_of(ready),
                ready_reason(o),
                target,
            ]);
        }
        out.push_str(&table(&rows));
        out.push('\n');
    }
    let mut rows = vec![header(&["NAMESPACE", "NAME", "READY", "REASON", "HOSTS"])];
    for ing in report["ingresses"].as_array().into_iter().flatten() {
        let ready = condition(ing, "Ready");
        let hosts: Vec<&str> = ing["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["hosts"].as_array().into_iter().flatten())
            .filter_map(|h| h.as_str())
            .collect();
        rows.push(vec![
            str_of(&ing["metadata"]["namespace"]),
            str_of(&ing["metadata"]["name"]),
            ready_of(ready),
            ready_reason(ing),
            hosts.join(","),
        ]);
    }
    out.push_str(&table(&rows));
    let envoy = &report["envoy"];
    out.push_str(&format!(
        "\nEnvoy: serving generation {}, acked {}\n",
        envoy["generation"], envoy["ackedGeneration"]
    ));
    if let Some(kind) = report["runtime"]["kind"].as_str() {
        out.push_str(&format!(
            "Runtime: {kind} ({})\n",
            str_of(&report["runtime"]["reason"])
        ));
    }
    if let Some(form) = report["queueProxy"]["form"].as_str() {
        out.push_str(&format!(
            "Queue-proxy: {form} ({})\n",
            str_of(&report["queueProxy"]["path"])
        ));
    }
    if let Some(nack) = envoy["lastNack"].as_str() {
        out.push_str(&format!(
            "Envoy rejected the newest configuration: {nack}\n"
        ));
    }
    if report["leading"] == false {
        out.push_str(
            "This xds-server replica does not hold the leader Lease: another one writes status.\n",
        );
    }
    let gateways = report["gateways"].as_array().cloned().unwrap_or_default();
    if !gateways.is_empty() {
        let mut rows = vec![header(&[
            "GATEWAY", "PEER", "STATE", "ACKED", "COUNTED", "MESSAGE",
        ])];
        for g in &gateways {
            rows.push(vec![
                str_of(&g["node"]),
                str_of(&g["peer"]),
                str_of(&g["state"]),
                g["ackedGeneration"]
                    .as_u64()
                    .map_or("-".to_string(), |g| g.to_string()),
                if g["counted"] == true { "yes" } else { "no" }.to_string(),
                str_of(&g["message"]),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let warnings: Vec<String> = revisions
        .iter()
        .flat_map(|rev| {
            let name = format!(
                "{}/{}",
                str_of(&rev["metadata"]["namespace"]),
                str_of(&rev["metadata"]["name"])
            );
            rev["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |w| format!("  Revision {name}: {}", str_of(w)))
        })
        .collect();
    if !warnings.is_empty() {
        out.push_str("\nNot honoured locally:\n");
        for w in warnings {
            out.push_str(&w);
            out.push('\n');
        }
    }
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    if !errors.is_empty() {
        out.push_str("\nProblems:\n");
        for e in errors {
            out.push_str(&format!(
                "  {}: {}\n",
                e["origin"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_each_gateway_and_which_ones_ingresses_wait_for() {
        let report = serde_json::json!({
            "ingresses": [],
            "envoy": {"generation": 4, "ackedGeneration": 4},
            "leading": true,
            "gateways": [
                {"node": "gw-a", "peer": "10.0.0.1:41000", "state": "Serving", "ackedGeneration": 4, "counted": true, "message": ""},
                {"node": "gw-b", "peer": "10.0.0.2:41000", "state": "NotAcking", "ackedGeneration": null, "counted": false,
                 "message": "has not applied the newest configuration for 31s: not counted for readiness until it does"},
            ],
        });
        let out = render_table(&report);
        assert!(out.contains("GATEWAY  PEER"), "{out}");
        let line = out.lines().find(|l| l.starts_with("gw-b")).expect(&out);
        for want in ["10.0.0.2:41000", "NotAcking", " -  ", " no ", "not counted"] {
            assert!(line.contains(want), "{want:?} in {line:?}");
        }
        assert!(!out.contains("does not hold the leader Lease"));
        let follower = serde_json::json!({"ingresses": [], "envoy": {}, "leading": false});
        assert!(render_table(&follower).contains("does not hold the leader Lease"));
    }

    #[test]
    fn table_shows_ready_reason_hosts_and_problems() {
        let report = serde_json::json!({
            "ingresses": [{
                "metadata": {"namespace": "default", "name": "hello"},
                "spec": {"rules": [{"hosts": ["a.example", "b.example"]}]},
                "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "DomainConflict", "message": "host a.example is taken"}]}
            }],
            "errors": [{"origin": "x.yaml (document 2)", "message": "spec.rules: bad"}],
            "envoy": {"generation": 3, "ackedGeneration": 3}
        });
        let t = render_table(&report);
        assert!(t.contains("default    hello  False  DomainConflict: host a.example is taken  a.example,b.example"), "{t}");
        assert!(t.contains("x.yaml (document 2): spec.rules: bad"), "{t}");
        assert!(!t.contains("SERVICE"), "{t}");
    }

    #[test]
    fn a_trigger_without_its_broker_shows_why_it_is_not_ready() {
        let report = serde_json::json!({
            "triggers": [{
                "metadata": {"namespace": "default", "name": "orphan"},
                "status": {"conditions": [
                    {"type": "BrokerReady", "status": "False", "reason": "BrokerDoesNotExist",
                     "message": "Broker default/missing does not exist or is not ready"},
                    {"type": "Ready", "status": "False", "reason": "NotReady"},
                    {"type": "SubscriberResolved", "status": "True"}
                ]}
            }, {
                "metadata": {"namespace": "default", "name": "fine"},
                "status": {"subscriberUri": "http://s", "conditions": [{"type": "Ready", "status": "True"}]}
            }],
            "ingresses": [], "errors": [], "envoy": {"generation": 1, "ackedGeneration": 1}
        });
        let t = render_table(&report);
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("default/{name} ")))
                .unwrap_or_else(|| panic!("no row for {name}:\n{t}"))
                .split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
        };
        assert!(t.contains("TRIGGER"), "{t}");
        assert_eq!(
            row("orphan"),
            [
                "default/orphan",
                "False",
                "BrokerDoesNotExist: Broker default/missing does not exist or is not ready"
            ]
        );
        assert_eq!(row("fine"), ["default/fine", "True", "http://s"]);
    }

    #[test]
    fn table_shows_services_and_revisions_when_there_are_some() {
        let report = serde_json::json!({
            "services": [{
                "metadata": {"namespace": "default", "name": "hello"},
                "status": {"url": "http://hello.default.localhost", "latestReadyRevisionName": "hello-00002",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "traffic": [{"revisionName": "hello-00001", "percent": 80}, {"revisionName": "hello-00002", "percent": 20, "tag": "canary"}]}
            }],
            "revisions": [{
                "metadata": {"namespace": "default", "name": "hello-00001"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                "desiredInstances": 1, "readyInstances": 1, "mode": "Serve", "restarts": 2,
                "warnings": ["spec.containers[0].resources.requests: not reserved locally"]
            }],
            "runtime": {"kind": "container", "reason": "a container engine answers"},
            "queueProxy": {"form": "native", "path": "/x/libsluice_queue_proxy_native.so"},
            "ingresses": [], "errors": [], "envoy": {"generation": 1, "ackedGeneration": 1}
        });
        let t = render_table(&report);
        assert!(
            t.contains("Queue-proxy: native (/x/libsluice_queue_proxy_native.so)"),
            "{t}"
        );
        assert!(
            t.contains("default/hello  http://hello.default.localhost  True"),
            "{t}"
        );
        assert!(
            t.contains("80% hello-00001, 20% (canary) hello-00002"),
            "{t}"
        );
        assert!(t.contains("default/hello-00001  True"), "{t}");
        assert!(t.contains("RESTARTS"), "{t}");
        assert!(t.contains("1                2         instances"), "{t}");
        assert!(
            t.contains("Runtime: container (a container engine answers)"),
            "{t}"
        );
        assert!(
            t.contains("Revision default/hello-00001: spec.containers[0].resources.requests"),
            "{t}"
        );
    }
}
