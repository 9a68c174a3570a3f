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

fn render_table(report: &serde_json::Value) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".to_string(),
        "READY".to_string(),
        "REASON".to_string(),
        "HOSTS".to_string(),
    ]];
    for ing in report["ingresses"].as_array().into_iter().flatten() {
        let ready = condition(ing, "Ready");
        let hosts: Vec<&str> = ing["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["hosts"].as_array().into_iter().flatten())
            .filter_map(|h| h.as_str())
            .collect();
        let reason = ready
            .map(|c| {
                let r = c["reason"].as_str().unwrap_or_default();
                let m = c["message"].as_str().unwrap_or_default();
                if m.is_empty() {
                    r.to_string()
                } else {
                    format!("{r}: {m}")
                }
            })
            .unwrap_or_default();
        rows.push([
            ing["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ing["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ready
                .and_then(|c| c["status"].as_str())
                .unwrap_or("Unknown")
                .to_string(),
            reason,
            hosts.join(","),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let envoy = &report["envoy"];
    out.push_str(&format!(
        "\nEnvoy: serving generation {}, acked {}\n",
        envoy["generation"], envoy["ackedGeneration"]
    ));
    if let Some(nack) = envoy["lastNack"].as_str() {
        out.push_str(&format!(
            "Envoy rejected the newest configuration: {nack}\n"
        ));
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
    }
}
