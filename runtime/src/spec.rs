//! What to run for one revision: the runtime's own input types. The serving controller maps Knative's
//! first container (command, args, env, workingDir, readinessProbe) into these.

use std::path::PathBuf;
use std::time::Duration;

use crate::RuntimeError;

/// How to start one instance of a revision, and how to tell it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The container's `command` (program first). Must not be empty.
    pub command: Vec<String>,
    /// The container's `args`, appended after `command[1..]`.
    pub args: Vec<String>,
    /// The container's `env`, in order. `PORT` and `K_*` are set by the runtime and override these
    /// (Knative's webhook rejects them as reserved names anyway).
    pub env: Vec<(String, String)>,
    /// The container's `workingDir`; `None` runs in the runtime's current directory.
    pub working_dir: Option<PathBuf>,
    /// `K_SERVICE`: the Service owning the revision (empty for a bare Configuration).
    pub service: String,
    /// `K_CONFIGURATION`.
    pub configuration: String,
    /// `K_REVISION`.
    pub revision: String,
    /// The container's readinessProbe (Knative's default: TCP on PORT, see [`Probe::default`]).
    pub readiness: Probe,
    /// Time between SIGTERM and SIGKILL. Knative sets the pod's `terminationGracePeriodSeconds` to the
    /// revision's `timeoutSeconds` (deploy.go `makePodSpec`), so map that here.
    pub grace_period: Duration,
    /// The container's `image` and `imagePullPolicy`: set, the container runtime runs it (then `command`
    /// may be empty: the image's entrypoint runs); the process runtime ignores it and needs `command`.
    pub image: Option<ImageSpec>,
    /// `ports[0].containerPort`: the PORT the app listens on inside its container (Knative's default is
    /// 8080). The process runtime ignores it: local processes share one network, so each instance gets
    /// a leased PORT instead.
    pub container_port: Option<u16>,
    /// The Knative container's `name` (Knative defaults it to `user-container`), for logs and status.
    pub container_name: String,
    /// `livenessProbe`: after `failureThreshold` failures the instance is killed and replaced (a restart).
    pub liveness: Option<Probe>,
    /// `startupProbe`: readiness and liveness start only after it succeeded; after `failureThreshold`
    /// failures the instance is killed and replaced.
    pub startup: Option<Probe>,
    /// `resources.limits` (cpu, memory) as engine limits (container runtime only).
    pub resources: Resources,
    /// `volumeMounts`, resolved by the caller (ConfigMap/Secret contents written to a folder).
    pub mounts: Vec<Mount>,
    /// `securityContext` fields the engine can enforce (container runtime only).
    pub security: SecurityContext,
    /// The revision's other containers (Knative allows several; exactly one serves). They share the
    /// serving container's network, so they reach it and each other on localhost, as in a pod.
    pub sidecars: Vec<SidecarSpec>,
}

/// A container image and when to pull it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// As written in the YAML (`ghcr.io/x/app:v1`, `app`, `app@sha256:...`).
    pub reference: String,
    pub pull_policy: PullPolicy,
    /// The engine's image ID (`sha256:...`) this revision was first resolved to. Set, the runtime runs
    /// exactly that image and never resolves the tag again (Knative's tag-to-digest: a revision keeps
    /// its code when the tag is re-pointed, even across restarts of `sluice up`).
    pub pinned: Option<String>,
}

/// Kubernetes' `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// Kubernetes' default when the field is empty: `Always` for `:latest` or no tag, else
    /// `IfNotPresent` (a digest reference counts as a tag).
    pub fn default_for(reference: &str) -> PullPolicy {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        if reference.contains('@') {
            return PullPolicy::IfNotPresent;
        }
        match name.split_once(':') {
            Some((_, "latest")) | None => PullPolicy::Always,
            Some(_) => PullPolicy::IfNotPresent,
        }
    }

    /// Parses `imagePullPolicy` (empty means the default for `reference`).
    pub fn parse(value: &str, reference: &str) -> Result<PullPolicy, String> {
        match value {
            "" => Ok(PullPolicy::default_for(reference)),
            "Always" => Ok(PullPolicy::Always),
            "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
            "Never" => Ok(PullPolicy::Never),
            other => Err(format!(
                "imagePullPolicy {other:?} is not one of Always, IfNotPresent, Never"
            )),
        }
    }
}

/// `resources.limits`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU limit in millicores (`500m` = 500, `2` = 2000).
    pub cpu_millis: Option<u64>,
    /// Memory limit in bytes (`128Mi`).
    pub memory_bytes: Option<u64>,
}

/// One `volumeMount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: MountSource,
    /// `mountPath` inside the container.
    pub target: String,
    pub read_only: bool,
}

/// Where a mount's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A host folder (a ConfigMap's or Secret's keys written as files by the caller).
    Dir(std::path::PathBuf),
    /// An `emptyDir` volume: made fresh per instance and shared by its containers; `memory` for
    /// `medium: Memory` (tmpfs).
    EmptyDir { name: String, memory: bool },
}

/// `securityContext` fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    /// Refuse to start when the effective user would be root (uid 0).
    pub run_as_non_root: bool,
    pub read_only_root_filesystem: bool,
}

/// A revision's non-serving container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSpec {
    pub name: String,
    pub image: ImageSpec,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<std::path::PathBuf>,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub startup: Option<Probe>,
    pub resources: Resources,
    pub mounts: Vec<Mount>,
    pub security: SecurityContext,
}

impl LaunchSpec {
    /// A spec with Knative's defaults: TCP readiness on PORT and a 300 s grace period (Knative's default
    /// revision `timeoutSeconds`, which becomes the pod's termination grace period).
    pub fn new(
        command: Vec<String>,
        service: impl Into<String>,
        configuration: impl Into<String>,
        revision: impl Into<String>,
    ) -> Self {
        LaunchSpec {
            command,
            args: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            service: service.into(),
            configuration: configuration.into(),
            revision: revision.into(),
            readiness: Probe::default(),
            // Knative: revision-timeout-seconds defaults to 300 and is the termination grace period.
            grace_period: Duration::from_secs(300),
            image: None,
            container_port: None,
            container_name: "user-container".to_string(),
            liveness: None,
            startup: None,
            resources: Resources::default(),
            mounts: Vec::new(),
            security: SecurityContext::default(),
            sidecars: Vec::new(),
        }
    }

    /// The same spec with no image pinned, to resolve every reference afresh: what a revision runs
    /// once the image it was pinned to is gone from the engine (the engine's store is the only copy
    /// locally, where a cluster would pull the digest again from its registry).
    pub(crate) fn unpinned(&self) -> LaunchSpec {
        let mut spec = self.clone();
        let images = spec
            .image
            .iter_mut()
            .chain(spec.sidecars.iter_mut().map(|s| &mut s.image));
        for image in images {
            image.pinned = None;
        }
        spec
    }

    /// The program and its full argument list (`command[1..]` then `args`).
    pub fn argv(&self) -> (&str, Vec<&str>) {
        let program = self.command.first().map(String::as_str).unwrap_or("");
        let rest = self
            .command
            .iter()
            .skip(1)
            .chain(self.args.iter())
            .map(String::as_str)
            .collect();
        (program, rest)
    }

    /// Checks what the runtime cannot run.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let fail = |reason: &str| RuntimeError::InvalidSpec {
            revision: self.revision.clone(),
            reason: reason.to_string(),
        };
        if self.image.is_none() && self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(fail(
                "command is empty: the local runtime needs the container's `command` (program to run)",
            ));
        }
        if self.revision.is_empty() {
            return Err(fail("revision name is empty (needed for K_REVISION)"));
        }
        if self.readiness.success_threshold == 0 {
            return Err(fail("readinessProbe.successThreshold must be at least 1"));
        }
        if self.readiness.failure_threshold == 0 {
            return Err(fail("readinessProbe.failureThreshold must be at least 1"));
        }
        if let ProbeAction::Exec { command } = &self.readiness.action
            && command.first().is_none_or(|c| c.is_empty())
        {
            return Err(fail("readinessProbe.exec.command is empty"));
        }
        if let ProbeAction::Http { path, .. } = &self.readiness.action
            && !path.is_empty()
            && !path.starts_with('/')
        {
            return Err(fail("readinessProbe.httpGet.path must start with '/'"));
        }
        Ok(())
    }
}

/// What a readiness probe does. Always against the instance's own PORT on 127.0.0.1 (Knative probes the
/// user container's port; a probe `port` other than the container port is not supported locally).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProbeAction {
    /// Open a TCP connection to PORT. Knative's default (`tcpSocket: {}`).
    #[default]
    Tcp,
    /// `GET path` over plain HTTP/1.1 to PORT; 200..=399 is success (Kubernetes and Knative).
    Http {
        path: String,
        headers: Vec<(String, String)>,
    },
    /// Run a command (with the instance's env and working dir; in the container for the container
    /// runtime); exit status 0 is success.
    Exec { command: Vec<String> },
    /// gRPC health checking (`grpc.health.v1.Health/Check`) on the port; SERVING is success.
    Grpc { service: Option<String> },
}

/// A readiness probe (Kubernetes `Probe` fields the runtime uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub action: ProbeAction,
    /// The probe's port when it is not the container's PORT (a sidecar's probe names its own port).
    pub port: Option<u16>,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds`; `None` means `periodSeconds: 0`, Knative's "aggressive" probing: probe fast until
    /// the first success, then steadily (see [`crate::ProbeTiming::startup_interval`]).
    pub period: Option<Duration>,
    /// `timeoutSeconds` for one attempt (steady-state probing).
    pub timeout: Duration,
    /// `successThreshold`: consecutive successes to become Ready.
    pub success_threshold: u32,
    /// `failureThreshold`: consecutive failures to become NotReady again.
    pub failure_threshold: u32,
}

impl Default for Probe {
    /// Knative's defaulted readiness probe (revision_defaults.go `applyProbes`): `tcpSocket: {}`,
    /// `successThreshold: 1`, `periodSeconds: 0` (aggressive); Kubernetes' `failureThreshold: 3` and
    /// `timeoutSeconds: 1` for the steady state after the first success.
    fn default() -> Self {
        Probe {
            action: ProbeAction::Tcp,
            port: None,
            initial_delay: Duration::ZERO,
            period: None,
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }
    }
}

impl Probe {
    /// An HTTP GET probe on `path`, otherwise Knative's defaults.
    pub fn http(path: impl Into<String>) -> Self {
        Probe {
            action: ProbeAction::Http {
                path: path.into(),
                headers: Vec::new(),
            },
            ..Probe::default()
        }
    }

    /// An exec probe running `command`, otherwise Knative's defaults.
    pub fn exec(command: Vec<String>) -> Self {
        Probe {
            action: ProbeAction::Exec { command },
            ..Probe::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str]) -> LaunchSpec {
        LaunchSpec::new(
            command.iter().map(|s| s.to_string()).collect(),
            "svc",
            "svc",
            "svc-00001",
        )
    }

    #[test]
    fn unpinned_clears_every_pin_and_nothing_else() {
        let pinned = |reference: &str| ImageSpec {
            reference: reference.into(),
            pull_policy: PullPolicy::IfNotPresent,
            pinned: Some("sha256:aaa".into()),
        };
        let mut s = spec(&[]);
        s.image = Some(pinned("app:v1"));
        s.sidecars.push(SidecarSpec {
            name: "log".into(),
            image: pinned("log:v1"),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            readiness: None,
            liveness: None,
            startup: None,
            resources: Resources::default(),
            mounts: Vec::new(),
            security: SecurityContext::default(),
        });
        let u = s.unpinned();
        assert_eq!(u.image.as_ref().unwrap().pinned, None);
        assert_eq!(u.sidecars[0].image.pinned, None);
        assert_eq!(u.image.as_ref().unwrap().reference, "app:v1");
        let mut back = u.clone();
        back.image = s.image.clone();
        back.sidecars[0].image = s.sidecars[0].image.clone();
        assert_eq!(back, s);
    }

    #[test]
    fn argv_is_command_then_args() {
        let mut s = spec(&["python3", "-u"]);
        s.args = vec!["app.py".into(), "--x".into()];
        assert_eq!(s.argv(), ("python3", vec!["-u", "app.py", "--x"]));
    }

    #[test]
    fn validation_names_what_to_fix() {
        let cases: Vec<(LaunchSpec, Option<&str>)> = vec![
            (spec(&["sleep", "1"]), None),
            (spec(&[]), Some("command is empty")),
            (spec(&[""]), Some("command is empty")),
            (
                LaunchSpec {
                    readiness: Probe {
                        success_threshold: 0,
                        ..Probe::default()
                    },
                    ..spec(&["x"])
                },
                Some("successThreshold"),
            ),
            (
                LaunchSpec {
                    readiness: Probe::exec(vec![]),
                    ..spec(&["x"])
                },
                Some("exec.command"),
            ),
            (
                LaunchSpec {
                    readiness: Probe::http("healthz"),
                    ..spec(&["x"])
                },
                Some("start with '/'"),
            ),
        ];
        for (s, want) in cases {
            match (s.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{e} should mention {w}"),
                (got, want) => panic!("{:?}: got {got:?}, want {want:?}", s.command),
            }
        }
    }

    #[test]
    fn pull_policy_defaults_as_kubernetes() {
        for (reference, want) in [
            ("app", PullPolicy::Always),
            ("app:latest", PullPolicy::Always),
            ("localhost:5000/app", PullPolicy::Always),
            ("localhost:5000/app:v1", PullPolicy::IfNotPresent),
            ("app:v1", PullPolicy::IfNotPresent),
            ("app@sha256:abc", PullPolicy::IfNotPresent),
        ] {
            assert_eq!(PullPolicy::default_for(reference), want, "{reference}");
        }
        assert!(PullPolicy::parse("Sometimes", "app").is_err());
        assert_eq!(PullPolicy::parse("Never", "app"), Ok(PullPolicy::Never));
    }

    #[test]
    fn default_probe_is_knatives_tcp_aggressive() {
        let p = Probe::default();
        assert_eq!(p.action, ProbeAction::Tcp);
        assert_eq!(p.period, None);
        assert_eq!(p.success_threshold, 1);
    }
}
