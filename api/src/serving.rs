//! serving.knative.dev/v1: Service, Configuration, Revision and Route, with Knative's defaulting and
//! validation (knative/serving pkg/apis/serving/v1 `*_defaults.go`, `*_validation.go` and
//! pkg/apis/serving/k8s_validation.go).
//!
//! Field order and names follow Knative's Go structs so `sluice status -o json` prints what `kubectl get
//! -o json` would. Sluice runs each revision from its image on a container engine, or as a local
//! process from its `command`; it differs from Knative in a few places, each marked `// Sluice:`: a
//! container needs an `image` or a `command` (Knative: an `image`), and no `initContainers`.
//!
//! Unknown fields are rejected at every level of `spec`, as Knative's webhook does (it decodes with
//! DisallowUnknownFields, and refuses the PodSpec and Container fields outside its masks in
//! pkg/apis/serving/k8s_validation.go): a typo such as `containerConcurency` or `comand` is an
//! error with its field path. The PodSpec and Container fields Knative allows without a feature flag
//! are all accepted and typed as Kubernetes types them (env `valueFrom`, `envFrom`, `volumes`,
//! `volumeMounts`, `resources`, `securityContext`); those Sluice cannot honour locally are listed as
//! warnings by the serving plane, never silently dropped, so ordinary Knative YAML reads without edits. Fields Knative allows only behind a
//! `config-features` flag (affinity, nodeSelector, tolerations, ...) are refused: Sluice has no such
//! flags. `metadata` and `status` accept anything (Kubernetes adds many fields there).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::core::{
    EnvFromSource, EnvVarSource, ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use crate::ingress::IntOrString;
use crate::meta::{ObjectMeta, Status};
use crate::validation::{FieldError, ValidationError};

pub const API_VERSION: &str = "serving.knative.dev/v1";

// Knative's label keys (pkg/apis/serving/register.go).
/// On a Configuration, Route, Revision: the Service that owns it.
pub const SERVICE_LABEL: &str = "serving.knative.dev/service";
/// On a Revision: its Configuration.
pub const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";
/// On a Revision: the Configuration generation it was created for.
pub const CONFIGURATION_GENERATION_LABEL: &str = "serving.knative.dev/configurationGeneration";
/// On a Revision's core/v1 Service and on the KIngress: the Revision / the Route.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";
pub const ROUTE_LABEL: &str = "serving.knative.dev/route";
pub const ROUTE_NAMESPACE_LABEL: &str = "serving.knative.dev/routeNamespace";
/// Knative networking: `networking.knative.dev/visibility: cluster-local` keeps a Route off the
/// external gateway.
pub const VISIBILITY_LABEL: &str = "networking.knative.dev/visibility";
pub const VISIBILITY_CLUSTER_LOCAL: &str = "cluster-local";

// Condition types.
pub const CONDITION_READY: &str = "Ready";
pub const SERVICE_CONFIGURATIONS_READY: &str = "ConfigurationsReady";
pub const SERVICE_ROUTES_READY: &str = "RoutesReady";
pub const REVISION_RESOURCES_AVAILABLE: &str = "ResourcesAvailable";
pub const REVISION_CONTAINER_HEALTHY: &str = "ContainerHealthy";
pub const REVISION_ACTIVE: &str = "Active";
pub const ROUTE_ALL_TRAFFIC_ASSIGNED: &str = "AllTrafficAssigned";
pub const ROUTE_INGRESS_READY: &str = "IngressReady";
pub const ROUTE_CERTIFICATE_PROVISIONED: &str = "CertificateProvisioned";

/// Knative: `PORT`, `K_SERVICE`, `K_CONFIGURATION` and `K_REVISION` are set by Serving itself.
pub const RESERVED_ENV_VARS: [&str; 4] = ["PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"];
/// Knative: ports the queue-proxy uses (8012, 8013, 8022, 9090, 9091) cannot be the user's.
pub const RESERVED_PORTS: [i32; 5] = [8012, 8013, 8022, 9090, 9091];
/// Knative: the default name of the serving container.
pub const DEFAULT_CONTAINER_NAME: &str = "user-container";
/// Container port names Knative accepts: `http1` (the default) or `h2c`.
pub const PORT_NAME_HTTP1: &str = "http1";
pub const PORT_NAME_H2C: &str = "h2c";

macro_rules! knative_object {
    ($name:ident, $kind:literal, $spec:ty, $status:ty) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default = "api_version")]
            pub api_version: String,
            #[serde(default = $kind)]
            pub kind: String,
            #[serde(default)]
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: $spec,
            #[serde(default)]
            pub status: $status,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    api_version: api_version(),
                    kind: stringify!($name).to_string(),
                    metadata: ObjectMeta::default(),
                    spec: Default::default(),
                    status: Default::default(),
                }
            }
        }
    };
}

fn api_version() -> String {
    API_VERSION.to_string()
}
fn kind_service() -> String {
    "Service".to_string()
}
fn kind_configuration() -> String {
    "Configuration".to_string()
}
fn kind_revision() -> String {
    "Revision".to_string()
}
fn kind_route() -> String {
    "Route".to_string()
}

knative_object!(Service, "kind_service", ServiceSpec, ServiceStatus);
knative_object!(
    Configuration,
    "kind_configuration",
    ConfigurationSpec,
    ConfigurationStatus
);
knative_object!(Revision, "kind_revision", RevisionSpec, RevisionStatus);
knative_object!(Route, "kind_route", RouteSpec, RouteStatus);

/// A Service's spec: Knative inlines ConfigurationSpec (`template`) and RouteSpec (`traffic`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

impl ServiceSpec {
    pub fn configuration_spec(&self) -> ConfigurationSpec {
        ConfigurationSpec {
            template: self.template.clone(),
        }
    }
    pub fn route_spec(&self) -> RouteSpec {
        RouteSpec {
            traffic: self.traffic.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigurationSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevisionTemplateSpec {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RevisionSpec,
}

/// Knative's RevisionSpec: a core/v1 PodSpec inlined (the fields of Knative's PodSpecMask), plus
/// Knative's own fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevisionSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    /// Sluice: refused (a local process has no init step).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<serde_json::Value>,
    /// ConfigMap, Secret and emptyDir volumes, mounted by the container runtime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_service_links: Option<bool>,
    /// Accepted and ignored (Knative's PodSpecMask allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
    /// Knative: 0 means unlimited; 1..=container-concurrency-max-limit otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_concurrency: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_start_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
}

/// core/v1 Container, limited to Knative's ContainerMask.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Container {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// What the container runtime runs; the process runtime runs `command` instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// ConfigMaps and Secrets of the same namespace, from the folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// `limits` cpu and memory become engine limits (container runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_pull_policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Accepted and ignored (in Knative's ContainerMask).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub termination_message_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub termination_message_policy: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    /// `http1` (default) or `h2c`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default)]
    pub container_port: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// A ConfigMap or Secret key of the same namespace (from the folder), or a pod field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// core/v1 Probe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcAction>,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub initial_delay_seconds: i32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub timeout_seconds: i32,
    /// Knative: 0 on a readinessProbe means "probe aggressively" (the queue-proxy retries every
    /// few milliseconds until ready).
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub period_seconds: i32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub success_threshold: i32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub failure_threshold: i32,
}

fn is_zero32(v: &i32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecAction {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetAction {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Knative: unset or the container port; the probe goes to the process's PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// HTTP (default) or HTTPS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheme: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcAction {
    #[serde(default)]
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// Knative's TrafficTarget, used both in spec (what the user asks) and status (what is routed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficTarget {
    /// Gives the target its own host `<tag>-<route>.<namespace>.<domain>` (config-network tag-template).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub configuration_name: String,
    /// True: float to the configuration's latest ready revision. Defaulted to `revisionName == ""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_revision: Option<bool>,
    /// Unset means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// Status only: the tag's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// duckv1.Addressable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Addressable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_ready_revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_created_revision_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// Knative's ServiceStatus: duck Status + ConfigurationStatusFields + RouteStatusFields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_ready_revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_created_revision_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    #[serde(flatten)]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_digest: String,
}

/// Knative's config-defaults values that defaulting and validation read (pkg/apis/config/defaults.go).
/// The serving crate parses them from the ConfigMap; [`Defaults::default`] is Knative's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Defaults {
    /// `revision-timeout-seconds`: 300.
    pub revision_timeout_seconds: i64,
    /// `max-revision-timeout-seconds`: 600.
    pub max_revision_timeout_seconds: i64,
    /// `revision-response-start-timeout-seconds`: defaults to revision-timeout-seconds.
    pub revision_response_start_timeout_seconds: i64,
    /// `revision-idle-timeout-seconds`: 0 (none).
    pub revision_idle_timeout_seconds: i64,
    /// `container-concurrency`: 0 (unlimited).
    pub container_concurrency: i64,
    /// `container-concurrency-max-limit`: 1000.
    pub container_concurrency_max_limit: i64,
    /// `allow-container-concurrency-zero`: true.
    pub allow_container_concurrency_zero: bool,
    /// `container-name-template`: "user-container" (Sluice supports only a literal name).
    pub container_name: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            revision_timeout_seconds: 300,
            max_revision_timeout_seconds: 600,
            revision_response_start_timeout_seconds: 300,
            revision_idle_timeout_seconds: 0,
            container_concurrency: 0,
            container_concurrency_max_limit: 1000,
            allow_container_concurrency_zero: true,
            container_name: DEFAULT_CONTAINER_NAME.to_string(),
        }
    }
}

/// The transport between the gateway and a revision's process, from its container port's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2c,
}

impl RevisionSpec {
    /// Knative's RevisionSpec.SetDefaults (revision_defaults.go): timeoutSeconds and
    /// containerConcurrency from config-defaults, the container name, a TCP readiness probe with
    /// successThreshold 1.
    pub fn set_defaults(&mut self, d: &Defaults) {
        if self.timeout_seconds.is_none_or(|t| t == 0) {
            self.timeout_seconds = Some(d.revision_timeout_seconds);
        }
        if self.container_concurrency.is_none() {
            self.container_concurrency = Some(d.container_concurrency);
        }
        let many = self.containers.len() > 1;
        for (i, c) in self.containers.iter_mut().enumerate() {
            if c.name.is_empty() {
                c.name = if many {
                    format!("{}-{i}", d.container_name)
                } else {
                    d.container_name.clone()
                };
            }
            if !many || !c.ports.is_empty() {
                let probe = c.readiness_probe.get_or_insert_with(Probe::default);
                if probe.tcp_socket.is_none()
                    && probe.http_get.is_none()
                    && probe.exec.is_none()
                    && probe.grpc.is_none()
                {
                    probe.tcp_socket = Some(TcpSocketAction::default());
                }
                if probe.success_threshold == 0 {
                    probe.success_threshold = 1;
                }
            }
        }
    }

    /// Knative's `GetContainerConcurrency`: unset means 0 (unlimited).
    pub fn container_concurrency(&self) -> i64 {
        self.container_concurrency.unwrap_or(0)
    }

    /// Knative's Revision.GetProtocol: h2c when the serving container's port is named `h2c`.
    pub fn protocol(&self) -> Protocol {
        let named_h2c = self
            .containers
            .iter()
            .flat_map(|c| c.ports.first())
            .any(|p| p.name == PORT_NAME_H2C);
        if named_h2c {
            Protocol::H2c
        } else {
            Protocol::Http1
        }
    }

    fn validate(&self, at: &str, d: &Defaults, v: &mut Errors) {
        if self.containers.is_empty() {
            v.missing(format!("{at}.containers"));
        }
        // Knative's validateContainersPorts: with several containers, exactly one has a port (the
        // one that serves; the others are sidecars).
        let ports: usize = self.containers.iter().map(|c| c.ports.len()).sum();
        if self.containers.len() > 1 && ports == 0 {
            v.missing(format!("{at}.containers.ports"));
        } else if self.containers.len() > 1 && ports > 1 {
            v.push(
                format!("{at}.containers[*].ports"),
                "more than one container port is set: only a single port is allowed across all \
                 containers",
            );
        }
        let mut names = BTreeSet::new();
        let volumes = self.validate_volumes(at, v);
        let mut mounted = BTreeSet::new();
        for (i, c) in self.containers.iter().enumerate() {
            let here = format!("{at}.containers[{i}]");
            c.validate(&here, &volumes, v);
            mounted.extend(c.volume_mounts.iter().map(|m| m.name.as_str()));
            if !c.name.is_empty() && !names.insert(c.name.as_str()) {
                v.push(
                    format!("{here}.name"),
                    format!("duplicate container name {:?}", c.name),
                );
            }
        }
        // Knative: every volume is mounted somewhere.
        for (i, vol) in self.volumes.iter().enumerate() {
            if !vol.name.is_empty() && !mounted.contains(vol.name.as_str()) {
                v.push(
                    format!("{at}.volumes[{i}].name"),
                    format!("volume with name {:?} not mounted", vol.name),
                );
            }
        }
        if !self.init_containers.is_empty() {
            v.push(
                format!("{at}.initContainers"),
                "not supported by sluice (no init step before a revision's containers)",
            );
        }
        if let Some(t) = self.timeout_seconds {
            // Knative: 0 means the default; otherwise 0..=max-revision-timeout-seconds.
            if t != 0 && !(0..=d.max_revision_timeout_seconds).contains(&t) {
                v.out_of_bounds(
                    format!("{at}.timeoutSeconds"),
                    t,
                    0,
                    d.max_revision_timeout_seconds,
                );
            }
        }
        for (field, value) in [
            (
                "responseStartTimeoutSeconds",
                self.response_start_timeout_seconds,
            ),
            ("idleTimeoutSeconds", self.idle_timeout_seconds),
        ] {
            if let Some(t) = value
                && !(0..=d.max_revision_timeout_seconds).contains(&t)
            {
                v.out_of_bounds(
                    format!("{at}.{field}"),
                    t,
                    0,
                    d.max_revision_timeout_seconds,
                );
            }
        }
        if let Some(cc) = self.container_concurrency {
            // Knative: serving.ValidateContainerConcurrency.
            let min = if d.allow_container_concurrency_zero {
                0
            } else {
                1
            };
            if cc < min || cc > d.container_concurrency_max_limit {
                v.out_of_bounds(
                    format!("{at}.containerConcurrency"),
                    cc,
                    min,
                    d.container_concurrency_max_limit,
                );
            }
        }
    }
}

impl RevisionSpec {
    /// Knative's validateVolumes: unique names, exactly one source each. Returns each volume's name
    /// and whether its mounts must be read-only (ConfigMap, Secret, projected).
    fn validate_volumes<'a>(&'a self, at: &str, v: &mut Errors) -> BTreeMap<&'a str, bool> {
        let mut out = BTreeMap::new();
        for (i, vol) in self.volumes.iter().enumerate() {
            let here = format!("{at}.volumes[{i}]");
            if vol.name.is_empty() {
                v.missing(format!("{here}.name"));
            } else if out.contains_key(vol.name.as_str()) {
                v.push(
                    format!("{here}.name"),
                    format!("duplicate volume name {:?}", vol.name),
                );
            }
            let sources = [
                vol.config_map.is_some(),
                vol.secret.is_some(),
                vol.empty_dir.is_some(),
                vol.projected.is_some(),
            ];
            match sources.iter().filter(|s| **s).count() {
                0 => v.push(
                    here.clone(),
                    "expected exactly one, got neither: configMap, emptyDir, projected, secret",
                ),
                1 => {}
                _ => v.push(
                    here.clone(),
                    "expected exactly one, got both: configMap, emptyDir, projected, secret",
                ),
            }
            if let Some(cm) = &vol.config_map {
                if cm.name.is_empty() {
                    v.missing(format!("{here}.configMap.name"));
                }
                validate_items(&cm.items, &format!("{here}.configMap.items"), v);
            }
            if let Some(secret) = &vol.secret {
                if secret.secret_name.is_empty() {
                    v.missing(format!("{here}.secret.secretName"));
                }
                validate_items(&secret.items, &format!("{here}.secret.items"), v);
            }
            if let Some(e) = &vol.empty_dir {
                if !e.medium.is_empty() && e.medium != "Memory" {
                    v.push(
                        format!("{here}.emptyDir.medium"),
                        format!("invalid value: {:?}, want \"\" or \"Memory\"", e.medium),
                    );
                }
                if let Some(q) = &e.size_limit
                    && let Err(why) = q.value()
                {
                    v.push(format!("{here}.emptyDir.sizeLimit"), why);
                }
            }
            out.insert(vol.name.as_str(), vol.empty_dir.is_none());
        }
        out
    }
}

/// `items` of a ConfigMap or Secret volume: a key each, and a relative path without `..`.
fn validate_items(items: &[crate::core::KeyToPath], at: &str, v: &mut Errors) {
    for (i, item) in items.iter().enumerate() {
        if item.key.is_empty() {
            v.missing(format!("{at}[{i}].key"));
        }
        let bad_path = item.path.is_empty()
            || item.path.starts_with('/')
            || item.path.split('/').any(|p| p == "..");
        if bad_path {
            v.push(
                format!("{at}[{i}].path"),
                format!(
                    "invalid value: {:?}, want a relative path without '..'",
                    item.path
                ),
            );
        }
        if let Some(mode) = item.mode
            && mode > 0o777
        {
            v.push(
                format!("{at}[{i}].mode"),
                format!("expected 0 <= {mode} <= 511"),
            );
        }
    }
}

/// Knative: mount paths a volume may not take (k8s_validation.go `reservedPaths`).
const RESERVED_MOUNT_PATHS: [&str; 6] = ["/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"];

impl Container {
    /// `volumes`: the revision's volume names, each with whether its mounts must be read-only.
    fn validate(&self, at: &str, volumes: &BTreeMap<&str, bool>, v: &mut Errors) {
        // Sluice: Knative requires an image; a local process runs from `command` instead.
        if self.image.is_empty() && self.command.first().is_none_or(|c| c.is_empty()) {
            v.push(
                format!("{at}.image"),
                "missing field(s): give the container's image (run on a container engine) or its \
                 command (run as a local process)",
            );
        }
        for (i, source) in self.env_from.iter().enumerate() {
            let here = format!("{at}.envFrom[{i}]");
            match (&source.config_map_ref, &source.secret_ref) {
                (None, None) => v.push(
                    here,
                    "expected exactly one, got neither: configMapRef, secretRef",
                ),
                (Some(_), Some(_)) => v.push(
                    here,
                    "expected exactly one, got both: configMapRef, secretRef",
                ),
                (Some(r), None) if r.name.is_empty() => {
                    v.missing(format!("{here}.configMapRef.name"))
                }
                (None, Some(r)) if r.name.is_empty() => v.missing(format!("{here}.secretRef.name")),
                _ => {}
            }
        }
        let mut mount_paths = BTreeSet::new();
        for (i, m) in self.volume_mounts.iter().enumerate() {
            let here = format!("{at}.volumeMounts[{i}]");
            match volumes.get(m.name.as_str()) {
                None => v.push(
                    format!("{here}.name"),
                    format!("volumeMount has no matching volume: {:?}", m.name),
                ),
                Some(true) if !m.read_only => v.push(
                    format!("{here}.readOnly"),
                    "volume mount should be readOnly for this type of volume",
                ),
                Some(_) => {}
            }
            if !m.mount_path.starts_with('/') {
                v.push(
                    format!("{here}.mountPath"),
                    format!("must be an absolute path: {:?}", m.mount_path),
                );
            } else if RESERVED_MOUNT_PATHS.contains(&m.mount_path.trim_end_matches('/'))
                || m.mount_path == "/"
            {
                v.push(
                    format!("{here}.mountPath"),
                    format!("mountPath {:?} is a reserved path", m.mount_path),
                );
            } else if !mount_paths.insert(m.mount_path.as_str()) {
                v.push(
                    format!("{here}.mountPath"),
                    format!("{:?} must be unique", m.mount_path),
                );
            }
            if m.sub_path.starts_with('/') || m.sub_path.split('/').any(|p| p == "..") {
                v.push(
                    format!("{here}.subPath"),
                    format!(
                        "invalid value: {:?}, want a relative path without '..'",
                        m.sub_path
                    ),
                );
            }
        }
        if let Some(r) = &self.resources {
            for (list, map) in [("limits", &r.limits), ("requests", &r.requests)] {
                for (name, q) in map {
                    if let Err(why) = q.milli_value() {
                        v.push(format!("{at}.resources.{list}.{name}"), why);
                    }
                }
            }
        }
        for (i, env) in self.env.iter().enumerate() {
            let here = format!("{at}.env[{i}]");
            if env.name.is_empty() {
                v.missing(format!("{here}.name"));
            } else if RESERVED_ENV_VARS.contains(&env.name.as_str()) {
                v.push(
                    format!("{here}.name"),
                    format!("{:?} is a reserved environment variable", env.name),
                );
            }
            if let Some(from) = &env.value_from {
                let here = format!("{here}.valueFrom");
                let sources = [
                    from.config_map_key_ref.is_some(),
                    from.secret_key_ref.is_some(),
                    from.field_ref.is_some(),
                    from.resource_field_ref.is_some(),
                ];
                if sources.iter().filter(|s| **s).count() != 1 {
                    v.push(
                        here.clone(),
                        "expected exactly one: configMapKeyRef, fieldRef, resourceFieldRef, \
                         secretKeyRef",
                    );
                }
                for (field, r) in [
                    ("configMapKeyRef", &from.config_map_key_ref),
                    ("secretKeyRef", &from.secret_key_ref),
                ] {
                    if let Some(r) = r {
                        if r.name.is_empty() {
                            v.missing(format!("{here}.{field}.name"));
                        }
                        if r.key.is_empty() {
                            v.missing(format!("{here}.{field}.key"));
                        }
                    }
                }
                if let Some(f) = &from.field_ref
                    && f.field_path.is_empty()
                {
                    v.missing(format!("{here}.fieldRef.fieldPath"));
                }
            }
            if !env.value.is_empty() && env.value_from.is_some() {
                v.push(
                    format!("{here}.valueFrom"),
                    "may not be specified when `value` is not empty",
                );
            }
        }
        // Knative: at most one port, named http1 or h2c, not a queue-proxy port.
        if self.ports.len() > 1 {
            v.push(
                format!("{at}.ports"),
                "more than one container port is not supported",
            );
        }
        for (i, p) in self.ports.iter().enumerate() {
            let here = format!("{at}.ports[{i}]");
            if !p.name.is_empty() && p.name != PORT_NAME_HTTP1 && p.name != PORT_NAME_H2C {
                v.push(
                    format!("{here}.name"),
                    format!(
                        "invalid value: {:?}, want {PORT_NAME_HTTP1:?} or {PORT_NAME_H2C:?}",
                        p.name
                    ),
                );
            }
            if p.container_port != 0 && !(1..=65535).contains(&p.container_port) {
                v.out_of_bounds(
                    format!("{here}.containerPort"),
                    p.container_port.into(),
                    1,
                    65535,
                );
            } else if RESERVED_PORTS.contains(&p.container_port) {
                v.push(
                    format!("{here}.containerPort"),
                    format!("{} is a reserved port", p.container_port),
                );
            }
            if !p.protocol.is_empty() && p.protocol != "TCP" {
                v.push(
                    format!("{here}.protocol"),
                    format!("invalid value: {:?}, want \"TCP\"", p.protocol),
                );
            }
        }
        for (name, probe) in [
            ("readinessProbe", &self.readiness_probe),
            ("livenessProbe", &self.liveness_probe),
            ("startupProbe", &self.startup_probe),
        ] {
            if let Some(p) = probe {
                p.validate(&format!("{at}.{name}"), v);
            }
        }
    }
}

impl Probe {
    fn validate(&self, at: &str, v: &mut Errors) {
        let handlers = [
            self.exec.is_some(),
            self.http_get.is_some(),
            self.tcp_socket.is_some(),
            self.grpc.is_some(),
        ];
        // Knative: a probe may have at most one handler (defaulting adds tcpSocket when none).
        if handlers.iter().filter(|h| **h).count() > 1 {
            v.push(
                at.to_string(),
                "expected exactly one, got multiple: exec, grpc, httpGet, tcpSocket",
            );
        }
        for (field, value, min) in [
            ("initialDelaySeconds", self.initial_delay_seconds, 0),
            ("timeoutSeconds", self.timeout_seconds, 0),
            ("periodSeconds", self.period_seconds, 0),
            ("successThreshold", self.success_threshold, 0),
            ("failureThreshold", self.failure_threshold, 0),
        ] {
            if value < min {
                v.push(
                    format!("{at}.{field}"),
                    format!("invalid value: {value}, must be >= {min}"),
                );
            }
        }
        if let Some(h) = &self.http_get
            && !h.scheme.is_empty()
            && h.scheme != "HTTP"
            && h.scheme != "HTTPS"
        {
            v.push(
                format!("{at}.httpGet.scheme"),
                format!("invalid value: {:?}, want \"HTTP\" or \"HTTPS\"", h.scheme),
            );
        }
        if let Some(e) = &self.exec
            && e.command.is_empty()
        {
            v.missing(format!("{at}.exec.command"));
        }
    }
}

impl RevisionTemplateSpec {
    /// Knative's RevisionTemplateSpec.Validate: the spec, and a brought-your-own name that is a
    /// DNS-1035 label prefixed with `<parent>-`.
    fn validate(&self, at: &str, parent: &str, d: &Defaults, v: &mut Errors) {
        self.spec.validate(&format!("{at}.spec"), d, v);
        let name = &self.metadata.name;
        if !name.is_empty() {
            if let Err(why) = dns1035_label(name) {
                v.push(
                    format!("{at}.metadata.name"),
                    format!("invalid value: not a DNS 1035 label: {why}"),
                );
            } else if !name.starts_with(&format!("{parent}-")) {
                v.push(
                    format!("{at}.metadata.name"),
                    format!("invalid value: {name:?} must have prefix \"{parent}-\""),
                );
            }
        }
    }
}

impl TrafficTarget {
    /// Knative's TrafficTarget.SetDefaults: latestRevision defaults to "no revisionName given".
    pub fn set_defaults(&mut self) {
        if self.latest_revision.is_none() {
            self.latest_revision = Some(self.revision_name.is_empty());
        }
    }

    /// Whether this target floats to the latest ready revision of its configuration.
    pub fn is_latest(&self) -> bool {
        self.latest_revision
            .unwrap_or(self.revision_name.is_empty())
    }
}

impl RouteSpec {
    /// Knative's RouteSpec.SetDefaults; with `default_configuration` (a Service's own Route) an empty
    /// traffic list becomes 100% to the latest revision of that configuration.
    pub fn set_defaults(&mut self, default_configuration: Option<&str>) {
        if self.traffic.is_empty() && default_configuration.is_some() {
            self.traffic = vec![TrafficTarget {
                percent: Some(100),
                latest_revision: Some(true),
                ..Default::default()
            }];
        }
        for t in &mut self.traffic {
            t.set_defaults();
        }
    }

    /// Knative's validateTrafficList (route_validation.go). `default_configuration` is set for a
    /// Service, where `configurationName` is implied and may not be given.
    fn validate(&self, at: &str, default_configuration: bool, v: &mut Errors) {
        let mut sum: i64 = 0;
        let mut tags: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in self.traffic.iter().enumerate() {
            let here = format!("{at}[{i}]");
            if let Some(latest) = t.latest_revision {
                let pinned = !t.revision_name.is_empty();
                if pinned == latest {
                    v.push(
                        format!("{here}.latestRevision"),
                        format!(
                            "may not set revisionName {:?} when latestRevision is {latest}",
                            t.revision_name
                        ),
                    );
                }
            }
            if default_configuration && !t.configuration_name.is_empty() {
                v.push(
                    format!("{here}.configurationName"),
                    "must not set the field(s)",
                );
            } else if !t.revision_name.is_empty() && !t.configuration_name.is_empty() {
                v.push(
                    format!("{here}.revisionName, {here}.configurationName"),
                    "expected exactly one, got both",
                );
            } else if !t.revision_name.is_empty() {
                if let Err(why) = dns1123_subdomain(&t.revision_name) {
                    v.push(
                        format!("{here}.revisionName"),
                        format!("invalid key name {:?}: {why}", t.revision_name),
                    );
                }
            } else if !t.configuration_name.is_empty() {
                if let Err(why) = dns1123_subdomain(&t.configuration_name) {
                    v.push(
                        format!("{here}.configurationName"),
                        format!("invalid key name {:?}: {why}", t.configuration_name),
                    );
                }
            } else if !default_configuration {
                v.push(
                    format!("{here}.revisionName, {here}.configurationName"),
                    "expected exactly one, got neither",
                );
            }
            if let Some(p) = t.percent {
                if !(0..=100).contains(&p) {
                    v.out_of_bounds(format!("{here}.percent"), p, 0, 100);
                }
                sum += p;
            }
            if t.url.is_some() {
                v.push(format!("{here}.url"), "must not set the field(s)");
            }
            if t.tag.is_empty() {
                continue;
            }
            if let Err(why) = dns1035_label(&t.tag) {
                v.push(
                    format!("{here}.tag"),
                    format!("invalid value: not a DNS 1035 label: {why}"),
                );
            }
            if let Some(first) = tags.get(t.tag.as_str()) {
                v.push(
                    format!("{here}.tag, {at}[{first}].tag"),
                    format!("Multiple definitions for {:?}", t.tag),
                );
            } else {
                tags.insert(&t.tag, i);
            }
        }
        if sum != 100 {
            v.push(
                at.to_string(),
                format!("Traffic targets sum to {sum}, want 100"),
            );
        }
    }
}

impl Service {
    /// Knative's Service.SetDefaults: the template's spec and the route's traffic.
    pub fn set_defaults(&mut self, d: &Defaults) {
        self.spec.template.spec.set_defaults(d);
        let mut route = self.spec.route_spec();
        route.set_defaults(Some(&self.metadata.name));
        self.spec.traffic = route.traffic;
    }

    /// Knative's Service.Validate with Sluice's local-process rules; call on the object as written
    /// (before [`Service::set_defaults`]) so errors name the fields the user wrote.
    pub fn validate(&self, d: &Defaults) -> Result<(), ValidationError> {
        let mut v = Errors::default();
        v.name("metadata.name", &self.metadata.name);
        self.spec
            .template
            .validate("spec.template", &self.metadata.name, d, &mut v);
        // Knative validates the defaulted traffic (an empty list means 100% latest).
        let mut route = self.spec.route_spec();
        route.set_defaults(Some(&self.metadata.name));
        route.validate("spec.traffic", true, &mut v);
        v.finish()
    }
}

impl Configuration {
    pub fn set_defaults(&mut self, d: &Defaults) {
        self.spec.template.spec.set_defaults(d);
    }

    pub fn validate(&self, d: &Defaults) -> Result<(), ValidationError> {
        let mut v = Errors::default();
        v.name("metadata.name", &self.metadata.name);
        self.spec
            .template
            .validate("spec.template", &self.metadata.name, d, &mut v);
        v.finish()
    }
}

impl Route {
    pub fn set_defaults(&mut self) {
        self.spec.set_defaults(None);
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut v = Errors::default();
        v.name("metadata.name", &self.metadata.name);
        if let Some(vis) = self.metadata.labels.get(VISIBILITY_LABEL)
            && vis != VISIBILITY_CLUSTER_LOCAL
        {
            v.push(
                format!("metadata.labels.{VISIBILITY_LABEL}"),
                format!("invalid value: {vis:?}, want {VISIBILITY_CLUSTER_LOCAL:?}"),
            );
        }
        let mut spec = self.spec.clone();
        spec.set_defaults(None);
        spec.validate("spec.traffic", false, &mut v);
        v.finish()
    }
}

#[derive(Default)]
struct Errors {
    errors: Vec<FieldError>,
}

impl Errors {
    fn push(&mut self, field: String, message: impl Into<String>) {
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }
    fn missing(&mut self, field: String) {
        self.push(field, "missing field(s)");
    }
    /// Knative's apis.ErrOutOfBoundsValue wording.
    fn out_of_bounds(&mut self, field: String, value: i64, min: i64, max: i64) {
        self.push(field, format!("expected {min} <= {value} <= {max}"));
    }
    /// Object names become host labels (`<name>.<namespace>.<domain>`): Knative requires a DNS-1035
    /// label for Services and a DNS-1123 label-compatible name for Routes and Configurations.
    fn name(&mut self, field: &str, name: &str) {
        if name.is_empty() {
            return self.missing(field.to_string());
        }
        if let Err(why) = dns1035_label(name) {
            self.push(
                field.to_string(),
                format!("invalid value: not a DNS 1035 label: {why}"),
            );
        }
    }
    fn finish(self) -> Result<(), ValidationError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                errors: self.errors,
            })
        }
    }
}

/// Kubernetes' IsDNS1035Label: lower-case alphanumerics and '-', starting with a letter, ending
/// alphanumeric, at most 63 characters.
pub fn dns1035_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', \
             start with an alphabetic character, end with an alphanumeric character and be at \
             most 63 characters"
                .to_string(),
        )
    }
}

/// Kubernetes' IsDNS1123Subdomain (what object names must be).
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
                .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Object, parse_documents};

    const SERVICE: &str = "\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: web
  namespace: ns
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/min-scale: \"1\"
    spec:
      containerConcurrency: 10
      containers:
      - image: ghcr.io/example/web
        command: [python3, -m, http.server]
        args: [\"8080\"]
        env: [{name: GREETING, value: hi}]
        ports: [{containerPort: 8080, name: h2c}]
        resources: {limits: {cpu: \"1\"}}
        volumeMounts: [{name: data, mountPath: /data}]
        readinessProbe:
          httpGet: {path: /healthz, httpHeaders: [{name: X, value: y}]}
          periodSeconds: 2
      volumes: [{name: data, emptyDir: {}}]
  traffic:
  - latestRevision: true
    percent: 80
  - revisionName: web-00001
    percent: 20
    tag: old
";

    fn service(text: &str) -> Service {
        match parse_documents(text).remove(0) {
            Ok(Object::KnativeService(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    fn errors(r: Result<(), ValidationError>) -> Vec<String> {
        match r {
            Ok(()) => vec![],
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn ordinary_knative_service_yaml_reads_and_validates() {
        let s = service(SERVICE);
        assert_eq!(s.kind, "Service");
        assert_eq!(s.api_version, API_VERSION);
        let c = &s.spec.template.spec.containers[0];
        assert_eq!(c.command, ["python3", "-m", "http.server"]);
        assert_eq!(c.ports[0].name, "h2c");
        assert_eq!(s.spec.template.spec.protocol(), Protocol::H2c);
        let probe = c.readiness_probe.as_ref().unwrap();
        assert_eq!(probe.http_get.as_ref().unwrap().path, "/healthz");
        assert_eq!(s.spec.traffic[1].tag, "old");
        assert_eq!(
            errors(s.validate(&Defaults::default())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn defaults_fill_timeout_concurrency_name_probe_and_traffic() {
        let mut s = Service::default();
        s.metadata.name = "web".into();
        s.spec.template.spec.containers = vec![Container {
            command: vec!["srv".into()],
            ..Default::default()
        }];
        s.set_defaults(&Defaults::default());
        let spec = &s.spec.template.spec;
        assert_eq!(spec.timeout_seconds, Some(300));
        assert_eq!(spec.container_concurrency, Some(0));
        assert_eq!(spec.containers[0].name, "user-container");
        let probe = spec.containers[0].readiness_probe.as_ref().unwrap();
        assert_eq!(probe.tcp_socket, Some(TcpSocketAction::default()));
        assert_eq!(probe.success_threshold, 1);
        assert_eq!(
            s.spec.traffic,
            [TrafficTarget {
                latest_revision: Some(true),
                percent: Some(100),
                ..Default::default()
            }]
        );
    }

    #[test]
    fn a_container_needs_an_image_or_a_command() {
        let s = service(&SERVICE.replace("        command: [python3, -m, http.server]\n", ""));
        assert_eq!(
            errors(s.validate(&Defaults::default())),
            Vec::<String>::new()
        );
        let s = service(
            &SERVICE
                .replace("        command: [python3, -m, http.server]\n", "")
                .replace(
                    "      - image: ghcr.io/example/web\n",
                    "      - name: web\n",
                ),
        );
        let errs = errors(s.validate(&Defaults::default()));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("spec.template.spec.containers[0].image: missing field(s)"),
            "{errs:?}"
        );
    }

    #[test]
    fn env_sources_volumes_and_mounts_are_validated_as_knative_does() {
        // (what to replace, with what, the one error wanted; "" = valid)
        let table: &[(&str, &str, &str)] = &[
            (
                "env: [{name: GREETING, value: hi}]",
                "env: [{name: A, valueFrom: {configMapKeyRef: {name: c, key: k}}}, {name: B, valueFrom: {secretKeyRef: {name: s, key: k, optional: true}}}]",
                "",
            ),
            (
                "env: [{name: GREETING, value: hi}]",
                "env: [{name: A, valueFrom: {configMapKeyRef: {name: c}}}]",
                "spec.template.spec.containers[0].env[0].valueFrom.configMapKeyRef.key: missing field(s)",
            ),
            (
                "env: [{name: GREETING, value: hi}]",
                "env: [{name: A, valueFrom: {}}]",
                "spec.template.spec.containers[0].env[0].valueFrom: expected exactly one",
            ),
            (
                "env: [{name: GREETING, value: hi}]",
                "envFrom: [{prefix: X_, configMapRef: {name: c}}, {secretRef: {name: s}}]",
                "",
            ),
            (
                "env: [{name: GREETING, value: hi}]",
                "envFrom: [{prefix: X_}]",
                "spec.template.spec.containers[0].envFrom[0]: expected exactly one, got neither",
            ),
            (
                "volumeMounts: [{name: data, mountPath: /data}]",
                "volumeMounts: [{name: other, mountPath: /data}]",
                "spec.template.spec.containers[0].volumeMounts[0].name: volumeMount has no matching volume",
            ),
            (
                "volumeMounts: [{name: data, mountPath: /data}]",
                "volumeMounts: [{name: data, mountPath: data}]",
                "spec.template.spec.containers[0].volumeMounts[0].mountPath: must be an absolute path",
            ),
            (
                "volumeMounts: [{name: data, mountPath: /data}]",
                "volumeMounts: [{name: data, mountPath: /var/log}]",
                "spec.template.spec.containers[0].volumeMounts[0].mountPath: mountPath \"/var/log\" is a reserved path",
            ),
            (
                "volumes: [{name: data, emptyDir: {}}]",
                "volumes: [{name: data, configMap: {name: c, items: [{key: a, path: x/a.txt, mode: 0400}]}}]",
                "spec.template.spec.containers[0].volumeMounts[0].readOnly: volume mount should be readOnly",
            ),
            (
                "volumes: [{name: data, emptyDir: {}}]",
                "volumes: [{name: data, emptyDir: {}}, {name: spare, secret: {secretName: s}}]",
                "spec.template.spec.volumes[1].name: volume with name \"spare\" not mounted",
            ),
            (
                "volumes: [{name: data, emptyDir: {}}]",
                "volumes: [{name: data, secret: {secretName: s, items: [{key: k, path: ../k}]}}]",
                "spec.template.spec.volumes[0].secret.items[0].path: invalid value",
            ),
            (
                "volumes: [{name: data, emptyDir: {}}]",
                "volumes: [{name: data, emptyDir: {}, secret: {secretName: s}}]",
                "spec.template.spec.volumes[0]: expected exactly one, got both",
            ),
            (
                "resources: {limits: {cpu: \"1\"}}",
                "resources: {limits: {cpu: 1x}}",
                "spec.template.spec.containers[0].resources.limits.cpu: quantity \"1x\"",
            ),
        ];
        for (from, to, want) in table {
            let text = SERVICE.replace(from, to);
            assert_ne!(text, SERVICE, "{to}");
            let errs = errors(service(&text).validate(&Defaults::default()));
            if want.is_empty() {
                assert_eq!(errs, Vec::<String>::new(), "{to}");
            } else {
                assert!(
                    !errs.is_empty() && errs[0].starts_with(want),
                    "{to}: {errs:?}"
                );
            }
        }
    }

    #[test]
    fn several_containers_need_exactly_one_port() {
        let sidecar = "      - image: sidecar\n        name: side\n";
        let two = SERVICE.replace(
            "      containers:\n",
            &format!("      containers:\n{sidecar}"),
        );
        assert_eq!(
            errors(service(&two).validate(&Defaults::default())),
            Vec::<String>::new()
        );
        let none = two.replace("        ports: [{containerPort: 8080, name: h2c}]\n", "");
        assert_eq!(
            errors(service(&none).validate(&Defaults::default())),
            ["spec.template.spec.containers.ports: missing field(s)"]
        );
        let both = two.replace(
            sidecar,
            &format!("{sidecar}        ports: [{{containerPort: 9000}}]\n"),
        );
        let errs = errors(service(&both).validate(&Defaults::default()));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "spec.template.spec.containers[*].ports: more than one container port"
            ),
            "{errs:?}"
        );
        let mut s = service(SERVICE);
        s.spec.template.spec.init_containers = vec![serde_json::json!({"name": "init"})];
        let errs = errors(s.validate(&Defaults::default()));
        assert!(
            errs[0].starts_with("spec.template.spec.initContainers: not supported"),
            "{errs:?}"
        );
    }

    #[test]
    fn revision_spec_bounds_follow_config_defaults() {
        let d = Defaults::default();
        let table: &[(&str, &str, &str)] = &[
            (
                "containerConcurrency: 10",
                "containerConcurrency: 1001",
                "spec.template.spec.containerConcurrency: expected 0 <= 1001 <= 1000",
            ),
            (
                "containerConcurrency: 10",
                "containerConcurrency: 10\n      timeoutSeconds: 601",
                "spec.template.spec.timeoutSeconds: expected 0 <= 601 <= 600",
            ),
            (
                "{containerPort: 8080, name: h2c}",
                "{containerPort: 8012}",
                "spec.template.spec.containers[0].ports[0].containerPort: 8012 is a reserved port",
            ),
            (
                "{containerPort: 8080, name: h2c}",
                "{containerPort: 8080, name: grpc}",
                "spec.template.spec.containers[0].ports[0].name: invalid value: \"grpc\", want \"http1\" or \"h2c\"",
            ),
            (
                "{name: GREETING, value: hi}",
                "{name: PORT, value: \"1\"}",
                "spec.template.spec.containers[0].env[0].name: \"PORT\" is a reserved environment variable",
            ),
        ];
        for (from, to, want) in table {
            let s = service(&SERVICE.replace(from, to));
            assert_eq!(errors(s.validate(&d)), [*want], "{to}");
        }
    }

    #[test]
    fn traffic_rules_match_knative() {
        let table: &[(&str, &str)] = &[
            (
                "  - latestRevision: true\n    percent: 80\n  - revisionName: web-00001\n    percent: 10\n",
                "spec.traffic: Traffic targets sum to 90, want 100",
            ),
            (
                "  - latestRevision: true\n    percent: 50\n    tag: a\n  - revisionName: web-00001\n    percent: 50\n    tag: a\n",
                "spec.traffic[1].tag, spec.traffic[0].tag: Multiple definitions for \"a\"",
            ),
            (
                "  - latestRevision: true\n    percent: 100\n    tag: Bad_Tag\n",
                "spec.traffic[0].tag: invalid value: not a DNS 1035 label",
            ),
            (
                "  - latestRevision: true\n    revisionName: web-00001\n    percent: 100\n",
                "spec.traffic[0].latestRevision: may not set revisionName \"web-00001\" when latestRevision is true",
            ),
            (
                "  - configurationName: other\n    percent: 100\n",
                "spec.traffic[0].configurationName: must not set the field(s)",
            ),
        ];
        let head = SERVICE.split("  traffic:\n").next().unwrap();
        for (traffic, want) in table {
            let s = service(&format!("{head}  traffic:\n{traffic}"));
            let errs = errors(s.validate(&Defaults::default()));
            assert_eq!(errs.len(), 1, "{traffic}: {errs:?}");
            assert!(errs[0].starts_with(want), "{traffic}: {errs:?}");
        }
    }

    #[test]
    fn template_name_must_be_prefixed_with_the_parent() {
        let mut s = service(SERVICE);
        s.spec.template.metadata.name = "other-v1".into();
        assert_eq!(
            errors(s.validate(&Defaults::default())),
            ["spec.template.metadata.name: invalid value: \"other-v1\" must have prefix \"web-\""]
        );
        s.spec.template.metadata.name = "web-v1".into();
        assert_eq!(
            errors(s.validate(&Defaults::default())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn standalone_route_needs_a_target_kind() {
        let mut r = Route::default();
        r.metadata.name = "r".into();
        r.spec.traffic = vec![TrafficTarget {
            percent: Some(100),
            ..Default::default()
        }];
        assert_eq!(
            errors(r.validate()),
            [
                "spec.traffic[0].revisionName, spec.traffic[0].configurationName: expected exactly one, got neither"
            ]
        );
        r.spec.traffic[0].configuration_name = "c".into();
        assert_eq!(errors(r.validate()), Vec::<String>::new());
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level_of_spec() {
        // (the good line, what the user wrote instead, field path, line, message)
        let cases = [
            (
                "      containerConcurrency: 10\n",
                "      containerConcurency: 5\n",
                "spec.template.spec.containerConcurency",
                12,
                "unknown field (did you mean `containerConcurrency`?)",
            ),
            (
                "        command: [python3, -m, http.server]\n",
                "        comand: [python3, -m, http.server]\n",
                "spec.template.spec.containers[0].comand",
                15,
                "unknown field (did you mean `command`?)",
            ),
            (
                "        env: [{name: GREETING, value: hi}]\n",
                "        env:\n        - name: GREETING\n          vaule: hi\n",
                "spec.template.spec.containers[0].env[0].vaule",
                19,
                "unknown field (did you mean `value`?)",
            ),
            (
                "  traffic:\n",
                "  trafic: []\n  traffic:\n",
                "spec.trafic",
                25,
                "unknown field (did you mean `traffic`?)",
            ),
            (
                "          periodSeconds: 2\n",
                "          periodSecond: 2\n",
                "spec.template.spec.containers[0].readinessProbe.periodSecond",
                23,
                "unknown field (did you mean `periodSeconds`?)",
            ),
            (
                "      volumes:",
                "      nodeSelector: {a: b}\n      volumes:",
                "spec.template.spec.nodeSelector",
                24,
                "unknown field",
            ),
        ];
        for (good, typo, field, line, message) in cases {
            let bad = SERVICE.replace(good, typo);
            assert_ne!(bad, SERVICE, "{typo}");
            let err = parse_documents(&bad).remove(0).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert_eq!(err.line, Some(line), "{err}");
            assert_eq!(err.message, message, "{err}");
        }
    }

    #[test]
    fn a_full_knative_service_with_every_supported_field_is_accepted() {
        let full = format!(
            "{SERVICE}status:
  observedGeneration: 3
  url: http://web.ns.example.com
  somethingNewer: {{a: b}}
"
        )
        .replace(
            "metadata:\n  name: web\n  namespace: ns\n",
            "metadata:
  name: web
  namespace: ns
  uid: 6a1b
  resourceVersion: \"42\"
  generation: 3
  creationTimestamp: \"2024-01-01T00:00:00Z\"
  selfLink: /apis/serving.knative.dev/v1/namespaces/ns/services/web
  generateName: web-
  managedFields: [{manager: kubectl, operation: Update}]
  labels: {app: web}
  annotations: {serving.knative.dev/creator: me}
",
        )
        .replace(
            "      containerConcurrency: 10\n",
            "      containerConcurrency: 10
      timeoutSeconds: 300
      responseStartTimeoutSeconds: 30
      idleTimeoutSeconds: 60
      serviceAccountName: web
      automountServiceAccountToken: false
      enableServiceLinks: false
      imagePullSecrets: [{name: pull}]
",
        )
        .replace(
            "      - image: ghcr.io/example/web\n",
            "      - image: ghcr.io/example/web
        name: user-container
        workingDir: /srv
        imagePullPolicy: IfNotPresent
        securityContext: {runAsNonRoot: true}
        terminationMessagePath: /dev/termination-log
        terminationMessagePolicy: File
        envFrom: []
        livenessProbe:
          tcpSocket: {port: 8080}
          initialDelaySeconds: 1
          timeoutSeconds: 1
          successThreshold: 1
          failureThreshold: 3
        startupProbe:
          exec: {command: [\"true\"]}
",
        )
        .replace(
            "        env: [{name: GREETING, value: hi}]\n",
            "        env:
        - {name: GREETING, value: hi}
        - {name: FROM, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
",
        )
        .replace(
            "          httpGet: {path: /healthz, httpHeaders: [{name: X, value: y}]}\n",
            "          httpGet: {path: /healthz, port: 8080, host: localhost, scheme: HTTP, httpHeaders: [{name: X, value: y}]}\n",
        )
        .replace(
            "        ports: [{containerPort: 8080, name: h2c}]\n",
            "        ports: [{containerPort: 8080, name: h2c, protocol: TCP}]\n",
        )
        .replace(
            "    tag: old\n",
            "    tag: old\n  - configurationName: web\n    latestRevision: false\n    percent: 0\n",
        );
        let svc = service(&full);
        let spec = &svc.spec.template.spec;
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.containers[0].termination_message_policy,
            "File".to_string()
        );
        assert_eq!(svc.metadata.generation, 3);
        assert_eq!(svc.spec.traffic.len(), 3);
        // Every example shipped with Sluice still reads.
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut read = 0;
        for entry in walk(&examples) {
            let text = std::fs::read_to_string(&entry).unwrap();
            for doc in parse_documents(&text) {
                if let Err(e) = doc {
                    panic!("{}: {e}", entry.display());
                }
                read += 1;
            }
        }
        assert!(read > 0, "no examples under {}", examples.display());
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn status_serializes_in_knative_shape() {
        let mut s = Service::default();
        s.metadata.name = "web".into();
        s.status.url = Some("http://web.ns.localhost".into());
        s.status.latest_ready_revision_name = "web-00001".into();
        s.status.status.observed_generation = 1;
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["status"]["url"], "http://web.ns.localhost");
        assert_eq!(v["status"]["latestReadyRevisionName"], "web-00001");
        assert_eq!(v["status"]["observedGeneration"], 1);
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["apiVersion"], "serving.knative.dev/v1");
    }
}
