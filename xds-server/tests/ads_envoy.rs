//! A real Envoy (from the project's .venv, or $ENVOY_BIN) configured only over ADS, SotW and delta: it
//! loads a cluster with EDS endpoints and a listener with RDS routes, serves a direct response, takes
//! an update, rejects a bad route (the NACK shows in ConfigStatus) and recovers.
//! Skipped, with a message, when no Envoy binary is found (`bash scripts/setup` installs one).

#[path = "support/ads.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, config_source, data_source,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use sluice_xds_server::resources::Resources;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENVOY_PATIENCE: Duration = Duration::from_secs(30);

fn find_envoy() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    std::fs::read_dir(workspace.join(".venv/lib"))
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A cluster with EDS endpoints, a listener on `port` whose routes come over RDS, and a route that
/// answers `body` directly; with `broken`, the route splits traffic with a total weight of 0, which
/// Envoy rejects.
fn gateway(port: u16, body: &str, broken: bool) -> Resources {
    let backend = Cluster {
        name: "backend".to_string(),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let action = if broken {
        route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: vec![weighted_cluster::ClusterWeight {
                        name: "backend".to_string(),
                        weight: Some(UInt32Value { value: 0 }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
    } else {
        route::Action::DirectResponse(DirectResponseAction {
            status: 200,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(body.to_string())),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let routes = RouteConfiguration {
        name: "routes".to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "all".to_string(),
            domains: vec!["*".to_string()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
                    ..Default::default()
                }),
                action: Some(action),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "http".to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: "routes".to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: "http".to_string(),
        address: Some(socket(port.into())),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resources {
        clusters: vec![backend.into()],
        cluster_load_assignments: vec![load_assignment("backend", 9).into()],
        listeners: vec![listener.into()],
        route_configurations: vec![routes.into()],
        ..Default::default()
    }
}

/// Envoy, killed when dropped (also when the test fails).
struct Envoy {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    fn start(binary: &Path, ads_port: u16, delta: bool) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_port();
        let bootstrap = serde_json::json!({
            "node": {"id": "test-gateway", "cluster": "sluice"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": if delta { "DELTA_GRPC" } else { "GRPC" },
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]
                },
                "cds_config": {"resource_api_version": "V3", "ads": {}},
                "lds_config": {"resource_api_version": "V3", "ads": {}}
            },
            "static_resources": {"clusters": [{
                "name": "xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}}}]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }}
            }]}
        });
        let config = dir.path().join("bootstrap.json");
        std::fs::write(&config, bootstrap.to_string()).unwrap();
        let log = dir.path().join("envoy.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(binary)
                .arg("-c")
                .arg(&config)
                .args(["--base-id", &admin_port.to_string()])
                .args(["--concurrency", "1", "-l", "info", "--drain-time-s", "1"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            0,
        )
        .spawn()
        .expect("starting envoy");
        Envoy {
            child,
            log,
            _dir: dir,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET / on the listener; the status line and body.
async fn get(port: u16) -> std::io::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Waits until GET / answers 200 with `body`.
async fn serves(envoy: &Envoy, port: u16, body: &str) {
    let deadline = tokio::time::Instant::now() + ENVOY_PATIENCE;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match get(port).await {
            Ok(response) if response.starts_with("HTTP/1.1 200") && response.ends_with(body) => {
                return;
            }
            Ok(response) => last = response,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "Envoy does not serve {body:?}; last answer: {last}\nEnvoy log:\n{}",
        envoy.log_tail()
    );
}

async fn status_until(
    ads: &Ads,
    envoy: &Envoy,
    what: &str,
    ok: impl Fn(&sluice_xds_server::ads::ConfigStatus) -> bool,
) -> sluice_xds_server::ads::ConfigStatus {
    let mut status = ads.status.clone();
    match tokio::time::timeout(ENVOY_PATIENCE, status.wait_for(|s| ok(s))).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!(
            "timed out waiting for {what}; status {:?}\nEnvoy log:\n{}",
            *ads.status.borrow(),
            envoy.log_tail()
        ),
    }
}

async fn envoy_takes_updates_and_reports_rejections(delta: bool) {
    let Some(binary) = find_envoy() else {
        eprintln!(
            "SKIPPED: no Envoy binary (set ENVOY_BIN or run `bash scripts/setup` to install Envoy 1.40 into .venv/)"
        );
        return;
    };
    let port = free_port();
    let mut ads = Ads::start(&gateway(port, "hello 1", false)).await;
    let envoy = Envoy::start(&binary, ads.addr.port(), delta);

    status_until(&ads, &envoy, "Envoy ACKs generation 1", |s| {
        s.acked_generation() == Some(1)
    })
    .await;
    serves(&envoy, port, "hello 1").await;

    let g2 = ads.publish(&gateway(port, "hello 2", false));
    status_until(&ads, &envoy, "Envoy ACKs generation 2", |s| {
        s.acked_generation() == Some(g2)
    })
    .await;
    serves(&envoy, port, "hello 2").await;

    ads.publish(&gateway(port, "", true));
    let status = status_until(&ads, &envoy, "Envoy rejects the broken route", |s| {
        s.last_nack().is_some()
    })
    .await;
    let nack = status.last_nack().unwrap();
    assert!(nack.contains("RouteConfiguration"), "{nack}");
    assert!(nack.contains("test-gateway"), "{nack}");
    assert!(nack.contains("weight"), "{nack}");
    assert_eq!(status.acked_generation(), Some(g2));
    serves(&envoy, port, "hello 2").await; // Envoy keeps the previous routes

    let g4 = ads.publish(&gateway(port, "hello 4", false));
    let status = status_until(&ads, &envoy, "Envoy ACKs the fix", |s| {
        s.acked_generation() == Some(g4)
    })
    .await;
    assert_eq!(status.last_nack(), None);
    assert_eq!(status.connected(), 1);
    serves(&envoy, port, "hello 4").await;
}

#[tokio::test]
async fn envoy_over_sotw() {
    envoy_takes_updates_and_reports_rejections(false).await;
}

#[tokio::test]
async fn envoy_over_delta() {
    envoy_takes_updates_and_reports_rejections(true).await;
}
