//! A Knative Revision as the runtime's [`LaunchSpec`]: pure mapping, no I/O. The serving plane gives
//! it the namespace's ConfigMaps and Secrets from the folder and writes the volume files it returns.
//!
//! When ConfigMaps and Secrets are read: once, when the revision is first launched (or when it recovers
//! from a missing one). Kubernetes also reads env only when a pod starts, and a revision's instances are
//! all started from one launch spec here, so a changed ConfigMap reaches a revision only through a new
//! revision or a restart of `sluice up` (on a cluster new pods would see it at their start, and mounted
//! volumes would be refreshed after a while).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use sluice_api::core::{ConfigMap, KeyToPath, Secret};
use sluice_api::ingress::IntOrString;
use sluice_api::serving::{self, Container, Revision};
use sluice_runtime::{
    ImageSpec, LaunchSpec, Mount, MountSource, Probe, ProbeAction, PullPolicy, Resources,
    RuntimeKind, SecurityContext, SidecarSpec,
};

/// Kubernetes' waiting reason for a container whose env or volumes name a missing ConfigMap, Secret
/// or key; Knative shows it as the Revision's Ready=False reason.
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// A revision the process runtime cannot run (only an image, or sidecars) while no engine answers.
pub const REASON_ENGINE_UNAVAILABLE: &str = "ContainerEngineUnavailable";
/// A spec the runtime cannot run as written (a bad imagePullPolicy, no image for the container runtime).
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Knative's default container port.
pub const DEFAULT_CONTAINER_PORT: u16 = 8080;
/// Kubernetes' default mode of ConfigMap and Secret volume files.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// What [`launch_spec`] reads besides the revision.
pub struct LaunchInputs<'a> {
    pub runtime: RuntimeKind,
    /// The folder `sluice up` serves: a process's relative `workingDir` is taken from here.
    pub dir: &'a Path,
    /// Where this revision's ConfigMap and Secret volumes are written (one folder per volume).
    pub volume_root: &'a Path,
    /// ConfigMaps and Secrets of every namespace, by `(namespace, name)`.
    pub config_maps: &'a BTreeMap<(String, String), ConfigMap>,
    pub secrets: &'a BTreeMap<(String, String), std::sync::Arc<Secret>>,
    /// The image ID the revision was resolved to before (kept across restarts).
    pub pinned: Option<String>,
}

/// A revision ready to hand to the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub spec: LaunchSpec,
    /// Files to write before the runtime starts an instance (ConfigMap and Secret volumes).
    pub files: Vec<VolumeFile>,
    /// Fields Knative allows that Sluice does not honour here, for the user.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// Why the revision cannot run now, in Knative's terms (the Revision's Ready=False reason and message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchFailure {
    pub reason: String,
    pub message: String,
}

impl LaunchFailure {
    fn new(reason: &str, message: impl Into<String>) -> Self {
        LaunchFailure {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// Maps `rev` (defaulted by the serving controller) into the runtime's spec.
pub fn launch_spec(rev: &Revision, inputs: &LaunchInputs<'_>) -> Result<Launch, LaunchFailure> {
    let containers = &rev.spec.containers;
    // Knative: with several containers the one with a port serves; the others are sidecars.
    let serving_index = containers
        .iter()
        .position(|c| !c.ports.is_empty())
        .unwrap_or(0);
    let container = containers.get(serving_index).ok_or_else(|| {
        LaunchFailure::new(
            REASON_INVALID_SPEC,
            "spec.containers: a revision needs a container to run",
        )
    })?;
    let at = |i: usize| format!("spec.containers[{i}]");
    let labels = &rev.metadata.labels;
    let service = labels
        .get(serving::SERVICE_LABEL)
        .cloned()
        .unwrap_or_default();
    let configuration = labels
        .get(serving::CONFIGURATION_LABEL)
        .cloned()
        .unwrap_or_default();
    let mut warnings = Vec::new();
    let container_runtime = inputs.runtime == RuntimeKind::Container;

    if !container_runtime {
        if container.command.is_empty() {
            return Err(LaunchFailure::new(
                REASON_ENGINE_UNAVAILABLE,
                format!(
                    "{}: only an image ({:?}) and no command, and no container engine answers: start \
                     Docker or Podman (or set DOCKER_HOST to its socket) and restart `sluice up`, or \
                     give the container a `command` to run it as a local process",
                    at(serving_index),
                    container.image
                ),
            ));
        }
        if containers.len() > 1 {
            return Err(LaunchFailure::new(
                REASON_ENGINE_UNAVAILABLE,
                format!(
                    "the revision has {} containers, and sidecars run only on a container engine: \
                     start Docker or Podman (or set DOCKER_HOST) and restart `sluice up`",
                    containers.len()
                ),
            ));
        }
    }

    let container_port = match container.ports.first() {
        Some(p) if p.container_port > 0 => u16::try_from(p.container_port).map_err(|_| {
            LaunchFailure::new(
                REASON_INVALID_SPEC,
                format!(
                    "{}.ports[0].containerPort: {} is not a port",
                    at(serving_index),
                    p.container_port
                ),
            )
        })?,
        _ => DEFAULT_CONTAINER_PORT,
    };
    let port_names: BTreeSet<&str> = container.ports.iter().map(|p| p.name.as_str()).collect();

    let mut spec = LaunchSpec::new(
        container.command.clone(),
        service,
        configuration,
        rev.metadata.name.clone(),
    );
    spec.args = container.args.clone();
    spec.container_name = container.name.clone();
    spec.env = resolve_env(container, rev, inputs, &at(serving_index), &mut warnings)?;
    let timeout_seconds = rev.spec.timeout_seconds.unwrap_or(300).max(0) as u64;
    // Knative: the pod's terminationGracePeriodSeconds is the revision timeout, so in-flight
    // requests can finish; locally at most Kubernetes' default 30 s, so Ctrl-C does not hang.
    spec.grace_period = Duration::from_secs(timeout_seconds.clamp(1, 30));
    let probe_port = |port: Option<&IntOrString>, field: &str, warnings: &mut Vec<String>| {
        probe_port(
            port,
            container_port,
            &port_names,
            container_runtime,
            field,
            warnings,
        )
    };
    if let Some(p) = &container.readiness_probe {
        let field = format!("{}.readinessProbe", at(serving_index));
        spec.readiness = runtime_probe(p, true, &field, &probe_port, &mut warnings);
    }
    if let Some(p) = &container.liveness_probe {
        let field = format!("{}.livenessProbe", at(serving_index));
        spec.liveness = Some(runtime_probe(p, false, &field, &probe_port, &mut warnings));
    }
    if let Some(p) = &container.startup_probe {
        let field = format!("{}.startupProbe", at(serving_index));
        spec.startup = Some(runtime_probe(p, false, &field, &probe_port, &mut warnings));
    }

    // The process runtime mounts nothing: its processes see the machine's files.
    let mut files = Vec::new();
    let volume_mounts = if container_runtime {
        volumes(rev, inputs, &mut files)?
    } else {
        BTreeMap::new()
    };
    if container_runtime {
        spec.image = Some(image_spec(
            container,
            &at(serving_index),
            inputs.pinned.clone(),
        )?);
        spec.container_port = Some(container_port);
        spec.working_dir =
            (!container.working_dir.is_empty()).then(|| PathBuf::from(&container.working_dir));
        spec.resources = resources(container, &at(serving_index), &mut warnings)?;
        spec.mounts = mounts(container, &volume_mounts, &at(serving_index), &mut warnings);
        spec.security = security(container, &at(serving_index), &mut warnings);
        for (i, c) in containers.iter().enumerate() {
            if i == serving_index {
                continue;
            }
            let no_port = |_: Option<&IntOrString>, _: &str, _: &mut Vec<String>| None;
            let sidecar_probe = |p: &Option<serving::Probe>, name: &str, w: &mut Vec<String>| {
                p.as_ref().map(|p| {
                    let mut probe =
                        runtime_probe(p, false, &format!("{}.{name}", at(i)), &no_port, w);
                    probe.port = sidecar_probe_port(p);
                    probe
                })
            };
            spec.sidecars.push(SidecarSpec {
                name: c.name.clone(),
                image: image_spec(c, &at(i), None)?,
                command: c.command.clone(),
                args: c.args.clone(),
                env: resolve_env(c, rev, inputs, &at(i), &mut warnings)?,
                working_dir: (!c.working_dir.is_empty()).then(|| PathBuf::from(&c.working_dir)),
                readiness: sidecar_probe(&c.readiness_probe, "readinessProbe", &mut warnings),
                liveness: sidecar_probe(&c.liveness_probe, "livenessProbe", &mut warnings),
                startup: sidecar_probe(&c.startup_probe, "startupProbe", &mut warnings),
                resources: resources(c, &at(i), &mut warnings)?,
                mounts: mounts(c, &volume_mounts, &at(i), &mut warnings),
                security: security(c, &at(i), &mut warnings),
            });
        }
    } else {
        spec.working_dir = Some(process_working_dir(inputs.dir, &container.working_dir));
        let ignored: Vec<&str> = [
            (
                container
                    .resources
                    .as_ref()
                    .is_some_and(|r| !r.limits.is_empty()),
                "resources.limits",
            ),
            (!container.volume_mounts.is_empty(), "volumeMounts"),
            (container.security_context.is_some(), "securityContext"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if !ignored.is_empty() {
            warnings.push(format!(
                "{}: {} not enforced by the process runtime (no container engine answers)",
                at(serving_index),
                ignored.join(", ")
            ));
        }
    }
    warnings.extend(unhonoured(rev));
    Ok(Launch {
        spec,
        files,
        warnings,
    })
}

/// A process's working directory: relative to the folder `sluice up` serves.
pub fn process_working_dir(base: &Path, dir: &str) -> PathBuf {
    if dir.is_empty() {
        base.to_path_buf()
    } else {
        base.join(dir)
    }
}

fn image_spec(c: &Container, at: &str, pinned: Option<String>) -> Result<ImageSpec, LaunchFailure> {
    if c.image.is_empty() {
        return Err(LaunchFailure::new(
            REASON_INVALID_SPEC,
            format!(
                "{at}.image: missing; the container runtime runs images (run `sluice up --runtime \
                 process` to run containers from their `command` as local processes)"
            ),
        ));
    }
    let pull_policy = PullPolicy::parse(&c.image_pull_policy, &c.image).map_err(|e| {
        LaunchFailure::new(REASON_INVALID_SPEC, format!("{at}.imagePullPolicy: {e}"))
    })?;
    Ok(ImageSpec {
        reference: c.image.clone(),
        pull_policy,
        pinned,
    })
}

/// Kubernetes' order: `envFrom` sources first (in order), then `env` (a later name wins).
fn resolve_env(
    c: &Container,
    rev: &Revision,
    inputs: &LaunchInputs<'_>,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, String)>, LaunchFailure> {
    let ns = &rev.metadata.namespace;
    let mut env = Vec::new();
    for source in &c.env_from {
        let (kind, name, optional, data) = if let Some(r) = &source.config_map_ref {
            let data = inputs
                .config_maps
                .get(&(ns.clone(), r.name.clone()))
                .map(config_map_data);
            ("ConfigMap", &r.name, r.optional, data)
        } else if let Some(r) = &source.secret_ref {
            let data = match inputs.secrets.get(&(ns.clone(), r.name.clone())) {
                Some(s) => Some(secret_data(s, ns)?),
                None => None,
            };
            ("Secret", &r.name, r.optional, data)
        } else {
            continue;
        };
        let Some(data) = data else {
            if optional == Some(true) {
                continue;
            }
            return Err(missing_object(kind, ns, name));
        };
        for (key, value) in data {
            let value = text(value, kind, ns, name, &key)?;
            // Kubernetes skips keys that are not valid env names (it records an event).
            let var = format!("{}{key}", source.prefix);
            if is_env_name(&var) {
                env.push((var, value));
            }
        }
    }
    for (i, e) in c.env.iter().enumerate() {
        let Some(from) = &e.value_from else {
            env.push((e.name.clone(), e.value.clone()));
            continue;
        };
        let value = if let Some(r) = &from.config_map_key_ref {
            let data = inputs
                .config_maps
                .get(&(ns.clone(), r.name.clone()))
                .map(config_map_data);
            key_value("ConfigMap", ns, &r.name, &r.key, r.optional, data)?
        } else if let Some(r) = &from.secret_key_ref {
            let data = match inputs.secrets.get(&(ns.clone(), r.name.clone())) {
                Some(s) => Some(secret_data(s, ns)?),
                None => None,
            };
            key_value("Secret", ns, &r.name, &r.key, r.optional, data)?
        } else if let Some(f) = &from.field_ref {
            let value = field_value(rev, &f.field_path);
            if value.is_none() {
                warnings.push(format!(
                    "{at}.env[{i}].valueFrom.fieldRef.fieldPath: {:?} has no local value, so {} is \
                     left unset (supported: metadata.name, metadata.namespace, \
                     metadata.labels['...'], metadata.annotations['...'], spec.serviceAccountName)",
                    f.field_path, e.name
                ));
            }
            value
        } else if let Some(r) = &from.resource_field_ref {
            let value = resource_field_value(c, r);
            if value.is_none() {
                warnings.push(format!(
                    "{at}.env[{i}].valueFrom.resourceFieldRef: {:?} is not set on the container, so \
                     {} is left unset",
                    r.resource, e.name
                ));
            }
            value
        } else {
            None
        };
        // An optional key that is missing leaves the variable unset, as in Kubernetes.
        if let Some(value) = value {
            env.push((e.name.clone(), value));
        }
    }
    Ok(env)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    cm.data
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect()
}

/// A Secret's keys: `data` base64-decoded, then `stringData` (which wins, as the API server merges it).
fn secret_data(s: &Secret, ns: &str) -> Result<BTreeMap<String, Vec<u8>>, LaunchFailure> {
    let mut out = BTreeMap::new();
    for (k, v) in &s.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .map_err(|e| {
                LaunchFailure::new(
                    REASON_CONFIG_ERROR,
                    format!(
                        "Secret {ns}/{}: data.{k} is not base64 ({e}); use stringData for plain text",
                        s.metadata.name
                    ),
                )
            })?;
        out.insert(k.clone(), bytes);
    }
    for (k, v) in &s.string_data {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    Ok(out)
}

fn missing_object(kind: &str, ns: &str, name: &str) -> LaunchFailure {
    LaunchFailure::new(
        REASON_CONFIG_ERROR,
        format!(
            "{} {name:?} not found (no {kind} {ns}/{name} in the folder)",
            kind.to_lowercase()
        ),
    )
}

/// Kubernetes' wording: `couldn't find key KEY in ConfigMap NS/NAME`.
fn key_value(
    kind: &str,
    ns: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
    data: Option<BTreeMap<String, Vec<u8>>>,
) -> Result<Option<String>, LaunchFailure> {
    let optional = optional == Some(true);
    let Some(data) = data else {
        return if optional {
            Ok(None)
        } else {
            Err(missing_object(kind, ns, name))
        };
    };
    match data.get(key) {
        Some(v) => text(v.clone(), kind, ns, name, key).map(Some),
        None if optional => Ok(None),
        None => Err(LaunchFailure::new(
            REASON_CONFIG_ERROR,
            format!("couldn't find key {key} in {kind} {ns}/{name}"),
        )),
    }
}

fn text(v: Vec<u8>, kind: &str, ns: &str, name: &str, key: &str) -> Result<String, LaunchFailure> {
    String::from_utf8(v).map_err(|_| {
        LaunchFailure::new(
            REASON_CONFIG_ERROR,
            format!(
                "key {key} of {kind} {ns}/{name} is not UTF-8 text, so it cannot be an env var"
            ),
        )
    })
}

/// Kubernetes' IsEnvVarName: letters, digits, `_`, `-`, `.`, not starting with a digit.
fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The downward API fields that mean something locally. `metadata.name` is the pod's name on a
/// cluster; here it is the revision's (instances are named by the runtime after the spec is made).
fn field_value(rev: &Revision, path: &str) -> Option<String> {
    let meta = &rev.metadata;
    let bracketed = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_string)
    };
    match path {
        "metadata.name" => Some(meta.name.clone()),
        "metadata.namespace" => Some(meta.namespace.clone()),
        "spec.serviceAccountName" => Some(rev.spec.service_account_name.clone()),
        _ => {
            if let Some(k) = bracketed("metadata.labels") {
                return Some(meta.labels.get(&k).cloned().unwrap_or_default());
            }
            let k = bracketed("metadata.annotations")?;
            Some(meta.annotations.get(&k).cloned().unwrap_or_default())
        }
    }
}

/// `resourceFieldRef`: the container's own limit or request, divided by the divisor, rounded up.
fn resource_field_value(
    c: &Container,
    r: &sluice_api::core::ResourceFieldSelector,
) -> Option<String> {
    let res = c.resources.as_ref()?;
    let (list, name) = r.resource.split_once('.')?;
    let q = match list {
        "limits" => res.limits.get(name)?,
        "requests" => res.requests.get(name)?,
        _ => return None,
    };
    let value = sluice_api::core::parse_quantity_nanos(&q.0).ok()?;
    let divisor = match &r.divisor {
        Some(d) => sluice_api::core::parse_quantity_nanos(&d.0).ok()?,
        None => 1_000_000_000,
    };
    (divisor > 0).then(|| value.div_ceil(divisor).to_string())
}

/// The revision's volumes by name: ConfigMap and Secret contents as files under
/// `volume_root/<volume>/` (pushed to `files`), emptyDir as the runtime's own.
fn volumes(
    rev: &Revision,
    inputs: &LaunchInputs<'_>,
    files: &mut Vec<VolumeFile>,
) -> Result<BTreeMap<String, MountSource>, LaunchFailure> {
    let ns = &rev.metadata.namespace;
    let mut out = BTreeMap::new();
    for vol in &rev.spec.volumes {
        let dir = inputs.volume_root.join(&vol.name);
        let (kind, name, items, default_mode, optional, data) = if let Some(cm) = &vol.config_map {
            let data = inputs
                .config_maps
                .get(&(ns.clone(), cm.name.clone()))
                .map(config_map_data);
            (
                "ConfigMap",
                &cm.name,
                &cm.items,
                cm.default_mode,
                cm.optional,
                data,
            )
        } else if let Some(s) = &vol.secret {
            let data = match inputs.secrets.get(&(ns.clone(), s.secret_name.clone())) {
                Some(secret) => Some(secret_data(secret, ns)?),
                None => None,
            };
            (
                "Secret",
                &s.secret_name,
                &s.items,
                s.default_mode,
                s.optional,
                data,
            )
        } else if let Some(e) = &vol.empty_dir {
            out.insert(
                vol.name.clone(),
                MountSource::EmptyDir {
                    name: vol.name.clone(),
                    memory: e.medium == "Memory",
                },
            );
            continue;
        } else {
            continue; // projected: warned about in `unhonoured`
        };
        let data = match data {
            Some(d) => d,
            // Kubernetes: an optional source that is missing mounts an empty folder.
            None if optional == Some(true) => BTreeMap::new(),
            None => {
                let mut f = missing_object(kind, ns, name);
                f.message = format!("volume {:?}: {}", vol.name, f.message);
                return Err(f);
            }
        };
        volume_files(
            &dir,
            &data,
            items,
            default_mode,
            optional == Some(true),
            files,
        )
        .map_err(|key| {
            LaunchFailure::new(
                REASON_CONFIG_ERROR,
                format!(
                    "volume {:?}: couldn't find key {key} in {kind} {ns}/{name}",
                    vol.name
                ),
            )
        })?;
        out.insert(vol.name.clone(), MountSource::Dir(dir));
    }
    Ok(out)
}

/// The files of one ConfigMap or Secret volume: every key (or only `items`, at their paths) with its
/// mode. Returns the missing item key, unless the source is optional.
fn volume_files(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: &[KeyToPath],
    default_mode: Option<u32>,
    optional: bool,
    files: &mut Vec<VolumeFile>,
) -> Result<(), String> {
    let mode = default_mode.unwrap_or(DEFAULT_FILE_MODE);
    if items.is_empty() {
        for (key, value) in data {
            files.push(VolumeFile {
                path: dir.join(key),
                contents: value.clone(),
                mode,
            });
        }
        return Ok(());
    }
    for item in items {
        match data.get(&item.key) {
            Some(value) => files.push(VolumeFile {
                path: dir.join(&item.path),
                contents: value.clone(),
                mode: item.mode.unwrap_or(mode),
            }),
            None if optional => {}
            None => return Err(item.key.clone()),
        }
    }
    Ok(())
}

fn mounts(
    c: &Container,
    volumes: &BTreeMap<String, MountSource>,
    at: &str,
    warnings: &mut Vec<String>,
) -> Vec<Mount> {
    let mut out = Vec::new();
    for (i, m) in c.volume_mounts.iter().enumerate() {
        let Some(source) = volumes.get(&m.name) else {
            continue; // a projected volume (warned about), or refused by validation
        };
        let source = match (source, m.sub_path.is_empty()) {
            (_, true) => source.clone(),
            (MountSource::Dir(dir), false) => MountSource::Dir(dir.join(&m.sub_path)),
            (MountSource::EmptyDir { .. }, false) => {
                warnings.push(format!(
                    "{at}.volumeMounts[{i}].subPath: not supported on an emptyDir locally; the whole \
                     volume is mounted"
                ));
                source.clone()
            }
        };
        // ConfigMap and Secret files are always read-only (Knative requires readOnly for them).
        let read_only = m.read_only || matches!(source, MountSource::Dir(_));
        out.push(Mount {
            source,
            target: m.mount_path.clone(),
            read_only,
        });
    }
    out
}

fn resources(
    c: &Container,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Resources, LaunchFailure> {
    let mut out = Resources::default();
    let Some(r) = &c.resources else {
        return Ok(out);
    };
    let bad = |field: String, why: String| {
        LaunchFailure::new(REASON_INVALID_SPEC, format!("{field}: {why}"))
    };
    for (name, q) in &r.limits {
        match name.as_str() {
            "cpu" => {
                out.cpu_millis = Some(
                    q.milli_value()
                        .map_err(|e| bad(format!("{at}.resources.limits.cpu"), e))?,
                )
            }
            "memory" => {
                out.memory_bytes = Some(
                    q.value()
                        .map_err(|e| bad(format!("{at}.resources.limits.memory"), e))?,
                )
            }
            other => warnings.push(format!(
                "{at}.resources.limits.{other}: not enforced locally (only cpu and memory are)"
            )),
        }
    }
    Ok(out)
}

fn security(c: &Container, at: &str, warnings: &mut Vec<String>) -> SecurityContext {
    let Some(s) = &c.security_context else {
        return SecurityContext::default();
    };
    let ignored: Vec<&str> = [
        (
            s.allow_privilege_escalation.is_some(),
            "allowPrivilegeEscalation",
        ),
        (s.capabilities.is_some(), "capabilities"),
        (s.seccomp_profile.is_some(), "seccompProfile"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if !ignored.is_empty() {
        warnings.push(format!(
            "{at}.securityContext: {} not enforced locally (the engine's defaults apply)",
            ignored.join(", ")
        ));
    }
    SecurityContext {
        run_as_user: s.run_as_user,
        run_as_group: s.run_as_group,
        run_as_non_root: s.run_as_non_root == Some(true),
        read_only_root_filesystem: s.read_only_root_filesystem == Some(true),
    }
}

/// A probe's port: `None` for the container port (and always for processes, whose one port is
/// their PORT), the number otherwise; a named port is the container port's name.
fn probe_port(
    port: Option<&IntOrString>,
    container_port: u16,
    names: &BTreeSet<&str>,
    container_runtime: bool,
    field: &str,
    warnings: &mut Vec<String>,
) -> Option<u16> {
    let port = match port? {
        IntOrString::Int(0) => return None,
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) if names.contains(name.as_str()) => return None,
        IntOrString::String(name) => {
            warnings.push(format!(
                "{field}: port {name:?} names no container port; the container port is probed"
            ));
            return None;
        }
    };
    match port {
        Some(p) if p != container_port && container_runtime => Some(p),
        _ => None,
    }
}

/// A sidecar's probe names its own port (Knative requires it for sidecar probes).
fn sidecar_probe_port(p: &serving::Probe) -> Option<u16> {
    let port = p
        .http_get
        .as_ref()
        .and_then(|h| h.port.clone())
        .or_else(|| p.tcp_socket.as_ref().and_then(|t| t.port.clone()))
        .or_else(|| p.grpc.as_ref().map(|g| IntOrString::Int(g.port)));
    match port {
        Some(IntOrString::Int(p)) => u16::try_from(p).ok().filter(|p| *p > 0),
        _ => None,
    }
}

type PortOf<'a> = dyn Fn(Option<&IntOrString>, &str, &mut Vec<String>) -> Option<u16> + 'a;

/// A Kubernetes probe in the runtime's terms. `readiness`: Knative's periodSeconds 0 means aggressive
/// probing; for liveness and startup probes Kubernetes' defaults apply (every 10 s).
fn runtime_probe(
    probe: &serving::Probe,
    readiness: bool,
    field: &str,
    port_of: &PortOf<'_>,
    warnings: &mut Vec<String>,
) -> Probe {
    let mut out = Probe::default();
    if let Some(http) = &probe.http_get {
        out.action = ProbeAction::Http {
            path: if http.path.is_empty() {
                "/".to_string()
            } else {
                http.path.clone()
            },
            headers: http
                .http_headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        };
        out.port = port_of(
            http.port.as_ref(),
            &format!("{field}.httpGet.port"),
            warnings,
        );
        if http.scheme == "HTTPS" {
            warnings.push(format!(
                "{field}.httpGet.scheme: HTTPS is not supported locally; probed over HTTP"
            ));
        }
    } else if let Some(exec) = &probe.exec {
        out.action = ProbeAction::Exec {
            command: exec.command.clone(),
        };
    } else if let Some(grpc) = &probe.grpc {
        out.action = ProbeAction::Grpc {
            service: grpc.service.clone().filter(|s| !s.is_empty()),
        };
        out.port = port_of(
            Some(&IntOrString::Int(grpc.port)),
            &format!("{field}.grpc.port"),
            warnings,
        );
    } else if let Some(tcp) = &probe.tcp_socket {
        out.action = ProbeAction::Tcp;
        out.port = port_of(
            tcp.port.as_ref(),
            &format!("{field}.tcpSocket.port"),
            warnings,
        );
    }
    let secs = |s: i32| Duration::from_secs(s.max(0) as u64);
    out.initial_delay = secs(probe.initial_delay_seconds);
    if probe.period_seconds > 0 {
        out.period = Some(secs(probe.period_seconds));
    } else if !readiness {
        out.period = Some(Duration::from_secs(10));
    }
    if probe.timeout_seconds > 0 {
        out.timeout = secs(probe.timeout_seconds);
    }
    if probe.success_threshold > 0 {
        out.success_threshold = probe.success_threshold as u32;
    }
    if probe.failure_threshold > 0 {
        out.failure_threshold = probe.failure_threshold as u32;
    }
    out
}

/// Fields of the revision Knative allows that no local runtime honours.
fn unhonoured(rev: &Revision) -> Vec<String> {
    let spec = &rev.spec;
    let mut out = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        if v.projected.is_some() {
            out.push(format!(
                "spec.volumes[{i}] ({:?}): projected volumes are not mounted locally",
                v.name
            ));
        }
        if v.empty_dir.as_ref().is_some_and(|e| e.size_limit.is_some()) {
            out.push(format!(
                "spec.volumes[{i}].emptyDir.sizeLimit: not enforced locally"
            ));
        }
    }
    if !spec.image_pull_secrets.is_empty() {
        out.push(
            "spec.imagePullSecrets: not used locally (images come from the local engine; nothing is \
             pulled with credentials)"
                .to_string(),
        );
    }
    if !spec.service_account_name.is_empty() {
        out.push(format!(
            "spec.serviceAccountName {:?}: no service account token is mounted locally",
            spec.service_account_name
        ));
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if c.resources.as_ref().is_some_and(|r| !r.requests.is_empty()) {
            out.push(format!(
                "spec.containers[{i}].resources.requests: not reserved locally (limits are enforced)"
            ));
        }
    }
    out
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
