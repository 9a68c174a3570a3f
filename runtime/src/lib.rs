//! Runs revision instances as containers on a Docker-compatible engine or as local processes, behind
//! one interface: spawn, probes, stop, restart, logs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_runtime::RuntimeError> {
//! use sluice_api::autoscaling::RevisionKey;
//! use sluice_runtime::{LaunchSpec, ProcessRuntime, RuntimeOptions};
//!
//! let runtime = ProcessRuntime::new(RuntimeOptions::new("/tmp/sluice-state"))?;
//! let key = RevisionKey::new("default", "hello-00001");
//! let spec = LaunchSpec::new(vec!["python3".into(), "app.py".into()], "hello", "hello", "hello-00001");
//! runtime.set_revision(key.clone(), spec)?;
//! runtime.scale(&key, 2)?;
//! let mut snapshots = runtime.subscribe();
//! snapshots
//!     .wait_for(|s| s.revision(&key).is_some_and(|r| r.ready_count() == 2))
//!     .await
//!     .ok();
//! runtime.shutdown().await;
//! # Ok(()) }
//! ```

mod backoff;
mod container;
mod core;
mod engine;
mod engine_api;
mod expand;
mod health;
mod instance_runtime;
pub mod leftovers;
mod logs;
mod plan;
mod ports;
mod probe;
mod process;
mod readiness;
mod runtime;
mod spawner;
mod spec;
mod state_lock;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

pub use sluice_api::autoscaling::RevisionKey;

pub use backoff::{BackoffPolicy, RestartBackoff};
pub use container::ContainerOptions;
pub use engine_api::{reap_leftover_containers, reap_leftover_containers_at};
pub use expand::{expand, expand_env};
pub use health::{HealthEvent, HealthTracker, ProbeKind};
pub use instance_runtime::{InstanceRuntime, RuntimeKind};
pub use logs::{
    LogFollower, LogQuery, LogSelector, SERVICE_FILE, instance_log_path, log_files, read_logs,
    revision_log_dir,
};
pub use plan::{PlanInstance, ScalePlan, plan_scale};
pub use ports::{PortLease, PortPool, PortsExhausted, instance_port_range};
pub use readiness::{ProbeTiming, ReadinessTracker};
pub use runtime::{ContainerRuntime, ProcessRuntime, Runtime};
pub use spawner::spawn_tied;
pub use spec::{
    ImageSpec, LaunchSpec, Mount, MountSource, Probe, ProbeAction, PullPolicy, Resources,
    SecurityContext, SidecarSpec,
};
pub use state_lock::{Holder, LOCK_FILE, LockError, StateLock};

/// How the runtime runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Root of the runtime's files; logs go under `<state_dir>/logs/<namespace>/<revision>/`.
    pub state_dir: PathBuf,
    /// Probe timing beyond the Kubernetes probe fields (fast startup probing).
    pub probe_timing: ProbeTiming,
    /// Restart backoff for instances that exit on their own.
    pub backoff: BackoffPolicy,
    /// Where instances' PORTs come from; share it with whatever else allocates ports for instances
    /// (their sidecar listeners), so the two never collide.
    pub ports: std::sync::Arc<PortPool>,
}

impl RuntimeOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        RuntimeOptions {
            state_dir: state_dir.into(),
            probe_timing: ProbeTiming::default(),
            backoff: BackoffPolicy::default(),
            ports: PortPool::for_instances(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        }
    }
}

/// The lifecycle of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Spawned, readiness not yet reached `successThreshold`.
    Starting,
    /// Readiness succeeded `successThreshold` times in a row: it may receive traffic.
    Ready,
    /// Was ready, then failed `failureThreshold` probes in a row.
    NotReady,
    /// SIGTERM sent (scale-down, removal or shutdown); SIGKILL follows after the grace period.
    Terminating,
    /// The process is gone. Exited instances leave the snapshot at once; the variant exists for
    /// [`plan_scale`] callers and completeness.
    Exited,
}

/// One instance as the runtime last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    /// `<revision>-<5 random characters>`, as a pod name (also the log file's name).
    pub name: String,
    /// The PORT given to the process, or the container port (container runtime).
    pub port: u16,
    /// Where to send its traffic: `127.0.0.1:<port>` for a process, `<container IP on the runtime's
    /// bridge network>:<container port>` for a container (`0.0.0.0:<port>` until it has started).
    pub address: SocketAddr,
    pub state: InstanceState,
    /// The process (or the serving container's main process, as the host sees it).
    pub pid: Option<u32>,
    /// Just before the process was spawned (monotonic: `ready_at - spawned_at` is the app's startup time
    /// plus at most one startup probe interval).
    pub spawned_at: Instant,
    /// The same moment on the wall clock, for display.
    pub spawned_at_wall: SystemTime,
    /// When readiness first succeeded (not reset by a later NotReady).
    pub ready_at: Option<Instant>,
    /// While Terminating: when SIGKILL follows if the process has not exited (end of its grace period).
    pub kill_at: Option<Instant>,
    pub log_path: PathBuf,
    /// The engine's container ID of the serving container (container runtime).
    pub container_id: Option<String>,
}

/// One revision as the runtime last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionStatus {
    /// The last `scale` asked for.
    pub desired: u32,
    /// Live instances (Starting, Ready, NotReady, Terminating), oldest first.
    pub instances: Vec<InstanceStatus>,
    /// How many times an instance exited on its own and was (or will be) replaced.
    pub restarts: u32,
    /// How the last instance that exited on its own ended (e.g. `exit status: 1`).
    pub last_exit: Option<String>,
    /// `remove_revision` was called; the entry disappears once its instances have exited.
    pub removed: bool,
    /// The engine's image ID the revision runs (`sha256:...`), once resolved (container runtime):
    /// Knative's `containerStatuses[].imageDigest`. Pass it back as `ImageSpec::pinned` after a restart.
    pub image_digest: Option<String>,
    /// Why no instance can start now (image missing, engine unreachable...), in Knative's terms: the
    /// serving plane shows it as the Revision's Ready=False reason and message. `None` once it clears.
    pub failure: Option<RevisionFailure>,
}

/// A condition that keeps a revision from running, e.g. reason `ContainerMissing` with the engine's
/// words, or `ContainerEngineUnavailable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionFailure {
    pub reason: String,
    pub message: String,
}

impl RevisionStatus {
    pub fn ready_count(&self) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.state == InstanceState::Ready)
            .count() as u32
    }

    /// Addresses of the ready instances: the revision's endpoints.
    pub fn ready_addresses(&self) -> Vec<SocketAddr> {
        self.instances
            .iter()
            .filter(|i| i.state == InstanceState::Ready)
            .map(|i| i.address)
            .collect()
    }
}

/// Everything the runtime runs, published on every change (see [`ProcessRuntime::subscribe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeSnapshot {
    pub revisions: BTreeMap<RevisionKey, RevisionStatus>,
}

impl RuntimeSnapshot {
    pub fn revision(&self, key: &RevisionKey) -> Option<&RevisionStatus> {
        self.revisions.get(key)
    }

    /// Live instances over all revisions.
    pub fn instance_count(&self) -> usize {
        self.revisions.values().map(|r| r.instances.len()).sum()
    }
}

/// What went wrong, and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("revision {revision}: {reason}")]
    InvalidSpec { revision: String, reason: String },
    #[error(
        "revision {key}: its launch spec changed, but revisions are immutable; create a new revision \
         (or remove_revision first)"
    )]
    SpecChanged { key: RevisionKey },
    #[error("revision {key} is not known to the runtime: call set_revision first")]
    UnknownRevision { key: RevisionKey },
    #[error("the runtime is shutting down")]
    ShuttingDown,
    #[error(
        "instance {instance}: cannot start {program:?}: {source} (check the container's command and workingDir)"
    )]
    Spawn {
        instance: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pick a free port on 127.0.0.1: {0}")]
    Ports(#[source] PortsExhausted),
    #[error("instance logs at {path}: {source}")]
    Logs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The container engine refused or could not be reached; `message` carries the engine's words.
    #[error("container engine: {message}")]
    Engine { message: String },
    #[error("ProcessRuntime::new must be called inside a Tokio runtime")]
    NoTokioRuntime,
}
