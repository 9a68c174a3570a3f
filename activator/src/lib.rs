//! Sluice's activator: Knative's activator on our data path.
//!
//! Envoy sends a revision's requests here while the revision has no (or too little) capacity; the
//! gateway names the revision in the `Knative-Serving-Revision` and `Knative-Serving-Namespace`
//! headers. The activator holds each request in a bounded FIFO with the revision's timeout, pokes the
//! autoscaler as soon as a revision with no capacity gets a request, probes new instances with
//! `K-Network-Probe: queue` before sending them anything, and forwards with a per-revision throttle of
//! containerConcurrency x healthy instances, balancing as Knative does. Forwarded requests carry
//! `K-Proxy-Request: activator`. It reports per-revision concurrency to the autoscaler every second.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use sluice_activator::{Activator, ActivatorOptions, RevisionConfig};
//! use sluice_api::autoscaling::RevisionKey;
//! let (pokes, _poke_rx) = tokio::sync::mpsc::unbounded_channel();
//! let (stats, _stat_rx) = tokio::sync::mpsc::unbounded_channel();
//! let (activator, _tasks) = Activator::new(ActivatorOptions::new(pokes, stats));
//! activator.update_revision(
//!     RevisionKey::new("default", "hello-00001"),
//!     RevisionConfig::new(1, vec!["127.0.0.1:9001".parse().unwrap()]),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8012").await?;
//! activator.serve(listener).await
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_api::autoscaling::{RevisionKey, Stat};
use tokio::task::AbortHandle;

mod body;
pub mod lb;
pub mod metrics;
mod pool;
mod probe;
mod proxy;
mod revision;
pub mod stats;
pub mod throttler;

pub use lb::LbPolicy;
pub use throttler::{Capacity, DEFAULT_MAX_QUEUE};

/// Knative: a revision's `timeoutSeconds` defaults to 300 s (`revision-timeout-seconds`).
pub const DEFAULT_REVISION_TIMEOUT: Duration = Duration::from_secs(300);
/// Knative: the activator reports its concurrency every second (`reportInterval`).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Knative: `defaultProbeFrequency` of the activator's revision backends manager.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Knative: `probeTimeout` of the activator's revision backends manager.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How many instances a request tries when connecting fails, before a 502.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;

/// Told at once when a revision without capacity gets a request, so scale-from-zero does not wait for
/// the autoscaler's next tick. Called once each time a revision's wait queue goes from empty to
/// non-empty, never for requests that are forwarded at once.
pub trait Poker: Send + Sync {
    fn poke(&self, revision: &RevisionKey);
}

impl Poker for tokio::sync::mpsc::UnboundedSender<RevisionKey> {
    fn poke(&self, revision: &RevisionKey) {
        // The receiver gone means nobody scales: nothing useful to do but log.
        if self.send(revision.clone()).is_err() {
            tracing::debug!(%revision, "poke receiver is gone");
        }
    }
}

impl<F: Fn(&RevisionKey) + Send + Sync> Poker for F {
    fn poke(&self, revision: &RevisionKey) {
        self(revision)
    }
}

/// Where the activator's stats go (the autoscaler's `record_activator_stat`). Each `Stat` has
/// `pod_name` "activator".
pub trait StatSink: Send + Sync {
    fn record(&self, revision: &RevisionKey, stat: Stat);
}

impl StatSink for tokio::sync::mpsc::UnboundedSender<(RevisionKey, Stat)> {
    fn record(&self, revision: &RevisionKey, stat: Stat) {
        if self.send((revision.clone(), stat)).is_err() {
            tracing::debug!(%revision, "stat receiver is gone");
        }
    }
}

impl<F: Fn(&RevisionKey, Stat) + Send + Sync> StatSink for F {
    fn record(&self, revision: &RevisionKey, stat: Stat) {
        self(revision, stat)
    }
}

/// What the activator knows about one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionConfig {
    /// `spec.containerConcurrency`; 0 = unlimited.
    pub container_concurrency: u32,
    /// `spec.timeoutSeconds`: the whole time a request may spend here before its response starts,
    /// waiting included (Knative: 504 "activator request timeout").
    pub timeout: Duration,
    /// Requests that may wait for capacity; more get 503 "pending request queue full". 0 = never wait.
    pub max_queue: usize,
    /// Every instance address of the revision, ready or not: the activator probes them itself and
    /// sends traffic only to those that answered `K-Network-Probe: queue` with 200 "queue".
    pub backends: Vec<SocketAddr>,
    /// Set while the revision's instances cannot start (its Ready=False reason and message): a
    /// request no healthy instance can take gets 503 naming it at once, instead of waiting out the
    /// timeout, and the requests already held get it too.
    pub failure: Option<RevisionFailure>,
}

/// Why a revision cannot serve: its Ready=False reason (`ContainerMissing`, `ExitCode`...) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionFailure {
    pub reason: String,
    pub message: String,
}

impl RevisionConfig {
    /// Knative's defaults: timeout 300 s, queue depth 10000.
    pub fn new(container_concurrency: u32, backends: Vec<SocketAddr>) -> Self {
        RevisionConfig {
            container_concurrency,
            timeout: DEFAULT_REVISION_TIMEOUT,
            max_queue: DEFAULT_MAX_QUEUE,
            backends,
            failure: None,
        }
    }
}

/// A point-in-time view of a revision's throttler, for logs, status and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSnapshot {
    pub container_concurrency: u32,
    pub policy: LbPolicy,
    pub capacity: Capacity,
    pub healthy: usize,
    pub backends: usize,
    pub in_flight: u64,
    pub waiting: usize,
    /// The revision is failed (see [`RevisionConfig::failure`]).
    pub failed: bool,
}

/// How the activator is wired to the rest of Sluice.
#[derive(Clone)]
pub struct ActivatorOptions {
    pub poker: Arc<dyn Poker>,
    pub stat_sink: Arc<dyn StatSink>,
    pub report_interval: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub connect_attempts: u32,
}

impl ActivatorOptions {
    /// Knative's intervals: stats every second, probes every 200 ms with a 300 ms timeout.
    pub fn new(poker: impl Poker + 'static, stat_sink: impl StatSink + 'static) -> Self {
        ActivatorOptions {
            poker: Arc::new(poker),
            stat_sink: Arc::new(stat_sink),
            report_interval: DEFAULT_REPORT_INTERVAL,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS,
        }
    }
}

/// The activator. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Activator {
    inner: Arc<Inner>,
}

/// The activator's background tasks (stat reporter, per-revision probers). Dropping it stops them;
/// keep it as long as the activator serves.
#[must_use = "dropping ActivatorTasks stops the stat reporter and the probers"]
pub struct ActivatorTasks {
    inner: Arc<Inner>,
    reporter: AbortHandle,
}

impl Drop for ActivatorTasks {
    fn drop(&mut self) {
        self.reporter.abort();
        self.inner.closed.store(true, Ordering::SeqCst);
        for rev in lock(&self.inner.revisions).values() {
            rev.stop_prober();
        }
    }
}

pub(crate) struct Inner {
    options: ActivatorOptions,
    metrics: metrics::ActivatorMetrics,
    revisions: Mutex<HashMap<RevisionKey, Arc<revision::Revision>>>,
    reporter: Mutex<stats::ConcurrencyReporter>,
    pool: pool::Pool,
    closed: AtomicBool,
    /// Probers are spawned here, so revisions can be updated from any thread.
    runtime: tokio::runtime::Handle,
}

/// A poisoned lock only means another request panicked while holding it; the state is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Activator {
    /// Creates the activator and starts its stat reporter. Must be called inside a tokio runtime; the
    /// other methods may be called from any thread.
    pub fn new(options: ActivatorOptions) -> (Activator, ActivatorTasks) {
        let inner = Arc::new(Inner {
            options,
            metrics: metrics::ActivatorMetrics::default(),
            revisions: Mutex::new(HashMap::new()),
            reporter: Mutex::new(stats::ConcurrencyReporter::new()),
            pool: pool::Pool::default(),
            closed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        });
        let reporter = tokio::spawn(report_loop(inner.clone())).abort_handle();
        let tasks = ActivatorTasks {
            inner: inner.clone(),
            reporter,
        };
        (Activator { inner }, tasks)
    }

    /// Adds a revision or updates it (limits, timeout, instance set). New instances are probed before
    /// they get traffic; known ones keep their state.
    pub fn update_revision(&self, key: RevisionKey, config: RevisionConfig) {
        let mut revisions = lock(&self.inner.revisions);
        match revisions.get(&key) {
            Some(rev) => rev.update(&config),
            None => {
                let rev = revision::Revision::new(key.clone(), &config);
                if !self.inner.closed.load(Ordering::SeqCst) {
                    let handle = self
                        .inner
                        .runtime
                        .spawn(probe::run_prober(
                            rev.clone(),
                            self.inner.options.probe_interval,
                            self.inner.options.probe_timeout,
                        ))
                        .abort_handle();
                    rev.set_prober(handle);
                }
                revisions.insert(key, rev);
            }
        }
        drop(revisions);
        self.inner.forget_stale_connections();
    }

    /// Forgets a revision. Requests waiting for it get 404; forwarded ones finish.
    pub fn remove_revision(&self, key: &RevisionKey) -> bool {
        let removed = lock(&self.inner.revisions).remove(key);
        match removed {
            Some(rev) => {
                rev.remove();
                self.inner.forget_stale_connections();
                true
            }
            None => false,
        }
    }

    /// The current throttler state of a revision.
    pub fn revision_snapshot(&self, key: &RevisionKey) -> Option<RevisionSnapshot> {
        self.inner.revision(key).map(|r| r.snapshot())
    }

    /// The activator's request counters and latency histograms (for tests and other edges).
    pub fn metrics(&self) -> &metrics::ActivatorMetrics {
        &self.inner.metrics
    }

    /// Registers the activator's metrics in `registry` (Knative's names: give it the prefix
    /// `activator`): the counters and histograms, and the per-revision concurrency and queue depth,
    /// read from the throttlers at each scrape.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner
            .metrics
            .register(registry, Arc::downgrade(&self.inner));
    }

    /// Serves HTTP/1.1 and h2c (prior knowledge) on `listener` until the returned future is dropped
    /// (which also closes its connections) or accepting fails for good.
    pub async fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        proxy::serve(self.inner.clone(), listener).await
    }
}

impl Inner {
    /// Idle connections to addresses no revision uses any more are dropped (closing them).
    fn forget_stale_connections(&self) {
        let live: std::collections::HashSet<SocketAddr> = lock(&self.revisions)
            .values()
            .flat_map(|r| r.backends())
            .collect();
        self.pool.retain_backends(|a| live.contains(a));
    }

    fn revision(&self, key: &RevisionKey) -> Option<Arc<revision::Revision>> {
        lock(&self.revisions).get(key).cloned()
    }
}

async fn report_loop(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(inner.options.report_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    loop {
        ticker.tick().await;
        let now = std::time::Instant::now();
        let reports = lock(&inner.reporter).report(now);
        for (key, stat) in reports {
            inner.options.stat_sink.record(&key, stat);
        }
    }
}
