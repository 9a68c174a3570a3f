//! The `sluice up` harness: a temp folder of YAML, the real binary on free loopback ports, its control
//! API, and a guard that stops it (and its Envoy) when dropped, printing its log when a test panics.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::client::Req;
use crate::ports::{free_port, loopback};
use crate::process::ProcessGuard;
use crate::yaml;

/// At most this many `sluice up` (each with an Envoy) run at once in one test process: the machines
/// that run these tests have two cores.
pub const MAX_CONCURRENT_SLUICES: usize = 3;
static SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_SLUICES);

/// How long `sluice up` gets to answer on its control API.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped `sluice up` gets to stop its Envoy before the group is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The workspace root (the folder above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// The `sluice` binary: `$SLUICE_BIN`, else `<workspace>/target/release/sluice`, built once per test
/// process with `cargo build --release --bin sluice` (a no-op when it is already up to date).
pub fn sluice_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build_sluice().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_or_build_sluice() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLUICE_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(bin.is_file(), "SLUICE_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    let root = workspace_root();
    let status = crate::cargo()
        .args(["build", "--release", "--bin", "sluice"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .with_context(|| "running cargo build --release --bin sluice".to_string())?;
    anyhow::ensure!(
        status.success(),
        "cargo build --release --bin sluice failed ({status})"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("sluice");
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing after a successful build",
        bin.display()
    );
    Ok(bin)
}

/// Checks that `sluice up` will find an Envoy (it looks at `$ENVOY_BIN`, then `.venv/bin/envoy`, then
/// PATH). Returns an `ENVOY_BIN` to hand it: the real binary inside the venv, which starts faster than
/// the `.venv/bin/envoy` launcher (shared/ENVOY.md).
pub fn envoy_for_sluice() -> Result<Option<PathBuf>> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(bin.is_file(), "ENVOY_BIN={} is not a file", bin.display());
        return Ok(None);
    }
    let venv = workspace_root().join(".venv");
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for entry in entries.flatten() {
            let real = entry.path().join("site-packages/envoy/_bin/envoy");
            if real.is_file() {
                return Ok(Some(real));
            }
        }
    }
    if venv.join("bin/envoy").is_file() {
        return Ok(None);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("envoy").is_file()))
        .unwrap_or(false);
    if on_path {
        return Ok(None);
    }
    bail!(
        "Envoy not found: set ENVOY_BIN, or run `bash scripts/setup` to install it into {}",
        venv.display()
    )
}

/// The ports one `sluice up` uses, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub external: u16,
    pub internal: u16,
    pub tls: u16,
    pub admin: u16,
    pub xds: u16,
    pub control: u16,
    pub activator: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports {
            external: free_port(),
            internal: free_port(),
            tls: free_port(),
            admin: free_port(),
            xds: free_port(),
            control: free_port(),
            activator: free_port(),
        }
    }
}

/// One Knative condition of an object's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The condition `type_` of a Knative object (JSON), if it has one.
pub fn condition(object: &Value, type_: &str) -> Option<Condition> {
    let conditions = object.pointer("/status/conditions")?.as_array()?;
    let c = conditions.iter().find(|c| c["type"] == type_)?;
    let text = |key: &str| c[key].as_str().unwrap_or_default().to_string();
    Some(Condition {
        type_: type_.to_string(),
        status: text("status"),
        reason: text("reason"),
        message: text("message"),
    })
}

/// Knative's `IsReady`: Ready is "True" and the status is about the current generation.
pub fn is_ready(object: &Value) -> bool {
    let generation = object
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let observed = object
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    observed == generation && condition(object, "Ready").is_some_and(|c| c.status == "True")
}

/// A running `sluice up` over a temp folder.
pub struct Sluice {
    // Declared first: dropped (stopped) before the folders go away.
    process: ProcessGuard,
    pub ports: Ports,
    root: tempfile::TempDir,
    config_dir: PathBuf,
    log_path: PathBuf,
    /// What it was started with, to start it again ([`Sluice::restart`]).
    binaries: Binaries,
    options: StartOptions,
    _slot: SemaphorePermit<'static>,
}

#[derive(Clone)]
struct Binaries {
    sluice: PathBuf,
    envoy: Option<PathBuf>,
    wasm: Option<PathBuf>,
}

struct Launched {
    process: ProcessGuard,
    ports: Ports,
    root: tempfile::TempDir,
    config_dir: PathBuf,
    log_path: PathBuf,
}

/// How to start `sluice up`, beyond the defaults of [`Sluice::start`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// `--state-dir` (default: a `state` folder beside the watched folder, removed with it): give two
    /// runs the same one to test what a run inherits from the one before.
    pub state_dir: Option<PathBuf>,
    /// `ENVOY_BIN` (default: the project's Envoy).
    pub envoy: Option<PathBuf>,
    /// More arguments to `sluice up`.
    pub args: Vec<String>,
    /// `--queue-proxy`: which build of the queue-proxy filter (None: sluice up's default). Both are
    /// built for the tests and handed over (SLUICE_QUEUE_PROXY_WASM, SLUICE_QUEUE_PROXY_NATIVE).
    pub queue_proxy: Option<crate::queue_proxy::Form>,
}

fn launch(
    bin: &Path,
    envoy: Option<&Path>,
    wasm: Option<&Path>,
    options: &StartOptions,
) -> Result<Launched> {
    let root = tempfile::Builder::new().prefix("sluice-e2e-").tempdir()?;
    // The log lives beside the watched folder, not in it, so writing it triggers no rescan.
    let config_dir = root.path().join("config");
    std::fs::create_dir(&config_dir)?;
    let log_path = root.path().join("sluice.log");
    let ports = Ports::pick();
    let process = spawn_up(
        bin,
        envoy,
        wasm,
        options,
        root.path(),
        &config_dir,
        &log_path,
        &ports,
    )?;
    Ok(Launched {
        process,
        ports,
        root,
        config_dir,
        log_path,
    })
}

/// Spawns `sluice up` on `config_dir` and `ports`, its output appended to `log_path`.
#[allow(clippy::too_many_arguments)]
fn spawn_up(
    bin: &Path,
    envoy: Option<&Path>,
    wasm: Option<&Path>,
    options: &StartOptions,
    root: &Path,
    config_dir: &Path,
    log_path: &Path,
    ports: &Ports,
) -> Result<ProcessGuard> {
    let log = File::options().create(true).append(true).open(log_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .arg(config_dir)
        .args(["--external-port", &ports.external.to_string()])
        .args(["--internal-port", &ports.internal.to_string()])
        .args(["--tls-port", &ports.tls.to_string()])
        .args(["--admin-port", &ports.admin.to_string()])
        .args(["--xds-port", &ports.xds.to_string()])
        .args(["--control-port", &ports.control.to_string()])
        .args(["--activator-port", &ports.activator.to_string()])
        .arg("--state-dir")
        .arg(
            options
                .state_dir
                .clone()
                .unwrap_or_else(|| root.join("state")),
        )
        .args(&options.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os("SLUICE_LOG").is_none() {
        cmd.env("SLUICE_LOG", "info");
    }
    // These tests run revisions from their `command` as local processes; a test for the container
    // runtime passes `--runtime` (which wins over the variable) or sets SLUICE_RUNTIME itself.
    if std::env::var_os("SLUICE_RUNTIME").is_none() {
        cmd.env("SLUICE_RUNTIME", "process");
    }
    if let Some(envoy) = options.envoy.as_deref().or(envoy) {
        cmd.env("ENVOY_BIN", envoy);
    }
    if let Some(wasm) = wasm {
        cmd.env("SLUICE_QUEUE_PROXY_WASM", wasm);
    }
    // Built (and cached) by `start_with` before this runs.
    if let Ok(native) = crate::queue_proxy::queue_proxy_native() {
        cmd.env("SLUICE_QUEUE_PROXY_NATIVE", native);
    }
    match options.queue_proxy {
        Some(crate::queue_proxy::Form::Native) => {
            cmd.args(["--queue-proxy", "native"]);
        }
        Some(crate::queue_proxy::Form::Wasm) => {
            cmd.args(["--queue-proxy", "wasm"]);
        }
        None => {}
    }
    ProcessGuard::spawn(cmd, STOP_GRACE)
}

impl Launched {
    /// Polls GET /status until it answers, failing at once if the process exits.
    async fn wait_control_api(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.process.try_wait() {
                bail!("sluice up exited ({status}) before its control API answered");
            }
            if get_status(self.ports.control).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice up: no answer on its control API (port {}) within {STARTUP_TIMEOUT:?}",
                    self.ports.control
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn get_status(control_port: u16) -> Result<Value> {
    let resp = Req::get(&format!("127.0.0.1:{control_port}"), "/status")
        .timeout(Duration::from_secs(5))
        .send(loopback(control_port))
        .await?;
    anyhow::ensure!(
        resp.status == http::StatusCode::OK,
        "GET /status answered {}: {}",
        resp.status,
        resp.text()
    );
    serde_json::from_slice(&resp.body)
        .with_context(|| format!("GET /status is not JSON: {}", resp.text()))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Sluice {
    /// Starts `sluice up` on an empty folder and waits until its control API answers. Waits first for
    /// one of the [`MAX_CONCURRENT_SLUICES`] slots.
    pub async fn start() -> Result<Sluice> {
        Sluice::start_with(StartOptions::default()).await
    }

    /// [`Sluice::start`] with options.
    pub async fn start_with(options: StartOptions) -> Result<Sluice> {
        let slot = SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let bin = tokio::task::spawn_blocking(sluice_bin).await??;
        let envoy = envoy_for_sluice()?;
        // Revisions need the queue-proxy filter; built once per test process (a no-op when fresh).
        let wasm = tokio::task::spawn_blocking(crate::queue_proxy::queue_proxy_wasm)
            .await?
            .ok();
        let _ = tokio::task::spawn_blocking(crate::queue_proxy::queue_proxy_native).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut launched = launch(&bin, envoy.as_deref(), wasm.as_deref(), &options)?;
            match launched.wait_control_api().await {
                Ok(()) => {
                    let Launched {
                        process,
                        ports,
                        root,
                        config_dir,
                        log_path,
                    } = launched;
                    return Ok(Sluice {
                        process,
                        ports,
                        root,
                        config_dir,
                        log_path,
                        binaries: Binaries {
                            sluice: bin,
                            envoy,
                            wasm,
                        },
                        options,
                        _slot: slot,
                    });
                }
                Err(e) => {
                    launched.process.stop();
                    let logs = std::fs::read_to_string(&launched.log_path).unwrap_or_default();
                    // A free port can be taken between our probe and sluice's bind: retry on new ports.
                    if attempt < 3 && logs.contains("in use") {
                        continue;
                    }
                    return Err(e.context(format!(
                        "sluice up did not start; its log:\n{}",
                        tail(&logs, 80)
                    )));
                }
            }
        }
    }

    /// Starts `sluice up` again on the same folder, state folder and ports, after
    /// [`Sluice::terminate`]: whatever the previous run left behind (its Envoy, its apps) is killed
    /// first. Waits until the control API answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.stop();
        let b = self.binaries.clone();
        self.process = spawn_up(
            &b.sluice,
            b.envoy.as_deref(),
            b.wasm.as_deref(),
            &self.options,
            self.root.path(),
            &self.config_dir,
            &self.log_path,
            &self.ports,
        )?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_alive()?;
            if get_status(self.ports.control).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice up did not answer on its control API within {STARTUP_TIMEOUT:?} after a \
                     restart; its log:\n{}",
                    tail(&self.logs(), 80)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `sluice up` on an empty folder until it exits by itself (for runs that must fail), up to
    /// `timeout`: its exit status (None if it was still running, then stopped) and its output.
    pub async fn run_to_exit(
        options: StartOptions,
        timeout: Duration,
    ) -> Result<(Option<std::process::ExitStatus>, String)> {
        let _slot = SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let bin = tokio::task::spawn_blocking(sluice_bin).await??;
        let envoy = envoy_for_sluice()?;
        let mut launched = launch(&bin, envoy.as_deref(), None, &options)?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = launched.process.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                launched.process.stop();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let logs = std::fs::read_to_string(&launched.log_path).unwrap_or_default();
        Ok((status, logs))
    }

    /// Where `sluice up` keeps instance logs (`--state-dir`), unless [`StartOptions::state_dir`] said.
    pub fn state_dir(&self) -> PathBuf {
        self.options
            .state_dir
            .clone()
            .unwrap_or_else(|| self.root.path().join("state"))
    }

    /// The `sluice up` process's pid.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Sends `signal` to `sluice up` alone, without waiting.
    pub fn signal(&mut self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// The folder `sluice up` watches.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Writes `file` (e.g. "ingress.yaml") into the watched folder atomically (write beside, rename in),
    /// so sluice never reads half a file.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let staging = self.root.path().join(format!(".{file}.staging"));
        std::fs::write(&staging, yaml).with_context(|| format!("writing {}", staging.display()))?;
        let target = self.config_dir.join(file);
        std::fs::rename(&staging, &target)
            .with_context(|| format!("moving into {}", target.display()))
    }

    /// Writes these objects as one multi-document YAML file.
    pub fn write_objects(&self, file: &str, objects: &[Value]) -> Result<()> {
        self.write(file, &yaml::documents(objects))
    }

    /// Writes an Ingress into `ingress-<namespace>-<name>.yaml` (replacing the previous version).
    pub fn apply_ingress(&self, ingress: &yaml::Ingress) -> Result<()> {
        self.write_objects(
            &format!("ingress-{}-{}.yaml", ingress.namespace(), ingress.name()),
            &[ingress.to_value()],
        )
    }

    /// Writes a backend's Service and Endpoints into `service-<namespace>-<name>.yaml`.
    pub fn apply_backend(
        &self,
        namespace: &str,
        name: &str,
        port_name: &str,
        backend_port: u16,
    ) -> Result<()> {
        self.write_objects(
            &format!("service-{namespace}-{name}.yaml"),
            &yaml::backend(namespace, name, port_name, backend_port),
        )
    }

    /// Removes a backend written by [`Sluice::apply_backend`].
    pub fn delete_backend(&self, namespace: &str, name: &str) -> Result<()> {
        self.remove(&format!("service-{namespace}-{name}.yaml"))
    }

    /// Deletes `file` from the watched folder.
    pub fn remove(&self, file: &str) -> Result<()> {
        let target = self.config_dir.join(file);
        std::fs::remove_file(&target).with_context(|| format!("removing {}", target.display()))
    }

    /// The external (ExternalIP rules) listener.
    pub fn external(&self) -> SocketAddr {
        loopback(self.ports.external)
    }

    /// The cluster-local listener (ClusterLocal and external rules).
    pub fn internal(&self) -> SocketAddr {
        loopback(self.ports.internal)
    }

    /// The TLS listener (SNI).
    pub fn tls(&self) -> SocketAddr {
        loopback(self.ports.tls)
    }

    /// Envoy's admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        loopback(self.ports.admin)
    }

    /// Everything sluice printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Fails if `sluice up` is no longer running.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.process.try_wait() {
            Some(status) => bail!(
                "sluice up exited ({status}); its log:\n{}",
                tail(&self.logs(), 80)
            ),
            None => Ok(()),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to `sluice up` alone and waits up to `timeout` for it to
    /// exit; None if it did not. Whatever it leaves behind is still killed on Drop.
    pub fn terminate(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.process.signal_and_wait(signal, timeout)
    }

    /// GET /status: `{"ingresses": [...], "errors": [...], "envoy": {...}}`.
    pub async fn status(&self) -> Result<Value> {
        get_status(self.ports.control).await
    }

    /// The Ingress `namespace/name` as /status shows it, if it lists it.
    pub async fn ingress(&self, namespace: &str, name: &str) -> Result<Option<Value>> {
        Ok(find_ingress(&self.status().await?, namespace, name).cloned())
    }

    /// Waits until the Ingress is ready (Knative's IsReady: Ready "True" for the current generation)
    /// and returns it.
    pub async fn wait_ready(
        &mut self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_ingress(namespace, name, timeout, "Ready", is_ready)
            .await
    }

    /// Waits until the Ingress is ready AND carries annotation `key: value`: after an update, proves
    /// the readiness is about that version.
    pub async fn wait_ready_with_annotation(
        &mut self,
        namespace: &str,
        name: &str,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let what = format!("Ready with annotation {key}={value}");
        self.wait_ingress(namespace, name, timeout, &what, |ing| {
            is_ready(ing)
                && ing
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(key))
                    == Some(&Value::from(value))
        })
        .await
    }

    /// Waits until the Ingress has condition `type_` with status `status` ("True", "False", "Unknown").
    pub async fn wait_condition(
        &mut self,
        namespace: &str,
        name: &str,
        type_: &str,
        status: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let what = format!("{type_}={status}");
        self.wait_ingress(namespace, name, timeout, &what, |ing| {
            condition(ing, type_).is_some_and(|c| c.status == status)
        })
        .await
    }

    /// Polls /status until `done` holds for the Ingress; the error tells where it got stuck.
    pub async fn wait_ingress(
        &mut self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match self.status().await {
                Ok(status) => {
                    if let Some(ing) = find_ingress(&status, namespace, name)
                        && done(ing)
                    {
                        // Envoy is up by now: note it, so it is killed even if sluice dies first.
                        self.process.remember_descendants();
                        return Ok(ing.clone());
                    }
                    Some(status)
                }
                Err(e) => Some(Value::String(format!("{e:#}"))),
            };
            if Instant::now() > deadline {
                let seen = last
                    .as_ref()
                    .map(|s| {
                        find_ingress(s, namespace, name)
                            .cloned()
                            .unwrap_or_else(|| s.clone())
                    })
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                    .unwrap_or_default();
                let errors = last
                    .as_ref()
                    .and_then(|s| s.get("errors"))
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                bail!(
                    "ingress {namespace}/{name} not {what} within {timeout:?}.\nLast seen: {seen}\n\
                     Reported errors: {errors}\nsluice log (tail):\n{}",
                    tail(&self.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The Ingress `namespace/name` in a /status answer.
pub fn find_ingress<'a>(status: &'a Value, namespace: &str, name: &str) -> Option<&'a Value> {
    status.get("ingresses")?.as_array()?.iter().find(|ing| {
        ing.pointer("/metadata/namespace").and_then(Value::as_str) == Some(namespace)
            && ing.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
    })
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let status = self.process.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- sluice up ({:?}, exit {status:?}), folder {} ----\n{}\n---- end of sluice log ----",
                self.ports,
                self.config_dir.display(),
                tail(&self.logs(), 300)
            );
        }
    }
}
