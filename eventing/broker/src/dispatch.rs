//! One dispatcher per Trigger: a consumer of its broker's log that reads from its committed offset,
//! filters, delivers (a pool of workers with a connection each, or one at a time when ordered),
//! dead-letters what cannot be delivered, sends replies back into the broker and commits what it has
//! finished.
//!
//! Delivery is at-least-once: the committed offset only passes an event once its delivery (or
//! dead-lettering, or dropping) is over, and commits are written periodically, so a crash replays at
//! most what was delivered since the last commit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use sluice_event_filter::Filter;
use sluice_event_log::{EventLog, Record};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use crate::codec;
use crate::config::{BrokerKey, Target};
use crate::delivery::sender::{self, Connection, Endpoint, Outcome, Sender};
use crate::delivery::{RetryPolicy, error_extensions};
use crate::gateway::{Gateway, PathGate};
use crate::ingress::{Brokers, IngestError};
use crate::metrics::TriggerMetrics;

/// Knative: every delivery carries `Prefer: reply`.
static PREFER: http::HeaderName = http::HeaderName::from_static("prefer");

/// How many records one read takes from the log.
const READ_BATCH: usize = 256;
/// How often the delivered offset is committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Everything a Trigger's dispatcher needs, resolved.
pub struct DispatchConfig {
    pub trigger: BrokerKey,
    pub broker: BrokerKey,
    pub filter: Filter,
    pub subscriber: Target,
    /// The Trigger's delivery metrics (see [`crate::metrics`]).
    pub metrics: TriggerMetrics,
    pub dead_letter: Option<Target>,
    pub retry: RetryPolicy,
    pub ordered: bool,
    /// Deliveries in flight at once when unordered.
    pub parallelism: usize,
    /// The URL shown for a Broker target (status, knativeerrordest).
    pub broker_url: Arc<dyn Fn(&BrokerKey) -> String + Send + Sync>,
    /// Sluice's gateway, when deliveries to Services go through it (`sluice up`).
    pub gateway: Option<Gateway>,
}

/// A worker's way to its Trigger's HTTP subscriber, made on first use: its connections (shared with
/// every Trigger that delivers to the same host) and, behind the gateway, the gate to wait on.
pub struct Link {
    connection: Connection,
    gate: Option<PathGate>,
}

/// The log consumer name of a Trigger.
pub fn consumer_name(trigger: &BrokerKey) -> String {
    format!("trigger/{trigger}")
}

/// A running dispatcher.
pub struct Dispatcher {
    trigger: BrokerKey,
    brokers: Arc<Brokers>,
    task: JoinHandle<()>,
    committer: JoinHandle<()>,
    delivered: Arc<AtomicU64>,
    log: Arc<dyn EventLog>,
    consumer: String,
}

impl Dispatcher {
    /// Starts dispatching from the consumer's committed offset; a new consumer starts at the head
    /// (Knative: a new Trigger receives events sent after it is ready).
    pub async fn start(
        config: Arc<DispatchConfig>,
        log: Arc<dyn EventLog>,
        brokers: Arc<Brokers>,
        sender: Sender,
    ) -> Dispatcher {
        let consumer = consumer_name(&config.trigger);
        let start = match log.committed(&consumer) {
            Some(offset) => offset,
            None => {
                let head = log.head();
                // Registers the consumer durably: after a crash the Trigger resumes from here
                // rather than from the head of the restarted log.
                if let Err(e) = log.commit(&consumer, head).await {
                    tracing::warn!(trigger = %config.trigger, error = %e, "registering the consumer failed");
                }
                head
            }
        };
        let delivered = Arc::new(AtomicU64::new(start));
        brokers.metrics().track_consumer(
            &config.trigger,
            &config.broker,
            log.clone(),
            delivered.clone(),
        );
        let trigger = config.trigger.clone();
        let metrics_brokers = brokers.clone();
        let committer = tokio::spawn(commit_loop(
            log.clone(),
            consumer.clone(),
            delivered.clone(),
            start,
        ));
        let task = tokio::spawn(run(
            config,
            log.clone(),
            brokers,
            sender,
            start,
            delivered.clone(),
        ));
        Dispatcher {
            trigger,
            brokers: metrics_brokers,
            task,
            committer,
            delivered,
            log,
            consumer,
        }
    }

    /// Stops delivering and commits what was finished.
    pub async fn stop(self) {
        self.brokers
            .metrics()
            .untrack_consumer(&self.trigger, &self.delivered);
        self.task.abort();
        let _ = self.task.await;
        self.committer.abort();
        let _ = self.committer.await;
        let offset = self.delivered.load(Ordering::Acquire);
        if let Err(e) = self.log.commit(&self.consumer, offset).await {
            tracing::warn!(consumer = %self.consumer, error = %e, "final commit failed");
        }
    }
}

async fn commit_loop(
    log: Arc<dyn EventLog>,
    consumer: String,
    delivered: Arc<AtomicU64>,
    mut committed: u64,
) {
    let mut tick = tokio::time::interval(COMMIT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let offset = delivered.load(Ordering::Acquire);
        if offset != committed {
            match log.commit(&consumer, offset).await {
                Ok(()) => committed = offset,
                Err(e) => tracing::warn!(%consumer, error = %e, "commit failed"),
            }
        }
    }
}

/// Records from `from` on, waiting for new ones at the head.
fn records(log: Arc<dyn EventLog>, from: u64) -> impl futures::Stream<Item = Record> {
    let head = log.subscribe_head();
    futures::stream::unfold(
        (log, from, VecDeque::<Record>::new(), head),
        |(log, mut next, mut buffer, mut head)| async move {
            loop {
                if let Some(record) = buffer.pop_front() {
                    return Some((record, (log, next, buffer, head)));
                }
                match log.read(next, READ_BATCH).await {
                    Ok(batch) if !batch.is_empty() => {
                        next = batch.last().map(|r| r.offset + 1).unwrap_or(next);
                        buffer.extend(batch);
                    }
                    Ok(_) => {
                        if head.wait_for(|h| *h > next).await.is_err() {
                            return None;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, offset = next, "reading the event log failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        },
    )
}

/// The records between the delivered offset and the newest one read: those waiting for a worker
/// and, in log order, whether each is finished.
#[derive(Default)]
struct WindowState {
    queue: VecDeque<Record>,
    pending: VecDeque<(u64, bool)>,
}

/// Hands records to the workers and moves the delivered offset past what they finished, in order.
struct Window {
    state: std::sync::Mutex<WindowState>,
    /// One permit per queued record.
    queued: Semaphore,
    /// Room for records not yet passed by the delivered offset: a slow event holds back at most
    /// this many behind it (what a crash replays, at most).
    room: Semaphore,
    delivered: Arc<AtomicU64>,
}

impl Window {
    async fn feed(&self, record: Record) {
        if let Ok(permit) = self.room.acquire().await {
            permit.forget();
        }
        {
            let mut state = self.state.lock().expect("window lock");
            state.pending.push_back((record.offset, false));
            state.queue.push_back(record);
        }
        self.queued.add_permits(1);
    }

    async fn take(&self) -> Record {
        loop {
            if let Ok(permit) = self.queued.acquire().await {
                permit.forget();
            }
            if let Some(record) = self.state.lock().expect("window lock").queue.pop_front() {
                return record;
            }
        }
    }

    fn finish(&self, offset: u64) {
        let (passed, next) = {
            let mut state = self.state.lock().expect("window lock");
            // Offsets are fed in increasing order.
            if let Ok(i) = state.pending.binary_search_by_key(&offset, |(o, _)| *o) {
                state.pending[i].1 = true;
            }
            let mut passed = 0;
            let mut next = None;
            while let Some(&(o, true)) = state.pending.front() {
                state.pending.pop_front();
                passed += 1;
                next = Some(o + 1);
            }
            (passed, next)
        };
        if let Some(next) = next {
            self.delivered.store(next, Ordering::Release);
            self.room.add_permits(passed);
        }
    }
}

/// Room in the window per worker (see [`Window::room`]).
const WINDOW_PER_WORKER: usize = 4;

async fn run(
    config: Arc<DispatchConfig>,
    log: Arc<dyn EventLog>,
    brokers: Arc<Brokers>,
    sender: Sender,
    from: u64,
    delivered: Arc<AtomicU64>,
) {
    // Ordered: one worker and a window of one, so an event is sent only once the one before it is
    // finished.
    let (workers, room) = if config.ordered {
        (1, 1)
    } else {
        let p = config.parallelism.max(1);
        (p, p * WINDOW_PER_WORKER)
    };
    let window = Arc::new(Window {
        state: Default::default(),
        queued: Semaphore::new(0),
        room: Semaphore::new(room),
        delivered,
    });
    // A pool of workers, each with its own connection to the subscriber, rather than a task per
    // event over a shared client: the connection's work stays on the worker's task. Dropping the
    // handles (stop, Trigger removed) aborts the workers.
    let _workers: Vec<AbortOnDropHandle<()>> = (0..workers)
        .map(|_| {
            let (config, brokers, sender, window) = (
                config.clone(),
                brokers.clone(),
                sender.clone(),
                window.clone(),
            );
            let mut link = None;
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    let record = window.take().await;
                    deliver(&config, &brokers, &sender, &mut link, record.data).await;
                    window.finish(record.offset);
                }
            }))
        })
        .collect();
    let mut records = std::pin::pin!(records(log, from));
    while let Some(record) = records.next().await {
        window.feed(record).await;
    }
}

/// Filters and delivers one record; returns when it is delivered, dead-lettered or dropped.
///
/// The event itself is only built when something needs its attributes: a Trigger with filters, a
/// Broker subscriber, a reply or a dead letter. Delivering to an HTTP subscriber otherwise goes
/// straight from the log record to the request (see [`codec::delivery_message`]).
///
/// `link` is the worker's way to an HTTP subscriber, made on first use.
pub async fn deliver(
    config: &DispatchConfig,
    brokers: &Brokers,
    sender: &Sender,
    link: &mut Option<Link>,
    record: Bytes,
) {
    let unreadable = |e: codec::RecordError| {
        tracing::error!(trigger = %config.trigger, error = %e, "unreadable log record skipped");
    };
    if !config.filter.passes_everything() {
        match codec::decode(&record) {
            Ok(event) if config.filter.matches(&event) => {}
            Ok(_) => return,
            Err(e) => return unreadable(e),
        }
    }
    let started = std::time::Instant::now();
    let (outcome, ttl) = match &config.subscriber {
        Target::Http { uri, host, .. } => {
            let message = match codec::delivery_message(&record) {
                Ok(m) => m,
                Err(e) => return unreadable(e),
            };
            let mut headers = message.headers;
            // Knative: every delivery asks for a reply.
            headers.insert(&PREFER, http::HeaderValue::from_static("reply"));
            let link = link.get_or_insert_with(|| Link {
                connection: Connection::new(Endpoint::new(uri, host.as_deref()), sender.pools()),
                gate: config
                    .gateway
                    .as_ref()
                    .and_then(|g| g.gate(&config.subscriber)),
            });
            let outcome = sender::send(
                &mut link.connection,
                headers,
                message.body,
                &config.retry,
                link.gate.as_mut(),
            )
            .await;
            (outcome, message.ttl)
        }
        Target::Broker(key) => {
            // The TTL goes on as it is: the ingress of the target Broker decrements it.
            let forwarded = match codec::decode(&record) {
                Ok(e) => e,
                Err(e) => return unreadable(e),
            };
            let ttl = codec::ttl(&forwarded);
            (
                ingest_outcome(brokers.ingest(key, vec![forwarded]).await),
                ttl,
            )
        }
    };
    let (code, attempts) = match &outcome {
        Outcome::Delivered { response, attempts } => (Some(response.status), *attempts),
        Outcome::Failed {
            status, attempts, ..
        } => (*status, *attempts),
    };
    config.metrics.dispatched(code, attempts, started.elapsed());
    match outcome {
        Outcome::Delivered { response, .. } => {
            if codec::is_cloudevent_message(&response.headers) {
                handle_reply(config, brokers, ttl, response).await;
            }
        }
        Outcome::Failed {
            status,
            body,
            attempts,
        } => {
            // Knative: the subscriber did not see the TTL extension and neither does the dead letter.
            let mut event = match codec::decode(&record) {
                Ok(e) => e,
                Err(e) => return unreadable(e),
            };
            event.remove_extension(codec::TTL_EXTENSION);
            let destination = config.subscriber.display(&*config.broker_url);
            tracing::info!(
                trigger = %config.trigger, id = event.id(), %destination, ?status, attempts,
                "delivery failed"
            );
            let taken =
                dead_letter(config, brokers, sender, &event, &destination, status, &body).await;
            config.metrics.failed(taken);
        }
    }
}

fn ingest_outcome(result: Result<usize, IngestError>) -> Outcome {
    match result {
        Ok(_) | Err(IngestError::TtlExhausted) => Outcome::Delivered {
            response: crate::delivery::sender::Response {
                status: 202,
                headers: Default::default(),
                body: Bytes::new(),
            },
            attempts: 1,
        },
        Err(e) => Outcome::Failed {
            status: Some(match e {
                IngestError::UnknownBroker(_) => 404,
                _ => 500,
            }),
            body: Bytes::from(e.to_string()),
            attempts: 1,
        },
    }
}

async fn handle_reply(
    config: &DispatchConfig,
    brokers: &Brokers,
    ttl: Option<i64>,
    response: crate::delivery::sender::Response,
) {
    let mut reply = match codec::events_from_http(&response.headers, response.body) {
        Ok(mut events) if events.len() == 1 => events.remove(0),
        Ok(_) => {
            tracing::warn!(trigger = %config.trigger, "a reply must be one CloudEvent; ignored");
            return;
        }
        Err(e) => {
            tracing::warn!(trigger = %config.trigger, error = %e, "invalid reply ignored");
            return;
        }
    };
    // Knative: the reply carries the TTL of the event it answers; the ingress then decrements it.
    if let Some(ttl) = ttl {
        reply.set_extension(codec::TTL_EXTENSION, ExtensionValue::Integer(ttl));
    }
    match brokers.ingest(&config.broker, vec![reply]).await {
        Ok(_) => {}
        Err(IngestError::TtlExhausted) => {
            tracing::debug!(trigger = %config.trigger, "reply dropped: TTL exhausted");
        }
        Err(e) => tracing::warn!(trigger = %config.trigger, error = %e, "storing a reply failed"),
    }
}

/// Sends a failed event to the Trigger's deadLetterSink; whether it took it.
async fn dead_letter(
    config: &DispatchConfig,
    brokers: &Brokers,
    sender: &Sender,
    event: &Event,
    destination: &str,
    status: Option<u16>,
    body: &[u8],
) -> bool {
    let Some(dls) = &config.dead_letter else {
        tracing::warn!(trigger = %config.trigger, id = event.id(), "event dropped: no deadLetterSink");
        return false;
    };
    let mut dead = event.clone();
    for (name, value) in error_extensions(destination, status, body) {
        // Knative sets knativeerrorcode as an integer extension.
        let value = match value.parse::<i64>() {
            Ok(code) if name == crate::delivery::ERROR_CODE_EXTENSION => {
                ExtensionValue::Integer(code)
            }
            _ => ExtensionValue::from(value),
        };
        dead.set_extension(&name, value);
    }
    let outcome = match dls {
        Target::Http { uri, host, .. } => {
            let (headers, body) = codec::to_binary(&dead);
            let mut gate = config.gateway.as_ref().and_then(|g| g.gate(dls));
            sender
                .send(
                    &Endpoint::new(uri, host.as_deref()),
                    headers,
                    body,
                    &config.retry,
                    gate.as_mut(),
                )
                .await
        }
        Target::Broker(key) => ingest_outcome(brokers.ingest(key, vec![dead]).await),
    };
    if let Outcome::Failed { status, .. } = outcome {
        tracing::error!(
            trigger = %config.trigger, id = event.id(), ?status,
            "event lost: the deadLetterSink refused it too"
        );
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn record(offset: u64) -> Record {
        Record {
            offset,
            data: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn the_delivered_offset_passes_only_what_is_finished_in_order_and_the_window_is_bounded()
    {
        let delivered = Arc::new(AtomicU64::new(10));
        let window = Window {
            state: Default::default(),
            queued: Semaphore::new(0),
            room: Semaphore::new(3),
            delivered: delivered.clone(),
        };
        for offset in 10..13 {
            window.feed(record(offset)).await;
        }
        // The window is full: a fourth record waits for room.
        assert!(window.feed(record(13)).now_or_never().is_none());
        let taken: Vec<u64> = [(); 3]
            .iter()
            .map(|_| window.take().now_or_never().expect("queued").offset)
            .collect();
        assert_eq!(taken, [10, 11, 12]);
        assert!(
            window.take().now_or_never().is_none(),
            "nothing else queued"
        );

        // Finished out of order: the offset stays before the oldest unfinished record.
        window.finish(12);
        window.finish(11);
        assert_eq!(delivered.load(Ordering::Acquire), 10);
        assert!(window.feed(record(13)).now_or_never().is_none());
        window.finish(10);
        assert_eq!(delivered.load(Ordering::Acquire), 13);
        // All three places are free again.
        for offset in 13..16 {
            assert!(window.feed(record(offset)).now_or_never().is_some());
        }
        assert!(window.feed(record(16)).now_or_never().is_none());
    }
}
