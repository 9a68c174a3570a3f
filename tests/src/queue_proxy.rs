//! The queue-proxy wasm filter (wasm-filters/queue-proxy) in a real Envoy, without sluice: the .wasm
//! built once per test process, a static bootstrap (instance-side listener with the filter and the
//! router, one cluster to a loopback backend, admin on a free port), Envoy under a [`ProcessGuard`], and
//! a backend that records how many requests it ever served at once.

use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::backends::{ServerTask, serve_http};
use crate::body::{ResponseBody, full};
use crate::client::Req;
use crate::ports::{free_port, loopback};
use crate::process::ProcessGuard;
use crate::sluice::{envoy_for_sluice, workspace_root};

/// How long Envoy gets to compile the wasm and open its listener (a busy 2-core machine is slow).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// At most this many of these Envoys (each with two workers) run at once in one test process: the
/// machines that run the tests have two cores, and the metrics tests need their share of them.
pub const MAX_CONCURRENT_ENVOYS: usize = 2;
static SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_ENVOYS);

/// The filter's .wasm: `$SLUICE_QUEUE_PROXY_WASM`, else built once per test process with
/// `cargo build -p sluice-queue-proxy --target wasm32-wasip1 --profile wasm` (a no-op when up to date).
pub fn queue_proxy_wasm() -> Result<PathBuf> {
    static WASM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    WASM.get_or_init(|| build_wasm().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_wasm() -> Result<PathBuf> {
    build_artifact(
        "SLUICE_QUEUE_PROXY_WASM",
        &[
            "build",
            "-p",
            "sluice-queue-proxy",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ],
        "wasm32-wasip1/wasm/sluice_queue_proxy.wasm",
        "; is the target installed? (rustup target add wasm32-wasip1)",
    )
}

/// `$env` when set (it must name a file), else `cargo <args>` in the workspace and then
/// `<target dir>/<built>`.
fn build_artifact(env: &str, args: &[&str], built: &str, hint: &str) -> Result<PathBuf> {
    if let Some(given) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let given = PathBuf::from(given);
        anyhow::ensure!(given.is_file(), "{env}={} is not a file", given.display());
        return Ok(given);
    }
    let root = workspace_root();
    let status = crate::cargo()
        .args(args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status}){hint}",
        args.join(" ")
    );
    let path = target_dir(&root).join(built);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing after a successful build",
        path.display()
    );
    Ok(path)
}

/// The Envoy binary: `$ENVOY_BIN`, else the real binary in the project's .venv, else `envoy` on PATH.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    if let Some(real) = envoy_for_sluice()? {
        return Ok(real);
    }
    let launcher = workspace_root().join(".venv/bin/envoy");
    Ok(if launcher.is_file() {
        launcher
    } else {
        PathBuf::from("envoy")
    })
}

/// Which build of the queue-proxy filter Envoy runs: the proxy-wasm module in V8, or the native
/// dynamic module (native-filters/queue-proxy). The same tests run on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Wasm,
    Native,
}

impl Form {
    /// The built filter: the .wasm, or the dynamic module's .so.
    pub fn artifact(self) -> Result<PathBuf> {
        match self {
            Form::Wasm => queue_proxy_wasm(),
            Form::Native => queue_proxy_native(),
        }
    }

    /// How this form's metrics are named in Envoy's /stats/prometheus: a metric of the filter named
    /// `name` (see `sluice_queue_proxy::names`).
    pub fn prometheus_name(self, name: &str) -> String {
        match self {
            Form::Wasm => name.to_string(),
            Form::Native => format!("{NATIVE_PROMETHEUS_PREFIX}{name}"),
        }
    }
}

/// Envoy's prefix on the native module's metrics in /stats/prometheus (`envoy_` and the
/// `metrics_namespace` the bootstrap sets), before the wasm form's names.
pub const NATIVE_PROMETHEUS_PREFIX: &str = "envoy_sluice_";
/// The `metrics_namespace` of the native module's metrics (Envoy's default is `dynamicmodulescustom`).
pub const NATIVE_METRICS_NAMESPACE: &str = "sluice";

/// The native filter's shared library: `$SLUICE_QUEUE_PROXY_NATIVE`, else built once per test process
/// with `cargo build -p sluice-queue-proxy-native --release` (a no-op when up to date).
pub fn queue_proxy_native() -> Result<PathBuf> {
    static SO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SO.get_or_init(|| build_native().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_native() -> Result<PathBuf> {
    build_artifact(
        "SLUICE_QUEUE_PROXY_NATIVE",
        &["build", "-p", "sluice-queue-proxy-native", "--release"],
        "release/libsluice_queue_proxy_native.so",
        "",
    )
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
}

/// What goes into the bootstrap.
#[derive(Debug, Clone)]
pub struct EnvoySpec {
    /// The filter's plugin configuration (JSON); None for a listener without the filter.
    pub plugin_config: Option<Value>,
    /// The backend the listener routes to.
    pub upstream: SocketAddr,
    /// Envoy worker threads (each runs its own wasm VM).
    pub concurrency: u32,
    pub form: Form,
}

impl EnvoySpec {
    pub fn new(plugin_config: Value, upstream: SocketAddr) -> EnvoySpec {
        EnvoySpec {
            plugin_config: Some(plugin_config),
            upstream,
            concurrency: 2,
            form: Form::Wasm,
        }
    }

    pub fn form(mut self, form: Form) -> EnvoySpec {
        self.form = form;
        self
    }
}

/// The Envoy cluster that points at the instance (the readiness probe goes through it too).
pub const INSTANCE_CLUSTER: &str = "instance";

/// A static bootstrap: the instance-side listener (filter + router, route timeout 0s as Knative's
/// ingress has none) and the instance cluster; admin on its own port; everything on 127.0.0.1.
pub fn bootstrap(spec: &EnvoySpec, filter: &Path, listen_port: u16, admin_port: u16) -> Value {
    let socket =
        |port: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let mut http_filters = Vec::new();
    if let (Some(config), Form::Native) = (&spec.plugin_config, spec.form) {
        http_filters.push(json!({
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {
                    "module": {"local": {"filename": filter.display().to_string()}},
                    // The module keeps process-wide state (instances, its tick thread): never unloaded.
                    "do_not_close": true,
                    "metrics_namespace": NATIVE_METRICS_NAMESPACE
                },
                "filter_name": "queue-proxy",
                "filter_config": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config.to_string()
                }
            }
        }));
    } else if let Some(config) = &spec.plugin_config {
        let wasm = filter;
        let instance = config
            .get("instance")
            .and_then(Value::as_str)
            .unwrap_or("unnamed");
        http_filters.push(json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "queue-proxy",
                    "vm_config": {
                        // One VM (per worker) per instance listener: no state shared by accident.
                        "vm_id": format!("sluice-queue-proxy/{instance}"),
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": wasm.display().to_string()}}
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": config.to_string()
                    },
                    "fail_open": false
                }
            }
        }));
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    json!({
        "admin": {"address": socket(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "instance",
                "address": socket(listen_port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "instance",
                        "route_config": {"virtual_hosts": [{
                            "name": "instance",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": INSTANCE_CLUSTER, "timeout": "0s"}}]
                        }]},
                        "http_filters": http_filters
                    }
                }]}]
            }],
            "clusters": [{
                "name": INSTANCE_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": INSTANCE_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(spec.upstream.port())}}]}]
                }
            }]
        }
    })
}

/// The outcome of `envoy --mode validate` on a bootstrap.
#[derive(Debug)]
pub struct Validation {
    pub ok: bool,
    pub log: String,
}

/// Runs `envoy --mode validate` on the bootstrap for `spec`: it loads the wasm and runs on_configure.
pub fn validate(spec: &EnvoySpec) -> Result<Validation> {
    let filter = spec.form.artifact()?;
    let dir = tempfile::Builder::new()
        .prefix("sluice-queue-proxy-")
        .tempdir()?;
    let config = dir.path().join("envoy.yaml");
    std::fs::write(
        &config,
        bootstrap(spec, &filter, free_port(), free_port()).to_string(),
    )?;
    let envoy = envoy_binary()?;
    let out = Command::new(&envoy)
        .args(["--mode", "validate", "--use-dynamic-base-id", "-l", "info"])
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", envoy.display()))?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Validation {
        ok: out.status.success(),
        log,
    })
}

/// A running Envoy with the instance-side listener; stopped (process group) on Drop, its log printed
/// when a test panics.
pub struct QueueProxyEnvoy {
    process: ProcessGuard,
    form: Form,
    listen: SocketAddr,
    admin: SocketAddr,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    _slot: Option<SemaphorePermit<'static>>,
}

impl QueueProxyEnvoy {
    /// Starts Envoy and waits until the listener serves (a request answered by anything but a
    /// connection error).
    pub async fn start(spec: &EnvoySpec) -> Result<QueueProxyEnvoy> {
        let form = spec.form;
        let filter = tokio::task::spawn_blocking(move || form.artifact()).await??;
        let envoy = envoy_binary()?;
        let slot = SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut started = Self::launch(spec, &envoy, &filter)?;
            match started.wait_ready().await {
                Ok(()) => {
                    started._slot = Some(slot);
                    return Ok(started);
                }
                Err(e) => {
                    started.process.stop();
                    let log = started.log();
                    // A free port can be taken between our probe and Envoy's bind: retry on new ports.
                    if attempt < 3 && log.contains("in use") {
                        continue;
                    }
                    return Err(
                        e.context(format!("Envoy did not start; its log:\n{}", tail(&log, 60)))
                    );
                }
            }
        }
    }

    fn launch(spec: &EnvoySpec, envoy: &Path, filter: &Path) -> Result<QueueProxyEnvoy> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-queue-proxy-")
            .tempdir()?;
        let (listen_port, admin_port) = (free_port(), free_port());
        let config = dir.path().join("envoy.yaml");
        std::fs::write(
            &config,
            bootstrap(spec, filter, listen_port, admin_port).to_string(),
        )?;
        let log_path = dir.path().join("envoy.log");
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(envoy);
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", &spec.concurrency.to_string()])
            .args(["--use-dynamic-base-id", "-l", "info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let process = ProcessGuard::spawn(cmd, STOP_GRACE)?;
        Ok(QueueProxyEnvoy {
            process,
            form: spec.form,
            listen: loopback(listen_port),
            admin: loopback(admin_port),
            log_path,
            _dir: dir,
            _slot: None,
        })
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.process.try_wait() {
                bail!("Envoy exited ({status}) before it served");
            }
            let admin_live = self
                .admin_get("/ready")
                .await
                .is_ok_and(|body| body.trim() == "LIVE");
            if admin_live && tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Envoy: not ready within {STARTUP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The instance-side listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Fails if Envoy exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait() {
            bail!(
                "Envoy exited ({status}); its log:\n{}",
                tail(&self.log(), 60)
            );
        }
        Ok(())
    }

    async fn admin_get(&self, path: &str) -> Result<String> {
        admin_get(self.admin, path).await
    }

    /// GET /stats/prometheus on the admin port.
    pub async fn prometheus(&self) -> Result<String> {
        self.admin_get("/stats/prometheus").await
    }

    /// One stat from /stats (Envoy's own names, e.g. `listener.127.0.0.1_8080.worker_0.downstream_cx_total`).
    pub async fn stat(&self, name: &str) -> Result<Option<i64>> {
        admin_stat(self.admin, name).await
    }

    /// One sample from /stats/prometheus of a filter metric named `name` (`sluice_qp__...`; the
    /// name this filter form gives it in Envoy's page is looked up; labels ignored).
    pub async fn metric(&self, name: &str) -> Result<Option<i64>> {
        Ok(prometheus_value(
            &self.prometheus().await?,
            &self.form.prometheus_name(name),
        ))
    }
}

impl Drop for QueueProxyEnvoy {
    fn drop(&mut self) {
        let status = self.process.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- Envoy (listener {}, admin {}, exit {status:?}) ----\n{}\n---- end of Envoy log ----",
                self.listen,
                self.admin,
                tail(&self.log(), 200)
            );
        }
    }
}

/// GET `path` on an Envoy admin port; the body of a 200.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let resp = Req::get("127.0.0.1", path)
        .timeout(Duration::from_secs(10))
        .send(admin)
        .await?;
    anyhow::ensure!(
        resp.status == StatusCode::OK,
        "admin GET {path}: {}",
        resp.status
    );
    Ok(resp.text())
}

/// One stat from an Envoy's /stats (Envoy's own names); None while Envoy does not have it.
pub async fn admin_stat(admin: SocketAddr, name: &str) -> Result<Option<i64>> {
    let text = admin_get(admin, "/stats").await?;
    Ok(text.lines().find_map(|line| {
        let (stat, value) = line.split_once(": ")?;
        (stat == name).then(|| value.trim().parse().ok())?
    }))
}

/// The value of `name` in a Prometheus text exposition (`name{labels} value` or `name value`).
pub fn prometheus_value(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.trim().parse::<f64>().ok().map(|v| v as i64))?
        })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Default)]
struct Counts {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    requests: AtomicU64,
    unhealthy: AtomicBool,
}

/// The instance: reads the body, answers 200 "ok <body length>" after `?sleep=<ms>`, counting requests and the most it ever served at
/// once; `/healthz` answers 200, or 503 after [`SlowBackend::set_healthy`]`(false)`.
pub struct SlowBackend {
    counts: Arc<Counts>,
    server: ServerTask,
}

impl SlowBackend {
    pub async fn start() -> Result<SlowBackend> {
        let counts = Arc::new(Counts::default());
        let for_server = counts.clone();
        let server = ServerTask::start(move |stream| {
            let counts = for_server.clone();
            let service = hyper::service::service_fn(move |req| handle(counts.clone(), req));
            serve_http(stream, service)
        })
        .await?;
        Ok(SlowBackend { counts, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Requests served (health checks excluded).
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// The most requests ever in the handler at once.
    pub fn max_in_flight(&self) -> u64 {
        self.counts.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.counts.unhealthy.store(!healthy, Ordering::SeqCst);
    }
}

async fn handle(
    counts: Arc<Counts>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.uri().path() == "/healthz" {
        let status = if counts.unhealthy.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        return Ok(Response::builder()
            .status(status)
            .body(full("health\n"))
            .expect("static response"));
    }
    let sleep = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("sleep="))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis);
    counts.requests.fetch_add(1, Ordering::SeqCst);
    let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counts.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    if let Some(sleep) = sleep {
        tokio::time::sleep(sleep).await;
    }
    // Out of the handler before the response is written: Envoy cannot see the end of this response
    // (and hand the slot on) before the count dropped.
    counts.in_flight.fetch_sub(1, Ordering::SeqCst);
    let answer = match body {
        Ok(body) => format!("ok {}\n", body.len()),
        Err(e) => format!("body error: {e}\n"),
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .body(full(answer))
        .expect("static response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_values_are_found_by_exact_name() {
        let text = "# TYPE a_b gauge\na_b{} 12\na_bc 3\nx{l=\"v\"} 1.5e3\n";
        assert_eq!(prometheus_value(text, "a_b"), Some(12));
        assert_eq!(prometheus_value(text, "a_bc"), Some(3));
        assert_eq!(prometheus_value(text, "x"), Some(1500));
        assert_eq!(prometheus_value(text, "a"), None);
    }

    #[test]
    fn bootstrap_without_plugin_config_has_only_the_router() {
        let spec = EnvoySpec {
            plugin_config: None,
            upstream: loopback(1),
            concurrency: 1,
            form: Form::Wasm,
        };
        let boot = bootstrap(&spec, Path::new("/x.wasm"), 2, 3);
        let filters = boot
            .pointer(
                "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
            )
            .and_then(Value::as_array)
            .unwrap();
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0]["name"], "envoy.filters.http.router");
    }
}
