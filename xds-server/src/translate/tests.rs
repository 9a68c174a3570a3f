//! Translation, table by table: Knative YAML in, the Envoy resources (or the rejection) out.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, VirtualHost, header_matcher, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use sluice_api::Ingress;
use sluice_api::core::{EndpointSlice, Endpoints, Secret, Service};
use sluice_api::ingress::compute_hash;

use super::*;
use crate::state::ClusterState;
use crate::status::REASON_DOMAIN_CONFLICT;

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

fn ingress(yaml: &str) -> Ingress {
    serde_yaml::from_str(yaml).expect("test ingress parses")
}

/// An Ingress of Sluice's class in namespace `ns` with the given spec (YAML, indented by 2).
fn ing(name: &str, spec: &str) -> Ingress {
    ingress(&format!(
        "metadata:\n  name: {name}\n  namespace: ns\n  annotations:\n    networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev\nspec:\n{spec}"
    ))
}

fn simple(name: &str, host: &str, service: &str) -> Ingress {
    ing(
        name,
        &format!(
            "  rules:\n  - hosts: [{host}]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - serviceNamespace: ns\n          serviceName: {service}\n          servicePort: 80\n          percent: 100\n"
        ),
    )
}

fn service(name: &str, port_name: &str) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: ns}}\nspec:\n  ports:\n  - {{name: {port_name}, port: 80, targetPort: 8080}}\n"
    ))
    .unwrap()
}

fn endpoints(name: &str, port_name: &str, ips: &[&str]) -> Endpoints {
    let addrs: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: ns}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: {port_name}, port: 8080}}]\n",
        addrs.join(", ")
    ))
    .unwrap()
}

fn state(ingresses: &[Ingress], services: &[&str]) -> ClusterState {
    let mut s = ClusterState::default();
    for i in ingresses {
        s.ingresses.insert(
            (i.metadata.namespace.clone(), i.metadata.name.clone()),
            i.clone().into(),
        );
    }
    for name in services {
        s.services.insert(
            ("ns".into(), name.to_string()),
            service(name, "http").into(),
        );
        s.endpoints.insert(
            ("ns".into(), name.to_string()),
            endpoints(name, "http", &["10.0.0.1"]).into(),
        );
    }
    s
}

fn gateway() -> GatewayConfig {
    GatewayConfig {
        tls_address: Some("127.0.0.1:8443".parse().unwrap()),
        ..GatewayConfig::default()
    }
}

/// The route table listener `name` serves: its RouteConfiguration, or with scoped routing the virtual
/// hosts of all its scopes (leaked: a test's tables live as long as the test).
fn route_config<'a>(t: &'a Translation, name: &str) -> &'a RouteConfiguration {
    if let Some(rc) = t
        .resources
        .route_configurations
        .iter()
        .find(|r| r.name == name)
    {
        return rc;
    }
    let prefix = format!("{name}/");
    let scopes: Vec<_> = t
        .resources
        .scoped_route_configurations
        .iter()
        .filter(|s| s.name.starts_with(&prefix))
        .collect();
    assert!(
        t.resources.listeners.iter().any(|l| l.name == name),
        "route configuration {name}"
    );
    Box::leak(Box::new(RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: scopes
            .iter()
            .flat_map(|s| {
                s.route_configuration
                    .as_ref()
                    .unwrap()
                    .virtual_hosts
                    .clone()
            })
            .collect(),
        ..Default::default()
    }))
}

fn vhost<'a>(rc: &'a RouteConfiguration, domain: &str) -> Option<&'a VirtualHost> {
    rc.virtual_hosts
        .iter()
        .find(|v| v.domains.iter().any(|d| d == domain))
}

fn cluster<'a>(t: &'a Translation, name: &str) -> &'a Cluster {
    t.resources
        .clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("cluster {name}"))
}

fn cla<'a>(t: &'a Translation, name: &str) -> &'a ClusterLoadAssignment {
    t.resources
        .cluster_load_assignments
        .iter()
        .find(|c| c.cluster_name == name)
        .unwrap_or_else(|| panic!("load assignment {name}"))
}

fn action(r: &Route) -> &RouteAction {
    match r.action.as_ref().unwrap() {
        route::Action::Route(a) => a,
        other => panic!("not a forward route: {other:?}"),
    }
}

fn prefix(r: &Route) -> &str {
    match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
        route_match::PathSpecifier::Prefix(p) => p,
        other => panic!("not a prefix: {other:?}"),
    }
}

fn header_matches(r: &Route) -> BTreeMap<String, String> {
    r.r#match
        .as_ref()
        .unwrap()
        .headers
        .iter()
        .map(|h| match h.header_match_specifier.as_ref().unwrap() {
            header_matcher::HeaderMatchSpecifier::StringMatch(m) => {
                match m.match_pattern.as_ref().unwrap() {
                    string_matcher::MatchPattern::Exact(v) => (h.name.clone(), v.clone()),
                    other => panic!("not exact: {other:?}"),
                }
            }
            other => panic!("not a string match: {other:?}"),
        })
        .collect()
}

fn added(
    headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            assert_eq!(
                h.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "appendHeaders have set semantics"
            );
            let hv = h.header.as_ref().unwrap();
            (hv.key.clone(), hv.value.clone())
        })
        .collect()
}

/// The user's routes of a vhost: without Sluice's readiness route and Knative's probe copies.
fn user_routes(v: &VirtualHost) -> Vec<&Route> {
    v.routes
        .iter()
        .filter(|r| {
            let h = header_matches(r);
            !h.contains_key("K-Network-Hash")
        })
        .collect()
}

#[test]
fn basic_ingress_becomes_listeners_vhost_route_cluster_and_endpoints() {
    let i = simple("hello", "hello.example.com", "hello");
    let t = translate(&state(std::slice::from_ref(&i), &["hello"]), &gateway());

    let hash = compute_hash(&i);
    let outcome = &t.ingresses[&("ns".to_string(), "hello".to_string())];
    assert_eq!(outcome.hash(), Some(hash.as_str()));
    assert_eq!(outcome.contested(), None);
    assert_eq!(
        outcome.uses(),
        [
            (
                crate::resources::CLUSTER_TYPE_URL,
                "ns/hello:80".to_string()
            ),
            (crate::resources::LISTENER_TYPE_URL, "external".to_string()),
        ],
        "served through the external listener and its Service's cluster"
    );
    let names: Vec<&str> = t
        .resources
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["external", "internal"],
        "no TLS listener without spec.tls"
    );

    for rc_name in ["external", "internal"] {
        let rc = route_config(&t, rc_name);
        let v = vhost(rc, "hello.example.com").expect("vhost");
        assert_eq!(v.domains, ["hello.example.com", "hello.example.com:*"]);
        // 1: Sluice's readiness probe, answered by Envoy.
        let first = &v.routes[0];
        assert_eq!(
            header_matches(first),
            BTreeMap::from([
                ("K-Network-Hash".to_string(), hash.clone()),
                ("K-Network-Probe".to_string(), "sluice-ready".to_string()),
            ])
        );
        assert!(
            matches!(first.action, Some(route::Action::DirectResponse(ref d)) if d.status == 200)
        );
        assert_eq!(
            added(&first.response_headers_to_add),
            [("K-Network-Hash".to_string(), hash.clone())]
        );
        // 2: Knative's probe copy of the path.
        let probe = &v.routes[1];
        assert_eq!(
            header_matches(probe),
            BTreeMap::from([("K-Network-Hash".to_string(), "override".to_string())])
        );
        assert_eq!(
            added(&probe.request_headers_to_add),
            [("K-Network-Hash".to_string(), hash.clone())]
        );
        // 3: the path itself.
        let r = &v.routes[2];
        assert_eq!(prefix(r), "/");
        let a = action(r);
        assert_eq!(
            a.cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(
                "ns/hello:80".into()
            ))
        );
        assert_eq!(
            a.timeout.as_ref().map(|d| (d.seconds, d.nanos)),
            Some((0, 0)),
            "no route timeout"
        );
        assert!(a.retry_policy.is_none(), "no retries");
        assert_eq!(v.routes.len(), 3);
    }

    let c = cluster(&t, "ns/hello:80");
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    assert!(
        c.typed_extension_protocol_options.is_empty(),
        "HTTP/1 upstream"
    );
    let eps: Vec<String> = cla(&t, "ns/hello:80").endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| match e.host_identifier.as_ref().unwrap() {
            lb_endpoint::HostIdentifier::Endpoint(ep) => format!("{:?}", ep.address),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(eps.len(), 1);
    assert!(
        eps[0].contains("10.0.0.1") && eps[0].contains("8080"),
        "{eps:?}"
    );
}

#[test]
fn cluster_local_rules_are_only_on_the_internal_listener() {
    let i = ing(
        "local",
        "  rules:\n  - hosts: [local.ns.svc.cluster.local]\n    visibility: ClusterLocal\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: s, servicePort: 80}\n",
    );
    let t = translate(&state(&[i], &["s"]), &gateway());
    assert!(vhost(route_config(&t, "external"), "local.ns.svc.cluster.local").is_none());
    assert!(vhost(route_config(&t, "internal"), "local.ns.svc.cluster.local").is_some());
}

#[test]
fn paths_longest_prefix_first_with_exact_header_matches() {
    let i = ing(
        "paths",
        "  rules:\n  - hosts: [p.example.com]\n    http:\n      paths:\n      - splits: [{serviceNamespace: ns, serviceName: a, servicePort: 80}]\n      - path: /foo\n        splits: [{serviceNamespace: ns, serviceName: b, servicePort: 80}]\n      - path: /foo/bar\n        headers:\n          Knative-Serving-Tag: {exact: green}\n        splits: [{serviceNamespace: ns, serviceName: c, servicePort: 80}]\n",
    );
    let t = translate(&state(&[i], &["a", "b", "c"]), &gateway());
    let v = vhost(route_config(&t, "external"), "p.example.com").unwrap();
    let routes = user_routes(v);
    let prefixes: Vec<&str> = routes.iter().map(|r| prefix(r)).collect();
    assert_eq!(prefixes, ["/foo/bar", "/foo", "/"]);
    assert_eq!(
        header_matches(routes[0]),
        BTreeMap::from([("Knative-Serving-Tag".to_string(), "green".to_string())])
    );
    // Every probe copy precedes its original.
    let all: Vec<(&str, bool)> = v.routes[1..]
        .iter()
        .map(|r| (prefix(r), header_matches(r).contains_key("K-Network-Hash")))
        .collect();
    assert_eq!(
        all,
        [
            ("/foo/bar", true),
            ("/foo/bar", false),
            ("/foo", true),
            ("/foo", false),
            ("/", true),
            ("/", false)
        ]
    );
}

#[test]
fn splits_become_weighted_clusters_without_zero_weights_and_with_set_headers() {
    let i = ing(
        "split",
        "  rules:\n  - hosts: [s.example.com]\n    http:\n      paths:\n      - appendHeaders: {Pre: path}\n        splits:\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80, percent: 70, appendHeaders: {Post: a}}\n        - {serviceNamespace: ns, serviceName: b, servicePort: 80, percent: 30, appendHeaders: {Post: b}}\n        - {serviceNamespace: ns, serviceName: c, servicePort: 80, percent: 0}\n",
    );
    let t = translate(&state(&[i], &["a", "b", "c"]), &gateway());
    let v = vhost(route_config(&t, "external"), "s.example.com").unwrap();
    let r = user_routes(v)[0];
    assert_eq!(
        added(&r.request_headers_to_add),
        [("Pre".to_string(), "path".to_string())]
    );
    let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &action(r).cluster_specifier
    else {
        panic!("weighted clusters")
    };
    type Weighted = (String, u32, Vec<(String, String)>);
    let got: Vec<Weighted> = w
        .clusters
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.weight.as_ref().unwrap().value,
                added(&c.request_headers_to_add),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "ns/a:80".to_string(),
                70,
                vec![("Post".to_string(), "a".to_string())]
            ),
            (
                "ns/b:80".to_string(),
                30,
                vec![("Post".to_string(), "b".to_string())]
            ),
        ]
    );
    // The 0% backend still has a cluster (traffic may shift to it without a new cluster warming).
    cluster(&t, "ns/c:80");
}

#[test]
fn single_split_headers_follow_path_headers_so_they_win() {
    let i = ing(
        "one",
        "  rules:\n  - hosts: [o.example.com]\n    http:\n      paths:\n      - appendHeaders: {X: path}\n        rewriteHost: o.ns.svc.cluster.local\n        splits:\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80, appendHeaders: {X: split}}\n",
    );
    let t = translate(&state(&[i], &["a"]), &gateway());
    let r = user_routes(vhost(route_config(&t, "external"), "o.example.com").unwrap())[0];
    assert_eq!(
        added(&r.request_headers_to_add),
        [
            ("X".to_string(), "path".to_string()),
            ("X".to_string(), "split".to_string())
        ]
    );
    assert_eq!(
        action(r).host_rewrite_specifier,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "o.ns.svc.cluster.local".into()
        ))
    );
}

#[test]
fn h2c_ports_get_http2_upstreams() {
    for (port_name, app_protocol, want) in [
        ("h2c", None, true),
        ("http2", None, true),
        ("grpc", Some("kubernetes.io/h2c"), true),
        ("http", None, false),
    ] {
        let i = simple("h", "h.example.com", "h");
        let mut s = state(&[i], &[]);
        let mut svc = service("h", port_name);
        svc.spec.ports[0].app_protocol = app_protocol.map(String::from);
        s.services.insert(("ns".into(), "h".into()), svc.into());
        let t = translate(&s, &gateway());
        let c = cluster(&t, "ns/h:80");
        assert_eq!(
            !c.typed_extension_protocol_options.is_empty(),
            want,
            "{port_name}"
        );
    }
}

#[test]
fn redirected_http_option_redirects_plain_external_only() {
    let mut i = simple("r", "r.example.com", "r");
    i.spec.http_option = "Redirected".into();
    let t = translate(&state(&[i], &["r"]), &gateway());
    let ext = vhost(route_config(&t, "external"), "r.example.com").unwrap();
    assert_eq!(ext.routes.len(), 2, "readiness probe, then the redirect");
    assert!(matches!(
        ext.routes[1].action,
        Some(route::Action::Redirect(ref r)) if r.scheme_rewrite_specifier.is_some()
    ));
    let int = vhost(route_config(&t, "internal"), "r.example.com").unwrap();
    assert!(matches!(
        user_routes(int)[0].action,
        Some(route::Action::Route(_))
    ));
}

#[test]
fn tls_hosts_get_an_sni_filter_chain_with_the_secret() {
    let mut i = simple("t", "t.example.com", "t");
    i.spec.tls = vec![sluice_api::ingress::IngressTls {
        hosts: vec!["t.example.com".into()],
        secret_name: "cert".into(),
        secret_namespace: "ns".into(),
    }];
    let mut s = state(&[i.clone()], &["t"]);
    let without = translate(&s, &gateway());
    assert_eq!(
        without.ingresses[&("ns".into(), "t".into())]
            .rejection()
            .map(|r| r.0),
        Some(REASON_SECRET_NOT_FOUND)
    );
    let secret: Secret = serde_yaml::from_str(&format!(
        "metadata: {{name: cert, namespace: ns}}\nstringData:\n  tls.crt: {CERT:?}\n  tls.key: {KEY:?}\n"
    ))
    .unwrap();
    s.secrets
        .insert(("ns".into(), "cert".into()), secret.into());
    let t = translate(&s, &gateway());
    assert!(t.ingresses[&("ns".into(), "t".into())].hash().is_some());
    let l = t
        .resources
        .listeners
        .iter()
        .find(|l| l.name == "external-tls")
        .expect("TLS listener");
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    assert_eq!(l.filter_chains.len(), 1);
    assert_eq!(
        l.filter_chains[0]
            .filter_chain_match
            .as_ref()
            .unwrap()
            .server_names,
        ["t.example.com"]
    );
    assert!(vhost(route_config(&t, "external-tls"), "t.example.com").is_some());
}

fn tls_secret_yaml(name: &str, key: &str) -> Secret {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: ns}}\nstringData:\n  tls.crt: {CERT:?}\n  tls.key: {key:?}\n"
    ))
    .unwrap()
}

fn with_tls(name: &str, host: &str, secret: &str) -> Ingress {
    let mut i = simple(name, host, "t");
    i.spec.tls = vec![sluice_api::ingress::IngressTls {
        hosts: vec![host.into()],
        secret_name: secret.into(),
        secret_namespace: "ns".into(),
    }];
    i
}

#[test]
fn tls_keys_reach_envoy_only_as_sds_secrets_over_ads() {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        DownstreamTlsContext, secret,
    };
    use prost::Message;

    const MARKED_KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nS3cr3tK3yMat3r1alOnlyInSDS\n-----END PRIVATE KEY-----\n";
    let mut s = state(
        &[
            with_tls("a", "a.example.com", "shared"),
            with_tls("b", "b.example.com", "shared"),
        ],
        &["t"],
    );
    s.secrets.insert(
        ("ns".into(), "shared".into()),
        tls_secret_yaml("shared", MARKED_KEY).into(),
    );
    let t = translate(&s, &gateway());
    assert!(
        t.ingresses.values().all(|o| o.hash().is_some()),
        "{:?}",
        t.ingresses
    );

    // No listener carries key bytes, in any field: search the encoding itself.
    for l in &t.resources.listeners {
        let bytes = l.encode_to_vec();
        assert!(
            !bytes.windows(b"S3cr3tK3y".len()).any(|w| w == b"S3cr3tK3y"),
            "listener {} holds private key bytes",
            l.name
        );
    }
    let l = t
        .resources
        .listeners
        .iter()
        .find(|l| l.name == "external-tls")
        .expect("TLS listener");
    assert_eq!(l.filter_chains.len(), 2);
    for chain in &l.filter_chains {
        let Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) = &chain.transport_socket.as_ref().unwrap().config_type
        else {
            panic!("typed transport socket");
        };
        let ctx = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        let common = ctx.common_tls_context.unwrap();
        assert!(common.tls_certificates.is_empty(), "no inline certificate");
        assert_eq!(common.tls_certificate_sds_secret_configs.len(), 1);
        let sds = &common.tls_certificate_sds_secret_configs[0];
        assert_eq!(sds.name, "ns/shared");
        assert!(matches!(
            sds.sds_config.as_ref().unwrap().config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
    }

    // One Secret for the Kubernetes Secret both Ingresses use, holding the certificate and key.
    assert_eq!(t.resources.secrets.len(), 1);
    let secret = &t.resources.secrets[0];
    assert_eq!(secret.name, "ns/shared");
    let Some(secret::Type::TlsCertificate(cert)) = &secret.r#type else {
        panic!("a TLS certificate secret");
    };
    let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.clone())
    {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("inline bytes, got {other:?}"),
    };
    assert_eq!(inline(&cert.private_key), MARKED_KEY.as_bytes());
    assert_eq!(inline(&cert.certificate_chain), CERT.as_bytes());
}

#[test]
fn secrets_follow_their_kubernetes_secret_and_go_with_the_last_tls_ingress() {
    let mut s = state(&[with_tls("a", "a.example.com", "one")], &["t"]);
    s.secrets.insert(
        ("ns".into(), "one".into()),
        tls_secret_yaml("one", KEY).into(),
    );
    let mut translator = Translator::new(gateway());
    let first = translator.translate(&s);
    assert_eq!(first.resources.secrets.len(), 1);

    // Unchanged: the very same Secret resource (the snapshot sees a pointer, not a new version).
    let again = translator.translate(&s);
    assert!(Arc::ptr_eq(
        &first.resources.secrets[0],
        &again.resources.secrets[0]
    ));

    // A renewed key: a new Secret with the same name, the Listener unchanged.
    let renewed = KEY.replace("MIIE", "MIIF");
    s.secrets.insert(
        ("ns".into(), "one".into()),
        tls_secret_yaml("one", &renewed).into(),
    );
    let rotated = translator.translate(&s);
    assert_eq!(rotated.resources.secrets.len(), 1);
    assert_eq!(rotated.resources.secrets[0].name, "ns/one");
    assert_ne!(rotated.resources.secrets[0], first.resources.secrets[0]);
    let tls_listener = |t: &Translation| {
        t.resources
            .listeners
            .iter()
            .find(|l| l.name == "external-tls")
            .cloned()
            .expect("TLS listener")
    };
    assert_eq!(tls_listener(&rotated), tls_listener(&first));
    assert_eq!(translate(&s, &gateway()), rotated, "cache agrees");

    // No TLS Ingress left: no Secret either.
    s.ingresses.clear();
    assert!(translator.translate(&s).resources.secrets.is_empty());
}

#[test]
fn host_conflicts_reject_the_newer_ingress_only() {
    let mut old = simple("old", "dup.example.com", "a");
    old.metadata.creation_timestamp = Some("2026-01-01T00:00:00Z".into());
    let mut new = simple("new", "dup.example.com", "b");
    new.metadata.creation_timestamp = Some("2026-02-01T00:00:00Z".into());
    // Named so that it sorts first by name: age, not name, decides.
    new.metadata.name = "aaa-new".into();
    let other = simple("other", "other.example.com", "a");
    let t = translate(&state(&[old, new, other], &["a", "b"]), &gateway());
    assert!(t.ingresses[&("ns".into(), "old".into())].hash().is_some());
    assert!(t.ingresses[&("ns".into(), "other".into())].hash().is_some());
    let (reason, message) = t.ingresses[&("ns".into(), "aaa-new".into())]
        .rejection()
        .unwrap();
    assert_eq!(reason, REASON_DOMAIN_CONFLICT);
    assert!(message.contains("ns/old"), "{message}");
    let rc = route_config(&t, "external");
    let v = vhost(rc, "dup.example.com").unwrap();
    assert!(v.name.starts_with("ns/old/"));
    assert_eq!(rc.virtual_hosts.len(), 2);
    // The owner keeps the host and says who else claims it.
    assert_eq!(
        t.ingresses[&("ns".into(), "old".into())].contested(),
        Some("host dup.example.com is also claimed by Ingress ns/aaa-new, which does not get it")
    );
    assert_eq!(
        t.ingresses[&("ns".into(), "other".into())].contested(),
        None
    );
}

#[test]
fn uses_name_the_probed_listeners_and_the_clusters() {
    let both = ing(
        "both",
        "  rules:\n  - hosts: [both.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80, percent: 50}\n        - {serviceNamespace: ns, serviceName: b, servicePort: 80, percent: 50}\n  - hosts: [both.ns.svc.cluster.local]\n    visibility: ClusterLocal\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80}\n",
    );
    let t = translate(&state(&[both], &["a", "b"]), &gateway());
    let uses: Vec<(&str, &str)> = t.ingresses[&("ns".into(), "both".into())]
        .uses()
        .iter()
        .map(|(t, n)| (t.rsplit('.').next().unwrap(), n.as_str()))
        .collect();
    assert_eq!(
        uses,
        [
            ("Cluster", "ns/a:80"),
            ("Cluster", "ns/b:80"),
            ("Listener", "external"),
            ("Listener", "internal"),
        ]
    );
}

#[test]
fn only_the_contested_host_is_withheld_and_the_loser_says_which() {
    let mut old = simple("old", "dup.example.com", "a");
    old.metadata.creation_timestamp = Some("2026-01-01T00:00:00Z".into());
    let mut new = ing(
        "aaa-new",
        "  rules:\n  - hosts: [dup.example.com, mine.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: b, servicePort: 80}\n  - hosts: [aaa-new.ns.svc.cluster.local]\n    visibility: ClusterLocal\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: b, servicePort: 80}\n",
    );
    new.metadata.creation_timestamp = Some("2026-02-01T00:00:00Z".into());
    let t = translate(&state(&[old, new], &["a", "b"]), &gateway());
    assert!(t.ingresses[&("ns".into(), "old".into())].hash().is_some());
    let (reason, message) = t.ingresses[&("ns".into(), "aaa-new".into())]
        .rejection()
        .unwrap();
    assert_eq!(reason, REASON_DOMAIN_CONFLICT);
    assert_eq!(
        message,
        "host dup.example.com is already served by Ingress ns/old; its other hosts are served"
    );
    let external = route_config(&t, "external");
    assert!(
        vhost(external, "dup.example.com")
            .unwrap()
            .name
            .starts_with("ns/old/")
    );
    let mine = vhost(external, "mine.example.com").expect("uncontested host still served");
    assert!(mine.name.starts_with("ns/aaa-new/"));
    assert!(
        !mine
            .domains
            .iter()
            .any(|d| d.starts_with("dup.example.com"))
    );
    let internal = route_config(&t, "internal");
    let local = vhost(internal, "aaa-new.ns.svc.cluster.local").expect("cluster-local host kept");
    assert!(local.name.starts_with("ns/aaa-new/"));
}

#[test]
fn without_creation_timestamps_the_ingress_seen_first_keeps_the_host() {
    // Objects from files have no creationTimestamp: the one Sluice saw first wins, whatever the name.
    let first = simple("zzz-first", "dup.example.com", "a");
    let newcomer = simple("aaa-newcomer", "dup.example.com", "b");
    let mut translator = Translator::new(gateway());
    translator.translate(&state(std::slice::from_ref(&first), &["a", "b"]));
    let both = state(&[first.clone(), newcomer.clone()], &["a", "b"]);
    for _ in 0..2 {
        let t = translator.translate(&both);
        assert!(
            t.ingresses[&("ns".into(), "zzz-first".into())]
                .hash()
                .is_some()
        );
        let (reason, message) = t.ingresses[&("ns".into(), "aaa-newcomer".into())]
            .rejection()
            .expect("the newcomer is told");
        assert_eq!(reason, REASON_DOMAIN_CONFLICT);
        assert_eq!(
            message,
            "host dup.example.com is already served by Ingress ns/zzz-first"
        );
        let v = vhost(route_config(&t, "external"), "dup.example.com").unwrap();
        assert!(v.name.starts_with("ns/zzz-first/"), "{}", v.name);
    }
    // Once the first is deleted, the other gets the host; a recreated one is new again.
    let t = translator.translate(&state(std::slice::from_ref(&newcomer), &["a", "b"]));
    assert!(
        t.ingresses[&("ns".into(), "aaa-newcomer".into())]
            .hash()
            .is_some()
    );
    let t = translator.translate(&both);
    assert!(
        t.ingresses[&("ns".into(), "aaa-newcomer".into())]
            .hash()
            .is_some()
    );
    assert!(
        t.ingresses[&("ns".into(), "zzz-first".into())]
            .rejection()
            .is_some()
    );
}

#[test]
fn bad_ingresses_are_rejected_with_reasons_and_leave_the_rest_alone() {
    let bad_sum = ing(
        "sum",
        "  rules:\n  - hosts: [sum.example.com]\n    http:\n      paths:\n      - splits:\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80, percent: 50}\n        - {serviceNamespace: ns, serviceName: a, servicePort: 80, percent: 40}\n",
    );
    let no_service = simple("nosvc", "nosvc.example.com", "missing");
    let mut no_port = simple("noport", "noport.example.com", "a");
    no_port.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_port =
        sluice_api::ingress::IntOrString::Int(81);
    let mut bad_header = simple("hdr", "hdr.example.com", "a");
    bad_header.spec.rules[0].http.as_mut().unwrap().paths[0]
        .append_headers
        .insert("Host".into(), "x".into());
    let good = simple("good", "good.example.com", "a");
    let t = translate(
        &state(&[bad_sum, no_service, no_port, bad_header, good], &["a"]),
        &gateway(),
    );
    let reason = |n: &str| {
        t.ingresses[&("ns".to_string(), n.to_string())]
            .rejection()
            .map(|(r, m)| (r.to_string(), m.to_string()))
    };
    let (r, m) = reason("sum").unwrap();
    assert_eq!(r, REASON_INVALID_SPEC);
    assert!(m.contains("spec.rules[0].http.paths[0].splits"), "{m}");
    let (r, m) = reason("nosvc").unwrap();
    assert_eq!(r, REASON_SERVICE_NOT_FOUND);
    assert!(
        m.contains("spec.rules[0].http.paths[0].splits[0]") && m.contains("ns/missing"),
        "{m}"
    );
    assert_eq!(reason("noport").unwrap().0, REASON_SERVICE_PORT_NOT_FOUND);
    assert_eq!(reason("hdr").unwrap().0, REASON_INVALID_SPEC);
    assert!(reason("good").is_none());
    let rc = route_config(&t, "external");
    assert_eq!(rc.virtual_hosts.len(), 1);
    assert!(vhost(rc, "good.example.com").is_some());
}

#[test]
fn other_ingress_classes_are_ignored_entirely() {
    let mut mine = simple("mine", "mine.example.com", "a");
    let mut theirs = simple("theirs", "theirs.example.com", "a");
    theirs.metadata.annotations.insert(
        "networking.knative.dev/ingress.class".into(),
        "istio.ingress.networking.knative.dev".into(),
    );
    let mut none = simple("none", "none.example.com", "a");
    none.metadata.annotations.clear();
    mine.metadata.generation = 3;
    let t = translate(&state(&[mine, theirs, none], &["a"]), &gateway());
    assert_eq!(t.ingresses.len(), 1);
    assert!(vhost(route_config(&t, "external"), "theirs.example.com").is_none());
    assert!(vhost(route_config(&t, "external"), "none.example.com").is_none());
}

#[test]
fn endpoint_slices_supply_ready_addresses_when_there_are_no_endpoints() {
    let i = simple("sl", "sl.example.com", "sl");
    let mut s = state(&[i], &[]);
    s.services
        .insert(("ns".into(), "sl".into()), service("sl", "http").into());
    let slice: EndpointSlice = serde_yaml::from_str(
        "metadata:\n  name: sl-abc\n  namespace: ns\n  labels: {kubernetes.io/service-name: sl}\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.2]\n  conditions: {ready: true}\n- addresses: [10.0.0.3]\n  conditions: {ready: false}\n- addresses: [10.0.0.4]\nports:\n- {name: http, port: 9000}\n",
    )
    .unwrap();
    s.endpoint_slices
        .insert(("ns".into(), "sl-abc".into()), slice.into());
    let t = translate(&s, &gateway());
    let got: Vec<String> = cla(&t, "ns/sl:80").endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| format!("{:?}", e.host_identifier))
        .collect();
    assert_eq!(got.len(), 2);
    assert!(
        got[0].contains("10.0.0.2") && got[1].contains("10.0.0.4"),
        "{got:?}"
    );
}

#[test]
fn no_endpoints_is_not_an_error() {
    let i = simple("zero", "zero.example.com", "zero");
    let mut s = state(&[i], &[]);
    s.services
        .insert(("ns".into(), "zero".into()), service("zero", "http").into());
    let t = translate(&s, &gateway());
    assert!(t.ingresses[&("ns".into(), "zero".into())].hash().is_some());
    assert!(cla(&t, "ns/zero:80").endpoints.is_empty());
}

#[test]
fn translation_is_deterministic() {
    let is: Vec<Ingress> = (0..20)
        .map(|n| simple(&format!("i{n}"), &format!("h{n}.example.com"), "a"))
        .collect();
    let a = translate(&state(&is, &["a"]), &gateway());
    let mut rev = is.clone();
    rev.reverse();
    let b = translate(&state(&rev, &["a"]), &gateway());
    assert_eq!(a, b);
}

#[test]
fn translator_replans_what_changed_and_matches_a_fresh_translation() {
    let mut translator = Translator::new(gateway());
    let mut s = state(
        &[
            simple("a", "a.example.com", "sa"),
            simple("b", "b.example.com", "sb"),
        ],
        &["sa", "sb"],
    );
    let key = |n: &str| ("ns".to_string(), n.to_string());
    type Step = (&'static str, Box<dyn Fn(&mut ClusterState)>);
    let mut steps: Vec<Step> = vec![
        ("unchanged", Box::new(|_| {})),
        (
            "endpoints move",
            Box::new(move |s| {
                s.endpoints
                    .insert(key("sa"), endpoints("sa", "http", &["10.0.0.9"]).into());
            }),
        ),
        (
            "a Service goes away",
            Box::new(move |s| {
                s.services.remove(&key("sb"));
            }),
        ),
        (
            "and comes back",
            Box::new(move |s| {
                s.services.insert(key("sb"), service("sb", "http").into());
            }),
        ),
        (
            "an Ingress gains a host",
            Box::new(move |s| {
                s.ingresses
                    .insert(key("a"), simple("a", "new.example.com", "sa").into());
            }),
        ),
        (
            "an Ingress goes away",
            Box::new(move |s| {
                s.ingresses.remove(&key("b"));
            }),
        ),
        (
            "a wildcard host switches to whole route tables",
            Box::new(move |s| {
                s.ingresses
                    .insert(key("w"), simple("w", "'*.wild.example.com'", "sa").into());
            }),
        ),
    ];
    for (what, change) in steps.drain(..) {
        change(&mut s);
        assert_eq!(
            translator.translate(&s),
            translate(&s, &gateway()),
            "{what}"
        );
    }
    let t = translator.translate(&s);
    assert!(!t.ingresses.contains_key(&key("b")));
    assert_eq!(
        cla(&t, "ns/sa:80").endpoints[0].lb_endpoints.len(),
        1,
        "moved endpoints"
    );
    assert!(vhost(route_config(&t, "external"), "new.example.com").is_some());
    assert!(vhost(route_config(&t, "external"), "*.wild.example.com").is_some());
}

#[test]
fn exact_hosts_get_one_routing_scope_per_listener_and_host() {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use prost::Message;
    let mut two_hosts = simple("m", "m.example.com", "a");
    two_hosts.spec.rules[0].hosts.push("m.example.org".into());
    let t = translate(&state(&[two_hosts], &["a"]), &GatewayConfig::default());
    assert!(t.resources.route_configurations.is_empty());
    let names: Vec<&str> = t
        .resources
        .scoped_route_configurations
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "external/m.example.com",
            "external/m.example.org",
            "internal/m.example.com",
            "internal/m.example.org"
        ]
    );
    // Keys are the host, once per listener rank, so the listeners' scopes never collide.
    let key_len = |name: &str| {
        let s = t
            .resources
            .scoped_route_configurations
            .iter()
            .find(|s| s.name == name)
            .unwrap();
        s.key.as_ref().unwrap().fragments.len()
    };
    assert_eq!(key_len("external/m.example.com"), 1);
    assert_eq!(key_len("internal/m.example.com"), 2);
    for l in &t.resources.listeners {
        let filter = &l.filter_chains[0].filters[0];
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            any,
        )) = &filter.config_type
        else {
            panic!("typed config")
        };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(RouteSpecifier::ScopedRoutes(scoped)) = hcm.route_specifier else {
            panic!("{} routes by scope", l.name)
        };
        let want = if l.name == "external" { 1 } else { 2 };
        assert_eq!(scoped.scope_key_builder.unwrap().fragments.len(), want);
    }
    // Each scope's table still starts with the readiness probe route and serves host and host:*.
    let rc = route_config(&t, "external");
    let v = vhost(rc, "m.example.org").unwrap();
    assert_eq!(v.domains, ["m.example.org", "m.example.org:*"]);
    assert!(matches!(
        v.routes[0].action,
        Some(route::Action::DirectResponse(_))
    ));
}

#[test]
fn sidecars_get_a_listener_with_the_queue_proxy_and_a_static_cluster() {
    use crate::state::InstanceSidecar;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use prost::Message;

    let mut s = ClusterState::default();
    s.sidecars.insert(
        ("default".into(), "hello-00001-a".into()),
        InstanceSidecar {
            namespace: "default".into(),
            revision: "hello-00001".into(),
            service: "hello".into(),
            instance: "hello-00001-a".into(),
            listen: "127.0.0.1:40001".parse().unwrap(),
            app: "127.0.0.1:40002".parse().unwrap(),
            container_concurrency: 1,
            timeout_seconds: 300,
            http2: false,
        }
        .into(),
    );
    let gw = GatewayConfig {
        queue_proxy: Some(QueueProxyFilter::Wasm("/tmp/qp.wasm".into())),
        ..GatewayConfig::default()
    };
    let t = translate(&s, &gw);
    let name = "sidecar/default/hello-00001-a";
    let listener = t
        .resources
        .listeners
        .iter()
        .find(|l| l.name == name)
        .expect("sidecar listener");
    let any = match &listener.filter_chains[0].filters[0].config_type {
        Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a)) => a,
        other => panic!("unexpected {other:?}"),
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.wasm", "envoy.filters.http.router"]
    );
    let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
        panic!("inline route config expected");
    };
    assert_eq!(rc.virtual_hosts[0].routes.len(), 1);
    let cluster = t
        .resources
        .clusters
        .iter()
        .find(|c| c.name == name)
        .expect("sidecar cluster");
    assert!(cluster.eds_cluster_config.is_none());
    assert!(
        !t.resources
            .cluster_load_assignments
            .iter()
            .any(|c| c.cluster_name == name),
        "static clusters have no EDS assignment"
    );

    // Without the wasm the sidecar is a plain proxy.
    let t = translate(&s, &GatewayConfig::default());
    assert!(t.resources.listeners.iter().any(|l| l.name == name));

    // The native build: the dynamic-modules filter, kept loaded, with the same plugin configuration.
    let gw = GatewayConfig {
        queue_proxy: Some(QueueProxyFilter::Native("/tmp/libqp.so".into())),
        ..GatewayConfig::default()
    };
    let t = translate(&s, &gw);
    let listener = t
        .resources
        .listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap();
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        &listener.filter_chains[0].filters[0].config_type
    else {
        panic!("typed config expected");
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        hcm.http_filters[0].name,
        "envoy.filters.http.dynamic_modules"
    );
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    use envoy_types::pb::google::protobuf::StringValue;
    let Some(http_filter::ConfigType::TypedConfig(any)) = &hcm.http_filters[0].config_type else {
        panic!("typed config expected");
    };
    use envoy_types::pb::envoy::extensions::filters::http::dynamic_modules::v3::DynamicModuleFilter;
    let native = DynamicModuleFilter::decode(any.value.as_slice()).unwrap();
    let module = native.dynamic_module_config.unwrap();
    assert!(module.do_not_close);
    assert_eq!(
        module.metrics_namespace,
        QUEUE_PROXY_NATIVE_METRICS_NAMESPACE
    );
    assert_eq!(native.filter_name, QUEUE_PROXY_NATIVE_FILTER_NAME);
    let config = StringValue::decode(native.filter_config.unwrap().value.as_slice()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config.value).unwrap();
    assert_eq!(config["instance"], "hello-00001-a");
    assert_eq!(config["containerConcurrency"], 1);
}
