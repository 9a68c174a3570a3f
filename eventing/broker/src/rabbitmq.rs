//! Brokers whose events live in RabbitMQ (AMQP 0-9-1 through `lapin`).
//!
//! Topology, per Broker and Trigger (durable, so a RabbitMQ restart keeps them):
//! - one fanout exchange per Broker, `sluice.broker.<namespace>.<name>`;
//! - one queue per Trigger, `sluice.trigger.<namespace>.<name>`, of the config's `queueType`, bound to
//!   its Broker's exchange. An ordered Trigger's queue has a single active consumer, so one replica
//!   at a time delivers it, in order.
//!
//! The ingress answers 202 only once RabbitMQ has confirmed the events (publisher confirms) as
//! persistent messages. Events that arrive while earlier publishes wait for their confirm go out
//! together as one message (group commit, as the embedded log's fsync): RabbitMQ's cost is per
//! message (for a quorum queue, one Raft command to log and fsync per enqueue and per ack), so at
//! 5,000 events/s it handles hundreds of messages, not thousands. A message is acked once every
//! event in it is delivered (or dead-lettered); a replica that dies mid-message has the whole
//! message delivered again (at-least-once). A Trigger's consumer takes up to its parallelism of unacked
//! messages (prefetch), delivers them with the same code as the embedded log's dispatcher (filter,
//! retries, dead letter, reply) and acks each only when that is over, so a replica that dies leaves
//! its unacked messages to be delivered again by another. Every replica consumes every Trigger's
//! queue: RabbitMQ spreads the messages over them.
//!
//! Connections: one per RabbitMQ (AMQP URI), kept up by a task that reconnects with backoff. While it
//! is down the ingress answers 503 and the Broker is Ready=False with the error; consumers resume
//! by themselves once it is back. Queues are declared before a Broker accepts events on a (new)
//! connection, so no event accepted while a Trigger exists misses that Trigger's queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::backend::{QueueType, RabbitTarget};
use crate::config::BrokerKey;
use crate::delivery::sender::Sender;
use crate::dispatch::{DispatchConfig, Link, deliver};
use crate::ingress::Brokers;

/// How long a publish may wait for RabbitMQ's confirm before the ingress gives up (503).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages published and not yet confirmed, per Broker: while these are out, new events gather
/// into the next message. Few, so that messages carry many events under load; at low load an event
/// goes out at once.
const PUBLISHES_IN_FLIGHT: usize = 2;
/// Bounds of one message's events.
const MAX_BATCH_RECORDS: usize = 512;
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Content type of a message holding several events ([`encode_batch`]).
const BATCH_CONTENT_TYPE: &str = "application/vnd.sluice.events";

/// One message's events: each as a 4-byte big-endian length and the log record (`codec::encode`).
pub fn encode_batch(records: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.len() + 4).sum());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// The events of a message made by [`encode_batch`], as slices of it.
pub fn decode_batch(message: Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let Some(len) = message.get(at..at + 4) else {
            return Err(format!("truncated length at byte {at}"));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + 4;
        if start + len > message.len() {
            return Err(format!(
                "record at byte {at} claims {len} bytes, {} left",
                message.len() - start
            ));
        }
        out.push(message.slice(start..start + len));
        at = start + len;
    }
    Ok(out)
}
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: from this, doubling, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why RabbitMQ did not take events.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RabbitError {
    #[error("RabbitMQ at {at} is unavailable: {reason}")]
    Unavailable { at: String, reason: String },
    #[error("RabbitMQ at {at} did not confirm the events: {reason}")]
    NotConfirmed { at: String, reason: String },
}

/// The connection state of one RabbitMQ.
#[derive(Clone)]
enum ConnState {
    Down(String),
    Up(Arc<Connection>),
}

/// One RabbitMQ (one AMQP URI) and the task that keeps a connection to it.
pub struct Cluster {
    target: RabbitTarget,
    state: watch::Receiver<ConnState>,
    _task: AbortOnDropHandle<()>,
}

impl Cluster {
    fn start(target: RabbitTarget) -> Arc<Cluster> {
        let (tx, rx) = watch::channel(ConnState::Down("connecting".into()));
        let task = tokio::spawn(keep_connected(target.clone(), tx));
        Arc::new(Cluster {
            target,
            state: rx,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// The connection, or why there is none.
    fn connection(&self) -> Result<Arc<Connection>, String> {
        match &*self.state.borrow() {
            ConnState::Up(c) => Ok(c.clone()),
            ConnState::Down(e) => Err(e.clone()),
        }
    }

    /// Waits for a connection.
    async fn connected(&self) -> Arc<Connection> {
        let mut rx = self.state.clone();
        loop {
            if let ConnState::Up(c) = &*rx.borrow_and_update() {
                return c.clone();
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn unavailable(&self, reason: impl Into<String>) -> RabbitError {
        RabbitError::Unavailable {
            at: self.target.display.clone(),
            reason: reason.into(),
        }
    }
}

async fn keep_connected(target: RabbitTarget, tx: watch::Sender<ConnState>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let properties =
            ConnectionProperties::default().with_connection_name("sluice-broker".into());
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&target.uri, properties),
        )
        .await;
        match attempt {
            Ok(Ok(connection)) => {
                tracing::info!(rabbitmq = %target.display, "connected to RabbitMQ");
                backoff = MIN_BACKOFF;
                let connection = Arc::new(connection);
                let mut events = connection.events_listener();
                tx.send_replace(ConnState::Up(connection.clone()));
                // Down on an error event, or when the status says so (checked each second in case
                // no event comes).
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let reason = loop {
                    tokio::select! {
                        event = events.next() => match event {
                            // A channel's error (a refused declaration) comes here too; only the
                            // connection's own state says whether it is gone.
                            Some(lapin::Event::Error(e)) if !connection.status().connected() => {
                                break e.to_string()
                            }
                            Some(_) => {}
                            None => break "connection closed".to_string(),
                        },
                        _ = tick.tick() => {
                            if !connection.status().connected() {
                                break "connection lost".to_string();
                            }
                        }
                    }
                };
                tracing::warn!(rabbitmq = %target.display, %reason, "lost the RabbitMQ connection");
                tx.send_replace(ConnState::Down(reason));
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                tracing::warn!(rabbitmq = %target.display, %reason, retry_in = ?backoff, "cannot connect to RabbitMQ");
                tx.send_replace(ConnState::Down(reason));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(_) => {
                tx.send_replace(ConnState::Down(format!(
                    "connecting took longer than {CONNECT_TIMEOUT:?}"
                )));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Connections shared by the Brokers that name the same RabbitMQ.
#[derive(Default)]
pub struct Clusters {
    by_uri: Mutex<HashMap<String, std::sync::Weak<Cluster>>>,
}

impl Clusters {
    pub fn get(&self, target: &RabbitTarget) -> Arc<Cluster> {
        let mut map = self.by_uri.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, c| c.strong_count() > 0);
        if let Some(c) = map.get(&target.uri).and_then(std::sync::Weak::upgrade) {
            return c;
        }
        let c = Cluster::start(target.clone());
        map.insert(target.uri.clone(), Arc::downgrade(&c));
        c
    }
}

/// A Trigger's queue as declared in RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub queue_type: QueueType,
    pub single_active_consumer: bool,
}

impl QueueSpec {
    pub fn new(trigger: &BrokerKey, queue_type: QueueType, ordered: bool) -> QueueSpec {
        QueueSpec {
            name: format!("sluice.trigger.{}.{}", trigger.namespace, trigger.name),
            queue_type,
            single_active_consumer: ordered,
        }
    }

    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        if self.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        args
    }
}

/// What a failed declaration of `queue` means to the user: RabbitMQ cannot change a queue's
/// arguments, so a Trigger whose delivery order or queue type changed finds its old queue in the way.
fn declare_error(queue: &QueueSpec, e: &lapin::Error) -> String {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        format!(
            "queue {} exists with other arguments ({text}); its delivery order or queue type \
             changed and RabbitMQ cannot change a queue: delete the queue (`rabbitmqctl \
             delete_queue {}`, losing what it holds) or give the change back",
            queue.name, queue.name
        )
    } else {
        format!("declaring queue {}: {text}", queue.name)
    }
}

/// The exchange of a Broker.
pub fn exchange_name(broker: &BrokerKey) -> String {
    format!("sluice.broker.{}.{}", broker.namespace, broker.name)
}

/// Declares `exchange`, and `queue` bound to it, on a channel of their own: a refused declaration
/// (a queue that exists with other arguments) closes the channel it was made on.
async fn declare(
    connection: &Connection,
    exchange: &str,
    queue: Option<&QueueSpec>,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let result = declare_on(&channel, exchange, queue).await;
    let _ = channel.close(200, "declared".into()).await;
    result
}

async fn declare_on(
    channel: &Channel,
    exchange: &str,
    queue: Option<&QueueSpec>,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    if let Some(q) = queue {
        channel
            .queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                q.arguments(),
            )
            .await?;
        channel
            .queue_bind(
                q.name.as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// A Broker kept in RabbitMQ: its exchange, the queues of its Triggers, and the channel the
/// ingress publishes on.
pub struct RabbitBroker {
    key: BrokerKey,
    exchange: String,
    cluster: Arc<Cluster>,
    queue_type: QueueType,
    queues: Mutex<BTreeMap<String, QueueSpec>>,
    /// The confirm-mode channel, once the exchange and every queue are declared on the connection.
    publisher: watch::Sender<Option<Channel>>,
    /// Wakes the keeper when the publish channel failed.
    broken: tokio::sync::Notify,
    /// Events waiting to be published, with whom to tell when they are confirmed.
    pending: tokio::sync::mpsc::UnboundedSender<Pending>,
    tasks: Mutex<Vec<AbortOnDropHandle<()>>>,
}

/// One ingest's events, waiting for the batcher.
struct Pending {
    records: Vec<Bytes>,
    done: tokio::sync::oneshot::Sender<Result<(), RabbitError>>,
}

impl RabbitBroker {
    pub fn start(key: BrokerKey, target: &RabbitTarget, clusters: &Clusters) -> Arc<RabbitBroker> {
        let (pending, pending_rx) = tokio::sync::mpsc::unbounded_channel();
        let broker = Arc::new(RabbitBroker {
            exchange: exchange_name(&key),
            key,
            cluster: clusters.get(target),
            queue_type: target.queue_type,
            queues: Mutex::new(BTreeMap::new()),
            publisher: watch::channel(None).0,
            broken: tokio::sync::Notify::new(),
            pending,
            tasks: Mutex::new(Vec::new()),
        });
        let keeper = tokio::spawn(keep_publisher(Arc::downgrade(&broker)));
        let batcher = tokio::spawn(publish_batches(Arc::downgrade(&broker), pending_rx));
        *broker.tasks.lock().unwrap_or_else(|e| e.into_inner()) = vec![
            AbortOnDropHandle::new(keeper),
            AbortOnDropHandle::new(batcher),
        ];
        broker
    }

    pub fn target(&self) -> &RabbitTarget {
        &self.cluster.target
    }

    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// None when the Broker accepts events, else why not (for its status).
    pub fn unavailable(&self) -> Option<String> {
        if self.publisher.borrow().is_some() {
            return None;
        }
        Some(self.not_publishing().to_string())
    }

    /// Why events cannot be published now.
    fn not_publishing(&self) -> RabbitError {
        self.cluster.unavailable(match self.cluster.connection() {
            Err(e) => e,
            Ok(_) => "the exchange and queues are being declared".to_string(),
        })
    }

    /// Adds a Trigger's queue: declared now when connected (so events accepted from now on reach
    /// it), and on every reconnection before publishing resumes.
    pub async fn add_queue(&self, spec: QueueSpec) -> Result<(), String> {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.name.clone(), spec.clone());
        match self.cluster.connection() {
            Err(_) => Ok(()),
            Ok(c) => declare(&c, &self.exchange, Some(&spec))
                .await
                .map_err(|e| declare_error(&spec, &e)),
        }
    }

    /// Forgets a Trigger's queue and deletes it (the Trigger is gone).
    pub async fn delete_queue(&self, name: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Ok(c) = self.cluster.connection()
            && let Ok(channel) = c.create_channel().await
        {
            if let Err(e) = channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await
            {
                tracing::warn!(queue = name, error = %e, "deleting the queue of a removed Trigger failed");
            }
            let _ = channel.close(200, "deleted".into()).await;
        }
    }

    /// Publishes records (with others waiting at the same time, as one persistent message);
    /// resolves once RabbitMQ confirmed them.
    pub async fn publish(&self, records: Vec<Bytes>) -> Result<(), RabbitError> {
        if self.publisher.borrow().is_none() {
            return Err(self.not_publishing());
        }
        let (done, confirmed) = tokio::sync::oneshot::channel();
        if self.pending.send(Pending { records, done }).is_err() {
            return Err(self.not_publishing());
        }
        confirmed
            .await
            .unwrap_or_else(|_| Err(self.not_publishing()))
    }

    pub fn key(&self) -> &BrokerKey {
        &self.key
    }
}

/// Publishes what the ingress hands over: every event waiting when a publish can go (at most
/// [`PUBLISHES_IN_FLIGHT`] unconfirmed) becomes one message; its confirm answers them all.
async fn publish_batches(
    broker: std::sync::Weak<RabbitBroker>,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PUBLISHES_IN_FLIGHT));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(BATCH_CONTENT_TYPE.into());
    while let Some(first) = pending.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Everything that came while waiting for a slot goes in this message.
        let mut count = first.records.len();
        let mut bytes: usize = first.records.iter().map(Bytes::len).sum();
        let mut batch = vec![first];
        while count < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
            match pending.try_recv() {
                Ok(p) => {
                    count += p.records.len();
                    bytes += p.records.iter().map(Bytes::len).sum::<usize>();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let Some(b) = broker.upgrade() else { return };
        let channel = b.publisher.borrow().clone();
        let Some(channel) = channel else {
            answer(batch, Err(b.not_publishing()));
            continue;
        };
        let records: Vec<Bytes> = batch
            .iter()
            .flat_map(|p| p.records.iter().cloned())
            .collect();
        let body = encode_batch(&records);
        let published = channel
            .basic_publish(
                b.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await;
        let confirm = match published {
            Ok(c) => c,
            Err(e) => {
                b.broken.notify_one();
                answer(batch, Err(b.cluster.unavailable(e.to_string())));
                continue;
            }
        };
        let at = b.target().display.clone();
        drop(b);
        let broker = broker.clone();
        tokio::spawn(async move {
            let not_confirmed = |reason: String| RabbitError::NotConfirmed { at, reason };
            let result = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Err(_) => Err(not_confirmed(format!(
                    "no confirm within {CONFIRM_TIMEOUT:?}"
                ))),
                Ok(Ok(c)) if c.is_ack() => Ok(()),
                Ok(Ok(_)) => Err(not_confirmed("RabbitMQ refused (nack)".into())),
                Ok(Err(e)) => {
                    if let Some(b) = broker.upgrade() {
                        b.broken.notify_one();
                    }
                    Err(not_confirmed(e.to_string()))
                }
            };
            answer(batch, result);
            drop(slot);
        });
    }
}

fn answer(batch: Vec<Pending>, result: Result<(), RabbitError>) {
    for p in batch {
        let _ = p.done.send(result.clone());
    }
}

/// Keeps the Broker's publish channel: on each connection, declares the exchange and the queues,
/// then opens the confirm channel; drops it when the connection or the channel fails.
async fn keep_publisher(broker: std::sync::Weak<RabbitBroker>) {
    let Some(cluster) = broker.upgrade().map(|b| b.cluster.clone()) else {
        return;
    };
    let mut state = cluster.state.clone();
    loop {
        let connection = cluster.connected().await;
        let Some(b) = broker.upgrade() else { return };
        match open_publisher(&b, &connection).await {
            Ok(channel) => {
                b.publisher.send_replace(Some(channel.clone()));
                tracing::info!(broker = %b.key, "broker publishing to RabbitMQ");
                drop(b);
                // Until the connection changes or the channel breaks.
                loop {
                    let Some(b) = broker.upgrade() else { return };
                    let changed = tokio::select! {
                        r = state.changed() => r.is_err() || !matches!(&*state.borrow(), ConnState::Up(c) if Arc::ptr_eq(c, &connection)),
                        _ = b.broken.notified() => true,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => !channel.status().connected(),
                    };
                    if changed {
                        b.publisher.send_replace(None);
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(broker = %b.key, error = %e, "preparing RabbitMQ for the broker failed; retrying");
                drop(b);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn open_publisher(b: &RabbitBroker, connection: &Connection) -> Result<Channel, String> {
    declare(connection, &b.exchange, None)
        .await
        .map_err(|e| format!("declaring exchange {}: {e}", b.exchange))?;
    let queues: Vec<QueueSpec> = b
        .queues
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for q in &queues {
        // A queue RabbitMQ refuses (other arguments) does not stop the Broker; its Trigger says so.
        if let Err(e) = declare(connection, &b.exchange, Some(q)).await {
            tracing::warn!(queue = %q.name, error = %e, "declaring a trigger queue failed");
        }
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(channel)
}

/// A Trigger's consumer of its queue.
pub struct RabbitDispatcher {
    pub broker: Arc<RabbitBroker>,
    pub queue: String,
    task: AbortOnDropHandle<()>,
    channel: Arc<Mutex<Option<Channel>>>,
    /// Why the consumer is not running, when it is not (for the Trigger's status).
    pub problem: Arc<Mutex<Option<String>>>,
}

impl RabbitDispatcher {
    /// Declares the Trigger's queue (when connected) and starts consuming it.
    pub async fn start(
        config: Arc<DispatchConfig>,
        broker: Arc<RabbitBroker>,
        brokers: Arc<Brokers>,
        sender: Sender,
    ) -> RabbitDispatcher {
        let spec = QueueSpec::new(&config.trigger, broker.queue_type(), config.ordered);
        let problem = Arc::new(Mutex::new(None));
        if let Err(e) = broker.add_queue(spec.clone()).await {
            tracing::warn!(trigger = %config.trigger, error = %e, "declaring the trigger's queue failed");
            *problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        }
        let channel = Arc::new(Mutex::new(None));
        let queue_spec = spec.clone();
        let task = tokio::spawn(consume_forever(
            config,
            broker.clone(),
            brokers,
            sender,
            queue_spec,
            channel.clone(),
            problem.clone(),
        ));
        RabbitDispatcher {
            broker,
            queue: spec.name.clone(),
            task: AbortOnDropHandle::new(task),
            channel,
            problem,
        }
    }

    /// Stops consuming; unacked messages go back to the queue for another consumer.
    pub async fn stop(self) {
        self.task.abort();
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = channel {
            let _ = c.close(200, "trigger stopped".into()).await;
        }
    }
}

async fn consume_forever(
    config: Arc<DispatchConfig>,
    broker: Arc<RabbitBroker>,
    brokers: Arc<Brokers>,
    sender: Sender,
    spec: QueueSpec,
    channel: Arc<Mutex<Option<Channel>>>,
    problem: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let connection = broker.cluster.connected().await;
        let started = std::time::Instant::now();
        let result = consume(
            &config,
            &broker,
            &brokers,
            &sender,
            &spec,
            &connection,
            &channel,
            &problem,
        )
        .await;
        if let Some(c) = channel.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(c);
        }
        if let Err(e) = result {
            tracing::warn!(trigger = %config.trigger, error = %e, "consuming the trigger's queue stopped; resuming");
            *problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    config: &Arc<DispatchConfig>,
    broker: &RabbitBroker,
    brokers: &Arc<Brokers>,
    sender: &Sender,
    spec: &QueueSpec,
    connection: &Connection,
    slot: &Mutex<Option<Channel>>,
    problem: &Mutex<Option<String>>,
) -> Result<(), String> {
    let prefetch = if config.ordered {
        1
    } else {
        config.parallelism.clamp(1, u16::MAX as usize) as u16
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
    declare_on(&channel, &broker.exchange, Some(spec))
        .await
        .map_err(|e| declare_error(spec, &e))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let tag = format!(
        "sluice-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut consumer = channel
        .basic_consume(
            spec.name.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    *problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
    tracing::info!(trigger = %config.trigger, queue = %spec.name, prefetch, "consuming");
    // Workers, each with its own link to the subscriber (as the log dispatcher's); RabbitMQ hands
    // out at most `prefetch` unacked messages, so that many workers keep them all busy.
    let (tx, rx) = tokio::sync::mpsc::channel::<(Bytes, Arc<Unacked>)>(prefetch as usize);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let _workers: Vec<AbortOnDropHandle<()>> = (0..prefetch)
        .map(|_| {
            let (config, brokers, sender, rx) =
                (config.clone(), brokers.clone(), sender.clone(), rx.clone());
            let mut link: Option<Link> = None;
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    let Some((record, message)) = rx.lock().await.recv().await else {
                        return;
                    };
                    deliver(&config, &brokers, &sender, &mut link, record).await;
                    message.finish_one(&config.trigger).await;
                }
            }))
        })
        .collect();
    while let Some(message) = consumer.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let batch = message
            .properties
            .content_type()
            .as_ref()
            .is_some_and(|t| t.as_str() == BATCH_CONTENT_TYPE);
        let data = Bytes::from(message.data);
        let records = if batch {
            decode_batch(data).unwrap_or_else(|e| {
                tracing::error!(trigger = %config.trigger, error = %e, "unreadable message skipped");
                Vec::new()
            })
        } else {
            vec![data]
        };
        let unacked = Arc::new(Unacked {
            left: std::sync::atomic::AtomicUsize::new(records.len()),
            acker: message.acker,
        });
        if records.is_empty() {
            unacked.ack(&config.trigger).await;
        }
        for record in records {
            if tx.send((record, unacked.clone())).await.is_err() {
                return Err("the workers stopped".into());
            }
        }
    }
    Err("the consumer was cancelled".into())
}

/// A message being delivered: acked when its last event is finished.
struct Unacked {
    left: std::sync::atomic::AtomicUsize,
    acker: lapin::Acker,
}

impl Unacked {
    async fn finish_one(&self, trigger: &BrokerKey) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.ack(trigger).await;
        }
    }

    async fn ack(&self, trigger: &BrokerKey) {
        if let Err(e) = self.acker.ack(BasicAckOptions::default()).await {
            // The channel is gone: RabbitMQ hands the message out again.
            tracing::debug!(%trigger, error = %e, "ack failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_as_its_records() {
        let records: Vec<Bytes> = ["", "a", "bb", &"x".repeat(70_000)]
            .iter()
            .map(|s| Bytes::from(s.to_string()))
            .collect();
        let encoded = Bytes::from(encode_batch(&records));
        assert_eq!(decode_batch(encoded.clone()).unwrap(), records);
        assert_eq!(decode_batch(Bytes::new()).unwrap(), Vec::<Bytes>::new());
        assert!(decode_batch(encoded.slice(..encoded.len() - 1)).is_err());
        assert!(decode_batch(encoded.slice(..2)).is_err());
    }
}
