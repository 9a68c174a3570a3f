//! The broker service: the ingress server, one log per Broker, one dispatcher per Trigger, one
//! schedule per PingSource, all changed live by [`BrokerService::apply`], and their Knative statuses.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use cloudevents::AttributesReader;
use sluice_api::eventing::{
    Addressable, Broker, BrokerStatus, PingSource, PingSourceStatus, Trigger, TriggerStatus,
};
use sluice_api::meta::Status;
use sluice_api::{Condition, ConditionStatus};
use sluice_event_filter::Filter;
use sluice_event_log::{EventLog, LogOptions, SegmentLog};
use tokio::sync::Mutex as AsyncMutex;
use tokio::task::JoinHandle;

use crate::backend::{self, Backend, RabbitTarget};
use crate::codec;
use crate::config::{self, BrokerKey, Delivery, EventingObjects, PingConfig, Resolver, Target};
use crate::defaults::BrokerDefaults;
use crate::delivery::RetryPolicy;
use crate::delivery::sender::{Endpoint, Outcome, Sender};
use crate::dispatch::{DispatchConfig, Dispatcher, consumer_name};
use crate::gateway::{Gateway, GatewayPaths};
use crate::ingress::{self, Brokers, IngressOptions, Store};
use crate::ping;
use crate::rabbitmq::{Clusters, RabbitBroker, RabbitDispatcher};

/// How the service runs. [`BrokerOptions::new`] gives the defaults documented on each field.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Each Broker's log is kept in `<data_dir>/<namespace>/<name>/`.
    pub data_dir: PathBuf,
    /// The ingress address (port 0 picks a free one; see [`BrokerService::local_addr`]).
    pub listen: SocketAddr,
    /// The base of Broker addresses in status: `<ingress_url>/<namespace>/<name>`. Default
    /// `http://broker-ingress.knative-eventing.localhost:8080` (the gateway route to the ingress).
    pub ingress_url: String,
    /// Where the gateway listens, to reach Knative Services. Default 127.0.0.1:8080.
    pub gateway: SocketAddr,
    /// Knative Services are `<name>.<namespace>.<domain>`. Default `localhost`.
    pub domain: String,
    /// The port in Service URLs and Host headers. Default 8080.
    pub public_port: u16,
    /// Largest request body the ingress accepts (413 beyond). Default 4 MiB.
    pub max_body_bytes: usize,
    /// Deliveries in flight per unordered Trigger. Default 64.
    pub parallelism: usize,
    /// Connections to one subscriber host (address and Host) at most, shared by all Triggers that
    /// deliver there. Default 64.
    pub connections_per_host: usize,
    /// How long connecting to a subscriber may take when the delivery has no `timeout` (which
    /// bounds connect and exchange together). Default 30 s.
    pub connect_timeout: Duration,
    /// Which paths Sluice's gateway serves (`sluice up` feeds it): deliveries to Services wait for
    /// theirs, and the gateway's own failures are not delivery attempts. None (`sluice broker`):
    /// nothing to wait for.
    pub gateway_paths: Option<tokio::sync::watch::Receiver<GatewayPaths>>,
    /// TTL given to events without one. Default 255 (Knative).
    pub default_ttl: i64,
    /// Options of each Broker's log.
    pub log: LogOptions,
}

impl BrokerOptions {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        BrokerOptions {
            data_dir: data_dir.into(),
            listen,
            ingress_url: "http://broker-ingress.knative-eventing.localhost:8080".into(),
            gateway: SocketAddr::from(([127, 0, 0, 1], 8080)),
            domain: "localhost".into(),
            public_port: 8080,
            max_body_bytes: 4 * 1024 * 1024,
            parallelism: 64,
            connections_per_host: 64,
            connect_timeout: crate::delivery::sender::DEFAULT_CONNECT_TIMEOUT,
            gateway_paths: None,
            default_ttl: codec::DEFAULT_TTL,
            log: LogOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("broker ingress: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The objects with their Knative status, for `sluice status` (serializes as
/// `{"brokers": [...], "triggers": [...], "pingsources": [...]}`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EventingStatus {
    pub brokers: Vec<Broker>,
    pub triggers: Vec<Trigger>,
    pub pingsources: Vec<PingSource>,
}

struct RunningTrigger {
    /// What the dispatcher was started with, to restart it only when something changed.
    fingerprint: String,
    broker: BrokerKey,
    dispatcher: TriggerDispatcher,
}

impl RunningTrigger {
    fn rabbit(&self) -> Option<&RabbitDispatcher> {
        match &self.dispatcher {
            TriggerDispatcher::RabbitMq(d) => Some(d),
            TriggerDispatcher::Log(_) => None,
        }
    }
}

/// A Trigger's consumer: of its Broker's log, or of its queue in RabbitMQ.
enum TriggerDispatcher {
    Log(Dispatcher),
    RabbitMq(RabbitDispatcher),
}

impl TriggerDispatcher {
    async fn stop(self) {
        match self {
            TriggerDispatcher::Log(d) => d.stop().await,
            TriggerDispatcher::RabbitMq(d) => d.stop().await,
        }
    }
}

struct RunningPing {
    config: PingConfig,
    sink: Target,
    task: JoinHandle<()>,
}

struct State {
    brokers: HashMap<BrokerKey, config::BrokerConfig>,
    logs: HashMap<BrokerKey, Arc<SegmentLog>>,
    rabbit: HashMap<BrokerKey, Arc<RabbitBroker>>,
    triggers: HashMap<BrokerKey, RunningTrigger>,
    pings: HashMap<BrokerKey, RunningPing>,
}

/// The running broker.
pub struct BrokerService {
    options: BrokerOptions,
    local_addr: SocketAddr,
    brokers: Arc<Brokers>,
    sender: Sender,
    resolver: Resolver,
    ingress: Mutex<Option<JoinHandle<()>>>,
    state: AsyncMutex<State>,
    status: Mutex<EventingStatus>,
    clusters: Clusters,
    /// What changes between applies: RabbitMQ Brokers' connections and Triggers' consumers.
    live: Mutex<Live>,
}

/// Read by [`BrokerService::status`] to show RabbitMQ's state as it is now.
#[derive(Default)]
struct Live {
    brokers: HashMap<BrokerKey, Arc<RabbitBroker>>,
    triggers: HashMap<BrokerKey, Arc<Mutex<Option<String>>>>,
}

impl BrokerService {
    /// Binds the ingress and starts serving (no brokers until [`BrokerService::apply`]).
    pub async fn start(options: BrokerOptions) -> Result<Arc<BrokerService>, ServiceError> {
        let listener =
            ingress::bind(options.listen)
                .await
                .map_err(|source| ServiceError::Bind {
                    addr: options.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServiceError::Bind {
            addr: options.listen,
            source,
        })?;
        let brokers = Arc::new(Brokers::new(options.default_ttl));
        let ingress = tokio::spawn(ingress::serve(
            listener,
            brokers.clone(),
            IngressOptions {
                max_body_bytes: options.max_body_bytes,
            },
        ));
        tracing::info!(%local_addr, "broker ingress listening");
        let sender = Sender::new(options.connections_per_host, options.connect_timeout);
        Ok(Arc::new(BrokerService {
            resolver: Resolver {
                gateway: options.gateway,
                domain: options.domain.clone(),
                public_port: options.public_port,
            },
            options,
            local_addr,
            brokers,
            sender,
            ingress: Mutex::new(Some(ingress)),
            state: AsyncMutex::new(State {
                brokers: HashMap::new(),
                logs: HashMap::new(),
                rabbit: HashMap::new(),
                triggers: HashMap::new(),
                pings: HashMap::new(),
            }),
            status: Mutex::new(EventingStatus::default()),
            clusters: Clusters::default(),
            live: Mutex::new(Live::default()),
        }))
    }

    /// Registers the broker's metrics in `registry` (see [`crate::metrics`]: the families choose
    /// their own prefixes, Knative's).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.brokers.metrics().register(registry);
    }

    /// The broker's metrics (for tests and other edges).
    pub fn metrics(&self) -> &crate::metrics::BrokerMetrics {
        self.brokers.metrics()
    }

    /// The ingress's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A Broker's address as shown in its status.
    pub fn broker_url(&self, key: &BrokerKey) -> String {
        broker_url(&self.options.ingress_url, key)
    }

    /// The statuses computed by the last [`BrokerService::apply`], with RabbitMQ's state as it is
    /// now: a Broker whose RabbitMQ is unreachable, or a Trigger whose queue cannot be consumed, is
    /// not Ready, with the reason.
    pub fn status(&self) -> EventingStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for b in &mut status.brokers {
            let key = BrokerKey::new(&b.metadata.namespace, &b.metadata.name);
            if let Some(problem) = live.brokers.get(&key).and_then(|r| r.unavailable())
                && let Some(s) = b.status.as_mut()
            {
                overlay(&mut s.status, "RabbitMQUnavailable", &problem);
            }
        }
        for t in &mut status.triggers {
            let key = BrokerKey::new(&t.metadata.namespace, &t.metadata.name);
            let problem = live
                .triggers
                .get(&key)
                .and_then(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone());
            if let Some(problem) = problem
                && let Some(s) = t.status.as_mut()
            {
                overlay(&mut s.status, "QueueUnavailable", &problem);
            }
        }
        status
    }

    /// Makes the running set match `objects`: opens logs of new Brokers, starts, restarts or stops
    /// Trigger dispatchers and PingSources, closes removed Brokers (their data stays on disk).
    /// Returns the objects with their statuses.
    pub async fn apply(&self, objects: EventingObjects) -> EventingStatus {
        let mut state = self.state.lock().await;
        let mut status = EventingStatus::default();
        let before = self.status();
        let defaults = match &objects.br_defaults {
            None => BrokerDefaults::shipped(),
            Some(cm) => BrokerDefaults::from_config_map(cm).unwrap_or_else(|e| {
                tracing::error!("{e}; using Knative's shipped defaults");
                BrokerDefaults::shipped()
            }),
        };

        // Brokers.
        let mut wanted_brokers = HashMap::new();
        // Each Broker that can run: whether it is in RabbitMQ (else its log).
        let mut stores: HashMap<BrokerKey, bool> = HashMap::new();
        let mut opened = Vec::new();
        for b in &objects.brokers {
            let mut out = b.clone();
            let key = BrokerKey::new(&b.metadata.namespace, &b.metadata.name);
            let opened_store = config::broker(b, &defaults)
                .map_err(|e| ("InvalidSpec", e.to_string()))
                .and_then(|c| {
                    backend::backend(b, &objects)
                        .map_err(|e| (e.reason, e.message))
                        .map(|backend| (c, backend))
                })
                .and_then(|(c, backend)| {
                    self.open_store(&mut state, &key, &backend, &mut opened)
                        .map_err(|message| ("LogFailed", message))
                        .map(|()| {
                            stores.insert(key.clone(), matches!(backend, Backend::RabbitMq(_)));
                            c
                        })
                });
            let conditions = match opened_store {
                Err((reason, message)) => vec![cond("Ready", false, reason, &message)],
                Ok(c) => {
                    let mut conds = vec![
                        cond("Addressable", true, "", ""),
                        cond("IngressReady", true, "", ""),
                        cond("FilterReady", true, "", ""),
                    ];
                    let dls = c
                        .delivery
                        .as_ref()
                        .and_then(|d| d.dead_letter_sink.as_ref());
                    let mut dls_uri = None;
                    if let Some(dls) = dls {
                        match self.resolver.resolve(&key.namespace, dls) {
                            Ok(t) => {
                                dls_uri = Some(t.display(&|k| self.broker_url(k)));
                                conds.push(cond("DeadLetterSinkResolved", true, "", ""));
                            }
                            Err(u) => conds.push(cond(
                                "DeadLetterSinkResolved",
                                false,
                                u.reason,
                                &u.message,
                            )),
                        }
                    }
                    conds.push(ready_of(&conds));
                    out.status = Some(BrokerStatus {
                        status: Status::default(),
                        address: Some(Addressable {
                            name: Some("http".into()),
                            url: Some(self.broker_url(&key)),
                        }),
                        dead_letter_sink_uri: dls_uri,
                    });
                    wanted_brokers.insert(key.clone(), c);
                    conds
                }
            };
            let before = previous(&before.brokers, |o| &o.metadata, &b.metadata)
                .and_then(|o| o.status.as_ref())
                .map(|s| &s.status);
            set_conditions(
                &mut out.status.get_or_insert_with(Default::default).status,
                before,
                b.metadata.generation,
                conditions,
            );
            status.brokers.push(out);
        }
        // Removed brokers (or moved to another store): their triggers stop below; close the logs
        // after. A RabbitMQ Broker's exchange and queues stay in RabbitMQ.
        let removed: Vec<BrokerKey> = state
            .logs
            .keys()
            .filter(|k| stores.get(*k) != Some(&false))
            .cloned()
            .collect();
        let removed_rabbit: Vec<BrokerKey> = state
            .rabbit
            .keys()
            .filter(|k| stores.get(*k) != Some(&true))
            .cloned()
            .collect();
        for key in removed.iter().chain(&removed_rabbit) {
            self.brokers.remove(key);
        }
        for key in &removed_rabbit {
            state.rabbit.remove(key);
        }
        state.brokers = wanted_brokers;

        // Triggers.
        let mut wanted_triggers = BTreeMap::new();
        for t in &objects.triggers {
            let mut out = t.clone();
            let mut trigger_status = TriggerStatus::default();
            let conditions =
                self.plan_trigger(&state, t, &mut trigger_status, &mut wanted_triggers);
            trigger_status.status = Status::default();
            let before = previous(&before.triggers, |o| &o.metadata, &t.metadata)
                .and_then(|o| o.status.as_ref())
                .map(|s| &s.status);
            set_conditions(
                &mut trigger_status.status,
                before,
                t.metadata.generation,
                conditions,
            );
            out.status = Some(trigger_status);
            status.triggers.push(out);
        }
        // Only a Trigger that is gone loses its consumer offset; one that is merely not ready (its
        // Broker or subscriber missing for a while) resumes where it was.
        let present: std::collections::HashSet<BrokerKey> = objects
            .triggers
            .iter()
            .map(|t| BrokerKey::new(&t.metadata.namespace, &t.metadata.name))
            .collect();
        let running: Vec<BrokerKey> = state.triggers.keys().cloned().collect();
        for key in running {
            let keep =
                wanted_triggers
                    .get(&key)
                    .is_some_and(|(fp, _): &(String, Arc<DispatchConfig>)| {
                        *fp == state.triggers[&key].fingerprint
                    });
            if !keep && let Some(old) = state.triggers.remove(&key) {
                let moved = wanted_triggers
                    .get(&key)
                    .is_some_and(|(_, d)| d.broker != old.broker);
                let gone = !present.contains(&key) || moved;
                let queue = old.rabbit().map(|d| (d.broker.clone(), d.queue.clone()));
                old.dispatcher.stop().await;
                if let Some((broker, queue)) = queue
                    && gone
                {
                    // Knative's RabbitMQ broker deletes a deleted Trigger's queue (after its
                    // consumer stopped, which would declare it again).
                    broker.delete_queue(&queue).await;
                }
                if gone && let Some(log) = state.logs.get(&old.broker) {
                    // Knative: a deleted Trigger's subscription goes; a new one starts afresh.
                    let _ = log.remove_consumer(&consumer_name(&key)).await;
                }
            }
        }
        for (key, (fingerprint, dispatch)) in wanted_triggers {
            if state.triggers.contains_key(&key) {
                continue;
            }
            let broker = dispatch.broker.clone();
            let dispatcher = if let Some(rabbit) = state.rabbit.get(&broker).cloned() {
                TriggerDispatcher::RabbitMq(
                    RabbitDispatcher::start(
                        dispatch,
                        rabbit,
                        self.brokers.clone(),
                        self.sender.clone(),
                    )
                    .await,
                )
            } else if let Some(log) = state.logs.get(&broker).cloned() {
                TriggerDispatcher::Log(
                    Dispatcher::start(
                        dispatch,
                        log as Arc<dyn EventLog>,
                        self.brokers.clone(),
                        self.sender.clone(),
                    )
                    .await,
                )
            } else {
                continue;
            };
            state.triggers.insert(
                key,
                RunningTrigger {
                    fingerprint,
                    broker,
                    dispatcher,
                },
            );
        }
        // New Brokers become reachable now that their Triggers consume from the head.
        for key in opened {
            tracing::info!(broker = %key, "broker ready");
            self.insert_store(&state, &key);
        }
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.brokers = state.rabbit.clone();
            live.triggers = state
                .triggers
                .iter()
                .filter_map(|(k, t)| t.rabbit().map(|d| (k.clone(), d.problem.clone())))
                .collect();
        }
        for key in removed {
            self.brokers.metrics().untrack_log(&key);
            if let Some(log) = state.logs.remove(&key)
                && let Err(e) = log.close().await
            {
                tracing::warn!(broker = %key, error = %e, "closing the log failed");
            }
        }

        // PingSources.
        let mut wanted_pings = HashMap::new();
        for p in &objects.pingsources {
            let mut out = p.clone();
            let mut ping_status = PingSourceStatus::default();
            let conditions = match config::pingsource(p) {
                Err(e) => vec![cond("Ready", false, "InvalidSpec", &e.to_string())],
                Ok(c) => match self.resolver.resolve(&c.key.namespace, &c.sink) {
                    Err(u) => vec![
                        cond("SinkProvided", false, u.reason, &u.message),
                        cond("Ready", false, u.reason, &u.message),
                    ],
                    Ok(sink) => {
                        ping_status.sink_uri = Some(sink.display(&|k| self.broker_url(k)));
                        wanted_pings.insert(c.key.clone(), (c, sink));
                        vec![
                            cond("SinkProvided", true, "", ""),
                            cond("Deployed", true, "", ""),
                            cond("Ready", true, "", ""),
                        ]
                    }
                },
            };
            let before = previous(&before.pingsources, |o| &o.metadata, &p.metadata)
                .and_then(|o| o.status.as_ref())
                .map(|s| &s.status);
            set_conditions(
                &mut ping_status.status,
                before,
                p.metadata.generation,
                conditions,
            );
            out.status = Some(ping_status);
            status.pingsources.push(out);
        }
        let running: Vec<BrokerKey> = state.pings.keys().cloned().collect();
        for key in running {
            let keep = wanted_pings.get(&key).is_some_and(|(c, s)| {
                state.pings[&key].config == *c && state.pings[&key].sink == *s
            });
            if !keep && let Some(old) = state.pings.remove(&key) {
                old.task.abort();
            }
        }
        for (key, (config, sink)) in wanted_pings {
            if state.pings.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(run_ping(
                config.clone(),
                sink.clone(),
                self.brokers.clone(),
                self.sender.clone(),
            ));
            state.pings.insert(key, RunningPing { config, sink, task });
        }

        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        // With what is known now (a Trigger's queue RabbitMQ refused).
        self.status()
    }

    /// Opens the log of a Broker. A Broker seen for the first time is not made reachable here but
    /// by [`Self::apply`] once its Triggers' consumers are registered: an event accepted in between
    /// would be behind the head they start at, and so never delivered to them.
    fn open_log(
        &self,
        state: &mut State,
        key: &BrokerKey,
        opened: &mut Vec<BrokerKey>,
    ) -> Result<(), String> {
        if state.logs.contains_key(key) {
            if !opened.contains(key) {
                self.insert_store(state, key);
            }
            return Ok(());
        }
        let dir = self.options.data_dir.join(&key.namespace).join(&key.name);
        let log = SegmentLog::open(&dir, self.options.log.clone())
            .map_err(|e| format!("opening the event log in {}: {e}", dir.display()))?;
        let log = Arc::new(log);
        self.brokers.metrics().track_log(key, log.clone());
        state.logs.insert(key.clone(), log);
        opened.push(key.clone());
        tracing::info!(broker = %key, dir = %dir.display(), "broker log open");
        Ok(())
    }

    /// Opens where a Broker keeps its events: its log, or its exchange in RabbitMQ (connecting in
    /// the background: until RabbitMQ answers, the Broker shows why and the ingress answers 503).
    fn open_store(
        &self,
        state: &mut State,
        key: &BrokerKey,
        backend: &Backend,
        opened: &mut Vec<BrokerKey>,
    ) -> Result<(), String> {
        let target: &RabbitTarget = match backend {
            Backend::Log => return self.open_log(state, key, opened),
            Backend::RabbitMq(target) => target,
        };
        if let Some(existing) = state.rabbit.get(key)
            && existing.target() == target
        {
            if !opened.contains(key) {
                self.insert_store(state, key);
            }
            return Ok(());
        }
        tracing::info!(broker = %key, rabbitmq = %target.display, "broker in RabbitMQ");
        let broker = RabbitBroker::start(key.clone(), target, &self.clusters);
        state.rabbit.insert(key.clone(), broker);
        opened.push(key.clone());
        Ok(())
    }

    /// Makes a Broker reachable through the ingress.
    fn insert_store(&self, state: &State, key: &BrokerKey) {
        if let Some(rabbit) = state.rabbit.get(key) {
            self.brokers
                .insert(key.clone(), Store::RabbitMq(rabbit.clone()));
        } else if let Some(log) = state.logs.get(key) {
            self.brokers
                .insert(key.clone(), log.clone() as Arc<dyn EventLog>);
        }
    }

    /// Validates and resolves one Trigger, adding it to `wanted` when it can run; returns its
    /// conditions.
    fn plan_trigger(
        &self,
        state: &State,
        t: &Trigger,
        status: &mut TriggerStatus,
        wanted: &mut BTreeMap<BrokerKey, (String, Arc<DispatchConfig>)>,
    ) -> Vec<Condition> {
        let c = match config::trigger(t) {
            Ok(c) => c,
            Err(e) => return vec![cond("Ready", false, "InvalidSpec", &e.to_string())],
        };
        let filter = match Filter::compile(t.spec.filter.as_ref(), &c.filters) {
            Ok(f) => f,
            Err(e) => return vec![cond("Ready", false, "InvalidFilter", &e.to_string())],
        };
        let mut conds = Vec::new();
        let broker = state.brokers.get(&c.broker);
        match broker {
            Some(_) => conds.push(cond("BrokerReady", true, "", "")),
            None => conds.push(cond(
                "BrokerReady",
                false,
                "BrokerDoesNotExist",
                &format!("Broker {} does not exist or is not ready", c.broker),
            )),
        }
        let subscriber = match self.resolver.resolve(&c.key.namespace, &c.subscriber) {
            Ok(s) => {
                status.subscriber_uri = Some(s.display(&|k| self.broker_url(k)));
                conds.push(cond("SubscriberResolved", true, "", ""));
                Some(s)
            }
            Err(u) => {
                conds.push(cond("SubscriberResolved", false, u.reason, &u.message));
                None
            }
        };
        // Knative: a Trigger without delivery uses its Broker's, which has config-br-defaults' when
        // it has none of its own (see config::broker).
        let delivery: Delivery = c
            .delivery
            .clone()
            .or_else(|| broker.and_then(|b| b.delivery.clone()))
            .unwrap_or_default();
        let mut dead_letter = None;
        if let Some(dls) = &delivery.dead_letter_sink {
            match self.resolver.resolve(&c.key.namespace, dls) {
                Ok(t) => {
                    status.dead_letter_sink_uri = Some(t.display(&|k| self.broker_url(k)));
                    conds.push(cond("DeadLetterSinkResolved", true, "", ""));
                    dead_letter = Some(t);
                }
                Err(u) => {
                    conds.push(cond("DeadLetterSinkResolved", false, u.reason, &u.message));
                }
            }
        }
        let ready = conds.iter().all(|c| c.status == ConditionStatus::True);
        if ready {
            conds.push(cond("SubscriptionReady", true, "", ""));
            conds.push(cond("DependencyReady", true, "", ""));
        }
        conds.push(ready_of(&conds));
        if let (true, Some(subscriber)) = (ready, subscriber) {
            // Where the Broker keeps its events: a Trigger restarts when that changes.
            let store = match state.rabbit.get(&c.broker) {
                Some(r) => format!("rabbitmq {:?} {:?}", r.target(), r.queue_type()),
                None => "log".to_string(),
            };
            let fingerprint = format!(
                "{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{}|{store}",
                t.spec.filter,
                c.filters,
                subscriber,
                dead_letter,
                retry_key(&delivery.retry),
                c.ordered,
                c.parallelism,
                c.broker
            );
            let ingress_url = self.options.ingress_url.clone();
            wanted.insert(
                c.key.clone(),
                (
                    fingerprint,
                    Arc::new(DispatchConfig {
                        trigger: c.key.clone(),
                        broker: c.broker.clone(),
                        filter,
                        subscriber,
                        // Knative's filter_type label: the `type` attribute filter, or "any".
                        metrics: self.brokers.metrics().trigger(
                            &c.broker,
                            &c.key,
                            t.spec
                                .filter
                                .as_ref()
                                .and_then(|f| f.attributes.get("type"))
                                .filter(|t| !t.is_empty())
                                .map_or("any", String::as_str),
                        ),
                        dead_letter,
                        retry: delivery.retry.clone(),
                        ordered: c.ordered,
                        parallelism: c.parallelism.unwrap_or(self.options.parallelism),
                        broker_url: Arc::new(move |k| broker_url(&ingress_url, k)),
                        gateway: self.options.gateway_paths.clone().map(|paths| Gateway {
                            address: self.options.gateway,
                            paths,
                        }),
                    }),
                ),
            );
        }
        conds
    }

    /// Stops PingSources and dispatchers (committing what they delivered), the ingress, and closes
    /// the logs.
    pub async fn shutdown(&self) {
        if let Some(ingress) = self
            .ingress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            ingress.abort();
        }
        let mut state = self.state.lock().await;
        for (_, ping) in state.pings.drain() {
            ping.task.abort();
        }
        let triggers: Vec<RunningTrigger> = state.triggers.drain().map(|(_, t)| t).collect();
        for t in triggers {
            t.dispatcher.stop().await;
        }
        for key in state.rabbit.keys() {
            self.brokers.remove(key);
        }
        state.rabbit.clear();
        for (key, log) in state.logs.drain() {
            self.brokers.remove(&key);
            self.brokers.metrics().untrack_log(&key);
            if let Err(e) = log.close().await {
                tracing::warn!(broker = %key, error = %e, "closing the log failed");
            }
        }
    }
}

fn retry_key(r: &RetryPolicy) -> String {
    format!("{r:?}")
}

fn broker_url(base: &str, key: &BrokerKey) -> String {
    format!(
        "{}/{}/{}",
        base.trim_end_matches('/'),
        key.namespace,
        key.name
    )
}

fn cond(type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.to_string(),
        message: message.to_string(),
        ..Default::default()
    }
}

/// Knative's ConditionSet: Ready is True when every dependent is, else it carries the reason and
/// message of the first dependent that is not (`BrokerDoesNotExist`, not a generic word), as `kn`
/// and `kubectl wait` show it.
fn ready_of(dependents: &[Condition]) -> Condition {
    match dependents
        .iter()
        .find(|c| c.type_ != "Ready" && c.status != ConditionStatus::True)
    {
        None => cond("Ready", true, "", ""),
        Some(c) => Condition {
            type_: "Ready".to_string(),
            status: c.status,
            reason: c.reason.clone(),
            message: c.message.clone(),
            ..Default::default()
        },
    }
}

/// Marks an object not Ready because of what is happening now (RabbitMQ down), keeping the rest.
fn overlay(status: &mut Status, reason: &str, message: &str) {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    status.set_condition(Condition {
        type_: "Ready".to_string(),
        status: ConditionStatus::False,
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Some(now),
        ..Default::default()
    });
}

fn set_conditions(
    status: &mut Status,
    previous: Option<&Status>,
    generation: i64,
    conditions: Vec<Condition>,
) {
    status.observed_generation = generation;
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for mut c in conditions {
        // Knative: lastTransitionTime changes only when the condition's status does.
        c.last_transition_time = previous
            .and_then(|p| p.condition(&c.type_))
            .filter(|p| p.status == c.status)
            .and_then(|p| p.last_transition_time.clone())
            .or_else(|| Some(now.clone()));
        status.set_condition(c);
    }
}

fn previous<'a, T>(
    list: &'a [T],
    meta: impl Fn(&T) -> &sluice_api::ObjectMeta,
    key: &sluice_api::ObjectMeta,
) -> Option<&'a T> {
    list.iter()
        .find(|o| meta(o).namespace == key.namespace && meta(o).name == key.name)
}

/// Fires a PingSource on its schedule until aborted.
async fn run_ping(config: PingConfig, sink: Target, brokers: Arc<Brokers>, sender: Sender) {
    // Knative's ping adapter retries a send 5 times with exponential backoff from 50 ms.
    let retry = RetryPolicy {
        retry: 5,
        backoff: Some((
            crate::delivery::BackoffPolicy::Exponential,
            Duration::from_millis(50),
        )),
        timeout: Some(Duration::from_secs(10)),
        retry_after_max: None,
    };
    loop {
        let now = Utc::now();
        let Some(next) = config.schedule.next_after(now) else {
            tracing::warn!(pingsource = %config.key, "schedule has no future firing");
            return;
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let event = ping::make_event(&config, uuid::Uuid::new_v4().to_string(), next);
        let id = event.id().to_string();
        let result = match &sink {
            Target::Broker(key) => brokers
                .ingest(key, vec![event])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Target::Http { uri, host, .. } => {
                let (headers, body) = codec::to_binary(&event);
                match sender
                    .send(
                        &Endpoint::new(uri, host.as_deref()),
                        headers,
                        body,
                        &retry,
                        None,
                    )
                    .await
                {
                    Outcome::Delivered { .. } => Ok(()),
                    Outcome::Failed { status, .. } => Err(format!("sink answered {status:?}")),
                }
            }
        };
        match result {
            Ok(()) => tracing::debug!(pingsource = %config.key, %id, "ping sent"),
            Err(e) => tracing::warn!(pingsource = %config.key, %id, error = %e, "ping lost"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_carries_the_first_failing_dependents_reason_and_message() {
        let conds = [
            cond("BrokerReady", true, "", ""),
            cond("SubscriberResolved", false, "Unresolved", "no such Service"),
            cond("DeadLetterSinkResolved", false, "Other", "later"),
        ];
        let ready = ready_of(&conds);
        assert_eq!(
            (ready.status, ready.reason.as_str(), ready.message.as_str()),
            (ConditionStatus::False, "Unresolved", "no such Service")
        );
        let ready = ready_of(&conds[..1]);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::True, "")
        );
    }
}
