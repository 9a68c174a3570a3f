//! State-of-the-world ADS against the in-process server: what is sent, what is not, and how ACKs and
//! NACKs show in ConfigStatus.

#[path = "support/ads.rs"]
mod support;

use support::*;

#[tokio::test]
async fn first_response_carries_every_cluster() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    assert_eq!(names(&cds), ["a", "b"]);
    assert_eq!(cds.version_info, ads.snapshot().type_version(CDS));
    assert!(!cds.nonce.is_empty());

    // "*" is the explicit wildcard.
    let mut other = ads.sotw("envoy-2").await;
    let cds = other.fetch(CDS, &["*"]).await;
    assert_eq!(names(&cds), ["a", "b"]);
}

#[tokio::test]
async fn ack_gets_no_reply() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds, &[]);
    envoy.quiet().await;
}

#[tokio::test]
async fn changing_one_cluster_pushes_clusters_but_not_unchanged_routes() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds, &[]);
    // Routes wait until the clusters are warm (have their endpoints), as they would in Envoy.
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds, &["a", "b"]);
    let rds = envoy.fetch(RDS, &["routes"]).await;
    envoy.ack(&rds, &["routes"]);
    envoy.quiet().await;

    let mut changed = base();
    changed.clusters[1] = cluster("b", 250).into();
    ads.publish(&changed);
    let push = envoy.recv().await;
    assert_eq!(push.type_url, CDS);
    assert_eq!(
        names(&push),
        ["a", "b"],
        "clusters always go as the full set"
    );
    assert_ne!(push.version_info, cds.version_info);
    assert_ne!(push.nonce, cds.nonce);
    envoy.ack(&push, &[]);
    envoy.quiet().await;
}

#[tokio::test]
async fn routes_and_endpoints_are_served_by_name() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let eds = envoy.fetch(EDS, &["a", "missing"]).await;
    assert_eq!(names(&eds), ["a"], "only requested names that exist");
    let rds = envoy.fetch(RDS, &["routes"]).await;
    assert_eq!(names(&rds), ["routes"]);

    // A reply that changes the names is answered with the new subset.
    envoy.ack(&eds, &["a", "b"]);
    let eds2 = envoy.recv().await;
    assert_eq!(eds2.type_url, EDS);
    assert_eq!(names(&eds2), ["a", "b"]);
    envoy.ack(&eds2, &["a", "b"]);
    envoy.ack(&rds, &["routes"]);
    envoy.quiet().await;

    // Resources nobody asked for do not cause pushes.
    let mut more = base();
    more.route_configurations
        .push(route_config("other", "b").into());
    more.cluster_load_assignments
        .push(load_assignment("c", 8003).into());
    ads.publish(&more);
    envoy.quiet().await;

    // Dropping a name is answered with the smaller subset.
    envoy.ack(&eds2, &["b"]);
    let eds3 = envoy.recv().await;
    assert_eq!(names(&eds3), ["b"]);
}

#[tokio::test]
async fn stale_nonce_is_ignored() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let first = envoy.fetch(RDS, &["routes"]).await;
    let mut changed = base();
    changed.route_configurations[0] = route_config("routes", "b").into();
    ads.publish(&changed);
    let second = envoy.recv().await;
    assert_eq!(second.type_url, RDS);

    // A reply to the older response, even with new names, is not answered.
    envoy.ack(&first, &["routes", "more"]);
    envoy.quiet().await;
    envoy.ack(&second, &["routes"]);
    envoy.quiet().await;
}

#[tokio::test]
async fn pushes_go_clusters_endpoints_listeners_routes() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    // Subscribe in the "wrong" order on purpose.
    for (type_url, names) in [
        (RDS, &["routes"][..]),
        (LDS, &[]),
        (EDS, &["a", "b"]),
        (CDS, &[]),
    ] {
        let response = envoy.fetch(type_url, names).await;
        envoy.ack(&response, names);
    }
    envoy.quiet().await;

    let mut changed = base();
    changed.clusters[0] = cluster("a", 300).into();
    changed.cluster_load_assignments[0] = load_assignment("a", 9001).into();
    changed.listeners[0] = listener("http", 9080).into();
    changed.route_configurations[0] = route_config("routes", "b").into();
    ads.publish(&changed);
    let mut order = Vec::new();
    // Make before break: listeners and routes wait until the new clusters and endpoints are ACKed.
    let cds = envoy.recv().await;
    let eds = envoy.recv().await;
    order.extend([cds.type_url.clone(), eds.type_url.clone()]);
    envoy.quiet().await;
    envoy.ack(&cds, &[]);
    envoy.ack(&eds, &["a", "b"]);
    for _ in 0..2 {
        order.push(envoy.recv().await.type_url);
    }
    assert_eq!(order, [CDS, EDS, LDS, RDS]);
}

/// Subscribes to all four types and ACKs every first response.
async fn subscribe_all(envoy: &mut Sotw) {
    for (type_url, names) in [
        (CDS, &[][..]),
        (EDS, &["a", "b"]),
        (LDS, &[]),
        (RDS, &["routes"]),
    ] {
        let response = envoy.fetch(type_url, names).await;
        envoy.ack(&response, names);
    }
}

#[tokio::test]
async fn acked_generation_waits_for_every_subscribed_type() {
    let mut ads = Ads::start(&base()).await;
    assert_eq!(ads.status.borrow().acked_generation(), None);
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&cds, &[]);
    envoy.ack(&eds, &["a", "b"]);
    let lds = envoy.fetch(LDS, &[]).await;
    let rds = envoy.fetch(RDS, &["routes"]).await;
    envoy.ack(&lds, &[]);
    let status = ads.settled_status().await;
    assert_eq!(status.acked_generation(), None, "routes are not ACKed yet");
    assert_eq!(status.connected(), 1);

    envoy.ack(&rds, &["routes"]);
    ads.status_until("generation 1 ACKed", |s| s.acked_generation() == Some(1))
        .await;

    // A change to one type: the generation counts once that type is ACKed.
    let mut changed = base();
    changed.route_configurations[0] = route_config("routes", "b").into();
    let g2 = ads.publish(&changed);
    let push = envoy.recv().await;
    assert_eq!(push.type_url, RDS);
    assert_eq!(ads.settled_status().await.acked_generation(), Some(1));
    envoy.ack(&push, &["routes"]);
    ads.status_until("generation 2 ACKed", |s| s.acked_generation() == Some(g2))
        .await;

    // A change no subscription sees is in sync at once.
    let mut unseen = changed.clone();
    unseen
        .route_configurations
        .push(route_config("other", "a").into());
    let g3 = ads.publish(&unseen);
    ads.status_until("generation 3 needs no ACK", |s| {
        s.acked_generation() == Some(g3)
    })
    .await;
    envoy.quiet().await;
}

#[tokio::test]
async fn a_stream_without_listeners_is_not_in_sync() {
    // Envoy asks for listeners only after its clusters are warm: until then it does not serve.
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds, &[]);
    let eds = envoy.fetch(EDS, &["a", "b"]).await;
    envoy.ack(&eds, &["a", "b"]);
    assert_eq!(ads.settled_status().await.acked_generation(), None);
    let lds = envoy.fetch(LDS, &[]).await;
    envoy.ack(&lds, &[]);
    ads.status_until("ACKed once listeners are", |s| {
        s.acked_generation() == Some(1)
    })
    .await;
}

#[tokio::test]
async fn nack_is_reported_until_a_newer_config_is_acked() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-7").await;
    subscribe_all(&mut envoy).await;
    ads.status_until("generation 1 ACKed", |s| s.acked_generation() == Some(1))
        .await;

    let kept = ads.snapshot().type_version(CDS);
    let mut bad = base();
    bad.clusters[0] = cluster("a", 0).into();
    ads.publish(&bad);
    let push = envoy.recv().await;
    assert_eq!(push.type_url, CDS);
    envoy.nack(
        &push,
        &kept,
        &[],
        "cluster a: connect_timeout must be positive",
    );
    let status = ads
        .status_until("the NACK", |s| s.last_nack().is_some())
        .await;
    let nack = status.last_nack().unwrap();
    assert!(nack.contains(CDS), "{nack}");
    assert!(nack.contains("envoy-7"), "{nack}");
    assert!(nack.contains("connect_timeout must be positive"), "{nack}");
    envoy.quiet().await; // a NACK is not answered
    assert_eq!(ads.status.borrow().acked_generation(), Some(1));

    // Another change (routes) keeps the NACK: clusters are still rejected.
    let mut fixed = bad.clone();
    fixed.route_configurations[0] = route_config("routes", "b").into();
    ads.publish(&fixed);
    let routes = envoy.recv().await;
    assert_eq!(routes.type_url, RDS);
    envoy.ack(&routes, &["routes"]);
    let status = ads.settled_status().await;
    assert!(status.last_nack().is_some());
    assert_eq!(status.acked_generation(), Some(1));

    // The fix is pushed and ACKed: the NACK clears and the generation advances.
    fixed.clusters[0] = cluster("a", 500).into();
    let g = ads.publish(&fixed);
    let clusters = envoy.recv().await;
    assert_eq!(clusters.type_url, CDS);
    envoy.ack(&clusters, &[]);
    let status = ads
        .status_until("the fix ACKed", |s| s.acked_generation() == Some(g))
        .await;
    assert_eq!(status.last_nack(), None);
}

#[tokio::test]
async fn two_envoys_must_both_ack() {
    let mut ads = Ads::start(&base()).await;
    let mut one = ads.sotw("envoy-1").await;
    let mut two = ads.sotw("envoy-2").await;
    ads.status_until("two streams", |s| s.connected() == 2)
        .await;
    subscribe_all(&mut one).await;
    assert_eq!(
        ads.settled_status().await.acked_generation(),
        None,
        "envoy-2 has nothing yet"
    );
    subscribe_all(&mut two).await;
    ads.status_until("both ACKed generation 1", |s| {
        s.acked_generation() == Some(1)
    })
    .await;

    let mut changed = base();
    changed.clusters[1] = cluster("b", 999).into();
    let g2 = ads.publish(&changed);
    let push1 = one.recv().await;
    let push2 = two.recv().await;
    one.ack(&push1, &[]);
    assert_eq!(ads.settled_status().await.acked_generation(), Some(1));
    two.ack(&push2, &[]);
    ads.status_until("both ACKed generation 2", |s| {
        s.acked_generation() == Some(g2)
    })
    .await;

    // When a stream goes away, it no longer holds the others back, and the count drops.
    let g3 = ads.publish(&base());
    let push1 = one.recv().await;
    drop(two);
    ads.status_until("one stream", |s| s.connected() == 1).await;
    assert_eq!(ads.status.borrow().acked_generation(), Some(g2));
    one.ack(&push1, &[]);
    ads.status_until("generation 3 ACKed", |s| s.acked_generation() == Some(g3))
        .await;

    // With no stream open the last value stays.
    drop(one);
    let status = ads.status_until("no streams", |s| s.connected() == 0).await;
    assert_eq!(status.acked_generation(), Some(g3));
}

#[tokio::test]
async fn malformed_and_unknown_requests_do_not_break_the_stream() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    envoy.subscribe("", &[]);
    envoy.quiet().await;
    let unknown = envoy
        .fetch("type.googleapis.com/example.Unknown", &["x"])
        .await;
    assert!(unknown.resources.is_empty());
    let cds = envoy.fetch(CDS, &[]).await;
    assert_eq!(names(&cds), ["a", "b"]);
}

#[tokio::test]
async fn streams_end_when_the_snapshot_source_closes() {
    let mut ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds, &[]);
    ads.close_snapshots();
    envoy.ends().await;
    ads.status_until("no streams", |s| s.connected() == 0).await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let ads = Ads::start(&base()).await;
    let mut envoy = ads.sotw("envoy-1").await;
    let cds = envoy.fetch(CDS, &[]).await;
    envoy.ack(&cds, &[]);
    ads.shutdown().await;
    envoy.ends().await;
}
