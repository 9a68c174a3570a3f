//! The process runtime: the I/O edge that acts on [`plan_scale`], [`ReadinessTracker`] and
//! [`RestartBackoff`] decisions.
//!
//! One Tokio task per instance owns its child process: it probes readiness, notices the process exit,
//! and on a stop request sends SIGTERM, then SIGKILL after the grace period, to the instance's whole
//! process group. Shared state sits behind one mutex; every change republishes the snapshot.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{oneshot, watch};

use crate::logs::{append, format_line, open_instance_log};
use crate::probe::probe_once;
use crate::{
    InstanceState, InstanceStatus, LaunchSpec, LogQuery, PlanInstance, ReadinessTracker,
    RestartBackoff, RevisionKey, RevisionStatus, RuntimeError, RuntimeOptions, RuntimeSnapshot,
    plan_scale,
};

/// Runs revision instances as local child processes. Create it inside a Tokio runtime; its methods are
/// synchronous (they start work on that runtime) except [`ProcessRuntime::shutdown`].
///
/// Dropping it SIGKILLs every instance's process group at once, so no process outlives it even when
/// the caller panics; call [`ProcessRuntime::shutdown`] for a graceful stop.
pub struct ProcessRuntime {
    shared: Arc<Shared>,
}

struct Shared {
    options: RuntimeOptions,
    /// The canonical state dir, set as [`crate::leftovers::OWNER_ENV`] on every instance so that a
    /// later run on the same state dir recognises what this one left.
    owner: String,
    handle: tokio::runtime::Handle,
    inner: Mutex<Inner>,
    snapshot: watch::Sender<RuntimeSnapshot>,
    /// Random keys for instance name suffixes.
    names: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct Inner {
    revisions: BTreeMap<RevisionKey, Revision>,
    next_id: u64,
    shutting_down: bool,
}

struct Revision {
    spec: Arc<LaunchSpec>,
    desired: u32,
    instances: Vec<Instance>,
    backoff: RestartBackoff,
    restarts: u32,
    last_exit: Option<String>,
    /// No replacement starts before this (restart backoff).
    start_not_before: Option<Instant>,
    retry_armed: bool,
    removed: bool,
}

struct Instance {
    id: u64,
    status: InstanceStatus,
    /// The process group to signal (the child is its leader); `None` once the process is reaped.
    pgid: Option<i32>,
    stop: Option<oneshot::Sender<()>>,
    /// Its PORT, back to the pool when the instance is gone.
    _port: crate::PortLease,
}

impl ProcessRuntime {
    /// Creates the runtime; `options.state_dir` is created if missing.
    pub fn new(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| RuntimeError::NoTokioRuntime)?;
        std::fs::create_dir_all(&options.state_dir).map_err(|source| RuntimeError::StateDir {
            path: options.state_dir.clone(),
            source,
        })?;
        let owner = std::fs::canonicalize(&options.state_dir)
            .map_err(|source| RuntimeError::StateDir {
                path: options.state_dir.clone(),
                source,
            })?
            .display()
            .to_string();
        Ok(ProcessRuntime {
            shared: Arc::new(Shared {
                options,
                owner,
                handle,
                inner: Mutex::new(Inner::default()),
                snapshot: watch::Sender::new(RuntimeSnapshot::default()),
                names: Default::default(),
            }),
        })
    }

    /// Registers a revision (with desired scale 0). Revisions are immutable: registering the same key
    /// again with an equal spec is a no-op, with a different spec an error ([`RuntimeError::SpecChanged`]),
    /// unless the revision was removed (its old instances may still be terminating).
    pub fn set_revision(&self, key: RevisionKey, spec: LaunchSpec) -> Result<(), RuntimeError> {
        spec.validate()?;
        for (what, name) in [("namespace", &key.namespace), ("revision", &key.name)] {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
                return Err(RuntimeError::InvalidSpec {
                    revision: key.to_string(),
                    reason: format!("{what} name {name:?} cannot name a log folder"),
                });
            }
        }
        let mut inner = self.shared.lock();
        if inner.shutting_down {
            return Err(RuntimeError::ShuttingDown);
        }
        match inner.revisions.get_mut(&key) {
            Some(rev) if rev.removed => {
                rev.spec = Arc::new(spec);
                rev.removed = false;
                rev.desired = 0;
            }
            Some(rev) if *rev.spec == spec => {}
            Some(_) => return Err(RuntimeError::SpecChanged { key }),
            None => {
                inner.revisions.insert(
                    key,
                    Revision {
                        spec: Arc::new(spec),
                        desired: 0,
                        instances: Vec::new(),
                        backoff: RestartBackoff::default(),
                        restarts: 0,
                        last_exit: None,
                        start_not_before: None,
                        retry_armed: false,
                        removed: false,
                    },
                );
            }
        }
        self.shared.publish(&inner);
        Ok(())
    }

    /// Starts or stops instances to reach `desired`. Scale-down stops not-ready, then newest instances
    /// first. A spawn failure is returned (the desired count is kept and retried with backoff, as a
    /// crash would be).
    pub fn scale(&self, key: &RevisionKey, desired: u32) -> Result<(), RuntimeError> {
        let mut inner = self.shared.lock();
        if inner.shutting_down {
            return Err(RuntimeError::ShuttingDown);
        }
        let rev = inner
            .revisions
            .get_mut(key)
            .filter(|r| !r.removed)
            .ok_or_else(|| RuntimeError::UnknownRevision { key: key.clone() })?;
        rev.desired = desired;
        let result = self.shared.reconcile(&mut inner, key);
        self.shared.publish(&inner);
        result
    }

    /// Stops all instances of a revision and forgets it once they have exited.
    pub fn remove_revision(&self, key: &RevisionKey) -> Result<(), RuntimeError> {
        let mut inner = self.shared.lock();
        let rev = inner
            .revisions
            .get_mut(key)
            .ok_or_else(|| RuntimeError::UnknownRevision { key: key.clone() })?;
        rev.desired = 0;
        rev.removed = true;
        let _ = self.shared.reconcile(&mut inner, key);
        self.shared.forget_if_gone(&mut inner, key);
        self.shared.publish(&inner);
        Ok(())
    }

    /// The current snapshot and every change after it.
    pub fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot> {
        self.shared.snapshot.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> RuntimeSnapshot {
        self.shared.snapshot.borrow().clone()
    }

    /// The log lines of the selected instances, merged in time order (see [`crate::read_logs`]).
    pub fn logs(&self, query: &LogQuery) -> Result<Vec<String>, RuntimeError> {
        crate::read_logs(&self.shared.options.state_dir, query)
    }

    /// Follows the selected logs (see [`crate::LogFollower`]).
    pub fn follow_logs(&self, query: LogQuery) -> crate::LogFollower {
        crate::LogFollower::new(&self.shared.options.state_dir, query)
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.shared.options.state_dir
    }

    /// Stops every instance (SIGTERM, then SIGKILL after each revision's grace period) and waits until
    /// all have exited. Later `set_revision`/`scale` calls fail with [`RuntimeError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let mut rx = self.subscribe();
        {
            let mut inner = self.shared.lock();
            inner.shutting_down = true;
            let keys: Vec<RevisionKey> = inner.revisions.keys().cloned().collect();
            for key in keys {
                if let Some(rev) = inner.revisions.get_mut(&key) {
                    rev.removed = true;
                    rev.desired = 0;
                }
                let _ = self.shared.reconcile(&mut inner, &key);
                self.shared.forget_if_gone(&mut inner, &key);
            }
            self.shared.publish(&inner);
        }
        let _ = rx.wait_for(|s| s.revisions.is_empty()).await;
    }

    /// SIGKILLs every instance's process group now, without a grace period (a second Ctrl-C). Their
    /// tasks reap them as usual, so a pending [`ProcessRuntime::shutdown`] then returns at once.
    pub fn kill_now(&self) {
        let inner = self.shared.lock();
        for rev in inner.revisions.values() {
            for inst in &rev.instances {
                if let Some(pgid) = inst.pgid {
                    signal_group(pgid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.shutting_down = true;
        for rev in inner.revisions.values_mut() {
            for inst in &mut rev.instances {
                if let Some(pgid) = inst.pgid {
                    signal_group(pgid, libc::SIGKILL);
                }
                // The instance task sees the dropped sender as a stop request and reaps the child.
                inst.stop = None;
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock must not stop Drop from killing the children.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, inner: &Inner) {
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
                        image_digest: None,
                        failure: None,
                    },
                )
            })
            .collect();
        self.snapshot.send_replace(RuntimeSnapshot { revisions });
    }

    fn forget_if_gone(&self, inner: &mut Inner, key: &RevisionKey) {
        if inner
            .revisions
            .get(key)
            .is_some_and(|r| r.removed && r.instances.is_empty())
        {
            inner.revisions.remove(key);
        }
    }

    /// Acts on the scale plan for one revision. Returns the first spawn error.
    fn reconcile(
        self: &Arc<Self>,
        inner: &mut Inner,
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
        if plan.start == 0 {
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
                let policy = self.options.backoff;
                if let Some(rev) = inner.revisions.get_mut(key) {
                    let delay = rev
                        .backoff
                        .on_exit(&policy, Duration::ZERO)
                        .max(policy.initial);
                    rev.last_exit = Some(e.to_string());
                    let not_before = Instant::now() + delay;
                    rev.start_not_before = Some(not_before);
                    self.arm_retry(rev, key, not_before);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reconciles the revision again at `at` (once the restart backoff has passed).
    fn arm_retry(self: &Arc<Self>, rev: &mut Revision, key: &RevisionKey, at: Instant) {
        if rev.retry_armed {
            return;
        }
        rev.retry_armed = true;
        let shared = Arc::clone(self);
        let key = key.clone();
        self.handle.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut inner = shared.lock();
            if let Some(rev) = inner.revisions.get_mut(&key) {
                rev.retry_armed = false;
            }
            let _ = shared.reconcile(&mut inner, &key);
            shared.publish(&inner);
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
        inner: &mut Inner,
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
        let lease = self.options.ports.lease().map_err(RuntimeError::Ports)?;
        let port = lease.port();
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
        let env = instance_env(&spec, port);
        let (program, args) = spec.argv();
        // Kubernetes expands $(VAR) in command and args from the container's environment.
        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let program = crate::expand::expand(program, lookup);
        let args: Vec<String> = args
            .iter()
            .map(|a| crate::expand::expand(a, lookup))
            .collect();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            // After the spec's env, so an app cannot hide from the next run's reaping by accident.
            .env(crate::leftovers::OWNER_ENV, &self.owner)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so SIGTERM/SIGKILL reach the children it forks (a shell's, say).
            .process_group(0)
            // Backstop only: Drop and the instance task signal the whole group themselves.
            .kill_on_drop(true);
        if let Some(dir) = &spec.working_dir {
            cmd.current_dir(dir);
        }
        let spawned_at_wall = SystemTime::now();
        let spawned_at = Instant::now();
        // SIGKILL when sluice dies, even by kill -9: an instance never outlives the runtime's process.
        let mut child = crate::spawn_tied(cmd, libc::SIGKILL).map_err(|source| {
            append(
                &log,
                &format_line(
                    SystemTime::now(),
                    &name,
                    "sluice",
                    format!("cannot start {program:?}: {source}").as_bytes(),
                ),
            );
            RuntimeError::Spawn {
                instance: name.clone(),
                program: program.to_string(),
                source,
            }
        })?;
        let pid = child.id();
        // The child leads its group (process_group(0)); never signal group 0 or 1.
        let pgid = pid.map(|p| p as i32).filter(|p| *p > 1);
        let log = Arc::new(log);
        append(
            &log,
            &format_line(
                spawned_at_wall,
                &name,
                "sluice",
                format!(
                    "started pid {} port {port}: {program} {}",
                    pid.unwrap_or(0),
                    spec.argv().1.join(" ")
                )
                .as_bytes(),
            ),
        );
        if let Some(out) = child.stdout.take() {
            self.handle
                .spawn(pump(out, Arc::clone(&log), name.clone(), "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            self.handle
                .spawn(pump(err, Arc::clone(&log), name.clone(), "stderr"));
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        rev.instances.push(Instance {
            id,
            status: InstanceStatus {
                name: name.clone(),
                port,
                address,
                state: InstanceState::Starting,
                pid,
                spawned_at,
                spawned_at_wall,
                ready_at: None,
                kill_at: None,
                log_path,
                container_id: None,
            },
            pgid,
            stop: Some(stop_tx),
            _port: lease,
        });
        tracing::info!(revision = %key, instance = %name, ?pid, port, "instance started");
        let task = InstanceTask {
            shared: Arc::clone(self),
            key: key.clone(),
            id,
            name,
            spec,
            env,
            address,
            spawned_at,
            pgid,
            log,
        };
        self.handle.spawn(task.run(child, stop_rx));
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

    /// The instance's process has been reaped: forget it, and replace it if it exited on its own.
    fn on_exited(
        self: &Arc<Self>,
        key: &RevisionKey,
        id: u64,
        status: Option<ExitStatus>,
        now: Instant,
    ) {
        let mut inner = self.lock();
        let shutting_down = inner.shutting_down;
        let policy = self.options.backoff;
        let Some(rev) = inner.revisions.get_mut(key) else {
            return;
        };
        let Some(pos) = rev.instances.iter().position(|i| i.id == id) else {
            return;
        };
        let inst = rev.instances.remove(pos);
        let crashed =
            inst.status.state != InstanceState::Terminating && !shutting_down && !rev.removed;
        if crashed {
            let ran_for = now.saturating_duration_since(inst.status.spawned_at);
            let delay = rev.backoff.on_exit(&policy, ran_for);
            rev.restarts += 1;
            let how = status.map_or_else(|| "unknown exit".to_string(), |s| s.to_string());
            tracing::warn!(revision = %key, instance = %inst.status.name, exit = %how, ?delay, "instance exited on its own; replacing it");
            rev.last_exit = Some(how);
            rev.start_not_before = Some(now + delay);
            let _ = self.reconcile(&mut inner, key);
        }
        self.forget_if_gone(&mut inner, key);
        self.publish(&inner);
    }
}

/// Everything one instance's task needs.
struct InstanceTask {
    shared: Arc<Shared>,
    key: RevisionKey,
    id: u64,
    name: String,
    spec: Arc<LaunchSpec>,
    env: Vec<(String, String)>,
    address: SocketAddr,
    spawned_at: Instant,
    pgid: Option<i32>,
    log: Arc<std::fs::File>,
}

impl InstanceTask {
    fn event(&self, text: &str) {
        append(
            &self.log,
            &format_line(SystemTime::now(), &self.name, "sluice", text.as_bytes()),
        );
    }

    async fn run(self, mut child: Child, mut stop_rx: oneshot::Receiver<()>) {
        let probe = &self.spec.readiness;
        let timing = self.shared.options.probe_timing;
        let mut tracker = ReadinessTracker::new();
        let mut next = ReadinessTracker::first_probe_at(probe, self.spawned_at);
        let mut last_error: Option<String> = None;
        let status = loop {
            let now = Instant::now();
            let timeout = tracker.attempt_timeout(probe, &timing, self.spawned_at, now.max(next));
            let at = next;
            let attempt = async {
                tokio::time::sleep_until(at.into()).await;
                probe_once(
                    &probe.action,
                    self.address,
                    timeout,
                    &self.env,
                    self.spec.working_dir.as_deref(),
                )
                .await
            };
            tokio::select! {
                biased;
                _ = &mut stop_rx => break self.terminate(&mut child).await,
                status = child.wait() => {
                    let status = status.ok();
                    self.event(&format!("exited on its own: {}", describe(status)));
                    break status;
                }
                result = attempt => {
                    let now = Instant::now();
                    let ok = result.is_ok();
                    if let Err(e) = result {
                        last_error = Some(e);
                    }
                    if let Some(state) = tracker.observe(probe, ok) {
                        match state {
                            InstanceState::Ready => self.event("ready"),
                            _ => self.event(&format!(
                                "not ready: {}",
                                last_error.as_deref().unwrap_or("probe failed")
                            )),
                        }
                        self.shared.set_state(&self.key, self.id, state, now);
                    }
                    next = tracker.next_probe_at(probe, &timing, self.spawned_at, now);
                }
            }
        };
        // Whatever the leader did, its group goes with it (as a container's processes do).
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGKILL);
        }
        self.shared
            .on_exited(&self.key, self.id, status, Instant::now());
    }

    /// SIGTERM to the group, SIGKILL after the grace period.
    async fn terminate(&self, child: &mut Child) -> Option<ExitStatus> {
        let grace = self.spec.grace_period;
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGTERM);
        }
        self.event(&format!("stopping: SIGTERM, SIGKILL after {grace:?}"));
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                let status = status.ok();
                self.event(&format!("stopped: {}", describe(status)));
                status
            }
            Err(_) => {
                if let Some(pgid) = self.pgid {
                    signal_group(pgid, libc::SIGKILL);
                }
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                self.event(&format!(
                    "killed after the grace period: {}",
                    describe(status)
                ));
                status
            }
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "unknown status".into(), |s| s.to_string())
}

/// Longest log line kept whole; a longer run without a newline is split (it would grow memory without
/// bound otherwise).
const MAX_LOG_LINE: usize = 64 * 1024;

/// Copies one output stream into the log, line by line with a prefix.
async fn pump(
    stream: impl AsyncRead + Unpin,
    log: Arc<std::fs::File>,
    instance: String,
    name: &'static str,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => {
                if !line.is_empty() {
                    append(
                        &log,
                        &format_line(SystemTime::now(), &instance, name, &line),
                    );
                }
                return;
            }
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..=i]);
                    (true, i + 1)
                }
                None => {
                    line.extend_from_slice(buf);
                    (line.len() >= MAX_LOG_LINE, buf.len())
                }
            },
        };
        reader.consume(used);
        if done {
            append(
                &log,
                &format_line(SystemTime::now(), &instance, name, &line),
            );
            line.clear();
        }
    }
}

/// The process environment: the spec's env, then Knative's (which wins, as Knative reserves these
/// names). The runtime's own environment is inherited underneath (PATH, HOME, ...), unlike a container.
fn instance_env(spec: &LaunchSpec, port: u16) -> Vec<(String, String)> {
    // Knative's PORT comes first in the pod's env, so the user's values can refer to it.
    let mut with_port = vec![("PORT".to_string(), port.to_string())];
    with_port.extend(spec.env.iter().cloned());
    let mut env: Vec<(String, String)> = crate::expand::expand_env(&with_port)
        .into_iter()
        .skip(1)
        .collect();
    env.extend([
        ("PORT".to_string(), port.to_string()),
        ("K_SERVICE".to_string(), spec.service.clone()),
        ("K_CONFIGURATION".to_string(), spec.configuration.clone()),
        ("K_REVISION".to_string(), spec.revision.clone()),
    ]);
    env
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // ESRCH: the group is already gone, which is what we wanted.
        if err.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %err, "cannot signal instance process group");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_can_be_shared_across_tasks() {
        fn is<T: Send + Sync>() {}
        is::<ProcessRuntime>();
    }

    #[test]
    fn knative_env_wins_over_the_spec_env() {
        let mut spec = LaunchSpec::new(vec!["x".into()], "svc", "cfg", "cfg-00001");
        spec.env = vec![("A".into(), "1".into()), ("PORT".into(), "1".into())];
        let env = instance_env(&spec, 8080);
        let last = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("PORT"), Some("8080"));
        assert_eq!(last("A"), Some("1"));
        assert_eq!(last("K_SERVICE"), Some("svc"));
        assert_eq!(last("K_CONFIGURATION"), Some("cfg"));
        assert_eq!(last("K_REVISION"), Some("cfg-00001"));
    }

    #[tokio::test]
    async fn output_is_logged_line_by_line_and_long_runs_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let long = 2 * MAX_LOG_LINE + 100;
        let mut input = b"one\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', long));
        input.extend(b"\nlast without newline");
        pump(&input[..], Arc::new(file), "i-1".into(), "stdout").await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.contains(" i-1 stdout ")));
        let texts: Vec<&str> = text
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap())
            .collect();
        let (xs, others): (Vec<&str>, Vec<&str>) = texts.iter().partition(|t| t.starts_with('x'));
        assert_eq!(others, vec!["one", "two", "last without newline"]);
        // Split into pieces of at most the cap plus one read buffer, none lost.
        assert!(xs.len() >= 2, "{} pieces", xs.len());
        assert!(xs.iter().all(|x| x.len() <= MAX_LOG_LINE + 8 * 1024));
        assert_eq!(xs.iter().map(|x| x.len()).sum::<usize>(), long);
    }
}
