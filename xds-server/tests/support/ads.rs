//! Helpers shared by the ADS tests (`#[path]`-included by ads_sotw.rs, ads_delta.rs and ads_envoy.rs):
//! hand-built resources, an in-process ADS server on a loopback port, and scripted xDS clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    Address, Node, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sluice_xds_server::ads::{self, AdsServer, ConfigStatus};
use sluice_xds_server::resources::{
    CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL, Resources,
};
use sluice_xds_server::snapshot::Snapshot;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(10);
/// How long a test listens to be sure nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);

pub const CDS: &str = CLUSTER_TYPE_URL;
pub const EDS: &str = ENDPOINT_TYPE_URL;
pub const LDS: &str = LISTENER_TYPE_URL;
pub const RDS: &str = ROUTE_TYPE_URL;

// ---------------------------------------------------------------------------------------------------
// Resources.

/// A cluster whose content varies with `timeout_ms`.
pub fn cluster(name: &str, timeout_ms: i32) -> Cluster {
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(PbDuration {
            seconds: 0,
            nanos: timeout_ms * 1_000_000,
        }),
        ..Default::default()
    }
}

pub fn route_config(name: &str, cluster: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "all".to_string(),
            domains: vec!["*".to_string()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.to_string(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn socket(port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "127.0.0.1".to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

pub fn load_assignment(cluster: &str, port: u32) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket(port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn listener(name: &str, port: u32) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket(port)),
        ..Default::default()
    }
}

/// Two clusters, endpoints for both, one route configuration and one listener.
pub fn base() -> Resources {
    Resources {
        clusters: vec![cluster("a", 100).into(), cluster("b", 100).into()],
        cluster_load_assignments: vec![
            load_assignment("a", 8001).into(),
            load_assignment("b", 8002).into(),
        ],
        route_configurations: vec![route_config("routes", "a").into()],
        listeners: vec![listener("http", 8080).into()],
        ..Default::default()
    }
}

/// The names of a SotW response's resources, in order.
pub fn names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| resource_name(&any.type_url, &any.value))
        .collect()
}

/// The names of a delta response's resources, in order.
pub fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().expect("resource body");
            let name = resource_name(&any.type_url, &any.value);
            assert_eq!(name, r.name, "Resource.name matches the packed resource");
            name
        })
        .collect()
}

fn resource_name(type_url: &str, bytes: &[u8]) -> String {
    match type_url {
        CLUSTER_TYPE_URL => Cluster::decode(bytes).unwrap().name,
        ENDPOINT_TYPE_URL => ClusterLoadAssignment::decode(bytes).unwrap().cluster_name,
        LISTENER_TYPE_URL => Listener::decode(bytes).unwrap().name,
        ROUTE_TYPE_URL => RouteConfiguration::decode(bytes).unwrap().name,
        other => panic!("unexpected type {other}"),
    }
}

pub fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------------
// The server.

/// An ADS server on a loopback port, fed by `publish`.
pub struct Ads {
    pub addr: SocketAddr,
    snapshots: Option<watch::Sender<Arc<Snapshot>>>,
    pub status: watch::Receiver<ConfigStatus>,
    pub generation: u64,
    current: Arc<Snapshot>,
    /// What `current` was built from: the next snapshot is made from it, as the controller does.
    resources: Resources,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Ads {
    /// Serves `resources` as generation 1.
    pub async fn start(resources: &Resources) -> Ads {
        let first = Arc::new(Snapshot::from_resources(1, resources));
        let (tx, rx) = watch::channel(first.clone());
        let (server, status) = AdsServer::new(rx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(ads::serve(listener, server, async move {
            let _ = shutdown_rx.await;
        }));
        Ads {
            addr,
            snapshots: Some(tx),
            status,
            generation: 1,
            current: first,
            resources: resources.clone(),
            shutdown: Some(shutdown_tx),
            task: Some(task),
        }
    }

    /// Serves `resources` as the next generation; returns the generation.
    pub fn publish(&mut self, resources: &Resources) -> u64 {
        self.generation += 1;
        self.current = Arc::new(
            self.current
                .update(self.generation, resources, &self.resources),
        );
        self.resources = resources.clone();
        self.snapshots
            .as_ref()
            .expect("snapshots open")
            .send_replace(self.current.clone());
        self.generation
    }

    /// The snapshot served now.
    pub fn snapshot(&self) -> &Snapshot {
        &self.current
    }

    /// Ends the snapshot channel, as when the controller stops.
    pub fn close_snapshots(&mut self) {
        self.snapshots = None;
    }

    pub async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connecting to the ADS server")
    }

    pub async fn sotw(&self, node: &str) -> Sotw {
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = self
            .client()
            .await
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .expect("opening a SotW stream")
            .into_inner();
        Sotw {
            tx,
            responses,
            node: Some(node_named(node)),
        }
    }

    pub async fn delta(&self, node: &str) -> Delta {
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = self
            .client()
            .await
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .expect("opening a delta stream")
            .into_inner();
        Delta {
            tx,
            responses,
            node: Some(node_named(node)),
        }
    }

    /// Waits until the status satisfies `ok`.
    pub async fn status_until(
        &self,
        what: &str,
        ok: impl Fn(&ConfigStatus) -> bool,
    ) -> ConfigStatus {
        let mut status = self.status.clone();
        let wait = status.wait_for(|s| ok(s));
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(Ok(status)) => status.clone(),
            Ok(Err(_)) => panic!("status channel closed while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; status: {:?}",
                *self.status.borrow()
            ),
        }
    }

    /// The status after in-flight requests had time to be handled.
    pub async fn settled_status(&self) -> ConfigStatus {
        tokio::time::sleep(QUIET).await;
        self.status.borrow().clone()
    }

    /// Shuts the server down; panics unless it stops in time.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .expect("serve returns Ok");
    }
}

impl Drop for Ads {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn node_named(id: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: "test".to_string(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Scripted clients.

async fn next<T>(stream: &mut Streaming<T>) -> T {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => panic!("stream ended while waiting for a response"),
        Ok(Err(status)) => panic!("stream failed while waiting for a response: {status}"),
        Err(_) => panic!("timed out waiting for a response"),
    }
}

async fn quiet<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    if let Ok(message) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("expected no response, got {message:?}");
    }
}

async fn ends<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        Ok(Ok(Some(message))) => panic!("expected the stream to end, got {message:?}"),
        Err(_) => panic!("timed out waiting for the stream to end"),
    }
}

/// A state-of-the-world client: sends what the test says, like Envoy would.
pub struct Sotw {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    pub responses: Streaming<DiscoveryResponse>,
    /// Sent with the first request only (set_node_on_first_message_only).
    node: Option<Node>,
}

impl Sotw {
    /// A SotW stream to any ADS server at `addr`, as node `node`.
    pub async fn open(addr: SocketAddr, node: &str) -> Sotw {
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connecting to the ADS server")
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .expect("opening a SotW stream")
            .into_inner();
        Sotw {
            tx,
            responses,
            node: Some(node_named(node)),
        }
    }

    pub fn send(&mut self, mut request: DiscoveryRequest) {
        request.node = self.node.take();
        self.tx.send(request).expect("request stream open");
    }

    /// The first request for a type.
    pub fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: strings(names),
            ..Default::default()
        });
    }

    /// ACKs `response`, asking for `names` from now on.
    pub fn ack(&mut self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: strings(names),
            ..Default::default()
        });
    }

    /// NACKs `response`: Envoy keeps `kept_version`.
    pub fn nack(
        &mut self,
        response: &DiscoveryResponse,
        kept_version: &str,
        names: &[&str],
        why: &str,
    ) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: kept_version.to_string(),
            response_nonce: response.nonce.clone(),
            resource_names: strings(names),
            error_detail: Some(RpcStatus {
                code: 13,
                message: why.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        next(&mut self.responses).await
    }

    /// Subscribes and returns the first response, checking its type.
    pub async fn fetch(&mut self, type_url: &str, names: &[&str]) -> DiscoveryResponse {
        self.subscribe(type_url, names);
        let response = self.recv().await;
        assert_eq!(response.type_url, type_url);
        response
    }

    pub async fn quiet(&mut self) {
        quiet(&mut self.responses).await
    }

    pub async fn ends(&mut self) {
        ends(&mut self.responses).await
    }
}

/// An incremental (delta) client.
pub struct Delta {
    tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    pub responses: Streaming<DeltaDiscoveryResponse>,
    node: Option<Node>,
}

impl Delta {
    pub fn send(&mut self, mut request: DeltaDiscoveryRequest) {
        request.node = self.node.take();
        self.tx.send(request).expect("request stream open");
    }

    pub fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: strings(names),
            ..Default::default()
        });
    }

    pub fn ack(&mut self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        });
    }

    pub fn nack(&mut self, response: &DeltaDiscoveryResponse, why: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 13,
                message: why.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        next(&mut self.responses).await
    }

    pub async fn fetch(&mut self, type_url: &str, names: &[&str]) -> DeltaDiscoveryResponse {
        self.subscribe(type_url, names);
        let response = self.recv().await;
        assert_eq!(response.type_url, type_url);
        response
    }

    pub async fn quiet(&mut self) {
        quiet(&mut self.responses).await
    }

    pub async fn ends(&mut self) {
        ends(&mut self.responses).await
    }
}
