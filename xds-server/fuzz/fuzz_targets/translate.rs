//! KIngress (with the Services, Endpoints, EndpointSlices and Secrets it refers to) to Envoy: any
//! YAML state. Translation never panics, is deterministic, every resource it makes encodes and
//! decodes as Envoy's proto type unchanged, names are unique, and the caching
//! translator agrees with a fresh translation after an Ingress goes away.
#![no_main]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice_api::Object;
use sluice_xds_server::resources::Resources;
use sluice_xds_server::state::ClusterState;
use sluice_xds_server::translate::{self, GatewayConfig, Translator};

fn state_of(text: &str) -> ClusterState {
    let mut state = ClusterState::default();
    for object in sluice_api::parse_documents(text).into_iter().flatten() {
        let Some(meta) = object.metadata() else {
            continue;
        };
        let key = (meta.namespace.clone(), meta.name.clone());
        match object {
            Object::Ingress(o) => {
                state.ingresses.insert(key, Arc::new(o));
            }
            Object::Service(o) => {
                state.services.insert(key, Arc::new(o));
            }
            Object::Endpoints(o) => {
                state.endpoints.insert(key, Arc::new(o));
            }
            Object::EndpointSlice(o) => {
                state.endpoint_slices.insert(key, Arc::new(o));
            }
            Object::Secret(o) => {
                state.secrets.insert(key, Arc::new(o));
            }
            _ => {}
        }
    }
    state
}

/// Each resource, encoded as Envoy gets it and decoded again, is the same message.
fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(resources: &[Arc<M>]) {
    for resource in resources {
        let bytes = resource.encode_to_vec();
        let decoded = M::decode(bytes.as_slice()).expect("Envoy's proto type reads what we made");
        assert_eq!(&decoded, resource.as_ref());
    }
}

fn check(resources: &Resources) {
    round_trips(&resources.listeners);
    round_trips(&resources.route_configurations);
    round_trips(&resources.scoped_route_configurations);
    round_trips(&resources.clusters);
    round_trips(&resources.cluster_load_assignments);
    round_trips(&resources.secrets);
    let clusters: BTreeSet<&str> = resources.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        clusters.len(),
        resources.clusters.len(),
        "cluster names are unique"
    );
    let listeners: BTreeSet<&str> = resources
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(
        listeners.len(),
        resources.listeners.len(),
        "listener names are unique"
    );
}

fuzz_target!(|text: &str| {
    // read_documents catches serde_yaml's own panics (it turns them into an error); libfuzzer-sys's
    // hook would abort on them first. The default hook lets them unwind; a panic that escapes the
    // target still aborts (libfuzzer-sys catches it at the top and reports a crash).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let gateway = GatewayConfig {
        tls_address: Some(SocketAddr::from(([127, 0, 0, 1], 8443))),
        ..GatewayConfig::default()
    };
    let state = state_of(text);
    let first = translate::translate(&state, &gateway);
    assert_eq!(
        first,
        translate::translate(&state, &gateway),
        "deterministic"
    );
    check(&first.resources);
    assert!(
        first.ingresses.len() <= state.ingresses.len(),
        "an outcome per Ingress at most"
    );

    // The caching translator, fed the state and then the state without its first Ingress, gives
    // what a fresh translation gives.
    let mut cached = Translator::new(gateway.clone());
    assert_eq!(cached.translate(&state), first);
    let mut smaller = state.clone();
    if let Some(key) = smaller.ingresses.keys().next().cloned() {
        smaller.ingresses.remove(&key);
    }
    assert_eq!(
        cached.translate(&smaller),
        translate::translate(&smaller, &gateway)
    );
});
