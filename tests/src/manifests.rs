//! Sluice's Kubernetes manifests (manifests/) as typed objects: every document parsed into its
//! k8s-openapi type (or, for cert-manager's and Istio's kinds, a strict struct of the fields we use),
//! with unknown fields an error, and the kustomizations that lay them out.
//!
//! k8s-openapi's types ignore unknown fields when they deserialize, so [`strict`] serializes the typed
//! object again and reports every field of the input that did not survive: a misspelt or misplaced
//! field, as `kubectl apply --validate=strict` would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sluice::workspace_root;

/// The manifests folder.
pub fn root() -> PathBuf {
    workspace_root().join("manifests")
}

/// What `kubectl kustomize` can build here (the rest are components they use).
pub const BUILDS: [&str; 3] = ["base", "overlays/cluster", "overlays/istio"];

/// `T` from `doc`, refusing any field `T` does not know: the fields of `doc` missing from `T`
/// serialized again, or changed by the round trip.
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T> {
    let typed: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed)?;
    let mut unknown = Vec::new();
    lost_fields(doc, &back, String::new(), &mut unknown);
    if !unknown.is_empty() {
        bail!("unknown fields: {}", unknown.join(", "));
    }
    Ok(typed)
}

fn lost_fields(given: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (given, back) {
        (Value::Object(given), Value::Object(back)) => {
            for (key, value) in given {
                let at = format!("{path}.{key}");
                match back.get(key) {
                    Some(b) => lost_fields(value, b, at, out),
                    // An empty object or list is what an absent optional field says too.
                    None if value.as_object().is_some_and(|o| o.is_empty())
                        || value.as_array().is_some_and(|a| a.is_empty()) => {}
                    None => out.push(at),
                }
            }
        }
        (Value::Array(given), Value::Array(back)) if given.len() == back.len() => {
            for (i, (g, b)) in given.iter().zip(back).enumerate() {
                lost_fields(g, b, format!("{path}[{i}]"), out);
            }
        }
        (g, b) if g == b => {}
        (g, b) => out.push(format!("{path} ({g} read as {b})")),
    }
}

/// A kustomization.yaml (a Kustomization or a Component), with the fields used here only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kustomization {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub components: Vec<String>,
    #[serde(default)]
    pub patches: Vec<KustomizePatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KustomizePatch {
    pub target: PatchTarget,
    pub patch: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchTarget {
    pub kind: String,
    pub name: Option<String>,
    pub label_selector: Option<String>,
}

/// cert-manager.io/v1 Certificate (the fields the mtls overlay uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CertificateSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateSpec {
    pub secret_name: String,
    pub common_name: Option<String>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default, rename = "isCA")]
    pub is_ca: bool,
    #[serde(default)]
    pub usages: Vec<String>,
    pub duration: Option<String>,
    pub renew_before: Option<String>,
    pub private_key: Option<PrivateKey>,
    pub issuer_ref: IssuerRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrivateKey {
    pub algorithm: String,
    pub size: u32,
    pub rotation_policy: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerRef {
    pub name: String,
    pub kind: String,
}

/// cert-manager.io/v1 Issuer: self-signed or a CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: IssuerSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuerSpec {
    pub self_signed: Option<Empty>,
    pub ca: Option<CaIssuer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaIssuer {
    pub secret_name: String,
}

/// extensions.istio.io/v1alpha1 WasmPlugin (Istio's API, the fields the istio overlay uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPlugin {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WasmPluginSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmPluginSpec {
    pub selector: WorkloadSelector,
    pub url: String,
    pub image_pull_policy: Option<PullPolicy>,
    pub phase: Option<Phase>,
    #[serde(default, rename = "match")]
    pub match_: Vec<TrafficSelector>,
    pub fail_strategy: Option<FailStrategy>,
    pub plugin_config: Value,
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub enum PullPolicy {
    IfNotPresent,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    UnspecifiedPhase,
    Authn,
    Authz,
    Stats,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    FailClose,
    FailOpen,
    FailReload,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSelector {
    pub mode: TrafficMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficMode {
    Undefined,
    Client,
    Server,
    ClientAndServer,
}

/// Every object of one manifest set, typed.
#[derive(Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub hpas: Vec<HorizontalPodAutoscaler>,
    pub certificates: Vec<Certificate>,
    pub issuers: Vec<Issuer>,
    pub wasm_plugins: Vec<WasmPlugin>,
}

impl Objects {
    /// Adds one document; an error names its kind, name and the field at fault.
    pub fn add(&mut self, doc: &Value) -> Result<()> {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let result = match (api_version, kind) {
            ("v1", "Namespace") => strict(doc).map(|o| self.namespaces.push(o)),
            ("v1", "ServiceAccount") => strict(doc).map(|o| self.service_accounts.push(o)),
            ("v1", "Service") => strict(doc).map(|o| self.services.push(o)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                strict(doc).map(|o| self.cluster_roles.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                strict(doc).map(|o| self.cluster_role_bindings.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => strict(doc).map(|o| self.roles.push(o)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                strict(doc).map(|o| self.role_bindings.push(o))
            }
            ("apps/v1", "Deployment") => strict(doc).map(|o| self.deployments.push(o)),
            ("policy/v1", "PodDisruptionBudget") => strict(doc).map(|o| self.pdbs.push(o)),
            ("autoscaling/v2", "HorizontalPodAutoscaler") => strict(doc).map(|o| self.hpas.push(o)),
            ("cert-manager.io/v1", "Certificate") => serde_path_to_error::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))
                .map(|o| self.certificates.push(o)),
            ("cert-manager.io/v1", "Issuer") => serde_path_to_error::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))
                .map(|o| self.issuers.push(o)),
            ("extensions.istio.io/v1alpha1", "WasmPlugin") => serde_path_to_error::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))
                .map(|o| self.wasm_plugins.push(o)),
            _ => Err(anyhow::anyhow!("no type here for {api_version} {kind}")),
        };
        result.with_context(|| format!("{kind} {name}"))
    }

    pub fn deployment(&self, name: &str) -> Result<&Deployment> {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .with_context(|| format!("no Deployment {name}"))
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }
}

/// The documents of a YAML stream (empty ones skipped).
pub fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// `kubectl kustomize DIR` (kustomize v5 built into kubectl): the objects it renders.
pub fn kustomize(dir: &Path) -> Result<Objects> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize (kubectl carries kustomize)")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut objects = Objects::default();
    for doc in documents(&String::from_utf8_lossy(&out.stdout))? {
        objects
            .add(&doc)
            .with_context(|| format!("built from {}", dir.display()))?;
    }
    Ok(objects)
}

/// Every .yaml file under manifests/, sorted.
pub fn yaml_files() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&root(), &mut out)?;
    out.sort();
    Ok(out)
}

/// A request the xds-server made, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiCall {
    pub verb: String,
    /// "" for the core group.
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
}

/// The RBAC attributes of an HTTP request to the API server (Kubernetes' request-info rules for the
/// paths the client uses): `/api/v1/...` or `/apis/GROUP/VERSION/...`, optionally
/// `namespaces/NS/`, then `RESOURCE[/NAME[/SUBRESOURCE]]`.
pub fn api_call(method: &str, path: &str, query: &str) -> Option<ApiCall> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named, watch) {
        ("GET", _, true) => "watch",
        ("GET", false, false) => "list",
        ("GET", true, false) => "get",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", false, _) => "deletecollection",
        ("DELETE", true, _) => "delete",
        _ => return None,
    };
    Some(ApiCall {
        verb: verb.into(),
        group,
        resource,
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing_names_the_field_k8s_openapi_would_drop() {
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80, "targetPort": "http", "nmae": "x"}]},
        });
        let err = strict::<Service>(&doc).unwrap_err().to_string();
        assert!(err.contains(".spec.ports[0].nmae"), "{err}");
        let ok = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80, "targetPort": "http"}], "selector": {}},
        });
        strict::<Service>(&ok).unwrap();
    }

    #[test]
    fn api_calls_as_rbac_sees_them() {
        let call = |m, p, q| api_call(m, p, q).unwrap();
        assert_eq!(
            call("GET", "/api/v1/services", "watch=true&resourceVersion=1"),
            ApiCall {
                verb: "watch".into(),
                group: "".into(),
                resource: "services".into(),
                namespace: None
            }
        );
        assert_eq!(
            call("GET", "/apis/discovery.k8s.io/v1/endpointslices", "").verb,
            "list"
        );
        let patch = call(
            "PATCH",
            "/apis/networking.internal.knative.dev/v1alpha1/namespaces/default/ingresses/hello/status",
            "",
        );
        assert_eq!(patch.resource, "ingresses/status");
        assert_eq!(patch.namespace.as_deref(), Some("default"));
        assert_eq!(
            call(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/x",
                ""
            )
            .verb,
            "update"
        );
    }
}
