use super::*;
use sluice_api::Object;
use sluice_api::serving::Defaults;

/// A Revision with `spec` (YAML, indented 2) as the serving controller hands it over.
fn revision(spec: &str) -> Revision {
    let text = format!(
        "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata:\n  name: web-00001\n  \
         namespace: ns\n  labels:\n    serving.knative.dev/service: web\n    \
         serving.knative.dev/configuration: web\n  annotations: {{team: blue}}\nspec:\n{spec}"
    );
    let mut rev = match sluice_api::parse_documents(&text).remove(0) {
        Ok(Object::Revision(r)) => r,
        other => panic!("{other:?}"),
    };
    rev.spec.set_defaults(&Defaults::default());
    rev
}

struct World {
    config_maps: BTreeMap<(String, String), ConfigMap>,
    secrets: BTreeMap<(String, String), std::sync::Arc<Secret>>,
}

impl World {
    fn new() -> World {
        let mut w = World {
            config_maps: BTreeMap::new(),
            secrets: BTreeMap::new(),
        };
        w.config_map(
            "settings",
            &[("COLOR", "blue"), ("SIZE", "3"), ("1BAD", "x")],
        );
        let mut s = Secret::default();
        s.metadata.namespace = "ns".into();
        s.metadata.name = "creds".into();
        // "hunter2" in base64, and a plain stringData key.
        s.data.insert("password".into(), "aHVudGVyMg==".into());
        s.string_data.insert("user".into(), "admin".into());
        w.secrets
            .insert(("ns".into(), "creds".into()), std::sync::Arc::new(s));
        w
    }

    fn config_map(&mut self, name: &str, data: &[(&str, &str)]) {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = "ns".into();
        cm.metadata.name = name.into();
        cm.data = data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.config_maps.insert(("ns".into(), name.into()), cm);
    }

    fn launch(&self, runtime: RuntimeKind, rev: &Revision) -> Result<Launch, LaunchFailure> {
        launch_spec(
            rev,
            &LaunchInputs {
                runtime,
                dir: Path::new("/srv/folder"),
                volume_root: Path::new("/state/volumes/ns/web-00001"),
                config_maps: &self.config_maps,
                secrets: &self.secrets,
                pinned: Some("sha256:pinned".into()),
            },
        )
    }
}

const IMAGE_ONLY: &str = "  containers:\n  - image: example/web:v1\n";

fn env_of(l: &Launch) -> Vec<(&str, &str)> {
    l.spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[test]
fn an_image_only_revision_runs_from_its_image_with_knatives_defaults() {
    let l = World::new()
        .launch(RuntimeKind::Container, &revision(IMAGE_ONLY))
        .unwrap();
    let image = l.spec.image.as_ref().unwrap();
    assert_eq!(image.reference, "example/web:v1");
    assert_eq!(image.pull_policy, PullPolicy::IfNotPresent);
    assert_eq!(image.pinned.as_deref(), Some("sha256:pinned"));
    assert!(l.spec.command.is_empty());
    assert_eq!(l.spec.container_port, Some(8080));
    assert_eq!(l.spec.container_name, "user-container");
    assert_eq!(l.spec.readiness.action, ProbeAction::Tcp);
    assert_eq!(l.spec.working_dir, None);
    assert_eq!(
        (l.spec.service.as_str(), l.spec.revision.as_str()),
        ("web", "web-00001")
    );
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn the_process_runtime_needs_a_command_and_says_what_to_do() {
    let w = World::new();
    let f = w
        .launch(RuntimeKind::Process, &revision(IMAGE_ONLY))
        .unwrap_err();
    assert_eq!(f.reason, REASON_ENGINE_UNAVAILABLE);
    assert!(
        f.message.contains("start Docker or Podman")
            && f.message.contains("DOCKER_HOST")
            && f.message.contains("command"),
        "{}",
        f.message
    );
    // With a command it runs as today: relative workingDir from the folder, no image.
    let rev = revision(
        "  containers:\n  - image: example/web\n    command: [./web]\n    workingDir: app\n    \
         ports: [{containerPort: 9000}]\n",
    );
    let l = w.launch(RuntimeKind::Process, &rev).unwrap();
    assert_eq!(l.spec.image, None);
    assert_eq!(l.spec.container_port, None);
    assert_eq!(l.spec.working_dir, Some(PathBuf::from("/srv/folder/app")));
    // The container runtime takes workingDir inside the image, and command overrides the entrypoint.
    let l = w.launch(RuntimeKind::Container, &rev).unwrap();
    assert_eq!(l.spec.working_dir, Some(PathBuf::from("app")));
    assert_eq!(l.spec.command, ["./web"]);
    assert_eq!(l.spec.container_port, Some(9000));
    // A command without an image cannot run on the container runtime.
    let rev = revision("  containers:\n  - command: [./web]\n");
    let f = w.launch(RuntimeKind::Container, &rev).unwrap_err();
    assert!(f.message.contains("--runtime process"), "{}", f.message);
}

#[test]
fn pull_policies_follow_kubernetes_and_a_bad_one_names_the_field() {
    let w = World::new();
    for (image, policy, want) in [
        ("web", "", Ok(PullPolicy::Always)),
        ("web:latest", "", Ok(PullPolicy::Always)),
        ("web:v1", "", Ok(PullPolicy::IfNotPresent)),
        ("web:v1", "Never", Ok(PullPolicy::Never)),
        ("web", "IfNotPresent", Ok(PullPolicy::IfNotPresent)),
        (
            "web",
            "Sometimes",
            Err("spec.containers[0].imagePullPolicy"),
        ),
    ] {
        let rev = revision(&format!(
            "  containers:\n  - image: {image}\n    imagePullPolicy: {policy:?}\n"
        ));
        match (w.launch(RuntimeKind::Container, &rev), want) {
            (Ok(l), Ok(want)) => assert_eq!(l.spec.image.unwrap().pull_policy, want, "{image}"),
            (Err(f), Err(field)) => {
                assert!(f.message.starts_with(field), "{}", f.message);
                assert_eq!(f.reason, REASON_INVALID_SPEC);
            }
            (got, want) => panic!("{image} {policy}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn env_comes_from_config_maps_secrets_and_fields_in_kubernetes_order() {
    let rev = revision(
        "  containers:\n  - image: web\n    envFrom:\n    - configMapRef: {name: settings}\n      \
         prefix: CFG_\n    - secretRef: {name: creds}\n    env:\n    - {name: CFG_COLOR, value: red}\n    \
         - name: PASS\n      valueFrom: {secretKeyRef: {name: creds, key: password}}\n    \
         - name: SIZE\n      valueFrom: {configMapKeyRef: {name: settings, key: SIZE}}\n    \
         - name: MAYBE\n      valueFrom: {configMapKeyRef: {name: settings, key: nope, optional: true}}\n    \
         - name: GONE\n      valueFrom: {secretKeyRef: {name: absent, key: k, optional: true}}\n    \
         - name: NS\n      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}\n    \
         - name: TEAM\n      valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['team']\"}}\n",
    );
    let l = World::new().launch(RuntimeKind::Container, &rev).unwrap();
    assert_eq!(
        env_of(&l),
        [
            // envFrom first, keys in order and prefixed ("CFG_1BAD" is an env name, "1BAD" is not).
            ("CFG_1BAD", "x"),
            ("CFG_COLOR", "blue"),
            ("CFG_SIZE", "3"),
            ("password", "hunter2"),
            ("user", "admin"),
            // env after (a later name wins in the runtime), optional misses left unset.
            ("CFG_COLOR", "red"),
            ("PASS", "hunter2"),
            ("SIZE", "3"),
            ("NS", "ns"),
            ("TEAM", "blue"),
        ]
    );
    // A pod field with no local meaning is left unset and said.
    let rev = revision(
        "  containers:\n  - image: web\n    env:\n    - name: IP\n      valueFrom: {fieldRef: {fieldPath: status.podIP}}\n    \
         - name: CPU\n      valueFrom: {resourceFieldRef: {resource: limits.cpu, divisor: 1m}}\n    \
         resources: {limits: {cpu: 250m}}\n",
    );
    let l = World::new().launch(RuntimeKind::Container, &rev).unwrap();
    assert_eq!(env_of(&l), [("CPU", "250")]);
    assert!(
        l.warnings[0].contains("\"status.podIP\" has no local value, so IP is left unset"),
        "{:?}",
        l.warnings
    );
    // Without a prefix a key that is not an env name is skipped, as Kubernetes does.
    let rev = revision(
        "  containers:\n  - image: web\n    envFrom: [{configMapRef: {name: settings}}]\n",
    );
    let l = World::new()
        .launch(RuntimeKind::Process, &revision_with_command(rev))
        .unwrap();
    assert_eq!(env_of(&l), [("COLOR", "blue"), ("SIZE", "3")]);
}

fn revision_with_command(mut rev: Revision) -> Revision {
    rev.spec.containers[0].command = vec!["./web".into()];
    rev
}

#[test]
fn a_missing_config_map_secret_or_key_is_a_create_container_config_error() {
    let w = World::new();
    for (env, want) in [
        (
            "    envFrom: [{configMapRef: {name: absent}}]\n",
            "configmap \"absent\" not found",
        ),
        (
            "    envFrom: [{secretRef: {name: absent}}]\n",
            "secret \"absent\" not found",
        ),
        (
            "    env: [{name: A, valueFrom: {configMapKeyRef: {name: settings, key: nope}}}]\n",
            "couldn't find key nope in ConfigMap ns/settings",
        ),
        (
            "    env: [{name: A, valueFrom: {secretKeyRef: {name: creds, key: nope}}}]\n",
            "couldn't find key nope in Secret ns/creds",
        ),
        (
            "    env: [{name: A, valueFrom: {secretKeyRef: {name: other, key: k}}}]\n",
            "secret \"other\" not found",
        ),
    ] {
        let rev = revision(&format!("  containers:\n  - image: web\n{env}"));
        let f = w.launch(RuntimeKind::Container, &rev).unwrap_err();
        assert_eq!(f.reason, REASON_CONFIG_ERROR, "{env}");
        assert!(f.message.starts_with(want), "{env}: {}", f.message);
    }
    // Optional sources that are missing are fine.
    let rev = revision(
        "  containers:\n  - image: web\n    envFrom: [{configMapRef: {name: absent, optional: true}}]\n",
    );
    assert!(w.launch(RuntimeKind::Container, &rev).is_ok());
    // And it recovers once the YAML is there.
    let rev =
        revision("  containers:\n  - image: web\n    envFrom: [{configMapRef: {name: late}}]\n");
    assert!(w.launch(RuntimeKind::Container, &rev).is_err());
    let mut w = World::new();
    w.config_map("late", &[("X", "1")]);
    assert_eq!(
        env_of(&w.launch(RuntimeKind::Container, &rev).unwrap()),
        [("X", "1")]
    );
}

#[test]
fn config_map_and_secret_volumes_become_read_only_files() {
    let rev = revision(
        "  containers:\n  - image: web\n    volumeMounts:\n    - {name: cfg, mountPath: /etc/cfg, readOnly: true}\n    \
         - {name: sec, mountPath: /etc/sec, readOnly: true}\n    - {name: one, mountPath: /etc/size, readOnly: true, subPath: SIZE}\n    \
         - {name: scratch, mountPath: /scratch}\n  volumes:\n  - name: cfg\n    configMap:\n      name: settings\n      \
         items: [{key: COLOR, path: colors/main.txt}, {key: SIZE, path: size, mode: 0600}]\n  \
         - {name: sec, secret: {secretName: creds, defaultMode: 0400}}\n  - {name: one, configMap: {name: settings}}\n  \
         - {name: scratch, emptyDir: {medium: Memory}}\n",
    );
    let l = World::new().launch(RuntimeKind::Container, &rev).unwrap();
    let root = Path::new("/state/volumes/ns/web-00001");
    let files: Vec<(PathBuf, &[u8], u32)> = l
        .files
        .iter()
        .map(|f| (f.path.clone(), f.contents.as_slice(), f.mode))
        .collect();
    assert_eq!(
        files,
        [
            (root.join("cfg/colors/main.txt"), &b"blue"[..], 0o644),
            (root.join("cfg/size"), &b"3"[..], 0o600),
            (root.join("sec/password"), &b"hunter2"[..], 0o400),
            (root.join("sec/user"), &b"admin"[..], 0o400),
            (root.join("one/1BAD"), &b"x"[..], 0o644),
            (root.join("one/COLOR"), &b"blue"[..], 0o644),
            (root.join("one/SIZE"), &b"3"[..], 0o644),
        ]
    );
    assert_eq!(
        l.spec.mounts,
        [
            Mount {
                source: MountSource::Dir(root.join("cfg")),
                target: "/etc/cfg".into(),
                read_only: true
            },
            Mount {
                source: MountSource::Dir(root.join("sec")),
                target: "/etc/sec".into(),
                read_only: true
            },
            Mount {
                source: MountSource::Dir(root.join("one/SIZE")),
                target: "/etc/size".into(),
                read_only: true
            },
            Mount {
                source: MountSource::EmptyDir {
                    name: "scratch".into(),
                    memory: true
                },
                target: "/scratch".into(),
                read_only: false
            },
        ]
    );
    // A missing item key is a config error naming the volume; the process runtime mounts nothing.
    let bad = revision(
        "  containers:\n  - image: web\n    command: [./web]\n    volumeMounts: [{name: cfg, mountPath: /c, readOnly: true}]\n  \
         volumes: [{name: cfg, configMap: {name: settings, items: [{key: nope, path: n}]}}]\n",
    );
    let f = World::new()
        .launch(RuntimeKind::Container, &bad)
        .unwrap_err();
    assert_eq!(
        (f.reason.as_str(), f.message.as_str()),
        (
            REASON_CONFIG_ERROR,
            "volume \"cfg\": couldn't find key nope in ConfigMap ns/settings"
        )
    );
    let l = World::new().launch(RuntimeKind::Process, &bad).unwrap();
    assert!(l.files.is_empty() && l.spec.mounts.is_empty());
    assert!(
        l.warnings[0].contains("volumeMounts not enforced by the process runtime"),
        "{:?}",
        l.warnings
    );
}

#[test]
fn probes_limits_and_security_map_to_the_runtime() {
    let rev = revision(
        "  containers:\n  - image: web\n    ports: [{containerPort: 8081, name: h2c}]\n    \
         readinessProbe: {httpGet: {path: /ready, port: 8081}, periodSeconds: 2}\n    \
         livenessProbe: {tcpSocket: {port: 9999}, failureThreshold: 5}\n    \
         startupProbe: {grpc: {port: 8081, service: health}}\n    \
         resources: {limits: {cpu: 500m, memory: 128Mi, nvidia.com/gpu: 1}, requests: {cpu: 100m}}\n    \
         securityContext: {runAsUser: 1000, runAsNonRoot: true, readOnlyRootFilesystem: true, \
         capabilities: {drop: [ALL]}}\n",
    );
    let l = World::new().launch(RuntimeKind::Container, &rev).unwrap();
    let s = &l.spec;
    assert_eq!(s.container_port, Some(8081));
    assert!(matches!(&s.readiness.action, ProbeAction::Http { path, .. } if path == "/ready"));
    assert_eq!(
        (s.readiness.port, s.readiness.period),
        (None, Some(Duration::from_secs(2)))
    );
    let live = s.liveness.as_ref().unwrap();
    assert_eq!(
        (live.action.clone(), live.port),
        (ProbeAction::Tcp, Some(9999))
    );
    assert_eq!(live.failure_threshold, 5);
    // Kubernetes' default period for liveness and startup probes, not Knative's aggressive one.
    assert_eq!(live.period, Some(Duration::from_secs(10)));
    let startup = s.startup.as_ref().unwrap();
    assert_eq!(
        (startup.action.clone(), startup.port),
        (
            ProbeAction::Grpc {
                service: Some("health".into())
            },
            None
        )
    );
    assert_eq!(
        s.resources,
        Resources {
            cpu_millis: Some(500),
            memory_bytes: Some(134_217_728)
        }
    );
    assert_eq!(
        s.security,
        SecurityContext {
            run_as_user: Some(1000),
            run_as_group: None,
            run_as_non_root: true,
            read_only_root_filesystem: true
        }
    );
    let warned = l.warnings.join("\n");
    for field in [
        "resources.limits.nvidia.com/gpu",
        "securityContext: capabilities",
        "resources.requests",
    ] {
        assert!(warned.contains(field), "{field} not in {warned}");
    }
    // An exec probe keeps its command.
    let rev = revision(
        "  containers:\n  - image: web\n    readinessProbe: {exec: {command: [cat, /ready]}}\n",
    );
    let l = World::new().launch(RuntimeKind::Container, &rev).unwrap();
    assert_eq!(
        l.spec.readiness.action,
        ProbeAction::Exec {
            command: vec!["cat".into(), "/ready".into()]
        }
    );
}

#[test]
fn the_container_with_a_port_serves_and_the_others_are_sidecars() {
    let rev = revision(
        "  containers:\n  - {name: logger, image: logger:v1, env: [{name: A, value: b}], \
         readinessProbe: {tcpSocket: {port: 9100}}}\n  - {name: app, image: app:v1, ports: [{containerPort: 8000}]}\n",
    );
    let w = World::new();
    let l = w.launch(RuntimeKind::Container, &rev).unwrap();
    assert_eq!(l.spec.container_name, "app");
    assert_eq!(l.spec.image.as_ref().unwrap().reference, "app:v1");
    assert_eq!(l.spec.container_port, Some(8000));
    assert_eq!(l.spec.sidecars.len(), 1);
    let side = &l.spec.sidecars[0];
    assert_eq!(side.name, "logger");
    assert_eq!(side.image.reference, "logger:v1");
    assert_eq!(side.image.pinned, None);
    assert_eq!(side.env, [("A".to_string(), "b".to_string())]);
    assert_eq!(side.readiness.as_ref().unwrap().port, Some(9100));
    // The process runtime cannot run sidecars.
    let f = w.launch(RuntimeKind::Process, &rev).unwrap_err();
    assert_eq!(f.reason, REASON_ENGINE_UNAVAILABLE);
}
