//! The instance lifecycle shared by both runtimes: the I/O edge that acts on [`plan_scale`],
//! [`HealthTracker`] and [`RestartBackoff`] decisions, driving instances through a small [`Backend`]
//! (local processes in `runtime.rs`, containers in `container.rs`).
//!
//! One Tokio task per instance owns it: it waits for the backend's start, probes (startup, readiness,
//! liveness), notices the exit, and on a stop request sends SIGTERM, then SIGKILL after the grace
//! period. Shared state sits behind one mutex; every change republishes the snapshot.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::health::{HealthEvent, HealthTracker};
use crate::logs::{append, format_line, open_instance_log};
use crate::probe::{ExecProbe, probe_once};
use crate::{
    InstanceState, InstanceStatus, LaunchSpec, PlanInstance, RestartBackoff, RevisionFailure,
    RevisionKey, RevisionStatus, RuntimeError, RuntimeKind, RuntimeOptions, RuntimeSnapshot,
    plan_scale,
};

/// How long a startup or liveness kill waits for an exit the engine has not reported yet.
const EXIT_BEFORE_KILL: Duration = Duration::from_secs(1);

/// What the backend needs to start one instance.
pub struct StartContext {
    pub key: RevisionKey,
    /// `<revision>-<5 random characters>`.
    pub name: String,
    pub spec: Arc<LaunchSpec>,
    /// The image IDs the revision resolved to: the serving container's, then each sidecar's.
    pub images: Vec<String>,
    pub log: Arc<std::fs::File>,
    /// The canonical state dir, marking everything the runtime starts (see [`crate::leftovers`]).
    pub owner: String,
    pub handle: tokio::runtime::Handle,
}

/// The synchronous part of a start is done; the rest is `started`.
pub struct Launch<B: Backend> {
    /// Held while the instance lives; kills it at once from any thread ([`Kill::kill_now`]).
    pub killer: B::Killer,
    /// Provisional, until `started` gives the real ones.
    pub port: u16,
    pub address: SocketAddr,
    pub pid: Option<u32>,
    pub started: StartFuture<B>,
}

pub type StartFuture<B> = Pin<
    Box<
        dyn Future<
                Output = Result<
                    Started<<B as Backend>::Instance, <B as Backend>::Exec>,
                    StartFailure,
                >,
            > + Send,
    >,
>;

/// A running instance.
pub struct Started<I, E> {
    pub instance: I,
    pub exec: E,
    /// Where its traffic and TCP/HTTP/gRPC probes go.
    pub address: SocketAddr,
    pub port: u16,
    pub pid: Option<u32>,
    pub container_id: Option<String>,
    /// A probe's own `port` names a port of this address (containers); the process runtime leases
    /// PORT instead, so there it is ignored.
    pub probe_ports: bool,
}

/// Why an instance could not start; `failure` also marks the revision (engine gone, bad config).
#[derive(Debug, Clone)]
pub struct StartFailure {
    pub message: String,
    pub failure: Option<RevisionFailure>,
    /// The image the revision resolved to is gone (`docker rmi`): resolve its references again.
    pub resolve_again: bool,
}

/// How an instance ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// `exit status: 1`, `exit code 137 (OOMKilled)`...
    pub how: String,
    /// Set when the exit says something about the revision (the engine is unreachable).
    pub failure: Option<RevisionFailure>,
}

/// Kills an instance now, from any thread and without awaiting (kill_now, Drop).
pub trait Kill: Send + Sync + 'static {
    fn kill_now(&self);
}

/// A started instance, owned by its task.
pub trait BackendInstance: Send + 'static {
    /// Resolves when the instance has exited (on its own or signalled).
    fn wait(&mut self) -> impl Future<Output = Exit> + Send + '_;
    /// SIGTERM.
    fn terminate(&mut self) -> impl Future<Output = ()> + Send + '_;
    /// SIGKILL.
    fn kill(&mut self) -> impl Future<Output = ()> + Send + '_;
    /// After the exit: release what the instance held (its containers).
    fn cleanup(self) -> impl Future<Output = ()> + Send;
}

/// What a revision's instances run, once resolved.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Shown as the revision's image digest (the serving container's image ID).
    pub digest: Option<String>,
    /// Every container's image ID, serving container first.
    pub images: Vec<String>,
}

/// Resolves what a revision needs before its instances can start (its images).
pub type ResolveFuture = Pin<Box<dyn Future<Output = Result<Resolved, RevisionFailure>> + Send>>;

/// How instances are run. Public only in name (this module is private): the crate's two backends
/// are the only ones, and [`crate::Runtime`] names them in its public type.
pub trait Backend: Send + Sync + Sized + 'static {
    type Instance: BackendInstance;
    type Exec: ExecProbe + 'static;
    type Killer: Kill;
    const KIND: RuntimeKind;
    /// What this backend cannot run, at `set_revision`.
    fn check(&self, key: &RevisionKey, spec: &LaunchSpec) -> Result<(), RuntimeError>;
    /// `None`: instances can start at once. Otherwise the revision's instances wait until the future
    /// gives the image digest; a failure is retried with backoff.
    fn resolve(&self, spec: &Arc<LaunchSpec>) -> Option<ResolveFuture>;
    /// Starts an instance: the synchronous part here (an error is returned by `scale`), the rest in
    /// [`Launch::started`].
    fn launch(&self, ctx: &StartContext) -> Result<Launch<Self>, RuntimeError>;
    /// What the backend leaves once every instance is gone (the containers' network).
    fn after_shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// On Drop, after every instance was killed: release what must not outlive the runtime.
    fn on_drop(&self) {}
}

/// The runtime state and its lifecycle, generic over the backend.
pub(crate) struct Core<B: Backend> {
    pub options: RuntimeOptions,
    pub owner: String,
    pub handle: tokio::runtime::Handle,
    pub backend: B,
    inner: Mutex<Inner<B>>,
    snapshot: watch::Sender<RuntimeSnapshot>,
    /// Random keys for instance name suffixes.
    names: std::collections::hash_map::RandomState,
}

struct Inner<B: Backend> {
    revisions: BTreeMap<RevisionKey, Revision<B>>,
    next_id: u64,
    shutting_down: bool,
    /// kill_now was called: stops skip the grace period.
    killing: bool,
}

struct Revision<B: Backend> {
    spec: Arc<LaunchSpec>,
    desired: u32,
    instances: Vec<Instance<B>>,
    backoff: RestartBackoff,
    restarts: u32,
    last_exit: Option<String>,
    /// No replacement starts before this (restart backoff).
    start_not_before: Option<Instant>,
    retry_armed: bool,
    removed: bool,
    /// Instances may start (the image is resolved).
    resolved: bool,
    image_digest: Option<String>,
    images: Vec<String>,
    failure: Option<RevisionFailure>,
    /// Bumped by every set_revision, so a stale resolution is ignored.
    generation: u64,
}

struct Instance<B: Backend> {
    id: u64,
    status: InstanceStatus,
    killer: B::Killer,
    stop: Option<oneshot::Sender<()>>,
}

impl<B: Backend> Core<B> {
    pub fn new(options: RuntimeOptions, backend: B) -> Result<Self, RuntimeError> {
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| RuntimeError::NoTokioRuntime)?;
        let owner = canonical_owner(&options.state_dir)?;
        Ok(Core {
            options,
            owner,
            handle,
            backend,
            inner: Mutex::new(Inner {
                revisions: BTreeMap::new(),
                next_id: 0,
                shutting_down: false,
                killing: false,
            }),
            snapshot: watch::Sender::new(RuntimeSnapshot::default()),
            names: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<B>> {
        // A panic while holding the lock must not stop Drop from killing the instances.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_revision(
        self: &Arc<Self>,
        key: RevisionKey,
        spec: LaunchSpec,
    ) -> Result<(), RuntimeError> {
        spec.validate()?;
        for (what, name) in [("namespace", &key.namespace), ("revision", &key.name)] {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
                return Err(RuntimeError::InvalidSpec {
                    revision: key.to_string(),
                    reason: format!("{what} name {name:?} cannot name a log folder"),
                });
            }
        }
        self.backend.check(&key, &spec)?;
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(RuntimeError::ShuttingDown);
        }
        let spec = Arc::new(spec);
        let resolve = match inner.revisions.get_mut(&key) {
            Some(rev) if rev.removed => {
                rev.spec = Arc::clone(&spec);
                rev.removed = false;
                rev.desired = 0;
                rev.generation += 1;
                rev.failure = None;
                rev.image_digest = None;
                rev.resolved = false;
                Some(rev.generation)
            }
            Some(rev) if *rev.spec == *spec => None,
            Some(_) => return Err(RuntimeError::SpecChanged { key }),
            None => {
                inner.revisions.insert(
                    key.clone(),
                    Revision {
                        spec: Arc::clone(&spec),
                        desired: 0,
                        instances: Vec::new(),
                        backoff: RestartBackoff::default(),
                        restarts: 0,
                        last_exit: None,
                        start_not_before: None,
                        retry_armed: false,
                        removed: false,
                        resolved: false,
                        image_digest: None,
                        images: Vec::new(),
                        failure: None,
                        generation: 0,
                    },
                );
                Some(0)
            }
        };
        if let Some(generation) = resolve {
            match self.backend.resolve(&spec) {
                None => {
                    if let Some(rev) = inner.revisions.get_mut(&key) {
                        rev.resolved = true;
                    }
                }
                Some(first) => self.spawn_resolver(key, spec, generation, first),
            }
        }
        self.publish(&inner);
        Ok(())
    }

    /// Resolves the revision's image in the background; retries with backoff until it works or the
    /// revision is gone.
    fn spawn_resolver(
        self: &Arc<Self>,
        key: RevisionKey,
        spec: Arc<LaunchSpec>,
        generation: u64,
        first: ResolveFuture,
    ) {
        let core = Arc::clone(self);
        self.handle.spawn(async move {
            let policy = core.options.backoff;
            let mut backoff = RestartBackoff::default();
            let mut attempt = first;
            loop {
                let result = attempt.await;
                {
                    let mut inner = core.lock();
                    let Some(rev) = inner
                        .revisions
                        .get_mut(&key)
                        .filter(|r| r.generation == generation && !r.removed)
                    else {
                        return;
                    };
                    match result {
                        Ok(resolved) => {
                            rev.resolved = true;
                            rev.image_digest = resolved.digest;
                            rev.images = resolved.images;
                            rev.failure = None;
                            let _ = core.reconcile(&mut inner, &key);
                            core.publish(&inner);
                            return;
                        }
                        Err(failure) => {
                            tracing::warn!(revision = %key, reason = %failure.reason, message = %failure.message, "cannot resolve the revision's image");
                            rev.failure = Some(failure);
                            core.publish(&inner);
                        }
                    }
                }
                let delay = backoff
                    .on_exit(&policy, Duration::ZERO)
                    .max(policy.initial);
                tokio::time::sleep(delay).await;
                match core.backend.resolve(&spec) {
                    Some(next) => attempt = next,
                    None => attempt = Box::pin(async { Ok(Resolved::default()) }),
                }
            }
        });
    }

    pub fn scale(self: &Arc<Self>, key: &RevisionKey, desired: u32) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(RuntimeError::ShuttingDown);
        }
        let rev = inner
            .revisions
            .get_mut(key)
            .filter(|r| !r.removed)
            .ok_or_else(|| RuntimeError::UnknownRevision { key: key.clone() })?;
        rev.desired = desired;
        let result = self.reconcile(&mut inner, key);
        self.publish(&inner);
        result
    }

    pub fn remove_revision(self: &Arc<Self>, key: &RevisionKey) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let rev = inner
            .revisions
            .get_mut(key)
            .ok_or_else(|| RuntimeError::UnknownRevision { key: key.clone() })?;
        rev.desired = 0;
        rev.removed = true;
        let _ = self.reconcile(&mut inner, key);
        forget_if_gone(&mut inner, key);
        self.publish(&inner);
        Ok(())
    }

    pub fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot> {
        self.snapshot.subscribe()
    }

    pub fn snapshot(&self) -> RuntimeSnapshot {
        self.snapshot.borrow().clone()
    }

    pub async fn shutdown(self: &Arc<Self>) {
        let mut rx = self.subscribe();
        {
            let mut inner = self.lock();
            inner.shutting_down = true;
            let keys: Vec<RevisionKey> = inner.revisions.keys().cloned().collect();
            for key in keys {
                if let Some(rev) = inner.revisions.get_mut(&key) {
                    rev.removed = true;
                    rev.desired = 0;
                }
                let _ = self.reconcile(&mut inner, &key);
                forget_if_gone(&mut inner, &key);
            }
            self.publish(&inner);
        }
        let _ = rx.wait_for(|s| s.revisions.is_empty()).await;
    }

    /// Kills every instance now; their tasks notice the exit as usual.
    pub fn kill_now(&self) {
        let mut inner = self.lock();
        inner.killing = true;
        for rev in inner.revisions.values() {
            for inst in &rev.instances {
                inst.killer.kill_now();
            }
        }
    }

    /// For Drop: no more starts, every instance killed now, every task told to stop.
    pub fn kill_all_on_drop(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        inner.killing = true;
        for rev in inner.revisions.values_mut() {
            for inst in &mut rev.instances {
                inst.killer.kill_now();
                // The instance task sees the dropped sender as a stop request.
                inst.stop = None;
            }
        }
    }

    fn publish(&self, inner: &Inner<B>) {
        let revisions = inner
            .revisions
            .iter()
            .map(|(key, rev)| {
                (
                    key.clone(),
                    RevisionStatus {
                        desired: rev.desired,
                        instances: rev.instances.iter().map(|i| i.status.clone()).collect(),
                        restarts: rev.restarts,
                        last_exit: rev.last_exit.clone(),
                        removed: rev.removed,
                        image_digest: rev.image_digest.clone(),
                        failure: rev.failure.clone(),
                    },
                )
            })
            .collect();
        self.snapshot.send_replace(RuntimeSnapshot { revisions });
    }

    /// Acts on the scale plan for one revision. Returns the first start error.
    fn reconcile(
        self: &Arc<Self>,
        inner: &mut Inner<B>,
        key: &RevisionKey,
    ) -> Result<(), RuntimeError> {
        let shutting_down = inner.shutting_down;
        let Some(rev) = inner.revisions.get_mut(key) else {
            return Ok(());
        };
        let desired = if shutting_down || rev.removed {
            0
        } else {
            rev.desired
        };
        let plan_input: Vec<PlanInstance> = rev
            .instances
            .iter()
            .map(|i| PlanInstance {
                id: i.id,
                state: i.status.state,
            })
            .collect();
        let plan = plan_scale(&plan_input, desired);
        for id in &plan.stop {
            if let Some(inst) = rev.instances.iter_mut().find(|i| i.id == *id) {
                if inst.status.state != InstanceState::Terminating {
                    inst.status.kill_at = Some(Instant::now() + rev.spec.grace_period);
                }
                inst.status.state = InstanceState::Terminating;
                if let Some(stop) = inst.stop.take() {
                    let _ = stop.send(());
                }
            }
        }
        // Until the image is resolved, `scale` only records the desired count.
        if plan.start == 0 || !rev.resolved {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(not_before) = rev.start_not_before.filter(|t| *t > now) {
            self.arm_retry(rev, key, not_before);
            return Ok(());
        }
        rev.start_not_before = None;
        for _ in 0..plan.start {
            inner.next_id += 1;
            let id = inner.next_id;
            if let Err(e) = self.start_instance(inner, key, id) {
                tracing::warn!(revision = %key, error = %e, "cannot start instance");
                if let Some(rev) = inner.revisions.get_mut(key) {
                    rev.last_exit = Some(e.to_string());
                    self.back_off(rev, key, Instant::now(), None);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Delays the next start by the revision's backoff and reconciles then. `ran_for` is how long
    /// the instance that ended ran; `None` for a start that failed, which is never retried at once.
    fn back_off(
        self: &Arc<Self>,
        rev: &mut Revision<B>,
        key: &RevisionKey,
        now: Instant,
        ran_for: Option<Duration>,
    ) {
        let policy = self.options.backoff;
        let delay = rev
            .backoff
            .on_exit(&policy, ran_for.unwrap_or(Duration::ZERO));
        let delay = if ran_for.is_none() {
            delay.max(policy.initial)
        } else {
            delay
        };
        let not_before = now + delay;
        rev.start_not_before = Some(not_before);
        if !delay.is_zero() {
            self.arm_retry(rev, key, not_before);
        }
    }

    /// Reconciles the revision again at `at` (once the restart backoff has passed).
    fn arm_retry(self: &Arc<Self>, rev: &mut Revision<B>, key: &RevisionKey, at: Instant) {
        if rev.retry_armed {
            return;
        }
        rev.retry_armed = true;
        let core = Arc::clone(self);
        let key = key.clone();
        self.handle.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut inner = core.lock();
            if let Some(rev) = inner.revisions.get_mut(&key) {
                rev.retry_armed = false;
            }
            let _ = core.reconcile(&mut inner, &key);
            core.publish(&inner);
        });
    }

    fn instance_name(&self, revision: &str, id: u64, taken: &HashSet<&str>) -> String {
        // Kubernetes' pod name suffix alphabet (no vowels, no look-alike digits).
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut salt = 0u64;
        loop {
            let mut h = self.names.build_hasher();
            h.write_u64(id);
            h.write_u64(salt);
            h.write_u128(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            let mut x = h.finish();
            let suffix: String = (0..5)
                .map(|_| {
                    let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
                    x /= ALPHABET.len() as u64;
                    c
                })
                .collect();
            let name = format!("{revision}-{suffix}");
            if !taken.contains(name.as_str()) {
                return name;
            }
            salt += 1;
        }
    }

    fn start_instance(
        self: &Arc<Self>,
        inner: &mut Inner<B>,
        key: &RevisionKey,
        id: u64,
    ) -> Result<(), RuntimeError> {
        let rev = inner
            .revisions
            .get_mut(key)
            .expect("reconcile checked the revision");
        let spec = Arc::clone(&rev.spec);
        let name = {
            let taken: HashSet<&str> = rev
                .instances
                .iter()
                .map(|i| i.status.name.as_str())
                .collect();
            self.instance_name(&key.name, id, &taken)
        };
        let (log_path, log) = open_instance_log(
            &self.options.state_dir,
            &key.namespace,
            &key.name,
            &spec.service,
            &name,
        )
        .map_err(|source| RuntimeError::Logs {
            path: crate::revision_log_dir(&self.options.state_dir, &key.namespace, &key.name),
            source,
        })?;
        let log = Arc::new(log);
        let ctx = StartContext {
            key: key.clone(),
            name: name.clone(),
            spec: Arc::clone(&spec),
            images: rev.images.clone(),
            log: Arc::clone(&log),
            owner: self.owner.clone(),
            handle: self.handle.clone(),
        };
        let spawned_at_wall = SystemTime::now();
        let spawned_at = Instant::now();
        let launch = self.backend.launch(&ctx)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        rev.instances.push(Instance {
            id,
            status: InstanceStatus {
                name: name.clone(),
                port: launch.port,
                address: launch.address,
                state: InstanceState::Starting,
                pid: launch.pid,
                spawned_at,
                spawned_at_wall,
                ready_at: None,
                kill_at: None,
                log_path,
                container_id: None,
            },
            killer: launch.killer,
            stop: Some(stop_tx),
        });
        let task = InstanceTask {
            core: Arc::clone(self),
            key: key.clone(),
            id,
            name,
            spec,
            spawned_at,
            log,
        };
        self.handle.spawn(task.run(launch.started, stop_rx));
        Ok(())
    }

    fn set_state(&self, key: &RevisionKey, id: u64, state: InstanceState, now: Instant) {
        let mut inner = self.lock();
        let Some(inst) = inner
            .revisions
            .get_mut(key)
            .and_then(|r| r.instances.iter_mut().find(|i| i.id == id))
        else {
            return;
        };
        // A stop request wins over a late probe result.
        if inst.status.state == InstanceState::Terminating {
            return;
        }
        inst.status.state = state;
        if state == InstanceState::Ready && inst.status.ready_at.is_none() {
            inst.status.ready_at = Some(now);
        }
        self.publish(&inner);
    }

    fn on_started(&self, key: &RevisionKey, id: u64, started: &Started<B::Instance, B::Exec>) {
        let mut inner = self.lock();
        let Some(rev) = inner.revisions.get_mut(key) else {
            return;
        };
        // It runs, so whatever kept the revision from running has cleared.
        rev.failure = None;
        if let Some(inst) = rev.instances.iter_mut().find(|i| i.id == id) {
            inst.status.address = started.address;
            inst.status.port = started.port;
            inst.status.pid = started.pid;
            inst.status.container_id = started.container_id.clone();
        }
        self.publish(&inner);
    }

    fn killing(&self) -> bool {
        self.lock().killing
    }

    /// The instance is gone: forget it, and replace it if it ended on its own (`crash` says how).
    fn on_exited(
        self: &Arc<Self>,
        key: &RevisionKey,
        id: u64,
        crash: Option<String>,
        failure: Option<RevisionFailure>,
        now: Instant,
    ) {
        let mut inner = self.lock();
        let shutting_down = inner.shutting_down;
        let Some(rev) = inner.revisions.get_mut(key) else {
            return;
        };
        let Some(pos) = rev.instances.iter().position(|i| i.id == id) else {
            return;
        };
        let inst = rev.instances.remove(pos);
        let failure_seen = failure.is_some();
        if failure_seen {
            rev.failure = failure;
        }
        let replace =
            inst.status.state != InstanceState::Terminating && !shutting_down && !rev.removed;
        if replace && let Some(how) = crash {
            let ran_for = now.saturating_duration_since(inst.status.spawned_at);
            // An instance lost with its engine did not crash: replace it, but do not count it.
            if failure_seen {
                rev.start_not_before = None;
                self.back_off(rev, key, now, None);
                let _ = self.reconcile(&mut inner, key);
                forget_if_gone(&mut inner, key);
                self.publish(&inner);
                return;
            }
            rev.restarts += 1;
            tracing::warn!(revision = %key, instance = %inst.status.name, exit = %how, "instance exited on its own; replacing it");
            rev.last_exit = Some(how);
            self.back_off(rev, key, now, Some(ran_for));
            let _ = self.reconcile(&mut inner, key);
        }
        forget_if_gone(&mut inner, key);
        self.publish(&inner);
    }

    /// The backend could not start the instance: forget it, retry with backoff.
    fn on_start_failed(self: &Arc<Self>, key: &RevisionKey, id: u64, failure: StartFailure) {
        let mut inner = self.lock();
        let shutting_down = inner.shutting_down;
        let Some(rev) = inner.revisions.get_mut(key) else {
            return;
        };
        rev.instances.retain(|i| i.id != id);
        tracing::warn!(revision = %key, error = %failure.message, "cannot start instance");
        rev.last_exit = Some(failure.message);
        if failure.failure.is_some() {
            rev.failure = failure.failure;
        }
        // The pinned image is gone: no start can work until the reference names an image again (a
        // rebuild), so starts wait for a fresh resolution, retried with backoff. `resolved` false
        // already means another failed start began it.
        if failure.resolve_again && rev.resolved && !shutting_down && !rev.removed {
            let unpinned = Arc::new(rev.spec.unpinned());
            if let Some(first) = self.backend.resolve(&unpinned) {
                tracing::info!(revision = %key, "its image is gone from the engine: resolving the reference again");
                rev.resolved = false;
                rev.generation += 1;
                self.spawn_resolver(key.clone(), unpinned, rev.generation, first);
            }
        }
        if !shutting_down && !rev.removed {
            self.back_off(rev, key, Instant::now(), None);
            let _ = self.reconcile(&mut inner, key);
        }
        forget_if_gone(&mut inner, key);
        self.publish(&inner);
    }
}

fn forget_if_gone<B: Backend>(inner: &mut Inner<B>, key: &RevisionKey) {
    if inner
        .revisions
        .get(key)
        .is_some_and(|r| r.removed && r.instances.is_empty())
    {
        inner.revisions.remove(key);
    }
}

/// Creates the state dir and returns its canonical path: the owner mark of everything we start.
pub(crate) fn canonical_owner(state_dir: &std::path::Path) -> Result<String, RuntimeError> {
    let err = |source| RuntimeError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(err)?;
    Ok(std::fs::canonicalize(state_dir)
        .map_err(err)?
        .display()
        .to_string())
}

/// Everything one instance's task needs.
struct InstanceTask<B: Backend> {
    core: Arc<Core<B>>,
    key: RevisionKey,
    id: u64,
    name: String,
    spec: Arc<LaunchSpec>,
    spawned_at: Instant,
    log: Arc<std::fs::File>,
}

/// How the probe loop ended.
enum End {
    /// Asked to stop (scale-down, removal, shutdown).
    Stop,
    /// Exited on its own.
    Exited(Exit),
    /// Killed for failing its startup or liveness probe.
    Unhealthy(String),
}

impl<B: Backend> InstanceTask<B> {
    fn event(&self, text: &str) {
        append(
            &self.log,
            &format_line(SystemTime::now(), &self.name, "sluice", text.as_bytes()),
        );
    }

    async fn run(self, started: StartFuture<B>, mut stop_rx: oneshot::Receiver<()>) {
        // The start is not cancelled by a stop request: a half-made container would leak.
        let started = match started.await {
            Ok(s) => s,
            Err(failure) => {
                self.event(&format!("cannot start: {}", failure.message));
                self.core.on_start_failed(&self.key, self.id, failure);
                return;
            }
        };
        self.core.on_started(&self.key, self.id, &started);
        let Started {
            mut instance,
            exec,
            address,
            probe_ports,
            ..
        } = started;
        let end = self
            .probe_until_end(&mut instance, &exec, address, probe_ports, &mut stop_rx)
            .await;
        let (crash, failure) = match end {
            End::Stop => {
                self.terminate(&mut instance).await;
                (None, None)
            }
            End::Exited(exit) => {
                self.event(&format!("exited on its own: {}", exit.how));
                (Some(exit.how), exit.failure)
            }
            End::Unhealthy(why) => {
                self.event(&format!("{why}: killing it"));
                instance.kill().await;
                let exit = instance.wait().await;
                self.event(&format!("killed: {}", exit.how));
                (Some(why), exit.failure)
            }
        };
        instance.cleanup().await;
        self.core
            .on_exited(&self.key, self.id, crash, failure, Instant::now());
    }

    async fn probe_until_end(
        &self,
        instance: &mut B::Instance,
        exec: &B::Exec,
        address: SocketAddr,
        probe_ports: bool,
        stop_rx: &mut oneshot::Receiver<()>,
    ) -> End {
        let timing = self.core.options.probe_timing;
        let mut health = HealthTracker::new(
            self.spec.readiness.clone(),
            self.spec.liveness.clone(),
            self.spec.startup.clone(),
            self.spawned_at,
        );
        let mut last_error: Option<String> = None;
        loop {
            let (kind, at) = health.next();
            let probe = health.probe(kind).clone();
            let timeout = health.attempt_timeout(kind, &timing, Instant::now().max(at));
            let addr = match probe.port {
                Some(port) if probe_ports => SocketAddr::new(address.ip(), port),
                _ => address,
            };
            let attempt = async {
                tokio::time::sleep_until(at.into()).await;
                probe_once(&probe.action, addr, timeout, exec).await
            };
            tokio::select! {
                biased;
                _ = &mut *stop_rx => return End::Stop,
                exit = instance.wait() => return End::Exited(exit),
                result = attempt => {
                    let now = Instant::now();
                    let ok = result.is_ok();
                    if let Err(e) = result {
                        last_error = Some(e);
                    }
                    let why = || last_error.as_deref().unwrap_or("probe failed").to_string();
                    match health.observe(kind, ok, &timing, now) {
                        None => {}
                        Some(HealthEvent::Started) => self.event("startup probe succeeded"),
                        Some(HealthEvent::State(state)) => {
                            match state {
                                InstanceState::Ready => self.event("ready"),
                                _ => self.event(&format!("not ready: {}", why())),
                            }
                            self.core.set_state(&self.key, self.id, state, now);
                        }
                        Some(HealthEvent::Kill(kind)) => {
                            // A probe refused because the app just exited: an engine may report
                            // the exit a little after (Podman's wait polls), and the exit is what
                            // happened, so it gets a moment to come first.
                            if let Ok(exit) = tokio::time::timeout(EXIT_BEFORE_KILL, instance.wait()).await {
                                return End::Exited(exit);
                            }
                            return End::Unhealthy(format!("{} probe failed: {}", kind.name(), why()));
                        }
                    }
                    if ok {
                        last_error = None;
                    }
                }
            }
        }
    }

    /// SIGTERM, SIGKILL after the grace period (at once after kill_now).
    async fn terminate(&self, instance: &mut B::Instance) {
        let grace = self.spec.grace_period;
        if self.core.killing() {
            instance.kill().await;
            let exit = instance.wait().await;
            self.event(&format!("killed: {}", exit.how));
            return;
        }
        instance.terminate().await;
        self.event(&format!("stopping: SIGTERM, SIGKILL after {grace:?}"));
        match tokio::time::timeout(grace, instance.wait()).await {
            Ok(exit) => self.event(&format!("stopped: {}", exit.how)),
            Err(_) => {
                instance.kill().await;
                let exit = instance.wait().await;
                self.event(&format!("killed after the grace period: {}", exit.how));
            }
        }
    }
}
