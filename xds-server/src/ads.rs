//! ADS server (SotW and delta).
//!
//! Every gRPC stream is driven by a plain state machine ([`SotwStream`] or [`DeltaStream`]) that turns
//! Envoy's requests and new snapshots into responses; the async part only moves messages. Each stream
//! reports what Envoy has ACKed to a shared tracker, which publishes a [`ConfigStatus`]: the newest
//! generation every connected Envoy has applied, and Envoy's last rejection.
//!
//! Protocol notes (Envoy's xDS protocol, checked against Envoy 1.40):
//! - SotW: answer the first request of a type and requests whose resource names changed, never a plain
//!   ACK or NACK (Envoy would answer again and loop). Listener and Cluster responses carry the full set.
//! - Delta: send only what changed; absent resources go in `removed_resources`.
//! - On a new snapshot, types are pushed clusters, endpoints, secrets, listeners, routes: Envoy's
//!   make-before-break order, so nothing references a resource it has not received yet.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::metrics::AdsMetrics;
use crate::resources::{
    CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL, SCOPED_ROUTE_TYPE_URL,
    SECRET_TYPE_URL,
};
use crate::snapshot::{Snapshot, VersionedResource};

/// 5,000 Ingresses make LDS and RDS responses of tens of MiB; tonic's default limit is 4 MiB.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Pings keep idle ADS connections alive through middleboxes and detect a vanished Envoy.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per stream before the stream waits for Envoy to read.
const RESPONSE_BUFFER: usize = 4;
/// Requests already received are handled together before ACK progress is reported: Envoy sends an
/// ACK and the requests it triggers (e.g. the LDS ACK and the RDS names of new listeners) back to back,
/// and the ACK alone would look like a finished update.
const MAX_REQUEST_BATCH: usize = 64;

/// Make-before-break: clusters before the endpoints that fill them, both before the listeners and
/// routes that point at them. Secrets go before the listeners that use them.
const PUSH_ORDER: [&str; 6] = [
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    SECRET_TYPE_URL,
    LISTENER_TYPE_URL,
    SCOPED_ROUTE_TYPE_URL,
    ROUTE_TYPE_URL,
];

/// Types whose empty subscription means "all of them" (Envoy subscribes to every Listener, Cluster
/// and routing scope).
fn is_wildcard_type(type_url: &str) -> bool {
    WILDCARD_TYPES.contains(&type_url)
}

const WILDCARD_TYPES: [&str; 3] = [CLUSTER_TYPE_URL, LISTENER_TYPE_URL, SCOPED_ROUTE_TYPE_URL];

fn is_known_type(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}

/// Orders a stream's types for pushing: [`PUSH_ORDER`] first, any others after.
fn push_order<'a>(types: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut types: Vec<String> = types.cloned().collect();
    types.sort_by_key(|t| {
        PUSH_ORDER
            .iter()
            .position(|p| p == t)
            .unwrap_or(PUSH_ORDER.len())
    });
    types
}

/// Make-before-break across types: Listeners and Routes wait until the stream runs the snapshot's
/// Clusters and has every ClusterLoadAssignment of it, so a route never points at a cluster Envoy is
/// still warming (a 503 for traffic that worked a moment ago). A rejected (NACKed) type does not hold
/// the others back: the gateway then gets what it can take.
fn waits_for_clusters(type_url: &str) -> bool {
    type_url == LISTENER_TYPE_URL || type_url == ROUTE_TYPE_URL || type_url == SCOPED_ROUTE_TYPE_URL
}

/// What [`clusters_warm`] needs to know of one type of a stream.
struct TypeView<'a> {
    sub: &'a Subscription,
    acked: &'a BTreeMap<String, String>,
    /// No response awaits an answer.
    settled: bool,
    rejected: bool,
    /// Known without looking: `acked` is exactly what the snapshot holds for `sub`.
    exact: bool,
}

fn clusters_warm(snap: &Snapshot, cds: Option<TypeView<'_>>, eds: Option<TypeView<'_>>) -> bool {
    let Some(cds) = cds else {
        return true;
    };
    if cds.rejected {
        return true;
    }
    if !cds.settled || !(cds.exact || cds.sub.matches(snap, CLUSTER_TYPE_URL, cds.acked)) {
        return false;
    }
    let endpoints = snap.resources(ENDPOINT_TYPE_URL);
    if endpoints.is_empty() {
        return true;
    }
    let Some(eds) = eds else {
        return false;
    };
    if eds.rejected {
        return true;
    }
    // Exact: acked is the snapshot's selection, so it has every endpoint iff it has as many.
    eds.settled
        && if eds.exact {
            eds.acked.len() == endpoints.len()
        } else {
            endpoints
                .values()
                .all(|r| eds.sub.covers(&r.name) && eds.acked.get(&r.name) == Some(&r.version))
        }
}

/// Notes the node id from the first request that carries one (Envoy sends it only once), and whether
/// the request names a type at all.
fn accept_request(
    node: &mut String,
    from: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    type_url: &str,
) -> bool {
    if let Some(n) = from
        && node.is_empty()
    {
        *node = n.id.clone();
        tracing::info!(node = %node, "node identified");
    }
    if type_url.is_empty() {
        tracing::warn!("ignoring a request without type_url");
        return false;
    }
    true
}

/// What xDS status the controller sees: how far the connected Envoys have come.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigStatus {
    acked_generation: Option<u64>,
    last_nack: Option<String>,
    rejected: Vec<Rejection>,
    connected: usize,
    gateways: Vec<GatewayStatus>,
}

/// One connected gateway (one ADS stream): who it is and how far it has come, for the controller to
/// decide which gateways an Ingress must be served by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    /// The ADS stream's id (unique while the server runs).
    pub stream: u64,
    /// Envoy's node id (empty until its first request names it).
    pub node: String,
    /// The stream's peer address: where the gateway is (its pod IP in a cluster).
    pub peer: Option<SocketAddr>,
    pub connected_at: Instant,
    /// The newest generation this gateway has fully applied (monotonic while it stays connected).
    pub acked_generation: Option<u64>,
    /// Its newest rejection that names no resource (a bad route), until it ACKs a newer
    /// configuration: Envoy's words with the node id.
    pub nack: Option<String>,
}

/// One resource Envoy rejected by name, while the stream has not ACKed a newer response of its type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub type_url: String,
    pub name: String,
    /// The content version Envoy rejected.
    pub version: String,
    /// Envoy's message about this resource.
    pub message: String,
}

/// The resources of `sent` that Envoy's NACK message names. Envoy applies the rest of a Listener or
/// Cluster update and names each failed resource as `<name>: <error>` (one per line for listeners,
/// `, `-separated for clusters), after `Error adding/updating listener(s) ` or `cluster(s) `.
fn rejected_names<'a>(
    type_url: &str,
    message: &str,
    sent: impl Iterator<Item = &'a String>,
) -> Vec<(String, String)> {
    if type_url != LISTENER_TYPE_URL && type_url != CLUSTER_TYPE_URL {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in sent {
        let needle = format!("{name}: ");
        let found = message.match_indices(&needle).find(|(at, _)| {
            let before = &message[..*at];
            before.is_empty()
                || before.ends_with('\n')
                || before.ends_with(", ")
                || before.ends_with("(s) ")
        });
        if let Some((at, _)) = found {
            let rest = &message[at + needle.len()..];
            let own = rest.split('\n').next().unwrap_or(rest);
            out.push((name.clone(), own.to_string()));
        }
    }
    out
}

impl ConfigStatus {
    /// The newest snapshot generation that every connected Envoy had fully ACKed at some moment; None
    /// before any ACK.
    pub fn acked_generation(&self) -> Option<u64> {
        self.acked_generation
    }

    /// Envoy's last rejection (type URL, node id and error_detail message) while it is not yet
    /// superseded by an ACK of a newer config.
    pub fn last_nack(&self) -> Option<String> {
        self.last_nack.clone()
    }

    /// Resources Envoy rejected by name (a Listener that cannot bind, a bad Cluster): Envoy applied the
    /// rest of those updates, and the rejections are not in [`ConfigStatus::last_nack`].
    pub fn rejected(&self) -> &[Rejection] {
        &self.rejected
    }

    /// ADS streams open.
    pub fn connected(&self) -> usize {
        self.connected
    }

    /// Every connected gateway (ADS stream), in the order they connected.
    pub fn gateways(&self) -> &[GatewayStatus] {
        &self.gateways
    }
}

/// The AggregatedDiscoveryService: serves the newest snapshot of `snapshots` to every Envoy.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shared: Arc<Shared>,
}

impl AdsServer {
    /// The server and the status it publishes (only when the status changes).
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> (AdsServer, watch::Receiver<ConfigStatus>) {
        let (status, status_rx) = watch::channel(ConfigStatus::default());
        let (closing, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::default()),
            status,
            closing,
            next_stream: AtomicU64::new(1),
            metrics: AdsMetrics::default(),
        });
        (AdsServer { snapshots, shared }, status_rx)
    }

    /// The server's Prometheus metrics (register them with [`AdsMetrics::register`]).
    pub fn metrics(&self) -> &AdsMetrics {
        &self.shared.metrics
    }

    fn start<S: XdsStream>(
        &self,
        state: S,
        peer: Option<SocketAddr>,
        requests: Streaming<S::Request>,
    ) -> ReceiverStream<Result<S::Response, Status>> {
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let id = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("ads", stream = id, protocol = S::PROTOCOL);
        tokio::spawn(
            run_stream(
                id,
                peer,
                state,
                requests,
                tx,
                self.snapshots.clone(),
                self.shared.clone(),
            )
            .instrument(span),
        );
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.start(
            SotwStream::default(),
            peer,
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.start(
            DeltaStream::default(),
            peer,
            request.into_inner(),
        )))
    }
}

/// Serves ADS on the listener until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    server: AdsServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Pushes are small and latency matters (a route change should reach Envoy within a millisecond).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(conn) = &conn
            && let Err(e) = conn.set_nodelay(true)
        {
            tracing::debug!("setting TCP_NODELAY: {e}");
        }
        conn
    });
    serve_incoming(incoming, server, shutdown).await
}

/// Serves ADS over mTLS on the listener until `shutdown` completes: only clients with a certificate
/// signed by the client CA get a stream (see [`crate::tls`]).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<crate::tls::ReloadingServerConfig>,
    server: AdsServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_incoming(crate::tls::incoming(listener, tls), server, shutdown).await
}

async fn serve_incoming<IO, IE>(
    incoming: impl futures::Stream<Item = Result<IO, IE>>,
    server: AdsServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let shared = server.shared.clone();
    let service = AggregatedDiscoveryServiceServer::new(server)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // ADS streams never end on their own: end them when shutting down, or the graceful shutdown would
    // wait for them forever.
    let shutdown = async move {
        shutdown.await;
        shared.closing.send_replace(true);
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

// ---------------------------------------------------------------------------------------------------
// Progress tracking across streams.

struct Shared {
    tracker: Mutex<Tracker>,
    status: watch::Sender<ConfigStatus>,
    /// Set once when the server shuts down: every stream ends.
    closing: watch::Sender<bool>,
    next_stream: AtomicU64,
    metrics: AdsMetrics,
}

#[derive(Default)]
struct Tracker {
    streams: BTreeMap<u64, StreamEntry>,
    acked_generation: Option<u64>,
    /// When each generation not yet ACKed everywhere was first seen by a stream: the start of its
    /// propagation latency.
    published: BTreeMap<u64, Instant>,
}

/// One stream in the tracker.
struct StreamEntry {
    peer: Option<SocketAddr>,
    connected_at: Instant,
    sync: StreamSync,
    /// The newest generation the stream was ever synced with.
    acked: Option<u64>,
}

/// One stream's progress, as its state machine reports it.
#[derive(Debug, Clone, Default, PartialEq)]
struct StreamSync {
    /// Envoy's node id, once known.
    node: String,
    /// The generation whose resources Envoy has ACKed, for everything this stream subscribes to.
    synced: Option<u64>,
    /// Rejections not yet superseded by an ACK, one per type at most.
    nacks: Vec<Nack>,
}

#[derive(Debug, Clone, PartialEq)]
struct Nack {
    /// Orders rejections across streams, so the newest one is reported.
    seq: u64,
    message: String,
    /// The resources it names (Envoy applied the others); empty when it names none.
    rejected: Vec<Rejection>,
}

static NACK_SEQ: AtomicU64 = AtomicU64::new(1);

impl Nack {
    fn new(type_url: &str, node: &str, version: &str, message: &str) -> Nack {
        Nack {
            seq: NACK_SEQ.fetch_add(1, Ordering::Relaxed),
            message: format!("Envoy {node:?} rejected {type_url} version {version}: {message}"),
            rejected: Vec::new(),
        }
    }

    /// Names the rejected resources among `sent` (name -> version), when Envoy's message does.
    fn naming(mut self, type_url: &str, message: &str, sent: &BTreeMap<String, String>) -> Nack {
        self.rejected = rejected_names(type_url, message, sent.keys())
            .into_iter()
            .map(|(name, message)| Rejection {
                type_url: type_url.to_string(),
                version: sent[&name].clone(),
                name,
                message,
            })
            .collect();
        self
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        // A panic elsewhere while holding the lock leaves only plain data behind: keep going.
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream saw a new snapshot: the first to see a generation starts its propagation clock.
    fn snapshot_seen(&self, snap: &Snapshot, now: Instant) {
        let mut tracker = self.lock();
        let generation = snap.generation();
        if tracker.acked_generation.is_some_and(|g| g >= generation)
            || tracker.published.contains_key(&generation)
        {
            return;
        }
        tracker.published.insert(generation, now);
        drop(tracker);
        self.metrics.snapshot(snap);
    }

    fn register(&self, id: u64, peer: Option<SocketAddr>) {
        self.metrics.clients_connected.inc();
        let mut tracker = self.lock();
        tracker.streams.insert(
            id,
            StreamEntry {
                peer,
                connected_at: Instant::now(),
                sync: StreamSync::default(),
                acked: None,
            },
        );
        self.publish(&mut tracker);
    }

    fn update(&self, id: u64, sync: StreamSync) {
        let mut tracker = self.lock();
        match tracker.streams.get_mut(&id) {
            Some(current) if current.sync == sync => return,
            Some(current) => {
                if sync.synced > current.acked {
                    current.acked = sync.synced;
                }
                current.sync = sync;
            }
            None => return,
        }
        self.publish(&mut tracker);
    }

    fn unregister(&self, id: u64) {
        self.metrics.clients_connected.dec();
        let mut tracker = self.lock();
        tracker.streams.remove(&id);
        self.publish(&mut tracker);
    }

    fn publish(&self, tracker: &mut Tracker) {
        let mut synced = tracker.streams.values().map(|s| s.sync.synced);
        if let Some(Some(first)) = synced.next()
            && synced.all(|g| g == Some(first))
            && tracker.acked_generation.is_none_or(|acked| acked < first)
        {
            tracker.acked_generation = Some(first);
            // Every gateway runs `first` now: its propagation (and that of any generation it
            // superseded) is over.
            let now = Instant::now();
            if let Some(at) = tracker.published.get(&first) {
                self.metrics.propagated(now.saturating_duration_since(*at));
            }
            tracker.published.retain(|g, _| *g > first);
        }
        let status = ConfigStatus {
            acked_generation: tracker.acked_generation,
            // A NACK that names its resources concerns only them: they are reported apart.
            last_nack: tracker
                .streams
                .values()
                .flat_map(|s| &s.sync.nacks)
                .filter(|n| n.rejected.is_empty())
                .max_by_key(|n| n.seq)
                .map(|n| n.message.clone()),
            rejected: {
                let all: BTreeSet<&Rejection> = tracker
                    .streams
                    .values()
                    .flat_map(|s| &s.sync.nacks)
                    .flat_map(|n| &n.rejected)
                    .collect();
                all.into_iter().cloned().collect()
            },
            connected: tracker.streams.len(),
            gateways: tracker
                .streams
                .iter()
                .map(|(id, s)| GatewayStatus {
                    stream: *id,
                    node: s.sync.node.clone(),
                    peer: s.peer,
                    connected_at: s.connected_at,
                    acked_generation: s.acked,
                    nack: s
                        .sync
                        .nacks
                        .iter()
                        .filter(|n| n.rejected.is_empty())
                        .max_by_key(|n| n.seq)
                        .map(|n| n.message.clone()),
                })
                .collect(),
        };
        self.status.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            *current = status;
            true
        });
    }
}

/// Removes the stream from the tracker however its task ends.
struct Registration {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

// ---------------------------------------------------------------------------------------------------
// The stream driver.

/// One ADS stream's protocol logic, without I/O.
trait XdsStream: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const PROTOCOL: &'static str;

    fn on_request(
        &mut self,
        request: Self::Request,
        snap: &Snapshot,
        out: &mut Vec<Self::Response>,
    );
    fn on_snapshot(&mut self, snap: &Snapshot, out: &mut Vec<Self::Response>);
    fn sync(&self, snap: &Snapshot) -> StreamSync;
    /// The type of a response (what a push is counted under).
    fn response_type(response: &Self::Response) -> &str;
    /// The answers (type URL, accepted) Envoy gave since the last call: ACKs and NACKs to count.
    fn take_answers(&mut self) -> Vec<(String, bool)>;
}

async fn run_stream<S: XdsStream>(
    id: u64,
    peer: Option<SocketAddr>,
    mut state: S,
    mut requests: Streaming<S::Request>,
    tx: mpsc::Sender<Result<S::Response, Status>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    shared: Arc<Shared>,
) {
    let mut closing = shared.closing.subscribe();
    if *closing.borrow_and_update() {
        return;
    }
    shared.register(id, peer);
    let _registration = Registration {
        id,
        shared: shared.clone(),
    };
    tracing::info!(peer = ?peer, "stream opened");
    // Until the controller has read its source, the snapshot is the empty default: serving it would
    // make an Envoy that reconnects to a restarted xds-server drop the config it is serving.
    let ready = tokio::select! {
        _ = closing.changed() => false,
        ready = snapshots.wait_for(|s| s.generation() > 0) => ready.is_ok(),
    };
    if !ready {
        tracing::info!("stream closed before the first configuration");
        return;
    }
    let mut snap = snapshots.borrow_and_update().clone();
    shared.snapshot_seen(&snap, Instant::now());
    let reason = loop {
        let mut out = Vec::new();
        let mut ended = None;
        tokio::select! {
            _ = closing.changed() => break "server shutting down",
            _ = tx.closed() => break "client went away",
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break "snapshot source closed";
                }
                snap = snapshots.borrow_and_update().clone();
                shared.snapshot_seen(&snap, Instant::now());
                tracing::debug!(generation = snap.generation(), "new snapshot");
                state.on_snapshot(&snap, &mut out);
            }
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    state.on_request(request, &snap, &mut out);
                    for _ in 1..MAX_REQUEST_BATCH {
                        match requests.message().now_or_never() {
                            None => break,
                            Some(Ok(Some(request))) => state.on_request(request, &snap, &mut out),
                            Some(Ok(None)) => { ended = Some("client closed the stream"); break; }
                            Some(Err(e)) => { tracing::debug!("receiving: {e}"); ended = Some("receive error"); break; }
                        }
                    }
                }
                Ok(None) => break "client closed the stream",
                Err(e) => {
                    tracing::debug!("receiving: {e}");
                    break "receive error";
                }
            },
        }
        for (type_url, accepted) in state.take_answers() {
            shared.metrics.answered(&type_url, accepted);
        }
        if let Some(reason) = ended {
            break reason;
        }
        let mut stopped = None;
        for response in out {
            shared.metrics.pushed(S::response_type(&response));
            // An Envoy that stops reading must not hold up shutdown.
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() {
                    stopped = Some("client went away");
                },
                _ = closing.changed() => stopped = Some("server shutting down"),
            }
            if stopped.is_some() {
                break;
            }
        }
        if let Some(reason) = stopped {
            break reason;
        }
        shared.update(id, state.sync(&snap));
    };
    tracing::info!("stream closed: {reason}");
}

/// Which resources of one type a stream wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

impl Subscription {
    fn covers(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The snapshot's resources of `type_url` that this subscription selects, in name order.
    fn select<'s>(&self, snap: &'s Snapshot, type_url: &str) -> Vec<&'s VersionedResource> {
        let all = snap.resources(type_url);
        if self.wildcard {
            all.values().map(|r| &**r).collect()
        } else {
            self.names
                .iter()
                .filter_map(|n| all.get(n))
                .map(|r| &**r)
                .collect()
        }
    }

    /// Whether `have` (name -> version), restricted to this subscription, is exactly what the snapshot
    /// holds for it.
    fn matches(&self, snap: &Snapshot, type_url: &str, have: &BTreeMap<String, String>) -> bool {
        let want = self.select(snap, type_url);
        want.len() == have.keys().filter(|n| self.covers(n)).count()
            && want.iter().all(|r| have.get(&r.name) == Some(&r.version))
    }
}

/// A stream is in sync with the snapshot when it has subscribed to something, to every wildcard type
/// the snapshot holds (Envoy asks for Clusters first and for Listeners only once its clusters are
/// warm: until then it does not serve the gateway), and every subscribed type is `in_sync`.
fn stream_sync<'a, T: 'a>(
    snap: &Snapshot,
    types: &'a BTreeMap<String, T>,
    in_sync: impl Fn(&str, &T) -> bool,
) -> Option<u64> {
    if types.is_empty() {
        return None;
    }
    for wildcard in WILDCARD_TYPES {
        if !types.contains_key(wildcard) && !snap.resources(wildcard).is_empty() {
            return None;
        }
    }
    types
        .iter()
        .all(|(t, state)| in_sync(t, state))
        .then_some(snap.generation())
}

// ---------------------------------------------------------------------------------------------------
// State of the world.

#[derive(Default)]
struct SotwStream {
    node: String,
    nonces: u64,
    types: BTreeMap<String, SotwType>,
    /// ACKs (true) and NACKs (false) not yet counted.
    answers: Vec<(String, bool)>,
}

struct SotwType {
    sub: Subscription,
    /// The last response: nonce, version_info and content (name -> version).
    sent_nonce: String,
    sent_version: String,
    sent: BTreeMap<String, String>,
    /// Envoy has ACKed or NACKed the last response.
    answered: bool,
    /// The content of the last ACKed response: what Envoy runs.
    acked: BTreeMap<String, String>,
    nack: Option<Nack>,
    /// Envoy asked (first request, or new names) and has not been answered yet.
    owed: bool,
}

impl SotwStream {
    fn clusters_warm(&self, snap: &Snapshot) -> bool {
        let view = |t: &str| {
            self.types.get(t).map(|st| TypeView {
                sub: &st.sub,
                acked: &st.acked,
                settled: st.answered,
                rejected: st.answered && st.nack.is_some(),
                exact: false,
            })
        };
        clusters_warm(snap, view(CLUSTER_TYPE_URL), view(ENDPOINT_TYPE_URL))
    }

    /// Sends every type Envoy is owed or whose content changed, in make-before-break order.
    fn flush(&mut self, snap: &Snapshot, out: &mut Vec<DiscoveryResponse>) {
        let mut warm = self.clusters_warm(snap);
        for type_url in push_order(self.types.keys()) {
            if waits_for_clusters(&type_url) && !warm {
                continue;
            }
            let st = &self.types[&type_url];
            let selected = st.sub.select(snap, &type_url);
            let unchanged = selected.len() == st.sent.len()
                && selected
                    .iter()
                    .all(|r| st.sent.get(&r.name) == Some(&r.version));
            if st.owed || !unchanged {
                self.respond(&type_url, snap, out);
            }
            if type_url == ENDPOINT_TYPE_URL {
                warm = self.clusters_warm(snap);
            }
        }
    }
    fn subscription(
        type_url: &str,
        names: &[String],
        previous: Option<&Subscription>,
    ) -> Subscription {
        // An empty list is a wildcard for Listener and Cluster, unless the stream subscribed to names
        // before (then it unsubscribes from all); for other types it subscribes to nothing.
        let wildcard = names.iter().any(|n| n == "*")
            || (names.is_empty()
                && is_wildcard_type(type_url)
                && previous.is_none_or(|p| p.wildcard));
        Subscription {
            wildcard,
            names: names.iter().filter(|n| *n != "*").cloned().collect(),
        }
    }

    fn respond(&mut self, type_url: &str, snap: &Snapshot, out: &mut Vec<DiscoveryResponse>) {
        let Some(st) = self.types.get_mut(type_url) else {
            return;
        };
        self.nonces += 1;
        let selected = st.sub.select(snap, type_url);
        st.sent = selected
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        st.sent_nonce = self.nonces.to_string();
        st.sent_version = snap.type_version(type_url);
        st.answered = false;
        st.owed = false;
        tracing::debug!(
            type_url,
            version = st.sent_version,
            nonce = st.sent_nonce,
            resources = selected.len(),
            "sending"
        );
        out.push(DiscoveryResponse {
            version_info: st.sent_version.clone(),
            resources: selected.into_iter().map(|r| r.resource.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: st.sent_nonce.clone(),
            ..Default::default()
        });
    }
}

impl XdsStream for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: &'static str = "sotw";

    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snap: &Snapshot,
        out: &mut Vec<DiscoveryResponse>,
    ) {
        let type_url = req.type_url.as_str();
        if !accept_request(&mut self.node, req.node.as_ref(), type_url) {
            return;
        }
        let Some(st) = self.types.get_mut(type_url) else {
            if !is_known_type(type_url) {
                tracing::warn!(type_url, "unknown type; serving an empty set");
            }
            let sub = Self::subscription(type_url, &req.resource_names, None);
            self.types.insert(
                type_url.to_string(),
                SotwType {
                    sub,
                    sent_nonce: String::new(),
                    sent_version: String::new(),
                    sent: BTreeMap::new(),
                    answered: false,
                    acked: BTreeMap::new(),
                    nack: None,
                    owed: true,
                },
            );
            // Answered by flush (at once, unless it must wait for clusters).
            self.flush(snap, out);
            return;
        };
        if req.response_nonce != st.sent_nonce {
            tracing::debug!(
                type_url,
                nonce = req.response_nonce,
                "ignoring a request with a stale nonce"
            );
            return;
        }
        if let Some(error) = &req.error_detail {
            st.answered = true;
            let nack = Nack::new(type_url, &self.node, &st.sent_version, &error.message).naming(
                type_url,
                &error.message,
                &st.sent,
            );
            tracing::warn!("{}", nack.message);
            if !nack.rejected.is_empty() {
                // Envoy applied every other resource of the response: it runs those.
                let rejected: BTreeSet<&str> =
                    nack.rejected.iter().map(|r| r.name.as_str()).collect();
                let mut acked: BTreeMap<String, String> = st
                    .sent
                    .iter()
                    .filter(|(n, _)| !rejected.contains(n.as_str()))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                for name in rejected {
                    if let Some(v) = st.acked.get(name) {
                        acked.insert(name.to_string(), v.clone());
                    }
                }
                st.acked = acked;
            }
            st.nack = Some(nack);
            self.answers.push((type_url.to_string(), false));
        } else if req.version_info == st.sent_version {
            self.answers.push((type_url.to_string(), true));
            st.answered = true;
            st.acked = st.sent.clone();
            st.nack = None;
            tracing::debug!(type_url, version = req.version_info, "ACK");
        } else {
            st.answered = true;
            tracing::warn!(
                type_url,
                got = req.version_info,
                sent = st.sent_version,
                "reply with the latest nonce but another version and no error; not counted as ACK"
            );
        }
        let sub = Self::subscription(type_url, &req.resource_names, Some(&st.sub));
        if sub != st.sub {
            st.sub = sub;
            st.owed = true;
        }
        self.flush(snap, out);
    }

    fn on_snapshot(&mut self, snap: &Snapshot, out: &mut Vec<DiscoveryResponse>) {
        self.flush(snap, out);
    }

    fn sync(&self, snap: &Snapshot) -> StreamSync {
        StreamSync {
            node: self.node.clone(),
            synced: stream_sync(snap, &self.types, |t, st: &SotwType| {
                st.answered && st.sub.matches(snap, t, &st.acked)
            }),
            nacks: self.types.values().filter_map(|t| t.nack.clone()).collect(),
        }
    }

    fn response_type(response: &DiscoveryResponse) -> &str {
        &response.type_url
    }

    fn take_answers(&mut self) -> Vec<(String, bool)> {
        std::mem::take(&mut self.answers)
    }
}

// ---------------------------------------------------------------------------------------------------
// Delta (incremental).

#[derive(Default)]
struct DeltaStream {
    node: String,
    nonces: u64,
    types: BTreeMap<String, DeltaType>,
    /// ACKs (true) and NACKs (false) not yet counted.
    answers: Vec<(String, bool)>,
}

#[derive(Default)]
struct DeltaType {
    sub: Subscription,
    /// What Envoy has or has been sent (name -> version): the base of the next diff.
    known: BTreeMap<String, String>,
    /// Responses not yet ACKed or NACKed, oldest first.
    pending: VecDeque<Sent>,
    /// What Envoy runs: its initial versions plus every ACKed response.
    acked: BTreeMap<String, String>,
    nack: Option<Nack>,
    /// An answer Envoy is owed (first request, widened or new names) but that waits for clusters.
    owed: bool,
    owed_names: Vec<String>,
    /// The snapshot `known` was last made equal to (for this subscription): the next snapshot made
    /// from it needs only its recorded changes diffed. None after the subscription changed.
    base: Option<u64>,
    /// `acked` may differ from `known` even once every response is answered (a NACK, or responses
    /// answered out of order). Until then, no pending responses means `acked` equals `known`.
    diverged: bool,
}

struct Sent {
    nonce: String,
    version: String,
    updated: Vec<(String, String)>,
    removed: Vec<String>,
}

impl DeltaType {
    /// Known without looking: what Envoy runs is exactly what `snap` holds for the subscription.
    fn exact(&self, snap: &Snapshot) -> bool {
        self.pending.is_empty() && !self.diverged && self.base == Some(snap.id())
    }

    /// Forgets resources Envoy no longer subscribes to (Envoy drops them itself).
    fn forget_uncovered(&mut self) {
        let sub = &self.sub;
        self.known.retain(|n, _| sub.covers(n));
        self.acked.retain(|n, _| sub.covers(n));
    }
}

impl DeltaStream {
    fn clusters_warm(&self, snap: &Snapshot) -> bool {
        let view = |t: &str| {
            self.types.get(t).map(|st| TypeView {
                sub: &st.sub,
                acked: &st.acked,
                settled: st.pending.is_empty(),
                rejected: st.pending.is_empty() && st.nack.is_some(),
                exact: st.exact(snap),
            })
        };
        clusters_warm(snap, view(CLUSTER_TYPE_URL), view(ENDPOINT_TYPE_URL))
    }

    /// Sends what each type is owed or what changed, in make-before-break order.
    fn flush(&mut self, snap: &Snapshot, out: &mut Vec<DeltaDiscoveryResponse>) {
        let mut warm = self.clusters_warm(snap);
        for type_url in push_order(self.types.keys()) {
            if waits_for_clusters(&type_url) && !warm {
                continue;
            }
            let st = self.types.get_mut(&type_url).expect("listed type");
            let always = std::mem::take(&mut st.owed);
            let names = std::mem::take(&mut st.owed_names);
            self.respond(&type_url, snap, &names, always, out);
            if type_url == ENDPOINT_TYPE_URL {
                warm = self.clusters_warm(snap);
            }
        }
    }

    /// Sends what differs between `known` and the snapshot, plus a removal for each name in `new_names`
    /// that does not exist (how delta xDS says "no such resource"). With `always`, sends even when
    /// nothing differs (Envoy waits for an answer to its first request of a type).
    fn respond(
        &mut self,
        type_url: &str,
        snap: &Snapshot,
        new_names: &[String],
        always: bool,
        out: &mut Vec<DeltaDiscoveryResponse>,
    ) {
        let Some(st) = self.types.get_mut(type_url) else {
            return;
        };
        let all = snap.resources(type_url);
        let since_base = st.base.and_then(|base| {
            if base == snap.id() {
                Some(&[][..])
            } else {
                snap.changes_since(base, type_url)
            }
        });
        let (updated, mut removed): (Vec<&VersionedResource>, Vec<String>) = match since_base {
            // `known` is the base snapshot's selection: only the names changed since can differ.
            Some(changed) => {
                let mut updated = Vec::new();
                let mut removed = Vec::new();
                for name in changed.iter().filter(|n| st.sub.covers(n)) {
                    match all.get(name) {
                        Some(r) if st.known.get(name) != Some(&r.version) => updated.push(&**r),
                        Some(_) => {}
                        None if st.known.contains_key(name) => removed.push(name.clone()),
                        None => {}
                    }
                }
                (updated, removed)
            }
            None => (
                st.sub
                    .select(snap, type_url)
                    .into_iter()
                    .filter(|r| st.known.get(&r.name) != Some(&r.version))
                    .collect(),
                st.known
                    .keys()
                    .filter(|n| st.sub.covers(n) && !all.contains_key(*n))
                    .cloned()
                    .collect(),
            ),
        };
        st.base = Some(snap.id());
        for name in new_names {
            if !all.contains_key(name) && !st.known.contains_key(name) && !removed.contains(name) {
                removed.push(name.clone());
            }
        }
        if updated.is_empty() && removed.is_empty() && !always {
            return;
        }
        for r in &updated {
            st.known.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            st.known.remove(name);
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let version = snap.type_version(type_url);
        tracing::debug!(
            type_url,
            version,
            nonce,
            updated = updated.len(),
            removed = removed.len(),
            "sending"
        );
        st.pending.push_back(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            updated: updated
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
            removed: removed.clone(),
        });
        out.push(DeltaDiscoveryResponse {
            system_version_info: version,
            resources: updated
                .into_iter()
                .map(|r| Resource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.resource.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        });
    }
}

impl XdsStream for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: &'static str = "delta";

    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
        out: &mut Vec<DeltaDiscoveryResponse>,
    ) {
        let type_url = req.type_url.as_str();
        if !accept_request(&mut self.node, req.node.as_ref(), type_url) {
            return;
        }
        let first = !self.types.contains_key(type_url);
        let st = self.types.entry(type_url.to_string()).or_default();
        if first {
            if !is_known_type(type_url) {
                tracing::warn!(type_url, "unknown type; serving an empty set");
            }
            // Legacy wildcard: a first request that names nothing subscribes to all Listeners/Clusters.
            st.sub.wildcard = req.resource_names_subscribe.is_empty() && is_wildcard_type(type_url);
            // Envoy already has these (it reconnected): do not send them again unless they changed.
            st.known = req
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            st.acked = st.known.clone();
        }

        if !req.response_nonce.is_empty() {
            // Envoy answers every delta response, in order; anything older than the answered one
            // cannot be answered any more.
            let answered = st
                .pending
                .iter()
                .position(|s| s.nonce == req.response_nonce)
                .and_then(|i| {
                    if i > 0 {
                        st.pending.drain(..i);
                        st.diverged = true;
                    }
                    st.pending.pop_front()
                });
            match (answered, &req.error_detail) {
                (None, _) => tracing::debug!(
                    type_url,
                    nonce = req.response_nonce,
                    "reply to an unknown nonce"
                ),
                (Some(sent), Some(error)) => {
                    let updated: BTreeMap<String, String> = sent.updated.iter().cloned().collect();
                    let nack = Nack::new(type_url, &self.node, &sent.version, &error.message)
                        .naming(type_url, &error.message, &updated);
                    tracing::warn!("{}", nack.message);
                    if !nack.rejected.is_empty() {
                        // Envoy applied the rest of the response: it runs those.
                        for (name, version) in updated {
                            if !nack.rejected.iter().any(|r| r.name == name) {
                                st.acked.insert(name, version);
                            }
                        }
                        for name in &sent.removed {
                            st.acked.remove(name);
                        }
                    }
                    st.nack = Some(nack);
                    st.diverged = true;
                    self.answers.push((type_url.to_string(), false));
                }
                (Some(sent), None) => {
                    self.answers.push((type_url.to_string(), true));
                    for (name, version) in sent.updated {
                        st.acked.insert(name, version);
                    }
                    for name in &sent.removed {
                        st.acked.remove(name);
                    }
                    st.nack = None;
                    tracing::debug!(type_url, nonce = sent.nonce, "ACK");
                }
            }
        }

        if st.diverged && st.pending.is_empty() && st.acked == st.known {
            st.diverged = false;
        }

        let mut new_names = Vec::new();
        let mut widened = false;
        for name in &req.resource_names_subscribe {
            if name == "*" {
                widened |= !st.sub.wildcard;
                st.sub.wildcard = true;
            } else {
                if !st.sub.covers(name) {
                    new_names.push(name.clone());
                }
                st.sub.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                st.sub.wildcard = false;
            } else {
                st.sub.names.remove(name);
            }
        }
        if first || !req.resource_names_unsubscribe.is_empty() {
            st.forget_uncovered();
        }
        if widened || !new_names.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            // What the subscription selects changed: the next diff looks at everything.
            st.base = None;
        }
        st.owed |= first || widened;
        st.owed_names.extend(new_names);
        self.flush(snap, out);
    }

    fn on_snapshot(&mut self, snap: &Snapshot, out: &mut Vec<DeltaDiscoveryResponse>) {
        self.flush(snap, out);
    }

    fn sync(&self, snap: &Snapshot) -> StreamSync {
        StreamSync {
            node: self.node.clone(),
            synced: stream_sync(snap, &self.types, |t, st: &DeltaType| {
                st.exact(snap) || (st.pending.is_empty() && st.sub.matches(snap, t, &st.acked))
            }),
            nacks: self.types.values().filter_map(|t| t.nack.clone()).collect(),
        }
    }

    fn response_type(response: &DeltaDiscoveryResponse) -> &str {
        &response.type_url
    }

    fn take_answers(&mut self) -> Vec<(String, bool)> {
        std::mem::take(&mut self.answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Resources;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn shared() -> (Shared, watch::Receiver<ConfigStatus>) {
        let (status, rx) = watch::channel(ConfigStatus::default());
        let shared = Shared {
            tracker: Mutex::new(Tracker::default()),
            status,
            closing: watch::channel(false).0,
            next_stream: AtomicU64::new(1),
            metrics: AdsMetrics::default(),
        };
        (shared, rx)
    }

    fn synced(generation: u64) -> StreamSync {
        StreamSync {
            synced: Some(generation),
            ..Default::default()
        }
    }

    #[test]
    fn acked_generation_needs_every_stream_and_never_goes_back() {
        let (shared, status) = shared();
        shared.register(1, None);
        shared.register(2, None);
        shared.update(1, synced(2));
        assert_eq!(status.borrow().acked_generation(), None);
        shared.update(2, synced(1));
        assert_eq!(status.borrow().acked_generation(), None, "streams disagree");
        shared.update(2, synced(2));
        assert_eq!(status.borrow().acked_generation(), Some(2));
        shared.update(1, synced(1));
        shared.update(2, synced(1));
        assert_eq!(status.borrow().acked_generation(), Some(2), "monotonic");
        let per_gateway: Vec<_> = status
            .borrow()
            .gateways()
            .iter()
            .map(|g| (g.stream, g.acked_generation))
            .collect();
        assert_eq!(per_gateway, [(1, Some(2)), (2, Some(2))], "each monotonic");
        shared.unregister(1);
        shared.unregister(2);
        assert_eq!(
            *status.borrow(),
            ConfigStatus {
                acked_generation: Some(2),
                last_nack: None,
                rejected: Vec::new(),
                connected: 0,
                gateways: Vec::new(),
            }
        );
    }

    #[test]
    fn metrics_count_streams_and_time_a_generation_until_every_stream_acks_it() {
        let (shared, _status) = shared();
        let metrics = shared.metrics.clone();
        shared.register(1, None);
        shared.register(2, None);
        assert_eq!(metrics.clients_connected.get(), 2);
        let t0 = Instant::now();
        let one = snapshot(1, 1, "a");
        shared.snapshot_seen(&one, t0);
        // The second stream seeing it later does not restart the clock.
        shared.snapshot_seen(&one, t0 + Duration::from_secs(5));
        assert_eq!(metrics.snapshot_generation.get(), 1);
        assert_eq!(
            metrics.snapshot_resources.len(),
            2,
            "clusters and listeners"
        );
        assert!(metrics.snapshot_bytes.get() > 0);
        shared.update(1, synced(1));
        assert_eq!(
            metrics.propagation_latency.count(),
            0,
            "one stream still owes it"
        );
        shared.update(2, synced(1));
        assert_eq!(metrics.propagation_latency.count(), 1);
        assert!(metrics.propagation_latency.sum() < 5.0);
        // An ACKed generation seen again (a stream that reconnects) is not timed again.
        shared.snapshot_seen(&one, Instant::now());
        shared.update(1, synced(1));
        assert_eq!(metrics.propagation_latency.count(), 1);
        shared.unregister(1);
        shared.unregister(2);
        assert_eq!(metrics.clients_connected.get(), 0);
    }

    #[test]
    fn newest_nack_is_reported_and_leaves_with_its_stream() {
        let (shared, status) = shared();
        shared.register(1, None);
        shared.register(2, None);
        let older = Nack::new(CLUSTER_TYPE_URL, "one", "v1", "old problem");
        let newer = Nack::new(LISTENER_TYPE_URL, "two", "v2", "new problem");
        shared.update(
            2,
            StreamSync {
                node: String::new(),
                synced: None,
                nacks: vec![newer.clone()],
            },
        );
        shared.update(
            1,
            StreamSync {
                node: String::new(),
                synced: None,
                nacks: vec![older.clone()],
            },
        );
        assert_eq!(status.borrow().last_nack(), Some(newer.message.clone()));
        shared.unregister(2);
        assert_eq!(status.borrow().last_nack(), Some(older.message));
    }

    #[test]
    fn a_nack_names_the_listeners_and_clusters_envoy_could_not_take() {
        let sent: Vec<String> = ["sidecar/default/a", "sidecar/default/ab", "external"]
            .map(String::from)
            .into();
        let message = "Error adding/updating listener(s) sidecar/default/ab: cannot bind \
                       '127.0.0.1:44125': Address already in use\nexternal: duplicate address\n";
        let got = rejected_names(LISTENER_TYPE_URL, message, sent.iter());
        assert_eq!(
            got,
            [
                (
                    "sidecar/default/ab".to_string(),
                    "cannot bind '127.0.0.1:44125': Address already in use".to_string()
                ),
                ("external".to_string(), "duplicate address".to_string()),
            ]
        );
        let clusters: Vec<String> = ["a", "b"].map(String::from).into();
        let got = rejected_names(
            CLUSTER_TYPE_URL,
            "Error adding/updating cluster(s) a: bad, b: worse",
            clusters.iter(),
        );
        assert_eq!(got.len(), 2);
        // A route NACK names no resource this way: it stays a plain NACK.
        assert!(rejected_names(ROUTE_TYPE_URL, "a: bad", clusters.iter()).is_empty());
    }

    fn snapshot(generation: u64, cluster_timeout: i64, stat_prefix: &str) -> Snapshot {
        let resources = Resources {
            clusters: vec![Arc::new(Cluster {
                name: "c".to_string(),
                connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: cluster_timeout,
                    nanos: 0,
                }),
                ..Default::default()
            })],
            listeners: vec![Arc::new(Listener {
                name: "l".to_string(),
                stat_prefix: stat_prefix.to_string(),
                ..Default::default()
            })],
            ..Default::default()
        };
        Snapshot::from_resources(generation, &resources)
    }

    fn sotw_request(type_url: &str, response: Option<&DiscoveryResponse>) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_string(),
            version_info: response.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: response.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_rejected_type_is_not_resent_when_another_type_changes() {
        let one = snapshot(1, 1, "a");
        let mut stream = SotwStream::default();
        let mut out = Vec::new();
        stream.on_request(sotw_request(CLUSTER_TYPE_URL, None), &one, &mut out);
        stream.on_request(sotw_request(LISTENER_TYPE_URL, None), &one, &mut out);
        assert_eq!(out.len(), 1, "listeners wait until the clusters are ACKed");
        let cds = out.remove(0);
        stream.on_request(sotw_request(CLUSTER_TYPE_URL, Some(&cds)), &one, &mut out);
        assert_eq!(out.len(), 1, "then the owed listeners follow");
        let lds = out.remove(0);
        assert_eq!(lds.type_url, LISTENER_TYPE_URL);
        stream.on_request(sotw_request(LISTENER_TYPE_URL, Some(&lds)), &one, &mut out);
        assert!(out.is_empty(), "ACKs are not answered");
        assert_eq!(stream.sync(&one).synced, Some(1));

        let two = snapshot(2, 2, "a");
        stream.on_snapshot(&two, &mut out);
        assert_eq!(out.len(), 1);
        let pushed = out.remove(0);
        assert_eq!(pushed.type_url, CLUSTER_TYPE_URL);
        let mut nack = sotw_request(CLUSTER_TYPE_URL, Some(&pushed));
        nack.version_info = cds.version_info.clone();
        nack.error_detail = Some(RpcStatus {
            code: 13,
            message: "bad".to_string(),
            ..Default::default()
        });
        stream.on_request(nack, &two, &mut out);
        assert!(out.is_empty(), "NACKs are not answered");
        let sync = stream.sync(&two);
        assert_eq!(sync.synced, None);
        assert_eq!(sync.nacks.len(), 1);
        assert_eq!(
            stream.take_answers(),
            [
                (CLUSTER_TYPE_URL.to_string(), true),
                (LISTENER_TYPE_URL.to_string(), true),
                (CLUSTER_TYPE_URL.to_string(), false),
            ],
            "two ACKs then a NACK, counted once each"
        );
        assert!(stream.take_answers().is_empty());

        let three = snapshot(3, 2, "b");
        stream.on_snapshot(&three, &mut out);
        assert_eq!(out.len(), 1, "only listeners changed");
        assert_eq!(out[0].type_url, LISTENER_TYPE_URL);
    }

    #[test]
    fn delta_ack_applies_only_the_answered_response() {
        let one = snapshot(1, 1, "a");
        let mut stream = DeltaStream::default();
        let mut out = Vec::new();
        stream.on_request(
            DeltaDiscoveryRequest {
                type_url: CLUSTER_TYPE_URL.to_string(),
                ..Default::default()
            },
            &one,
            &mut out,
        );
        let first = out.remove(0);
        let two = snapshot(2, 2, "a");
        stream.on_snapshot(&two, &mut out);
        let second = out.remove(0);
        let ack = |nonce: &str| DeltaDiscoveryRequest {
            type_url: CLUSTER_TYPE_URL.to_string(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        };
        stream.on_request(ack(&first.nonce), &two, &mut out);
        assert!(out.is_empty());
        let st = &stream.types[CLUSTER_TYPE_URL];
        assert_eq!(st.acked["c"], one.resources(CLUSTER_TYPE_URL)["c"].version);
        stream.on_request(ack(&second.nonce), &two, &mut out);
        let st = &stream.types[CLUSTER_TYPE_URL];
        assert_eq!(st.acked["c"], two.resources(CLUSTER_TYPE_URL)["c"].version);
        assert!(st.pending.is_empty());
    }

    /// Envoy's side of a delta stream: the resources it runs, by name.
    fn apply(envoy: &mut BTreeMap<String, String>, response: &DeltaDiscoveryResponse) {
        for r in &response.resources {
            envoy.insert(r.name.clone(), r.version.clone());
        }
        for name in &response.removed_resources {
            envoy.remove(name);
        }
    }

    #[test]
    fn delta_incremental_diffs_keep_envoy_exactly_in_step() {
        use crate::snapshot::tests::{Rng, edit};
        let mut rng = Rng(0x2545f4914f6cdd1d);
        let mut next = 0;
        let mut resources = Resources::default();
        for _ in 0..30 {
            edit(&mut rng, &mut resources.clusters, &mut next);
        }
        let mut snap = Snapshot::from_resources(1, &resources);
        let mut stream = DeltaStream::default();
        let mut envoy = BTreeMap::new();
        let mut out = Vec::new();
        stream.on_request(
            DeltaDiscoveryRequest {
                type_url: CLUSTER_TYPE_URL.to_string(),
                ..Default::default()
            },
            &snap,
            &mut out,
        );
        let mut nacks = 0;
        for generation in 2..400 {
            let mut changed = resources.clone();
            for _ in 0..=rng.below(3) {
                edit(&mut rng, &mut changed.clusters, &mut next);
            }
            let updated = snap.update(generation, &changed, &resources);
            snap = updated;
            resources = changed;
            // Sometimes the stream misses a snapshot (the watch channel keeps only the newest).
            if rng.below(6) != 0 {
                stream.on_snapshot(&snap, &mut out);
            }
            while !out.is_empty() {
                let response = out.remove(0);
                let rejected = rng.below(25) == 0;
                if rejected {
                    nacks += 1;
                } else {
                    apply(&mut envoy, &response);
                }
                let reply = DeltaDiscoveryRequest {
                    type_url: CLUSTER_TYPE_URL.to_string(),
                    response_nonce: response.nonce.clone(),
                    error_detail: rejected.then(|| RpcStatus {
                        code: 13,
                        message: "rejected".to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                stream.on_request(reply, &snap, &mut out);
            }
            let want: BTreeMap<String, String> = snap
                .resources(CLUSTER_TYPE_URL)
                .values()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect();
            let st = &stream.types[CLUSTER_TYPE_URL];
            assert_eq!(
                st.acked, envoy,
                "generation {generation}: acked is what Envoy runs"
            );
            let synced = stream.sync(&snap).synced;
            assert_eq!(
                synced == Some(generation),
                envoy == want,
                "generation {generation}: synced {synced:?}"
            );
            // A rejected resource is not sent again until it changes (as go-control-plane does);
            // until the first rejection, everything sent is what Envoy runs.
            if nacks == 0 && st.base == Some(snap.id()) {
                assert_eq!(envoy, want, "generation {generation}");
            }
        }
        assert!(nacks > 0, "the run covered rejections");
    }
}
