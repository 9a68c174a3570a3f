//! The serving plane of `sluice up`: wires Knative Serving's controller (`sluice-serving`), the
//! instance runtime (containers or processes, behind [`InstanceRuntime`]), the autoscaler and the
//! activator, and hands the xds-server the state they imply.
//!
//! It is a [`StateSource`] wrapped around the folder source: the folder's Knative objects go through
//! [`sluice_serving::reconcile`]; the KIngresses, the per-revision Services and their Endpoints (the
//! instances' sidecar listeners when the autoscaler says serve, else the activator), and one sidecar per
//! instance are added to what the folder gave, and the whole is published to the xds controller. It
//! re-syncs whenever the folder, the runtime's instances, the autoscaler's decisions or the KIngress
//! statuses change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;

use sluice_activator::{Activator, ActivatorOptions, ActivatorTasks, RevisionConfig};
use sluice_api::Object;
use sluice_api::autoscaling::RevisionKey;
use sluice_api::core::{
    ConfigMap, EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service as CoreService,
};
use sluice_api::ingress::{Ingress, IngressStatus};
use sluice_api::meta::ObjectMeta;
use sluice_api::serving::{self, Revision};
use sluice_autoscaler::{
    AutoscalerConfig, AutoscalerService, Mode, RevisionScaling, ScaleError, Scaler, ServiceOptions,
};
use sluice_runtime::{
    InstanceRuntime, InstanceState, PortLease, PortPool, RuntimeError, RuntimeSnapshot,
};
use sluice_serving::{
    KNATIVE_SERVING_NAMESPACE, ReconcileInput, RevisionFacts, RevisionHealth, ServingConfig,
    ServingState, reconcile,
};
use sluice_xds_server::controller::StatusReport;
use sluice_xds_server::source::folder::FolderSource;
use sluice_xds_server::source::{SourceError, SourceSnapshot, StateSource};
use sluice_xds_server::state::InstanceSidecar;
use sluice_xds_server::translate::SIDECAR_PREFIX;

use crate::launch::{self, LaunchFailure, LaunchInputs, VolumeFile};

/// The ConfigMap of Knative's autoscaler settings (namespace knative-serving).
const CONFIG_AUTOSCALER: &str = "config-autoscaler";
/// How often, and how long, a new sidecar listener is checked for whether Envoy bound it.
const SIDECAR_CHECK_INTERVAL: Duration = Duration::from_millis(5);
const SIDECAR_CHECK_PATIENCE: Duration = Duration::from_secs(30);
/// Restarts without ever getting ready after which a revision is reported failed.
const FAILED_AFTER_RESTARTS: u32 = 3;

/// How the serving plane runs.
pub struct ServingOptions {
    /// The folder `sluice up` serves: a process's relative `workingDir` is taken from here.
    pub dir: PathBuf,
    /// Instance logs, ConfigMap and Secret volumes, and the serving state file.
    pub state_dir: PathBuf,
    /// What runs the instances (containers or processes).
    pub runtime: Arc<dyn InstanceRuntime>,
    /// Why that runtime (shown by `sluice status`).
    pub runtime_why: String,
    /// The pool the runtime leases instance ports from; sidecar listeners lease from it too.
    pub ports: Arc<PortPool>,
    /// Where the activator listens (Envoy sends a revision's requests there while it has no capacity).
    pub activator: tokio::net::TcpListener,
    /// Envoy's admin address, where the autoscaler scrapes the queue-proxy filter's metrics.
    pub envoy_admin: SocketAddr,
    /// The address instance-side listeners bind to.
    pub address: IpAddr,
    /// Why instances cannot run, when the queue-proxy filter is not built.
    pub wasm_missing: Option<String>,
    /// The gateway's external port, shown in Service URLs unless it is 80.
    pub external_port: u16,
}

/// What `sluice status` shows of serving: Knative's objects with their status.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingReport {
    pub services: Vec<serving::Service>,
    pub configurations: Vec<serving::Configuration>,
    pub revisions: Vec<RevisionReport>,
    pub routes: Vec<serving::Route>,
    /// Which runtime runs the instances, and why.
    pub runtime: RuntimeReport,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RuntimeReport {
    /// `container` or `process`.
    pub kind: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionReport {
    #[serde(flatten)]
    pub revision: Revision,
    /// Instances the autoscaler asked for, and the ones running and ready.
    pub desired_instances: u32,
    pub ready_instances: u32,
    /// Whether requests go through the activator (Proxy) or straight to the instances (Serve).
    pub mode: String,
    /// Instances that exited or failed liveness and were replaced.
    pub restarts: u32,
    /// How the last instance that exited on its own ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Fields Knative allows that are not honoured here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub instances: Vec<InstanceReport>,
}

/// One running instance of a revision.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceReport {
    pub name: String,
    pub state: String,
    pub pid: Option<u32>,
    /// The process's PORT, and the sidecar listener in front of it.
    pub port: u16,
    pub sidecar_port: u16,
    /// From spawn to the first successful readiness probe: the app's own start-up time.
    pub startup_ms: Option<f64>,
    /// The engine's container ID (container runtime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// A revision the runtime, the autoscaler and the activator know about.
struct Launched {
    container_concurrency: u32,
    timeout_seconds: u64,
    service: String,
    http2: bool,
    /// The port name of the revision's core Service (the Endpoints must use it).
    port_name: String,
    activator_config: Option<RevisionConfig>,
    confirmed: Option<Mode>,
    /// An instance passed its readiness probe once: Knative keeps the Revision Ready at zero.
    ever_ready: bool,
    /// `initial-scale: 0` (allowed by config-autoscaler): Knative makes it Ready without an instance,
    /// and its first request cold-starts it through the activator.
    zero_start: bool,
    /// Fields not honoured here, for `sluice status`.
    warnings: Vec<String>,
}

struct PlaneState {
    serving: ServingState,
    launched: BTreeMap<RevisionKey, Launched>,
    /// Instance name -> its sidecar listener's port; held while the instance lives.
    sidecar_ports: BTreeMap<String, PortLease>,
    /// The KIngresses the serving controller made (`namespace/name`): the only ones whose status it
    /// reads.
    owned_ingresses: BTreeSet<String>,
    /// Revisions that cannot run (bad autoscaling annotations, a missing ConfigMap, only an image
    /// without an engine...): why, reported as Ready=False with this reason and message.
    invalid: BTreeMap<RevisionKey, LaunchFailure>,
    /// The serving state as last handed to the state file's writer.
    saved: ServingState,
    /// Instances whose sidecar listener accepts connections (Envoy bound it): only those get traffic,
    /// so a new instance is never an endpoint before its listener exists (a failed request during
    /// scale-up). Keyed by instance name, with the port that answered.
    sidecar_live: BTreeMap<String, u16>,
    /// Sidecar listeners being checked (instance name -> port).
    sidecar_checking: BTreeMap<String, u16>,
    /// Envoy's rejection each instance's sidecar port was last changed for.
    port_rejections: BTreeMap<String, String>,
}

pub struct ServingPlane {
    /// Itself, for the background checks it starts.
    me: std::sync::Weak<ServingPlane>,
    runtime: Arc<dyn InstanceRuntime>,
    runtime_report: RuntimeReport,
    state_dir: PathBuf,
    /// The serving state to write to the state file (the writer task keeps the newest).
    state_writes: watch::Sender<Option<ServingState>>,
    /// Why the state file an earlier run left was not used (shown with the folder's problems).
    state_problem: Option<String>,
    autoscaler: AutoscalerService,
    activator: Activator,
    _activator_tasks: ActivatorTasks,
    activator_addr: SocketAddr,
    dir: PathBuf,
    address: IpAddr,
    /// Ports for instances and their sidecar listeners (one pool, so the two never collide).
    ports: Arc<PortPool>,
    wasm_missing: Option<String>,
    external_port: u16,
    state: Mutex<PlaneState>,
    report: watch::Sender<ServingReport>,
    /// Bumped when a sidecar listener starts accepting connections: a re-sync adds its endpoint.
    sidecar_changes: watch::Sender<u64>,
}

struct RuntimeScaler(Arc<dyn InstanceRuntime>);

impl Scaler for RuntimeScaler {
    fn scale(&self, revision: &RevisionKey, desired: u32) -> BoxFuture<'_, Result<(), ScaleError>> {
        let result = self.0.scale(revision, desired).map_err(|e| ScaleError {
            revision: revision.clone(),
            desired,
            message: e.to_string(),
        });
        async move { result }.boxed()
    }
}

impl ServingPlane {
    /// Starts the autoscaler and the activator (serving on `options.activator`) over the runtime, and
    /// reads the serving state an earlier run left (its problem, if it could not be read, is logged).
    pub fn start(
        options: ServingOptions,
    ) -> anyhow::Result<(Arc<ServingPlane>, watch::Receiver<ServingReport>)> {
        let ports = options.ports;
        let runtime = options.runtime;
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let loaded = crate::state_file::load(&options.state_dir, now_unix);
        if let Some(problem) = &loaded.problem {
            tracing::error!("{problem}");
        }
        let state_writes = spawn_state_writer(options.state_dir.clone());
        // Volume files are written afresh when each revision launches; an earlier run's go first.
        let volumes = options.state_dir.join("volumes");
        if volumes.exists()
            && let Err(e) = std::fs::remove_dir_all(&volumes)
        {
            tracing::warn!(
                "removing an earlier run's volumes at {}: {e}",
                volumes.display()
            );
        }
        let stats_url: http::Uri = format!(
            // Both filter builds' stats: `wasmcustom.sluice_qp__*` and (native) `sluice.sluice_qp__*`.
            "http://{}/stats/prometheus?usedonly&filter=sluice_qp__",
            options.envoy_admin
        )
        .parse()?;
        let autoscaler = AutoscalerService::start(
            ServiceOptions::new(stats_url),
            Arc::new(RuntimeScaler(runtime.clone())),
        );
        let poke_to = autoscaler.clone();
        let stats_to = autoscaler.clone();
        let mut activator_options = ActivatorOptions::new(
            move |key: &RevisionKey| poke_to.poke(key),
            move |key: &RevisionKey, stat| stats_to.record_activator_stat(key, stat),
        );
        // A new instance is probed until it answers; locally that is cheap, and it is what a cold
        // start waits on after the app is up.
        activator_options.probe_interval = Duration::from_millis(10);
        let (activator, activator_tasks) = Activator::new(activator_options);
        let activator_addr = options.activator.local_addr()?;
        tokio::spawn({
            let activator = activator.clone();
            let listener = options.activator;
            async move {
                if let Err(e) = activator.serve(listener).await {
                    tracing::error!("activator stopped: {e}");
                }
            }
        });
        let (report, report_rx) = watch::channel(ServingReport::default());
        let runtime_report = RuntimeReport {
            kind: runtime.kind().to_string(),
            reason: options.runtime_why,
        };
        let plane = Arc::new_cyclic(|me| ServingPlane {
            me: me.clone(),
            runtime,
            runtime_report,
            state_dir: options.state_dir,
            state_writes,
            state_problem: loaded.problem.clone(),
            autoscaler,
            activator,
            _activator_tasks: activator_tasks,
            activator_addr,
            dir: options.dir,
            address: options.address,
            ports,
            wasm_missing: options.wasm_missing,
            external_port: options.external_port,
            state: Mutex::new(PlaneState {
                saved: loaded.state.clone(),
                serving: loaded.state,
                launched: BTreeMap::new(),
                sidecar_ports: BTreeMap::new(),
                owned_ingresses: BTreeSet::new(),
                invalid: BTreeMap::new(),
                sidecar_live: BTreeMap::new(),
                sidecar_checking: BTreeMap::new(),
                port_rejections: BTreeMap::new(),
            }),
            sidecar_changes: watch::channel(0).0,
            report,
        });
        Ok((plane, report_rx))
    }

    /// Stops every instance (SIGTERM, then SIGKILL after its grace period) and the autoscaler, and
    /// writes the serving state a last time.
    pub async fn shutdown(&self) {
        self.autoscaler.shutdown().await;
        self.runtime.shutdown().await;
        let state = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .serving
            .clone();
        if let Err(e) = crate::state_file::save(&self.state_dir, &state) {
            tracing::warn!(
                "writing the serving state to {}: {e}",
                self.state_dir.display()
            );
        }
    }

    /// Registers the autoscaler's and the activator's metrics under Knative's prefixes
    /// (`autoscaler_`, `activator_`).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.autoscaler
            .metrics()
            .register(registry.sub_registry_with_prefix("autoscaler"));
        self.activator
            .register_metrics(registry.sub_registry_with_prefix("activator"));
    }

    /// SIGKILLs every instance now (a second Ctrl-C); a pending [`ServingPlane::shutdown`] then ends.
    pub fn kill_now(&self) {
        self.runtime.kill_now();
    }

    /// The runtime's instances, as they change (what a shutdown waits on).
    pub fn runtime_snapshots(&self) -> watch::Receiver<RuntimeSnapshot> {
        self.runtime.subscribe()
    }

    /// One pass: reconcile the folder's Knative objects with what runs, act on the difference, and return
    /// the state for the xds controller.
    /// The statuses of the KIngresses this plane made, from the xds controller's report.
    fn owned_ingress_statuses(&self, report: &StatusReport) -> BTreeMap<String, IngressStatus> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.owned_ingresses.is_empty() {
            return BTreeMap::new();
        }
        report
            .ingresses
            .iter()
            .filter_map(|i| {
                let key = i.metadata.key();
                state
                    .owned_ingresses
                    .contains(&key)
                    .then(|| (key, i.status.clone()))
            })
            .collect()
    }

    fn sync(
        &self,
        source: &SourceSnapshot,
        ingress_statuses: &BTreeMap<String, IngressStatus>,
        rejected_sidecars: &BTreeMap<String, String>,
    ) -> SourceSnapshot {
        let mut errors = source.errors.clone();
        if let Some(problem) = &self.state_problem {
            errors.push(SourceError {
                origin: "serving state".to_string(),
                message: problem.clone(),
            });
        }
        let mut input = ReconcileInput::default();
        let mut config_maps: Vec<&ConfigMap> = Vec::new();
        let mut autoscaler_data = BTreeMap::new();
        for object in &source.objects {
            match object {
                Object::KnativeService(s) => input.services.push(s.clone()),
                Object::Configuration(c) => input.configurations.push(c.clone()),
                Object::Route(r) => input.routes.push(r.clone()),
                Object::ConfigMap(cm) if cm.metadata.namespace == KNATIVE_SERVING_NAMESPACE => {
                    if cm.metadata.name == CONFIG_AUTOSCALER {
                        autoscaler_data = cm.data.clone();
                    }
                    config_maps.push(cm);
                }
                Object::Revision(r) => errors.push(SourceError {
                    origin: format!("Revision {}", r.metadata.key()),
                    message: "Revisions are created from Configurations (a Service's template); \
                              this one is ignored"
                        .to_string(),
                }),
                _ => {}
            }
        }
        if let Some(why) = &self.wasm_missing
            && !(input.services.is_empty() && input.configurations.is_empty())
        {
            errors.push(SourceError {
                origin: "serving".to_string(),
                message: format!("revisions cannot run: {why}"),
            });
            input.services.clear();
            input.configurations.clear();
        }
        input.config = ServingConfig::from_config_maps(config_maps).unwrap_or_else(|e| {
            errors.push(SourceError {
                origin: format!("ConfigMap {KNATIVE_SERVING_NAMESPACE}"),
                message: e.to_string(),
            });
            ServingConfig::default()
        });
        if self.external_port != 80 {
            input.config.external_url_port = Some(self.external_port);
        }
        let autoscaler_config =
            AutoscalerConfig::from_config_map(&autoscaler_data).unwrap_or_else(|e| {
                errors.push(SourceError {
                    origin: format!("ConfigMap {KNATIVE_SERVING_NAMESPACE}/{CONFIG_AUTOSCALER}"),
                    message: e.to_string(),
                });
                AutoscalerConfig::default()
            });
        input.ingress_statuses = ingress_statuses.clone();

        let runtime = self.runtime.snapshot();
        let decisions = self.autoscaler.decisions().borrow().clone();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = self.reconcile_with_facts(&mut input, &mut state, &runtime, &decisions);
        state.owned_ingresses = out.ingresses.iter().map(|i| i.metadata.key()).collect();

        // Start what is new, stop what is gone.
        let wanted: BTreeSet<RevisionKey> = out
            .revisions
            .iter()
            .map(|r| RevisionKey::new(&r.metadata.namespace, &r.metadata.name))
            .collect();
        let gone: Vec<RevisionKey> = state
            .launched
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            tracing::info!(revision = %key, "revision removed: stopping its instances");
            state.launched.remove(&key);
            self.autoscaler.remove_revision(&key);
            self.activator.remove_revision(&key);
            if let Err(e) = self.runtime.remove_revision(&key) {
                tracing::warn!(revision = %key, "{e}");
            }
            let volumes = self.volume_root(&key);
            if volumes.exists()
                && let Err(e) = std::fs::remove_dir_all(&volumes)
            {
                tracing::warn!(revision = %key, "removing {}: {e}", volumes.display());
            }
        }
        state.invalid.retain(|k, _| wanted.contains(k));
        // A launch that changes what the controller concludes (a revision Ready at once, or one that
        // cannot run) is reconciled again, so the change shows now rather than at the next event.
        let mut again = false;
        let mut folder_config: Option<FolderConfig> = None;
        for rev in &out.revisions {
            let key = RevisionKey::new(&rev.metadata.namespace, &rev.metadata.name);
            if state.launched.contains_key(&key) {
                continue;
            }
            let config = folder_config.get_or_insert_with(|| FolderConfig::read(source));
            let pinned = state
                .serving
                .image_digests
                .get(&rev.metadata.key())
                .cloned();
            match self.launch(
                rev,
                &key,
                &autoscaler_config,
                &out.revision_services,
                config,
                pinned,
            ) {
                Ok(launched) => {
                    tracing::info!(revision = %key, "revision created");
                    again |= launched.zero_start || state.invalid.remove(&key).is_some();
                    state.launched.insert(key, launched);
                }
                Err(failure) => {
                    again |= state.invalid.get(&key) != Some(&failure);
                    state.invalid.insert(key, failure);
                }
            }
        }
        if again {
            out = self.reconcile_with_facts(&mut input, &mut state, &runtime, &decisions);
            state.owned_ingresses = out.ingresses.iter().map(|i| i.metadata.key()).collect();
        }
        for warning in &out.warnings {
            errors.push(SourceError {
                origin: "serving".to_string(),
                message: warning.clone(),
            });
        }
        for (key, failure) in &state.invalid {
            errors.push(SourceError {
                origin: revision_origin(&source.origins, &out, key),
                message: format!("{}: {}", failure.reason, failure.message),
            });
        }
        // Revision names, generations and digests outlive this run (see state_file).
        if state.serving != state.saved {
            state.saved = state.serving.clone();
            self.state_writes.send_replace(Some(state.saved.clone()));
        }

        // The derived networking state.
        let mut derived = source.state.clone();
        for ingress in &out.ingresses {
            derived.ingresses.insert(
                (
                    ingress.metadata.namespace.clone(),
                    ingress.metadata.name.clone(),
                ),
                ingress.clone().into(),
            );
        }
        for svc in &out.revision_services {
            derived.services.insert(
                (svc.metadata.namespace.clone(), svc.metadata.name.clone()),
                svc.clone().into(),
            );
        }
        let mut live_instances = BTreeSet::new();
        let mut revision_reports = Vec::new();
        let PlaneState {
            launched,
            sidecar_ports,
            sidecar_live,
            sidecar_checking,
            port_rejections,
            ..
        } = &mut *state;
        for (key, l) in launched.iter_mut() {
            let status = runtime.revision(key);
            let instances = status.map(|s| s.instances.as_slice()).unwrap_or_default();
            let mut ready_sidecars = Vec::new();
            let mut instance_reports = Vec::new();
            for inst in instances {
                live_instances.insert(inst.name.clone());
                // Envoy could not bind this port (another program took it): take another one.
                if let Some(why) = rejected_sidecars
                    .get(&format!("{SIDECAR_PREFIX}{}/{}", key.namespace, inst.name))
                    && port_rejections.get(&inst.name) != Some(why)
                {
                    tracing::warn!(instance = %inst.name, "Envoy rejected its sidecar listener ({why}): moving it to another port");
                    port_rejections.insert(inst.name.clone(), why.clone());
                    sidecar_ports.remove(&inst.name);
                }
                let port = match sidecar_ports.get(&inst.name) {
                    Some(lease) => lease.port(),
                    None => match self.ports.lease() {
                        Ok(lease) => {
                            let port = lease.port();
                            sidecar_ports.insert(inst.name.clone(), lease);
                            port
                        }
                        Err(e) => {
                            errors.push(SourceError {
                                origin: format!("Revision {key}"),
                                message: format!("instance {}: sidecar listener: {e}", inst.name),
                            });
                            continue;
                        }
                    },
                };
                let listen = SocketAddr::new(self.address, port);
                derived.sidecars.insert(
                    (key.namespace.clone(), inst.name.clone()),
                    InstanceSidecar {
                        namespace: key.namespace.clone(),
                        revision: key.name.clone(),
                        service: l.service.clone(),
                        instance: inst.name.clone(),
                        listen,
                        app: inst.address,
                        container_concurrency: l.container_concurrency,
                        timeout_seconds: l.timeout_seconds,
                        http2: l.http2,
                    }
                    .into(),
                );
                if inst.state == InstanceState::Ready {
                    if sidecar_live.get(&inst.name) == Some(&port) {
                        ready_sidecars.push(listen);
                    } else if sidecar_checking.get(&inst.name) != Some(&port) {
                        sidecar_checking.insert(inst.name.clone(), port);
                        self.check_sidecar(inst.name.clone(), listen);
                    }
                }
                instance_reports.push(InstanceReport {
                    name: inst.name.clone(),
                    state: format!("{:?}", inst.state),
                    pid: inst.pid,
                    port: inst.port,
                    sidecar_port: port,
                    startup_ms: inst
                        .ready_at
                        .map(|r| r.saturating_duration_since(inst.spawned_at).as_secs_f64() * 1e3),
                    container_id: inst.container_id.clone(),
                });
            }
            let decision = decisions.get(key);
            let wants_serve = decision.is_some_and(|d| d.mode == Mode::Serve);
            let mode = if wants_serve && !ready_sidecars.is_empty() {
                Mode::Serve
            } else {
                Mode::Proxy
            };
            let endpoints = match mode {
                Mode::Serve => ready_sidecars.clone(),
                Mode::Proxy => vec![self.activator_addr],
            };
            derived.endpoints.insert(
                (key.namespace.clone(), key.name.clone()),
                revision_endpoints(key, &l.port_name, &endpoints).into(),
            );
            if l.confirmed != Some(mode) {
                self.autoscaler.confirm_mode(key, mode);
                l.confirmed = Some(mode);
            }
            self.autoscaler
                .set_instances(key, instances.iter().map(|i| i.name.clone()));
            self.autoscaler
                .set_ready_instances(key, ready_sidecars.len() as u32);
            let config = RevisionConfig {
                timeout: Duration::from_secs(l.timeout_seconds.max(1)),
                failure: input
                    .revision_facts
                    .get(key)
                    .and_then(|f| activator_failure(&f.health)),
                ..RevisionConfig::new(l.container_concurrency, ready_sidecars.clone())
            };
            if l.activator_config.as_ref() != Some(&config) {
                self.activator.update_revision(key.clone(), config.clone());
                l.activator_config = Some(config);
            }
            if let Some(rev) = out.revision(&key.namespace, &key.name) {
                revision_reports.push(RevisionReport {
                    revision: rev.clone(),
                    desired_instances: decision.map(|d| d.desired_scale).unwrap_or_default(),
                    ready_instances: ready_sidecars.len() as u32,
                    mode: format!("{mode:?}"),
                    restarts: status.map(|s| s.restarts).unwrap_or_default(),
                    last_exit: status.and_then(|s| s.last_exit.clone()),
                    warnings: l.warnings.clone(),
                    instances: instance_reports,
                });
            }
        }
        sidecar_ports.retain(|name, _| live_instances.contains(name));
        sidecar_live.retain(|name, _| live_instances.contains(name));
        sidecar_checking.retain(|name, _| live_instances.contains(name));
        port_rejections.retain(|name, _| live_instances.contains(name));
        for key in state.invalid.keys() {
            if let Some(rev) = out.revision(&key.namespace, &key.name) {
                revision_reports.push(RevisionReport {
                    revision: rev.clone(),
                    desired_instances: 0,
                    ready_instances: 0,
                    mode: format!("{:?}", Mode::Proxy),
                    restarts: 0,
                    last_exit: None,
                    warnings: Vec::new(),
                    instances: Vec::new(),
                });
            }
        }
        drop(state);

        self.report.send_if_modified(|current| {
            let next = ServingReport {
                services: out.services.clone(),
                configurations: out.configurations.clone(),
                revisions: revision_reports,
                routes: out.routes.clone(),
                runtime: self.runtime_report.clone(),
            };
            if *current == next {
                return false;
            }
            *current = next;
            true
        });
        SourceSnapshot {
            state: derived,
            errors,
            objects: source.objects.clone(),
            origins: source.origins.clone(),
        }
    }

    /// Waits (in the background) until the sidecar listener at `listen` accepts a connection, then
    /// marks it live and asks for a re-sync. Envoy binds a listener once it has applied it; until
    /// then a connection is refused.
    fn check_sidecar(&self, instance: String, listen: SocketAddr) {
        let Some(plane) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + SIDECAR_CHECK_PATIENCE;
            loop {
                let current = {
                    let state = plane.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.sidecar_checking.get(&instance) == Some(&listen.port())
                };
                if !current {
                    return; // the instance is gone, or moved to another port
                }
                if tokio::net::TcpStream::connect(listen).await.is_ok() {
                    let mut state = plane.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.sidecar_checking.remove(&instance);
                    state.sidecar_live.insert(instance, listen.port());
                    drop(state);
                    plane.sidecar_changes.send_modify(|n| *n += 1);
                    return;
                }
                if tokio::time::Instant::now() > deadline {
                    tracing::warn!(%instance, %listen, "its sidecar listener never accepted a connection");
                    let mut state = plane.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.sidecar_checking.remove(&instance);
                    drop(state);
                    // Checked again at the next sync.
                    plane.sidecar_changes.send_modify(|n| *n += 1);
                    return;
                }
                tokio::time::sleep(SIDECAR_CHECK_INTERVAL).await;
            }
        });
    }

    /// The runtime's and autoscaler's facts into `input`, then Knative's reconcile.
    fn reconcile_with_facts(
        &self,
        input: &mut ReconcileInput,
        state: &mut PlaneState,
        runtime: &RuntimeSnapshot,
        decisions: &BTreeMap<RevisionKey, sluice_autoscaler::RevisionDecision>,
    ) -> sluice_serving::ReconcileOutput {
        input.revision_facts.clear();
        for (key, l) in state.launched.iter_mut() {
            l.ever_ready |= runtime
                .revision(key)
                .is_some_and(|s| s.instances.iter().any(|i| i.ready_at.is_some()));
            input.revision_facts.insert(
                key.clone(),
                facts(
                    runtime,
                    key,
                    decisions.get(key),
                    l.ever_ready || l.zero_start,
                ),
            );
        }
        for (key, failure) in &state.invalid {
            input.revision_facts.insert(
                key.clone(),
                RevisionFacts {
                    health: RevisionHealth::Failed {
                        reason: failure.reason.clone(),
                        message: failure.message.clone(),
                    },
                    actual_replicas: Some(0),
                    desired_replicas: Some(0),
                    image_digest: None,
                },
            );
        }
        reconcile(input, &mut state.serving)
    }

    /// Where a revision's ConfigMap and Secret volumes are written.
    fn volume_root(&self, key: &RevisionKey) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(&key.namespace)
            .join(&key.name)
    }

    /// Registers a new revision with the runtime, the autoscaler and the activator.
    fn launch(
        &self,
        rev: &Revision,
        key: &RevisionKey,
        autoscaler_config: &AutoscalerConfig,
        services: &[CoreService],
        config: &FolderConfig,
        pinned: Option<String>,
    ) -> Result<Launched, LaunchFailure> {
        let cc = rev.spec.container_concurrency.unwrap_or(0).max(0) as u32;
        let scaling =
            RevisionScaling::validate_all(autoscaler_config, &rev.metadata.annotations, cc)
                .map_err(|e| LaunchFailure {
                    reason: REASON_INVALID_ANNOTATIONS.to_string(),
                    message: e.to_string(),
                })?;
        let volume_root = self.volume_root(key);
        let launch = launch::launch_spec(
            rev,
            &LaunchInputs {
                runtime: self.runtime.kind(),
                dir: &self.dir,
                volume_root: &volume_root,
                config_maps: &config.config_maps,
                secrets: &config.secrets,
                pinned,
            },
        )?;
        write_volume_files(&volume_root, &launch.files).map_err(|e| LaunchFailure {
            reason: launch::REASON_CONFIG_ERROR.to_string(),
            message: format!("writing its volumes under {}: {e}", volume_root.display()),
        })?;
        let timeout_seconds = rev.spec.timeout_seconds.unwrap_or(300).max(0) as u64;
        let zero_start = scaling.initial_scale == 0;
        let service = launch.spec.service.clone();
        self.runtime
            .set_revision(key.clone(), launch.spec)
            .map_err(|e| LaunchFailure {
                reason: match e {
                    RuntimeError::Engine { .. } => launch::REASON_ENGINE_UNAVAILABLE,
                    _ => launch::REASON_INVALID_SPEC,
                }
                .to_string(),
                message: e.to_string(),
            })?;
        let _ = self.autoscaler.upsert_revision(key.clone(), scaling);
        let core = services
            .iter()
            .find(|s| s.metadata.namespace == key.namespace && s.metadata.name == key.name);
        let port_name = core
            .and_then(|s| s.spec.ports.first())
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "http".to_string());
        Ok(Launched {
            container_concurrency: cc,
            timeout_seconds,
            service,
            http2: rev.spec.protocol() == serving::Protocol::H2c,
            port_name,
            activator_config: None,
            confirmed: None,
            ever_ready: false,
            zero_start,
            warnings: launch.warnings,
        })
    }
}

/// The folder's ConfigMaps and Secrets, by `(namespace, name)`: what env and volumes read.
struct FolderConfig {
    config_maps: BTreeMap<(String, String), ConfigMap>,
    secrets: BTreeMap<(String, String), Arc<sluice_api::core::Secret>>,
}

impl FolderConfig {
    fn read(source: &SourceSnapshot) -> FolderConfig {
        let key = |m: &ObjectMeta| (m.namespace.clone(), m.name.clone());
        FolderConfig {
            config_maps: source
                .objects
                .iter()
                .filter_map(|o| match o {
                    Object::ConfigMap(cm) => Some((key(&cm.metadata), cm.clone())),
                    _ => None,
                })
                .collect(),
            secrets: source.state.secrets.clone(),
        }
    }
}

/// Writes a revision's ConfigMap and Secret volume files, afresh (a file from an earlier run that the
/// revision no longer has must not linger).
fn write_volume_files(root: &Path, files: &[VolumeFile]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    for f in files {
        if let Some(parent) = f.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&f.path, &f.contents)?;
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode))?;
    }
    Ok(())
}

/// A task that writes each serving state handed to it to the state file, the newest only when
/// several come quickly. It ends when the plane (the sender) goes.
fn spawn_state_writer(state_dir: PathBuf) -> watch::Sender<Option<ServingState>> {
    let (tx, mut rx) = watch::channel(None::<ServingState>);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(state) = rx.borrow_and_update().clone() else {
                continue;
            };
            let dir = state_dir.clone();
            let result =
                tokio::task::spawn_blocking(move || crate::state_file::save(&dir, &state)).await;
            match result {
                Ok(Err(e)) => {
                    tracing::warn!("writing the serving state to {}: {e}", state_dir.display())
                }
                Err(e) => tracing::warn!("the serving state writer failed: {e}"),
                Ok(Ok(())) => {}
            }
        }
    });
    tx
}

/// Where the revision's Service (or Configuration) was read, for errors about the revision.
fn revision_origin(
    origins: &BTreeMap<String, String>,
    out: &sluice_serving::ReconcileOutput,
    key: &RevisionKey,
) -> String {
    let labels = out
        .revision(&key.namespace, &key.name)
        .map(|r| r.metadata.labels.clone())
        .unwrap_or_default();
    let owner = [
        ("Service.serving.knative.dev", "serving.knative.dev/service"),
        ("Configuration", "serving.knative.dev/configuration"),
    ]
    .into_iter()
    .find_map(|(kind, label)| {
        let name = labels.get(label)?;
        origins.get(&format!("{kind} {}/{name}", key.namespace))
    });
    match owner {
        Some(file) => format!("{file}: Revision {key}"),
        None => format!("Revision {key}"),
    }
}

/// The reason of a revision whose autoscaling annotations Knative's webhook would reject.
const REASON_INVALID_ANNOTATIONS: &str = "InvalidAnnotations";

/// What the runtime and the autoscaler observed of a revision, in the serving controller's words.
/// `ever_ready`: it reached its initial scale once (then it stays Ready at zero, as in Knative).
fn facts(
    runtime: &RuntimeSnapshot,
    key: &RevisionKey,
    decision: Option<&sluice_autoscaler::RevisionDecision>,
    ever_ready: bool,
) -> RevisionFacts {
    let status = runtime.revision(key);
    let ready = status.map(|s| s.ready_count()).unwrap_or_default();
    let restarts = status.map(|s| s.restarts).unwrap_or_default();
    // The runtime's own verdict (image missing, engine gone) wins: no instance can start while it
    // holds, even for a revision that was ready once.
    let health = if let Some(f) = status.and_then(|s| s.failure.as_ref()) {
        RevisionHealth::Failed {
            reason: f.reason.clone(),
            message: f.message.clone(),
        }
    } else if ever_ready || ready > 0 {
        RevisionHealth::Ready
    } else if restarts >= FAILED_AFTER_RESTARTS {
        let exit = status
            .and_then(|s| s.last_exit.clone())
            .unwrap_or_else(|| "exited".to_string());
        RevisionHealth::Failed {
            reason: "ExitCode".to_string(),
            message: format!(
                "the container exited before it was ready ({exit}), {restarts} times; see `sluice logs`"
            ),
        }
    } else {
        RevisionHealth::Deploying
    };
    RevisionFacts {
        health,
        actual_replicas: Some(ready as i32),
        desired_replicas: decision.map(|d| d.desired_scale as i32),
        image_digest: status.and_then(|s| s.image_digest.clone()),
    }
}

/// What the activator answers a failed revision's requests with, instead of holding them: its
/// Ready=False reason and message, whatever made it fail (the runtime's verdict, a crash loop).
fn activator_failure(health: &RevisionHealth) -> Option<sluice_activator::RevisionFailure> {
    match health {
        RevisionHealth::Failed { reason, message } => Some(sluice_activator::RevisionFailure {
            reason: reason.clone(),
            message: message.clone(),
        }),
        RevisionHealth::Ready | RevisionHealth::Deploying => None,
    }
}

/// The revision's Endpoints: one subset per address, since each sidecar listens on its own port.
fn revision_endpoints(key: &RevisionKey, port_name: &str, addrs: &[SocketAddr]) -> Endpoints {
    let mut eps = Endpoints::default();
    eps.metadata.namespace = key.namespace.clone();
    eps.metadata.name = key.name.clone();
    eps.subsets = addrs
        .iter()
        .map(|a| EndpointSubset {
            addresses: vec![EndpointAddress {
                ip: a.ip().to_string(),
                ..Default::default()
            }],
            ports: vec![EndpointPort {
                name: port_name.to_string(),
                port: i32::from(a.port()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    eps
}

/// The sidecar listeners Envoy rejected (listener name -> Envoy's message).
fn rejected_sidecars(report: &StatusReport) -> BTreeMap<String, String> {
    report
        .rejected
        .iter()
        .filter(|r| r.kind == "Listener" && r.name.starts_with(SIDECAR_PREFIX))
        .map(|r| (r.name.clone(), r.message.clone()))
        .collect()
}

/// The folder source with the serving plane in front of it.
pub struct ServingSource {
    folder: FolderSource,
    plane: Arc<ServingPlane>,
    eventing: Option<Arc<crate::eventing::EventingPlane>>,
    report: watch::Receiver<StatusReport>,
}

impl ServingSource {
    pub fn new(
        folder: FolderSource,
        plane: Arc<ServingPlane>,
        eventing: Option<Arc<crate::eventing::EventingPlane>>,
        report: watch::Receiver<StatusReport>,
    ) -> Self {
        ServingSource {
            folder,
            plane,
            eventing,
            report,
        }
    }
}

impl StateSource for ServingSource {
    fn run(&self, tx: watch::Sender<SourceSnapshot>) -> BoxFuture<'_, Result<(), SourceError>> {
        async move {
            let (inner_tx, mut inner_rx) = watch::channel(SourceSnapshot::default());
            let folder = self.folder.run(inner_tx);
            tokio::pin!(folder);
            let mut runtime_rx = self.plane.runtime.subscribe();
            let mut decisions_rx = self.plane.autoscaler.decisions();
            let mut report_rx = self.report.clone();
            let mut sidecars_rx = self.plane.sidecar_changes.subscribe();
            let mut read_once = false;
            let mut statuses = BTreeMap::new();
            let mut rejected = BTreeMap::new();
            loop {
                let mut report_only = false;
                tokio::select! {
                    res = &mut folder => return res,
                    changed = inner_rx.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        read_once = true;
                    }
                    _ = runtime_rx.changed() => {}
                    _ = decisions_rx.changed() => {}
                    _ = sidecars_rx.changed() => {}
                    _ = report_rx.changed() => report_only = true,
                }
                // Never publish before the folder was read: an empty state would wipe Envoy's config.
                if !read_once {
                    continue;
                }
                // The report changes with every Ingress status; only those of our own KIngresses
                // matter here (a folder of thousands of plain KIngresses must not re-sync on each).
                let (now, now_rejected) = {
                    let report = report_rx.borrow_and_update();
                    (
                        self.plane.owned_ingress_statuses(&report),
                        rejected_sidecars(&report),
                    )
                };
                if report_only && now == statuses && now_rejected == rejected {
                    continue;
                }
                statuses = now;
                rejected = now_rejected;
                let source = inner_rx.borrow_and_update().clone();
                runtime_rx.borrow_and_update();
                decisions_rx.borrow_and_update();
                sidecars_rx.borrow_and_update();
                let mut next = self.plane.sync(&source, &statuses, &rejected);
                if let Some(eventing) = &self.eventing {
                    eventing.apply(&source.objects, &source.state.secrets).await;
                    eventing.add_routes(&mut next.state);
                }
                tx.send_if_modified(|current| {
                    if *current == next {
                        return false;
                    }
                    *current = next;
                    true
                });
            }
        }
        .boxed()
    }

    fn write_ingress_status<'a>(
        &'a self,
        ingress: &'a Ingress,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        self.folder.write_ingress_status(ingress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_have_one_subset_per_sidecar() {
        let key = RevisionKey::new("default", "hello-00001");
        let eps = revision_endpoints(
            &key,
            "http",
            &[
                "127.0.0.1:4001".parse().unwrap(),
                "127.0.0.1:4002".parse().unwrap(),
            ],
        );
        assert_eq!(eps.subsets.len(), 2);
        assert_eq!(eps.subsets[1].ports[0].port, 4002);
        assert_eq!(eps.subsets[0].ports[0].name, "http");
    }

    /// A revision wanting one instance and having none yet.
    fn no_instance() -> sluice_runtime::RevisionStatus {
        sluice_runtime::RevisionStatus {
            desired: 1,
            instances: Vec::new(),
            restarts: 0,
            last_exit: None,
            removed: false,
            image_digest: None,
            failure: None,
        }
    }

    fn one_revision(key: &RevisionKey, status: sluice_runtime::RevisionStatus) -> RuntimeSnapshot {
        let mut snapshot = RuntimeSnapshot::default();
        snapshot.revisions.insert(key.clone(), status);
        snapshot
    }

    #[test]
    fn a_runtime_failure_makes_the_revision_fail_even_after_it_was_ready() {
        let key = RevisionKey::new("default", "web-00001");
        let mut snapshot = one_revision(
            &key,
            sluice_runtime::RevisionStatus {
                restarts: 2,
                image_digest: Some("sha256:abc".into()),
                failure: Some(sluice_runtime::RevisionFailure {
                    reason: "ContainerMissing".into(),
                    message: "No such image: web:v1".into(),
                }),
                ..no_instance()
            },
        );
        let f = facts(&snapshot, &key, None, true);
        assert_eq!(
            f.health,
            RevisionHealth::Failed {
                reason: "ContainerMissing".into(),
                message: "No such image: web:v1".into()
            }
        );
        // The activator answers its requests with that reason at once.
        assert_eq!(
            activator_failure(&f.health),
            Some(sluice_activator::RevisionFailure {
                reason: "ContainerMissing".into(),
                message: "No such image: web:v1".into()
            })
        );
        assert_eq!(f.image_digest.as_deref(), Some("sha256:abc"));
        // Once it clears, a revision that was ready is Ready again.
        snapshot.revisions.get_mut(&key).unwrap().failure = None;
        assert_eq!(
            facts(&snapshot, &key, None, true).health,
            RevisionHealth::Ready
        );
        assert_eq!(
            facts(&snapshot, &key, None, false).health,
            RevisionHealth::Deploying
        );
        // Held again (deploying, or ready at zero): the activator waits for an instance.
        for health in [RevisionHealth::Ready, RevisionHealth::Deploying] {
            assert_eq!(activator_failure(&health), None);
        }
    }

    #[test]
    fn a_crash_loop_before_ready_fails_the_revision_for_the_activator_too() {
        let key = RevisionKey::new("default", "web-00001");
        let snapshot = one_revision(
            &key,
            sluice_runtime::RevisionStatus {
                restarts: FAILED_AFTER_RESTARTS,
                last_exit: Some("exit code 1".into()),
                ..no_instance()
            },
        );
        let failure = activator_failure(&facts(&snapshot, &key, None, false).health)
            .expect("a crash loop fails the revision");
        assert_eq!(failure.reason, "ExitCode");
        assert!(
            failure.message.contains("exit code 1"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn volume_files_are_written_afresh_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("volumes/ns/web-00001");
        std::fs::create_dir_all(root.join("cfg")).unwrap();
        std::fs::write(root.join("cfg/stale"), "old").unwrap();
        let files = [
            VolumeFile {
                path: root.join("cfg/a/b.txt"),
                contents: b"hello".to_vec(),
                mode: 0o600,
            },
            VolumeFile {
                path: root.join("sec/password"),
                contents: b"hunter2".to_vec(),
                mode: 0o400,
            },
        ];
        write_volume_files(&root, &files).unwrap();
        assert!(!root.join("cfg/stale").exists());
        assert_eq!(std::fs::read(root.join("cfg/a/b.txt")).unwrap(), b"hello");
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("cfg/a/b.txt"), mode("sec/password")), (0o600, 0o400));
        // Written again (a restart): read-only files are replaced, not refused.
        write_volume_files(&root, &files).unwrap();
    }
}
