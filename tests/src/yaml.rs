//! Builders for the Knative/Kubernetes objects `sluice up` reads from its folder: a KIngress
//! (networking.internal.knative.dev/v1alpha1), and the v1 Service, Endpoints and TLS Secret behind it.
//! They build plain JSON values (written out as YAML), independent of Sluice's own types.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::tls::TlsMaterial;

pub const INGRESS_CLASS_ANNOTATION: &str = "networking.knative.dev/ingress.class";
pub const SLUICE_INGRESS_CLASS: &str = "sluice.ingress.networking.knative.dev";

/// The ingress-class annotation an Ingress carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// `networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev`.
    Sluice,
    /// No `annotations` at all.
    NoAnnotations,
    /// `annotations: {}`.
    EmptyAnnotations,
    /// The annotation with this value ("" for an empty one).
    Other(String),
}

/// A KIngress.
#[derive(Debug, Clone)]
pub struct Ingress {
    namespace: String,
    name: String,
    class: Class,
    annotations: BTreeMap<String, String>,
    generation: Option<i64>,
    tls: Vec<(Vec<String>, String, String)>,
    rules: Vec<Rule>,
    http_option: Option<String>,
}

impl Ingress {
    pub fn new(namespace: &str, name: &str) -> Ingress {
        Ingress {
            namespace: namespace.to_string(),
            name: name.to_string(),
            class: Class::Sluice,
            annotations: BTreeMap::new(),
            generation: None,
            tls: Vec::new(),
            rules: Vec::new(),
            http_option: None,
        }
    }

    pub fn class(mut self, class: Class) -> Ingress {
        self.class = class;
        self
    }

    /// An extra annotation (kept with any class but [`Class::NoAnnotations`]).
    pub fn annotation(mut self, key: &str, value: &str) -> Ingress {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    /// metadata.generation, as the API server would bump it on each spec change.
    pub fn generation(mut self, generation: i64) -> Ingress {
        self.generation = Some(generation);
        self
    }

    pub fn rule(mut self, rule: Rule) -> Ingress {
        self.rules.push(rule);
        self
    }

    /// spec.tls: `hosts` served with the certificate of Secret `secret_name` in this namespace.
    pub fn tls(mut self, hosts: &[&str], secret_name: &str) -> Ingress {
        self.tls.push((
            hosts.iter().map(|h| h.to_string()).collect(),
            secret_name.to_string(),
            self.namespace.clone(),
        ));
        self
    }

    /// spec.httpOption: "Enabled" or "Redirected".
    pub fn http_option(mut self, option: &str) -> Ingress {
        self.http_option = Some(option.to_string());
        self
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The spec, as JSON.
    pub fn spec(&self) -> Value {
        let mut spec = Map::new();
        if !self.tls.is_empty() {
            let tls: Vec<Value> = self
                .tls
                .iter()
                .map(|(hosts, secret, ns)| json!({"hosts": hosts, "secretName": secret, "secretNamespace": ns}))
                .collect();
            spec.insert("tls".into(), Value::Array(tls));
        }
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| r.to_value(&self.namespace))
            .collect();
        spec.insert("rules".into(), Value::Array(rules));
        if let Some(option) = &self.http_option {
            spec.insert("httpOption".into(), Value::String(option.clone()));
        }
        Value::Object(spec)
    }

    /// The whole object.
    pub fn to_value(&self) -> Value {
        let mut metadata = Map::new();
        metadata.insert("name".into(), Value::String(self.name.clone()));
        metadata.insert("namespace".into(), Value::String(self.namespace.clone()));
        if let Some(generation) = self.generation {
            metadata.insert("generation".into(), json!(generation));
        }
        let mut annotations: Map<String, Value> = self
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        match &self.class {
            Class::Sluice => {
                annotations.insert(INGRESS_CLASS_ANNOTATION.into(), SLUICE_INGRESS_CLASS.into());
            }
            Class::Other(value) => {
                annotations.insert(
                    INGRESS_CLASS_ANNOTATION.into(),
                    Value::String(value.clone()),
                );
            }
            Class::EmptyAnnotations | Class::NoAnnotations => {}
        }
        if self.class != Class::NoAnnotations {
            metadata.insert("annotations".into(), Value::Object(annotations));
        }
        json!({
            "apiVersion": "networking.internal.knative.dev/v1alpha1",
            "kind": "Ingress",
            "metadata": metadata,
            "spec": self.spec(),
        })
    }
}

/// spec.rules[]: hosts, visibility and paths.
#[derive(Debug, Clone)]
pub struct Rule {
    hosts: Vec<String>,
    visibility: &'static str,
    paths: Vec<Path>,
}

impl Rule {
    /// visibility: ExternalIP.
    pub fn external(hosts: &[&str]) -> Rule {
        Rule::with_visibility(hosts, "ExternalIP")
    }

    /// visibility: ClusterLocal.
    pub fn cluster_local(hosts: &[&str]) -> Rule {
        Rule::with_visibility(hosts, "ClusterLocal")
    }

    fn with_visibility(hosts: &[&str], visibility: &'static str) -> Rule {
        Rule {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            visibility,
            paths: Vec::new(),
        }
    }

    pub fn path(mut self, path: Path) -> Rule {
        self.paths.push(path);
        self
    }

    fn to_value(&self, namespace: &str) -> Value {
        let paths: Vec<Value> = self.paths.iter().map(|p| p.to_value(namespace)).collect();
        json!({"hosts": self.hosts, "visibility": self.visibility, "http": {"paths": paths}})
    }
}

/// spec.rules[].http.paths[].
#[derive(Debug, Clone, Default)]
pub struct Path {
    path: Option<String>,
    rewrite_host: Option<String>,
    headers: BTreeMap<String, String>,
    append_headers: BTreeMap<String, String>,
    splits: Vec<Split>,
}

impl Path {
    /// The catch-all path (no `path`).
    pub fn any() -> Path {
        Path::default()
    }

    /// A path prefix, e.g. "/foo".
    pub fn prefix(prefix: &str) -> Path {
        Path {
            path: Some(prefix.to_string()),
            ..Path::default()
        }
    }

    pub fn split(mut self, split: Split) -> Path {
        self.splits.push(split);
        self
    }

    /// headers: {name: {exact: value}}.
    pub fn header_exact(mut self, name: &str, value: &str) -> Path {
        self.headers.insert(name.to_string(), value.to_string());
        self
    }

    /// Path-level appendHeaders (set before the split).
    pub fn append_header(mut self, name: &str, value: &str) -> Path {
        self.append_headers
            .insert(name.to_string(), value.to_string());
        self
    }

    pub fn rewrite_host(mut self, host: &str) -> Path {
        self.rewrite_host = Some(host.to_string());
        self
    }

    fn to_value(&self, namespace: &str) -> Value {
        let mut out = Map::new();
        if let Some(path) = &self.path {
            out.insert("path".into(), Value::String(path.clone()));
        }
        if let Some(host) = &self.rewrite_host {
            out.insert("rewriteHost".into(), Value::String(host.clone()));
        }
        if !self.headers.is_empty() {
            let headers: Map<String, Value> = self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), json!({"exact": v})))
                .collect();
            out.insert("headers".into(), Value::Object(headers));
        }
        let splits: Vec<Value> = self.splits.iter().map(|s| s.to_value(namespace)).collect();
        out.insert("splits".into(), Value::Array(splits));
        if !self.append_headers.is_empty() {
            out.insert("appendHeaders".into(), json!(self.append_headers));
        }
        Value::Object(out)
    }
}

/// A Service port: a number or a port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    Number(i32),
    Name(String),
}

impl From<i32> for Port {
    fn from(n: i32) -> Port {
        Port::Number(n)
    }
}

impl From<&str> for Port {
    fn from(name: &str) -> Port {
        Port::Name(name.to_string())
    }
}

/// spec.rules[].http.paths[].splits[].
#[derive(Debug, Clone)]
pub struct Split {
    service: String,
    namespace: Option<String>,
    port: Port,
    percent: Option<i64>,
    append_headers: BTreeMap<String, String>,
}

impl Split {
    /// To Service `service` (in the Ingress's namespace) on `port`.
    pub fn to(service: &str, port: impl Into<Port>) -> Split {
        Split {
            service: service.to_string(),
            namespace: None,
            port: port.into(),
            percent: None,
            append_headers: BTreeMap::new(),
        }
    }

    /// serviceNamespace, when it must differ from the Ingress's (Knative rejects that).
    pub fn namespace(mut self, namespace: &str) -> Split {
        self.namespace = Some(namespace.to_string());
        self
    }

    /// percent (omitted when 0, as Go's omitempty does).
    pub fn percent(mut self, percent: i64) -> Split {
        self.percent = Some(percent);
        self
    }

    /// Split-level appendHeaders (set after the split chose this backend).
    pub fn append_header(mut self, name: &str, value: &str) -> Split {
        self.append_headers
            .insert(name.to_string(), value.to_string());
        self
    }

    fn to_value(&self, namespace: &str) -> Value {
        let mut out = Map::new();
        out.insert(
            "serviceNamespace".into(),
            Value::String(
                self.namespace
                    .clone()
                    .unwrap_or_else(|| namespace.to_string()),
            ),
        );
        out.insert("serviceName".into(), Value::String(self.service.clone()));
        out.insert(
            "servicePort".into(),
            match &self.port {
                Port::Number(n) => json!(n),
                Port::Name(name) => json!(name),
            },
        );
        if let Some(percent) = self.percent.filter(|p| *p != 0) {
            out.insert("percent".into(), json!(percent));
        }
        if !self.append_headers.is_empty() {
            out.insert("appendHeaders".into(), json!(self.append_headers));
        }
        Value::Object(out)
    }
}

/// The Service port every backend is exposed on (splits use it).
pub const SERVICE_PORT: i32 = 80;

/// A v1 Service with one port: `port_name` (e.g. "http", "h2c"), port `port`, targetPort `target_port`.
pub fn service(namespace: &str, name: &str, port_name: &str, port: i32, target_port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": port_name, "port": port, "protocol": "TCP", "targetPort": target_port}]},
    })
}

/// v1 Endpoints: 127.0.0.1 on `port`, under the Service port named `port_name`.
pub fn endpoints(namespace: &str, name: &str, port_name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [{
            "addresses": [{"ip": "127.0.0.1"}],
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        }],
    })
}

/// A Service (port [`SERVICE_PORT`] named `port_name`) and its Endpoints for a backend listening on
/// 127.0.0.1:`backend_port`.
pub fn backend(namespace: &str, name: &str, port_name: &str, backend_port: u16) -> Vec<Value> {
    vec![
        service(namespace, name, port_name, SERVICE_PORT, backend_port),
        endpoints(namespace, name, port_name, backend_port),
    ]
}

/// A kubernetes.io/tls Secret holding `tls`'s leaf certificate and key.
pub fn tls_secret(namespace: &str, name: &str, tls: &TlsMaterial) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64.encode(&tls.cert_pem), "tls.key": b64.encode(&tls.key_pem)},
    })
}

/// Multi-document YAML.
pub fn documents(docs: &[Value]) -> String {
    docs.iter()
        .map(|doc| serde_yaml::to_string(doc).expect("JSON values serialize as YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}
