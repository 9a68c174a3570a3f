//! The container runtime: revision instances as containers on a Docker-compatible engine (Docker,
//! Podman's compatible socket), through the engine's HTTP API (bollard). The lifecycle is the shared
//! core's (`core.rs`); this file is the container backend: resolve images, create/start/inspect,
//! follow logs, wait, signal, remove. What to ask the engine for is decided in `engine.rs` (pure).
//!
//! An instance is its serving container plus its sidecars, which join the serving container's network
//! namespace (`NetworkMode: container:<id>`), so they reach each other on localhost as in a pod. The
//! serving container sits on a user bridge network of this runtime; the machine reaches it at its IP
//! on that network, and nothing is published on the host's interfaces.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, LogsOptions,
    StartContainerOptions, WaitContainerOptions,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::core::{
    Backend, BackendInstance, Core, Exit, Kill, Launch, ResolveFuture, Resolved, StartContext,
    StartFailure, Started, canonical_owner,
};
use crate::engine::{self, ContainerPlan};
use crate::engine_api::{
    engine_answered, engine_client, engine_words, ensure_network, lock, remove_all,
    remove_container, remove_when_back, resolve_image, short, short_image, unavailable,
};
use crate::logs::{append, format_line};
use crate::probe::ExecProbe;
use crate::runtime::Runtime;
use crate::{
    ContainerRuntime, LaunchSpec, RevisionFailure, RevisionKey, RuntimeError, RuntimeKind,
    RuntimeOptions,
};

/// "No timeout" for the log and wait streams (a century; tokio handles far deadlines).
const STREAM_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Container-runtime knobs beyond [`RuntimeOptions`].
#[derive(Debug, Clone, Default)]
pub struct ContainerOptions {
    /// Added to every container and network the runtime creates (tests mark theirs).
    pub extra_labels: Vec<(String, String)>,
    /// The engine's address (`unix:///path`, `tcp://host:port`); `None`: `DOCKER_HOST`, else the
    /// default socket.
    pub engine: Option<String>,
}

impl ContainerRuntime {
    /// Connects to the engine named by `DOCKER_HOST`, else the default socket; an error when no
    /// engine answers (the caller then falls back to processes, or reports why images cannot run).
    pub async fn connect(options: RuntimeOptions) -> Result<ContainerRuntime, RuntimeError> {
        Self::connect_with(options, ContainerOptions::default()).await
    }

    /// [`ContainerRuntime::connect`] with container-specific options.
    pub async fn connect_with(
        options: RuntimeOptions,
        container: ContainerOptions,
    ) -> Result<ContainerRuntime, RuntimeError> {
        let docker = engine_client(container.engine.as_deref()).await?;
        let owner = canonical_owner(&options.state_dir)?;
        let network = engine::network_name(&owner);
        ensure_network(&docker, &network, &owner, &container.extra_labels).await?;
        let backend = ContainerBackend {
            docker,
            network,
            owner: owner.clone(),
            extra_labels: container.extra_labels,
            empty_dirs: options.state_dir.join("emptydir"),
            live: Default::default(),
            engine: container.engine,
        };
        Ok(Runtime::with_core(Core::new(options, backend)?))
    }

    /// The bridge network the instances run on.
    pub fn network(&self) -> &str {
        &self.core.backend.network
    }
}

/// Runs instances as containers: resolves images, creates, starts, follows and removes them.
pub struct ContainerBackend {
    docker: Docker,
    network: String,
    owner: String,
    extra_labels: Vec<(String, String)>,
    /// `<state_dir>/emptydir/<instance>/<volume>`: emptyDir volumes, shared by an instance's containers.
    empty_dirs: PathBuf,
    /// Containers created and not removed yet: what Drop removes.
    live: Arc<Mutex<BTreeSet<String>>>,
    engine: Option<String>,
}

impl Backend for ContainerBackend {
    type Instance = ContainerInstance;
    type Exec = EngineExec;
    type Killer = ContainerKiller;
    const KIND: RuntimeKind = RuntimeKind::Container;

    /// The network goes once its containers have.
    async fn after_shutdown(&self) {
        if let Err(e) = self.docker.remove_network(&self.network).await {
            tracing::debug!(network = %self.network, error = %e, "cannot remove the network");
        }
    }

    fn on_drop(&self) {
        let live: Vec<String> = lock(&self.live).iter().cloned().collect();
        let network = self.network.clone();
        let engine = self.engine.clone();
        // Drop cannot await, and the caller's runtime may be going away: remove the containers from
        // a thread with a runtime of its own, and wait for it (bounded by the engine's answers).
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(docker) = engine_client(engine.as_deref()).await else {
                    return;
                };
                remove_all(&docker, live).await;
                let _ = docker.remove_network(&network).await;
            });
        });
        let _ = done.join();
    }

    fn check(&self, key: &RevisionKey, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        let fail = |reason: String| RuntimeError::InvalidSpec {
            revision: key.to_string(),
            reason,
        };
        if spec.image.is_none() {
            return Err(fail(
                "the container runtime needs the container's `image` (a revision with only a \
                 `command` runs on the process runtime)"
                    .into(),
            ));
        }
        let mounts = spec
            .mounts
            .iter()
            .map(|m| (spec.container_name.as_str(), m))
            .chain(
                spec.sidecars
                    .iter()
                    .flat_map(|s| s.mounts.iter().map(|m| (s.name.as_str(), m))),
            );
        for (container, m) in mounts {
            match &m.source {
                crate::MountSource::Dir(dir) if !dir.is_absolute() => {
                    return Err(fail(format!(
                        "container {container:?}: volumeMount {:?}: source folder {} must be an \
                         absolute path",
                        m.target,
                        dir.display()
                    )));
                }
                crate::MountSource::EmptyDir { name, .. }
                    if name.is_empty() || name == ".." || name.contains('/') =>
                {
                    return Err(fail(format!(
                        "container {container:?}: volumeMount {:?}: emptyDir name {name:?} is not \
                         a valid volume name",
                        m.target
                    )));
                }
                _ => {}
            }
        }
        for sidecar in &spec.sidecars {
            if sidecar.image.reference.is_empty() {
                return Err(fail(format!(
                    "container {:?}: image is empty",
                    sidecar.name
                )));
            }
        }
        Ok(())
    }

    fn resolve(&self, spec: &Arc<LaunchSpec>) -> Option<ResolveFuture> {
        let docker = self.docker.clone();
        let spec = Arc::clone(spec);
        Some(Box::pin(async move {
            let mut checks = vec![spec.security];
            checks.extend(spec.sidecars.iter().map(|s| s.security));
            let mut images = Vec::new();
            for (image, security) in engine::images_of(&spec).into_iter().zip(checks) {
                let need_user = security.run_as_non_root && security.run_as_user.is_none();
                let (id, user) = resolve_image(&docker, image, need_user).await?;
                engine::verify_run_as_non_root(&security, user.as_deref()).map_err(|message| {
                    RevisionFailure {
                        reason: engine::REASON_CONFIG_ERROR.to_string(),
                        message,
                    }
                })?;
                images.push(id);
            }
            Ok(Resolved {
                digest: images.first().cloned(),
                images,
            })
        }))
    }

    fn launch(&self, ctx: &StartContext) -> Result<Launch<Self>, RuntimeError> {
        let spec = Arc::clone(&ctx.spec);
        let port = spec
            .container_port
            .unwrap_or(engine::DEFAULT_CONTAINER_PORT);
        let empty_dir_root = self.empty_dirs.join(&ctx.name);
        let needs_dir = spec
            .mounts
            .iter()
            .chain(spec.sidecars.iter().flat_map(|s| s.mounts.iter()))
            .filter_map(|m| match &m.source {
                crate::MountSource::EmptyDir {
                    name,
                    memory: false,
                } => Some(name),
                _ => None,
            });
        for name in needs_dir {
            let dir = empty_dir_root.join(name);
            std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::StateDir {
                path: dir.clone(),
                source,
            })?;
            // Whatever user the container runs as may write there, as in a fresh emptyDir.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        }
        let ids: Arc<Mutex<Vec<String>>> = Default::default();
        let killer = ContainerKiller {
            docker: self.docker.clone(),
            ids: Arc::clone(&ids),
            handle: ctx.handle.clone(),
        };
        let job = StartJob {
            docker: self.docker.clone(),
            network: self.network.clone(),
            owner: self.owner.clone(),
            extra_labels: self.extra_labels.clone(),
            live: Arc::clone(&self.live),
            key: ctx.key.clone(),
            name: ctx.name.clone(),
            spec,
            images: ctx.images.clone(),
            log: Arc::clone(&ctx.log),
            handle: ctx.handle.clone(),
            empty_dir_root,
            port,
            ids,
        };
        Ok(Launch {
            killer,
            port,
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            pid: None,
            started: Box::pin(job.run()),
        })
    }
}

/// The asynchronous part of starting one instance.
struct StartJob {
    docker: Docker,
    network: String,
    owner: String,
    extra_labels: Vec<(String, String)>,
    live: Arc<Mutex<BTreeSet<String>>>,
    key: RevisionKey,
    name: String,
    spec: Arc<LaunchSpec>,
    images: Vec<String>,
    log: Arc<std::fs::File>,
    handle: tokio::runtime::Handle,
    empty_dir_root: PathBuf,
    port: u16,
    ids: Arc<Mutex<Vec<String>>>,
}

impl StartJob {
    fn event(&self, text: &str) {
        append(
            &self.log,
            &format_line(SystemTime::now(), &self.name, "sluice", text.as_bytes()),
        );
    }

    async fn run(self) -> Result<Started<ContainerInstance, EngineExec>, StartFailure> {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        match self.start_all(&exits_tx).await {
            Ok((address, pid, main_id)) => {
                let ids = lock(&self.ids).clone();
                Ok(Started {
                    instance: ContainerInstance {
                        docker: self.docker.clone(),
                        ids,
                        exits: exits_rx,
                        first_exit: None,
                        live: Arc::clone(&self.live),
                        empty_dir_root: self.empty_dir_root.clone(),
                    },
                    exec: EngineExec {
                        docker: self.docker.clone(),
                        container: main_id.clone(),
                    },
                    address,
                    port: self.port,
                    pid,
                    container_id: Some(main_id),
                    probe_ports: true,
                })
            }
            Err(failure) => {
                // Do not leave half an instance behind.
                let ids = lock(&self.ids).clone();
                for id in ids {
                    if remove_container(&self.docker, &id).await.is_ok() {
                        lock(&self.live).remove(&id);
                    }
                }
                let _ = std::fs::remove_dir_all(&self.empty_dir_root);
                Err(failure)
            }
        }
    }

    fn start_failure(&self, what: &str, e: EngineError) -> StartFailure {
        let words = engine_words(&e);
        let image_gone = matches!(
            &e,
            EngineError::DockerResponseServerError {
                status_code: 404,
                ..
            }
        ) && words.contains("image");
        let failure = if !engine_answered(&e) {
            Some(unavailable(&e))
        } else if image_gone {
            Some(RevisionFailure {
                reason: engine::REASON_CONTAINER_MISSING.to_string(),
                message: engine::image_missing_message(
                    self.spec
                        .image
                        .as_ref()
                        .map_or("", |i| i.reference.as_str()),
                    &words,
                ),
            })
        } else {
            Some(RevisionFailure {
                reason: "CreateContainerError".to_string(),
                message: words.clone(),
            })
        };
        StartFailure {
            message: format!("{what}: {words}"),
            failure,
            resolve_again: image_gone,
        }
    }

    /// Creates and starts the serving container, then the sidecars in its network namespace.
    /// Returns the serving container's address, host pid and ID.
    async fn start_all(
        &self,
        exits: &mpsc::UnboundedSender<Exit>,
    ) -> Result<(SocketAddr, Option<u32>, String), StartFailure> {
        let spec = &self.spec;
        let image = self.images.first().cloned().unwrap_or_default();
        let env = engine::container_env(spec, &spec.env, self.port);
        let main = ContainerPlan {
            image: image.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env,
            working_dir: spec.working_dir.clone(),
            labels: self.labels(&spec.container_name),
            resources: spec.resources,
            security: spec.security,
            mounts: spec.mounts.clone(),
            empty_dir_root: self.empty_dir_root.clone(),
            network_mode: self.network.clone(),
        };
        let main_id = self
            .create_and_start(&self.name, engine::create_body(&main))
            .await?;
        // The IP exists once started; this inspect is the one round trip added to create+start.
        let info = self
            .docker
            .inspect_container(&main_id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.start_failure("inspect container", e))?;
        let pid = info
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        let ip = info
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .ok_or_else(|| StartFailure {
                message: format!(
                    "container {main_id} has no address on network {}",
                    self.network
                ),
                failure: None,
                resolve_again: false,
            })?;
        self.follow(&main_id, None, exits);
        self.event(&format!(
            "started container {} image {} ({}) at {ip}:{}",
            short(&main_id),
            spec.image.as_ref().map_or("", |i| i.reference.as_str()),
            short_image(&image),
            self.port
        ));
        for (i, sidecar) in spec.sidecars.iter().enumerate() {
            let image = self.images.get(i + 1).cloned().unwrap_or_default();
            let plan = ContainerPlan {
                image: image.clone(),
                command: sidecar.command.clone(),
                args: sidecar.args.clone(),
                env: engine::sidecar_env(spec, &sidecar.env),
                working_dir: sidecar.working_dir.clone(),
                labels: self.labels(&sidecar.name),
                resources: sidecar.resources,
                security: sidecar.security,
                mounts: sidecar.mounts.clone(),
                empty_dir_root: self.empty_dir_root.clone(),
                network_mode: format!("container:{main_id}"),
            };
            let id = self
                .create_and_start(
                    &format!("{}-{}", self.name, sidecar.name),
                    engine::create_body(&plan),
                )
                .await?;
            self.follow(&id, Some(sidecar.name.clone()), exits);
            self.event(&format!(
                "started sidecar {} container {} image {}",
                sidecar.name,
                short(&id),
                sidecar.image.reference
            ));
        }
        tracing::info!(revision = %self.key, instance = %self.name, container = %short(&main_id), %ip, "instance started");
        Ok((SocketAddr::new(ip, self.port), pid, main_id))
    }

    fn labels(&self, container: &str) -> Vec<(String, String)> {
        engine::labels(
            &self.owner,
            &self.key.namespace,
            &self.spec,
            &self.name,
            container,
            &self.extra_labels,
        )
    }

    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, StartFailure> {
        // The network may have gone away (a reap of leftovers, `docker network prune`); the engine
        // says so at create or at start (Docker: 404 "network ... not found" at start; Podman: 500
        // "... network not found" at create). Make it again and retry once.
        let network_gone = |e: &EngineError| {
            matches!(e, EngineError::DockerResponseServerError { status_code, message }
                if (*status_code == 404 && message.starts_with("network "))
                    || message.ends_with("network not found"))
        };
        let mut retried = false;
        loop {
            let created = self
                .docker
                .create_container(
                    Some(CreateContainerOptions {
                        name: Some(name.to_string()),
                        ..Default::default()
                    }),
                    body.clone(),
                )
                .await;
            let id = match created {
                Ok(created) => created.id,
                Err(e) if network_gone(&e) && !retried => {
                    retried = true;
                    self.recreate_network().await?;
                    continue;
                }
                Err(e) => return Err(self.start_failure("create container", e)),
            };
            lock(&self.ids).push(id.clone());
            lock(&self.live).insert(id.clone());
            match self
                .docker
                .start_container(&id, None::<StartContainerOptions>)
                .await
            {
                Ok(()) => return Ok(id),
                Err(e) if network_gone(&e) && !retried => {
                    retried = true;
                    if remove_container(&self.docker, &id).await.is_ok() {
                        lock(&self.live).remove(&id);
                        lock(&self.ids).retain(|i| *i != id);
                    }
                    self.recreate_network().await?;
                }
                Err(e) => return Err(self.start_failure("start container", e)),
            }
        }
    }

    async fn recreate_network(&self) -> Result<(), StartFailure> {
        tracing::info!(network = %self.network, "the network is gone; creating it again");
        ensure_network(&self.docker, &self.network, &self.owner, &self.extra_labels)
            .await
            .map_err(|e| StartFailure {
                message: e.to_string(),
                failure: None,
                resolve_again: false,
            })
    }

    /// Copies the container's output into the instance log and reports its exit.
    fn follow(&self, id: &str, sidecar: Option<String>, exits: &mpsc::UnboundedSender<Exit>) {
        // bollard's request timeout covers waiting for the response head; an engine may hold that
        // back until a wait ends or a log line comes, so these long-lived requests get no timeout.
        let streams = self.docker.clone().with_timeout(STREAM_TIMEOUT);
        self.handle.spawn(copy_logs(
            streams.clone(),
            id.to_string(),
            Arc::clone(&self.log),
            self.name.clone(),
            sidecar.clone(),
        ));
        let docker = streams;
        let id = id.to_string();
        let exits = exits.clone();
        self.handle.spawn(async move {
            let mut exit = wait_exit(&docker, &id).await;
            if let Some(name) = sidecar {
                exit.how = format!("sidecar {name}: {}", exit.how);
            }
            let _ = exits.send(exit);
        });
    }
}

/// Waits until the container stops; how it ended.
async fn wait_exit(docker: &Docker, id: &str) -> Exit {
    let mut stream = docker.wait_container(
        id,
        Some(WaitContainerOptions {
            condition: "not-running".to_string(),
        }),
    );
    let code = match stream.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(EngineError::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) if engine_answered(&e) => {
            return Exit {
                how: format!("container gone: {}", engine_words(&e)),
                failure: None,
            };
        }
        Some(Err(e)) => {
            return Exit {
                how: format!("container engine unreachable: {}", engine_words(&e)),
                failure: Some(unavailable(&e)),
            };
        }
        None => {
            return Exit {
                how: "container engine unreachable: the wait ended without an answer".into(),
                failure: Some(RevisionFailure {
                    reason: engine::REASON_ENGINE_UNAVAILABLE.to_string(),
                    message: "the container engine closed the connection".to_string(),
                }),
            };
        }
    };
    let oom = if code != 0 {
        docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    } else {
        false
    };
    Exit {
        how: engine::describe_exit(code, oom),
        failure: None,
    }
}

/// Follows a container's stdout and stderr into the instance log, line by line.
async fn copy_logs(
    docker: Docker,
    id: String,
    log: Arc<std::fs::File>,
    instance: String,
    sidecar: Option<String>,
) {
    let mut stream = docker.logs(
        &id,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let prefix = sidecar.map(|s| format!("[{s}] ")).unwrap_or_default();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let emit = |stream: &str, line: &[u8]| {
        let mut text = prefix.as_bytes().to_vec();
        text.extend_from_slice(line);
        append(
            &log,
            &format_line(SystemTime::now(), &instance, stream, &text),
        );
    };
    while let Some(Ok(chunk)) = stream.next().await {
        let (buf, name) = match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                out.extend_from_slice(&message);
                (&mut out, "stdout")
            }
            LogOutput::StdErr { message } => {
                err.extend_from_slice(&message);
                (&mut err, "stderr")
            }
            LogOutput::StdIn { .. } => continue,
        };
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            emit(name, &line);
        }
        if buf.len() >= 64 * 1024 {
            let line = std::mem::take(buf);
            emit(name, &line);
        }
    }
    for (buf, name) in [(out, "stdout"), (err, "stderr")] {
        if !buf.is_empty() {
            emit(name, &buf);
        }
    }
}

/// Kills an instance's containers from any thread.
pub struct ContainerKiller {
    docker: Docker,
    ids: Arc<Mutex<Vec<String>>>,
    handle: tokio::runtime::Handle,
}

impl Kill for ContainerKiller {
    fn kill_now(&self) {
        let ids = lock(&self.ids).clone();
        for id in ids {
            let docker = self.docker.clone();
            self.handle.spawn(async move {
                let _ = docker
                    .kill_container(
                        &id,
                        Some(KillContainerOptions {
                            signal: "SIGKILL".into(),
                        }),
                    )
                    .await;
            });
        }
    }
}

pub struct ContainerInstance {
    docker: Docker,
    /// The serving container first, then the sidecars.
    ids: Vec<String>,
    exits: mpsc::UnboundedReceiver<Exit>,
    first_exit: Option<Exit>,
    live: Arc<Mutex<BTreeSet<String>>>,
    empty_dir_root: PathBuf,
}

impl ContainerInstance {
    async fn signal(&self, signal: &str) {
        for id in &self.ids {
            if let Err(e) = self
                .docker
                .kill_container(
                    id,
                    Some(KillContainerOptions {
                        signal: signal.into(),
                    }),
                )
                .await
            {
                tracing::debug!(container = %short(id), signal, error = %e, "cannot signal container");
            }
        }
    }
}

impl BackendInstance for ContainerInstance {
    async fn wait(&mut self) -> Exit {
        if let Some(exit) = &self.first_exit {
            return exit.clone();
        }
        // Any of the instance's containers ending ends the instance (a sidecar exit is a crash).
        let exit = self.exits.recv().await.unwrap_or(Exit {
            how: "unknown exit".into(),
            failure: None,
        });
        self.first_exit = Some(exit.clone());
        exit
    }

    async fn terminate(&mut self) {
        self.signal("SIGTERM").await;
    }

    async fn kill(&mut self) {
        self.signal("SIGKILL").await;
    }

    async fn cleanup(self) {
        let mut unreachable = Vec::new();
        // Sidecars first: they live in the serving container's network namespace, and Podman
        // refuses to remove a container that others depend on.
        for id in self.ids.iter().rev() {
            match remove_container(&self.docker, id).await {
                Ok(()) => {
                    lock(&self.live).remove(id);
                }
                Err(e) if !engine_answered(&e) => unreachable.push(id.clone()),
                // Still in `live`: Drop tries again; a later run reaps it by its owner label.
                Err(e) => {
                    tracing::warn!(container = %short(id), error = %e, "cannot remove container")
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.empty_dir_root);
        if !unreachable.is_empty() {
            // The engine is away: remove them once it answers again, so a recovered run does not
            // keep the old containers beside their replacements.
            tokio::spawn(remove_when_back(self.docker, unreachable, self.live));
        }
    }
}

/// Exec probes through the engine's exec API, inside the serving container.
#[derive(Clone)]
pub struct EngineExec {
    docker: Docker,
    container: String,
}

impl ExecProbe for EngineExec {
    async fn exec(&self, command: &[String]) -> Result<(), String> {
        let program = command.first().cloned().unwrap_or_default();
        let created = self
            .docker
            .create_exec(
                &self.container,
                ExecConfig {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("exec probe {program}: {}", engine_words(&e)))?;
        match self
            .docker
            .start_exec(&created.id, None::<StartExecOptions>)
            .await
            .map_err(|e| format!("exec probe {program}: {}", engine_words(&e)))?
        {
            // The output ends when the command does.
            StartExecResults::Attached { mut output, .. } => while output.next().await.is_some() {},
            StartExecResults::Detached => {}
        }
        let info = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| format!("exec probe {program}: {}", engine_words(&e)))?;
        match info.exit_code {
            Some(0) => Ok(()),
            Some(code) => Err(format!("exec probe {program}: exit code {code}")),
            None => Err(format!("exec probe {program}: no exit code")),
        }
    }
}
