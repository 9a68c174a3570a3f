//! The broker's Prometheus metrics (issue 17), under Knative Eventing's names where it has them.
//!
//! Knative's multi-tenant broker reports, from its ingress, `event_count` and
//! `event_dispatch_latencies` (milliseconds: the time to hand the event on) per broker, event type and
//! response code, and from its filter (the Trigger side) the same two names per Trigger, filter type
//! and response code. Its Prometheus exporter prefixes them with the component,
//! `mt_broker_ingress_` and `mt_broker_filter_`; so does [`BrokerMetrics::register`]. Sluice adds,
//! under `broker_`: delivery attempts, retries, dead-lettered and dropped events per Trigger, and,
//! read at each scrape, the size of each Broker's log and each Trigger's consumer lag (records in
//! the log that it has not finished yet).
//!
//! The families are updated by the ingress and by [`crate::dispatch::deliver`] (both dispatchers,
//! the log's and RabbitMQ's); they live in [`crate::ingress::Brokers`], which every part shares.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_event_log::{EventLog, SegmentLog};

use crate::config::BrokerKey;

/// Knative's broker latency buckets (`Buckets125(1, 10000)`), in milliseconds.
const LATENCY_BUCKETS_MS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Knative's ingress labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngressLabels {
    pub namespace_name: String,
    pub broker_name: String,
    pub event_type: String,
    pub response_code: String,
    pub response_code_class: String,
}

/// Knative's filter (Trigger) labels. `filter_type` is the Trigger's `spec.filter` `type`
/// attribute, or `any`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabels {
    pub namespace_name: String,
    pub broker_name: String,
    pub trigger_name: String,
    pub filter_type: String,
    pub response_code: String,
    pub response_code_class: String,
}

/// One Trigger.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub namespace_name: String,
    pub broker_name: String,
    pub trigger_name: String,
}

impl TriggerLabels {
    pub fn new(broker: &BrokerKey, trigger: &BrokerKey) -> Self {
        TriggerLabels {
            namespace_name: trigger.namespace.clone(),
            broker_name: broker.name.clone(),
            trigger_name: trigger.name.clone(),
        }
    }
}

/// One Broker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    pub namespace_name: String,
    pub broker_name: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// A response code and its class, as Knative labels them (`0` when there was no response).
fn code_labels(code: Option<u16>) -> (String, String) {
    let code = code.unwrap_or(0);
    (code.to_string(), format!("{}xx", code / 100))
}

/// A Trigger's consumer of its Broker's log: what its lag is read from.
struct Consumer {
    broker: BrokerKey,
    log: Arc<dyn EventLog>,
    /// The next offset the dispatcher has to finish.
    delivered: Arc<AtomicU64>,
}

/// What the scrape-time gauges read: the Brokers' logs and the Triggers' consumers.
#[derive(Default)]
struct Sources {
    logs: BTreeMap<BrokerKey, Arc<SegmentLog>>,
    consumers: BTreeMap<BrokerKey, Consumer>,
}

/// The broker's metrics; cheap to clone (shared handles).
#[derive(Clone)]
pub struct BrokerMetrics {
    pub ingress_event_count: Family<IngressLabels, Counter>,
    pub ingress_event_dispatch_latencies: Latencies<IngressLabels>,
    pub filter_event_count: Family<FilterLabels, Counter>,
    pub filter_event_dispatch_latencies: Latencies<FilterLabels>,
    pub delivery_attempts: Family<TriggerLabels, Counter>,
    pub delivery_retries: Family<TriggerLabels, Counter>,
    pub dead_lettered: Family<TriggerLabels, Counter>,
    pub dropped: Family<TriggerLabels, Counter>,
    sources: Arc<Mutex<Sources>>,
}

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerMetrics").finish_non_exhaustive()
    }
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            ingress_event_count: Family::default(),
            ingress_event_dispatch_latencies: Family::new_with_constructor(latency_histogram),
            filter_event_count: Family::default(),
            filter_event_dispatch_latencies: Family::new_with_constructor(latency_histogram),
            delivery_attempts: Family::default(),
            delivery_retries: Family::default(),
            dead_lettered: Family::default(),
            dropped: Family::default(),
            sources: Arc::default(),
        }
    }
}

impl BrokerMetrics {
    /// Registers every family in `registry`, each under its component's prefix
    /// (`mt_broker_ingress_`, `mt_broker_filter_`, `broker_`).
    pub fn register(&self, registry: &mut Registry) {
        let ingress = registry.sub_registry_with_prefix("mt_broker_ingress");
        ingress.register(
            "event_count",
            "Number of events received by a Broker",
            self.ingress_event_count.clone(),
        );
        ingress.register(
            "event_dispatch_latencies",
            "The time spent storing an event durably in its Broker (ms)",
            self.ingress_event_dispatch_latencies.clone(),
        );
        let filter = registry.sub_registry_with_prefix("mt_broker_filter");
        filter.register(
            "event_count",
            "Number of events dispatched to a Trigger's subscriber",
            self.filter_event_count.clone(),
        );
        filter.register(
            "event_dispatch_latencies",
            "The time spent dispatching an event to a Trigger subscriber, retries included (ms)",
            self.filter_event_dispatch_latencies.clone(),
        );
        let broker = registry.sub_registry_with_prefix("broker");
        broker.register(
            "delivery_attempts",
            "Requests sent to Trigger subscribers (first attempts and retries)",
            self.delivery_attempts.clone(),
        );
        broker.register(
            "delivery_retries",
            "Requests sent to Trigger subscribers again after a failed attempt",
            self.delivery_retries.clone(),
        );
        broker.register(
            "dead_lettered",
            "Events a Trigger could not deliver that its deadLetterSink took",
            self.dead_lettered.clone(),
        );
        broker.register(
            "dropped",
            "Events a Trigger could not deliver and no deadLetterSink took (none, or it refused)",
            self.dropped.clone(),
        );
        broker.register_collector(Box::new(ScrapeGauges {
            sources: self.sources.clone(),
        }));
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ingress answered `code` for events of these types after `elapsed` storing them.
    pub(crate) fn ingested<'a>(
        &self,
        broker: &BrokerKey,
        event_types: impl IntoIterator<Item = &'a str>,
        code: u16,
        elapsed: Option<Duration>,
    ) {
        let (response_code, response_code_class) = code_labels(Some(code));
        for event_type in event_types {
            let labels = IngressLabels {
                namespace_name: broker.namespace.clone(),
                broker_name: broker.name.clone(),
                event_type: event_type.to_string(),
                response_code: response_code.clone(),
                response_code_class: response_code_class.clone(),
            };
            self.ingress_event_count.get_or_create(&labels).inc();
            if let Some(elapsed) = elapsed {
                self.ingress_event_dispatch_latencies
                    .get_or_create(&labels)
                    .observe(elapsed.as_secs_f64() * 1000.0);
            }
        }
    }

    /// One Trigger's series, resolved once for its dispatcher.
    pub fn trigger(
        &self,
        broker: &BrokerKey,
        trigger: &BrokerKey,
        filter_type: &str,
    ) -> TriggerMetrics {
        let labels = TriggerLabels::new(broker, trigger);
        TriggerMetrics {
            attempts: self.delivery_attempts.get_or_create_owned(&labels),
            retries: self.delivery_retries.get_or_create_owned(&labels),
            dead_lettered: self.dead_lettered.get_or_create_owned(&labels),
            dropped: self.dropped.get_or_create_owned(&labels),
            by_code: Mutex::default(),
            filter_type: filter_type.to_string(),
            labels,
            families: self.clone(),
        }
    }

    /// A Broker's segment log, whose size is shown while it is open.
    pub(crate) fn track_log(&self, broker: &BrokerKey, log: Arc<SegmentLog>) {
        self.sources().logs.insert(broker.clone(), log);
    }

    pub(crate) fn untrack_log(&self, broker: &BrokerKey) {
        self.sources().logs.remove(broker);
    }

    /// A Trigger's log consumer, whose lag is shown while it runs.
    pub(crate) fn track_consumer(
        &self,
        trigger: &BrokerKey,
        broker: &BrokerKey,
        log: Arc<dyn EventLog>,
        delivered: Arc<AtomicU64>,
    ) {
        self.sources().consumers.insert(
            trigger.clone(),
            Consumer {
                broker: broker.clone(),
                log,
                delivered,
            },
        );
    }

    /// The Trigger's consumer stopped: its lag goes, unless a newer consumer of the same Trigger
    /// already took its place.
    pub(crate) fn untrack_consumer(&self, trigger: &BrokerKey, delivered: &Arc<AtomicU64>) {
        let mut sources = self.sources();
        if sources
            .consumers
            .get(trigger)
            .is_some_and(|c| Arc::ptr_eq(&c.delivered, delivered))
        {
            sources.consumers.remove(trigger);
        }
    }
}

/// One Trigger's delivery series, resolved when its dispatcher is configured: a delivery then
/// touches atomics (and a short list of the codes seen), not the families' label maps, on the
/// broker's hot path.
pub struct TriggerMetrics {
    labels: TriggerLabels,
    filter_type: String,
    attempts: Counter,
    retries: Counter,
    dead_lettered: Counter,
    dropped: Counter,
    /// `mt_broker_filter_*` by response code (None: no response), as they were first needed.
    by_code: Mutex<Vec<(Option<u16>, Counter, Histogram)>>,
    families: BrokerMetrics,
}

impl std::fmt::Debug for TriggerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TriggerMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl TriggerMetrics {
    /// A delivery ended: with `code` (None: no response) after `attempts` requests.
    pub(crate) fn dispatched(&self, code: Option<u16>, attempts: u32, elapsed: Duration) {
        let (count, latency) = {
            let mut by_code = self.by_code.lock().unwrap_or_else(|e| e.into_inner());
            match by_code.iter().find(|(c, ..)| *c == code) {
                Some((_, count, latency)) => (count.clone(), latency.clone()),
                None => {
                    let (response_code, response_code_class) = code_labels(code);
                    let labels = FilterLabels {
                        namespace_name: self.labels.namespace_name.clone(),
                        broker_name: self.labels.broker_name.clone(),
                        trigger_name: self.labels.trigger_name.clone(),
                        filter_type: self.filter_type.clone(),
                        response_code,
                        response_code_class,
                    };
                    let count = self
                        .families
                        .filter_event_count
                        .get_or_create_owned(&labels);
                    let latency = self
                        .families
                        .filter_event_dispatch_latencies
                        .get_or_create_owned(&labels);
                    by_code.push((code, count.clone(), latency.clone()));
                    (count, latency)
                }
            }
        };
        count.inc();
        latency.observe(elapsed.as_secs_f64() * 1000.0);
        self.attempts.inc_by(u64::from(attempts));
        if attempts > 1 {
            self.retries.inc_by(u64::from(attempts - 1));
        }
    }

    /// A failed event: taken by the deadLetterSink, or dropped.
    pub(crate) fn failed(&self, dead_lettered: bool) {
        if dead_lettered {
            self.dead_lettered.inc();
        } else {
            self.dropped.inc();
        }
    }
}

/// Log sizes and consumer lags, read when scraped.
struct ScrapeGauges {
    sources: Arc<Mutex<Sources>>,
}

impl std::fmt::Debug for ScrapeGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeGauges").finish_non_exhaustive()
    }
}

impl Collector for ScrapeGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let bytes = Family::<BrokerLabels, Gauge>::default();
        let records = Family::<BrokerLabels, Gauge>::default();
        let lag = Family::<TriggerLabels, Gauge>::default();
        {
            let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            for (key, log) in &sources.logs {
                let labels = BrokerLabels {
                    namespace_name: key.namespace.clone(),
                    broker_name: key.name.clone(),
                };
                let size: u64 = log.segments().iter().map(|s| s.bytes).sum();
                bytes.get_or_create(&labels).set(size as i64);
                records
                    .get_or_create(&labels)
                    .set(log.head().saturating_sub(log.start()) as i64);
            }
            for (trigger, consumer) in &sources.consumers {
                let behind = consumer
                    .log
                    .head()
                    .saturating_sub(consumer.delivered.load(Ordering::Acquire));
                lag.get_or_create(&TriggerLabels::new(&consumer.broker, trigger))
                    .set(behind as i64);
            }
        }
        bytes.encode(encoder.encode_descriptor(
            "log_bytes",
            "Size on disk of a Broker's event log",
            None,
            bytes.metric_type(),
        )?)?;
        records.encode(encoder.encode_descriptor(
            "log_records",
            "Events kept in a Broker's event log (not yet deleted by retention)",
            None,
            records.metric_type(),
        )?)?;
        lag.encode(encoder.encode_descriptor(
            "trigger_consumer_lag",
            "Events in the Broker's log that a Trigger has not finished delivering",
            None,
            lag.metric_type(),
        )?)?;
        Ok(())
    }
}
