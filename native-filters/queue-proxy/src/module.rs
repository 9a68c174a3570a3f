//! The hooks Envoy calls (`envoy_dynamic_module_on_*`), on top of [`crate::instance`]. Envoy 1.40's
//! dynamic-module ABI, declared in [`crate::abi`] (no SDK on crates.io).
//!
//! Threads: a filter configuration is created and destroyed on Envoy's main thread; each stream's
//! hooks run on its worker; one tick thread of this module (started with the first configuration,
//! alive for the process: the module is loaded with `do_not_close`) closes the autoscaler's windows,
//! times out queued requests and writes the metrics every 100 ms. A queued stream is resumed or
//! answered on its own worker through its Envoy scheduler (`scheduler_commit` may be called from any
//! thread). The metrics are unlabeled, so writing them from the tick thread is an atomic operation.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_queue_proxy_core::breaker::{QUEUE_FULL_BODY, QUEUE_TIMEOUT_BODY};
use sluice_queue_proxy_core::config::{self, Config, ProbeConfig, Readiness};
use sluice_queue_proxy_core::names::{self, Names};
use sluice_queue_proxy_core::readiness::Prober;
use sluice_queue_proxy_core::request::{self, Answer};
use sluice_queue_proxy_core::stats::Published;

use crate::abi::*;
use crate::instance::{Admission, Event, Instance, Snapshot, Wake};

/// The filter name this module serves (`DynamicModuleFilter.filter_name`).
pub const FILTER_NAME: &str = "queue-proxy";
const TICK: Duration = Duration::from_millis(100);
/// The configuration-scheduler event that gives a readiness probe its turn.
const PROBE_TURN: u64 = 1;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn log(level: envoy_dynamic_module_type_log_level, message: &str) {
    // SAFETY: the buffer points at `message`, alive for the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level, module_buffer(message.as_bytes())) }
}

fn module_buffer(bytes: &[u8]) -> envoy_dynamic_module_type_module_buffer {
    envoy_dynamic_module_type_module_buffer {
        ptr: bytes.as_ptr().cast(),
        length: bytes.len(),
    }
}

/// # Safety
/// `b` must point at `b.length` readable bytes for the returned slice's lifetime.
unsafe fn envoy_bytes<'a>(b: envoy_dynamic_module_type_envoy_buffer) -> &'a [u8] {
    if b.ptr.is_null() || b.length == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(b.ptr.cast(), b.length) }
    }
}

/// A raw Envoy pointer handed between threads. Envoy's own rules say which calls are allowed from
/// where; the module follows them (see the module documentation).
#[derive(Debug, Clone, Copy)]
struct EnvoyPtr(*mut c_void);
// SAFETY: only used as the ABI allows from other threads (scheduler commits, unlabeled metrics).
unsafe impl Send for EnvoyPtr {}
// SAFETY: as above.
unsafe impl Sync for EnvoyPtr {}

/// Wakes a queued stream through its Envoy scheduler.
struct StreamWaker(EnvoyPtr);

impl Wake for StreamWaker {
    fn wake(&self, event: Event) {
        // SAFETY: the scheduler lives until the stream's destroy hook, which first removes the stream
        // from its instance under the same lock this is called with.
        unsafe {
            envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0.0, event as u64)
        }
    }
}

/// The Envoy metric ids of one configuration (0 = not defined).
#[derive(Debug, Clone, Copy, Default)]
struct Metrics {
    /// Per instance and per revision, in the order of [`sluice_queue_proxy_core::stats::Report::values`].
    window: [(usize, usize); 4],
    requests_total: (usize, usize),
    proxied_requests_total: (usize, usize),
    in_flight: usize,
    queued: usize,
    overflow_total: usize,
    queue_timeout_total: usize,
    ready: usize,
}

fn define(config: EnvoyPtr, counter: bool, name: &str) -> Result<usize, String> {
    let mut id = 0usize;
    // SAFETY: called from on_http_filter_config_new with its config pointer; `name` outlives the call.
    let result = unsafe {
        if counter {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                config.0,
                module_buffer(name.as_bytes()),
                ptr::null_mut(),
                0,
                &mut id,
            )
        } else {
            envoy_dynamic_module_callback_http_filter_config_define_gauge(
                config.0,
                module_buffer(name.as_bytes()),
                ptr::null_mut(),
                0,
                &mut id,
            )
        }
    };
    if result == envoy_dynamic_module_type_metrics_result_Success {
        Ok(id)
    } else {
        Err(format!("defining metric {name}: result {result}"))
    }
}

impl Metrics {
    fn define(config: EnvoyPtr, names: &Names) -> Result<Metrics, String> {
        let pair = |counter: bool, stat: &str| -> Result<(usize, usize), String> {
            Ok((
                define(config, counter, &names.instance(stat))?,
                define(config, counter, &names.revision(stat))?,
            ))
        };
        Ok(Metrics {
            window: [
                pair(false, names::AVERAGE_CONCURRENCY)?,
                pair(false, names::AVERAGE_PROXIED_CONCURRENCY)?,
                pair(false, names::REQUEST_COUNT)?,
                pair(false, names::PROXIED_REQUEST_COUNT)?,
            ],
            requests_total: pair(true, names::REQUESTS_TOTAL)?,
            proxied_requests_total: pair(true, names::PROXIED_REQUESTS_TOTAL)?,
            in_flight: define(config, false, &names.instance(names::IN_FLIGHT))?,
            queued: define(config, false, &names.instance(names::QUEUED))?,
            overflow_total: define(config, true, &names.instance(names::OVERFLOW_TOTAL))?,
            queue_timeout_total: define(config, true, &names.instance(names::QUEUE_TIMEOUT_TOTAL))?,
            ready: define(config, false, &names.instance(names::READY))?,
        })
    }
}

fn set_gauge(config: EnvoyPtr, id: usize, value: u64) {
    // SAFETY: `config` is a live configuration (the registry removes it before Envoy destroys it);
    // unlabeled gauges may be set from any thread.
    unsafe {
        envoy_dynamic_module_callback_http_filter_config_set_gauge(
            config.0,
            id,
            ptr::null_mut(),
            0,
            value,
        );
    }
}

fn add_gauge(config: EnvoyPtr, id: usize, delta: i64) {
    // SAFETY: as in set_gauge.
    unsafe {
        if delta > 0 {
            envoy_dynamic_module_callback_http_filter_config_increment_gauge(
                config.0,
                id,
                ptr::null_mut(),
                0,
                delta.unsigned_abs(),
            );
        } else if delta < 0 {
            envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
                config.0,
                id,
                ptr::null_mut(),
                0,
                delta.unsigned_abs(),
            );
        }
    }
}

fn add_counter(config: EnvoyPtr, id: usize, delta: u64) {
    if delta == 0 {
        return;
    }
    // SAFETY: as in set_gauge.
    unsafe {
        envoy_dynamic_module_callback_http_filter_config_increment_counter(
            config.0,
            id,
            ptr::null_mut(),
            0,
            delta,
        );
    }
}

type SharedInstance = Arc<Instance<StreamWaker>>;

/// One filter configuration (one instance listener's filter).
struct FilterConfig {
    /// None for `{"vmKeeper": true}`: a configuration that serves no instance (the wasm form's VM
    /// keeper; harmless here).
    serving: Option<Serving>,
}

struct Serving {
    /// Envoy's pointer to this configuration (which of the instance's live ones it is).
    envoy: EnvoyPtr,
    config: Config,
    key: String,
    instance: SharedInstance,
    metrics: Metrics,
    /// What `K-Network-Probe: queue` answers: the configuration's `ready`, or the probe's outcome.
    ready: AtomicBool,
    /// The HTTP readiness probe (`readinessProbe`), sent from Envoy's main thread.
    probe: Option<Probe>,
}

struct Probe {
    config: ProbeConfig,
    prober: Mutex<Prober>,
    /// This configuration's main-thread scheduler: the tick thread asks through it for a probe turn.
    scheduler: EnvoyPtr,
}

impl Serving {
    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        set_gauge(self.envoy, self.metrics.ready, u64::from(ready));
    }

    /// A probe turn, on the main thread: sends the probe when one is due.
    fn probe_turn(&self) {
        let Some(probe) = &self.probe else {
            return;
        };
        if !lock(&probe.prober).start(now_nanos()) {
            return;
        }
        let c = &probe.config;
        let headers = [
            (":method", "GET"),
            (":path", c.path.as_str()),
            (":authority", c.authority.as_str()),
            ("user-agent", "sluice-queue-proxy"),
        ];
        let mut raw = module_headers(&headers);
        let mut id = 0u64;
        let timeout = u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: on the main thread (a configuration's scheduled event); every buffer outlives the call.
        let started = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.envoy.0,
                &mut id,
                module_buffer(c.cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                module_buffer(b""),
                timeout,
            )
        };
        if started != envoy_dynamic_module_type_http_callout_init_result_Success {
            log(
                envoy_dynamic_module_type_log_level_Warn,
                &format!(
                    "sluice queue-proxy: readiness probe to cluster {}: not sent ({started})",
                    c.cluster
                ),
            );
            if let Some(ready) = lock(&probe.prober).not_sent() {
                self.set_ready(ready);
            }
        }
    }

    fn probe_answered(&self, status: Option<u32>) {
        if let Some(probe) = &self.probe
            && let Some(ready) = lock(&probe.prober).answered(status)
        {
            self.set_ready(ready);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn module_headers(headers: &[(&str, &str)]) -> Vec<envoy_dynamic_module_type_module_http_header> {
    headers
        .iter()
        .map(|(k, v)| envoy_dynamic_module_type_module_http_header {
            key_ptr: k.as_ptr().cast(),
            key_length: k.len(),
            value_ptr: v.as_ptr().cast(),
            value_length: v.len(),
        })
        .collect()
}

/// What the tick thread publishes for one instance, through the newest live configuration.
struct Book {
    instance: SharedInstance,
    /// Live configurations of this instance, oldest first: (config pointer, its metric ids).
    configs: Vec<(EnvoyPtr, Metrics)>,
    published: Published,
    last: Snapshot,
}

impl Book {
    fn publish(&mut self, snap: Snapshot) {
        let Some(&(config, m)) = self.configs.last() else {
            return;
        };
        if let Some(report) = snap.report {
            let values = report.values();
            let deltas = self.published.deltas(values);
            for (i, &(instance, revision)) in m.window.iter().enumerate() {
                set_gauge(config, instance, values[i]);
                // The revision's series is the sum over its instances: each adds its change.
                add_gauge(config, revision, deltas[i]);
            }
        }
        let counter = |ids: (usize, usize), now: u64, before: u64| {
            let delta = now.saturating_sub(before);
            add_counter(config, ids.0, delta);
            add_counter(config, ids.1, delta);
        };
        counter(
            m.requests_total,
            snap.requests_total,
            self.last.requests_total,
        );
        counter(
            m.proxied_requests_total,
            snap.proxied_requests_total,
            self.last.proxied_requests_total,
        );
        add_counter(
            config,
            m.overflow_total,
            snap.overflow_total.saturating_sub(self.last.overflow_total),
        );
        add_counter(
            config,
            m.queue_timeout_total,
            snap.queue_timeout_total
                .saturating_sub(self.last.queue_timeout_total),
        );
        set_gauge(config, m.in_flight, snap.in_flight);
        set_gauge(config, m.queued, snap.queued);
        self.last = snap;
    }

    /// The instance's last configuration goes: its part of the revision's window series goes too.
    fn withdraw(&mut self, config: EnvoyPtr, m: &Metrics) {
        let deltas = self.published.deltas([0; 4]);
        for (i, &(_, revision)) in m.window.iter().enumerate() {
            add_gauge(config, revision, deltas[i]);
        }
    }
}

#[derive(Default)]
struct Registry {
    books: HashMap<String, Book>,
    /// The main-thread schedulers of configurations with a readiness probe: each tick asks each for a
    /// probe turn. Removed (under this lock) before the scheduler is deleted.
    probes: Vec<EnvoyPtr>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);
static TICKER: Once = Once::new();
/// Stream numbers, unique in the process (an instance's streams come from every worker).
static NEXT_STREAM: AtomicU32 = AtomicU32::new(1);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn start_ticker() {
    TICKER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("sluice-qp-tick".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TICK);
                    let now = now_nanos();
                    let mut registry = registry();
                    for book in registry.books.values_mut() {
                        let snap = book.instance.tick(now);
                        book.publish(snap);
                    }
                    for scheduler in &registry.probes {
                        // SAFETY: live until removed from the registry (under this lock); a commit
                        // may come from any thread.
                        unsafe {
                            envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                                scheduler.0,
                                PROBE_TURN,
                            );
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log(
                envoy_dynamic_module_type_log_level_Error,
                &format!("sluice queue-proxy: cannot start the tick thread: {e}"),
            );
        }
    });
}

fn configure(config_envoy: EnvoyPtr, name: &[u8], raw: &[u8]) -> Result<FilterConfig, String> {
    if name != FILTER_NAME.as_bytes() {
        return Err(format!(
            "unknown filter name {:?} (this module serves {FILTER_NAME:?})",
            String::from_utf8_lossy(name)
        ));
    }
    if config::is_vm_keeper(raw) {
        return Ok(FilterConfig { serving: None });
    }
    let config = Config::parse(raw).map_err(|e| format!("bad plugin configuration: {e}"))?;
    let names = Names::new(&config.identity);
    let metrics = Metrics::define(config_envoy, &names)?;
    // The instance starts not ready when probed, as in the wasm build.
    let ready = matches!(config.readiness, Readiness::Static(true));
    set_gauge(config_envoy, metrics.ready, u64::from(ready));
    let probe = match &config.readiness {
        Readiness::Static(_) => None,
        Readiness::Probe(probe) => Some(Probe {
            config: probe.clone(),
            prober: Mutex::new(Prober::new(probe, now_nanos())),
            // SAFETY: on the main thread, inside config_new with its pointer.
            scheduler: EnvoyPtr(unsafe {
                envoy_dynamic_module_callback_http_filter_config_scheduler_new(config_envoy.0)
            }),
        }),
    };
    let key = names.shared_key("native");
    let mut registry = registry();
    let book = registry.books.entry(key.clone()).or_insert_with(|| Book {
        instance: Arc::new(Instance::new(
            config.limits,
            config.queue_timeout,
            now_nanos(),
        )),
        configs: Vec::new(),
        published: Published::default(),
        last: Snapshot::default(),
    });
    // A newer configuration of a running instance (an update of its listener) keeps its breaker.
    book.instance
        .reconfigure(config.limits, config.queue_timeout);
    book.configs.push((config_envoy, metrics));
    let instance = book.instance.clone();
    if let Some(probe) = &probe {
        registry.probes.push(probe.scheduler);
    }
    drop(registry);
    start_ticker();
    Ok(FilterConfig {
        serving: Some(Serving {
            envoy: config_envoy,
            config,
            key,
            instance,
            metrics,
            ready: AtomicBool::new(ready),
            probe,
        }),
    })
}

/// One HTTP stream through the filter.
struct Stream {
    config: *const FilterConfig,
    envoy: EnvoyPtr,
    id: u32,
    /// Some(proxied) once counted by the instance (user requests only).
    counted: Option<bool>,
    /// Waiting for a slot: its body and trailers wait too.
    waiting: bool,
    /// Created when the stream first queues; deleted with the stream.
    scheduler: Option<EnvoyPtr>,
    finished: bool,
}

impl Stream {
    fn serving(&self) -> Option<&Serving> {
        // SAFETY: Envoy destroys a configuration only after every stream created from it.
        unsafe { (*self.config).serving.as_ref() }
    }

    fn header(&self, name: &str) -> Option<String> {
        let mut value = envoy_dynamic_module_type_envoy_buffer {
            ptr: ptr::null(),
            length: 0,
        };
        let mut count = 0usize;
        // SAFETY: called from a request hook of this stream, on its worker; the value is copied at
        // once.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.envoy.0,
                envoy_dynamic_module_type_http_header_type_RequestHeader,
                module_buffer(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            )
        };
        if !found {
            return None;
        }
        // SAFETY: Envoy's buffer for the found value.
        let bytes = unsafe { envoy_bytes(value) };
        Some(String::from_utf8_lossy(bytes).into_owned())
    }

    fn reply(&self, status: u32, extra: &[(&str, &str)], body: &str) {
        let mut headers = vec![("content-type", "text/plain; charset=utf-8")];
        headers.extend_from_slice(extra);
        let mut raw = module_headers(&headers);
        // SAFETY: on the stream's worker; every buffer outlives the call (Envoy copies them).
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.envoy.0,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                module_buffer(body.as_bytes()),
                module_buffer(b"sluice_queue_proxy"),
            );
        }
    }

    fn request_headers(
        &mut self,
    ) -> envoy_dynamic_module_type_on_http_filter_request_headers_status {
        const CONTINUE: u32 =
            envoy_dynamic_module_type_on_http_filter_request_headers_status_Continue;
        const STOP: u32 =
            envoy_dynamic_module_type_on_http_filter_request_headers_status_StopIteration;
        let Some(serving) = self.serving() else {
            return CONTINUE;
        };
        let instance = serving.instance.clone();
        let ready = serving.ready.load(Ordering::Relaxed);
        let kind = request::classify_from(|name| self.header(name));
        match request::answer(kind, ready) {
            Answer::Reply { status, hash, body } => {
                match &hash {
                    Some(hash) => {
                        self.reply(status, &[(request::HASH_HEADER, hash.as_str())], &body)
                    }
                    None => self.reply(status, &[], &body),
                }
                STOP
            }
            Answer::Forward => CONTINUE,
            Answer::Admit { proxied } => {
                self.counted = Some(proxied);
                let envoy = self.envoy;
                let mut created = None;
                let admission = instance.arrive(self.id, proxied, now_nanos(), || {
                    // SAFETY: on the stream's worker, inside its request hook.
                    let scheduler = EnvoyPtr(unsafe {
                        envoy_dynamic_module_callback_http_filter_scheduler_new(envoy.0)
                    });
                    created = Some(scheduler);
                    StreamWaker(scheduler)
                });
                if created.is_some() {
                    self.scheduler = created;
                }
                match admission {
                    Admission::Proceed => CONTINUE,
                    Admission::Wait => {
                        self.waiting = true;
                        STOP
                    }
                    Admission::Overflow => {
                        self.reply(503, &[], QUEUE_FULL_BODY);
                        STOP
                    }
                }
            }
        }
    }

    fn scheduled(&mut self, event: u64) {
        let Some(serving) = self.serving() else {
            return;
        };
        match Event::from_id(event) {
            // A grant for a stream that finished meanwhile: its slot already went back.
            Some(Event::Granted) if serving.instance.resume(self.id) => {
                self.waiting = false;
                // SAFETY: on the stream's worker (scheduled events run there).
                unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.envoy.0) }
            }
            Some(Event::TimedOut) => {
                self.waiting = false;
                self.reply(503, &[], QUEUE_TIMEOUT_BODY);
            }
            _ => {}
        }
    }

    /// The stream ended, however it ended; runs once.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(serving) = self.serving() {
            serving.instance.finish(self.id, self.counted, now_nanos());
        }
    }
}

// ---- Envoy's entry points -------------------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init()
-> envoy_dynamic_module_type_abi_version_module_ptr {
    ENVOY_DYNAMIC_MODULES_ABI_VERSION.as_ptr().cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    name: envoy_dynamic_module_type_envoy_buffer,
    config: envoy_dynamic_module_type_envoy_buffer,
) -> envoy_dynamic_module_type_http_filter_config_module_ptr {
    // SAFETY: Envoy's buffers, valid for this call.
    let (name, raw) = unsafe { (envoy_bytes(name), envoy_bytes(config)) };
    match configure(EnvoyPtr(config_envoy), name, raw) {
        Ok(config) => {
            if let Some(s) = &config.serving {
                log(
                    envoy_dynamic_module_type_log_level_Info,
                    &format!(
                        "sluice queue-proxy (native): {}/{} instance {}: containerConcurrency {}",
                        s.config.identity.namespace,
                        s.config.identity.revision,
                        s.config.identity.instance,
                        s.config.limits.map_or(0, |l| l.capacity)
                    ),
                );
            }
            Box::into_raw(Box::new(config)) as *const c_void
        }
        Err(e) => {
            log(
                envoy_dynamic_module_type_log_level_Error,
                &format!("sluice queue-proxy: {e}"),
            );
            ptr::null()
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: envoy_dynamic_module_type_http_filter_config_module_ptr,
) {
    if config.is_null() {
        return;
    }
    // SAFETY: the pointer config_new returned, destroyed once by Envoy.
    let config = unsafe { Box::from_raw(config as *mut FilterConfig) };
    let Some(serving) = &config.serving else {
        return;
    };
    let mut registry = registry();
    if let Some(probe) = &serving.probe {
        registry.probes.retain(|s| s.0 != probe.scheduler.0);
        // SAFETY: created in config_new for this configuration; out of the registry, so the tick
        // thread no longer commits to it.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_delete(probe.scheduler.0)
        }
    }
    let Some(book) = registry.books.get_mut(&serving.key) else {
        return;
    };
    let removed = book
        .configs
        .iter()
        .position(|(ptr, _)| ptr.0 == serving.envoy.0)
        .map(|i| book.configs.remove(i));
    if book.configs.is_empty() {
        if let Some((ptr, metrics)) = removed {
            book.withdraw(ptr, &metrics);
        }
        registry.books.remove(&serving.key);
    }
}

/// A configuration's scheduled event, on Envoy's main thread: a readiness probe's turn.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    config: envoy_dynamic_module_type_http_filter_config_module_ptr,
    event_id: u64,
) {
    if config.is_null() || event_id != PROBE_TURN {
        return;
    }
    // SAFETY: the pointer config_new returned; Envoy runs this before destroying the configuration.
    let config = unsafe { &*(config as *const FilterConfig) };
    if let Some(serving) = &config.serving {
        serving.probe_turn();
    }
}

/// The readiness probe's answer (main thread).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    config: envoy_dynamic_module_type_http_filter_config_module_ptr,
    _callout_id: u64,
    result: envoy_dynamic_module_type_http_callout_result,
    headers: *mut envoy_dynamic_module_type_envoy_http_header,
    headers_size: usize,
    _body_chunks: *mut envoy_dynamic_module_type_envoy_buffer,
    _body_chunks_size: usize,
) {
    if config.is_null() {
        return;
    }
    // SAFETY: as in on_http_filter_config_scheduled.
    let config = unsafe { &*(config as *const FilterConfig) };
    let Some(serving) = &config.serving else {
        return;
    };
    let mut status = None;
    if result == envoy_dynamic_module_type_http_callout_result_Success && !headers.is_null() {
        // SAFETY: Envoy's array of `headers_size` headers, valid during this call.
        let headers = unsafe { std::slice::from_raw_parts(headers, headers_size) };
        status = headers.iter().find_map(|h| {
            // SAFETY: Envoy's buffers, valid during this call.
            let (key, value) = unsafe {
                (
                    envoy_bytes(envoy_dynamic_module_type_envoy_buffer {
                        ptr: h.key_ptr,
                        length: h.key_length,
                    }),
                    envoy_bytes(envoy_dynamic_module_type_envoy_buffer {
                        ptr: h.value_ptr,
                        length: h.value_length,
                    }),
                )
            };
            (key == b":status")
                .then(|| std::str::from_utf8(value).ok()?.parse::<u32>().ok())
                .flatten()
        });
    }
    serving.probe_answered(status);
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: envoy_dynamic_module_type_http_filter_config_module_ptr,
    filter_envoy: envoy_dynamic_module_type_http_filter_envoy_ptr,
) -> envoy_dynamic_module_type_http_filter_module_ptr {
    let stream = Stream {
        config: config.cast(),
        envoy: EnvoyPtr(filter_envoy),
        id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
        counted: None,
        waiting: false,
        scheduler: None,
        finished: false,
    };
    Box::into_raw(Box::new(stream)) as *const c_void
}

/// # Safety
/// `m` is a pointer on_http_filter_new returned and Envoy has not destroyed; Envoy calls a stream's
/// hooks one at a time on its worker.
unsafe fn stream<'a>(m: envoy_dynamic_module_type_http_filter_module_ptr) -> &'a mut Stream {
    // SAFETY: the caller's contract.
    unsafe { &mut *(m as *mut Stream) }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    m: envoy_dynamic_module_type_http_filter_module_ptr,
    _end_of_stream: bool,
) -> envoy_dynamic_module_type_on_http_filter_request_headers_status {
    // SAFETY: Envoy's stream pointer.
    unsafe { stream(m) }.request_headers()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    m: envoy_dynamic_module_type_http_filter_module_ptr,
    _end_of_stream: bool,
) -> envoy_dynamic_module_type_on_http_filter_request_body_status {
    // Continuing the body would continue the paused headers with it. Watermark, not Buffer: a body
    // larger than the buffer limit waits with backpressure on the client (as in the wasm build)
    // instead of being answered 413 while queued.
    // SAFETY: Envoy's stream pointer.
    if unsafe { stream(m) }.waiting {
        envoy_dynamic_module_type_on_http_filter_request_body_status_StopIterationAndWatermark
    } else {
        envoy_dynamic_module_type_on_http_filter_request_body_status_Continue
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    m: envoy_dynamic_module_type_http_filter_module_ptr,
) -> envoy_dynamic_module_type_on_http_filter_request_trailers_status {
    // SAFETY: Envoy's stream pointer.
    if unsafe { stream(m) }.waiting {
        envoy_dynamic_module_type_on_http_filter_request_trailers_status_StopIteration
    } else {
        envoy_dynamic_module_type_on_http_filter_request_trailers_status_Continue
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _end_of_stream: bool,
) -> envoy_dynamic_module_type_on_http_filter_response_headers_status {
    envoy_dynamic_module_type_on_http_filter_response_headers_status_Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _end_of_stream: bool,
) -> envoy_dynamic_module_type_on_http_filter_response_body_status {
    envoy_dynamic_module_type_on_http_filter_response_body_status_Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
) -> envoy_dynamic_module_type_on_http_filter_response_trailers_status {
    envoy_dynamic_module_type_on_http_filter_response_trailers_status_Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    m: envoy_dynamic_module_type_http_filter_module_ptr,
) {
    // SAFETY: Envoy's stream pointer.
    unsafe { stream(m) }.finish();
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
    m: envoy_dynamic_module_type_http_filter_module_ptr,
) {
    // SAFETY: the pointer on_http_filter_new returned, destroyed once by Envoy.
    let mut stream = unsafe { Box::from_raw(m as *mut Stream) };
    // Out of the instance first (under its lock), so no wake-up can use the scheduler after this.
    stream.finish();
    if let Some(scheduler) = stream.scheduler.take() {
        // SAFETY: created by scheduler_new for this stream, deleted once.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler.0) }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    m: envoy_dynamic_module_type_http_filter_module_ptr,
    event_id: u64,
) {
    // SAFETY: Envoy's stream pointer; scheduled events run on the stream's worker.
    unsafe { stream(m) }.scheduled(event_id);
}

// Hooks Envoy 1.40 resolves for every HTTP filter module; this filter starts no callouts or streams
// and does not react to watermarks.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _callout_id: u64,
    _result: envoy_dynamic_module_type_http_callout_result,
    _headers: *mut envoy_dynamic_module_type_envoy_http_header,
    _headers_size: usize,
    _body_chunks: *mut envoy_dynamic_module_type_envoy_buffer,
    _body_chunks_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _stream_id: u64,
    _headers: *mut envoy_dynamic_module_type_envoy_http_header,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _stream_id: u64,
    _data: *const envoy_dynamic_module_type_envoy_buffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _stream_id: u64,
    _trailers: *mut envoy_dynamic_module_type_envoy_http_header,
    _trailers_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _stream_id: u64,
    _reason: envoy_dynamic_module_type_http_stream_reset_reason,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _f: envoy_dynamic_module_type_http_filter_envoy_ptr,
    _m: envoy_dynamic_module_type_http_filter_module_ptr,
    _response_code: u32,
    _details: envoy_dynamic_module_type_envoy_buffer,
    _reset_imminent: bool,
) -> envoy_dynamic_module_type_on_http_filter_local_reply_status {
    envoy_dynamic_module_type_on_http_filter_local_reply_status_Continue
}
