//! What the container tests share: a `sluice up --runtime container` whose containers are removed
//! after the test whatever happens ([`Stack`]), a builder for Knative Services that name an image
//! ([`ImageService`]), and waits on `sluice status` and the gateway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::StatusCode;
use serde_json::{Value, json};

use crate::images::{self, EngineLeftovers};
use crate::sluice::{Sluice, StartOptions, is_ready};
use crate::{Req, yaml};

/// Generous: these tests share two cores with other builds, and a container start costs more than
/// a process start.
pub const WAIT: Duration = Duration::from_secs(90);

/// Small autoscaler windows (Knative's minimum stable window), so scale to zero happens within a test.
pub const FAST_AUTOSCALER: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  stable-window: 6s
  scale-to-zero-grace-period: 2s
";

/// A `sluice up --runtime container` on a temp folder and a state dir of its own. Fields drop in
/// order: `sluice up` stops first, then whatever it left on the engine is removed, then the folders.
pub struct Stack {
    pub sluice: Sluice,
    pub leftovers: EngineLeftovers,
    state_dir: PathBuf,
    _state_root: tempfile::TempDir,
}

impl Stack {
    /// Starts `sluice up --runtime container` (plus `args`), with a canonical state dir (the
    /// runtime's `sluice.owner` label names it).
    pub async fn start(args: &[&str]) -> Result<Stack> {
        let state_root = tempfile::Builder::new()
            .prefix("sluice-ctr-state-")
            .tempdir()?;
        let state_dir = std::fs::canonicalize(state_root.path())?.join("state");
        std::fs::create_dir(&state_dir)?;
        let leftovers = EngineLeftovers::new(&state_dir);
        let mut all = vec!["--runtime".to_string(), "container".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let sluice = Sluice::start_with(StartOptions {
            state_dir: Some(state_dir.clone()),
            args: all,
            ..Default::default()
        })
        .await?;
        Ok(Stack {
            sluice,
            leftovers,
            state_dir,
            _state_root: state_root,
        })
    }

    /// The state dir (canonical).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The `sluice.owner` label of this run's containers.
    pub fn owner(&self) -> &str {
        self.leftovers.owner()
    }

    /// Writes `svc` into `<name>.yaml`.
    pub fn apply(&self, svc: &ImageService) -> Result<()> {
        self.sluice
            .write_objects(&format!("{}.yaml", svc.name()), &[svc.to_value()])
    }

    /// Writes objects (ConfigMaps, Secrets...) into `file`.
    pub fn write_objects(&self, file: &str, objects: &[Value]) -> Result<()> {
        self.sluice.write_objects(file, objects)
    }

    /// Polls /status until `pred` holds; fails with the status and the log.
    pub async fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            self.sluice.check_alive()?;
            let status = self.sluice.status().await.unwrap_or_default();
            if pred(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "timed out after {timeout:?} waiting for {what}; status (each object's \
                     conditions):\n{}\nlog (tail):\n{}",
                    summary(&status),
                    tail(&self.sluice.logs(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until Service `name` is Ready with `latest` as its latest ready revision, and its Route
    /// has resolved every traffic target.
    pub async fn wait_service(&mut self, name: &str, latest: &str) -> Result<Value> {
        self.wait_status(&format!("service {name} ready with {latest}"), WAIT, |s| {
            find(s, "services", name).is_some_and(|svc| {
                is_ready(svc)
                    && svc["status"]["latestReadyRevisionName"] == latest
                    && find(s, "routes", name).is_some_and(|r| {
                        is_ready(r)
                            && r["status"]["traffic"]
                                .as_array()
                                .is_some_and(|t| t.iter().all(|t| t["revisionName"].is_string()))
                    })
            })
        })
        .await
    }

    /// GET `path` on `<service>.default.localhost` through the gateway: (status, body).
    pub async fn get(&self, service: &str, path: &str) -> Result<(StatusCode, String)> {
        let resp = Req::get(&host(service), path)
            .timeout(Duration::from_secs(60))
            .send(self.sluice.external())
            .await?;
        Ok((resp.status, resp.text()))
    }

    /// GET that must answer 200: the body.
    pub async fn get_ok(&self, service: &str, path: &str) -> Result<String> {
        let (code, body) = self.get(service, path).await?;
        anyhow::ensure!(
            code == StatusCode::OK,
            "GET {path} on {service} answered {code}: {body}"
        );
        Ok(body)
    }

    /// The app's `/stats` (through the gateway).
    pub async fn stats(&self, service: &str) -> Result<Value> {
        let body = self.get_ok(service, "/stats").await?;
        serde_json::from_str(&body).with_context(|| format!("/stats is not JSON: {body}"))
    }

    /// Waits until `service` answers 200 on `/` through the gateway.
    pub async fn wait_served(&mut self, service: &str) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.sluice.check_alive()?;
            match self.get(service, "/").await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                other if Instant::now() > deadline => anyhow::bail!(
                    "{service} never answered 200 (last: {other:?}); log (tail):\n{}",
                    tail(&self.sluice.logs(), 60)
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Serves `image` as Service `name` with autoscaler windows short enough to reach zero within a
    /// test; returns once `<name>-00001` answered through the gateway.
    pub async fn serve_scaling_to_zero(&mut self, name: &str, image: &str) -> Result<()> {
        self.sluice
            .write("config-autoscaler.yaml", FAST_AUTOSCALER)?;
        self.apply(&ImageService::new(name, image))?;
        let revision_name = format!("{name}-00001");
        self.wait_service(name, &revision_name).await?;
        let body = self.get_ok(name, "/").await?;
        anyhow::ensure!(
            body == format!("hello from {revision_name}\n"),
            "{name} answered {body:?}"
        );
        Ok(())
    }

    /// Waits until `revision` is at zero: no instance desired nor left, and no container of it on the
    /// engine (scale to zero removes them).
    pub async fn wait_at_zero(&mut self, revision_name: &str) -> Result<()> {
        self.wait_status(&format!("{revision_name} at zero"), WAIT, |s| {
            revision(s, revision_name).is_some_and(|r| {
                r["desiredInstances"] == 0 && r["instances"].as_array().is_some_and(Vec::is_empty)
            })
        })
        .await?;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = self.containers_of(revision_name)?;
            if left.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the containers of {revision_name}, at zero, are still there: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// This run's containers of revision `revision` (any state).
    pub fn containers_of(&self, revision: &str) -> Result<Vec<String>> {
        images::owned_containers_with(self.owner(), "sluice.revision", revision)
    }

    /// This run's running containers of revision `revision`.
    pub fn running_containers_of(&self, revision: &str) -> Result<Vec<String>> {
        images::running_containers_with(self.owner(), "sluice.revision", revision)
    }

    /// `sluice status ARGS` against this run (the CLI, as a user types it): its stdout.
    pub fn status_cli(&self, args: &[&str]) -> Result<String> {
        let bin = crate::sluice::sluice_bin()?;
        let out = std::process::Command::new(bin)
            .arg("status")
            .args(["--control-port", &self.sluice.ports.control.to_string()])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "sluice status {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

/// `<service>.default.localhost`.
pub fn host(service: &str) -> String {
    format!("{service}.default.localhost")
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Object `name` (namespace default) of list `list` ("services", "revisions", "routes"...) in a
/// /status answer.
pub fn find<'a>(status: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    status[list]
        .as_array()?
        .iter()
        .find(|o| o["metadata"]["name"] == name && o["metadata"]["namespace"] == "default")
}

/// A /status answer in a few lines: each object with its conditions (status, reason, message), then
/// Envoy's ACK state and the gateways; short enough that a CI log cut in the middle still shows it.
pub fn summary(status: &Value) -> String {
    let mut out = String::new();
    for list in [
        "services",
        "configurations",
        "revisions",
        "routes",
        "ingresses",
        "brokers",
        "triggers",
    ] {
        for o in status[list].as_array().into_iter().flatten() {
            let conditions: Vec<String> = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{}={} {} {}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    )
                    .trim_end()
                    .to_string()
                })
                .collect();
            out += &format!(
                "{list} {}/{} gen {} observed {}: {}\n",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("?"),
                o["metadata"]["generation"],
                o["status"]["observedGeneration"],
                conditions.join("; ")
            );
        }
    }
    for key in ["envoy", "gateways", "gatewayLive", "errors", "rejected"] {
        if let Some(v) = status.get(key) {
            out += &format!("{key}: {v}\n");
        }
    }
    out
}

/// Revision `name` in a /status answer.
pub fn revision<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    find(status, "revisions", name)
}

/// A revision's `status.containerStatuses[0].imageDigest` (Knative's tag-to-digest).
pub fn image_digest(revision: &Value) -> Option<&str> {
    revision
        .pointer("/status/containerStatuses/0/imageDigest")
        .and_then(Value::as_str)
}

/// How many times a revision's instances were restarted, as `sluice status -o json` reports it.
pub fn restarts(revision: &Value) -> Option<u64> {
    revision["restarts"].as_u64()
}

/// The ready instances of a revision in a /status answer.
pub fn ready_instances(revision: &Value) -> Vec<&Value> {
    revision["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["state"] == "Ready")
        .collect()
}

/// A Knative Service (namespace default) whose one container names an image: no command, as
/// ordinary Knative YAML is.
#[derive(Debug, Clone)]
pub struct ImageService {
    value: Value,
}

impl ImageService {
    pub fn new(name: &str, image: &str) -> ImageService {
        ImageService {
            value: json!({
                "apiVersion": "serving.knative.dev/v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"template": {"spec": {"containers": [{"image": image}]}}},
            }),
        }
    }

    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// An annotation on the revision template (`autoscaling.knative.dev/...`).
    pub fn annotation(mut self, key: &str, value: &str) -> ImageService {
        self.value["spec"]["template"]["metadata"]["annotations"][key] = json!(value);
        self
    }

    /// `autoscaling.knative.dev/min-scale` (and max-scale when `max` is set).
    pub fn scale(self, min: u32, max: Option<u32>) -> ImageService {
        let svc = self.annotation("autoscaling.knative.dev/min-scale", &min.to_string());
        match max {
            Some(max) => svc.annotation("autoscaling.knative.dev/max-scale", &max.to_string()),
            None => svc,
        }
    }

    /// A field of the container (`ports`, `readinessProbe`, `imagePullPolicy`, `envFrom`...).
    pub fn container(mut self, key: &str, value: Value) -> ImageService {
        self.value["spec"]["template"]["spec"]["containers"][0][key] = value;
        self
    }

    /// One `env` entry with a value.
    pub fn env(self, name: &str, value: &str) -> ImageService {
        self.env_entry(json!({"name": name, "value": value}))
    }

    /// One `env` entry as given (e.g. with `valueFrom`).
    pub fn env_entry(mut self, entry: Value) -> ImageService {
        let container = &mut self.value["spec"]["template"]["spec"]["containers"][0];
        match container["env"].as_array_mut() {
            Some(env) => env.push(entry),
            None => container["env"] = json!([entry]),
        }
        self
    }

    /// A field of the revision template's spec (`containerConcurrency`, `timeoutSeconds`...).
    pub fn template_spec(mut self, key: &str, value: Value) -> ImageService {
        self.value["spec"]["template"]["spec"][key] = value;
        self
    }

    /// `spec.traffic`.
    pub fn traffic(mut self, traffic: Value) -> ImageService {
        self.value["spec"]["traffic"] = traffic;
        self
    }

    pub fn to_value(&self) -> Value {
        self.value.clone()
    }

    /// As YAML.
    pub fn to_yaml(&self) -> String {
        yaml::documents(std::slice::from_ref(&self.value))
    }
}

/// A ConfigMap in namespace default.
pub fn config_map(name: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": data,
    })
}

/// An Opaque Secret in namespace default (`data`, base64, as `kubectl get -o yaml` shows it).
pub fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(b64.encode(v))))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "type": "Opaque",
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_service_has_only_an_image_until_told_more() {
        let svc = ImageService::new("hello", "sluice-test/app:1-0");
        assert_eq!(
            svc.to_value()["spec"]["template"]["spec"]["containers"],
            json!([{"image": "sluice-test/app:1-0"}])
        );
        let svc = svc
            .scale(1, Some(1))
            .env("A", "1")
            .env("B", "2")
            .container("imagePullPolicy", json!("Never"))
            .template_spec("containerConcurrency", json!(1));
        let v = svc.to_value();
        let template = &v["spec"]["template"];
        assert_eq!(
            template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"],
            "1"
        );
        assert_eq!(template["spec"]["containerConcurrency"], 1);
        assert_eq!(
            template["spec"]["containers"][0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        // The YAML parses as Knative's Service.
        let yaml = svc.to_yaml();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("YAML");
        assert_eq!(parsed["kind"], serde_yaml::Value::from("Service"));
    }
}
