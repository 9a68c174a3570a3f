//! The proxy-wasm glue: feeds host events to the pure modules and carries out their answers.
//!
//! One root context per plugin per worker VM owns a [`Plugin`]; each HTTP stream holds an `Rc` to it.
//! Cross-worker state (the breaker, readiness) lives in Envoy's shared data, changed by compare-and-swap;
//! while nobody waits, a worker admits and releases against the slots it leased, without shared data
//! (see `breaker`). A slot handed to a waiting stream, and a request to give leased slots back, are
//! announced on the worker's shared queue; streams are resumed and timed out only from root callbacks
//! (`on_queue_ready`, `on_tick`), never from inside another stream's callback, so no stream callback
//! runs re-entrantly inside another, and no `RefCell` borrow is held across a host call that can call
//! back into the VM (resume, local reply).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

use crate::breaker::{
    self, Arrival, BreakerState, Effects, Finish, Grant, Lease, LeasePolicy, Message,
    QUEUE_FULL_BODY, QUEUE_TIMEOUT_BODY, Streams, Waiter,
};
use crate::config::{Config, Limits, Readiness};
use crate::names::{self, Names};
use crate::readiness::Prober;
use crate::request::{self, Answer};
use crate::stats::{Published, Report, WINDOW, Windows};

/// How often each worker closes stats windows, times out queued requests and probes readiness.
const TICK: Duration = Duration::from_millis(100);
/// Compare-and-swap retries before giving up on one change of the shared breaker state.
const CAS_ATTEMPTS: usize = 1000;
/// Shared-data key of the counter that names each root context's shared queue uniquely.
const ROOT_COUNTER_KEY: &str = "sluice_qp/root-counter";

/// Registers the root context factory; called once when the VM starts.
pub fn start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(QueueProxyRoot::new(context_id)));
}

/// Nanoseconds since the Unix epoch, from the host's clock.
fn now_nanos() -> u64 {
    let now = hostcalls::get_current_time().unwrap_or(UNIX_EPOCH);
    now.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn add(metric: u32, delta: i64) {
    if delta != 0
        && let Err(e) = hostcalls::increment_metric(metric, delta)
    {
        warn!("sluice queue-proxy: incrementing metric {metric}: {e:?}");
    }
}

fn define(kind: MetricType, name: &str) -> Result<u32, String> {
    hostcalls::define_metric(kind, name).map_err(|e| format!("defining metric {name}: {e:?}"))
}

/// A stat kept both per instance and per revision.
#[derive(Debug, Clone, Copy)]
struct Pair {
    instance: u32,
    revision: u32,
}

impl Pair {
    fn define(kind: MetricType, names: &Names, stat: &str) -> Result<Pair, String> {
        Ok(Pair {
            instance: define(kind, &names.instance(stat))?,
            revision: define(kind, &names.revision(stat))?,
        })
    }

    fn add(self, delta: i64) {
        add(self.instance, delta);
        add(self.revision, delta);
    }
}

#[derive(Debug, Clone, Copy)]
struct Metrics {
    /// In the order of [`Report::values`].
    window: [Pair; 4],
    requests_total: Pair,
    proxied_requests_total: Pair,
    in_flight: u32,
    queued: u32,
    overflow_total: u32,
    queue_timeout_total: u32,
    ready: u32,
}

impl Metrics {
    fn define(names: &Names) -> Result<Metrics, String> {
        let gauge = MetricType::Gauge;
        let counter = MetricType::Counter;
        Ok(Metrics {
            window: [
                Pair::define(gauge, names, names::AVERAGE_CONCURRENCY)?,
                Pair::define(gauge, names, names::AVERAGE_PROXIED_CONCURRENCY)?,
                Pair::define(gauge, names, names::REQUEST_COUNT)?,
                Pair::define(gauge, names, names::PROXIED_REQUEST_COUNT)?,
            ],
            requests_total: Pair::define(counter, names, names::REQUESTS_TOTAL)?,
            proxied_requests_total: Pair::define(counter, names, names::PROXIED_REQUESTS_TOTAL)?,
            in_flight: define(gauge, &names.instance(names::IN_FLIGHT))?,
            queued: define(gauge, &names.instance(names::QUEUED))?,
            overflow_total: define(counter, &names.instance(names::OVERFLOW_TOTAL))?,
            queue_timeout_total: define(counter, &names.instance(names::QUEUE_TIMEOUT_TOTAL))?,
            ready: define(gauge, &names.instance(names::READY))?,
        })
    }
}

/// Counter and gauge changes not yet written to Envoy: the hot path only adds them up, and each tick
/// writes the sums (fewer host calls per request; the stats lag by at most one tick).
#[derive(Debug, Default)]
struct Pending {
    requests: i64,
    proxied_requests: i64,
    in_flight: i64,
    queued: i64,
}

/// This worker's mutable state for one plugin.
struct Worker {
    pending: Pending,
    streams: Streams,
    /// The slots this worker owns in the shared breaker state.
    lease: Lease,
    windows: Windows,
    published: Published,
    prober: Option<Prober>,
    /// Slot releases that could not be written to shared data yet; retried on every tick.
    unreleased: u32,
    /// Slots handed to waiters of workers that could not be told; given back on every tick.
    undelivered: u32,
    /// A Reclaim could not be carried out yet; retried on every tick.
    give_back_due: bool,
}

/// One configured plugin on one worker.
struct Plugin {
    root_id: u32,
    config: Config,
    breaker_key: String,
    ready_key: String,
    /// This worker's shared queue, where it hears that one of its streams was handed a slot, or that
    /// it must give its leased slots back.
    queue: u32,
    policy: LeasePolicy,
    metrics: Metrics,
    worker: RefCell<Worker>,
}

impl Plugin {
    fn configure(root_id: u32, config: Config) -> Result<Plugin, String> {
        let names = Names::new(&config.identity);
        let metrics = Metrics::define(&names)?;
        // The format version is in the key: a filter build with another format (Envoy shares data by
        // vm_id, across code versions) keeps its own breaker instead of misreading this one.
        let breaker_key = names.shared_key(&format!("breaker-v{}", breaker::FORMAT_VERSION));
        let ready_key = names.shared_key("ready");
        let mut queue = 0;
        if config.limits.is_some() {
            // Envoy configures the plugin on the main thread before any worker: the state exists before
            // traffic, so the first compare-and-swap never races an unconditional create.
            let (existing, _) = hostcalls::get_shared_data(&breaker_key)
                .map_err(|e| format!("reading shared data {breaker_key}: {e:?}"))?;
            if existing.is_none() {
                hostcalls::set_shared_data(
                    &breaker_key,
                    Some(&BreakerState::default().encode()),
                    None,
                )
                .map_err(|e| format!("creating shared data {breaker_key}: {e:?}"))?;
            }
            let unique = next_root_number()?;
            let name = names.shared_key(&format!("wake/{unique}"));
            queue = hostcalls::register_shared_queue(&name)
                .map_err(|e| format!("registering shared queue {name}: {e:?}"))?;
        }
        // Without limits there is no breaker, and the policy is never asked.
        let policy = LeasePolicy::new(config.limits.unwrap_or(Limits {
            capacity: 0,
            queue_depth: 0,
        }));
        let now = now_nanos();
        let prober = match &config.readiness {
            Readiness::Static(ready) => {
                let _ = hostcalls::record_metric(metrics.ready, u64::from(*ready));
                None
            }
            Readiness::Probe(probe) => Some(Prober::new(probe, now)),
        };
        Ok(Plugin {
            root_id,
            config,
            breaker_key,
            ready_key,
            queue,
            policy,
            metrics,
            worker: RefCell::new(Worker {
                streams: Streams::default(),
                windows: Windows::new(WINDOW, now),
                published: Published::default(),
                prober,
                unreleased: 0,
                undelivered: 0,
                give_back_due: false,
                lease: Lease::default(),
                pending: Pending::default(),
            }),
        })
    }

    fn limits(&self) -> Option<Limits> {
        self.config.limits
    }

    fn waiter(&self, context: u32) -> Waiter {
        Waiter {
            queue: self.queue,
            context,
        }
    }

    /// Applies `change` to the shared breaker state by compare-and-swap. `change` may run several times
    /// (once per attempt), so it must only touch the state it is given.
    fn update_breaker<R>(
        &self,
        mut change: impl FnMut(&mut BreakerState) -> R,
    ) -> Result<R, String> {
        for _ in 0..CAS_ATTEMPTS {
            let (bytes, cas) = hostcalls::get_shared_data(&self.breaker_key)
                .map_err(|e| format!("reading {}: {e:?}", self.breaker_key))?;
            let mut state = match bytes.as_deref().map(BreakerState::decode) {
                Some(Ok(state)) => state,
                None => BreakerState::default(),
                Some(Err(e)) => {
                    // Only a bug can do this; starting afresh beats refusing every request forever.
                    error!(
                        "sluice queue-proxy: {}: {e}; starting from an empty breaker",
                        self.breaker_key
                    );
                    BreakerState::default()
                }
            };
            let result = change(&mut state);
            match hostcalls::set_shared_data(&self.breaker_key, Some(&state.encode()), cas) {
                Ok(()) => return Ok(result),
                Err(Status::CasMismatch) => continue,
                Err(e) => return Err(format!("writing {}: {e:?}", self.breaker_key)),
            }
        }
        Err(format!(
            "{}: still contended after {CAS_ATTEMPTS} compare-and-swap attempts",
            self.breaker_key
        ))
    }

    /// Changes this worker's lease and the shared breaker state together, by compare-and-swap; the
    /// lease is kept only when the swap succeeds.
    fn update_lease<R>(
        &self,
        mut change: impl FnMut(&mut Lease, &mut BreakerState) -> R,
    ) -> Result<R, String> {
        let start = self.worker.borrow().lease;
        let (lease, result) = self.update_breaker(|state| {
            let mut lease = start;
            let result = change(&mut lease, state);
            (lease, result)
        })?;
        self.worker.borrow_mut().lease = lease;
        Ok(result)
    }

    /// Sends the messages a change of the breaker state calls for.
    fn carry_out(&self, effects: Effects) {
        for queue in effects.reclaim {
            if let Err(e) = hostcalls::enqueue_shared_queue(queue, Some(&Message::Reclaim.encode()))
            {
                // Only a worker that is gone has no queue; what it held is lost with it.
                warn!("sluice queue-proxy: asking queue {queue} for its idle slots: {e:?}");
            }
        }
        self.deliver(effects.granted);
    }

    /// Tells each waiter's worker that it holds a slot. A waiter whose worker is gone (its plugin was
    /// replaced) gives the slot back at once, so it moves on to the next waiter.
    fn deliver(&self, granted: Vec<Waiter>) {
        let mut pending = granted;
        // Each failed delivery releases one slot, which grants at most one waiter: this ends.
        while let Some(waiter) = pending.pop() {
            let message = Message::Granted(waiter.context).encode();
            if let Err(e) = hostcalls::enqueue_shared_queue(waiter.queue, Some(&message)) {
                warn!(
                    "sluice queue-proxy: telling queue {} about a slot for stream {}: {e:?}; releasing it",
                    waiter.queue, waiter.context
                );
                let Some(limits) = self.limits() else {
                    continue;
                };
                match self.update_breaker(|state| state.release_undelivered(limits)) {
                    Ok(more) => pending.extend(more),
                    Err(e) => {
                        error!(
                            "sluice queue-proxy: releasing a slot: {e}; retrying on the next tick"
                        );
                        self.worker.borrow_mut().undelivered += 1;
                    }
                }
            }
        }
    }

    /// A stream's slot is free: a lender keeps it idle; otherwise it goes back to shared data (on
    /// failure, remembered for the next tick).
    fn release_slot(&self) {
        if self.worker.borrow_mut().lease.release_local() {
            return;
        }
        let Some(limits) = self.limits() else {
            return;
        };
        match self.update_lease(|lease, state| lease.release(state, limits)) {
            Ok(effects) => self.carry_out(effects),
            Err(e) => {
                error!("sluice queue-proxy: releasing a slot: {e}; retrying on the next tick");
                self.worker.borrow_mut().unreleased += 1;
            }
        }
    }

    /// Stops lending and gives the idle slots back (asked by a waiter, or the plugin goes away).
    fn give_back(&self) {
        let Some(limits) = self.limits() else {
            return;
        };
        if !self.worker.borrow().lease.lending() {
            return;
        }
        let queue = self.queue;
        match self.update_lease(|lease, state| lease.give_back(state, limits, queue)) {
            Ok(granted) => self.deliver(granted),
            Err(e) => {
                error!(
                    "sluice queue-proxy: giving leased slots back: {e}; retrying on the next tick"
                );
                self.worker.borrow_mut().give_back_due = true;
            }
        }
    }

    /// A lender's tick: idle slots past one batch go back to the pool.
    fn trim(&self) {
        let Some(limits) = self.limits() else {
            return;
        };
        let lease = self.worker.borrow().lease;
        if !lease.lending() || lease.idle() <= self.policy.batch() {
            return;
        }
        let (queue, policy) = (self.queue, self.policy);
        match self.update_lease(|lease, state| lease.trim(state, limits, policy, queue)) {
            Ok(granted) => self.deliver(granted),
            Err(e) => error!("sluice queue-proxy: trimming leased slots: {e}"),
        }
    }

    fn publish(&self, report: Option<Report>) {
        let Some(report) = report else {
            return;
        };
        let deltas = self.worker.borrow_mut().published.deltas(report.values());
        for (pair, delta) in self.metrics.window.iter().zip(deltas) {
            pair.add(delta);
        }
    }

    fn request_in(&self, proxied: bool) {
        let report = self
            .worker
            .borrow_mut()
            .windows
            .request_in(now_nanos(), proxied);
        self.publish(report);
        self.count(|p| {
            p.requests += 1;
            if proxied {
                p.proxied_requests += 1;
            }
        });
    }

    fn count(&self, change: impl FnOnce(&mut Pending)) {
        change(&mut self.worker.borrow_mut().pending);
    }

    /// Writes the pending counter and gauge changes.
    fn flush(&self) {
        let p = std::mem::take(&mut self.worker.borrow_mut().pending);
        self.metrics.requests_total.add(p.requests);
        self.metrics.proxied_requests_total.add(p.proxied_requests);
        add(self.metrics.in_flight, p.in_flight);
        add(self.metrics.queued, p.queued);
    }

    fn request_out(&self, proxied: bool) {
        let report = self
            .worker
            .borrow_mut()
            .windows
            .request_out(now_nanos(), proxied);
        self.publish(report);
    }

    fn is_ready(&self) -> bool {
        match &self.config.readiness {
            Readiness::Static(ready) => *ready,
            Readiness::Probe(_) => matches!(
                hostcalls::get_shared_data(&self.ready_key),
                Ok((Some(value), _)) if value == b"1"
            ),
        }
    }

    fn set_ready(&self, ready: bool) {
        let was = self.is_ready();
        let value: &[u8] = if ready { b"1" } else { b"0" };
        if let Err(e) = hostcalls::set_shared_data(&self.ready_key, Some(value), None) {
            error!("sluice queue-proxy: storing readiness: {e:?}");
        }
        let _ = hostcalls::record_metric(self.metrics.ready, u64::from(ready));
        if was != ready {
            let id = &self.config.identity;
            info!(
                "sluice queue-proxy {}/{} instance {}: {}",
                id.namespace,
                id.revision,
                id.instance,
                if ready { "ready" } else { "not ready" }
            );
        }
    }

    /// The periodic work of one worker: close stats windows, retry releases, time out queued streams.
    fn tick(&self) {
        let now = now_nanos();
        let report = self.worker.borrow_mut().windows.advance(now);
        self.publish(report);

        let unreleased = std::mem::take(&mut self.worker.borrow_mut().unreleased);
        for _ in 0..unreleased {
            self.release_slot();
        }
        let undelivered = std::mem::take(&mut self.worker.borrow_mut().undelivered);
        if let Some(limits) = self.limits() {
            for _ in 0..undelivered {
                match self.update_breaker(|state| state.release_undelivered(limits)) {
                    Ok(granted) => self.deliver(granted),
                    Err(_) => self.worker.borrow_mut().undelivered += 1,
                }
            }
        }
        if std::mem::take(&mut self.worker.borrow_mut().give_back_due) {
            self.give_back();
        }
        self.trim();

        let expired = self.worker.borrow().streams.expired(now);
        for context in expired {
            let waiter = self.waiter(context);
            match self.update_breaker(|state| state.cancel(waiter)) {
                Ok(true) => {
                    self.worker.borrow_mut().streams.timed_out(context);
                    self.count(|p| p.queued -= 1);
                    add(self.metrics.queue_timeout_total, 1);
                    // Knative answers a request whose deadline passed in the breaker with 503.
                    if hostcalls::set_effective_context(context).is_ok() {
                        let _ = hostcalls::send_http_response(
                            503,
                            vec![("content-type", "text/plain; charset=utf-8")],
                            Some(QUEUE_TIMEOUT_BODY.as_bytes()),
                        );
                    }
                }
                // Handed a slot meanwhile: it will be served.
                Ok(false) => self.worker.borrow_mut().streams.slot_on_its_way(context),
                Err(e) => error!("sluice queue-proxy: timing out stream {context}: {e}"),
            }
        }
        let _ = hostcalls::set_effective_context(self.root_id);
        self.flush();
    }

    /// Messages on this worker's shared queue: slots handed to its streams, requests to give its
    /// leased slots back.
    fn messages_arrived(&self, queue_id: u32) {
        let mut messages = Vec::new();
        loop {
            match hostcalls::dequeue_shared_queue(queue_id) {
                Ok(Some(bytes)) => match Message::decode(&bytes) {
                    Some(message) => messages.push(message),
                    None => error!(
                        "sluice queue-proxy: a {}-byte message on queue {queue_id}",
                        bytes.len()
                    ),
                },
                Ok(None) => break,
                Err(e) => {
                    error!("sluice queue-proxy: reading queue {queue_id}: {e:?}");
                    break;
                }
            }
        }
        for message in messages {
            let context = match message {
                Message::Granted(context) => context,
                Message::Reclaim => {
                    self.give_back();
                    continue;
                }
            };
            let grant = {
                let mut worker = self.worker.borrow_mut();
                worker.lease.granted();
                worker.streams.grant(context)
            };
            match grant {
                Grant::Resume => {
                    self.count(|p| {
                        p.queued -= 1;
                        p.in_flight += 1;
                    });
                    let resumed = hostcalls::set_effective_context(context)
                        .and_then(|()| hostcalls::resume_http_request());
                    if let Err(e) = resumed {
                        // The stream is on its way out; its on_done releases the slot it now holds.
                        warn!("sluice queue-proxy: resuming stream {context}: {e:?}");
                    }
                }
                Grant::Orphan => self.release_slot(),
            }
        }
        let _ = hostcalls::set_effective_context(self.root_id);
    }

    /// Sends a readiness probe if one is due.
    fn probe(&self) {
        let Readiness::Probe(config) = &self.config.readiness else {
            return;
        };
        let now = now_nanos();
        let due = self
            .worker
            .borrow_mut()
            .prober
            .as_mut()
            .is_some_and(|p| p.start(now));
        if !due {
            return;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", config.path.as_str()),
            (":authority", config.authority.as_str()),
            ("user-agent", "sluice-queue-proxy"),
        ];
        if let Err(e) =
            hostcalls::dispatch_http_call(&config.cluster, headers, None, vec![], config.timeout)
        {
            warn!(
                "sluice queue-proxy: readiness probe to cluster {}: {e:?}",
                config.cluster
            );
            let change = self
                .worker
                .borrow_mut()
                .prober
                .as_mut()
                .and_then(Prober::not_sent);
            if let Some(ready) = change {
                self.set_ready(ready);
            }
        }
    }

    fn probe_answered(&self, status: Option<u32>) {
        let change = self
            .worker
            .borrow_mut()
            .prober
            .as_mut()
            .and_then(|p| p.answered(status));
        if let Some(ready) = change {
            self.set_ready(ready);
        }
    }

    /// Takes this worker's share out of the window gauges (the plugin is going away).
    fn unpublish(&self) {
        self.flush();
        let deltas = self.worker.borrow_mut().published.deltas([0; 4]);
        for (pair, delta) in self.metrics.window.iter().zip(deltas) {
            pair.add(delta);
        }
    }
}

/// The next number from a process-wide counter in shared data.
fn next_root_number() -> Result<u32, String> {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(ROOT_COUNTER_KEY)
            .map_err(|e| format!("reading {ROOT_COUNTER_KEY}: {e:?}"))?;
        let current = bytes
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        let next = current.wrapping_add(1);
        match hostcalls::set_shared_data(ROOT_COUNTER_KEY, Some(&next.to_le_bytes()), cas) {
            Ok(()) => return Ok(next),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(format!("writing {ROOT_COUNTER_KEY}: {e:?}")),
        }
    }
    Err(format!("{ROOT_COUNTER_KEY}: still contended"))
}

/// The root context: one per plugin per worker VM.
pub struct QueueProxyRoot {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
}

impl QueueProxyRoot {
    pub fn new(context_id: u32) -> QueueProxyRoot {
        QueueProxyRoot {
            context_id,
            plugin: None,
        }
    }
}

impl Context for QueueProxyRoot {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(plugin) = &self.plugin {
            plugin.probe_answered(status);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(plugin) = &self.plugin {
            plugin.unpublish();
            // Streams still holding a slot release it through shared data from now on.
            plugin.give_back();
        }
        true
    }
}

impl RootContext for QueueProxyRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if crate::config::is_vm_keeper(&raw) {
            // Serves no revision: it only keeps the VM loaded between instance listeners.
            info!("sluice queue-proxy: VM keeper started");
            return true;
        }
        let config = match Config::parse(&raw) {
            Ok(config) => config,
            Err(e) => {
                error!("sluice queue-proxy: bad plugin configuration: {e}");
                return false;
            }
        };
        let summary = describe(&config);
        match Plugin::configure(self.context_id, config) {
            Ok(plugin) => {
                self.plugin = Some(Rc::new(plugin));
                self.set_tick_period(TICK);
                info!("sluice queue-proxy: {summary}");
                true
            }
            Err(e) => {
                error!("sluice queue-proxy: cannot start ({summary}): {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(plugin) = &self.plugin {
            plugin.tick();
            plugin.probe();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(plugin) = &self.plugin {
            plugin.messages_arrived(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(QueueProxyStream {
            context_id,
            plugin: self.plugin.clone(),
            counted: None,
            finished: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn describe(config: &Config) -> String {
    let id = &config.identity;
    let breaker = match config.limits {
        None => "containerConcurrency 0 (no breaker)".to_string(),
        Some(l) => format!(
            "containerConcurrency {}, queue depth {}, queue timeout {:?}",
            l.capacity, l.queue_depth, config.queue_timeout
        ),
    };
    let readiness = match &config.readiness {
        Readiness::Static(ready) => format!("ready {ready} (static)"),
        Readiness::Probe(p) => format!(
            "readiness probe GET {} via cluster {} every {:?}",
            p.path, p.cluster, p.period
        ),
    };
    format!(
        "{}/{} instance {}: {breaker}, {readiness}",
        id.namespace, id.revision, id.instance
    )
}

/// One HTTP stream through the filter.
pub struct QueueProxyStream {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
    /// Some(proxied) once counted in the stats (user requests only, never probes).
    counted: Option<bool>,
    finished: bool,
}

impl QueueProxyStream {
    fn reply(&self, status: u32, extra: Vec<(&str, &str)>, body: &str) -> Action {
        let mut headers = vec![("content-type", "text/plain; charset=utf-8")];
        headers.extend(extra);
        self.send_http_response(status, headers, Some(body.as_bytes()));
        Action::Pause
    }

    fn arrive(&mut self, plugin: &Plugin, proxied: bool) -> Action {
        // Knative counts requests before the breaker: queued ones count toward concurrency.
        self.counted = Some(proxied);
        plugin.request_in(proxied);
        let Some(limits) = plugin.limits() else {
            return Action::Continue;
        };
        let arrival = if plugin.worker.borrow_mut().lease.admit_local() {
            Arrival::Admitted
        } else {
            let me = plugin.waiter(self.context_id);
            let policy = plugin.policy;
            match plugin.update_lease(|lease, state| lease.arrive(state, limits, policy, me)) {
                Ok((arrival, effects)) => {
                    plugin.carry_out(effects);
                    arrival
                }
                Err(e) => {
                    error!("sluice queue-proxy: breaker: {e}");
                    return self.reply(503, vec![], "queue-proxy breaker unavailable\n");
                }
            }
        };
        match arrival {
            Arrival::Admitted => {
                plugin.worker.borrow_mut().streams.admitted(self.context_id);
                plugin.count(|p| p.in_flight += 1);
                Action::Continue
            }
            Arrival::Queued => {
                let deadline = now_nanos().saturating_add(nanos(plugin.config.queue_timeout));
                plugin
                    .worker
                    .borrow_mut()
                    .streams
                    .queued(self.context_id, deadline);
                plugin.count(|p| p.queued += 1);
                Action::Pause
            }
            Arrival::Overflow => {
                add(plugin.metrics.overflow_total, 1);
                self.reply(503, vec![], QUEUE_FULL_BODY)
            }
        }
    }

    /// Whether this stream still waits for a slot (its body and trailers must wait too).
    fn waiting(&self) -> bool {
        self.plugin
            .as_ref()
            .is_some_and(|p| p.worker.borrow().streams.is_queued(self.context_id))
    }

    /// The stream ended, however it ended. Runs once, from on_log or on_done, whichever comes first.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let Some(plugin) = self.plugin.clone() else {
            return;
        };
        if let Some(proxied) = self.counted {
            plugin.request_out(proxied);
        }
        if plugin.limits().is_none() {
            return;
        }
        let finish = plugin.worker.borrow_mut().streams.finish(self.context_id);
        match finish {
            Finish::Release => {
                plugin.count(|p| p.in_flight -= 1);
                plugin.release_slot();
            }
            Finish::Cancel => {
                // The client went away while queued.
                plugin.count(|p| p.queued -= 1);
                let me = plugin.waiter(self.context_id);
                match plugin.update_breaker(|state| state.cancel(me)) {
                    Ok(true) => {}
                    // Handed a slot meanwhile: the message finds no stream and releases it.
                    Ok(false) => {}
                    // Still in the FIFO: when its turn comes the slot is released the same way.
                    Err(e) => error!(
                        "sluice queue-proxy: cancelling stream {}: {e}",
                        self.context_id
                    ),
                }
            }
            Finish::Nothing => {}
        }
    }
}

impl Context for QueueProxyStream {
    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl HttpContext for QueueProxyStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(plugin) = self.plugin.clone() else {
            return Action::Continue;
        };
        let kind = request::classify_from(|name| self.get_http_request_header(name));
        match request::answer(kind, plugin.is_ready()) {
            Answer::Reply { status, hash, body } => match &hash {
                Some(hash) => {
                    self.reply(status, vec![(request::HASH_HEADER, hash.as_str())], &body)
                }
                None => self.reply(status, vec![], &body),
            },
            Answer::Forward => Action::Continue,
            Answer::Admit { proxied } => self.arrive(&plugin, proxied),
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // Continuing the body would continue the paused headers with it.
        if self.waiting() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.waiting() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_log(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_summarises_the_config() {
        let config = Config::parse(
            br#"{"namespace": "n", "revision": "r", "instance": "i", "containerConcurrency": 2}"#,
        )
        .unwrap();
        assert_eq!(
            describe(&config),
            "n/r instance i: containerConcurrency 2, queue depth 20, queue timeout 300s, ready true (static)"
        );
    }
}
