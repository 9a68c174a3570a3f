//! The eventing plane of `sluice up`: the broker service (ingress, logs, triggers, PingSource) fed from
//! the folder's Broker, Trigger and PingSource objects, and the gateway route that makes the broker
//! ingress answer at `http://broker-ingress.knative-eventing.localhost:<external port>/<ns>/<broker>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sluice_api::core::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service};
use sluice_api::{Ingress, Object};
use sluice_broker::gateway::GatewayPaths;
use sluice_broker::{BrokerOptions, BrokerService, EventingObjects, EventingStatus};
use sluice_xds_server::controller::StatusReport;
use sluice_xds_server::state::ClusterState;
use tokio::sync::watch;

/// Knative's broker ingress Service, in namespace knative-eventing.
pub const BROKER_INGRESS: &str = "broker-ingress";
pub const KNATIVE_EVENTING_NAMESPACE: &str = "knative-eventing";

pub struct EventingPlane {
    service: Arc<BrokerService>,
    applied: tokio::sync::Mutex<Option<EventingObjects>>,
    status: Mutex<EventingStatus>,
}

impl EventingPlane {
    /// Starts the broker service on `listen` (port 0 picks one); events persist under `data_dir`.
    ///
    /// `report` is the xds-server's status report: deliveries through the gateway wait until the
    /// KIngress of their destination is Ready in it (see [`gateway_paths`]).
    pub async fn start(
        data_dir: PathBuf,
        listen: SocketAddr,
        gateway: SocketAddr,
        mut report: watch::Receiver<StatusReport>,
    ) -> anyhow::Result<Arc<EventingPlane>> {
        let mut options = BrokerOptions::new(data_dir, listen);
        let (paths_tx, paths_rx) = watch::channel(GatewayPaths::default());
        options.gateway_paths = Some(paths_rx);
        // Ends with the report's sender (the controller) or when the broker no longer listens.
        tokio::spawn(async move {
            loop {
                let paths = gateway_paths(&report.borrow_and_update().ingresses);
                paths_tx.send_if_modified(|current| {
                    let changed = *current != paths;
                    *current = paths;
                    changed
                });
                tokio::select! {
                    changed = report.changed() => if changed.is_err() { return },
                    _ = paths_tx.closed() => return,
                }
            }
        });
        options.gateway = gateway;
        options.public_port = gateway.port();
        options.ingress_url = format!(
            "http://{BROKER_INGRESS}.{KNATIVE_EVENTING_NAMESPACE}.localhost{}",
            if gateway.port() == 80 {
                String::new()
            } else {
                format!(":{}", gateway.port())
            }
        );
        let service = BrokerService::start(options).await?;
        Ok(Arc::new(EventingPlane {
            service,
            applied: tokio::sync::Mutex::new(None),
            status: Mutex::new(EventingStatus::default()),
        }))
    }

    /// Applies the folder's eventing objects when they changed; `secrets` are the folder's
    /// Secrets (a RabbitMQ Broker's connection Secret among them).
    pub async fn apply(
        &self,
        objects: &[Object],
        secrets: &std::collections::BTreeMap<(String, String), Arc<sluice_api::core::Secret>>,
    ) {
        let mut wanted = EventingObjects::from_objects(objects.iter().cloned());
        wanted.secrets = secrets.values().map(|s| (**s).clone()).collect();
        let mut applied = self.applied.lock().await;
        if applied.as_ref() == Some(&wanted) {
            return;
        }
        let status = self.service.apply(wanted.clone()).await;
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        *applied = Some(wanted);
    }

    /// The Brokers, Triggers and PingSources with their status.
    pub fn status(&self) -> EventingStatus {
        // Statuses change as deliveries succeed or fail, not only when objects are applied.
        let status = self.service.status();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
        status
    }

    /// Adds the KIngress, Service and Endpoints that route the broker ingress host to the broker.
    pub fn add_routes(&self, state: &mut ClusterState) {
        let addr = self.service.local_addr();
        let key = (
            KNATIVE_EVENTING_NAMESPACE.to_string(),
            BROKER_INGRESS.to_string(),
        );
        state.ingresses.insert(key.clone(), ingress().into());
        let mut svc = Service::default();
        svc.metadata.namespace = key.0.clone();
        svc.metadata.name = key.1.clone();
        svc.spec.ports = vec![sluice_api::core::ServicePort {
            name: "http".to_string(),
            port: 80,
            ..Default::default()
        }];
        state.services.insert(key.clone(), svc.into());
        let mut eps = Endpoints::default();
        eps.metadata.namespace = key.0.clone();
        eps.metadata.name = key.1.clone();
        eps.subsets = vec![EndpointSubset {
            addresses: vec![EndpointAddress {
                ip: addr.ip().to_string(),
                ..Default::default()
            }],
            ports: vec![EndpointPort {
                name: "http".to_string(),
                port: i32::from(addr.port()),
                ..Default::default()
            }],
            ..Default::default()
        }];
        state.endpoints.insert(key, eps.into());
    }

    /// Registers the broker's metrics (Knative's `mt_broker_*` and Sluice's `broker_*`).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.service.register_metrics(registry);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.local_addr()
    }

    pub async fn shutdown(&self) {
        self.service.shutdown().await;
    }
}

/// Which hosts the gateway serves, from the KIngress statuses: a Ready KIngress was probed through
/// the gateway's listener after Envoy ACKed its routes. The gateway counts as live once the broker
/// ingress's own KIngress is Ready.
pub fn gateway_paths(ingresses: &[Arc<Ingress>]) -> GatewayPaths {
    let mut paths = GatewayPaths::default();
    for ingress in ingresses {
        let ready = ingress
            .status
            .status
            .condition("Ready")
            .is_some_and(|c| c.status == sluice_api::ConditionStatus::True);
        if ingress.metadata.namespace == KNATIVE_EVENTING_NAMESPACE
            && ingress.metadata.name == BROKER_INGRESS
        {
            paths.live = ready;
        }
        for rule in &ingress.spec.rules {
            if rule.visibility == sluice_api::ingress::VISIBILITY_CLUSTER_LOCAL {
                continue;
            }
            for host in &rule.hosts {
                // A host two Ingresses claim is served if either is Ready.
                let entry = paths
                    .hosts
                    .entry(host.to_ascii_lowercase())
                    .or_insert(false);
                *entry |= ready;
            }
        }
    }
    paths
}

/// The broker ingress KIngress: external and cluster-local hosts, as Knative's broker-ingress Service.
fn ingress() -> Ingress {
    let yaml = format!(
        "apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: {BROKER_INGRESS}
  namespace: {KNATIVE_EVENTING_NAMESPACE}
  annotations:
    networking.knative.dev/ingress.class: {class}
spec:
  rules:
  - hosts: [{BROKER_INGRESS}.{KNATIVE_EVENTING_NAMESPACE}.localhost]
    visibility: ExternalIP
    http:
      paths:
      - splits:
        - {{serviceName: {BROKER_INGRESS}, serviceNamespace: {KNATIVE_EVENTING_NAMESPACE}, servicePort: 80, percent: 100}}
  - hosts: [{BROKER_INGRESS}.{KNATIVE_EVENTING_NAMESPACE}.svc.cluster.local]
    visibility: ClusterLocal
    http:
      paths:
      - splits:
        - {{serviceName: {BROKER_INGRESS}, serviceNamespace: {KNATIVE_EVENTING_NAMESPACE}, servicePort: 80, percent: 100}}
",
        class = sluice_api::ingress::SLUICE_INGRESS_CLASS
    );
    match sluice_api::parse_documents(&yaml).into_iter().next() {
        Some(Ok(Object::Ingress(ingress))) => ingress,
        other => unreachable!("the broker ingress YAML is fixed and valid: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gateway_paths_follow_the_ready_kingresses_and_the_broker_ingress_means_live() {
        use std::sync::Arc;
        let with_ready = |mut ingress: sluice_api::Ingress, ready: bool| {
            ingress.status.status.set_condition(sluice_api::Condition {
                type_: "Ready".into(),
                status: if ready {
                    sluice_api::ConditionStatus::True
                } else {
                    sluice_api::ConditionStatus::Unknown
                },
                ..Default::default()
            });
            Arc::new(ingress)
        };
        let mut web = super::ingress();
        web.metadata.namespace = "default".into();
        web.metadata.name = "web".into();
        web.spec.rules[0].hosts = vec!["web.default.localhost".into()];
        web.spec.rules[1].hosts = vec!["web.default.svc.cluster.local".into()];

        let starting = super::gateway_paths(&[
            with_ready(super::ingress(), false),
            with_ready(web.clone(), true),
        ]);
        assert!(!starting.live);
        assert!(!starting.serves("web.default.localhost:8080", true));

        let up = super::gateway_paths(&[
            with_ready(super::ingress(), true),
            with_ready(web.clone(), true),
        ]);
        assert!(up.live);
        assert!(up.serves("web.default.localhost:8080", true));
        assert!(
            !up.hosts.contains_key("web.default.svc.cluster.local"),
            "cluster-local hosts are not on the external listener"
        );
        let not_ready =
            super::gateway_paths(&[with_ready(super::ingress(), true), with_ready(web, false)]);
        assert!(!not_ready.serves("web.default.localhost:8080", true));
    }

    #[test]
    fn broker_ingress_kingress_is_valid() {
        let mut ingress = super::ingress();
        ingress.set_defaults();
        ingress.validate().expect("valid");
        assert_eq!(ingress.spec.rules.len(), 2);
    }
}
