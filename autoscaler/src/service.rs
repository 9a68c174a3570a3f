//! The I/O runner (tokio): scrapes Envoy every second, records the activator's stats, decides every
//! 2 s (or at once when poked), drives the [`Scaler`] and publishes each revision's decision (scale and
//! serve/proxy mode) on `tokio::sync::watch` channels. The decisions themselves are the pure
//! [`crate::kpa`] and [`crate::reconciler`] code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sluice_api::autoscaling::{ACTIVATOR_POD_NAME, RevisionKey, Stat};
use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use crate::collector::Collector;
use crate::config::RevisionScaling;
use crate::config::ScalingMetric;
use crate::kpa::{Autoscaler, DeciderSpec, DeciderStatus, TICK_INTERVAL};
use crate::metrics::{AutoscalerMetrics, RevisionFigures};
use crate::reconciler::{
    Activity, DEFAULT_PROGRESS_DEADLINE, Mode, Observation, PaStatus, scale_decision,
};
use crate::scaler::Scaler;
use crate::scrape::{EnvoyScraper, InstanceStat, metric_part};

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Envoy's stats page, e.g. `http://127.0.0.1:9901/stats/prometheus?filter=^sluice_qp__`.
    pub stats_url: http::Uri,
    /// Knative scrapes every second.
    pub scrape_interval: Duration,
    /// Knative's tick-interval: a decision every 2 s.
    pub decide_interval: Duration,
    pub scrape_timeout: Duration,
    /// config-deployment's progress-deadline: how long activating may take before scaling to zero.
    pub progress_deadline: Duration,
}

impl ServiceOptions {
    /// Knative's periods: scrape every 1 s, decide every 2 s.
    pub fn new(stats_url: http::Uri) -> Self {
        ServiceOptions {
            stats_url,
            scrape_interval: Duration::from_secs(1),
            decide_interval: TICK_INTERVAL,
            scrape_timeout: Duration::from_millis(900),
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
        }
    }
}

/// One revision's latest decision, as published.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionDecision {
    /// The instance count the runtime was asked for (the last one asked).
    pub desired_scale: u32,
    /// Knative's `want` (-1 while unknown).
    pub want: i32,
    /// Serve: the revision's endpoints are its instances; Proxy: the activator.
    pub mode: Mode,
    pub activity: Activity,
    pub excess_burst_capacity: i32,
    /// Ready instances as last told by the runtime.
    pub ready: u32,
    pub panicking: bool,
}

impl RevisionDecision {
    /// Whether the revision's traffic should go through the activator now. Knative's SKS also uses the
    /// activator in serve mode while the revision has no ready endpoint, so: proxy mode, or nothing ready.
    pub fn routes_to_activator(&self) -> bool {
        self.mode == Mode::Proxy || self.ready == 0
    }
}

struct Revision {
    scaling: RevisionScaling,
    collector: Collector,
    /// Made at the first decision, with the ready count then (Knative starts in panic mode above one
    /// ready instance, so a restart does not scale down before the windows have data).
    autoscaler: Option<Autoscaler>,
    decider: DeciderStatus,
    pa: PaStatus,
    /// Metric parts of the instances that count; `None`: every instance the page shows for the revision.
    instances: Option<BTreeSet<String>>,
    ready: u32,
    /// What the runtime was last successfully asked for; `None` before the initial scale was applied.
    applied: Option<u32>,
    /// When the published mode became Proxy (None while serving).
    proxy_since: Option<Instant>,
    /// The mode the wiring confirmed (Envoy ACKed), and since when; overrides the published one.
    confirmed: Option<(Mode, Instant)>,
    last_activator_stat: Option<Instant>,
    decision: watch::Sender<RevisionDecision>,
}

impl Revision {
    fn activator_in_path_for(&self, now: Instant) -> Option<Duration> {
        match self.confirmed {
            Some((Mode::Proxy, since)) => Some(now.saturating_duration_since(since)),
            Some((Mode::Serve, _)) => None,
            None => self.proxy_since.map(|s| now.saturating_duration_since(s)),
        }
    }
}

struct State {
    revisions: BTreeMap<RevisionKey, Revision>,
    /// (namespace part, revision part) -> revision.
    by_metric: HashMap<(String, String), RevisionKey>,
    pokes: BTreeSet<RevisionKey>,
    stopped: bool,
}

struct Shared {
    epoch: Instant,
    options: ServiceOptions,
    state: Mutex<State>,
    wake: Notify,
    stop: Notify,
    all: watch::Sender<BTreeMap<RevisionKey, RevisionDecision>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    metrics: AutoscalerMetrics,
}

/// A handle on the running autoscaler; cheap to clone.
#[derive(Clone)]
pub struct AutoscalerService {
    shared: Arc<Shared>,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl AutoscalerService {
    /// Starts the scrape/decide loop on the current tokio runtime.
    pub fn start(options: ServiceOptions, scaler: Arc<dyn Scaler>) -> AutoscalerService {
        let (all, _) = watch::channel(BTreeMap::new());
        let shared = Arc::new(Shared {
            epoch: now(),
            options,
            state: Mutex::new(State {
                revisions: BTreeMap::new(),
                by_metric: HashMap::new(),
                pokes: BTreeSet::new(),
                stopped: false,
            }),
            wake: Notify::new(),
            stop: Notify::new(),
            all,
            task: Mutex::new(None),
            metrics: AutoscalerMetrics::default(),
        });
        let task = tokio::spawn(run(shared.clone(), scaler));
        *shared.task.lock().unwrap() = Some(task);
        AutoscalerService { shared }
    }

    /// The per-revision gauges (register them with [`AutoscalerMetrics::register`]).
    pub fn metrics(&self) -> &AutoscalerMetrics {
        &self.shared.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a revision or updates its settings (keeping its metrics and state). A new revision is
    /// scaled to its initial scale at once, as Knative creates the Deployment with that many replicas.
    pub fn upsert_revision(
        &self,
        key: RevisionKey,
        scaling: RevisionScaling,
    ) -> watch::Receiver<RevisionDecision> {
        let now = now();
        let mut state = self.state();
        let spec = DeciderSpec::from_scaling(&scaling);
        if let Some(rev) = state.revisions.get_mut(&key) {
            rev.collector
                .resize(scaling.stable_window, scaling.panic_window);
            if let Some(autoscaler) = &mut rev.autoscaler {
                autoscaler.update(spec);
            }
            rev.scaling = scaling;
            return rev.decision.subscribe();
        }
        let decider = DeciderStatus::initial(&spec);
        let initial = RevisionDecision {
            desired_scale: scaling.initial_scale,
            want: -1,
            mode: if decider.excess_burst_capacity < 0 {
                Mode::Proxy
            } else {
                Mode::Serve
            },
            activity: Activity::Activating,
            excess_burst_capacity: decider.excess_burst_capacity,
            ready: 0,
            panicking: false,
        };
        let (tx, rx) = watch::channel(initial.clone());
        let rev = Revision {
            collector: Collector::new(
                scaling.stable_window,
                scaling.panic_window,
                scaling.aggregation,
                self.shared.epoch,
            ),
            autoscaler: None,
            decider,
            pa: PaStatus::new(now),
            instances: None,
            ready: 0,
            applied: None,
            proxy_since: (initial.mode == Mode::Proxy).then_some(now),
            confirmed: None,
            last_activator_stat: None,
            decision: tx,
            scaling,
        };
        state.by_metric.insert(
            (metric_part(&key.namespace), metric_part(&key.name)),
            key.clone(),
        );
        state.revisions.insert(key.clone(), rev);
        state.pokes.insert(key.clone());
        drop(state);
        self.shared.all.send_modify(|all| {
            all.insert(key, initial);
        });
        self.shared.wake.notify_one();
        rx
    }

    /// Forgets a revision (its watch channel closes). Does not scale it: removing its instances is the
    /// caller's business.
    pub fn remove_revision(&self, key: &RevisionKey) {
        let mut state = self.state();
        state.revisions.remove(key);
        state.by_metric.retain(|_, k| k != key);
        state.pokes.remove(key);
        drop(state);
        self.shared.metrics.remove(key);
        self.shared.all.send_modify(|all| {
            all.remove(key);
        });
    }

    /// The revision's decisions, if it is registered.
    pub fn subscribe(&self, key: &RevisionKey) -> Option<watch::Receiver<RevisionDecision>> {
        self.state()
            .revisions
            .get(key)
            .map(|r| r.decision.subscribe())
    }

    /// Every revision's decision.
    pub fn decisions(&self) -> watch::Receiver<BTreeMap<RevisionKey, RevisionDecision>> {
        self.shared.all.subscribe()
    }

    /// The runtime's instance names of the revision: only their metrics count (Envoy keeps the last
    /// value of a removed instance's gauges, so a stopped instance must not be counted).
    pub fn set_instances<I, S>(&self, key: &RevisionKey, names: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if let Some(rev) = self.state().revisions.get_mut(key) {
            rev.instances = Some(names.into_iter().map(|n| metric_part(n.as_ref())).collect());
        }
    }

    /// How many of the revision's instances are ready (Knative's ready endpoints count).
    /// Published at once in [`RevisionDecision::ready`] (the activator's throttle follows it).
    pub fn set_ready_instances(&self, key: &RevisionKey, ready: u32) {
        let mut state = self.state();
        if let Some(rev) = state.revisions.get_mut(key) {
            rev.ready = ready;
            publish(&self.shared, key, rev, |d| d.ready = ready);
        }
    }

    /// Optional: the wiring tells which mode Envoy actually applied (after its ACK). Once called for a
    /// revision, scale to zero waits for a confirmed proxy mode (Knative probes the activator for this);
    /// until then the published mode is taken as applied.
    pub fn confirm_mode(&self, key: &RevisionKey, mode: Mode) {
        let now = now();
        if let Some(rev) = self.state().revisions.get_mut(key) {
            match rev.confirmed {
                Some((m, _)) if m == mode => {}
                _ => rev.confirmed = Some((mode, now)),
            }
        }
    }

    /// The activator's own stat for the revision (pod name "activator"): requests it holds or proxies.
    /// Knative's activator reports once a second; several stats in one second add up.
    pub fn record_activator_stat(&self, key: &RevisionKey, stat: Stat) {
        let now = now();
        if let Some(rev) = self.state().revisions.get_mut(key) {
            rev.last_activator_stat = Some(now);
            rev.collector.record(now, &stat);
        }
    }

    /// The activator holds a request for the revision: when it is at (or not yet above) zero, decide now
    /// instead of at the next tick (Knative's multiscaler `Poke`). If the activator has not reported a
    /// stat within the last second, a concurrency of 1 is recorded for it (Knative's activator reports
    /// the first request of a revision at once; report it before poking so it is not counted twice).
    pub fn poke(&self, key: &RevisionKey) {
        let now = now();
        let mut state = self.state();
        let Some(rev) = state.revisions.get_mut(key) else {
            return;
        };
        if rev.decider.desired_scale > 0 {
            return;
        }
        let reported_recently = rev
            .last_activator_stat
            .is_some_and(|t| now.saturating_duration_since(t) < crate::config::BUCKET_SIZE);
        if !reported_recently {
            rev.last_activator_stat = Some(now);
            rev.collector.record(
                now,
                &Stat {
                    pod_name: ACTIVATOR_POD_NAME.to_string(),
                    average_concurrent_requests: 1.0,
                    request_count: 1.0,
                    ..Stat::default()
                },
            );
        }
        state.pokes.insert(key.clone());
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Stops the loop and waits for it.
    pub async fn shutdown(&self) {
        self.state().stopped = true;
        self.shared.stop.notify_one();
        let task = self.shared.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(shared: Arc<Shared>, scaler: Arc<dyn Scaler>) {
    let scraper = EnvoyScraper::new(
        shared.options.stats_url.clone(),
        shared.options.scrape_timeout,
    );
    let mut scrape_tick = tokio::time::interval(shared.options.scrape_interval);
    scrape_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut decide_tick = tokio::time::interval(shared.options.decide_interval);
    decide_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut scrape_failures = 0u32;
    loop {
        if shared.state.lock().map(|s| s.stopped).unwrap_or(true) {
            return;
        }
        tokio::select! {
            _ = shared.stop.notified() => return,
            _ = scrape_tick.tick() => {
                match scraper.scrape().await {
                    Ok(stats) => {
                        scrape_failures = 0;
                        record_scrape(&shared, &stats, now());
                    }
                    Err(e) => {
                        // Knative logs scrape errors and carries on; one line per run of failures.
                        scrape_failures += 1;
                        if scrape_failures == 1 {
                            tracing::warn!(error = %e, "autoscaler: scrape failed");
                        }
                    }
                }
            }
            _ = decide_tick.tick() => {
                let keys: Vec<RevisionKey> = {
                    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.pokes.clear();
                    state.revisions.keys().cloned().collect()
                };
                decide(&shared, scaler.as_ref(), keys).await;
            }
            _ = shared.wake.notified() => {
                let keys: Vec<RevisionKey> = {
                    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    std::mem::take(&mut state.pokes).into_iter().collect()
                };
                decide(&shared, scaler.as_ref(), keys).await;
            }
        }
    }
}

/// Sums each revision's counted instances into one stat (Knative's scraper reports the revision's
/// total) and records it.
fn record_scrape(shared: &Shared, stats: &[InstanceStat], now: Instant) {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut totals: BTreeMap<RevisionKey, Stat> = BTreeMap::new();
    for s in stats {
        let Some(key) = state
            .by_metric
            .get(&(s.namespace.clone(), s.revision.clone()))
        else {
            continue;
        };
        let Some(rev) = state.revisions.get(key) else {
            continue;
        };
        if let Some(instances) = &rev.instances
            && !instances.contains(&s.instance)
        {
            continue;
        }
        let total = totals.entry(key.clone()).or_default();
        total.average_concurrent_requests += s.stat.average_concurrent_requests;
        total.average_proxied_concurrent_requests += s.stat.average_proxied_concurrent_requests;
        total.request_count += s.stat.request_count;
        total.proxied_request_count += s.stat.proxied_request_count;
    }
    // Envoy's Prometheus page leaves out stats that were never set: the queue-proxy filter sets its
    // gauges when requests come, so an instance that served nothing yet is absent. It is idle, which is
    // data (Knative's queue-proxy reports zeros): without it an unused revision never scales to zero.
    for (key, rev) in &state.revisions {
        if rev.instances.as_ref().is_some_and(|i| !i.is_empty()) {
            totals.entry(key.clone()).or_default();
        }
    }
    for (key, total) in totals {
        if let Some(rev) = state.revisions.get_mut(&key) {
            rev.collector.record_scrape(now, &total);
        }
    }
}

/// Decides for the given revisions and acts: scaler calls happen outside the state lock.
async fn decide(shared: &Shared, scaler: &dyn Scaler, keys: Vec<RevisionKey>) {
    for key in keys {
        let now = now();
        let action = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(rev) = state.revisions.get_mut(&key) else {
                continue;
            };
            decide_one(shared, &key, rev, now)
        };
        let Some(desired) = action else { continue };
        tracing::info!(revision = %key, desired, "autoscaler: scaling");
        match scaler.scale(&key, desired).await {
            Ok(()) => {
                let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(rev) = state.revisions.get_mut(&key) {
                    rev.applied = Some(desired);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "autoscaler: scaling failed; retrying at the next decision")
            }
        }
    }
}

/// One revision's decision; returns the scale to ask the runtime for, if it changed.
fn decide_one(shared: &Shared, key: &RevisionKey, rev: &mut Revision, now: Instant) -> Option<u32> {
    // Knative creates the Deployment with the initial scale; here the runtime is asked for it first.
    let Some(applied) = rev.applied else {
        let initial = rev.scaling.initial_scale;
        shared.metrics.record_desired(key, initial);
        publish(shared, key, rev, |d| d.desired_scale = initial);
        return Some(initial);
    };

    let epoch = shared.epoch;
    let (spec, ready) = (DeciderSpec::from_scaling(&rev.scaling), rev.ready);
    let autoscaler = rev
        .autoscaler
        .get_or_insert_with(|| Autoscaler::new(spec, ready, now, epoch));
    let result = autoscaler.scale_with(&rev.collector, rev.ready, now);
    let panicking = autoscaler.in_panic();
    rev.decider.apply(result);
    let observation = Observation {
        ready: rev.ready,
        activator_in_path_for: rev.activator_in_path_for(now),
    };
    let decision = scale_decision(
        &rev.scaling,
        &mut rev.pa,
        &rev.decider,
        &observation,
        now,
        shared.options.progress_deadline,
    );
    match (decision.mode, rev.proxy_since) {
        (Mode::Proxy, None) => rev.proxy_since = Some(now),
        (Mode::Serve, Some(_)) => rev.proxy_since = None,
        _ => {}
    }
    let desired = decision.apply.unwrap_or(applied);
    let ebc = rev.decider.excess_burst_capacity;
    shared.metrics.record(
        key,
        &RevisionFigures {
            desired,
            actual: ready,
            concurrency: rev.collector.stable_and_panic_concurrency(now),
            rps: rev.collector.stable_and_panic_rps(now),
            target: rev.scaling.target,
            target_is_rps: rev.scaling.metric == ScalingMetric::Rps,
            panicking,
            excess_burst_capacity: ebc,
        },
    );
    publish(shared, key, rev, |d| {
        d.desired_scale = desired;
        d.want = decision.want;
        d.mode = decision.mode;
        d.activity = decision.activity;
        d.excess_burst_capacity = ebc;
        d.ready = ready;
        d.panicking = panicking;
    });
    (desired != applied).then_some(desired)
}

fn publish(
    shared: &Shared,
    key: &RevisionKey,
    rev: &Revision,
    change: impl FnOnce(&mut RevisionDecision),
) {
    let mut next = rev.decision.borrow().clone();
    change(&mut next);
    let changed = rev.decision.send_if_modified(|d| {
        if *d == next {
            false
        } else {
            *d = next.clone();
            true
        }
    });
    if changed {
        shared.all.send_modify(|all| {
            all.insert(key.clone(), next);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use futures::future::BoxFuture;

    use super::*;
    use crate::config::{AutoscalerConfig, Reachability};
    use crate::scaler::ScaleError;
    use crate::test_support::MetricsServer;

    /// Records every call, and plays the runtime: the instances it is asked for become ready at once.
    #[derive(Default)]
    struct RecordingScaler {
        /// (revision, desired, the mode published when the call was made)
        calls: Mutex<Vec<(RevisionKey, u32, Option<Mode>)>>,
        service: OnceLock<AutoscalerService>,
    }

    impl Scaler for RecordingScaler {
        fn scale(
            &self,
            revision: &RevisionKey,
            desired: u32,
        ) -> BoxFuture<'_, Result<(), ScaleError>> {
            let mode = self
                .service
                .get()
                .and_then(|s| s.subscribe(revision))
                .map(|d| d.borrow().mode);
            self.calls
                .lock()
                .unwrap()
                .push((revision.clone(), desired, mode));
            if let Some(service) = self.service.get() {
                let names: Vec<String> = (0..desired).map(|i| format!("hello-00001-{i}")).collect();
                service.set_instances(revision, &names);
                service.set_ready_instances(revision, desired);
            }
            Box::pin(async { Ok(()) })
        }
    }

    impl RecordingScaler {
        fn calls(&self) -> Vec<u32> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|(_, n, _)| *n)
                .collect()
        }
    }

    fn page(concurrency_milli: &[u64]) -> String {
        let mut text = String::from("# TYPE envoy_server_uptime gauge\nenvoy_server_uptime{} 1\n");
        for (i, c) in concurrency_milli.iter().enumerate() {
            text.push_str(&format!(
                "sluice_qp__default__hello_00001__hello_00001_{i}__average_concurrency_milli{{}} {c}\n\
                 sluice_qp__default__hello_00001__hello_00001_{i}__request_count{{}} 1\n"
            ));
        }
        text
    }

    /// Short windows so a test takes seconds: stable 2 s, panic 1 s, grace 1 s, target 1 request.
    fn scaling() -> RevisionScaling {
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "autoscaling.knative.dev/target".to_string(),
            "1".to_string(),
        );
        annotations.insert(
            "autoscaling.knative.dev/target-utilization-percentage".to_string(),
            "100".to_string(),
        );
        let mut s = RevisionScaling::new(&AutoscalerConfig::default(), &annotations, 0).unwrap();
        s.stable_window = Duration::from_secs(2);
        s.panic_window = Duration::from_secs(1);
        s.scale_to_zero_grace_period = Duration::from_secs(1);
        s.target_burst_capacity = 0.0;
        s.reachability = Reachability::Reachable;
        s
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    struct Stop(AutoscalerService);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(task) = self.0.shared.task.lock().unwrap().take() {
                task.abort();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scales_up_goes_to_zero_after_grace_and_back_on_poke() {
        let server = MetricsServer::start(page(&[])).await;
        let scaler = Arc::new(RecordingScaler::default());
        let mut options = ServiceOptions::new(server.url());
        options.scrape_interval = Duration::from_millis(100);
        options.decide_interval = Duration::from_millis(200);
        let service = AutoscalerService::start(options, scaler.clone());
        let _stop = Stop(service.clone());
        scaler.service.set(service.clone()).ok().unwrap();
        let key = RevisionKey::new("default", "hello-00001");
        let mut decisions = service.upsert_revision(key.clone(), scaling());

        // The initial scale first, as a new Deployment.
        wait_for("initial scale", || scaler.calls().first() == Some(&1)).await;

        // Five requests in flight on the one instance: five instances wanted.
        server.set(page(&[5000]));
        wait_for("scale up to 5", || scaler.calls().contains(&5)).await;
        wait_for("serve mode at 5", || {
            let d = decisions.borrow_and_update().clone();
            d.desired_scale == 5 && d.mode == Mode::Serve && d.activity == Activity::Active
        })
        .await;

        // Traffic stops: down (at most halving per decision), then idle for a stable window, then
        // inactive in proxy mode, then to zero once the activator was in the path for the grace period.
        server.set(page(&[0, 0, 0, 0, 0]));
        wait_for("scale to zero", || scaler.calls().last() == Some(&0)).await;
        let d = decisions.borrow().clone();
        assert_eq!(
            (d.desired_scale, d.mode, d.activity),
            (0, Mode::Proxy, Activity::Inactive)
        );
        let calls = scaler.calls();
        eprintln!("scaler calls: {calls:?}");
        let at_zero = calls.len();
        assert!(
            calls.windows(2).skip(1).all(|w| w[1] <= w[0]),
            "only down after the peak: {calls:?}"
        );

        // Instances are gone from the page; the activator gets a request and pokes.
        server.set(page(&[]));
        service.poke(&key);
        wait_for("scale from zero", || scaler.calls().len() > at_zero).await;
        assert_eq!(scaler.calls()[at_zero], 1);
        wait_for("serving again", || {
            let d = decisions.borrow_and_update().clone();
            d.desired_scale == 1 && d.activity == Activity::Active
        })
        .await;

        service.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_follow_the_decisions_and_go_with_the_revision() {
        use crate::metrics::RevisionLabels;
        let server = MetricsServer::start(page(&[])).await;
        let scaler = Arc::new(RecordingScaler::default());
        let mut options = ServiceOptions::new(server.url());
        options.scrape_interval = Duration::from_millis(100);
        options.decide_interval = Duration::from_millis(200);
        let service = AutoscalerService::start(options, scaler.clone());
        let _stop = Stop(service.clone());
        scaler.service.set(service.clone()).ok().unwrap();
        let key = RevisionKey::new("default", "hello-00001");
        let _decisions = service.upsert_revision(key.clone(), scaling());
        let metrics = service.metrics().clone();
        let labels = RevisionLabels::new(&key);
        let desired = || metrics.desired_pods.get_or_create(&labels).get();
        wait_for("initial scale", || desired() == 1).await;

        // Five requests in flight on the one instance: five wanted, panicking (5 / 1 >= 2).
        server.set(page(&[5000]));
        wait_for("desired_pods 5", || desired() == 5).await;
        wait_for("actual_pods 5", || {
            metrics.actual_pods.get_or_create(&labels).get() == 5
        })
        .await;
        assert_eq!(metrics.panic_mode.get_or_create(&labels).get(), 1);
        assert!(
            metrics
                .panic_request_concurrency
                .get_or_create(&labels)
                .get()
                > 0.0
        );
        assert_eq!(
            metrics
                .target_concurrency_per_pod
                .get_or_create(&labels)
                .get(),
            1.0
        );
        assert!(!metrics.target_requests_per_second.contains(&labels));
        assert_eq!(
            metrics.excess_burst_capacity.get_or_create(&labels).get(),
            0,
            "tbc 0"
        );

        service.remove_revision(&key);
        assert!(!metrics.desired_pods.contains(&labels));
        assert!(!metrics.stable_request_concurrency.contains(&labels));
        service.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scale_to_zero_waits_for_a_confirmed_proxy_mode() {
        let server = MetricsServer::start(page(&[0])).await;
        let scaler = Arc::new(RecordingScaler::default());
        let mut options = ServiceOptions::new(server.url());
        options.scrape_interval = Duration::from_millis(100);
        options.decide_interval = Duration::from_millis(200);
        let service = AutoscalerService::start(options, scaler.clone());
        let _stop = Stop(service.clone());
        scaler.service.set(service.clone()).ok().unwrap();
        let key = RevisionKey::new("default", "hello-00001");
        let mut decisions = service.upsert_revision(key.clone(), scaling());
        // The wiring reports Envoy still serves from the instances.
        service.confirm_mode(&key, Mode::Serve);
        wait_for("inactive in proxy mode", || {
            let d = decisions.borrow_and_update().clone();
            d.activity == Activity::Inactive && d.mode == Mode::Proxy
        })
        .await;
        // Past the grace period, still not confirmed: the instance stays.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!scaler.calls().contains(&0), "{:?}", scaler.calls());
        service.confirm_mode(&key, Mode::Proxy);
        wait_for("scale to zero once confirmed", || {
            scaler.calls().last() == Some(&0)
        })
        .await;
        service.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_registered_instances_count() {
        // Instance 1 is gone (its gauges linger in Envoy): only instance 0 counts.
        let server = MetricsServer::start(page(&[1000, 9000])).await;
        let scaler = Arc::new(RecordingScaler::default());
        let mut options = ServiceOptions::new(server.url());
        options.scrape_interval = Duration::from_millis(100);
        options.decide_interval = Duration::from_millis(200);
        let service = AutoscalerService::start(options, scaler.clone());
        let _stop = Stop(service.clone());
        let key = RevisionKey::new("default", "hello-00001");
        let mut s = scaling();
        s.max_scale = 20;
        let decisions = service.upsert_revision(key.clone(), s);
        service.set_instances(&key, ["hello-00001-0"]);
        service.set_ready_instances(&key, 1);
        assert_eq!(decisions.borrow().ready, 1);
        wait_for("a decision on metrics", || decisions.borrow().want >= 0).await;
        // Give the windows a few more decisions; the wanted scale must stay 1 (not 10).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(decisions.borrow().want, 1, "{:?}", scaler.calls());
        assert!(service.decisions().borrow().contains_key(&key));
        service.remove_revision(&key);
        assert!(service.subscribe(&key).is_none());
        assert!(!service.decisions().borrow().contains_key(&key));
        service.shutdown().await;
    }

    #[test]
    fn serve_mode_without_ready_instances_still_routes_to_the_activator() {
        let d = RevisionDecision {
            desired_scale: 1,
            want: 1,
            mode: Mode::Serve,
            activity: Activity::Activating,
            excess_burst_capacity: 0,
            ready: 0,
            panicking: false,
        };
        assert!(d.routes_to_activator());
        assert!(
            !RevisionDecision {
                ready: 1,
                ..d.clone()
            }
            .routes_to_activator()
        );
        assert!(
            RevisionDecision {
                ready: 3,
                mode: Mode::Proxy,
                ..d
            }
            .routes_to_activator()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_scraper_fetches_over_http() {
        let server = MetricsServer::start(crate::scrape::tests::fixture(2500, 1000)).await;
        let scraper = EnvoyScraper::new(server.url(), Duration::from_secs(5));
        let stats = scraper.scrape().await.unwrap();
        assert_eq!(stats.len(), 3);
        assert_eq!(stats[0].stat.average_concurrent_requests, 2.5);
        server.set(crate::scrape::tests::fixture(7000, 0));
        let stats = scraper.scrape().await.unwrap();
        assert_eq!(stats[0].stat.average_concurrent_requests, 7.0);
        // A server that is gone is an error naming the URL.
        let url = server.url();
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = EnvoyScraper::new(url.clone(), Duration::from_secs(5))
            .scrape()
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&url.to_string()), "{err}");
    }
}
