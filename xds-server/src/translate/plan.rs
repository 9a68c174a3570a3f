//! The decisions of translation, with no Envoy types: which Ingresses are served, with which virtual
//! hosts, routes, backends and certificates, and why the others are not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use base64::Engine;
use sluice_api::Ingress;
use sluice_api::core::{
    EndpointSlice, Endpoints, SERVICE_NAME_LABEL, Secret, Service, ServicePort,
};
use sluice_api::ingress::{
    HTTP_OPTION_REDIRECTED, HttpIngressPath, IntOrString, VISIBILITY_CLUSTER_LOCAL, insert_probe,
};

use super::{EXTERNAL_LISTENER, INTERNAL_LISTENER, IngressOutcome, TLS_LISTENER, Uses};
use crate::resources::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL};
use crate::state::{ClusterState, InstanceSidecar, ObjectKey};
use crate::status::REASON_DOMAIN_CONFLICT;

/// The spec fails Knative's validation (or a check that keeps Envoy from rejecting the whole config).
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_SERVICE_NOT_FOUND: &str = "ServiceNotFound";
pub const REASON_SERVICE_PORT_NOT_FOUND: &str = "ServicePortNotFound";
pub const REASON_SECRET_NOT_FOUND: &str = "SecretNotFound";
pub const REASON_SECRET_INVALID: &str = "SecretInvalid";

/// The decided configuration. Pieces are shared with the plan cache, so an Ingress that did not change
/// brings the very same `Arc`s as last time, which lets rendering reuse what it made of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub outcomes: BTreeMap<ObjectKey, IngressOutcome>,
    /// Sorted by name.
    pub vhosts: Vec<Arc<VirtualHostPlan>>,
    pub clusters: BTreeMap<String, Arc<ClusterPlan>>,
    /// In Ingress order; server names are unique across chains.
    pub tls_chains: Vec<TlsChainPlan>,
    /// Instance-side listeners, by (namespace, instance).
    pub sidecars: Vec<Arc<InstanceSidecar>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHostPlan {
    /// `namespace/name/rules[i]`.
    pub name: String,
    /// Lowercased hosts; empty means every host.
    pub hosts: Vec<String>,
    pub cluster_local: bool,
    /// httpOption Redirected: plain HTTP on the external listener answers 301 to https.
    pub redirect_plain: bool,
    /// Knative's probe hash of this Ingress version (answered by Sluice's readiness probe route).
    pub hash: String,
    /// In match order.
    pub routes: Vec<RoutePlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    /// A literal prefix, "/" for the catch-all.
    pub prefix: String,
    /// Exact header matches, all required.
    pub headers: Vec<(String, String)>,
    /// Set (not appended) before the split.
    pub set_headers: Vec<(String, String)>,
    pub rewrite_host: Option<String>,
    /// Backends with a non-zero weight, in spec order.
    pub backends: Vec<BackendPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendPlan {
    pub cluster: String,
    pub weight: u32,
    /// Set after the split chose this backend.
    pub set_headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPlan {
    pub name: String,
    /// The port speaks h2c (named h2c/http2, or appProtocol h2c).
    pub http2: bool,
    pub kind: ClusterKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClusterKind {
    /// Endpoints over EDS: sorted `(ip, port)` of ready addresses.
    Eds { endpoints: Vec<(String, u32)> },
    /// An ExternalName Service: resolved by DNS.
    Dns { host: String, port: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsChainPlan {
    /// `namespace/name/tls[i]`.
    pub name: String,
    pub server_names: Vec<String>,
    /// The certificate and key, which reach Envoy as an SDS Secret (never inline in the Listener, so
    /// a config dump or a listener NACK never shows a private key).
    pub secret: Arc<TlsSecretPlan>,
}

/// One Kubernetes TLS Secret as Envoy gets it: an SDS Secret named `namespace/name`. Ingresses that
/// use the same Secret share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSecretPlan {
    pub name: String,
    pub cert_chain: Vec<u8>,
    pub private_key: Vec<u8>,
}

type Rejection = (&'static str, String);

/// What one valid Ingress needs, before host conflicts are settled.
struct IngressPlan {
    hash: String,
    /// The host keys its virtual hosts claim, sorted and unique.
    claims: Vec<String>,
    vhosts: Vec<Arc<VirtualHostPlan>>,
    clusters: Vec<Arc<ClusterPlan>>,
    tls_chains: Vec<TlsChainPlan>,
    uses: Arc<Uses>,
}

/// Each Ingress's plan from the last translation with what it was made from, so the next translation
/// re-plans only Ingresses that changed or whose Services, Endpoints or Secrets changed.
/// Hashes are only for lookups within the process: a fast hasher (no DoS to fear from our own keys).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct PlanCache {
    entries: FastMap<ObjectKey, Cached>,
}

struct Cached {
    ingress: Arc<Ingress>,
    deps: Vec<(DepKey, DepValue)>,
    result: Result<Arc<IngressPlan>, Rejection>,
}

/// An object a plan looked up (found or not).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum DepKey {
    /// A Service with its Endpoints or EndpointSlices.
    Service(ObjectKey),
    Secret(ObjectKey),
}

/// The objects as they were looked up; shared with the state, so an unchanged object compares by
/// pointer.
#[derive(Debug, PartialEq)]
enum DepValue {
    Service(Box<ServiceDeps>),
    Secret(Option<Arc<Secret>>),
}

#[derive(Debug, PartialEq)]
struct ServiceDeps {
    service: Option<Arc<Service>>,
    endpoints: Option<Arc<Endpoints>>,
    /// Only read when there are no Endpoints.
    slices: Vec<Arc<EndpointSlice>>,
}

/// EndpointSlices by (namespace, Service name), built once per translation.
type SliceIndex<'a> = HashMap<(&'a str, &'a str), Vec<&'a Arc<EndpointSlice>>>;

fn slice_index(state: &ClusterState) -> SliceIndex<'_> {
    let mut index: SliceIndex<'_> = HashMap::new();
    for ((ns, _), slice) in &state.endpoint_slices {
        if let Some(service) = slice.metadata.labels.get(SERVICE_NAME_LABEL) {
            index
                .entry((ns.as_str(), service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    index
}

fn dep_matches(
    state: &ClusterState,
    slices: &SliceIndex<'_>,
    key: &DepKey,
    value: &DepValue,
) -> bool {
    match (key, value) {
        (DepKey::Service(k), DepValue::Service(deps)) => {
            let ServiceDeps {
                service,
                endpoints,
                slices: old_slices,
            } = &**deps;
            state.services.get(k) == service.as_ref()
                && state.endpoints.get(k) == endpoints.as_ref()
                && (endpoints.is_some() || {
                    let now = slices
                        .get(&(k.0.as_str(), k.1.as_str()))
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    now.len() == old_slices.len()
                        && now.iter().zip(old_slices).all(|(a, b)| *a == b)
                })
        }
        (DepKey::Secret(k), DepValue::Secret(secret)) => state.secrets.get(k) == secret.as_ref(),
        _ => false,
    }
}

fn dep_value(state: &ClusterState, slices: &SliceIndex<'_>, key: &DepKey) -> DepValue {
    match key {
        DepKey::Service(k) => {
            let endpoints = state.endpoints.get(k).cloned();
            DepValue::Service(Box::new(ServiceDeps {
                service: state.services.get(k).cloned(),
                slices: if endpoints.is_some() {
                    Vec::new()
                } else {
                    slices
                        .get(&(k.0.as_str(), k.1.as_str()))
                        .map(|v| v.iter().map(|s| (*s).clone()).collect())
                        .unwrap_or_default()
                },
                endpoints,
            }))
        }
        DepKey::Secret(k) => DepValue::Secret(state.secrets.get(k).cloned()),
    }
}

impl PlanCache {
    /// The Ingress's plan: the cached one while the Ingress and everything it looked up are unchanged.
    fn plan(
        &mut self,
        state: &ClusterState,
        slices: &SliceIndex<'_>,
        key: &ObjectKey,
        ingress: &Arc<Ingress>,
    ) -> Result<Arc<IngressPlan>, Rejection> {
        if let Some(c) = self.entries.get(key)
            && c.ingress == *ingress
            && c.deps.iter().all(|(k, v)| dep_matches(state, slices, k, v))
        {
            return c.result.clone();
        }
        let mut keys = BTreeSet::new();
        let result = plan_ingress(state, ingress, &mut keys).map(Arc::new);
        let deps = keys
            .into_iter()
            .map(|k| {
                let v = dep_value(state, slices, &k);
                (k, v)
            })
            .collect();
        self.entries.insert(
            key.clone(),
            Cached {
                ingress: ingress.clone(),
                deps,
                result: result.clone(),
            },
        );
        result
    }
}

/// When Sluice first saw each Ingress, as a sequence number (smaller is earlier): the age of objects
/// without a creationTimestamp (those read from files). Kept by the caller across translations.
pub type FirstSeen = BTreeMap<ObjectKey, u64>;

/// The plan of the whole state, re-planning only the Ingresses `cache` cannot answer for.
///
/// Host conflicts: the Ingress that claimed a host first keeps it, by creationTimestamp, then (for
/// objects without one, or the same second) the order Sluice first saw them in (`first_seen`), then
/// namespace/name. Only the contested hosts are withheld from the newer Ingress, which says so in
/// its status (DomainConflict, naming each host and the Ingress that serves it); its other hosts,
/// cluster-local ones included, are served.
pub fn plan_cached(state: &ClusterState, cache: &mut PlanCache, first_seen: &FirstSeen) -> Plan {
    let mut out = Plan::default();
    let slices = slice_index(state);
    // Sorted by age (one first-seen lookup per Ingress, not per comparison); objects without a
    // timestamp or a first-seen number sort after those with one.
    let mut aged: Vec<_> = state
        .ingresses
        .iter()
        .filter(|(_, ing)| ing.is_sluice_class())
        .map(|(key, ing)| {
            let created = ing.metadata.creation_timestamp.as_deref();
            let seen = first_seen.get(key).copied();
            ((created.is_none(), created, seen.is_none(), seen, key), ing)
        })
        .collect();
    aged.sort_unstable_by_key(|(age, _)| *age);
    let ingresses: Vec<(&ObjectKey, &Arc<Ingress>)> = aged
        .into_iter()
        .map(|((.., key), ing)| (key, ing))
        .collect();

    let planned: Vec<_> = ingresses
        .into_iter()
        .map(|(key, ingress)| (key, cache.plan(state, &slices, key, ingress)))
        .collect();
    // Borrowed from the plans: this runs over every Ingress on every change.
    let mut claimed: FastMap<&str, &ObjectKey> = FastMap::default();
    // The hosts each owner keeps against a newer claimant, and who that is: the owner says so too.
    let mut kept: FastMap<&ObjectKey, Vec<(&str, &ObjectKey)>> = FastMap::default();
    // Collected, then sorted once (mostly already in order): inserting thousands of entries one by
    // one into maps would compare their names again and again.
    let mut outcomes = Vec::with_capacity(planned.len());
    let mut clusters = Vec::new();
    for (key, result) in &planned {
        let outcome = match result {
            Err((reason, message)) => IngressOutcome::Rejected {
                reason: reason.to_string(),
                message: message.clone(),
            },
            Ok(p) => {
                let contested: Vec<(&str, &ObjectKey)> = p
                    .claims
                    .iter()
                    .filter_map(|h| claimed.get(h.as_str()).map(|owner| (h.as_str(), *owner)))
                    .collect();
                for h in &p.claims {
                    claimed.entry(h).or_insert(key);
                }
                clusters.extend(p.clusters.iter());
                if contested.is_empty() {
                    out.vhosts.extend(p.vhosts.iter().cloned());
                    out.tls_chains.extend(p.tls_chains.iter().cloned());
                    IngressOutcome::Programmed {
                        hash: p.hash.clone(),
                        uses: p.uses.clone(),
                        contested: None,
                    }
                } else {
                    for (host, owner) in &contested {
                        kept.entry(*owner).or_default().push((*host, *key));
                    }
                    let withheld: BTreeSet<&str> = contested.iter().map(|(h, _)| *h).collect();
                    out.vhosts
                        .extend(p.vhosts.iter().filter_map(|v| without_hosts(v, &withheld)));
                    out.tls_chains.extend(p.tls_chains.iter().map(|c| {
                        let mut c = c.clone();
                        c.server_names.retain(|n| !withheld.contains(n.as_str()));
                        c
                    }));
                    let each: Vec<String> = contested
                        .iter()
                        .map(|(host, (ns, name))| {
                            format!("host {host} is already served by Ingress {ns}/{name}")
                        })
                        .collect();
                    let rest = if withheld.len() < p.claims.len() {
                        "; its other hosts are served"
                    } else {
                        ""
                    };
                    IngressOutcome::Rejected {
                        reason: REASON_DOMAIN_CONFLICT.to_string(),
                        message: format!("{}{rest}", each.join("; ")),
                    }
                }
            }
        };
        outcomes.push(((*key).clone(), outcome));
    }
    if !kept.is_empty() {
        for (key, outcome) in &mut outcomes {
            if let (Some(hosts), IngressOutcome::Programmed { contested, .. }) =
                (kept.get(&*key), outcome)
            {
                *contested = Some(kept_message(hosts));
            }
        }
    }
    out.outcomes = outcomes.into_iter().collect();
    // Ingresses may share a cluster (the same Service port): the last one planned wins, as a map
    // insert would have it.
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    let mut deduped: Vec<&Arc<ClusterPlan>> = Vec::with_capacity(clusters.len());
    for c in clusters {
        match deduped.last_mut() {
            Some(last) if last.name == c.name => *last = c,
            _ => deduped.push(c),
        }
    }
    out.clusters = deduped
        .into_iter()
        .map(|c| (c.name.clone(), c.clone()))
        .collect();
    if cache.entries.len() > out.outcomes.len() {
        cache.entries.retain(|k, _| out.outcomes.contains_key(k));
    }
    out.vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    dedupe_server_names(&mut out.tls_chains);
    out.sidecars = state.sidecars.values().cloned().collect();
    out
}

/// What the owner of contested hosts says: each host and the newer Ingresses that do not get it.
fn kept_message(hosts: &[(&str, &ObjectKey)]) -> String {
    let mut by_host: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (host, (ns, name)) in hosts {
        by_host
            .entry(host)
            .or_default()
            .push(format!("{ns}/{name}"));
    }
    let each: Vec<String> = by_host
        .into_iter()
        .map(|(host, losers)| {
            format!(
                "host {host} is also claimed by Ingress {}, which does not get it",
                losers.join(", ")
            )
        })
        .collect();
    each.join("; ")
}

/// `vhost` without the `withheld` host keys; None when none of its hosts is left.
fn without_hosts(
    vhost: &Arc<VirtualHostPlan>,
    withheld: &BTreeSet<&str>,
) -> Option<Arc<VirtualHostPlan>> {
    let claims = host_claims(&vhost.hosts);
    if !claims.iter().any(|h| withheld.contains(h.as_str())) {
        return Some(vhost.clone());
    }
    // A catch-all ("*") has no host to keep; others keep what is not contested.
    let hosts: Vec<String> = vhost
        .hosts
        .iter()
        .filter(|h| !withheld.contains(h.as_str()))
        .cloned()
        .collect();
    if hosts.is_empty() {
        return None;
    }
    Some(Arc::new(VirtualHostPlan {
        hosts,
        ..VirtualHostPlan::clone(vhost)
    }))
}

/// The host keys a virtual host claims ("*" for a catch-all rule).
fn host_claims(hosts: &[String]) -> Vec<String> {
    if hosts.is_empty() {
        vec!["*".to_string()]
    } else {
        hosts.to_vec()
    }
}

/// Envoy rejects two filter chains with the same server name: the first chain keeps it.
fn dedupe_server_names(chains: &mut Vec<TlsChainPlan>) {
    let mut seen = BTreeSet::new();
    for chain in chains.iter_mut() {
        chain.server_names.retain(|n| seen.insert(n.clone()));
    }
    chains.retain(|c| !c.server_names.is_empty());
}

/// Plans one Ingress, noting in `deps` every Service and Secret it looks up.
fn plan_ingress(
    state: &ClusterState,
    original: &Ingress,
    deps: &mut BTreeSet<DepKey>,
) -> Result<IngressPlan, Rejection> {
    let ns = &original.metadata.namespace;
    let name = &original.metadata.name;

    let mut defaulted = original.clone();
    defaulted.set_defaults();
    defaulted
        .validate()
        .map_err(|e| (REASON_INVALID_SPEC, e.to_string()))?;
    check_envoy_safety(&defaulted).map_err(|m| (REASON_INVALID_SPEC, m))?;

    // Knative programs the Ingress with its probe paths inserted, hashing the spec as stored.
    let mut probed = original.clone();
    let hash = insert_probe(&mut probed);
    probed.set_defaults();

    let mut clusters: BTreeMap<String, ClusterPlan> = BTreeMap::new();
    let mut vhosts = Vec::new();
    let mut seen_hosts = BTreeSet::new();
    let redirect = defaulted.spec.http_option == HTTP_OPTION_REDIRECTED;
    for (ri, rule) in probed.spec.rules.iter().enumerate() {
        let hosts: Vec<String> = rule
            .hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .filter(|h| seen_hosts.insert(h.clone()))
            .collect();
        if hosts.is_empty() && !rule.hosts.is_empty() {
            continue; // every host was served by an earlier rule: first rule wins
        }
        let paths = rule
            .http
            .as_ref()
            .map(|h| h.paths.as_slice())
            .unwrap_or(&[]);
        let mut routes = Vec::with_capacity(paths.len());
        for (pi, path) in paths.iter().enumerate() {
            // Probe paths were prepended: report the index the user wrote.
            let user_index = pi % paths.len().div_ceil(2).max(1);
            let field = format!("spec.rules[{ri}].http.paths[{user_index}]");
            routes.push(plan_route(state, path, &field, &mut clusters, deps)?);
        }
        // Longest prefix first; stable, so probe copies stay ahead of their originals.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        vhosts.push(Arc::new(VirtualHostPlan {
            name: format!("{ns}/{name}/rules[{ri}]"),
            hosts,
            cluster_local: rule.visibility == VISIBILITY_CLUSTER_LOCAL,
            redirect_plain: redirect,
            hash: hash.clone(),
            routes,
        }));
    }

    let mut tls_chains = Vec::new();
    for (ti, tls) in defaulted.spec.tls.iter().enumerate() {
        let secret_ns = if tls.secret_namespace.is_empty() {
            ns.as_str()
        } else {
            tls.secret_namespace.as_str()
        };
        let field = format!("spec.tls[{ti}]");
        let secret_key = (secret_ns.to_string(), tls.secret_name.clone());
        deps.insert(DepKey::Secret(secret_key.clone()));
        let secret = state.secrets.get(&secret_key).ok_or_else(|| {
            (
                REASON_SECRET_NOT_FOUND,
                format!("{field}: Secret {secret_ns}/{} not found", tls.secret_name),
            )
        })?;
        let (cert_chain, private_key) =
            tls_material(secret).map_err(|m| (REASON_SECRET_INVALID, format!("{field}: {m}")))?;
        tls_chains.push(TlsChainPlan {
            name: format!("{ns}/{name}/tls[{ti}]"),
            server_names: tls.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            secret: Arc::new(TlsSecretPlan {
                name: format!("{secret_ns}/{}", tls.secret_name),
                cert_chain,
                private_key,
            }),
        });
    }

    let claims: BTreeSet<String> = vhosts.iter().flat_map(|v| host_claims(&v.hosts)).collect();
    let uses = uses(&vhosts, &clusters, !tls_chains.is_empty());
    Ok(IngressPlan {
        hash,
        claims: claims.into_iter().collect(),
        vhosts,
        clusters: clusters.into_values().map(Arc::new).collect(),
        tls_chains,
        uses: Arc::new(uses),
    })
}

/// The Listeners (those the Ingress is probed on) and Clusters an Ingress is served through.
fn uses(
    vhosts: &[Arc<VirtualHostPlan>],
    clusters: &BTreeMap<String, ClusterPlan>,
    tls: bool,
) -> Uses {
    let mut listeners = BTreeSet::new();
    for v in vhosts {
        listeners.insert(if v.cluster_local {
            INTERNAL_LISTENER
        } else {
            EXTERNAL_LISTENER
        });
    }
    if tls {
        listeners.insert(TLS_LISTENER);
    }
    let mut out: Vec<(&'static str, String)> = listeners
        .into_iter()
        .map(|l| (LISTENER_TYPE_URL, l.to_string()))
        .chain(clusters.keys().map(|c| (CLUSTER_TYPE_URL, c.clone())))
        .collect();
    out.sort();
    Uses(out)
}

fn plan_route(
    state: &ClusterState,
    path: &HttpIngressPath,
    field: &str,
    clusters: &mut BTreeMap<String, ClusterPlan>,
    deps: &mut BTreeSet<DepKey>,
) -> Result<RoutePlan, Rejection> {
    let mut backends = Vec::new();
    for (si, split) in path.splits.iter().enumerate() {
        let field = format!("{field}.splits[{si}]");
        deps.insert(DepKey::Service((
            split.service_namespace.clone(),
            split.service_name.clone(),
        )));
        let cluster = resolve_backend(
            state,
            &split.service_namespace,
            &split.service_name,
            &split.service_port,
        )
        .map_err(|(reason, m)| (reason, format!("{field}: {m}")))?;
        // A 0% split never receives traffic, and Envoy rejects zero weights.
        if split.percent > 0 {
            backends.push(BackendPlan {
                cluster: cluster.name.clone(),
                weight: split.percent as u32,
                set_headers: pairs(&split.append_headers),
            });
        }
        clusters.entry(cluster.name.clone()).or_insert(cluster);
    }
    Ok(RoutePlan {
        prefix: if path.path.is_empty() {
            "/".to_string()
        } else {
            path.path.clone()
        },
        headers: path
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.exact.clone()))
            .collect(),
        set_headers: pairs(&path.append_headers),
        rewrite_host: (!path.rewrite_host.is_empty()).then(|| path.rewrite_host.clone()),
        backends,
    })
}

fn pairs(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The cluster for one backend: `namespace/service:port` as the split names the port.
fn resolve_backend(
    state: &ClusterState,
    ns: &str,
    name: &str,
    port: &IntOrString,
) -> Result<ClusterPlan, Rejection> {
    let service = state
        .services
        .get(&(ns.to_string(), name.to_string()))
        .ok_or_else(|| {
            (
                REASON_SERVICE_NOT_FOUND,
                format!("Service {ns}/{name} not found"),
            )
        })?;
    let sp = service
        .spec
        .ports
        .iter()
        .find(|p| match port {
            IntOrString::Int(n) => p.port == *n,
            IntOrString::String(s) => p.name == *s,
        })
        .ok_or_else(|| {
            (
                REASON_SERVICE_PORT_NOT_FOUND,
                format!("Service {ns}/{name} has no port {port}"),
            )
        })?;
    let http2 = matches!(sp.name.as_str(), "h2c" | "http2")
        || matches!(
            sp.app_protocol.as_deref(),
            Some("h2c" | "kubernetes.io/h2c")
        );
    let kind = if service.spec.type_ == "ExternalName" {
        ClusterKind::Dns {
            host: service.spec.external_name.clone(),
            port: sp.port as u32,
        }
    } else {
        ClusterKind::Eds {
            endpoints: endpoints_of(state, ns, name, sp),
        }
    };
    Ok(ClusterPlan {
        name: format!("{ns}/{name}:{port}"),
        http2,
        kind,
    })
}

/// Ready addresses of a Service port, from its Endpoints or else its EndpointSlices. None is not an
/// error: Knative scales to zero, and Envoy answers 503 until endpoints appear.
fn endpoints_of(
    state: &ClusterState,
    ns: &str,
    name: &str,
    sp: &ServicePort,
) -> Vec<(String, u32)> {
    let mut out = BTreeSet::new();
    if let Some(eps) = state.endpoints.get(&(ns.to_string(), name.to_string())) {
        for subset in &eps.subsets {
            let port = subset
                .ports
                .iter()
                .find(|p| p.name == sp.name)
                .or_else(|| (subset.ports.len() == 1).then(|| &subset.ports[0]));
            if let Some(port) = port {
                for a in &subset.addresses {
                    out.insert((a.ip.clone(), port.port as u32));
                }
            }
        }
        return out.into_iter().collect();
    }
    for ((slice_ns, _), slice) in &state.endpoint_slices {
        if slice_ns != ns
            || slice
                .metadata
                .labels
                .get(SERVICE_NAME_LABEL)
                .map(String::as_str)
                != Some(name)
        {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == sp.name)
            .or_else(|| (slice.ports.len() == 1).then(|| &slice.ports[0]))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for ep in &slice.endpoints {
            if ep.conditions.ready == Some(false) {
                continue;
            }
            for a in &ep.addresses {
                out.insert((a.clone(), port as u32));
            }
        }
    }
    out.into_iter().collect()
}

/// `tls.crt` and `tls.key` of a Secret (base64 `data`, or plain `stringData`), checked to be PEM so a
/// bad Secret rejects its Ingress instead of making Envoy reject the whole listener.
fn tls_material(secret: &Secret) -> Result<(Vec<u8>, Vec<u8>), String> {
    let get = |key: &str| -> Result<Vec<u8>, String> {
        if let Some(v) = secret.string_data.get(key) {
            return Ok(v.clone().into_bytes());
        }
        let b64 = secret
            .data
            .get(key)
            .ok_or_else(|| format!("Secret has no {key}"))?;
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("Secret's {key} is not base64: {e}"))
    };
    let cert = get("tls.crt")?;
    let key = get("tls.key")?;
    let cert_text = String::from_utf8_lossy(&cert);
    let key_text = String::from_utf8_lossy(&key);
    if !cert_text.contains("-----BEGIN CERTIFICATE-----") {
        return Err("Secret's tls.crt is not a PEM certificate".into());
    }
    if !(key_text.contains("-----BEGIN") && key_text.contains("PRIVATE KEY-----")) {
        return Err("Secret's tls.key is not a PEM private key".into());
    }
    Ok((cert, key))
}

/// Checks beyond Knative's validation for what Envoy would reject (which would block every other
/// Ingress's update): host syntax, header names Envoy may not set, and control characters in values.
fn check_envoy_safety(ingress: &Ingress) -> Result<(), String> {
    let mut errors = Vec::new();
    for (ri, rule) in ingress.spec.rules.iter().enumerate() {
        for (hi, host) in rule.hosts.iter().enumerate() {
            if !valid_host(host) {
                errors.push(format!(
                    "spec.rules[{ri}].hosts[{hi}]: {host:?} is not a valid host name"
                ));
            }
        }
        let Some(http) = &rule.http else { continue };
        for (pi, path) in http.paths.iter().enumerate() {
            let field = format!("spec.rules[{ri}].http.paths[{pi}]");
            for (k, v) in &path.headers {
                check_header(&format!("{field}.headers"), k, &v.exact, false, &mut errors);
            }
            for (k, v) in &path.append_headers {
                check_header(&format!("{field}.appendHeaders"), k, v, true, &mut errors);
            }
            if path.path.chars().any(|c| c.is_control() || c == ' ') {
                errors.push(format!(
                    "{field}.path: contains spaces or control characters"
                ));
            }
            if !path.rewrite_host.is_empty() && !valid_host(&path.rewrite_host) {
                errors.push(format!(
                    "{field}.rewriteHost: {:?} is not a valid host name",
                    path.rewrite_host
                ));
            }
            for (si, split) in path.splits.iter().enumerate() {
                for (k, v) in &split.append_headers {
                    let f = format!("{field}.splits[{si}].appendHeaders");
                    check_header(&f, k, v, true, &mut errors);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn valid_host(host: &str) -> bool {
    let rest = host.strip_prefix("*.").unwrap_or(host);
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn check_header(field: &str, name: &str, value: &str, set: bool, errors: &mut Vec<String>) {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        errors.push(format!("{field}: {name:?} is not a valid header name"));
    } else if set && name.eq_ignore_ascii_case("host") {
        errors.push(format!(
            "{field}: the Host header cannot be set (use rewriteHost)"
        ));
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        errors.push(format!(
            "{field}[{name}]: value contains a line break or NUL"
        ));
    }
}
