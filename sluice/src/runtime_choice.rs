//! `sluice up --runtime auto|container|process`: which runtime runs the revisions' instances.
//!
//! `auto` (the default) uses the container engine when one answers (`DOCKER_HOST`, else the default
//! socket) and falls back to local processes otherwise; `container` requires an engine; `process`
//! never touches one.

use std::sync::Arc;

use anyhow::{Result, bail};
use sluice_runtime::{
    ContainerRuntime, InstanceRuntime, ProcessRuntime, RuntimeKind, RuntimeOptions,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeChoice {
    /// Containers when an engine answers, else local processes.
    Auto,
    /// Containers on the engine; `sluice up` fails when none answers.
    Container,
    /// Local processes from each container's `command`; the engine is never asked.
    Process,
}

/// The runtime decided on, and why (logged once and shown by `sluice status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub kind: RuntimeKind,
    pub why: String,
}

/// Decides from the choice and what the engine answered (`None`: it was not asked).
pub fn decide(choice: RuntimeChoice, engine: Option<Result<(), String>>) -> Result<Decision> {
    Ok(match (choice, engine) {
        (RuntimeChoice::Process, _) => Decision {
            kind: RuntimeKind::Process,
            why: "--runtime process: instances run as local processes from their `command`"
                .to_string(),
        },
        (RuntimeChoice::Container | RuntimeChoice::Auto, Some(Ok(()))) => Decision {
            kind: RuntimeKind::Container,
            why: "a container engine answers: instances run from their images".to_string(),
        },
        (RuntimeChoice::Container, Some(Err(e))) => bail!(
            "--runtime container: no container engine answers ({e}); start Docker or Podman, or set \
             DOCKER_HOST to its socket (or use --runtime process to run containers' commands as \
             local processes)"
        ),
        (RuntimeChoice::Auto, Some(Err(e))) => Decision {
            kind: RuntimeKind::Process,
            why: format!(
                "no container engine answers ({e}): instances run as local processes from their \
                 `command`; revisions with only an image stay not ready until an engine runs"
            ),
        },
        (RuntimeChoice::Container | RuntimeChoice::Auto, None) => {
            bail!("the container engine must be asked for --runtime {choice:?}")
        }
    })
}

/// Connects as `choice` asks and starts the runtime.
pub async fn start(
    choice: RuntimeChoice,
    options: RuntimeOptions,
) -> Result<(Arc<dyn InstanceRuntime>, Decision)> {
    if choice == RuntimeChoice::Process {
        let decision = decide(choice, None)?;
        return Ok((Arc::new(ProcessRuntime::new(options)?), decision));
    }
    match ContainerRuntime::connect(options.clone()).await {
        Ok(runtime) => {
            let decision = decide(choice, Some(Ok(())))?;
            Ok((Arc::new(runtime), decision))
        }
        Err(e) => {
            let decision = decide(choice, Some(Err(e.to_string())))?;
            Ok((Arc::new(ProcessRuntime::new(options)?), decision))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_chosen_as_asked() {
        let down = || Some(Err("connection refused".to_string()));
        type Engine = Option<Result<(), String>>;
        let table: Vec<(RuntimeChoice, Engine, Result<RuntimeKind, &str>)> = vec![
            (
                RuntimeChoice::Auto,
                Some(Ok(())),
                Ok(RuntimeKind::Container),
            ),
            (RuntimeChoice::Auto, down(), Ok(RuntimeKind::Process)),
            (
                RuntimeChoice::Container,
                Some(Ok(())),
                Ok(RuntimeKind::Container),
            ),
            (
                RuntimeChoice::Container,
                down(),
                Err("no container engine answers (connection refused)"),
            ),
            (RuntimeChoice::Process, None, Ok(RuntimeKind::Process)),
            (
                RuntimeChoice::Process,
                Some(Ok(())),
                Ok(RuntimeKind::Process),
            ),
        ];
        for (choice, engine, want) in table {
            let got = decide(choice, engine.clone());
            match (got, want) {
                (Ok(d), Ok(kind)) => {
                    assert_eq!(d.kind, kind, "{choice:?} {engine:?}");
                    assert!(!d.why.is_empty());
                }
                (Err(e), Err(msg)) => {
                    let e = e.to_string();
                    assert!(e.contains(msg) && e.contains("DOCKER_HOST"), "{e}");
                }
                (got, want) => panic!("{choice:?} {engine:?}: got {got:?}, want {want:?}"),
            }
        }
        // The fallback says why, so the log line explains it.
        let d = decide(RuntimeChoice::Auto, down()).unwrap();
        assert!(d.why.contains("connection refused"), "{}", d.why);
    }
}
