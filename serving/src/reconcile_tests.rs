//! Behaviour of the reconciler, Knative's rules one by one.

use super::*;
use sluice_api::objects::{Object, parse_documents};

const WEB: &str = "\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: web
  labels: {team: a}
spec:
  template:
    spec:
      containers:
      - image: example/web
        command: [./web]
        env: [{name: COLOR, value: blue}]
";

fn objects(text: &str) -> ReconcileInput {
    let mut input = ReconcileInput::default();
    for obj in parse_documents(text) {
        match obj.unwrap() {
            Object::KnativeService(s) => input.services.push(s),
            Object::Configuration(c) => input.configurations.push(c),
            Object::Route(r) => input.routes.push(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    input
}

fn ready(input: &mut ReconcileInput, name: &str) {
    input.revision_facts.insert(
        RevisionKey::new("default", name),
        RevisionFacts {
            health: RevisionHealth::Ready,
            actual_replicas: Some(1),
            desired_replicas: Some(1),
            image_digest: None,
        },
    );
}

fn ingress_ready(input: &mut ReconcileInput, route: &str) {
    let mut st = IngressStatus::default();
    set(
        &mut st.status,
        CONDITION_READY,
        ConditionStatus::True,
        "",
        "",
    );
    input
        .ingress_statuses
        .insert(format!("default/{route}"), st);
}

fn cond<'a>(st: &'a Status, type_: &str) -> (ConditionStatus, &'a str, &'a str) {
    let c = st
        .condition(type_)
        .unwrap_or_else(|| panic!("no {type_} in {st:?}"));
    (c.status, c.reason.as_str(), c.message.as_str())
}

fn revision_names(out: &ReconcileOutput) -> Vec<&str> {
    out.revisions
        .iter()
        .map(|r| r.metadata.name.as_str())
        .collect()
}

fn splits(ing: &Ingress, rule: usize) -> Vec<(String, i64)> {
    ing.spec.rules[rule].http.as_ref().unwrap().paths[0]
        .splits
        .iter()
        .map(|s| (s.service_name.clone(), s.percent))
        .collect()
}

fn with_env(text: &str, color: &str) -> String {
    text.replace("value: blue", &format!("value: {color}"))
}

#[test]
fn first_revision_is_named_after_the_service_and_waits_to_be_ready() {
    let input = objects(WEB);
    let mut state = ServingState::default();
    let out = reconcile(&input, &mut state);
    assert_eq!(revision_names(&out), ["web-00001"]);
    let rev = &out.revisions[0];
    assert_eq!(rev.metadata.labels[CONFIGURATION_LABEL], "web");
    assert_eq!(rev.metadata.labels[CONFIGURATION_GENERATION_LABEL], "1");
    assert_eq!(rev.metadata.labels[SERVICE_LABEL], "web");
    assert_eq!(rev.metadata.owner_references[0]["kind"], "Configuration");
    // Knative's defaults are applied to the Revision.
    assert_eq!(rev.spec.timeout_seconds, Some(300));
    assert_eq!(rev.spec.containers[0].name, "user-container");
    assert_eq!(
        cond(&rev.status.status, CONDITION_READY),
        (ConditionStatus::Unknown, "Deploying", "")
    );

    let cfg = &out.configurations[0];
    assert_eq!(cfg.metadata.labels[SERVICE_LABEL], "web");
    assert_eq!(cfg.metadata.labels["team"], "a");
    assert_eq!(cfg.status.latest_created_revision_name, "web-00001");
    assert_eq!(cfg.status.latest_ready_revision_name, "");
    let route = &out.routes[0];
    assert_eq!(
        cond(&route.status.status, ROUTE_ALL_TRAFFIC_ASSIGNED),
        (
            ConditionStatus::Unknown,
            "RevisionMissing",
            "Configuration \"web\" is waiting for a Revision to become ready."
        )
    );
    assert!(out.ingresses.is_empty());
    let svc = &out.services[0];
    assert_eq!(
        cond(&svc.status.status, CONDITION_READY).0,
        ConditionStatus::Unknown
    );
    assert_eq!(svc.status.latest_created_revision_name, "web-00001");
}

#[test]
fn ready_revision_takes_all_traffic_and_the_service_becomes_ready() {
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    ingress_ready(&mut input, "web");
    let mut state = ServingState::default();
    let out = reconcile(&input, &mut state);

    let ing = &out.ingresses[0];
    assert_eq!(ing.metadata.key(), "default/web");
    assert_eq!(
        ing.metadata.annotations[INGRESS_CLASS_ANNOTATION],
        "sluice.ingress.networking.knative.dev"
    );
    assert_eq!(ing.metadata.labels[ROUTE_LABEL], "web");
    assert_eq!(ing.metadata.labels[ROUTE_NAMESPACE_LABEL], "default");
    assert_eq!(ing.spec.rules.len(), 2);
    assert_eq!(ing.spec.rules[0].visibility, "ClusterLocal");
    assert_eq!(
        ing.spec.rules[0].hosts,
        [
            "web.default",
            "web.default.svc",
            "web.default.svc.cluster.local"
        ]
    );
    assert_eq!(ing.spec.rules[1].visibility, "ExternalIP");
    assert_eq!(ing.spec.rules[1].hosts, ["web.default.localhost"]);
    let split = &ing.spec.rules[1].http.as_ref().unwrap().paths[0].splits[0];
    assert_eq!(split.service_name, "web-00001");
    assert_eq!(split.service_namespace, "default");
    assert_eq!(split.service_port, IntOrString::Int(80));
    assert_eq!(split.percent, 100);
    assert_eq!(
        split.append_headers["Knative-Serving-Revision"],
        "web-00001"
    );
    assert_eq!(split.append_headers["Knative-Serving-Namespace"], "default");
    // The produced KIngress passes the api crate's Knative validation.
    let mut checked = ing.clone();
    checked.set_defaults();
    assert_eq!(checked.validate(), Ok(()));

    let svc = &out.services[0];
    assert_eq!(
        cond(&svc.status.status, CONDITION_READY),
        (ConditionStatus::True, "", "")
    );
    assert_eq!(
        svc.status.url.as_deref(),
        Some("http://web.default.localhost")
    );
    assert_eq!(
        svc.status.address.as_ref().unwrap().url.as_deref(),
        Some("http://web.default.svc.cluster.local")
    );
    assert_eq!(svc.status.latest_ready_revision_name, "web-00001");
    assert_eq!(
        svc.status.traffic,
        [TrafficTarget {
            revision_name: "web-00001".into(),
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }]
    );
    let route = &out.routes[0];
    assert_eq!(
        cond(&route.status.status, ROUTE_CERTIFICATE_PROVISIONED),
        (
            ConditionStatus::True,
            "TLSNotEnabled",
            "external-domain-tls is not enabled"
        )
    );
    assert_eq!(out.revision_services[0].metadata.name, "web-00001");
    assert_eq!(out.revision_services[0].spec.ports[0].name, "http");
    assert_eq!(out.revision_services[0].spec.ports[0].port, 80);
}

#[test]
fn template_change_creates_the_next_revision_and_traffic_moves_when_it_is_ready() {
    let mut state = ServingState::default();
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    reconcile(&input, &mut state);

    let mut input = objects(&with_env(WEB, "green"));
    ready(&mut input, "web-00001");
    let out = reconcile(&input, &mut state);
    assert_eq!(revision_names(&out), ["web-00001", "web-00002"]);
    assert_eq!(out.revisions[1].spec.containers[0].env[0].value, "green");
    // The old revision is immutable.
    assert_eq!(out.revisions[0].spec.containers[0].env[0].value, "blue");
    let cfg = &out.configurations[0];
    assert_eq!(cfg.metadata.generation, 2);
    assert_eq!(cfg.status.latest_created_revision_name, "web-00002");
    assert_eq!(cfg.status.latest_ready_revision_name, "web-00001");
    assert_eq!(
        splits(&out.ingresses[0], 1),
        [("web-00001".to_string(), 100)]
    );

    ready(&mut input, "web-00002");
    let out = reconcile(&input, &mut state);
    assert_eq!(
        out.configurations[0].status.latest_ready_revision_name,
        "web-00002"
    );
    assert_eq!(
        splits(&out.ingresses[0], 1),
        [("web-00002".to_string(), 100)]
    );
    assert_eq!(out.ingresses[0].metadata.generation, 2);
}

#[test]
fn changes_outside_the_template_make_no_revision() {
    let mut state = ServingState::default();
    reconcile(&objects(WEB), &mut state);
    let table = [
        WEB.replace("labels: {team: a}", "labels: {team: b}"),
        WEB.replace("  name: web\n", "  name: web\n  annotations: {note: x}\n"),
        format!("{WEB}  traffic:\n  - latestRevision: true\n    percent: 100\n    tag: current\n"),
    ];
    for text in &table {
        let out = reconcile(&objects(text), &mut state);
        assert_eq!(revision_names(&out), ["web-00001"], "{text}");
        assert_eq!(out.configurations[0].metadata.generation, 1, "{text}");
    }
}

#[test]
fn template_metadata_name_names_the_revision_and_must_change_with_the_template() {
    let named = WEB.replace(
        "  template:\n    spec:",
        "  template:\n    metadata: {name: web-blue}\n    spec:",
    );
    let mut state = ServingState::default();
    let mut input = objects(&named);
    ready(&mut input, "web-blue");
    let out = reconcile(&input, &mut state);
    assert_eq!(revision_names(&out), ["web-blue"]);

    // Same name, different template: Knative refuses to reuse the name.
    let mut input = objects(&with_env(&named, "green"));
    ready(&mut input, "web-blue");
    let out = reconcile(&input, &mut state);
    assert_eq!(revision_names(&out), ["web-blue"]);
    let cfg = &out.configurations[0];
    let (status, reason, message) = cond(&cfg.status.status, CONDITION_READY);
    assert_eq!((status, reason), (ConditionStatus::False, "RevisionFailed"));
    assert!(
        message.contains("\"web-blue\" already exists with a different template"),
        "{message}"
    );
    let svc = &out.services[0];
    assert_eq!(
        cond(&svc.status.status, SERVICE_ROUTES_READY),
        (
            ConditionStatus::False,
            "RevisionNameTaken",
            "The revision name \"web-blue\" is taken by a conflicting Revision, so traffic will not be migrated"
        )
    );
    // Traffic stays on the existing revision.
    assert_eq!(
        splits(&out.ingresses[0], 1),
        [("web-blue".to_string(), 100)]
    );

    // A new name: a new revision.
    let renamed = with_env(&named, "green").replace("web-blue", "web-green");
    let out = reconcile(&objects(&renamed), &mut state);
    assert_eq!(revision_names(&out), ["web-blue", "web-green"]);
}

#[test]
fn split_by_revision_name_with_tags_gives_tag_hosts_and_urls() {
    let mut state = ServingState::default();
    reconcile(&objects(WEB), &mut state);
    let text = format!(
        "{}  traffic:\n  - latestRevision: true\n    percent: 80\n    tag: current\n  - revisionName: web-00001\n    percent: 20\n    tag: old\n",
        with_env(WEB, "green")
    );
    let mut input = objects(&text);
    ready(&mut input, "web-00001");
    ready(&mut input, "web-00002");
    let out = reconcile(&input, &mut state);
    let ing = &out.ingresses[0];
    let hosts: Vec<(&str, Vec<&str>)> = ing
        .spec
        .rules
        .iter()
        .map(|r| {
            (
                r.visibility.as_str(),
                r.hosts.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            (
                "ClusterLocal",
                vec![
                    "web.default",
                    "web.default.svc",
                    "web.default.svc.cluster.local"
                ]
            ),
            ("ExternalIP", vec!["web.default.localhost"]),
            (
                "ClusterLocal",
                vec![
                    "current-web.default",
                    "current-web.default.svc",
                    "current-web.default.svc.cluster.local"
                ]
            ),
            ("ExternalIP", vec!["current-web.default.localhost"]),
            (
                "ClusterLocal",
                vec![
                    "old-web.default",
                    "old-web.default.svc",
                    "old-web.default.svc.cluster.local"
                ]
            ),
            ("ExternalIP", vec!["old-web.default.localhost"]),
        ]
    );
    assert_eq!(
        splits(ing, 1),
        [("web-00002".to_string(), 80), ("web-00001".to_string(), 20)]
    );
    assert_eq!(splits(ing, 3), [("web-00002".to_string(), 100)]);
    assert_eq!(splits(ing, 5), [("web-00001".to_string(), 100)]);
    let traffic = &out.services[0].status.traffic;
    assert_eq!(
        traffic,
        &[
            TrafficTarget {
                tag: "current".into(),
                revision_name: "web-00002".into(),
                latest_revision: Some(true),
                percent: Some(80),
                url: Some("http://current-web.default.localhost".into()),
                ..Default::default()
            },
            TrafficTarget {
                tag: "old".into(),
                revision_name: "web-00001".into(),
                latest_revision: Some(false),
                percent: Some(20),
                url: Some("http://old-web.default.localhost".into()),
                ..Default::default()
            },
        ]
    );
}

#[test]
fn invalid_spec_is_reported_and_the_last_valid_spec_keeps_serving() {
    let bad_traffic = format!(
        "{WEB}  traffic:\n  - latestRevision: true\n    percent: 60\n  - revisionName: web-00001\n    percent: 30\n"
    );
    // Never valid: nothing is created, Ready=False names the field.
    let mut state = ServingState::default();
    let out = reconcile(&objects(&bad_traffic), &mut state);
    assert!(out.revisions.is_empty() && out.configurations.is_empty() && out.routes.is_empty());
    assert_eq!(
        cond(&out.services[0].status.status, CONDITION_READY),
        (
            ConditionStatus::False,
            "InvalidSpec",
            "spec.traffic: Traffic targets sum to 90, want 100"
        )
    );

    // Valid first, then invalid: the first keeps serving.
    let mut state = ServingState::default();
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    reconcile(&input, &mut state);
    let mut input = objects(&bad_traffic);
    ready(&mut input, "web-00001");
    let out = reconcile(&input, &mut state);
    assert_eq!(revision_names(&out), ["web-00001"]);
    assert_eq!(
        splits(&out.ingresses[0], 1),
        [("web-00001".to_string(), 100)]
    );
    let (status, reason, message) = cond(&out.services[0].status.status, CONDITION_READY);
    assert_eq!((status, reason), (ConditionStatus::False, "InvalidSpec"));
    assert_eq!(
        message,
        "spec.traffic: Traffic targets sum to 90, want 100 (still serving the last valid spec, generation 1)"
    );
}

#[test]
fn service_without_image_or_command_is_refused_with_a_clear_message() {
    let text = WEB
        .replace("        command: [./web]\n", "")
        .replace("      - image: example/web\n", "      - name: web\n");
    let out = reconcile(&objects(&text), &mut ServingState::default());
    assert!(out.revisions.is_empty());
    let (status, reason, message) = cond(&out.services[0].status.status, CONDITION_READY);
    assert_eq!((status, reason), (ConditionStatus::False, "InvalidSpec"));
    assert!(
        message.starts_with("spec.template.spec.containers[0].image: missing field(s)"),
        "{message}"
    );
    // An image alone is a valid revision (which runtime can run it is the serving plane's call).
    let text = WEB.replace("        command: [./web]\n", "");
    let out = reconcile(&objects(&text), &mut ServingState::default());
    assert_eq!(revision_names(&out), ["web-00001"]);
}

#[test]
fn bad_targets_get_knative_reasons() {
    let head = format!("{WEB}  traffic:\n");
    let table: &[(&str, Option<RevisionHealth>, ConditionStatus, &str, &str)] = &[
        (
            "  - revisionName: web-00009\n    percent: 100\n",
            None,
            ConditionStatus::False,
            "RevisionMissing",
            "Revision \"web-00009\" referenced in traffic not found.",
        ),
        (
            "  - revisionName: web-00001\n    percent: 100\n",
            None,
            ConditionStatus::Unknown,
            "RevisionMissing",
            "Revision \"web-00001\" is not yet ready.",
        ),
        (
            "  - revisionName: web-00001\n    percent: 100\n",
            Some(RevisionHealth::Failed {
                reason: "ExitCode1".into(),
                message: "Container failed with: boom".into(),
            }),
            ConditionStatus::False,
            "RevisionMissing",
            "Revision \"web-00001\" failed to become ready.",
        ),
        (
            "  - latestRevision: true\n    percent: 100\n",
            Some(RevisionHealth::Failed {
                reason: "ExitCode1".into(),
                message: "Container failed with: boom".into(),
            }),
            ConditionStatus::False,
            "RevisionMissing",
            "Configuration \"web\" does not have any ready Revision.",
        ),
    ];
    for (traffic, health, status, reason, message) in table {
        let mut input = objects(&format!("{head}{traffic}"));
        if let Some(h) = health {
            input.revision_facts.insert(
                RevisionKey::new("default", "web-00001"),
                RevisionFacts {
                    health: h.clone(),
                    ..Default::default()
                },
            );
        }
        let out = reconcile(&input, &mut ServingState::default());
        let route = &out.routes[0];
        assert_eq!(
            cond(&route.status.status, ROUTE_ALL_TRAFFIC_ASSIGNED),
            (*status, *reason, *message),
            "{traffic}"
        );
        assert_eq!(
            cond(&route.status.status, CONDITION_READY),
            (*status, *reason, *message),
            "{traffic}"
        );
        assert!(out.ingresses.is_empty());
    }
}

#[test]
fn failed_latest_revision_marks_the_configuration_and_keeps_the_previous_one_routed() {
    let mut state = ServingState::default();
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    reconcile(&input, &mut state);
    let mut input = objects(&with_env(WEB, "red"));
    ready(&mut input, "web-00001");
    input.revision_facts.insert(
        RevisionKey::new("default", "web-00002"),
        RevisionFacts {
            health: RevisionHealth::Failed {
                reason: "ExitCode1".into(),
                message: "Container failed with: boom".into(),
            },
            actual_replicas: Some(0),
            desired_replicas: Some(1),
            image_digest: None,
        },
    );
    let out = reconcile(&input, &mut state);
    assert_eq!(
        cond(&out.configurations[0].status.status, CONDITION_READY),
        (
            ConditionStatus::False,
            "RevisionFailed",
            "Revision \"web-00002\" failed with message: Container failed with: boom."
        )
    );
    let rev = out.revision("default", "web-00002").unwrap();
    assert_eq!(
        cond(&rev.status.status, REVISION_CONTAINER_HEALTHY),
        (
            ConditionStatus::False,
            "ExitCode1",
            "Container failed with: boom"
        )
    );
    assert_eq!(
        cond(&rev.status.status, CONDITION_READY).0,
        ConditionStatus::False
    );
    assert_eq!(
        splits(&out.ingresses[0], 1),
        [("web-00001".to_string(), 100)]
    );
    assert_eq!(
        cond(&out.services[0].status.status, SERVICE_CONFIGURATIONS_READY).1,
        "RevisionFailed"
    );
}

#[test]
fn revision_scaled_to_zero_stays_ready_but_inactive() {
    let mut input = objects(WEB);
    input.revision_facts.insert(
        RevisionKey::new("default", "web-00001"),
        RevisionFacts {
            health: RevisionHealth::Ready,
            actual_replicas: Some(0),
            desired_replicas: Some(0),
            image_digest: None,
        },
    );
    let out = reconcile(&input, &mut ServingState::default());
    let rev = &out.revisions[0];
    assert_eq!(
        cond(&rev.status.status, CONDITION_READY).0,
        ConditionStatus::True
    );
    assert_eq!(
        cond(&rev.status.status, REVISION_ACTIVE),
        (
            ConditionStatus::False,
            "NoTraffic",
            "The target is not receiving traffic."
        )
    );
    assert_eq!(rev.status.actual_replicas, Some(0));
    assert_eq!(out.ingresses.len(), 1);
}

#[test]
fn custom_domain_and_templates_shape_hosts_and_urls() {
    let mut input = objects(&format!(
        "{}  traffic:\n  - latestRevision: true\n    percent: 100\n    tag: beta\n",
        WEB.replace("labels: {team: a}", "labels: {team: a, env: prod}")
    ));
    let map = |name: &str, pairs: &[(&str, &str)]| {
        let mut m = sluice_api::core::ConfigMap::default();
        m.metadata.name = name.into();
        m.metadata.namespace = "knative-serving".into();
        m.data = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m
    };
    input.config = ServingConfig::from_config_maps(&[
        map(
            "config-network",
            &[
                ("domain-template", "{{.Name}}-{{.Namespace}}.{{.Domain}}"),
                ("tag-template", "{{.Name}}-at-{{.Tag}}"),
            ],
        ),
        map(
            "config-domain",
            &[
                ("example.com", ""),
                ("prod.example.com", "selector:\n  env: prod\n"),
            ],
        ),
    ])
    .unwrap();
    input.config.external_url_port = Some(8080);
    ready(&mut input, "web-00001");
    let out = reconcile(&input, &mut ServingState::default());
    let ing = &out.ingresses[0];
    assert_eq!(ing.spec.rules[1].hosts, ["web-default.prod.example.com"]);
    assert_eq!(
        ing.spec.rules[2].hosts[0], "web-at-beta.default",
        "tag hosts use the tag template"
    );
    assert_eq!(
        ing.spec.rules[3].hosts,
        ["web-at-beta-default.prod.example.com"]
    );
    let svc = &out.services[0];
    assert_eq!(
        svc.status.url.as_deref(),
        Some("http://web-default.prod.example.com:8080")
    );
    assert_eq!(
        svc.status.traffic[0].url.as_deref(),
        Some("http://web-at-beta-default.prod.example.com:8080")
    );
}

#[test]
fn cluster_local_service_has_no_external_rule() {
    let text = WEB.replace(
        "labels: {team: a}",
        "labels: {networking.knative.dev/visibility: cluster-local}",
    );
    let mut input = objects(&text);
    ready(&mut input, "web-00001");
    let out = reconcile(&input, &mut ServingState::default());
    let ing = &out.ingresses[0];
    assert_eq!(ing.spec.rules.len(), 1);
    assert_eq!(ing.spec.rules[0].visibility, "ClusterLocal");
    assert_eq!(
        out.services[0].status.url.as_deref(),
        Some("http://web.default.svc.cluster.local")
    );
    assert_eq!(
        cond(&out.routes[0].status.status, ROUTE_CERTIFICATE_PROVISIONED).2,
        "TLS is not enabled for cluster-local"
    );
}

#[test]
fn standalone_configuration_and_route() {
    let text = "\
apiVersion: serving.knative.dev/v1
kind: Configuration
metadata: {name: api}
spec:
  template:
    spec:
      containers:
      - command: [./api]
        ports: [{containerPort: 9000, name: h2c}]
---
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {name: front}
spec:
  traffic:
  - configurationName: api
    percent: 100
";
    let mut input = objects(text);
    ready(&mut input, "api-00001");
    ingress_ready(&mut input, "front");
    let out = reconcile(&input, &mut ServingState::default());
    assert!(out.services.is_empty());
    assert_eq!(revision_names(&out), ["api-00001"]);
    assert!(!out.revisions[0].metadata.labels.contains_key(SERVICE_LABEL));
    let ing = &out.ingresses[0];
    assert_eq!(ing.metadata.name, "front");
    assert_eq!(ing.spec.rules[1].hosts, ["front.default.localhost"]);
    let split = &ing.spec.rules[1].http.as_ref().unwrap().paths[0].splits[0];
    // Knative: an h2c revision is reached on port 81 of its Service, named http2.
    assert_eq!(split.service_port, IntOrString::Int(81));
    let port = &out.revision_services[0].spec.ports[0];
    assert_eq!((port.name.as_str(), port.port), ("http2", 81));
    assert_eq!(port.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    assert_eq!(
        cond(&out.routes[0].status.status, CONDITION_READY).0,
        ConditionStatus::True
    );
    assert_eq!(
        out.routes[0].status.url.as_deref(),
        Some("http://front.default.localhost")
    );
}

#[test]
fn service_conflicting_with_a_standalone_route_is_not_owned() {
    let text = format!(
        "{WEB}---
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {{name: web}}
spec:
  traffic:
  - configurationName: web
    percent: 100
"
    );
    let out = reconcile(&objects(&text), &mut ServingState::default());
    assert_eq!(
        cond(&out.services[0].status.status, SERVICE_ROUTES_READY),
        (
            ConditionStatus::False,
            "NotOwned",
            "There is an existing Route \"web\" that we do not own."
        )
    );
    assert_eq!(out.routes.len(), 1);
    assert!(out.routes[0].metadata.owner_references.is_empty());
}

#[test]
fn ingress_ready_waits_for_the_current_generation() {
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    let mut st = IngressStatus::default();
    st.status.observed_generation = 7;
    set(
        &mut st.status,
        CONDITION_READY,
        ConditionStatus::True,
        "",
        "",
    );
    input.ingress_statuses.insert("default/web".into(), st);
    let out = reconcile(&input, &mut ServingState::default());
    assert_eq!(
        cond(&out.routes[0].status.status, ROUTE_INGRESS_READY),
        (
            ConditionStatus::Unknown,
            "IngressNotConfigured",
            "Ingress has not yet been reconciled."
        )
    );
    let mut st = IngressStatus::default();
    set(
        &mut st.status,
        CONDITION_READY,
        ConditionStatus::False,
        "ProbeFailed",
        "no",
    );
    input.ingress_statuses.insert("default/web".into(), st);
    let out = reconcile(&input, &mut ServingState::default());
    assert_eq!(
        cond(&out.services[0].status.status, CONDITION_READY),
        (ConditionStatus::False, "ProbeFailed", "no")
    );
}

#[test]
fn reconcile_is_idempotent_and_never_duplicates_revisions() {
    let text = format!(
        "{}  traffic:\n  - latestRevision: true\n    percent: 50\n    tag: new\n  - revisionName: web-00001\n    percent: 50\n",
        with_env(WEB, "green")
    );
    let mut state = ServingState::default();
    reconcile(&objects(WEB), &mut state);
    let mut input = objects(&text);
    ready(&mut input, "web-00001");
    ready(&mut input, "web-00002");
    ingress_ready(&mut input, "web");
    let first = reconcile(&input, &mut state);
    let state_after_first = state.clone();
    for _ in 0..3 {
        let again = reconcile(&input, &mut state);
        assert_eq!(again, first);
        assert_eq!(state, state_after_first);
    }
    assert_eq!(revision_names(&first), ["web-00001", "web-00002"]);
    // The state survives a restart through serde.
    let json = serde_json::to_string(&state).unwrap();
    let mut restored: ServingState = serde_json::from_str(&json).unwrap();
    assert_eq!(reconcile(&input, &mut restored), first);
}

#[test]
fn removed_service_is_forgotten_and_starts_over() {
    let mut state = ServingState::default();
    reconcile(&objects(WEB), &mut state);
    reconcile(&objects(&with_env(WEB, "green")), &mut state);
    let out = reconcile(&ReconcileInput::default(), &mut state);
    assert!(out.revisions.is_empty() && out.ingresses.is_empty());
    assert_eq!(state, ServingState::default());
    let out = reconcile(&objects(WEB), &mut state);
    assert_eq!(revision_names(&out), ["web-00001"]);
}

#[test]
fn duplicate_objects_are_warned_about() {
    let out = reconcile(
        &objects(&format!("{WEB}---\n{}", with_env(WEB, "green"))),
        &mut ServingState::default(),
    );
    assert_eq!(out.services.len(), 1);
    assert_eq!(
        out.warnings,
        ["Service default/web is defined more than once; the first definition is used"]
    );
    assert_eq!(out.revisions[0].spec.containers[0].env[0].value, "blue");
}

#[test]
fn status_prints_in_knative_shape() {
    let mut input = objects(WEB);
    ready(&mut input, "web-00001");
    ingress_ready(&mut input, "web");
    let out = reconcile(&input, &mut ServingState::default());
    let v = serde_json::to_value(&out.services[0]).unwrap();
    assert_eq!(v["apiVersion"], "serving.knative.dev/v1");
    assert_eq!(v["status"]["observedGeneration"], 1);
    assert_eq!(v["status"]["latestReadyRevisionName"], "web-00001");
    assert_eq!(v["status"]["url"], "http://web.default.localhost");
    let types: Vec<&str> = v["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ConfigurationsReady", "Ready", "RoutesReady"]);
}

#[test]
fn transition_times_change_only_with_the_status() {
    let mut state = ServingState::default();
    let input = objects(WEB);
    let mut first = reconcile(&input, &mut state);
    stamp_transition_times(None, &mut first, "t1");
    let ready_at = |o: &ReconcileOutput| {
        o.revisions[0]
            .status
            .status
            .condition(CONDITION_READY)
            .unwrap()
            .last_transition_time
            .clone()
    };
    assert_eq!(ready_at(&first).as_deref(), Some("t1"));
    let mut same = reconcile(&input, &mut state);
    stamp_transition_times(Some(&first), &mut same, "t2");
    assert_eq!(ready_at(&same).as_deref(), Some("t1"));
    let mut input = input;
    ready(&mut input, "web-00001");
    let mut changed = reconcile(&input, &mut state);
    stamp_transition_times(Some(&same), &mut changed, "t3");
    assert_eq!(ready_at(&changed).as_deref(), Some("t3"));
}

#[test]
fn the_first_image_digest_is_kept_shown_and_survives_a_restart() {
    let mut state = ServingState::default();
    let mut input = objects(WEB);
    reconcile(&input, &mut state);
    let key = RevisionKey::new("default", "web-00001");
    input.revision_facts.insert(
        key.clone(),
        RevisionFacts {
            image_digest: Some("sha256:aaa".into()),
            ..Default::default()
        },
    );
    let out = reconcile(&input, &mut state);
    let statuses = &out.revisions[0].status.container_statuses;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].name, "user-container");
    assert_eq!(statuses[0].image_digest, "sha256:aaa");
    // A later report of another image (the tag moved) does not change what the revision runs.
    input.revision_facts.get_mut(&key).unwrap().image_digest = Some("sha256:bbb".into());
    let out = reconcile(&input, &mut state);
    assert_eq!(
        out.revisions[0].status.container_statuses[0].image_digest,
        "sha256:aaa"
    );
    // A restart: the state read back from JSON, no facts yet. Names and digests are kept.
    let mut restored: ServingState =
        serde_json::from_value(serde_json::to_value(&state).unwrap()).unwrap();
    assert_eq!(restored, state);
    let mut input = objects(&with_env(WEB, "red"));
    let out = reconcile(&input, &mut restored);
    assert_eq!(revision_names(&out), ["web-00001", "web-00002"]);
    assert_eq!(restored.image_digests["default/web-00001"], "sha256:aaa");
    // The Service goes away: its revisions' digests go with them.
    input.services.clear();
    reconcile(&input, &mut restored);
    assert!(restored.image_digests.is_empty());
}
