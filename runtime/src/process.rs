//! The process backend: revision instances as local child processes. The lifecycle (scale plans,
//! probes, restarts, stops, logs) is the shared core's (`core.rs`), the public face `runtime.rs`'s;
//! this file spawns in its own process group, waits, and signals the group.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

use crate::core::{
    Backend, BackendInstance, Core, Exit, Kill, Launch, ResolveFuture, StartContext, Started,
};
use crate::logs::{append, format_line};
use crate::probe::LocalExec;
use crate::runtime::Runtime;
use crate::{LaunchSpec, ProcessRuntime, RevisionKey, RuntimeError, RuntimeKind, RuntimeOptions};

impl ProcessRuntime {
    /// Creates the runtime; `options.state_dir` is created if missing. Must be called inside a Tokio
    /// runtime; the methods are synchronous (they start work on that runtime) except `shutdown`.
    pub fn new(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let backend = ProcessBackend {
            ports: Arc::clone(&options.ports),
        };
        Ok(Runtime::with_core(Core::new(options, backend)?))
    }
}

/// Spawns instances as process-group leaders with a leased PORT on 127.0.0.1.
pub struct ProcessBackend {
    ports: Arc<crate::PortPool>,
}

/// What the core holds while a process instance lives: its group to SIGKILL, and its PORT.
pub struct ProcessKiller {
    pgid: Option<i32>,
    _port: crate::PortLease,
}

impl Kill for ProcessKiller {
    fn kill_now(&self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

pub struct ProcessInstance {
    child: Child,
    pgid: Option<i32>,
    status: Option<Option<ExitStatus>>,
}

impl BackendInstance for ProcessInstance {
    async fn wait(&mut self) -> Exit {
        if self.status.is_none() {
            self.status = Some(self.child.wait().await.ok());
        }
        Exit {
            how: describe(self.status.flatten()),
            failure: None,
        }
    }

    async fn terminate(&mut self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGTERM);
        }
    }

    async fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGKILL);
        }
        let _ = self.child.start_kill();
    }

    async fn cleanup(mut self) {
        // Whatever the leader did, its group goes with it (as a container's processes do).
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGKILL);
        }
        if self.status.is_none() {
            let _ = self.child.wait().await;
        }
    }
}

impl Backend for ProcessBackend {
    type Instance = ProcessInstance;
    type Exec = LocalExec;
    type Killer = ProcessKiller;
    const KIND: RuntimeKind = RuntimeKind::Process;

    fn check(&self, key: &RevisionKey, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        let fail = |reason: &str| RuntimeError::InvalidSpec {
            revision: key.to_string(),
            reason: reason.to_string(),
        };
        if spec.command.first().is_none_or(|c| c.is_empty()) {
            return Err(fail(if spec.image.is_some() {
                "this revision has only an image: start a container engine (Docker, or Podman's \
                 socket via DOCKER_HOST) or give the container a `command` to run it as a local process"
            } else {
                "command is empty: the local runtime needs the container's `command` (program to run)"
            }));
        }
        if !spec.sidecars.is_empty() {
            return Err(fail(
                "this revision has several containers (sidecars): the process runtime runs one \
                 container per revision; start a container engine (Docker, or Podman's socket via \
                 DOCKER_HOST)",
            ));
        }
        Ok(())
    }

    fn resolve(&self, _spec: &Arc<LaunchSpec>) -> Option<ResolveFuture> {
        None
    }

    fn launch(&self, ctx: &StartContext) -> Result<Launch<Self>, RuntimeError> {
        let spec = &ctx.spec;
        let name = &ctx.name;
        let log = &ctx.log;
        let lease = self.ports.lease().map_err(RuntimeError::Ports)?;
        let port = lease.port();
        let env = instance_env(spec, port);
        let (program, args) = spec.argv();
        // Kubernetes expands $(VAR) in command and args from the container's environment.
        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let program = crate::expand::expand(program, lookup);
        let args: Vec<String> = args
            .iter()
            .map(|a| crate::expand::expand(a, lookup))
            .collect();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            // After the spec's env, so an app cannot hide from the next run's reaping by accident.
            .env(crate::leftovers::OWNER_ENV, &ctx.owner)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so SIGTERM/SIGKILL reach the children it forks (a shell's, say).
            .process_group(0)
            // Backstop only: Drop and the instance task signal the whole group themselves.
            .kill_on_drop(true);
        if let Some(dir) = &spec.working_dir {
            cmd.current_dir(dir);
        }
        // SIGKILL when sluice dies, even by kill -9: an instance never outlives the runtime's process.
        let mut child = crate::spawn_tied(cmd, libc::SIGKILL).map_err(|source| {
            append(
                log,
                &format_line(
                    SystemTime::now(),
                    name,
                    "sluice",
                    format!("cannot start {program:?}: {source}").as_bytes(),
                ),
            );
            RuntimeError::Spawn {
                instance: name.clone(),
                program: program.to_string(),
                source,
            }
        })?;
        let pid = child.id();
        // The child leads its group (process_group(0)); never signal group 0 or 1.
        let pgid = pid.map(|p| p as i32).filter(|p| *p > 1);
        append(
            log,
            &format_line(
                SystemTime::now(),
                name,
                "sluice",
                format!(
                    "started pid {} port {port}: {program} {}",
                    pid.unwrap_or(0),
                    spec.argv().1.join(" ")
                )
                .as_bytes(),
            ),
        );
        if let Some(out) = child.stdout.take() {
            ctx.handle
                .spawn(pump(out, Arc::clone(log), name.clone(), "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            ctx.handle
                .spawn(pump(err, Arc::clone(log), name.clone(), "stderr"));
        }
        tracing::info!(revision = %ctx.key, instance = %name, ?pid, port, "instance started");
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let exec = LocalExec {
            env,
            working_dir: spec.working_dir.clone(),
        };
        let started = Started {
            instance: ProcessInstance {
                child,
                pgid,
                status: None,
            },
            exec,
            address,
            port,
            pid,
            container_id: None,
            probe_ports: false,
        };
        Ok(Launch {
            killer: ProcessKiller { pgid, _port: lease },
            port,
            address,
            pid,
            started: Box::pin(async move { Ok(started) }),
        })
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "unknown status".into(), |s| s.to_string())
}

/// Longest log line kept whole; a longer run without a newline is split (it would grow memory without
/// bound otherwise).
const MAX_LOG_LINE: usize = 64 * 1024;

/// Copies one output stream into the log, line by line with a prefix.
pub(crate) async fn pump(
    stream: impl AsyncRead + Unpin,
    log: Arc<std::fs::File>,
    instance: String,
    name: &'static str,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => {
                if !line.is_empty() {
                    append(
                        &log,
                        &format_line(SystemTime::now(), &instance, name, &line),
                    );
                }
                return;
            }
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..=i]);
                    (true, i + 1)
                }
                None => {
                    line.extend_from_slice(buf);
                    (line.len() >= MAX_LOG_LINE, buf.len())
                }
            },
        };
        reader.consume(used);
        if done {
            append(
                &log,
                &format_line(SystemTime::now(), &instance, name, &line),
            );
            line.clear();
        }
    }
}

/// The process environment: the spec's env, then Knative's (which wins, as Knative reserves these
/// names). The runtime's own environment is inherited underneath (PATH, HOME, ...), unlike a container.
fn instance_env(spec: &LaunchSpec, port: u16) -> Vec<(String, String)> {
    // Knative's PORT comes first in the pod's env, so the user's values can refer to it.
    let mut with_port = vec![("PORT".to_string(), port.to_string())];
    with_port.extend(spec.env.iter().cloned());
    let mut env: Vec<(String, String)> = crate::expand::expand_env(&with_port)
        .into_iter()
        .skip(1)
        .collect();
    env.extend([
        ("PORT".to_string(), port.to_string()),
        ("K_SERVICE".to_string(), spec.service.clone()),
        ("K_CONFIGURATION".to_string(), spec.configuration.clone()),
        ("K_REVISION".to_string(), spec.revision.clone()),
    ]);
    env
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // ESRCH: the group is already gone, which is what we wanted.
        if err.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %err, "cannot signal instance process group");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knative_env_wins_over_the_spec_env() {
        let mut spec = LaunchSpec::new(vec!["x".into()], "svc", "cfg", "cfg-00001");
        spec.env = vec![("A".into(), "1".into()), ("PORT".into(), "1".into())];
        let env = instance_env(&spec, 8080);
        let last = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("PORT"), Some("8080"));
        assert_eq!(last("A"), Some("1"));
        assert_eq!(last("K_SERVICE"), Some("svc"));
        assert_eq!(last("K_CONFIGURATION"), Some("cfg"));
        assert_eq!(last("K_REVISION"), Some("cfg-00001"));
    }

    #[tokio::test]
    async fn output_is_logged_line_by_line_and_long_runs_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let long = 2 * MAX_LOG_LINE + 100;
        let mut input = b"one\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', long));
        input.extend(b"\nlast without newline");
        pump(&input[..], Arc::new(file), "i-1".into(), "stdout").await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.contains(" i-1 stdout ")));
        let texts: Vec<&str> = text
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap())
            .collect();
        let (xs, others): (Vec<&str>, Vec<&str>) = texts.iter().partition(|t| t.starts_with('x'));
        assert_eq!(others, vec!["one", "two", "last without newline"]);
        // Split into pieces of at most the cap plus one read buffer, none lost.
        assert!(xs.len() >= 2, "{} pieces", xs.len());
        assert!(xs.iter().all(|x| x.len() <= MAX_LOG_LINE + 8 * 1024));
        assert_eq!(xs.iter().map(|x| x.len()).sum::<usize>(), long);
    }
}
