//! The reconcile loop that ties the pieces together: source -> translate -> snapshot (served by ADS)
//! -> Envoy's ACK -> probe -> Knative status. It owns no protocol and no parsing: each step is a call
//! into the module that does it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};

use sluice_api::Ingress;
use sluice_api::ingress::{IngressStatus, VISIBILITY_CLUSTER_LOCAL};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;

use crate::ads::{ConfigStatus, GatewayStatus, Rejection};
use crate::gateways::{self, Assessment, GatewayReport};
use crate::prober::{self, CATCH_ALL_PROBE_HOST};
use crate::resources::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL, Resources};
use crate::snapshot::{Snapshot, content_version};
use crate::source::{SourceError, SourceSnapshot, StateSource};
use crate::state::ObjectKey;
use crate::status::{self, LoadBalancers, Probe, Progress};
use crate::translate::{GatewayConfig, IngressOutcome, Translator};

/// Probes in flight at once (startup with thousands of Ingresses must not open thousands of sockets).
const PROBE_CONCURRENCY: usize = 32;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long status changes may wait to be batched into one report.
const REPORT_DELAY: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub gateway: GatewayConfig,
    pub load_balancers: LoadBalancers,
    /// Where each gateway is probed.
    pub probe: ProbeTargets,
    /// How long a gateway may be behind the newest configuration before Ingresses stop waiting for
    /// it (see [`gateways`]).
    pub ack_timeout: Duration,
    /// Whether this replica is the leader (writes status, runs probes), when several run; None:
    /// always (the only replica). A source's status that is Ready at the Ingress's generation is
    /// then trusted as proved by an earlier leader, so a new leader does not flap Ready.
    pub leader: Option<watch::Receiver<bool>>,
}

/// Where the gateways' listeners are reached for readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTargets {
    /// Every gateway at its ADS stream's peer IP with these ports, as net-kourier probes each gateway
    /// pod (not the Service VIP, which would prove only that some gateway serves the Ingress).
    PerGateway {
        external_port: u16,
        internal_port: u16,
    },
    /// Fixed addresses, probed once for all gateways (`sluice up`, where Envoy is local).
    Fixed {
        external: SocketAddr,
        internal: SocketAddr,
    },
}

/// Which probe a gateway needs: its IP (None: the fixed addresses).
type ProbeKey = Option<IpAddr>;

/// What `sluice status` and the control API show.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Every Ingress of Sluice's class, with its status (shared: the report is rebuilt on every status
    /// change, and only the changed Ingresses are new).
    pub ingresses: Vec<Arc<Ingress>>,
    /// Problems with files or objects, each naming where it is.
    pub errors: Vec<ReportedError>,
    pub envoy: EnvoyReport,
    /// Listeners and Clusters Envoy rejected: left out of the configuration (or kept at the version
    /// Envoy runs) until their content changes, so the rest is applied and ACKed.
    pub rejected: Vec<RejectedResource>,
    /// Every gateway connected over ADS, and whether Ingresses wait for it.
    pub gateways: Vec<GatewayReport>,
    /// This replica writes status (the only one, or the Lease's holder).
    pub leading: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedResource {
    /// `Listener` or `Cluster`.
    pub kind: String,
    pub name: String,
    /// Envoy's message.
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReportedError {
    pub origin: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyReport {
    /// The newest configuration generation the xds-server serves.
    pub generation: u64,
    /// The newest generation every connected Envoy has ACKed.
    pub acked_generation: Option<u64>,
    /// Envoy's last rejection of a configuration, if the newest one was rejected.
    pub last_nack: Option<String>,
}

/// A probe to run: every (listener, host) of one Ingress version on one gateway.
struct ProbeStart {
    key: ObjectKey,
    hash: String,
    gateway: ProbeKey,
    targets: Vec<(SocketAddr, String)>,
    attempt: u32,
}

struct ProbeResult {
    key: ObjectKey,
    hash: String,
    gateway: ProbeKey,
    result: Result<(), String>,
    attempt: u32,
}

/// Runs until the source ends or fails. Publishes every snapshot to `snapshots` and every status change
/// to `report`, and writes changed Ingress statuses back through the source.
pub async fn run(
    source: Arc<dyn StateSource>,
    config: ControllerConfig,
    snapshots: watch::Sender<Arc<Snapshot>>,
    mut acks: watch::Receiver<ConfigStatus>,
    report: watch::Sender<StatusReport>,
) -> Result<(), SourceError> {
    let (source_tx, mut source_rx) = watch::channel(SourceSnapshot::default());
    let source_task = {
        let source = source.clone();
        async move { source.run(source_tx).await }
    };
    tokio::pin!(source_task);

    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<ProbeResult>();
    let probe_slots = Arc::new(Semaphore::new(PROBE_CONCURRENCY));
    let ack_timeout = config.ack_timeout;
    let mut leader = config.leader.clone();
    let mut r = Reconciler::new(config);
    r.leading = leader.as_ref().is_none_or(|l| *l.borrow());
    let mut written: BTreeMap<ObjectKey, IngressStatus> = BTreeMap::new();
    // When each generation was first served: how long a gateway has been behind.
    let mut published: BTreeMap<u64, Instant> = BTreeMap::new();
    let serve = |snapshot: Arc<Snapshot>, published: &mut BTreeMap<u64, Instant>| {
        published.insert(snapshot.generation(), Instant::now());
        let _ = snapshots.send(snapshot);
    };
    let mut view = Assessment::default();

    // Statuses are recomputed at most every REPORT_DELAY: the report is O(Ingresses), and one change
    // brings several events (source, ACKs, probe results) that must not each pay for it.
    let mut report_due: Option<tokio::time::Instant> = None;
    loop {
        let next_check = view.next_check.map(tokio::time::Instant::from_std);
        tokio::select! {
            res = &mut source_task => return res,
            () = async {
                match report_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                report_due = None;
                let ack = acks.borrow().clone();
                let (rep, changed) = r.report(&ack, &view, Instant::now());
                // Only the leader writes; the others compute the same statuses for their report.
                let writes: &[Arc<Ingress>] = if r.leading { &changed } else { &[] };
                for ingress in writes {
                    let key = (
                        ingress.metadata.namespace.clone(),
                        ingress.metadata.name.clone(),
                    );
                    // What the source holds counts as written: a restarted or new leader does not
                    // rewrite what an earlier one wrote.
                    let current = written.get(&key).or_else(|| {
                        r.source.state.ingresses.get(&key).map(|i| &i.status)
                    });
                    if current != Some(&ingress.status) {
                        if let Err(e) = source.write_ingress_status(ingress).await {
                            tracing::warn!(ingress = %ingress.metadata.key(), "writing status: {e}");
                            // Retried at the next report (forgotten, so it counts as changed).
                            r.reported.remove(&key);
                            r.dirty.insert(key);
                            continue;
                        }
                        written.insert(key, ingress.status.clone());
                    }
                }
                if written.len() > rep.ingresses.len() {
                    written.retain(|k, _| r.known(k));
                }
                // Subscribers (the serving plane, `sluice status`) only hear of real changes.
                report.send_if_modified(|current| {
                    let modified = !changed.is_empty()
                        || current.ingresses.len() != rep.ingresses.len()
                        || current.errors != rep.errors
                        || current.envoy != rep.envoy
                        || current.rejected != rep.rejected
                        || current.gateways != rep.gateways
                        || current.leading != rep.leading;
                    if modified {
                        *current = rep;
                    }
                    modified
                });
                continue;
            }
            changed = source_rx.changed() => {
                if changed.is_err() { return Ok(()); }
                let snap = source_rx.borrow_and_update().clone();
                let started = std::time::Instant::now();
                let new = r.apply_source(snap);
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    generation = new.as_ref().map(|s| s.generation()),
                    "translated the source's state"
                );
                if let Some(new) = new {
                    serve(new, &mut published);
                }
            }
            changed = acks.changed() => {
                if changed.is_err() { return Ok(()); }
            }
            changed = async {
                match &mut leader {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let leading = changed.is_ok() && leader.as_mut().is_some_and(|l| *l.borrow_and_update());
                if changed.is_err() {
                    leader = None;
                }
                if leading != r.leading {
                    tracing::info!(leading, "leadership changed");
                    r.set_leading(leading);
                    written.clear();
                }
            }
            () = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            Some(p) = probe_rx.recv() => r.apply_probe(p),
        }
        let ack = acks.borrow().clone();
        gateways::prune_published(&mut published, ack.gateways());
        view = gateways::assess(
            ack.gateways(),
            r.generation,
            &published,
            Instant::now(),
            ack_timeout,
        );
        let acked = view.acked_generation().or(ack.acked_generation());
        r.note_acked(acked);
        if let Some(new) = r.quarantine(ack.rejected()) {
            serve(new, &mut published);
        }
        if let Some(new) = r.finish_removals(acked) {
            serve(new, &mut published);
        }
        for ProbeStart {
            key,
            hash,
            gateway,
            targets,
            attempt,
        } in r.probes_to_start(&view)
        {
            let tx = probe_tx.clone();
            let slots = probe_slots.clone();
            tokio::spawn(async move {
                if attempt > 0 {
                    // Envoy may ACK just before a new listener finishes warming: back off and retry.
                    let backoff = Duration::from_millis(25u64 << attempt.min(5));
                    tokio::time::sleep(backoff).await;
                }
                let _slot = slots.acquire_owned().await;
                let mut result = Ok(());
                for (addr, host) in &targets {
                    if let Err(e) = prober::probe(*addr, host, &hash, PROBE_TIMEOUT).await {
                        result = Err(e);
                        break;
                    }
                }
                let _ = tx.send(ProbeResult {
                    key,
                    hash,
                    gateway,
                    result,
                    attempt,
                });
            });
        }
        report_due.get_or_insert_with(|| tokio::time::Instant::now() + REPORT_DELAY);
    }
}

/// Adds to `new` the clusters (and their endpoints) of `previous` that `new` drops, so routes that
/// Envoy still runs never point at a missing cluster (a 503 while the new routes arrive). Returns
/// whether it added any.
fn keep_removed_clusters(new: &mut Resources, previous: &Resources) -> bool {
    let names: BTreeSet<String> = new.clusters.iter().map(|c| c.name.clone()).collect();
    let dropped: Vec<_> = previous
        .clusters
        .iter()
        .filter(|c| !names.contains(&c.name))
        .cloned()
        .collect();
    if dropped.is_empty() {
        return false;
    }
    let dropped_names: BTreeSet<&str> = dropped.iter().map(|c| c.name.as_str()).collect();
    new.cluster_load_assignments.extend(
        previous
            .cluster_load_assignments
            .iter()
            .filter(|a| dropped_names.contains(a.cluster_name.as_str()))
            .cloned(),
    );
    new.clusters.extend(dropped);
    true
}

/// Whether `new`, made from `previous`, lacks a cluster that `previous` has.
fn drops_clusters(new: &Snapshot, previous: &Snapshot) -> bool {
    let (now, before) = (
        new.resources(CLUSTER_TYPE_URL),
        previous.resources(CLUSTER_TYPE_URL),
    );
    match new.changes_since(previous.id(), CLUSTER_TYPE_URL) {
        Some(changed) => changed
            .iter()
            .any(|n| !now.contains_key(n) && before.contains_key(n)),
        None => before.keys().any(|n| !now.contains_key(n)),
    }
}

/// `Listener` or `Cluster`: the last word of a type URL.
fn kind_of(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or_default()
}

/// A resource Envoy runs, from its packed bytes.
fn decode_kept(type_url: &str, bytes: &[u8]) -> Option<Kept> {
    match type_url {
        LISTENER_TYPE_URL => Listener::decode(bytes)
            .ok()
            .map(|l| Kept::Listener(Arc::new(l))),
        CLUSTER_TYPE_URL => Cluster::decode(bytes)
            .ok()
            .map(|c| Kept::Cluster(Arc::new(c))),
        _ => None,
    }
}

/// How a gateway is named in messages: its node id and address.
fn gateway_name(g: &GatewayStatus) -> String {
    match (g.node.as_str(), g.peer) {
        ("", Some(peer)) => peer.to_string(),
        ("", None) => format!("stream {}", g.stream),
        (node, Some(peer)) => format!("{node} ({peer})"),
        (node, None) => node.to_string(),
    }
}

/// Walks a sorted map along with ascending keys.
struct Cursor<'a, K, V> {
    entries: std::iter::Peekable<std::collections::btree_map::Iter<'a, K, V>>,
}

impl<'a, K: Ord, V> Cursor<'a, K, V> {
    fn new(map: &'a BTreeMap<K, V>) -> Self {
        Cursor {
            entries: map.iter().peekable(),
        }
    }

    /// The value at `key`; keys must be asked for in ascending order.
    fn seek(&mut self, key: &K) -> Option<&'a V> {
        while self.entries.next_if(|(k, _)| *k < key).is_some() {}
        self.entries
            .peek()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// The controller's memory between events; no I/O.
struct Reconciler {
    config: ControllerConfig,
    translator: Translator,
    generation: u64,
    last: Option<Arc<Snapshot>>,
    /// The resources of `last`.
    last_resources: Resources,
    /// Break after make: clusters a new configuration drops stay (in `last`) until Envoy has ACKed the
    /// routes that no longer use them; then this, the configuration without them, is served.
    without_removed: Option<Resources>,
    source: SourceSnapshot,
    outcomes: BTreeMap<ObjectKey, IngressOutcome>,
    /// For each programmed Ingress: its hash and the first generation that carried it.
    programmed: BTreeMap<ObjectKey, (String, u64)>,
    /// Probe results of each Ingress's current hash, per gateway.
    probes: BTreeMap<ObjectKey, (String, BTreeMap<ProbeKey, Probe>)>,
    /// Programmed Ingresses whose current hash has no successful probe yet: the only ones whose
    /// status can change without a change of their own (an ACK, a NACK, a probe), and the only ones
    /// probes are started for. Small once things settle, so an event costs what is in flight.
    unprobed: BTreeSet<ObjectKey>,
    in_flight: BTreeMap<ObjectKey, BTreeSet<ProbeKey>>,
    attempts: BTreeMap<ObjectKey, BTreeMap<ProbeKey, u32>>,
    /// Writes status and probes (see [`ControllerConfig::leader`]).
    leading: bool,
    /// Trust a source status that is Ready at the Ingress's generation.
    trust_ready: bool,
    /// The Ingresses of the last report, with their status.
    reported: BTreeMap<ObjectKey, Arc<Ingress>>,
    /// Ingresses whose status must be recomputed at the next report (besides `unprobed`).
    dirty: BTreeSet<ObjectKey>,
    /// The newest snapshot every Envoy ACKed: what Envoy runs.
    acked: Option<Arc<Snapshot>>,
    /// Resources Envoy rejected, by (type URL, name): held back while their content is the rejected
    /// one, so one bad resource never keeps the others from being ACKed.
    quarantined: BTreeMap<(String, String), Quarantined>,
    /// The rejections (key, Envoy's message) the last report's statuses were made with.
    reported_rejections: BTreeMap<(String, String), String>,
}

#[derive(Debug, Clone)]
struct Quarantined {
    /// The rejected content version.
    version: String,
    message: String,
    /// What Envoy runs under that name (served instead), if anything.
    keep: Option<Kept>,
}

#[derive(Debug, Clone)]
enum Kept {
    Listener(Arc<Listener>),
    Cluster(Arc<Cluster>),
}

impl Reconciler {
    fn new(config: ControllerConfig) -> Self {
        Reconciler {
            leading: true,
            trust_ready: config.leader.is_some(),
            translator: Translator::new(config.gateway.clone()),
            config,
            generation: 0,
            last: None,
            last_resources: Resources::default(),
            without_removed: None,
            source: SourceSnapshot::default(),
            outcomes: BTreeMap::new(),
            programmed: BTreeMap::new(),
            probes: BTreeMap::new(),
            unprobed: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            attempts: BTreeMap::new(),
            reported: BTreeMap::new(),
            dirty: BTreeSet::new(),
            acked: None,
            quarantined: BTreeMap::new(),
            reported_rejections: BTreeMap::new(),
        }
    }

    /// Starts or stops writing status and probing. A new leader recomputes every status against
    /// what the source holds (an earlier leader wrote it).
    fn set_leading(&mut self, leading: bool) {
        self.leading = leading;
        if leading {
            self.reported.clear();
            self.dirty.extend(self.outcomes.keys().cloned());
        }
    }

    /// Remembers the snapshot Envoy runs, once the gateways ACKed the newest one.
    fn note_acked(&mut self, acked: Option<u64>) {
        if let Some(last) = &self.last
            && acked >= Some(last.generation())
        {
            self.acked = Some(last.clone());
        }
    }

    /// Holds back newly rejected resources: returns the snapshot without them, if any is new.
    fn quarantine(&mut self, rejected: &[Rejection]) -> Option<Arc<Snapshot>> {
        let mut added = false;
        for r in rejected {
            let key = (r.type_url.clone(), r.name.clone());
            if self
                .quarantined
                .get(&key)
                .is_some_and(|q| q.version == r.version)
            {
                continue;
            }
            // Only what the served snapshot still holds at the rejected version.
            let current = self
                .last
                .as_ref()
                .and_then(|s| s.resources(&r.type_url).get(&r.name).cloned());
            if current.is_none_or(|c| c.version != r.version) {
                continue;
            }
            let keep = self
                .acked
                .as_ref()
                .and_then(|s| s.resources(&r.type_url).get(&r.name).cloned())
                .filter(|ran| ran.version != r.version)
                .and_then(|ran| decode_kept(&r.type_url, &ran.resource.value));
            tracing::warn!(
                type_url = r.type_url,
                name = r.name,
                "Envoy rejected it: held back until its content changes: {}",
                r.message
            );
            self.quarantined.insert(
                key,
                Quarantined {
                    version: r.version.clone(),
                    message: r.message.clone(),
                    keep,
                },
            );
            added = true;
        }
        if !added {
            return None;
        }
        let mut resources = self.last_resources.clone();
        self.hold_back(&mut resources);
        if let Some(without) = &mut self.without_removed {
            let mut w = std::mem::take(without);
            self.hold_back(&mut w);
            self.without_removed = Some(w);
        }
        let candidate = self.next_snapshot(self.generation + 1, &resources);
        if self
            .last
            .as_ref()
            .is_some_and(|last| last.same_content(&candidate))
        {
            return None;
        }
        self.generation += 1;
        Some(self.publish(candidate, resources))
    }

    /// Forgets the quarantine of resources a new translation no longer has: they need no holding
    /// back. (Not done on the served configuration, which lacks what is held back.)
    fn forget_absent(&mut self, resources: &Resources) {
        if self.quarantined.is_empty() {
            return;
        }
        let present: BTreeSet<(String, String)> = resources
            .listeners
            .iter()
            .map(|l| (LISTENER_TYPE_URL.to_string(), l.name.clone()))
            .chain(
                resources
                    .clusters
                    .iter()
                    .map(|c| (CLUSTER_TYPE_URL.to_string(), c.name.clone())),
            )
            .filter(|k| self.quarantined.contains_key(k))
            .collect();
        self.quarantined.retain(|k, _| present.contains(k));
    }

    /// Replaces each quarantined resource still at its rejected version by what Envoy runs (or drops
    /// it); forgets the quarantine of a resource whose content changed (it gets a new try).
    fn hold_back(&mut self, resources: &mut Resources) {
        if self.quarantined.is_empty() {
            return;
        }
        let quarantined = &mut self.quarantined;
        let mut retry = Vec::new();
        resources.listeners.retain_mut(|l| {
            let key = (LISTENER_TYPE_URL.to_string(), l.name.clone());
            match quarantined.get(&key) {
                None => true,
                Some(q) if q.version != content_version(&**l) => {
                    retry.push(key);
                    true
                }
                Some(q) => match &q.keep {
                    Some(Kept::Listener(kept)) => {
                        *l = kept.clone();
                        true
                    }
                    _ => false,
                },
            }
        });
        resources.clusters.retain_mut(|c| {
            let key = (CLUSTER_TYPE_URL.to_string(), c.name.clone());
            match quarantined.get(&key) {
                None => true,
                Some(q) if q.version != content_version(&**c) => {
                    retry.push(key);
                    true
                }
                Some(q) => match &q.keep {
                    Some(Kept::Cluster(kept)) => {
                        *c = kept.clone();
                        true
                    }
                    _ => false,
                },
            }
        });
        for key in retry {
            quarantined.remove(&key);
        }
    }

    fn known(&self, key: &ObjectKey) -> bool {
        self.outcomes.contains_key(key)
    }

    /// Translates the new state; returns a snapshot to serve when the Envoy resources changed.
    fn apply_source(&mut self, source: SourceSnapshot) -> Option<Arc<Snapshot>> {
        let translation = self.translator.translate(&source.state);
        let previous = std::mem::replace(&mut self.source, source);
        let mut resources = translation.resources;
        self.forget_absent(&resources);
        self.hold_back(&mut resources);
        let mut candidate = self.next_snapshot(self.generation + 1, &resources);
        self.without_removed = None;
        // The snapshot knows what changed since the last one: a dropped cluster is among that.
        if let Some(last) = &self.last
            && drops_clusters(&candidate, last)
        {
            // Cloned only when clusters are dropped (rare; the clone is O(config)).
            let mut kept = resources.clone();
            keep_removed_clusters(&mut kept, &self.last_resources);
            self.without_removed = Some(std::mem::replace(&mut resources, kept));
            candidate = self.next_snapshot(self.generation + 1, &resources);
        }
        let changed = self
            .last
            .as_ref()
            .is_none_or(|last| !last.same_content(&candidate));
        if changed {
            self.generation += 1;
        }
        let generation = self.generation;
        // One walk over maps sorted by the same key, instead of lookups: thousands of Ingresses stay
        // as they are, and each costs a few key comparisons.
        let mut before = Cursor::new(&previous.state.ingresses);
        let mut now = Cursor::new(&self.source.state.ingresses);
        let mut programmed = Cursor::new(&self.programmed);
        let mut old_outcomes = self.outcomes.iter().peekable();
        let mut gone = Vec::new();
        let mut reprogrammed: Vec<(ObjectKey, Option<String>)> = Vec::new();
        for (key, outcome) in &translation.ingresses {
            while let Some((old, _)) = old_outcomes.next_if(|(k, _)| *k < key) {
                gone.push(old.clone());
            }
            let old_outcome = old_outcomes.next_if(|(k, _)| *k == key).map(|(_, o)| o);
            if before.seek(key) != now.seek(key) || old_outcome != Some(outcome) {
                self.dirty.insert(key.clone());
            }
            let current = programmed.seek(key).map(|(h, _)| h.as_str());
            match outcome.hash() {
                Some(hash) if current != Some(hash) => {
                    reprogrammed.push((key.clone(), Some(hash.to_string())))
                }
                None if current.is_some() => reprogrammed.push((key.clone(), None)),
                _ => {}
            }
        }
        gone.extend(old_outcomes.map(|(k, _)| k.clone()));
        for (key, hash) in reprogrammed {
            // A probe or its attempts count only for the hash they were made for.
            self.probes.remove(&key);
            self.attempts.remove(&key);
            match hash {
                Some(hash) => {
                    self.programmed.insert(key.clone(), (hash, generation));
                    self.unprobed.insert(key);
                }
                None => {
                    self.programmed.remove(&key);
                    self.unprobed.remove(&key);
                }
            }
        }
        for key in &gone {
            self.programmed.remove(key);
            self.unprobed.remove(key);
            self.probes.remove(key);
            self.attempts.remove(key);
            self.reported.remove(key);
            self.dirty.remove(key);
        }
        self.outcomes = translation.ingresses;
        if changed {
            Some(self.publish(candidate, resources))
        } else {
            None
        }
    }

    /// The snapshot of `resources`, made from the last one so that it reuses what is unchanged and
    /// records what changed.
    fn next_snapshot(&self, generation: u64, resources: &Resources) -> Snapshot {
        match &self.last {
            Some(last) => last.update(generation, resources, &self.last_resources),
            None => Snapshot::from_resources(generation, resources),
        }
    }

    fn publish(&mut self, snapshot: Snapshot, resources: Resources) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        self.last = Some(snapshot.clone());
        self.last_resources = resources;
        snapshot
    }

    /// Once Envoy runs the configuration that still carries dropped clusters, drops them.
    fn finish_removals(&mut self, acked: Option<u64>) -> Option<Arc<Snapshot>> {
        if acked < Some(self.generation) {
            return None;
        }
        let resources = self.without_removed.take()?;
        self.generation += 1;
        let snapshot = self.next_snapshot(self.generation, &resources);
        Some(self.publish(snapshot, resources))
    }

    fn apply_probe(&mut self, p: ProbeResult) {
        if let Some(flying) = self.in_flight.get_mut(&p.key) {
            flying.remove(&p.gateway);
            if flying.is_empty() {
                self.in_flight.remove(&p.key);
            }
        }
        let current = self.programmed.get(&p.key).map(|(h, _)| h.as_str());
        if current != Some(p.hash.as_str()) {
            return; // a newer version replaced it while probing
        }
        let probe = match p.result {
            Ok(()) => Probe::Succeeded,
            Err(e) => {
                self.attempts
                    .entry(p.key.clone())
                    .or_default()
                    .insert(p.gateway, p.attempt + 1);
                Probe::Failed(e)
            }
        };
        self.dirty.insert(p.key.clone());
        let entry = self
            .probes
            .entry(p.key)
            .or_insert_with(|| (p.hash.clone(), BTreeMap::new()));
        if entry.0 != p.hash {
            *entry = (p.hash, BTreeMap::new());
        }
        entry.1.insert(p.gateway, probe);
    }

    /// The probe a gateway needs.
    fn probe_key(&self, gateway: &GatewayStatus) -> ProbeKey {
        match self.config.probe {
            ProbeTargets::Fixed { .. } => None,
            ProbeTargets::PerGateway { .. } => Some(
                gateway
                    .peer
                    .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |p| p.ip()),
            ),
        }
    }

    /// Whether the source's status says an earlier leader proved this version served.
    fn proved_earlier(&self, key: &ObjectKey) -> bool {
        self.trust_ready
            && self.source.state.ingresses.get(key).is_some_and(|i| {
                i.metadata.generation > 0
                    && i.status.status.observed_generation == i.metadata.generation
                    && status::is_ready(&i.status)
            })
    }

    /// Whether the gateway runs a configuration carrying the Ingress's current version.
    fn acked_by(&self, key: &ObjectKey, gateway: &GatewayStatus) -> bool {
        match (self.programmed.get(key), gateway.acked_generation) {
            (Some((_, first)), Some(acked)) => acked >= *first,
            _ => false,
        }
    }

    /// How far a programmed Ingress is: ACKed by every counted gateway, then probed on each.
    fn serving_progress(&self, key: &ObjectKey, view: &Assessment) -> Progress {
        if self.proved_earlier(key) {
            return Progress::Programmed {
                acked: true,
                probe: Probe::Succeeded,
                nack: None,
                waiting: None,
            };
        }
        let counted: Vec<&GatewayStatus> = view.counted().collect();
        if counted.is_empty() {
            return Progress::Programmed {
                acked: false,
                probe: Probe::NotYet,
                nack: None,
                waiting: Some("Waiting for a gateway to connect".to_string()),
            };
        }
        let lagging: Vec<&&GatewayStatus> =
            counted.iter().filter(|g| !self.acked_by(key, g)).collect();
        if !lagging.is_empty() {
            let names: Vec<String> = lagging.iter().map(|g| gateway_name(g)).collect();
            return Progress::Programmed {
                acked: false,
                probe: Probe::NotYet,
                nack: lagging.iter().find_map(|g| g.nack.clone()),
                waiting: Some(format!(
                    "Waiting for gateway {} to accept the configuration",
                    names.join(", ")
                )),
            };
        }
        let hash = self.programmed.get(key).map(|(h, _)| h.as_str());
        let results = self
            .probes
            .get(key)
            .filter(|(h, _)| Some(h.as_str()) == hash)
            .map(|(_, r)| r);
        let mut probe = Probe::Succeeded;
        for g in counted {
            match results.and_then(|r| r.get(&self.probe_key(g))) {
                Some(Probe::Succeeded) => {}
                Some(Probe::Failed(e)) => {
                    probe = Probe::Failed(format!("gateway {}: {e}", gateway_name(g)));
                    break;
                }
                _ => probe = Probe::NotYet,
            }
        }
        Progress::Programmed {
            acked: true,
            probe,
            nack: None,
            waiting: None,
        }
    }

    /// Probes to start now: for each Ingress whose current hash is not yet proved served, each
    /// counted gateway that ACKed it and has no success and none in flight. Only the leader probes.
    fn probes_to_start(&mut self, view: &Assessment) -> Vec<ProbeStart> {
        let mut out = Vec::new();
        if !self.leading {
            return out;
        }
        let counted: Vec<&GatewayStatus> = view.counted().collect();
        if counted.is_empty() {
            return out;
        }
        // Called on every event: select without cloning, so thousands of settled Ingresses stay
        // untouched.
        let mut wanted: Vec<(ObjectKey, ProbeKey)> = Vec::new();
        for key in &self.unprobed {
            if self.proved_earlier(key) {
                continue;
            }
            let hash = self.programmed.get(key).map(|(h, _)| h.as_str());
            let results = self
                .probes
                .get(key)
                .filter(|(h, _)| Some(h.as_str()) == hash);
            let mut keys: BTreeSet<ProbeKey> = BTreeSet::new();
            for g in &counted {
                if self.acked_by(key, g) {
                    keys.insert(self.probe_key(g));
                }
            }
            for pk in keys {
                let flying = self.in_flight.get(key).is_some_and(|f| f.contains(&pk));
                let done =
                    results.is_some_and(|(_, r)| matches!(r.get(&pk), Some(Probe::Succeeded)));
                if !flying && !done {
                    wanted.push((key.clone(), pk));
                }
            }
        }
        for (key, pk) in wanted {
            let (hash, _) = &self.programmed[&key];
            let Some(ingress) = self.source.state.ingresses.get(&key) else {
                continue;
            };
            let targets = self.probe_targets(ingress, pk);
            let attempt = self
                .attempts
                .get(&key)
                .and_then(|a| a.get(&pk))
                .copied()
                .unwrap_or(0);
            self.in_flight.entry(key.clone()).or_default().insert(pk);
            out.push(ProbeStart {
                key,
                hash: hash.clone(),
                gateway: pk,
                targets,
                attempt,
            });
        }
        out
    }

    /// Every (listener, host) the Ingress must be served on, at one gateway.
    fn probe_targets(&self, ingress: &Ingress, gateway: ProbeKey) -> Vec<(SocketAddr, String)> {
        let (external, internal) = match (self.config.probe, gateway) {
            (ProbeTargets::Fixed { external, internal }, _) => (external, internal),
            (
                ProbeTargets::PerGateway {
                    external_port,
                    internal_port,
                },
                ip,
            ) => {
                let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
                (
                    SocketAddr::new(ip, external_port),
                    SocketAddr::new(ip, internal_port),
                )
            }
        };
        let mut targets = BTreeSet::new();
        for rule in &ingress.spec.rules {
            let addr = if rule.visibility == VISIBILITY_CLUSTER_LOCAL {
                internal
            } else {
                external
            };
            if rule.hosts.is_empty() {
                targets.insert((addr, CATCH_ALL_PROBE_HOST.to_string()));
            }
            for host in &rule.hosts {
                targets.insert((addr, host.clone()));
            }
        }
        targets.into_iter().collect()
    }

    /// Marks dirty the Ingresses served through a resource whose rejection is new, changed or over.
    /// Rejections are rare: only then is every Ingress looked at.
    fn note_rejections(&mut self) {
        let same = self.quarantined.len() == self.reported_rejections.len()
            && self
                .quarantined
                .iter()
                .zip(&self.reported_rejections)
                .all(|((k, q), (rk, m))| k == rk && q.message == *m);
        if same {
            return;
        }
        let now: BTreeMap<(String, String), String> = self
            .quarantined
            .iter()
            .map(|(k, q)| (k.clone(), q.message.clone()))
            .collect();
        let before = std::mem::replace(&mut self.reported_rejections, now);
        let moved: BTreeSet<&(String, String)> = before
            .iter()
            .filter(|(k, m)| self.reported_rejections.get(*k) != Some(*m))
            .chain(
                self.reported_rejections
                    .iter()
                    .filter(|(k, m)| before.get(*k) != Some(*m)),
            )
            .map(|(k, _)| k)
            .collect();
        for (key, outcome) in &self.outcomes {
            if outcome
                .uses()
                .iter()
                .any(|(t, n)| moved.contains(&(t.to_string(), n.clone())))
            {
                self.dirty.insert(key.clone());
            }
        }
    }

    /// What Envoy rejected of the Listeners and Clusters `outcome` is served through, in its words.
    fn rejected_uses(&self, outcome: &IngressOutcome) -> Option<String> {
        if self.quarantined.is_empty() {
            return None;
        }
        let each: Vec<String> = outcome
            .uses()
            .iter()
            .filter_map(|(type_url, name)| {
                let q = self
                    .quarantined
                    .get(&(type_url.to_string(), name.clone()))?;
                Some(format!(
                    "Envoy rejected {} {name}: {}",
                    kind_of(type_url),
                    q.message
                ))
            })
            .collect();
        (!each.is_empty()).then(|| each.join("; "))
    }

    /// The report, recomputing only the Ingresses that may have changed; also returns those whose
    /// status did change.
    fn report(
        &mut self,
        ack: &ConfigStatus,
        view: &Assessment,
        at: Instant,
    ) -> (StatusReport, Vec<Arc<Ingress>>) {
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let nack = ack.last_nack();
        let mut changed = Vec::new();
        self.note_rejections();
        let mut keys = std::mem::take(&mut self.dirty);
        keys.extend(self.unprobed.iter().cloned());
        for key in keys {
            let (Some(outcome), Some(ingress)) = (
                self.outcomes.get(&key),
                self.source.state.ingresses.get(&key),
            ) else {
                self.reported.remove(&key);
                continue;
            };
            let progress = match (outcome.rejection(), self.rejected_uses(outcome)) {
                (Some((reason, message)), _) => Progress::Rejected {
                    reason: reason.to_string(),
                    message: message.to_string(),
                },
                (None, Some(message)) => Progress::EnvoyRejected { message },
                (None, None) => {
                    let progress = self.serving_progress(&key, view);
                    if matches!(
                        progress,
                        Progress::Programmed {
                            probe: Probe::Succeeded,
                            ..
                        }
                    ) {
                        self.unprobed.remove(&key);
                    }
                    progress
                }
            };
            let mut with_status = Ingress::clone(ingress);
            let previous = self.reported.get(&key);
            if let Some(prev) = previous {
                with_status.status = prev.status.clone();
            }
            with_status.status = status::ingress_status(
                &with_status,
                &progress,
                outcome.contested(),
                &self.config.load_balancers,
                &now,
            );
            if previous.is_some_and(|p| **p == with_status) {
                continue;
            }
            let with_status = Arc::new(with_status);
            changed.push(with_status.clone());
            self.reported.insert(key, with_status);
        }
        let report = StatusReport {
            ingresses: self.reported.values().cloned().collect(),
            errors: self
                .source
                .errors
                .iter()
                .map(|e| ReportedError {
                    origin: e.origin.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            envoy: EnvoyReport {
                generation: self.generation,
                acked_generation: view.acked_generation().or(ack.acked_generation()),
                last_nack: nack,
            },
            gateways: view.report(at),
            leading: self.leading,
            rejected: self
                .quarantined
                .iter()
                .map(|((type_url, name), q)| RejectedResource {
                    kind: kind_of(type_url).to_string(),
                    name: name.clone(),
                    message: q.message.clone(),
                })
                .collect(),
        };
        (report, changed)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    use super::*;
    use crate::status::LoadBalancers;

    fn resources(clusters: &[&str]) -> Resources {
        Resources {
            clusters: clusters
                .iter()
                .map(|n| {
                    Arc::new(Cluster {
                        name: n.to_string(),
                        ..Default::default()
                    })
                })
                .collect(),
            cluster_load_assignments: clusters
                .iter()
                .map(|n| {
                    Arc::new(ClusterLoadAssignment {
                        cluster_name: n.to_string(),
                        ..Default::default()
                    })
                })
                .collect(),
            ..Default::default()
        }
    }

    fn names(r: &Resources) -> (BTreeSet<String>, BTreeSet<String>) {
        (
            r.clusters.iter().map(|c| c.name.clone()).collect(),
            r.cluster_load_assignments
                .iter()
                .map(|c| c.cluster_name.clone())
                .collect(),
        )
    }

    #[test]
    fn dropped_clusters_stay_until_routes_move_off_them() {
        let previous = resources(&["old", "kept"]);
        let mut new = resources(&["kept", "added"]);
        assert!(keep_removed_clusters(&mut new, &previous));
        let want: BTreeSet<String> = ["old", "kept", "added"].map(String::from).into();
        assert_eq!(names(&new), (want.clone(), want));

        let mut same = resources(&["old", "kept"]);
        assert!(
            !keep_removed_clusters(&mut same, &previous),
            "nothing dropped"
        );
    }

    fn reconciler() -> Reconciler {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Reconciler::new(ControllerConfig {
            gateway: GatewayConfig {
                external_address: addr,
                internal_address: addr,
                tls_address: None,
                queue_proxy: None,
            },
            load_balancers: LoadBalancers {
                public: Default::default(),
                private: Default::default(),
            },
            probe: ProbeTargets::Fixed {
                external: addr,
                internal: addr,
            },
            ack_timeout: Duration::from_secs(30),
            leader: None,
        })
    }

    fn listener(name: &str, port: u32) -> Arc<Listener> {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
        Arc::new(Listener {
            name: name.to_string(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                    ),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })
    }

    fn listeners(r: &Resources) -> Vec<(String, String)> {
        r.listeners
            .iter()
            .map(|l| (l.name.clone(), content_version(&**l)))
            .collect()
    }

    /// An Ingress of Sluice's class with one rule of `visibility` for `host`, to Service ns/`service`.
    fn ingress(name: &str, host: &str, visibility: &str, service: &str) -> Ingress {
        serde_yaml::from_str(&format!(
            "metadata:\n  name: {name}\n  namespace: ns\n  annotations:\n    networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev\nspec:\n  rules:\n  - hosts: [{host}]\n    visibility: {visibility}\n    http:\n      paths:\n      - splits:\n        - {{serviceNamespace: ns, serviceName: {service}, servicePort: 80, percent: 100}}\n"
        ))
        .unwrap()
    }

    fn source(ingresses: &[Ingress]) -> SourceSnapshot {
        let mut s = SourceSnapshot::default();
        for i in ingresses {
            s.state.ingresses.insert(
                (i.metadata.namespace.clone(), i.metadata.name.clone()),
                Arc::new(i.clone()),
            );
        }
        for name in ["web", "web2"] {
            s.state.services.insert(
                ("ns".into(), name.into()),
                Arc::new(
                    serde_yaml::from_str(&format!(
                        "metadata: {{name: {name}, namespace: ns}}\nspec:\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
                    ))
                    .unwrap(),
                ),
            );
        }
        s
    }

    fn ready_of(
        report: &StatusReport,
        name: &str,
    ) -> (sluice_api::ConditionStatus, String, String) {
        let i = report
            .ingresses
            .iter()
            .find(|i| i.metadata.name == name)
            .expect("reported");
        let c = i
            .status
            .status
            .condition(sluice_api::ingress::CONDITION_READY)
            .unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn an_ingress_served_through_a_rejected_listener_or_cluster_is_not_ready_with_envoys_words() {
        use sluice_api::ConditionStatus;
        let mut r = reconciler();
        r.apply_source(source(&[
            ingress("local", "web.ns.svc.cluster.local", "ClusterLocal", "web"),
            ingress("public", "web.example.com", "ExternalIP", "web"),
        ]))
        .expect("a first snapshot");
        let ack = ConfigStatus::default();
        let (report, _) = r.report(&ack, &Assessment::default(), Instant::now());
        for name in ["local", "public"] {
            assert_eq!(ready_of(&report, name).1, status::REASON_NOT_ACKED);
        }
        let rejection = |r: &Reconciler, type_url: &str, name: &str, message: &str| {
            let version = r
                .last
                .as_ref()
                .unwrap()
                .resources(type_url)
                .get(name)
                .expect("served")
                .version
                .clone();
            Rejection {
                type_url: type_url.to_string(),
                name: name.to_string(),
                version,
                message: message.to_string(),
            }
        };
        let bind = "cannot bind '127.0.0.1:8081': Address already in use";
        let internal = rejection(&r, LISTENER_TYPE_URL, "internal", bind);
        r.quarantine(std::slice::from_ref(&internal))
            .expect("held back");
        let (report, changed) = r.report(&ack, &Assessment::default(), Instant::now());
        assert_eq!(
            ready_of(&report, "local"),
            (
                ConditionStatus::False,
                status::REASON_REJECTED_BY_ENVOY.to_string(),
                format!("Envoy rejected Listener internal: {bind}")
            )
        );
        assert_eq!(
            ready_of(&report, "public").1,
            status::REASON_NOT_ACKED,
            "not served through the internal listener's probe"
        );
        assert_eq!(changed.len(), 1, "only the concerned Ingress changed");

        // A rejected cluster concerns every Ingress routed to it.
        let cluster = rejection(&r, CLUSTER_TYPE_URL, "ns/web:80", "bad cluster");
        r.quarantine(&[internal, cluster]).expect("held back");
        let (report, _) = r.report(&ack, &Assessment::default(), Instant::now());
        assert_eq!(
            ready_of(&report, "public"),
            (
                ConditionStatus::False,
                status::REASON_REJECTED_BY_ENVOY.to_string(),
                "Envoy rejected Cluster ns/web:80: bad cluster".to_string()
            )
        );
        // The listener's rejection is still held (a second rejection does not forget the first).
        let local = ready_of(&report, "local").2;
        assert!(local.contains("Listener internal"), "{local}");
        assert!(local.contains("Cluster ns/web:80"), "{local}");

        // Routed elsewhere, the rejected cluster is gone and so is its rejection; the listener's
        // stays (the same content is never sent again).
        r.apply_source(source(&[
            ingress("local", "web.ns.svc.cluster.local", "ClusterLocal", "web2"),
            ingress("public", "web.example.com", "ExternalIP", "web2"),
        ]))
        .expect("changed");
        let (report, _) = r.report(&ack, &Assessment::default(), Instant::now());
        assert_eq!(ready_of(&report, "public").1, status::REASON_NOT_ACKED);
        assert_eq!(
            ready_of(&report, "local").2,
            format!("Envoy rejected Listener internal: {bind}")
        );
    }

    fn gateway(stream: u64, ip: &str, acked: Option<u64>, at: Instant) -> GatewayStatus {
        GatewayStatus {
            stream,
            node: format!("gw-{stream}"),
            peer: Some(SocketAddr::new(ip.parse().unwrap(), 5000)),
            connected_at: at,
            acked_generation: acked,
            nack: None,
        }
    }

    fn per_gateway_reconciler() -> Reconciler {
        let mut r = reconciler();
        r.config.probe = ProbeTargets::PerGateway {
            external_port: 8080,
            internal_port: 8081,
        };
        r
    }

    #[test]
    fn an_ingress_is_ready_once_every_counted_gateway_acked_and_served_it() {
        use sluice_api::ConditionStatus;
        let bound = Duration::from_secs(30);
        let mut r = per_gateway_reconciler();
        r.apply_source(source(&[ingress(
            "public",
            "web.example.com",
            "ExternalIP",
            "web",
        )]))
        .expect("a first snapshot");
        let generation = r.generation;
        let t0 = Instant::now();
        let published = BTreeMap::from([(generation, t0)]);
        let gateways = [
            gateway(1, "10.0.0.1", Some(generation), t0),
            gateway(2, "10.0.0.2", None, t0),
        ];
        let ack = ConfigStatus::default();
        let view = gateways::assess(&gateways, generation, &published, t0, bound);
        let (report, _) = r.report(&ack, &view, t0);
        let (status, reason, message) = ready_of(&report, "public");
        assert_eq!(
            (status, reason.as_str()),
            (ConditionStatus::Unknown, status::REASON_NOT_ACKED)
        );
        assert!(message.contains("gw-2 (10.0.0.2:5000)"), "{message}");

        // Each gateway that ACKed is probed at its own address.
        let starts = r.probes_to_start(&view);
        let targets: Vec<_> = starts.iter().flat_map(|p| p.targets.clone()).collect();
        assert_eq!(
            targets,
            [(
                "10.0.0.1:8080".parse().unwrap(),
                "web.example.com".to_string()
            )]
        );
        assert!(
            r.probes_to_start(&view).is_empty(),
            "one probe in flight per gateway"
        );
        for p in starts {
            r.apply_probe(ProbeResult {
                key: p.key,
                hash: p.hash,
                gateway: p.gateway,
                result: Ok(()),
                attempt: 0,
            });
        }
        let (report, _) = r.report(&ack, &view, t0);
        assert_eq!(
            ready_of(&report, "public").1,
            status::REASON_NOT_ACKED,
            "gw-2 still counts"
        );

        // Past the bound gw-2 is stale: not waited for, and reported.
        let later = t0 + bound;
        let view = gateways::assess(&gateways, generation, &published, later, bound);
        let (report, changed) = r.report(&ack, &view, later);
        assert_eq!(ready_of(&report, "public").0, ConditionStatus::True);
        assert_eq!(changed.len(), 1);
        assert_eq!(report.gateways[1].state, "NotAcking");
        assert_eq!(report.gateways[1].peer, "10.0.0.2:5000");
        assert!(
            !r.unprobed
                .contains(&("ns".to_string(), "public".to_string()))
        );
    }

    #[test]
    fn a_gateways_nack_shows_on_the_ingresses_waiting_for_it() {
        use sluice_api::ConditionStatus;
        let mut r = per_gateway_reconciler();
        r.apply_source(source(&[ingress(
            "public",
            "web.example.com",
            "ExternalIP",
            "web",
        )]))
        .expect("a first snapshot");
        let t0 = Instant::now();
        let mut rejecting = gateway(2, "10.0.0.2", None, t0);
        rejecting.nack = Some("Envoy \"gw-2\" rejected routes: bad weights".to_string());
        let gateways = [gateway(1, "10.0.0.1", Some(r.generation), t0), rejecting];
        let published = BTreeMap::from([(r.generation, t0)]);
        let view = gateways::assess(
            &gateways,
            r.generation,
            &published,
            t0,
            Duration::from_secs(30),
        );
        let (report, _) = r.report(&ConfigStatus::default(), &view, t0);
        assert_eq!(
            ready_of(&report, "public"),
            (
                ConditionStatus::False,
                status::REASON_REJECTED_BY_ENVOY.to_string(),
                "Envoy \"gw-2\" rejected routes: bad weights".to_string()
            )
        );
    }

    #[test]
    fn only_the_leader_probes_and_a_proved_status_is_trusted() {
        use sluice_api::ConditionStatus;
        let mut r = per_gateway_reconciler();
        r.trust_ready = true;
        r.leading = false;
        let mut proved = ingress("proved", "a.example.com", "ExternalIP", "web");
        proved.metadata.generation = 2;
        proved.status.status.observed_generation = 2;
        proved.status.status.set_condition(sluice_api::Condition {
            type_: sluice_api::ingress::CONDITION_READY.to_string(),
            status: ConditionStatus::True,
            ..Default::default()
        });
        let mut stale = proved.clone();
        stale.metadata.name = "stale".to_string();
        stale.spec.rules[0].hosts = vec!["b.example.com".to_string()];
        stale.metadata.generation = 3;
        r.apply_source(source(&[proved, stale]))
            .expect("a snapshot");
        let t0 = Instant::now();
        let gateways = [gateway(1, "10.0.0.1", Some(r.generation), t0)];
        let view = gateways::assess(
            &gateways,
            r.generation,
            &BTreeMap::new(),
            t0,
            Duration::from_secs(30),
        );
        assert!(
            r.probes_to_start(&view).is_empty(),
            "a follower never probes"
        );
        let (report, _) = r.report(&ConfigStatus::default(), &view, t0);
        assert_eq!(
            ready_of(&report, "proved").0,
            ConditionStatus::True,
            "Ready at its generation"
        );
        assert_eq!(ready_of(&report, "stale").1, status::REASON_UNINITIALIZED);
        r.set_leading(true);
        let starts = r.probes_to_start(&view);
        assert_eq!(starts.len(), 1);
        assert_eq!(starts[0].key.1, "stale");
    }

    #[test]
    fn a_rejected_listener_is_held_back_until_its_content_changes() {
        let mut r = reconciler();
        // Envoy runs generation 1 with "a" on port 1 and "b".
        let one = Resources {
            listeners: vec![listener("a", 1), listener("b", 2)],
            ..Default::default()
        };
        let snap = r.next_snapshot(1, &one);
        r.generation = 1;
        r.publish(snap, one);
        r.acked = r.last.clone();
        // Generation 2 moves "a" to port 3 and adds "c"; Envoy rejects "a" and "c".
        let two = Resources {
            listeners: vec![listener("a", 3), listener("b", 2), listener("c", 4)],
            ..Default::default()
        };
        let snap = r.next_snapshot(2, &two);
        r.generation = 2;
        r.publish(snap, two.clone());
        let rejection = |name: &str, port: u32| Rejection {
            type_url: LISTENER_TYPE_URL.to_string(),
            name: name.to_string(),
            version: content_version(&*listener(name, port)),
            message: "cannot bind".to_string(),
        };
        let next = r
            .quarantine(&[rejection("a", 3), rejection("c", 4)])
            .expect("a new snapshot without them");
        assert_eq!(next.generation(), 3);
        // "a" is served as Envoy runs it, "c" is left out, "b" is untouched.
        assert_eq!(
            listeners(&r.last_resources),
            [
                ("a".to_string(), content_version(&*listener("a", 1))),
                ("b".to_string(), content_version(&*listener("b", 2))),
            ]
        );
        assert!(r.quarantine(&[rejection("a", 3)]).is_none(), "known");
        // The same content again stays held back; a change gets a new try.
        let mut same = two.clone();
        r.hold_back(&mut same);
        assert_eq!(same.listeners.len(), 2);
        let mut moved = Resources {
            listeners: vec![listener("a", 3), listener("b", 2), listener("c", 5)],
            ..Default::default()
        };
        r.hold_back(&mut moved);
        assert_eq!(moved.listeners.len(), 3);
        assert_eq!(r.quarantined.len(), 1, "only a stays held back");
    }
}
