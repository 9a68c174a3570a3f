//! Pure decisions of the container runtime: what to ask the engine for (the create body of a serving
//! container or a sidecar, labels, names) and how to word what it answers (Knative's reasons and
//! messages). No I/O here; `container.rs` sends these and reads the answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, HostConfig, Mount as EngineMount, MountTypeEnum};

use crate::{ImageSpec, LaunchSpec, Mount, MountSource, PullPolicy, Resources, SecurityContext};

/// Label keys on everything the container runtime creates.
pub const LABEL_OWNER: &str = "sluice.owner";
pub const LABEL_NAMESPACE: &str = "sluice.namespace";
pub const LABEL_SERVICE: &str = "sluice.service";
pub const LABEL_REVISION: &str = "sluice.revision";
pub const LABEL_INSTANCE: &str = "sluice.instance";
pub const LABEL_CONTAINER: &str = "sluice.container";

/// Knative's reason when the image cannot be fetched (RevisionContainerMissing).
pub const REASON_CONTAINER_MISSING: &str = "ContainerMissing";
/// The engine does not answer.
pub const REASON_ENGINE_UNAVAILABLE: &str = "ContainerEngineUnavailable";
/// Kubernetes' reason when a container's config cannot be honoured (runAsNonRoot with a root user).
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";

/// Knative's PORT default when the container names no containerPort.
pub const DEFAULT_CONTAINER_PORT: u16 = 8080;

/// The bridge network of one owner: `sluice-<12 hex digits of a hash of the owner>`.
pub fn network_name(owner: &str) -> String {
    // FNV-1a: stable across runs and Rust versions (std's hasher is not).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in owner.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("sluice-{:012x}", h & 0xffff_ffff_ffff)
}

/// Knative's RevisionContainerMissingMessage.
pub fn image_missing_message(reference: &str, engine_words: &str) -> String {
    format!("Unable to fetch image {reference:?}: {engine_words}")
}

/// What to do to resolve an image under its pull policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveStep {
    /// Inspect only: the image must be present (`Never`).
    InspectOnly,
    /// Inspect, pull when missing (`IfNotPresent`).
    InspectThenPull,
    /// Pull, then inspect (`Always`); a failed pull falls back to a local image (there may be no
    /// registry at all on a development machine).
    PullThenInspect,
}

pub fn resolve_step(policy: PullPolicy) -> ResolveStep {
    match policy {
        PullPolicy::Never => ResolveStep::InspectOnly,
        PullPolicy::IfNotPresent => ResolveStep::InspectThenPull,
        PullPolicy::Always => ResolveStep::PullThenInspect,
    }
}

/// The reference to pull: an untagged one means `:latest`, as for Kubernetes (the engine's pull API
/// would fetch every tag of a reference without one).
pub fn pull_reference(reference: &str) -> String {
    let name = reference.rsplit('/').next().unwrap_or(reference);
    if reference.contains('@') || name.contains(':') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    }
}

/// Kubernetes' runAsNonRoot check (kubelet `verifyRunAsNonRoot`): the effective user is the
/// securityContext's runAsUser, else the image's `User`. Err is the message.
pub fn verify_run_as_non_root(
    security: &SecurityContext,
    image_user: Option<&str>,
) -> Result<(), String> {
    if !security.run_as_non_root {
        return Ok(());
    }
    if let Some(uid) = security.run_as_user {
        return if uid == 0 {
            Err(
                "container's runAsUser breaks non-root policy (runAsNonRoot and runAsUser 0)"
                    .into(),
            )
        } else {
            Ok(())
        };
    }
    let user = image_user.unwrap_or("").split(':').next().unwrap_or("");
    match user {
        "" | "root" | "0" => Err("container has runAsNonRoot and image will run as root".into()),
        u if u.parse::<u64>().is_ok() => Ok(()),
        u => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({u}), cannot verify user is non-root"
        )),
    }
}

/// One container to create (the serving one or a sidecar), with everything already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    /// Engine image ID.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// The final environment, in order (later entries win in the engine as in Kubernetes).
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub labels: Vec<(String, String)>,
    pub resources: Resources,
    pub security: SecurityContext,
    pub mounts: Vec<Mount>,
    /// Where each emptyDir volume lives on the host (a folder per instance, shared by its containers).
    pub empty_dir_root: PathBuf,
    /// `container:<id>` for a sidecar; the runtime's bridge network for the serving container.
    pub network_mode: String,
}

/// The engine's create body for `plan`.
pub fn create_body(plan: &ContainerPlan) -> ContainerCreateBody {
    // Kubernetes expands $(VAR) in command and args from the container's environment.
    let lookup = |name: &str| {
        plan.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let expand = |items: &[String]| -> Vec<String> {
        items
            .iter()
            .map(|a| crate::expand::expand(a, lookup))
            .collect()
    };
    // Kubernetes: `command` replaces the image's ENTRYPOINT (and then its CMD is not used), `args`
    // replaces its CMD. The engine merges the same way: a set Entrypoint without Cmd runs no CMD.
    let (entrypoint, cmd) = match (plan.command.is_empty(), plan.args.is_empty()) {
        (true, true) => (None, None),
        (true, false) => (None, Some(expand(&plan.args))),
        (false, _) => (Some(expand(&plan.command)), Some(expand(&plan.args))),
    };
    let user = plan
        .security
        .run_as_user
        .map(|uid| match plan.security.run_as_group {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        });
    let mut mounts = Vec::new();
    let mut tmpfs = HashMap::new();
    for m in &plan.mounts {
        match &m.source {
            MountSource::Dir(dir) => mounts.push(bind(dir, &m.target, m.read_only)),
            MountSource::EmptyDir { memory: true, .. } => {
                // tmpfs is per container: a memory emptyDir is not shared with the sidecars.
                let opts = if m.read_only { "ro" } else { "rw" };
                tmpfs.insert(m.target.clone(), opts.to_string());
            }
            MountSource::EmptyDir { name, .. } => mounts.push(bind(
                &plan.empty_dir_root.join(name),
                &m.target,
                m.read_only,
            )),
        }
    }
    let labels: HashMap<String, String> = plan.labels.iter().cloned().collect();
    ContainerCreateBody {
        image: Some(plan.image.clone()),
        entrypoint,
        cmd,
        env: Some(plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: plan.working_dir.as_ref().map(|d| d.display().to_string()),
        user,
        labels: Some(labels),
        // No stdin, no tty: output goes to the engine's log, which the runtime follows.
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        host_config: Some(HostConfig {
            network_mode: Some(plan.network_mode.clone()),
            nano_cpus: plan.resources.cpu_millis.map(|m| (m as i64) * 1_000_000),
            memory: plan.resources.memory_bytes.map(|b| b as i64),
            readonly_rootfs: Some(plan.security.read_only_root_filesystem),
            mounts: (!mounts.is_empty()).then_some(mounts),
            tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
            // The runtime replaces crashed instances itself, with its backoff and restart count.
            auto_remove: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bind(source: &Path, target: &str, read_only: bool) -> EngineMount {
    EngineMount {
        typ: Some(MountTypeEnum::BIND),
        source: Some(source.display().to_string()),
        target: Some(target.to_string()),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// The environment of a container: the spec's env (expanded against the earlier entries and PORT),
/// then Knative's PORT, K_SERVICE, K_CONFIGURATION and K_REVISION, which win.
pub fn container_env(
    spec: &LaunchSpec,
    env: &[(String, String)],
    port: u16,
) -> Vec<(String, String)> {
    let mut with_port = vec![("PORT".to_string(), port.to_string())];
    with_port.extend(env.iter().cloned());
    let mut out: Vec<(String, String)> = crate::expand::expand_env(&with_port)
        .into_iter()
        .skip(1)
        .collect();
    out.extend([
        ("PORT".to_string(), port.to_string()),
        ("K_SERVICE".to_string(), spec.service.clone()),
        ("K_CONFIGURATION".to_string(), spec.configuration.clone()),
        ("K_REVISION".to_string(), spec.revision.clone()),
    ]);
    out
}

/// The environment of a sidecar: its own env, then K_SERVICE, K_CONFIGURATION and K_REVISION.
/// Knative gives PORT to the serving container only.
pub fn sidecar_env(spec: &LaunchSpec, env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = crate::expand::expand_env(env);
    out.extend([
        ("K_SERVICE".to_string(), spec.service.clone()),
        ("K_CONFIGURATION".to_string(), spec.configuration.clone()),
        ("K_REVISION".to_string(), spec.revision.clone()),
    ]);
    out
}

/// Labels of one container of an instance.
pub fn labels(
    owner: &str,
    namespace: &str,
    spec: &LaunchSpec,
    instance: &str,
    container: &str,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = extra.to_vec();
    out.extend(
        [
            (LABEL_OWNER, owner),
            (LABEL_NAMESPACE, namespace),
            (LABEL_SERVICE, spec.service.as_str()),
            (LABEL_REVISION, spec.revision.as_str()),
            (LABEL_INSTANCE, instance),
            (LABEL_CONTAINER, container),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    out
}

/// The images a revision runs: the serving container's, then each sidecar's.
pub fn images_of(spec: &LaunchSpec) -> Vec<&ImageSpec> {
    spec.image
        .iter()
        .chain(spec.sidecars.iter().map(|s| &s.image))
        .collect()
}

/// How a container ended, in the words of `sluice status` (`exit code 1`, `exit code 137 (OOMKilled)`).
pub fn describe_exit(code: i64, oom_killed: bool) -> String {
    if oom_killed {
        format!("exit code {code} (OOMKilled)")
    } else {
        format!("exit code {code}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ContainerPlan {
        ContainerPlan {
            image: "sha256:abc".into(),
            command: vec![],
            args: vec![],
            env: vec![("PORT".into(), "9000".into())],
            working_dir: None,
            labels: vec![("sluice.owner".into(), "/s".into())],
            resources: Resources::default(),
            security: SecurityContext::default(),
            mounts: vec![],
            empty_dir_root: PathBuf::from("/state/empty/i-1"),
            network_mode: "sluice-net".into(),
        }
    }

    #[test]
    fn command_replaces_entrypoint_and_args_replace_cmd() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (command, args, want entrypoint, want cmd)
        type Case = (
            Vec<String>,
            Vec<String>,
            Option<Vec<String>>,
            Option<Vec<String>>,
        );
        let cases: Vec<Case> = vec![
            (vec![], vec![], None, None),
            (vec![], strings(&["--x"]), None, Some(strings(&["--x"]))),
            (
                strings(&["/app"]),
                vec![],
                Some(strings(&["/app"])),
                Some(vec![]),
            ),
            (
                strings(&["/app", "-v"]),
                strings(&["--port=$(PORT)", "$(NOPE)"]),
                Some(strings(&["/app", "-v"])),
                Some(strings(&["--port=9000", "$(NOPE)"])),
            ),
        ];
        for (command, args, entrypoint, cmd) in cases {
            let body = create_body(&ContainerPlan {
                command: command.clone(),
                args: args.clone(),
                ..plan()
            });
            assert_eq!(body.entrypoint, entrypoint, "{command:?} {args:?}");
            assert_eq!(body.cmd, cmd, "{command:?} {args:?}");
        }
    }

    #[test]
    fn limits_user_and_mounts_map_to_the_engine() {
        let body = create_body(&ContainerPlan {
            resources: Resources {
                cpu_millis: Some(500),
                memory_bytes: Some(64 << 20),
            },
            security: SecurityContext {
                run_as_user: Some(1000),
                run_as_group: Some(2000),
                run_as_non_root: true,
                read_only_root_filesystem: true,
            },
            mounts: vec![
                Mount {
                    source: MountSource::Dir("/cfg".into()),
                    target: "/etc/cfg".into(),
                    read_only: true,
                },
                Mount {
                    source: MountSource::EmptyDir {
                        name: "cache".into(),
                        memory: false,
                    },
                    target: "/cache".into(),
                    read_only: false,
                },
                Mount {
                    source: MountSource::EmptyDir {
                        name: "shm".into(),
                        memory: true,
                    },
                    target: "/shm".into(),
                    read_only: false,
                },
            ],
            ..plan()
        });
        assert_eq!(body.user.as_deref(), Some("1000:2000"));
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.network_mode.as_deref(), Some("sluice-net"));
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].source.as_deref(), Some("/cfg"));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].source.as_deref(), Some("/state/empty/i-1/cache"));
        assert_eq!(
            host.tmpfs.unwrap().get("/shm").map(String::as_str),
            Some("rw")
        );
    }

    #[test]
    fn run_as_non_root_follows_the_kubelet() {
        let nonroot = SecurityContext {
            run_as_non_root: true,
            ..Default::default()
        };
        let cases: Vec<(SecurityContext, Option<&str>, bool)> = vec![
            (SecurityContext::default(), None, true),
            (nonroot, None, false),
            (nonroot, Some(""), false),
            (nonroot, Some("root"), false),
            (nonroot, Some("0:0"), false),
            (nonroot, Some("1000"), true),
            (nonroot, Some("1000:1000"), true),
            (nonroot, Some("app"), false),
            (
                SecurityContext {
                    run_as_user: Some(1000),
                    ..nonroot
                },
                Some("root"),
                true,
            ),
            (
                SecurityContext {
                    run_as_user: Some(0),
                    ..nonroot
                },
                Some("1000"),
                false,
            ),
        ];
        for (sec, user, ok) in cases {
            assert_eq!(
                verify_run_as_non_root(&sec, user).is_ok(),
                ok,
                "{sec:?} {user:?}"
            );
        }
    }

    #[test]
    fn knative_env_wins_and_sees_port() {
        let spec = LaunchSpec::new(vec![], "svc", "cfg", "cfg-00001");
        let env = container_env(
            &spec,
            &[
                ("A".into(), "port=$(PORT)".into()),
                ("K_SERVICE".into(), "mine".into()),
            ],
            8080,
        );
        let last = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("A"), Some("port=8080"));
        assert_eq!(last("K_SERVICE"), Some("svc"));
        assert_eq!(last("K_REVISION"), Some("cfg-00001"));
    }

    #[test]
    fn names_messages_and_steps() {
        assert_eq!(network_name("/a"), network_name("/a"));
        assert_ne!(network_name("/a"), network_name("/b"));
        assert_eq!(network_name("/a").len(), "sluice-".len() + 12);
        assert_eq!(
            image_missing_message("app:v1", "No such image: app:v1"),
            "Unable to fetch image \"app:v1\": No such image: app:v1"
        );
        assert_eq!(resolve_step(PullPolicy::Never), ResolveStep::InspectOnly);
        for (reference, want) in [
            ("app", "app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("localhost:5000/app:v1", "localhost:5000/app:v1"),
            ("app@sha256:abc", "app@sha256:abc"),
        ] {
            assert_eq!(pull_reference(reference), want);
        }
        assert_eq!(describe_exit(137, true), "exit code 137 (OOMKilled)");
        assert_eq!(describe_exit(1, false), "exit code 1");
    }
}
