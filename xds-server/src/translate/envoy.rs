//! Renders a [`Plan`] as Envoy v3 resources. No decisions here beyond Envoy's own spelling.
//!
//! Map-typed proto fields are avoided (or hold one entry) because resource versions are hashes of the
//! prost encoding, which is only deterministic without maps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, AsyncDataSource, ConfigSource, DataSource,
    HeaderValue, HeaderValueOption, Http2ProtocolOptions, SocketAddress, TransportSocket, address,
    async_data_source, config_source, data_source, header_value_option, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RedirectAction, Route, RouteAction, RouteConfiguration,
    RouteMatch, ScopedRouteConfiguration, VirtualHost, WeightedCluster, header_matcher,
    redirect_action, route, route_action, route_match, scoped_route_configuration,
    weighted_cluster,
};
use envoy_types::pb::envoy::extensions::dynamic_modules::v3::DynamicModuleConfig;
use envoy_types::pb::envoy::extensions::filters::http::dynamic_modules::v3::DynamicModuleFilter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, ScopedRds, ScopedRoutes, http_connection_manager,
    http_filter, scoped_routes,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Duration, StringValue, UInt32Value};
use envoy_types::util::pack_any;

use sluice_api::ingress::{HASH_HEADER, PROBE_HEADER};

use super::plan::{
    ClusterKind, ClusterPlan, Plan, RoutePlan, TlsChainPlan, TlsSecretPlan, VirtualHostPlan,
};
use super::{
    EXTERNAL_LISTENER, GatewayConfig, INTERNAL_LISTENER, QUEUE_PROXY_NATIVE_FILTER_NAME,
    QUEUE_PROXY_NATIVE_METRICS_NAMESPACE, QUEUE_PROXY_RUNTIME, QUEUE_PROXY_VM_ID, QueueProxyFilter,
    SIDECAR_PREFIX, TLS_LISTENER,
};
use crate::prober::READINESS_PROBE_VALUE;
use crate::resources::Resources;
use crate::state::InstanceSidecar;

const CONNECT_TIMEOUT_SECS: i64 = 5;
/// Envoy's default circuit breakers (1024 requests per cluster) would turn bursts into 503s; Knative's
/// gateways do not limit here, the queue-proxy does.
const UNLIMITED: u32 = 1_000_000;

/// How the gateway listeners find their routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// One RouteConfiguration per listener with every virtual host (RDS): any Ingress change re-sends
    /// and makes Envoy rebuild the whole table.
    Whole,
    /// Scoped RDS: one scope per (listener, host) carrying its own small RouteConfiguration inline, so
    /// an Ingress change updates only its hosts' scopes.
    Scoped,
}

/// Scoped routing keys scopes by the exact host, so it needs every served host to be exact: a
/// wildcard host (`*.example.com`) or a catch-all rule (no hosts) needs Envoy's domain matching.
fn routing(plan: &Plan) -> Routing {
    let exact = plan
        .vhosts
        .iter()
        .all(|v| !v.hosts.is_empty() && v.hosts.iter().all(|h| !h.contains('*')));
    if exact {
        Routing::Scoped
    } else {
        Routing::Whole
    }
}

/// Each gateway listener builds scope keys of a different length (one host fragment per rank), so
/// their scopes never collide although Envoy shares one SRDS subscription across all of them.
fn scope_rank(listener: &str) -> usize {
    match listener {
        EXTERNAL_LISTENER => 1,
        INTERNAL_LISTENER => 2,
        _ => 3,
    }
}

/// What the last render made of each plan piece. Plan pieces of unchanged Ingresses are the same
/// `Arc`s as last time (see [`Plan`]), so their Envoy resources are reused as they are: with thousands of
/// Ingresses a change renders what changed, and [`crate::snapshot::Snapshot::update`] recognises the
/// reused resources by pointer instead of comparing them.
///
/// Keyed by the plan piece's address: the cache holds the `Arc`, so the address stays its own, and
/// looking it up costs no string formatting or hashing.
#[derive(Default)]
pub struct RenderCache {
    vhosts: HashMap<usize, RenderedVirtualHost>,
    clusters: HashMap<usize, RenderedCluster>,
    sidecars: HashMap<String, RenderedSidecar>,
    secrets: HashMap<usize, RenderedSecret>,
}

/// A virtual host's scopes on every listener that serves it.
struct RenderedVirtualHost {
    plan: Arc<VirtualHostPlan>,
    tls: bool,
    scopes: Vec<Arc<ScopedRouteConfiguration>>,
}

struct RenderedCluster {
    plan: Arc<ClusterPlan>,
    cluster: Arc<Cluster>,
    assignment: Option<Arc<ClusterLoadAssignment>>,
}

struct RenderedSecret {
    plan: Arc<TlsSecretPlan>,
    secret: Arc<Secret>,
}

struct RenderedSidecar {
    plan: Arc<InstanceSidecar>,
    listener: Arc<Listener>,
    cluster: Arc<Cluster>,
}

pub fn render(plan: &Plan, gateway: &GatewayConfig, cache: &mut RenderCache) -> Resources {
    let mut r = Resources::default();
    let mut next = RenderCache::default();
    let routing = routing(plan);
    let tls = gateway.tls_address.filter(|_| !plan.tls_chains.is_empty());

    r.listeners.push(Arc::new(http_listener(
        EXTERNAL_LISTENER,
        gateway.external_address,
        routing,
    )));
    r.listeners.push(Arc::new(http_listener(
        INTERNAL_LISTENER,
        gateway.internal_address,
        routing,
    )));
    if let Some(addr) = tls {
        r.listeners
            .push(Arc::new(tls_listener(addr, &plan.tls_chains, routing)));
        // One SDS Secret per Kubernetes Secret, however many chains use it.
        let mut named = std::collections::BTreeSet::new();
        for chain in &plan.tls_chains {
            let s = &chain.secret;
            if !named.insert(s.name.as_str()) {
                continue;
            }
            let key = Arc::as_ptr(s) as usize;
            let rendered = match cache.secrets.remove(&key) {
                Some(done) if Arc::ptr_eq(&done.plan, s) => done,
                _ => RenderedSecret {
                    plan: s.clone(),
                    secret: Arc::new(tls_secret(s)),
                },
            };
            r.secrets.push(rendered.secret.clone());
            next.secrets.insert(key, rendered);
        }
    }
    match routing {
        Routing::Whole => {
            let all: Vec<&VirtualHostPlan> = plan.vhosts.iter().map(|v| &**v).collect();
            let external: Vec<&VirtualHostPlan> =
                all.iter().copied().filter(|v| !v.cluster_local).collect();
            // (listener, its virtual hosts, whether plain-HTTP redirects apply)
            let mut tables = vec![
                (EXTERNAL_LISTENER, &external, true),
                (INTERNAL_LISTENER, &all, false),
            ];
            if tls.is_some() {
                tables.push((TLS_LISTENER, &external, false));
            }
            for (listener, vhosts, plain_external) in tables {
                r.route_configurations.push(Arc::new(route_configuration(
                    listener,
                    vhosts.iter().copied(),
                    plain_external,
                )));
            }
        }
        Routing::Scoped => {
            for v in &plan.vhosts {
                let key = Arc::as_ptr(v) as usize;
                let rendered = match cache.vhosts.remove(&key) {
                    Some(done) if Arc::ptr_eq(&done.plan, v) && done.tls == tls.is_some() => done,
                    _ => RenderedVirtualHost {
                        plan: v.clone(),
                        tls: tls.is_some(),
                        scopes: scopes(v, tls.is_some()),
                    },
                };
                r.scoped_route_configurations
                    .extend(rendered.scopes.iter().cloned());
                next.vhosts.insert(key, rendered);
            }
        }
    }

    for sidecar in &plan.sidecars {
        let name = sidecar_name(sidecar);
        let rendered = match cache.sidecars.remove(&name) {
            Some(done) if done.plan == *sidecar => done,
            _ => RenderedSidecar {
                plan: sidecar.clone(),
                listener: Arc::new(sidecar_listener(
                    &name,
                    sidecar,
                    gateway.queue_proxy.as_ref(),
                )),
                cluster: Arc::new(sidecar_cluster(&name, sidecar)),
            },
        };
        r.listeners.push(rendered.listener.clone());
        r.clusters.push(rendered.cluster.clone());
        next.sidecars.insert(name, rendered);
    }

    for c in plan.clusters.values() {
        let key = Arc::as_ptr(c) as usize;
        let rendered = match cache.clusters.remove(&key) {
            Some(done) if Arc::ptr_eq(&done.plan, c) => done,
            _ => RenderedCluster {
                plan: c.clone(),
                cluster: Arc::new(cluster(c)),
                assignment: match &c.kind {
                    ClusterKind::Eds { endpoints } => {
                        Some(Arc::new(load_assignment(&c.name, endpoints)))
                    }
                    ClusterKind::Dns { .. } => None,
                },
            },
        };
        r.clusters.push(rendered.cluster.clone());
        if let Some(a) = &rendered.assignment {
            r.cluster_load_assignments.push(a.clone());
        }
        next.clusters.insert(key, rendered);
    }
    *cache = next;
    r
}

fn sidecar_name(s: &InstanceSidecar) -> String {
    format!("{SIDECAR_PREFIX}{}/{}", s.namespace, s.instance)
}

/// The queue-proxy's plugin configuration (see wasm-filters/queue-proxy/src/config.rs). Readiness is
/// the runtime's job: an instance only gets traffic once the runtime saw it ready, so the filter starts
/// ready.
fn queue_proxy_config(s: &InstanceSidecar) -> String {
    serde_json::json!({
        "namespace": s.namespace,
        "revision": s.revision,
        "service": s.service,
        "instance": s.instance,
        "containerConcurrency": s.container_concurrency,
        "timeoutSeconds": s.timeout_seconds,
        "ready": true,
    })
    .to_string()
}

fn queue_proxy_filter(s: &InstanceSidecar, filter: &QueueProxyFilter) -> HttpFilter {
    match filter {
        QueueProxyFilter::Wasm(wasm) => queue_proxy_wasm_filter(s, wasm),
        QueueProxyFilter::Native(module) => queue_proxy_native_filter(s, module),
    }
}

/// The native build: `envoy.filters.http.dynamic_modules` with the same plugin configuration. The
/// module is never unloaded (`do_not_close`): it keeps its instances' breakers across listener
/// updates and runs a tick thread.
fn queue_proxy_native_filter(s: &InstanceSidecar, module: &Path) -> HttpFilter {
    let config = DynamicModuleFilter {
        dynamic_module_config: Some(DynamicModuleConfig {
            do_not_close: true,
            metrics_namespace: QUEUE_PROXY_NATIVE_METRICS_NAMESPACE.to_string(),
            module: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(
                        module.display().to_string(),
                    )),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
        filter_name: QUEUE_PROXY_NATIVE_FILTER_NAME.to_string(),
        filter_config: Some(pack_any(StringValue {
            value: queue_proxy_config(s),
        })),
        terminal_filter: false,
    };
    HttpFilter {
        name: "envoy.filters.http.dynamic_modules".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(config))),
        ..Default::default()
    }
}

fn queue_proxy_wasm_filter(s: &InstanceSidecar, wasm: &Path) -> HttpFilter {
    let plugin = PluginConfig {
        name: "queue-proxy".to_string(),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: QUEUE_PROXY_VM_ID.to_string(),
            runtime: QUEUE_PROXY_RUNTIME.to_string(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(wasm.display().to_string())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        configuration: Some(pack_any(StringValue {
            value: queue_proxy_config(s),
        })),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.wasm".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Wasm {
            config: Some(plugin),
        }))),
        ..Default::default()
    }
}

/// One instance-side listener: the queue-proxy filter (when built) and a route to the instance with the
/// revision's timeout, as Knative's queue-proxy enforces timeoutSeconds.
fn sidecar_listener(
    name: &str,
    s: &InstanceSidecar,
    filter: Option<&QueueProxyFilter>,
) -> Listener {
    let mut http_filters = Vec::new();
    if let Some(filter) = filter {
        http_filters.push(queue_proxy_filter(s, filter));
    }
    http_filters.push(router_filter());
    let route_config = RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec!["*".to_string()],
            routes: vec![Route {
                r#match: Some(prefix_match("/", &[])),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        name.to_string(),
                    )),
                    timeout: Some(seconds(s.timeout_seconds as i64)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        http_filters,
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_string(),
            ..Default::default()
        }],
        stream_idle_timeout: Some(seconds(0)),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket_address(s.listen)),
        // `listener.sidecar/...` rather than the address: the bootstrap's stats matcher drops every
        // instance's Envoy stats by this prefix (the queue-proxy's own metrics are what is read).
        stat_prefix: name.to_string(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The instance's process, a static endpoint: it never moves while the instance lives.
fn sidecar_cluster(name: &str, s: &InstanceSidecar) -> Cluster {
    let mut out = cluster(&ClusterPlan {
        name: name.to_string(),
        http2: s.http2,
        kind: ClusterKind::Eds {
            endpoints: Vec::new(),
        },
    });
    out.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::Static as i32,
    ));
    out.eds_cluster_config = None;
    out.connect_timeout = Some(seconds(1));
    out.load_assignment = Some(load_assignment_hosts(
        name,
        &[(s.app.ip().to_string(), u32::from(s.app.port()))],
    ));
    out
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket_address(addr: SocketAddr) -> Address {
    socket_address_of(&addr.ip().to_string(), u32::from(addr.port()))
}

fn socket_address_of(host: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn seconds(s: i64) -> Duration {
    Duration {
        seconds: s,
        nanos: 0,
    }
}

/// The authority's host without the port: `a.example.com:8080` and `a.example.com` both give
/// `a.example.com`.
fn host_fragment() -> scoped_routes::scope_key_builder::FragmentBuilder {
    use scoped_routes::scope_key_builder::fragment_builder::{
        self, HeaderValueExtractor, header_value_extractor,
    };
    scoped_routes::scope_key_builder::FragmentBuilder {
        r#type: Some(fragment_builder::Type::HeaderValueExtractor(
            HeaderValueExtractor {
                name: ":authority".to_string(),
                element_separator: ":".to_string(),
                extract_type: Some(header_value_extractor::ExtractType::Index(0)),
            },
        )),
    }
}

fn http_connection_manager(listener: &str, routing: Routing) -> Filter {
    let route_specifier = match routing {
        Routing::Whole => http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: listener.to_string(),
        }),
        // A request whose host has no scope gets Envoy's 404, as an unknown host does with RDS.
        Routing::Scoped => http_connection_manager::RouteSpecifier::ScopedRoutes(ScopedRoutes {
            name: listener.to_string(),
            scope_key_builder: Some(scoped_routes::ScopeKeyBuilder {
                fragments: vec![host_fragment(); scope_rank(listener)],
            }),
            rds_config_source: Some(ads_source()),
            config_specifier: Some(scoped_routes::ConfigSpecifier::ScopedRds(ScopedRds {
                scoped_rds_config_source: Some(ads_source()),
                ..Default::default()
            })),
        }),
    };
    let hcm = HttpConnectionManager {
        stat_prefix: listener.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(route_specifier),
        http_filters: vec![router_filter()],
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_string(),
            ..Default::default()
        }],
        // Knative's ingress has no request timeout; streams (gRPC, websockets) may idle for long.
        stream_idle_timeout: Some(seconds(0)),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

fn http_listener(name: &str, addr: SocketAddr, routing: Routing) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(addr)),
        filter_chains: vec![FilterChain {
            filters: vec![http_connection_manager(name, routing)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn tls_listener(addr: SocketAddr, chains: &[TlsChainPlan], routing: Routing) -> Listener {
    Listener {
        name: TLS_LISTENER.to_string(),
        address: Some(socket_address(addr)),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains
            .iter()
            .map(|c| tls_filter_chain(c, routing))
            .collect(),
        ..Default::default()
    }
}

/// A TLS Secret for SDS: the key material goes only here, and Envoy fetches it by name over ADS.
fn tls_secret(s: &TlsSecretPlan) -> Secret {
    Secret {
        name: s.name.clone(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&s.cert_chain)),
            private_key: Some(inline(&s.private_key)),
            ..Default::default()
        })),
    }
}

fn tls_filter_chain(chain: &TlsChainPlan, routing: Routing) -> FilterChain {
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            // By reference: the key itself comes over the same ADS stream as an SDS Secret.
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: chain.secret.name.clone(),
                sds_config: Some(ads_source()),
            }],
            alpn_protocols: vec!["h2".to_string(), "http/1.1".to_string()],
            ..Default::default()
        }),
        ..Default::default()
    };
    FilterChain {
        name: chain.name.clone(),
        filter_chain_match: Some(FilterChainMatch {
            server_names: chain.server_names.clone(),
            ..Default::default()
        }),
        filters: vec![http_connection_manager(TLS_LISTENER, routing)],
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
        }),
        ..Default::default()
    }
}

fn inline(bytes: &[u8]) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    }
}

fn route_configuration<'a>(
    name: &str,
    vhosts: impl Iterator<Item = &'a VirtualHostPlan>,
    plain_external: bool,
) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vhosts
            .map(|v| virtual_host(v, plain_external && v.redirect_plain))
            .collect(),
        ..Default::default()
    }
}

/// A virtual host's scopes: one per host on each listener that serves it (cluster-local rules only
/// on the internal one), in listener order.
fn scopes(v: &VirtualHostPlan, tls: bool) -> Vec<Arc<ScopedRouteConfiguration>> {
    let mut listeners = Vec::new();
    if !v.cluster_local {
        listeners.push((EXTERNAL_LISTENER, v.redirect_plain));
    }
    listeners.push((INTERNAL_LISTENER, false));
    if tls && !v.cluster_local {
        listeners.push((TLS_LISTENER, false));
    }
    listeners
        .into_iter()
        .flat_map(|(listener, redirect)| {
            v.hosts
                .iter()
                .map(move |host| Arc::new(scope(listener, host, v, redirect)))
        })
        .collect()
}

fn scope_name(listener: &str, host: &str) -> String {
    format!("{listener}/{host}")
}

/// One host's routing scope on one listener: `<listener>/<host>`, keyed by the host (repeated
/// [`scope_rank`] times), with the host's virtual host inline.
fn scope(
    listener: &str,
    host: &str,
    v: &VirtualHostPlan,
    redirect: bool,
) -> ScopedRouteConfiguration {
    use scoped_route_configuration::key::{Fragment, fragment};
    let name = scope_name(listener, host);
    let fragment = Fragment {
        r#type: Some(fragment::Type::StringKey(host.to_string())),
    };
    ScopedRouteConfiguration {
        name: name.clone(),
        route_configuration_name: name.clone(),
        route_configuration: Some(RouteConfiguration {
            name,
            virtual_hosts: vec![virtual_host_for(
                v,
                std::slice::from_ref(&host.to_string()),
                redirect,
            )],
            ..Default::default()
        }),
        key: Some(scoped_route_configuration::Key {
            fragments: vec![fragment; scope_rank(listener)],
        }),
        ..Default::default()
    }
}

fn virtual_host(v: &VirtualHostPlan, redirect: bool) -> VirtualHost {
    virtual_host_for(v, &v.hosts, redirect)
}

/// The virtual host of `v` serving `hosts` (a subset of its hosts; empty means every host).
fn virtual_host_for(v: &VirtualHostPlan, hosts: &[String], redirect: bool) -> VirtualHost {
    let domains = if hosts.is_empty() {
        vec!["*".to_string()]
    } else {
        // Serve authorities with a port too (`host:8080`).
        hosts
            .iter()
            .flat_map(|h| [h.clone(), format!("{h}:*")])
            .collect()
    };
    let mut routes = vec![readiness_probe_route(&v.hash)];
    if redirect {
        routes.push(Route {
            r#match: Some(prefix_match("/", &[])),
            action: Some(route::Action::Redirect(RedirectAction {
                scheme_rewrite_specifier: Some(
                    redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true),
                ),
                response_code: redirect_action::RedirectResponseCode::MovedPermanently as i32,
                ..Default::default()
            })),
            ..Default::default()
        });
    } else {
        routes.extend(v.routes.iter().map(forward_route));
    }
    VirtualHost {
        name: v.name.clone(),
        domains,
        routes,
        ..Default::default()
    }
}

/// Answered by Envoy itself: proves this version of the Ingress is what the gateway serves.
fn readiness_probe_route(hash: &str) -> Route {
    let headers = [
        (PROBE_HEADER.to_string(), READINESS_PROBE_VALUE.to_string()),
        (HASH_HEADER.to_string(), hash.to_string()),
    ];
    Route {
        r#match: Some(prefix_match("/", &headers)),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 200,
            ..Default::default()
        })),
        response_headers_to_add: vec![set_header(HASH_HEADER, hash)],
        ..Default::default()
    }
}

fn prefix_match(prefix: &str, headers: &[(String, String)]) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_string())),
        headers: headers
            .iter()
            .map(|(name, value)| HeaderMatcher {
                name: name.clone(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(value.clone())),
                        ignore_case: false,
                    },
                )),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn set_header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn set_headers(headers: &[(String, String)]) -> Vec<HeaderValueOption> {
    headers.iter().map(|(k, v)| set_header(k, v)).collect()
}

fn forward_route(r: &RoutePlan) -> Route {
    let mut request_headers = set_headers(&r.set_headers);
    let cluster_specifier = match r.backends.as_slice() {
        [] => None,
        [only] => {
            // Split-level headers apply after path-level ones, so they win on the same name.
            request_headers.extend(set_headers(&only.set_headers));
            Some(route_action::ClusterSpecifier::Cluster(
                only.cluster.clone(),
            ))
        }
        many => Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters: many
                    .iter()
                    .map(|b| weighted_cluster::ClusterWeight {
                        name: b.cluster.clone(),
                        weight: Some(UInt32Value { value: b.weight }),
                        request_headers_to_add: set_headers(&b.set_headers),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )),
    };
    let action = match cluster_specifier {
        // Every split at 0%: nothing may receive traffic.
        None => route::Action::DirectResponse(DirectResponseAction {
            status: 503,
            ..Default::default()
        }),
        Some(cs) => route::Action::Route(RouteAction {
            cluster_specifier: Some(cs),
            host_rewrite_specifier: r
                .rewrite_host
                .as_ref()
                .map(|h| route_action::HostRewriteSpecifier::HostRewriteLiteral(h.clone())),
            // Knative: no route timeout (Envoy's default is 15 s) and no retries.
            timeout: Some(seconds(0)),
            ..Default::default()
        }),
    };
    Route {
        r#match: Some(prefix_match(&r.prefix, &r.headers)),
        action: Some(action),
        request_headers_to_add: request_headers,
        ..Default::default()
    }
}

fn cluster(c: &ClusterPlan) -> Cluster {
    let mut out = Cluster {
        name: c.name.clone(),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECS)),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: UNLIMITED }),
                max_pending_requests: Some(UInt32Value { value: UNLIMITED }),
                max_requests: Some(UInt32Value { value: UNLIMITED }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    match &c.kind {
        ClusterKind::Eds { .. } => {
            out.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            ));
            out.eds_cluster_config = Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_source()),
                service_name: c.name.clone(),
            });
        }
        ClusterKind::Dns { host, port } => {
            out.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            ));
            out.load_assignment = Some(load_assignment_hosts(&c.name, &[(host.clone(), *port)]));
        }
    }
    if c.http2 {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Http2ProtocolOptions::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        };
        out.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(options),
        );
    }
    out
}

fn load_assignment(name: &str, endpoints: &[(String, u32)]) -> ClusterLoadAssignment {
    load_assignment_hosts(name, endpoints)
}

fn load_assignment_hosts(name: &str, endpoints: &[(String, u32)]) -> ClusterLoadAssignment {
    let lb_endpoints: Vec<LbEndpoint> = endpoints
        .iter()
        .map(|(host, port)| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address_of(host, *port)),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }]
        },
        ..Default::default()
    }
}
