//! manifests/ checked against the code it deploys: every file parses into typed Kubernetes objects
//! (unknown fields are errors), the kustomizations build (`kubectl kustomize`) and name files that
//! exist, the xds-server's arguments are flags of the real `sluice xds` and point at the gateway
//! Services' real ports, the RBAC rules grant exactly what the real `sluice xds --kube` calls (run
//! with the manifest's own arguments against a recording fake API server), the images are those
//! scripts/images builds, and the Istio overlay's WasmPlugin carries a configuration the queue-proxy
//! filter's own parser accepts; its OCI wasm image holds exactly the built filter.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use sluice_e2e::cluster;
use sluice_e2e::images::{docker, engine_answers};
use sluice_e2e::manifests::{
    self, ApiCall, BUILDS, Kustomization, Objects, Phase, TrafficMode, api_call, documents,
    kustomize,
};
use sluice_e2e::sluice::{sluice_bin, workspace_root};

fn manifests_path(rel: &str) -> std::path::PathBuf {
    manifests::root().join(rel)
}

/// `--flag=value` / `--flag` arguments as a map (value "" for a bare flag).
fn flags(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.clone(), String::new()),
        })
        .collect()
}

/// The long flags `sluice SUBCOMMAND --help` lists, with their defaults: the real clap definition.
fn cli_flags(subcommand: &str) -> Result<BTreeMap<String, Option<String>>> {
    let out = std::process::Command::new(sluice_bin()?)
        .args([subcommand, "--help"])
        .output()?;
    anyhow::ensure!(out.status.success(), "sluice {subcommand} --help failed");
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            current = trimmed
                .split([' ', ','])
                .find(|w| w.starts_with("--"))
                .map(str::to_string);
            if let Some(flag) = &current {
                flags.insert(flag.clone(), None);
            }
        }
        if let (Some(flag), Some(at)) = (&current, line.find("[default: ")) {
            let value = line[at + "[default: ".len()..]
                .trim_end_matches(']')
                .to_string();
            flags.insert(flag.clone(), Some(value));
        }
    }
    Ok(flags)
}

fn check_flags(
    what: &str,
    given: &BTreeMap<String, String>,
    known: &BTreeMap<String, Option<String>>,
) -> Result<()> {
    for flag in given.keys() {
        if known.contains_key(flag) {
            continue;
        }
        bail!(
            "{what}: {flag} is not a flag of the sluice binary (known: {:?})",
            known.keys()
        );
    }
    Ok(())
}

fn pod(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a Deployment has a pod spec")
}

fn container<'a>(deployment: &'a Deployment, name: &str) -> &'a Container {
    pod(deployment)
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn port_named(container: &Container, name: &str) -> Option<i32> {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// The Deployment whose pods `service` selects (exactly one).
fn selected<'a>(objects: &'a Objects, service: &Service) -> Result<&'a Deployment> {
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let matching: Vec<&Deployment> = objects
        .deployments
        .iter()
        .filter(|d| {
            let labels = d
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect();
    match matching.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "Service {:?} selects {} Deployments, want 1",
            service.metadata.name,
            matching.len()
        ),
    }
}

/// The container port `service`'s port `port` reaches on the pods it selects.
fn target_container_port(objects: &Objects, service: &Service, port: i32) -> Result<i32> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let service_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == port))
        .with_context(|| format!("Service {name} has no port {port}"))?;
    let deployment = selected(objects, service)?;
    let pods = pod(deployment);
    match service_port.target_port.clone() {
        Some(IntOrString::Int(n)) => Ok(n),
        None => Ok(port),
        Some(IntOrString::String(port_name)) => pods
            .containers
            .iter()
            .find_map(|c| port_named(c, &port_name))
            .with_context(|| format!("Service {name}: no container port named {port_name}")),
    }
}

/// `NAME.NAMESPACE.svc.cluster.local[:PORT]` -> the Service.
fn service_by_dns<'a>(objects: &'a Objects, host: &str) -> Result<&'a Service> {
    let mut labels = host.split('.');
    let (name, namespace) = (labels.next().unwrap_or(""), labels.next().unwrap_or(""));
    anyhow::ensure!(
        host == format!("{name}.{namespace}.svc.cluster.local"),
        "{host} is not a Service's cluster DNS name"
    );
    objects
        .services
        .iter()
        .find(|s| {
            s.metadata.name.as_deref() == Some(name)
                && s.metadata.namespace.as_deref() == Some(namespace)
        })
        .with_context(|| format!("{host}: no Service {namespace}/{name} in the manifests"))
}

fn host_port(value: &str) -> Result<(String, i32)> {
    let (host, port) = value
        .rsplit_once(':')
        .with_context(|| format!("{value}: no port"))?;
    Ok((host.to_string(), port.parse()?))
}

fn listener_port(
    given: &BTreeMap<String, String>,
    cli: &BTreeMap<String, Option<String>>,
    flag: &str,
) -> Result<i32> {
    let value = given
        .get(flag)
        .cloned()
        .or_else(|| cli.get(flag).cloned().flatten())
        .with_context(|| format!("{flag}: neither given nor defaulted"))?;
    Ok(host_port(&value)?.1)
}

#[test]
fn every_manifest_file_parses_into_typed_objects_and_every_file_is_used() -> Result<()> {
    let mut referenced = BTreeSet::new();
    let mut kustomizations = 0;
    for file in manifests::yaml_files()? {
        let text = std::fs::read_to_string(&file)?;
        let rel = file.strip_prefix(manifests::root())?.display().to_string();
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            kustomizations += 1;
            let k: Kustomization =
                serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
                    .map_err(|e| anyhow::anyhow!("{rel}: {}: {}", e.path(), e.inner()))?;
            let dir = file.parent().expect("a file has a folder");
            match k.kind.as_str() {
                "Kustomization" => {
                    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1", "{rel}")
                }
                "Component" => {
                    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1alpha1", "{rel}")
                }
                other => bail!("{rel}: kind {other}"),
            }
            for entry in k.resources.iter().chain(&k.components) {
                let path = dir.join(entry);
                anyhow::ensure!(path.exists(), "{rel} names {entry}, which does not exist");
                let path = path.canonicalize()?;
                if path.is_dir() {
                    anyhow::ensure!(
                        path.join("kustomization.yaml").is_file(),
                        "{rel}: {entry} holds no kustomization.yaml"
                    );
                }
                referenced.insert(path);
            }
            for patch in &k.patches {
                // Each patch is a JSON 6902 patch in YAML.
                let ops: Vec<Value> = serde_yaml::from_str(&patch.patch)
                    .with_context(|| format!("{rel}: patch for {:?}", patch.target))?;
                for op in ops {
                    let verb = op["op"].as_str().unwrap_or_default();
                    anyhow::ensure!(
                        ["add", "replace", "remove"].contains(&verb),
                        "{rel}: op {op}"
                    );
                }
            }
            continue;
        }
        let mut objects = Objects::default();
        for doc in documents(&text).with_context(|| rel.clone())? {
            objects.add(&doc).with_context(|| rel.clone())?;
        }
    }
    assert!(kustomizations >= 5, "{kustomizations} kustomizations");
    // No file lies around unused: every YAML file (not a kustomization) is someone's resource.
    for file in manifests::yaml_files()? {
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        assert!(
            referenced.contains(&file.canonicalize()?),
            "{} is in no kustomization",
            file.display()
        );
    }
    Ok(())
}

#[test]
fn the_builds_give_typed_objects_with_requests_and_non_root_pods() -> Result<()> {
    for build in BUILDS {
        let objects = kustomize(&manifests_path(build))?;
        for d in &objects.deployments {
            let name = d.metadata.name.clone().unwrap_or_default();
            let spec = pod(d);
            let pod_ctx = spec.security_context.as_ref();
            assert_eq!(
                pod_ctx.and_then(|c| c.run_as_non_root),
                Some(true),
                "{build}: {name}"
            );
            assert!(
                pod_ctx.and_then(|c| c.run_as_user).is_some_and(|u| u != 0),
                "{build}: {name}"
            );
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
                assert!(
                    requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
                    "{build}: {name}/{}: resource requests",
                    c.name
                );
                let ctx = c.security_context.as_ref();
                assert_eq!(
                    ctx.and_then(|s| s.allow_privilege_escalation),
                    Some(false),
                    "{build}: {name}/{}",
                    c.name
                );
                assert_eq!(
                    ctx.and_then(|s| s.read_only_root_filesystem),
                    Some(true),
                    "{build}: {name}/{}",
                    c.name
                );
                let dropped = ctx
                    .and_then(|s| s.capabilities.as_ref())
                    .and_then(|c| c.drop.clone());
                assert_eq!(
                    dropped,
                    Some(vec!["ALL".to_string()]),
                    "{build}: {name}/{}",
                    c.name
                );
            }
            // Every gateway Deployment has a PodDisruptionBudget and an HPA.
            if name.starts_with("sluice-gateway") {
                let labels = d
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.match_labels.clone());
                assert!(
                    objects.pdbs.iter().any(|p| p
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref())
                        .and_then(|s| s.match_labels.clone())
                        == labels),
                    "{build}: no PodDisruptionBudget for {name}"
                );
                assert!(
                    objects
                        .hpas
                        .iter()
                        .any(|h| h
                            .spec
                            .as_ref()
                            .is_some_and(|s| s.scale_target_ref.kind == "Deployment"
                                && s.scale_target_ref.name == name
                                && s.min_replicas.unwrap_or(1) >= 2)),
                    "{build}: no HorizontalPodAutoscaler (min 2) for {name}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn xds_server_arguments_are_its_flags_and_reach_the_gateways_ports() -> Result<()> {
    let cli = cli_flags("xds")?;
    let bootstrap_cli = cli_flags("bootstrap")?;
    for build in ["base", "overlays/cluster"] {
        let objects = kustomize(&manifests_path(build))?;
        let xds = objects.deployment("sluice-xds-server")?;
        let c = container(xds, "xds-server");
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(args.first().map(String::as_str), Some("xds"), "{build}");
        let given = flags(&args);
        check_flags(&format!("{build}: sluice xds"), &given, &cli)?;
        assert!(
            given.contains_key("--kube"),
            "{build}: the xds-server reads the cluster"
        );

        // Its ports are the ones it binds, and its Service reaches them.
        let xds_port: i32 = given["--xds-port"].parse()?;
        assert_eq!(port_named(c, "grpc-xds"), Some(xds_port), "{build}");
        assert_eq!(
            port_named(c, "http-control"),
            Some(given["--control-port"].parse()?),
            "{build}"
        );
        let xds_service = objects
            .service("sluice-xds-server")
            .context("xds Service")?;
        assert_eq!(
            target_container_port(&objects, xds_service, 18000)?,
            xds_port
        );

        // The gateways' bootstrap names that Service: the gateway image's own (its Dockerfile's
        // default), and in the mTLS overlay the init container's.
        let dockerfile =
            std::fs::read_to_string(workspace_root().join(cluster::GATEWAY_DOCKERFILE))?;
        let baked = dockerfile
            .lines()
            .find_map(|l| l.strip_prefix("ARG SLUICE_BOOTSTRAP_XDS="))
            .context("gateway.Dockerfile: ARG SLUICE_BOOTSTRAP_XDS")?;
        let mut bootstrap_targets = vec![baked.to_string()];
        for d in &objects.deployments {
            for init in pod(d).init_containers.iter().flatten() {
                let args = init.args.clone().unwrap_or_default();
                assert_eq!(args.first().map(String::as_str), Some("bootstrap"));
                let given = flags(&args);
                check_flags(
                    &format!("{build}: sluice bootstrap"),
                    &given,
                    &bootstrap_cli,
                )?;
                bootstrap_targets.push(given["--xds"].clone());
                // Envoy starts from the file it writes.
                let out = match (given.get("--output"), given.get("--output-dir")) {
                    (Some(file), None) => file.clone(),
                    (None, Some(dir)) => format!("{dir}/envoy.json"),
                    _ => bail!("{build}: sluice bootstrap needs --output or --output-dir"),
                };
                let out = &out;
                let envoy = &pod(d).containers[0];
                assert!(
                    envoy.args.iter().flatten().any(|a| a == out),
                    "{build}: envoy -c {out}"
                );
            }
        }
        for target in bootstrap_targets {
            let (host, port) = host_port(&target)?;
            let service = service_by_dns(&objects, &host)?;
            assert_eq!(
                service.metadata.name, xds_service.metadata.name,
                "{build}: {target}"
            );
            assert_eq!(
                target_container_port(&objects, service, port)?,
                xds_port,
                "{build}: {target}"
            );
        }

        // Readiness is probed on each gateway pod (its ADS peer address, on the listener ports),
        // as net-kourier probes each pod: a fixed --probe-* target (a Service VIP) would reach one
        // pod per probe and call an Ingress Ready that other pods do not serve yet.
        let external = listener_port(&given, &cli, "--external-listener")?;
        let internal = listener_port(&given, &cli, "--internal-listener")?;
        for flag in ["--probe-external", "--probe-internal"] {
            assert!(
                !given.contains_key(flag),
                "{build}: {flag} replaces the per-gateway probes"
            );
        }
        // The Lease's holder identity and namespace come from the downward API.
        for (var, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let from = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == var)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            assert_eq!(from, Some(field), "{build}: env {var}");
        }
        // The load balancers in status: public is the LoadBalancer Service of the external
        // listener, private the cluster-only Service of the cluster-local one.
        let public = service_by_dns(&objects, &given["--public-domain"])?;
        let private = service_by_dns(&objects, &given["--private-domain"])?;
        assert_ne!(public.metadata.name, private.metadata.name, "{build}");
        let public_spec = public.spec.as_ref().context("spec")?;
        assert_eq!(public_spec.type_.as_deref(), Some("LoadBalancer"));
        for p in public_spec.ports.iter().flatten() {
            let target = target_container_port(&objects, public, p.port)?;
            assert_ne!(
                target, internal,
                "{build}: the public gateway exposes the cluster-local listener"
            );
        }
        let private_spec = private.spec.as_ref().context("spec")?;
        assert_eq!(private_spec.type_.as_deref(), Some("ClusterIP"));
        for p in private_spec.ports.iter().flatten() {
            assert_eq!(
                target_container_port(&objects, private, p.port)?,
                internal,
                "{build}"
            );
        }
        // The gateways declare the listener ports the xds-server programs.
        let tls = listener_port(&given, &cli, "--tls-listener")?;
        let gateway = objects.deployment("sluice-gateway")?;
        let envoy = container(gateway, "envoy");
        assert_eq!(port_named(envoy, "http-external"), Some(external));
        assert_eq!(port_named(envoy, "http-internal"), Some(internal));
        assert_eq!(port_named(envoy, "https"), Some(tls));
        // Each gateway pod is its own xDS node: ACKs and probes are per gateway.
        let envoy_args = envoy.args.clone().unwrap_or_default();
        let node = envoy_args
            .iter()
            .position(|a| a == "--service-node")
            .context("--service-node")?;
        assert_eq!(envoy_args[node + 1], "$(POD_NAME)");
    }
    // The cluster-local gateway overlay moves the private load balancer to its own pods.
    let objects = kustomize(&manifests_path("overlays/cluster"))?;
    let private = objects
        .service("sluice-gateway-internal")
        .context("private Service")?;
    assert_eq!(
        selected(&objects, private)?.metadata.name.as_deref(),
        Some("sluice-gateway-internal")
    );
    Ok(())
}

#[test]
fn images_are_the_ones_scripts_images_builds() -> Result<()> {
    let script = std::fs::read_to_string(workspace_root().join("scripts/images"))?;
    // `build "sluice/NAME:$tag" -f docker/FILE`: the repositories it builds.
    let built: BTreeSet<String> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("build \"sluice/"))
        .filter_map(|rest| {
            rest.split_once(":$tag\"")
                .map(|(name, _)| format!("sluice/{name}"))
        })
        .collect();
    assert_eq!(
        built,
        BTreeSet::from(
            ["sluice/gateway", "sluice/queue-proxy-wasm", "sluice/sluice"].map(String::from)
        )
    );
    let default_tag = script
        .lines()
        .find_map(|l| l.strip_prefix("tag="))
        .context("scripts/images: tag=")?;
    let want = |image: &str| -> Result<()> {
        let (repo, tag) = image
            .rsplit_once(':')
            .with_context(|| format!("{image}: no tag"))?;
        anyhow::ensure!(
            built.contains(repo),
            "{image} is not built by scripts/images ({built:?})"
        );
        anyhow::ensure!(
            tag == default_tag,
            "{image}: scripts/images tags {default_tag}"
        );
        Ok(())
    };
    for build in BUILDS {
        let objects = kustomize(&manifests_path(build))?;
        for d in &objects.deployments {
            let spec = pod(d);
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                want(c.image.as_deref().unwrap_or_default())?;
            }
        }
        for plugin in &objects.wasm_plugins {
            let image = plugin
                .spec
                .url
                .strip_prefix("oci://")
                .context("an oci:// url")?;
            want(image)?;
        }
    }
    // The gateway Dockerfile's default sluice image is the one the script builds first.
    let dockerfile = std::fs::read_to_string(workspace_root().join(cluster::GATEWAY_DOCKERFILE))?;
    want(
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix("ARG SLUICE_IMAGE="))
            .context("ARG SLUICE_IMAGE")?,
    )?;
    Ok(())
}

#[test]
fn the_wasm_plugin_config_parses_with_the_filters_own_parser() -> Result<()> {
    let objects = kustomize(&manifests_path("overlays/istio"))?;
    assert!(!objects.wasm_plugins.is_empty());
    for plugin in &objects.wasm_plugins {
        let spec = &plugin.spec;
        assert!(
            !spec.selector.match_labels.is_empty(),
            "a WasmPlugin without a selector applies to every pod"
        );
        assert_eq!(spec.phase, Some(Phase::Stats));
        assert!(spec.match_.iter().all(|m| m.mode == TrafficMode::Server));
        let raw = serde_json::to_vec(&spec.plugin_config)?;
        let config = sluice_queue_proxy::config::Config::parse(&raw)
            .map_err(|e| anyhow::anyhow!("pluginConfig of {:?}: {e}", plugin.metadata.name))?;
        // It serves the revision its selector picks.
        assert_eq!(
            spec.selector
                .match_labels
                .get("serving.knative.dev/revision"),
            Some(&config.identity.revision)
        );
        assert_eq!(
            plugin.metadata.namespace.as_deref(),
            Some(config.identity.namespace.as_str())
        );
        assert!(
            config.limits.is_some(),
            "containerConcurrency set: the breaker runs"
        );
    }
    Ok(())
}

/// Istio's OCI wasm image layout, built with the engine from docker/queue-proxy-wasm.Dockerfile: one
/// layer, holding only `plugin.wasm`, byte for byte the filter cargo built.
#[test]
fn the_wasm_image_holds_exactly_the_built_filter() -> Result<()> {
    assert!(
        engine_answers(),
        "no container engine answers (`docker info`)"
    );
    let built = std::fs::read(cluster::queue_proxy_wasm()?)?;
    let image = cluster::wasm_image()?;
    let dir = tempfile::tempdir()?;
    let saved = dir.path().join("image.tar");
    docker(&[
        "save",
        "--output",
        &saved.display().to_string(),
        image.tag(),
    ])?;
    untar(&saved, dir.path())?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json"))?)?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .context("manifest.json: Layers")?;
    assert_eq!(layers.len(), 1, "one layer: {layers:?}");
    let layer = dir.path().join(layers[0].as_str().context("a layer path")?);
    let unpacked = dir.path().join("layer");
    std::fs::create_dir(&unpacked)?;
    untar(&layer, &unpacked)?;
    let files: Vec<String> = walk(&unpacked)?;
    assert_eq!(files, ["plugin.wasm"], "the layer holds only plugin.wasm");
    let in_image = std::fs::read(unpacked.join("plugin.wasm"))?;
    assert!(
        in_image == built,
        "plugin.wasm differs from the built filter ({} vs {} bytes)",
        in_image.len(),
        built.len()
    );
    Ok(())
}

fn untar(archive: &Path, into: &Path) -> Result<()> {
    let status = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()?;
    anyhow::ensure!(status.success(), "tar -xf {}", archive.display());
    Ok(())
}

/// The files (not folders) under `dir`, relative, sorted.
fn walk(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir)?.display().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

// --- RBAC against the calls of the real `sluice xds --kube` -------------------------------------

type Body = BoxBody<Bytes, Infallible>;

fn full(value: Value) -> Body {
    Full::new(Bytes::from(value.to_string())).boxed()
}

/// One Ingress of Sluice's class whose backend Service does not exist: the xds-server rejects it and
/// writes that to its status, so the status patch is among the calls.
fn ingress() -> Value {
    json!({
        "apiVersion": "networking.internal.knative.dev/v1alpha1",
        "kind": "Ingress",
        "metadata": {
            "namespace": "default", "name": "hello", "resourceVersion": "1", "generation": 1,
            "annotations": {"networking.knative.dev/ingress.class": "sluice.ingress.networking.knative.dev"},
        },
        "spec": {"rules": [{
            "hosts": ["hello.example.com"], "visibility": "ExternalIP",
            "http": {"paths": [{"splits": [{"serviceNamespace": "default", "serviceName": "missing",
                "servicePort": 80, "percent": 100}]}]},
        }]},
    })
}

/// Leases by path, with their resourceVersion.
type Leases = Arc<Mutex<BTreeMap<String, Value>>>;

/// A fake API server that answers lists (the Ingress above, nothing else), holds watches open, echoes
/// patches, keeps Leases (get, create, update), answers 404 to anything else, and records every
/// request.
async fn fake_api_server(calls: Arc<Mutex<Vec<(String, String, String)>>>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let leases: Leases = Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let calls = calls.clone();
            let leases = leases.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let calls = calls.clone();
                    let leases = leases.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or_default().to_string();
                        calls
                            .lock()
                            .unwrap()
                            .push((method.clone(), path.clone(), query.clone()));
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(answer(&method, &path, &query, &body, &leases))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    Ok(addr)
}

fn answer(method: &str, path: &str, query: &str, body: &[u8], leases: &Leases) -> Response<Body> {
    let Some(call) = api_call(method, path, query) else {
        return Response::builder()
            .status(404)
            .body(full(json!({})))
            .expect("a response");
    };
    match call.verb.as_str() {
        "watch" => {
            // Nothing changes: the stream stays open and silent.
            let pending = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
            Response::new(StreamBody::new(pending).boxed())
        }
        "list" => {
            let items = if call.resource == "ingresses" {
                vec![ingress()]
            } else {
                vec![]
            };
            Response::new(full(json!({
                "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items,
            })))
        }
        "patch" if call.resource == "ingresses/status" => Response::new(full(ingress())),
        "get" if call.resource == "leases" => match leases.lock().unwrap().get(path) {
            Some(lease) => Response::new(full(lease.clone())),
            None => not_found(),
        },
        "create" | "update" if call.resource == "leases" => {
            let Ok(mut lease) = serde_json::from_slice::<Value>(body) else {
                return Response::builder()
                    .status(400)
                    .body(full(json!({})))
                    .expect("a response");
            };
            let mut leases = leases.lock().unwrap();
            // Create names the collection, update the object.
            let key = match call.verb.as_str() {
                "create" => format!(
                    "{path}/{}",
                    lease["metadata"]["name"].as_str().unwrap_or("")
                ),
                _ => path.to_string(),
            };
            let version = 1 + lease["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            lease["metadata"]["resourceVersion"] = version.to_string().into();
            leases.insert(key, lease.clone());
            Response::builder()
                .status(if call.verb == "create" { 201 } else { 200 })
                .body(full(lease))
                .expect("a response")
        }
        _ => not_found(),
    }
}

fn not_found() -> Response<Body> {
    Response::builder()
        .status(404)
        .body(full(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})))
        .expect("a response")
}

/// The manifest's arguments made runnable on this machine: loopback instead of every address and
/// the cluster's DNS names, free ports instead of fixed ones. Nothing else changes.
fn local_args(args: &[String]) -> Result<Vec<String>> {
    args.iter()
        .map(|a| {
            Ok(match a.split_once('=') {
                Some(("--listen", _)) => "--listen=127.0.0.1".to_string(),
                Some((flag @ ("--xds-port" | "--control-port"), _)) => {
                    format!("{flag}={}", sluice_e2e::free_port())
                }
                Some((flag @ ("--probe-external" | "--probe-internal"), value)) => {
                    format!("{flag}=127.0.0.1:{}", host_port(value)?.1)
                }
                _ => a.clone(),
            })
        })
        .collect()
}

fn rule_allows(rule: &k8s_openapi::api::rbac::v1::PolicyRule, call: &ApiCall) -> bool {
    let any = |list: &Option<Vec<String>>, want: &str| {
        list.iter().flatten().any(|v| v == want || v == "*")
    };
    any(&rule.api_groups, &call.group)
        && any(&rule.resources, &call.resource)
        && rule.verbs.iter().any(|v| v == &call.verb || v == "*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_what_sluice_xds_kube_calls() -> Result<()> {
    let objects = kustomize(&manifests_path("base"))?;
    let xds = objects.deployment("sluice-xds-server")?;
    let spec = pod(xds);
    let account = spec
        .service_account_name
        .clone()
        .context("the xds-server's ServiceAccount")?;
    let namespace = xds.metadata.namespace.clone().context("namespace")?;
    assert!(
        objects
            .service_accounts
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(&*account)
                && s.metadata.namespace.as_deref() == Some(&*namespace))
    );
    let bound = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(&*namespace)
        })
    };
    // The rules that hold for this ServiceAccount: cluster-wide, and per namespace.
    let mut cluster_rules = Vec::new();
    for binding in objects
        .cluster_role_bindings
        .iter()
        .filter(|b| bound(&b.subjects))
    {
        let role = objects
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(&*binding.role_ref.name))
            .context("the bound ClusterRole")?;
        cluster_rules.extend(role.rules.clone().unwrap_or_default());
    }
    let mut namespaced_rules = Vec::new();
    for binding in objects.role_bindings.iter().filter(|b| bound(&b.subjects)) {
        let role = objects
            .roles
            .iter()
            .find(|r| {
                r.metadata.name.as_deref() == Some(&*binding.role_ref.name)
                    && r.metadata.namespace == binding.metadata.namespace
            })
            .context("the bound Role")?;
        for rule in role.rules.clone().unwrap_or_default() {
            namespaced_rules.push((binding.metadata.namespace.clone().unwrap_or_default(), rule));
        }
    }

    // The real binary with the manifest's arguments, against the recording fake.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let api = fake_api_server(calls.clone()).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{api}\"}}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
         current-context: fake\n"
        ),
    )?;
    let args = local_args(
        &container(xds, "xds-server")
            .args
            .clone()
            .unwrap_or_default(),
    )?;
    let mut child = tokio::process::Command::new(sluice_bin()?)
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        // What the manifest's downward API gives the pod.
        .env("POD_NAME", "sluice-xds-server-0")
        .env("POD_NAMESPACE", &namespace)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // Until it has listed and watched every kind and written the Ingress's status.
    let deadline = Instant::now() + Duration::from_secs(90);
    let made = loop {
        let made: BTreeSet<ApiCall> = calls
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(m, p, q)| api_call(m, p, q))
            .collect();
        let watches = made.iter().filter(|c| c.verb == "watch").count();
        // The leader renews its Lease (an update) every --retry-period (10 s).
        let renewed = made
            .iter()
            .any(|c| c.resource == "leases" && c.verb == "update");
        if watches >= 5 && renewed && made.iter().any(|c| c.resource == "ingresses/status") {
            break made;
        }
        if let Some(status) = child.try_wait()? {
            bail!("sluice {args:?} exited ({status}); calls so far: {made:?}");
        }
        anyhow::ensure!(Instant::now() < deadline, "calls after 90 s: {made:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().await?;
    let unparsed: Vec<_> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, p, q)| api_call(m, p, q).is_none())
        .cloned()
        .collect();
    assert!(
        unparsed.is_empty(),
        "requests outside the resource API: {unparsed:?}"
    );

    // Every call is allowed...
    for call in &made {
        let allowed = cluster_rules.iter().any(|r| rule_allows(r, call))
            || namespaced_rules
                .iter()
                .any(|(ns, r)| call.namespace.as_deref() == Some(ns) && rule_allows(r, call));
        assert!(allowed, "the manifests' RBAC does not allow {call:?}");
    }
    // ...and every grant is used (least privilege).
    for rule in cluster_rules
        .iter()
        .chain(namespaced_rules.iter().map(|(_, r)| r))
    {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let used = made
                        .iter()
                        .any(|c| &c.group == group && &c.resource == resource && &c.verb == verb);
                    assert!(
                        used,
                        "granted but never called: {verb} {group:?}/{resource}"
                    );
                }
            }
        }
    }
    Ok(())
}
