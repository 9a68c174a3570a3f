//! Incremental (delta) ADS against the in-process server: only changes travel, removals are named, and
//! ACKs and NACKs show in ConfigStatus.

#[path = "support/ads.rs"]
mod support;

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use support::*;

/// The (name, version) pairs of a delta response.
fn versions(response: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

#[tokio::test]
async fn initial_response_sends_subscribed_resources() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    // A first request that names nothing is a wildcard for clusters.
    let cds = envoy.fetch(CDS, &[]).await;
    assert_eq!(delta_names(&cds), ["a", "b"]);
    assert!(cds.removed_resources.is_empty());
    assert_eq!(cds.system_version_info, ads.snapshot().type_version(CDS));
    let snap = ads.snapshot().resources(CDS);
    assert_eq!(
        versions(&cds),
        [
            ("a".to_string(), snap["a"].version.clone()),
            ("b".to_string(), snap["b"].version.clone())
        ]
    );
    // Endpoints are asked for by name.
    let eds = envoy.fetch(EDS, &["b"]).await;
    assert_eq!(delta_names(&eds), ["b"]);
    assert_ne!(eds.nonce, cds.nonce);
    envoy.ack(&cds);
    envoy.ack(&eds);
    envoy.quiet().await;
}

#[tokio::test]
async fn change_sends_only_the_changed_resource() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds);
    // Routes wait until the clusters are warm (have their endpoints), as they would in Envoy.
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds);
    let rds = envoy.fetch(RDS, &["routes"]).await;
    envoy.ack(&rds);
    envoy.quiet().await;

    let mut changed = base();
    changed.clusters[1] = cluster("b", 700).into();
    ads.publish(&changed);
    let push = envoy.recv().await;
    assert_eq!(push.type_url, CDS);
    assert_eq!(delta_names(&push), ["b"]);
    assert!(push.removed_resources.is_empty());
    assert_eq!(push.system_version_info, ads.snapshot().type_version(CDS));
    envoy.ack(&push);
    envoy.quiet().await; // routes did not change
}

#[tokio::test]
async fn removal_sends_removed_resources() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds);
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds);

    let mut fewer = base();
    fewer.clusters.remove(1);
    fewer.cluster_load_assignments.remove(1);
    ads.publish(&fewer);
    let clusters = envoy.recv().await;
    assert_eq!(clusters.type_url, CDS);
    assert!(clusters.resources.is_empty());
    assert_eq!(clusters.removed_resources, ["b"]);
    let endpoints = envoy.recv().await;
    assert_eq!(endpoints.type_url, EDS);
    assert_eq!(endpoints.removed_resources, ["b"]);
    envoy.ack(&clusters);
    envoy.ack(&endpoints);
    envoy.quiet().await;

    // Added back: sent again.
    ads.publish(&base());
    let clusters = envoy.recv().await;
    assert_eq!(delta_names(&clusters), ["b"]);
}

#[tokio::test]
async fn initial_resource_versions_avoid_resends() {
    let ads = Ads::start(&base()).await;
    let current = ads.snapshot().resources(CDS);
    let mut envoy = ads.delta("envoy-1").await;
    // Envoy reconnects: it has a current, b outdated, and "gone" that no longer exists.
    envoy.send(DeltaDiscoveryRequest {
        type_url: CDS.to_string(),
        initial_resource_versions: HashMap::from([
            ("a".to_string(), current["a"].version.clone()),
            ("b".to_string(), "outdated".to_string()),
            ("gone".to_string(), "whatever".to_string()),
        ]),
        ..Default::default()
    });
    let cds = envoy.recv().await;
    assert_eq!(delta_names(&cds), ["b"]);
    assert_eq!(cds.removed_resources, ["gone"]);
    envoy.ack(&cds);
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds);

    // Nothing to send still gets an answer to the first request.
    let routes = ads.snapshot().resources(RDS);
    envoy.send(DeltaDiscoveryRequest {
        type_url: RDS.to_string(),
        resource_names_subscribe: strings(&["routes"]),
        initial_resource_versions: HashMap::from([(
            "routes".to_string(),
            routes["routes"].version.clone(),
        )]),
        ..Default::default()
    });
    let rds = envoy.recv().await;
    assert_eq!(rds.type_url, RDS);
    assert!(rds.resources.is_empty());
    assert!(rds.removed_resources.is_empty());
}

#[tokio::test]
async fn unsubscribe_stops_updates() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    assert_eq!(delta_names(&eds), ["a", "b"]);
    // ACK and unsubscribe in one request: no answer.
    envoy.send(DeltaDiscoveryRequest {
        type_url: EDS.to_string(),
        response_nonce: eds.nonce.clone(),
        resource_names_unsubscribe: strings(&["a"]),
        ..Default::default()
    });
    envoy.quiet().await;

    let mut changed = base();
    changed.cluster_load_assignments[0] = load_assignment("a", 9001).into();
    ads.publish(&changed);
    envoy.quiet().await;

    // Subscribing again sends the current version.
    envoy.subscribe(EDS, &["a"]);
    let again = envoy.recv().await;
    assert_eq!(delta_names(&again), ["a"]);
    assert_eq!(
        again.resources[0].version,
        ads.snapshot().resources(EDS)["a"].version
    );
}

#[tokio::test]
async fn subscribing_to_a_missing_resource_answers_removed() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let eds = envoy.fetch(EDS, &["a", "nope"]).await;
    assert_eq!(delta_names(&eds), ["a"]);
    assert_eq!(eds.removed_resources, ["nope"]);
    envoy.ack(&eds);
    envoy.subscribe(EDS, &["later"]);
    let later = envoy.recv().await;
    assert_eq!(later.removed_resources, ["later"]);
    envoy.ack(&later);

    // Once it exists, it is sent.
    let mut more = base();
    more.cluster_load_assignments
        .push(load_assignment("later", 8009).into());
    ads.publish(&more);
    let push = envoy.recv().await;
    assert_eq!(delta_names(&push), ["later"]);
}

#[tokio::test]
async fn nack_and_ack_drive_config_status() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-3").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds);
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds);
    assert_eq!(ads.settled_status().await.acked_generation(), None);
    let lds = envoy.fetch(LDS, &[]).await;
    envoy.ack(&lds);
    ads.status_until("generation 1 ACKed", |s| s.acked_generation() == Some(1))
        .await;

    let mut bad = base();
    bad.listeners[0] = listener("http", 0).into();
    ads.publish(&bad);
    let push = envoy.recv().await;
    assert_eq!(push.type_url, LDS);
    envoy.nack(&push, "listener http: port 0 is not allowed here");
    let status = ads
        .status_until("the NACK", |s| s.last_nack().is_some())
        .await;
    let nack = status.last_nack().unwrap();
    assert!(
        nack.contains(LDS) && nack.contains("envoy-3") && nack.contains("port 0"),
        "{nack}"
    );
    assert_eq!(status.acked_generation(), Some(1));
    envoy.quiet().await;

    let mut fixed = base();
    fixed.listeners[0] = listener("http", 8181).into();
    let g = ads.publish(&fixed);
    let push = envoy.recv().await;
    assert_eq!(delta_names(&push), ["http"]);
    envoy.ack(&push);
    let status = ads
        .status_until("the fix ACKed", |s| s.acked_generation() == Some(g))
        .await;
    assert_eq!(status.last_nack(), None);
}

#[tokio::test]
async fn sotw_and_delta_envoys_must_both_ack() {
    let mut ads = Ads::start(&base()).await;
    let mut delta = ads.delta("envoy-delta").await;
    let mut sotw = ads.sotw("envoy-sotw").await;
    for (type_url, names) in [(CDS, &[][..]), (EDS, &["a", "b"][..]), (LDS, &[][..])] {
        let d = delta.fetch(type_url, names).await;
        delta.ack(&d);
        let s = sotw.fetch(type_url, names).await;
        sotw.ack(&s, names);
    }
    let status = ads
        .status_until("both ACKed generation 1", |s| {
            s.acked_generation() == Some(1)
        })
        .await;
    assert_eq!(status.connected(), 2);

    let mut changed = base();
    changed.clusters[0] = cluster("a", 1234).into();
    let g2 = ads.publish(&changed);
    let d = delta.recv().await;
    let s = sotw.recv().await;
    delta.ack(&d);
    assert_eq!(ads.settled_status().await.acked_generation(), Some(1));
    sotw.ack(&s, &[]);
    ads.status_until("both ACKed generation 2", |s| {
        s.acked_generation() == Some(g2)
    })
    .await;
}

#[tokio::test]
async fn explicit_wildcard_and_unknown_types() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let lds = envoy.fetch(LDS, &["*"]).await;
    assert_eq!(delta_names(&lds), ["http"]);
    envoy.subscribe("", &[]);
    envoy.quiet().await;
    let unknown = envoy
        .fetch("type.googleapis.com/example.Unknown", &["x"])
        .await;
    assert!(unknown.resources.is_empty());
}

#[tokio::test]
async fn shutdown_ends_open_delta_streams() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.delta("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds);
    ads.shutdown().await;
    envoy.ends().await;
}
